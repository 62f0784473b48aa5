//! Part `storm`: what a crowd of reconnecting TLS wallets costs the wallets
//! already connected. While `HANDSHAKE_CLIENTS` clients make full TLS
//! handshakes back to back on the proxy's TLS listener, 16 established
//! plain connections to the same process send uncached requests at a fixed
//! moderate rate; their p50 and p99 against the same rate with no
//! handshakes (both from this run, so the ratio says what the handshakes
//! added). A proxy that answers a ClientHello inside its event loop holds
//! every session on that thread for the length of an RSA signature.

use super::*;
use crate::edge::{fixed_rate, handshakes, Handshakes};

/// The established sessions' rate, requests per second over 16 connections.
const STORM_RATE: f64 = 5_000.0;
const STORM_CONNECTIONS: usize = 16;
/// Clients making full handshakes meanwhile.
const STORM_CLIENTS: usize = 8;

/// The rows of part `storm`: per proxy, the round whose p50 during the
/// handshakes is the median of `--rounds` interleaved rounds (not the
/// best: a round where fewer handshakes got through would look better).
pub(crate) async fn rows(bench: &Bench, opts: &Options) -> Vec<String> {
    let data = Data::new();
    let bodies = Arc::new(Workload::Uncached.bodies(&data));
    let secs = opts.secs.min(3.0);
    let mut paths = vec![Path::LbTls];
    if bench.haproxy {
        paths.insert(0, Path::HaproxyTls);
    }
    let mut out = vec![
        String::new(),
        format!(
            "Established sessions during full TLS handshakes ({STORM_RATE:.0} uncached requests/s over {STORM_CONNECTIONS} plain connections while {STORM_CLIENTS} clients make full handshakes on the same process; median of {} rounds):",
            opts.rounds
        ),
        "| path        | p50 us quiet | p99 us quiet | p50 us storm | p99 us storm | handshakes/s | errors |".into(),
        "|-------------|-------------:|-------------:|-------------:|-------------:|-------------:|-------:|".into(),
    ];
    let mut rounds: Vec<(Path, Run, Run, Handshakes)> = Vec::new();
    for _ in 0..opts.rounds {
        for &p in &paths {
            let (front, targets) = bench.front(p).await;
            let front = front.expect("a proxy process");
            // HAProxy's TLS frontend has a plain bind beside its `ssl` one;
            // electrum-lb's first listener is plain TCP.
            let (ssl, plain) = match p {
                Path::HaproxyTls => (targets[0], targets[1]),
                _ => (front.ssl.expect("an ssl:// listener"), targets[0]),
            };
            let quiet =
                fixed_rate(plain, bodies.clone(), STORM_RATE, STORM_CONNECTIONS, secs).await;
            let pid = front.pid();
            // The handshakes cover the whole of the rate's window (which
            // starts 0.1 s after it is called).
            let (storm, shakes) = tokio::join!(
                fixed_rate(plain, bodies.clone(), STORM_RATE, STORM_CONNECTIONS, secs),
                handshakes(ssl, pid, false, STORM_CLIENTS, secs + 0.15),
            );
            rounds.push((p, quiet, storm, shakes));
        }
    }
    rounds.sort_by_key(|r| r.2.p50_us);
    for p in &paths {
        let mine: Vec<_> = rounds.iter().filter(|r| r.0 == *p).collect();
        let (p, quiet, storm, shakes) = mine[mine.len() / 2];
        out.push(format!(
            "| {:<11} | {:>12} | {:>12} | {:>12} | {:>12} | {:>12.0} | {:>6} |",
            p.name(),
            quiet.p50_us,
            quiet.p99_us,
            storm.p50_us,
            storm.p99_us,
            shakes.rate,
            quiet.errors + storm.errors,
        ));
    }
    out
}
