// Mean squared error, mean((a - b)^2), and its gradient. Computed in f32.
//
// Entry points (T in f32, bf16, f16):
//   mse_partial_<T>(const T* a, const T* b, float* partial, u64 n)
//       partial[blockIdx.x] = this block's share of sum((a - b)^2). Launch: blockDim.x a multiple of 32, any grid;
//       `partial` holds gridDim.x floats.
//   mse_finish_<T>(const float* partial, u64 parts, T* loss, u64 n)
//       loss[0] = sum(partial) / n. Launch: one block, blockDim.x a multiple of 32.
//   mse_bwd_<T>(const T* a, const T* b, const T* dloss, T* da, u64 n)
//       da = dloss[0] * 2 (a - b) / n, dloss being the loss gradient on the device. Any 1-D launch.
// Two kernels instead of float atomics: the sum is the same every run for a given launch shape.
#include "common.cuh"

template <typename T>
__device__ __forceinline__ void mse_partial(const T* a, const T* b, float* partial, u64 n) {
    float acc = 0.0f;
    for (u64 i = grid_start(); i < n; i += grid_stride()) {
        const float d = to_f32(a[i]) - to_f32(b[i]);
        acc += d * d;
    }
    acc = block_sum(acc);
    if (threadIdx.x == 0) {
        partial[blockIdx.x] = acc;
    }
}

template <typename T>
__device__ __forceinline__ void mse_finish(const float* partial, u64 parts, T* loss, u64 n) {
    if (blockIdx.x != 0) {
        return;  // one block does the final sum; extra blocks of a careless launch must not race on loss
    }
    float acc = 0.0f;
    for (u64 p = threadIdx.x; p < parts; p += blockDim.x) {
        acc += partial[p];
    }
    acc = block_sum(acc);
    if (threadIdx.x == 0) {
        loss[0] = from_f32<T>(acc / (float)n);
    }
}

template <typename T>
__device__ __forceinline__ void mse_bwd(const T* a, const T* b, const T* dloss, T* da, u64 n) {
    const float scale = 2.0f * to_f32(dloss[0]) / (float)n;
    for (u64 i = grid_start(); i < n; i += grid_stride()) {
        da[i] = from_f32<T>(scale * (to_f32(a[i]) - to_f32(b[i])));
    }
}

#define ZC_MSE_ENTRIES(T, SUF, _unused)                                                                   \
    extern "C" __global__ void mse_partial_##SUF(const T* a, const T* b, float* partial, u64 n) {         \
        mse_partial<T>(a, b, partial, n);                                                                 \
    }                                                                                                     \
    extern "C" __global__ void mse_finish_##SUF(const float* partial, u64 parts, T* loss, u64 n) {        \
        mse_finish<T>(partial, parts, loss, n);                                                           \
    }                                                                                                     \
    extern "C" __global__ void mse_bwd_##SUF(const T* a, const T* b, const T* dloss, T* da, u64 n) {    \
        mse_bwd<T>(a, b, dloss, da, n);                                                                   \
    }

ZC_FOR_EACH_FLOAT(ZC_MSE_ENTRIES, 0)
