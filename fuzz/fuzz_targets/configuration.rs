//! Configuration parsing and validation: a TOML file plus environment
//! variables. See `klavi_sidecar_testkit::fuzz::configuration`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    klavi_sidecar_testkit::fuzz::configuration(data);
});
