// Probe kernels for the tensor-core instructions of mma.cuh (ldmatrix, mma.sync m16n8k16): they write out what each
// lane's registers hold, so the same launch can be compared between the CUDA emulator (tests/emulated/mma_emulated.rs,
// against the PTX ISA's fragment tables) and a real GPU (tests/gpu_check.rs, against the emulator, bit for bit).
// Nothing in the training step launches them.

#include "mma.cuh"

// The 32 rows of an 8-column tile of 16-bit values, placed in shared memory in the order `slot`: row r is stored at
// slot[r] (rows 48 bytes apart, so row addresses are not consecutive), and lane l points at row l. Writes the
// registers of all six ldmatrix variants: out[(variant * 32 + lane) * 4 + register].
extern "C" __global__ void probe_ldmatrix(const unsigned short* tile, const int* slot, unsigned* out) {
    __shared__ __align__(16) unsigned short rows[32 * 24];
    const int lane = threadIdx.x;
    for (int c = 0; c < 8; ++c) rows[slot[lane] * 24 + c] = tile[lane * 8 + c];
    __syncthreads();
    const unsigned short* mine = &rows[slot[lane] * 24];
    unsigned r[6][4];
    for (int v = 0; v < 6; ++v) for (int i = 0; i < 4; ++i) r[v][i] = 0xdeadbeefu;
    ldmatrix_x1(r[0], mine);
    ldmatrix_x2(r[1], mine);
    ldmatrix_x4(r[2], mine);
    ldmatrix_x1_trans(r[3], mine);
    ldmatrix_x2_trans(r[4], mine);
    ldmatrix_x4_trans(r[5], mine);
    for (int v = 0; v < 6; ++v) for (int i = 0; i < 4; ++i) out[(v * 32 + lane) * 4 + i] = r[v][i];
}

// D = A B + C for one tile: a [16][16] row-major, b [16][8] row-major ([k][n]), bt [8][16] = b transposed, c and d
// as fragments (lane-major: d[lane * 4 + i]). A comes from ldmatrix.x4 of A's rows; B from ldmatrix.x2 of Bt's rows
// (b_from_rows != 0) or ldmatrix.x2.trans of B's rows.
template <typename T>
__device__ void mma_tile(const T* a, const T* b, const T* bt, const float* c, float* d, int b_from_rows) {
    __shared__ __align__(16) T sa[16 * 16];
    __shared__ __align__(16) T sb[16 * 8];
    __shared__ __align__(16) T sbt[8 * 16];
    const int lane = threadIdx.x;
    for (int i = lane; i < 256; i += 32) sa[i] = a[i];
    for (int i = lane; i < 128; i += 32) { sb[i] = b[i]; sbt[i] = bt[i]; }
    __syncthreads();
    unsigned fa[4], fb[2];
    // Lanes 0-15 give rows 0-15 at column 0 (matrices 0 and 1), lanes 16-31 rows 0-15 at column 8 (2 and 3).
    ldmatrix_x4(fa, &sa[(lane & 15) * 16 + (lane >> 4) * 8]);
    if (b_from_rows) {
        // Matrix 0: Bt's 8 rows at k 0-7; matrix 1: at k 8-15.
        ldmatrix_x2(fb, &sbt[(lane & 7) * 16 + ((lane >> 3) & 1) * 8]);
    } else {
        // Matrix 0: B's rows k 0-7; matrix 1: rows 8-15.
        ldmatrix_x2_trans(fb, &sb[(lane & 15) * 8]);
    }
    float acc[4];
    for (int i = 0; i < 4; ++i) acc[i] = c[lane * 4 + i];
    mma_m16n8k16<T>(acc, fa, fb);
    for (int i = 0; i < 4; ++i) d[lane * 4 + i] = acc[i];
}
extern "C" __global__ void mma_tile_bf16(const bf16* a, const bf16* b, const bf16* bt, const float* c, float* d,
                                         int b_from_rows) {
    mma_tile<bf16>(a, b, bt, c, d, b_from_rows);
}
extern "C" __global__ void mma_tile_f16(const f16* a, const f16* b, const f16* bt, const float* c, float* d,
                                        int b_from_rows) {
    mma_tile<f16>(a, b, bt, c, d, b_from_rows);
}
