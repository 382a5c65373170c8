//! Test tooling for klavi-token-sidecar, kept out of the product library:
//! the benchmark drivers' shared parts ([`bench`]), the chaos soak harness ([`soak`], used by `tests/soak.rs` and
//! `examples/soak.rs`) and the fuzz targets' entry points ([`fuzz`], used
//! by `fuzz/` and `tests/fuzz_corpus.rs`). Only the sidecar's public API is
//! used, so what is tested is what users get.

#![forbid(unsafe_code)]

pub mod bench;
pub mod fuzz;
pub mod redis;
pub mod soak;
