// GroupNorm and LayerNorm, forward and backward. Statistics and all arithmetic in f32 whatever the storage type.
// Variance is computed in two passes (mean, then mean of squared deviations), which stays accurate when the mean
// is large relative to the spread, unlike E[x^2] - E[x]^2.
//
// GroupNorm, x [N, C, S] (S = product of the spatial axes), G groups of Cg = C/G channels. The Cg*S elements of
// one (sample, group) are contiguous; one block owns one (n, g) at a time (grid-stride over N*G).
// Launch: blockDim.x a multiple of 32 (<= 1024), any grid.
//   groupnorm_<T>(x, gamma [C], beta [C], y, float* mean, float* rstd, N, C, S, G, eps)
//       mean and rstd ([N*G], f32) may each be null; each one given receives its statistic.
//   groupnorm_bwd_<T>(x, gamma, dy, dx, float* dgamma_part [N, C], float* dbeta_part [N, C], N, C, S, G, eps)
//       Writes dx, and per-sample partial parameter gradients; norm_params_finish_<T> sums them over N.
//
// LayerNorm over the last axis, x [rows, D]. One warp owns one row at a time (no block barriers).
// Launch: blockDim = (32, k), any k (<= 32), any grid.
//   layernorm_<T>(x, gamma [D], beta [D], y, float* mean, float* rstd, rows, D, eps)   (mean, rstd: each may be null)
//   layernorm_bwd_<T>(x, gamma, dy, dx, float* stats [rows, 2], rows, D, eps)
//       Writes dx and each row's (mean, rstd) into stats for the parameter pass.
//   layernorm_bwd_params_<T>(x, dy, stats, float* dgamma_part [P, D], float* dbeta_part [P, D], rows, D,
//                            rows_per_part)
//       Partial sums over P = ceil(rows / rows_per_part) row ranges. Launch: blockDim = (32, k), k <= 32.
//   norm_params_finish_<T>(dgamma_part, dbeta_part, T* dgamma, T* dbeta, u64 parts, u64 C)
//       dgamma[c] = sum_p dgamma_part[p, c] (same for beta), for both norms. Any 1-D launch.
// The partial-sum design keeps parameter gradients deterministic (no float atomics).
#include "common.cuh"

// ---- GroupNorm ----------------------------------------------------------------------------------------------

// Mean and 1/sqrt(var + eps) of the `count` contiguous elements at `x`, returned to every thread of the block.
template <typename T>
__device__ __forceinline__ void block_moments(const T* x, u64 count, float eps, float& mean, float& rstd) {
    float s = 0.0f;
    for (u64 j = threadIdx.x; j < count; j += blockDim.x) {
        s += to_f32(x[j]);
    }
    mean = block_sum(s) / (float)count;
    float q = 0.0f;
    for (u64 j = threadIdx.x; j < count; j += blockDim.x) {
        float d = to_f32(x[j]) - mean;
        q += d * d;
    }
    rstd = rsqrtf(block_sum(q) / (float)count + eps);
}

template <typename T>
__device__ __forceinline__ void groupnorm_fwd(const T* x, const T* gamma, const T* beta, T* y, float* mean_out,
                                              float* rstd_out, u64 N, u64 C, u64 S, u64 G, float eps) {
    const u64 cg = C / G;
    const u64 count = cg * S;
    for (u64 ng = blockIdx.x; ng < N * G; ng += gridDim.x) {
        const u64 base = ng * count;
        const u64 first_channel = (ng % G) * cg;
        float mean, rstd;
        block_moments(x + base, count, eps, mean, rstd);
        for (u64 j = threadIdx.x; j < count; j += blockDim.x) {
            const u64 c = first_channel + j / S;
            const float xhat = (to_f32(x[base + j]) - mean) * rstd;
            y[base + j] = from_f32<T>(xhat * to_f32(gamma[c]) + to_f32(beta[c]));
        }
        // Each statistic is written when its pointer is given, so a caller may ask for either alone.
        if (threadIdx.x == 0 && mean_out != 0) {
            mean_out[ng] = mean;
        }
        if (threadIdx.x == 0 && rstd_out != 0) {
            rstd_out[ng] = rstd;
        }
    }
}

template <typename T>
__device__ __forceinline__ void groupnorm_bwd(const T* x, const T* gamma, const T* dy, T* dx, float* dgamma_part,
                                              float* dbeta_part, u64 N, u64 C, u64 S, u64 G, float eps) {
    const u64 cg = C / G;
    const u64 count = cg * S;
    for (u64 ng = blockIdx.x; ng < N * G; ng += gridDim.x) {
        const u64 base = ng * count;
        const u64 n = ng / G;
        const u64 first_channel = (ng % G) * cg;
        float mean, rstd;
        block_moments(x + base, count, eps, mean, rstd);
        // With dxhat = dy * gamma: sum(dxhat) = sum_c gamma_c * sum_s dy and sum(dxhat * xhat) =
        // sum_c gamma_c * sum_s dy * xhat, so the per-channel sums needed for dgamma and dbeta give both.
        float sum_dxhat = 0.0f;
        float sum_dxhat_xhat = 0.0f;
        for (u64 k = 0; k < cg; ++k) {
            const u64 c = first_channel + k;
            const u64 off = base + k * S;
            float dy_xhat = 0.0f;
            float dy_sum = 0.0f;
            for (u64 s = threadIdx.x; s < S; s += blockDim.x) {
                const float g = to_f32(dy[off + s]);
                dy_xhat += g * (to_f32(x[off + s]) - mean) * rstd;
                dy_sum += g;
            }
            block_sum2(dy_xhat, dy_sum);
            if (threadIdx.x == 0) {
                dgamma_part[n * C + c] = dy_xhat;
                dbeta_part[n * C + c] = dy_sum;
            }
            const float gc = to_f32(gamma[c]);
            sum_dxhat += gc * dy_sum;
            sum_dxhat_xhat += gc * dy_xhat;
        }
        const float mean_dxhat = sum_dxhat / (float)count;
        const float mean_dxhat_xhat = sum_dxhat_xhat / (float)count;
        for (u64 j = threadIdx.x; j < count; j += blockDim.x) {
            const u64 c = first_channel + j / S;
            const float xhat = (to_f32(x[base + j]) - mean) * rstd;
            const float dxhat = to_f32(dy[base + j]) * to_f32(gamma[c]);
            dx[base + j] = from_f32<T>(rstd * (dxhat - mean_dxhat - xhat * mean_dxhat_xhat));
        }
    }
}

// ---- LayerNorm ----------------------------------------------------------------------------------------------

// The first row of this warp and the row stride of the grid: rows are spread over warps, warp-uniform.
__device__ __forceinline__ u64 warp_row_start() { return (u64)blockIdx.x * blockDim.y + threadIdx.y; }
__device__ __forceinline__ u64 warp_row_stride() { return (u64)gridDim.x * blockDim.y; }

template <typename T>
__device__ __forceinline__ void warp_moments(const T* row, u64 D, float eps, float& mean, float& rstd) {
    float s = 0.0f;
    for (u64 d = threadIdx.x; d < D; d += 32) {
        s += to_f32(row[d]);
    }
    mean = warp_sum(s) / (float)D;
    float q = 0.0f;
    for (u64 d = threadIdx.x; d < D; d += 32) {
        float v = to_f32(row[d]) - mean;
        q += v * v;
    }
    rstd = rsqrtf(warp_sum(q) / (float)D + eps);
}

template <typename T>
__device__ __forceinline__ void layernorm_fwd(const T* x, const T* gamma, const T* beta, T* y, float* mean_out,
                                              float* rstd_out, u64 rows, u64 D, float eps) {
    for (u64 r = warp_row_start(); r < rows; r += warp_row_stride()) {
        const T* row = x + r * D;
        float mean, rstd;
        warp_moments(row, D, eps, mean, rstd);
        for (u64 d = threadIdx.x; d < D; d += 32) {
            const float xhat = (to_f32(row[d]) - mean) * rstd;
            y[r * D + d] = from_f32<T>(xhat * to_f32(gamma[d]) + to_f32(beta[d]));
        }
        // Each statistic is written when its pointer is given, so a caller may ask for either alone.
        if (threadIdx.x == 0 && mean_out != 0) {
            mean_out[r] = mean;
        }
        if (threadIdx.x == 0 && rstd_out != 0) {
            rstd_out[r] = rstd;
        }
    }
}

template <typename T>
__device__ __forceinline__ void layernorm_bwd(const T* x, const T* gamma, const T* dy, T* dx, float* stats, u64 rows,
                                              u64 D, float eps) {
    for (u64 r = warp_row_start(); r < rows; r += warp_row_stride()) {
        const T* row = x + r * D;
        const T* drow = dy + r * D;
        float mean, rstd;
        warp_moments(row, D, eps, mean, rstd);
        float sum_dxhat = 0.0f;
        float sum_dxhat_xhat = 0.0f;
        for (u64 d = threadIdx.x; d < D; d += 32) {
            const float dxhat = to_f32(drow[d]) * to_f32(gamma[d]);
            sum_dxhat += dxhat;
            sum_dxhat_xhat += dxhat * (to_f32(row[d]) - mean) * rstd;
        }
        const float mean_dxhat = warp_sum(sum_dxhat) / (float)D;
        const float mean_dxhat_xhat = warp_sum(sum_dxhat_xhat) / (float)D;
        for (u64 d = threadIdx.x; d < D; d += 32) {
            const float xhat = (to_f32(row[d]) - mean) * rstd;
            const float dxhat = to_f32(drow[d]) * to_f32(gamma[d]);
            dx[r * D + d] = from_f32<T>(rstd * (dxhat - mean_dxhat - xhat * mean_dxhat_xhat));
        }
        if (threadIdx.x == 0) {
            stats[2 * r] = mean;
            stats[2 * r + 1] = rstd;
        }
    }
}

template <typename T>
__device__ __forceinline__ void layernorm_bwd_params(const T* x, const T* dy, const float* stats, float* dgamma_part,
                                                     float* dbeta_part, u64 rows, u64 D, u64 rows_per_part) {
    __shared__ float tile_g[32][33];
    __shared__ float tile_b[32][33];
    const u64 tiles_per_part = (D + 31) / 32;
    const u64 parts = (rows + rows_per_part - 1) / rows_per_part;
    for (u64 t = blockIdx.x; t < parts * tiles_per_part; t += gridDim.x) {
        const u64 part = t / tiles_per_part;
        const u64 d = (t % tiles_per_part) * 32 + threadIdx.x;
        const u64 row_end = min(rows, (part + 1) * rows_per_part);
        float acc_g = 0.0f;
        float acc_b = 0.0f;
        if (d < D) {
            for (u64 r = part * rows_per_part + threadIdx.y; r < row_end; r += blockDim.y) {
                const float g = to_f32(dy[r * D + d]);
                acc_g += g * (to_f32(x[r * D + d]) - stats[2 * r]) * stats[2 * r + 1];
                acc_b += g;
            }
        }
        tile_g[threadIdx.y][threadIdx.x] = acc_g;
        tile_b[threadIdx.y][threadIdx.x] = acc_b;
        __syncthreads();
        if (threadIdx.y == 0 && d < D) {
            float total_g = 0.0f;
            float total_b = 0.0f;
            for (unsigned k = 0; k < blockDim.y; ++k) {
                total_g += tile_g[k][threadIdx.x];
                total_b += tile_b[k][threadIdx.x];
            }
            dgamma_part[part * D + d] = total_g;
            dbeta_part[part * D + d] = total_b;
        }
        __syncthreads();
    }
}

template <typename T>
__device__ __forceinline__ void norm_params_finish(const float* dgamma_part, const float* dbeta_part, T* dgamma,
                                                   T* dbeta, u64 parts, u64 C) {
    for (u64 c = grid_start(); c < C; c += grid_stride()) {
        float g = 0.0f;
        float b = 0.0f;
        for (u64 p = 0; p < parts; ++p) {
            g += dgamma_part[p * C + c];
            b += dbeta_part[p * C + c];
        }
        dgamma[c] = from_f32<T>(g);
        dbeta[c] = from_f32<T>(b);
    }
}

#define ZC_NORM_ENTRIES(T, SUF, _unused)                                                                            \
    extern "C" __global__ void groupnorm_##SUF(const T* x, const T* gamma, const T* beta, T* y, float* mean,        \
                                               float* rstd, u64 N, u64 C, u64 S, u64 G, float eps) {                \
        groupnorm_fwd<T>(x, gamma, beta, y, mean, rstd, N, C, S, G, eps);                                           \
    }                                                                                                               \
    extern "C" __global__ void groupnorm_bwd_##SUF(const T* x, const T* gamma, const T* dy, T* dx,                  \
                                                   float* dgamma_part, float* dbeta_part, u64 N, u64 C, u64 S,      \
                                                   u64 G, float eps) {                                              \
        groupnorm_bwd<T>(x, gamma, dy, dx, dgamma_part, dbeta_part, N, C, S, G, eps);                               \
    }                                                                                                               \
    extern "C" __global__ void layernorm_##SUF(const T* x, const T* gamma, const T* beta, T* y, float* mean,        \
                                               float* rstd, u64 rows, u64 D, float eps) {                           \
        layernorm_fwd<T>(x, gamma, beta, y, mean, rstd, rows, D, eps);                                              \
    }                                                                                                               \
    extern "C" __global__ void layernorm_bwd_##SUF(const T* x, const T* gamma, const T* dy, T* dx, float* stats,    \
                                                   u64 rows, u64 D, float eps) {                                    \
        layernorm_bwd<T>(x, gamma, dy, dx, stats, rows, D, eps);                                                    \
    }                                                                                                               \
    extern "C" __global__ void layernorm_bwd_params_##SUF(const T* x, const T* dy, const float* stats,              \
                                                          float* dgamma_part, float* dbeta_part, u64 rows, u64 D,   \
                                                          u64 rows_per_part) {                                      \
        layernorm_bwd_params<T>(x, dy, stats, dgamma_part, dbeta_part, rows, D, rows_per_part);                     \
    }                                                                                                               \
    extern "C" __global__ void norm_params_finish_##SUF(const float* dgamma_part, const float* dbeta_part,          \
                                                        T* dgamma, T* dbeta, u64 parts, u64 C) {                    \
        norm_params_finish<T>(dgamma_part, dbeta_part, dgamma, dbeta, parts, C);                                    \
    }

ZC_FOR_EACH_FLOAT(ZC_NORM_ENTRIES, 0)
