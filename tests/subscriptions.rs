//! Shared subscriptions (issue 3), end to end: real sockets on 127.0.0.1
//! with ports from the OS, the proxy in-process, mock ElectrumX upstreams.
//!
//! Fan-out to many sessions over one upstream subscription, cleanup on
//! unsubscribe and disconnect, failover to another upstream without a missed
//! status, histories consistent with the announced status when upstreams
//! disagree, the legacy `blockchain.address.*` methods, and the limits.
mod support;

use electrum_lb::Server;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use std::sync::atomic::Ordering;
use support::mock::{status_from_history, status_of, Mock};
use support::*;
use tokio::task::JoinSet;

type History = Vec<(String, i64)>;

/// A config with one TCP listener per coin, on a port from the OS. A coin is
/// `(name, upstream URLs, extra lines for the coin table)`.
fn config(coins: &[(&str, Vec<String>, &str)]) -> String {
    let mut text = String::from(
        "[metrics]\nlisten = \"127.0.0.1:0\"\n\n[server]\nrequest_timeout_secs = 5\nshutdown_grace_secs = 2\nupstream_stall_secs = 2\n",
    );
    for (name, upstreams, extra) in coins {
        let ups: Vec<String> = upstreams.iter().map(|u| format!("{u:?}")).collect();
        text.push_str(&format!(
            "\n[coins.{name}]\nlisten = [\"tcp://127.0.0.1:0\"]\nupstreams = [{}]\n{extra}\n",
            ups.join(", ")
        ));
    }
    text
}

/// Start the proxy and wait until every upstream of every coin has a ready
/// connection.
async fn proxy(coins: &[(&str, Vec<String>, &str)]) -> Server {
    let server = start_proxy(&config(coins)).await;
    wait_until(|| {
        server
            .upstreams()
            .values()
            .all(|ups| ups.iter().all(|u| u.ready_connections > 0))
    })
    .await;
    server
}

/// Each history with one more mempool payment (txids from `first_txid`).
fn each_paid_again(histories: &[History], first_txid: usize) -> Vec<History> {
    histories
        .iter()
        .enumerate()
        .map(|(k, h)| {
            let mut h = h.clone();
            h.push((txid(first_txid + k), 0));
            h
        })
        .collect()
}

/// Client `i` watches `scripthash(i % n)`, n the number of histories: each
/// gets the notification of its scripthash's new status, next.
async fn expect_statuses(clients: &mut [Client], histories: &[History]) {
    let n = histories.len();
    for (i, c) in clients.iter_mut().enumerate() {
        let params = next_notification(c, "blockchain.scripthash.subscribe").await;
        assert_eq!(
            params,
            json!([scripthash(i % n), status_of(&histories[i % n])]),
            "session {i}"
        );
    }
}

fn hub_stats(server: &Server, coin: &str) -> std::sync::Arc<electrum_lb::hub::HubStats> {
    server.coins[coin].router.hub.stats.clone()
}

/// The next notification of `method`; any other message is a failure.
async fn next_notification(c: &mut Client, method: &str) -> Value {
    let v = c.recv().await;
    assert_eq!(
        v["method"],
        json!(method),
        "expected a {method} notification: {v}"
    );
    assert!(v.get("id").is_none(), "{v}");
    v["params"].clone()
}

fn status_json(history: &[(String, i64)]) -> Value {
    json!(status_of(history))
}

fn error_of(v: &Value) -> (i64, String) {
    let code = v["error"]["code"]
        .as_i64()
        .unwrap_or_else(|| panic!("expected an error, got {v}"));
    let message = v["error"]["message"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    (code, message)
}

/// 1,000 sessions over 100 scripthashes: 100 upstream subscriptions, and
/// every session is notified when its scripthash changes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousand_sessions_share_a_hundred_upstream_subscriptions() {
    const SESSIONS: usize = 1000;
    const SCRIPTS: usize = 100;
    let mock = Mock::start().await;
    let first: Vec<History> = (0..SCRIPTS)
        .map(|k| vec![(txid(k), 10 + k as i64)])
        .collect();
    for (k, h) in first.iter().enumerate() {
        mock.set_history_silently(&scripthash(k), h.clone());
    }
    let server = proxy(&[("test", vec![mock.url()], "")]).await;
    let addr = tcp_addr(&server, "test");

    let mut tasks = JoinSet::new();
    for i in 0..SESSIONS {
        let expected = status_json(&first[i % SCRIPTS]);
        tasks.spawn(async move {
            let mut c = Client::connect(addr).await;
            let sh = scripthash(i % SCRIPTS);
            let status = c.call("blockchain.scripthash.subscribe", json!([sh])).await;
            assert_eq!(status, expected, "session {i}");
            (i, c)
        });
    }
    let mut clients: Vec<Option<Client>> = (0..SESSIONS).map(|_| None).collect();
    while let Some(r) = tasks.join_next().await {
        let (i, c) = r.unwrap();
        clients[i] = Some(c);
    }
    assert_eq!(
        mock.count("blockchain.scripthash.subscribe"),
        SCRIPTS as u64
    );
    assert_eq!(mock.subscriptions(), SCRIPTS);
    let stats = hub_stats(&server, "test");
    assert_eq!(
        stats.upstream_subscriptions.load(Ordering::Relaxed),
        SCRIPTS
    );
    assert_eq!(
        stats.session_subscriptions.load(Ordering::Relaxed),
        SESSIONS
    );

    // Every scripthash changes: every session hears about its own, in the
    // scripthash form.
    let second: Vec<History> = first
        .iter()
        .enumerate()
        .map(|(k, h)| {
            let mut h = h.clone();
            h.push((txid(1000 + k), 0));
            h
        })
        .collect();
    for (k, h) in second.iter().enumerate() {
        mock.set_history(&scripthash(k), h.clone());
    }
    let mut tasks = JoinSet::new();
    for (i, c) in clients.iter_mut().enumerate() {
        let mut c = c.take().unwrap();
        let expected = json!([scripthash(i % SCRIPTS), status_of(&second[i % SCRIPTS])]);
        tasks.spawn(async move {
            let params = next_notification(&mut c, "blockchain.scripthash.subscribe").await;
            assert_eq!(params, expected, "session {i}");
            (i, c)
        });
    }
    while let Some(r) = tasks.join_next().await {
        let (i, c) = r.unwrap();
        clients[i] = Some(c);
    }
    assert_eq!(stats.notifications.load(Ordering::Relaxed), SESSIONS as u64);

    // A later subscriber is answered by the hub: no upstream round trip.
    let before = mock.requests();
    let mut late = Client::connect(addr).await;
    let status = late
        .call("blockchain.scripthash.subscribe", json!([scripthash(7)]))
        .await;
    assert_eq!(status, status_json(&second[7]));
    assert_eq!(mock.requests(), before);
    assert_eq!(
        mock.count("blockchain.scripthash.subscribe"),
        SCRIPTS as u64
    );

    // A session that subscribes twice to the same thing holds it once.
    let again = late
        .call("blockchain.scripthash.subscribe", json!([scripthash(7)]))
        .await;
    assert_eq!(again, status_json(&second[7]));
    assert_eq!(
        stats.session_subscriptions.load(Ordering::Relaxed),
        SESSIONS + 1
    );
    drop(clients);
    drop(late);
    // Everything is released once every session is gone.
    wait_until(|| mock.subscriptions() == 0).await;
    assert_eq!(
        mock.count("blockchain.scripthash.unsubscribe"),
        SCRIPTS as u64
    );
    assert_eq!(stats.upstream_subscriptions.load(Ordering::Relaxed), 0);
    assert_eq!(stats.session_subscriptions.load(Ordering::Relaxed), 0);
    server.shutdown().await;
}

/// Disconnecting and `blockchain.scripthash.unsubscribe` stop the
/// notifications; the last subscriber's departure releases the upstream
/// subscription.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsubscribe_and_disconnect_release_the_upstream_subscription() {
    let mock = Mock::start().await;
    let server = proxy(&[("test", vec![mock.url()], "")]).await;
    let addr = tcp_addr(&server, "test");
    let stats = hub_stats(&server, "test");
    let (x, y) = (scripthash(1), scripthash(2));

    let mut a = Client::connect(addr).await;
    let mut b = Client::connect(addr).await;
    let mut c = Client::connect(addr).await;
    let mut d = Client::connect(addr).await;
    for (cl, sh) in [(&mut a, &x), (&mut b, &x), (&mut c, &y), (&mut d, &y)] {
        let status = cl
            .call("blockchain.scripthash.subscribe", json!([sh]))
            .await;
        assert_eq!(status, Value::Null);
    }
    assert_eq!(mock.count("blockchain.scripthash.subscribe"), 2);
    assert_eq!(mock.subscriptions(), 2);

    // `a` leaves: `b` still hears about `x`, the upstream still holds it.
    drop(a);
    wait_until(|| stats.session_subscriptions.load(Ordering::Relaxed) == 3).await;
    let sent = stats.notifications.load(Ordering::Relaxed);
    let h1 = vec![(txid(1), 0)];
    mock.set_history(&x, h1.clone());
    let params = next_notification(&mut b, "blockchain.scripthash.subscribe").await;
    assert_eq!(params, json!([x, status_of(&h1)]));
    wait_until(|| stats.notifications.load(Ordering::Relaxed) == sent + 1).await;
    assert_eq!(mock.subscriptions(), 2);
    assert_eq!(mock.count("blockchain.scripthash.unsubscribe"), 0);

    // `b`, the last subscriber of `x`, leaves: released upstream.
    drop(b);
    wait_until(|| mock.subscriptions() == 1).await;
    assert_eq!(mock.count("blockchain.scripthash.unsubscribe"), 1);
    assert_eq!(stats.upstream_subscriptions.load(Ordering::Relaxed), 1);
    // A new subscriber of `x` subscribes upstream again, with the current
    // status.
    let mut e = Client::connect(addr).await;
    let status = e.call("blockchain.scripthash.subscribe", json!([x])).await;
    assert_eq!(status, status_json(&h1));
    assert_eq!(mock.count("blockchain.scripthash.subscribe"), 3);

    // `blockchain.scripthash.unsubscribe`: true once, then false.
    let r = c
        .call("blockchain.scripthash.unsubscribe", json!([y]))
        .await;
    assert_eq!(r, json!(true));
    let r = c
        .call("blockchain.scripthash.unsubscribe", json!([y]))
        .await;
    assert_eq!(r, json!(false));
    let r = c
        .call("blockchain.scripthash.unsubscribe", json!([scripthash(99)]))
        .await;
    assert_eq!(r, json!(false));
    let bad = c
        .request("blockchain.scripthash.unsubscribe", json!(["nope"]))
        .await;
    assert_eq!(error_of(&bad).0, -32602);
    // `d` still holds `y`: it is notified, `c` is not.
    assert_eq!(mock.subscriptions(), 2);
    let sent = stats.notifications.load(Ordering::Relaxed);
    let h2 = vec![(txid(2), 0)];
    mock.set_history(&y, h2.clone());
    let params = next_notification(&mut d, "blockchain.scripthash.subscribe").await;
    assert_eq!(params, json!([y, status_of(&h2)]));
    wait_until(|| stats.notifications.load(Ordering::Relaxed) == sent + 1).await;
    assert_eq!(fence(&mut c).await, Vec::<Value>::new());

    // `d` unsubscribes too: `y` is released upstream; `x` stays.
    let r = d
        .call("blockchain.scripthash.unsubscribe", json!([y]))
        .await;
    assert_eq!(r, json!(true));
    wait_until(|| mock.subscriptions() == 1).await;
    assert_eq!(mock.count("blockchain.scripthash.unsubscribe"), 2);
    mock.set_history(&y, vec![(txid(3), 0)]);
    let h4 = vec![(txid(4), 0)];
    mock.set_history(&x, h4.clone());
    let params = next_notification(&mut e, "blockchain.scripthash.subscribe").await;
    assert_eq!(params, json!([x, status_of(&h4)]));
    assert_eq!(fence(&mut d).await, Vec::<Value>::new());
    assert_eq!(fence(&mut c).await, Vec::<Value>::new());
    assert_eq!(stats.upstream_subscriptions.load(Ordering::Relaxed), 1);
    assert_eq!(stats.session_subscriptions.load(Ordering::Relaxed), 1);
    server.shutdown().await;
}

/// Two upstreams; the one holding the subscriptions dies; statuses change
/// on the survivor: every subscriber is notified, later changes and new
/// blocks keep arriving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failover_moves_subscriptions_and_notifies_what_changed() {
    const SCRIPTS: usize = 5;
    const SESSIONS: usize = 10;
    let a = Mock::start().await;
    let b = Mock::start().await;
    let h0: Vec<History> = (0..SCRIPTS).map(|k| vec![(txid(k), 50)]).collect();
    for (k, h) in h0.iter().enumerate() {
        a.set_history_silently(&scripthash(k), h.clone());
        b.set_history_silently(&scripthash(k), h.clone());
    }
    let server = proxy(&[("test", vec![a.url(), b.url()], "")]).await;
    let addr = tcp_addr(&server, "test");
    let mut clients = Vec::new();
    for i in 0..SESSIONS {
        let mut c = Client::connect(addr).await;
        let sh = scripthash(i % SCRIPTS);
        let status = c.call("blockchain.scripthash.subscribe", json!([sh])).await;
        assert_eq!(status, status_json(&h0[i % SCRIPTS]));
        let tip = c.call("blockchain.headers.subscribe", json!([])).await;
        assert_eq!(tip["height"], 99);
        clients.push(c);
    }
    assert_eq!(a.subscriptions() + b.subscriptions(), SCRIPTS);
    let (dead, survivor) = if a.subscriptions() >= b.subscriptions() {
        (&a, &b)
    } else {
        (&b, &a)
    };
    assert!(dead.subscriptions() > 0);

    // The holder dies; meanwhile every status changes on the survivor.
    dead.stop();
    let h1 = each_paid_again(&h0, 100);
    for (k, h) in h1.iter().enumerate() {
        survivor.set_history(&scripthash(k), h.clone());
    }
    expect_statuses(&mut clients, &h1).await;
    wait_until(|| survivor.subscriptions() == SCRIPTS).await;

    // Later changes keep arriving, each exactly once.
    let h2 = each_paid_again(&h1, 200);
    for (k, h) in h2.iter().enumerate() {
        survivor.set_history(&scripthash(k), h.clone());
    }
    expect_statuses(&mut clients, &h2).await;

    // The tip moves on the survivor while the other upstream is down.
    survivor.mine(2);
    for c in clients.iter_mut() {
        let params = next_notification(c, "blockchain.headers.subscribe").await;
        assert_eq!(params[0]["height"], 101);
        assert_eq!(params[0]["hex"], json!(survivor.tip().1));
    }
    // Nothing else was sent: no duplicate, no stale status.
    for c in clients.iter_mut() {
        assert_eq!(fence(c).await, Vec::<Value>::new());
    }
    // And each history matches the announced status.
    for (i, c) in clients.iter_mut().enumerate() {
        let h = c
            .call(
                "blockchain.scripthash.get_history",
                json!([scripthash(i % SCRIPTS)]),
            )
            .await;
        assert_eq!(status_from_history(&h), status_of(&h2[i % SCRIPTS]));
    }
    server.shutdown().await;
}

/// Two upstreams disagree about a scripthash (one has a mempool transaction
/// the other lacks): a wallet that recomputes the status from `get_history`
/// after each notification never sees a mismatch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn histories_stay_consistent_with_the_announced_status() {
    const ROUNDS: usize = 50;
    let mut other = Mock::start().await;
    let holder = Mock::start().await;
    let sh = scripthash(0);
    let mut confirmed: History = vec![(txid(10_000), 40)];
    let with_mempool = |c: &History, r: usize| {
        let mut h = c.clone();
        h.push((txid(20_000 + r), 0));
        h
    };
    holder.set_history_silently(&sh, confirmed.clone());
    other.set_history_silently(&sh, with_mempool(&confirmed, 0));
    // The first upstream is down when the wallet subscribes, so the
    // subscription lands on the second, while plain requests prefer the
    // first once it is back.
    other.stop();
    let server = start_proxy(&config(&[("test", vec![other.url(), holder.url()], "")])).await;
    wait_ready(&server, "test").await;
    let addr = tcp_addr(&server, "test");
    let (mut wallet, status) = subscribed_wallet(addr, &sh).await;
    assert_eq!(status, status_json(&confirmed));
    assert_eq!(holder.subscriptions(), 1);
    other.restart().await;
    wait_until(|| {
        server.upstreams()["test"]
            .iter()
            .all(|u| u.ready_connections > 0)
    })
    .await;
    assert_eq!(other.subscriptions(), 0);
    // The other upstream does serve reads: just not this scripthash's.
    let mut reader = Client::connect(addr).await;
    for i in 1..=20 {
        reader
            .call("blockchain.scripthash.get_history", json!([scripthash(i)]))
            .await;
    }
    assert!(other.count("blockchain.scripthash.get_history") > 0);
    // Some of those may have gone to the holder too (the selection weighs
    // load and latency): the rounds are counted from here.
    let before = holder.count("blockchain.scripthash.get_history");

    for r in 0..ROUNDS {
        confirmed.push((txid(r), 41 + r as i64));
        let (on_holder, on_other) = if r % 2 == 0 {
            // The holder has a mempool transaction the other lacks...
            (with_mempool(&confirmed, r), confirmed.clone())
        } else {
            // ... or the other way round.
            (confirmed.clone(), with_mempool(&confirmed, r))
        };
        assert_ne!(status_of(&on_holder), status_of(&on_other));
        other.set_history_silently(&sh, on_other);
        holder.set_history(&sh, on_holder.clone());
        let params = next_notification(&mut wallet, "blockchain.scripthash.subscribe").await;
        assert_eq!(params[0], json!(sh));
        let announced = params[1].as_str().map(str::to_string);
        assert_eq!(announced, status_of(&on_holder), "round {r}");
        let history = wallet
            .call("blockchain.scripthash.get_history", json!([sh]))
            .await;
        assert_eq!(status_from_history(&history), announced, "round {r}");
        // Everything else about the scripthash agrees too, and so does
        // a session that never subscribed.
        let mempool = wallet
            .call("blockchain.scripthash.get_mempool", json!([sh]))
            .await;
        let expected_mempool = usize::from(r % 2 == 0);
        assert_eq!(mempool.as_array().unwrap().len(), expected_mempool);
        let balance = wallet
            .call("blockchain.scripthash.get_balance", json!([sh]))
            .await;
        assert_eq!(balance["unconfirmed"], json!(expected_mempool * 1000));
        let unspent = wallet
            .call("blockchain.scripthash.listunspent", json!([sh]))
            .await;
        assert_eq!(unspent.as_array().unwrap().len(), on_holder.len());
        let seen = reader
            .call("blockchain.scripthash.get_history", json!([sh]))
            .await;
        assert_eq!(status_from_history(&seen), announced, "round {r}");
    }
    // The holder answered every read about the scripthash that reached an
    // upstream: one per status; the reader's read of the same status was
    // answered from memory (see tests/reads_answers.rs).
    assert_eq!(
        holder.count("blockchain.scripthash.get_history") - before,
        ROUNDS as u64
    );
    let hits = server.coins["test"]
        .router
        .cache
        .answer_counters()
        .hit
        .get();
    assert!(hits >= ROUNDS as u64, "{hits} reads from memory");
    server.shutdown().await;
}

/// A read of the scripthash already on its way upstream when the status
/// changes must not answer a wallet that asks after the notification: the
/// wallet's own read reflects the status it was sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_in_flight_during_a_change_does_not_answer_later_readers() {
    let mock = Mock::start().await;
    let sh = scripthash(0);
    let h0: History = vec![(txid(0), 10)];
    mock.set_history_silently(&sh, h0.clone());
    let server = proxy(&[("test", vec![mock.url()], "")]).await;
    let addr = tcp_addr(&server, "test");
    let mut wallet = Client::connect(addr).await;
    let status = wallet
        .call("blockchain.scripthash.subscribe", json!([sh]))
        .await;
    assert_eq!(status, status_json(&h0));

    // Another session's read is answered late, with the old history.
    mock.set_delay(std::time::Duration::from_millis(400));
    let mut other = Client::connect(addr).await;
    other
        .send(&json!({"jsonrpc":"2.0","id":"early","method":"blockchain.scripthash.get_history","params":[sh]}))
        .await;
    wait_until(|| mock.count("blockchain.scripthash.get_history") == 1).await;
    let h1: History = vec![(txid(0), 10), (txid(1), 0)];
    mock.set_history(&sh, h1.clone());
    let params = next_notification(&mut wallet, "blockchain.scripthash.subscribe").await;
    assert_eq!(params, json!([sh, status_of(&h1)]));
    let history = wallet
        .call("blockchain.scripthash.get_history", json!([sh]))
        .await;
    assert_eq!(status_from_history(&history), status_of(&h1));
    let early = other.recv().await;
    assert_eq!(early["id"], json!("early"));
    assert_eq!(status_from_history(&early["result"]), status_of(&h0));
    server.shutdown().await;
}

/// The scripthash of a base58check address, computed independently of the
/// proxy: the script from the version byte, sha256, byte-reversed.
fn expected_scripthash(address: &str, p2pkh: u8, p2sh: u8) -> String {
    let payload = bs58::decode(address).with_check(None).into_vec().unwrap();
    assert_eq!(payload.len(), 21);
    let hash160 = &payload[1..];
    let script: Vec<u8> = if payload[0] == p2pkh {
        [&[0x76, 0xa9, 0x14][..], hash160, &[0x88, 0xac]].concat()
    } else if payload[0] == p2sh {
        [&[0xa9, 0x14][..], hash160, &[0x87]].concat()
    } else {
        panic!("{address}: version byte {} is neither", payload[0]);
    };
    let mut digest = Sha256::digest(&script).to_vec();
    digest.reverse();
    hex::encode(digest)
}

/// The seed's addresses: (coin, address, its P2PKH version, the coin's P2SH version).
const SEED_ADDRESSES: [(&str, &str, u8, u8); 3] = [
    (
        "arepacoin",
        "AJrdoamrqi5GBy1hafCbdB1JfioUfQvtxH",
        0x17,
        0x55,
    ),
    ("onixcoin", "XTo7XEAgPapkgJkgH6iR31J4cHBxwTgREe", 0x4b, 0x05),
    ("lkrcoin", "LfJ6WnZiYYRKLzhj1FtPXyzzh7hVKC6YyV", 0x30, 0x55),
];

/// The legacy address methods on each of the seed's coins, and the
/// notification forms of address and scripthash subscribers of one script.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn address_methods_translate_to_scripthashes() {
    let mock = Mock::start().await;
    let coins: Vec<(&str, Vec<String>, &str)> = SEED_ADDRESSES
        .iter()
        .map(|(coin, ..)| (*coin, vec![mock.url()], ""))
        .collect();
    let server = proxy(&coins).await;

    for (n, (coin, address, p2pkh, p2sh)) in SEED_ADDRESSES.into_iter().enumerate() {
        let sh = expected_scripthash(address, p2pkh, p2sh);
        let h0: History = vec![(txid(n), 20), (txid(10 + n), 0)];
        mock.set_history_silently(&sh, h0.clone());
        let addr = tcp_addr(&server, coin);
        let stats = hub_stats(&server, coin);
        let subscribes = mock.count("blockchain.scripthash.subscribe");

        // An old wallet: no `server.version`, address methods only.
        let mut old = Client::connect(addr).await;
        let status = old
            .call("blockchain.address.subscribe", json!([address]))
            .await;
        assert_eq!(status, status_json(&h0), "{coin}");
        let balance = old
            .call("blockchain.address.get_balance", json!([address]))
            .await;
        assert_eq!(balance, json!({"confirmed": 1000, "unconfirmed": 1000}));
        let history = old
            .call("blockchain.address.get_history", json!([address]))
            .await;
        assert_eq!(
            history,
            json!([{"tx_hash": txid(n), "height": 20}, {"tx_hash": txid(10 + n), "height": 0}])
        );
        assert_eq!(status_from_history(&history), status_of(&h0));
        let mempool = old
            .call("blockchain.address.get_mempool", json!([address]))
            .await;
        assert_eq!(
            mempool,
            json!([{"tx_hash": txid(10 + n), "height": 0, "fee": 100}])
        );
        let unspent = old
            .call("blockchain.address.listunspent", json!([address]))
            .await;
        assert_eq!(unspent.as_array().unwrap().len(), 2);
        assert_eq!(unspent[0]["tx_hash"], json!(txid(n)));

        // A modern wallet subscribes to the same script by scripthash: one
        // upstream subscription serves both forms.
        let mut modern = Client::connect(addr).await;
        modern.call("server.version", json!(["w", "1.4"])).await;
        let status = modern
            .call("blockchain.scripthash.subscribe", json!([sh]))
            .await;
        assert_eq!(status, status_json(&h0));
        assert_eq!(
            mock.count("blockchain.scripthash.subscribe"),
            subscribes + 1
        );
        assert_eq!(stats.upstream_subscriptions.load(Ordering::Relaxed), 1);

        let sent = stats.notifications.load(Ordering::Relaxed);
        let h1: History = vec![(txid(n), 20)];
        mock.set_history(&sh, h1.clone());
        let params = next_notification(&mut old, "blockchain.address.subscribe").await;
        assert_eq!(params, json!([address, status_of(&h1)]), "{coin}");
        let params = next_notification(&mut modern, "blockchain.scripthash.subscribe").await;
        assert_eq!(params, json!([sh, status_of(&h1)]), "{coin}");
        wait_until(|| stats.notifications.load(Ordering::Relaxed) == sent + 2).await;
        // Exactly one notification each, in its own form.
        assert_eq!(fence(&mut old).await, Vec::<Value>::new());
        assert_eq!(fence(&mut modern).await, Vec::<Value>::new());
        let mempool = old
            .call("blockchain.address.get_mempool", json!([address]))
            .await;
        assert_eq!(mempool, json!([]));

        // Unsubscribing the address leaves the scripthash subscriber alone.
        let r = old
            .call("blockchain.address.unsubscribe", json!([address]))
            .await;
        assert_eq!(r, json!(true));
        let r = old
            .call("blockchain.address.unsubscribe", json!([address]))
            .await;
        assert_eq!(r, json!(false));
        let sent = stats.notifications.load(Ordering::Relaxed);
        let h2: History = vec![(txid(n), 20), (txid(20 + n), 0)];
        mock.set_history(&sh, h2.clone());
        let params = next_notification(&mut modern, "blockchain.scripthash.subscribe").await;
        assert_eq!(params, json!([sh, status_of(&h2)]));
        wait_until(|| stats.notifications.load(Ordering::Relaxed) == sent + 1).await;
        assert_eq!(fence(&mut old).await, Vec::<Value>::new());
        assert_eq!(mock.count("blockchain.scripthash.unsubscribe"), n as u64);
        // The last form gone, the upstream subscription goes too.
        let r = modern
            .call("blockchain.scripthash.unsubscribe", json!([sh]))
            .await;
        assert_eq!(r, json!(true));
        wait_until(|| mock.count("blockchain.scripthash.unsubscribe") == n as u64 + 1).await;
        assert_eq!(stats.upstream_subscriptions.load(Ordering::Relaxed), 0);
    }

    // A P2SH address of arepacoin (version 0x55) maps to its script.
    let p2sh_payload: Vec<u8> = std::iter::once(0x55).chain([7u8; 20]).collect();
    let p2sh = bs58::encode(&p2sh_payload).with_check().into_string();
    let sh = expected_scripthash(&p2sh, 0x17, 0x55);
    let h: History = vec![(txid(77), 5)];
    mock.set_history_silently(&sh, h.clone());
    let mut c = Client::connect(tcp_addr(&server, "arepacoin")).await;
    let history = c
        .call("blockchain.address.get_history", json!([p2sh]))
        .await;
    assert_eq!(status_from_history(&history), status_of(&h));

    // Refusals say why, with -32602.
    let onix = SEED_ADDRESSES[1].1;
    let r = c
        .request("blockchain.address.get_balance", json!([onix]))
        .await;
    let (code, message) = error_of(&r);
    assert_eq!(code, -32602);
    assert!(message.contains(onix), "{message}");
    assert!(
        message.contains("version byte 75 is not this coin's"),
        "{message}"
    );
    let r = c
        .request("blockchain.address.subscribe", json!([onix]))
        .await;
    assert_eq!(error_of(&r).0, -32602);
    let r = c
        .request("blockchain.address.subscribe", json!(["notanaddress"]))
        .await;
    let (code, message) = error_of(&r);
    assert_eq!(code, -32602);
    assert!(
        message.contains("invalid address notanaddress"),
        "{message}"
    );
    // A typo breaks the checksum.
    let typo = "AJrdoamrqi5GBy1hafCbdB1JfioUfQvtxJ";
    let r = c
        .request("blockchain.address.get_history", json!([typo]))
        .await;
    let (code, message) = error_of(&r);
    assert_eq!(code, -32602);
    assert!(message.contains("base58check"), "{message}");
    let r = c.request("blockchain.address.get_history", json!([])).await;
    assert_eq!(error_of(&r).0, -32602);
    let r = c
        .request("blockchain.address.get_history", json!([42]))
        .await;
    assert_eq!(error_of(&r).0, -32602);
    // The session goes on, and nothing was subscribed by the refusals.
    let history = c
        .call("blockchain.address.get_history", json!([p2sh]))
        .await;
    assert_eq!(status_from_history(&history), status_of(&h));
    assert_eq!(
        hub_stats(&server, "arepacoin")
            .session_subscriptions
            .load(Ordering::Relaxed),
        0
    );
    server.shutdown().await;
}

/// `p2pkh_version` / `p2sh_version` in a coin's table replace the built-in
/// bytes, or give them to a coin the proxy does not know.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn address_versions_can_be_overridden_per_coin() {
    let mock = Mock::start().await;
    let (arepa, onix) = (SEED_ADDRESSES[0].1, SEED_ADDRESSES[1].1);
    let server = proxy(&[
        // A built-in coin whose P2PKH byte is overridden (to arepacoin's).
        ("onixcoin", vec![mock.url()], "p2pkh_version = 23"),
        // A coin the proxy does not know, given both bytes.
        (
            "mycoin",
            vec![mock.url()],
            "p2pkh_version = 23\np2sh_version = 85",
        ),
        // A coin the proxy does not know, without them.
        ("plain", vec![mock.url()], ""),
    ])
    .await;
    let sh = expected_scripthash(arepa, 0x17, 0x55);
    let h: History = vec![(txid(1), 3)];
    mock.set_history_silently(&sh, h.clone());

    for coin in ["onixcoin", "mycoin"] {
        let mut c = Client::connect(tcp_addr(&server, coin)).await;
        let status = c.call("blockchain.address.subscribe", json!([arepa])).await;
        assert_eq!(status, status_json(&h), "{coin}");
        let history = c
            .call("blockchain.address.get_history", json!([arepa]))
            .await;
        assert_eq!(status_from_history(&history), status_of(&h), "{coin}");
        let r = c
            .request("blockchain.address.get_history", json!([onix]))
            .await;
        let (code, message) = error_of(&r);
        assert_eq!(code, -32602, "{coin}");
        assert!(
            message.contains("version byte 75 is not this coin's (P2PKH 23"),
            "{coin}: {message}"
        );
    }
    // onixcoin keeps its built-in P2SH byte (5).
    let onix_p2sh_payload: Vec<u8> = std::iter::once(0x05).chain([9u8; 20]).collect();
    let onix_p2sh = bs58::encode(&onix_p2sh_payload).with_check().into_string();
    let sh2 = expected_scripthash(&onix_p2sh, 0x17, 0x05);
    mock.set_history_silently(&sh2, vec![(txid(2), 4)]);
    let mut c = Client::connect(tcp_addr(&server, "onixcoin")).await;
    let history = c
        .call("blockchain.address.get_history", json!([onix_p2sh]))
        .await;
    assert_eq!(history, json!([{"tx_hash": txid(2), "height": 4}]));

    let mut c = Client::connect(tcp_addr(&server, "plain")).await;
    let r = c
        .request("blockchain.address.get_history", json!([arepa]))
        .await;
    let (code, message) = error_of(&r);
    assert_eq!(code, -32602);
    assert!(message.contains("p2pkh_version"), "{message}");
    // Scripthash methods work regardless.
    let status = c.call("blockchain.scripthash.subscribe", json!([sh])).await;
    assert_eq!(status, status_json(&h));
    server.shutdown().await;
}

async fn sub(c: &mut Client, sh: &str) -> Value {
    c.request("blockchain.scripthash.subscribe", json!([sh]))
        .await
}

/// Past `max_subscriptions_per_session` or `max_subscriptions_total` a
/// subscribe gets a clear error; nothing else breaks, and a refused
/// subscription never counts against the session.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscription_limits_refuse_clearly_and_break_nothing() {
    let mock = Mock::start().await;
    let server = proxy(&[(
        "test",
        vec![mock.url()],
        "max_subscriptions_per_session = 3\nmax_subscriptions_total = 5",
    )])
    .await;
    let addr = tcp_addr(&server, "test");
    let sh: Vec<String> = (0..8).map(scripthash).collect();
    let ok = |v: &Value| {
        assert!(v.get("error").is_none(), "{v}");
        assert_eq!(v["result"], Value::Null, "{v}");
    };

    let mut a = Client::connect(addr).await;
    for s in &sh[0..3] {
        ok(&sub(&mut a, s).await);
    }
    let r = sub(&mut a, &sh[3]).await;
    let (code, message) = error_of(&r);
    assert_eq!(code, -32003);
    assert_eq!(message, "too many subscriptions in this session (limit 3)");
    // Holding it already is not a new subscription; headers are not limited.
    ok(&sub(&mut a, &sh[0]).await);
    let tip = a.call("blockchain.headers.subscribe", json!([])).await;
    assert_eq!(tip["height"], 99);
    // Room again after an unsubscribe.
    assert_eq!(
        a.call("blockchain.scripthash.unsubscribe", json!([sh[2]]))
            .await,
        json!(true)
    );
    ok(&sub(&mut a, &sh[3]).await);

    // The coin's total: sh0, sh1, sh3 (a) + sh4, sh5 (b) = 5.
    let mut b = Client::connect(addr).await;
    ok(&sub(&mut b, &sh[4]).await);
    ok(&sub(&mut b, &sh[5]).await);
    let r = sub(&mut b, &sh[6]).await;
    let (code, message) = error_of(&r);
    assert_eq!(code, -32003);
    assert_eq!(
        message,
        "this server holds its maximum of 5 subscriptions for test"
    );
    // An existing subscription is no new one; the refusal did not count
    // against b, who now holds 3.
    ok(&sub(&mut b, &sh[0]).await);
    let r = sub(&mut b, &sh[1]).await;
    assert_eq!(error_of(&r).0, -32003);
    assert_eq!(mock.subscriptions(), 5);
    assert_eq!(mock.count("blockchain.scripthash.subscribe"), 6);

    // Everything else goes on: notifications, reads, other sessions.
    let h: History = vec![(txid(0), 0)];
    mock.set_history(&sh[0], h.clone());
    for c in [&mut a, &mut b] {
        let params = next_notification(c, "blockchain.scripthash.subscribe").await;
        assert_eq!(params, json!([sh[0], status_of(&h)]));
    }
    let history = b
        .call("blockchain.scripthash.get_history", json!([sh[6]]))
        .await;
    assert_eq!(history, json!([]));
    let mut c = Client::connect(addr).await;
    let r = sub(&mut c, &sh[7]).await;
    assert_eq!(error_of(&r).0, -32003);
    let status = c
        .call("blockchain.scripthash.subscribe", json!([sh[0]]))
        .await;
    assert_eq!(status, status_json(&h));

    // a leaves: sh1 and sh3 are released, so c may subscribe anew.
    drop(a);
    wait_until(|| mock.subscriptions() == 3).await;
    ok(&sub(&mut c, &sh[7]).await);
    let h7: History = vec![(txid(7), 0)];
    mock.set_history(&sh[7], h7.clone());
    let params = next_notification(&mut c, "blockchain.scripthash.subscribe").await;
    assert_eq!(params, json!([sh[7], status_of(&h7)]));
    assert_eq!(fence(&mut b).await, Vec::<Value>::new());
    server.shutdown().await;
}

/// The survivor's answer to the re-subscribe is slow, and the status changes
/// in between: the change is seen by the hub before the (older) answer, and
/// must still reach every subscriber. The same for the tip.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_seen_before_the_resubscribe_answer_is_not_lost() {
    const SCRIPTS: usize = 3;
    let a = Mock::start().await;
    let mut b = Mock::start().await;
    let h0: Vec<History> = (0..SCRIPTS).map(|k| vec![(txid(k), 50)]).collect();
    for (k, h) in h0.iter().enumerate() {
        a.set_history_silently(&scripthash(k), h.clone());
        b.set_history_silently(&scripthash(k), h.clone());
    }
    // Only `a` is up while the wallets subscribe: it holds everything.
    b.stop();
    let server = start_proxy(&config(&[("test", vec![a.url(), b.url()], "")])).await;
    wait_ready(&server, "test").await;
    let addr = tcp_addr(&server, "test");
    let mut clients = Vec::new();
    for (k, h) in h0.iter().enumerate() {
        let mut c = Client::connect(addr).await;
        let status = c
            .call("blockchain.scripthash.subscribe", json!([scripthash(k)]))
            .await;
        assert_eq!(status, status_json(h));
        c.call("blockchain.headers.subscribe", json!([])).await;
        clients.push(c);
    }
    assert_eq!(a.subscriptions(), SCRIPTS);
    b.restart().await;
    wait_until(|| {
        server.upstreams()["test"]
            .iter()
            .all(|u| u.ready_connections > 0)
    })
    .await;

    // `b` answers late: its notifications overtake its answers.
    b.set_delay(std::time::Duration::from_millis(800));
    a.stop();
    wait_until(|| b.subscriptions() == SCRIPTS).await;
    let h1 = each_paid_again(&h0, 100);
    for (k, h) in h1.iter().enumerate() {
        b.set_history(&scripthash(k), h.clone());
    }
    expect_statuses(&mut clients, &h1).await;
    b.set_delay(std::time::Duration::ZERO);
    // And later changes arrive as usual.
    let h2: History = vec![(txid(999), 0)];
    b.set_history(&scripthash(0), h2.clone());
    let params = next_notification(&mut clients[0], "blockchain.scripthash.subscribe").await;
    assert_eq!(params, json!([scripthash(0), status_of(&h2)]));
    for c in clients.iter_mut() {
        let seen = fence(c).await;
        // The tip did not move: at most nothing about headers.
        assert!(
            seen.iter()
                .all(|v| v["method"] == "blockchain.headers.subscribe"
                    && v["params"][0]["height"] == 99),
            "{seen:?}"
        );
    }
    server.shutdown().await;
}

/// A session that leaves, or unsubscribes, before the upstream answered its
/// first subscribe leaves nothing behind: neither in the hub nor upstream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leaving_before_the_first_answer_leaves_nothing_behind() {
    let mock = Mock::start().await;
    let server = proxy(&[("test", vec![mock.url()], "")]).await;
    let addr = tcp_addr(&server, "test");
    let stats = hub_stats(&server, "test");
    mock.set_delay(std::time::Duration::from_millis(300));

    let mut a = Client::connect(addr).await;
    a.send(&json!({"jsonrpc":"2.0","id":1,"method":"blockchain.scripthash.subscribe","params":[scripthash(1)]}))
        .await;
    wait_until(|| mock.subscriptions() == 1).await;
    drop(a);
    wait_until(|| {
        mock.subscriptions() == 0 && stats.upstream_subscriptions.load(Ordering::Relaxed) == 0
    })
    .await;
    assert_eq!(mock.count("blockchain.scripthash.unsubscribe"), 1);
    assert_eq!(stats.session_subscriptions.load(Ordering::Relaxed), 0);

    // Subscribe and unsubscribe back to back: answered in order, as
    // ElectrumX does (the subscribe gets its status, the unsubscribe true).
    let mut b = Client::connect(addr).await;
    b.send_raw(
        format!(
            "{}\n{}\n",
            json!({"jsonrpc":"2.0","id":1,"method":"blockchain.scripthash.subscribe","params":[scripthash(2)]}),
            json!({"jsonrpc":"2.0","id":2,"method":"blockchain.scripthash.unsubscribe","params":[scripthash(2)]})
        )
        .as_bytes(),
    )
    .await;
    let mut answers = [b.recv().await, b.recv().await];
    answers.sort_by_key(|v| v["id"].as_u64());
    assert_eq!(answers[0]["result"], Value::Null, "{:?}", answers[0]);
    assert_eq!(answers[1]["result"], json!(true));
    wait_until(|| {
        mock.subscriptions() == 0 && stats.upstream_subscriptions.load(Ordering::Relaxed) == 0
    })
    .await;
    mock.set_delay(std::time::Duration::ZERO);
    // The session goes on.
    let status = b
        .call("blockchain.scripthash.subscribe", json!([scripthash(3)]))
        .await;
    assert_eq!(status, Value::Null);
    assert_eq!(stats.upstream_subscriptions.load(Ordering::Relaxed), 1);
    server.shutdown().await;
}

/// A subscribe while no upstream is available fails at once, and leaves no
/// entry that would be subscribed upstream later for nobody.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscribe_without_upstreams_fails_and_leaves_no_orphan() {
    let mut mock = Mock::start().await;
    mock.stop();
    let server = start_proxy(&config(&[("test", vec![mock.url()], "")])).await;
    let addr = tcp_addr(&server, "test");
    let stats = hub_stats(&server, "test");
    let mut c = Client::connect(addr).await;
    let r = c
        .request("blockchain.scripthash.subscribe", json!([scripthash(1)]))
        .await;
    let (code, message) = error_of(&r);
    assert_eq!(code, -32001);
    assert!(message.contains("no upstream"), "{message}");
    assert_eq!(stats.upstream_subscriptions.load(Ordering::Relaxed), 0);
    assert_eq!(stats.session_subscriptions.load(Ordering::Relaxed), 0);

    mock.restart().await;
    wait_ready(&server, "test").await;
    let status = c
        .call("blockchain.scripthash.subscribe", json!([scripthash(2)]))
        .await;
    assert_eq!(status, Value::Null);
    assert_eq!(stats.upstream_subscriptions.load(Ordering::Relaxed), 1);
    assert_eq!(mock.subscriptions(), 1);
    // The refused one can be subscribed now.
    let status = c
        .call("blockchain.scripthash.subscribe", json!([scripthash(1)]))
        .await;
    assert_eq!(status, Value::Null);
    assert_eq!(mock.subscriptions(), 2);
    server.shutdown().await;
}
