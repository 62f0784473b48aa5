//! Read-driven subscriptions, end to end: a scripthash read again without
//! a subscription is subscribed by the hub, its reads are then answered
//! from memory between status changes; the hub holds a bounded number of
//! them, drops the least recently read or idle ones and unsubscribes them
//! upstream. Counted at the mock upstream.

mod support;

use electrum_lb::cache::AnswerCounters;
use electrum_lb::hub::Route;
use electrum_lb::Server;
use serde_json::json;
use support::mock::{status_from_history, status_of, Mock, MockOptions};
use support::*;

const HISTORY: &str = "blockchain.scripthash.get_history";
const UNSUBSCRIBE: &str = "blockchain.scripthash.unsubscribe";

fn counters(server: &Server) -> &AnswerCounters {
    server.coins["test"].router.cache.answer_counters()
}

fn settled(server: &Server, sh: &str) -> bool {
    matches!(
        server.coins["test"].router.hub.route(sh),
        Some(Route::Conn(_))
    )
}

fn history(n: usize) -> Vec<(String, i64)> {
    (0..n).map(|i| (txid(100 + i), 60 + i as i64)).collect()
}

async fn proxy(mock: &Mock, cache: &str) -> Server {
    proxy_coin(mock, cache, "").await
}

async fn proxy_coin(mock: &Mock, cache: &str, coin: &str) -> Server {
    let text = config_multi("", &[("test", vec![format!("{:?}", mock.url())], coin)]);
    let server = start_proxy(&format!("{text}\n[cache]\n{cache}\n")).await;
    wait_ready(&server, "test").await;
    server
}

#[tokio::test]
async fn a_scripthash_read_twice_is_subscribed_and_then_read_from_memory() {
    let mock = Mock::start().await;
    let sh = scripthash(1);
    mock.set_history(&sh, history(1));
    let server = proxy(&mock, "").await;
    let mut reader = Client::connect(tcp_addr(&server, "test")).await;
    // Read once: only remembered.
    reader.call(HISTORY, json!([sh])).await;
    assert_eq!(counters(&server).subscribe.get(), 0);
    // Read again: the hub subscribes.
    reader.call(HISTORY, json!([sh])).await;
    wait_until(|| settled(&server, &sh)).await;
    assert_eq!(mock.subscriptions(), 1);
    assert_eq!(counters(&server).subscribe.get(), 1);
    let before = mock.count(HISTORY);
    for _ in 0..10 {
        let h = reader.call(HISTORY, json!([sh])).await;
        assert_eq!(status_from_history(&h), status_of(&history(1)));
    }
    assert_eq!(mock.count(HISTORY), before + 1, "one read, then memory");
    // The upstream notifies a change to the hub (nobody else listens): the
    // next read gets the new history.
    mock.set_history(&sh, history(2));
    wait_until(|| counters(&server).invalidate.get() == 1).await;
    for _ in 0..3 {
        let h = reader.call(HISTORY, json!([sh])).await;
        assert_eq!(status_from_history(&h), status_of(&history(2)));
    }
    assert_eq!(mock.count(HISTORY), before + 2);
    server.shutdown().await;
}

/// Read `sh`, then make sure the hub has handled what that read told it:
/// its commands are handled in order, and a tip subscribe is one.
async fn read_and_fence(c: &mut Client, sh: &str) {
    c.call(HISTORY, json!([sh])).await;
    c.call("blockchain.headers.subscribe", json!([])).await;
}

#[tokio::test]
async fn read_driven_subscriptions_are_bounded_and_unsubscribed() {
    let mock = Mock::start().await;
    let server = proxy(&mock, "read_subscriptions = 2").await;
    let mut reader = Client::connect(tcp_addr(&server, "test")).await;
    let shs: Vec<String> = (10..13).map(scripthash).collect();
    for (i, sh) in shs.iter().take(2).enumerate() {
        read_and_fence(&mut reader, sh).await;
        read_and_fence(&mut reader, sh).await;
        wait_until(|| settled(&server, sh)).await;
        assert_eq!(counters(&server).subscribe.get(), i as u64 + 1);
    }
    // Full, and both were read since the hub last looked (they were just
    // subscribed): a newcomer does not replace them.
    read_and_fence(&mut reader, &shs[2]).await;
    read_and_fence(&mut reader, &shs[2]).await;
    assert_eq!(counters(&server).subscribe.get(), 2);
    assert_eq!(mock.count(UNSUBSCRIBE), 0);
    // Neither was read since: the next read of the newcomer takes the
    // place of the least recently read one, unsubscribed upstream.
    read_and_fence(&mut reader, &shs[2]).await;
    wait_until(|| settled(&server, &shs[2])).await;
    wait_until(|| mock.count(UNSUBSCRIBE) == 1).await;
    assert_eq!(mock.subscriptions(), 2);
    assert!(server.coins["test"].router.hub.route(&shs[0]).is_none());
    assert!(settled(&server, &shs[1]));
    assert_eq!(counters(&server).subscribe.get(), 3);
    assert_eq!(counters(&server).unsubscribe.get(), 1);
    // A wallet subscribing to one of them shares the hub's subscription.
    let (_wallet, _) = subscribed_wallet(tcp_addr(&server, "test"), &shs[1]).await;
    assert_eq!(mock.subscriptions(), 2);
    assert_eq!(mock.count("blockchain.scripthash.subscribe"), 3);
    server.shutdown().await;
}

#[tokio::test]
async fn a_wallet_subscription_takes_the_place_of_a_read_driven_one() {
    let mock = Mock::start().await;
    let server = proxy_coin(&mock, "", "max_subscriptions_total = 1").await;
    let addr = tcp_addr(&server, "test");
    let mut reader = Client::connect(addr).await;
    let (read, wanted) = (scripthash(40), scripthash(41));
    read_and_fence(&mut reader, &read).await;
    read_and_fence(&mut reader, &read).await;
    wait_until(|| settled(&server, &read)).await;
    // The coin is full of the hub's own subscription: a wallet's comes
    // first.
    let (_wallet, status) = subscribed_wallet(addr, &wanted).await;
    assert_eq!(status, json!(null));
    assert!(server.coins["test"].router.hub.route(&read).is_none());
    wait_until(|| mock.count(UNSUBSCRIBE) == 1).await;
    assert_eq!(mock.subscriptions(), 1);
    server.shutdown().await;
}

#[tokio::test]
async fn an_idle_read_driven_subscription_is_dropped() {
    let mock = Mock::start().await;
    let server = proxy(&mock, "read_subscription_idle_secs = 1").await;
    let mut reader = Client::connect(tcp_addr(&server, "test")).await;
    let sh = scripthash(20);
    reader.call(HISTORY, json!([sh])).await;
    reader.call(HISTORY, json!([sh])).await;
    wait_until(|| settled(&server, &sh)).await;
    assert_eq!(mock.subscriptions(), 1);
    // Nobody reads it any more: gone within two idle periods.
    wait_until(|| mock.count(UNSUBSCRIBE) == 1).await;
    assert_eq!(mock.subscriptions(), 0);
    assert!(server.coins["test"].router.hub.route(&sh).is_none());
    assert_eq!(server.coins["test"].router.cache.followed(), 0);
    server.shutdown().await;
}

#[tokio::test]
async fn without_read_subscriptions_every_read_reaches_the_upstream() {
    let mock = Mock::start().await;
    let server = proxy(&mock, "read_subscriptions = 0").await;
    let mut reader = Client::connect(tcp_addr(&server, "test")).await;
    let sh = scripthash(30);
    for _ in 0..5 {
        reader.call(HISTORY, json!([sh])).await;
    }
    assert_eq!(mock.count(HISTORY), 5);
    assert_eq!(mock.count("blockchain.scripthash.subscribe"), 0);
    server.shutdown().await;
}

#[tokio::test]
async fn a_scripthash_the_upstream_will_not_subscribe_is_asked_once() {
    let mock = Mock::start_with(MockOptions {
        refuse: vec!["blockchain.scripthash.subscribe"],
        ..Default::default()
    })
    .await;
    let sh = scripthash(50);
    mock.set_history(&sh, history(1));
    let server = proxy(&mock, "").await;
    let mut reader = Client::connect(tcp_addr(&server, "test")).await;
    read_and_fence(&mut reader, &sh).await;
    read_and_fence(&mut reader, &sh).await;
    wait_until(|| mock.count("blockchain.scripthash.subscribe") == 1).await;
    wait_until(|| server.coins["test"].router.hub.route(&sh).is_none()).await;
    // Refused once: every later read is a plain read, and the hub does
    // not ask again.
    for _ in 0..6 {
        let h = reader.call(HISTORY, json!([sh])).await;
        assert_eq!(status_from_history(&h), status_of(&history(1)));
        reader.call("blockchain.headers.subscribe", json!([])).await;
    }
    assert_eq!(mock.count("blockchain.scripthash.subscribe"), 1);
    assert!(server.coins["test"].router.hub.route(&sh).is_none());
    server.shutdown().await;
}

#[tokio::test]
async fn an_upstream_below_1_4_2_is_not_sent_unsubscribes() {
    // ElectrumX at 1.4 has no `blockchain.scripthash.unsubscribe`: asked,
    // it answers an error and charges the session 100 for it.
    let mock = Mock::start_with(MockOptions {
        protocol_max: Some("1.4".into()),
        ..Default::default()
    })
    .await;
    let server = proxy(&mock, "read_subscriptions = 1").await;
    let mut reader = Client::connect(tcp_addr(&server, "test")).await;
    let (first, second) = (scripthash(70), scripthash(71));
    for sh in [&first, &first] {
        read_and_fence(&mut reader, sh).await;
    }
    wait_until(|| settled(&server, &first)).await;
    // The newcomer takes the place of the one not read since.
    for _ in 0..3 {
        read_and_fence(&mut reader, &second).await;
    }
    wait_until(|| settled(&server, &second)).await;
    assert!(server.coins["test"].router.hub.route(&first).is_none());
    assert_eq!(counters(&server).unsubscribe.get(), 1);
    assert_eq!(mock.count("blockchain.scripthash.subscribe"), 2);
    assert_eq!(mock.count(UNSUBSCRIBE), 0);
    server.shutdown().await;
}
