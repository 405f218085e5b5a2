// Nearest-neighbour 2x upsampling of the last two axes and its adjoint.
//
// Entry points (T in f32, bf16, f16), for `planes` = product of the leading axes:
//   upsample2x_<T>(const T* x, T* y, u64 planes, u64 h, u64 w)
//       x [planes, h, w] -> y [planes, 2h, 2w], y[p, i, j] = x[p, i/2, j/2]
//   upsample2x_bwd_<T>(const T* dy, T* dx, u64 planes, u64 h, u64 w)
//       dy [planes, 2h, 2w] -> dx [planes, h, w], each dx the f32 sum of its 2x2 block of dy
// Launch: any 1-D grid and block (grid-stride loops over the output).
#include "common.cuh"

template <typename T>
__device__ __forceinline__ void upsample2x(const T* x, T* y, u64 planes, u64 h, u64 w) {
    const u64 wo = 2 * w;
    const u64 ho = 2 * h;
    const u64 n = planes * ho * wo;
    for (u64 i = grid_start(); i < n; i += grid_stride()) {
        const u64 col = i % wo;
        const u64 rest = i / wo;
        const u64 row = rest % ho;
        const u64 plane = rest / ho;
        y[i] = x[(plane * h + row / 2) * w + col / 2];
    }
}

template <typename T>
__device__ __forceinline__ void upsample2x_bwd(const T* dy, T* dx, u64 planes, u64 h, u64 w) {
    const u64 n = planes * h * w;
    const u64 wo = 2 * w;
    for (u64 i = grid_start(); i < n; i += grid_stride()) {
        const u64 col = i % w;
        const u64 rest = i / w;
        const u64 row = rest % h;
        const u64 plane = rest / h;
        const T* top = dy + (plane * 2 * h + 2 * row) * wo + 2 * col;
        const T* bottom = top + wo;
        float s = (to_f32(top[0]) + to_f32(top[1])) + (to_f32(bottom[0]) + to_f32(bottom[1]));
        dx[i] = from_f32<T>(s);
    }
}

#define ZC_UPSAMPLE_ENTRIES(T, SUF, _unused)                                                          \
    extern "C" __global__ void upsample2x_##SUF(const T* x, T* y, u64 planes, u64 h, u64 w) {         \
        upsample2x<T>(x, y, planes, h, w);                                                            \
    }                                                                                                 \
    extern "C" __global__ void upsample2x_bwd_##SUF(const T* dy, T* dx, u64 planes, u64 h, u64 w) { \
        upsample2x_bwd<T>(dy, dx, planes, h, w);                                                      \
    }

ZC_FOR_EACH_FLOAT(ZC_UPSAMPLE_ENTRIES, 0)
