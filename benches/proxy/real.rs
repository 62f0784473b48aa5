//! `--upstream real`: HAProxy and electrum-lb in front of two real
//! ElectrumX 2.0 servers that keep ElectrumX's default session limits.
//!
//! ```text
//! cargo bench --bench proxy -- --upstream real                # 30 s per run, about 4 minutes
//! cargo bench --bench proxy -- --upstream real --lb-tuned     # about 6 minutes: also electrum-lb with
//!                                  # max_in_flight = 8, max_connections = 8 per upstream
//! cargo bench --bench proxy -- --upstream real --secs 10 --conns 16 --depth 8 --only uncached,mix
//! ```
//!
//! `interop/defaults_stack.py` (with the venv and node of `INTEROP_CACHE`
//! or `interop/.cache`) brings up a regtest node, builds a chain of 400
//! payments to 1,020 scripthashes (`interop/chain.py`), and starts two
//! ElectrumX 2.0 on plain TCP with none of the metering settings set
//! (COST_SOFT_LIMIT 1000, COST_HARD_LIMIT 10000, REQUEST_SLEEP 2500 ms,
//! INITIAL_CONCURRENT 10, BANDWIDTH_UNIT_COST 5000). Before every run both
//! are restarted, so each run starts from fresh sessions and zero costs.
//! Then one front at a time, a fresh process each run: HAProxy (TCP mode,
//! `leastconn` over both) and electrum-lb (the release binary, its default
//! upstream settings; `--lb-tuned` adds a row with 8 in flight and up to 8
//! connections per upstream). The clients are wallet-like: `server.version`
//! first, a new connection when the far side closes one.
//!
//! Workloads: uncached `get_history` over every scripthash; cacheable
//! `transaction.get` over every txid (each asked once before the clock
//! starts, on both fronts); the wallet mix of the mock runs. Upstream
//! figures come from ElectrumX itself (`getinfo` and `sessions` on its
//! admin RPC), the same way for both fronts.

use super::*;

use std::collections::BTreeMap;

#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Front {
    Haproxy,
    Lb,
    LbTuned,
}

impl Front {
    fn name(self) -> &'static str {
        match self {
            Front::Haproxy => "haproxy",
            Front::Lb => "electrum-lb",
            Front::LbTuned => "lb tuned",
        }
    }
}

pub(crate) struct RealOptions {
    secs: f64,
    conns: usize,
    depth: usize,
    workloads: Vec<Workload>,
    lb_tuned: bool,
}

/// `--upstream real` on the command line.
pub(crate) fn requested() -> bool {
    let args: Vec<String> = std::env::args().collect();
    args.windows(2)
        .any(|w| w[0] == "--upstream" && w[1] == "real")
}

impl RealOptions {
    fn from_args() -> Result<RealOptions, String> {
        let args: Vec<String> = std::env::args().collect();
        let value = |name: &str| -> Result<Option<f64>, String> {
            match args.iter().position(|a| a == name) {
                None => Ok(None),
                Some(i) => args
                    .get(i + 1)
                    .and_then(|v| v.parse::<f64>().ok())
                    .filter(|v| *v > 0.0)
                    .map(Some)
                    .ok_or(format!("{name} needs a positive number")),
            }
        };
        let all = [Workload::Uncached, Workload::Cacheable, Workload::Mix];
        let workloads = match args.iter().position(|a| a == "--only") {
            None => all.to_vec(),
            Some(i) => {
                let list = args.get(i + 1).ok_or("--only needs a list")?;
                list.split(',')
                    .map(|name| {
                        all.into_iter().find(|w| w.name() == name).ok_or(format!(
                            "--only {name}: with --upstream real, the workloads are uncached, cacheable, mix"
                        ))
                    })
                    .collect::<Result<_, _>>()?
            }
        };
        Ok(RealOptions {
            secs: value("--secs")?.unwrap_or(30.0).max(2.0),
            conns: value("--conns")?.map_or(16, |v| v as usize),
            depth: value("--depth")?.map_or(8, |v| v as usize),
            workloads,
            lb_tuned: args.iter().any(|a| a == "--lb-tuned"),
        })
    }
}

/// One row of the table.
struct Row {
    workload: Workload,
    front: Front,
    run: RealRun,
    upstream: Vec<UpstreamCounts>,
    /// electrum-lb's own upstream answer times (see [`answer_times`]).
    answer_times: Option<String>,
}

pub(crate) fn real_main() {
    let opts = match RealOptions::from_args() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("proxy bench: {e}");
            std::process::exit(2);
        }
    };
    if !haproxy_installed() {
        eprintln!("proxy bench: --upstream real compares electrum-lb with HAProxy, which is not installed (apt-get install haproxy)");
        std::process::exit(2);
    }
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(real_bench(opts));
}

async fn real_bench(opts: RealOptions) {
    let dir = std::env::temp_dir().join(format!("electrum-lb-bench-real-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let stack = match RealStack::up(&dir) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("proxy bench: {e}");
            let _ = std::fs::remove_dir_all(&dir);
            std::process::exit(1);
        }
    };
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!(
        "electrum-lb against real ElectrumX 2.0 at its DEFAULT session limits (COST_SOFT_LIMIT 1000, COST_HARD_LIMIT 10000, REQUEST_SLEEP 2500 ms, INITIAL_CONCURRENT 10, BANDWIDTH_UNIT_COST 5000; none set)"
    );
    println!(
        "two ElectrumX on one regtest chain (height {}, {} txids, {} scripthashes), restarted before every run; load average at start: {}",
        stack.chain.height,
        stack.chain.txids.len(),
        stack.chain.scripthashes.len(),
        load.split_whitespace().take(3).collect::<Vec<_>>().join(" ")
    );
    println!(
        "NOTE: every session here comes from 127.0.0.1, and ElectrumX exempts private addresses from its per-/24 group cost: each upstream session has a budget of its own. On a public address all sessions from one proxy (or one HAProxy) share one group budget."
    );
    println!(
        "runs: {} connections x {} requests in flight, {:.0} s each ({} ms warm-up not measured; cacheable: every txid asked once first); HAProxy 2.x TCP leastconn; electrum-lb release binary{}",
        opts.conns,
        opts.depth,
        opts.secs,
        WARM_UP.as_millis(),
        if opts.lb_tuned {
            "; lb tuned = max_in_flight 8, max_connections 8 per upstream"
        } else {
            ""
        }
    );
    let mut fronts = vec![Front::Haproxy, Front::Lb];
    if opts.lb_tuned {
        fronts.push(Front::LbTuned);
    }
    let mut rows = Vec::new();
    for &w in &opts.workloads {
        let bodies = Arc::new(stack.chain.bodies(w));
        for &front in &fronts {
            stack.restart();
            let proc = start_front(front, &stack.upstreams, &dir).await;
            let target = proc.addrs[0];
            let primed = if w == Workload::Cacheable {
                prime_real(target, &bodies).await
            } else {
                0
            };
            let (stop, stopped) = tokio::sync::oneshot::channel();
            let watch = stack.watch_sessions(stopped);
            let mut run =
                load_real(target, bodies.clone(), opts.conns, opts.depth, opts.secs).await;
            run.answers += primed;
            let _ = stop.send(());
            let upstream = stack.counts(&watch.await.expect("session watch")).await;
            let answer_times = match proc.metrics {
                Some(addr) => answer_times(addr).await,
                None => None,
            };
            drop(proc);
            eprintln!(
                "proxy bench: {} {}: {:.0} req/s",
                w.name(),
                front.name(),
                run.rate
            );
            rows.push(Row {
                workload: w,
                front,
                run,
                upstream,
                answer_times,
            });
        }
    }
    print_real_table(&rows);
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!(
        "load average at the end: {}",
        load.split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    );
    drop(stack);
    let _ = std::fs::remove_dir_all(&dir);
}

async fn start_front(front: Front, upstreams: &[SocketAddr], dir: &std::path::Path) -> Proc {
    match front {
        Front::Haproxy => start_haproxy(upstreams, dir, None).await,
        Front::Lb | Front::LbTuned => {
            let entries: Vec<String> = upstreams
                .iter()
                .map(|a| match front {
                    Front::LbTuned => {
                        format!("{{ url = \"tcp://{a}\", max_in_flight = 8, max_connections = 8 }}")
                    }
                    _ => format!("\"tcp://{a}\""),
                })
                .collect();
            let text = format!(
                "[metrics]\nlisten = \"127.0.0.1:0\"\n\n[coins.bench]\nlisten = [\"tcp://127.0.0.1:0\", \"ws://127.0.0.1:0\"]\nupstreams = [{}]\n",
                entries.join(", ")
            );
            let path = dir.join("electrum-lb-real.toml");
            std::fs::write(&path, text).expect("write electrum-lb-real.toml");
            launch_electrum_lb(&path, upstreams.len(), crate::threads_from_env())
        }
    }
}

fn errors_text(errors: &BTreeMap<i64, u64>) -> String {
    if errors.is_empty() {
        return "0".into();
    }
    errors
        .iter()
        .map(|(code, n)| format!("{n} x {code}"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn print_real_table(rows: &[Row]) {
    let find = |w: Workload, f: Front| rows.iter().find(|r| r.workload == w && r.front == f);
    println!();
    println!(
        "| workload  | front       |   req/s | vs HAProxy |  p50 ms |  p99 ms | errors (count x code) | conns dropped | upstream sessions (u1 + u2) | upstream req / answer | max session cost, min concurrency |"
    );
    println!(
        "|-----------|-------------|--------:|-----------:|--------:|--------:|-----------------------|--------------:|-----------------------------|----------------------:|-----------------------------------|"
    );
    for r in rows {
        let ratio = find(r.workload, Front::Haproxy)
            .map(|h| format!("{:.2}x", r.run.rate / h.run.rate.max(f64::MIN_POSITIVE)))
            .unwrap_or_else(|| "-".into());
        let sessions: Vec<String> = r.upstream.iter().map(|u| u.sessions.to_string()).collect();
        let requests: u64 = r.upstream.iter().map(|u| u.requests).sum();
        let max_cost = r.upstream.iter().map(|u| u.max_cost).fold(0.0, f64::max);
        let min_conc = r.upstream.iter().filter_map(|u| u.min_concurrency).min();
        println!(
            "| {:<9} | {:<11} | {:>7.0} | {:>10} | {:>7.1} | {:>7.1} | {:<21} | {:>13} | {:<27} | {:>21.2} | {:<33} |",
            r.workload.name(),
            r.front.name(),
            r.run.rate,
            ratio,
            r.run.p50_us as f64 / 1000.0,
            r.run.p99_us as f64 / 1000.0,
            errors_text(&r.run.errors),
            r.run.dropped,
            format!(
                "{} ({})",
                r.upstream.iter().map(|u| u.sessions).sum::<u64>(),
                sessions.join(" + ")
            ),
            requests as f64 / r.run.answers.max(1) as f64,
            format!(
                "{:.0}, {}",
                max_cost,
                min_conc.map_or("-".into(), |c| c.to_string())
            )
        );
    }
    println!();
    for r in rows {
        if let Some(times) = &r.answer_times {
            println!(
                "electrum-lb's upstream answer times, {}: {times}",
                r.workload.name()
            );
        }
    }
    for r in rows {
        if let Some(u) = r
            .upstream
            .iter()
            .max_by(|a, b| a.max_cost.total_cmp(&b.max_cost))
        {
            let methods: Vec<String> = u
                .by_method
                .iter()
                .take(8)
                .map(|(m, n)| format!("{m} {n}"))
                .collect();
            println!(
                "costliest session, {} {}: cost {:.0} with {} subscriptions and {} messages received; its server's requests: {}",
                r.workload.name(),
                r.front.name(),
                u.max_cost,
                u.costliest_subs,
                u.costliest_requests,
                methods.join(", ")
            );
        }
    }
    println!();
    let lost: Vec<String> = rows
        .iter()
        .filter(|r| r.run.lost > 0)
        .map(|r| format!("{} {}: {}", r.workload.name(), r.front.name(), r.run.lost))
        .collect();
    println!(
        "errors: -101 = 'excessive resource usage' (ElectrumX closes the session), -102 = server busy; conns dropped: client connections the far side closed (reopened at once; requests lost with them: {})",
        if lost.is_empty() { "none".into() } else { lost.join(", ") }
    );
    println!("upstream sessions: sessions each ElectrumX saw opened (its server.version count; electrum-lb also opens one protocol-1.7 connection per upstream); upstream req / answer: Electrum requests ElectrumX handled over answers the clients got (priming, handshakes and the last answers after the clock included; electrum-lb's own subscriptions and pings count upstream); max session cost, min concurrency: the highest cost and lowest concurrency of any client session, sampled each second from ElectrumX's `sessions` (concurrency 10 is unthrottled; it falls as the cost passes COST_SOFT_LIMIT)");
    // Issue 14's targets, from the rows above.
    let verdict = |ok: bool| if ok { "met" } else { "MISSED" };
    for w in [Workload::Uncached, Workload::Mix] {
        let (Some(h), Some(l)) = (find(w, Front::Haproxy), find(w, Front::Lb)) else {
            continue;
        };
        let h_sessions: u64 = h.upstream.iter().map(|u| u.sessions).sum();
        let l_sessions: u64 = l.upstream.iter().map(|u| u.sessions).sum();
        let ok = l.run.rate >= 1.2 * h.run.rate
            && l.run.p99_us <= h.run.p99_us
            && l.run.errors.is_empty()
            && l_sessions <= h_sessions;
        println!(
            "target {} (issue 14): electrum-lb >= 1.2x HAProxy, p99 no worse, no error, no more upstream sessions: {:.2}x, p99 {:.0} vs {:.0} ms, {} errors, {} vs {} sessions: {}",
            w.name(),
            l.run.rate / h.run.rate.max(f64::MIN_POSITIVE),
            l.run.p99_us as f64 / 1000.0,
            h.run.p99_us as f64 / 1000.0,
            l.run.errors.values().sum::<u64>(),
            l_sessions,
            h_sessions,
            verdict(ok)
        );
    }
}

/// How long electrum-lb's upstream requests took to be answered, from its
/// `electrum_lb_upstream_request_duration_seconds` histogram (both
/// upstreams): the share over 0.25, 0.5 and 1 s. ElectrumX 2.0 holds a
/// reply smaller than 1 KiB until 1 s after the session's previous send,
/// so a session carrying a few requests a second sees answers near 1 s.
async fn answer_times(metrics: SocketAddr) -> Option<String> {
    let mut s = tokio::net::TcpStream::connect(metrics).await.ok()?;
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")
        .await
        .ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).await.ok()?;
    // (upper bound, count at or under it), summed over the upstreams.
    let mut buckets: Vec<(f64, f64)> = Vec::new();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix("electrum_lb_upstream_request_duration_seconds_bucket{")
        else {
            continue;
        };
        let le = rest.split("le=\"").nth(1)?.split('"').next()?;
        let le: f64 = if le == "+Inf" {
            f64::INFINITY
        } else {
            le.parse().ok()?
        };
        let n: f64 = rest.rsplit(' ').next()?.parse().ok()?;
        match buckets.iter_mut().find(|(b, _)| *b == le) {
            Some((_, count)) => *count += n,
            None => buckets.push((le, n)),
        }
    }
    let total = buckets.iter().find(|(b, _)| b.is_infinite())?.1;
    let over = |le: f64| {
        let under = buckets
            .iter()
            .find(|(b, _)| *b == le)
            .map_or(0.0, |(_, n)| *n);
        100.0 * (total - under) / total.max(1.0)
    };
    Some(format!(
        "{total:.0} answers, {:.1}% over 0.25 s, {:.1}% over 0.5 s, {:.1}% over 1 s",
        over(0.25),
        over(0.5),
        over(1.0)
    ))
}
