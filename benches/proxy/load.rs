//! The load generator: workloads, closed-loop connections, latency.

use super::*;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinSet;

#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Workload {
    Uncached,
    Cacheable,
    Mix,
}

impl Workload {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Workload::Uncached => "uncached",
            Workload::Cacheable => "cacheable",
            Workload::Mix => "mix",
        }
    }

    /// Request lines without their id: `{...,"id":` (the id and `}\n` follow).
    pub(crate) fn bodies(self, data: &Data) -> Vec<Vec<u8>> {
        let deep = data.tip() - 10;
        let chain = Chain {
            scripthashes: &data.scripthashes,
            txids: &data.txids,
            tip: data.tip(),
        };
        // The mock proves any height: merkle proofs at random buried ones.
        chain.bodies(self, |_, rng| rng.below(deep))
    }
}

/// What the workloads ask about: the mock chain's or a real one's.
pub(crate) struct Chain<'a> {
    pub(crate) scripthashes: &'a [String],
    pub(crate) txids: &'a [String],
    pub(crate) tip: usize,
}

impl Chain<'_> {
    /// Request lines without their id: `{...,"id":` (the id and `}\n`
    /// follow). `merkle_height` gives the height a merkle proof of txid
    /// number `t` is asked at.
    pub(crate) fn bodies(
        &self,
        w: Workload,
        merkle_height: impl Fn(usize, &mut Rng) -> usize,
    ) -> Vec<Vec<u8>> {
        let req = |method: &str, params: String| {
            format!("{{\"jsonrpc\":\"2.0\",\"method\":\"{method}\",\"params\":{params},\"id\":")
                .into_bytes()
        };
        let quoted = |s: &str| format!("[\"{s}\"]");
        match w {
            Workload::Uncached => self
                .scripthashes
                .iter()
                .map(|sh| req("blockchain.scripthash.get_history", quoted(sh)))
                .collect(),
            Workload::Cacheable => self
                .txids
                .iter()
                .map(|t| req("blockchain.transaction.get", quoted(t)))
                .collect(),
            Workload::Mix => {
                let mut rng = Rng(0x5eed);
                let deep = self.tip - 10;
                (0..20_000)
                    .map(|_| {
                        let sh = &self.scripthashes[rng.below(self.scripthashes.len())];
                        let t = rng.below(self.txids.len());
                        let tx = &self.txids[t];
                        match rng.below(100) {
                            0..35 => req("blockchain.scripthash.get_history", quoted(sh)),
                            35..40 => req("blockchain.scripthash.get_balance", quoted(sh)),
                            40..45 => req("blockchain.scripthash.listunspent", quoted(sh)),
                            45..70 => req("blockchain.transaction.get", quoted(tx)),
                            70..80 => req(
                                "blockchain.transaction.get_merkle",
                                format!("[\"{tx}\",{}]", merkle_height(t, &mut rng)),
                            ),
                            80..90 => {
                                req("blockchain.block.header", format!("[{}]", rng.below(deep)))
                            }
                            90..95 => req(
                                "blockchain.block.header",
                                format!("[{}]", self.tip - rng.below(3)),
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
pub(crate) struct Rng(pub(crate) u64);

impl Rng {
    pub(crate) fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % n as u64) as usize
    }
}

/// What one run measured.
#[derive(Clone, Default)]
pub(crate) struct Run {
    /// Answers per second in the measured window.
    pub(crate) rate: f64,
    pub(crate) p50_us: u32,
    pub(crate) p99_us: u32,
    pub(crate) errors: u64,
    /// Requests each upstream received during the run.
    pub(crate) upstream: Vec<u64>,
    pub(crate) tx_get: u64,
    pub(crate) max_per_txid: u64,
    /// Answers over the whole run, warm-up included.
    pub(crate) answers: u64,
    /// CPU time per answer of the proxy process (HAProxy or electrum-lb)
    /// and of the mock upstreams, in microseconds.
    pub(crate) front_cpu_us: Option<f64>,
    pub(crate) upstream_cpu_us: Option<f64>,
    /// The proxy's threads over the run (fixed-rate rows only).
    pub(crate) front_sched: Option<Sched>,
}

pub(crate) struct ConnResult {
    pub(crate) latencies_us: Vec<u32>,
    pub(crate) errors: u64,
    pub(crate) answers: u64,
}

/// Drive `connections` closed-loop connections to `targets` (round robin)
/// for `secs`, `depth` requests in flight on each.
pub(crate) async fn load(
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
pub(crate) async fn prime(targets: &[SocketAddr], bodies: &Arc<Vec<Vec<u8>>>) -> u64 {
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

pub(crate) async fn drive(
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
pub(crate) fn reply_id(line: &[u8]) -> Option<u64> {
    let key = line.windows(5).rposition(|w| w == b"\"id\":")?;
    let digits = &line[key + 5..];
    let end = digits.iter().position(|b| !b.is_ascii_digit())?;
    std::str::from_utf8(&digits[..end]).ok()?.parse().ok()
}
