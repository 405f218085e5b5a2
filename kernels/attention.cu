// The softmax halves of a GEMM-based attention: scores S = scale * Q K^T come from a GEMM (f32, already scaled),
// P = softmax(S) goes to the next GEMM (P V) in the storage type, and the backward turns dP = dO V^T into dS.
//
// Entry points (T in f32, bf16, f16; computed in f32):
//   attn_softmax_fwd_<T>(const float* s, T* p, float* lse, u64 rows, u64 lq, u64 lk, int causal)
//       s and p are [rows, lk] with rows = batch * heads * lq; row r is query i = r % lq. Without causal every
//       key is visible; with causal (nonzero) key j is visible iff j <= i. p = exp(s - max) / sum(exp(s - max))
//       over the visible keys of the row, and 0 on the masked ones. lq >= 1 when causal. Unless lse is null,
//       lse[r] = max + log(sum(exp(s - max))), the row's log-sum-exp over the visible keys.
//   attn_softmax_bwd_<T>(const T* p, const float* dp, T* ds, u64 rows, u64 lk)
//       ds = p * (dp - sum_j p * dp), row by row (masked keys have p = 0, so they get ds = 0).
// One warp owns one row at a time, so reductions are warp shuffles with no block barrier; the order of additions
// depends only on lk, so results are deterministic.
// Launch: blockDim = (32, k) with k <= 32, any grid. p may alias s for T = f32 only (same element size); ds may
// alias p. A row whose visible scores are all -inf gives NaN, as softmax.cu does.
#include "common.cuh"

__device__ __forceinline__ u64 warp_row_start() { return (u64)blockIdx.x * blockDim.y + threadIdx.y; }
__device__ __forceinline__ u64 warp_row_stride() { return (u64)gridDim.x * blockDim.y; }

template <typename T>
__device__ __forceinline__ void attn_softmax_fwd(const float* s, T* p, float* lse, u64 rows, u64 lq, u64 lk,
                                                 int causal) {
    for (u64 r = warp_row_start(); r < rows; r += warp_row_stride()) {
        const float* row = s + r * lk;
        u64 visible = lk;
        if (causal) {
            const u64 i = r % lq;
            visible = i + 1 < lk ? i + 1 : lk;
        }
        float m = -__int_as_float(0x7f800000);  // -inf
        for (u64 j = threadIdx.x; j < visible; j += 32) {
            m = fmaxf(m, row[j]);
        }
        m = warp_max(m);
        float sum = 0.0f;
        for (u64 j = threadIdx.x; j < visible; j += 32) {
            sum += expf(row[j] - m);
        }
        const float total = warp_sum(sum);
        const float inv = 1.0f / total;
        if (lse != nullptr && threadIdx.x == 0) {
            lse[r] = m + logf(total);
        }
        // Every lane has read the whole row (through the reductions) before any lane writes, so p == s works.
        for (u64 j = threadIdx.x; j < lk; j += 32) {
            p[r * lk + j] = from_f32<T>(j < visible ? expf(row[j] - m) * inv : 0.0f);
        }
    }
}

template <typename T>
__device__ __forceinline__ void attn_softmax_bwd(const T* p, const float* dp, T* ds, u64 rows, u64 lk) {
    for (u64 r = warp_row_start(); r < rows; r += warp_row_stride()) {
        const T* prow = p + r * lk;
        const float* drow = dp + r * lk;
        float dot = 0.0f;
        for (u64 j = threadIdx.x; j < lk; j += 32) {
            dot += to_f32(prow[j]) * drow[j];
        }
        dot = warp_sum(dot);
        for (u64 j = threadIdx.x; j < lk; j += 32) {
            ds[r * lk + j] = from_f32<T>(to_f32(prow[j]) * (drow[j] - dot));
        }
    }
}

#define ZC_ATTENTION_ENTRIES(T, SUF, _unused)                                                                 \
    extern "C" __global__ void attn_softmax_fwd_##SUF(const float* s, T* p, float* lse, u64 rows, u64 lq,     \
                                                      u64 lk, int causal) {                                   \
        attn_softmax_fwd<T>(s, p, lse, rows, lq, lk, causal);                                                 \
    }                                                                                                         \
    extern "C" __global__ void attn_softmax_bwd_##SUF(const T* p, const float* dp, T* ds, u64 rows, u64 lk) { \
        attn_softmax_bwd<T>(p, dp, ds, rows, lk);                                                             \
    }

ZC_FOR_EACH_FLOAT(ZC_ATTENTION_ENTRIES, 0)
