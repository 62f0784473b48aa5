//! `--upstream real`: the workloads over the real chain, and the load
//! generator that drives them like wallets do (`server.version` first, a
//! new connection when the far side closes one, error replies by code).

use super::*;

use serde_json::Value;
use std::collections::{BTreeMap, HashMap};
use std::time::Instant;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// What `interop/defaults_stack.py up` built (its `chain.json`).
pub(crate) struct RealChain {
    pub(crate) height: usize,
    pub(crate) txids: Vec<String>,
    pub(crate) tx_heights: Vec<usize>,
    pub(crate) scripthashes: Vec<String>,
}

impl RealChain {
    pub(crate) fn from_json(v: &Value) -> Result<RealChain, String> {
        let strings = |key: &str| -> Result<Vec<String>, String> {
            v[key]
                .as_array()
                .ok_or(format!("chain.json: no {key}"))?
                .iter()
                .map(|s| {
                    s.as_str()
                        .map(str::to_string)
                        .ok_or(format!("chain.json: {key}"))
                })
                .collect()
        };
        let tx_heights = v["tx_heights"]
            .as_array()
            .ok_or("chain.json: no tx_heights")?
            .iter()
            .map(|h| {
                h.as_u64()
                    .map(|h| h as usize)
                    .ok_or("chain.json: tx_heights")
            })
            .collect::<Result<Vec<_>, _>>()?;
        let mut scripthashes = strings("scripthashes")?;
        scripthashes.extend(strings("hot")?);
        Ok(RealChain {
            height: v["height"].as_u64().ok_or("chain.json: no height")? as usize,
            txids: strings("txids")?,
            tx_heights,
            scripthashes,
        })
    }

    /// Request lines without their id, as [`Workload::bodies`] makes them
    /// for the mock chain: the same workloads and the same wallet mix.
    pub(crate) fn bodies(&self, w: Workload) -> Vec<Vec<u8>> {
        let chain = Chain {
            scripthashes: &self.scripthashes,
            txids: &self.txids,
            tip: self.height,
        };
        // A real node proves a transaction at its own height only.
        chain.bodies(w, |t, _| self.tx_heights[t])
    }
}

/// What the connections of one run saw.
#[derive(Default)]
pub(crate) struct RealRun {
    /// Answers per second in the measured window.
    pub(crate) rate: f64,
    pub(crate) p50_us: u32,
    pub(crate) p99_us: u32,
    /// Error replies in the measured window, by JSON-RPC code.
    pub(crate) errors: BTreeMap<i64, u64>,
    /// Connections the far side closed (each is reopened while the run lasts).
    pub(crate) dropped: u64,
    /// Requests whose connection closed before their answer.
    pub(crate) lost: u64,
    /// Every answer, warm-up, `server.version` and the wait for the last
    /// answers included: the denominator of upstream requests per answer.
    pub(crate) answers: u64,
}

#[derive(Default)]
struct ConnRun {
    latencies_us: Vec<u32>,
    errors: BTreeMap<i64, u64>,
    dropped: u64,
    lost: u64,
    answers: u64,
}

/// After the clock stops, answers still owed are awaited this long (they
/// count in the requests-per-answer figure, not in the rate).
const DRAIN: Duration = Duration::from_secs(15);

/// `connections` closed-loop connections to `target`, `depth` requests in
/// flight on each, for `secs` (the first [`WARM_UP`] not measured).
pub(crate) async fn load_real(
    target: SocketAddr,
    bodies: Arc<Vec<Vec<u8>>>,
    connections: usize,
    depth: usize,
    secs: f64,
) -> RealRun {
    let start = Instant::now() + Duration::from_millis(100);
    let warm = start + WARM_UP;
    let stop = start + Duration::from_secs_f64(secs);
    let mut tasks = JoinSet::new();
    for c in 0..connections {
        let bodies = bodies.clone();
        tasks.spawn(async move {
            let mut run = ConnRun::default();
            tokio::time::sleep_until(start.into()).await;
            let deadline = (stop + DRAIN).into();
            let seed = c as u64;
            let _ = tokio::time::timeout_at(
                deadline,
                drive_real(target, &bodies, depth, seed, warm, stop, &mut run),
            )
            .await;
            run
        });
    }
    let mut out = RealRun::default();
    let mut latencies = Vec::new();
    while let Some(r) = tasks.join_next().await {
        let r = r.expect("connection task");
        latencies.extend(r.latencies_us);
        for (code, n) in r.errors {
            *out.errors.entry(code).or_default() += n;
        }
        out.dropped += r.dropped;
        out.lost += r.lost;
        out.answers += r.answers;
    }
    latencies.sort_unstable();
    let pct = |p: f64| {
        latencies
            .get(((latencies.len() as f64 * p) as usize).min(latencies.len().saturating_sub(1)))
            .copied()
            .unwrap_or(0)
    };
    out.rate = latencies.len() as f64 / (stop - warm).as_secs_f64();
    out.p50_us = pct(0.50);
    out.p99_us = pct(0.99);
    out
}

/// One wallet-like connection: `server.version`, then `depth` requests in
/// flight until `stop`, then the answers still owed. A connection the far
/// side closes is counted and opened again (as a wallet reconnects).
async fn drive_real(
    target: SocketAddr,
    bodies: &[Vec<u8>],
    depth: usize,
    seed: u64,
    warm: Instant,
    stop: Instant,
    run: &mut ConnRun,
) {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ (seed + 1).wrapping_mul(0x2545_f491_4f6c_dd1d));
    let mut next_id = 1u64;
    let mut next = |out: &mut Vec<u8>, sent: &mut HashMap<u64, Instant>| {
        out.extend_from_slice(&bodies[rng.below(bodies.len())]);
        out.extend_from_slice(next_id.to_string().as_bytes());
        out.extend_from_slice(b"}\n");
        sent.insert(next_id, Instant::now());
        next_id += 1;
    };
    while Instant::now() < stop {
        let Ok(mut stream) = TcpStream::connect(target).await else {
            run.dropped += 1;
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        stream.set_nodelay(true).expect("nodelay");
        // Sent and not answered yet, by id.
        let mut sent: HashMap<u64, Instant> = HashMap::with_capacity(depth);
        let mut out = b"{\"jsonrpc\":\"2.0\",\"method\":\"server.version\",\"params\":[\"xbench\",\"1.4\"],\"id\":0}\n".to_vec();
        for _ in 0..depth {
            next(&mut out, &mut sent);
        }
        let mut pending: Vec<u8> = Vec::with_capacity(64 * 1024);
        let mut chunk = vec![0u8; 64 * 1024];
        loop {
            if !out.is_empty() {
                if stream.write_all(&out).await.is_err() {
                    break;
                }
                out.clear();
            }
            let n = match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            pending.extend_from_slice(&chunk[..n]);
            let now = Instant::now();
            let mut at = 0;
            while let Some(end) = pending[at..].iter().position(|&b| b == b'\n') {
                let line = &pending[at..at + end];
                at += end + 1;
                let Some(id) = json_id(line) else {
                    continue; // a notification
                };
                run.answers += 1;
                let Some(at_sent) = sent.remove(&id) else {
                    continue; // server.version
                };
                if now >= warm && now < stop {
                    let us = now.duration_since(at_sent).as_micros();
                    run.latencies_us.push(us.min(u32::MAX as u128) as u32);
                    if let Some(code) = error_code(line) {
                        *run.errors.entry(code).or_default() += 1;
                    }
                }
                if now < stop {
                    next(&mut out, &mut sent);
                }
            }
            pending.drain(..at);
            if sent.is_empty() && now >= stop {
                return;
            }
        }
        run.dropped += 1;
        run.lost += sent.len() as u64;
    }
}

/// The `id` of a reply line (`"id":N` or `"id": N`, anywhere in the line;
/// ElectrumX pads before the closing brace); `None` for notifications.
pub(crate) fn json_id(line: &[u8]) -> Option<u64> {
    let key = line.windows(4).rposition(|w| w == b"\"id\"")?;
    let rest = &line[key + 4..];
    let rest = &rest[rest.iter().position(|b| !b" :".contains(b))?..];
    let end = rest
        .iter()
        .position(|b| !b.is_ascii_digit())
        .unwrap_or(rest.len());
    std::str::from_utf8(&rest[..end]).ok()?.parse().ok()
}

/// The JSON-RPC error code of an error reply (`"error":{"code":-101,...}`).
pub(crate) fn error_code(line: &[u8]) -> Option<i64> {
    let at = line.windows(8).position(|w| w == b"\"error\":")?;
    let rest = &line[at + 8..];
    let rest = &rest[rest.iter().position(|&b| b != b' ')?..];
    if rest.first() != Some(&b'{') {
        return None; // "error": null
    }
    let code = rest.windows(6).position(|w| w == b"\"code\"");
    let Some(code) = code else {
        return Some(0);
    };
    let rest = &rest[code + 6..];
    let rest = &rest[rest.iter().position(|b| !b" :".contains(b))?..];
    let end = rest
        .iter()
        .enumerate()
        .position(|(i, b)| !(b.is_ascii_digit() || (i == 0 && *b == b'-')))
        .unwrap_or(rest.len());
    Some(std::str::from_utf8(&rest[..end]).ok()?.parse().unwrap_or(0))
}

/// Every body once, over a few connections that negotiate first (as
/// ElectrumX requires), all pipelined; the number of answers.
pub(crate) async fn prime_real(target: SocketAddr, bodies: &Arc<Vec<Vec<u8>>>) -> u64 {
    const PRIME_CONNECTIONS: usize = 8;
    let mut tasks = JoinSet::new();
    for c in 0..PRIME_CONNECTIONS {
        let bodies = bodies.clone();
        tasks.spawn(async move {
            let mut stream = TcpStream::connect(target).await.expect("connect");
            let mut out = b"{\"jsonrpc\":\"2.0\",\"method\":\"server.version\",\"params\":[\"xbench\",\"1.4\"],\"id\":0}\n".to_vec();
            let mut owed = 1u64;
            for (i, body) in bodies.iter().enumerate().skip(c).step_by(PRIME_CONNECTIONS) {
                out.extend_from_slice(body);
                out.extend_from_slice((i + 1).to_string().as_bytes());
                out.extend_from_slice(b"}\n");
                owed += 1;
            }
            let (mut rd, mut wr) = stream.split();
            let write = async {
                wr.write_all(&out).await.expect("write");
            };
            let read = async {
                let mut answers = 0u64;
                let mut pending = Vec::new();
                let mut chunk = vec![0u8; 64 * 1024];
                while answers < owed {
                    let n = rd.read(&mut chunk).await.expect("read");
                    assert!(n > 0, "closed while priming");
                    pending.extend_from_slice(&chunk[..n]);
                    let mut at = 0;
                    while let Some(end) = pending[at..].iter().position(|&b| b == b'\n') {
                        if json_id(&pending[at..at + end]).is_some() {
                            answers += 1;
                        }
                        at += end + 1;
                    }
                    pending.drain(..at);
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
