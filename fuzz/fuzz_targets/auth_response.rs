//! Klavi's auth response: JSON body, every expiry form, JWT decoding,
//! clock skew. See `klavi_sidecar_testkit::fuzz::auth_response`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    klavi_sidecar_testkit::fuzz::auth_response(data);
});
