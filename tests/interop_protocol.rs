//! Protocol 1.6 and 1.7 sessions through electrum-lb against the real
//! ElectrumX 2.0 of the interop stack (see `interop/run.sh`, which runs
//! this after `tests/interop.rs`; plain `cargo test` skips it).
//!
//! For each level, one session straight to ElectrumX and one through the
//! proxy ask the same methods (pipelined: ElectrumX holds small replies
//! back for up to a second) and every answer must be equal: the same
//! result, or an error with the same code. Where this ElectrumX cannot
//! answer (its Bitcoin SV node has no `gettxspendingprevout`, so a
//! confirmed outpoint's status is a daemon error), the proxy's emulated
//! answer is checked against the node instead. Then an outpoint
//! subscription through the proxy is notified when the output is spent on
//! the regtest chain, and when the spend is mined.

use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

const WAIT: Duration = Duration::from_secs(60);

fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| {
        panic!("{name} is not set: this test needs the stack of interop/run.sh (run that script)")
    })
}

/// The stack's control script; its stdout is one JSON value.
fn ctl(args: &[&str]) -> Value {
    let ctl: PathBuf = env("INTEROP_CTL").into();
    let out = Command::new(ctl).args(args).output().expect("run ctl");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "ctl {args:?}: {}{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(stdout.trim()).unwrap_or(Value::Null)
}

fn rpc(method: &str, args: &[&str]) -> Value {
    let mut all = vec!["rpc", method];
    all.extend_from_slice(args);
    ctl(&all)
}

/// A JSON-lines session (blocking).
struct Session {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
    next: u64,
    /// Notifications read while waiting for replies.
    notes: Vec<Value>,
}

impl Session {
    fn open(url: &str, version: &str) -> Session {
        let addr = url.trim_start_matches("tcp://");
        let s = TcpStream::connect(addr).unwrap_or_else(|e| panic!("{url}: {e}"));
        s.set_read_timeout(Some(WAIT)).unwrap();
        let mut session = Session {
            reader: BufReader::new(s.try_clone().unwrap()),
            writer: s,
            next: 0,
            notes: Vec::new(),
        };
        let v = session.batch(&[("server.version", json!(["interop", ["1.4", version]]))]);
        assert_eq!(v[0]["result"][1], json!(version), "{url}: {}", v[0]);
        session
    }

    fn read(&mut self) -> Value {
        let mut line = String::new();
        let n = self.reader.read_line(&mut line).expect("a line in time");
        assert!(n > 0, "connection closed");
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}"))
    }

    /// Send every request at once; the replies in request order.
    fn batch(&mut self, requests: &[(&str, Value)]) -> Vec<Value> {
        let first = self.next;
        let mut out = String::new();
        for (method, params) in requests {
            let id = self.next;
            self.next += 1;
            out.push_str(
                &json!({"jsonrpc":"2.0","id":id,"method":method,"params":params}).to_string(),
            );
            out.push('\n');
        }
        self.writer.write_all(out.as_bytes()).unwrap();
        let mut replies = vec![Value::Null; requests.len()];
        let mut got = 0;
        while got < requests.len() {
            let v = self.read();
            match v["id"].as_u64() {
                Some(id) if id >= first && id < self.next => {
                    replies[(id - first) as usize] = v;
                    got += 1;
                }
                _ => self.notes.push(v),
            }
        }
        replies
    }

    fn call(&mut self, method: &str, params: Value) -> Value {
        let v = self.batch(&[(method, params)]).remove(0);
        assert!(v.get("error").is_none(), "{method}: {v}");
        v["result"].clone()
    }

    /// The next notification of `method`.
    fn notification(&mut self, method: &str) -> Value {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(i) = self.notes.iter().position(|n| n["method"] == json!(method)) {
                return self.notes.remove(i)["params"].clone();
            }
            assert!(Instant::now() < deadline, "no {method} notification");
            let v = self.read();
            self.notes.push(v);
        }
    }
}

/// What two answers must share: the result, or the error's code.
fn outcome(reply: &Value) -> Value {
    match reply.get("error") {
        Some(e) => json!({"error": e["code"]}),
        None => json!({"result": reply["result"]}),
    }
}

fn scripthash(script_hex: &str) -> String {
    let mut h = Sha256::digest(hex::decode(script_hex).unwrap()).to_vec();
    h.reverse();
    hex::encode(h)
}

/// The script an address pays, per the node.
fn script_of(address: &str) -> String {
    rpc("validateaddress", &[address])["scriptPubKey"]
        .as_str()
        .unwrap()
        .to_string()
}

/// The output of `txid` that pays `script`.
fn vout_paying(txid: &str, script: &str) -> u32 {
    let tx = rpc("getrawtransaction", &[txid, "1"]);
    tx["vout"]
        .as_array()
        .unwrap()
        .iter()
        .position(|o| o["scriptPubKey"]["hex"] == json!(script))
        .expect("an output paying the script") as u32
}

/// A regtest P2PKH address whose hash is derived from `label`.
fn fresh_address(label: &str) -> String {
    use electrum_client::bitcoin::hashes::Hash;
    use electrum_client::bitcoin::{Address, NetworkKind, PubkeyHash};
    let digest = Sha256::digest(label.as_bytes());
    let hash = PubkeyHash::from_slice(&digest[..20]).unwrap();
    Address::p2pkh(hash, NetworkKind::Test).to_string()
}

fn mine() -> u64 {
    rpc("generatetoaddress", &["1", &env("INTEROP_MINER_ADDRESS")]);
    rpc("getblockcount", &[]).as_u64().unwrap()
}

fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
#[ignore = "needs the stack of interop/run.sh"]
fn protocol_1_6_and_1_7_through_electrum_lb_equal_electrumx() {
    let direct = env("INTEROP_ELECTRUMX_URL");
    let proxied = env("INTEROP_TCP_URL");

    // A script with a confirmed and an unconfirmed payment (nobody holds
    // its key; not the Electrum wallet's address, whose status must only
    // change when tests/interop.rs waits for it), and an output of the
    // node's own wallet (spendable, for the outpoint test).
    let watched_address = fresh_address("interop_protocol: watched");
    let watched = script_of(&watched_address);
    let sh = scripthash(&watched);
    let mine_address = rpc("getnewaddress", &[]).as_str().unwrap().to_string();
    let own = script_of(&mine_address);
    let confirmed = rpc("sendtoaddress", &[&watched_address, "0.3"]);
    let confirmed = confirmed.as_str().unwrap().to_string();
    let fund = rpc("sendtoaddress", &[&mine_address, "2"])
        .as_str()
        .unwrap()
        .to_string();
    let fund_vout = vout_paying(&fund, &own);
    // The node's wallet must not spend it in a later payment: only the
    // test's own spend below may.
    let lock = json!([{"txid": fund, "vout": fund_vout}]).to_string();
    rpc("lockunspent", &["false", &lock]);
    let height = mine();
    let unconfirmed = rpc("sendtoaddress", &[&watched_address, "0.2"]);
    let unconfirmed = unconfirmed.as_str().unwrap().to_string();
    let raw_unconfirmed = rpc("getrawtransaction", &[&unconfirmed])
        .as_str()
        .unwrap()
        .to_string();
    let unconfirmed_vout = vout_paying(&unconfirmed, &watched);
    eprintln!("funded at height {height}: {confirmed}, {fund}:{fund_vout}; mempool {unconfirmed}");

    // Both ends must have seen the mempool payment and the block.
    for url in [&direct, &proxied] {
        let mut s = Session::open(url, "1.6");
        wait_for("the payment in the mempool and the block", || {
            let h = s.call("blockchain.scripthash.get_history", json!([sh]));
            let tip = s.call("blockchain.headers.subscribe", json!([]));
            h.as_array()
                .unwrap()
                .iter()
                .any(|i| i["tx_hash"] == json!(unconfirmed))
                && tip["height"] == json!(height)
        });
    }

    let common = |level: &str| {
        let mut m: Vec<(&str, Value)> = vec![
            ("server.ping", json!([])),
            ("blockchain.headers.subscribe", json!([])),
            ("blockchain.block.header", json!([1])),
            ("blockchain.block.header", json!([1, height])),
            ("blockchain.block.headers", json!([0, 5])),
            ("blockchain.block.headers", json!([height - 2, 10])),
            ("blockchain.block.headers", json!([1, 2, height])),
            ("blockchain.estimatefee", json!([2])),
            ("blockchain.estimatefee", json!([2, "ECONOMICAL"])),
            ("blockchain.estimatefee", json!([2, "bogus"])),
            ("blockchain.relayfee", json!([])),
            ("blockchain.transaction.get", json!([confirmed])),
            (
                "blockchain.transaction.get_merkle",
                json!([confirmed, height]),
            ),
            ("blockchain.transaction.id_from_pos", json!([height, 0])),
            (
                "blockchain.transaction.id_from_pos",
                json!([height, 0, true]),
            ),
            ("mempool.get_fee_histogram", json!([])),
            ("mempool.get_info", json!([])),
            ("blockchain.transaction.broadcast_package", json!([["00"]])),
            ("blockchain.scripthash.get_history", json!([sh])),
            ("blockchain.scripthash.get_mempool", json!([sh])),
            ("blockchain.scripthash.get_balance", json!([sh])),
            ("blockchain.scripthash.listunspent", json!([sh])),
            ("blockchain.scripthash.subscribe", json!([sh])),
        ];
        if level == "1.7" {
            m.extend([
                ("server.ping", json!([4, "ab"])),
                ("blockchain.scriptpubkey.get_history", json!([watched])),
                ("blockchain.scriptpubkey.get_mempool", json!([watched])),
                ("blockchain.scriptpubkey.get_balance", json!([watched])),
                ("blockchain.scriptpubkey.listunspent", json!([watched])),
                ("blockchain.scriptpubkey.subscribe", json!([watched])),
                ("blockchain.scriptpubkey.unsubscribe", json!([watched])),
                (
                    "blockchain.transaction.testmempoolaccept",
                    json!([[raw_unconfirmed]]),
                ),
                (
                    "blockchain.outpoint.get_status",
                    json!([unconfirmed, unconfirmed_vout, watched]),
                ),
            ]);
        }
        m
    };

    for level in ["1.6", "1.7"] {
        let requests = common(level);
        let mut a = Session::open(&direct, level);
        let mut b = Session::open(&proxied, level);
        let want = a.batch(&requests);
        let got = b.batch(&requests);
        for ((method, params), (w, g)) in requests.iter().zip(want.iter().zip(&got)) {
            assert_eq!(
                outcome(g),
                outcome(w),
                "{level} {method} {params}: electrum-lb answered {g}, ElectrumX {w}"
            );
        }
        eprintln!(
            "protocol {level}: {} answers equal to ElectrumX's",
            requests.len()
        );

        // mempool.recent: the same transactions (order within one refresh
        // may differ between the two ElectrumX behind the proxy).
        if level == "1.7" {
            let ids = |v: Value| {
                let mut t: Vec<String> = v
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|i| i["txid"].to_string())
                    .collect();
                t.sort();
                t
            };
            let w = a.call("mempool.recent", json!([]));
            let g = b.call("mempool.recent", json!([]));
            assert_eq!(ids(g), ids(w), "mempool.recent");
            // A confirmed outpoint: this ElectrumX's node cannot tell (no
            // gettxspendingprevout); the proxy answers from the history.
            let params = json!([fund, fund_vout, own]);
            let direct_answer = a.batch(&[("blockchain.outpoint.get_status", params.clone())]);
            eprintln!("ElectrumX on a confirmed outpoint: {}", direct_answer[0]);
            assert_eq!(
                b.call("blockchain.outpoint.get_status", params),
                json!({"funder_height": height})
            );
        }
    }

    // An outpoint subscription, notified when the output is spent and when
    // the spend is mined.
    let mut w = Session::open(&proxied, "1.7");
    let sub = "blockchain.outpoint.subscribe";
    let status = w.call(sub, json!([fund, fund_vout, own]));
    assert_eq!(status, json!({"funder_height": height}));
    let inputs = json!([{"txid": fund, "vout": fund_vout}]).to_string();
    let outputs = json!({env("INTEROP_MINER_ADDRESS"): 1.999}).to_string();
    let raw = rpc("createrawtransaction", &[&inputs, &outputs]);
    let signed = rpc("signrawtransaction", &[raw.as_str().unwrap()]);
    let spend = rpc("sendrawtransaction", &[signed["hex"].as_str().unwrap()]);
    let spend = spend.as_str().unwrap().to_string();
    let note = w.notification(sub);
    assert_eq!(
        note,
        json!([fund, fund_vout, {"funder_height": height, "spender_txhash": spend, "spender_height": 0}])
    );
    let spent_at = mine();
    let note = w.notification(sub);
    assert_eq!(
        note,
        json!([fund, fund_vout, {"funder_height": height, "spender_txhash": spend, "spender_height": spent_at}])
    );
    eprintln!("outpoint {fund}:{fund_vout} notified: spent by {spend}, mined at {spent_at}");
}
