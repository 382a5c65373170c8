//! Every input kept in the fuzz seed corpora and every crash reproducer
//! runs here too, so `cargo test` (which CI runs on stable Rust) replays
//! what the fuzzers (nightly, run by hand) found.

use std::path::Path;

use klavi_sidecar_testkit::fuzz;

fn replay(dir: &str, target: fn(&[u8])) -> usize {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let mut count = 0;
    for kind in ["seeds", "regressions"] {
        let Ok(entries) = std::fs::read_dir(root.join(kind).join(dir)) else {
            continue;
        };
        for entry in entries.flatten() {
            let data = std::fs::read(entry.path()).unwrap_or_default();
            target(&data);
            count += 1;
        }
    }
    count
}

#[test]
fn auth_response_corpus_replays_cleanly() {
    assert!(replay("auth_response", fuzz::auth_response) >= 10);
}

#[test]
fn configuration_corpus_replays_cleanly() {
    assert!(replay("configuration", fuzz::configuration) >= 4);
}
