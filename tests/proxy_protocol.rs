//! Listeners behind an L4 balancer: PROXY protocol v1 and v2 headers, valid,
//! missing and malformed, on TCP and TLS. The real client address must be
//! the one limits see, so every test runs with one session per IP group and
//! no exempt network: a refusal naming the group proves which address was
//! used.

mod support;

use electrum_lb::proxy_protocol::{v1_header, v2_header};
use serde_json::{json, Value};
use std::net::SocketAddr;
use support::mock::Mock;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

struct Proxy {
    server: electrum_lb::Server,
    /// Plain TCP, no header expected.
    plain: SocketAddr,
    /// TCP expecting a PROXY header.
    tcp: SocketAddr,
    /// TLS expecting a PROXY header (before the handshake).
    ssl: SocketAddr,
}

async fn proxy(mock: &Mock) -> Proxy {
    let head = config_head();
    let text = format!(
        r#"
{head}
[server]
shutdown_grace_secs = 1
handshake_timeout_secs = 1

[limits]
max_sessions_per_group = 1
exempt = []

[coins.test]
listen = [
  "tcp://127.0.0.1:0",
  {{ url = "tcp://127.0.0.1:0", proxy_protocol = true }},
  {{ url = "ssl://127.0.0.1:0", proxy_protocol = true }},
]
upstreams = ["{}"]
"#,
        mock.url()
    );
    let server = start_proxy(&text).await;
    wait_ready(&server, "test").await;
    let l = &server.coins["test"].listeners;
    let (plain, tcp, ssl) = (l[0].1, l[1].1, l[2].1);
    Proxy {
        server,
        plain,
        tcp,
        ssl,
    }
}

fn sa(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

/// Connect and send `header` (and whatever follows it in the same write).
async fn with_header(addr: SocketAddr, bytes: &[u8]) -> Client {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(bytes).await.unwrap();
    Client::from_stream(Box::new(s))
}

fn hits(server: &electrum_lb::Server, limit: &str) -> u64 {
    let series = format!("electrum_lb_limit_hits_total{{coin=\"test\",limit=\"{limit}\"}}");
    server
        .metrics
        .render()
        .lines()
        .find_map(|l| l.strip_prefix(series.as_str()))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .unwrap_or(0.0) as u64
}

/// The group-full refusal a client gets, naming its group.
async fn refused_group(c: &mut Client) -> String {
    let v = c.recv().await;
    assert_eq!(v["error"]["code"], -32003, "{v}");
    assert!(c.closed().await);
    v["error"]["message"].as_str().unwrap().to_string()
}

const PING: &[u8] = b"{\"id\":1,\"method\":\"server.ping\"}\n";

fn then_ping(header: Vec<u8>) -> Vec<u8> {
    let mut b = header;
    b.extend_from_slice(PING);
    b
}

async fn pong(c: &mut Client) {
    let v = c.recv().await;
    assert_eq!(
        (v["id"].clone(), v["result"].clone()),
        (json!(1), Value::Null),
        "{v}"
    );
}

#[tokio::test]
async fn v1_gives_the_real_client_address() {
    let mock = Mock::start().await;
    let p = proxy(&mock).await;
    let lb = sa("192.0.2.1:50001");
    // Header and first request in one write: the header is read exactly.
    let mut a = with_header(p.tcp, &then_ping(v1_header(sa("203.0.113.7:40000"), lb))).await;
    pong(&mut a).await;
    // Same /24 as `a`, although the socket peer is the same as everyone's.
    let mut b = with_header(p.tcp, &then_ping(v1_header(sa("203.0.113.9:40001"), lb))).await;
    assert!(refused_group(&mut b).await.contains("203.0.113.0/24"));
    // Another network, and IPv6.
    let mut c = with_header(p.tcp, &then_ping(v1_header(sa("198.51.100.1:1"), lb))).await;
    pong(&mut c).await;
    let v6 = v1_header(sa("[2001:db8:1::7]:1"), sa("[2001:db8::1]:50001"));
    let mut d = with_header(p.tcp, &then_ping(v6.clone())).await;
    pong(&mut d).await;
    let mut e = with_header(p.tcp, &v6).await;
    assert!(refused_group(&mut e).await.contains("2001:db8:1::/48"));
    // The loopback group, which every socket above shares, is still free.
    let mut plain = Client::connect(p.plain).await;
    assert_eq!(plain.call("server.ping", json!([])).await, Value::Null);
    // UNKNOWN: the socket's address, now taken by `plain`.
    let mut u = with_header(p.tcp, b"PROXY UNKNOWN\r\n").await;
    assert!(refused_group(&mut u).await.contains("127.0.0.0/24"));
    assert_eq!(
        a.call("blockchain.block.header", json!([3])).await,
        mock.header_hex(3)
    );
    p.server.shutdown().await;
}

#[tokio::test]
async fn v2_proxy_and_local() {
    let mock = Mock::start().await;
    let p = proxy(&mock).await;
    let lb = sa("192.0.2.1:50001");
    let mut a = with_header(
        p.tcp,
        &then_ping(v2_header(Some((sa("203.0.113.7:40000"), lb)))),
    )
    .await;
    pong(&mut a).await;
    let mut b = with_header(p.tcp, &v2_header(Some((sa("203.0.113.8:1"), lb)))).await;
    assert!(refused_group(&mut b).await.contains("203.0.113.0/24"));
    let v6 = v2_header(Some((sa("[2001:db8:2::7]:1"), sa("[2001:db8::1]:2"))));
    let mut c = with_header(p.tcp, &then_ping(v6)).await;
    pong(&mut c).await;
    // LOCAL (a balancer's health check): the socket's own address.
    let mut local = with_header(p.tcp, &then_ping(v2_header(None))).await;
    pong(&mut local).await;
    let mut again = with_header(p.tcp, &v2_header(None)).await;
    assert!(refused_group(&mut again).await.contains("127.0.0.0/24"));
    p.server.shutdown().await;
}

/// True when the proxy closes the connection without sending a byte.
async fn closed_silently(mut s: TcpStream) -> bool {
    let mut buf = [0u8; 256];
    let n = tokio::time::timeout(WAIT, s.read(&mut buf))
        .await
        .expect("the proxy closes the connection")
        .unwrap_or(0);
    n == 0
}

async fn raw(addr: SocketAddr, bytes: &[u8]) -> TcpStream {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(bytes).await.unwrap();
    s
}

#[tokio::test]
async fn missing_malformed_or_late_headers_close_the_connection() {
    let mock = Mock::start().await;
    let p = proxy(&mock).await;
    let mut bad_v2 = v2_header(Some((sa("203.0.113.7:1"), sa("192.0.2.1:2"))));
    bad_v2[12] = 0x31; // version 3
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("no header, a request", PING.to_vec()),
        (
            "v1 with a bad address",
            then_ping(b"PROXY TCP4 203.0.113.300 192.0.2.1 1 2\r\n".to_vec()),
        ),
        (
            "v1 with LF only",
            b"PROXY TCP4 203.0.113.3 192.0.2.1 1 2\n".to_vec(),
        ),
        (
            "v1 too long",
            format!("PROXY UNKNOWN {}", "x".repeat(200)).into_bytes(),
        ),
        ("v2 with a bad version", bad_v2),
        ("half a header, then nothing", b"PROXY TCP4 203.0".to_vec()),
        ("nothing at all", Vec::new()),
    ];
    for (what, bytes) in &cases {
        let s = raw(p.tcp, bytes).await;
        assert!(closed_silently(s).await, "{what}");
    }
    // A TLS client that does not send the header first.
    let tcp = TcpStream::connect(p.ssl).await.unwrap();
    let tls = tls_connector()
        .connect("localhost".try_into().unwrap(), tcp)
        .await;
    assert!(tls.is_err());
    assert_eq!(hits(&p.server, "proxy_header"), cases.len() as u64 + 1);
    // Nothing of that counted against any group or slot.
    wait_until(|| p.server.limits.open_connections() == 0).await;
    let mut ok = with_header(
        p.tcp,
        &then_ping(v1_header(sa("203.0.113.7:1"), sa("192.0.2.1:2"))),
    )
    .await;
    pong(&mut ok).await;
    p.server.shutdown().await;
}

#[tokio::test]
async fn the_header_comes_before_the_tls_handshake() {
    let mock = Mock::start().await;
    let p = proxy(&mock).await;
    let lb = sa("192.0.2.1:50002");
    for (header, group) in [
        (v1_header(sa("203.0.113.7:1"), lb), "203.0.113.0/24"),
        (
            v2_header(Some((sa("198.51.100.7:1"), lb))),
            "198.51.100.0/24",
        ),
    ] {
        let mut tcp = TcpStream::connect(p.ssl).await.unwrap();
        tcp.write_all(&header).await.unwrap();
        let tls = tls_connector()
            .connect("localhost".try_into().unwrap(), tcp)
            .await
            .unwrap();
        let mut c = Client::from_stream(Box::new(tls));
        let v = c.call("server.version", json!(["pp", "1.4"])).await;
        assert_eq!(v[1], "1.4");
        assert_eq!(
            c.call("blockchain.block.header", json!([2])).await,
            mock.header_hex(2)
        );
        // The group is taken: a second TLS client from it is closed before
        // its handshake.
        let mut tcp = TcpStream::connect(p.ssl).await.unwrap();
        tcp.write_all(&header).await.unwrap();
        let refused = tls_connector()
            .connect("localhost".try_into().unwrap(), tcp)
            .await;
        assert!(refused.is_err(), "{group} should be full");
    }
    assert_eq!(hits(&p.server, "group_sessions"), 2);
    p.server.shutdown().await;
}

/// A log sink for one test (the proxy runs on the test's own thread).
#[derive(Clone, Default)]
struct Logs(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Logs {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Logs {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

/// The process-wide log capture. A thread-local `set_default` subscriber
/// races with the other tests of this binary over tracing's callsite
/// interest cache (the test failed about one run in four); a global one
/// does not. Other tests' lines land here too, so the test looks for its own
/// client address.
fn global_logs() -> Logs {
    static LOGS: std::sync::OnceLock<Logs> = std::sync::OnceLock::new();
    LOGS.get_or_init(|| {
        let logs = Logs::default();
        let sink = logs.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_env_filter("electrum_lb=debug")
            .with_ansi(false)
            .with_writer(move || sink.clone())
            .finish();
        tracing::subscriber::set_global_default(subscriber).expect("no other global subscriber");
        logs
    })
    .clone()
}

#[tokio::test]
async fn logs_name_the_real_client_and_the_balancer() {
    let logs = global_logs();
    let mock = Mock::start().await;
    let p = proxy(&mock).await;
    let mut c = with_header(
        p.tcp,
        &then_ping(v1_header(sa("203.0.113.77:40077"), sa("192.0.2.1:50001"))),
    )
    .await;
    pong(&mut c).await;
    drop(c);
    let mine = |l: &&str| l.contains("peer=203.0.113.77:40077");
    wait_until(|| {
        logs.text()
            .lines()
            .any(|l| mine(&l) && l.contains("session ends"))
    })
    .await;
    let text = logs.text();
    let line = text
        .lines()
        .filter(mine)
        .find(|l| l.contains("connection accepted"))
        .unwrap_or_else(|| panic!("no accepted line naming the real client:\n{text}"));
    assert!(line.contains("via=127.0.0.1:"), "{line}");
    p.server.shutdown().await;
}
