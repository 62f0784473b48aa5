//! Interop with real software nobody on this team wrote: two ElectrumX 2.0
//! servers indexing a Bitcoin SV regtest node, electrum-lb in front of both
//! as one coin, and two real clients through it: BDK's `electrum-client`
//! (here) and the Electrum wallet daemon (driven here through the stack's
//! control script, connected over TLS with `--oneserver`).
//!
//! `interop/run.sh` brings the stack up, exports where it is (`INTEROP_*`)
//! and runs this test with `--ignored`; plain `cargo test` skips it.
//!
//! One timeline, two rounds. In round N the test stops ElectrumX N and pays
//! the BDK address and the wallet's address (round 1 stops first, round 2
//! pays first), checks the mempool notification and the unconfirmed
//! balance, mines a block, checks the block and script notifications and
//! the confirmed balance, and starts ElectrumX N again. Whichever upstream
//! held the subscriptions, one round takes it away. Every notification must
//! arrive exactly once, in order.

use electrum_client::bitcoin::consensus::encode::serialize_hex;
use electrum_client::bitcoin::hashes::Hash;
use electrum_client::bitcoin::{Address, BlockHash, NetworkKind, PubkeyHash, ScriptBuf, Txid};
use electrum_client::{Client, ConfigBuilder, ElectrumApi, GetHistoryRes, Param};
use serde_json::Value;
use sha2::{Digest, Sha256};
use std::path::PathBuf;
use std::process::Command;
use std::str::FromStr;
use std::time::{Duration, Instant};

/// How long any one expected event may take. ElectrumX holds small replies
/// back for up to a second (traffic-analysis padding), so a few seconds per
/// event is normal; a minute means it is not coming.
const WAIT: Duration = Duration::from_secs(60);
/// Pause between two looks at a condition being polled.
const POLL: Duration = Duration::from_millis(100);

/// Each round: (ElectrumX to stop, pay before stopping it, BTC paid to the
/// BDK address, BTC paid to the Electrum wallet's address).
const ROUNDS: [(u8, bool, &str, &str); 2] = [(1, false, "1.25", "2.0"), (2, true, "0.5", "0.75")];

/// The stack `interop/run.sh` brought up.
struct Stack {
    ctl: PathBuf,
    tcp_url: String,
    ssl_url: String,
    miner: String,
    wallet_address: String,
    started: Instant,
}

fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| {
        panic!("{name} is not set: this test needs the stack of interop/run.sh (run that script)")
    })
}

impl Stack {
    fn from_env() -> Stack {
        Stack {
            ctl: env("INTEROP_CTL").into(),
            tcp_url: env("INTEROP_TCP_URL"),
            ssl_url: env("INTEROP_SSL_URL"),
            miner: env("INTEROP_MINER_ADDRESS"),
            wallet_address: env("INTEROP_WALLET_ADDRESS"),
            started: Instant::now(),
        }
    }

    fn step(&self, what: &str) {
        eprintln!("[{:6.1}s] {what}", self.started.elapsed().as_secs_f64());
    }

    /// Run the control script; its stdout is one JSON value.
    fn ctl(&self, args: &[&str]) -> Value {
        let out = Command::new(&self.ctl)
            .args(args)
            .output()
            .expect("run the interop control script");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "ctl {args:?} failed: {}{stdout}",
            String::from_utf8_lossy(&out.stderr)
        );
        if stdout.trim().is_empty() {
            return Value::Null;
        }
        serde_json::from_str(stdout.trim())
            .unwrap_or_else(|e| panic!("ctl {args:?}: not JSON ({e}): {stdout}"))
    }

    fn rpc(&self, method: &str, args: &[&str]) -> Value {
        let mut all = vec!["rpc", method];
        all.extend_from_slice(args);
        self.ctl(&all)
    }

    fn height(&self) -> usize {
        self.rpc("getblockcount", &[]).as_u64().unwrap() as usize
    }

    fn block_hash(&self, height: usize) -> BlockHash {
        let hash = self.rpc("getblockhash", &[&height.to_string()]);
        BlockHash::from_str(hash.as_str().unwrap()).unwrap()
    }

    /// A P2PKH address whose hash is derived from `label`: nobody holds its
    /// key, so the node's wallet never spends what it receives (an address
    /// of the node's wallet would see its coins used as inputs of the next
    /// payment). The node must read it as the same script.
    fn address(&self, label: &str) -> (String, ScriptBuf) {
        let digest = Sha256::digest(format!("interop: {label}").as_bytes());
        let hash = PubkeyHash::from_slice(&digest[..20]).unwrap();
        let address = Address::p2pkh(hash, NetworkKind::Test);
        let script = address.script_pubkey();
        assert_eq!(self.script_of(&address.to_string()), script, "{address}");
        (address.to_string(), script)
    }

    fn script_of(&self, address: &str) -> ScriptBuf {
        let info = self.rpc("validateaddress", &[address]);
        ScriptBuf::from_bytes(hex::decode(info["scriptPubKey"].as_str().unwrap()).unwrap())
    }

    /// Pay `btc` to `address` from the node's wallet; the txid.
    fn pay(&self, address: &str, btc: &str) -> Txid {
        let txid = self.rpc("sendtoaddress", &[address, btc]);
        Txid::from_str(txid.as_str().unwrap()).unwrap()
    }

    /// The height ElectrumX reports for a mempool transaction: -1 when one
    /// of its inputs is unconfirmed too, else 0.
    fn mempool_height(&self, txid: &Txid) -> i64 {
        let entry = self.rpc("getmempoolentry", &[&txid.to_string()]);
        match entry["depends"].as_array() {
            Some(d) if !d.is_empty() => -1,
            _ => 0,
        }
    }

    /// Mine one block; its height and hash.
    fn mine(&self) -> (usize, BlockHash) {
        let hashes = self.rpc("generatetoaddress", &["1", &self.miner]);
        let hash = BlockHash::from_str(hashes[0].as_str().unwrap()).unwrap();
        (self.height(), hash)
    }

    fn stop_electrumx(&self, n: u8) {
        self.ctl(&["electrumx", "stop", &n.to_string()]);
    }

    /// Start ElectrumX `n` and wait until electrum-lb has it back in rotation.
    fn start_electrumx(&self, n: u8) {
        self.ctl(&["electrumx", "start", &n.to_string()]);
        self.ctl(&["wait-upstream", &n.to_string(), "up"]);
    }

    /// The Electrum wallet's balance in satoshis: (confirmed, unconfirmed).
    fn wallet_balance(&self) -> (u64, u64) {
        let b = self.ctl(&["wallet", "getbalance"]);
        let sats = |key: &str| b.get(key).map(|v| btc_to_sats(v.as_str().unwrap()));
        assert!(
            b.get("unmatured").is_none(),
            "watch-only wallet reports unmatured coins: {b}"
        );
        (sats("confirmed").unwrap(), sats("unconfirmed").unwrap_or(0))
    }

    /// Poll the wallet until its balance is `want`.
    fn wait_wallet_balance(&self, want: (u64, u64)) {
        let deadline = Instant::now() + WAIT;
        loop {
            let got = self.wallet_balance();
            if got == want {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the Electrum wallet's balance (confirmed, unconfirmed) stayed {got:?}, expected {want:?}"
            );
            std::thread::sleep(POLL);
        }
    }

    /// The wallet daemon is still connected, to the proxy, and at `height`.
    fn check_wallet_server(&self, height: usize) {
        let deadline = Instant::now() + WAIT;
        loop {
            let info = self.ctl(&["electrum", "getinfo"]);
            let at = |k: &str| info[k].as_u64() == Some(height as u64);
            if info["connected"] == Value::Bool(true)
                && at("server_height")
                && at("blockchain_height")
            {
                assert_eq!(info["server"], "127.0.0.1", "{info}");
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the Electrum wallet is not connected at height {height}: {info}"
            );
            std::thread::sleep(POLL);
        }
    }
}

/// "1.25" BTC -> 125000000 satoshis, exactly (Electrum prints decimals).
fn btc_to_sats(text: &str) -> u64 {
    let (whole, frac) = text.split_once('.').unwrap_or((text, ""));
    assert!(frac.len() <= 8, "more than 8 decimals: {text}");
    let whole: u64 = if whole.is_empty() {
        0
    } else {
        whole.parse().unwrap()
    };
    let frac: u64 = format!("{frac:0<8}").parse().unwrap();
    whole * 100_000_000 + frac
}

/// The Electrum status of a history: sha256 of "txid:height:" for each item.
fn status_of(history: &[(Txid, i64)]) -> Option<String> {
    if history.is_empty() {
        return None;
    }
    let text: String = history.iter().map(|(t, h)| format!("{t}:{h}:")).collect();
    Some(hex::encode(Sha256::digest(text.as_bytes())))
}

fn as_pairs(history: &[GetHistoryRes]) -> Vec<(Txid, i64)> {
    history
        .iter()
        .map(|h| (h.tx_hash, h.height as i64))
        .collect()
}

fn client(url: &str) -> Client {
    // retry(0): a dropped session must fail the test, not be papered over by
    // a silent reconnect (which would also lose the subscriptions).
    let config = ConfigBuilder::new()
        .validate_domain(false)
        .timeout(Some(Duration::from_secs(30)))
        .retry(0)
        .build();
    Client::from_config(url, config).unwrap_or_else(|e| panic!("connect to {url}: {e}"))
}

/// The status notification for `script`: exactly one, equal to `want`. A
/// missed notification, a foreign status, or a status that goes back and
/// forth while a subscription moves to an upstream whose mempool lags (the
/// proxy holds the status it announced instead) fails.
fn expect_script_notification(c: &Client, script: &ScriptBuf, want: &Option<String>) {
    let deadline = Instant::now() + WAIT;
    loop {
        // A request makes the client read what the server has pushed.
        c.ping().expect("ping through electrum-lb");
        if let Some(status) = c.script_pop(script).unwrap() {
            let got = Some(hex::encode(*status));
            assert_eq!(&got, want, "script notification");
            c.ping().unwrap();
            assert_eq!(
                c.script_pop(script).unwrap(),
                None,
                "a second script notification after {want:?}"
            );
            return;
        }
        assert!(
            Instant::now() < deadline,
            "no notification with status {want:?}"
        );
        std::thread::sleep(POLL);
    }
}

/// The header notification for the block just mined, and nothing else.
fn expect_header_notification(c: &Client, height: usize, hash: BlockHash) {
    let deadline = Instant::now() + WAIT;
    loop {
        c.ping().expect("ping through electrum-lb");
        if let Some(n) = c.block_headers_pop().unwrap() {
            assert_eq!(
                (n.height, n.header.block_hash()),
                (height, hash),
                "header notification"
            );
            c.ping().unwrap();
            assert!(
                c.block_headers_pop().unwrap().is_none(),
                "a second header notification for one block"
            );
            return;
        }
        assert!(
            Instant::now() < deadline,
            "no header notification for height {height}"
        );
        std::thread::sleep(POLL);
    }
}

#[test]
#[ignore = "needs the real stack: run interop/run.sh"]
fn real_electrumx_bdk_and_electrum_wallet() {
    let stack = Stack::from_env();

    // Subscriptions over TLS, one-off queries over TCP: both listeners.
    let sub = client(&stack.ssl_url);
    let query = client(&stack.tcp_url);

    let mut height = stack.height();
    let tip = sub.block_headers_subscribe().unwrap();
    assert_eq!(
        (tip.height, tip.header.block_hash()),
        (height, stack.block_hash(height)),
        "headers.subscribe answers the node's tip"
    );
    stack.step(&format!(
        "BDK over TLS: headers.subscribe at height {height}"
    ));

    let (address, script) = stack.address("BDK");
    let (_, unused) = stack.address("unused");
    let wallet_script = stack.script_of(&stack.wallet_address);
    assert_eq!(
        sub.script_subscribe(&script).unwrap(),
        None,
        "a new address has no history"
    );
    assert_eq!(
        stack.wallet_balance(),
        (0, 0),
        "the wallet starts with nothing"
    );
    stack.step(&format!(
        "BDK subscribed to {address}; the Electrum wallet watching {} has nothing",
        stack.wallet_address
    ));

    // (txid, amount in satoshis, height) of what each address received.
    let mut paid: Vec<(Txid, u64, usize)> = Vec::new();
    let mut wallet_paid: Vec<(Txid, u64, usize)> = Vec::new();
    let mut history: Vec<(Txid, i64)> = Vec::new();
    // Round 1 stops ElectrumX 1 and then pays: the subscriptions it held are
    // moved before the payment exists. Round 2 pays and then stops
    // ElectrumX 2 at once: its mempool notification races the move, and the
    // proxy must either relay it or notice the changed status when it
    // subscribes again elsewhere.
    for (n, pay_first, btc, wallet_btc) in ROUNDS {
        let pay = || {
            (
                stack.pay(&address, btc),
                stack.pay(&stack.wallet_address, wallet_btc),
            )
        };
        let (txid, wallet_txid) = if pay_first {
            let paid = pay();
            stack.stop_electrumx(n);
            paid
        } else {
            stack.stop_electrumx(n);
            pay()
        };
        stack.step(&format!(
            "round {n}: paid {btc} to BDK ({txid}) and {wallet_btc} to the wallet {} stopping ElectrumX {n}",
            if pay_first { "before" } else { "after" }
        ));

        history.push((txid, stack.mempool_height(&txid)));
        expect_script_notification(&sub, &script, &status_of(&history));
        let got = query.script_get_history(&script).unwrap();
        assert_eq!(
            as_pairs(&got),
            history,
            "history after the mempool notification"
        );
        let confirmed: u64 = wallet_paid.iter().map(|p| p.1).sum();
        stack.wait_wallet_balance((confirmed, btc_to_sats(wallet_btc)));
        stack.step(&format!(
            "round {n}: BDK notified of the mempool payment; the wallet shows {wallet_btc} unconfirmed"
        ));
        stack.ctl(&["wait-upstream", &n.to_string(), "down"]);

        let (h, hash) = stack.mine();
        assert_eq!(h, height + 1);
        height = h;
        expect_header_notification(&sub, height, hash);
        history.last_mut().unwrap().1 = height as i64;
        expect_script_notification(&sub, &script, &status_of(&history));
        paid.push((txid, btc_to_sats(btc), height));
        wallet_paid.push((wallet_txid, btc_to_sats(wallet_btc), height));
        let confirmed: u64 = wallet_paid.iter().map(|p| p.1).sum();
        stack.wait_wallet_balance((confirmed, 0));
        stack.check_wallet_server(height);
        stack.step(&format!(
            "round {n}: block {height} mined; BDK notified of the header and the confirmation; the wallet shows {confirmed} sat confirmed"
        ));

        stack.start_electrumx(n);
        stack.step(&format!("round {n}: ElectrumX {n} back in rotation"));
    }

    // Batches over TCP: history, balance and unspent of the paid address,
    // the wallet's address and an unused one.
    let scripts = [
        script.as_script(),
        wallet_script.as_script(),
        unused.as_script(),
    ];
    let histories = query.batch_script_get_history(scripts).unwrap();
    let expected = |p: &[(Txid, u64, usize)]| -> Vec<(Txid, i64)> {
        p.iter().map(|(t, _, h)| (*t, *h as i64)).collect()
    };
    assert_eq!(as_pairs(&histories[0]), expected(&paid), "BDK address");
    assert_eq!(
        as_pairs(&histories[1]),
        expected(&wallet_paid),
        "wallet address"
    );
    assert!(histories[2].is_empty(), "unused address");
    let balances = query.batch_script_get_balance(scripts).unwrap();
    let total = |p: &[(Txid, u64, usize)]| p.iter().map(|x| x.1).sum::<u64>();
    assert_eq!(
        (balances[0].confirmed, balances[0].unconfirmed),
        (total(&paid), 0)
    );
    assert_eq!(
        (balances[1].confirmed, balances[1].unconfirmed),
        (total(&wallet_paid), 0)
    );
    assert_eq!((balances[2].confirmed, balances[2].unconfirmed), (0, 0));
    let unspent = query.batch_script_list_unspent(scripts).unwrap();
    let mut utxos: Vec<(Txid, u64, usize)> = unspent[0]
        .iter()
        .map(|u| (u.tx_hash, u.value, u.height))
        .collect();
    utxos.sort_by_key(|u| u.2);
    assert_eq!(utxos, paid, "unspent outputs of the BDK address");
    assert!(unspent[2].is_empty());
    stack.step("BDK over TCP: batch history, balance and unspent agree with the node");

    // The pre-1.3 address methods, which ElectrumX 2.0 answers with "unknown
    // method": electrum-lb translates them to scripthash calls.
    let by_address = |method: &str| {
        query
            .raw_call(method, [Param::String(address.clone())])
            .unwrap_or_else(|e| panic!("{method}: {e}"))
    };
    let balance = by_address("blockchain.address.get_balance");
    assert_eq!(balance["confirmed"], total(&paid), "{balance}");
    assert_eq!(balance["unconfirmed"], 0, "{balance}");
    let listed = by_address("blockchain.address.get_history");
    let listed: Vec<(String, i64)> = listed
        .as_array()
        .unwrap()
        .iter()
        .map(|h| {
            let txid = h["tx_hash"].as_str().unwrap().to_string();
            (txid, h["height"].as_i64().unwrap())
        })
        .collect();
    let want: Vec<(String, i64)> = paid
        .iter()
        .map(|(t, _, h)| (t.to_string(), *h as i64))
        .collect();
    assert_eq!(listed, want, "blockchain.address.get_history");
    stack.step("legacy blockchain.address.get_balance and get_history translated by the proxy");

    // The raw transaction and its merkle proof, checked against the node.
    for (txid, _, h) in &paid {
        let tx = query.transaction_get(txid).unwrap();
        assert_eq!(tx.compute_txid(), *txid);
        let raw = stack.rpc("getrawtransaction", &[&txid.to_string()]);
        assert_eq!(serialize_hex(&tx), raw.as_str().unwrap(), "raw tx {txid}");
        let vout = unspent[0]
            .iter()
            .find(|u| u.tx_hash == *txid)
            .unwrap()
            .tx_pos;
        assert_eq!(tx.output[vout].script_pubkey, script);

        let merkle = query.transaction_get_merkle(txid, *h).unwrap();
        let block = stack.rpc("getblock", &[&stack.block_hash(*h).to_string()]);
        let position = block["tx"]
            .as_array()
            .unwrap()
            .iter()
            .position(|t| t.as_str() == Some(&txid.to_string()))
            .unwrap();
        assert_eq!((merkle.block_height, merkle.pos), (*h, position));
        let header = query.block_header(*h).unwrap();
        assert_eq!(header.block_hash(), stack.block_hash(*h));
        assert!(
            electrum_client::utils::validate_merkle_proof(txid, &header.merkle_root, &merkle),
            "merkle proof of {txid} against block {h}"
        );
    }
    stack.step("BDK: transaction.get and get_merkle verified against the node's blocks");

    // Nothing left over: no late or duplicate notification on the session.
    sub.ping().unwrap();
    assert_eq!(sub.script_pop(&script).unwrap(), None);
    assert!(sub.block_headers_pop().unwrap().is_none());
    assert_eq!(as_pairs(&sub.script_get_history(&script).unwrap()), history);
    // The wallet's own view: both payments, confirmed at their heights.
    let listed = stack.ctl(&["wallet", "onchain_history"]);
    let seen: Vec<(Txid, u64, usize)> = listed["transactions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| {
            (
                Txid::from_str(t["txid"].as_str().unwrap()).unwrap(),
                btc_to_sats(t["bc_value"].as_str().unwrap()),
                t["height"].as_u64().unwrap() as usize,
            )
        })
        .collect();
    assert_eq!(seen, wallet_paid, "the Electrum wallet's history");
    stack.check_wallet_server(height);
    stack.step("done: both clients kept their sessions through both restarts");
}
