//! History reads of a subscribed scripthash, end to end: they go to
//! whichever connection selection picks (not only the one holding the
//! subscription), and their answers are checked against the status the
//! wallet was told; one that disagrees is asked again of the connection
//! holding the subscription, so a wallet never sees a history that
//! contradicts its status. Counted at two mock upstreams.

mod support;

use electrum_lb::cache::AnswerCounters;
use electrum_lb::hub::Route;
use electrum_lb::Server;
use serde_json::json;
use std::time::Duration;
use support::mock::{status_from_history, status_of, Mock, MockOptions};
use support::*;

const HISTORY: &str = "blockchain.scripthash.get_history";

fn counters(server: &Server) -> &AnswerCounters {
    server.coins["test"].router.cache.answer_counters()
}

fn history(n: usize) -> Vec<(String, i64)> {
    (0..n).map(|i| (txid(300 + i), 70 + i as i64)).collect()
}

/// Two upstreams on one chain, both with `sh` at `history(1)`; answers
/// are not kept (`[cache] enabled = false`), so every read goes upstream.
/// A wallet subscribes `sh`. Returns (holder, other, proxy, wallet): the
/// mock holding the hub's subscription, made slow (30 ms an answer) so
/// that selection prefers the other one, and the other.
async fn setup(sh: &str) -> (Mock, Mock, Server, Client) {
    let opts = || MockOptions {
        seed: 7,
        ..Default::default()
    };
    let (a, b) = (
        Mock::start_with(opts()).await,
        Mock::start_with(opts()).await,
    );
    for m in [&a, &b] {
        m.set_history(sh, history(1));
    }
    let text = config_multi(
        "",
        &[(
            "test",
            vec![format!("{:?}", a.url()), format!("{:?}", b.url())],
            "",
        )],
    );
    let server = start_proxy(&format!("{text}\n[cache]\nenabled = false\n")).await;
    wait_ready(&server, "test").await;
    let (wallet, status) = subscribed_wallet(tcp_addr(&server, "test"), sh).await;
    assert_eq!(status, json!(status_of(&history(1))));
    let router = &server.coins["test"].router;
    wait_until(|| matches!(router.hub.route(sh), Some(Route::Conn(_)))).await;
    let Some(Route::Conn(conn)) = router.hub.route(sh) else {
        unreachable!()
    };
    let holder_url = router
        .pool
        .upstream_of(conn)
        .expect("the holder's upstream");
    let (holder, other) = if holder_url == a.url() {
        (a, b)
    } else {
        (b, a)
    };
    holder.set_delay(Duration::from_millis(30));
    (holder, other, server, wallet)
}

#[tokio::test]
async fn history_reads_of_a_subscribed_scripthash_go_where_there_is_room() {
    let sh = scripthash(60);
    let (holder, other, server, mut wallet) = setup(&sh).await;
    let before = holder.count(HISTORY);
    for _ in 0..20 {
        let h = wallet.call(HISTORY, json!([sh])).await;
        assert_eq!(status_from_history(&h), status_of(&history(1)));
    }
    // The first read may go to the holder (nothing measured yet); after
    // it, its 30 ms answers send reads to the other upstream.
    assert!(other.count(HISTORY) >= 15, "{}", other.count(HISTORY));
    assert!(holder.count(HISTORY) - before <= 5);
    assert_eq!(counters(&server).checked.get(), 20);
    assert_eq!(counters(&server).recheck.get(), 0);
    server.shutdown().await;
}

#[tokio::test]
async fn a_history_that_disagrees_with_the_status_is_asked_of_the_holder() {
    let sh = scripthash(61);
    let (holder, other, server, mut wallet) = setup(&sh).await;
    // The other upstream sees a payment the holder has not announced (its
    // mempool is ahead): its history would contradict the wallet's status.
    other.set_history_silently(&sh, history(2));
    let before = holder.count(HISTORY);
    for _ in 0..20 {
        let h = wallet.call(HISTORY, json!([sh])).await;
        assert_eq!(status_from_history(&h), status_of(&history(1)));
    }
    let rechecked = counters(&server).recheck.get();
    assert!(rechecked >= 15, "{rechecked}");
    assert_eq!(other.count(HISTORY), rechecked);
    assert_eq!(holder.count(HISTORY) - before, 20);
    server.shutdown().await;
}
