//! Every op: the forward against a naive f64 reference (in f64 and in f32, on odd sizes and
//! broadcasts), and the backward against central finite differences in f64.

use crate::common;
use common::reference as r;
use common::*;
use zeroconv::graph::{BinaryOp, DType, F64Bits, Graph, Layout, Op, UnaryOp, ValueId};
use zeroconv::Result;

/// Forward in f64 and f32 against `reference`, then a gradient check of every `Arg::Float`.
fn check(
    name: &str,
    args: Vec<Arg>,
    build: impl Fn(&mut Graph, &[ValueId]) -> Result<ValueId>,
    reference: impl Fn(&[T64]) -> T64,
) {
    let mut rng = Rng::new(name.bytes().fold(7u64, |h, b| h.wrapping_mul(31).wrapping_add(b as u64)));
    let vals = random_args(&args, &mut rng);
    let want = reference(&vals);
    let got64 = forward(&build, &args, &vals, DType::F64);
    assert_eq!(got64.shape, want.shape, "{name}: output shape");
    assert_close(&format!("{name} f64"), &got64.data, &want.data, 1e-12);
    let got32 = forward(&build, &args, &vals, DType::F32);
    assert_close(&format!("{name} f32"), &got32.data, &want.data, 3e-5);
    if args.iter().any(|a| matches!(a, Arg::Float(_))) {
        grad_check(name, &build, &args, &vals, 1e-5);
    }
}

fn f(s: &[usize]) -> Arg {
    Arg::Float(s.to_vec())
}

#[test]
fn unary_ops() {
    let positive = |g: &mut Graph, x: ValueId| g.affine(x, 0.5, 1.5); // into [1, 2]
    for u in UnaryOp::ALL {
        let needs_positive = matches!(u, UnaryOp::Log | UnaryOp::Sqrt | UnaryOp::Recip);
        let reference = move |a: &[T64]| {
            let x = if needs_positive { r::map(&a[0], |v| 0.5 * v + 1.5) } else { a[0].clone() };
            r::map(&x, |v| match u {
                UnaryOp::Neg => -v,
                UnaryOp::Exp => v.exp(),
                UnaryOp::Log => v.ln(),
                UnaryOp::Sqrt => v.sqrt(),
                UnaryOp::Square => v * v,
                UnaryOp::Recip => 1.0 / v,
                UnaryOp::Silu => v * r::sigmoid(v),
                UnaryOp::GeluErf => 0.5 * v * (1.0 + r::erf(v / 2f64.sqrt())),
                UnaryOp::GeluTanh => {
                    0.5 * v * (1.0 + ((2.0 / std::f64::consts::PI).sqrt() * (v + 0.044715 * v.powi(3))).tanh())
                }
                UnaryOp::QuickGelu => v * r::sigmoid(1.702 * v),
                UnaryOp::Relu => v.max(0.0),
            })
        };
        check(
            &format!("{u:?}"),
            vec![f(&[3, 5, 7])],
            move |g, a| {
                let x = if needs_positive { positive(g, a[0])? } else { a[0] };
                g.unary(u, x)
            },
            reference,
        );
    }
}

#[test]
fn binary_ops_with_broadcasting() {
    let shapes: [(&[usize], &[usize]); 5] =
        [(&[3, 4, 5], &[3, 4, 5]), (&[2, 3, 4, 5], &[3, 1, 5]), (&[4, 1], &[3]), (&[], &[2, 3]), (&[2, 1, 6], &[5, 1])];
    for b in BinaryOp::ALL {
        for (sa, sb) in shapes {
            // Keep divisors away from zero: y -> 0.5 y + 2.
            let build = move |g: &mut Graph, a: &[ValueId]| {
                let y = if b == BinaryOp::Div { g.affine(a[1], 0.5, 2.0)? } else { a[1] };
                g.binary(b, a[0], y)
            };
            let reference = move |a: &[T64]| {
                let y = if b == BinaryOp::Div { r::map(&a[1], |v| 0.5 * v + 2.0) } else { a[1].clone() };
                r::broadcast(&a[0], &y, |p, q| match b {
                    BinaryOp::Add => p + q,
                    BinaryOp::Sub => p - q,
                    BinaryOp::Mul => p * q,
                    BinaryOp::Div => p / q,
                })
            };
            check(&format!("{b:?} {sa:?} {sb:?}"), vec![f(sa), f(sb)], build, reference);
        }
    }
}

#[test]
fn affine() {
    check("affine", vec![f(&[17])], |g, a| g.affine(a[0], -1.5, 0.25), |a| r::map(&a[0], |v| -1.5 * v + 0.25));
}

#[test]
fn matmul_every_transpose_and_batch_layout() {
    for ta in [false, true] {
        for tb in [false, true] {
            let (m, k, n) = (5, 7, 3);
            let sa = |b: &[usize]| {
                let mut s = b.to_vec();
                s.extend(if ta { [k, m] } else { [m, k] });
                s
            };
            let sb = |b: &[usize]| {
                let mut s = b.to_vec();
                s.extend(if tb { [n, k] } else { [k, n] });
                s
            };
            for (ba, bb) in [(vec![], vec![]), (vec![2, 3], vec![2, 3]), (vec![4], vec![]), (vec![], vec![4])] {
                check(
                    &format!("matmul ta={ta} tb={tb} {ba:?}x{bb:?}"),
                    vec![f(&sa(&ba)), f(&sb(&bb))],
                    move |g, a| g.matmul_t(a[0], a[1], ta, tb),
                    move |a| r::matmul(&a[0], &a[1], ta, tb),
                );
            }
        }
    }
}

#[test]
fn linear() {
    check(
        "linear",
        vec![f(&[2, 3, 6]), f(&[5, 6]), f(&[5])],
        |g, a| g.linear(a[0], a[1], Some(a[2])),
        |a| {
            let y = r::matmul(&a[0], &a[1], false, true);
            r::broadcast(&y, &a[2], |p, q| p + q)
        },
    );
}

#[test]
fn conv2d_strides_padding_bias() {
    for (n, c, h, w, o, k, stride, pad, bias) in [
        (2, 3, 7, 6, 4, 3, 1, 1, true),
        (1, 2, 9, 7, 3, 3, 2, 1, true),
        (2, 5, 5, 4, 3, 1, 1, 0, false),
        (1, 3, 8, 9, 2, 3, 2, 0, false),
        (1, 1, 5, 5, 1, 3, 1, 1, true),
    ] {
        let mut args = vec![f(&[n, c, h, w]), f(&[o, c, k, k])];
        if bias {
            args.push(f(&[o]));
        }
        check(
            &format!("conv2d n{n} c{c} {h}x{w} o{o} k{k} s{stride} p{pad} bias={bias}"),
            args,
            move |g, a| g.conv2d(a[0], a[1], a.get(2).copied(), stride, pad),
            move |a| r::conv2d(&a[0], &a[1], a.get(2), stride, pad),
        );
    }
}

/// The channels-last convolution (x [N, H, W, C], w [O, kh, kw, C]) against the planar reference on the permuted
/// operands; its gradients (the channels-last backward-input, backward-weight and bias sum) by finite differences.
/// Stride-1 backward-inputs run as forward convolutions of dy with the flipped filter, strided ones as a product and
/// a scatter-add. The last case gathers more rows than one block holds (64 channels x 9 taps x 512 pixels), so the
/// products and the weight gradient's sum run over several blocks.
#[test]
fn conv2d_channels_last() {
    for (n, c, h, w, o, k, stride, pad, bias) in [
        (2, 3, 7, 6, 4, 3, 1, 1, true),
        (1, 2, 9, 7, 3, 3, 2, 1, true),
        (2, 5, 5, 4, 3, 1, 1, 0, true),
        (1, 3, 8, 9, 2, 3, 2, 0, false),
        (1, 4, 6, 6, 3, 1, 2, 0, false),
        (1, 3, 6, 5, 2, 3, 1, 0, true),
        (2, 64, 16, 16, 2, 3, 1, 1, false),
    ] {
        let mut args = vec![f(&[n, h, w, c]), f(&[o, k, k, c])];
        if bias {
            args.push(f(&[o]));
        }
        check(
            &format!("conv2d channels last n{n} c{c} {h}x{w} o{o} k{k} s{stride} p{pad} bias={bias}"),
            args,
            move |g, a| g.op1(Op::Conv2d { stride, padding: pad, layout: Layout::Nhwc }, a),
            move |a| {
                let (x, wt) = (r::permute(&a[0], &Layout::from_last(4)), r::permute(&a[1], &Layout::from_last(4)));
                r::permute(&r::conv2d(&x, &wt, a.get(2), stride, pad), &Layout::to_last(4))
            },
        );
    }
}

/// GroupNorm over the last axis (channels last) against the planar reference on the permuted input.
#[test]
fn group_norm_channels_last() {
    for (planar, groups) in [(vec![2, 6, 3, 5], 3), (vec![1, 4, 2, 2], 4), (vec![2, 8, 4, 4], 2)] {
        let c = planar[1];
        let x: Vec<usize> = Layout::to_last(4).iter().map(|&a| planar[a]).collect();
        check(
            &format!("groupnorm channels last {x:?} g{groups}"),
            vec![f(&x), f(&[c]), f(&[c])],
            move |g, a| g.op1(Op::GroupNorm { groups, eps: F64Bits::new(1e-5), layout: Layout::Nhwc }, a),
            move |a| {
                let y = r::group_norm(&r::permute(&a[0], &Layout::from_last(4)), &a[1], &a[2], groups, 1e-5);
                r::permute(&y, &Layout::to_last(4))
            },
        );
    }
}

#[test]
fn group_norm() {
    for (shape, groups) in [(vec![2, 6, 3, 5], 3), (vec![2, 4, 7], 2), (vec![1, 4, 2, 2], 4)] {
        let c = shape[1];
        check(
            &format!("groupnorm {shape:?} g{groups}"),
            vec![f(&shape), f(&[c]), f(&[c])],
            move |g, a| g.group_norm(a[0], a[1], a[2], groups, 1e-5),
            move |a| r::group_norm(&a[0], &a[1], &a[2], groups, 1e-5),
        );
    }
}

#[test]
fn layer_norm() {
    check(
        "layernorm",
        vec![f(&[3, 4, 7]), f(&[7]), f(&[7])],
        |g, a| g.layer_norm(a[0], a[1], a[2], 1e-5),
        |a| r::layer_norm(&a[0], &a[1], &a[2], 1e-5),
    );
    // More rows than LayerNorm's partial-sum blocks.
    check(
        "layernorm many rows",
        vec![f(&[37, 5]), f(&[5]), f(&[5])],
        |g, a| g.layer_norm(a[0], a[1], a[2], 1e-6),
        |a| r::layer_norm(&a[0], &a[1], &a[2], 1e-6),
    );
}

#[test]
fn softmax() {
    check("softmax", vec![f(&[3, 5, 9])], |g, a| g.softmax(a[0]), |a| r::softmax(&a[0]));
}

#[test]
fn attention() {
    for (q, k, v, causal) in [
        (vec![2, 2, 5, 4], vec![2, 2, 7, 4], vec![2, 2, 7, 3], false),
        (vec![1, 3, 6, 4], vec![1, 3, 6, 4], vec![1, 3, 6, 4], true),
        // More queries than one attention block, so blocking is exercised.
        (vec![1, 1, 70, 3], vec![1, 1, 9, 3], vec![1, 1, 9, 2], false),
    ] {
        let scale = 1.0 / (q[3] as f64).sqrt();
        check(
            &format!("attention {q:?} {k:?} causal={causal}"),
            vec![f(&q), f(&k), f(&v)],
            move |g, a| g.attention(a[0], a[1], a[2], scale, causal),
            move |a| r::attention(&a[0], &a[1], &a[2], scale, causal),
        );
    }
}

/// Attention with its log-sum-exp output (`Op::Attention { lse: true }`, the form the flash path uses): O through
/// the checks above (its gradients then come from the `lse` form of the backward), and the log-sum-exp against f64
/// in f64 and f32. It has no gradient of its own (tests/graph_cpu/attention_lse.rs checks the error).
#[test]
fn attention_with_lse() {
    for (q, k, v, causal) in [
        (vec![2, 2, 5, 4], vec![2, 2, 7, 4], vec![2, 2, 7, 3], false),
        (vec![1, 3, 6, 4], vec![1, 3, 6, 4], vec![1, 3, 6, 4], true),
        // Lq > Lk with causal: the rows past the last key see every key.
        (vec![1, 2, 9, 3], vec![1, 2, 4, 3], vec![1, 2, 4, 5], true),
        // More queries than one attention block, so blocking is exercised.
        (vec![1, 1, 70, 3], vec![1, 1, 9, 3], vec![1, 1, 9, 2], false),
    ] {
        let scale = 1.0 / (q[3] as f64).sqrt();
        let what = format!("attention with lse {q:?} {k:?} causal={causal}");
        let args = vec![f(&q), f(&k), f(&v)];
        check(
            &format!("{what}: o"),
            args.clone(),
            move |g, a| Ok(g.attention_with_lse(a[0], a[1], a[2], scale, causal)?.0),
            move |a| r::attention(&a[0], &a[1], &a[2], scale, causal),
        );
        let lse = move |g: &mut Graph, a: &[ValueId]| Ok(g.attention_with_lse(a[0], a[1], a[2], scale, causal)?.1);
        let vals = random_args(
            &args,
            &mut Rng::new(q.iter().chain(&k).fold(3u64, |h, &x| h.wrapping_mul(31).wrapping_add(x as u64))),
        );
        let want = r::attention_lse(&vals[0], &vals[1], scale, causal);
        let got64 = forward(&lse, &args, &vals, DType::F64);
        assert_eq!(got64.shape, want.shape, "{what}: lse shape");
        assert_close(&format!("{what}: lse f64"), &got64.data, &want.data, 1e-12);
        let got32 = forward(&lse, &args, &vals, DType::F32);
        assert_close(&format!("{what}: lse f32"), &got32.data, &want.data, 3e-5);
    }
}

#[test]
fn upsample2x() {
    check("upsample2x", vec![f(&[2, 3, 4, 5])], |g, a| g.upsample2x(a[0]), |a| r::upsample2x(&a[0]));
}

#[test]
fn concat() {
    for axis in 0..3 {
        let mut s2 = vec![2, 3, 4];
        s2[axis] = 5;
        let mut s3 = vec![2, 3, 4];
        s3[axis] = 1;
        check(
            &format!("concat axis {axis}"),
            vec![f(&[2, 3, 4]), f(&s2), f(&s3)],
            move |g, a| g.concat(a, axis),
            move |a| r::concat(&[&a[0], &a[1], &a[2]], axis),
        );
    }
}

#[test]
fn slice_and_chunk() {
    check("slice", vec![f(&[3, 7, 2])], |g, a| g.slice(a[0], 1, 2, 6), |a| r::slice(&a[0], 1, 2, 6));
    check(
        "chunk then recombine",
        vec![f(&[2, 6, 5])],
        |g, a| {
            let parts = g.chunk(a[0], 3, 1)?;
            let t = g.mul(parts[0], parts[2])?;
            g.add(t, parts[1])
        },
        |a| {
            let p: Vec<T64> = (0..3).map(|i| r::slice(&a[0], 1, 2 * i, 2 * i + 2)).collect();
            let t = r::broadcast(&p[0], &p[2], |x, y| x * y);
            r::broadcast(&t, &p[1], |x, y| x + y)
        },
    );
}

/// Slices whose gradients meet side by side: autodiff joins them by a concatenation (padded when they leave part
/// of the axis untouched) instead of adding zero-padded copies; the gradients must not change.
#[test]
fn gradients_of_slices_side_by_side() {
    check(
        "geglu-like halves",
        vec![f(&[2, 3, 8])],
        |g, a| {
            let (h, gate) = (g.slice(a[0], 2, 0, 4)?, g.slice(a[0], 2, 4, 8)?);
            let act = g.unary(UnaryOp::GeluErf, gate)?;
            g.mul(h, act)
        },
        |a| {
            let (h, gate) = (r::slice(&a[0], 2, 0, 4), r::slice(&a[0], 2, 4, 8));
            let act = r::map(&gate, |v| 0.5 * v * (1.0 + r::erf(v / 2f64.sqrt())));
            r::broadcast(&h, &act, |x, y| x * y)
        },
    );
    check(
        "adjacent slices inside the axis",
        vec![f(&[3, 9])],
        |g, a| {
            let (p, q) = (g.slice(a[0], 1, 1, 4)?, g.slice(a[0], 1, 4, 7)?);
            let sq = g.mul(q, q)?;
            g.mul(p, sq)
        },
        |a| {
            let (p, q) = (r::slice(&a[0], 1, 1, 4), r::slice(&a[0], 1, 4, 7));
            let sq = r::broadcast(&q, &q, |x, y| x * y);
            r::broadcast(&p, &sq, |x, y| x * y)
        },
    );
}

#[test]
fn reshape_and_permute() {
    check(
        "reshape",
        vec![f(&[2, 3, 4])],
        |g, a| {
            let x = g.reshape(a[0], [6, 4])?;
            g.mul(x, x)
        },
        |a| {
            let x = T64::new(&[6, 4], a[0].data.clone());
            r::broadcast(&x, &x, |p, q| p * q)
        },
    );
    for perm in [vec![0, 2, 3, 1], vec![3, 1, 0, 2], vec![1, 0, 2, 3]] {
        let p2 = perm.clone();
        check(
            &format!("permute {perm:?}"),
            vec![f(&[2, 3, 4, 5])],
            move |g, a| g.permute(a[0], &perm),
            move |a| r::permute(&a[0], &p2),
        );
    }
}

#[test]
fn embedding() {
    check(
        "embedding",
        vec![f(&[11, 6]), Arg::Ids(vec![2, 5], 11)],
        |g, a| g.embedding(a[0], a[1]),
        |a| r::embedding(&a[0], &a[1]),
    );
}

#[test]
fn timestep_embedding() {
    let mut g = Graph::new();
    let t = g.input("t", [3], DType::I64);
    let y = g.timestep_embedding(t, 8, 10000.0).unwrap();
    g.outputs.push(y);
    let ts = [0.0, 17.0, 999.0];
    let out = run(g, &[(t, zeroconv::engine::HostTensor::from_f64([3], DType::I64, &ts).unwrap())], &[y]);
    let want = r::timestep_embedding(&T64::new(&[3], ts.to_vec()), 8, 10000.0);
    assert_close("timestep embedding", &out[0].to_f64(), &want.data, 1e-6);
    // cos(0) = 1 in the first half, sin(0) = 0 in the second.
    assert_eq!(&out[0].to_f64()[..8], &[1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0]);
}

#[test]
fn sums_and_means() {
    for (axes, keepdim) in [(vec![1], false), (vec![0, 2], true), (vec![0, 1, 2], false), (vec![2], true)] {
        let a2 = axes.clone();
        check(
            &format!("sum {axes:?} keepdim={keepdim}"),
            vec![f(&[3, 4, 5])],
            move |g, a| g.sum(a[0], &axes, keepdim),
            move |a| {
                let s = r::sum_keep(&a[0], &a2);
                let shape: Vec<usize> = if keepdim {
                    s.shape.clone()
                } else {
                    s.shape.iter().enumerate().filter(|(i, _)| !a2.contains(i)).map(|(_, &d)| d).collect()
                };
                T64::new(&shape, s.data)
            },
        );
    }
    check(
        "mean over axis 1",
        vec![f(&[3, 4, 5])],
        |g, a| g.mean(a[0], &[1], false),
        |a| {
            let s = r::sum_keep(&a[0], &[1]);
            T64::new(&[3, 5], s.data.iter().map(|v| v / 4.0).collect())
        },
    );
    check(
        "mean of all",
        vec![f(&[3, 4, 5])],
        |g, a| g.mean_all(a[0]),
        |a| T64::new(&[], vec![a[0].data.iter().sum::<f64>() / 60.0]),
    );
}

#[test]
fn sum_to_and_broadcast_to() {
    check(
        "sum_to",
        vec![f(&[2, 3, 4, 5])],
        |g, a| g.sum_to(a[0], [3, 1, 5]),
        |a| {
            let s = r::sum_keep(&a[0], &[0, 2]);
            T64::new(&[3, 1, 5], s.data)
        },
    );
    check(
        "broadcast_to",
        vec![f(&[3, 1, 5])],
        |g, a| g.broadcast_to(a[0], [2, 3, 4, 5]),
        |a| r::broadcast(&a[0], &T64::zeros(&[2, 3, 4, 5]), |p, _| p),
    );
}

#[test]
fn mse_loss() {
    check(
        "mse",
        vec![f(&[2, 3, 5]), f(&[2, 3, 5])],
        |g, a| g.mse_loss(a[0], a[1]),
        |a| T64::new(&[], vec![r::mse(&a[0], &a[1])]),
    );
}

#[test]
fn cast_round_trips_and_passes_gradients() {
    // Forward: f32 -> bf16 -> f32 keeps 8 bits of mantissa; f16 keeps 11.
    for (dt, tol) in [(DType::BF16, 4e-3), (DType::F16, 5e-4)] {
        let mut rng = Rng::new(3);
        let vals = T64::new(&[4, 33], rng.vec(132));
        let got = forward(
            &|g, a| {
                let h = g.cast(a[0], dt)?;
                g.cast(h, DType::F32)
            },
            &[Arg::Fixed(vec![4, 33])],
            std::slice::from_ref(&vals),
            DType::F32,
        );
        let e = max_rel_err(&got.data, &vals.data, 1e-12);
        assert!(e < tol && e > 0.0, "{dt}: round trip error {e}");
    }
    // Backward: d/dx Σ cast(cast(x, f32), f64)·R = R up to f32 rounding.
    let mut g = Graph::new();
    let x = g.param("x", [5], DType::F64, true);
    let rr = g.param("r", [5], DType::F64, false);
    let y = g.cast(x, DType::F32).unwrap();
    let y = g.cast(y, DType::F64).unwrap();
    let p = g.mul(y, rr).unwrap();
    let loss = g.sum(p, &[0], false).unwrap();
    let grads = zeroconv::graph::autodiff::backward(&mut g, loss, &[x]).unwrap();
    let dx = grads[&x];
    g.outputs.push(dx);
    let rv = [0.3, -1.2, 2.5, 0.0, 7.0];
    let out = run(
        g,
        &[
            (x, zeroconv::engine::HostTensor::from_f64([5], DType::F64, &[1.0; 5]).unwrap()),
            (rr, zeroconv::engine::HostTensor::from_f64([5], DType::F64, &rv).unwrap()),
        ],
        &[dx],
    );
    assert_close("cast gradient", &out[0].to_f64(), &rv, 1e-7);
}
