//! Fan-out benchmark: N sessions subscribed to one scripthash through the
//! proxy, one upstream notification, the time until the last session has it.
//!
//! ```text
//! cargo bench --bench fanout              # N = 1,000 and N = 10,000, over TCP then WebSocket
//! cargo bench --bench fanout -- 2000 5000 # other sizes
//! cargo bench --bench fanout -- tcp       # one transport only (tcp or ws; bare always runs)
//! ```
//!
//! Each size runs over TCP and over WebSocket (`ws://`, tokio-tungstenite's
//! client) against the same proxy process, and the WebSocket figure is also
//! given as a ratio of the TCP one. Both sets of sessions are held at once
//! and their rounds alternate when the open files limit allows 2N sessions
//! (so that a slow moment of a shared machine hits both alike); otherwise
//! (N = 10,000 under a limit of 20,000) one transport runs after the other.
//!
//! The proxy runs in a child process (this binary, re-executed with
//! `FANOUT_PROXY_UPSTREAM` set) with its default runtime, one worker per
//! CPU; this process runs the mock upstream and the N clients. N sessions
//! need N sockets on each side of the proxy: split over two processes, each
//! needs N plus a few file descriptors instead of 2N, which keeps N = 10,000
//! under the usual `ulimit -n` of 20,000 (the limit is checked up front).
//!
//! Each round: every client waits for a line, the mock changes the
//! scripthash's history (one upstream notification), and each client
//! stamps the arrival of its notification. A round's figure is the time from
//! the upstream notification to the last arrival.
//!
//! The floor (transport `bare`, run with every size): another child process
//! (`FANOUT_BARE` set) that only accepts the N connections and, when told
//! on its stdin, writes the same notification line to each of them in a
//! loop, one `write` per socket, with nothing else to do. Its last arrival,
//! measured the same way, is what the proxy's fan-out is divided by. The
//! open files limit (20,000 on the machine of the README, hard) bounds N
//! per process: a larger N is cut to what fits, and said so.

#[allow(dead_code)]
#[path = "../tests/support/mock.rs"]
mod mock;

use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use std::io::{BufRead, Write};
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::sync::{Notify, Semaphore};
use tokio::task::JoinSet;

const CHILD_ENV: &str = "FANOUT_PROXY_UPSTREAM";
const BARE_ENV: &str = "FANOUT_BARE";
const ROUNDS: usize = 7;
/// Clients connecting and subscribing at the same time.
const CONNECT_CONCURRENCY: usize = 256;

fn main() {
    if let Ok(upstream) = std::env::var(CHILD_ENV) {
        run_proxy(&upstream);
        return;
    }
    if std::env::var(BARE_ENV).is_ok() {
        run_bare();
        return;
    }
    let sizes: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let sizes = if sizes.is_empty() {
        vec![1_000, 10_000]
    } else {
        sizes
    };
    let words: Vec<String> = std::env::args().skip(1).collect();
    let mut transports: Vec<Transport> = [Transport::Tcp, Transport::Ws, Transport::Bare]
        .into_iter()
        .filter(|t| words.iter().any(|w| w == t.name()))
        .collect();
    if transports.is_empty() {
        transports = vec![Transport::Tcp, Transport::Ws];
    }
    if !transports.contains(&Transport::Bare) {
        transports.push(Transport::Bare);
    }
    let limit = open_files_limit();
    println!(
        "fanout: open files limit {} per process",
        limit.map_or("unknown".to_string(), |l| l.to_string())
    );
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(bench(sizes, transports, limit));
}

/// The child: the proxy in front of `upstream`, until stdin closes.
fn run_proxy(upstream: &str) {
    let text = format!(
        r#"
[metrics]
listen = "127.0.0.1:0"

[coins.bench]
listen = ["tcp://127.0.0.1:0", "ws://127.0.0.1:0"]
upstreams = ["{upstream}"]
"#
    );
    let config = electrum_lb::Config::parse(&text, "fanout.toml").expect("config");
    // The binary's automatic runtime (src/cli.rs): one thread on 2 CPUs
    // or fewer, one per CPU above.
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let runtime = if cpus <= 2 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        tokio::runtime::Builder::new_multi_thread()
    }
    .enable_all()
    .build()
    .expect("runtime");
    runtime.block_on(async {
        let server = electrum_lb::start(config).await.expect("proxy starts");
        let pool = server.coins["bench"].router.pool.clone();
        while !pool.any_ready() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let addr = server
            .addr("bench", electrum_lb::config::Scheme::Tcp)
            .expect("tcp listener");
        let ws = server
            .addr("bench", electrum_lb::config::Scheme::Ws)
            .expect("ws listener");
        println!("LISTEN {addr} {ws}");
        std::io::stdout().flush().expect("stdout");
        // The parent closes our stdin when it is done.
        let _ = tokio::task::spawn_blocking(|| {
            let mut sink = String::new();
            while std::io::stdin().read_line(&mut sink).unwrap_or(0) > 0 {
                sink.clear();
            }
        })
        .await;
        server.shutdown().await;
    });
}

/// The bare writer: accepts connections; each stdin line `N LINE` writes
/// LINE to the first N connections, one `write` each, then answers `done`.
fn run_bare() {
    use std::io::Read;
    // A backlog as long as the proxy's (std's 128 overflows when hundreds
    // of clients connect at once: their connections look established but
    // are never accepted).
    let socket =
        socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).expect("socket");
    let any: SocketAddr = "127.0.0.1:0".parse().expect("addr");
    socket.bind(&any.into()).expect("bind");
    socket.listen(1024).expect("listen");
    let listener: std::net::TcpListener = socket.into();
    println!("LISTEN {}", listener.local_addr().expect("addr"));
    std::io::stdout().flush().expect("stdout");
    let conns = Arc::new(std::sync::Mutex::new(Vec::<std::net::TcpStream>::new()));
    {
        let conns = conns.clone();
        std::thread::spawn(move || {
            for s in listener.incoming() {
                match s {
                    Ok(s) => {
                        let _ = s.set_nodelay(true);
                        conns.lock().expect("conns").push(s);
                    }
                    // A connection aborted before it was accepted, or no
                    // descriptor left for a moment: go on accepting.
                    Err(e) => {
                        eprintln!("bare writer: accept: {e}");
                        std::thread::sleep(Duration::from_millis(10));
                    }
                }
            }
        });
    }
    let stdin = std::io::stdin();
    let mut input = std::io::BufReader::new(stdin.lock());
    let mut command = String::new();
    while input.read_line(&mut command).unwrap_or(0) > 0 {
        let (n, line) = command.trim_end().split_once(' ').expect("N LINE");
        let n: usize = n.parse().expect("N");
        let bytes = format!("{line}\n").into_bytes();
        loop {
            let conns = conns.lock().expect("conns");
            if conns.len() >= n {
                for mut s in conns.iter().take(n) {
                    s.write_all(&bytes).expect("write");
                }
                break;
            }
            drop(conns);
            std::thread::sleep(Duration::from_millis(1));
        }
        println!("done");
        std::io::stdout().flush().expect("stdout");
        command.clear();
    }
    let _ = std::io::stdin().read(&mut [0u8; 1]);
}

/// The soft limit on open files, from /proc (Linux).
fn open_files_limit() -> Option<usize> {
    let text = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = text.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Transport {
    Tcp,
    Ws,
    /// The floor: the bare writer, no proxy.
    Bare,
}

impl Transport {
    fn name(self) -> &'static str {
        match self {
            Transport::Tcp => "tcp",
            Transport::Ws => "ws",
            Transport::Bare => "bare",
        }
    }
}

/// One subscribed client: lines over TCP, or one message per line over
/// WebSocket.
enum Session {
    Tcp(BufReader<TcpStream>),
    Ws(Box<tokio_tungstenite::WebSocketStream<TcpStream>>),
}

impl Session {
    /// The `i`th session connects from the `i`th address of 127.0.0.0/8
    /// (127.0.0.2 on): 20,000 sessions from one address would run short
    /// of ephemeral ports.
    async fn connect(proxy: SocketAddr, transport: Transport, i: usize) -> Session {
        let n = i as u32 + 2;
        let ip = std::net::Ipv4Addr::new(127, (n >> 16) as u8, (n >> 8) as u8, n as u8);
        let socket = tokio::net::TcpSocket::new_v4().expect("socket");
        socket
            .bind(SocketAddr::new(ip.into(), 0))
            .expect("bind a client address");
        let stream = socket.connect(proxy).await.expect("connect");
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

/// The bare writer's process: its address, and its stdin and stdout.
struct Bare {
    child: std::process::Child,
    addr: SocketAddr,
    out: std::io::BufReader<std::process::ChildStdout>,
}

impl Bare {
    fn start() -> Bare {
        let mut child = Command::new(std::env::current_exe().expect("own path"))
            .env(BARE_ENV, "1")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start the bare writer");
        let mut out = std::io::BufReader::new(child.stdout.take().expect("stdout"));
        let mut line = String::new();
        out.read_line(&mut line).expect("bare address");
        let addr = line
            .trim()
            .strip_prefix("LISTEN ")
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("unexpected line from the bare writer: {line:?}"));
        Bare { child, addr, out }
    }

    /// Tell it to write `line` to its first `n` connections.
    fn write_all(&mut self, n: usize, line: &str) {
        let stdin = self.child.stdin.as_mut().expect("stdin");
        writeln!(stdin, "{n} {line}").expect("command");
        stdin.flush().expect("flush");
    }

    /// Wait for the `done` of the last command.
    fn wait_done(&mut self) {
        let mut line = String::new();
        self.out.read_line(&mut line).expect("done");
    }
}

impl Drop for Bare {
    fn drop(&mut self) {
        drop(self.child.stdin.take());
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The sessions of one transport in one size, and their figures.
struct Set {
    bare: Option<Bare>,
    transport: Transport,
    sh: String,
    sessions: Vec<Session>,
    setup: Duration,
    lasts: Vec<Duration>,
    medians: Vec<Duration>,
}

async fn bench(sizes: Vec<usize>, transports: Vec<Transport>, limit: Option<usize>) {
    let upstream = mock::Mock::start().await;
    let mut child = Command::new(std::env::current_exe().expect("own path"))
        .env(CHILD_ENV, upstream.url())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start the proxy process");
    let mut out = std::io::BufReader::new(child.stdout.take().expect("stdout"));
    let mut line = String::new();
    out.read_line(&mut line).expect("proxy address");
    let addrs: Vec<SocketAddr> = line
        .trim()
        .strip_prefix("LISTEN ")
        .map(|a| a.split(' ').filter_map(|a| a.parse().ok()).collect())
        .unwrap_or_default();
    let [tcp, ws] = addrs[..] else {
        panic!("unexpected line from the proxy process: {line:?}");
    };

    for (run, n) in sizes.into_iter().enumerate() {
        let n = match limit {
            Some(l) if n + 64 > l => {
                println!(
                    "fanout N={n}: cut to {} sessions: the open files limit is {l} per process (hard; raising it needs CAP_SYS_RESOURCE)",
                    l - 64
                );
                l - 64
            }
            _ => n,
        };
        // Both transports' sessions held at once, their rounds alternating,
        // when the open files allow it (a slow moment of a shared machine
        // then hits both alike); else one transport after the other.
        let fits = |sets: usize| limit.is_none_or(|l| sets * n + 64 <= l);
        let groups: Vec<Vec<Transport>> = if fits(transports.len()) {
            vec![transports.clone()]
        } else {
            transports.iter().map(|t| vec![*t]).collect()
        };
        let interleaved = groups.len() == 1 && transports.len() > 1;
        let mut figures: Vec<(Transport, Duration)> = Vec::new();
        for group in groups {
            if !fits(1) {
                println!(
                    "fanout N={n}: skipped: needs about {} open files per process, the limit is {} (raise it with `ulimit -n`)",
                    n + 64,
                    limit.unwrap_or(0)
                );
                break;
            }
            let mut sets = Vec::new();
            for transport in group {
                let bare = (transport == Transport::Bare).then(Bare::start);
                let proxy = match transport {
                    Transport::Tcp => tcp,
                    Transport::Ws => ws,
                    Transport::Bare => bare.as_ref().expect("bare").addr,
                };
                let sh = hex::encode(sha2_of(
                    format!("fanout-{run}-{n}-{}", transport.name()).as_bytes(),
                ));
                let started = Instant::now();
                let sessions = connect_and_subscribe(proxy, transport, n, &sh).await;
                let setup = started.elapsed();
                sets.push(Set {
                    bare,
                    transport,
                    sh,
                    sessions,
                    setup,
                    lasts: Vec::new(),
                    medians: Vec::new(),
                });
            }
            for round in 0..ROUNDS {
                for set in sets.iter_mut() {
                    let history = vec![(format!("{:064x}", round + 1), 0i64)];
                    let status = mock::status_of(&history).expect("non-empty");
                    let sessions = std::mem::take(&mut set.sessions);
                    let (back, last, median) = one_round(
                        sessions,
                        &upstream,
                        set.bare.as_mut(),
                        &set.sh,
                        history,
                        &status,
                    )
                    .await;
                    set.sessions = back;
                    set.lasts.push(last);
                    set.medians.push(median);
                }
            }
            for mut set in sets {
                set.lasts.sort();
                set.medians.sort();
                let ms = |d: Duration| d.as_secs_f64() * 1000.0;
                println!(
                    "fanout N={n} {}: last session notified after {:.2} ms (median of {ROUNDS} rounds; best {:.2} ms, worst {:.2} ms); median session {:.2} ms; {n} sessions set up in {:.2} s",
                    set.transport.name(),
                    ms(set.lasts[ROUNDS / 2]),
                    ms(set.lasts[0]),
                    ms(set.lasts[ROUNDS - 1]),
                    ms(set.medians[ROUNDS / 2]),
                    set.setup.as_secs_f64(),
                );
                figures.push((set.transport, set.lasts[ROUNDS / 2]));
            }
        }
        let of = |t: Transport| figures.iter().find(|(f, _)| *f == t).map(|(_, d)| *d);
        if let Some(bare) = of(Transport::Bare) {
            for t in [Transport::Tcp, Transport::Ws] {
                if let Some(d) = of(t) {
                    println!(
                        "fanout N={n}: {} through electrum-lb / bare writes, last session notified: {:.2}x",
                        t.name(),
                        d.as_secs_f64() / bare.as_secs_f64()
                    );
                }
            }
        }
        if let (Some(tcp), Some(ws)) = (of(Transport::Tcp), of(Transport::Ws)) {
            println!(
                "fanout N={n}: WebSocket / TCP, last session notified: {:.2}x ({})",
                ws.as_secs_f64() / tcp.as_secs_f64(),
                if interleaved {
                    "rounds alternated"
                } else {
                    "one transport after the other: both sets do not fit the open files limit"
                }
            );
        }
    }
    drop(child.stdin.take());
    let _ = child.wait();
}

fn sha2_of(data: &[u8]) -> [u8; 32] {
    use sha2::Digest;
    sha2::Sha256::digest(data).into()
}

async fn connect_and_subscribe(
    proxy: SocketAddr,
    transport: Transport,
    n: usize,
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
            let mut session = Session::connect(proxy, transport, i).await;
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

/// One notification to every session: (sessions, last arrival, median arrival).
async fn one_round(
    sessions: Vec<Session>,
    upstream: &mock::Mock,
    bare: Option<&mut Bare>,
    sh: &str,
    history: Vec<(String, i64)>,
    status: &str,
) -> (Vec<Session>, Duration, Duration) {
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
            let at = Instant::now();
            assert!(line.contains(&status), "unexpected line: {line}");
            (session, at)
        });
    }
    all_ready.notified().await;
    // Let every reader reach its socket before the clock starts.
    tokio::task::yield_now().await;
    let t0 = Instant::now();
    let bare = match bare {
        Some(b) => {
            // The line the proxy would send.
            b.write_all(
                n,
                &format!("{{\"jsonrpc\":\"2.0\",\"method\":\"blockchain.scripthash.subscribe\",\"params\":[\"{sh}\",\"{status}\"]}}"),
            );
            Some(b)
        }
        None => {
            upstream.set_history(sh, history);
            None
        }
    };
    let mut back = Vec::with_capacity(n);
    let mut arrivals = Vec::with_capacity(n);
    while let Some(r) = tasks.join_next().await {
        let (session, at) = r.expect("reader task");
        back.push(session);
        arrivals.push(at.duration_since(t0));
    }
    if let Some(b) = bare {
        b.wait_done();
    }
    arrivals.sort();
    (back, arrivals[n - 1], arrivals[n / 2])
}
