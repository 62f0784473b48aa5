//! The first end-to-end check: a client, the proxy, a mock upstream.
mod support;

use serde_json::json;
use support::*;

#[tokio::test]
async fn forwards_and_answers_locally() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter("debug")
        .try_init();
    let mock = mock::Mock::start().await;
    let server = proxy_for(&[mock.url()]).await;
    let mut c = Client::connect(tcp_addr(&server, "test")).await;
    let v = c.call("server.version", json!(["t", "1.4"])).await;
    assert_eq!(v[1], "1.4");
    let tip = c.call("blockchain.headers.subscribe", json!([])).await;
    assert_eq!(tip["height"], 99);
    let h = c.call("blockchain.block.header", json!([5])).await;
    assert_eq!(h, mock.header_hex(5));
    server.shutdown().await;
}

/// A session holds one header subscription: subscribing again in another
/// shape (before and after negotiating) replaces the shape, so each block
/// is notified once, in the latest shape.
#[tokio::test]
async fn resubscribing_headers_in_another_shape_replaces_it() {
    let mock = mock::Mock::start().await;
    let server = proxy_for(&[mock.url()]).await;
    let mut c = Client::connect(tcp_addr(&server, "test")).await;
    let hybrid = c.call("blockchain.headers.subscribe", json!([])).await;
    assert!(hybrid.get("block_height").is_some(), "{hybrid}");
    c.call("server.version", json!(["t", "1.4"])).await;
    let modern = c.call("blockchain.headers.subscribe", json!([])).await;
    assert!(modern.get("block_height").is_none(), "{modern}");
    mock.mine(1);
    let n = c.notification("blockchain.headers.subscribe").await;
    assert_eq!(n[0]["height"], 100);
    assert!(n[0].get("block_height").is_none(), "modern shape: {n}");
    // The next line is the ping's answer, not a second notification.
    c.send(&json!({"jsonrpc":"2.0","id":"p","method":"server.ping"}))
        .await;
    let next = c.recv().await;
    assert_eq!(
        next["id"], "p",
        "a second header notification arrived: {next}"
    );
    server.shutdown().await;
}
