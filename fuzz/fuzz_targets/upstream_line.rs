//! A line from an upstream server (responses, notifications, batches), and
//! the replacement of a reply too large to relay.
#![no_main]

use electrum_lb::jsonrpc::parse_upstream_line;
use electrum_lb::limits::oversized_reply;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|line: &[u8]| {
    let _ = parse_upstream_line(line);
    let _ = oversized_reply(line, 16);
});
