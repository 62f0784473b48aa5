//! The clients' child: a share of the N subscribed sessions, in a process of
//! its own, told by the parent on stdin when a round starts.
//!
//! Protocol on stdin and stdout, one line each:
//! - the child starts with `FANOUT_CLIENTS=TRANSPORT ADDR COUNT FIRST SH`,
//!   connects COUNT sessions to ADDR from client addresses FIRST on,
//!   subscribes each to SH (not over `bare`: the bare writer needs no
//!   request) and says `READY`;
//! - `ROUND STATUS`: every session starts waiting for a line; once all
//!   wait, the child says `ARMED`; once every session has a line that
//!   contains STATUS, it says `ARRIVED LAST MEDIAN`, the last and the
//!   median arrival in nanoseconds of `CLOCK_MONOTONIC` (one clock for
//!   every process of the machine, which the parent reads too);
//! - stdin closed: the child ends.

use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use std::io::{BufRead, Write};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::sync::{Notify, Semaphore};
use tokio::task::JoinSet;

pub const CLIENTS_ENV: &str = "FANOUT_CLIENTS";
/// Clients connecting and subscribing at the same time.
const CONNECT_CONCURRENCY: usize = 256;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Transport {
    Tcp,
    Ws,
    /// The floor: the bare writer, no proxy.
    Bare,
}

impl Transport {
    pub fn name(self) -> &'static str {
        match self {
            Transport::Tcp => "tcp",
            Transport::Ws => "ws",
            Transport::Bare => "bare",
        }
    }

    pub fn from_name(name: &str) -> Option<Transport> {
        [Transport::Tcp, Transport::Ws, Transport::Bare]
            .into_iter()
            .find(|t| t.name() == name)
    }
}

/// Now on `CLOCK_MONOTONIC`, in nanoseconds: comparable across processes.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a plain syscall writing to a stack value.
    unsafe {
        libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts);
    }
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// One subscribed client: lines over TCP, or one message per line over
/// WebSocket.
enum Session {
    Tcp(BufReader<TcpStream>),
    Ws(Box<tokio_tungstenite::WebSocketStream<TcpStream>>),
}

impl Session {
    /// The `i`th session connects from the `i`th address of 127.0.0.0/8
    /// (see [`crate::spread::connect_from`]).
    async fn connect(proxy: SocketAddr, transport: Transport, i: usize) -> Session {
        let stream = crate::spread::connect_from(i, proxy).await;
        stream.set_nodelay(true).expect("nodelay");
        match transport {
            Transport::Tcp | Transport::Bare => Session::Tcp(BufReader::new(stream)),
            Transport::Ws => {
                // A small read buffer: the default (128 KiB) times 10,000
                // clients would be this process's memory, not the proxy's.
                let config = tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default()
                    .read_buffer_size(4096);
                let (ws, _) = tokio_tungstenite::client_async_with_config(
                    format!("ws://{proxy}/"),
                    stream,
                    Some(config),
                )
                .await
                .expect("WebSocket upgrade");
                Session::Ws(Box::new(ws))
            }
        }
    }

    async fn send_line(&mut self, line: &str) {
        match self {
            Session::Tcp(s) => s
                .get_mut()
                .write_all(format!("{line}\n").as_bytes())
                .await
                .expect("write"),
            Session::Ws(ws) => ws
                .send(tokio_tungstenite::tungstenite::Message::text(line))
                .await
                .expect("send"),
        }
    }

    /// The next line (TCP) or text message (WebSocket), into `line`.
    async fn read_line(&mut self, line: &mut String) -> std::io::Result<usize> {
        match self {
            Session::Tcp(s) => s.read_line(line).await,
            Session::Ws(ws) => loop {
                match ws.next().await {
                    Some(Ok(tokio_tungstenite::tungstenite::Message::Text(t))) => {
                        line.push_str(&t);
                        return Ok(t.len());
                    }
                    Some(Ok(_)) => continue,
                    Some(Err(e)) => return Err(std::io::Error::other(e)),
                    None => return Ok(0),
                }
            },
        }
    }
}

/// The child's main: see the module's doc.
pub fn run_clients(spec: &str) {
    let words: Vec<&str> = spec.split_whitespace().collect();
    let [transport, addr, count, first, sh] = words[..] else {
        panic!("{CLIENTS_ENV}={spec:?}: expected TRANSPORT ADDR COUNT FIRST SH");
    };
    let transport = Transport::from_name(transport).expect("TRANSPORT");
    let addr: SocketAddr = addr.parse().expect("ADDR");
    let count: usize = count.parse().expect("COUNT");
    let first: usize = first.parse().expect("FIRST");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let mut sessions = runtime.block_on(connect_and_subscribe(addr, transport, count, first, sh));
    say("READY");
    let stdin = std::io::stdin();
    let mut input = std::io::BufReader::new(stdin.lock());
    let mut command = String::new();
    while input.read_line(&mut command).unwrap_or(0) > 0 {
        let status = command
            .trim_end()
            .strip_prefix("ROUND ")
            .unwrap_or_else(|| panic!("unexpected command {command:?}"))
            .to_string();
        let (back, last, median) = runtime.block_on(one_round(sessions, &status));
        sessions = back;
        say(&format!("ARRIVED {last} {median}"));
        command.clear();
    }
}

fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{line}").expect("stdout");
    out.flush().expect("stdout");
}

async fn connect_and_subscribe(
    proxy: SocketAddr,
    transport: Transport,
    n: usize,
    first: usize,
    sh: &str,
) -> Vec<Session> {
    let gate = Arc::new(Semaphore::new(CONNECT_CONCURRENCY));
    let request = format!(
        "{{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"blockchain.scripthash.subscribe\",\"params\":[\"{sh}\"]}}"
    );
    let mut tasks = JoinSet::new();
    for i in 0..n {
        let gate = gate.clone();
        let request = request.clone();
        tasks.spawn(async move {
            let _permit = gate.acquire_owned().await.expect("open");
            let mut session = Session::connect(proxy, transport, first + i).await;
            if transport == Transport::Bare {
                return session;
            }
            session.send_line(&request).await;
            let mut reply = String::new();
            session.read_line(&mut reply).await.expect("reply");
            let v: Value = serde_json::from_str(&reply).expect("JSON reply");
            assert!(v.get("result").is_some(), "subscribe failed: {reply}");
            session
        });
    }
    let mut sessions = Vec::with_capacity(n);
    while let Some(s) = tasks.join_next().await {
        sessions.push(s.expect("session task"));
    }
    sessions
}

/// Every session waits for one line holding `status`; `ARMED` is said once
/// all wait. Returns the sessions, the last and the median arrival.
async fn one_round(sessions: Vec<Session>, status: &str) -> (Vec<Session>, u64, u64) {
    let n = sessions.len();
    let ready = Arc::new(AtomicUsize::new(0));
    let all_ready = Arc::new(Notify::new());
    let mut tasks = JoinSet::new();
    for mut session in sessions {
        let ready = ready.clone();
        let all_ready = all_ready.clone();
        let status = status.to_string();
        tasks.spawn(async move {
            if ready.fetch_add(1, Ordering::AcqRel) + 1 == n {
                all_ready.notify_one();
            }
            let mut line = String::new();
            session.read_line(&mut line).await.expect("notification");
            let at = monotonic_ns();
            assert!(line.contains(&status), "unexpected line: {line}");
            (session, at)
        });
    }
    all_ready.notified().await;
    // Let every reader reach its socket before the parent starts the clock.
    tokio::task::yield_now().await;
    say("ARMED");
    let mut back = Vec::with_capacity(n);
    let mut arrivals = Vec::with_capacity(n);
    while let Some(r) = tasks.join_next().await {
        let (session, at) = r.expect("reader task");
        back.push(session);
        arrivals.push(at);
    }
    arrivals.sort_unstable();
    (back, arrivals[n - 1], arrivals[n / 2])
}
