//! Host mirrors of the structs kernels take by value or read from device tables. Each is `#[repr(C)]` with
//! explicit padding, and bytemuck's derive proves it has no hidden padding, so its bytes are what the kernel reads.

use crate::error::{Error, Result};
use crate::graph::Shape;
use bytemuck::{Pod, Zeroable};

/// The largest rank of a strided or broadcast operand (the kernels' array size).
pub const MAX_RANK: usize = 8;

fn rank_checked(what: &str, rank: usize) -> Result<()> {
    if rank > MAX_RANK {
        return Err(Error::Unsupported { backend: "cuda", msg: format!("{what} of rank {rank} > {MAX_RANK}") });
    }
    Ok(())
}

/// Row-major element strides of `input` seen as broadcast to `out` (0 on stretched or missing axes).
fn strides_in(input: &Shape, out: &Shape) -> Vec<i64> {
    input.broadcast_strides(out).into_iter().map(|s| s as i64).collect()
}

/// `BroadcastDims` of kernels/binary.cu: 200 bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, Pod, Zeroable)]
pub struct BroadcastDims {
    pub shape: [i64; MAX_RANK],
    pub a_strides: [i64; MAX_RANK],
    pub b_strides: [i64; MAX_RANK],
    pub rank: i32,
    pub pad: i32,
}

impl BroadcastDims {
    pub fn new(out: &Shape, a: &Shape, b: &Shape) -> Result<Self> {
        rank_checked("a broadcast", out.rank())?;
        let mut d = BroadcastDims::zeroed();
        d.rank = out.rank() as i32;
        for (k, ((&n, sa), sb)) in out.dims().iter().zip(strides_in(a, out)).zip(strides_in(b, out)).enumerate() {
            d.shape[k] = n as i64;
            d.a_strides[k] = sa;
            d.b_strides[k] = sb;
        }
        Ok(d)
    }
}

/// `StridedDims` of kernels/layout.cu: 136 bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, Pod, Zeroable)]
pub struct StridedDims {
    pub shape: [i64; MAX_RANK],
    pub in_strides: [i64; MAX_RANK],
    pub rank: i32,
    pub pad: i32,
}

impl StridedDims {
    pub fn new(out: &Shape, in_strides: &[i64]) -> Result<Self> {
        rank_checked("a strided copy", out.rank())?;
        let mut d = StridedDims::zeroed();
        d.rank = out.rank() as i32;
        for (k, &n) in out.dims().iter().enumerate() {
            d.shape[k] = n as i64;
            d.in_strides[k] = in_strides[k];
        }
        Ok(d)
    }
}

/// `ZcBcast` of the generated fused kernels (kernels/codegen.rs): 136 bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, Pod, Zeroable)]
pub struct ZcBcast {
    pub rank: i32,
    pub pad: i32,
    pub dims: [i64; MAX_RANK],
    pub strides: [i64; MAX_RANK],
}

impl ZcBcast {
    pub fn new(out: &Shape, input: &Shape) -> Result<Self> {
        rank_checked("a fused broadcast input", out.rank())?;
        let mut b = ZcBcast::zeroed();
        b.rank = out.rank() as i32;
        for (k, (&n, s)) in out.dims().iter().zip(strides_in(input, out)).enumerate() {
            b.dims[k] = n as i64;
            b.strides[k] = s;
        }
        Ok(b)
    }
}

/// `AdamWTensor` of kernels/adamw.cu: 40 bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, Pod, Zeroable)]
pub struct AdamWTensor {
    pub param: u64,
    pub grad: u64,
    pub m: u64,
    pub v: u64,
    pub numel: u64,
}

/// `AdamWChunk` of kernels/adamw.cu: 8 bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, Pod, Zeroable)]
pub struct AdamWChunk {
    pub tensor: u32,
    pub chunk: u32,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_match_the_kernels() {
        assert_eq!(std::mem::size_of::<BroadcastDims>(), 200);
        assert_eq!(std::mem::size_of::<StridedDims>(), 136);
        assert_eq!(std::mem::size_of::<ZcBcast>(), 136);
        assert_eq!(std::mem::size_of::<AdamWTensor>(), 40);
        assert_eq!(std::mem::size_of::<AdamWChunk>(), 8);
    }
}
