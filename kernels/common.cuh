// Shared device helpers for every kernel module: storage types, conversions, index loops and reductions.
//
// Compiled by NVRTC without any system or CUDA header, so everything here is plain C++ plus CUDA builtins.
// Conventions used by all modules:
// - Element counts and offsets are 64-bit (`u64`), so tensors past 2^31 elements need no special path.
// - Every kernel guards its indices: sizes never need to be multiples of the block or grid.
// - Half-precision values (bf16, f16) are storage only: they are widened to f32, computed on, and rounded
//   (to nearest even) on store.
// - Kernels that reduce across a block expect blockDim.x to be a multiple of 32 (at most 1024); each says so.
#pragma once

typedef unsigned long long u64;
typedef long long i64;

// 16-bit storage types. Distinct structs (rather than two `unsigned short` typedefs) so overloads and templates
// can tell bf16 from f16. Layout: one 16-bit word, identical to Rust's `half::bf16` / `half::f16`.
struct __align__(2) bf16 {
    unsigned short bits;
};
struct __align__(2) f16 {
    unsigned short bits;
};

// ---- conversions ------------------------------------------------------------------------------------------

__device__ __forceinline__ float to_f32(float x) { return x; }

__device__ __forceinline__ float to_f32(bf16 x) { return __uint_as_float(((unsigned)x.bits) << 16); }

__device__ __forceinline__ float to_f32(f16 x) {
    unsigned sign = ((unsigned)x.bits & 0x8000u) << 16;
    unsigned exp = ((unsigned)x.bits >> 10) & 0x1fu;
    unsigned man = (unsigned)x.bits & 0x3ffu;
    if (exp == 0x1fu) {  // inf or NaN: keep the payload
        return __uint_as_float(sign | 0x7f800000u | (man << 13));
    }
    if (exp == 0u) {  // zero or subnormal: man * 2^-24, exact in f32
        float mag = (float)man * 5.9604644775390625e-8f;
        return sign ? -mag : mag;
    }
    return __uint_as_float(sign | ((exp + 112u) << 23) | (man << 13));  // rebias 15 -> 127
}

// Round `value` (an integer scaled by 2^shift) to nearest, ties to even, then shift it down.
__device__ __forceinline__ unsigned round_shift_rne(unsigned value, unsigned shift) {
    unsigned q = value >> shift;
    unsigned rem = value & ((1u << shift) - 1u);
    unsigned half = 1u << (shift - 1u);
    if (rem > half || (rem == half && (q & 1u))) {
        q += 1u;
    }
    return q;
}

__device__ __forceinline__ bf16 bf16_from_f32(float f) {
    unsigned u = __float_as_uint(f);
    bf16 r;
    if ((u & 0x7fffffffu) > 0x7f800000u) {  // NaN: truncate and force a quiet NaN so it cannot become inf
        r.bits = (unsigned short)((u >> 16) | 0x40u);
        return r;
    }
    // Adding 0x7fff plus the lowest kept bit rounds to nearest even; overflow correctly carries into inf.
    u += 0x7fffu + ((u >> 16) & 1u);
    r.bits = (unsigned short)(u >> 16);
    return r;
}

__device__ __forceinline__ f16 f16_from_f32(float f) {
    unsigned u = __float_as_uint(f);
    unsigned sign = (u >> 16) & 0x8000u;
    unsigned mag = u & 0x7fffffffu;
    f16 r;
    if (mag >= 0x7f800000u) {  // inf or NaN
        r.bits = (unsigned short)(sign | (mag > 0x7f800000u ? 0x7e00u : 0x7c00u));
    } else if (mag >= 0x477ff000u) {  // >= 65520 rounds past the largest half (65504): inf
        r.bits = (unsigned short)(sign | 0x7c00u);
    } else if (mag >= 0x38800000u) {  // normal half: rebias the exponent (127 -> 15), round 23 -> 10 bits
        r.bits = (unsigned short)(sign | round_shift_rne(mag - 0x38000000u, 13u));
    } else if (mag >= 0x33000000u) {  // subnormal half: value / 2^-24 rounded; may round up to the first normal
        unsigned exp = mag >> 23;
        unsigned man = (mag & 0x7fffffu) | 0x800000u;
        r.bits = (unsigned short)(sign | round_shift_rne(man, 126u - exp));
    } else {  // below half the smallest subnormal: signed zero
        r.bits = (unsigned short)sign;
    }
    return r;
}

template <typename T>
__device__ __forceinline__ T from_f32(float x);
template <>
__device__ __forceinline__ float from_f32<float>(float x) {
    return x;
}
template <>
__device__ __forceinline__ bf16 from_f32<bf16>(float x) {
    return bf16_from_f32(x);
}
template <>
__device__ __forceinline__ f16 from_f32<f16>(float x) {
    return f16_from_f32(x);
}

// ---- index loops ------------------------------------------------------------------------------------------

// First index and stride of a 1-D grid-stride loop, so any grid covers any size.
__device__ __forceinline__ u64 grid_start() { return (u64)blockIdx.x * blockDim.x + threadIdx.x; }
__device__ __forceinline__ u64 grid_stride() { return (u64)blockDim.x * gridDim.x; }

// ---- reductions -------------------------------------------------------------------------------------------

__device__ __forceinline__ float warp_sum(float v) {
    for (int offset = 16; offset > 0; offset >>= 1) {
        v += __shfl_xor_sync(0xffffffffu, v, offset);
    }
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
    for (int offset = 16; offset > 0; offset >>= 1) {
        v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, offset));
    }
    return v;
}

// Sum of `v` over the whole block, returned to every thread. blockDim.x must be a multiple of 32.
// The leading barrier lets a block call this repeatedly: no warp overwrites `partial` while another still
// reads the previous result.
__device__ __forceinline__ float block_sum(float v) {
    __shared__ float partial[32];
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    const int warps = blockDim.x >> 5;
    v = warp_sum(v);
    __syncthreads();
    if (lane == 0) {
        partial[warp] = v;
    }
    __syncthreads();
    return warp_sum(lane < warps ? partial[lane] : 0.0f);
}

// Two sums at once (one barrier pair instead of two). blockDim.x must be a multiple of 32.
__device__ __forceinline__ void block_sum2(float& a, float& b) {
    __shared__ float partial_a[32];
    __shared__ float partial_b[32];
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    const int warps = blockDim.x >> 5;
    a = warp_sum(a);
    b = warp_sum(b);
    __syncthreads();
    if (lane == 0) {
        partial_a[warp] = a;
        partial_b[warp] = b;
    }
    __syncthreads();
    a = warp_sum(lane < warps ? partial_a[lane] : 0.0f);
    b = warp_sum(lane < warps ? partial_b[lane] : 0.0f);
}

// ---- instantiation --------------------------------------------------------------------------------------

// Entry points get C names with the storage type as suffix (`unary_silu_f32`, `..._bf16`, `..._f16`), so the
// host looks kernels up by a name built from the op and dtype.
#define ZC_FOR_EACH_FLOAT(M, ...) \
    M(float, f32, __VA_ARGS__)    \
    M(bf16, bf16, __VA_ARGS__)    \
    M(f16, f16, __VA_ARGS__)
