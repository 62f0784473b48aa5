//! End-to-end benchmark: clients straight to the upstreams, through HAProxy
//! in TCP mode, and through electrum-lb, on the same machine in the same run.
//!
//! ```text
//! cargo bench --bench proxy                        # the default run (about 5 minutes)
//! cargo bench --bench proxy -- --secs 5 --rounds 3 # longer, steadier figures
//! cargo bench --bench proxy -- --sessions 2000     # a smaller idle-session test
//! cargo bench --bench proxy -- --only uncached,light # some parts only
//!                                   # (uncached, cacheable, mix, light, idle,
//!                                   #  tls, rate, storm)
//! cargo bench --bench proxy -- --paths haproxy,electrum-lb # some rows only
//! cargo bench --bench proxy -- --paths "haproxy,haproxy -t1,electrum-lb"
//!                                   # adds HAProxy with one thread (nbthread 1)
//! cargo bench --bench proxy -- --only rate --rate 5000,20000 # latency at
//!                                   # these fixed rates (default 20,000/s)
//! cargo bench --bench proxy -- --upstream lean     # one upstream model only
//! cargo bench --bench proxy -- --upstream electrumx #   (default: both)
//! cargo bench --bench proxy -- --upstream-us 20     # upstreams that spend
//!                                   # 20 us of CPU on every request
//! cargo bench --bench proxy -- --upstream real     # real ElectrumX 2.0 at its
//!                                   # default session limits (real.rs)
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
//! runtime and logging; `PROXY_BENCH_THREADS=N` passes `--threads N`,
//! `PROXY_BENCH_THREADS=per-core` passes `--per-core`;
//! `PROXY_BENCH_BINARY=path` runs another build, for A/B runs), and again with
//! `--threads 2` (row `lb -t2`) and `--per-core` (row `lb per-core`);
//! HAProxy is the system's `haproxy` in TCP mode with its
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
//! sessions that sent `server.version` and `blockchain.headers.subscribe`;
//! for electrum-lb over TCP, TLS and WebSocket (row `lb ws`, a fresh
//! process, `ws://` sessions from tokio-tungstenite's client). The idle
//! clients run in children of this binary (`PROXY_BENCH_IDLE` set), and a
//! count above what one process's open files limit holds is spread over
//! several proxy processes (`idle.rs`): `--sessions 100000` holds 100,000
//! on a machine whose hard limit is 20,000 per process.
//!
//! Columns: answers per second in the measured window; the same against
//! HAProxy's in that workload; latency percentiles from send to answer;
//! CPU time (user and system, from /proc) the proxy process and the mock
//! upstreams spent per answer over the whole run, the figure least shaken
//! by other load on the machine; and the requests each upstream received.
//! Each path's row is its best round (highest rate; lowest p50 for light).

mod chain;
mod edge;
mod idle;
mod load;
mod mock;
mod options;
mod procs;
mod real;
mod real_stack;
#[path = "../support/spread.rs"]
mod spread;
mod storm;
mod workload;
mod ws;

use chain::*;
use load::*;
use mock::*;
use options::*;
use procs::*;
use real_stack::*;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use workload::*;

pub(crate) const MOCK_ENV: &str = "PROXY_BENCH_MOCK";
pub(crate) const THREADS_ENV: &str = "PROXY_BENCH_THREADS";

/// `--threads N` from [`THREADS_ENV`], if set (`per-core`: `--per-core`).
pub(crate) fn threads_from_env() -> Vec<String> {
    match std::env::var(THREADS_ENV) {
        Ok(n) if n == "per-core" => vec!["--per-core".to_string()],
        Ok(n) => vec!["--threads".to_string(), n],
        Err(_) => Vec::new(),
    }
}

/// Client connections of the throughput runs, and requests in flight on each.
pub(crate) const CONNECTIONS: usize = 64;
pub(crate) const DEPTH: usize = 4;
/// The light-load run.
pub(crate) const LIGHT_CONNECTIONS: usize = 16;
/// Answers in the first part of a run are not measured.
pub(crate) const WARM_UP: Duration = Duration::from_millis(500);

pub(crate) const SCRIPTHASHES: usize = 1_000;
pub(crate) const TXIDS: usize = 3_000;
pub(crate) const BLOCKS: usize = 1_000;
pub(crate) const UPSTREAMS: usize = 2;

pub(crate) fn main() {
    spread::raise_open_files_limit();
    if std::env::var(MOCK_ENV).is_ok() {
        return mock_main();
    }
    if let Ok(spec) = std::env::var(idle::CLIENTS_ENV) {
        return idle::clients_main(&spec);
    }
    if real::requested() {
        return real::real_main();
    }
    let opts = Options::from_args();
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(bench(opts));
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Path {
    Direct,
    Haproxy,
    /// HAProxy with `nbthread 1`: the runtime shape of electrum-lb's
    /// default on 2 CPUs (run only when asked for with `--paths`).
    Haproxy1,
    Lb,
    /// electrum-lb with `--threads 2` (the multi-threaded runtime that
    /// was the default on 2 CPUs; the default is now one thread there).
    Lb1,
    /// electrum-lb with `--per-core` (two single-threaded runtimes here,
    /// each with upstream connections of its own).
    LbPerCore,
    /// electrum-lb, its `ws://` listener (idle memory only).
    LbWs,
    /// electrum-lb and HAProxy terminating TLS (idle memory, handshakes).
    LbTls,
    HaproxyTls,
}

impl Path {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Path::Direct => "direct",
            Path::Haproxy => "haproxy",
            Path::Haproxy1 => "haproxy -t1",
            Path::Lb => "electrum-lb",
            Path::Lb1 => "lb -t2",
            Path::LbPerCore => "lb per-core",
            Path::LbWs => "lb ws",
            Path::LbTls => "lb tls",
            Path::HaproxyTls => "haproxy tls",
        }
    }

    /// Rows that run only when `--paths` names them.
    pub(crate) fn opt_in(self) -> bool {
        self == Path::Haproxy1
    }
}

pub(crate) struct Bench {
    pub(crate) upstreams: Vec<SocketAddr>,
    pub(crate) mock_pid: u32,
    pub(crate) haproxy: bool,
    pub(crate) dir: std::path::PathBuf,
}

impl Bench {
    /// Start what `path` needs; the targets clients connect to.
    pub(crate) async fn front(&self, path: Path) -> (Option<Proc>, Vec<SocketAddr>) {
        match path {
            Path::Direct => (None, self.upstreams.clone()),
            Path::Haproxy | Path::Haproxy1 => {
                let nbthread = (path == Path::Haproxy1).then_some(1);
                let p = start_haproxy(&self.upstreams, &self.dir, nbthread).await;
                let addrs = p.addrs.clone();
                (Some(p), addrs)
            }
            Path::HaproxyTls => {
                let p = edge::start_haproxy_tls(&self.upstreams, &self.dir).await;
                let addrs = p.addrs.clone();
                (Some(p), addrs)
            }
            Path::Lb | Path::Lb1 | Path::LbPerCore | Path::LbWs | Path::LbTls => {
                let args = match path {
                    Path::Lb1 => vec!["--threads".to_string(), "2".to_string()],
                    Path::LbPerCore => vec!["--per-core".to_string()],
                    _ => threads_from_env(),
                };
                let p = start_electrum_lb(&self.upstreams, &self.dir, args);
                let addrs = p.addrs.clone();
                (Some(p), addrs)
            }
        }
    }

    pub(crate) async fn run(
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

pub(crate) async fn bench(opts: Options) {
    let haproxy = haproxy_installed();
    let dir = std::env::temp_dir().join(format!("electrum-lb-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let data = Data::new();
    let mut paths = vec![Path::Direct];
    if haproxy {
        paths.push(Path::Haproxy);
        paths.push(Path::Haproxy1);
    }
    paths.push(Path::Lb);
    paths.push(Path::Lb1);
    paths.push(Path::LbPerCore);
    paths.retain(|p| {
        if p.opt_in() {
            opts.names_path(p.name())
        } else {
            opts.wants_path(p.name())
        }
    });
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
    let mut edge_rows = Vec::new();
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
            memory = idle::idle_memory(&bench, opts.sessions).await;
        }
        edge_rows = edge::rows(&bench, &opts, &paths).await;
        if opts.wants("storm") {
            edge_rows.extend(storm::rows(&bench, &opts).await);
        }
    }
    print_table(&results, &light, &memory, &opts);
    for row in &edge_rows {
        println!("{row}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

pub(crate) fn print_table(
    results: &[(Model, Workload, Path, Run)],
    light: &[(Path, Run)],
    memory: &Result<Vec<idle::Held>, String>,
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
            for h in rows {
                let over = if h.processes > 1 {
                    format!(", {} processes", h.processes)
                } else {
                    String::new()
                };
                println!(
                    "| idle      | {:<9} | {:<11} | {:>8} | {:>10} | {:>8} | {:>8} | {:>6} | {:>16} | {:>19} | RSS {:.1} MiB ({:.1} idle{over}, {:.1} KiB/session) |",
                    first.name(),
                    h.path.name(),
                    h.sessions,
                    "sessions",
                    "",
                    "",
                    "",
                    "",
                    "",
                    h.loaded_kib as f64 / 1024.0,
                    h.idle_kib as f64 / 1024.0,
                    h.per_session_kib()
                );
            }
        }
        Err(why) => println!("idle sessions: {why}"),
    }
    if let Ok(rows) = memory {
        ws::print_idle_ratio(rows);
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
        if let Some(h) = rows.iter().find(|h| h.path == Path::Lb && h.processes == 1) {
            println!(
                "target {} idle sessions under 100 MiB: {:.1} MiB, {}",
                h.sessions,
                h.loaded_kib as f64 / 1024.0,
                verdict(h.loaded_kib < 100 * 1024)
            );
        }
    }
}
