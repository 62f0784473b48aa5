//! Idle sessions: the resident memory of a proxy holding wallets that said
//! `server.version`, subscribed to headers, and said nothing since.
//!
//! A process holds no more sessions than its open files limit allows
//! (20,000, hard, on the machine of the README; electrum-lb needs one
//! descriptor per session, HAProxy two). So a count above what one proxy
//! process holds is spread over several processes of the same proxy, as
//! several instances behind a balancer would share it (README, "Running
//! several instances"), and the clients always run in child processes of
//! this bench (this binary re-executed with [`CLIENTS_ENV`] set), one per
//! proxy process, each from its own range of addresses in 127.0.0.0/8 so
//! that no address runs out of ports. The figure per session is the growth
//! of the proxy processes' summed RSS over their summed RSS before the
//! sessions came.

use crate::procs::{rss_kib, Proc};
use crate::spread::{open_files_limit, shares};
use crate::{edge, ws, Bench, Path};
use std::io::{BufRead, Read};
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::Duration;

/// Set in a child that holds idle sessions: `KIND ADDR COUNT FIRST`, where
/// KIND is `tcp`, `tls` or `ws` and FIRST the index of its first client
/// address (see [`crate::spread::connect_from`]).
pub(crate) const CLIENTS_ENV: &str = "PROXY_BENCH_IDLE";

/// Descriptors a process keeps for other things than sessions.
const SPARE_FILES: usize = 256;

/// What one path held.
pub(crate) struct Held {
    pub(crate) path: Path,
    pub(crate) sessions: usize,
    /// Proxy processes the sessions were spread over.
    pub(crate) processes: usize,
    /// Their summed RSS before the sessions, and with them.
    pub(crate) idle_kib: u64,
    pub(crate) loaded_kib: u64,
}

impl Held {
    pub(crate) fn per_session_kib(&self) -> f64 {
        (self.loaded_kib as f64 - self.idle_kib as f64) / self.sessions.max(1) as f64
    }
}

/// Sessions one process of `path` can hold under the open files limit.
fn per_process(path: Path, limit: usize) -> usize {
    let fit = limit.saturating_sub(SPARE_FILES);
    match path {
        Path::Haproxy | Path::HaproxyTls => fit / 2,
        _ => fit,
    }
}

/// RSS of electrum-lb (over TCP, TLS and WebSocket) and of HAProxy (TCP
/// and TLS) with `n` idle sessions each, or why it was skipped. A path that
/// fails is said so and left out; the others are still measured.
pub(crate) async fn idle_memory(bench: &Bench, n: usize) -> Result<Vec<Held>, String> {
    if n == 0 {
        return Err("skipped (--sessions 0)".into());
    }
    let limit = open_files_limit();
    let mut paths = vec![Path::Lb, Path::LbTls, Path::LbWs];
    if bench.haproxy {
        paths.push(Path::Haproxy);
        paths.push(Path::HaproxyTls);
    }
    // HAProxy opens a connection to an upstream for every session, and
    // both mock upstreams live in one process under the same limit.
    let upstream_holds = per_process(Path::Lb, limit);
    let mut out = Vec::new();
    for path in paths {
        let n = match path {
            Path::Haproxy | Path::HaproxyTls if n > upstream_holds => {
                println!(
                    "idle sessions ({}): {upstream_holds} of {n}: HAProxy opens an upstream connection per session, and the mock upstreams' process holds no more under the open files limit of {limit}",
                    path.name()
                );
                upstream_holds
            }
            _ => n,
        };
        match hold(bench, path, n, limit).await {
            Ok(held) => out.push(held),
            Err(why) => println!("idle sessions ({}): {why}", path.name()),
        }
    }
    Ok(out)
}

/// `n` idle sessions through `path`, over as many of its processes as the
/// open files `limit` needs.
async fn hold(bench: &Bench, path: Path, n: usize, limit: usize) -> Result<Held, String> {
    let each = per_process(path, limit);
    if each == 0 {
        return Err(format!("an open files limit of {limit} holds no sessions"));
    }
    let processes = n.div_ceil(each);
    if processes > 1 {
        println!(
            "idle sessions ({}): {n} over {processes} processes, at most {each} each under the open files limit of {limit} (hard; raising it needs CAP_SYS_RESOURCE)",
            path.name()
        );
    }
    let mut fronts = Vec::new();
    for _ in 0..processes {
        let (front, targets) = bench.front(path).await;
        let front = front.expect("a separate process");
        let target = match path {
            Path::LbWs => front.ws.expect("a ws:// listener"),
            Path::LbTls => front.ssl.expect("an ssl:// listener"),
            _ => targets[0],
        };
        fronts.push((front, target));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let rss = |fronts: &[(Proc, SocketAddr)]| {
        fronts
            .iter()
            .map(|(f, _)| rss_kib(f.pid()).unwrap_or(0))
            .sum::<u64>()
    };
    let idle_kib = rss(&fronts);
    let kind = match path {
        Path::LbWs => "ws",
        Path::LbTls | Path::HaproxyTls => "tls",
        _ => "tcp",
    };
    let mut first = 0;
    let mut clients = Vec::new();
    for ((_, target), count) in fronts.iter().zip(shares(n, processes)) {
        clients.push(spawn_clients(kind, *target, count, first));
        first += count;
    }
    // Every child says how many it holds once all are answered.
    let clients = tokio::task::spawn_blocking(move || {
        clients
            .into_iter()
            .map(wait_until_held)
            .collect::<Result<Vec<_>, String>>()
    })
    .await
    .expect("the clients' children")?;
    // Let allocations settle before reading.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let loaded_kib = rss(&fronts);
    drop(clients);
    drop(fronts);
    Ok(Held {
        path,
        sessions: n,
        processes,
        idle_kib,
        loaded_kib,
    })
}

/// A child of this bench opening `count` idle sessions of `kind` to
/// `target`, from client addresses `first` on.
fn spawn_clients(kind: &str, target: SocketAddr, count: usize, first: usize) -> Proc {
    let child = Command::new(std::env::current_exe().expect("own path"))
        .env(CLIENTS_ENV, format!("{kind} {target} {count} {first}"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start a child holding idle sessions");
    Proc {
        child,
        addrs: Vec::new(),
        ws: None,
        ssl: None,
        metrics: None,
    }
}

/// Block until the child says `HELD n`; an error if it ended first.
fn wait_until_held(mut proc: Proc) -> Result<Proc, String> {
    let out = proc.child.stdout.take().expect("stdout");
    let mut line = String::new();
    std::io::BufReader::new(out)
        .read_line(&mut line)
        .map_err(|e| format!("reading a clients' child: {e}"))?;
    match line.trim().strip_prefix("HELD ") {
        Some(_) => Ok(proc),
        None => Err(format!(
            "a child opening idle sessions ended without holding them ({line:?}); see its panic above"
        )),
    }
}

/// The child: open the sessions [`CLIENTS_ENV`] names, say `HELD n`, keep
/// them until stdin closes (the parent ends or kills it).
pub(crate) fn clients_main(spec: &str) {
    let words: Vec<&str> = spec.split_whitespace().collect();
    let [kind, addr, count, first] = words[..] else {
        panic!("{CLIENTS_ENV}={spec:?}: expected KIND ADDR COUNT FIRST");
    };
    let addr: SocketAddr = addr.parse().expect("ADDR");
    let count: usize = count.parse().expect("COUNT");
    let first: usize = first.parse().expect("FIRST");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let sessions: Box<dyn std::any::Any> = runtime.block_on(async {
        let held: Box<dyn std::any::Any> = match kind {
            "tcp" => Box::new(edge::open_idle_tcp_sessions(addr, count, first).await),
            "tls" => Box::new(edge::open_idle_tls_sessions(addr, count, first).await),
            "ws" => Box::new(ws::open_idle_ws_sessions(addr, count, first).await),
            other => panic!("{CLIENTS_ENV}: unknown kind {other:?}"),
        };
        held
    });
    println!("HELD {count}");
    let mut rest = Vec::new();
    let _ = std::io::stdin().read_to_end(&mut rest);
    drop(sessions);
}
