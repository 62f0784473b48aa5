//! End-to-end benchmark: clients straight to the upstreams, through HAProxy
//! in TCP mode, and through electrum-lb, on the same machine in the same run.
//!
//! ```text
//! cargo bench --bench proxy                        # the default run (about 5 minutes)
//! cargo bench --bench proxy -- --secs 5 --rounds 3 # longer, steadier figures
//! cargo bench --bench proxy -- --sessions 2000     # a smaller idle-session test
//! cargo bench --bench proxy -- --only uncached,light # some parts only
//!                                   # (uncached, cacheable, mix, light, idle)
//! cargo bench --bench proxy -- --upstream lean     # one upstream model only
//! cargo bench --bench proxy -- --upstream electrumx #   (default: both)
//! cargo bench --bench proxy -- --upstream-us 20     # upstreams that spend
//!                                   # 20 us of CPU on every request
//! ```
//!
//! Upstream models: every throughput workload runs against two kinds of mock
//! upstream, and the table has a section for each. **lean**: answers from
//! precomputed text in ~2 us of CPU, as cheaply as a cache hit costs the
//! proxy: the hop laid bare, the worst case for a proxy that saves upstream
//! work. **ElectrumX**: the same mock spinning, per method, the CPU a real
//! ElectrumX 2.0 spent per request as measured by `interop/upstream_cost.py`
//! (lower figures where there was a choice, see `electrumx_us`): what an
//! operator's upstreams cost. Light-load latency and idle memory are
//! measured against the first model only.
//!
//! Processes: this one is the load generator; two mock upstreams run in a
//! child process (this binary re-executed with `PROXY_BENCH_MOCK` set);
//! electrum-lb is the release binary as an operator runs it (its default
//! runtime, one worker per CPU, and logging; `PROXY_BENCH_THREADS=N` passes
//! `--threads N`), and again with `--threads 1` (row `lb -t1`); HAProxy is the system's `haproxy` in TCP mode with its
//! defaults (skipped with a note when it is not installed). Each run starts
//! a fresh proxy process. Every figure of one run comes from processes
//! sharing the same cores, so compare ratios, not absolutes.
//!
//! The mock is lean on purpose (raw JSON slices in, precomputed answers out,
//! one write per batch of requests): the test mock in `tests/support` builds
//! a JSON tree per request and writes each line with its own syscall, and
//! would be the bottleneck that hides what a hop costs.
//!
//! Workloads (closed loop: each connection keeps `DEPTH` requests in flight
//! and sends a new one for each answer):
//! - uncached: `blockchain.scripthash.get_history` over 1,000 scripthashes;
//! - cacheable: `blockchain.transaction.get` over 3,000 txids;
//! - mix: a wallet's sync: histories, balances, unspents, transactions,
//!   merkle proofs, headers deep and near the tip, fee estimates.
//!
//! Also measured: p50 at light load (16 connections, one request in flight
//! each) and the resident memory of electrum-lb (and HAProxy) holding idle
//! sessions that sent `server.version` and `blockchain.headers.subscribe`.
//!
//! Columns: answers per second in the measured window; the same against
//! HAProxy's in that workload; latency percentiles from send to answer;
//! CPU time (user and system, from /proc) the proxy process and the mock
//! upstreams spent per answer over the whole run, the figure least shaken
//! by other load on the machine; and the requests each upstream received.
//! Each path's row is its best round (highest rate; lowest p50 for light).

use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::Value;
use sha2::{Digest, Sha256};
use std::borrow::Cow;
use std::collections::HashMap;
use std::io::{BufRead, Write};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

const MOCK_ENV: &str = "PROXY_BENCH_MOCK";
const THREADS_ENV: &str = "PROXY_BENCH_THREADS";

/// Client connections of the throughput runs, and requests in flight on each.
const CONNECTIONS: usize = 64;
const DEPTH: usize = 4;
/// The light-load run.
const LIGHT_CONNECTIONS: usize = 16;
/// Answers in the first part of a run are not measured.
const WARM_UP: Duration = Duration::from_millis(500);

const SCRIPTHASHES: usize = 1_000;
const TXIDS: usize = 3_000;
const BLOCKS: usize = 1_000;
const UPSTREAMS: usize = 2;

fn main() {
    raise_open_files_limit();
    if std::env::var(MOCK_ENV).is_ok() {
        return mock_main();
    }
    let opts = Options::from_args();
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(bench(opts));
}

struct Options {
    secs: f64,
    rounds: usize,
    sessions: usize,
    /// Parts to run (`--only uncached,light`): all when empty.
    only: Vec<String>,
    /// What the mock upstreams cost per request; one table section each.
    models: Vec<Model>,
}

impl Options {
    fn wants(&self, part: &str) -> bool {
        self.only.is_empty() || self.only.iter().any(|p| p == part)
    }
}

impl Options {
    fn from_args() -> Options {
        let mut o = Options {
            secs: 3.0,
            rounds: 3,
            sessions: 10_000,
            only: Vec::new(),
            models: vec![Model::Flat(0), Model::ElectrumX],
        };
        let args: Vec<String> = std::env::args().collect();
        let value = |name: &str| {
            args.iter()
                .position(|a| a == name)
                .and_then(|i| args.get(i + 1))
                .and_then(|v| v.parse::<f64>().ok())
        };
        if let Some(v) = value("--secs") {
            o.secs = v.max(1.0);
        }
        if let Some(v) = value("--rounds") {
            o.rounds = (v as usize).max(1);
        }
        if let Some(v) = value("--sessions") {
            o.sessions = v as usize;
        }
        if let Some(v) = value("--upstream-us") {
            o.models = vec![Model::Flat(v as u64)];
        }
        if let Some(i) = args.iter().position(|a| a == "--upstream") {
            o.models = match args.get(i + 1).map(String::as_str) {
                Some("lean") => vec![Model::Flat(0)],
                Some("electrumx") => vec![Model::ElectrumX],
                _ => o.models,
            };
        }
        if let Some(i) = args.iter().position(|a| a == "--only") {
            o.only = args
                .get(i + 1)
                .map(|v| v.split(',').map(str::to_string).collect())
                .unwrap_or_default();
        }
        o
    }
}

/// How much CPU a mock upstream spends on each request.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Model {
    /// The same for every method (`Flat(0)`: the lean mock, which answers
    /// from precomputed text as cheaply as a cache hit costs the proxy).
    Flat(u64),
    /// What a real ElectrumX 2.0 spends, per method, as measured by
    /// `interop/upstream_cost.py` on this kind of machine (see [`electrumx_us`]).
    ElectrumX,
}

impl Model {
    fn name(self) -> String {
        match self {
            Model::Flat(0) => "lean".into(),
            Model::Flat(n) => format!("{n} us"),
            Model::ElectrumX => "ElectrumX".into(),
        }
    }

    /// How the mock child process is told (its environment).
    fn env(self) -> String {
        match self {
            Model::Flat(n) => n.to_string(),
            Model::ElectrumX => "electrumx".into(),
        }
    }

    fn from_env(v: &str) -> Model {
        match v {
            "electrumx" => Model::ElectrumX,
            n => Model::Flat(n.parse().unwrap_or(0)),
        }
    }

    fn cost(self, method: &str) -> Duration {
        Duration::from_micros(match self {
            Model::Flat(n) => n,
            Model::ElectrumX => electrumx_us(method),
        })
    }

    fn describe(self) -> String {
        match self {
            Model::Flat(0) => "lean mock upstreams (precomputed answers, ~2 us of CPU per request)".into(),
            Model::Flat(n) => format!("mock upstreams spending {n} us of CPU per request"),
            Model::ElectrumX => "mock upstreams spending what ElectrumX 2.0 spends per method (interop/upstream_cost.py): history 78 us, balance 160, header 128, transaction.get 415, anything else 52".into(),
        }
    }
}

/// CPU microseconds ElectrumX 2.0 spent per request, medians of three runs
/// of `interop/upstream_cost.py` on a 2-core machine of this kind (regtest,
/// everything in the page cache, Python 3.11, no uvloop). The lower figure
/// wherever there was a choice, so that the upstream looks as cheap as it
/// can: histories as served from ElectrumX's own cache (179 us when it
/// misses), `transaction.get` without the node's share (another 146 us),
/// and methods not measured at the floor (`server.ping`, 52 us).
fn electrumx_us(method: &str) -> u64 {
    match method {
        "blockchain.scripthash.get_history" => 78,
        "blockchain.scripthash.get_balance" => 160,
        "blockchain.block.header" | "blockchain.block.headers" => 128,
        "blockchain.transaction.get" => 415,
        _ => 52,
    }
}

// ---------------------------------------------------------------------------
// The chain both the mock and the load generator know (deterministic).

struct Data {
    scripthashes: Vec<String>,
    txids: Vec<String>,
    /// Result text by first param (scripthash or txid).
    histories: HashMap<String, String>,
    balances: HashMap<String, String>,
    unspents: HashMap<String, String>,
    txs: HashMap<String, (usize, String)>,
    /// Quoted header hex by height.
    headers: Vec<String>,
}

fn hash_hex(text: &str) -> String {
    hex::encode(Sha256::digest(text.as_bytes()))
}

impl Data {
    fn new() -> Data {
        let scripthashes: Vec<String> = (0..SCRIPTHASHES)
            .map(|i| hash_hex(&format!("script-{i}")))
            .collect();
        let txids: Vec<String> = (0..TXIDS).map(|i| hash_hex(&format!("tx-{i}"))).collect();
        let mut histories = HashMap::new();
        let mut balances = HashMap::new();
        let mut unspents = HashMap::new();
        for (i, sh) in scripthashes.iter().enumerate() {
            let n = 1 + i % 4;
            let items: Vec<(usize, usize)> = (0..n)
                .map(|k| ((i * 3 + k) % TXIDS, 10 + (i * 7 + k * 13) % (BLOCKS - 20)))
                .collect();
            let history: Vec<String> = items
                .iter()
                .map(|(t, h)| format!("{{\"tx_hash\":\"{}\",\"height\":{h}}}", txids[*t]))
                .collect();
            histories.insert(sh.clone(), format!("[{}]", history.join(",")));
            balances.insert(
                sh.clone(),
                format!("{{\"confirmed\":{},\"unconfirmed\":0}}", n * 100_000),
            );
            let utxos: Vec<String> = items
                .iter()
                .map(|(t, h)| {
                    format!(
                        "{{\"tx_hash\":\"{}\",\"tx_pos\":0,\"height\":{h},\"value\":100000}}",
                        txids[*t]
                    )
                })
                .collect();
            unspents.insert(sh.clone(), format!("[{}]", utxos.join(",")));
        }
        let txs = txids
            .iter()
            .enumerate()
            .map(|(i, t)| {
                // 200 to 500 bytes, like most wallet transactions.
                let len = 200 + (i * 37) % 300;
                let mut raw = String::with_capacity(2 * len + 2);
                raw.push('"');
                while raw.len() < 2 * len + 1 {
                    raw.push_str(&hash_hex(&format!("{t}-{}", raw.len())));
                }
                raw.truncate(2 * len + 1);
                raw.push('"');
                (t.clone(), (i, raw))
            })
            .collect();
        let headers = (0..BLOCKS)
            .map(|h| {
                let a = hash_hex(&format!("header-{h}"));
                let b = hash_hex(&format!("header-{h}-b"));
                format!("\"{a}{b}{}\"", &a[..32])
            })
            .collect();
        Data {
            scripthashes,
            txids,
            histories,
            balances,
            unspents,
            txs,
            headers,
        }
    }

    fn tip(&self) -> usize {
        BLOCKS - 1
    }
}

// ---------------------------------------------------------------------------
// The mock upstreams (child process).

/// What one mock upstream received.
#[derive(Default)]
struct UpstreamStats {
    requests: AtomicU64,
}

struct MockState {
    data: Data,
    /// CPU time spent on each request, like a real server's work.
    cost: Model,
    /// `blockchain.transaction.get` requests per txid, over both upstreams.
    per_txid: Vec<AtomicU32>,
}

fn mock_main() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let cost = Model::from_env(&std::env::var(MOCK_ENV).unwrap_or_default());
        let state = Arc::new(MockState {
            data: Data::new(),
            cost,
            per_txid: (0..TXIDS).map(|_| AtomicU32::new(0)).collect(),
        });
        let mut addrs = Vec::new();
        for _ in 0..UPSTREAMS {
            let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
            addrs.push(listener.local_addr().expect("addr").to_string());
            let stats = Arc::new(UpstreamStats::default());
            let state = state.clone();
            tokio::spawn(async move {
                while let Ok((stream, _)) = listener.accept().await {
                    let _ = stream.set_nodelay(true);
                    tokio::spawn(mock_conn(stream, state.clone(), stats.clone()));
                }
            });
        }
        println!("LISTEN {}", addrs.join(" "));
        std::io::stdout().flush().expect("stdout");
        wait_for_stdin_eof().await;
    });
}

/// Until the parent closes our stdin (or dies).
async fn wait_for_stdin_eof() {
    let _ = tokio::task::spawn_blocking(|| {
        let mut sink = String::new();
        while std::io::stdin().read_line(&mut sink).unwrap_or(0) > 0 {
            sink.clear();
        }
    })
    .await;
}

async fn mock_conn(mut stream: TcpStream, state: Arc<MockState>, stats: Arc<UpstreamStats>) {
    let mut pending: Vec<u8> = Vec::with_capacity(16 * 1024);
    let mut out: Vec<u8> = Vec::with_capacity(16 * 1024);
    let mut chunk = vec![0u8; 64 * 1024];
    loop {
        let n = match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        pending.extend_from_slice(&chunk[..n]);
        let mut start = 0;
        while let Some(end) = pending[start..].iter().position(|&b| b == b'\n') {
            let line = &pending[start..start + end];
            start += end + 1;
            mock_answer(line, &state, &stats, &mut out);
        }
        pending.drain(..start);
        if !out.is_empty() {
            if stream.write_all(&out).await.is_err() {
                return;
            }
            out.clear();
        }
    }
}

#[derive(Deserialize)]
struct MockRequest<'a> {
    #[serde(borrow)]
    id: Option<&'a RawValue>,
    #[serde(borrow)]
    method: Cow<'a, str>,
    #[serde(borrow, default)]
    params: Option<&'a RawValue>,
}

fn mock_answer(line: &[u8], state: &MockState, stats: &UpstreamStats, out: &mut Vec<u8>) {
    let Ok(req) = serde_json::from_slice::<MockRequest>(line) else {
        return;
    };
    let data = &state.data;
    let params: Vec<&RawValue> = req
        .params
        .and_then(|p| serde_json::from_str(p.get()).ok())
        .unwrap_or_default();
    let first_str = || {
        params
            .first()
            .and_then(|p| serde_json::from_str::<&str>(p.get()).ok())
            .unwrap_or_default()
    };
    let uint = |i: usize| {
        params
            .get(i)
            .and_then(|p| p.get().parse::<usize>().ok())
            .unwrap_or(0)
    };
    let method = req.method.as_ref();
    if !method.starts_with("bench.") {
        stats.requests.fetch_add(1, Ordering::Relaxed);
        let cost = state.cost.cost(method);
        if !cost.is_zero() {
            let t = Instant::now();
            while t.elapsed() < cost {
                std::hint::spin_loop();
            }
        }
    }
    let result: Result<Cow<str>, &str> = match method {
        "server.version" => Ok("[\"BenchMock 1.0\",\"1.4\"]".into()),
        "server.features" => Ok(format!(
            "{{\"genesis_hash\":\"{}\",\"protocol_min\":\"1.4\",\"protocol_max\":\"1.4.2\",\"hash_function\":\"sha256\",\"server_version\":\"BenchMock 1.0\",\"hosts\":{{}},\"pruning\":null}}",
            &data.headers[0][1..65]
        )
        .into()),
        "server.ping" => Ok("null".into()),
        "blockchain.headers.subscribe" => Ok(format!(
            "{{\"hex\":{},\"height\":{}}}",
            data.headers[data.tip()],
            data.tip()
        )
        .into()),
        "blockchain.block.header" => data
            .headers
            .get(uint(0))
            .map(|h| Cow::Borrowed(h.as_str()))
            .ok_or("height out of range"),
        "blockchain.scripthash.get_history" => Ok(data
            .histories
            .get(first_str())
            .map_or("[]".into(), |h| h.as_str().into())),
        "blockchain.scripthash.get_balance" => Ok(data.balances.get(first_str()).map_or(
            "{\"confirmed\":0,\"unconfirmed\":0}".into(),
            |h| h.as_str().into(),
        )),
        "blockchain.scripthash.listunspent" => Ok(data
            .unspents
            .get(first_str())
            .map_or("[]".into(), |h| h.as_str().into())),
        "blockchain.transaction.get" => match data.txs.get(first_str()) {
            Some((i, raw)) => {
                state.per_txid[*i].fetch_add(1, Ordering::Relaxed);
                Ok(raw.as_str().into())
            }
            None => Err("no such transaction"),
        },
        "blockchain.transaction.get_merkle" => Ok(format!(
            "{{\"block_height\":{},\"merkle\":[\"{}\",\"{}\",\"{}\"],\"pos\":1}}",
            uint(1),
            data.txids[0],
            data.txids[1],
            data.txids[2]
        )
        .into()),
        "blockchain.estimatefee" => Ok("0.0001".into()),
        "blockchain.relayfee" => Ok("0.00001".into()),
        "bench.stats" => {
            let counts: Vec<u32> = state
                .per_txid
                .iter()
                .map(|c| c.load(Ordering::Relaxed))
                .collect();
            Ok(format!(
                "{{\"requests\":{},\"tx_get\":{},\"max_per_txid\":{}}}",
                stats.requests.load(Ordering::Relaxed),
                counts.iter().map(|c| *c as u64).sum::<u64>(),
                counts.iter().max().copied().unwrap_or(0)
            )
            .into())
        }
        "bench.reset" => {
            stats.requests.store(0, Ordering::Relaxed);
            for c in &state.per_txid {
                c.store(0, Ordering::Relaxed);
            }
            Ok("true".into())
        }
        _ => Err("unknown method"),
    };
    let Some(id) = req.id else {
        return;
    };
    match result {
        Ok(r) => {
            out.extend_from_slice(b"{\"jsonrpc\":\"2.0\",\"result\":");
            out.extend_from_slice(r.as_bytes());
        }
        Err(message) => {
            out.extend_from_slice(b"{\"jsonrpc\":\"2.0\",\"error\":{\"code\":2,\"message\":\"");
            out.extend_from_slice(message.as_bytes());
            out.extend_from_slice(b"\"}");
        }
    }
    out.extend_from_slice(b",\"id\":");
    out.extend_from_slice(id.get().as_bytes());
    out.extend_from_slice(b"}\n");
}

// ---------------------------------------------------------------------------
// Child processes, seen from the parent.

/// A child process killed when dropped.
struct Proc {
    child: Child,
    addrs: Vec<SocketAddr>,
}

impl Proc {
    /// Re-execute this binary with `env` set; it prints `LISTEN addr...`.
    fn spawn_self(env: &[(&str, String)]) -> Proc {
        let mut cmd = Command::new(std::env::current_exe().expect("own path"));
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start a child process");
        let mut out = std::io::BufReader::new(child.stdout.take().expect("stdout"));
        let mut line = String::new();
        out.read_line(&mut line).expect("child address");
        let addrs = line
            .trim()
            .strip_prefix("LISTEN ")
            .unwrap_or_else(|| panic!("unexpected line from a child: {line:?}"))
            .split(' ')
            .map(|a| a.parse().expect("address"))
            .collect();
        Proc { child, addrs }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The release binary (`cargo bench` builds it), as an operator runs it:
/// default runtime and logging, a config naming the two upstreams. Ready
/// once it listens and both upstreams are connected.
fn start_electrum_lb(
    upstreams: &[SocketAddr],
    dir: &std::path::Path,
    threads: Option<String>,
) -> Proc {
    let urls: Vec<String> = upstreams.iter().map(|a| format!("\"tcp://{a}\"")).collect();
    let text = format!(
        "[metrics]\nlisten = \"127.0.0.1:0\"\n\n[coins.bench]\nlisten = [\"tcp://127.0.0.1:0\"]\nupstreams = [{}]\n",
        urls.join(", ")
    );
    let path = dir.join("electrum-lb.toml");
    std::fs::write(&path, text).expect("write electrum-lb.toml");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_electrum-lb"));
    cmd.arg("--config").arg(&path);
    if let Some(threads) = threads {
        cmd.arg("--threads").arg(threads);
    }
    let mut child = cmd
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start electrum-lb");
    // Its log tells where it listens and when its upstreams are up; the
    // rest of the log is drained for as long as it runs.
    let stderr = child.stderr.take().expect("stderr");
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            let _ = tx.send(line);
        }
    });
    let value = |line: &str, key: &str| {
        let at = line.find(key)? + key.len();
        line[at..].split_whitespace().next().map(str::to_string)
    };
    let mut listen = None;
    let mut up = std::collections::HashSet::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while listen.is_none() || up.len() < upstreams.len() {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = rx
            .recv_timeout(left)
            .expect("electrum-lb did not get ready in time");
        let line = strip_ansi(&line);
        if line.contains("listening") {
            listen = value(&line, "listen=tcp://").and_then(|a| a.parse::<SocketAddr>().ok());
        }
        if line.contains("upstream connection up") {
            up.extend(value(&line, "upstream="));
        }
    }
    // The hub subscribes to the tip as soon as a connection is up.
    std::thread::sleep(Duration::from_millis(200));
    std::thread::spawn(move || while rx.recv().is_ok() {});
    Proc {
        child,
        addrs: vec![listen.expect("listen address")],
    }
}

fn strip_ansi(line: &str) -> String {
    let mut clean = String::with_capacity(line.len());
    let mut skip = false;
    for ch in line.chars() {
        match (skip, ch) {
            (_, '\u{1b}') => skip = true,
            (true, 'm') => skip = false,
            (true, _) => {}
            (false, c) => clean.push(c),
        }
    }
    clean
}

fn haproxy_installed() -> bool {
    Command::new("haproxy")
        .arg("-v")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// HAProxy in TCP mode in front of the upstreams, on a port from the OS.
async fn start_haproxy(upstreams: &[SocketAddr], dir: &std::path::Path) -> Proc {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let servers: String = upstreams
        .iter()
        .enumerate()
        .map(|(i, a)| format!("    server u{i} {a}\n"))
        .collect();
    // Two descriptors per session (client and server side).
    let maxconn = open_files_limit().saturating_sub(200) / 2;
    let cfg = format!(
        "global\n    maxconn {maxconn}\n\ndefaults\n    mode tcp\n    timeout connect 5s\n    timeout client 600s\n    timeout server 600s\n\nfrontend electrum\n    bind 127.0.0.1:{port}\n    default_backend upstreams\n\nbackend upstreams\n    balance leastconn\n{servers}"
    );
    let path = dir.join("haproxy.cfg");
    std::fs::write(&path, cfg).expect("write haproxy.cfg");
    let child = Command::new("haproxy")
        .arg("-db")
        .arg("-f")
        .arg(&path)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start haproxy");
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(addr).await.is_err() {
        assert!(Instant::now() < deadline, "haproxy did not start listening");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Proc {
        child,
        addrs: vec![addr],
    }
}

/// One request to a mock upstream's control methods.
async fn mock_call(upstream: SocketAddr, method: &str) -> Value {
    let mut s = TcpStream::connect(upstream).await.expect("mock");
    let line = format!("{{\"id\":0,\"method\":\"{method}\",\"params\":[]}}\n");
    s.write_all(line.as_bytes()).await.expect("write");
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    while !buf.ends_with(b"\n") {
        let n = s.read(&mut chunk).await.expect("read");
        assert!(n > 0, "mock closed");
        buf.extend_from_slice(&chunk[..n]);
    }
    let v: Value = serde_json::from_slice(&buf).expect("JSON");
    v["result"].clone()
}

/// CPU time (user and system, every thread) a process has used, in us.
fn cpu_us(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name, which is in parentheses.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    // SAFETY: sysconf reads a constant.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Some(ticks * 1_000_000 / hz)
}

fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Raise the soft limit on open files to the hard limit (children inherit it).
fn raise_open_files_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain syscalls on a stack value.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

fn open_files_limit() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: a plain syscall on a stack value.
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
    }
    lim.rlim_cur
}

// ---------------------------------------------------------------------------
// The load generator.

#[derive(Clone, Copy, PartialEq, Eq)]
enum Workload {
    Uncached,
    Cacheable,
    Mix,
}

impl Workload {
    fn name(self) -> &'static str {
        match self {
            Workload::Uncached => "uncached",
            Workload::Cacheable => "cacheable",
            Workload::Mix => "mix",
        }
    }

    /// Request lines without their id: `{...,"id":` (the id and `}\n` follow).
    fn bodies(self, data: &Data) -> Vec<Vec<u8>> {
        let req = |method: &str, params: String| {
            format!("{{\"jsonrpc\":\"2.0\",\"method\":\"{method}\",\"params\":{params},\"id\":")
                .into_bytes()
        };
        let quoted = |s: &str| format!("[\"{s}\"]");
        match self {
            Workload::Uncached => data
                .scripthashes
                .iter()
                .map(|sh| req("blockchain.scripthash.get_history", quoted(sh)))
                .collect(),
            Workload::Cacheable => data
                .txids
                .iter()
                .map(|t| req("blockchain.transaction.get", quoted(t)))
                .collect(),
            Workload::Mix => {
                let mut rng = Rng(0x5eed);
                let deep = data.tip() - 10;
                (0..20_000)
                    .map(|_| {
                        let sh = &data.scripthashes[rng.below(SCRIPTHASHES)];
                        let tx = &data.txids[rng.below(TXIDS)];
                        match rng.below(100) {
                            0..35 => req("blockchain.scripthash.get_history", quoted(sh)),
                            35..40 => req("blockchain.scripthash.get_balance", quoted(sh)),
                            40..45 => req("blockchain.scripthash.listunspent", quoted(sh)),
                            45..70 => req("blockchain.transaction.get", quoted(tx)),
                            70..80 => req(
                                "blockchain.transaction.get_merkle",
                                format!("[\"{tx}\",{}]", rng.below(deep)),
                            ),
                            80..90 => {
                                req("blockchain.block.header", format!("[{}]", rng.below(deep)))
                            }
                            90..95 => req(
                                "blockchain.block.header",
                                format!("[{}]", data.tip() - rng.below(3)),
                            ),
                            _ => req("blockchain.estimatefee", "[2]".into()),
                        }
                    })
                    .collect()
            }
        }
    }
}

/// xorshift64: cheap, deterministic.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % n as u64) as usize
    }
}

/// What one run measured.
#[derive(Clone, Default)]
struct Run {
    /// Answers per second in the measured window.
    rate: f64,
    p50_us: u32,
    p99_us: u32,
    errors: u64,
    /// Requests each upstream received during the run.
    upstream: Vec<u64>,
    tx_get: u64,
    max_per_txid: u64,
    /// Answers over the whole run, warm-up included.
    answers: u64,
    /// CPU time per answer of the proxy process (HAProxy or electrum-lb)
    /// and of the mock upstreams, in microseconds.
    front_cpu_us: Option<f64>,
    upstream_cpu_us: Option<f64>,
}

struct ConnResult {
    latencies_us: Vec<u32>,
    errors: u64,
    answers: u64,
}

/// Drive `connections` closed-loop connections to `targets` (round robin)
/// for `secs`, `depth` requests in flight on each.
async fn load(
    targets: &[SocketAddr],
    bodies: Arc<Vec<Vec<u8>>>,
    connections: usize,
    depth: usize,
    secs: f64,
) -> Run {
    let start = Instant::now() + Duration::from_millis(100);
    let warm = start + WARM_UP;
    let stop = start + Duration::from_secs_f64(secs);
    let mut tasks = JoinSet::new();
    for c in 0..connections {
        let addr = targets[c % targets.len()];
        let bodies = bodies.clone();
        tasks.spawn(async move {
            let mut stream = TcpStream::connect(addr).await.expect("connect");
            stream.set_nodelay(true).expect("nodelay");
            tokio::time::sleep_until(start.into()).await;
            drive(&mut stream, &bodies, depth, c as u64, warm, stop).await
        });
    }
    let mut latencies = Vec::new();
    let mut errors = 0;
    let mut answers = 0;
    while let Some(r) = tasks.join_next().await {
        let r = r.expect("connection task");
        latencies.extend(r.latencies_us);
        errors += r.errors;
        answers += r.answers;
    }
    latencies.sort_unstable();
    let pct = |p: f64| {
        latencies
            .get(((latencies.len() as f64 * p) as usize).min(latencies.len().saturating_sub(1)))
            .copied()
            .unwrap_or(0)
    };
    Run {
        rate: latencies.len() as f64 / (stop - warm).as_secs_f64(),
        p50_us: pct(0.50),
        p99_us: pct(0.99),
        errors,
        answers,
        ..Run::default()
    }
}

/// Send every body once (over a few connections, all pipelined) and wait
/// for every answer; the number of answers.
async fn prime(targets: &[SocketAddr], bodies: &Arc<Vec<Vec<u8>>>) -> u64 {
    const PRIME_CONNECTIONS: usize = 8;
    let mut tasks = JoinSet::new();
    for c in 0..PRIME_CONNECTIONS {
        let addr = targets[c % targets.len()];
        let bodies = bodies.clone();
        tasks.spawn(async move {
            let mut stream = TcpStream::connect(addr).await.expect("connect");
            let mut out = Vec::new();
            let mut sent = 0u64;
            for (i, body) in bodies.iter().enumerate().skip(c).step_by(PRIME_CONNECTIONS) {
                out.extend_from_slice(body);
                out.extend_from_slice(i.to_string().as_bytes());
                out.extend_from_slice(b"}\n");
                sent += 1;
            }
            let (mut rd, mut wr) = stream.split();
            let write = async {
                wr.write_all(&out).await.expect("write");
            };
            let read = async {
                let mut answers = 0u64;
                let mut chunk = vec![0u8; 64 * 1024];
                while answers < sent {
                    let n = rd.read(&mut chunk).await.expect("read");
                    assert!(n > 0, "closed while priming");
                    answers += chunk[..n].iter().filter(|&&b| b == b'\n').count() as u64;
                }
                answers
            };
            tokio::join!(write, read).1
        });
    }
    let mut answers = 0;
    while let Some(n) = tasks.join_next().await {
        answers += n.expect("priming task");
    }
    answers
}

async fn drive(
    stream: &mut TcpStream,
    bodies: &[Vec<u8>],
    depth: usize,
    seed: u64,
    warm: Instant,
    stop: Instant,
) -> ConnResult {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ (seed + 1).wrapping_mul(0x2545_f491_4f6c_dd1d));
    let mut sent = vec![Instant::now(); depth];
    let mut out = Vec::with_capacity(4096);
    let mut result = ConnResult {
        latencies_us: Vec::with_capacity(4096),
        errors: 0,
        answers: 0,
    };
    let push = |out: &mut Vec<u8>, rng: &mut Rng, id: u64| {
        out.extend_from_slice(&bodies[rng.below(bodies.len())]);
        out.extend_from_slice(id.to_string().as_bytes());
        out.extend_from_slice(b"}\n");
    };
    for (slot, at) in sent.iter_mut().enumerate() {
        push(&mut out, &mut rng, slot as u64);
        *at = Instant::now();
    }
    if stream.write_all(&out).await.is_err() {
        return result;
    }
    out.clear();
    let mut pending: Vec<u8> = Vec::with_capacity(64 * 1024);
    let mut chunk = vec![0u8; 64 * 1024];
    loop {
        let n = match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        pending.extend_from_slice(&chunk[..n]);
        let now = Instant::now();
        if now >= stop {
            break;
        }
        let mut at = 0;
        while let Some(end) = pending[at..].iter().position(|&b| b == b'\n') {
            let line = &pending[at..at + end];
            at += end + 1;
            let Some(id) = reply_id(line) else {
                continue;
            };
            let slot = (id % depth as u64) as usize;
            result.answers += 1;
            if now >= warm {
                let us = now.duration_since(sent[slot]).as_micros();
                result.latencies_us.push(us.min(u32::MAX as u128) as u32);
                if line.starts_with(b"{\"jsonrpc\":\"2.0\",\"error\"") {
                    result.errors += 1;
                }
            }
            push(&mut out, &mut rng, id + depth as u64);
            sent[slot] = now;
        }
        pending.drain(..at);
        if !out.is_empty() {
            if stream.write_all(&out).await.is_err() {
                break;
            }
            out.clear();
        }
    }
    result
}

/// The numeric id at the end of a reply line (`..."id":123}`).
fn reply_id(line: &[u8]) -> Option<u64> {
    let key = line.windows(5).rposition(|w| w == b"\"id\":")?;
    let digits = &line[key + 5..];
    let end = digits.iter().position(|b| !b.is_ascii_digit())?;
    std::str::from_utf8(&digits[..end]).ok()?.parse().ok()
}

// ---------------------------------------------------------------------------
// The runs.

#[derive(Clone, Copy, PartialEq, Eq)]
enum Path {
    Direct,
    Haproxy,
    Lb,
    /// electrum-lb with `--threads 1` (a current-thread runtime).
    Lb1,
}

impl Path {
    fn name(self) -> &'static str {
        match self {
            Path::Direct => "direct",
            Path::Haproxy => "haproxy",
            Path::Lb => "electrum-lb",
            Path::Lb1 => "lb -t1",
        }
    }
}

struct Bench {
    upstreams: Vec<SocketAddr>,
    mock_pid: u32,
    haproxy: bool,
    dir: std::path::PathBuf,
}

impl Bench {
    /// Start what `path` needs; the targets clients connect to.
    async fn front(&self, path: Path) -> (Option<Proc>, Vec<SocketAddr>) {
        match path {
            Path::Direct => (None, self.upstreams.clone()),
            Path::Haproxy => {
                let p = start_haproxy(&self.upstreams, &self.dir).await;
                let addrs = p.addrs.clone();
                (Some(p), addrs)
            }
            Path::Lb | Path::Lb1 => {
                let threads = match path {
                    Path::Lb1 => Some("1".to_string()),
                    _ => std::env::var(THREADS_ENV).ok(),
                };
                let p = start_electrum_lb(&self.upstreams, &self.dir, threads);
                let addrs = p.addrs.clone();
                (Some(p), addrs)
            }
        }
    }

    async fn run(
        &self,
        path: Path,
        bodies: &Arc<Vec<Vec<u8>>>,
        connections: usize,
        depth: usize,
        secs: f64,
        prime_first: bool,
    ) -> Run {
        let (front, targets) = self.front(path).await;
        for u in &self.upstreams {
            mock_call(*u, "bench.reset").await;
        }
        let front_pid = front.as_ref().map(Proc::pid);
        let cpu = |pid: Option<u32>| pid.and_then(cpu_us);
        let (front0, mock0) = (cpu(front_pid), cpu(Some(self.mock_pid)));
        // Every distinct request once before the clock starts (on every
        // path alike): the steady state of a proxy that has been running,
        // not the first seconds of a cold cache. Counted in the CPU and
        // upstream figures, not in the rate.
        let primed = if prime_first {
            prime(&targets, bodies).await
        } else {
            0
        };
        let mut run = load(&targets, bodies.clone(), connections, depth, secs).await;
        run.answers += primed;
        let per_answer = |before: Option<u64>, after: Option<u64>| {
            Some((after? - before?) as f64 / run.answers.max(1) as f64)
        };
        run.front_cpu_us = per_answer(front0, cpu(front_pid));
        run.upstream_cpu_us = per_answer(mock0, cpu(Some(self.mock_pid)));
        for u in &self.upstreams {
            let stats = mock_call(*u, "bench.stats").await;
            run.upstream.push(stats["requests"].as_u64().unwrap_or(0));
            // Per-txid counts are shared by both upstreams.
            run.tx_get = stats["tx_get"].as_u64().unwrap_or(0);
            run.max_per_txid = stats["max_per_txid"].as_u64().unwrap_or(0);
        }
        drop(front);
        run
    }
}

async fn bench(opts: Options) {
    let haproxy = haproxy_installed();
    let dir = std::env::temp_dir().join(format!("electrum-lb-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let data = Data::new();
    let mut paths = vec![Path::Direct];
    if haproxy {
        paths.push(Path::Haproxy);
    }
    paths.push(Path::Lb);
    paths.push(Path::Lb1);
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    println!(
        "electrum-lb end-to-end benchmark: {UPSTREAMS} mock upstreams (one thread for both), {cpus} CPUs shared by every process"
    );
    for m in &opts.models {
        println!("upstream \"{}\": {}", m.name(), m.describe());
    }
    println!(
        "throughput runs: {CONNECTIONS} connections x {DEPTH} requests in flight, {:.1} s each ({} ms warm-up not measured; cacheable: every txid asked once first), best of {} rounds per path",
        opts.secs,
        WARM_UP.as_millis(),
        opts.rounds
    );
    if !haproxy {
        println!("haproxy: not installed, its rows are skipped (apt-get install haproxy)");
    }

    let workloads = [Workload::Uncached, Workload::Cacheable, Workload::Mix];
    let mut results: Vec<(Model, Workload, Path, Run)> = Vec::new();
    let mut light: Vec<(Path, Run)> = Vec::new();
    let mut memory = Err("skipped (--only)".to_string());
    for (i, &model) in opts.models.iter().enumerate() {
        let mock = Proc::spawn_self(&[(MOCK_ENV, model.env())]);
        let bench = Bench {
            upstreams: mock.addrs.clone(),
            mock_pid: mock.pid(),
            haproxy,
            dir: dir.clone(),
        };
        for w in workloads.into_iter().filter(|w| opts.wants(w.name())) {
            let bodies = Arc::new(w.bodies(&data));
            let mut best: HashMap<&str, Run> = HashMap::new();
            for _ in 0..opts.rounds {
                // Paths interleaved, so that a slow moment of the machine
                // hits all of them alike.
                for &p in &paths {
                    let prime_first = w == Workload::Cacheable;
                    let run = bench
                        .run(p, &bodies, CONNECTIONS, DEPTH, opts.secs, prime_first)
                        .await;
                    let keep = best.get(p.name()).is_none_or(|b| run.rate > b.rate);
                    if keep {
                        best.insert(p.name(), run);
                    }
                }
            }
            for &p in &paths {
                results.push((model, w, p, best[p.name()].clone()));
            }
        }
        // Latency at light load and idle memory: against the first model
        // only (the lean mock by default, where the hop is all there is).
        if i > 0 {
            continue;
        }
        let uncached = Arc::new(Workload::Uncached.bodies(&data));
        for &p in paths.iter().filter(|_| opts.wants("light")) {
            let mut best: Option<Run> = None;
            for _ in 0..opts.rounds {
                let run = bench
                    .run(
                        p,
                        &uncached,
                        LIGHT_CONNECTIONS,
                        1,
                        opts.secs.min(2.0),
                        false,
                    )
                    .await;
                if best.as_ref().is_none_or(|b| run.p50_us < b.p50_us) {
                    best = Some(run);
                }
            }
            light.push((p, best.expect("one round")));
        }
        if opts.wants("idle") {
            memory = idle_memory(&bench, opts.sessions).await;
        }
    }
    print_table(&results, &light, &memory, &opts);
    let _ = std::fs::remove_dir_all(&dir);
}

/// RSS of electrum-lb (and HAProxy) with `n` idle sessions: (path, sessions,
/// idle RSS KiB, RSS with the sessions KiB), or why it was skipped. HAProxy
/// holds two descriptors per session: it gets as many as the limit allows.
async fn idle_memory(bench: &Bench, n: usize) -> Result<Vec<(Path, usize, u64, u64)>, String> {
    if n == 0 {
        return Err("skipped (--sessions 0)".into());
    }
    let limit = open_files_limit();
    if (n as u64) + 256 > limit {
        return Err(format!(
            "skipped: {n} sessions need about {} open files per process, the limit is {limit} (raise it with `ulimit -n`)",
            n + 256
        ));
    }
    let mut out = Vec::new();
    let mut paths = vec![Path::Lb];
    if bench.haproxy {
        paths.push(Path::Haproxy);
    }
    for p in paths {
        let (front, targets) = bench.front(p).await;
        let front = front.expect("a separate process");
        tokio::time::sleep(Duration::from_millis(300)).await;
        let idle = rss_kib(front.pid()).unwrap_or(0);
        let count = match p {
            Path::Haproxy => n.min((limit as usize).saturating_sub(256) / 2),
            _ => n,
        };
        let sessions = open_idle_sessions(targets[0], count).await;
        // Let allocations settle before reading.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let loaded = rss_kib(front.pid()).unwrap_or(0);
        out.push((p, count, idle, loaded));
        drop(sessions);
        drop(front);
    }
    Ok(out)
}

async fn open_idle_sessions(addr: SocketAddr, n: usize) -> Vec<TcpStream> {
    let gate = Arc::new(Semaphore::new(256));
    let mut tasks = JoinSet::new();
    for _ in 0..n {
        let gate = gate.clone();
        tasks.spawn(async move {
            let _permit = gate.acquire_owned().await.expect("open");
            let mut s = TcpStream::connect(addr).await.expect("connect");
            s.write_all(
                b"{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"server.version\",\"params\":[\"bench\",\"1.4\"]}\n{\"jsonrpc\":\"2.0\",\"id\":2,\"method\":\"blockchain.headers.subscribe\",\"params\":[]}\n",
            )
            .await
            .expect("write");
            let mut lines = 0;
            let mut chunk = [0u8; 4096];
            while lines < 2 {
                let n = s.read(&mut chunk).await.expect("read");
                assert!(n > 0, "session closed before its answers");
                lines += chunk[..n].iter().filter(|&&b| b == b'\n').count();
            }
            s
        });
    }
    let mut sessions = Vec::with_capacity(n);
    while let Some(s) = tasks.join_next().await {
        sessions.push(s.expect("session"));
    }
    sessions
}

fn print_table(
    results: &[(Model, Workload, Path, Run)],
    light: &[(Path, Run)],
    memory: &Result<Vec<(Path, usize, u64, u64)>, String>,
    opts: &Options,
) {
    let find = |m: Model, w: Workload, p: Path| {
        results
            .iter()
            .find(|(rm, rw, rp, _)| *rm == m && *rw == w && *rp == p)
            .map(|(_, _, _, r)| r)
    };
    let first = opts.models.first().copied().unwrap_or(Model::Flat(0));
    println!();
    println!(
        "| workload  | upstream  | path        |    req/s | vs HAProxy |   p50 ms |   p99 ms | errors | proxy CPU us/req | upstream CPU us/req | upstream requests (u0 / u1) |"
    );
    println!(
        "|-----------|-----------|-------------|---------:|-----------:|---------:|---------:|-------:|-----------------:|--------------------:|-----------------------------|"
    );
    let us = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.1}"));
    for (m, w, p, r) in results {
        let ratio = find(*m, *w, Path::Haproxy)
            .map(|h| format!("{:.2}x", r.rate / h.rate))
            .unwrap_or_else(|| "-".into());
        let ups: Vec<String> = r.upstream.iter().map(|u| u.to_string()).collect();
        let mut upstream = ups.join(" / ");
        if *w == Workload::Cacheable {
            upstream.push_str(&format!(
                " (tx.get {}, max {}/txid)",
                r.tx_get, r.max_per_txid
            ));
        }
        println!(
            "| {:<9} | {:<9} | {:<11} | {:>8.0} | {:>10} | {:>8.2} | {:>8.2} | {:>6} | {:>16} | {:>19} | {:<27} |",
            w.name(),
            m.name(),
            p.name(),
            r.rate,
            ratio,
            r.p50_us as f64 / 1000.0,
            r.p99_us as f64 / 1000.0,
            r.errors,
            us(r.front_cpu_us),
            us(r.upstream_cpu_us),
            upstream
        );
    }
    let light_of = |p: Path| light.iter().find(|(lp, _)| *lp == p).map(|(_, r)| r);
    for (p, r) in light {
        let delta = light_of(Path::Haproxy)
            .map(|h| format!("{:+} us", r.p50_us as i64 - h.p50_us as i64))
            .unwrap_or_else(|| "-".into());
        println!(
            "| light     | {:<9} | {:<11} | {:>8.0} | {:>10} | {:>8.3} | {:>8.3} | {:>6} | {:>16} | {:>19} | p50 vs HAProxy {:<12} |",
            first.name(),
            p.name(),
            r.rate,
            "",
            r.p50_us as f64 / 1000.0,
            r.p99_us as f64 / 1000.0,
            r.errors,
            us(r.front_cpu_us),
            us(r.upstream_cpu_us),
            delta
        );
    }
    match memory {
        Ok(rows) => {
            for (p, count, idle, loaded) in rows {
                let per = (*loaded as f64 - *idle as f64) * 1024.0 / *count as f64;
                println!(
                    "| idle      | {:<9} | {:<11} | {:>8} | {:>10} | {:>8} | {:>8} | {:>6} | {:>16} | {:>19} | RSS {:.1} MiB ({:.1} idle, {:.1} KiB/session) |",
                    first.name(),
                    p.name(),
                    count,
                    "sessions",
                    "",
                    "",
                    "",
                    "",
                    "",
                    *loaded as f64 / 1024.0,
                    *idle as f64 / 1024.0,
                    per / 1024.0
                );
            }
        }
        Err(why) => println!("idle sessions: {why}"),
    }

    // The issue's targets, from the figures above.
    println!();
    let verdict = |ok: bool| if ok { "met" } else { "MISSED" };
    for &m in &opts.models {
        let lb = |w| find(m, w, Path::Lb);
        let name = m.name();
        match (lb(Workload::Uncached), find(m, Workload::Uncached, Path::Haproxy)) {
            (Some(l), Some(h)) => println!(
                "target uncached throughput >= 0.8x HAProxy ({name} upstream): {:.2}x, {}",
                l.rate / h.rate,
                verdict(l.rate >= 0.8 * h.rate)
            ),
            _ => println!(
                "target uncached throughput >= 0.8x HAProxy ({name} upstream): not measured in this run"
            ),
        }
        match (
            lb(Workload::Cacheable),
            find(m, Workload::Cacheable, Path::Haproxy),
        ) {
            (Some(l), Some(h)) => {
                let direct = find(m, Workload::Cacheable, Path::Direct)
                    .map(|d| format!(" (clients straight to the upstreams: {:.2}x)", d.rate / h.rate))
                    .unwrap_or_default();
                println!(
                    "target cacheable throughput >= 2x HAProxy ({name} upstream): {:.2}x, {}{direct}",
                    l.rate / h.rate,
                    verdict(l.rate >= 2.0 * h.rate)
                )
            }
            _ => println!(
                "target cacheable throughput >= 2x HAProxy ({name} upstream): not measured in this run"
            ),
        }
        if let Some(l) = lb(Workload::Cacheable) {
            println!(
                "target at most one upstream request per distinct txid ({name} upstream): {} transaction.get for {TXIDS} txids, at most {} per txid, {}",
                l.tx_get,
                l.max_per_txid,
                verdict(l.max_per_txid <= 1)
            );
        }
    }
    match (light_of(Path::Lb), light_of(Path::Haproxy)) {
        (Some(l), Some(h)) => println!(
            "target light-load p50 within 50 us of HAProxy ({} upstream): {:+} us, {}",
            first.name(),
            l.p50_us as i64 - h.p50_us as i64,
            verdict(l.p50_us <= h.p50_us + 50)
        ),
        _ => println!("target light-load p50 within 50 us of HAProxy: not measured in this run"),
    }
    if let Ok(rows) = memory {
        if let Some((_, _, _, loaded)) = rows.iter().find(|(p, _, _, _)| *p == Path::Lb) {
            println!(
                "target {} idle sessions under 100 MiB: {:.1} MiB, {}",
                opts.sessions,
                *loaded as f64 / 1024.0,
                verdict(*loaded < 100 * 1024)
            );
        }
    }
}
