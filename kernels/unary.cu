// Elementwise unary ops and their backward, affine (alpha * x + beta) and fill.
//
// Entry points (T in f32, bf16, f16; all computed in f32):
//   unary_<op>_<T>(const T* x, T* y, u64 n)                       y = op(x)
//   unary_<op>_bwd_<T>(const T* x, const T* dy, T* dx, u64 n)     dx = dy * op'(x)
//   affine_<T>(const T* x, T* y, u64 n, float alpha, float beta)  y = alpha * x + beta
//   fill_<T>(T* y, u64 n, float value)
// with <op> one of neg exp log sqrt square recip silu gelu_erf gelu_tanh quick_gelu relu.
// Launch: any 1-D grid and block (grid-stride loops). In place (y == x, dx == dy) is allowed: each element is read
// before it is written, by the same thread, so no pointer is marked __restrict__.
#include "common.cuh"
#include "unary_ops.cuh"

template <typename Op, typename T>
__device__ __forceinline__ void unary_fwd(const T* x, T* y, u64 n) {
    for (u64 i = grid_start(); i < n; i += grid_stride()) {
        y[i] = from_f32<T>(Op::fwd(to_f32(x[i])));
    }
}

template <typename Op, typename T>
__device__ __forceinline__ void unary_bwd(const T* x, const T* dy, T* dx, u64 n) {
    for (u64 i = grid_start(); i < n; i += grid_stride()) {
        dx[i] = from_f32<T>(Op::bwd(to_f32(x[i]), to_f32(dy[i])));
    }
}

#define ZC_UNARY_ENTRIES(T, SUF, NAME, OP)                                                         \
    extern "C" __global__ void unary_##NAME##_##SUF(const T* x, T* y, u64 n) {                     \
        unary_fwd<OP, T>(x, y, n);                                                                 \
    }                                                                                              \
    extern "C" __global__ void unary_##NAME##_bwd_##SUF(const T* x, const T* dy, T* dx, u64 n) { \
        unary_bwd<OP, T>(x, dy, dx, n);                                                            \
    }

ZC_FOR_EACH_FLOAT(ZC_UNARY_ENTRIES, neg, OpNeg)
ZC_FOR_EACH_FLOAT(ZC_UNARY_ENTRIES, exp, OpExp)
ZC_FOR_EACH_FLOAT(ZC_UNARY_ENTRIES, log, OpLog)
ZC_FOR_EACH_FLOAT(ZC_UNARY_ENTRIES, sqrt, OpSqrt)
ZC_FOR_EACH_FLOAT(ZC_UNARY_ENTRIES, square, OpSquare)
ZC_FOR_EACH_FLOAT(ZC_UNARY_ENTRIES, recip, OpRecip)
ZC_FOR_EACH_FLOAT(ZC_UNARY_ENTRIES, silu, OpSilu)
ZC_FOR_EACH_FLOAT(ZC_UNARY_ENTRIES, gelu_erf, OpGeluErf)
ZC_FOR_EACH_FLOAT(ZC_UNARY_ENTRIES, gelu_tanh, OpGeluTanh)
ZC_FOR_EACH_FLOAT(ZC_UNARY_ENTRIES, quick_gelu, OpQuickGelu)
ZC_FOR_EACH_FLOAT(ZC_UNARY_ENTRIES, relu, OpRelu)

#define ZC_AFFINE_ENTRIES(T, SUF, _unused)                                                        \
    extern "C" __global__ void affine_##SUF(const T* x, T* y, u64 n, float alpha, float beta) { \
        for (u64 i = grid_start(); i < n; i += grid_stride()) {                                   \
            y[i] = from_f32<T>(fmaf(alpha, to_f32(x[i]), beta));                                  \
        }                                                                                         \
    }                                                                                             \
    extern "C" __global__ void fill_##SUF(T* y, u64 n, float value) {                             \
        const T v = from_f32<T>(value);                                                           \
        for (u64 i = grid_start(); i < n; i += grid_stride()) {                                   \
            y[i] = v;                                                                             \
        }                                                                                         \
    }

ZC_FOR_EACH_FLOAT(ZC_AFFINE_ENTRIES, 0)
