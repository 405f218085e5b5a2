//! Fusion groups anchored on a convolution or a matrix product: the plain library call (a cuDNN convolution, a
//! cuBLAS GEMM) writes the product, then the group's epilogue ([`FusedKernel::split_epilogue`]) runs over it as one
//! generated pointwise kernel. The product goes straight into the group's output that stores it unchanged when
//! there is one, else into the node's scratch.
//!
//! The group is the fusion pass's decision, kept in the graph; this is the general lowering every such group has.
//! cuDNN's fused convolution + bias + activation and cuBLASLt's bias/GELU epilogues can take over the groups whose
//! epilogue they express, one call instead of two commands.

use super::{grid_stride, ConvOp, Emit};
use crate::engine::device::{Arg, ConvDirection};
use crate::engine::gpu::consts::ZcBcast;
use crate::error::{Error, Result};
use crate::graph::fusion::{Anchor, FusedKernel};
use crate::graph::{DType, Op, Shape};
use crate::kernels::codegen;

impl Emit<'_, '_> {
    /// The product, then the epilogue kernel.
    pub(super) fn fused_product(&mut self, k: &FusedKernel) -> Result<()> {
        let split = k
            .split_epilogue()
            .ok_or_else(|| Error::msg(format!("{}: not anchored on a convolution or a matrix product", k.name)))?;
        // The library calls take one storage type for their operands (and write the product in it).
        let d = self.in_dtype(0);
        for i in 1..k.anchor.operands() {
            if self.in_dtype(i) != d {
                return Err(Error::Unsupported {
                    backend: "cuda",
                    msg: format!("{} mixes {d} and {} operands; cast them to one type first", k.name, self.in_dtype(i)),
                });
            }
        }
        let n = k.shape.numel() as u64;
        let y = match split.product_output {
            Some(o) => self.out_ptr(o),
            None => self.scratch(n * d.size() as u64).ptr,
        };
        let (a, b) = (self.in_shape(0).clone(), self.in_shape(1).clone());
        let (a_ptr, b_ptr) = (self.in_ptr(0), self.in_ptr(1));
        match k.anchor.op(&k.shape) {
            Some(Op::Conv2d { stride, padding, layout }) => {
                let bias = matches!(k.anchor, Anchor::Conv2d { bias: true, .. }).then(|| self.in_ptr(2));
                let operands = [(&a, a_ptr), (&b, b_ptr), (&k.shape, y)];
                let conv = ConvOp { direction: ConvDirection::Forward, stride, padding, layout };
                self.conv_into(conv, d, operands, bias)?;
            }
            Some(Op::Conv2dBackwardInput { stride, padding, layout, .. }) => {
                let operands = [(&a, a_ptr), (&b, b_ptr), (&k.shape, y)];
                let conv = ConvOp { direction: ConvDirection::BackwardData, stride, padding, layout };
                self.conv_into(conv, d, operands, None)?;
            }
            Some(Op::MatMul { trans_a, trans_b }) => {
                self.matmul_into(trans_a, trans_b, d, (&a, a_ptr), (&b, b_ptr), (&k.shape, y));
            }
            other => {
                return Err(Error::msg(format!(
                    "{}: anchor {:?} has no product to lower",
                    k.name,
                    other.map(|op| op.name())
                )))
            }
        }
        if split.outputs.is_empty() {
            return Ok(());
        }
        let mut dts: Vec<DType> = split.inputs.iter().map(|&i| self.in_dtype(i)).collect();
        dts.push(d);
        let gen = codegen::generate(&split.kernel, &dts)?;
        let mut args: Vec<Arg> = split.inputs.iter().map(|&i| Arg::Ptr(self.in_ptr(i))).collect();
        args.push(Arg::Ptr(y));
        args.extend(split.outputs.iter().map(|&o| Arg::Ptr(self.out_ptr(o))));
        args.push(Arg::u64(n));
        let shapes: &[Shape] = &split.kernel.input_shapes;
        for (i, kind) in gen.inputs.iter().enumerate() {
            if *kind == codegen::InputKind::Broadcast {
                args.push(Arg::pod(&ZcBcast::new(&k.shape, &shapes[i])?));
            }
        }
        let module = self.ctx.fused_module.to_string();
        self.launch(&module, gen.function, grid_stride(n), args, true);
        Ok(())
    }
}
