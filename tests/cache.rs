//! The cache and coalescing, end to end: what is answered from memory, what
//! always reaches an upstream, what a reorg drops, and identical requests
//! in flight sharing one upstream request.
mod support;

use electrum_lb::cache::Cache;
use electrum_lb::Server;
use serde_json::{json, Value};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use support::mock::{txid_of, Mock};
use support::*;

fn cache(server: &Server) -> &Arc<Cache> {
    &server.coins["test"].router.cache
}

/// A proxy in front of `mock` whose cache knows the tip.
async fn proxy(mock: &Mock, server_extra: &str, top_extra: &str) -> Server {
    let mut text = config_multi(
        server_extra,
        &[("test", vec![format!("{:?}", mock.url())], "")],
    );
    text.push_str(top_extra);
    let server = start_proxy(&text).await;
    wait_ready(&server, "test").await;
    let (tip, _) = mock.tip();
    wait_until(|| cache(&server).tip() == tip).await;
    server
}

/// `call` three times, over two sessions; every answer must be the same.
async fn thrice(a: &mut Client, b: &mut Client, method: &str, params: Value) -> Value {
    let first = a.call(method, params.clone()).await;
    assert_eq!(b.call(method, params.clone()).await, first, "{method}");
    assert_eq!(a.call(method, params).await, first, "{method}");
    first
}

#[tokio::test]
async fn repeated_immutable_answers_cost_one_upstream_request() {
    let mock = Mock::start().await;
    let raw = "0100000001".to_string() + &"ab".repeat(60);
    let txid = mock.add_tx(&raw);
    let server = proxy(&mock, "", "").await;
    let addr = tcp_addr(&server, "test");
    let (mut a, mut b) = (Client::connect(addr).await, Client::connect(addr).await);

    assert_eq!(
        thrice(&mut a, &mut b, "blockchain.transaction.get", json!([txid])).await,
        json!(raw)
    );
    thrice(
        &mut a,
        &mut b,
        "blockchain.transaction.get",
        json!([txid, false]),
    )
    .await;
    assert_eq!(
        thrice(&mut a, &mut b, "blockchain.block.header", json!([10])).await,
        json!(mock.header_hex(10))
    );
    thrice(&mut a, &mut b, "blockchain.block.headers", json!([0, 20])).await;
    thrice(
        &mut a,
        &mut b,
        "blockchain.block.headers",
        json!([0, 20, 50]),
    )
    .await;
    thrice(
        &mut a,
        &mut b,
        "blockchain.transaction.get_merkle",
        json!([txid, 10]),
    )
    .await;
    thrice(
        &mut a,
        &mut b,
        "blockchain.transaction.id_from_pos",
        json!([10, 1]),
    )
    .await;
    thrice(&mut a, &mut b, "blockchain.estimatefee", json!([2])).await;
    thrice(&mut a, &mut b, "blockchain.relayfee", json!([])).await;
    thrice(&mut a, &mut b, "mempool.get_fee_histogram", json!([])).await;
    // Legacy translations are served from the cached modern answer.
    let legacy = a.call("blockchain.block.get_header", json!([10])).await;
    assert_eq!(legacy["block_height"], json!(10));

    assert_eq!(
        mock.count("blockchain.transaction.get"),
        2,
        "[txid] and [txid, false]"
    );
    assert_eq!(mock.count("blockchain.block.header"), 1);
    assert_eq!(
        mock.count("blockchain.block.headers"),
        2,
        "with and without cp_height"
    );
    for method in [
        "blockchain.transaction.get_merkle",
        "blockchain.transaction.id_from_pos",
        "blockchain.estimatefee",
        "blockchain.relayfee",
        "mempool.get_fee_histogram",
    ] {
        assert_eq!(mock.count(method), 1, "{method}");
    }
    let stats = &cache(&server).stats;
    assert_eq!(stats.hits.load(Ordering::Relaxed), 21);
    assert_eq!(stats.misses.load(Ordering::Relaxed), 10);
    // The same figures on the metrics port.
    let (_, m) = http_get(server.metrics_addr, "/metrics").await;
    let series = |name: &str| sample(&m, &format!("electrum_lb_{name}"));
    assert_eq!(
        series(r#"cache_requests_total{coin="test",result="hit"}"#),
        Some(21.0)
    );
    assert_eq!(
        series(r#"cache_requests_total{coin="test",result="miss"}"#),
        Some(10.0)
    );
    assert_eq!(
        series(r#"cache_entries{coin="test"}"#),
        Some(cache(&server).len() as f64)
    );
    assert!(series(r#"cache_bytes{coin="test"}"#).unwrap() > 0.0);
    server.shutdown().await;
}

#[tokio::test]
async fn histories_errors_and_tip_near_headers_are_never_cached() {
    let mock = Mock::start().await;
    let sh = scripthash(1);
    mock.set_history(&sh, vec![(txid(1), 90)]);
    // Nobody subscribes, and the hub does not either: without a
    // subscription, histories are never kept (tests/reads_*.rs: with one).
    let server = proxy(&mock, "", "\n[cache]\nread_subscriptions = 0\n").await;
    let addr = tcp_addr(&server, "test");
    let (mut a, mut b) = (Client::connect(addr).await, Client::connect(addr).await);
    let (tip, _) = mock.tip();

    for method in [
        "blockchain.scripthash.get_history",
        "blockchain.scripthash.get_balance",
        "blockchain.scripthash.get_mempool",
        "blockchain.scripthash.listunspent",
    ] {
        thrice(&mut a, &mut b, method, json!([sh])).await;
        assert_eq!(mock.count(method), 3, "{method}");
    }
    // The default margin is 6 blocks: tip - 5 is too close to the tip, and
    // so is a range that reaches it or a checkpoint there.
    thrice(&mut a, &mut b, "blockchain.block.header", json!([tip])).await;
    thrice(&mut a, &mut b, "blockchain.block.header", json!([tip - 5])).await;
    thrice(&mut a, &mut b, "blockchain.block.header", json!([10, tip])).await;
    assert_eq!(mock.count("blockchain.block.header"), 9);
    thrice(
        &mut a,
        &mut b,
        "blockchain.block.headers",
        json!([tip - 10, 6]),
    )
    .await;
    assert_eq!(mock.count("blockchain.block.headers"), 3);
    thrice(
        &mut a,
        &mut b,
        "blockchain.transaction.get_merkle",
        json!([txid(1), tip]),
    )
    .await;
    assert_eq!(mock.count("blockchain.transaction.get_merkle"), 3);
    // Errors are relayed every time, never remembered.
    for _ in 0..3 {
        let v = a
            .request("blockchain.transaction.get", json!([txid(2)]))
            .await;
        assert!(v.get("error").is_some(), "{v}");
    }
    assert_eq!(mock.count("blockchain.transaction.get"), 3);
    // Verbose transactions carry confirmations: not cached.
    for _ in 0..2 {
        a.request("blockchain.transaction.get", json!([txid(1), true]))
            .await;
    }
    assert_eq!(mock.count("blockchain.transaction.get"), 5);
    assert!(cache(&server).is_empty(), "{:?}", cache(&server));
    server.shutdown().await;
}

#[tokio::test]
async fn a_reorg_drops_cached_headers_and_proofs() {
    let mock = Mock::start().await;
    let raw = "02000000".to_string() + &"cd".repeat(40);
    let txid = mock.add_tx(&raw);
    assert_eq!(txid, txid_of(&raw));
    let server = proxy(&mock, "", "").await;
    let addr = tcp_addr(&server, "test");
    let mut a = Client::connect(addr).await;
    let mut sub = Client::connect(addr).await;
    sub.call("blockchain.headers.subscribe", json!([])).await;
    let (tip, _) = mock.tip();
    let deep = tip as usize - 8;
    let old = mock.header_hex(deep);
    for _ in 0..2 {
        assert_eq!(
            a.call("blockchain.block.header", json!([deep])).await,
            json!(old)
        );
        a.call("blockchain.block.headers", json!([deep, 2])).await;
        a.call("blockchain.transaction.get_merkle", json!([txid, deep]))
            .await;
        a.call("blockchain.transaction.get", json!([txid])).await;
    }
    assert_eq!(mock.count("blockchain.block.header"), 1);

    // A reorg deeper than the margin replaces the cached header.
    mock.reorg(10);
    let new = mock.header_hex(deep);
    assert_ne!(new, old);
    let params = sub.notification("blockchain.headers.subscribe").await;
    assert_eq!(params[0]["height"], json!(tip));
    // The cache learnt of the reorg before any subscriber did.
    assert_eq!(cache(&server).stats.reorgs.load(Ordering::Relaxed), 1);
    for _ in 0..2 {
        assert_eq!(
            a.call("blockchain.block.header", json!([deep])).await,
            json!(new)
        );
        a.call("blockchain.block.headers", json!([deep, 2])).await;
        a.call("blockchain.transaction.get_merkle", json!([txid, deep]))
            .await;
        a.call("blockchain.transaction.get", json!([txid])).await;
    }
    // Fetched once more after the reorg, then cached again; the raw
    // transaction, immutable by txid, stayed cached throughout.
    assert_eq!(mock.count("blockchain.block.header"), 2);
    assert_eq!(mock.count("blockchain.block.headers"), 2);
    assert_eq!(mock.count("blockchain.transaction.get_merkle"), 2);
    assert_eq!(mock.count("blockchain.transaction.get"), 1);
    // An ordinary new block drops nothing.
    mock.mine(1);
    sub.notification("blockchain.headers.subscribe").await;
    a.call("blockchain.block.header", json!([deep])).await;
    assert_eq!(mock.count("blockchain.block.header"), 2);
    let (_, m) = http_get(server.metrics_addr, "/metrics").await;
    assert_eq!(
        sample(&m, r#"electrum_lb_cache_reorgs_total{coin="test"}"#),
        Some(1.0)
    );
    server.shutdown().await;
}

#[tokio::test]
async fn simultaneous_identical_requests_share_one_upstream_request() {
    let mock = Mock::start().await;
    // The upstream holds its answers long enough for every request to join;
    // a generous stall limit keeps the connection from being declared dead.
    let server = proxy(
        &mock,
        "upstream_stall_secs = 30\nrequest_timeout_secs = 30",
        "",
    )
    .await;
    let addr = tcp_addr(&server, "test");
    // The tip's header: coalesced, but never cached.
    let (tip, hex) = mock.tip();
    mock.set_delay(Duration::from_secs(2));
    let mut clients = Vec::new();
    for i in 0..100 {
        let mut c = Client::connect(addr).await;
        c.send(&json!({"id": i, "method": "blockchain.block.header", "params": [tip]}))
            .await;
        clients.push(c);
    }
    // All 100 are in: one went upstream, 99 wait for its answer.
    wait_until(|| cache(&server).stats.coalesced.load(Ordering::Relaxed) == 99).await;
    for (i, c) in clients.iter_mut().enumerate() {
        let v = c.recv().await;
        assert_eq!(v["id"], json!(i));
        assert_eq!(v["result"], json!(hex));
    }
    assert_eq!(mock.count("blockchain.block.header"), 1);
    assert!(cache(&server).is_empty());
    let (_, m) = http_get(server.metrics_addr, "/metrics").await;
    assert_eq!(
        sample(
            &m,
            r#"electrum_lb_cache_requests_total{coin="test",result="coalesced"}"#
        ),
        Some(99.0)
    );

    // Errors are shared too, and nothing is left in flight.
    mock.set_delay(Duration::from_millis(500));
    for c in clients.iter_mut().take(10) {
        c.send(&json!({"id": "x", "method": "blockchain.transaction.get", "params": [txid(9)]}))
            .await;
    }
    wait_until(|| cache(&server).stats.coalesced.load(Ordering::Relaxed) == 108).await;
    for c in clients.iter_mut().take(10) {
        let v = c.recv().await;
        assert_eq!(v["error"]["code"], json!(2), "{v}");
    }
    assert_eq!(mock.count("blockchain.transaction.get"), 1);
    server.shutdown().await;
}

#[tokio::test]
async fn a_disabled_cache_still_coalesces_but_stores_nothing() {
    let mock = Mock::start().await;
    let server = proxy(&mock, "", "\n[cache]\nenabled = false\n").await;
    let mut c = Client::connect(tcp_addr(&server, "test")).await;
    for _ in 0..3 {
        c.call("blockchain.block.header", json!([1])).await;
    }
    assert_eq!(mock.count("blockchain.block.header"), 3);
    assert!(cache(&server).is_empty());
    server.shutdown().await;
}
