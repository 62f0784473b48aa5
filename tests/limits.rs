//! The abuse limits, each through the real proxy: what the client sees (a
//! -32003 error, or a clean close), that other clients do not notice, and
//! that `limit_hits_total` counts it.
//!
//! Loopback is exempt from the group limit and the token buckets by default,
//! so these tests set `exempt = []` where they test those. A second client
//! network is a second loopback address (127.0.1.1 is another /24).

mod support;

use serde_json::{json, Value};
use std::net::SocketAddr;
use std::time::Duration;
use support::mock::Mock;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

/// One coin `test` in front of `upstream`, with TCP and TLS listeners;
/// `server` and `limits` are the bodies of those tables.
fn config(upstream: &str, server: &str, limits: &str) -> String {
    let head = config_head();
    format!(
        r#"
{head}
[server]
shutdown_grace_secs = 1
{server}

[limits]
{limits}

[coins.test]
listen = ["tcp://127.0.0.1:0", "ssl://127.0.0.1:0"]
upstreams = ["{upstream}"]
"#
    )
}

async fn proxy(mock: &Mock, server: &str, limits: &str) -> electrum_lb::Server {
    let s = start_proxy(&config(&mock.url(), server, limits)).await;
    wait_ready(&s, "test").await;
    s
}

/// A client whose connection comes from the loopback address `src`.
async fn connect_from(src: &str, addr: SocketAddr) -> Client {
    let sock = TcpSocket::new_v4().unwrap();
    sock.bind(format!("{src}:0").parse().unwrap()).unwrap();
    Client::from_stream(Box::new(sock.connect(addr).await.unwrap()))
}

/// `electrum_lb_limit_hits_total{coin="test",limit=...}`.
fn hits(server: &electrum_lb::Server, limit: &str) -> u64 {
    metric(
        server,
        &format!("electrum_lb_limit_hits_total{{coin=\"test\",limit=\"{limit}\"}}"),
    )
}

fn metric(server: &electrum_lb::Server, series: &str) -> u64 {
    server
        .metrics
        .render()
        .lines()
        .find_map(|l| l.strip_prefix(series))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .unwrap_or(0.0) as u64
}

fn limit_errors(server: &electrum_lb::Server) -> u64 {
    metric(
        server,
        "electrum_lb_errors_total{coin=\"test\",kind=\"limit\"}",
    )
}

fn code(v: &Value) -> i64 {
    v["error"]["code"].as_i64().unwrap_or(0)
}

fn message(v: &Value) -> String {
    v["error"]["message"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

/// True when the connection is closed without the proxy sending anything.
async fn closed_silently(c: &mut Client) -> bool {
    c.recv_line().await.is_none()
}

#[tokio::test]
async fn max_sessions_closes_new_connections_at_accept() {
    let mock = Mock::start().await;
    let server = proxy(&mock, "", "max_sessions = 2").await;
    let addr = tcp_addr(&server, "test");
    let mut a = Client::connect(addr).await;
    let mut b = Client::connect(addr).await;
    assert_eq!(a.call("server.ping", json!([])).await, Value::Null);
    assert_eq!(b.call("server.ping", json!([])).await, Value::Null);
    assert_eq!(server.limits.open_connections(), 2);

    // The third is closed before anything is spent on it.
    let mut c = Client::connect(addr).await;
    assert!(closed_silently(&mut c).await);
    assert_eq!(hits(&server, "sessions"), 1);
    assert_eq!(limit_errors(&server), 1);

    // The others did not notice; a slot freed is a slot taken again.
    assert_eq!(b.call("server.ping", json!([])).await, Value::Null);
    drop(a);
    wait_until(|| server.limits.open_connections() == 1).await;
    let mut d = Client::connect(addr).await;
    assert_eq!(d.call("server.ping", json!([])).await, Value::Null);
    server.shutdown().await;
}

#[tokio::test]
async fn a_full_ip_group_is_refused_with_an_error_line() {
    let mock = Mock::start().await;
    let server = proxy(&mock, "", "max_sessions_per_group = 2\nexempt = []").await;
    let addr = tcp_addr(&server, "test");
    let mut a = Client::connect(addr).await;
    let mut b = connect_from("127.0.0.2", addr).await;
    assert_eq!(a.call("server.ping", json!([])).await, Value::Null);
    assert_eq!(b.call("server.ping", json!([])).await, Value::Null);

    // 127.0.0.3 is in the same /24: an error line, then the close.
    let mut c = connect_from("127.0.0.3", addr).await;
    c.send(&json!({"id": 1, "method": "server.ping"})).await;
    let v = c.recv().await;
    assert_eq!(code(&v), -32003, "{v}");
    assert_eq!(v["id"], Value::Null);
    assert!(message(&v).contains("127.0.0.0/24"), "{v}");
    assert!(c.closed().await);

    // On TLS, the refusal is a close before the handshake.
    let tcp = TcpStream::connect(ssl_addr(&server, "test")).await.unwrap();
    let tls = tls_connector()
        .connect("localhost".try_into().unwrap(), tcp)
        .await;
    assert!(tls.is_err(), "the TLS handshake should have been refused");

    // Another /24 is another group.
    let mut other = connect_from("127.0.1.1", addr).await;
    assert_eq!(other.call("server.ping", json!([])).await, Value::Null);
    assert_eq!(hits(&server, "group_sessions"), 2);

    drop(a);
    wait_until(|| server.limits.open_connections() == 2).await;
    let mut d = connect_from("127.0.0.4", addr).await;
    assert_eq!(d.call("server.ping", json!([])).await, Value::Null);
    server.shutdown().await;
}

#[tokio::test]
async fn the_session_bucket_refuses_then_disconnects() {
    let mock = Mock::start().await;
    // Almost no refill: what a session may do is its burst, 100 points.
    let limits = "exempt = []\nsession_rate = 0.001\nsession_burst = 100\nmax_refusals = 5";
    let server = proxy(&mock, "", limits).await;
    let addr = tcp_addr(&server, "test");
    let sh = scripthash(1);

    // A history costs 50 points: two fit, the third is refused.
    let mut c = Client::connect(addr).await;
    for _ in 0..2 {
        c.call("blockchain.scripthash.get_history", json!([sh]))
            .await;
    }
    let v = c
        .request("blockchain.scripthash.get_history", json!([sh]))
        .await;
    assert_eq!(code(&v), -32003, "{v}");
    assert!(message(&v).contains("this session"), "{v}");

    // A ping costs one point (and its bytes a few more): 80 of them fit
    // in another session.
    let mut pings = Client::connect(addr).await;
    for _ in 0..80 {
        assert_eq!(pings.call("server.ping", json!([])).await, Value::Null);
    }

    // Refused requests in a row: the fifth closes the connection.
    for n in 2..=5 {
        let v = c.request("server.ping", json!([])).await;
        assert_eq!(code(&v), -32003, "{v}");
        assert_eq!(message(&v).contains("closing"), n == 5, "{v}");
    }
    assert!(c.closed().await);
    assert_eq!(hits(&server, "rate"), 5);
    assert_eq!(hits(&server, "abuse"), 1);
    assert!(limit_errors(&server) >= 5);
    // The other session goes on.
    assert_eq!(pings.call("server.ping", json!([])).await, Value::Null);
    server.shutdown().await;
}

#[tokio::test]
async fn the_group_bucket_is_shared_by_its_sessions() {
    let mock = Mock::start().await;
    let limits = "exempt = []\ngroup_rate = 0.001\ngroup_burst = 30";
    let server = proxy(&mock, "", limits).await;
    let addr = tcp_addr(&server, "test");
    // Headers cost 10 points: three for the whole group.
    let mut a = Client::connect(addr).await;
    let mut b = connect_from("127.0.0.2", addr).await;
    a.call("blockchain.block.header", json!([1])).await;
    a.call("blockchain.block.header", json!([2])).await;
    b.call("blockchain.block.header", json!([3])).await;
    let v = b.request("blockchain.block.header", json!([4])).await;
    assert_eq!(code(&v), -32003, "{v}");
    assert!(message(&v).contains("your network 127.0.0.0/24"), "{v}");
    // Opening another session of the group buys nothing.
    let mut c = connect_from("127.0.0.3", addr).await;
    let v = c.request("blockchain.block.header", json!([5])).await;
    assert_eq!(code(&v), -32003, "{v}");
    // Another network has its own budget.
    let mut other = connect_from("127.0.1.1", addr).await;
    let h = other.call("blockchain.block.header", json!([6])).await;
    assert_eq!(h, mock.header_hex(6));
    server.shutdown().await;
}

#[tokio::test]
async fn loopback_is_exempt_by_default() {
    let mock = Mock::start().await;
    let limits = "session_rate = 0.001\nsession_burst = 100\nmax_sessions_per_group = 1";
    let server = proxy(&mock, "", limits).await;
    let addr = tcp_addr(&server, "test");
    let mut a = Client::connect(addr).await;
    let mut b = Client::connect(addr).await;
    for _ in 0..5 {
        a.call("blockchain.scripthash.get_history", json!([scripthash(2)]))
            .await;
        b.call("blockchain.scripthash.get_history", json!([scripthash(3)]))
            .await;
    }
    assert_eq!(hits(&server, "rate"), 0);
    assert_eq!(server.limits.groups(), 0);
    server.shutdown().await;
}

#[tokio::test]
async fn a_session_at_its_in_flight_limit_is_not_read() {
    let mock = Mock::start().await;
    // Requests time out quickly; the stalled upstream is neither declared
    // stalled nor taken out of rotation meanwhile.
    let server_table = "request_timeout_secs = 2\nupstream_stall_secs = 60\nhealth_fall = 1000";
    let server = proxy(&mock, server_table, "max_in_flight = 2").await;
    let mut c = Client::connect(tcp_addr(&server, "test")).await;
    mock.set_stalled(true);
    let mut lines = String::new();
    for i in 1..=5 {
        lines.push_str(
            &json!({"id": i, "method": "blockchain.block.header", "params": [i]}).to_string(),
        );
        lines.push('\n');
    }
    c.send_raw(lines.as_bytes()).await;
    // Two requests reach the upstream; the session's reading pauses.
    wait_until(|| mock.count("blockchain.block.header") == 2 && hits(&server, "in_flight") >= 1)
        .await;
    mock.set_stalled(false);
    // The two lost requests time out; only then are the others read, and
    // the upstream (answering again) serves them.
    let mut got = Vec::new();
    for _ in 0..5 {
        let v = c.recv().await;
        got.push((v["id"].as_i64().unwrap(), code(&v)));
    }
    got.sort();
    assert_eq!(
        got,
        vec![(1, -32002), (2, -32002), (3, 0), (4, 0), (5, 0)],
        "ids 1 and 2 time out, 3 to 5 are answered"
    );
    assert_eq!(mock.count("blockchain.block.header"), 5);
    server.shutdown().await;
}

#[tokio::test]
async fn an_oversized_batch_is_refused_and_counted() {
    let mock = Mock::start().await;
    let server = proxy(&mock, "max_batch = 3", "").await;
    let mut c = Client::connect(tcp_addr(&server, "test")).await;
    let batch: Vec<Value> = (1..=4)
        .map(|i| json!({"id": i, "method": "server.ping"}))
        .collect();
    c.send(&Value::Array(batch)).await;
    let v = c.recv().await;
    assert_eq!(code(&v), -32600, "{v}");
    assert!(message(&v).contains("limit of 3"), "{v}");
    assert_eq!(hits(&server, "batch"), 1);
    assert_eq!(limit_errors(&server), 1);
    // Three is fine, and the session goes on.
    let batch: Vec<Value> = (1..=3)
        .map(|i| json!({"id": i, "method": "server.ping"}))
        .collect();
    c.send(&Value::Array(batch)).await;
    assert_eq!(c.recv().await.as_array().unwrap().len(), 3);
    server.shutdown().await;
}

#[tokio::test]
async fn a_reply_over_the_size_limit_becomes_an_error() {
    let mock = Mock::start().await;
    let server = proxy(&mock, "", "max_response_bytes = 2048").await;
    let mut c = Client::connect(tcp_addr(&server, "test")).await;
    // Five headers (800 hex digits) fit; twenty (3,200) do not.
    let r = c.call("blockchain.block.headers", json!([0, 5])).await;
    assert_eq!(r["count"], 5);
    let v = c.request("blockchain.block.headers", json!([0, 20])).await;
    assert_eq!(code(&v), -32003, "{v}");
    assert!(message(&v).contains("limit of 2048 bytes"), "{v}");
    // In a batch, every member of the oversized reply gets the error.
    c.send(&json!([
        {"id": "big", "method": "blockchain.block.headers", "params": [0, 20]},
        {"id": "ping", "method": "server.ping"},
    ]))
    .await;
    let v = c.recv().await;
    let ids: Vec<&str> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["big", "ping"]);
    assert!(
        v.as_array().unwrap().iter().all(|m| code(m) == -32003),
        "{v}"
    );
    assert_eq!(hits(&server, "response"), 2);
    // The session goes on.
    assert_eq!(c.call("server.ping", json!([])).await, Value::Null);
    server.shutdown().await;
}

#[tokio::test]
async fn handshake_first_line_and_idle_timeouts_close_connections() {
    let mock = Mock::start().await;
    let server = proxy(
        &mock,
        "handshake_timeout_secs = 1\nidle_timeout_secs = 1",
        "",
    )
    .await;
    let tcp = tcp_addr(&server, "test");
    let ssl = ssl_addr(&server, "test");

    // Connected, silent.
    let mut silent = Client::connect(tcp).await;
    // Slowloris: a line that never ends.
    let mut slow = Client::connect(tcp).await;
    slow.send_raw(b"{\"id\":1,\"method\":\"server.pi").await;
    // A TLS port that never sees a ClientHello.
    let mut no_hello = TcpStream::connect(ssl).await.unwrap();
    // A finished TLS handshake, then nothing.
    let mut tls_silent = Client::connect_tls(ssl).await;
    // A wallet that spoke once, then went quiet.
    let mut idle = Client::connect(tcp).await;
    assert_eq!(idle.call("server.ping", json!([])).await, Value::Null);

    assert!(closed_silently(&mut silent).await);
    assert!(closed_silently(&mut slow).await);
    let mut buf = [0u8; 64];
    let n = tokio::time::timeout(WAIT, no_hello.read(&mut buf))
        .await
        .expect("the TLS port closes a silent connection")
        .unwrap_or(0);
    assert_eq!(n, 0);
    assert!(closed_silently(&mut tls_silent).await);
    assert!(closed_silently(&mut idle).await);

    wait_until(|| server.session_count() == 0).await;
    assert_eq!(hits(&server, "first_line"), 3);
    assert_eq!(hits(&server, "handshake"), 1);
    assert_eq!(hits(&server, "idle"), 1);
    assert_eq!(limit_errors(&server), 5);
    assert_eq!(server.limits.open_connections(), 0);
    let _ = no_hello.shutdown().await;
    server.shutdown().await;
}

/// The idle timeout is the time between two lines, not the session's age:
/// a wallet that keeps talking stays connected well past it.
#[tokio::test]
async fn an_active_session_outlives_the_idle_timeout() {
    let mock = Mock::start().await;
    let server = proxy(&mock, "idle_timeout_secs = 2", "").await;
    let mut client = Client::connect(tcp_addr(&server, "test")).await;
    let started = std::time::Instant::now();
    // Pings 0.3 s apart for 2.5 idle timeouts: each gap is far below the limit.
    while started.elapsed() < Duration::from_secs(5) {
        assert_eq!(client.call("server.ping", json!([])).await, Value::Null);
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert_eq!(hits(&server, "idle"), 0);
    // Then silence: closed by the idle timeout.
    assert!(closed_silently(&mut client).await);
    assert_eq!(hits(&server, "idle"), 1);
    server.shutdown().await;
}

/// `[limits]` apply live: a reload changes them for new connections and
/// for the next request of open sessions, and closes nobody.
#[tokio::test]
async fn a_reload_applies_new_limits_without_closing_sessions() {
    let mock = Mock::start().await;
    let text = |limits: &str| config(&mock.url(), "", &format!("exempt = []\n{limits}"));
    let reload = |server: &electrum_lb::Server, limits: &str| {
        let cfg = electrum_lb::Config::parse(&text(limits), "reload.toml").unwrap();
        let restart = server.reload(cfg).unwrap();
        assert!(restart.is_empty(), "{restart:?}");
    };
    let server = start_proxy(&text("max_sessions = 1")).await;
    wait_ready(&server, "test").await;
    let addr = tcp_addr(&server, "test");
    let mut a = Client::connect(addr).await;
    assert_eq!(a.call("server.ping", json!([])).await, Value::Null);
    let mut refused = Client::connect(addr).await;
    assert!(closed_silently(&mut refused).await);

    // Raised: a second session is welcome, the first did not notice.
    reload(&server, "max_sessions = 2");
    let mut b = Client::connect(addr).await;
    assert_eq!(b.call("server.ping", json!([])).await, Value::Null);
    assert_eq!(a.call("server.ping", json!([])).await, Value::Null);

    // A rate of one point a second: the next requests of the open sessions
    // are judged by it (the bucket now holds at most 5 points).
    reload(
        &server,
        "max_sessions = 2\nsession_rate = 1\nsession_burst = 5",
    );
    let first = a.request("blockchain.block.header", json!([1])).await;
    assert!(first.get("result").is_some(), "{first}");
    let second = a.request("blockchain.block.header", json!([2])).await;
    assert_eq!(second["error"]["code"], json!(-32003), "{second}");
    assert!(
        second["error"]["message"]
            .as_str()
            .unwrap()
            .contains("rate limit"),
        "{second}"
    );
    assert_eq!(server.limits.open_connections(), 2);
    server.shutdown().await;
}

#[tokio::test]
async fn contradictory_limits_are_refused_naming_the_key() {
    let text = config("tcp://127.0.0.1:1", "", "session_burst = 0");
    let err = electrum_lb::Config::parse(&text, "t.toml")
        .unwrap_err()
        .to_string();
    assert!(err.contains("limits.session_burst"), "{err}");
    let text = config("tcp://127.0.0.1:1", "", "exempt = [\"10.0.0.0/40\"]");
    let err = electrum_lb::Config::parse(&text, "t.toml")
        .unwrap_err()
        .to_string();
    assert!(err.contains("limits.exempt[0]"), "{err}");
    let text = config("tcp://127.0.0.1:1", "", "max_sesions = 3");
    let err = electrum_lb::Config::parse(&text, "t.toml")
        .unwrap_err()
        .to_string();
    assert!(err.contains("unknown field `max_sesions`"), "{err}");
}
