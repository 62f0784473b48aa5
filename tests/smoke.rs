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
