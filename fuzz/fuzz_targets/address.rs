//! Legacy address decoding: base58check, version bytes, script hash. The
//! first two bytes are the coin's P2PKH and P2SH version bytes.
#![no_main]

use electrum_lb::coin::{address_to_scripthash, AddressVersions};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let [p2pkh, p2sh, rest @ ..] = data else {
        return;
    };
    let Ok(address) = std::str::from_utf8(rest) else {
        return;
    };
    let versions = Some(AddressVersions {
        p2pkh: *p2pkh,
        p2sh: *p2sh,
    });
    if let Ok(sh) = address_to_scripthash(address, versions) {
        assert_eq!(sh.len(), 64);
    }
});
