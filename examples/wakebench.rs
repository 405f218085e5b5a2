use rayon::prelude::*;
use std::time::Instant;
fn spin(us: f64) { let t = Instant::now(); while t.elapsed().as_secs_f64() * 1e6 < us {} }
fn main() {
    let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
    pool.install(|| {
        for gap in [0.0, 5.0, 20.0, 100.0] {
            let mut v = vec![0f32; 2];
            let n = 2000;
            let t = Instant::now();
            for _ in 0..n {
                spin(gap);
                v.par_chunks_mut(1).for_each(|c| { c[0] += 1.0; });
            }
            let per = t.elapsed().as_secs_f64() / n as f64 * 1e6 - gap;
            println!("gap {gap} us: parallel region costs {per:.1} us");
        }
    });
}
