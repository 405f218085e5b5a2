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

__device__ __forceinline__ float sigmoid(float x) { return 1.0f / (1.0f + expf(-x)); }

// sqrt(2 / pi) and 1 / sqrt(2 pi), the constants of the two GELU forms.
#define ZC_SQRT_2_OVER_PI 0.7978845608028654f
#define ZC_INV_SQRT_2PI 0.3989422804014327f
#define ZC_INV_SQRT_2 0.7071067811865476f
#define ZC_GELU_TANH_C 0.044715f
#define ZC_QUICK_GELU_C 1.702f

// Each op is a struct with the forward value and the derivative product dy * f'(x).
struct OpNeg {
    static __device__ float fwd(float x) { return -x; }
    static __device__ float bwd(float, float dy) { return -dy; }
};
struct OpExp {
    static __device__ float fwd(float x) { return expf(x); }
    static __device__ float bwd(float x, float dy) { return dy * expf(x); }
};
struct OpLog {
    static __device__ float fwd(float x) { return logf(x); }
    static __device__ float bwd(float x, float dy) { return dy / x; }
};
struct OpSqrt {
    static __device__ float fwd(float x) { return sqrtf(x); }
    static __device__ float bwd(float x, float dy) { return 0.5f * dy / sqrtf(x); }
};
struct OpSquare {
    static __device__ float fwd(float x) { return x * x; }
    static __device__ float bwd(float x, float dy) { return 2.0f * x * dy; }
};
struct OpRecip {
    static __device__ float fwd(float x) { return 1.0f / x; }
    static __device__ float bwd(float x, float dy) { return -dy / (x * x); }
};
struct OpSilu {
    static __device__ float fwd(float x) { return x * sigmoid(x); }
    static __device__ float bwd(float x, float dy) {
        float s = sigmoid(x);
        return dy * s * (1.0f + x * (1.0f - s));
    }
};
struct OpGeluErf {
    static __device__ float fwd(float x) { return 0.5f * x * (1.0f + erff(x * ZC_INV_SQRT_2)); }
    static __device__ float bwd(float x, float dy) {
        float cdf = 0.5f * (1.0f + erff(x * ZC_INV_SQRT_2));
        float pdf = ZC_INV_SQRT_2PI * expf(-0.5f * x * x);
        return dy * (cdf + x * pdf);
    }
};
struct OpGeluTanh {
    static __device__ float fwd(float x) {
        float u = ZC_SQRT_2_OVER_PI * (x + ZC_GELU_TANH_C * x * x * x);
        return 0.5f * x * (1.0f + tanhf(u));
    }
    static __device__ float bwd(float x, float dy) {
        float x2 = x * x;
        float t = tanhf(ZC_SQRT_2_OVER_PI * (x + ZC_GELU_TANH_C * x2 * x));
        float du = ZC_SQRT_2_OVER_PI * (1.0f + 3.0f * ZC_GELU_TANH_C * x2);
        return dy * (0.5f * (1.0f + t) + 0.5f * x * (1.0f - t * t) * du);
    }
};
struct OpQuickGelu {
    static __device__ float fwd(float x) { return x * sigmoid(ZC_QUICK_GELU_C * x); }
    static __device__ float bwd(float x, float dy) {
        float s = sigmoid(ZC_QUICK_GELU_C * x);
        return dy * (s + ZC_QUICK_GELU_C * x * s * (1.0f - s));
    }
};
struct OpRelu {
    static __device__ float fwd(float x) { return x > 0.0f ? x : 0.0f; }
    // The subgradient at 0 is 0, as in PyTorch.
    static __device__ float bwd(float x, float dy) { return x > 0.0f ? dy : 0.0f; }
};

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
