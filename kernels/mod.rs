//! CUDA C++ kernel sources and their PTX, compiled by `build.rs`.
