// Numerical checks run between nodes when the executor is asked to find the first non-finite value.
//
// Entry points (T in f32, bf16, f16):
//   check_finite_<T>(const T* x, u64 n, unsigned node, unsigned* first_bad)
//       If any of the n elements of x is NaN or +-inf, atomicMin(first_bad, node). The host sets *first_bad to
//       0xffffffff before the step, launches this after each node it checks (with that node's index) and reads
//       the smallest failing node index afterwards; the result does not depend on the order of the launches
//       or of the threads.
// Launch: any 1-D grid and block (grid-stride loop). Each thread issues at most one atomic (an integer one).
// The test is on the stored bits (exponent all ones), so it holds whatever floating-point flags NVRTC is given.
#include "common.cuh"

__device__ __forceinline__ bool non_finite(float x) { return (__float_as_uint(x) & 0x7f800000u) == 0x7f800000u; }
__device__ __forceinline__ bool non_finite(bf16 x) { return (x.bits & 0x7f80u) == 0x7f80u; }
__device__ __forceinline__ bool non_finite(f16 x) { return (x.bits & 0x7c00u) == 0x7c00u; }

template <typename T>
__device__ __forceinline__ void check_finite(const T* x, u64 n, unsigned node, unsigned* first_bad) {
    bool bad = false;
    for (u64 i = grid_start(); i < n; i += grid_stride()) {
        bad |= non_finite(x[i]);
    }
    if (bad) {
        atomicMin(first_bad, node);
    }
}

#define ZC_CHECK_ENTRIES(T, SUF, _unused)                                                                  \
    extern "C" __global__ void check_finite_##SUF(const T* x, u64 n, unsigned node, unsigned* first_bad) { \
        check_finite<T>(x, n, node, first_bad);                                                            \
    }

ZC_FOR_EACH_FLOAT(ZC_CHECK_ENTRIES, 0)
