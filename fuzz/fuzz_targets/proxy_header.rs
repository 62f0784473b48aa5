//! A PROXY protocol header (v1 text or v2 binary): parsing never panics,
//! and a header it accepts is never longer than the input.
#![no_main]

use electrum_lb::proxy_protocol::{parse, Parsed};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(Parsed::Done { len, .. }) = parse(data) {
        assert!(len <= data.len());
    }
});
