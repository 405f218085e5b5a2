//! Naive f64 implementations of every op: loops that follow the definitions, written without
//! looking at the engine's kernels, so the two are independent.
#![allow(dead_code, clippy::needless_range_loop)]

use super::T64;

fn strides(s: &[usize]) -> Vec<usize> {
    let mut st = vec![1; s.len()];
    for i in (0..s.len().saturating_sub(1)).rev() {
        st[i] = st[i + 1] * s[i + 1];
    }
    st
}

fn unravel(mut i: usize, s: &[usize]) -> Vec<usize> {
    let mut idx = vec![0; s.len()];
    for a in (0..s.len()).rev() {
        idx[a] = i % s[a];
        i /= s[a];
    }
    idx
}

fn ravel(idx: &[usize], s: &[usize]) -> usize {
    idx.iter().zip(strides(s)).map(|(i, st)| i * st).sum()
}

pub fn map(x: &T64, f: impl Fn(f64) -> f64) -> T64 {
    T64::new(&x.shape, x.data.iter().map(|&v| f(v)).collect())
}

pub fn sigmoid(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

pub fn erf(x: f64) -> f64 {
    // Abramowitz-Stegun 7.1.26 is too coarse; use the series/continued fraction via libm-free
    // high-precision approximation: erf(x) = 2/sqrt(pi) * sum x^(2n+1) (-1)^n / (n! (2n+1)).
    if x.abs() > 4.0 {
        return x.signum() * (1.0 - erfc_large(x.abs()));
    }
    let mut sum = 0.0;
    let mut term = x;
    let mut n = 0.0;
    loop {
        let add = term / (2.0 * n + 1.0);
        sum += add;
        if add.abs() < 1e-17 {
            break;
        }
        n += 1.0;
        term *= -x * x / n;
    }
    sum * 2.0 / std::f64::consts::PI.sqrt()
}

fn erfc_large(x: f64) -> f64 {
    // Continued fraction for erfc, accurate for x > 4.
    let mut f = 0.0;
    for k in (1..60).rev() {
        f = (k as f64 / 2.0) / (x + f);
    }
    (-x * x).exp() / std::f64::consts::PI.sqrt() / (x + f)
}

/// NumPy broadcasting of a binary function.
pub fn broadcast(a: &T64, b: &T64, f: impl Fn(f64, f64) -> f64) -> T64 {
    let r = a.shape.len().max(b.shape.len());
    let pad = |s: &[usize]| -> Vec<usize> { std::iter::repeat_n(1, r - s.len()).chain(s.iter().copied()).collect() };
    let (sa, sb) = (pad(&a.shape), pad(&b.shape));
    let out: Vec<usize> = (0..r).map(|i| sa[i].max(sb[i])).collect();
    let n: usize = out.iter().product();
    let data = (0..n)
        .map(|i| {
            let idx = unravel(i, &out);
            let ia: Vec<usize> = idx.iter().zip(&sa).map(|(&x, &d)| if d == 1 { 0 } else { x }).collect();
            let ib: Vec<usize> = idx.iter().zip(&sb).map(|(&x, &d)| if d == 1 { 0 } else { x }).collect();
            f(a.data[ravel(&ia, &sa)], b.data[ravel(&ib, &sb)])
        })
        .collect();
    T64::new(&out, data)
}

pub fn transpose_last2(x: &T64) -> T64 {
    let r = x.shape.len();
    let mut s = x.shape.clone();
    s.swap(r - 1, r - 2);
    let n = x.data.len();
    let data = (0..n)
        .map(|i| {
            let mut idx = unravel(i, &s);
            idx.swap(r - 1, r - 2);
            x.data[ravel(&idx, &x.shape)]
        })
        .collect();
    T64::new(&s, data)
}

/// Batched matmul; a rank-2 operand is shared by every batch.
pub fn matmul(a: &T64, b: &T64, ta: bool, tb: bool) -> T64 {
    let a = if ta { transpose_last2(a) } else { a.clone() };
    let b = if tb { transpose_last2(b) } else { b.clone() };
    let (ra, rb) = (a.shape.len(), b.shape.len());
    let (m, k, n) = (a.shape[ra - 2], a.shape[ra - 1], b.shape[rb - 1]);
    let batch_shape = if ra >= rb { a.shape[..ra - 2].to_vec() } else { b.shape[..rb - 2].to_vec() };
    let batch: usize = batch_shape.iter().product();
    let mut out = vec![0.0; batch * m * n];
    for bi in 0..batch {
        let ao = if ra == 2 { 0 } else { bi * m * k };
        let bo = if rb == 2 { 0 } else { bi * k * n };
        for i in 0..m {
            for j in 0..n {
                let mut s = 0.0;
                for p in 0..k {
                    s += a.data[ao + i * k + p] * b.data[bo + p * n + j];
                }
                out[bi * m * n + i * n + j] = s;
            }
        }
    }
    let mut shape = batch_shape;
    shape.extend([m, n]);
    T64::new(&shape, out)
}

pub fn conv2d(x: &T64, w: &T64, b: Option<&T64>, stride: usize, pad: usize) -> T64 {
    let (n, c, h, wd) = (x.shape[0], x.shape[1], x.shape[2], x.shape[3]);
    let (o, kh, kw) = (w.shape[0], w.shape[2], w.shape[3]);
    let ho = (h + 2 * pad - kh) / stride + 1;
    let wo = (wd + 2 * pad - kw) / stride + 1;
    let mut out = T64::zeros(&[n, o, ho, wo]);
    for bn in 0..n {
        for oc in 0..o {
            for i in 0..ho {
                for j in 0..wo {
                    let mut s = b.map_or(0.0, |b| b.data[oc]);
                    for ic in 0..c {
                        for p in 0..kh {
                            for q in 0..kw {
                                let y = (i * stride + p) as isize - pad as isize;
                                let xx = (j * stride + q) as isize - pad as isize;
                                if y < 0 || xx < 0 || y >= h as isize || xx >= wd as isize {
                                    continue;
                                }
                                s += x.data[((bn * c + ic) * h + y as usize) * wd + xx as usize]
                                    * w.data[((oc * c + ic) * kh + p) * kw + q];
                            }
                        }
                    }
                    out.data[((bn * o + oc) * ho + i) * wo + j] = s;
                }
            }
        }
    }
    out
}

pub fn group_norm(x: &T64, g: &T64, b: &T64, groups: usize, eps: f64) -> T64 {
    let (n, c) = (x.shape[0], x.shape[1]);
    let s: usize = x.shape[2..].iter().product();
    let cg = c / groups;
    let mut out = x.clone();
    for bn in 0..n {
        for gi in 0..groups {
            let idx: Vec<usize> =
                (gi * cg..(gi + 1) * cg).flat_map(|ch| (0..s).map(move |k| (bn * c + ch) * s + k)).collect();
            let mean = idx.iter().map(|&i| x.data[i]).sum::<f64>() / idx.len() as f64;
            let var = idx.iter().map(|&i| (x.data[i] - mean).powi(2)).sum::<f64>() / idx.len() as f64;
            for &i in &idx {
                let ch = (i / s) % c;
                out.data[i] = (x.data[i] - mean) / (var + eps).sqrt() * g.data[ch] + b.data[ch];
            }
        }
    }
    out
}

pub fn layer_norm(x: &T64, g: &T64, b: &T64, eps: f64) -> T64 {
    let d = *x.shape.last().unwrap();
    let mut out = x.clone();
    for r in 0..x.data.len() / d {
        let row = &x.data[r * d..(r + 1) * d];
        let mean = row.iter().sum::<f64>() / d as f64;
        let var = row.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / d as f64;
        for j in 0..d {
            out.data[r * d + j] = (row[j] - mean) / (var + eps).sqrt() * g.data[j] + b.data[j];
        }
    }
    out
}

pub fn softmax(x: &T64) -> T64 {
    let d = *x.shape.last().unwrap();
    let mut out = x.clone();
    for r in 0..x.data.len() / d {
        let row = &x.data[r * d..(r + 1) * d];
        let m = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let z: f64 = row.iter().map(|v| (v - m).exp()).sum();
        for j in 0..d {
            out.data[r * d + j] = (row[j] - m).exp() / z;
        }
    }
    out
}

/// softmax(q kᵀ · scale, causal mask) v, per (batch, head).
pub fn attention(q: &T64, k: &T64, v: &T64, scale: f64, causal: bool) -> T64 {
    let (b, h, lq, d) = (q.shape[0], q.shape[1], q.shape[2], q.shape[3]);
    let (lk, dv) = (k.shape[2], v.shape[3]);
    let mut out = T64::zeros(&[b, h, lq, dv]);
    for bh in 0..b * h {
        for i in 0..lq {
            let mut s: Vec<f64> = (0..lk)
                .map(|j| {
                    (0..d).map(|p| q.data[(bh * lq + i) * d + p] * k.data[(bh * lk + j) * d + p]).sum::<f64>() * scale
                })
                .collect();
            if causal {
                for (j, v) in s.iter_mut().enumerate() {
                    if j > i {
                        *v = f64::NEG_INFINITY;
                    }
                }
            }
            let p = softmax(&T64::new(&[lk], s));
            for e in 0..dv {
                out.data[(bh * lq + i) * dv + e] = (0..lk).map(|j| p.data[j] * v.data[(bh * lk + j) * dv + e]).sum();
            }
        }
    }
    out
}

/// Attention's row log-sum-exp: ln Σ_j exp(scale q_i·k_j) over the visible keys (j <= i when causal), [B, H, Lq].
pub fn attention_lse(q: &T64, k: &T64, scale: f64, causal: bool) -> T64 {
    let (b, h, lq, d) = (q.shape[0], q.shape[1], q.shape[2], q.shape[3]);
    let lk = k.shape[2];
    let mut out = T64::zeros(&[b, h, lq]);
    for bh in 0..b * h {
        for i in 0..lq {
            let visible = if causal { (i + 1).min(lk) } else { lk };
            let s: Vec<f64> = (0..visible)
                .map(|j| {
                    (0..d).map(|p| q.data[(bh * lq + i) * d + p] * k.data[(bh * lk + j) * d + p]).sum::<f64>() * scale
                })
                .collect();
            let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            out.data[bh * lq + i] = m + s.iter().map(|v| (v - m).exp()).sum::<f64>().ln();
        }
    }
    out
}

pub fn upsample2x(x: &T64) -> T64 {
    let r = x.shape.len();
    let mut s = x.shape.clone();
    s[r - 1] *= 2;
    s[r - 2] *= 2;
    let n: usize = s.iter().product();
    let data = (0..n)
        .map(|i| {
            let mut idx = unravel(i, &s);
            idx[r - 1] /= 2;
            idx[r - 2] /= 2;
            x.data[ravel(&idx, &x.shape)]
        })
        .collect();
    T64::new(&s, data)
}

pub fn concat(xs: &[&T64], axis: usize) -> T64 {
    let mut s = xs[0].shape.clone();
    s[axis] = xs.iter().map(|x| x.shape[axis]).sum();
    let n: usize = s.iter().product();
    let data = (0..n)
        .map(|i| {
            let mut idx = unravel(i, &s);
            let mut which = 0;
            while idx[axis] >= xs[which].shape[axis] {
                idx[axis] -= xs[which].shape[axis];
                which += 1;
            }
            xs[which].data[ravel(&idx, &xs[which].shape)]
        })
        .collect();
    T64::new(&s, data)
}

pub fn slice(x: &T64, axis: usize, start: usize, end: usize) -> T64 {
    let mut s = x.shape.clone();
    s[axis] = end - start;
    let n: usize = s.iter().product();
    let data = (0..n)
        .map(|i| {
            let mut idx = unravel(i, &s);
            idx[axis] += start;
            x.data[ravel(&idx, &x.shape)]
        })
        .collect();
    T64::new(&s, data)
}

pub fn permute(x: &T64, perm: &[usize]) -> T64 {
    let s: Vec<usize> = perm.iter().map(|&p| x.shape[p]).collect();
    let n: usize = s.iter().product();
    let data = (0..n)
        .map(|i| {
            let idx = unravel(i, &s);
            let mut src = vec![0; perm.len()];
            for (a, &p) in perm.iter().enumerate() {
                src[p] = idx[a];
            }
            x.data[ravel(&src, &x.shape)]
        })
        .collect();
    T64::new(&s, data)
}

pub fn embedding(table: &T64, ids: &T64) -> T64 {
    let d = table.shape[1];
    let mut s = ids.shape.clone();
    s.push(d);
    let data = ids.data.iter().flat_map(|&id| table.data[id as usize * d..(id as usize + 1) * d].to_vec()).collect();
    T64::new(&s, data)
}

/// The LDM timestep embedding: [cos(t f), sin(t f)], f_k = exp(-ln(max_period) k / half).
pub fn timestep_embedding(t: &T64, dim: usize, max_period: f64) -> T64 {
    let half = dim / 2;
    let mut out = T64::zeros(&[t.data.len(), dim]);
    for (b, &tv) in t.data.iter().enumerate() {
        for k in 0..half {
            let f = (-(max_period.ln()) * k as f64 / half as f64).exp();
            out.data[b * dim + k] = (tv * f).cos();
            out.data[b * dim + half + k] = (tv * f).sin();
        }
    }
    out
}

/// Sum over `axes`, keeping them as size 1.
pub fn sum_keep(x: &T64, axes: &[usize]) -> T64 {
    let s: Vec<usize> = x.shape.iter().enumerate().map(|(i, &d)| if axes.contains(&i) { 1 } else { d }).collect();
    let mut out = T64::zeros(&s);
    for i in 0..x.data.len() {
        let mut idx = unravel(i, &x.shape);
        for &a in axes {
            idx[a] = 0;
        }
        out.data[ravel(&idx, &s)] += x.data[i];
    }
    out
}

pub fn mse(a: &T64, b: &T64) -> f64 {
    a.data.iter().zip(&b.data).map(|(x, y)| (x - y).powi(2)).sum::<f64>() / a.data.len() as f64
}
