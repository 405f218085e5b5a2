// The unary ops as functors (forward value and dy * f'(x)), shared by unary.cu and the generated fused kernels.
// Compiled by NVRTC without system headers.
#pragma once

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
