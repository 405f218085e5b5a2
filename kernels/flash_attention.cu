// FlashAttention-2 forward on tensor cores: O = softmax(scale Q Kᵀ) V without the L x L score matrix, and the row
// log-sum-exp the backward (flash_attention_bwd.cu) recomputes the probabilities from.
//
// Entry points (T in bf16, f16; D in 16, 32, 40, 64, 80, 128, 160):
//   flash_attn_fwd_<T>_d<D>(const T* q, const T* k, const T* v, T* o, float* lse, u64 lq, u64 lk, float scale,
//                           int causal)
//       q, o [BH, lq, D]; k, v [BH, lk, D]; lse [BH, lq] (f32), all contiguous and 16-byte aligned; lq, lk >= 1.
//       Key j is visible to query i unless causal (nonzero) and j > i, as the CPU backend's attention has it.
//       o[i] = sum_j p_ij v_j with p_ij = exp(scale q_i.k_j - lse_i) over the visible keys,
//       lse_i = log sum_j exp(scale q_i.k_j).
// Launch: grid (ceil(lq / 64), BH) with BH <= 65535, block 128, dynamic shared memory
// flash_fwd_smem_bytes = 3 * 64 * (pad16(D) + 8) * 2 bytes (above 48 KiB from D = 128: the launcher opts in); a
// launch with less traps.
//
// Numerics: products on tensor cores with f32 accumulation; scores, the running max and sum, and O in f32; the
// probabilities are rounded to T once, as the A operand of P V (the CPU backend keeps them in f32: this is within
// the bf16 tolerance, not bit-equal). Each output depends only on its own block's fixed loop, so results are the
// same bits under any grid order.
//
// Per block: 64 queries (16 per warp, in the mma row layout), looping over 64-key tiles; K and V of a tile are two
// cp.async groups, so V's copy overlaps Q Kᵀ and the softmax. The online softmax works on the accumulator fragments
// directly: a lane holds rows g and g + 8 (g = lane / 4) and the row max and sum need two shuffles within the
// quad of lanes that share a row.
#include "flash_tile.cuh"

namespace flash {

template <int D>
__device__ constexpr unsigned fwd_smem_bytes() {
    return 3u * Dims<D>::tile_elems * 2u;
}

template <typename T, int D>
__device__ __forceinline__ void forward(const T* q, const T* k, const T* v, T* o, float* lse, u64 lq, u64 lk,
                                        float scale, int causal) {
    constexpr int NT = Dims<D>::padded / 8;  // 8-column tiles of the head dim
    extern __shared__ __align__(16) unsigned char smem[];
    if (dynamic_smem_bytes() < fwd_smem_bytes<D>()) {
        __trap();
    }
    T* sq = reinterpret_cast<T*>(smem);
    T* sk = sq + Dims<D>::tile_elems;
    T* sv = sk + Dims<D>::tile_elems;

    const u64 head = blockIdx.y;
    const u64 q0 = (u64)blockIdx.x * kBlock;
    const T* qh = q + head * lq * D;
    const T* kh = k + head * lk * D;
    const T* vh = v + head * lk * D;
    const int lane = lane_id(), warp = threadIdx.x >> 5;
    const int row0 = 16 * warp;  // this warp's first query within the block

    load_rows<T, D>(sq, qh, q0, lq);
    cp_async_commit();

    // Key tiles: all of them, or with causal masking those up to the block's last query.
    const u64 last_query = (q0 + kBlock < lq ? q0 + kBlock : lq) - 1;
    u64 tiles = (lk + kBlock - 1) / kBlock;
    if (causal && last_query / kBlock + 1 < tiles) {
        tiles = last_query / kBlock + 1;
    }

    const float scale_log2 = scale * kLog2e;
    const float neg_inf = -__int_as_float(0x7f800000);
    float oacc[NT][4];
    zero_acc<T, D>(oacc);
    float row_max[2] = {neg_inf, neg_inf};  // of scale_log2 * score, per row h (g + 8 h)
    float row_sum[2] = {0.0f, 0.0f};        // this lane's share of sum exp2(x - row_max)

    for (u64 tile = 0; tile < tiles; ++tile) {
        const u64 k0 = tile * kBlock;
        __syncthreads();  // every warp is done with the previous K and V tiles
        load_rows<T, D>(sk, kh, k0, lk);
        cp_async_commit();
        load_rows<T, D>(sv, vh, k0, lk);
        cp_async_commit();
        cp_async_wait<1>();  // Q and K (all but the newest group, V)
        __syncthreads();

        float s[8][4];
#pragma unroll
        for (int j = 0; j < 8; ++j) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                s[j][e] = 0.0f;
            }
        }
        mma_rows_nk<T, D, 8>(s, sq, row0, sk, 0);

#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const u64 qi = q0 + row0 + (lane >> 2) + 8 * h;
            float m = row_max[h];
#pragma unroll
            for (int j = 0; j < 8; ++j) {
#pragma unroll
                for (int e = 0; e < 2; ++e) {
                    const u64 kj = k0 + 8 * j + 2 * (lane & 3) + e;
                    // Padding rows (qi >= lq) keep their scores: they are computed but never stored.
                    const bool masked = kj >= lk || (causal && kj > qi);
                    const float x = masked ? neg_inf : s[j][2 * h + e] * scale_log2;
                    s[j][2 * h + e] = x;
                    m = fmaxf(m, x);
                }
            }
            m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, 1));
            m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, 2));
            // A row with no visible key so far keeps max -inf; subtracting 0 then keeps its terms at exp2(-inf) = 0
            // instead of NaN.
            const float base = m == neg_inf ? 0.0f : m;
            const float rescale = exp2f(row_max[h] - base);
            row_max[h] = m;
            float sum = 0.0f;
#pragma unroll
            for (int j = 0; j < 8; ++j) {
#pragma unroll
                for (int e = 0; e < 2; ++e) {
                    const float p = exp2f(s[j][2 * h + e] - base);
                    s[j][2 * h + e] = p;
                    sum += p;
                }
            }
            row_sum[h] = row_sum[h] * rescale + sum;
#pragma unroll
            for (int j = 0; j < NT; ++j) {
                oacc[j][2 * h] *= rescale;
                oacc[j][2 * h + 1] *= rescale;
            }
        }

        cp_async_wait<0>();  // V
        __syncthreads();
#pragma unroll
        for (int kk = 0; kk < 4; ++kk) {
            unsigned a[4];
            acc_to_a<T>(a, s[2 * kk], s[2 * kk + 1]);
            mma_a_kn<T, D>(oacc, a, sv, 16 * kk);
        }
    }

    float inv[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        float sum = row_sum[h];
        sum += __shfl_xor_sync(0xffffffffu, sum, 1);
        sum += __shfl_xor_sync(0xffffffffu, sum, 2);
        inv[h] = 1.0f / sum;
        const u64 qi = q0 + row0 + (lane >> 2) + 8 * h;
        if ((lane & 3) == 0 && qi < lq) {
            lse[head * lq + qi] = (row_max[h] + log2f(sum)) * kLn2;
        }
    }
    store_rows<T, D>(o + head * lq * D, oacc, q0 + row0, lq, inv);
}

}  // namespace flash

#define ZC_FLASH_FWD(T, SUF, D)                                                                                 \
    extern "C" __global__ __launch_bounds__(128, 1) void flash_attn_fwd_##SUF##_d##D(                             \
        const T* q, const T* k, const T* v, T* o, float* lse, u64 lq, u64 lk, float scale, int causal) {       \
        flash::forward<T, D>(q, k, v, o, lse, lq, lk, scale, causal);                                           \
    }
#define ZC_FLASH_FWD_DIM(D) ZC_FLASH_FWD(bf16, bf16, D) ZC_FLASH_FWD(f16, f16, D)

ZC_FLASH_FWD_DIM(16)
ZC_FLASH_FWD_DIM(32)
ZC_FLASH_FWD_DIM(40)
ZC_FLASH_FWD_DIM(64)
ZC_FLASH_FWD_DIM(80)
ZC_FLASH_FWD_DIM(128)
ZC_FLASH_FWD_DIM(160)
