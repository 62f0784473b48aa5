//! Draining: what a stopping proxy owes its sessions (the proxy in-process;
//! tests/balancer.rs drives real processes behind HAProxy).

mod support;

use serde_json::json;
use std::time::Duration;
use support::mock::Mock;
use support::*;
use tokio::net::TcpStream;

fn drained(metrics: &str, how: &str) -> f64 {
    sample(
        metrics,
        &format!("electrum_lb_sessions_drained_total{{coin=\"test\",how=\"{how}\"}}"),
    )
    .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_request_sent_before_the_drain_is_answered_then_the_session_closes() {
    let mock = Mock::start().await;
    // At most 4 requests in flight: most of the 40 are still unread (in the
    // socket or the session's buffer) when the drain begins.
    let server = proxy_with(&[mock.url()], "\n[limits]\nmax_in_flight = 4").await;
    let metrics = server.metrics.clone();
    let mut c = Client::connect(tcp_addr(&server, "test")).await;
    mock.set_delay(Duration::from_millis(100));
    let mut batch = String::new();
    for i in 0..40 {
        batch.push_str(
            &json!({"jsonrpc":"2.0","id":i,"method":"blockchain.block.header","params":[i]})
                .to_string(),
        );
        batch.push('\n');
    }
    c.send_raw(batch.as_bytes()).await;
    wait_until(|| mock.count("blockchain.block.header") >= 1).await;
    let shutdown = tokio::spawn(server.shutdown());
    let mut answered = std::collections::BTreeSet::new();
    while answered.len() < 40 {
        let v = c
            .recv_opt()
            .await
            .unwrap_or_else(|| panic!("closed with {} of 40 answered", answered.len()));
        let i = v["id"].as_u64().unwrap();
        assert_eq!(v["result"], json!(mock.header_hex(i as usize)), "{v}");
        assert!(answered.insert(i), "answered twice: {v}");
    }
    assert!(c.closed().await, "closed once everything was answered");
    tokio::time::timeout(WAIT, shutdown).await.unwrap().unwrap();
    let text = metrics.render();
    assert_eq!(drained(&text, "idle"), 1.0, "{text}");
    assert_eq!(drained(&text, "deadline"), 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_turns_503_at_once_and_the_proxy_serves_through_the_notice() {
    let mock = Mock::start().await;
    let text = config_multi(
        "drain_notice_secs = 2\nshutdown_grace_secs = 5",
        &[("test", vec![format!("{:?}", mock.url())], "")],
    );
    let server = start_proxy(&text).await;
    wait_ready(&server, "test").await;
    let addr = tcp_addr(&server, "test");
    let admin = server.metrics_addr;
    let (wallet, _) = subscribed_wallet(addr, &scripthash(1)).await;
    let mut wallet = wallet;
    assert_eq!(http_get(admin, "/readyz").await.0, 200);
    let shutdown = tokio::spawn(server.shutdown());
    wait_until_async(|| async { http_get(admin, "/readyz").await.0 == 503 }).await;
    let (_, body) = http_get(admin, "/readyz").await;
    assert!(body.contains("\"draining\":true"), "{body}");
    let (_, metrics) = http_get(admin, "/metrics").await;
    assert_eq!(sample(&metrics, "electrum_lb_draining"), Some(1.0));
    // The status page says so too, from the same gauge, with the event.
    let (_, status) = http_get(admin, "/status.json").await;
    let status: serde_json::Value = serde_json::from_str(&status).unwrap();
    assert_eq!(status["draining"], json!(true), "{status}");
    assert_eq!(status["ready"], json!(false), "{status}");
    let events = status["events"].as_array().unwrap();
    assert!(
        events.iter().any(|e| e["kind"] == json!("draining")),
        "{status}"
    );
    // Still accepting and serving while balancers notice.
    let mut late = Client::connect(addr).await;
    late.call("server.version", json!(["late", "1.4"])).await;
    late.call("blockchain.block.header", json!([3])).await;
    // A change during the notice still reaches subscribers.
    mock.set_history(&scripthash(1), vec![(txid(1), 0)]);
    let params = wallet.notification("blockchain.scripthash.subscribe").await;
    assert_eq!(params[0], json!(scripthash(1)));
    // Then the listener closes and idle sessions end.
    assert!(wallet.closed().await);
    assert!(late.closed().await);
    tokio::time::timeout(WAIT, shutdown).await.unwrap().unwrap();
    assert!(TcpStream::connect(addr).await.is_err(), "still accepting");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_connection_is_answered_before_its_session_ends() {
    let mock = Mock::start().await;
    let server = proxy_with(&[mock.url()], "").await;
    let metrics = server.metrics.clone();
    let mut c = Client::connect(tcp_addr(&server, "test")).await;
    wait_until(|| server.session_count() == 1).await;
    let shutdown = tokio::spawn(server.shutdown());
    // Its first request comes after the drain began: it is still answered
    // (a connection that has not spoken yet is about to).
    tokio::time::sleep(Duration::from_millis(50)).await;
    let v = c.call("server.version", json!(["slow", "1.4"])).await;
    assert_eq!(v[1], "1.4");
    assert!(c.closed().await);
    tokio::time::timeout(WAIT, shutdown).await.unwrap().unwrap();
    assert_eq!(drained(&metrics.render(), "idle"), 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_still_busy_at_the_grace_deadline_is_closed() {
    let mock = Mock::start().await;
    // Grace 1 s; the upstream is not declared stalled (nor the request
    // timed out) before 10 s: the answer cannot come in time.
    let text = config_multi(
        "shutdown_grace_secs = 1\nupstream_stall_secs = 10\nrequest_timeout_secs = 10",
        &[("test", vec![format!("{:?}", mock.url())], "")],
    );
    let server = start_proxy(&text).await;
    wait_ready(&server, "test").await;
    let metrics = server.metrics.clone();
    let mut c = Client::connect(tcp_addr(&server, "test")).await;
    c.call("server.version", json!(["w", "1.4"])).await;
    mock.set_stalled(true);
    c.send(&json!({"jsonrpc":"2.0","id":7,"method":"blockchain.block.header","params":[7]}))
        .await;
    wait_until(|| mock.count("blockchain.block.header") == 1).await;
    tokio::time::timeout(WAIT, server.shutdown()).await.unwrap();
    assert!(c.closed().await);
    let text = metrics.render();
    assert_eq!(drained(&text, "deadline"), 1.0, "{text}");
    assert_eq!(drained(&text, "idle"), 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_hard_stop_ends_the_notice_early() {
    let mock = Mock::start().await;
    let text = config_multi(
        "drain_notice_secs = 600\nshutdown_grace_secs = 600",
        &[("test", vec![format!("{:?}", mock.url())], "")],
    );
    let server = start_proxy(&text).await;
    wait_ready(&server, "test").await;
    let (mut wallet, _) = subscribed_wallet(tcp_addr(&server, "test"), &scripthash(2)).await;
    let hard = server.hard_stop();
    let shutdown = tokio::spawn(server.shutdown());
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(!shutdown.is_finished(), "the notice is running");
    // A second SIGTERM (main.rs) fires this.
    hard.cancel();
    tokio::time::timeout(WAIT, shutdown).await.unwrap().unwrap();
    assert!(wallet.closed().await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lines_that_cross_the_close_are_read_and_counted_not_reset() {
    let mock = Mock::start().await;
    let server = proxy_with(&[mock.url()], "").await;
    let metrics = server.metrics.clone();
    let (mut wallet, _) = subscribed_wallet(tcp_addr(&server, "test"), &scripthash(3)).await;
    let shutdown = tokio::spawn(server.shutdown());
    // The session owes nothing: it closes its side at once.
    assert!(wallet.closed().await);
    // A request sent now crosses the close: the proxy reads it (no reset)
    // and counts it.
    wallet
        .send(&json!({"jsonrpc":"2.0","id":9,"method":"server.ping","params":[]}))
        .await;
    wallet.shutdown_write().await;
    tokio::time::timeout(WAIT, shutdown).await.unwrap().unwrap();
    let text = metrics.render();
    assert_eq!(
        sample(&text, "electrum_lb_drain_late_lines_total{coin=\"test\"}"),
        Some(1.0),
        "{text}"
    );
}

/// Poll an async condition every 10 ms until it holds (fails after WAIT).
async fn wait_until_async<F, Fut>(mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + WAIT;
    while !cond().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "condition not reached"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
