//! The `klavi-token-sidecar` binary: everything lives in the library.

/// mimalloc: faster than the system allocator on the request path, and it
/// gives freed memory back when asked (see BENCHMARKS.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Returns the pages mimalloc holds free to the system, so RSS falls back
/// after a burst (`klavi_token_sidecar::ops::memory`).
#[allow(unsafe_code)]
fn release_memory() {
    // SAFETY: `mi_collect` has no preconditions: it may be called from any
    // thread at any time and only touches the allocator's own state.
    unsafe { libmimalloc_sys::mi_collect(true) }
}

fn main() -> std::process::ExitCode {
    klavi_token_sidecar::cli::main(Some(release_memory))
}
