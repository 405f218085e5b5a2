// Data movement and lookups: strided copies (Permute, BroadcastTo), embeddings and their backward, the timestep
// embedding, and integer fills.
//
// Entry points (T in f32, bf16, f16; I in i32, i64 as the index type's suffix):
//   copy_strided_<T>(const T* x, T* y, u64 n, StridedDims d)
//       y is row-major over d.shape[0..rank) (outermost first, rank <= 8, n = product of the shape) and
//       y[i] = x[sum_k idx_k(i) * d.in_strides[k]], strides in elements, 0 on a broadcast axis. An exact copy.
//   embedding_<T>_<I>(const T* table, const I* ids, T* out, u64 n_ids, u64 dim, u64 vocab, unsigned* err)
//       out[i, :] = table[ids[i], :]. An id < 0 or >= vocab writes zeros to its row and sets *err = 1 (never a
//       trap; the host zeroes the flag before the step and reads it after). Only ever writes 1 to *err.
//   embedding_bwd_<T>_<I>(const I* ids, const T* dy, T* dtable, u64 n_ids, u64 dim, u64 vocab)
//       dtable[v, d] = sum over i with ids[i] == v, in order of i, of dy[i, d] (f32 accumulation). Each thread
//       owns one (v, d) and scans every id, so the result is deterministic and needs no atomics; ids out of range
//       are ignored. Every element of dtable is written (rows no id names get 0).
//   timestep_embedding_<I>(const I* t, float* out, u64 batch, u64 dim, double max_period)
//   timestep_embedding_f32(const float* t, float* out, u64 batch, u64 dim, double max_period)
//       out[b, k] = cos(t[b] * f_k) for k < half, sin(t[b] * f_k) otherwise, with half = dim / 2 and
//       f_k = exp(-ln(max_period) * (k % half) / half), all in f64 exactly as the CPU backend computes it and rounded
//       to f32 once. dim >= 2 (the graph requires an even dim); dim < 2 writes nothing.
//   fill_i32(int* y, u64 n, int value), fill_i64(i64* y, u64 n, i64 value)
// Launch: any 1-D grid and block (grid-stride loops). No output may alias an input.
#include "common.cuh"

#define ZC_MAX_RANK 8

// Passed by value. Host mirror (repr(C)): [i64; 8] shape, [i64; 8] in_strides, i32 rank, i32 pad: 136 bytes.
struct StridedDims {
    i64 shape[ZC_MAX_RANK];
    i64 in_strides[ZC_MAX_RANK];
    int rank;
    int pad;
};

template <typename T>
__device__ __forceinline__ void copy_strided(const T* x, T* y, u64 n, const StridedDims& dims) {
    for (u64 i = grid_start(); i < n; i += grid_stride()) {
        // Unravel the output index from the last axis; the unrolled loop keeps the parameter arrays indexed by
        // constants (a dynamic index would copy them to local memory).
        u64 rest = i;
        i64 offset = 0;
#pragma unroll
        for (int k = ZC_MAX_RANK - 1; k >= 0; --k) {
            if (k < dims.rank) {
                const u64 extent = (u64)dims.shape[k];
                const u64 coord = rest % extent;
                rest /= extent;
                offset += (i64)coord * dims.in_strides[k];
            }
        }
        y[i] = x[offset];
    }
}

template <typename T, typename I>
__device__ __forceinline__ void embedding_fwd(const T* table, const I* ids, T* out, u64 n_ids, u64 dim, u64 vocab,
                                              unsigned* err) {
    const u64 n = n_ids * dim;
    for (u64 i = grid_start(); i < n; i += grid_stride()) {
        const u64 row = i / dim;
        const u64 d = i - row * dim;
        const i64 id = (i64)ids[row];
        if (id < 0 || (u64)id >= vocab) {
            out[i] = from_f32<T>(0.0f);
            if (d == 0) {
                atomicOr(err, 1u);  // one thread per bad row; an integer atomic, so concurrent rows are fine
            }
        } else {
            out[i] = table[(u64)id * dim + d];
        }
    }
}

template <typename T, typename I>
__device__ __forceinline__ void embedding_bwd(const I* ids, const T* dy, T* dtable, u64 n_ids, u64 dim, u64 vocab) {
    const u64 n = vocab * dim;
    for (u64 i = grid_start(); i < n; i += grid_stride()) {
        const u64 v = i / dim;
        const u64 d = i - v * dim;
        float acc = 0.0f;
        for (u64 j = 0; j < n_ids; ++j) {
            if ((i64)ids[j] == (i64)v) {  // neighbouring threads share v, so the id loads are broadcasts
                acc += to_f32(dy[j * dim + d]);
            }
        }
        dtable[i] = from_f32<T>(acc);
    }
}

template <typename I>
__device__ __forceinline__ void timestep_embedding(const I* t, float* out, u64 batch, u64 dim, double max_period) {
    const u64 half = dim / 2;
    if (half == 0) {
        return;
    }
    const u64 n = batch * dim;
    const double neg_log_period = -log(max_period);
    for (u64 i = grid_start(); i < n; i += grid_stride()) {
        const u64 b = i / dim;
        const u64 k = i - b * dim;
        // The CPU's expression, operation for operation: (-ln(max_period) * (k % half)) / half.
        const double f = exp(neg_log_period * (double)(k % half) / (double)half);
        const double arg = (double)t[b] * f;
        out[i] = (float)(k < half ? cos(arg) : sin(arg));
    }
}

#define ZC_COPY_ENTRIES(T, SUF, _unused)                                                       \
    extern "C" __global__ void copy_strided_##SUF(const T* x, T* y, u64 n, StridedDims dims) { \
        copy_strided<T>(x, y, n, dims);                                                        \
    }

ZC_FOR_EACH_FLOAT(ZC_COPY_ENTRIES, 0)

#define ZC_EMBEDDING_ENTRIES(T, SUF, I, ISUF)                                                                     \
    extern "C" __global__ void embedding_##SUF##_##ISUF(const T* table, const I* ids, T* out, u64 n_ids, u64 dim, \
                                                        u64 vocab, unsigned* err) {                               \
        embedding_fwd<T, I>(table, ids, out, n_ids, dim, vocab, err);                                             \
    }                                                                                                             \
    extern "C" __global__ void embedding_bwd_##SUF##_##ISUF(const I* ids, const T* dy, T* dtable, u64 n_ids,      \
                                                            u64 dim, u64 vocab) {                                 \
        embedding_bwd<T, I>(ids, dy, dtable, n_ids, dim, vocab);                                                  \
    }

ZC_FOR_EACH_FLOAT(ZC_EMBEDDING_ENTRIES, int, i32)
ZC_FOR_EACH_FLOAT(ZC_EMBEDDING_ENTRIES, i64, i64)

#define ZC_TIMESTEP_ENTRIES(I, ISUF)                                                                 \
    extern "C" __global__ void timestep_embedding_##ISUF(const I* t, float* out, u64 batch, u64 dim, \
                                                         double max_period) {                        \
        timestep_embedding<I>(t, out, batch, dim, max_period);                                       \
    }

ZC_TIMESTEP_ENTRIES(int, i32)
ZC_TIMESTEP_ENTRIES(i64, i64)
ZC_TIMESTEP_ENTRIES(float, f32)

#define ZC_FILL_INT_ENTRIES(I, ISUF)                               \
    extern "C" __global__ void fill_##ISUF(I* y, u64 n, I value) { \
        for (u64 i = grid_start(); i < n; i += grid_stride()) {    \
            y[i] = value;                                          \
        }                                                          \
    }

ZC_FILL_INT_ENTRIES(int, i32)
ZC_FILL_INT_ENTRIES(i64, i64)
