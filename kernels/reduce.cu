// Sums along one axis, with f32 accumulation. A tensor is viewed as [outer, reduced, inner] with the summed
// axis (or several adjacent ones, merged) in the middle; any ReduceSum or SumTo is a sequence of such sums.
//
// Entry points (T in f32, bf16, f16):
//   sum_rows_<T>(const T* x, T* y, u64 rows, u64 cols)
//       y[r] = sum_c x[r, c]                     (inner == 1). One block per row, grid-stride over rows.
//       Launch: blockDim.x a multiple of 32 (<= 1024), any grid.
//   sum_axis_<T>(const T* x, T* y, u64 outer, u64 reduced, u64 inner)
//       y[o, i] = sum_r x[o, r, i]               (inner > 1). A block owns 32 consecutive i of one o; its
//       blockDim.y rows of threads split r and combine through shared memory, so reads stay coalesced.
//       Launch: blockDim = (32, k) with 1 <= k <= 32, any grid.
//   sum_rows_<H>_to_f32(const H* x, float* y, u64 rows, u64 cols)       (H in bf16, f16)
//   sum_rows_f32_to_<H>(const float* x, H* y, u64 rows, u64 cols)
//   sum_axis_<H>_to_f32(const H* x, float* y, u64 outer, u64 reduced, u64 inner)
//   sum_axis_f32_to_<H>(const float* x, H* y, u64 outer, u64 reduced, u64 inner)
//       The same sums with an f32 input or output, so a sum over several non-adjacent axes of a half-precision
//       tensor (a chain of these kernels) keeps its intermediates in f32 and rounds once, at the last step.
//       Same launch contracts as sum_rows_<T> and sum_axis_<T>.
// The order of additions depends only on the launch shape, so results are deterministic run to run.
#include "common.cuh"

// In: the stored input type; Out: the stored output type (the same, or f32 <-> a half type).
template <typename In, typename Out>
__device__ __forceinline__ void sum_rows(const In* x, Out* y, u64 rows, u64 cols) {
    for (u64 r = blockIdx.x; r < rows; r += gridDim.x) {
        const In* row = x + r * cols;
        float acc = 0.0f;
        for (u64 c = threadIdx.x; c < cols; c += blockDim.x) {
            acc += to_f32(row[c]);
        }
        acc = block_sum(acc);
        if (threadIdx.x == 0) {
            y[r] = from_f32<Out>(acc);
        }
    }
}

template <typename In, typename Out>
__device__ __forceinline__ void sum_axis(const In* x, Out* y, u64 outer, u64 reduced, u64 inner) {
    __shared__ float tile[32][33];  // [thread row][column]; the pad column avoids bank conflicts
    const u64 tiles_per_outer = (inner + 31) / 32;
    const u64 tiles = outer * tiles_per_outer;
    for (u64 t = blockIdx.x; t < tiles; t += gridDim.x) {
        const u64 o = t / tiles_per_outer;
        const u64 i = (t % tiles_per_outer) * 32 + threadIdx.x;
        float acc = 0.0f;
        if (i < inner) {
            const In* column = x + o * reduced * inner + i;
            for (u64 r = threadIdx.y; r < reduced; r += blockDim.y) {
                acc += to_f32(column[r * inner]);
            }
        }
        tile[threadIdx.y][threadIdx.x] = acc;
        __syncthreads();
        if (threadIdx.y == 0 && i < inner) {
            float total = 0.0f;
            for (unsigned k = 0; k < blockDim.y; ++k) {
                total += tile[k][threadIdx.x];
            }
            y[o * inner + i] = from_f32<Out>(total);
        }
        __syncthreads();  // the tile is rewritten by the next iteration
    }
}

#define ZC_REDUCE_ENTRIES(T, SUF, _unused)                                                           \
    extern "C" __global__ void sum_rows_##SUF(const T* x, T* y, u64 rows, u64 cols) {                \
        sum_rows<T, T>(x, y, rows, cols);                                                            \
    }                                                                                                \
    extern "C" __global__ void sum_axis_##SUF(const T* x, T* y, u64 outer, u64 reduced, u64 inner) { \
        sum_axis<T, T>(x, y, outer, reduced, inner);                                                 \
    }

ZC_FOR_EACH_FLOAT(ZC_REDUCE_ENTRIES, 0)

// f32 intermediates for the half types only (for f32 these would duplicate sum_rows_f32 and sum_axis_f32).
#define ZC_FOR_EACH_HALF(M, ...) \
    M(bf16, bf16, __VA_ARGS__)   \
    M(f16, f16, __VA_ARGS__)

#define ZC_REDUCE_F32_ENTRIES(H, SUF, _unused)                                                                    \
    extern "C" __global__ void sum_rows_##SUF##_to_f32(const H* x, float* y, u64 rows, u64 cols) {                \
        sum_rows<H, float>(x, y, rows, cols);                                                                     \
    }                                                                                                             \
    extern "C" __global__ void sum_rows_f32_to_##SUF(const float* x, H* y, u64 rows, u64 cols) {                  \
        sum_rows<float, H>(x, y, rows, cols);                                                                     \
    }                                                                                                             \
    extern "C" __global__ void sum_axis_##SUF##_to_f32(const H* x, float* y, u64 outer, u64 reduced, u64 inner) { \
        sum_axis<H, float>(x, y, outer, reduced, inner);                                                          \
    }                                                                                                             \
    extern "C" __global__ void sum_axis_f32_to_##SUF(const float* x, H* y, u64 outer, u64 reduced, u64 inner) {   \
        sum_axis<float, H>(x, y, outer, reduced, inner);                                                          \
    }

ZC_FOR_EACH_HALF(ZC_REDUCE_F32_ENTRIES, 0)
