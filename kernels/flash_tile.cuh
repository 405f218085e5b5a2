// Tiles of the FlashAttention-2 kernels (flash_attention.cu, flash_attention_bwd.cu): their shape in shared memory,
// how they are loaded (cp.async) and how warps multiply them on tensor cores (ldmatrix + mma.m16n8k16, see mma.cuh).
//
// Every block has 4 warps (128 threads) and works on 64-row tiles of q, k, v and dout, each row of one head stored
// [len][D] in global memory. A tile lives in shared memory as 64 rows of `stride` 16-bit elements: the head dim D
// padded to a multiple of 16 (the mma contraction; 40 -> 48) plus 8 elements, so the 8 rows one ldmatrix reads
// start in different banks. Padding columns and rows past the tensor's length are zero-filled, so they add
// nothing to a contraction and never turn a masked (zero) probability into NaN.
#pragma once

#include "mma.cuh"

namespace flash {

constexpr int kThreads = 128;
constexpr int kBlock = 64;  // rows per tile: queries of a block, keys of a step

template <int D>
struct Dims {
    static_assert(D % 8 == 0 && D > 0 && D <= 256, "the head dim must be a multiple of 8 (16-byte rows)");
    static constexpr int padded = (D + 15) / 16 * 16;
    static constexpr int stride = padded + 8;
    static constexpr int tile_elems = kBlock * stride;
};

// Starts cp.async copies of rows [row0, row0 + 64) of a [len][D] tensor `g` into `tile`; rows past `len` and
// columns past D are zero-filled. The caller commits the group.
template <typename T, int D>
__device__ __forceinline__ void load_rows(T* tile, const T* g, u64 row0, u64 len) {
    constexpr int kChunks = Dims<D>::padded / 8;  // 16-byte chunks per row
    for (int i = threadIdx.x; i < kBlock * kChunks; i += kThreads) {
        const int r = i / kChunks, c = i - r * kChunks;
        const bool valid = row0 + r < len && c * 8 < D;
        cp_async_16(tile + r * Dims<D>::stride + c * 8, valid ? g + (row0 + r) * D + c * 8 : g, valid);
    }
}

__device__ __forceinline__ int lane_id() { return threadIdx.x & 31; }

// The A fragment of rows [row0, row0 + 16), columns [k0, k0 + 16) of a row-major tile.
template <int S, typename T>
__device__ __forceinline__ void load_a(unsigned a[4], const T* tile, int row0, int k0) {
    const int lane = lane_id();
    ldmatrix_x4(a, tile + (row0 + (lane & 15)) * S + k0 + (lane >> 4) * 8);
}

// The B fragments of columns n0..n0+7 (b[0], b[1]) and n0+8..n0+15 (b[2], b[3]), k in [k0, k0 + 16), of a matrix
// B stored transposed, as rows n of a [n][k] tile (B = tileᵀ: K in Q Kᵀ).
template <int S, typename T>
__device__ __forceinline__ void load_b_nk(unsigned b[4], const T* tile, int n0, int k0) {
    const int lane = lane_id();
    ldmatrix_x4(b, tile + (n0 + (lane & 7) + ((lane >> 4) << 3)) * S + k0 + ((lane >> 3) & 1) * 8);
}

// The same fragments of a matrix B stored as rows k of a [k][n] tile (B = tile: V in P V).
template <int S, typename T>
__device__ __forceinline__ void load_b_kn(unsigned b[4], const T* tile, int k0, int n0) {
    const int lane = lane_id();
    ldmatrix_x4_trans(b, tile + (k0 + (lane & 7) + ((lane >> 3) & 1) * 8) * S + n0 + (lane >> 4) * 8);
}

// acc (16 x 8 NT) += rows [row0, row0 + 16) of tile `ta` ([rows][DP]) times tile `tb` ([n][DP]) transposed, for
// n in [n0, n0 + 8 NT): the warp's share of Q Kᵀ.
template <typename T, int D, int NT>
__device__ __forceinline__ void mma_rows_nk(float (*acc)[4], const T* ta, int row0, const T* tb, int n0) {
    constexpr int S = Dims<D>::stride;
    // Not unrolled: unrolling lets the compiler hoist every k-step's fragment loads, which costs more registers than
    // the accumulators of D = 160 leave (ptxas then spills); the accumulator indices below stay constant.
#pragma unroll 1
    for (int ks = 0; ks < Dims<D>::padded / 16; ++ks) {
        unsigned a[4];
        load_a<S>(a, ta, row0, 16 * ks);
#pragma unroll
        for (int j = 0; j < NT / 2; ++j) {
            unsigned b[4];
            load_b_nk<S>(b, tb, n0 + 16 * j, 16 * ks);
            mma_m16n8k16<T>(acc[2 * j], a, b);
            mma_m16n8k16<T>(acc[2 * j + 1], a, b + 2);
        }
    }
}

// acc (16 x DP) += a (16 x 16, rows of k in [k0, k0 + 16)) times rows [k0, k0 + 16) of tile `tb` ([k][DP]): the
// warp's share of P V.
template <typename T, int D>
__device__ __forceinline__ void mma_a_kn(float (*acc)[4], const unsigned a[4], const T* tb, int k0) {
    constexpr int S = Dims<D>::stride;
#pragma unroll
    for (int j = 0; j < Dims<D>::padded / 16; ++j) {
        unsigned b[4];
        load_b_kn<S>(b, tb, k0, 16 * j);
        mma_m16n8k16<T>(acc[2 * j], a, b);
        mma_m16n8k16<T>(acc[2 * j + 1], a, b + 2);
    }
}

// The A fragment (16 x 16) made of two accumulator tiles (columns 0-7 and 8-15), rounded to T: the accumulator and
// A layouts match row for row and pair for pair (mma.cuh), so no data moves between lanes.
template <typename T>
__device__ __forceinline__ void acc_to_a(unsigned a[4], const float lo[4], const float hi[4]) {
    a[0] = pack2<T>(lo[0], lo[1]);
    a[1] = pack2<T>(lo[2], lo[3]);
    a[2] = pack2<T>(hi[0], hi[1]);
    a[3] = pack2<T>(hi[2], hi[3]);
}

template <typename T, int D>
__device__ __forceinline__ void zero_acc(float (*acc)[4]) {
#pragma unroll
    for (int j = 0; j < Dims<D>::padded / 8; ++j) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            acc[j][e] = 0.0f;
        }
    }
}

// Stores a warp's 16 x D accumulator tile, times `mul[h]` for its rows row0 + g + 8 h, to rows of a [len][D] tensor
// (rows past `len` are skipped).
template <typename T, int D>
__device__ __forceinline__ void store_rows(T* g, float (*acc)[4], u64 row0, u64 len, const float mul[2]) {
    const int lane = lane_id();
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        const u64 row = row0 + (lane >> 2) + 8 * h;
        if (row >= len) {
            continue;
        }
#pragma unroll
        for (int j = 0; j < Dims<D>::padded / 8; ++j) {
            const int col = 8 * j + 2 * (lane & 3);
            if (col < D) {  // D is a multiple of 8, so col + 1 < D too
                g[row * D + col] = from_f32<T>(acc[j][2 * h] * mul[h]);
                g[row * D + col + 1] = from_f32<T>(acc[j][2 * h + 1] * mul[h]);
            }
        }
    }
}

// log2(e) and ln(2): the kernels compute exp(x) as exp2(x log2(e)) (one multiply folded into the scale).
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// Whether query i may attend to key j.
__device__ __forceinline__ bool visible(u64 i, u64 j, u64 lq, u64 lk, int causal) {
    return i < lq && j < lk && !(causal && j > i);
}

}  // namespace flash
