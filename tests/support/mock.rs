//! A mock ElectrumX upstream for integration tests.
//!
//! It keeps a small chain (80-byte headers), per-scripthash histories and raw
//! transactions, answers the protocol-1.4 methods from them, and computes
//! statuses exactly as ElectrumX does, so a client can check a status against
//! `get_history`. Tests steer it: change a history (subscribers are notified),
//! mine a block, kill connections, stall, stop and restart on the same port.
//! It counts every request by method, and the live scripthash subscriptions.
//!
//! Files: this one is the server (connections, steering, notifications);
//! `mock_methods.rs` answers the protocol-1.4 methods; `mock_levels.rs`
//! makes it an ElectrumX 2.0 (`MockOptions::protocol_max`): per-connection
//! negotiation up to 1.7, and the methods and shapes of 1.6 and 1.7;
//! `mock_meter.rs` meters sessions like ElectrumX (`MockOptions::meter`);
//! `mock_hold.rs` pads and holds replies like ElectrumX 2.0
//! (`MockOptions::reply_hold`).

#[path = "mock_hold.rs"]
#[allow(dead_code)]
pub mod hold;
#[path = "mock_levels.rs"]
mod levels;
#[path = "mock_meter.rs"]
#[allow(dead_code)]
pub mod meter;
#[path = "mock_methods.rs"]
mod methods;

use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// How the mock behaves.
#[derive(Clone, Default)]
pub struct MockOptions {
    /// Like ElectrumX 2.0: a session whose first request is not
    /// `server.version` gets an error and is closed.
    pub strict: bool,
    /// Pad every line with spaces inside the JSON to 1 KiB, like ElectrumX 2.0.
    pub pad: bool,
    /// Serve TLS with this configuration.
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// Initial chain length (default 100 blocks).
    pub blocks: Option<usize>,
    /// Genesis seed: two mocks with the same seed share a chain.
    pub seed: u8,
    /// Speak like ElectrumX 2.0 up to this version ("1.7.0"): negotiate per
    /// connection and serve each level's methods (see `mock_levels.rs`).
    /// `None`: a protocol-1.4 server (`protocol_max` "1.4.2").
    pub protocol_max: Option<String>,
    /// Meter each session like ElectrumX (cost, concurrency, sleeps, -101
    /// and close at the hard limit, optionally a group cost).
    pub meter: Option<Arc<meter::Meter>>,
    /// Methods answered with "unknown method" (-32601), as by a server
    /// that does not offer them.
    pub refuse: Vec<&'static str>,
    /// Pad packets and hold small replies like ElectrumX 2.0, with this
    /// window (see `mock_hold.rs`; `pad` is then moot).
    pub reply_hold: Option<Duration>,
}

pub fn sha256d(data: &[u8]) -> [u8; 32] {
    let first = Sha256::digest(data);
    Sha256::digest(first).into()
}

/// Display-order hex of a hash (byte-reversed).
pub fn hash_hex(h: [u8; 32]) -> String {
    let mut v = h.to_vec();
    v.reverse();
    hex::encode(v)
}

/// The txid of a raw transaction.
pub fn txid_of(raw_hex: &str) -> String {
    hash_hex(sha256d(&hex::decode(raw_hex).expect("hex")))
}

/// The Electrum status of a history: sha256 of "txid:height:" items, or null.
pub fn status_of(history: &[(String, i64)]) -> Option<String> {
    if history.is_empty() {
        return None;
    }
    let mut s = String::new();
    for (txid, height) in history {
        s.push_str(&format!("{txid}:{height}:"));
    }
    Some(hex::encode(Sha256::digest(s.as_bytes())))
}

/// The status a client computes from a `get_history` result.
pub fn status_from_history(result: &Value) -> Option<String> {
    let items: Vec<(String, i64)> = result
        .as_array()?
        .iter()
        .map(|i| {
            (
                i["tx_hash"].as_str().unwrap_or_default().to_string(),
                i["height"].as_i64().unwrap_or_default(),
            )
        })
        .collect();
    status_of(&items)
}

fn make_header(prev: &[u8; 32], height: u64, seed: u8) -> Vec<u8> {
    let mut h = Vec::with_capacity(80);
    h.extend_from_slice(&0x2000_0000u32.to_le_bytes());
    h.extend_from_slice(prev);
    let merkle: [u8; 32] =
        Sha256::digest([seed, (height & 0xff) as u8, (height >> 8) as u8]).into();
    h.extend_from_slice(&merkle);
    h.extend_from_slice(&(1_600_000_000u32 + height as u32 * 60).to_le_bytes());
    h.extend_from_slice(&0x207f_ffffu32.to_le_bytes());
    h.extend_from_slice(&(height as u32).to_le_bytes());
    h
}

struct Chain {
    headers: Vec<Vec<u8>>,
    histories: HashMap<String, Vec<(String, i64)>>,
    txs: HashMap<String, String>,
    /// Txids broadcast, oldest first (`mempool.recent`).
    recent: Vec<String>,
    seed: u8,
}

impl Chain {
    fn new(blocks: usize, seed: u8) -> Chain {
        let mut c = Chain {
            headers: Vec::new(),
            histories: HashMap::new(),
            txs: HashMap::new(),
            recent: Vec::new(),
            seed,
        };
        for _ in 0..blocks.max(1) {
            c.mine();
        }
        c
    }
    fn mine(&mut self) {
        let prev = self.headers.last().map(|h| sha256d(h)).unwrap_or([0u8; 32]);
        let height = self.headers.len() as u64;
        self.headers.push(make_header(&prev, height, self.seed));
    }
    fn tip(&self) -> (u64, String) {
        let h = self.headers.len() - 1;
        (h as u64, hex::encode(&self.headers[h]))
    }
}

struct Conn {
    tx: mpsc::UnboundedSender<String>,
    subs: HashSet<String>,
    headers: bool,
    kill: CancellationToken,
    /// The protocol level this connection negotiated.
    level: (u32, u32, u32),
    /// Outpoints subscribed (protocol 1.7) and the status last sent.
    outpoints: HashMap<(String, u32), Value>,
}

struct Shared {
    opts: MockOptions,
    chain: Mutex<Chain>,
    counts: Mutex<HashMap<String, u64>>,
    conns: Mutex<HashMap<u64, Conn>>,
    next_conn: AtomicU64,
    /// TCP connections accepted (TLS handshakes included, failed or not).
    accepted: AtomicU64,
    stalled: AtomicBool,
    /// Artificial delay before each answer, in milliseconds.
    delay_ms: AtomicU64,
    /// Speak protocol 1.6 (see [`Mock::set_protocol_1_6`]).
    protocol_1_6: AtomicBool,
    /// Refuse outpoint methods like an ElectrumX whose node cannot look
    /// spenders up (see [`Mock::set_outpoint_refusal`]).
    outpoint_refusal: AtomicBool,
    /// Answers computed but not sent yet (see [`Mock::hold_answers`]).
    held: Mutex<Option<Vec<HeldAnswer>>>,
    /// Packets sent with `reply_hold`, by cause.
    packets: hold::Packets,
    /// `get_history` requests served, by connection.
    histories_by_conn: Mutex<HashMap<u64, u64>>,
}

/// An answer kept back, and the connection it goes to.
type HeldAnswer = (mpsc::UnboundedSender<String>, String);

impl Shared {
    /// Keep an answer back while answers are held; give it back otherwise.
    fn hold(&self, tx: &mpsc::UnboundedSender<String>, line: String) -> Option<String> {
        match self.held.lock().unwrap().as_mut() {
            Some(held) => {
                held.push((tx.clone(), line));
                None
            }
            None => Some(line),
        }
    }
}

/// A running mock upstream.
pub struct Mock {
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    listening: CancellationToken,
    /// The accept loop; `restart` waits for a stopped one to let go of its
    /// listener.
    accepting: Option<tokio::task::JoinHandle<()>>,
    /// While stopped: a socket bound to `addr` that does not listen, so
    /// connections are refused and no other test's listener (port 0) can
    /// be given this port before `restart`.
    reserved: Mutex<Option<TcpSocket>>,
}

/// A socket on `addr` that other sockets with `SO_REUSEPORT` (this mock's
/// listener, its reservation) may share.
fn shareable_socket(addr: SocketAddr) -> TcpSocket {
    let socket = TcpSocket::new_v4().unwrap();
    socket.set_reuseaddr(true).unwrap();
    socket.set_reuseport(true).unwrap();
    socket.bind(addr).unwrap();
    socket
}

impl Mock {
    pub async fn start() -> Mock {
        Mock::start_with(MockOptions::default()).await
    }

    pub async fn start_with(opts: MockOptions) -> Mock {
        let blocks = opts.blocks.unwrap_or(100);
        let seed = opts.seed;
        let shared = Arc::new(Shared {
            opts,
            chain: Mutex::new(Chain::new(blocks, seed)),
            counts: Mutex::new(HashMap::new()),
            conns: Mutex::new(HashMap::new()),
            next_conn: AtomicU64::new(1),
            accepted: AtomicU64::new(0),
            stalled: AtomicBool::new(false),
            delay_ms: AtomicU64::new(0),
            protocol_1_6: AtomicBool::new(false),
            outpoint_refusal: AtomicBool::new(false),
            held: Mutex::new(None),
            packets: hold::Packets::default(),
            histories_by_conn: Mutex::new(HashMap::new()),
        });
        let listener = shareable_socket("127.0.0.1:0".parse().unwrap())
            .listen(1024)
            .unwrap();
        let addr = listener.local_addr().unwrap();
        let listening = CancellationToken::new();
        let accepting = tokio::spawn(accept_loop(listener, shared.clone(), listening.clone()));
        Mock {
            addr,
            shared,
            listening,
            accepting: Some(accepting),
            reserved: Mutex::new(None),
        }
    }

    /// `tcp://127.0.0.1:PORT` (or `ssl://localhost:PORT` for a TLS mock).
    pub fn url(&self) -> String {
        if self.shared.opts.tls.is_some() {
            format!("ssl://localhost:{}", self.addr.port())
        } else {
            format!("tcp://127.0.0.1:{}", self.addr.port())
        }
    }

    /// Requests received for `method`.
    /// Packets sent with `reply_hold`, by cause.
    pub fn packets(&self) -> &hold::Packets {
        &self.shared.packets
    }

    /// `get_history` requests served on each connection (the counts, in
    /// connection order).
    pub fn histories_by_connection(&self) -> Vec<u64> {
        let by_conn = self.shared.histories_by_conn.lock().unwrap();
        let mut conns: Vec<_> = by_conn.iter().map(|(c, n)| (*c, *n)).collect();
        conns.sort();
        conns.into_iter().map(|(_, n)| n).collect()
    }

    pub fn count(&self, method: &str) -> u64 {
        *self.shared.counts.lock().unwrap().get(method).unwrap_or(&0)
    }

    /// All requests received, handshakes and pings excluded.
    pub fn requests(&self) -> u64 {
        self.shared
            .counts
            .lock()
            .unwrap()
            .iter()
            .filter(|(m, _)| {
                !matches!(
                    m.as_str(),
                    "server.version" | "server.features" | "server.ping"
                )
            })
            .map(|(_, n)| *n)
            .sum()
    }

    pub fn reset_counts(&self) {
        self.shared.counts.lock().unwrap().clear();
    }

    /// Distinct scripthashes with a live subscription, over all connections.
    pub fn subscriptions(&self) -> usize {
        let conns = self.shared.conns.lock().unwrap();
        let all: HashSet<&String> = conns.values().flat_map(|c| c.subs.iter()).collect();
        all.len()
    }

    /// Live scripthash subscriptions summed over connections.
    pub fn subscription_count_total(&self) -> usize {
        self.shared
            .conns
            .lock()
            .unwrap()
            .values()
            .map(|c| c.subs.len())
            .sum()
    }

    /// TCP connections accepted so far, whatever became of them.
    pub fn accepted(&self) -> u64 {
        self.shared.accepted.load(Ordering::SeqCst)
    }

    pub fn connections(&self) -> usize {
        self.shared.conns.lock().unwrap().len()
    }

    pub fn tip(&self) -> (u64, String) {
        self.shared.chain.lock().unwrap().tip()
    }

    pub fn header_hex(&self, height: usize) -> String {
        hex::encode(&self.shared.chain.lock().unwrap().headers[height])
    }

    pub fn genesis_hash(&self) -> String {
        hash_hex(sha256d(&self.shared.chain.lock().unwrap().headers[0]))
    }

    /// Replace a scripthash's history and notify its subscribers.
    pub fn set_history(&self, scripthash: &str, history: Vec<(String, i64)>) {
        let status = status_of(&history);
        self.shared
            .chain
            .lock()
            .unwrap()
            .histories
            .insert(scripthash.to_string(), history);
        for c in self.shared.conns.lock().unwrap().values() {
            if c.subs.contains(scripthash) {
                // ElectrumX 2.0 names the method after the 1.7 form.
                let method = if c.level >= (1, 7, 0) {
                    "blockchain.scriptpubkey.subscribe"
                } else {
                    "blockchain.scripthash.subscribe"
                };
                let line = json!({"jsonrpc":"2.0","method":method,"params":[scripthash, status]});
                let _ = c.tx.send(line.to_string());
            }
        }
        levels::notify_outpoints(&self.shared);
    }

    /// Answer outpoint methods with a daemon error (as an ElectrumX on a
    /// node without spender lookups does), or normally again with `false`.
    pub fn set_outpoint_refusal(&self, on: bool) {
        self.shared.outpoint_refusal.store(on, Ordering::SeqCst);
    }

    /// Live outpoint subscriptions summed over connections.
    pub fn outpoint_subscriptions(&self) -> usize {
        self.shared
            .conns
            .lock()
            .unwrap()
            .values()
            .map(|c| c.outpoints.len())
            .sum()
    }

    /// The protocol levels the open connections negotiated.
    pub fn levels(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .shared
            .conns
            .lock()
            .unwrap()
            .values()
            .map(|c| levels::version_string(c.level))
            .collect();
        v.sort();
        v
    }

    /// Replace a history without notifying anyone (a lagging or divergent view).
    pub fn set_history_silently(&self, scripthash: &str, history: Vec<(String, i64)>) {
        self.shared
            .chain
            .lock()
            .unwrap()
            .histories
            .insert(scripthash.to_string(), history);
    }

    pub fn history(&self, scripthash: &str) -> Vec<(String, i64)> {
        self.shared
            .chain
            .lock()
            .unwrap()
            .histories
            .get(scripthash)
            .cloned()
            .unwrap_or_default()
    }

    /// Store a raw transaction; returns its txid.
    pub fn add_tx(&self, raw_hex: &str) -> String {
        let txid = txid_of(raw_hex);
        self.shared
            .chain
            .lock()
            .unwrap()
            .txs
            .insert(txid.clone(), raw_hex.to_string());
        txid
    }

    /// Tell header subscribers of a new tip.
    fn notify_tip(&self, height: u64, hex: &str) {
        let line = json!({"jsonrpc":"2.0","method":"blockchain.headers.subscribe","params":[{"hex":hex,"height":height}]});
        for c in self.shared.conns.lock().unwrap().values() {
            if c.headers {
                let _ = c.tx.send(line.to_string());
            }
        }
    }

    /// Mine `n` blocks and notify header subscribers of the new tip.
    pub fn mine(&self, n: usize) {
        let (height, hex) = {
            let mut chain = self.shared.chain.lock().unwrap();
            for _ in 0..n {
                chain.mine();
            }
            chain.tip()
        };
        self.notify_tip(height, &hex);
    }

    /// A reorganisation: replace the last `depth` blocks (never genesis)
    /// with a competing branch of the same length, and notify header
    /// subscribers of its tip.
    pub fn reorg(&self, depth: usize) {
        let (height, hex) = {
            let mut chain = self.shared.chain.lock().unwrap();
            let len = chain.headers.len();
            for h in len - depth.min(len - 1)..len {
                let prev = sha256d(&chain.headers[h - 1]);
                let mut header = make_header(&prev, h as u64, chain.seed);
                // Another merkle root: another block at the same height.
                let other: [u8; 32] = Sha256::digest(&chain.headers[h]).into();
                header[36..68].copy_from_slice(&other);
                chain.headers[h] = header;
            }
            chain.tip()
        };
        self.notify_tip(height, &hex);
    }

    /// Compute answers as usual but keep them back (notifications still go
    /// out) until [`Mock::release_answers`]: requests stay in flight for as
    /// long as a test needs, without timing.
    pub fn hold_answers(&self) {
        self.shared
            .held
            .lock()
            .unwrap()
            .get_or_insert_with(Vec::new);
    }

    /// Answers held back now.
    pub fn held_answers(&self) -> usize {
        self.shared
            .held
            .lock()
            .unwrap()
            .as_ref()
            .map_or(0, Vec::len)
    }

    /// Send every held answer, in order, and answer at once again.
    pub fn release_answers(&self) {
        let held = self.shared.held.lock().unwrap().take();
        for (tx, line) in held.into_iter().flatten() {
            let _ = tx.send(line);
        }
    }

    /// Accept, read, never answer (or back to normal with `false`).
    pub fn set_stalled(&self, stalled: bool) {
        self.shared.stalled.store(stalled, Ordering::SeqCst);
    }

    pub fn set_delay(&self, delay: Duration) {
        self.shared
            .delay_ms
            .store(delay.as_millis() as u64, Ordering::SeqCst);
    }

    /// Behave like an ElectrumX that negotiated protocol 1.6: `server.version`
    /// answers "1.6", `blockchain.relayfee` is an unknown method,
    /// `mempool.get_info` answers (`minrelaytxfee` 0.00002) and
    /// `blockchain.block.headers` returns a `headers` list instead of `hex`.
    pub fn set_protocol_1_6(&self, on: bool) {
        self.shared.protocol_1_6.store(on, Ordering::SeqCst);
    }

    /// Drop every open connection (the listener keeps accepting).
    pub fn kill_connections(&self) {
        for (_, c) in self.shared.conns.lock().unwrap().drain() {
            c.kill.cancel();
        }
    }

    /// Stop listening and drop every connection: the upstream is gone.
    pub fn stop(&self) {
        let mut reserved = self.reserved.lock().unwrap();
        if reserved.is_none() {
            // Reserve the port before the listener goes.
            *reserved = Some(shareable_socket(self.addr));
        }
        self.listening.cancel();
        self.kill_connections();
    }

    /// Listen again on the same port after `stop`.
    pub async fn restart(&mut self) {
        if let Some(old) = self.accepting.take() {
            let _ = old.await;
        }
        let listener = shareable_socket(self.addr).listen(1024).unwrap();
        self.reserved.lock().unwrap().take();
        self.listening = CancellationToken::new();
        self.accepting = Some(tokio::spawn(accept_loop(
            listener,
            self.shared.clone(),
            self.listening.clone(),
        )));
    }
}

impl Drop for Mock {
    fn drop(&mut self) {
        self.stop();
    }
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>, stop: CancellationToken) {
    loop {
        let (stream, _) = tokio::select! {
            _ = stop.cancelled() => return,
            r = listener.accept() => match r { Ok(a) => a, Err(_) => continue },
        };
        shared.accepted.fetch_add(1, Ordering::SeqCst);
        let shared = shared.clone();
        tokio::spawn(async move {
            match shared.opts.tls.clone() {
                Some(cfg) => {
                    if let Ok(s) = tokio_rustls::TlsAcceptor::from(cfg).accept(stream).await {
                        serve(s, shared).await;
                    }
                }
                None => serve(stream, shared).await,
            }
        });
    }
}

async fn serve<S: AsyncRead + AsyncWrite + Send + 'static>(stream: S, shared: Arc<Shared>) {
    let id = shared.next_conn.fetch_add(1, Ordering::SeqCst);
    let (rd, mut wr) = tokio::io::split(stream);
    let (tx, mut rx) = mpsc::unbounded_channel::<String>();
    let kill = CancellationToken::new();
    shared.conns.lock().unwrap().insert(
        id,
        Conn {
            tx: tx.clone(),
            subs: HashSet::new(),
            headers: false,
            kill: kill.clone(),
            level: (1, 4, 0),
            outpoints: HashMap::new(),
        },
    );
    if let Some(m) = &shared.opts.meter {
        m.open(id);
    }
    let pad = shared.opts.pad;
    let writer_kill = kill.clone();
    let (now_tx, now_rx) = mpsc::unbounded_channel::<String>();
    let writer = if let Some(window) = shared.opts.reply_hold {
        let shared = shared.clone();
        tokio::spawn(async move {
            hold::write_held(wr, rx, now_rx, window, &shared.packets, writer_kill).await
        })
    } else {
        drop(now_rx);
        tokio::spawn(async move {
            loop {
                let line = tokio::select! {
                    _ = writer_kill.cancelled() => break,
                    l = rx.recv() => match l { Some(l) => l, None => break },
                };
                let mut line = line;
                if pad && line.len() < 1023 {
                    // Pad inside the JSON, before the closing bracket.
                    let last = line.pop().unwrap();
                    line.push_str(&" ".repeat(1023 - line.len() - 1));
                    line.push(last);
                }
                line.push('\n');
                if wr.write_all(line.as_bytes()).await.is_err() {
                    break;
                }
            }
            let _ = wr.shutdown().await;
        })
    };
    let mut lines = BufReader::new(rd).lines();
    let mut identified = false;
    loop {
        let line = tokio::select! {
            _ = kill.cancelled() => break,
            l = lines.next_line() => match l { Ok(Some(l)) => l, _ => break },
        };
        let req: Value = match serde_json::from_str(&line) {
            Ok(v) => v,
            Err(_) => {
                let _ = tx.send(json!({"jsonrpc":"2.0","error":{"code":-32700,"message":"invalid JSON"},"id":null}).to_string());
                continue;
            }
        };
        let method = req["method"].as_str().unwrap_or_default().to_string();
        *shared
            .counts
            .lock()
            .unwrap()
            .entry(method.clone())
            .or_insert(0) += 1;
        if shared.stalled.load(Ordering::SeqCst) {
            continue;
        }
        if shared.opts.strict && !identified && method != "server.version" {
            let _ = tx.send(json!({"jsonrpc":"2.0","error":{"code":1,"message":"use server.version to identify client"},"id":req["id"]}).to_string());
            break;
        }
        if method == "server.version" {
            identified = true;
        }
        if let Some(m) = shared.opts.meter.clone() {
            meter::handle(
                shared.clone(),
                m,
                id,
                req,
                line.len(),
                tx.clone(),
                kill.clone(),
            );
            continue;
        }
        let delay = shared.delay_ms.load(Ordering::SeqCst);
        let reply = methods::answer(&shared, id, &req);
        let Some(id_val) = req.get("id").cloned() else {
            continue;
        };
        let line = match reply {
            Ok(result) => json!({"jsonrpc":"2.0","result":result,"id":id_val}),
            Err((code, msg)) => {
                json!({"jsonrpc":"2.0","error":{"code":code,"message":msg},"id":id_val})
            }
        }
        .to_string();
        if method == "blockchain.scripthash.get_history" {
            *shared
                .histories_by_conn
                .lock()
                .unwrap()
                .entry(id)
                .or_insert(0) += 1;
        }
        if shared.opts.reply_hold.is_some()
            && matches!(
                method.as_str(),
                "server.version" | "server.features" | "blockchain.headers.subscribe"
            )
        {
            // ElectrumX's warm-up budget sends a handshake at once.
            let _ = now_tx.send(line);
            continue;
        }
        let Some(line) = shared.hold(&tx, line) else {
            continue;
        };
        if delay > 0 {
            let tx = tx.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(delay)).await;
                let _ = tx.send(line);
            });
        } else {
            let _ = tx.send(line);
        }
    }
    kill.cancel();
    if let Some(m) = &shared.opts.meter {
        m.close(id);
    }
    shared.conns.lock().unwrap().remove(&id);
    drop(tx);
    let _ = writer.await;
}
