// Conversions between the float storage types.
//
// Entry points, for every ordered pair of distinct types From, To in f32, bf16, f16:
//   cast_<From>_<To>(const From* x, To* y, u64 n)
// Narrowing rounds to nearest even; NaN stays NaN and values past the range become inf (as PyTorch does).
// Launch: any 1-D grid and block (grid-stride loop).
#include "common.cuh"

template <typename From, typename To>
__device__ __forceinline__ void cast_loop(const From* x, To* y, u64 n) {
    for (u64 i = grid_start(); i < n; i += grid_stride()) {
        y[i] = from_f32<To>(to_f32(x[i]));
    }
}

#define ZC_CAST_ENTRY(FROM, FROM_SUF, TO, TO_SUF)                                            \
    extern "C" __global__ void cast_##FROM_SUF##_##TO_SUF(const FROM* x, TO* y, u64 n) { \
        cast_loop<FROM, TO>(x, y, n);                                                     \
    }

// Every f16 <-> bf16 value passes exactly through f32, so the two-step conversion rounds only once.
ZC_CAST_ENTRY(float, f32, bf16, bf16)
ZC_CAST_ENTRY(float, f32, f16, f16)
ZC_CAST_ENTRY(bf16, bf16, float, f32)
ZC_CAST_ENTRY(f16, f16, float, f32)
ZC_CAST_ENTRY(bf16, bf16, f16, f16)
ZC_CAST_ENTRY(f16, f16, bf16, bf16)
