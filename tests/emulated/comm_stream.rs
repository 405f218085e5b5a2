//! The communication stream (issue 12): the emulated device's race checks between its two streams, its checks of
//! a capture that forks the communication stream, and the CUDA executor's events around the gradient sums.

use std::sync::Arc;
use std::thread;
use std::time::Duration;
use zeroconv::engine::device::emu::{EmuDevice, EmuOptions};
use zeroconv::engine::device::{Copy2d, DevPtr, Device, EventId, NodeAccess, Span, Stream};
use zeroconv::engine::dist::communicator::{Communicator, ThreadGroup};
use zeroconv::engine::gpu::GpuBackend;
use zeroconv::engine::{Backend, HostTensor, Program};
use zeroconv::graph::{DType, Graph, Op};

const FORK: EventId = EventId(0);
const DONE: EventId = EventId(1);

/// A device with a 256-byte buffer of zeros: 64 f32 the sums run over.
fn device() -> (EmuDevice, DevPtr) {
    let mut d = EmuDevice::new(EmuOptions::default());
    let buf = d.alloc(256, "gradients").unwrap();
    d.upload(buf, &[0u8; 256]).unwrap();
    (d, buf)
}

/// The communication stream sums `buf` after the compute stream's work so far, as the executor issues a sum.
fn sum_on_comm(d: &mut EmuDevice, buf: DevPtr) {
    d.record(Stream::Compute, FORK).unwrap();
    d.wait(Stream::Comm, FORK).unwrap();
    d.all_reduce(Stream::Comm, buf, 64, DType::F32, false).unwrap();
    d.record(Stream::Comm, DONE).unwrap();
}

fn copy(dst: DevPtr, src: DevPtr, bytes: u64) -> Copy2d {
    Copy2d { dst, dst_pitch: bytes, src, src_pitch: bytes, width: bytes, height: 1 }
}

/// A compute command that writes what an unfinished sum writes, with no wait between them, is an error naming
/// both; after the compute stream waits for the sum's event, the same command runs.
#[test]
fn a_missing_wait_is_a_race_naming_both_commands() {
    let (mut d, buf) = device();
    sum_on_comm(&mut d, buf);
    let e = d.memset(buf, 0, 16).unwrap_err().to_string();
    assert!(e.contains("memset of 16 bytes") && e.contains("all-reduce of 64 f32"), "{e}");
    assert!(e.contains("compute stream writes") && e.contains("comm stream") && e.contains("Device::wait"), "{e}");

    let (mut d, buf) = device();
    sum_on_comm(&mut d, buf);
    d.wait(Stream::Compute, DONE).unwrap();
    d.memset(buf, 0, 16).unwrap();
}

/// A node the executor declares (AdamW reading the gradients) races with the sum node it did not wait for; the
/// error names both nodes. Reading what the other stream only reads is no race.
#[test]
fn a_node_reading_a_gradient_under_an_unfinished_sum_is_named_with_it() {
    let (mut d, buf) = device();
    let other = d.alloc(256, "other").unwrap();
    let grads = [Span::new(buf, 256)];
    d.record(Stream::Compute, FORK).unwrap();
    d.wait(Stream::Comm, FORK).unwrap();
    let sum = NodeAccess { what: "node 4 (all_reduce)", stream: Stream::Comm, reads: &grads, writes: &grads };
    d.before_command(Span::new(other, 0), &[], &sum).unwrap();
    d.all_reduce(Stream::Comm, buf, 64, DType::F32, false).unwrap();
    d.after_command(sum.what, &grads).unwrap();
    d.record(Stream::Comm, DONE).unwrap();

    // Another compute node reading memory the sum never touches runs; so does a comm copy that only reads the
    // gradients while a compute node reads them too.
    let elsewhere = [Span::new(other, 256)];
    let unrelated = NodeAccess { what: "node 5 (mul)", stream: Stream::Compute, reads: &elsewhere, writes: &[] };
    d.before_command(Span::new(other, 0), &[], &unrelated).unwrap();
    d.after_command(unrelated.what, &[]).unwrap();

    let adamw = NodeAccess { what: "node 9 (adamw)", stream: Stream::Compute, reads: &grads, writes: &[] };
    let e = d.before_command(Span::new(other, 0), &[], &adamw).unwrap_err().to_string();
    assert!(e.contains("node 9 (adamw) on the compute stream reads 256 bytes"), "{e}");
    assert!(e.contains("node 4 (all_reduce) on the comm stream"), "{e}");

    let (mut d, buf) = device();
    let other = d.alloc(256, "other").unwrap();
    d.record(Stream::Compute, FORK).unwrap();
    d.wait(Stream::Comm, FORK).unwrap();
    d.copy2d(Stream::Comm, &copy(other, buf, 256)).unwrap();
    let reader =
        NodeAccess { what: "node 6 (sum)", stream: Stream::Compute, reads: &[Span::new(buf, 256)], writes: &[] };
    d.before_command(Span::new(other, 0), &[], &reader).unwrap();
}

/// The other direction: a sum the communication stream starts without waiting for the compute stream's last write
/// into its bucket races with that write.
#[test]
fn a_sum_that_does_not_wait_for_the_last_gradient_write_is_a_race() {
    let (mut d, buf) = device();
    d.memset(buf, 1, 256).unwrap();
    let e = d.all_reduce(Stream::Comm, buf, 64, DType::F32, false).unwrap_err().to_string();
    assert!(e.contains("all-reduce of 64 f32") && e.contains("comm stream writes"), "{e}");
    assert!(e.contains("memset of 256 bytes") && e.contains("compute stream"), "{e}");
    // Waiting on an event never recorded is refused rather than passed (CUDA would pass it, hiding the bug).
    let e = d.wait(Stream::Comm, EventId(7)).unwrap_err().to_string();
    assert!(e.contains("event 7 that was never recorded"), "{e}");
    // The host waiting for both streams finishes all work: nothing is left to race with.
    d.synchronize().unwrap();
    d.all_reduce(Stream::Comm, buf, 64, DType::F32, false).unwrap();
}

/// Inside a capture the communication stream must fork from the compute stream (else its work would run at once,
/// outside the graph) and be joined back before the capture ends (else cuStreamEndCapture fails with
/// CUDA_ERROR_STREAM_CAPTURE_UNJOINED); forked and joined, the graph replays.
#[test]
fn a_capture_forks_and_joins_the_comm_stream() {
    let (mut d, buf) = device();
    d.begin_capture().unwrap();
    let e = d.all_reduce(Stream::Comm, buf, 64, DType::F32, false).unwrap_err().to_string();
    assert!(e.contains("not part of the capture"), "{e}");
    d.end_capture().unwrap();

    d.begin_capture().unwrap();
    sum_on_comm(&mut d, buf);
    let e = d.end_capture().unwrap_err().to_string();
    assert!(e.contains("CUDA_ERROR_STREAM_CAPTURE_UNJOINED") && e.contains("all-reduce of 64 f32"), "{e}");

    d.begin_capture().unwrap();
    sum_on_comm(&mut d, buf);
    d.wait(Stream::Compute, DONE).unwrap();
    d.memset(buf, 0, 16).unwrap();
    let g = d.end_capture().unwrap();
    let before = d.counts();
    d.replay(g).unwrap();
    d.replay(g).unwrap();
    let after = d.counts();
    assert_eq!((after.all_reduces - before.all_reduces, after.compute_waits - before.compute_waits), (2, 2));
}

/// A sum and a node that reads its bucket in one launch: the executor puts the sum on the communication stream and
/// makes the reader wait for it (one wait of the compute stream, no other), eagerly and in the captured graph, on
/// two ranks.
#[test]
fn the_executor_makes_a_reader_of_a_summed_bucket_wait_for_the_sum() {
    let handles: Vec<_> = ThreadGroup::new(2, Duration::from_secs(60))
        .into_iter()
        .map(|comm| {
            thread::spawn(move || {
                let mut g = Graph::new();
                let acc = g.state("acc", [6], DType::F32);
                let other = g.state("other", [6], DType::F32);
                g.add_node(Op::AllReduce { tensors: 1, world_size: 2 }, &[acc]).unwrap();
                // A node that does not touch the bucket, then one that reads it.
                let y = g.scale(other, 3.0).unwrap();
                let z = g.scale(acc, 2.0).unwrap();
                g.outputs.extend([y, z]);
                let mut p = GpuBackend::<EmuDevice>::emulated(EmuOptions::default()).compile(g).unwrap();
                let rank = comm.rank();
                p.set_communicator(Arc::new(comm)).unwrap();
                for step in 0..3 {
                    let mine: Vec<f64> = (0..6).map(|i| (i + 10 * rank + step) as f64).collect();
                    p.upload(acc, &HostTensor::from_f64([6], DType::F32, &mine).unwrap()).unwrap();
                    p.upload(other, &HostTensor::from_f64([6], DType::F32, &mine).unwrap()).unwrap();
                    let waits = p.device().counts().compute_waits;
                    p.launch().unwrap();
                    assert_eq!(p.device().counts().compute_waits - waits, 1, "step {step}: one wait, the reader's");
                    let want: Vec<f64> = (0..6).map(|i| 2.0 * ((i + step) as f64 * 2.0 + 10.0)).collect();
                    assert_eq!(p.download(z).unwrap().to_f64(), want, "rank {rank} step {step}");
                }
                assert_eq!(p.device().counts().replays, 2);
            })
        })
        .collect();
    for h in handles {
        h.join().expect("a rank failed");
    }
}
