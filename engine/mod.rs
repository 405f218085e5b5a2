//! Backends that execute a compiled graph.
