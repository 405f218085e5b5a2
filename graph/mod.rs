//! The graph IR of a training step, reverse-mode autodiff as a graph transform, and the passes.
//! Nothing here touches a device, a file or a config format.

pub mod dtype;
pub mod fusion;
pub mod ir;
pub mod op;
pub mod shape;

pub use dtype::DType;
pub use ir::{Graph, Node, NodeId, Phase, Value, ValueId, ValueKind};
pub use op::{BinaryOp, F64Bits, Layout, Op, UnaryOp};
pub use shape::Shape;
pub mod autodiff;
pub mod cost;
pub mod optim;
pub mod passes;
