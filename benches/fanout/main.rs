//! Fan-out benchmark: N sessions subscribed to one scripthash through the
//! proxy, one upstream notification, the time until the last session has it.
//!
//! ```text
//! cargo bench --bench fanout              # N = 1,000 and N = 10,000, over TCP then WebSocket
//! cargo bench --bench fanout -- 2000 5000 # other sizes
//! cargo bench --bench fanout -- tcp       # one transport only (tcp or ws; bare always runs)
//! cargo bench --bench fanout -- 100000 tcp # beyond one process's open files limit
//! ```
//!
//! Each size runs over TCP and over WebSocket (`ws://`, tokio-tungstenite's
//! client) against the same proxy processes, and the WebSocket figure is
//! also given as a ratio of the TCP one. Both sets of sessions are held at
//! once and their rounds alternate when each proxy process can hold both
//! (so that a slow moment of a shared machine hits both alike); otherwise
//! (N = 10,000 under a limit of 20,000) one transport runs after the other.
//!
//! Processes, all children of this one (this binary re-executed with an
//! environment variable set), so that no process needs more than N plus a
//! few descriptors:
//! - the proxy (`children.rs`, `FANOUT_PROXY_UPSTREAM`): electrum-lb with
//!   the binary's automatic runtime, in front of the mock upstream that
//!   this process runs;
//! - the clients (`clients.rs`, `FANOUT_CLIENTS`): the sessions, which
//!   stamp their notification's arrival on `CLOCK_MONOTONIC`, the clock
//!   this process starts a round by;
//! - the floor (transport `bare`, run with every size; `children.rs`,
//!   `FANOUT_BARE`): a process that only accepts the sessions and, when
//!   told on its stdin, writes the same notification line to each of them
//!   in a loop, one `write` per socket, with nothing else to do. Its last
//!   arrival, measured the same way, is what the proxy's fan-out is
//!   divided by.
//!
//! A process holds no more sessions than its open files limit (20,000,
//! hard, on the machine of the README). An N above that is spread over K
//! proxy processes, K clients' processes and K bare writers alike, each
//! with N/K sessions (K = N over what one holds, rounded up): as K
//! instances of electrum-lb behind a balancer would share the wallets,
//! each with its own upstream subscription, against K processes writing
//! the same sockets bare.
//!
//! Each round: every client waits for a line, the mock changes the
//! scripthash's history (one upstream notification to each proxy process),
//! and each client stamps the arrival of its notification. A round's
//! figure is the time from the upstream notification to the last arrival.

#[allow(dead_code)]
#[path = "../../tests/support/mock.rs"]
mod mock;

mod children;
mod clients;
#[path = "../support/spread.rs"]
mod spread;

use clients::{monotonic_ns, Transport, CLIENTS_ENV};
use spread::{open_files_limit, raise_open_files_limit, shares};
use std::io::{BufRead, Write};
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const ROUNDS: usize = 7;
/// Descriptors a process keeps for other things than sessions.
const SPARE_FILES: usize = 64;

fn main() {
    raise_open_files_limit();
    if let Ok(upstream) = std::env::var(children::PROXY_ENV) {
        return children::run_proxy(&upstream);
    }
    if std::env::var(children::BARE_ENV).is_ok() {
        return children::run_bare();
    }
    if let Ok(spec) = std::env::var(CLIENTS_ENV) {
        return clients::run_clients(&spec);
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
    let mut transports: Vec<Transport> = words
        .iter()
        .filter_map(|w| Transport::from_name(w))
        .collect();
    if transports.is_empty() {
        transports = vec![Transport::Tcp, Transport::Ws];
    }
    if !transports.contains(&Transport::Bare) {
        transports.push(Transport::Bare);
    }
    let limit = open_files_limit();
    println!("fanout: open files limit {limit} per process");
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(bench(sizes, transports, limit));
}

/// A child process of this binary, spoken to in lines on its stdin and
/// stdout; killed when dropped.
struct Child {
    child: std::process::Child,
    out: std::io::BufReader<std::process::ChildStdout>,
}

impl Child {
    fn start(key: &str, value: &str) -> Child {
        let mut child = Command::new(std::env::current_exe().expect("own path"))
            .env(key, value)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("start a child ({key}): {e}"));
        let out = std::io::BufReader::new(child.stdout.take().expect("stdout"));
        Child { child, out }
    }

    fn say(&mut self, line: &str) {
        let stdin = self.child.stdin.as_mut().expect("stdin");
        writeln!(stdin, "{line}").expect("a child's stdin");
        stdin.flush().expect("a child's stdin");
    }

    /// The child's next line; a panic naming what was awaited if it ended.
    fn hear(&mut self, what: &str) -> String {
        let mut line = String::new();
        let n = tokio::task::block_in_place(|| self.out.read_line(&mut line)).unwrap_or(0);
        assert!(n > 0, "a child ended while {what} was awaited (see above)");
        line.trim_end().to_string()
    }

    /// The addresses of its first line, `LISTEN addr...`.
    fn listening(&mut self) -> Vec<SocketAddr> {
        let line = self.hear("LISTEN");
        line.strip_prefix("LISTEN ")
            .unwrap_or_else(|| panic!("unexpected line from a child: {line:?}"))
            .split(' ')
            .map(|a| a.parse().expect("address"))
            .collect()
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        drop(self.child.stdin.take());
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A proxy process and its two listeners.
struct Proxy {
    _child: Child,
    tcp: SocketAddr,
    ws: SocketAddr,
}

/// The sessions of one transport in one size, and their figures.
struct Set {
    transport: Transport,
    sh: String,
    /// The bare writers (transport `bare`), one per clients' process.
    bare: Vec<Child>,
    clients: Vec<Child>,
    parts: Vec<usize>,
    setup: Duration,
    lasts: Vec<Duration>,
    medians: Vec<Duration>,
}

async fn bench(sizes: Vec<usize>, transports: Vec<Transport>, limit: usize) {
    let upstream = mock::Mock::start().await;
    let mut proxies: Vec<Proxy> = Vec::new();
    for (run, n) in sizes.into_iter().enumerate() {
        let each = limit.saturating_sub(SPARE_FILES);
        if each == 0 {
            println!("fanout N={n}: skipped: an open files limit of {limit} holds no sessions");
            continue;
        }
        let k = n.div_ceil(each);
        if k > 1 {
            println!(
                "fanout N={n}: spread over {k} proxy processes ({k} bare writers, {k} clients' processes), at most {each} sessions each under the open files limit of {limit} per process (hard; raising it needs CAP_SYS_RESOURCE)"
            );
        }
        while proxies.len() < k {
            let mut child = Child::start(children::PROXY_ENV, &upstream.url());
            let [tcp, ws] = child.listening()[..] else {
                panic!("the proxy process should listen on tcp:// and ws://");
            };
            proxies.push(Proxy {
                _child: child,
                tcp,
                ws,
            });
        }
        let parts = shares(n, k);
        // Both transports' sessions held at once, their rounds alternating,
        // when each proxy process holds both sets (a slow moment of a
        // shared machine then hits both alike); else one after the other.
        let proxied = transports.iter().filter(|t| **t != Transport::Bare).count();
        let fit_at_once = proxied * parts[0] + SPARE_FILES <= limit;
        let groups: Vec<Vec<Transport>> = if fit_at_once {
            vec![transports.clone()]
        } else {
            transports.iter().map(|t| vec![*t]).collect()
        };
        let interleaved = groups.len() == 1 && transports.len() > 1;
        let mut figures: Vec<(Transport, Duration)> = Vec::new();
        for group in groups {
            let mut sets = Vec::new();
            for transport in group {
                let sh = hex::encode(sha2_of(
                    format!("fanout-{run}-{n}-{}", transport.name()).as_bytes(),
                ));
                sets.push(open_set(transport, sh, &parts, &proxies));
            }
            for round in 0..ROUNDS {
                for set in sets.iter_mut() {
                    one_round(set, &upstream, round);
                }
            }
            for mut set in sets {
                set.lasts.sort();
                set.medians.sort();
                let ms = |d: Duration| d.as_secs_f64() * 1000.0;
                let median_of = if k > 1 {
                    " (median of the clients' processes' medians)"
                } else {
                    ""
                };
                println!(
                    "fanout N={n} {}: last session notified after {:.2} ms (median of {ROUNDS} rounds; best {:.2} ms, worst {:.2} ms); median session {:.2} ms{median_of}; {n} sessions set up in {:.2} s",
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
}

/// The sessions of `transport`, `parts[j]` of them in the `j`th clients'
/// process, connected to the `j`th proxy (or bare writer) and subscribed.
fn open_set(transport: Transport, sh: String, parts: &[usize], proxies: &[Proxy]) -> Set {
    let mut bare = Vec::new();
    let targets: Vec<SocketAddr> = match transport {
        Transport::Tcp => proxies.iter().map(|p| p.tcp).take(parts.len()).collect(),
        Transport::Ws => proxies.iter().map(|p| p.ws).take(parts.len()).collect(),
        Transport::Bare => parts
            .iter()
            .map(|_| {
                let mut writer = Child::start(children::BARE_ENV, "1");
                let addr = writer.listening()[0];
                bare.push(writer);
                addr
            })
            .collect(),
    };
    let started = Instant::now();
    let mut first = 0;
    let mut clients = Vec::new();
    for (target, count) in targets.iter().zip(parts) {
        let spec = format!("{} {target} {count} {first} {sh}", transport.name());
        clients.push(Child::start(CLIENTS_ENV, &spec));
        first += count;
    }
    for c in clients.iter_mut() {
        let line = c.hear("READY");
        assert_eq!(line, "READY", "unexpected line from a clients' process");
    }
    Set {
        transport,
        sh,
        bare,
        clients,
        parts: parts.to_vec(),
        setup: started.elapsed(),
        lasts: Vec::new(),
        medians: Vec::new(),
    }
}

fn sha2_of(data: &[u8]) -> [u8; 32] {
    use sha2::Digest;
    sha2::Sha256::digest(data).into()
}

/// One notification to every session of `set`: its last and median
/// arrival after the upstream's notification (or the bare writes) began.
fn one_round(set: &mut Set, upstream: &mock::Mock, round: usize) {
    let history = vec![(format!("{:064x}", round + 1), 0i64)];
    let status = mock::status_of(&history).expect("non-empty");
    for c in set.clients.iter_mut() {
        c.say(&format!("ROUND {status}"));
    }
    for c in set.clients.iter_mut() {
        let line = c.hear("ARMED");
        assert_eq!(line, "ARMED", "unexpected line from a clients' process");
    }
    let t0 = monotonic_ns();
    if set.bare.is_empty() {
        upstream.set_history(&set.sh, history);
    } else {
        // The line the proxy would send.
        let line = format!(
            "{{\"jsonrpc\":\"2.0\",\"method\":\"blockchain.scripthash.subscribe\",\"params\":[\"{}\",\"{status}\"]}}",
            set.sh
        );
        for (writer, count) in set.bare.iter_mut().zip(&set.parts) {
            writer.say(&format!("{count} {line}"));
        }
    }
    let mut lasts = Vec::new();
    let mut medians = Vec::new();
    for c in set.clients.iter_mut() {
        let line = c.hear("ARRIVED");
        let mut words = line
            .strip_prefix("ARRIVED ")
            .unwrap_or_else(|| panic!("unexpected line from a clients' process: {line:?}"))
            .split(' ')
            .map(|w| w.parse::<u64>().expect("nanoseconds"));
        lasts.push(words.next().expect("last"));
        medians.push(words.next().expect("median"));
    }
    for writer in set.bare.iter_mut() {
        writer.hear("done");
    }
    medians.sort_unstable();
    let since = |at: u64| Duration::from_nanos(at.saturating_sub(t0));
    set.lasts
        .push(since(lasts.into_iter().max().expect("a clients' process")));
    set.medians.push(since(medians[medians.len() / 2]));
}
