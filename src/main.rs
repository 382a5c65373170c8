//! The `klavi-token-sidecar` binary: everything lives in the library.

/// mimalloc: faster than the system allocator on the request path, and it
/// returns freed memory to the system promptly (see BENCHMARKS.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    klavi_token_sidecar::cli::main()
}
