// Multi-tensor AdamW (decoupled weight decay, as torch.optim.AdamW): one launch updates every parameter tensor.
//
// Entry points, one per gradient type G in f32, bf16, f16 (parameters, m and v are always f32):
//   adamw_grad_<G>(const AdamWTensor* tensors, const AdamWChunk* chunks, u64 num_chunks, u64 chunk_size,
//                  const float* hyper, float beta1, float beta2, float eps, float weight_decay)
// `tensors` and `chunks` are tables in device memory built once by the host; block k (grid-stride) updates
// elements [chunk * chunk_size, min(numel, (chunk + 1) * chunk_size)) of tensor chunks[k].tensor.
// `hyper` = [lr, 1 / (1 - beta1^t), 1 / (1 - beta2^t)] lives on the device, so the step number and learning-rate
// schedule change without changing kernel arguments and a captured CUDA graph can be replayed every step.
// Per element:
//   p -= lr * weight_decay * p
//   m = beta1 m + (1 - beta1) g;  v = beta2 v + (1 - beta2) g^2
//   p -= lr * (m * bc1) / (sqrt(v * bc2) + eps)
// Launch: any 1-D grid and block.
//
// Gradient accumulation (a step of several micro-batches) into f32 accumulators:
//   accumulate_grad_f32(float* acc, const float* grad, const float* keep, u64 n)
// acc[i] = keep[0] != 0 ? acc[i] + grad[i] : grad[i]. `keep` lives on the device (0 for the first
// micro-batch of a step) so one captured graph serves every micro-batch. Launch: any 1-D grid and block.
#include "common.cuh"

// Host mirrors (repr(C)): AdamWTensor = 4 pointers (u64) + u64 numel, 40 bytes; AdamWChunk = two u32, 8 bytes.
struct AdamWTensor {
    float* param;
    const void* grad;  // of type G, chosen by the entry point
    float* m;
    float* v;
    u64 numel;
};
struct AdamWChunk {
    unsigned tensor;
    unsigned chunk;
};

template <typename G>
__device__ __forceinline__ void adamw(const AdamWTensor* tensors, const AdamWChunk* chunks, u64 num_chunks,
                                      u64 chunk_size, const float* hyper, float beta1, float beta2, float eps,
                                      float weight_decay) {
    const float lr = hyper[0];
    const float bias_correction1 = hyper[1];
    const float bias_correction2 = hyper[2];
    const float decay = 1.0f - lr * weight_decay;
    for (u64 k = blockIdx.x; k < num_chunks; k += gridDim.x) {
        const AdamWChunk ck = chunks[k];
        const AdamWTensor t = tensors[ck.tensor];
        const G* grad = (const G*)t.grad;
        const u64 start = (u64)ck.chunk * chunk_size;
        const u64 end = min(t.numel, start + chunk_size);
        for (u64 i = start + threadIdx.x; i < end; i += blockDim.x) {
            const float g = to_f32(grad[i]);
            const float m = beta1 * t.m[i] + (1.0f - beta1) * g;
            const float v = beta2 * t.v[i] + (1.0f - beta2) * g * g;
            t.m[i] = m;
            t.v[i] = v;
            const float p = t.param[i] * decay;
            t.param[i] = p - lr * (m * bias_correction1) / (sqrtf(v * bias_correction2) + eps);
        }
    }
}

#define ZC_ADAMW_ENTRY(G, SUF, _unused)                                                                           \
    extern "C" __global__ void adamw_grad_##SUF(const AdamWTensor* tensors, const AdamWChunk* chunks,            \
                                                u64 num_chunks, u64 chunk_size, const float* hyper, float beta1, \
                                                float beta2, float eps, float weight_decay) {                    \
        adamw<G>(tensors, chunks, num_chunks, chunk_size, hyper, beta1, beta2, eps, weight_decay);               \
    }

ZC_FOR_EACH_FLOAT(ZC_ADAMW_ENTRY, 0)

extern "C" __global__ void accumulate_grad_f32(float* acc, const float* grad, const float* keep, u64 n) {
    const bool add = keep[0] != 0.0f;
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x) {
        acc[i] = add ? acc[i] + grad[i] : grad[i];
    }
}
