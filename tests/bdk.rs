//! A real client nobody here wrote: BDK's `electrum-client` 0.25 through the
//! proxy, over TCP and over TLS, against the mock upstream.
mod support;

use electrum_client::bitcoin::consensus::encode::{deserialize, serialize_hex};
use electrum_client::bitcoin::{block, ScriptBuf, Transaction, Txid};
use electrum_client::{ConfigBuilder, ElectrumApi, ToElectrumScriptHash};
use std::str::FromStr;
use support::mock::{status_of, Mock};
use support::*;

/// A minimal valid serialized transaction: version 1, one input spending
/// output `vout` of a made-up txid, one P2PKH output of `value` satoshis,
/// locktime 0.
fn raw_tx(vout: u32, value: u64) -> String {
    let mut tx = String::new();
    tx.push_str("01000000"); // version
    tx.push_str("01"); // one input
    tx.push_str(&"11".repeat(32)); // previous txid
    tx.push_str(&hex::encode(vout.to_le_bytes()));
    tx.push_str("00"); // empty scriptSig
    tx.push_str("ffffffff"); // sequence
    tx.push_str("01"); // one output
    tx.push_str(&hex::encode(value.to_le_bytes()));
    tx.push_str("19"); // script length 25
    tx.push_str(&format!("76a914{}88ac", "22".repeat(20)));
    tx.push_str("00000000"); // locktime
    tx
}

/// A P2PKH output script paying to a hash made of `b`.
fn p2pkh(b: u8) -> ScriptBuf {
    ScriptBuf::from_bytes(hex::decode(format!("76a914{}88ac", hex::encode([b; 20]))).unwrap())
}

fn electrum_scripthash(script: &ScriptBuf) -> String {
    hex::encode(*script.to_electrum_scripthash())
}

/// What the test sets up in the mock, and what the client must get back.
struct Expected {
    tip_height: usize,
    tip_hex: String,
    genesis: String,
    /// (script, history) per script, in the order asked.
    histories: Vec<(ScriptBuf, Vec<(String, i64)>)>,
    tx_hex: String,
    txid: String,
}

fn prepare(mock: &Mock) -> Expected {
    let (tip, tip_hex) = mock.tip();
    let tx_hex = raw_tx(0, 50_000);
    let txid = mock.add_tx(&tx_hex);
    let paid = p2pkh(0xaa);
    let history = vec![(txid.clone(), 42), (txid_n(2), 0)];
    mock.set_history(&electrum_scripthash(&paid), history.clone());
    let other = p2pkh(0xbb);
    mock.set_history(&electrum_scripthash(&other), vec![(txid_n(3), 7)]);
    let empty = p2pkh(0xcc);
    Expected {
        tip_height: tip as usize,
        tip_hex,
        genesis: mock.genesis_hash(),
        histories: vec![
            (paid, history),
            (empty, Vec::new()),
            (other, vec![(txid_n(3), 7)]),
        ],
        tx_hex,
        txid,
    }
}

fn txid_n(i: usize) -> String {
    support::txid(i)
}

/// Everything the wallet does, blocking, as a BDK wallet would.
fn run_wallet(url: String, expected: Expected) {
    // Both ring and aws-lc-rs may be compiled in: pick one for rustls.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let config = ConfigBuilder::new()
        .validate_domain(false)
        .timeout(Some(std::time::Duration::from_secs(10)))
        .retry(0)
        .build();
    let client = electrum_client::Client::from_config(&url, config)
        .unwrap_or_else(|e| panic!("connecting to {url}: {e:?}"));

    // It negotiated the top of its range ([1.4, 1.6]) on connecting.
    assert_eq!(client.protocol_version().unwrap(), "1.6");

    let tip = client.block_headers_subscribe().unwrap();
    assert_eq!(tip.height, expected.tip_height);
    let tip_header: block::Header = deserialize(&hex::decode(&expected.tip_hex).unwrap()).unwrap();
    assert_eq!(tip.header, tip_header);
    assert_eq!(serialize_hex(&tip.header), expected.tip_hex);

    let scripts: Vec<&electrum_client::bitcoin::Script> = expected
        .histories
        .iter()
        .map(|(s, _)| s.as_script())
        .collect();
    let histories = client.batch_script_get_history(scripts).unwrap();
    assert_eq!(histories.len(), expected.histories.len());
    for (got, (script, want)) in histories.iter().zip(&expected.histories) {
        let got: Vec<(Txid, i32)> = got.iter().map(|h| (h.tx_hash, h.height)).collect();
        let want: Vec<(Txid, i32)> = want
            .iter()
            .map(|(t, h)| (Txid::from_str(t).unwrap(), *h as i32))
            .collect();
        assert_eq!(got, want, "history of {script}");
    }

    let txid = Txid::from_str(&expected.txid).unwrap();
    let tx: Transaction = client.transaction_get(&txid).unwrap();
    assert_eq!(tx.compute_txid(), txid);
    assert_eq!(serialize_hex(&tx), expected.tx_hex);
    assert_eq!(tx.output[0].value.to_sat(), 50_000);

    let fee = client.estimate_fee(6, None).unwrap();
    assert_eq!(fee, 0.0001);

    // A few more of what wallets call on connect.
    client.ping().unwrap();
    let features = client.server_features().unwrap();
    assert_eq!(features.protocol_max, "1.7");
    assert_eq!(hex::encode(features.genesis_hash), expected.genesis);
    let (paid, history) = &expected.histories[0];
    let status = client.script_subscribe(paid).unwrap();
    assert_eq!(
        status.map(|s| hex::encode(*s)),
        status_of(history),
        "status of {paid}"
    );
}

async fn wallet_through(scheme: electrum_lb::config::Scheme) {
    let mock = Mock::start().await;
    let server = proxy_for(&[mock.url()]).await;
    let addr = server.addr("test", scheme).unwrap();
    let url = format!("{}://{addr}", scheme.as_str());
    let expected = prepare(&mock);
    tokio::task::spawn_blocking(move || run_wallet(url, expected))
        .await
        .unwrap();
    // Everything but the local methods went through the mock.
    assert!(mock.count("blockchain.transaction.get") >= 1);
    assert!(mock.count("blockchain.scripthash.get_history") >= 1);
    assert_eq!(
        mock.count("server.version"),
        1,
        "only the proxy's handshake"
    );
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bdk_client_over_tcp() {
    wallet_through(electrum_lb::config::Scheme::Tcp).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bdk_client_over_tls() {
    wallet_through(electrum_lb::config::Scheme::Ssl).await;
}
