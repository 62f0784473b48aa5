//! What applies to `ws://` and `wss://` as it applies to TCP and TLS
//! (issue 17): the handshake timeout, IP groups and rates, PROXY headers
//! (before the upgrade) and the live certificate reload of `wss://`.
mod support;

use electrum_lb::config::Scheme;
use electrum_lb::{Config, Server};
use serde_json::{json, Value};
use std::net::SocketAddr;
use support::mock::Mock;
use support::ws::{line_client, open, open_on, ws_url, wss_url};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

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

#[tokio::test]
async fn a_silent_connection_is_dropped_at_the_handshake_timeout() {
    let mock = Mock::start().await;
    let server = proxy(
        &mock,
        r#"["ws://127.0.0.1:0", "wss://127.0.0.1:0"]"#,
        "handshake_timeout_secs = 1",
        "",
    )
    .await;
    // Nothing sent at all; half a request head.
    let mut silent = TcpStream::connect(listener(&server, 0)).await.unwrap();
    let mut slow = TcpStream::connect(listener(&server, 0)).await.unwrap();
    slow.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    for s in [&mut silent, &mut slow] {
        let mut buf = Vec::new();
        tokio::time::timeout(WAIT, s.read_to_end(&mut buf))
            .await
            .expect("closed by the proxy")
            .unwrap();
        assert!(buf.is_empty(), "{}", String::from_utf8_lossy(&buf));
    }
    // TLS done, no HTTP request.
    let tcp = TcpStream::connect(listener(&server, 1)).await.unwrap();
    let mut tls = tls_connector()
        .connect("localhost".try_into().unwrap(), tcp)
        .await
        .unwrap();
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(WAIT, tls.read_to_end(&mut buf))
        .await
        .expect("closed by the proxy");
    assert!(buf.is_empty());
    wait_until(|| hits(&server, "handshake") == Some(3.0)).await;
    server.shutdown().await;
}

#[tokio::test]
async fn websocket_sessions_count_in_ip_groups_and_rates_like_tcp() {
    let mock = Mock::start().await;
    let server = proxy(
        &mock,
        r#"["tcp://127.0.0.1:0", "ws://127.0.0.1:0"]"#,
        "",
        "max_sessions_per_group = 2\nexempt = []\nsession_rate = 0.001\nsession_burst = 100\nmax_refusals = 3",
    )
    .await;
    let (tcp, ws) = (listener(&server, 0), listener(&server, 1));
    let connect_ws = |src: &'static str| async move {
        let sock = TcpSocket::new_v4().unwrap();
        sock.bind(format!("{src}:0").parse().unwrap()).unwrap();
        let stream = sock.connect(ws).await.unwrap();
        open_on(stream, ws_url(ws).into_client_request().unwrap()).await
    };
    // One TCP and one WebSocket session fill 127.0.0.0/24.
    let mut a = Client::connect(tcp).await;
    assert_eq!(a.call("server.ping", json!([])).await, Value::Null);
    let (mut b, _) = support::ws::line_client_on(connect_ws("127.0.0.2").await.unwrap());
    assert_eq!(b.call("server.ping", json!([])).await, Value::Null);
    // A third, over WebSocket: closed before the upgrade.
    assert!(connect_ws("127.0.0.3").await.is_err());
    // Over TCP: the error line.
    let mut c = Client::connect(tcp).await;
    c.send(&json!({"id": 1, "method": "server.ping"})).await;
    assert_eq!(c.recv().await["error"]["code"], -32003);
    assert_eq!(hits(&server, "group_sessions"), Some(2.0));
    // Another network is another group.
    let (mut d, _) = support::ws::line_client_on(connect_ws("127.0.1.1").await.unwrap());
    // The session's budget: a history costs 50 of 100 points.
    for _ in 0..2 {
        d.call("blockchain.scripthash.get_history", json!([scripthash(1)]))
            .await;
    }
    let v = d
        .request("blockchain.scripthash.get_history", json!([scripthash(1)]))
        .await;
    assert_eq!(v["error"]["code"], -32003, "{v}");
    // Refused in a row: the third closes the session.
    for _ in 0..2 {
        let v = d.request("server.ping", json!([])).await;
        assert_eq!(v["error"]["code"], -32003, "{v}");
    }
    assert!(d.closed().await);
    assert_eq!(hits(&server, "abuse"), Some(1.0));
    assert_eq!(b.call("server.ping", json!([])).await, Value::Null);
    server.shutdown().await;
}

#[tokio::test]
async fn the_proxy_header_comes_before_the_upgrade() {
    use electrum_lb::proxy_protocol::v1_header;
    let mock = Mock::start().await;
    let server = proxy(
        &mock,
        r#"[{ url = "ws://127.0.0.1:0", proxy_protocol = true }, { url = "wss://127.0.0.1:0", proxy_protocol = true }]"#,
        "handshake_timeout_secs = 2",
        "max_sessions_per_group = 1\nexempt = []",
    )
    .await;
    for (i, url) in [
        (0, ws_url(listener(&server, 0))),
        (1, wss_url(listener(&server, 1))),
    ] {
        let addr = listener(&server, i);
        let via = |client: &'static str| {
            let url = url.clone();
            async move {
                let mut tcp = TcpStream::connect(addr).await.unwrap();
                let header = v1_header(client.parse().unwrap(), addr);
                tcp.write_all(&header).await.unwrap();
                open_on(tcp, url.into_client_request().unwrap()).await
            }
        };
        let (mut first, _) = support::ws::line_client_on(via("203.0.113.7:4000").await.unwrap());
        assert_eq!(first.call("server.ping", json!([])).await, Value::Null);
        // The same real client again: its group is full, although every
        // connection comes from 127.0.0.1.
        assert!(via("203.0.113.8:4001").await.is_err());
        let (mut other, _) = support::ws::line_client_on(via("198.51.100.1:4000").await.unwrap());
        assert_eq!(other.call("server.ping", json!([])).await, Value::Null);
        // No header: closed.
        assert!(open(&url, &[]).await.is_err());
    }
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wss_serves_the_certificate_reloaded_live() {
    let dir = temp_dir("wss-reload");
    let first = make_cert();
    first.write(&dir, "server");
    let mock = Mock::start().await;
    let text = |d: &std::path::Path| {
        format!(
            "[metrics]\nlisten = \"127.0.0.1:0\"\n[tls]\ncert = \"{0}/server.crt\"\nkey = \"{0}/server.key\"\n[coins.test]\nlisten = [\"wss://127.0.0.1:0\"]\nupstreams = [\"{1}\"]\n",
            d.display(),
            mock.url()
        )
    };
    let server = start_proxy(&text(&dir)).await;
    wait_ready(&server, "test").await;
    let addr = server.addr("test", Scheme::Wss).unwrap();
    let served = || async {
        let tcp = TcpStream::connect(addr).await.unwrap();
        let tls = tls_connector()
            .connect("localhost".try_into().unwrap(), tcp)
            .await
            .unwrap();
        tls.get_ref().1.peer_certificates().unwrap()[0].to_vec()
    };
    assert_eq!(served().await, first.der);
    let (mut old, _) = line_client(&wss_url(addr)).await;
    old.call("server.ping", json!([])).await;

    let second = make_cert();
    second.write(&dir, "server");
    let restart = server
        .reload(Config::parse(&text(&dir), "reload.toml").unwrap())
        .unwrap();
    assert!(restart.is_empty(), "{restart:?}");
    assert_eq!(served().await, second.der);
    // New sessions upgrade over the new certificate; the old one goes on.
    let (mut new, _) = line_client(&wss_url(addr)).await;
    assert_eq!(new.call("server.ping", json!([])).await, Value::Null);
    assert_eq!(old.call("server.ping", json!([])).await, Value::Null);
    server.shutdown().await;
    let _ = std::fs::remove_dir_all(dir);
}
