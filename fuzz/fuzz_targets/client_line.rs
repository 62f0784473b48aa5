//! A line from a client: classification, and `server.version` negotiation
//! on whatever params it carries.
#![no_main]

use electrum_lb::jsonrpc::{parse_client_line, ClientMessage};
use electrum_lb::protocol::{negotiate, Level};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|line: &[u8]| {
    if let Ok(ClientMessage::Single(Ok(req))) = parse_client_line(line) {
        let _ = negotiate(req.params_str(), Level::Unnegotiated, "fuzz");
    }
    if let Ok(text) = std::str::from_utf8(line) {
        let _ = negotiate(text, Level::Unnegotiated, "fuzz");
    }
});
