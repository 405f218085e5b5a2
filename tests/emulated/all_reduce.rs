//! The data-parallel gradient sum in the graph (issue 12): the pass that inserts all-reduce nodes over buckets of
//! gradients (in the backward after each bucket's last write with one micro-batch per update, at the start of the
//! update with several), the op itself on the CPU backend and on the CUDA executor under emulation (eagerly and
//! inside captured graphs, on the communication stream), the communicators the backends call (the rendezvous' host
//! store, ranks as threads: the emulated NCCL), and ranks as threads training what one process trains on all their
//! samples.

use crate::common;
use common::nets::{self, NetSpec};
use common::training::tiny;
use common::Rng;

use std::sync::Arc;
use std::thread;
use std::time::Duration;
use zeroconv::app::step;
use zeroconv::app::train;
use zeroconv::engine::cpu::CpuBackend;
use zeroconv::engine::device::emu::{EmuDevice, EmuOptions};
use zeroconv::engine::dist::communicator::{Communicator, ReduceBuf, StoreCommunicator, ThreadGroup};
use zeroconv::engine::dist::{Hello, Rendezvous, RendezvousListener, Timeouts, BLOB_LEN};
use zeroconv::engine::gpu::{GpuBackend, GpuProgram};
use zeroconv::engine::{Backend, HostTensor, Program};
use zeroconv::graph::optim::{
    adamw_hyper, append_accumulating_step, append_training_step_l2, update_start, AdamWConfig, UpdateRule, HYPER_INPUT,
    KEEP_INPUT,
};
use zeroconv::graph::passes::all_reduce::{accumulators_in_backward_order, insert_gradient_all_reduce, BUCKET_BYTES};
use zeroconv::graph::passes::{dump::dump, PassOptions};
use zeroconv::graph::{DType, Graph, Op, ValueId};
use zeroconv::io::config::Config;
use zeroconv::models::train_step::TrainPhase;

// ---- the pass, on the step `zeroconv train` compiles ----------------------------------------------------------------

/// The tiny config on `devices` ranks with micro-batch 1 and `global` samples per optimizer step.
fn config(devices: u32, global: u32) -> Config {
    let devices = format!("trainer.devices={devices}");
    let global = format!("model.global_batch_size={global}");
    tiny(&["model.micro_batch_size=1", "model.base_pretrain_steps=0"], &[devices.as_str(), global.as_str()])
}

/// The step `zeroconv train` builds for `cfg` (before the passes) and after the passes the config asks for.
fn train_graphs(cfg: &Config) -> (Graph, Graph) {
    let models = train::step_models(cfg).unwrap();
    let st = step::train_step(cfg, &models, TrainPhase::Control, (64, 64)).unwrap();
    let opt = step::run_passes(&st.graph, &step::pass_options(cfg, false)).unwrap();
    (st.graph, opt.graph)
}

/// The all-reduce nodes of `g`: (node index, inputs).
fn reduce_nodes(g: &Graph) -> Vec<(usize, Vec<ValueId>)> {
    (0..g.nodes.len())
        .filter(|&i| matches!(g.nodes[i].op, Op::AllReduce { .. }))
        .map(|i| (i, g.nodes[i].inputs.clone()))
        .collect()
}

/// Where the sums of a step must be.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Placed {
    /// In the backward, each right after the last accumulation into its bucket (one micro-batch per update).
    AfterLastWrite,
    /// Opening the update (several micro-batches per update).
    UpdateStart,
}

/// Checks what the update relies on: the all-reduce nodes sit where `placed` says, their buckets cover every
/// accumulator once in the order the backward writes them, each bucket is one dtype within `bucket_bytes` (or a
/// single tensor), every accumulation into a bucket comes before its sum and everything else that reads an
/// accumulator (clipping, AdamW) after every sum. Returns the buckets.
fn check_reduced(what: &str, g: &Graph, world: usize, bucket_bytes: usize, placed: Placed) -> Vec<Vec<ValueId>> {
    let start = update_start(g).unwrap_or_else(|e| panic!("{what}: {e}"));
    let reduce = reduce_nodes(g);
    assert!(!reduce.is_empty(), "{what}: no all-reduce nodes");
    let indices: Vec<usize> = reduce.iter().map(|r| r.0).collect();
    let bucket_of = |acc: ValueId| reduce.iter().position(|r| r.1.contains(&acc));
    match placed {
        Placed::UpdateStart => {
            assert_eq!(
                indices,
                (start..start + reduce.len()).collect::<Vec<_>>(),
                "{what}: the update starts with the sums"
            )
        }
        Placed::AfterLastWrite => {
            assert!(indices.iter().all(|&i| i < start), "{what}: a sum in the update");
            for (k, (i, bucket)) in reduce.iter().enumerate() {
                let last_write = (0..*i)
                    .rev()
                    .find(|&j| matches!(g.nodes[j].op, Op::AccumulateGrad) && bucket.contains(&g.nodes[j].inputs[0]))
                    .unwrap_or_else(|| panic!("{what}: sum {k} before any write into its bucket"));
                // Right after it: nothing but other sums in between.
                assert!(
                    (last_write + 1..*i).all(|j| matches!(g.nodes[j].op, Op::AllReduce { .. })),
                    "{what}: sum {k} (node {i}) waits past its bucket's last write (node {last_write})"
                );
            }
        }
    }
    let accumulators = accumulators_in_backward_order(g);
    let covered: Vec<ValueId> = reduce.iter().flat_map(|r| r.1.clone()).collect();
    assert_eq!(covered, accumulators, "{what}: every accumulator once, in backward order");
    let trainable = g.trainable_params().len();
    assert_eq!(accumulators.len(), trainable, "{what}: one accumulator per trainable parameter");
    for (i, bucket) in &reduce {
        let Op::AllReduce { tensors, world_size } = g.nodes[*i].op else { unreachable!() };
        assert_eq!((tensors, world_size), (bucket.len(), world), "{what}: node {i}");
        let bytes: usize = bucket.iter().map(|&v| g.value(v).bytes()).sum();
        assert!(bucket.len() == 1 || bytes <= bucket_bytes, "{what}: node {i} holds {bytes} bytes");
        assert!(bucket.iter().all(|&v| g.dtype(v) == g.dtype(bucket[0])), "{what}: node {i} mixes dtypes");
    }
    let last_reduce = *indices.last().expect("a sum");
    let mut update_readers = 0;
    for (j, node) in g.nodes.iter().enumerate() {
        if !node.inputs.iter().any(|v| accumulators.contains(v)) {
            continue;
        }
        match node.op {
            Op::AccumulateGrad => {
                let k = bucket_of(node.inputs[0]).expect("every accumulator is summed");
                assert!(j < reduce[k].0, "{what}: node {j} accumulates after the sum of its bucket");
            }
            Op::AllReduce { .. } => {}
            _ => {
                assert!(j > last_reduce, "{what}: node {j} ({}) reads a gradient before the sum", node.op.name());
                update_readers += 1;
            }
        }
    }
    // Clipping squares every accumulator, and AdamW reads what clipping scaled: all after the sums.
    assert!(update_readers >= accumulators.len(), "{what}: only {update_readers} update nodes read the gradients");
    let adamw = g.nodes.iter().position(|n| matches!(n.op, Op::AdamW { .. } | Op::MultiAdamW(_))).unwrap();
    assert!(adamw > last_reduce, "{what}: AdamW before the sum");
    reduce.into_iter().map(|r| r.1).collect()
}

/// Two ranks: one bucket of 25 MiB holds the tiny model's gradients; before and after the passes (CSE, DCE,
/// recomputation, fusion) the sum follows the last accumulation (one micro-batch per rank and update) or opens the
/// update (two), and clipping and AdamW read only summed gradients.
#[test]
fn the_step_sums_every_gradient_once_before_clipping_and_adamw() {
    for (global, placed) in [(2, Placed::AfterLastWrite), (4, Placed::UpdateStart)] {
        let cfg = config(2, global);
        assert_eq!(cfg.trainer.gradient_clip_val, Some(1.0), "the tiny config clips, so clipping is checked");
        let (built, optimised) = train_graphs(&cfg);
        for (what, g) in [("built", &built), ("optimised", &optimised)] {
            let what = format!("{what}, global batch {global}");
            let buckets = check_reduced(&what, g, 2, BUCKET_BYTES, placed);
            let bytes: usize = g.trainable_params().iter().map(|&p| g.value(p).bytes()).sum();
            assert!(bytes < BUCKET_BYTES);
            assert_eq!(buckets.len(), 1, "{what}: {bytes} bytes of gradients fit one bucket");
        }
    }
}

/// With one micro-batch per update and small buckets, the accumulations move up into the backward and each bucket's
/// sum follows its last one, so the sums overlap the rest of the backward: the first sum comes before most of the
/// backward's other nodes, and the node list is otherwise the same nodes (the same multiset, every value kept).
#[test]
fn small_buckets_sum_during_the_backward() {
    // One rank accumulating two micro-batches: the accumulating step, summed here as one micro-batch per update.
    let (one_rank, _) = train_graphs(&config(1, 2));
    let g = insert_gradient_all_reduce(&one_rank, 2, 1, 4 << 10).unwrap();
    let buckets = check_reduced("4 KiB buckets", &g, 2, 4 << 10, Placed::AfterLastWrite);
    assert!(buckets.len() > 3, "{} buckets", buckets.len());
    let first_sum = reduce_nodes(&g)[0].0;
    let backward_after = (first_sum..update_start(&g).unwrap())
        .filter(|&j| !matches!(g.nodes[j].op, Op::AccumulateGrad | Op::AllReduce { .. }))
        .count();
    let backward = one_rank.nodes.iter().filter(|n| n.phase == zeroconv::graph::Phase::Backward).count();
    assert!(backward_after * 2 > backward, "only {backward_after} of {backward} backward nodes overlap the first sum");
    let names = |g: &Graph| {
        let mut v: Vec<String> =
            g.nodes.iter().filter(|n| !matches!(n.op, Op::AllReduce { .. })).map(|n| n.op.name()).collect();
        v.sort();
        v
    };
    assert_eq!(names(&g), names(&one_rank));
    assert_eq!(g.values.len(), one_rank.values.len());
    let opt = step::run_passes(&g, &PassOptions { fusion: true, ..Default::default() }).unwrap().graph;
    check_reduced("4 KiB buckets, fused", &opt, 2, 4 << 10, Placed::AfterLastWrite);
}

/// Small buckets: many of them, each within the size (a larger gradient alone), still covering every gradient once.
#[test]
fn small_buckets_split_the_gradients_in_backward_order() {
    let (one_rank, _) = train_graphs(&config(1, 2));
    assert!(reduce_nodes(&one_rank).is_empty(), "one rank sums nothing");
    for bucket_bytes in [1usize, 4 << 10, 64 << 10] {
        let g = insert_gradient_all_reduce(&one_rank, 3, 2, bucket_bytes).unwrap();
        let buckets = check_reduced(&format!("{bucket_bytes}-byte buckets"), &g, 3, bucket_bytes, Placed::UpdateStart);
        assert!(buckets.len() > 3, "{bucket_bytes}: {} buckets", buckets.len());
        if bucket_bytes == 1 {
            assert_eq!(buckets.len(), g.trainable_params().len(), "a bucket per gradient");
        } else {
            assert!(buckets.iter().any(|b| b.len() > 1), "{bucket_bytes}: some bucket holds several gradients");
        }
        // The graph is otherwise unchanged: same values, same other nodes in the same order.
        assert_eq!(g.values.len(), one_rank.values.len());
        let others: Vec<String> =
            g.nodes.iter().filter(|n| !matches!(n.op, Op::AllReduce { .. })).map(|n| n.op.name()).collect();
        assert_eq!(others, one_rank.nodes.iter().map(|n| n.op.name()).collect::<Vec<_>>());
        step::run_passes(&g, &PassOptions { fusion: true, ..Default::default() })
            .map(|opt| check_reduced("small buckets, fused", &opt.graph, 3, bucket_bytes, Placed::UpdateStart))
            .unwrap();
    }
}

#[test]
fn one_rank_inserts_nothing_and_other_graphs_are_refused() {
    let (one_rank, _) = train_graphs(&config(1, 2));
    for micro_batches in [1, 2] {
        let same = insert_gradient_all_reduce(&one_rank, 1, micro_batches, BUCKET_BYTES).unwrap();
        assert_eq!(dump(&same), dump(&one_rank));
    }
    let twice = insert_gradient_all_reduce(&one_rank, 2, 1, BUCKET_BYTES).unwrap();
    let e = insert_gradient_all_reduce(&twice, 2, 1, BUCKET_BYTES).unwrap_err().to_string();
    assert!(e.contains("already sums"), "{e}");
    // A step without an update part of its own (the one-graph step) has nowhere to put the sums.
    let mut net = nets::build(&spec(2));
    net.g.outputs.push(net.loss);
    append_training_step_l2(&mut net.g, net.loss, &AdamWConfig::default(), None, 0.0).unwrap();
    let e = insert_gradient_all_reduce(&net.g, 2, 1, BUCKET_BYTES).unwrap_err().to_string();
    assert!(e.contains("computed by the micro-batch part"), "{e}");
}

/// The sums stage a bucket of several gradients in a buffer of a bucket (the node's scratch on the CPU backend, a
/// staging buffer of its own on the CUDA executor, where the sum runs on another stream while the arena is reused),
/// so the planned memory rises by at most one bucket over one process accumulating the same micro-batches, with the
/// sums in the backward or opening the update, and the persistent memory not at all.
#[test]
fn the_planned_peak_rises_by_at_most_one_bucket() {
    let (_, one) = train_graphs(&config(1, 2));
    let (_, two) = train_graphs(&config(2, 2));
    let (one_rank, _) = train_graphs(&config(1, 2));
    let aligned = |b: usize, a: usize| b.div_ceil(a) * a;
    let largest = |g: &Graph| {
        reduce_nodes(g).iter().map(|(_, b)| b.iter().map(|&v| g.value(v).bytes()).sum::<usize>()).max().unwrap()
    };
    let emulated = GpuBackend::<EmuDevice>::emulated(EmuOptions::default());
    let mut cases = vec![("25 MiB buckets".to_string(), two)];
    for bucket_bytes in [4 << 10, 64 << 10] {
        for micro_batches in [1, 2] {
            let g = insert_gradient_all_reduce(&one_rank, 2, micro_batches, bucket_bytes).unwrap();
            let opt = step::run_passes(&g, &step::pass_options(&config(2, 2), false)).unwrap().graph;
            cases.push((format!("{bucket_bytes}-byte buckets, {micro_batches} micro-batches"), opt));
        }
    }
    let cpu_one = CpuBackend::new(1).plan(&one).unwrap();
    let gpu_one = emulated.plan(&one).unwrap();
    for (what, g) in cases {
        let bucket = largest(&g);
        let cpu = CpuBackend::new(1).plan(&g).unwrap();
        assert!(
            cpu.arena_bytes <= cpu_one.arena_bytes + aligned(bucket, 64),
            "{what}: CPU arena {} vs {} + a bucket of {bucket}",
            cpu.arena_bytes,
            cpu_one.arena_bytes
        );
        assert_eq!(cpu.source_bytes, cpu_one.source_bytes, "{what}");
        let gpu = emulated.plan(&g).unwrap();
        let several = reduce_nodes(&g).iter().any(|(_, b)| b.len() > 1);
        assert_eq!(gpu.comm_staging > 0, several, "{what}: a staging buffer exactly when a bucket holds several");
        assert!(
            gpu.plan.arena_bytes as u64 + gpu.comm_staging
                <= gpu_one.plan.arena_bytes as u64 + aligned(bucket, 256) as u64,
            "{what}: device arena {} + staging {} vs {} + a bucket of {bucket}",
            gpu.plan.arena_bytes,
            gpu.comm_staging,
            gpu_one.plan.arena_bytes
        );
        assert_eq!(gpu.source_bytes, gpu_one.source_bytes, "{what}");
    }
}

// ---- the op on the backends -------------------------------------------------------------------------------------------

const WORLD: usize = 3;

/// What each rank contributes in `round` to accumulator `k` (of `n` elements): values whose f32 sum depends on the
/// order and precision of the additions (1e8 + 1 - 1e8 is 1 in f64, 0 in f32).
fn contribution(rank: usize, round: usize, k: usize, n: usize) -> Vec<f64> {
    let mut rng = Rng::new((rank * 100 + round * 10 + k) as u64);
    (0..n)
        .map(|i| match (i + rank) % 3 {
            0 if i % 2 == 0 => [1e8, 1.0, -1e8][rank % 3],
            _ => rng.uniform() * 10f64.powi((i % 5) as i32 - 2),
        })
        .collect()
}

/// What every rank must hold after the sum: the contributions widened to f64, added in rank order, rounded once.
fn expected(dtype: DType, round: usize, k: usize, n: usize) -> Vec<u64> {
    let parts: Vec<Vec<f64>> =
        (0..WORLD).map(|r| HostTensor::from_f64([n], dtype, &contribution(r, round, k, n)).unwrap().to_f64()).collect();
    // ((x0 + x1) + x2) in f64, written out here rather than taken from the library under test.
    let sum: Vec<f64> = (0..n).map(|i| (parts[0][i] + parts[1][i]) + parts[2][i]).collect();
    HostTensor::from_f64([n], dtype, &sum).unwrap().to_f64().iter().map(|x| x.to_bits()).collect()
}

/// State `acc0` [5] and `acc1` [3] summed in one bucket (staged through scratch), `acc2` [4] alone (in place).
fn reduce_graph(dtype: DType) -> (Graph, Vec<ValueId>) {
    let mut g = Graph::new();
    let accs: Vec<ValueId> =
        [5usize, 3, 4].iter().enumerate().map(|(k, &n)| g.state(&format!("acc{k}"), [n], dtype)).collect();
    g.add_node(Op::AllReduce { tensors: 2, world_size: WORLD }, &accs[..2]).unwrap();
    g.add_node(Op::AllReduce { tensors: 1, world_size: WORLD }, &accs[2..]).unwrap();
    (g, accs)
}

/// Runs `rounds` launches of the reduce graph on `WORLD` ranks (threads), each with its own program from `compile`;
/// checks every rank's accumulators against [`expected`], bit for bit; returns each rank's program.
fn reduce_on_ranks<P: Program + Send + 'static>(
    dtype: DType,
    rounds: usize,
    compile: impl Fn(Graph) -> P + Send + Sync + Clone + 'static,
) -> Vec<P> {
    let ranks = ThreadGroup::new(WORLD, Duration::from_secs(60));
    let handles: Vec<_> = ranks
        .into_iter()
        .map(|comm| {
            let compile = compile.clone();
            thread::spawn(move || {
                let (g, accs) = reduce_graph(dtype);
                let mut p = compile(g);
                let rank = comm.rank();
                p.set_communicator(Arc::new(comm)).unwrap();
                for round in 0..rounds {
                    for (k, &a) in accs.iter().enumerate() {
                        let n = p.graph().shape(a).numel();
                        p.upload(a, &HostTensor::from_f64([n], dtype, &contribution(rank, round, k, n)).unwrap())
                            .unwrap();
                    }
                    p.launch().unwrap_or_else(|e| panic!("rank {rank}, round {round}: {e}"));
                    for (k, &a) in accs.iter().enumerate() {
                        let got: Vec<u64> = p.download(a).unwrap().to_f64().iter().map(|x| x.to_bits()).collect();
                        assert_eq!(got, expected(dtype, round, k, got.len()), "rank {rank} round {round} acc{k}");
                    }
                }
                p
            })
        })
        .collect();
    handles.into_iter().map(|h| h.join().expect("a rank failed")).collect()
}

/// The forward check of the op on the CPU backend: f32 and f64 buckets, packed and in place, on three ranks.
#[test]
fn the_cpu_backend_sums_buckets_over_the_ranks() {
    for dtype in [DType::F32, DType::F64] {
        reduce_on_ranks(dtype, 2, |g| CpuBackend::new(1).compile(g).unwrap());
    }
}

/// The CUDA executor lowers the op to `Device::all_reduce` (a bucket of two staged through scratch with copies, a
/// single accumulator in place), and the emulated device sums across the ranks' devices through the thread group:
/// in the eager first launch and in the replays of the captured graph alike.
#[test]
fn the_emulated_device_sums_across_ranks_eagerly_and_in_captured_graphs() {
    let (g, _) = reduce_graph(DType::F32);
    let cmds = zeroconv::engine::gpu::lower_graph(&g, false).unwrap();
    let kinds: Vec<Vec<&str>> = cmds.iter().map(|c| c.iter().map(|c| c.kind()).collect()).collect();
    assert_eq!(kinds, vec![vec!["copy", "copy", "all-reduce", "copy", "copy"], vec!["all-reduce"]]);
    let programs = reduce_on_ranks(DType::F32, 3, |g| {
        GpuBackend::<EmuDevice>::emulated(EmuOptions::default()).compile(g).unwrap()
    });
    for p in &programs {
        let counts = p.device().counts();
        // Launch 1 eager, launch 2 captured then replayed, launch 3 replayed: 2 all-reduces each time.
        assert_eq!((counts.all_reduces, counts.replays), (6, 2));
    }
    // f64 accumulators are refused by the CUDA executor, naming the node.
    let e = GpuBackend::<EmuDevice>::emulated(EmuOptions::default()).compile(reduce_graph(DType::F64).0);
    let e = e.err().expect("f64 is refused").to_string();
    assert!(e.contains("node 0 (all_reduce") && e.contains("f64"), "{e}");
}

/// A step that sums over the ranks refuses to run without a communicator, or with one of another world size.
#[test]
fn a_step_runs_only_with_a_communicator_of_its_world() {
    let (g, _) = reduce_graph(DType::F32);
    let mut cpu = CpuBackend::new(1).compile(g.clone()).unwrap();
    let e = cpu.launch().unwrap_err().to_string();
    assert!(e.contains("no communicator"), "{e}");
    let mut gpu = GpuBackend::<EmuDevice>::emulated(EmuOptions::default()).compile(g).unwrap();
    let e = gpu.launch().unwrap_err().to_string();
    assert!(e.contains("no communicator"), "{e}");
    for p in [&mut cpu as &mut dyn Program, &mut gpu] {
        let two = ThreadGroup::new(2, Duration::from_secs(1)).pop().unwrap();
        let e = p.set_communicator(Arc::new(two)).unwrap_err().to_string();
        assert!(e.contains("over 3 ranks, but the communicator joins 2"), "{e}");
    }
}

#[test]
fn the_op_checks_its_bucket() {
    let mut g = Graph::new();
    let a = g.state("a", [2], DType::F32);
    let b = g.state("b", [2], DType::F64);
    let h = g.state("h", [2], DType::BF16);
    let mut err = |op: Op, ins: &[ValueId]| g.add_node(op, ins).unwrap_err().to_string();
    let e = err(Op::AllReduce { tensors: 2, world_size: 2 }, &[a, b]);
    assert!(e.contains("one type"), "{e}");
    assert!(err(Op::AllReduce { tensors: 1, world_size: 2 }, &[h]).contains("f32 or f64"));
    assert!(err(Op::AllReduce { tensors: 1, world_size: 1 }, &[a]).contains("nothing to sum"));
    assert!(err(Op::AllReduce { tensors: 2, world_size: 2 }, &[a]).contains("expects 2 inputs"));
    assert!(err(Op::AllReduce { tensors: 0, world_size: 2 }, &[]).contains("at least one"));
    let op = Op::AllReduce { tensors: 2, world_size: 4 };
    assert_eq!(op.in_place_inputs(), vec![0, 1], "it writes every accumulator of its bucket");
    assert!(op.has_side_effects(), "dead-code elimination keeps it");
}

// ---- the communicators --------------------------------------------------------------------------------------------

/// The rendezvous' host store and the thread group give the same bits: both add in rank order in f64.
#[test]
fn the_host_store_and_the_thread_group_agree_bit_for_bit() {
    let n = 7;
    let run = |comms: Vec<Arc<dyn Communicator>>| -> Vec<Vec<u64>> {
        let handles: Vec<_> = comms
            .into_iter()
            .map(|c| {
                thread::spawn(move || {
                    let mut out = Vec::new();
                    for round in 0..3 {
                        let mut x: Vec<f32> = contribution(c.rank(), round, 0, n).iter().map(|&v| v as f32).collect();
                        c.all_reduce_sum(ReduceBuf::F32(&mut x)).unwrap();
                        out.extend(x.iter().map(|v| v.to_bits() as u64));
                        let mut y = contribution(c.rank(), round, 1, n);
                        c.all_reduce_sum(ReduceBuf::F64(&mut y)).unwrap();
                        out.extend(y.iter().map(|v| v.to_bits()));
                    }
                    out
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    };
    let threads = run(ThreadGroup::new(WORLD, Duration::from_secs(60)).into_iter().map(|c| Arc::new(c) as _).collect());
    let stores = run(store_ranks(WORLD).into_iter().map(|c| Arc::new(c) as _).collect());
    assert_eq!(threads, stores);
    for r in &threads {
        assert_eq!(r, &threads[0], "every rank holds the same sums");
    }
    let want: Vec<u64> = (0..3)
        .flat_map(|round| {
            let f32s: Vec<u64> = expected(DType::F32, round, 0, n)
                .iter()
                .map(|&b| (f64::from_bits(b) as f32).to_bits() as u64)
                .collect();
            f32s.into_iter().chain(expected(DType::F64, round, 1, n))
        })
        .collect();
    assert_eq!(threads[0], want);
}

/// `world` ranks joined through a rendezvous on 127.0.0.1 (a port of their own), as communicators.
fn store_ranks(world: usize) -> Vec<StoreCommunicator> {
    let listener = RendezvousListener::bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = listener.local_addr().to_string();
    let timeouts = Timeouts { join: Duration::from_secs(20), collective: Duration::from_secs(20) };
    let hello =
        move |rank: usize| Hello { rank, world_size: world, local_rank: rank, hostname: "host0".into(), graph_hash: 7 };
    let root = thread::spawn(move || listener.serve(&hello(0), &[0u8; BLOB_LEN], timeouts).unwrap());
    let others: Vec<_> = (1..world)
        .map(|r| {
            let addr = addr.clone();
            thread::spawn(move || Rendezvous::connect(&addr, &hello(r), timeouts).unwrap())
        })
        .collect();
    let mut all = vec![root.join().unwrap()];
    all.extend(others.into_iter().map(|h| h.join().unwrap()));
    all.into_iter().map(|rv| StoreCommunicator::new(rv.store)).collect()
}

/// A rank that never arrives, one that left, and ranks that reduce different buffers: each an error naming the
/// rank or the difference, within the timeout, on every rank that waits.
#[test]
fn the_thread_group_fails_naming_the_rank_instead_of_hanging() {
    let mut ranks = ThreadGroup::new(2, Duration::from_millis(300));
    let late = ranks.pop().unwrap();
    let e = ranks[0].all_reduce_sum(ReduceBuf::F32(&mut [1.0])).unwrap_err().to_string();
    assert!(e.contains("rank 1 did not arrive within 0.3 s"), "{e}");
    assert!(late.all_reduce_sum(ReduceBuf::F32(&mut [1.0])).is_err(), "the group stays broken");

    let mut ranks = ThreadGroup::new(2, Duration::from_secs(60));
    drop(ranks.pop());
    let e = ranks[0].all_reduce_sum(ReduceBuf::F32(&mut [1.0])).unwrap_err().to_string();
    assert!(e.contains("rank 1 left the thread group"), "{e}");

    let mut ranks = ThreadGroup::new(2, Duration::from_secs(60));
    let one = ranks.pop().unwrap();
    let other = thread::spawn(move || one.all_reduce_sum(ReduceBuf::F32(&mut [1.0, 2.0])).map_err(|e| e.to_string()));
    let mine = ranks[0].all_reduce_sum(ReduceBuf::F32(&mut [1.0])).map_err(|e| e.to_string());
    let theirs = other.join().unwrap();
    for e in [mine.unwrap_err(), theirs.unwrap_err()] {
        assert!(e.contains("every rank must reduce the same buffers"), "{e}");
    }
}

// ---- ranks training together ----------------------------------------------------------------------------------------

/// Samples per micro-batch, ranks, optimizer steps, values per sample.
const MICRO: usize = 2;
const RANKS: usize = 2;
const STEPS: u64 = 3;
const SAMPLE: usize = 3 * 16;

/// One rank's step: micro-batches per update, the bucket size, and where the sums go.
#[derive(Clone, Copy, Debug)]
struct Layout {
    micro_batches: usize,
    bucket_bytes: usize,
    placed: Placed,
}

impl Layout {
    /// Samples of every rank in one optimizer step.
    fn samples(&self) -> usize {
        MICRO * self.micro_batches * RANKS
    }
}

fn spec(batch: usize) -> NetSpec {
    NetSpec { batch, in_ch: 3, ch: 8, hw: 4, blocks: 1, checkpoint: false, dtype: DType::F32 }
}

/// Clipping at a norm the gradients exceed, so the update matches one process's only if clipping read the summed
/// gradients.
fn rule() -> UpdateRule {
    UpdateRule { adamw: AdamWConfig::default(), clip: Some(0.05), l2: 0.0 }
}

/// The test net (conv, GroupNorm, attention, residuals, MSE) at `batch` samples: with `rank` = None one process's
/// one-graph step over the whole batch; with Some(layout) one rank's accumulating step that sums over the ranks as
/// the layout says. Fused.
fn built(batch: usize, rank: Option<Layout>) -> nets::OptimizedNet {
    let mut net = nets::build(&spec(batch));
    let init = nets::init_values(&net.g, &net.params, 5);
    net.g.outputs.push(net.loss);
    let r = rule();
    match rank {
        None => {
            append_training_step_l2(&mut net.g, net.loss, &r.adamw, r.clip, r.l2).unwrap();
        }
        Some(l) => {
            append_accumulating_step(&mut net.g, net.loss, &r, l.micro_batches * RANKS).unwrap();
            // The pass sums in the backward for one micro-batch per update and at the update start for several; a
            // layout of one micro-batch may ask for the latter, the placement that preceded the overlap.
            let placement = match l.placed {
                Placed::AfterLastWrite => 1,
                Placed::UpdateStart => 2,
            };
            assert!(l.micro_batches == 1 || l.placed == Placed::UpdateStart, "{l:?} is not a placement the pass makes");
            net.g = insert_gradient_all_reduce(&net.g, RANKS, placement, l.bucket_bytes).unwrap();
        }
    }
    nets::optimize(net, init, true)
}

/// Step t's samples, all ranks': `samples` of x and of target.
fn step_data(t: u64, samples: usize) -> (Vec<f64>, Vec<f64>) {
    let mut rng = Rng::new(70 + t);
    let n = samples * SAMPLE;
    (rng.vec(n), rng.vec(n))
}

fn hyper(t: u64) -> HostTensor {
    HostTensor::from_f64([3], DType::F32, &adamw_hyper(&AdamWConfig::default(), 1e-2, t)).unwrap()
}

/// Each step's losses (one per micro-batch of this rank, or one for the whole batch) and the final parameters.
type Trained = (Vec<Vec<f64>>, Vec<Vec<f64>>);

/// One process training the whole batch of every step (`samples`) in one graph; returns the step losses.
fn one_process(samples: usize) -> (Vec<f64>, Vec<Vec<f64>>) {
    let b = built(samples, None);
    let mut p = CpuBackend::new(2).compile(b.graph.clone()).unwrap();
    for (v, t) in &b.init {
        p.upload(*v, t).unwrap();
    }
    let shape = [samples, 3, 4, 4];
    let mut losses = Vec::new();
    for t in 1..=STEPS {
        let (x, y) = step_data(t, samples);
        p.upload_named(HYPER_INPUT, &hyper(t)).unwrap();
        p.upload(b.x, &HostTensor::from_f64(shape, DType::F32, &x).unwrap()).unwrap();
        p.upload(b.target, &HostTensor::from_f64(shape, DType::F32, &y).unwrap()).unwrap();
        p.launch().unwrap();
        losses.push(p.download(b.loss).unwrap().to_f64()[0]);
    }
    (losses, b.params.iter().map(|&v| p.download(v).unwrap().to_f64()).collect())
}

/// Rank `comm.rank()` of `RANKS` training its share of every step (its micro-batches, accumulated), summing the
/// ranks' gradients through `comm`.
fn rank<P: Program>(p: &mut P, b: &nets::OptimizedNet, comm: Arc<dyn Communicator>, l: Layout) -> Trained {
    let me = comm.rank();
    p.set_communicator(comm).unwrap();
    for (v, t) in &b.init {
        p.upload(*v, t).unwrap();
    }
    let n = p.graph().nodes.len();
    let update = update_start(p.graph()).unwrap();
    let per_micro = MICRO * SAMPLE;
    let mut losses = Vec::new();
    for t in 1..=STEPS {
        let (x, y) = step_data(t, l.samples());
        p.upload_named(HYPER_INPUT, &hyper(t)).unwrap();
        let mut mine = Vec::new();
        for k in 0..l.micro_batches {
            let at = (me * l.micro_batches + k) * per_micro;
            let part = |d: &[f64]| HostTensor::from_f64([MICRO, 3, 4, 4], DType::F32, &d[at..at + per_micro]).unwrap();
            p.upload(b.x, &part(&x)).unwrap();
            p.upload(b.target, &part(&y)).unwrap();
            p.upload_named(KEEP_INPUT, &HostTensor::from_f64([1], DType::F32, &[k.min(1) as f64]).unwrap()).unwrap();
            p.launch_nodes(0..update).unwrap_or_else(|e| panic!("rank {me} step {t} micro-batch {k}: {e}"));
            mine.push(p.download(b.loss).unwrap().to_f64()[0]);
        }
        p.launch_nodes(update..n).unwrap_or_else(|e| panic!("rank {me} step {t}: {e}"));
        losses.push(mine);
    }
    (losses, b.params.iter().map(|&v| p.download(v).unwrap().to_f64()).collect())
}

/// What `RANKS` ranks trained: the step losses averaged over every rank's micro-batches, each rank's final
/// parameters, and each rank's program.
struct RanksTrained<P> {
    losses: Vec<f64>,
    params: Vec<Vec<Vec<f64>>>,
    programs: Vec<P>,
}

/// `RANKS` ranks as threads, each compiling its own program with `compile` and training through a thread group.
fn ranks<P: Program + Send + 'static>(
    l: Layout,
    compile: impl Fn(Graph) -> P + Send + Sync + Clone + 'static,
) -> RanksTrained<P> {
    let handles: Vec<_> = ThreadGroup::new(RANKS, Duration::from_secs(300))
        .into_iter()
        .map(|comm| {
            let compile = compile.clone();
            thread::spawn(move || {
                let b = built(MICRO, Some(l));
                let mut p = compile(b.graph.clone());
                let trained = rank(&mut p, &b, Arc::new(comm), l);
                (trained, p)
            })
        })
        .collect();
    let results: Vec<(Trained, P)> = handles.into_iter().map(|h| h.join().expect("a rank failed")).collect();
    let losses = (0..STEPS as usize)
        .map(|s| {
            let all: Vec<f64> = results.iter().flat_map(|((l, _), _)| l[s].clone()).collect();
            all.iter().sum::<f64>() / all.len() as f64
        })
        .collect();
    let mut out = RanksTrained { losses, params: Vec::new(), programs: Vec::new() };
    for ((_, p), prog) in results {
        out.params.push(p);
        out.programs.push(prog);
    }
    for params in &out.params {
        assert_eq!(params, &out.params[0], "{l:?}: every rank applies the same update");
    }
    out
}

fn assert_same_training(what: &str, (la, pa): (&[f64], &[Vec<f64>]), (lb, pb): (&[f64], &[Vec<f64>])) {
    common::assert_close(&format!("{what}: losses"), la, lb, 1e-5);
    for (i, (a, b)) in pa.iter().zip(pb).enumerate() {
        // AdamW moves each weight by about ±lr; f32 sums in another order differ by rounding only.
        common::assert_close(&format!("{what}: parameter {i}"), a, b, 1e-4);
    }
}

fn emulated(g: Graph) -> GpuProgram<EmuDevice> {
    GpuBackend::<EmuDevice>::emulated(EmuOptions::default()).compile(g).unwrap()
}

/// Every program ran each sum once per step (eagerly at step 1, replayed in its captured range after), the
/// replays and the staging buffer as its buckets need.
fn check_sums_ran(what: &str, programs: &[GpuProgram<EmuDevice>]) {
    for p in programs {
        let c = p.device().counts();
        let buckets = reduce_nodes(p.graph());
        assert_eq!(c.all_reduces, STEPS * buckets.len() as u64, "{what}");
        assert!(c.replays >= 2, "{what}: {c:?}");
        assert_eq!(p.comm_staging().bytes > 0, buckets.iter().any(|(_, b)| b.len() > 1), "{what}");
    }
}

/// Two ranks of the CUDA executor on emulated devices, each accumulating two micro-batches and summing through the
/// emulated NCCL at the start of the update (inside the captured update graph from step 2 on), train what one process
/// trains on both ranks' samples, and what two CPU ranks train; every rank ends with the same weights. Small buckets
/// too, so buckets staged through the staging buffer are exercised.
#[test]
fn two_emulated_ranks_train_what_one_process_trains() {
    let (one_losses, one_params) = one_process(MICRO * 2 * RANKS);
    for bucket_bytes in [BUCKET_BYTES, 512] {
        let l = Layout { micro_batches: 2, bucket_bytes, placed: Placed::UpdateStart };
        let what = format!("{bucket_bytes}-byte buckets");
        let cpu = ranks(l, |g| CpuBackend::new(1).compile(g).unwrap());
        let emu = ranks(l, emulated);
        assert_same_training(&format!("{what}: cpu ranks"), (&cpu.losses, &cpu.params[0]), (&one_losses, &one_params));
        let emu_vs = |other: &[f64], other_params: &[Vec<f64>], vs: &str| {
            assert_same_training(
                &format!("{what}: emulated vs {vs}"),
                (&emu.losses, &emu.params[0]),
                (other, other_params),
            )
        };
        emu_vs(&one_losses, &one_params, "one process");
        emu_vs(&cpu.losses, &cpu.params[0], "cpu ranks");
        check_sums_ran(&what, &emu.programs);
    }
}

/// One micro-batch per rank and update: each bucket's sum runs in the backward right after its last gradient (on
/// the emulated device's communication stream, overlapping the rest of the backward, with its race checks), eagerly
/// at step 1 and in the captured micro-batch graph after. Two emulated ranks and two CPU ranks train what one process
/// trains, and bit for bit what they train with the sums at the start of the update.
#[test]
fn sums_in_the_backward_train_what_sums_at_the_update_train() {
    let (one_losses, one_params) = one_process(MICRO * RANKS);
    for bucket_bytes in [BUCKET_BYTES, 512] {
        let what = format!("{bucket_bytes}-byte buckets");
        let layout = |placed| Layout { micro_batches: 1, bucket_bytes, placed };
        let overlapped = layout(Placed::AfterLastWrite);
        let emu = ranks(overlapped, emulated);
        for p in &emu.programs {
            check_reduced(&what, p.graph(), RANKS, bucket_bytes, Placed::AfterLastWrite);
        }
        check_sums_ran(&what, &emu.programs);
        assert_same_training(
            &format!("{what}: emulated ranks"),
            (&emu.losses, &emu.params[0]),
            (&one_losses, &one_params),
        );
        let before = ranks(layout(Placed::UpdateStart), emulated);
        assert_eq!(emu.params, before.params, "{what}: emulated ranks, same bits as summing at the update");
        assert_eq!(emu.losses, before.losses, "{what}");
        let cpu = ranks(overlapped, |g| CpuBackend::new(1).compile(g).unwrap());
        let cpu_before = ranks(layout(Placed::UpdateStart), |g| CpuBackend::new(1).compile(g).unwrap());
        assert_eq!(cpu.params, cpu_before.params, "{what}: CPU ranks, same bits as summing at the update");
        assert_same_training(
            &format!("{what}: emulated vs cpu ranks"),
            (&emu.losses, &emu.params[0]),
            (&cpu.losses, &cpu.params[0]),
        );
    }
}
