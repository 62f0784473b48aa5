//! `blockchain.outpoint.*` (protocol 1.7) through the proxy: emulated over a
//! protocol-1.4 upstream (from the output script's history), native on a
//! 1.7 one (the mock as ElectrumX 2.0), emulated again when a 1.7 upstream
//! cannot serve outpoints or goes away; one upstream subscription per
//! outpoint (or per script, emulated) however many wallets watch it, and
//! a spend notified in ElectrumX 2.0's exact shape either way.

mod support;

use electrum_client::bitcoin::consensus::encode::serialize_hex;
use electrum_client::bitcoin::hashes::Hash;
use electrum_client::bitcoin::{
    absolute, transaction, Amount, OutPoint, ScriptBuf, Sequence, Transaction, TxIn, TxOut, Txid,
    Witness,
};
use electrum_lb::protocol::V1_7;
use electrum_lb::upstream::{Capability, Need};
use electrum_lb::Server;
use serde_json::{json, Value};
use std::str::FromStr;
use support::mock::{Mock, MockOptions};
use support::*;

fn script(n: u8) -> ScriptBuf {
    let mut s = vec![0x76, 0xa9, 0x14];
    s.extend([n; 20]);
    s.extend([0x88, 0xac]);
    ScriptBuf::from_bytes(s)
}

fn scripthash_of(s: &ScriptBuf) -> String {
    use sha2::Digest;
    let mut h = sha2::Sha256::digest(s.as_bytes()).to_vec();
    h.reverse();
    hex::encode(h)
}

/// A transaction spending `inputs`, paying each of `outputs`.
fn tx(inputs: &[(&str, u32)], outputs: &[&ScriptBuf]) -> String {
    let tx = Transaction {
        version: transaction::Version::ONE,
        lock_time: absolute::LockTime::ZERO,
        input: inputs
            .iter()
            .map(|(t, v)| TxIn {
                previous_output: OutPoint::new(Txid::from_str(t).unwrap(), *v),
                script_sig: ScriptBuf::new(),
                sequence: Sequence::MAX,
                witness: Witness::new(),
            })
            .collect(),
        output: outputs
            .iter()
            .map(|s| TxOut {
                value: Amount::from_sat(5000),
                script_pubkey: (*s).clone(),
            })
            .collect(),
    };
    serialize_hex(&tx)
}

/// A funding transaction at height 50 whose output 0 pays `watched`, and
/// a transaction spending it (not yet known to the upstreams).
struct Scene {
    watched: ScriptBuf,
    sh: String,
    fund: String,
    spend_raw: String,
    spend: String,
}

impl Scene {
    fn new() -> Scene {
        let watched = script(7);
        let prev = Txid::all_zeros().to_string();
        let fund_raw = tx(&[(&prev, 3)], &[&watched, &script(8)]);
        let fund = support::mock::txid_of(&fund_raw);
        let spend_raw = tx(&[(&fund, 0)], &[&script(9)]);
        let spend = support::mock::txid_of(&spend_raw);
        let scene = Scene {
            sh: scripthash_of(&watched),
            watched,
            fund,
            spend_raw,
            spend,
        };
        SCENE_FUND.with(|f| *f.borrow_mut() = fund_raw);
        scene
    }

    /// Teach `mock` the funding transaction and the script's history.
    fn fund(&self, mock: &Mock) {
        SCENE_FUND.with(|f| mock.add_tx(&f.borrow()));
        mock.set_history(&self.sh, vec![(self.fund.clone(), 50)]);
    }

    /// The spend reaches `mock`'s mempool (or a block, with `height`).
    fn spend(&self, mock: &Mock, height: i64) {
        mock.add_tx(&self.spend_raw);
        mock.set_history(
            &self.sh,
            vec![(self.fund.clone(), 50), (self.spend.clone(), height)],
        );
    }

    fn spk(&self) -> String {
        hex::encode(self.watched.as_bytes())
    }

    fn funded(&self) -> Value {
        json!({"funder_height": 50})
    }

    fn spent(&self, height: i64) -> Value {
        json!({"funder_height": 50, "spender_txhash": self.spend, "spender_height": height})
    }
}

thread_local! {
    static SCENE_FUND: std::cell::RefCell<String> = const { std::cell::RefCell::new(String::new()) };
}

async fn upstream(v17: bool, seed: u8) -> Mock {
    Mock::start_with(MockOptions {
        strict: true,
        seed,
        protocol_max: v17.then(|| "1.7.0".to_string()),
        ..Default::default()
    })
    .await
}

async fn wait_for_1_7(server: &Server) {
    let pool = server.coins["test"].router.pool.clone();
    wait_until(|| pool.capability(Need::at_least(V1_7)) == Capability::Now).await;
}

async fn wallet(server: &Server) -> Client {
    let mut c = Client::connect(tcp_addr(server, "test")).await;
    c.call("server.version", json!(["t", ["1.4", "1.7"]])).await;
    c
}

#[tokio::test]
async fn outpoints_are_emulated_over_a_1_4_upstream() {
    let mock = upstream(false, 0).await;
    let server = proxy_for(&[mock.url()]).await;
    let s = Scene::new();
    s.fund(&mock);
    let stats = server.coins["test"].router.hub.stats.clone();

    // With the script hint, and without it (the funding transaction says).
    let mut a = wallet(&server).await;
    let mut b = wallet(&server).await;
    let sub = "blockchain.outpoint.subscribe";
    assert_eq!(a.call(sub, json!([s.fund, 0, s.spk()])).await, s.funded());
    assert_eq!(b.call(sub, json!([s.fund, 0])).await, s.funded());
    // One upstream subscription: the script's.
    assert_eq!(mock.count("blockchain.scripthash.subscribe"), 1);
    assert_eq!(mock.subscriptions(), 1);
    assert_eq!(mock.count(sub), 0);
    assert_eq!(
        stats.outpoints.load(std::sync::atomic::Ordering::Relaxed),
        1
    );
    assert_eq!(
        stats
            .outpoints_emulated
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );

    // get_status agrees; unknown outputs are `{}`, as on ElectrumX.
    let status = "blockchain.outpoint.get_status";
    assert_eq!(
        a.call(status, json!([s.fund, 0, s.spk()])).await,
        s.funded()
    );
    assert_eq!(
        a.call(status, json!([txid(4), 0, s.spk()])).await,
        json!({})
    );
    assert_eq!(a.call(status, json!([s.fund, 5])).await, json!({}));
    // Output 1 pays another script: not this script's output.
    assert_eq!(a.call(status, json!([s.fund, 1, s.spk()])).await, json!({}));

    // Spent in the mempool, then mined: both wallets told each time.
    s.spend(&mock, 0);
    let note = json!([s.fund, 0, s.spent(0)]);
    assert_eq!(a.notification(sub).await, note);
    assert_eq!(b.notification(sub).await, note);
    s.spend(&mock, 51);
    let note = json!([s.fund, 0, s.spent(51)]);
    assert_eq!(a.notification(sub).await, note);
    assert_eq!(b.notification(sub).await, note);
    assert_eq!(
        a.call(status, json!([s.fund, 0, s.spk()])).await,
        s.spent(51)
    );

    // Leaving: the script's subscription goes with the last watcher.
    let unsub = "blockchain.outpoint.unsubscribe";
    assert_eq!(a.call(unsub, json!([s.fund, 0])).await, json!(true));
    assert_eq!(a.call(unsub, json!([s.fund, 0])).await, json!(false));
    assert_eq!(mock.subscriptions(), 1);
    drop(b);
    wait_until(|| mock.subscriptions() == 0).await;
    wait_until(|| stats.outpoints.load(std::sync::atomic::Ordering::Relaxed) == 0).await;
    server.shutdown().await;
}

#[tokio::test]
async fn outpoints_are_native_on_a_1_7_upstream() {
    let mock = upstream(true, 0).await;
    let server = proxy_for(&[mock.url()]).await;
    wait_for_1_7(&server).await;
    let s = Scene::new();
    s.fund(&mock);

    let sub = "blockchain.outpoint.subscribe";
    let mut a = wallet(&server).await;
    let mut b = wallet(&server).await;
    assert_eq!(a.call(sub, json!([s.fund, 0, s.spk()])).await, s.funded());
    assert_eq!(b.call(sub, json!([s.fund, 0, s.spk()])).await, s.funded());
    // One upstream outpoint subscription, on the 1.7 connection.
    assert_eq!(mock.count(sub), 1);
    assert_eq!(mock.outpoint_subscriptions(), 1);
    assert_eq!(mock.count("blockchain.scripthash.subscribe"), 0);

    s.spend(&mock, 0);
    let note = json!([s.fund, 0, s.spent(0)]);
    assert_eq!(a.notification(sub).await, note);
    assert_eq!(b.notification(sub).await, note);
    let status = "blockchain.outpoint.get_status";
    assert_eq!(
        b.call(status, json!([s.fund, 0, s.spk()])).await,
        s.spent(0)
    );
    assert_eq!(mock.count(status), 1);

    let unsub = "blockchain.outpoint.unsubscribe";
    assert_eq!(a.call(unsub, json!([s.fund, 0])).await, json!(true));
    assert_eq!(b.call(unsub, json!([s.fund, 0])).await, json!(true));
    wait_until(|| mock.outpoint_subscriptions() == 0).await;
    server.shutdown().await;
}

#[tokio::test]
async fn a_1_7_upstream_that_cannot_serve_outpoints_is_emulated() {
    let mock = upstream(true, 0).await;
    mock.set_outpoint_refusal(true);
    let server = proxy_for(&[mock.url()]).await;
    wait_for_1_7(&server).await;
    let s = Scene::new();
    s.fund(&mock);

    let sub = "blockchain.outpoint.subscribe";
    let mut a = wallet(&server).await;
    assert_eq!(a.call(sub, json!([s.fund, 0, s.spk()])).await, s.funded());
    assert_eq!(
        a.call(
            "blockchain.outpoint.get_status",
            json!([s.fund, 0, s.spk()])
        )
        .await,
        s.funded()
    );
    s.spend(&mock, 0);
    assert_eq!(a.notification(sub).await, json!([s.fund, 0, s.spent(0)]));
    // Asked once, refused, not asked again.
    assert_eq!(mock.count(sub), 1);
    server.shutdown().await;
}

#[tokio::test]
async fn an_outpoint_moves_from_a_lost_1_7_upstream_to_emulation() {
    let native = upstream(true, 3).await;
    let old = upstream(false, 3).await;
    let s = Scene::new();
    s.fund(&native);
    s.fund(&old);
    let server = proxy_for(&[native.url(), old.url()]).await;
    wait_for_1_7(&server).await;

    let sub = "blockchain.outpoint.subscribe";
    let mut a = wallet(&server).await;
    assert_eq!(a.call(sub, json!([s.fund, 0, s.spk()])).await, s.funded());
    assert_eq!(native.outpoint_subscriptions(), 1);

    // The 1.7 upstream goes: the outpoint is watched through the other's
    // history of the script; nothing changed, so nothing is announced.
    native.stop();
    let stats = server.coins["test"].router.hub.stats.clone();
    wait_until(|| {
        stats
            .outpoints_emulated
            .load(std::sync::atomic::Ordering::Relaxed)
            == 1
    })
    .await;
    wait_until(|| old.subscriptions() == 1).await;

    // The spend, seen by the remaining (1.4) upstream, reaches the wallet.
    s.spend(&old, 0);
    assert_eq!(a.notification(sub).await, json!([s.fund, 0, s.spent(0)]));
    server.shutdown().await;
}

#[tokio::test]
async fn outpoints_count_against_the_subscription_limits() {
    let mock = upstream(false, 0).await;
    let server = proxy_with(&[mock.url()], "max_subscriptions_per_session = 2").await;
    let s = Scene::new();
    s.fund(&mock);
    let mut a = wallet(&server).await;
    a.call("blockchain.scriptpubkey.subscribe", json!(["51"]))
        .await;
    a.call("blockchain.outpoint.subscribe", json!([s.fund, 0, s.spk()]))
        .await;
    let r = a
        .request("blockchain.outpoint.subscribe", json!([s.fund, 1, s.spk()]))
        .await;
    assert_eq!(r["error"]["code"], -32003, "{r}");
    // Bad params are the client's error, and cost nothing.
    let r = a
        .request("blockchain.outpoint.subscribe", json!(["xx", 0]))
        .await;
    assert_eq!(r["error"]["code"], 1, "{r}");
    server.shutdown().await;
}
