//! Scripthash reads, end to end: identical reads in flight share one
//! upstream request within one status generation, and reads of a
//! subscribed scripthash are answered from memory until its status changes
//! (a notification, a failover, a reorg). Counted at the mock upstream.

mod support;

use electrum_lb::cache::AnswerCounters;
use electrum_lb::hub::Route;
use electrum_lb::Server;
use serde_json::{json, Value};
use support::mock::{status_from_history, status_of, Mock, MockOptions};
use support::*;

const READS: [&str; 4] = [
    "blockchain.scripthash.get_history",
    "blockchain.scripthash.get_balance",
    "blockchain.scripthash.listunspent",
    "blockchain.scripthash.get_mempool",
];
const HISTORY: &str = "blockchain.scripthash.get_history";

fn counters(server: &Server) -> &AnswerCounters {
    server.coins["test"].router.cache.answer_counters()
}

fn history(n: usize) -> Vec<(String, i64)> {
    (0..n).map(|i| (txid(i), 50 + i as i64)).collect()
}

fn status_json(h: &[(String, i64)]) -> Value {
    json!(status_of(h))
}

/// The reply to request `id`, skipping notifications.
async fn reply(c: &mut Client, id: Value) -> Value {
    loop {
        let v = c.recv().await;
        if v["id"] == id {
            return v;
        }
    }
}

#[tokio::test]
async fn identical_reads_in_flight_reach_the_upstream_once() {
    let mock = Mock::start().await;
    let sh = scripthash(1);
    mock.set_history(&sh, history(2));
    let server = proxy_for(&[mock.url()]).await;
    let addr = tcp_addr(&server, "test");
    let mut clients = Vec::new();
    for _ in 0..3 {
        clients.push(Client::connect(addr).await);
    }
    // Every answer is computed at once but kept back: all three reads of
    // each method are on their way together.
    mock.hold_answers();
    for (i, c) in clients.iter_mut().enumerate() {
        for (m, method) in READS.iter().enumerate() {
            c.send(&json!({"id": i * 10 + m, "method": method, "params": [sh]}))
                .await;
        }
    }
    wait_until(|| counters(&server).join.get() == 8).await;
    for method in READS {
        assert_eq!(mock.count(method), 1, "{method}");
    }
    mock.release_answers();
    let mut first: Vec<Value> = Vec::new();
    for (i, c) in clients.iter_mut().enumerate() {
        for (m, method) in READS.iter().enumerate() {
            let v = reply(c, json!(i * 10 + m)).await;
            assert!(v.get("error").is_none(), "{v}");
            match first.get(m) {
                Some(f) => assert_eq!(&v["result"], f, "{method}"),
                None => first.push(v["result"].clone()),
            }
        }
    }
    assert_eq!(
        status_from_history(&first[0]),
        status_of(&history(2)),
        "the joined history is the upstream's"
    );
    for method in READS {
        assert_eq!(mock.count(method), 1, "{method}");
    }
    server.shutdown().await;
}

#[tokio::test]
async fn a_read_sent_after_a_status_notification_gets_the_new_history() {
    let mock = Mock::start().await;
    let sh = scripthash(2);
    mock.set_history(&sh, history(1));
    let server = proxy_for(&[mock.url()]).await;
    let addr = tcp_addr(&server, "test");
    let (mut wallet, status) = subscribed_wallet(addr, &sh).await;
    assert_eq!(status, status_json(&history(1)));
    // A read on its way when the status changes...
    let mut early = Client::connect(addr).await;
    mock.hold_answers();
    early
        .send(&json!({"id": "early", "method": HISTORY, "params": [sh]}))
        .await;
    wait_until(|| mock.count(HISTORY) == 1).await;
    // ... the upstream's history changes and it notifies.
    mock.set_history(&sh, history(2));
    let params = wallet.notification("blockchain.scripthash.subscribe").await;
    assert_eq!(params[1], status_json(&history(2)));
    // A read sent after the notification does not join the one in flight.
    wallet
        .send(&json!({"id": "after", "method": HISTORY, "params": [sh]}))
        .await;
    wait_until(|| mock.count(HISTORY) == 2).await;
    assert_eq!(counters(&server).join.get(), 0);
    mock.release_answers();
    let after = reply(&mut wallet, json!("after")).await;
    assert_eq!(
        status_from_history(&after["result"]),
        status_of(&history(2)),
        "{after}"
    );
    // The read that crossed the announcement got what the upstream had
    // when it was asked, and it was not kept.
    let crossed = reply(&mut early, json!("early")).await;
    assert_eq!(
        status_from_history(&crossed["result"]),
        status_of(&history(1))
    );
    // From now on the new history is kept: the next reads stay here.
    for _ in 0..3 {
        let h = early.call(HISTORY, json!([sh])).await;
        assert_eq!(status_from_history(&h), status_of(&history(2)));
    }
    assert_eq!(mock.count(HISTORY), 2);
    server.shutdown().await;
}

#[tokio::test]
async fn reads_between_status_changes_never_reach_the_upstream() {
    let mock = Mock::start().await;
    let sh = scripthash(3);
    mock.set_history(&sh, history(1));
    let server = proxy_for(&[mock.url()]).await;
    let addr = tcp_addr(&server, "test");
    let (mut wallet, _) = subscribed_wallet(addr, &sh).await;
    // A session that never subscribed reads the same scripthash.
    let mut reader = Client::connect(addr).await;
    for round in 1..=3usize {
        let mut answers = Vec::new();
        for _ in 0..5 {
            for method in READS {
                let a = wallet.call(method, json!([sh])).await;
                assert_eq!(reader.call(method, json!([sh])).await, a, "{method}");
                answers.push(a);
            }
        }
        assert_eq!(
            status_from_history(&answers[0]),
            status_of(&history(round)),
            "round {round}"
        );
        for method in READS {
            assert_eq!(mock.count(method), round as u64, "{method}, round {round}");
        }
        // The upstream's state changes: the hub hears it first, and what
        // it kept is gone before the wallet is told.
        mock.set_history(&sh, history(round + 1));
        let params = wallet.notification("blockchain.scripthash.subscribe").await;
        assert_eq!(params[1], status_json(&history(round + 1)));
    }
    let c = counters(&server);
    assert_eq!(c.miss.get(), 12);
    assert_eq!(c.store.get(), 12);
    assert_eq!(c.hit.get(), 3 * 40 - 12);
    assert_eq!(c.invalidate.get(), 3);
    let (_, m) = http_get(server.metrics_addr, "/metrics").await;
    assert_eq!(
        sample(
            &m,
            r#"electrum_lb_read_answers_total{coin="test",event="hit"}"#
        ),
        Some(108.0)
    );
    server.shutdown().await;
}

#[tokio::test]
async fn a_failover_drops_what_the_old_connection_answered() {
    // Two upstreams on the same chain with the same history.
    let a = Mock::start_with(MockOptions::default()).await;
    let b = Mock::start_with(MockOptions::default()).await;
    let sh = scripthash(4);
    a.set_history(&sh, history(3));
    b.set_history(&sh, history(3));
    let server = proxy_for(&[a.url(), b.url()]).await;
    wait_until(|| {
        server.upstreams()["test"]
            .iter()
            .all(|u| u.ready_connections > 0)
    })
    .await;
    let addr = tcp_addr(&server, "test");
    let (mut wallet, _) = subscribed_wallet(addr, &sh).await;
    let (holder, other) = if a.subscriptions() == 1 {
        (&a, &b)
    } else {
        (&b, &a)
    };
    for _ in 0..3 {
        wallet.call(HISTORY, json!([sh])).await;
    }
    assert_eq!(holder.count(HISTORY), 1);
    assert_eq!(other.count(HISTORY), 0);
    // The holder goes: the subscription moves, and what the holder
    // answered is not served any more.
    holder.stop();
    let hub = &server.coins["test"].router.hub;
    wait_until(|| other.subscriptions() == 1 && matches!(hub.route(&sh), Some(Route::Conn(_))))
        .await;
    for _ in 0..3 {
        let h = wallet.call(HISTORY, json!([sh])).await;
        assert_eq!(status_from_history(&h), status_of(&history(3)));
    }
    assert_eq!(other.count(HISTORY), 1, "read once from the new holder");
    assert!(counters(&server).invalidate.get() >= 1);
    server.shutdown().await;
}

#[tokio::test]
async fn a_reorg_drops_kept_answers() {
    let mock = Mock::start().await;
    let sh = scripthash(5);
    mock.set_history(&sh, history(1));
    let server = proxy_for(&[mock.url()]).await;
    let addr = tcp_addr(&server, "test");
    let (mut wallet, _) = subscribed_wallet(addr, &sh).await;
    for _ in 0..2 {
        wallet.call(HISTORY, json!([sh])).await;
    }
    assert_eq!(mock.count(HISTORY), 1);
    let cache = &server.coins["test"].router.cache;
    mock.reorg(2);
    wait_until(|| {
        cache
            .stats
            .reorgs
            .load(std::sync::atomic::Ordering::Relaxed)
            == 1
    })
    .await;
    for _ in 0..2 {
        wallet.call(HISTORY, json!([sh])).await;
    }
    assert_eq!(mock.count(HISTORY), 2, "read again after the reorg, once");
    server.shutdown().await;
}
