// Elementwise binary ops with NumPy broadcasting: add, sub, mul, div.
//
// Entry points (T in f32, bf16, f16; computed in f32):
//   binary_<op>_<T>(const T* a, const T* b, T* y, u64 n)
//       a, b and y all hold n elements in the same order (no broadcasting; the common case).
//   binary_<op>_bcast_<T>(const T* a, const T* b, T* y, u64 n, BroadcastDims dims)
//       y has shape dims.shape[0..rank) and n elements; a and b are read through element strides given per
//       output axis, 0 on an axis they are broadcast along (so any broadcast, and any strided view, works).
// Launch: any 1-D grid and block (grid-stride loops). y may alias a or b when that operand is laid out like y
// (same shape, row-major): each thread then reads the element it writes. Aliasing an operand read through
// broadcast or permuted strides is a race (a thread overwrites an element another thread has yet to read).
#include "common.cuh"

#define ZC_MAX_RANK 8

// Passed by value. Host mirror (repr(C)): [i64; 8] shape, [i64; 8] a_strides, [i64; 8] b_strides, i32 rank,
// i32 padding: 200 bytes.
struct BroadcastDims {
    i64 shape[ZC_MAX_RANK];
    i64 a_strides[ZC_MAX_RANK];
    i64 b_strides[ZC_MAX_RANK];
    int rank;
};

struct OpAdd {
    static __device__ float apply(float a, float b) { return a + b; }
};
struct OpSub {
    static __device__ float apply(float a, float b) { return a - b; }
};
struct OpMul {
    static __device__ float apply(float a, float b) { return a * b; }
};
struct OpDiv {
    static __device__ float apply(float a, float b) { return a / b; }
};

template <typename Op, typename T>
__device__ __forceinline__ void binary_same_shape(const T* a, const T* b, T* y, u64 n) {
    for (u64 i = grid_start(); i < n; i += grid_stride()) {
        y[i] = from_f32<T>(Op::apply(to_f32(a[i]), to_f32(b[i])));
    }
}

template <typename Op, typename T>
__device__ __forceinline__ void binary_broadcast(const T* a, const T* b, T* y, u64 n, const BroadcastDims& dims) {
    for (u64 i = grid_start(); i < n; i += grid_stride()) {
        // Unravel the output index from the last axis; the unrolled loop keeps the parameter arrays indexed by
        // constants (a dynamic index would copy them to local memory).
        u64 rest = i;
        i64 offset_a = 0;
        i64 offset_b = 0;
#pragma unroll
        for (int d = ZC_MAX_RANK - 1; d >= 0; --d) {
            if (d < dims.rank) {
                u64 extent = (u64)dims.shape[d];
                u64 coord = rest % extent;
                rest /= extent;
                offset_a += (i64)coord * dims.a_strides[d];
                offset_b += (i64)coord * dims.b_strides[d];
            }
        }
        y[i] = from_f32<T>(Op::apply(to_f32(a[offset_a]), to_f32(b[offset_b])));
    }
}

#define ZC_BINARY_ENTRIES(T, SUF, NAME, OP)                                                                   \
    extern "C" __global__ void binary_##NAME##_##SUF(const T* a, const T* b, T* y, u64 n) {                   \
        binary_same_shape<OP, T>(a, b, y, n);                                                                 \
    }                                                                                                         \
    extern "C" __global__ void binary_##NAME##_bcast_##SUF(const T* a, const T* b, T* y, u64 n, BroadcastDims dims) { \
        binary_broadcast<OP, T>(a, b, y, n, dims);                                                            \
    }

ZC_FOR_EACH_FLOAT(ZC_BINARY_ENTRIES, add, OpAdd)
ZC_FOR_EACH_FLOAT(ZC_BINARY_ENTRIES, sub, OpSub)
ZC_FOR_EACH_FLOAT(ZC_BINARY_ENTRIES, mul, OpMul)
ZC_FOR_EACH_FLOAT(ZC_BINARY_ENTRIES, div, OpDiv)
