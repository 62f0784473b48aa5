//! The edge of a browser-facing listener (issue 17): what a client that is
//! not a well-behaved web wallet gets (a clear HTTP status, a JSON-RPC error,
//! a close frame with a code that says why), pings and close frames. The
//! limits, timeouts, PROXY headers and certificate reloads that apply to
//! `ws://` and `wss://` as to TCP and TLS are in `websocket_limits.rs`.
mod support;

use electrum_lb::Server;
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use std::net::SocketAddr;
use support::mock::Mock;
use support::ws::{close_frame, line_client, next_json, open, ws_url, wss_url, Raw};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{self, Message};

/// One coin `test` in front of `mock`; `listen` is the TOML list of its
/// listeners, `server` and `limits` the bodies of those tables.
async fn proxy(mock: &Mock, listen: &str, server: &str, limits: &str) -> Server {
    let head = config_head();
    let text = format!(
        "{head}\n[server]\nshutdown_grace_secs = 1\n{server}\n\n[limits]\n{limits}\n\n[coins.test]\nlisten = {listen}\nupstreams = [\"{}\"]\n",
        mock.url()
    );
    let server = start_proxy(&text).await;
    wait_ready(&server, "test").await;
    server
}

fn listener(server: &Server, i: usize) -> SocketAddr {
    server.coins["test"].listeners[i].1
}

fn hits(server: &Server, limit: &str) -> Option<f64> {
    sample(
        &server.metrics.render(),
        &format!("electrum_lb_limit_hits_total{{coin=\"test\",limit=\"{limit}\"}}"),
    )
}

/// Send raw bytes on a fresh connection and read everything until the
/// proxy closes it.
async fn raw_exchange(addr: SocketAddr, bytes: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(bytes).await.unwrap();
    let mut buf = Vec::new();
    tokio::time::timeout(WAIT, s.read_to_end(&mut buf))
        .await
        .expect("the proxy should answer and close")
        .unwrap();
    String::from_utf8_lossy(&buf).into_owned()
}

/// The HTTP status of a refused upgrade.
fn refused_status(result: Result<Raw, tungstenite::Error>) -> (u16, String) {
    match result {
        Err(tungstenite::Error::Http(response)) => (
            response.status().as_u16(),
            String::from_utf8_lossy(response.body().as_deref().unwrap_or_default()).into_owned(),
        ),
        Err(e) => panic!("expected an HTTP refusal, got {e}"),
        Ok(_) => panic!("expected an HTTP refusal, got an upgrade"),
    }
}

/// A client frame, masked as the protocol requires (unless `mask` is off).
fn frame(first_byte: u8, payload: &[u8], mask: bool) -> Vec<u8> {
    let mut f = vec![first_byte];
    let bit = if mask { 0x80 } else { 0 };
    match payload.len() {
        n if n < 126 => f.push(bit | n as u8),
        n if n < 65536 => {
            f.push(bit | 126);
            f.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            f.push(bit | 127);
            f.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    if mask {
        let key = [0x37, 0xfa, 0x21, 0x3d];
        f.extend_from_slice(&key);
        f.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
    } else {
        f.extend_from_slice(payload);
    }
    f
}

#[tokio::test]
async fn the_upgrade_is_refused_with_a_clear_status() {
    let mock = Mock::start().await;
    let listen = r#"["ws://127.0.0.1:0", { url = "ws://127.0.0.1:0", path = "/electrum", origins = ["https://wallet.example.org"] }]"#;
    let server = proxy(&mock, listen, "", "").await;
    let (plain, guarded) = (listener(&server, 0), listener(&server, 1));

    // A browser or curl asking for the page: 426 and a line of text.
    let answer = raw_exchange(plain, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert!(answer.starts_with("HTTP/1.1 426"), "{answer}");
    assert!(
        answer.to_ascii_lowercase().contains("upgrade: websocket"),
        "{answer}"
    );
    assert!(answer.contains("WebSocket endpoint"), "{answer}");
    // Another method: 405.
    let answer = raw_exchange(
        plain,
        b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 405"), "{answer}");
    // An Electrum client on the wrong port: not HTTP, 400.
    let answer = raw_exchange(plain, b"{\"id\":1,\"method\":\"server.version\"}\n").await;
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    // An upgrade without a valid key: 400.
    let answer = raw_exchange(
        plain,
        b"GET / HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: short\r\n\r\n",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    // Another WebSocket version: 426, naming the one spoken.
    let answer = raw_exchange(
        plain,
        b"GET / HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 8\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 426"), "{answer}");
    assert!(
        answer
            .to_ascii_lowercase()
            .contains("sec-websocket-version: 13"),
        "{answer}"
    );
    // A request head over 16 KiB: 431.
    let cookie = "c".repeat(20 * 1024);
    let answer = raw_exchange(
        plain,
        format!("GET / HTTP/1.1\r\nHost: x\r\nCookie: {cookie}\r\n\r\n").as_bytes(),
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 431"), "{answer}");

    // Only the configured path is upgraded.
    let (status, body) = refused_status(open(&format!("ws://{plain}/electrum"), &[]).await);
    assert_eq!(status, 404);
    assert!(body.contains("endpoint is /"), "{body}");
    let (status, _) = refused_status(open(&ws_url(guarded), &[]).await);
    assert_eq!(status, 404);
    let url = format!("ws://{guarded}/electrum");
    // Origins: listed ones (in any case), and clients that send none.
    let (status, body) =
        refused_status(open(&url, &[("Origin", "https://evil.example.org")]).await);
    assert_eq!(status, 403);
    assert!(body.contains("https://evil.example.org"), "{body}");
    for origin in [
        Some("https://wallet.example.org"),
        Some("HTTPS://Wallet.Example.org"),
        None,
    ] {
        let headers: Vec<(&str, &str)> = origin.iter().map(|o| ("Origin", *o)).collect();
        let ws = open(&url, &headers).await.expect("upgraded");
        let (mut c, _) = support::ws::line_client_on(ws);
        assert_eq!(c.call("server.ping", json!([])).await, Value::Null);
    }
    // Without a list, any origin.
    let ws = open(&ws_url(plain), &[("Origin", "https://anything.example")]).await;
    assert!(ws.is_ok());
    server.shutdown().await;
}

#[tokio::test]
async fn an_oversized_message_gets_an_error_then_close_1009() {
    let mock = Mock::start().await;
    let server = proxy(
        &mock,
        r#"["ws://127.0.0.1:0"]"#,
        "max_line_bytes = 1024",
        "",
    )
    .await;
    let url = ws_url(listener(&server, 0));
    let (mut bystander, _) = line_client(&url).await;
    bystander.call("server.ping", json!([])).await;

    let big = format!(
        r#"{{"id":1,"method":"server.ping","params":["{}"]}}"#,
        "x".repeat(2000)
    );
    // In one frame, and in fragments that only add up to too much.
    for fragmented in [false, true] {
        let mut ws = open(&url, &[]).await.unwrap();
        if fragmented {
            let (a, b) = big.as_bytes().split_at(800);
            let raw = ws.get_mut();
            raw.write_all(&frame(0x01, a, true)).await.unwrap();
            raw.write_all(&frame(0x80, b, true)).await.unwrap();
        } else {
            ws.send(Message::text(big.clone())).await.unwrap();
        }
        let v = next_json(&mut ws).await;
        assert_eq!(v["error"]["code"], -32600, "{v}");
        assert!(
            v["error"]["message"].as_str().unwrap().contains("1024"),
            "{v}"
        );
        assert_eq!(v["id"], Value::Null);
        let close = close_frame(&mut ws).await.expect("a close frame");
        assert_eq!(close.code, CloseCode::Size, "{close:?}");
        assert!(close.reason.contains("1024"), "{close:?}");
    }
    assert_eq!(hits(&server, "line"), Some(2.0));
    // The limit is the message, not the frame header: 1024 bytes pass.
    let (mut c, _) = line_client(&url).await;
    let exact = format!(
        r#"{{"id":2,"method":"server.ping","params":["{}"]}}"#,
        "y".repeat(1024 - 45)
    );
    assert_eq!(exact.len(), 1024);
    c.send_raw(format!("{exact}\n").as_bytes()).await;
    assert_eq!(c.recv().await["id"], 2);
    assert_eq!(bystander.call("server.ping", json!([])).await, Value::Null);
    server.shutdown().await;
}

#[tokio::test]
async fn malformed_frames_close_with_the_code_that_says_why() {
    let mock = Mock::start().await;
    let server = proxy(
        &mock,
        r#"["ws://127.0.0.1:0", "wss://127.0.0.1:0"]"#,
        "",
        "",
    )
    .await;
    for url in [ws_url(listener(&server, 0)), wss_url(listener(&server, 1))] {
        let cases: [(&str, Vec<u8>, CloseCode); 4] = [
            (
                "unmasked",
                frame(0x81, br#"{"id":1,"method":"server.ping"}"#, false),
                CloseCode::Protocol,
            ),
            (
                "text that is not UTF-8",
                frame(0x81, b"\"\xff\xfe\"", true),
                CloseCode::Invalid,
            ),
            (
                "reserved opcode",
                frame(0x83, b"{}", true),
                CloseCode::Protocol,
            ),
            (
                "continuation with nothing to continue",
                frame(0x80, b"{}", true),
                CloseCode::Protocol,
            ),
        ];
        for (what, bytes, code) in cases {
            let mut ws = open(&url, &[]).await.unwrap();
            ws.get_mut().write_all(&bytes).await.unwrap();
            let close = close_frame(&mut ws).await;
            let close = close.unwrap_or_else(|| panic!("{url} {what}: no close frame"));
            assert_eq!(close.code, code, "{url} {what}: {close:?}");
        }
        // The listener goes on.
        let (mut c, _) = line_client(&url).await;
        assert_eq!(c.call("server.ping", json!([])).await, Value::Null);
    }
    server.shutdown().await;
}

#[tokio::test]
async fn pings_are_sent_to_silent_clients_and_answered() {
    let mock = Mock::start().await;
    let server = proxy(&mock, r#"["ws://127.0.0.1:0"]"#, "ws_ping_secs = 1", "").await;
    let mut ws = open(&ws_url(listener(&server, 0)), &[]).await.unwrap();
    // Silent: the proxy pings (tungstenite's client answers by itself).
    let ping = tokio::time::timeout(WAIT, ws.next())
        .await
        .expect("a ping within the wait");
    let Some(Ok(Message::Ping(ping))) = ping else {
        panic!("expected a ping, got {ping:?}");
    };
    assert!(ping.is_empty());
    // The client's ping is answered with the same payload.
    ws.send(Message::Ping(b"are you there".to_vec().into()))
        .await
        .unwrap();
    let pong = tokio::time::timeout(WAIT, async {
        loop {
            match ws.next().await {
                Some(Ok(Message::Pong(p))) => return p,
                Some(Ok(Message::Ping(_))) => continue,
                other => panic!("unexpected {other:?}"),
            }
        }
    })
    .await
    .unwrap();
    assert_eq!(&pong[..], b"are you there");
    // The session is still there.
    ws.send(Message::text(r#"{"id":1,"method":"server.ping"}"#))
        .await
        .unwrap();
    assert_eq!(next_json(&mut ws).await["id"], 1);
    server.shutdown().await;
}

#[tokio::test]
async fn close_frames_are_answered_both_ways() {
    let mock = Mock::start().await;
    let server = proxy(
        &mock,
        r#"["ws://127.0.0.1:0"]"#,
        "idle_timeout_secs = 1",
        "",
    )
    .await;
    let url = ws_url(listener(&server, 0));
    // The client closes: the proxy answers with the same code, the
    // session ends.
    let mut ws = open(&url, &[]).await.unwrap();
    ws.send(Message::text(r#"{"id":1,"method":"server.ping"}"#))
        .await
        .unwrap();
    assert_eq!(next_json(&mut ws).await["id"], 1);
    ws.close(Some(tungstenite::protocol::CloseFrame {
        code: CloseCode::Away,
        reason: "tab closed".into(),
    }))
    .await
    .unwrap();
    let echo = close_frame(&mut ws).await.expect("the close answered");
    assert_eq!(echo.code, CloseCode::Away);
    wait_until(|| server.session_count() == 0).await;
    // The proxy closes (an idle session): a normal close frame.
    let mut ws = open(&url, &[]).await.unwrap();
    ws.send(Message::text(r#"{"id":2,"method":"server.ping"}"#))
        .await
        .unwrap();
    assert_eq!(next_json(&mut ws).await["id"], 2);
    let close = close_frame(&mut ws).await.expect("a close frame");
    assert_eq!(close.code, CloseCode::Normal);
    assert_eq!(hits(&server, "idle"), Some(1.0));
    server.shutdown().await;
}

#[tokio::test]
async fn shutdown_closes_websocket_sessions_with_a_close_frame() {
    let mock = Mock::start().await;
    let server = proxy(&mock, r#"["ws://127.0.0.1:0"]"#, "", "").await;
    let mut ws = open(&ws_url(listener(&server, 0)), &[]).await.unwrap();
    ws.send(Message::text(r#"{"id":1,"method":"server.ping"}"#))
        .await
        .unwrap();
    assert_eq!(next_json(&mut ws).await["id"], 1);
    let stopping = tokio::spawn(server.shutdown());
    let close = close_frame(&mut ws).await.expect("a close frame");
    assert_eq!(close.code, CloseCode::Normal);
    stopping.await.unwrap();
}
