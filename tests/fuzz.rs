//! Fuzzing inside the test suite (proptest): everything a client, an
//! upstream or a balancer can put on the wire goes through these parsers,
//! and no input may panic them. Where a model is simple enough, the output
//! is checked against it too (framing, PROXY header lengths).
//!
//! A few thousand cases in all, so `cargo test` stays quick; the
//! coverage-guided targets in `fuzz/` (cargo fuzz, nightly) are for longer
//! runs. `PROPTEST_CASES=100000 cargo test --test fuzz` runs this suite longer.

use electrum_lb::codec::{CodecError, Frame, LineReader};
use electrum_lb::coin::{address_to_scripthash, AddressVersions};
use electrum_lb::jsonrpc::{parse_client_line, parse_upstream_line, Json};
use electrum_lb::limits::{oversized_reply, GroupKey};
use electrum_lb::protocol::{negotiate, Level, Version};
use electrum_lb::proxy_protocol::{self, v1_header, v2_header, Parsed};
use proptest::prelude::*;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, ReadBuf};

fn config(cases: u32) -> ProptestConfig {
    ProptestConfig {
        // PROPTEST_CASES still overrides this for long runs.
        cases: std::env::var("PROPTEST_CASES")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(cases),
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// Bytes that look like the wire: JSON punctuation, newlines, CR, quotes,
/// escapes, non-UTF-8, and plain letters.
fn wire_bytes(max: usize) -> impl Strategy<Value = Vec<u8>> {
    let byte = prop_oneof![
        4 => any::<u8>(),
        3 => prop::sample::select(b"{}[]\":,\\ \r\n0123456789-.eEtrufalsn".to_vec()),
        1 => Just(b'\n'),
    ];
    prop::collection::vec(byte, 0..max)
}

/// JSON-RPC-shaped text: real members with random values, nested a little.
fn jsonish() -> impl Strategy<Value = String> {
    let leaf = prop_oneof![
        Just("null".to_string()),
        Just("true".to_string()),
        any::<i64>().prop_map(|n| n.to_string()),
        any::<f64>().prop_map(|f| format!("{f}")),
        "[a-z.\\\\\"\\u{80}-\\u{10ffff}]{0,12}".prop_map(|s| format!("{s:?}")),
        Just("\"server.version\"".to_string()),
        Just("\"blockchain.scripthash.subscribe\"".to_string()),
        Just("[\"1.4\",\"1.6\"]".to_string()),
    ];
    let value = leaf.prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(|v| format!("[{}]", v.join(","))),
            prop::collection::vec(
                (
                    prop::sample::select(vec![
                        "id", "method", "params", "jsonrpc", "result", "error", "code", "x",
                    ]),
                    inner
                ),
                0..5
            )
            .prop_map(|kv| {
                let members: Vec<String> = kv
                    .into_iter()
                    .map(|(k, v)| format!("\"{k}\":{v}"))
                    .collect();
                format!("{{{}}}", members.join(","))
            }),
        ]
    });
    // Sometimes cut short, as a truncated line would be.
    (value, any::<prop::sample::Index>(), any::<bool>()).prop_map(|(s, cut, truncate)| {
        if truncate && !s.is_empty() {
            let mut at = cut.index(s.len());
            while !s.is_char_boundary(at) {
                at -= 1;
            }
            s[..at].to_string()
        } else {
            s
        }
    })
}

/// An `AsyncRead` that hands out its data in the given chunk sizes.
struct Chunked {
    data: Vec<u8>,
    pos: usize,
    chunks: Vec<usize>,
    next: usize,
}

impl AsyncRead for Chunked {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let size = self.chunks.get(self.next).copied().unwrap_or(7).max(1);
        self.next += 1;
        let end = (self.pos + size)
            .min(self.data.len())
            .min(self.pos + buf.remaining());
        let pos = self.pos;
        buf.put_slice(&self.data[pos..end]);
        self.pos = end;
        Poll::Ready(Ok(()))
    }
}

/// What the framing must produce: lines without `\r\n`, empty lines
/// skipped, a partial last line kept, and an error at the first line longer
/// than `max` (counting a trailing `\r`).
fn model_frames(data: &[u8], max: usize) -> (Vec<Vec<u8>>, bool) {
    let mut lines = Vec::new();
    let mut pieces: Vec<&[u8]> = data.split(|b| *b == b'\n').collect();
    let last = pieces.pop().unwrap_or(&[]);
    for piece in pieces {
        if piece.len() > max {
            return (lines, true);
        }
        let line = piece.strip_suffix(b"\r").unwrap_or(piece);
        if !line.is_empty() {
            lines.push(line.to_vec());
        }
    }
    if last.len() > max {
        return (lines, true);
    }
    let line = last.strip_suffix(b"\r").unwrap_or(last);
    if !line.is_empty() {
        lines.push(line.to_vec());
    }
    (lines, false)
}

fn run_frames(data: Vec<u8>, chunks: Vec<usize>, max: usize) -> (Vec<Vec<u8>>, bool) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    rt.block_on(async move {
        let src = Chunked {
            data,
            pos: 0,
            chunks,
            next: 0,
        };
        let mut reader = LineReader::new(src, max);
        let mut lines = Vec::new();
        loop {
            match reader.next_frame().await {
                Ok(Frame::Line(l)) => lines.push(l.to_vec()),
                Ok(Frame::Eof) => return (lines, false),
                Err(CodecError::TooLong { .. }) => return (lines, true),
                Err(CodecError::Io(e)) => panic!("in-memory read failed: {e}"),
            }
        }
    })
}

proptest! {
    #![proptest_config(config(300))]

    #[test]
    fn framing_matches_the_model_under_any_chunking(
        data in wire_bytes(2000),
        chunks in prop::collection::vec(1usize..300, 0..40),
        max in 1usize..600,
    ) {
        let expected = model_frames(&data, max);
        prop_assert_eq!(run_frames(data, chunks, max), expected);
    }
}

proptest! {
    #![proptest_config(config(500))]

    #[test]
    fn client_lines_never_panic(bytes in wire_bytes(300), text in jsonish()) {
        let _ = parse_client_line(&bytes);
        let _ = parse_client_line(text.as_bytes());
        // As a batch member, too.
        let _ = parse_client_line(format!("[{text},{text}]").as_bytes());
    }

    #[test]
    fn upstream_lines_never_panic(bytes in wire_bytes(300), text in jsonish()) {
        let _ = parse_upstream_line(&bytes);
        let _ = parse_upstream_line(text.as_bytes());
        let _ = parse_upstream_line(format!("[{text}]").as_bytes());
    }

    /// The fast check of upstream answers never passes what serde_json
    /// refuses, and passes the compact JSON servers write.
    #[test]
    fn json_check_agrees_with_serde(bytes in wire_bytes(200), text in jsonish()) {
        for t in [String::from_utf8_lossy(&bytes).into_owned(), text.clone()] {
            if Json::checked(&t).is_some() {
                prop_assert!(serde_json::from_str::<&serde_json::value::RawValue>(&t).is_ok(), "{t:?}");
            }
        }
        if let Ok(v) = serde_json::from_str::<serde_json::Value>(&text) {
            let compact = serde_json::to_string(&v).unwrap();
            prop_assert!(Json::checked(&compact).is_some(), "{compact}");
        }
    }

    /// A request object read member by member reads as serde_json reads
    /// it (a leading space sends the same line down serde_json's path).
    #[test]
    fn requests_read_by_member_read_as_serde_reads_them(text in jsonish(), bytes in wire_bytes(80)) {
        let junk = String::from_utf8_lossy(&bytes).into_owned();
        for line in [
            text.clone(),
            format!("{{\"id\":7,\"method\":\"server.ping\",\"params\":{text}}}"),
            format!("{{\"method\":{text}, \"id\" : \"x\"}}"),
            format!("{{\"id\":1,\"method\":\"m\",\"params\":[{junk}]}}"),
            format!("{{{junk}}}"),
        ] {
            let fast = parse_client_line(line.as_bytes()).map(|m| format!("{m:?}"));
            let slow = parse_client_line(format!(" {line}").as_bytes()).map(|m| format!("{m:?}"));
            prop_assert_eq!(fast, slow, "{}", line);
        }
    }

    /// An answer read by position (ElectrumX's and Fulcrum's member order)
    /// reads as serde_json reads the same answer written otherwise.
    #[test]
    fn answers_read_by_position_read_as_serde_reads_them(
        text in jsonish(),
        bytes in wire_bytes(60),
        id in any::<u64>(),
    ) {
        let junk = String::from_utf8_lossy(&bytes).into_owned();
        for result in [text.as_str(), junk.as_str()] {
            for (fast, slow) in [
                (
                    format!("{{\"jsonrpc\":\"2.0\",\"result\":{result},\"id\":{id}}}"),
                    // The space sends it down serde_json's path.
                    format!("{{ \"jsonrpc\":\"2.0\",\"result\":{result},\"id\":{id}}}"),
                ),
                (
                    format!("{{\"id\":{id},\"jsonrpc\":\"2.0\",\"result\":{result}}}"),
                    format!("{{ \"id\":{id},\"jsonrpc\":\"2.0\",\"result\":{result}}}"),
                ),
            ] {
                let a = parse_upstream_line(fast.as_bytes()).map(|m| format!("{:?}", &*m));
                let b = parse_upstream_line(slow.as_bytes()).map(|m| format!("{:?}", &*m));
                prop_assert_eq!(a, b, "{}", fast);
            }
        }
    }

    #[test]
    fn oversized_replies_never_panic(bytes in wire_bytes(300), text in jsonish(), max in 0usize..64) {
        let _ = oversized_reply(&bytes, max);
        if let Some(line) = oversized_reply(text.as_bytes(), max) {
            // Whatever replaces a reply is JSON.
            prop_assert!(serde_json::from_slice::<serde_json::Value>(&line).is_ok());
        }
    }

    #[test]
    fn negotiation_never_panics(
        params in jsonish(),
        level in prop_oneof![
            Just(Level::Unnegotiated),
            (0u32..3, 0u32..10).prop_map(|(a, b)| Level::from_version(Version::new(a, b))),
        ],
    ) {
        let _ = negotiate(&params, level, "electrum-lb test");
        let _ = negotiate(&format!("[\"x\", {params}]"), level, "electrum-lb test");
    }
}

fn socket_pair() -> impl Strategy<Value = (SocketAddr, SocketAddr)> {
    prop_oneof![
        (
            any::<[u8; 4]>(),
            any::<[u8; 4]>(),
            any::<u16>(),
            any::<u16>()
        )
            .prop_map(|(s, d, sp, dp)| {
                (
                    SocketAddr::new(IpAddr::from(s), sp),
                    SocketAddr::new(IpAddr::from(d), dp),
                )
            }),
        (
            any::<[u8; 16]>(),
            any::<[u8; 16]>(),
            any::<u16>(),
            any::<u16>()
        )
            .prop_map(|(s, d, sp, dp)| {
                (
                    SocketAddr::new(IpAddr::from(s), sp),
                    SocketAddr::new(IpAddr::from(d), dp),
                )
            }),
    ]
}

proptest! {
    #![proptest_config(config(500))]

    #[test]
    fn proxy_headers_never_panic(bytes in wire_bytes(300), tail in wire_bytes(40)) {
        let _ = proxy_protocol::parse(&bytes);
        // Behind a real signature, so the v2 paths are reached.
        let mut v2 = proxy_protocol::V2_SIGNATURE.to_vec();
        v2.extend_from_slice(&bytes);
        let _ = proxy_protocol::parse(&v2);
        let mut v1 = b"PROXY ".to_vec();
        v1.extend_from_slice(&bytes);
        let _ = proxy_protocol::parse(&v1);
        let _ = tail;
    }

    /// A valid header is recognised whole, whatever follows it, and every
    /// prefix asks for bytes without ever asking past the header's end.
    #[test]
    fn proxy_headers_are_read_exactly(
        (src, dst) in socket_pair(),
        v2 in any::<bool>(),
        local in any::<bool>(),
        tail in wire_bytes(40),
    ) {
        let header = if v2 {
            v2_header((!local).then_some((src, dst)))
        } else {
            v1_header(src, dst)
        };
        let mut input = header.clone();
        input.extend_from_slice(&tail);
        match proxy_protocol::parse(&input) {
            Ok(Parsed::Done { header: h, len }) => {
                prop_assert_eq!(len, header.len());
                if !(v2 && local) {
                    prop_assert_eq!(h.client("127.0.0.1:1".parse().unwrap()), src);
                }
            }
            other => prop_assert!(false, "{:?}", other),
        }
        for cut in 0..header.len() {
            match proxy_protocol::parse(&header[..cut]) {
                Ok(Parsed::Need(n)) => prop_assert!(n >= 1 && cut + n <= header.len()),
                other => prop_assert!(false, "prefix {}: {:?}", cut, other),
            }
        }
    }

    #[test]
    fn addresses_never_panic(
        text in "[1-9A-HJ-NP-Za-km-z]{0,40}",
        junk in "\\PC{0,40}",
        payload in prop::collection::vec(any::<u8>(), 0..30),
        p2pkh in any::<u8>(),
        p2sh in any::<u8>(),
    ) {
        let versions = Some(AddressVersions { p2pkh, p2sh });
        let _ = address_to_scripthash(&text, versions);
        let _ = address_to_scripthash(&junk, versions);
        let _ = address_to_scripthash(&text, None);
        // Valid base58check of any payload: accepted only as 21 bytes with
        // one of the coin's version bytes, and then a scripthash.
        let encoded = bs58::encode(&payload).with_check().into_string();
        match address_to_scripthash(&encoded, versions) {
            Ok(sh) => {
                prop_assert_eq!(payload.len(), 21);
                prop_assert!(payload[0] == p2pkh || payload[0] == p2sh);
                prop_assert_eq!(sh.len(), 64);
            }
            Err(_) => prop_assert!(payload.len() != 21 || (payload[0] != p2pkh && payload[0] != p2sh)),
        }
    }

    #[test]
    fn ip_groups_never_panic(ip in any::<[u8; 16]>(), v4 in any::<u8>(), v6 in any::<u8>()) {
        let a = IpAddr::from(ip);
        let _ = GroupKey::of(a, v4, v6).to_string();
        let b = IpAddr::from([ip[0], ip[1], ip[2], ip[3]]);
        prop_assert_eq!(GroupKey::of(b, 32, 128), GroupKey::of(b, 40, 200));
    }
}
