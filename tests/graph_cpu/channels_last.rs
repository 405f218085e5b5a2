//! The channels-last rewrite (`model.channels_last`): the rewritten step trains as the planar one does (losses and
//! parameters within rounding, with fusion and recomputation on or off), and on the ControlNet step every
//! convolution and GroupNorm runs channels last with the layout changes moved out of the way: the spatial
//! transformers' permutes vanish, and no permute feeds another.

use crate::common;
use crate::fusion::train_with;
use common::assert_close;
use common::training::tiny;
use zeroconv::app::step::{latent_step, run_passes};
use zeroconv::graph::passes::PassOptions;
use zeroconv::graph::{Graph, Layout, Op, Phase};

#[test]
fn channels_last_training_agrees_with_planar() {
    for (fusion, checkpointing) in [(false, false), (true, false), (true, true)] {
        let planar = PassOptions { checkpointing, fusion, ..Default::default() };
        let (l0, p0, _, _) = train_with(&planar);
        let (l1, p1, _, opt) = train_with(&PassOptions { channels_last: true, ..planar });
        let what = format!("fusion={fusion} checkpointing={checkpointing}");
        assert_close(&format!("losses, {what}"), &l1, &l0, 1e-5);
        for (a, b) in p1.iter().zip(&p0) {
            assert_close(&format!("parameters after 3 steps, {what}"), a, b, 1e-5);
        }
        let convs = opt.graph.nodes.iter().filter(|n| matches!(n.op, Op::Conv2d { .. })).count();
        let nhwc = opt.graph.nodes.iter().filter(|n| matches!(n.op, Op::Conv2d { layout: Layout::Nhwc, .. })).count();
        assert!(convs > 0 && nhwc == convs, "{what}: {nhwc} of {convs} convolutions run channels last");
    }
}

/// The permutes of activations in `g`, as (perm, shape of the input): not of weights or inputs, not in the update
/// (the weight gradients going back to [O, C, kh, kw] once each, for the optimizer), and not the attention's own
/// head split ([B, L, H, D] <-> [B, H, L, D]), which is the same in either layout.
fn activation_permutes(g: &Graph) -> Vec<(Vec<usize>, Vec<usize>)> {
    g.nodes
        .iter()
        .filter_map(|n| {
            let Op::Permute { perm } = &n.op else { return None };
            let x = g.value(n.inputs[0]);
            let weight_grad = n.phase == Phase::Update
                || x.producer.is_some_and(|(p, _)| matches!(g.nodes[p].op, Op::Conv2dBackwardWeight { .. }));
            let heads = perm == &[0, 2, 1, 3];
            (!x.kind.is_source() && !weight_grad && !heads).then(|| (perm.clone(), x.shape.dims().to_vec()))
        })
        .collect()
}

#[test]
fn the_controlnet_step_runs_channels_last_with_few_layout_changes() {
    let cfg = tiny(&[], &[]);
    let step = latent_step(&cfg, 2).unwrap();
    let before = activation_permutes(&step.graph);
    let opts = PassOptions { channels_last: true, ..Default::default() };
    let g = run_passes(&step.graph, &opts).unwrap().graph;
    for n in &g.nodes {
        match &n.op {
            Op::Conv2d { layout, .. }
            | Op::Conv2dBackwardInput { layout, .. }
            | Op::Conv2dBackwardWeight { layout, .. }
            | Op::GroupNorm { layout, .. }
            | Op::GroupNormBackward { layout, .. } => {
                assert_eq!(*layout, Layout::Nhwc, "{} still planar", n.op.name())
            }
            _ => {}
        }
    }
    let producers: Vec<Option<&Op>> = g
        .nodes
        .iter()
        .map(|n| g.value(n.inputs.first().copied().unwrap_or(0)).producer.map(|(p, _)| &g.nodes[p].op))
        .collect();
    for (n, producer) in g.nodes.iter().zip(&producers) {
        if matches!(n.op, Op::Permute { .. }) {
            assert!(!matches!(producer, Some(Op::Permute { .. })), "a permute feeds another: {:?}", n.op);
        }
    }
    let after = activation_permutes(&g);
    // The transformers' [N, C, HW] <-> [N, HW, C] permutes (forward and backward) are gone; what is left changes
    // the layout at the step's edges (the inputs, the target, the time embedding's [N, C, 1, 1]).
    let transformer =
        |p: &[(Vec<usize>, Vec<usize>)]| p.iter().filter(|(perm, s)| perm == &[0, 2, 1] && s.len() == 3).count();
    assert!(transformer(&before) > 0, "the planar step has transformer permutes: {before:?}");
    assert_eq!(transformer(&after), 0, "{after:?}");
    assert!(after.is_empty(), "activation permutes left: {after:?}");
}
