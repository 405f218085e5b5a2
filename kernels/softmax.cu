// Softmax over the last axis, forward and backward, computed in f32. x [rows, D].
//
// Entry points (T in f32, bf16, f16):
//   softmax_<T>(const T* x, T* y, u64 rows, u64 D)              y = exp(x - max) / sum(exp(x - max))
//   softmax_bwd_<T>(const T* y, const T* dy, T* dx, u64 rows, u64 D)   dx = y * (dy - sum(dy * y))
// One warp owns one row at a time, so reductions are warp shuffles with no block barrier.
// Launch: blockDim = (32, k) with k <= 32, any grid. y may alias x, dx may alias dy.
// A row that is entirely -inf gives NaN, as in PyTorch; masking that needs otherwise belongs to attention.
#include "common.cuh"

__device__ __forceinline__ u64 warp_row_start() { return (u64)blockIdx.x * blockDim.y + threadIdx.y; }
__device__ __forceinline__ u64 warp_row_stride() { return (u64)gridDim.x * blockDim.y; }

template <typename T>
__device__ __forceinline__ void softmax_fwd(const T* x, T* y, u64 rows, u64 D) {
    for (u64 r = warp_row_start(); r < rows; r += warp_row_stride()) {
        const T* row = x + r * D;
        float m = -__int_as_float(0x7f800000);  // -inf
        for (u64 d = threadIdx.x; d < D; d += 32) {
            m = fmaxf(m, to_f32(row[d]));
        }
        m = warp_max(m);
        float s = 0.0f;
        for (u64 d = threadIdx.x; d < D; d += 32) {
            s += expf(to_f32(row[d]) - m);
        }
        const float inv = 1.0f / warp_sum(s);
        // Every lane has read the whole row (through the reductions) before any lane writes, so y == x works.
        for (u64 d = threadIdx.x; d < D; d += 32) {
            y[r * D + d] = from_f32<T>(expf(to_f32(row[d]) - m) * inv);
        }
    }
}

template <typename T>
__device__ __forceinline__ void softmax_bwd(const T* y, const T* dy, T* dx, u64 rows, u64 D) {
    for (u64 r = warp_row_start(); r < rows; r += warp_row_stride()) {
        const T* yrow = y + r * D;
        const T* drow = dy + r * D;
        float dot = 0.0f;
        for (u64 d = threadIdx.x; d < D; d += 32) {
            dot += to_f32(yrow[d]) * to_f32(drow[d]);
        }
        dot = warp_sum(dot);
        for (u64 d = threadIdx.x; d < D; d += 32) {
            dx[r * D + d] = from_f32<T>(to_f32(yrow[d]) * (to_f32(drow[d]) - dot));
        }
    }
}

#define ZC_SOFTMAX_ENTRIES(T, SUF, _unused)                                                                 \
    extern "C" __global__ void softmax_##SUF(const T* x, T* y, u64 rows, u64 D) {                           \
        softmax_fwd<T>(x, y, rows, D);                                                                      \
    }                                                                                                       \
    extern "C" __global__ void softmax_bwd_##SUF(const T* y, const T* dy, T* dx, u64 rows, u64 D) {       \
        softmax_bwd<T>(y, dy, dx, rows, D);                                                                 \
    }

ZC_FOR_EACH_FLOAT(ZC_SOFTMAX_ENTRIES, 0)
