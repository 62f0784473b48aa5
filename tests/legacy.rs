//! Legacy wallets through modern upstreams (issue 10).
//!
//! The upstream is the mock in its ElectrumX 2.0 manner (strict: identify
//! first or be dropped; every line padded to 1 KiB) speaking protocol 1.4
//! only: no address methods, no `get_header`, no `get_chunk`, no
//! `numblocks.subscribe`, no deserialized headers. The proxy must still serve
//! the araguaneybits Android wallets (Coinomi wallet core) and, on the same
//! listener, modern clients in exactly their forms.
mod support;

use electrum_client::bitcoin::consensus::deserialize;
use electrum_client::bitcoin::{ScriptBuf, Transaction};
use electrum_client::ElectrumApi;
use serde_json::value::RawValue;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use support::mock::{hash_hex, sha256d, status_from_history, status_of, Mock, MockOptions};
use support::*;

/// The coin table is named after the coin so its built-in address version
/// bytes apply (Arepacoin: P2PKH 0x17, P2SH 0x55).
const COIN: &str = "arepacoin";
const P2PKH: u8 = 0x17;
const P2SH: u8 = 0x55;
/// The Arepacoin address of the seed document's telnet example.
const SEED_ADDRESS: &str = "AJrdoamrqi5GBy1hafCbdB1JfioUfQvtxH";
/// The wallet sends its "0.9" keep-alive after this many requests.
const KEEPALIVE_EVERY: usize = 4;

fn server_name() -> String {
    format!("electrum-lb {}", env!("CARGO_PKG_VERSION"))
}

/// One coin, `arepacoin`, on a TCP listener from the OS in front of one upstream.
fn config(upstream: &str, extra: &str) -> String {
    format!(
        r#"
[metrics]
listen = "127.0.0.1:0"

[server]
request_timeout_secs = 5
shutdown_grace_secs = 2
upstream_stall_secs = 2

[coins.{COIN}]
listen = ["tcp://127.0.0.1:0"]
upstreams = [{upstream:?}]
{extra}
"#
    )
}

/// The mock as ElectrumX 2.0 behaves, speaking protocol 1.4.
async fn modern_upstream() -> Mock {
    Mock::start_with(MockOptions {
        strict: true,
        pad: true,
        ..Default::default()
    })
    .await
}

async fn proxy(mock: &Mock, extra: &str) -> (electrum_lb::Server, SocketAddr) {
    let server = start_proxy(&config(&mock.url(), extra)).await;
    wait_ready(&server, COIN).await;
    let addr = tcp_addr(&server, COIN);
    (server, addr)
}

// ---------------------------------------------------------------------------
// Addresses, scripts, transactions and headers, computed independently of
// the proxy's own code.

/// A base58check address: version byte + 20 hash bytes.
fn address(version: u8, hash160: &[u8]) -> String {
    let mut payload = vec![version];
    payload.extend_from_slice(hash160);
    bs58::encode(payload).with_check().into_string()
}

/// The output script an Arepacoin address pays to.
fn script_of(address: &str) -> Vec<u8> {
    let payload = bs58::decode(address).with_check(None).into_vec().unwrap();
    let (version, hash) = (payload[0], &payload[1..]);
    match version {
        P2PKH => [&[0x76, 0xa9, 0x14][..], hash, &[0x88, 0xac]].concat(),
        P2SH => [&[0xa9, 0x14][..], hash, &[0x87]].concat(),
        v => panic!("{address}: version {v} is not Arepacoin's"),
    }
}

/// The Electrum scripthash of an address: sha256 of its script, reversed.
fn scripthash_of(address: &str) -> String {
    let mut h = Sha256::digest(script_of(address)).to_vec();
    h.reverse();
    hex::encode(h)
}

/// The Android wallet's 20 addresses: the seed's, 16 more P2PKH and 3 P2SH.
fn wallet_addresses() -> Vec<String> {
    let mut all = vec![SEED_ADDRESS.to_string()];
    for i in 0..19u8 {
        let hash = &Sha256::digest([b'k', i])[..20];
        all.push(address(if i < 16 { P2PKH } else { P2SH }, hash));
    }
    all
}

/// A transaction Bitcoin's consensus code can decode, paying 1000 to `script`.
fn raw_tx(n: u8, script: &[u8]) -> String {
    let mut tx = Vec::new();
    tx.extend_from_slice(&1u32.to_le_bytes());
    tx.push(1); // one input
    tx.extend_from_slice(&Sha256::digest([b'p', n]));
    tx.extend_from_slice(&0u32.to_le_bytes());
    tx.push(0); // empty scriptSig
    tx.extend_from_slice(&u32::MAX.to_le_bytes());
    tx.push(1); // one output
    tx.extend_from_slice(&1000u64.to_le_bytes());
    tx.push(script.len() as u8);
    tx.extend_from_slice(script);
    tx.extend_from_slice(&0u32.to_le_bytes());
    hex::encode(tx)
}

/// The display hash of a header (sha256d, byte-reversed).
fn block_hash(header_hex: &str) -> String {
    hash_hex(sha256d(&hex::decode(header_hex).unwrap()))
}

/// Check a deserialized header object (pre-1.3 form) against the mock's
/// header at `height`: every member, and the link to `height - 1`.
fn assert_deserialized(v: &Value, height: u64, mock: &Mock) {
    let bytes = hex::decode(mock.header_hex(height as usize)).unwrap();
    let u32_at = |i: usize| u32::from_le_bytes(bytes[i..i + 4].try_into().unwrap());
    let reversed = |r: std::ops::Range<usize>| {
        let mut h = bytes[r].to_vec();
        h.reverse();
        hex::encode(h)
    };
    assert_eq!(v["block_height"], height, "{v}");
    assert_eq!(
        v["prev_block_hash"],
        block_hash(&mock.header_hex(height as usize - 1)),
        "{v}"
    );
    assert_eq!(v["prev_block_hash"], reversed(4..36), "{v}");
    assert_eq!(v["merkle_root"], reversed(36..68), "{v}");
    assert_eq!(v["version"], u32_at(0), "{v}");
    assert_eq!(v["timestamp"], u32_at(68), "{v}");
    assert_eq!(v["bits"], u32_at(72), "{v}");
    assert_eq!(v["nonce"], u32_at(76), "{v}");
}

/// One member of a JSON line, as the exact text it was written with.
fn member(line: &str, name: &str) -> Option<String> {
    let members: HashMap<String, Box<RawValue>> = serde_json::from_str(line).unwrap();
    members.get(name).map(|r| r.get().to_string())
}

// ---------------------------------------------------------------------------
// The Android wallet.

/// The Coinomi-core stratum client as the araguaneybits Android wallets run
/// it: bare request objects with no `jsonrpc` member, ids counted from 0, no
/// `server.version` first, `"0.9"` keep-alives. Every line it receives is
/// kept raw, so the test can check that none carried an `error` member.
struct Wallet {
    conn: Client,
    next_id: u64,
    lines: Vec<String>,
    notifications: VecDeque<Value>,
    since_keepalive: usize,
    keepalives: usize,
}

impl Wallet {
    async fn connect(addr: SocketAddr) -> Wallet {
        Wallet {
            conn: Client::connect(addr).await,
            next_id: 0,
            lines: Vec::new(),
            notifications: VecDeque::new(),
            since_keepalive: 0,
            keepalives: 0,
        }
    }

    /// Write one request; `params: None` leaves the member out entirely.
    async fn send(&mut self, method: &str, params: Option<Value>) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        let mut req = json!({"id": id, "method": method});
        if let Some(p) = params {
            req["params"] = p;
        }
        assert!(req.get("jsonrpc").is_none());
        self.conn.send(&req).await;
        id
    }

    async fn recv(&mut self) -> Value {
        let line = self.conn.recv_line().await.expect("the proxy closed");
        let v: Value = serde_json::from_str(&line).unwrap();
        self.lines.push(line);
        v
    }

    /// Send requests together (the wallet pipelines them) and return their
    /// results in request order, whatever order the replies come in.
    async fn call_many(&mut self, requests: Vec<(&str, Option<Value>)>) -> Vec<Value> {
        let mut ids = Vec::new();
        for (method, params) in requests {
            ids.push(self.send(method, params).await);
        }
        let mut results: HashMap<u64, Value> = HashMap::new();
        while results.len() < ids.len() {
            let v = self.recv().await;
            let Some(id) = v.get("id") else {
                self.notifications.push_back(v);
                continue;
            };
            // The wallet treats an error member as a failure and stalls.
            assert!(v.get("error").is_none(), "the wallet failed: {v}");
            assert_eq!(v["jsonrpc"], "2.0", "{v}");
            let id = id.as_u64().unwrap_or_else(|| panic!("id changed: {v}"));
            assert!(ids.contains(&id), "an answer to nothing asked: {v}");
            assert!(results.insert(id, v["result"].clone()).is_none());
        }
        ids.iter().map(|id| results.remove(id).unwrap()).collect()
    }

    /// One request as the wallet makes it, with the periodic keep-alive.
    async fn call(&mut self, method: &str, params: Option<Value>) -> Value {
        self.since_keepalive += 1;
        if self.since_keepalive >= KEEPALIVE_EVERY {
            self.keepalive().await;
        }
        self.call_many(vec![(method, params)]).await.remove(0)
    }

    /// `server.version(name, "0.9")`: answered (a legacy session gets the
    /// plain server string), never an error, never a disconnect.
    async fn keepalive(&mut self) {
        let r = self
            .call_many(vec![(
                "server.version",
                Some(json!(["Coinomi Android", "0.9"])),
            )])
            .await;
        assert_eq!(r[0], json!(server_name()));
        self.since_keepalive = 0;
        self.keepalives += 1;
    }

    /// The next notification of `method` (others stay queued).
    async fn notification(&mut self, method: &str) -> Value {
        loop {
            if let Some(i) = self
                .notifications
                .iter()
                .position(|n| n["method"] == method)
            {
                return self.notifications.remove(i).unwrap()["params"].clone();
            }
            let v = self.recv().await;
            assert!(v.get("id").is_none(), "nothing was asked: {v}");
            self.notifications.push_back(v);
        }
    }
}

/// What the mock knows about the wallet's funded addresses.
struct Funded {
    /// (address index, txid, height)
    txs: Vec<(usize, String, i64)>,
}

fn fund(mock: &Mock, addrs: &[String]) -> Funded {
    let mut txs = Vec::new();
    for (n, (i, height)) in [(0usize, 10i64), (3, 42), (17, 0)].into_iter().enumerate() {
        let txid = mock.add_tx(&raw_tx(n as u8, &script_of(&addrs[i])));
        mock.set_history_silently(&scripthash_of(&addrs[i]), vec![(txid.clone(), height)]);
        txs.push((i, txid, height));
    }
    Funded { txs }
}

/// The wallet's start-up and use, request by request, as the Coinomi core
/// sends them, against an upstream that knows none of the old methods.
async fn android_wallet_session(w: &mut Wallet, mock: &Mock, addrs: &[String], funded: &Funded) {
    // 1. The tip, with no params member at all, as the first line ever sent.
    let (tip, tip_hex) = mock.tip();
    let header = w.call("blockchain.headers.subscribe", None).await;
    assert_deserialized(&header, tip, mock);
    // A session that never negotiated also gets what modern clients read.
    assert_eq!(header["hex"], tip_hex);
    assert_eq!(header["height"], tip);

    // 2. Twenty address subscriptions, pipelined.
    let subs = addrs
        .iter()
        .map(|a| ("blockchain.address.subscribe", Some(json!([a]))))
        .collect();
    let statuses = w.call_many(subs).await;
    for (a, status) in addrs.iter().zip(&statuses) {
        assert_eq!(
            *status,
            json!(status_of(&mock.history(&scripthash_of(a)))),
            "{a}"
        );
    }
    let funded_count = statuses.iter().filter(|s| !s.is_null()).count();
    assert_eq!(funded_count, funded.txs.len());

    // 3. Histories and unspents of the funded addresses, consistent with
    //    the statuses the wallet was just sent.
    for (i, txid, height) in &funded.txs {
        let a = &addrs[*i];
        let history = w
            .call("blockchain.address.get_history", Some(json!([a])))
            .await;
        assert_eq!(history, json!([{"tx_hash": txid, "height": height}]));
        assert_eq!(
            json!(status_from_history(&history)),
            statuses[*i],
            "the status must match the history"
        );
        let unspent = w
            .call("blockchain.address.listunspent", Some(json!([a])))
            .await;
        assert_eq!(unspent[0]["tx_hash"], *txid);
        assert_eq!(unspent[0]["height"], *height);
        assert_eq!(unspent[0]["value"], 1000);
    }
    let empty = w
        .call("blockchain.address.get_history", Some(json!([addrs[1]])))
        .await;
    assert_eq!(empty, json!([]));

    // 4. Each transaction, checked by hashing what came back.
    for (_, txid, _) in &funded.txs {
        let raw = w
            .call("blockchain.transaction.get", Some(json!([txid])))
            .await;
        let raw = raw.as_str().expect("raw hex");
        assert_eq!(hash_hex(sha256d(&hex::decode(raw).unwrap())), *txid);
    }

    // 5. Headers by height, deserialized, each linked to the one before.
    for h in [1, 10, 42, tip - 1, tip] {
        let v = w
            .call("blockchain.block.get_header", Some(json!([h])))
            .await;
        assert_deserialized(&v, h, mock);
    }

    // 6. A broadcast answers the txid.
    let spend = raw_tx(99, &script_of(&addrs[5]));
    let sent = w
        .call("blockchain.transaction.broadcast", Some(json!([spend])))
        .await;
    assert_eq!(
        sent,
        json!(hash_hex(sha256d(&hex::decode(&spend).unwrap())))
    );

    // 7. A new block arrives as a deserialized header notification.
    mock.mine(1);
    let params = w.notification("blockchain.headers.subscribe").await;
    assert_deserialized(&params[0], tip + 1, mock);
    assert_eq!(params[0]["prev_block_hash"], block_hash(&tip_hex));

    // 8. A payment to address 7 arrives as [address, status].
    let (txid, height) = (mock.add_tx(&raw_tx(7, &script_of(&addrs[7]))), 0);
    mock.set_history(&scripthash_of(&addrs[7]), vec![(txid.clone(), height)]);
    let params = w.notification("blockchain.address.subscribe").await;
    let status = status_of(&[(txid.clone(), height)]).unwrap();
    assert_eq!(params, json!([addrs[7], status]));
    let history = w
        .call("blockchain.address.get_history", Some(json!([addrs[7]])))
        .await;
    assert_eq!(json!(status_from_history(&history)), json!(status));
    assert!(w.keepalives >= 3, "{} keep-alives", w.keepalives);
}

// ---------------------------------------------------------------------------
// Modern clients on the same listener.

/// BDK's electrum-client 0.25 negotiates ["1.4", "1.6"]: it gets 1.6, and
/// reads the 1.6 forms the proxy makes of the 1.4 upstream's answers.
async fn bdk_client(addr: SocketAddr, mock: &Mock, script: Vec<u8>, txid: String) {
    let (tip, tip_hex) = mock.tip();
    let headers: Vec<String> = (0..10).map(|h| block_hash(&mock.header_hex(h))).collect();
    let history = mock.history(&hex::encode({
        let mut h = Sha256::digest(&script).to_vec();
        h.reverse();
        h
    }));
    let url = format!("tcp://{addr}");
    let client = tokio::task::spawn_blocking(move || {
        let client = electrum_client::Client::new(&url).unwrap();
        assert_eq!(client.protocol_version().unwrap(), "1.6");
        let features = client.server_features().unwrap();
        assert_eq!(features.protocol_max, "1.7");
        let sub = client.block_headers_subscribe().unwrap();
        assert_eq!(sub.height as u64, tip);
        assert_eq!(sub.header.block_hash().to_string(), block_hash(&tip_hex));
        let h5 = client.block_header(5).unwrap();
        assert_eq!(h5.block_hash().to_string(), headers[5]);
        let batch = client.block_headers(0, 10).unwrap();
        assert_eq!(batch.count, 10);
        let got: Vec<String> = batch
            .headers
            .iter()
            .map(|h| h.block_hash().to_string())
            .collect();
        assert_eq!(got, headers);
        let script = ScriptBuf::from_bytes(script);
        let status = client.script_subscribe(&script).unwrap();
        assert!(status.is_some());
        let hist = client.script_get_history(&script).unwrap();
        assert_eq!(hist.len(), history.len());
        assert_eq!(hist[0].tx_hash.to_string(), history[0].0);
        let unspent = client.script_list_unspent(&script).unwrap();
        assert_eq!(unspent[0].value, 1000);
        let tx = client.transaction_get(&txid.parse().unwrap()).unwrap();
        assert_eq!(tx.compute_txid().to_string(), txid);
        // 1.6 removed blockchain.relayfee: refused, as ElectrumX 2.0 does.
        assert!(client.relay_fee().is_err());
        assert_eq!(client.estimate_fee(2, None).unwrap(), 0.0001);
        client.ping().unwrap();
        client
    })
    .await
    .unwrap();
    // A new block reaches it as a 1.4 notification it can decode.
    mock.mine(1);
    let next = tip + 1;
    let want = block_hash(&mock.header_hex(next as usize));
    tokio::task::spawn_blocking(move || {
        let deadline = std::time::Instant::now() + WAIT;
        loop {
            // A ping makes the client read what the proxy pushed.
            client.ping().unwrap();
            if let Some(n) = client.block_headers_pop().unwrap() {
                assert_eq!(n.height as u64, next);
                assert_eq!(n.header.block_hash().to_string(), want);
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "no header notification"
            );
        }
    })
    .await
    .unwrap();
}

/// Send one request and return the raw reply line.
async fn raw_call(c: &mut Client, id: u64, method: &str, params: Value) -> String {
    c.send(&json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params}))
        .await;
    loop {
        let line = c.recv_line().await.expect("the proxy closed");
        if member(&line, "id").as_deref() == Some(id.to_string().as_str()) {
            assert!(member(&line, "error").is_none(), "{method}: {line}");
            return line;
        }
    }
}

/// The raw params of the next notification of `method`.
async fn raw_notification(c: &mut Client, method: &str) -> String {
    loop {
        let line = c.recv_line().await.expect("the proxy closed");
        if member(&line, "method").as_deref() == Some(&format!("\"{method}\"")) {
            assert!(member(&line, "id").is_none(), "{line}");
            return member(&line, "params").unwrap();
        }
    }
}

/// A modern client that never negotiates, and one that negotiates 1.4, see
/// the same block and payment, each in its form; the wallet sees them too.
async fn modern_clients(addr: SocketAddr, mock: &Mock, sh: &str) {
    let (tip, tip_hex) = mock.tip();
    // Never negotiates: reads `hex` and `height` from the header object.
    let mut bare = Client::connect(addr).await;
    let header = bare.call("blockchain.headers.subscribe", json!([])).await;
    assert_eq!(header["hex"], tip_hex);
    assert_eq!(header["height"], tip);
    let status = bare
        .call("blockchain.scripthash.subscribe", json!([sh]))
        .await;
    assert_eq!(status, json!(status_of(&mock.history(sh))));

    // Negotiates 1.4: exactly ElectrumX's bytes.
    let mut v14 = Client::connect(addr).await;
    let line = raw_call(&mut v14, 0, "server.version", json!(["modern", "1.4"])).await;
    assert_eq!(
        member(&line, "result").unwrap(),
        format!("[\"{}\",\"1.4\"]", server_name())
    );
    let line = raw_call(&mut v14, 1, "blockchain.headers.subscribe", json!([])).await;
    assert_eq!(
        member(&line, "result").unwrap(),
        format!("{{\"hex\":\"{tip_hex}\",\"height\":{tip}}}")
    );
    let line = raw_call(&mut v14, 2, "blockchain.scripthash.subscribe", json!([sh])).await;
    assert_eq!(
        member(&line, "result").unwrap(),
        json!(status_of(&mock.history(sh))).to_string()
    );
    let line = raw_call(&mut v14, 3, "blockchain.block.header", json!([7])).await;
    assert_eq!(
        member(&line, "result").unwrap(),
        format!("\"{}\"", mock.header_hex(7))
    );

    mock.mine(1);
    let (next, next_hex) = mock.tip();
    assert_eq!(
        raw_notification(&mut v14, "blockchain.headers.subscribe").await,
        format!("[{{\"hex\":\"{next_hex}\",\"height\":{next}}}]")
    );
    let params = bare.notification("blockchain.headers.subscribe").await;
    assert_eq!(params[0]["hex"], next_hex);
    assert_eq!(params[0]["height"], next);

    let txid = mock.add_tx(&raw_tx(8, b"\x51"));
    mock.set_history(sh, vec![(txid.clone(), next as i64)]);
    let status = status_of(&[(txid, next as i64)]).unwrap();
    assert_eq!(
        raw_notification(&mut v14, "blockchain.scripthash.subscribe").await,
        format!("[\"{sh}\",\"{status}\"]")
    );
    assert_eq!(
        bare.notification("blockchain.scripthash.subscribe").await,
        json!([sh, status])
    );
}

#[tokio::test]
async fn android_wallet_and_modern_clients_share_a_listener() {
    let mock = modern_upstream().await;
    let addrs = wallet_addresses();
    let funded = fund(&mock, &addrs);
    let (server, addr) = proxy(&mock, "").await;

    let mut wallet = Wallet::connect(addr).await;
    android_wallet_session(&mut wallet, &mock, &addrs, &funded).await;
    let first_block = mock.tip().0;

    // BDK on the script of the wallet's address 3: one upstream subscription
    // serves the address form and the scripthash form.
    let (i, txid, _) = &funded.txs[1];
    bdk_client(addr, &mock, script_of(&addrs[*i]), txid.clone()).await;

    // The two modern clients watch the wallet's address 12.
    modern_clients(addr, &mock, &scripthash_of(&addrs[12])).await;

    // The wallet, open all along, saw every later block deserialized and the
    // payment to address 12 as [address, status], and its session is alive.
    let tip = mock.tip().0;
    for h in first_block + 1..=tip {
        let params = wallet.notification("blockchain.headers.subscribe").await;
        assert_deserialized(&params[0], h, &mock);
    }
    let params = wallet.notification("blockchain.address.subscribe").await;
    assert_eq!(params[0], addrs[12]);
    assert_eq!(
        params[1],
        json!(status_of(&mock.history(&scripthash_of(&addrs[12]))))
    );
    wallet.keepalive().await;
    let v = wallet
        .call("blockchain.block.get_header", Some(json!([tip])))
        .await;
    assert_deserialized(&v, tip, &mock);
    assert!(
        wallet.notifications.is_empty(),
        "{:?}",
        wallet.notifications
    );

    // Not one line of the whole run carried an error member, not even null.
    assert!(
        wallet.lines.len() as u64 > wallet.next_id,
        "{} lines for {} requests",
        wallet.lines.len(),
        wallet.next_id
    );
    for line in &wallet.lines {
        assert!(!line.contains("\"error\""), "{line}");
        assert!(member(line, "error").is_none(), "{line}");
    }
    server.shutdown().await;
}

// ---------------------------------------------------------------------------
// The other old methods and forms.

#[tokio::test]
async fn methods_of_protocols_1_0_to_1_2_are_translated() {
    let mock = modern_upstream().await;
    let raw = raw_tx(1, b"\x51");
    let txid = mock.add_tx(&raw);
    // The upstream itself refuses 1.0's height argument.
    let mut direct = Client::connect(mock.addr).await;
    direct.call("server.version", json!(["t", "1.4"])).await;
    let refused = direct
        .request("blockchain.transaction.get", json!([txid, 5]))
        .await;
    assert_eq!(refused["error"]["code"], 1, "{refused}");
    let (server, addr) = proxy(&mock, "").await;
    let (tip, _) = mock.tip();

    // Protocol 1.0: a plain string version, get_chunk, numblocks and the
    // two-argument transaction.get.
    let mut v10 = Client::connect(addr).await;
    let version = v10.call("server.version", json!(["old", "1.0"])).await;
    assert_eq!(version, json!(server_name()));
    let chunk = v10.call("blockchain.block.get_chunk", json!([0])).await;
    let all: String = (0..=tip as usize).map(|h| mock.header_hex(h)).collect();
    assert_eq!(chunk, json!(all));
    let beyond = v10.call("blockchain.block.get_chunk", json!([1])).await;
    assert_eq!(beyond, json!(""));
    let got = v10
        .call("blockchain.transaction.get", json!([txid, 5]))
        .await;
    assert_eq!(got, json!(raw));
    let height = v10.call("blockchain.numblocks.subscribe", json!([])).await;
    assert_eq!(height, json!(tip));
    let header = v10.call("blockchain.headers.subscribe", json!([])).await;
    assert_deserialized(&header, tip, &mock);
    assert!(header.get("hex").is_none(), "{header}");
    // A bad argument is refused with a reason, and the session goes on.
    let bad = v10
        .request("blockchain.block.get_header", json!(["tip"]))
        .await;
    assert_eq!(bad["error"]["code"], -32602, "{bad}");
    let huge = v10
        .request("blockchain.block.get_chunk", json!([u64::MAX]))
        .await;
    assert_eq!(huge["error"]["code"], -32602, "{huge}");

    // Protocol 1.2: `raw` picks the modern form, otherwise deserialized.
    let mut raw12 = Client::connect(addr).await;
    raw12.call("server.version", json!(["old", "1.2"])).await;
    let line = raw_call(
        &mut raw12,
        100,
        "blockchain.headers.subscribe",
        json!([true]),
    )
    .await;
    let (_, tip_hex) = mock.tip();
    assert_eq!(
        member(&line, "result").unwrap(),
        format!("{{\"hex\":\"{tip_hex}\",\"height\":{tip}}}")
    );
    let mut des12 = Client::connect(addr).await;
    des12.call("server.version", json!(["old", "1.2"])).await;
    let header = des12
        .call("blockchain.headers.subscribe", json!([false]))
        .await;
    assert_deserialized(&header, tip, &mock);
    assert!(header.get("hex").is_none(), "{header}");

    // One block, three forms.
    mock.mine(1);
    let (next, next_hex) = mock.tip();
    assert_eq!(
        v10.notification("blockchain.numblocks.subscribe").await,
        json!([next])
    );
    let params = v10.notification("blockchain.headers.subscribe").await;
    assert_deserialized(&params[0], next, &mock);
    assert_eq!(
        raw_notification(&mut raw12, "blockchain.headers.subscribe").await,
        format!("[{{\"hex\":\"{next_hex}\",\"height\":{next}}}]")
    );
    let params = des12.notification("blockchain.headers.subscribe").await;
    assert_deserialized(&params[0], next, &mock);
    assert!(params[0].get("hex").is_none());
    server.shutdown().await;
}

#[tokio::test]
async fn version_negotiation_on_the_wire() {
    let mock = modern_upstream().await;
    let (server, addr) = proxy(&mock, "").await;

    // "1.8" alone is a minimum above 1.7: refused, then closed.
    let mut new = Client::connect(addr).await;
    let r = new.request("server.version", json!(["w", "1.8"])).await;
    assert_eq!(r["error"]["code"], 1, "{r}");
    assert!(new.closed().await);

    // A non-string version is an error the session survives; a repeated
    // call (even a "0.9" one) is a keep-alive with the settled answer.
    let mut c = Client::connect(addr).await;
    let r = c.request("server.version", json!(["w", 14])).await;
    assert_eq!(r["error"]["code"], 1, "{r}");
    assert_eq!(c.call("server.ping", json!([])).await, Value::Null);
    let settled = json!([server_name(), "1.4"]);
    assert_eq!(c.call("server.version", json!(["w", "1.4"])).await, settled);
    assert_eq!(c.call("server.version", json!(["w", "0.9"])).await, settled);
    assert_eq!(c.call("server.version", json!(["w", "1.8"])).await, settled);
    let header = c.call("blockchain.headers.subscribe", json!([])).await;
    assert_eq!(header, json!({"hex": mock.tip().1, "height": mock.tip().0}));

    // A legacy session's params may be missing or null.
    let mut old = Client::connect(addr).await;
    old.send_raw(b"{\"id\":0,\"method\":\"server.version\",\"params\":null}\n")
        .await;
    assert_eq!(old.recv().await["result"], json!(server_name()));
    server.shutdown().await;
}

#[tokio::test]
async fn a_protocol_1_6_upstream_still_serves_relayfee_and_1_4_forms() {
    let mock = modern_upstream().await;
    mock.set_protocol_1_6(true);
    let (server, addr) = proxy(&mock, "upstream_protocol = \"1.6\"").await;
    let (tip, _) = mock.tip();

    // The Android wallet's bare request: answered from mempool.get_info.
    let mut w = Wallet::connect(addr).await;
    let fee = w.call("blockchain.relayfee", None).await;
    assert_eq!(fee.as_f64(), Some(0.00002), "{fee}");
    let chunk = w.call("blockchain.block.get_chunk", Some(json!([0]))).await;
    let all: String = (0..=tip as usize).map(|h| mock.header_hex(h)).collect();
    assert_eq!(chunk, json!(all));
    assert!(w.lines.iter().all(|l| !l.contains("\"error\"")));

    // A 1.4 client gets the 1.4 form of blockchain.block.headers.
    let mut c = Client::connect(addr).await;
    c.call("server.version", json!(["t", "1.4"])).await;
    let headers = c.call("blockchain.block.headers", json!([2, 3])).await;
    let three: String = (2..5).map(|h| mock.header_hex(h)).collect();
    assert_eq!(headers, json!({"hex": three, "count": 3, "max": 2016}));

    // BDK negotiates 1.6: the 1.6 form, and no relayfee (as on
    // ElectrumX 2.0); mempool.get_info is its replacement.
    let want: Vec<String> = (0..5).map(|h| block_hash(&mock.header_hex(h))).collect();
    let url = format!("tcp://{addr}");
    tokio::task::spawn_blocking(move || {
        let client = electrum_client::Client::new(&url).unwrap();
        assert_eq!(client.protocol_version().unwrap(), "1.6");
        assert!(client.relay_fee().is_err());
        assert_eq!(client.mempool_get_info().unwrap().minrelaytxfee, 0.00002);
        let got = client.block_headers(0, 5).unwrap();
        let got: Vec<String> = got
            .headers
            .iter()
            .map(|h| h.block_hash().to_string())
            .collect();
        assert_eq!(got, want);
    })
    .await
    .unwrap();
    // The wallet's relayfee went upstream once; BDK's was refused locally.
    assert_eq!(mock.count("blockchain.relayfee"), 1);
    assert_eq!(mock.count("mempool.get_info"), 2);
    server.shutdown().await;
}

#[test]
fn test_vectors_are_what_they_claim() {
    // The seed address is Arepacoin P2PKH, and the generated ones decode.
    assert_eq!(script_of(SEED_ADDRESS)[..3], [0x76, 0xa9, 0x14]);
    let addrs = wallet_addresses();
    assert_eq!(addrs.len(), 20);
    assert!(addrs[1].starts_with('A'), "{}", addrs[1]);
    assert_eq!(script_of(&addrs[19]).len(), 23);
    // The raw transactions decode as Bitcoin-style transactions.
    let raw = raw_tx(3, &script_of(SEED_ADDRESS));
    let tx: Transaction = deserialize(&hex::decode(&raw).unwrap()).unwrap();
    assert_eq!(tx.compute_txid().to_string(), mock::txid_of(&raw));
}
