//! Wallet-like clients for the balancer tests: each holds a session from
//! its own loopback address, subscribes to the tip and to its scripthash,
//! reads (histories, balances, headers, transactions) with pauses between,
//! checks every answer against the mock, and when the server closes the
//! session it reconnects, subscribes again and re-sends whatever was left
//! without an answer, as Electrum wallets do.
//!
//! Counted: answers, failures (an error reply, a wrong answer, a refused
//! or reset connection, no answer in time), requests re-sent because the
//! connection closed under them, sessions cut by the server, and what the
//! wallet knows (its scripthash's status, the tip).

use crate::support::mock::{status_from_history, Mock};
use crate::support::{tls_connector, WAIT};
use serde_json::{json, Value};
use std::collections::{HashMap, HashSet};
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

/// What the wallets check answers against.
pub struct Truth {
    pub mock: Arc<Mock>,
    /// Every status each scripthash has had (a read may cross a change).
    pub statuses: Mutex<HashMap<String, HashSet<Option<String>>>>,
    /// A transaction the mock holds: (txid, raw).
    pub tx: (String, String),
}

impl Truth {
    pub fn new(mock: Arc<Mock>) -> Truth {
        let raw = "0100000001".to_string() + &"ab".repeat(60);
        let txid = mock.add_tx(&raw);
        Truth {
            mock,
            statuses: Mutex::default(),
            tx: (txid, raw),
        }
    }

    /// A scripthash the wallets may ask about, with its current status.
    pub fn watch(&self, sh: &str) {
        let status = self.current(sh);
        self.statuses
            .lock()
            .unwrap()
            .entry(sh.to_string())
            .or_default()
            .insert(status);
    }

    /// A new mempool payment to `sh` (its subscribers are notified).
    pub fn pay_next(&self, sh: &str, n: usize) {
        let mut history = self.mock.history(sh);
        history.push((crate::support::txid(n), 0));
        self.pay(sh, history);
    }

    /// Change a scripthash's history (the mock notifies its subscribers).
    pub fn pay(&self, sh: &str, history: Vec<(String, i64)>) {
        let status = crate::support::mock::status_of(&history);
        self.statuses
            .lock()
            .unwrap()
            .entry(sh.to_string())
            .or_default()
            .insert(status);
        self.mock.set_history(sh, history);
    }

    pub fn current(&self, sh: &str) -> Option<String> {
        crate::support::mock::status_of(&self.mock.history(sh))
    }
}

#[derive(Default, Debug)]
pub struct Counters {
    pub answered: AtomicU64,
    pub failed: AtomicU64,
    pub resent: AtomicU64,
    pub sessions: AtomicU64,
    pub cut: AtomicU64,
    pub notifications: AtomicU64,
}

pub struct Wallet {
    pub source: Ipv4Addr,
    pub target: SocketAddr,
    pub tls: bool,
    pub sh: String,
    pub counters: Counters,
    /// The status last learned for `sh` (from a subscribe answer or a
    /// notification), and the tip height.
    pub status: Mutex<Option<Option<String>>>,
    pub tip: AtomicU64,
    pub connected: AtomicBool,
    pub failures: Mutex<Vec<String>>,
    truth: Arc<Truth>,
}

/// A read a wallet makes.
#[derive(Debug, Clone)]
struct Req {
    method: &'static str,
    params: Value,
}

enum Ended {
    /// The server closed the session (or the proxy before it).
    Cut,
    Stopped,
}

impl Wallet {
    pub fn new(
        source: Ipv4Addr,
        target: SocketAddr,
        tls: bool,
        sh: String,
        truth: Arc<Truth>,
    ) -> Arc<Wallet> {
        Arc::new(Wallet {
            source,
            target,
            tls,
            sh,
            counters: Counters::default(),
            status: Mutex::new(None),
            tip: AtomicU64::new(0),
            connected: AtomicBool::new(false),
            failures: Mutex::new(Vec::new()),
            truth,
        })
    }

    fn fail(&self, what: String) {
        self.counters.failed.fetch_add(1, Ordering::SeqCst);
        let mut f = self.failures.lock().unwrap();
        if f.len() < 20 {
            f.push(format!("{}: {what}", self.source));
        }
    }

    /// Whether the wallet is connected and knows `status` and `tip`.
    pub fn knows(&self, status: &Option<String>, tip: u64) -> bool {
        self.connected.load(Ordering::SeqCst)
            && self.status.lock().unwrap().as_ref() == Some(status)
            && self.tip.load(Ordering::SeqCst) == tip
    }

    /// Run until `stop`: connect, serve, reconnect when cut.
    pub async fn run(self: Arc<Self>, stop: CancellationToken) {
        let mut carry: Vec<Req> = Vec::new();
        while !stop.is_cancelled() {
            let conn = match self.connect().await {
                Ok(c) => c,
                Err(e) => {
                    self.fail(format!("connect: {e}"));
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            self.counters.sessions.fetch_add(1, Ordering::SeqCst);
            let ended = self.session(conn, &mut carry, &stop).await;
            self.connected.store(false, Ordering::SeqCst);
            if let Ended::Cut = ended {
                self.counters.cut.fetch_add(1, Ordering::SeqCst);
            }
        }
    }

    async fn connect(self: &Arc<Self>) -> std::io::Result<Conn> {
        let socket = tokio::net::TcpSocket::new_v4()?;
        socket.bind(SocketAddr::from((self.source, 0)))?;
        let tcp = tokio::time::timeout(WAIT, socket.connect(self.target)).await??;
        let stream: Box<dyn crate::support::Io> = if self.tls {
            Box::new(
                tokio::time::timeout(
                    WAIT,
                    tls_connector().connect("localhost".try_into().unwrap(), tcp),
                )
                .await??,
            )
        } else {
            Box::new(tcp)
        };
        Ok(Conn::start(stream, self))
    }

    async fn session(
        self: &Arc<Self>,
        mut conn: Conn,
        carry: &mut Vec<Req>,
        stop: &CancellationToken,
    ) -> Ended {
        let handshake = [
            Req {
                method: "server.version",
                params: json!(["wallet", "1.4"]),
            },
            Req {
                method: "blockchain.headers.subscribe",
                params: json!([]),
            },
            Req {
                method: "blockchain.scripthash.subscribe",
                params: json!([self.sh]),
            },
        ];
        for req in handshake.iter().cloned() {
            if !self.ask(&mut conn, req, carry).await {
                return Ended::Cut;
            }
        }
        self.connected.store(true, Ordering::SeqCst);
        // What was left unanswered on the previous session, first.
        for req in std::mem::take(carry) {
            if !self.ask(&mut conn, req, carry).await {
                return Ended::Cut;
            }
        }
        let mut n: u64 = self.source.octets()[2] as u64;
        loop {
            n += 1;
            let pause = Duration::from_millis(10 + (n * 7919) % 30);
            tokio::select! {
                _ = stop.cancelled() => return Ended::Stopped,
                _ = conn.dead.cancelled() => return Ended::Cut,
                _ = tokio::time::sleep(pause) => {}
            }
            let req = match n % 5 {
                0 => Req {
                    method: "blockchain.scripthash.get_history",
                    params: json!([self.sh]),
                },
                1 => Req {
                    method: "blockchain.block.header",
                    params: json!([n % 100]),
                },
                2 => Req {
                    method: "blockchain.scripthash.get_balance",
                    params: json!([self.sh]),
                },
                3 => Req {
                    method: "blockchain.transaction.get",
                    params: json!([self.truth.tx.0]),
                },
                _ => Req {
                    method: "server.ping",
                    params: json!([]),
                },
            };
            if !self.ask(&mut conn, req, carry).await {
                return Ended::Cut;
            }
        }
    }

    /// Send one request and check its answer. False when the connection
    /// closed before the answer came: the request is then kept in `carry`
    /// to be sent again on the next session.
    async fn ask(&self, conn: &mut Conn, req: Req, carry: &mut Vec<Req>) -> bool {
        match conn.request(req.method, &req.params).await {
            Reply::Answer(v) => {
                match self.check(&req, &v) {
                    Ok(()) => {
                        self.counters.answered.fetch_add(1, Ordering::SeqCst);
                    }
                    Err(e) => self.fail(format!("{} {}: {e}: {v}", req.method, req.params)),
                }
                true
            }
            Reply::Closed { sent } => {
                if sent {
                    self.counters.resent.fetch_add(1, Ordering::SeqCst);
                }
                carry.push(req);
                false
            }
            Reply::Reset(e) => {
                self.fail(format!(
                    "{} {}: connection reset: {e}",
                    req.method, req.params
                ));
                carry.push(req);
                false
            }
            Reply::Late => {
                self.fail(format!(
                    "{} {}: no answer within {WAIT:?}",
                    req.method, req.params
                ));
                true
            }
        }
    }

    fn check(&self, req: &Req, v: &Value) -> Result<(), String> {
        if v.get("error").is_some() {
            return Err("error reply".into());
        }
        let r = &v["result"];
        let truth = &self.truth;
        match req.method {
            "server.version" => (r[1] == "1.4").then_some(()).ok_or("version".into()),
            "blockchain.headers.subscribe" => {
                let h = r["height"].as_u64().ok_or("no height")?;
                self.tip.fetch_max(h, Ordering::SeqCst);
                Ok(())
            }
            // The reader took the status in wire order (see `Conn::start`).
            "blockchain.scripthash.subscribe" => self.known_status(&r.as_str().map(str::to_string)),
            "blockchain.scripthash.get_history" => self.known_status(&status_from_history(r)),
            "blockchain.block.header" => {
                let h = req.params[0].as_u64().unwrap() as usize;
                (r == &json!(truth.mock.header_hex(h)))
                    .then_some(())
                    .ok_or("another header".into())
            }
            "blockchain.scripthash.get_balance" => r["confirmed"]
                .as_u64()
                .map(|_| ())
                .ok_or("no balance".into()),
            "blockchain.transaction.get" => (r == &json!(truth.tx.1))
                .then_some(())
                .ok_or("another transaction".into()),
            "server.ping" => r.is_null().then_some(()).ok_or("ping".into()),
            m => Err(format!("unexpected method {m}")),
        }
    }

    fn known_status(&self, status: &Option<String>) -> Result<(), String> {
        let statuses = self.truth.statuses.lock().unwrap();
        match statuses.get(&self.sh) {
            Some(s) if s.contains(status) => Ok(()),
            _ => Err(format!("a status the scripthash never had: {status:?}")),
        }
    }

    /// A notification from the server.
    fn notified(&self, v: &Value) {
        self.counters.notifications.fetch_add(1, Ordering::SeqCst);
        match v["method"].as_str() {
            Some("blockchain.scripthash.subscribe") => {
                let status = v["params"][1].as_str().map(str::to_string);
                if let Err(e) = self.known_status(&status) {
                    self.fail(format!("notification: {e}"));
                }
                *self.status.lock().unwrap() = Some(status);
            }
            Some("blockchain.headers.subscribe") => {
                if let Some(h) = v["params"][0]["height"].as_u64() {
                    self.tip.fetch_max(h, Ordering::SeqCst);
                }
            }
            _ => self.fail(format!("unexpected notification {v}")),
        }
    }
}

/// Requests awaiting their answer: method and who waits.
type Pending = HashMap<u64, (&'static str, oneshot::Sender<Value>)>;

enum Reply {
    Answer(Value),
    /// The connection closed cleanly before an answer; `sent` says whether
    /// the request had been written (else it was never asked).
    Closed {
        sent: bool,
    },
    Reset(String),
    Late,
}

/// One session: a reader task hands answers to waiting requests by id and
/// notifications to the wallet; when the server closes, `dead` fires and
/// every waiting request learns it at once (as a wallet's connection does).
struct Conn {
    writer: tokio::io::WriteHalf<Box<dyn crate::support::Io>>,
    pending: Arc<Mutex<Pending>>,
    dead: CancellationToken,
    reset: Arc<Mutex<Option<String>>>,
    next_id: u64,
    reader_task: tokio::task::JoinHandle<()>,
}

impl Drop for Conn {
    fn drop(&mut self) {
        // The read half would keep the connection open.
        self.reader_task.abort();
    }
}

impl Conn {
    fn start(stream: Box<dyn crate::support::Io>, wallet: &Arc<Wallet>) -> Conn {
        let (rd, writer) = tokio::io::split(stream);
        let pending: Arc<Mutex<Pending>> = Arc::default();
        let dead = CancellationToken::new();
        let reset: Arc<Mutex<Option<String>>> = Arc::default();
        let reader = {
            let (pending, dead, reset, wallet) =
                (pending.clone(), dead.clone(), reset.clone(), wallet.clone());
            tokio::spawn(async move {
                let mut lines = BufReader::new(rd).lines();
                loop {
                    match lines.next_line().await {
                        Ok(Some(line)) => {
                            let v: Value = match serde_json::from_str(&line) {
                                Ok(v) => v,
                                Err(e) => {
                                    wallet.fail(format!("invalid JSON {e}: {line}"));
                                    continue;
                                }
                            };
                            match v.get("id").and_then(Value::as_u64) {
                                Some(id) => {
                                    let Some((method, tx)) = pending.lock().unwrap().remove(&id)
                                    else {
                                        continue;
                                    };
                                    // A subscribe's status, in order with the
                                    // notifications around it (a later one must
                                    // not be overwritten by an earlier answer).
                                    if method == "blockchain.scripthash.subscribe"
                                        && v.get("error").is_none()
                                    {
                                        *wallet.status.lock().unwrap() =
                                            Some(v["result"].as_str().map(str::to_string));
                                    }
                                    let _ = tx.send(v);
                                }
                                None => wallet.notified(&v),
                            }
                        }
                        Ok(None) => break,
                        Err(e) => {
                            *reset.lock().unwrap() = Some(e.to_string());
                            break;
                        }
                    }
                }
                dead.cancel();
                pending.lock().unwrap().clear();
            })
        };
        Conn {
            writer,
            pending,
            dead,
            reset,
            next_id: 1,
            reader_task: reader,
        }
    }

    async fn request(&mut self, method: &'static str, params: &Value) -> Reply {
        if self.dead.is_cancelled() {
            return self.closed(false);
        }
        let id = self.next_id;
        self.next_id += 1;
        let (tx, rx) = oneshot::channel();
        self.pending.lock().unwrap().insert(id, (method, tx));
        let mut line = json!({"jsonrpc":"2.0","id":id,"method":method,"params":params}).to_string();
        line.push('\n');
        if self.writer.write_all(line.as_bytes()).await.is_err() {
            // Only after the server closed (the reader sees it too).
            self.dead.cancelled().await;
            return self.closed(true);
        }
        match tokio::time::timeout(WAIT, rx).await {
            Ok(Ok(v)) => Reply::Answer(v),
            Ok(Err(_)) => self.closed(true),
            Err(_) => Reply::Late,
        }
    }

    fn closed(&self, sent: bool) -> Reply {
        match self.reset.lock().unwrap().clone() {
            Some(e) => Reply::Reset(e),
            None => Reply::Closed { sent },
        }
    }
}
