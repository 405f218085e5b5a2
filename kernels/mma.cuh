// Tensor-core building blocks for sm_80 and later: mma.sync m16n8k16 (bf16/f16 in, f32 accumulate), ldmatrix and
// cp.async, as inline PTX on the GPU and, under the CUDA emulator (__CUDACC_EMULATED__), as host code written from
// the PTX ISA's fragment tables, so a kernel that reads or writes fragment elements directly (an online softmax
// does) behaves the same in both. Why not nvcuda::wmma: NVRTC 12.8 ships no <mma.h>, and WMMA fragment layouts
// are opaque, so an emulated WMMA would have to invent one.
//
// Fragments (PTX ISA, "Matrix fragments for mma.m16n8k16 with floating point type"), with g = lane >> 2 and
// t = lane & 3; each 32-bit register holds two 16-bit elements, the lower-indexed one in the low half:
//   A (16x16, row-major), unsigned a[4]: a[0] = A[g][2t, 2t+1], a[1] = A[g+8][2t, 2t+1],
//                                        a[2] = A[g][2t+8, 2t+9], a[3] = A[g+8][2t+8, 2t+9]
//   B (16x8, "col"),      unsigned b[2]: b[0] = B[2t, 2t+1][g], b[1] = B[2t+8, 2t+9][g]
//   C, D (16x8, f32),     float c[4]:    c[0], c[1] = C[g][2t, 2t+1], c[2], c[3] = C[g+8][2t, 2t+1]
// ldmatrix (m8n8, b16): lanes 8i..8i+7 give the addresses of rows 0..7 of matrix i (16 bytes each, 16-byte
// aligned, in shared memory); register i of lane l receives row g, columns 2t and 2t+1 of matrix i, or with .trans
// rows 2t and 2t+1 of column g. So ldmatrix of a row-major tile gives A fragments, ldmatrix of the rows of a
// row-major [n][k] tile gives B fragments, and ldmatrix.trans of a row-major [k][n] tile gives B fragments.
//
// All of these are warp-wide: every lane of a full warp must call them together (uniform control flow).
#pragma once

#include "common.cuh"

// ---- the emulator's versions ------------------------------------------------------------------------------------
#ifdef __CUDACC_EMULATED__

namespace zc_mma_emu {

struct MmaOperands {
    const unsigned* a;
    const unsigned* b;
    const float* c;
    float* d;
};

inline float bf16_bits_to_f32(unsigned bits) { return to_f32(bf16{(unsigned short)bits}); }
inline float f16_bits_to_f32(unsigned bits) { return to_f32(f16{(unsigned short)bits}); }

// D = A B + C for one warp. The products of two 16-bit values are exact in f32; the GPU's order and internal
// precision of the 16-term sum are unspecified, so the emulator sums exactly (in double: 16 products of 11-bit
// significands) and rounds once to f32. Results may differ from a GPU's in the last bits of f32, never more.
template <float (*Widen)(unsigned)>
bool mma_m16n8k16(void* const* lanes, char*, size_t) {
    float a[16][16], b[16][8], c[16][8];
    for (int l = 0; l < 32; ++l) {
        const MmaOperands& o = *static_cast<const MmaOperands*>(lanes[l]);
        const int g = l >> 2, t = l & 3;
        for (int h = 0; h < 2; ++h) {  // the low (h = 0) and high halves of each register
            a[g][2 * t + h] = Widen((o.a[0] >> (16 * h)) & 0xffffu);
            a[g + 8][2 * t + h] = Widen((o.a[1] >> (16 * h)) & 0xffffu);
            a[g][2 * t + 8 + h] = Widen((o.a[2] >> (16 * h)) & 0xffffu);
            a[g + 8][2 * t + 8 + h] = Widen((o.a[3] >> (16 * h)) & 0xffffu);
            b[2 * t + h][g] = Widen((o.b[0] >> (16 * h)) & 0xffffu);
            b[2 * t + 8 + h][g] = Widen((o.b[1] >> (16 * h)) & 0xffffu);
            c[g][2 * t + h] = o.c[h];
            c[g + 8][2 * t + h] = o.c[2 + h];
        }
    }
    // Every lane's C is read above before any D is written below, so d may alias c.
    for (int l = 0; l < 32; ++l) {
        const MmaOperands& o = *static_cast<const MmaOperands*>(lanes[l]);
        const int g = l >> 2, t = l & 3;
        for (int k = 0; k < 4; ++k) {
            const int row = g + 8 * (k >> 1), col = 2 * t + (k & 1);
            double sum = 0.0;
            for (int i = 0; i < 16; ++i) {
                sum += (double)a[row][i] * (double)b[i][col];
            }
            o.d[k] = (float)(sum + (double)c[row][col]);
        }
    }
    return true;
}

struct LdMatrixOperands {
    const void* row;
    unsigned* out;
};

// ldmatrix.sync.aligned.m8n8.x{Num}{.trans}.shared.b16.
template <int Num, bool Trans>
bool ldmatrix(void* const* lanes, char* error, size_t error_len) {
    const unsigned short* rows[4][8];
    for (int i = 0; i < Num; ++i) {
        for (int r = 0; r < 8; ++r) {
            const void* p = static_cast<const LdMatrixOperands*>(lanes[8 * i + r])->row;
            if (reinterpret_cast<uintptr_t>(p) % 16 != 0 || !::zc_emu::is_shared(p, 16)) {
                snprintf(error, error_len,
                         "ldmatrix: lane %d gives row address %p, which is not a 16-byte aligned row of shared memory",
                         8 * i + r, p);
                return false;
            }
            rows[i][r] = static_cast<const unsigned short*>(p);
        }
    }
    for (int l = 0; l < 32; ++l) {
        const LdMatrixOperands& o = *static_cast<const LdMatrixOperands*>(lanes[l]);
        const int g = l >> 2, t = l & 3;
        for (int i = 0; i < Num; ++i) {
            const unsigned lo = Trans ? rows[i][2 * t][g] : rows[i][g][2 * t];
            const unsigned hi = Trans ? rows[i][2 * t + 1][g] : rows[i][g][2 * t + 1];
            o.out[i] = lo | (hi << 16);
        }
    }
    return true;
}

}  // namespace zc_mma_emu

#endif

// ---- shared-memory addresses --------------------------------------------------------------------------------------

#ifndef __CUDACC_EMULATED__
// The 32-bit .shared address of a generic pointer into shared memory, as ldmatrix and cp.async take it.
__device__ __forceinline__ unsigned zc_smem_addr(const void* p) {
    unsigned addr;
    asm("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }" : "=r"(addr) : "l"(p));
    return addr;
}
#endif

// ---- mma.sync.aligned.m16n8k16.row.col.f32.{bf16,f16}.{bf16,f16}.f32 ---------------------------------------------

// d = a b + c (d may be c).
__device__ __forceinline__ void mma_m16n8k16_bf16(float d[4], const unsigned a[4], const unsigned b[2],
                                                  const float c[4]) {
#ifdef __CUDACC_EMULATED__
    ::zc_mma_emu::MmaOperands o{a, b, c, d};
    ::zc_emu::warp_matrix_op(&::zc_mma_emu::mma_m16n8k16<&::zc_mma_emu::bf16_bits_to_f32>, &o);
#else
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%10, %11, %12, %13};\n"
        : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]), "f"(c[1]), "f"(c[2]),
          "f"(c[3]));
#endif
}

__device__ __forceinline__ void mma_m16n8k16_f16(float d[4], const unsigned a[4], const unsigned b[2],
                                                 const float c[4]) {
#ifdef __CUDACC_EMULATED__
    ::zc_mma_emu::MmaOperands o{a, b, c, d};
    ::zc_emu::warp_matrix_op(&::zc_mma_emu::mma_m16n8k16<&::zc_mma_emu::f16_bits_to_f32>, &o);
#else
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%10, %11, %12, %13};\n"
        : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]), "f"(c[1]), "f"(c[2]),
          "f"(c[3]));
#endif
}

// The storage type picks the instruction: d += a b.
template <typename T>
__device__ __forceinline__ void mma_m16n8k16(float d[4], const unsigned a[4], const unsigned b[2]);
template <>
__device__ __forceinline__ void mma_m16n8k16<bf16>(float d[4], const unsigned a[4], const unsigned b[2]) {
    mma_m16n8k16_bf16(d, a, b, d);
}
template <>
__device__ __forceinline__ void mma_m16n8k16<f16>(float d[4], const unsigned a[4], const unsigned b[2]) {
    mma_m16n8k16_f16(d, a, b, d);
}

// Two f32 values rounded (to nearest even) to the storage type and packed as one fragment register, lo in the low
// half. On the GPU one cvt.rn.{bf16,f16}x2.f32 (sm_80) does it; the emulator uses common.cuh's conversions, which
// round the same way (only NaN payloads may differ).
template <typename T>
__device__ __forceinline__ unsigned pack2(float lo, float hi);
#ifdef __CUDACC_EMULATED__
template <>
__device__ __forceinline__ unsigned pack2<bf16>(float lo, float hi) {
    return (unsigned)from_f32<bf16>(lo).bits | ((unsigned)from_f32<bf16>(hi).bits << 16);
}
template <>
__device__ __forceinline__ unsigned pack2<f16>(float lo, float hi) {
    return (unsigned)from_f32<f16>(lo).bits | ((unsigned)from_f32<f16>(hi).bits << 16);
}
#else
// cvt.rn.X.f32 d, a, b puts a in the upper half and b in the lower.
template <>
__device__ __forceinline__ unsigned pack2<bf16>(float lo, float hi) {
    unsigned r;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}
template <>
__device__ __forceinline__ unsigned pack2<f16>(float lo, float hi) {
    unsigned r;
    asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}
#endif

// ---- ldmatrix.sync.aligned.m8n8.x{1,2,4}{.trans}.shared.b16 ---------------------------------------------------------

// `row`: this lane's row address (see the top of this file); lanes past the matrices loaded are ignored.
#ifdef __CUDACC_EMULATED__
#define ZC_LDMATRIX(NAME, NUM, TRANS, PTX_SUFFIX)                                                         \
    __device__ __forceinline__ void NAME(unsigned r[NUM], const void* row) {                             \
        ::zc_mma_emu::LdMatrixOperands o{row, r};                                                        \
        ::zc_emu::warp_matrix_op(&::zc_mma_emu::ldmatrix<NUM, TRANS>, &o);                               \
    }
#else
#define ZC_LDMATRIX_OUT_1 "=r"(r[0])
#define ZC_LDMATRIX_OUT_2 "=r"(r[0]), "=r"(r[1])
#define ZC_LDMATRIX_OUT_4 "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
#define ZC_LDMATRIX_REGS_1 "{%0}, [%1]"
#define ZC_LDMATRIX_REGS_2 "{%0, %1}, [%2]"
#define ZC_LDMATRIX_REGS_4 "{%0, %1, %2, %3}, [%4]"
#define ZC_LDMATRIX(NAME, NUM, TRANS, PTX_SUFFIX)                                                                  \
    __device__ __forceinline__ void NAME(unsigned r[NUM], const void* row) {                                      \
        asm volatile("ldmatrix.sync.aligned.m8n8.x" #NUM PTX_SUFFIX ".shared.b16 " ZC_LDMATRIX_REGS_##NUM ";\n" \
                     : ZC_LDMATRIX_OUT_##NUM                                                                      \
                     : "r"(zc_smem_addr(row))                                                                     \
                     : "memory");                                                                                 \
    }
#endif
ZC_LDMATRIX(ldmatrix_x1, 1, false, "")
ZC_LDMATRIX(ldmatrix_x2, 2, false, "")
ZC_LDMATRIX(ldmatrix_x4, 4, false, "")
ZC_LDMATRIX(ldmatrix_x1_trans, 1, true, ".trans")
ZC_LDMATRIX(ldmatrix_x2_trans, 2, true, ".trans")
ZC_LDMATRIX(ldmatrix_x4_trans, 4, true, ".trans")
#undef ZC_LDMATRIX

// ---- cp.async ---------------------------------------------------------------------------------------------------

// Starts copying 16 bytes from global `src` to shared `dst` (both 16-byte aligned); with `valid` false nothing is
// read and `dst` is zero-filled (src must still be a valid address, e.g. the tensor's base). The bytes are usable
// after cp_async_wait covers the group they were committed in (and, for other threads, after a barrier).
__device__ __forceinline__ void cp_async_16(void* dst, const void* src, bool valid) {
#ifdef __CUDACC_EMULATED__
    ::zc_emu::async_copy(dst, src, 16, valid ? 16 : 0);
#else
    const unsigned src_bytes = valid ? 16u : 0u;
    asm volatile("{ .reg .u64 g; cvta.to.global.u64 g, %1; cp.async.cg.shared.global [%0], [g], 16, %2; }\n"
                 :
                 : "r"(zc_smem_addr(dst)), "l"(src), "r"(src_bytes)
                 : "memory");
#endif
}

// Closes the group of the copies issued since the previous commit.
__device__ __forceinline__ void cp_async_commit() {
#ifdef __CUDACC_EMULATED__
    ::zc_emu::async_commit();
#else
    asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}

// Waits until at most N of this thread's committed groups are still in flight.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
#ifdef __CUDACC_EMULATED__
    ::zc_emu::async_wait(N);
#else
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
#endif
}

// The dynamic shared memory of the launch, in bytes, so a kernel can refuse a launch that gave it too little.
__device__ __forceinline__ unsigned dynamic_smem_bytes() {
#ifdef __CUDACC_EMULATED__
    return (unsigned)::zc_emu::run().dynamic_shared_bytes;
#else
    unsigned bytes;
    asm("mov.u32 %0, %%dynamic_smem_size;" : "=r"(bytes));
    return bytes;
#endif
}
