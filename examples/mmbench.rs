use std::time::Instant;
use zeroconv::engine::cpu::gemm::{matmul, GemmDims, MatMut, MatRef};
fn main() {
    let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
    pool.install(|| {
        for &(m, n, k) in &[(512usize, 1024usize, 128usize), (128, 1024, 128), (512, 128, 512), (512, 128, 128), (128, 128, 128)] {
            let a = vec![0.5f32; m * k];
            let b = vec![0.25f32; k * n];
            let mut c = vec![0f32; m * n];
            let bias = vec![1f32; n];
            for threads in [1usize, 2] {
                let mut best = f64::MAX;
                for _ in 0..30 {
                    let t = Instant::now();
                    matmul(GemmDims::new(m, n, k), MatRef::new(&a, k), MatRef::new(&b, n), MatMut::new(&mut c, n), false, threads).unwrap();
                    best = best.min(t.elapsed().as_secs_f64());
                }
                // split rows in two halves on two threads, each single-threaded
                let mut best_split = f64::MAX;
                for _ in 0..30 {
                    let t = Instant::now();
                    let (c0, c1) = c.split_at_mut(m / 2 * n);
                    rayon::join(
                        || matmul(GemmDims::new(m / 2, n, k), MatRef::new(&a, k), MatRef::new(&b, n), MatMut::new(c0, n), false, 1).unwrap(),
                        || matmul(GemmDims::new(m / 2, n, k), MatRef::new(&a[m / 2 * k..], k), MatRef::new(&b, n), MatMut::new(c1, n), false, 1).unwrap(),
                    );
                    best_split = best_split.min(t.elapsed().as_secs_f64());
                }
                let mut best_bias = f64::MAX;
                for _ in 0..30 {
                    let t = Instant::now();
                    for row in c.chunks_exact_mut(n) { for (v, b) in row.iter_mut().zip(&bias) { *v += b; } }
                    best_bias = best_bias.min(t.elapsed().as_secs_f64());
                }
                let fl = 2.0 * (m * n * k) as f64;
                println!("{m}x{n}x{k} threads {threads}: {:.3} ms {:.0} GF/s | split rows on 2: {:.3} ms {:.0} GF/s | bias pass {:.3} ms", best * 1e3, fl / best / 1e9, best_split * 1e3, fl / best_split / 1e9, best_bias*1e3);
            }
        }
    });
}
