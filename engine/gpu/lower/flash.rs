//! Attention on the flash kernels (kernels/flash_attention.cu, kernels/flash_attention_bwd.cu), when the backend
//! asks for them ([`super::Ctx::flash_attention`]) and the node fits them; the composite path
//! ([`Emit::attention`](super::Emit)) otherwise.
//!
//! The kernels store bf16 or f16 only (f32 accumulation), for head dims 16, 32, 40, 64, 80, 128 and 160 with v's head dim
//! equal to q's. f32 attention keeps the composite path even with flash on: its tolerance is f32's, and the kernels'
//! probabilities are rounded to the storage type once (bf16's tolerance), so running f32 through them would silently
//! lower the precision the config asked for.
//!
//! The backward reads what the forward kernel wrote: O and the row log-sum-exp. With flash on, the executor rewrites
//! the graph it compiles ([`carry_lse`], graph::passes::attention_lse) so that each attention forward whose backward
//! runs here has the log-sum-exp as a second output ([B, H, Lq], f32) and the backward takes O and it as inputs: no
//! forward runs again in the backward, whose scratch is delta alone (B·H·Lq floats), and the memory plan sees O and
//! the log-sum-exp live from the forward to the backward (under activation recomputation, from the recomputed
//! forward). The CPU backend never sees the rewrite; it computes the same log-sum-exp from its softmax when a graph
//! asks for it. A backward with no forward in the graph to read them from keeps the composite path.

use super::{module, suffix, warp_rows, Attn, Emit};
use crate::engine::device::{Arg, DevPtr, LaunchDims};
use crate::error::Result;
use crate::graph::passes::attention_lse::carry_attention_lse;
use crate::graph::{DType, Graph, NodeId};

/// Head dims the kernels are instantiated for.
pub const HEAD_DIMS: [u64; 7] = [16, 32, 40, 64, 80, 128, 160];
/// Rows (queries or keys) per block of every flash kernel.
const TILE: u64 = 64;
/// Threads per block of the tiled kernels (four warps of 16 rows).
const THREADS: u32 = 128;
/// The largest grid y (heads per launch).
const MAX_GRID_Y: u64 = 65535;

fn pad16(d: u64) -> u64 {
    d.div_ceil(16) * 16
}

/// Dynamic shared memory of the forward: Q, K and V tiles of 64 rows of pad16(D) + 8 16-bit elements.
pub fn forward_shared_bytes(d: u64) -> u32 {
    (3 * TILE * (pad16(d) + 8) * 2) as u32
}

/// Of the dK/dV and dQ kernels: four such tiles and two f32 rows of 64.
pub fn backward_shared_bytes(d: u64) -> u32 {
    (4 * TILE * (pad16(d) + 8) * 2 + 2 * TILE * 4) as u32
}

/// Whether an attention with these storage type and shapes runs on the flash kernels.
pub fn fits(dtype: DType, q_head_dim: u64, v_head_dim: u64, lq: u64, lk: u64, heads: u64) -> bool {
    matches!(dtype, DType::BF16 | DType::F16)
        && HEAD_DIMS.contains(&q_head_dim)
        && v_head_dim == q_head_dim
        && lq >= 1
        && lk >= 1
        && heads >= 1
}

/// `graph` with the log-sum-exp carried from each attention forward to its backward wherever that backward runs on
/// the flash kernels ([`crate::graph::passes::attention_lse`]): the executor's rewrite when flash is on. Value and
/// node ids are unchanged.
pub fn carry_lse(graph: &Graph) -> Result<Graph> {
    let on_flash = |g: &Graph, b: NodeId| {
        let n = &g.nodes[b];
        let dtype = g.dtype(n.inputs[0]);
        let dims = |i: usize| g.shape(n.inputs[i]).dims().iter().map(|&x| x as u64).collect::<Vec<_>>();
        let (q, k, v) = (dims(0), dims(1), dims(2));
        n.inputs.iter().chain(&n.outputs).all(|&x| g.dtype(x) == dtype)
            && fits(dtype, q[3], v[3], q[2], k[2], q[0] * q[1])
    };
    Ok(carry_attention_lse(graph, &on_flash)?.0)
}

/// The shapes of one attention node: heads (B·H), query and key lengths, head dim.
#[derive(Clone, Copy)]
struct Dims {
    heads: u64,
    lq: u64,
    lk: u64,
    d: u64,
}

impl Emit<'_, '_> {
    /// Lowers the node to the flash kernels when flash is on and the node fits them; false leaves it to the
    /// composite path. The backward runs on them only in the `lse` form, which reads the forward's O and
    /// log-sum-exp; the plain form (no forward in the graph to pair it with: see [`carry_lse`]) is the composite's.
    pub(super) fn flash_attention(&mut self, a: Attn) -> Result<bool> {
        if !self.ctx.flash_attention || (a.backward && !a.lse) {
            return Ok(false);
        }
        let dtype = self.attention_dtype(a)?;
        let (q, v) = (self.in_shape(0).dims().to_vec(), self.in_shape(2).dims().to_vec());
        let k = self.in_shape(1).dims().to_vec();
        let dims = Dims { heads: (q[0] * q[1]) as u64, lq: q[2] as u64, lk: k[2] as u64, d: q[3] as u64 };
        if !fits(dtype, dims.d, v[3] as u64, dims.lq, dims.lk, dims.heads) {
            return Ok(false);
        }
        let sfx = suffix("attention", dtype)?;
        let es = dtype.size() as u64;
        let (scale, causal) = (a.scale, a.causal);
        if a.backward {
            // Inputs q, k, v, o, lse, dout: delta = rowsum(dO ∘ O) first, then dK and dV, dQ.
            let (o, lse, dout) = (self.in_ptr(3), self.in_ptr(4), self.in_ptr(5));
            let delta = self.scratch(dims.heads * dims.lq * 4).ptr;
            let rows = dims.heads * dims.lq;
            let args = vec![Arg::Ptr(o), Arg::Ptr(dout), Arg::Ptr(delta), Arg::u64(rows), Arg::u64(dims.d)];
            // One warp per row, grid-stride: any grid gives the same result.
            self.launch(module::FLASH_BWD, format!("flash_attn_bwd_delta_{sfx}"), warp_rows(rows), args, true);
            let (dq, dk, dv) = (self.out_ptr(0), self.out_ptr(1), self.out_ptr(2));
            self.flash_backward(sfx, es, dims, (scale, causal), [dout, lse, delta], [dq, dk, dv]);
        } else {
            // The graph's log-sum-exp when the node carries it, else scratch that dies with the node.
            let lse = if a.lse { self.out_ptr(1) } else { self.scratch(dims.heads * dims.lq * 4).ptr };
            let o = self.out_ptr(0);
            self.flash_forward(sfx, es, dims, scale, causal, o, lse);
        }
        Ok(true)
    }

    /// Launches over heads in chunks of at most 65535 (the grid's y limit), each with pointers offset to its first
    /// head: `each(first head, heads)`.
    fn per_head_chunk(&mut self, heads: u64, mut each: impl FnMut(&mut Self, u64, u64)) {
        let mut h0 = 0;
        while h0 < heads {
            let n = MAX_GRID_Y.min(heads - h0);
            each(self, h0, n);
            h0 += n;
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn flash_forward(&mut self, sfx: &str, es: u64, x: Dims, scale: f32, causal: bool, o: DevPtr, lse: DevPtr) {
        let (q, k, v) = (self.in_ptr(0), self.in_ptr(1), self.in_ptr(2));
        let name = format!("flash_attn_fwd_{sfx}_d{}", x.d);
        self.per_head_chunk(x.heads, |e, h0, n| {
            let args = vec![
                Arg::Ptr(q.offset(h0 * x.lq * x.d * es)),
                Arg::Ptr(k.offset(h0 * x.lk * x.d * es)),
                Arg::Ptr(v.offset(h0 * x.lk * x.d * es)),
                Arg::Ptr(o.offset(h0 * x.lq * x.d * es)),
                Arg::Ptr(lse.offset(h0 * x.lq * 4)),
                Arg::u64(x.lq),
                Arg::u64(x.lk),
                Arg::f32(scale),
                Arg::i32(causal as i32),
            ];
            let dims = tiled(x.lq, n, forward_shared_bytes(x.d));
            e.launch(module::FLASH, name.clone(), dims, args, false);
        });
    }

    /// dK and dV (one block per 64 keys), then dQ (one block per 64 queries); `reads` is [dout, lse, delta] and
    /// `grads` [dq, dk, dv].
    fn flash_backward(
        &mut self,
        sfx: &str,
        es: u64,
        x: Dims,
        (scale, causal): (f32, bool),
        reads: [DevPtr; 3],
        grads: [DevPtr; 3],
    ) {
        let (q, k, v) = (self.in_ptr(0), self.in_ptr(1), self.in_ptr(2));
        let [dout, lse, delta] = reads;
        let stats = [lse, delta];
        let smem = backward_shared_bytes(x.d);
        let (dkdv, dq_name) =
            (format!("flash_attn_bwd_dkdv_{sfx}_d{}", x.d), format!("flash_attn_bwd_dq_{sfx}_d{}", x.d));
        self.per_head_chunk(x.heads, |e, h0, n| {
            let (qo, ko) = (h0 * x.lq * x.d * es, h0 * x.lk * x.d * es);
            let common = vec![
                Arg::Ptr(q.offset(qo)),
                Arg::Ptr(k.offset(ko)),
                Arg::Ptr(v.offset(ko)),
                Arg::Ptr(dout.offset(qo)),
                Arg::Ptr(stats[0].offset(h0 * x.lq * 4)),
                Arg::Ptr(stats[1].offset(h0 * x.lq * 4)),
            ];
            let tail = [Arg::u64(x.lq), Arg::u64(x.lk), Arg::f32(scale), Arg::i32(causal as i32)];
            let mut args = common.clone();
            args.extend([Arg::Ptr(grads[1].offset(ko)), Arg::Ptr(grads[2].offset(ko))]);
            args.extend(tail.iter().cloned());
            e.launch(module::FLASH_BWD, dkdv.clone(), tiled(x.lk, n, smem), args, false);
            let mut args = common;
            args.push(Arg::Ptr(grads[0].offset(qo)));
            args.extend(tail);
            e.launch(module::FLASH_BWD, dq_name.clone(), tiled(x.lq, n, smem), args, false);
        });
    }
}

/// Grid (ceil(rows / 64), heads), 128 threads, `shared` bytes of dynamic shared memory: one block per 64 rows of
/// one head. Not grid-stride: every block owns its rows.
fn tiled(rows: u64, heads: u64, shared: u32) -> LaunchDims {
    LaunchDims { grid: [rows.div_ceil(TILE) as u32, heads as u32, 1], block: [THREADS, 1, 1], shared_bytes: shared }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The sizes the kernels check (`dynamic_smem_bytes() < ...` traps) and BENCHMARKS.md's ptxas table lists.
    #[test]
    fn shared_memory_matches_the_kernels() {
        assert_eq!(forward_shared_bytes(40), 3 * 64 * 56 * 2);
        assert_eq!(forward_shared_bytes(160), 64512);
        assert_eq!(backward_shared_bytes(40), 29184);
        assert_eq!(backward_shared_bytes(128), 70144);
        assert_eq!(backward_shared_bytes(160), 86528);
    }

    #[test]
    fn only_half_storage_and_the_instantiated_head_dims_fit() {
        for d in HEAD_DIMS {
            assert!(fits(DType::BF16, d, d, 77, 77, 8) && fits(DType::F16, d, d, 1, 1, 1));
            assert!(!fits(DType::F32, d, d, 77, 77, 8));
        }
        assert!(!fits(DType::BF16, 24, 24, 77, 77, 8));
        assert!(!fits(DType::BF16, 64, 40, 77, 77, 8));
        assert!(!fits(DType::BF16, 64, 64, 0, 77, 8));
    }
}
