//! TEMPORARY naive GEMM with the agreed interface; replaced by the `gemm`-crate kernel.
use super::float::Float;

#[allow(clippy::too_many_arguments)]
pub fn matmul<T: Float>(
    m: usize,
    n: usize,
    k: usize,
    a: &[T],
    lda: usize,
    trans_a: bool,
    b: &[T],
    ldb: usize,
    trans_b: bool,
    c: &mut [T],
    ldc: usize,
    accumulate: bool,
    _threads: usize,
) {
    for i in 0..m {
        for j in 0..n {
            let mut s = T::ZERO;
            for p in 0..k {
                let av = if trans_a { a[p * lda + i] } else { a[i * lda + p] };
                let bv = if trans_b { b[j * ldb + p] } else { b[p * ldb + j] };
                s += av * bv;
            }
            if accumulate {
                c[i * ldc + j] += s;
            } else {
                c[i * ldc + j] = s;
            }
        }
    }
}
