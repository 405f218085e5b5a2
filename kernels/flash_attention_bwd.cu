// FlashAttention-2 backward on tensor cores, deterministic: no atomics, every gradient element is written once by
// the one block that owns it, after a loop whose order depends only on the shapes. Scratch is O(BH lq) (delta);
// the probabilities are recomputed from the forward's log-sum-exp, never stored.
//
// With p_ij = exp(scale q_i.k_j - lse_i) over the visible keys (see flash_attention.cu), dp_ij = do_i.v_j,
// delta_i = do_i.o_i (= sum_j p_ij dp_ij) and ds_ij = p_ij (dp_ij - delta_i):
//   dv_j = sum_i p_ij do_i,  dk_j = scale sum_i ds_ij q_i,  dq_i = scale sum_j ds_ij k_j.
//
// Entry points (T in bf16, f16; D in 16, 32, 40, 64, 80, 128, 160), tensors as in the forward, dout, dq like q, dk, dv like k:
//   flash_attn_bwd_delta_<T>(const T* o, const T* dout, float* delta, u64 rows, u64 d)
//       delta [rows] (f32), rows = BH lq. Launch: block (32, k) with k <= 32, any grid (one warp per row).
//   flash_attn_bwd_dkdv_<T>_d<D>(const T* q, const T* k, const T* v, const T* dout, const float* lse,
//                                const float* delta, T* dk, T* dv, u64 lq, u64 lk, float scale, int causal)
//       Launch: grid (ceil(lk / 64), BH), block 128, dynamic shared memory flash_bwd_smem_bytes(D).
//       One block per 64 keys loops over the query tiles (from the diagonal on, when causal).
//   flash_attn_bwd_dq_<T>_d<D>(const T* q, const T* k, const T* v, const T* dout, const float* lse,
//                              const float* delta, T* dq, u64 lq, u64 lk, float scale, int causal)
//       Launch: grid (ceil(lq / 64), BH), block 128, dynamic shared memory flash_bwd_smem_bytes(D).
//       One block per 64 queries loops over the key tiles (up to the diagonal, when causal).
// flash_bwd_smem_bytes(D) = 4 * 64 * (pad16(D) + 8) * 2 + 2 * 64 * 4 bytes; a launch with less traps.
//
// Register budget: a warp owns 16 rows of its gradients (dq, or dk and dv) as f32 accumulators, 16 x pad16(D) each,
// and works through the other side in 16-row chunks, so at most 2 x 16 x 16 scores are live besides. Up to D = 80
// dk and dv accumulate in one pass; above, one pass computes dv and a second pass (recomputing p) dk, so the
// accumulators of D = 160 never hold 2 x 80 floats per thread at once.
#include "flash_tile.cuh"

namespace flash {

template <int D>
__device__ constexpr unsigned bwd_smem_bytes() {
    return 4u * Dims<D>::tile_elems * 2u + 2u * kBlock * 4u;
}

template <typename T>
__device__ __forceinline__ void delta_rows(const T* o, const T* dout, float* delta, u64 rows, u64 d) {
    for (u64 r = (u64)blockIdx.x * blockDim.y + threadIdx.y; r < rows; r += (u64)gridDim.x * blockDim.y) {
        float dot = 0.0f;
        for (u64 c = threadIdx.x; c < d; c += 32) {
            dot += to_f32(o[r * d + c]) * to_f32(dout[r * d + c]);
        }
        dot = warp_sum(dot);
        if (threadIdx.x == 0) {
            delta[r] = dot;
        }
    }
}

// dK and dV of keys [k0, k0 + 64): warp w owns keys k0 + 16 w .. + 15 and walks the query tiles in 16-query chunks.
template <typename T, int D, bool WANT_DV, bool WANT_DK>
__device__ __forceinline__ void kv_pass(float (*dv)[4], float (*dk)[4], const T* qh, const T* doh, const float* lseh,
                                        const float* deltah, T* sq, T* sdo, const T* sk, const T* sv, float* slse,
                                        float* sdelta, u64 k0, u64 lq, u64 lk, float scale, int causal) {
    const int lane = lane_id(), warp = threadIdx.x >> 5;
    const float scale_log2 = scale * kLog2e;
    const u64 first_tile = causal ? k0 / kBlock : 0;  // earlier queries see none of these keys
    const u64 tiles = (lq + kBlock - 1) / kBlock;
    for (u64 tile = first_tile; tile < tiles; ++tile) {
        const u64 q0 = tile * kBlock;
        __syncthreads();  // every warp is done with the previous query tile
        load_rows<T, D>(sq, qh, q0, lq);
        load_rows<T, D>(sdo, doh, q0, lq);
        cp_async_commit();
        for (int i = threadIdx.x; i < kBlock; i += kThreads) {
            const bool valid = q0 + i < lq;
            slse[i] = valid ? lseh[q0 + i] * kLog2e : 0.0f;
            sdelta[i] = valid ? deltah[q0 + i] : 0.0f;
        }
        cp_async_wait<0>();
        __syncthreads();
#pragma unroll 1
        for (int c = 0; c < 4; ++c) {
            // Sᵀ (16 keys x 16 queries) = K Qᵀ, then Pᵀ.
            float p[2][4] = {{0.0f, 0.0f, 0.0f, 0.0f}, {0.0f, 0.0f, 0.0f, 0.0f}};
            mma_rows_nk<T, D, 2>(p, sk, 16 * warp, sq, 16 * c);
            bool ok[2][4];
#pragma unroll
            for (int j = 0; j < 2; ++j) {
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const u64 kj = k0 + 16 * warp + (lane >> 2) + 8 * (e >> 1);
                    const int col = 16 * c + 8 * j + 2 * (lane & 3) + (e & 1);
                    ok[j][e] = visible(q0 + col, kj, lq, lk, causal);
                    p[j][e] = ok[j][e] ? exp2f(p[j][e] * scale_log2 - slse[col]) : 0.0f;
                }
            }
            if constexpr (WANT_DV) {
                unsigned a[4];
                acc_to_a<T>(a, p[0], p[1]);
                mma_a_kn<T, D>(dv, a, sdo, 16 * c);  // dV += Pᵀ dO
            }
            if constexpr (WANT_DK) {
                // dPᵀ (16 keys x 16 queries) = V dOᵀ, then dSᵀ.
                float dp[2][4] = {{0.0f, 0.0f, 0.0f, 0.0f}, {0.0f, 0.0f, 0.0f, 0.0f}};
                mma_rows_nk<T, D, 2>(dp, sv, 16 * warp, sdo, 16 * c);
#pragma unroll
                for (int j = 0; j < 2; ++j) {
#pragma unroll
                    for (int e = 0; e < 4; ++e) {
                        const int col = 16 * c + 8 * j + 2 * (lane & 3) + (e & 1);
                        dp[j][e] = ok[j][e] ? p[j][e] * (dp[j][e] - sdelta[col]) : 0.0f;
                    }
                }
                unsigned a[4];
                acc_to_a<T>(a, dp[0], dp[1]);
                mma_a_kn<T, D>(dk, a, sq, 16 * c);  // dK += dSᵀ Q (times scale at the end)
            }
        }
    }
}

template <typename T, int D>
__device__ __forceinline__ void backward_kv(const T* q, const T* k, const T* v, const T* dout, const float* lse,
                                            const float* delta, T* dk, T* dv, u64 lq, u64 lk, float scale,
                                            int causal) {
    constexpr int NT = Dims<D>::padded / 8;
    extern __shared__ __align__(16) unsigned char smem[];
    if (dynamic_smem_bytes() < bwd_smem_bytes<D>()) {
        __trap();
    }
    T* sk = reinterpret_cast<T*>(smem);
    T* sv = sk + Dims<D>::tile_elems;
    T* sq = sv + Dims<D>::tile_elems;
    T* sdo = sq + Dims<D>::tile_elems;
    float* slse = reinterpret_cast<float*>(sdo + Dims<D>::tile_elems);
    float* sdelta = slse + kBlock;

    const u64 head = blockIdx.y;
    const u64 k0 = (u64)blockIdx.x * kBlock;
    const T* qh = q + head * lq * D;
    const T* doh = dout + head * lq * D;
    const float* lseh = lse + head * lq;
    const float* deltah = delta + head * lq;
    const u64 row0 = k0 + 16 * (threadIdx.x >> 5);
    T* dkh = dk + head * lk * D;
    T* dvh = dv + head * lk * D;

    load_rows<T, D>(sk, k + head * lk * D, k0, lk);
    load_rows<T, D>(sv, v + head * lk * D, k0, lk);
    cp_async_commit();  // waited for with the first query tile's copies

    const float ones[2] = {1.0f, 1.0f};
    const float scales[2] = {scale, scale};
    if constexpr (Dims<D>::padded <= 80) {
        float acc_dv[NT][4], acc_dk[NT][4];
        zero_acc<T, D>(acc_dv);
        zero_acc<T, D>(acc_dk);
        kv_pass<T, D, true, true>(acc_dv, acc_dk, qh, doh, lseh, deltah, sq, sdo, sk, sv, slse, sdelta, k0, lq, lk,
                                  scale, causal);
        store_rows<T, D>(dvh, acc_dv, row0, lk, ones);
        store_rows<T, D>(dkh, acc_dk, row0, lk, scales);
    } else {
        {
            float acc_dv[NT][4];
            zero_acc<T, D>(acc_dv);
            kv_pass<T, D, true, false>(acc_dv, nullptr, qh, doh, lseh, deltah, sq, sdo, sk, sv, slse, sdelta, k0, lq,
                                       lk, scale, causal);
            store_rows<T, D>(dvh, acc_dv, row0, lk, ones);
        }
        {
            float acc_dk[NT][4];
            zero_acc<T, D>(acc_dk);
            kv_pass<T, D, false, true>(nullptr, acc_dk, qh, doh, lseh, deltah, sq, sdo, sk, sv, slse, sdelta, k0, lq,
                                       lk, scale, causal);
            store_rows<T, D>(dkh, acc_dk, row0, lk, scales);
        }
    }
    // With causal masking a key tile past the last query has no query tile to wait in: its K and V copies (never
    // read) must still complete before the thread exits.
    cp_async_wait<0>();
}

// dQ of queries [q0, q0 + 64): warp w owns queries q0 + 16 w .. + 15 and walks the key tiles in 16-key chunks.
template <typename T, int D>
__device__ __forceinline__ void backward_q(const T* q, const T* k, const T* v, const T* dout, const float* lse,
                                           const float* delta, T* dq, u64 lq, u64 lk, float scale, int causal) {
    constexpr int NT = Dims<D>::padded / 8;
    extern __shared__ __align__(16) unsigned char smem[];
    if (dynamic_smem_bytes() < bwd_smem_bytes<D>()) {
        __trap();
    }
    T* sq = reinterpret_cast<T*>(smem);
    T* sdo = sq + Dims<D>::tile_elems;
    T* sk = sdo + Dims<D>::tile_elems;
    T* sv = sk + Dims<D>::tile_elems;

    const u64 head = blockIdx.y;
    const u64 q0 = (u64)blockIdx.x * kBlock;
    const T* kh = k + head * lk * D;
    const T* vh = v + head * lk * D;
    const int lane = lane_id(), warp = threadIdx.x >> 5;
    const float scale_log2 = scale * kLog2e;

    load_rows<T, D>(sq, q + head * lq * D, q0, lq);
    load_rows<T, D>(sdo, dout + head * lq * D, q0, lq);
    cp_async_commit();

    float lse2[2], dlt[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        const u64 qi = q0 + 16 * warp + (lane >> 2) + 8 * h;
        lse2[h] = qi < lq ? lse[head * lq + qi] * kLog2e : 0.0f;
        dlt[h] = qi < lq ? delta[head * lq + qi] : 0.0f;
    }

    const u64 last_query = (q0 + kBlock < lq ? q0 + kBlock : lq) - 1;
    u64 tiles = (lk + kBlock - 1) / kBlock;
    if (causal && last_query / kBlock + 1 < tiles) {
        tiles = last_query / kBlock + 1;
    }
    float acc[NT][4];
    zero_acc<T, D>(acc);
    for (u64 tile = 0; tile < tiles; ++tile) {
        const u64 k0 = tile * kBlock;
        __syncthreads();  // every warp is done with the previous key tile
        load_rows<T, D>(sk, kh, k0, lk);
        load_rows<T, D>(sv, vh, k0, lk);
        cp_async_commit();
        cp_async_wait<0>();
        __syncthreads();
#pragma unroll 1
        for (int c = 0; c < 4; ++c) {
            float p[2][4] = {{0.0f, 0.0f, 0.0f, 0.0f}, {0.0f, 0.0f, 0.0f, 0.0f}};
            float dp[2][4] = {{0.0f, 0.0f, 0.0f, 0.0f}, {0.0f, 0.0f, 0.0f, 0.0f}};
            mma_rows_nk<T, D, 2>(p, sq, 16 * warp, sk, 16 * c);    // S = Q Kᵀ
            mma_rows_nk<T, D, 2>(dp, sdo, 16 * warp, sv, 16 * c);  // dP = dO Vᵀ
#pragma unroll
            for (int j = 0; j < 2; ++j) {
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const int h = e >> 1;
                    const u64 qi = q0 + 16 * warp + (lane >> 2) + 8 * h;
                    const u64 kj = k0 + 16 * c + 8 * j + 2 * (lane & 3) + (e & 1);
                    const bool ok = visible(qi, kj, lq, lk, causal);
                    const float pe = ok ? exp2f(p[j][e] * scale_log2 - lse2[h]) : 0.0f;
                    dp[j][e] = ok ? pe * (dp[j][e] - dlt[h]) : 0.0f;
                }
            }
            unsigned a[4];
            acc_to_a<T>(a, dp[0], dp[1]);
            mma_a_kn<T, D>(acc, a, sk, 16 * c);  // dQ += dS K (times scale below)
        }
    }
    const float scales[2] = {scale, scale};
    store_rows<T, D>(dq + head * lq * D, acc, q0 + 16 * warp, lq, scales);
}

}  // namespace flash

#define ZC_FLASH_BWD(T, SUF, D)                                                                                       \
    extern "C" __global__ __launch_bounds__(128, 1) void flash_attn_bwd_dkdv_##SUF##_d##D(                              \
        const T* q, const T* k, const T* v, const T* dout, const float* lse, const float* delta, T* dk, T* dv,       \
        u64 lq, u64 lk, float scale, int causal) {                                                                   \
        flash::backward_kv<T, D>(q, k, v, dout, lse, delta, dk, dv, lq, lk, scale, causal);                          \
    }                                                                                                                 \
    extern "C" __global__ __launch_bounds__(128, 1) void flash_attn_bwd_dq_##SUF##_d##D(                                \
        const T* q, const T* k, const T* v, const T* dout, const float* lse, const float* delta, T* dq, u64 lq,      \
        u64 lk, float scale, int causal) {                                                                            \
        flash::backward_q<T, D>(q, k, v, dout, lse, delta, dq, lq, lk, scale, causal);                               \
    }
#define ZC_FLASH_BWD_DIM(D) ZC_FLASH_BWD(bf16, bf16, D) ZC_FLASH_BWD(f16, f16, D)

ZC_FLASH_BWD_DIM(16)
ZC_FLASH_BWD_DIM(32)
ZC_FLASH_BWD_DIM(40)
ZC_FLASH_BWD_DIM(64)
ZC_FLASH_BWD_DIM(80)
ZC_FLASH_BWD_DIM(128)
ZC_FLASH_BWD_DIM(160)

extern "C" __global__ void flash_attn_bwd_delta_bf16(const bf16* o, const bf16* dout, float* delta, u64 rows, u64 d) {
    flash::delta_rows<bf16>(o, dout, delta, rows, d);
}
extern "C" __global__ void flash_attn_bwd_delta_f16(const f16* o, const f16* dout, float* delta, u64 rows, u64 d) {
    flash::delta_rows<f16>(o, dout, delta, rows, d);
}
