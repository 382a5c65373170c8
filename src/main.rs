//! The `klavi-token-sidecar` binary: everything lives in the library.

fn main() -> std::process::ExitCode {
    klavi_token_sidecar::cli::main()
}
