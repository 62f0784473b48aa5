//! A subscription that moves to an upstream which lags behind must not make
//! a status go backwards (the wallet would see S1, S0, S1: a payment that
//! vanishes and comes back), and reads of the scripthash must keep agreeing
//! with the status the wallet was sent. End to end: real sockets on
//! 127.0.0.1, the proxy in-process, two mock ElectrumX upstreams that
//! disagree about one scripthash.
//!
//! No test sleeps and hopes: each waits for a condition (the hub's counters
//! of held statuses and parked reads, a mock's request counts), and "nothing
//! was sent" is checked with a `server.ping` fence, whose answer comes after
//! everything the session was sent before it.
mod support;

use electrum_lb::Server;
use serde_json::{json, Value};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
use support::mock::{status_from_history, status_of, Mock};
use support::*;

type History = Vec<(String, i64)>;

/// Two upstreams with the same history for `sh`, the proxy in front of
/// both with this hold, and a wallet subscribed to `sh`.
struct Setup {
    server: Server,
    /// The upstream holding the wallet's subscription.
    holder: Mock,
    /// The other one: where the subscription moves.
    other: Mock,
    wallet: Client,
    sh: String,
}

/// Past every wait of these tests, so only what a test does ends a hold
/// that is meant to last.
const LONG_HOLD_MS: u64 = 30_000;

async fn setup(hold_ms: u64, h0: &History) -> Setup {
    let a = Mock::start().await;
    let b = Mock::start().await;
    let sh = scripthash(0);
    a.set_history_silently(&sh, h0.clone());
    b.set_history_silently(&sh, h0.clone());
    // A request timeout above the hold (the hold is capped at half of it),
    // and no stall detection within a test's lifetime.
    let text = config_multi(
        &format!(
            "request_timeout_secs = 90\nupstream_stall_secs = 60\nfailover_hold_ms = {hold_ms}"
        ),
        &[(
            "test",
            vec![format!("{:?}", a.url()), format!("{:?}", b.url())],
            "",
        )],
    );
    let server = start_proxy(&text).await;
    wait_until(|| {
        server.upstreams()["test"]
            .iter()
            .all(|u| u.ready_connections > 0)
    })
    .await;
    let (wallet, status) = subscribed_wallet(tcp_addr(&server, "test"), &sh).await;
    assert_eq!(status, json!(status_of(h0)));
    let (holder, other) = if a.subscriptions() == 1 {
        (a, b)
    } else {
        (b, a)
    };
    assert_eq!((holder.subscriptions(), other.subscriptions()), (1, 0));
    Setup {
        server,
        holder,
        other,
        wallet,
        sh,
    }
}

impl Setup {
    /// A payment reaches the holder (only): the wallet is told its status.
    async fn pay_on_holder(&mut self, h1: &History) {
        self.holder.set_history(&self.sh, h1.clone());
        assert_eq!(
            next_status(&mut self.wallet, &self.sh).await,
            json!(status_of(h1))
        );
    }
}

fn stats(server: &Server) -> std::sync::Arc<electrum_lb::hub::HubStats> {
    server.coins["test"].router.hub.stats.clone()
}

fn held(server: &Server) -> usize {
    stats(server).held_statuses.load(Ordering::Relaxed)
}

fn parked(server: &Server) -> usize {
    stats(server).parked_reads.load(Ordering::Relaxed)
}

/// The next message, which must be a status notification for `sh`.
async fn next_status(c: &mut Client, sh: &str) -> Value {
    let v = c.recv().await;
    assert_eq!(v["method"], "blockchain.scripthash.subscribe", "{v}");
    assert_eq!(v["params"][0], json!(sh), "{v}");
    v["params"][1].clone()
}

fn with(h: &History, tx: usize, height: i64) -> History {
    let mut h = h.clone();
    h.push((txid(tx), height));
    h
}

/// The bug this guards against: a payment reaches the holder's mempool
/// (the wallet is told S1), the holder goes away at once, and the other
/// upstream has not seen the payment yet (S0). The wallet must not be told
/// S0; when the other upstream catches up it is told nothing (it has S1).
/// Meanwhile every read of the scripthash waits and then agrees with S1,
/// a new subscriber gets S1, and afterwards everything is back to normal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lagging_upstream_does_not_make_the_status_go_back() {
    let h0: History = vec![(txid(1), 50)];
    let h1 = with(&h0, 2, 0);
    let mut s = setup(LONG_HOLD_MS, &h0).await;
    let addr = tcp_addr(&s.server, "test");

    s.pay_on_holder(&h1).await;
    let history = s
        .wallet
        .call("blockchain.scripthash.get_history", json!([s.sh]))
        .await;
    assert_eq!(status_from_history(&history), status_of(&h1));

    // The holder goes away before the other upstream saw the payment.
    s.holder.stop();
    wait_until(|| held(&s.server) == 1).await;
    assert_eq!(s.other.subscriptions(), 1);
    assert_eq!(
        fence(&mut s.wallet).await,
        Vec::<Value>::new(),
        "S0 announced"
    );

    // Meanwhile: a read (from a session that never subscribed) waits...
    let mut reader = Client::connect(addr).await;
    reader
        .send(&json!({"jsonrpc":"2.0","id":"h","method":"blockchain.scripthash.get_history","params":[s.sh]}))
        .await;
    wait_until(|| parked(&s.server) == 1).await;
    // ... and a new subscriber gets what the others have.
    let mut late = Client::connect(addr).await;
    let status = late
        .call("blockchain.scripthash.subscribe", json!([s.sh]))
        .await;
    assert_eq!(status, json!(status_of(&h1)));
    assert_eq!(s.other.count("blockchain.scripthash.get_history"), 0);

    // The other upstream's mempool catches up: it notifies S1.
    s.other.set_history(&s.sh, h1.clone());
    let answer = reader.recv().await;
    assert_eq!(answer["id"], "h", "{answer}");
    assert_eq!(status_from_history(&answer["result"]), status_of(&h1));
    assert_eq!((held(&s.server), parked(&s.server)), (0, 0));
    assert_eq!(s.other.count("blockchain.scripthash.get_history"), 1);
    for c in [&mut s.wallet, &mut late] {
        assert_eq!(
            fence(c).await,
            Vec::<Value>::new(),
            "a status was announced"
        );
    }

    // Back to normal: reads go straight to the new holder, changes arrive.
    let history = s
        .wallet
        .call("blockchain.scripthash.get_history", json!([s.sh]))
        .await;
    assert_eq!(status_from_history(&history), status_of(&h1));
    let h2 = with(&h1, 3, 0);
    s.other.set_history(&s.sh, h2.clone());
    assert_eq!(
        next_status(&mut s.wallet, &s.sh).await,
        json!(status_of(&h2))
    );
    assert_eq!(next_status(&mut late, &s.sh).await, json!(status_of(&h2)));
    s.server.shutdown().await;
}

/// A status that stays different on the new upstream is real (here the
/// payment was double-spent away and never reaches it): it is announced
/// once the hold ran out, not before, and a read made meanwhile is
/// answered after the announcement, in agreement with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_difference_that_persists_is_announced_after_the_hold() {
    const HOLD: Duration = Duration::from_millis(1500);
    let h0: History = vec![(txid(1), 50)];
    let h1 = with(&h0, 2, 0);
    let mut s = setup(HOLD.as_millis() as u64, &h0).await;
    s.pay_on_holder(&h1).await;

    let stopped = Instant::now();
    s.holder.stop();
    // Once the subscription is on its way to the other upstream, a read
    // waits for it (sent earlier, it could reach the holder before its
    // socket closed, and be answered by it).
    wait_until(|| s.other.subscriptions() == 1).await;
    s.wallet
        .send(&json!({"jsonrpc":"2.0","id":"h","method":"blockchain.scripthash.get_history","params":[s.sh]}))
        .await;
    // First the announcement, then the read's answer, which agrees.
    assert_eq!(
        next_status(&mut s.wallet, &s.sh).await,
        json!(status_of(&h0))
    );
    assert!(
        stopped.elapsed() >= HOLD,
        "announced {:?} after the failover, before the hold ran out",
        stopped.elapsed()
    );
    let answer = s.wallet.recv().await;
    assert_eq!(answer["id"], "h", "{answer}");
    assert_eq!(status_from_history(&answer["result"]), status_of(&h0));
    assert_eq!(fence(&mut s.wallet).await, Vec::<Value>::new());
    assert_eq!((held(&s.server), parked(&s.server)), (0, 0));
    s.server.shutdown().await;
}

/// While the status is held, the new upstream notifies a status that is
/// neither the one it answered nor the one the wallet has: its state
/// changed (another payment), which is news, announced at once without
/// waiting for the hold.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn news_from_the_new_upstream_ends_the_hold_at_once() {
    let h0: History = vec![(txid(1), 50)];
    let h1 = with(&h0, 2, 0);
    let mut s = setup(LONG_HOLD_MS, &h0).await;
    s.pay_on_holder(&h1).await;
    s.holder.stop();
    wait_until(|| held(&s.server) == 1).await;

    // A notification repeating what it answered is not news (the wallet
    // would get S0 first); the next one is.
    let h2 = with(&h0, 3, 0);
    s.other.set_history(&s.sh, h0.clone());
    s.other.set_history(&s.sh, h2.clone());
    assert_eq!(
        next_status(&mut s.wallet, &s.sh).await,
        json!(status_of(&h2))
    );
    wait_until(|| held(&s.server) == 0).await;
    let history = s
        .wallet
        .call("blockchain.scripthash.get_history", json!([s.sh]))
        .await;
    assert_eq!(status_from_history(&history), status_of(&h2));
    assert_eq!(fence(&mut s.wallet).await, Vec::<Value>::new());
    s.server.shutdown().await;
}

/// The wallet asks for the history right after being told S1, and the
/// holder goes away before answering. The read is retried on the upstream
/// the subscription moves to, but only once that one agrees with S1: a
/// retry sent anywhere at once would return the lagging history (S0), a
/// "status mismatch" for the wallet.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_lost_with_the_old_upstream_waits_for_the_new_one() {
    let h0: History = vec![(txid(1), 50)];
    let h1 = with(&h0, 2, 0);
    let mut s = setup(LONG_HOLD_MS, &h0).await;
    s.pay_on_holder(&h1).await;

    // The holder receives the read and never answers it.
    s.holder.set_delay(Duration::from_secs(600));
    s.wallet
        .send(&json!({"jsonrpc":"2.0","id":"h","method":"blockchain.scripthash.get_history","params":[s.sh]}))
        .await;
    // (A history read may be tried on the other upstream first, its
    // answer checked against S1: it disagrees, so it goes to the holder.)
    wait_until(|| s.holder.count("blockchain.scripthash.get_history") == 1).await;
    let tried = s.other.count("blockchain.scripthash.get_history");
    assert!(tried <= 1);
    s.holder.stop();
    wait_until(|| held(&s.server) == 1 && parked(&s.server) == 1).await;
    assert_eq!(s.other.count("blockchain.scripthash.get_history"), tried);
    assert_eq!(fence(&mut s.wallet).await, Vec::<Value>::new());

    s.other.set_history(&s.sh, h1.clone());
    let answer = s.wallet.recv().await;
    assert_eq!(answer["id"], "h", "{answer}");
    assert_eq!(status_from_history(&answer["result"]), status_of(&h1));
    assert_eq!(
        s.other.count("blockchain.scripthash.get_history"),
        tried + 1
    );
    assert_eq!(fence(&mut s.wallet).await, Vec::<Value>::new());
    s.server.shutdown().await;
}

/// A subscription that leaves an upstream which fell behind (out of
/// rotation, still connected) moves to one that is ahead: a different
/// status there is news (here, the payment confirmed in blocks the old
/// upstream has not seen), announced at once rather than held. With a hold,
/// the notification would come after 30 s, past the client's wait.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_status_from_an_upstream_that_is_ahead_is_not_held() {
    let h0: History = vec![(txid(1), 0)];
    let mut s = setup(LONG_HOLD_MS, &h0).await;
    let (tip, _) = s.other.tip();
    let h1: History = vec![(txid(1), tip as i64 + 1)];
    s.other.set_history_silently(&s.sh, h1.clone());
    // max_lag is 2: three blocks and the holder leaves rotation.
    s.other.mine(3);
    assert_eq!(
        next_status(&mut s.wallet, &s.sh).await,
        json!(status_of(&h1))
    );
    assert_eq!(held(&s.server), 0);
    assert_eq!(s.other.subscriptions(), 1);
    s.server.shutdown().await;
}
