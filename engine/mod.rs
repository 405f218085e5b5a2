//! Backends that execute a compiled graph.

pub mod cpu;
