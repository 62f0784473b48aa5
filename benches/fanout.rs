//! Fan-out benchmark: N sessions subscribed to one scripthash through the
//! proxy, one upstream notification, the time until the last session has it.
//!
//! ```text
//! cargo bench --bench fanout              # N = 1,000 and N = 10,000
//! cargo bench --bench fanout -- 2000 5000 # other sizes
//! ```
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

#[allow(dead_code)]
#[path = "../tests/support/mock.rs"]
mod mock;

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
const ROUNDS: usize = 7;
/// Clients connecting and subscribing at the same time.
const CONNECT_CONCURRENCY: usize = 256;

fn main() {
    if let Ok(upstream) = std::env::var(CHILD_ENV) {
        run_proxy(&upstream);
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
    let limit = open_files_limit();
    println!(
        "fanout: open files limit {} per process",
        limit.map_or("unknown".to_string(), |l| l.to_string())
    );
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(bench(sizes, limit));
}

/// The child: the proxy in front of `upstream`, until stdin closes.
fn run_proxy(upstream: &str) {
    let text = format!(
        r#"
[metrics]
listen = "127.0.0.1:0"

[coins.bench]
listen = ["tcp://127.0.0.1:0"]
upstreams = ["{upstream}"]
"#
    );
    let config = electrum_lb::Config::parse(&text, "fanout.toml").expect("config");
    let runtime = tokio::runtime::Builder::new_multi_thread()
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
        println!("LISTEN {addr}");
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

/// The soft limit on open files, from /proc (Linux).
fn open_files_limit() -> Option<usize> {
    let text = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = text.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

type Session = BufReader<TcpStream>;

async fn bench(sizes: Vec<usize>, limit: Option<usize>) {
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
    let proxy: SocketAddr = line
        .trim()
        .strip_prefix("LISTEN ")
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("unexpected line from the proxy process: {line:?}"));

    for (run, n) in sizes.into_iter().enumerate() {
        if let Some(limit) = limit {
            if n + 64 > limit {
                println!(
                    "fanout N={n}: skipped: needs about {} open files per process, the limit is {limit} (raise it with `ulimit -n`)",
                    n + 64
                );
                continue;
            }
        }
        let sh = hex::encode(sha2_of(format!("fanout-{run}-{n}").as_bytes()));
        let started = Instant::now();
        let mut sessions = connect_and_subscribe(proxy, n, &sh).await;
        let setup = started.elapsed();
        let mut lasts = Vec::new();
        let mut medians = Vec::new();
        for round in 0..ROUNDS {
            let history = vec![(format!("{:064x}", round + 1), 0i64)];
            let status = mock::status_of(&history).expect("non-empty");
            let (back, last, median) = one_round(sessions, &upstream, &sh, history, &status).await;
            sessions = back;
            lasts.push(last);
            medians.push(median);
        }
        lasts.sort();
        medians.sort();
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        println!(
            "fanout N={n}: last session notified after {:.2} ms (median of {ROUNDS} rounds; best {:.2} ms, worst {:.2} ms); median session {:.2} ms; {n} sessions set up in {:.2} s",
            ms(lasts[ROUNDS / 2]),
            ms(lasts[0]),
            ms(lasts[ROUNDS - 1]),
            ms(medians[ROUNDS / 2]),
            setup.as_secs_f64(),
        );
        drop(sessions);
    }
    drop(child.stdin.take());
    let _ = child.wait();
}

fn sha2_of(data: &[u8]) -> [u8; 32] {
    use sha2::Digest;
    sha2::Sha256::digest(data).into()
}

async fn connect_and_subscribe(proxy: SocketAddr, n: usize, sh: &str) -> Vec<Session> {
    let gate = Arc::new(Semaphore::new(CONNECT_CONCURRENCY));
    let request = format!(
        "{{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"blockchain.scripthash.subscribe\",\"params\":[\"{sh}\"]}}\n"
    );
    let mut tasks = JoinSet::new();
    for _ in 0..n {
        let gate = gate.clone();
        let request = request.clone();
        tasks.spawn(async move {
            let _permit = gate.acquire_owned().await.expect("open");
            let stream = TcpStream::connect(proxy).await.expect("connect");
            stream.set_nodelay(true).expect("nodelay");
            let mut session = BufReader::new(stream);
            session
                .get_mut()
                .write_all(request.as_bytes())
                .await
                .expect("write");
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
    upstream.set_history(sh, history);
    let mut back = Vec::with_capacity(n);
    let mut arrivals = Vec::with_capacity(n);
    while let Some(r) = tasks.join_next().await {
        let (session, at) = r.expect("reader task");
        back.push(session);
        arrivals.push(at.duration_since(t0));
    }
    arrivals.sort();
    (back, arrivals[n - 1], arrivals[n / 2])
}
