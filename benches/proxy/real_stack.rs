//! `--upstream real`: the node and the two ElectrumX 2.0 servers of
//! `interop/defaults_stack.py`, seen from the bench: up, restarted before
//! each run, read through ElectrumX's admin RPC, down when dropped.

use super::*;

use serde_json::Value;
use std::path::{Path as FsPath, PathBuf};
use std::process::{Command, Stdio};

pub(crate) struct RealStack {
    dir: PathBuf,
    python: PathBuf,
    script: PathBuf,
    cache: PathBuf,
    pub(crate) upstreams: Vec<SocketAddr>,
    rpc_ports: Vec<u16>,
    pub(crate) chain: RealChain,
}

/// What one ElectrumX counted since its restart (`getinfo`, `sessions`).
#[derive(Clone, Default)]
pub(crate) struct UpstreamCounts {
    /// Electrum requests handled (every method with a dot: the admin
    /// RPC's own `getinfo` and `sessions` are not counted).
    pub(crate) requests: u64,
    /// Sessions opened: each sends `server.version` once.
    pub(crate) sessions: u64,
    /// The highest session cost and the lowest concurrency ElectrumX
    /// granted a session (10 when not throttled), sampled each second.
    pub(crate) max_cost: f64,
    pub(crate) min_concurrency: Option<u64>,
    /// The costliest session when its cost was highest: its subscriptions
    /// and the requests it had received then (which session the cost is
    /// on: one holding the proxy's subscriptions, or one carrying reads).
    pub(crate) costliest_subs: u64,
    pub(crate) costliest_requests: u64,
    /// Requests ElectrumX handled by method, most first.
    pub(crate) by_method: Vec<(String, u64)>,
}

impl RealStack {
    /// Bring the stack up in `dir` (about 20 s: the chain is built anew).
    pub(crate) fn up(dir: &FsPath) -> Result<RealStack, String> {
        let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
        let cache = std::env::var_os("INTEROP_CACHE")
            .map(PathBuf::from)
            .unwrap_or_else(|| root.join("interop/.cache"));
        let python = cache.join("venv/bin/python");
        if !python.exists() || !cache.join("bsv-node/bin/bitcoind").exists() {
            return Err(format!(
                "--upstream real needs ElectrumX and the node that interop/setup.sh installs: {} or {} is missing (run interop/setup.sh, or set INTEROP_CACHE)",
                python.display(),
                cache.join("bsv-node/bin/bitcoind").display()
            ));
        }
        let mut stack = RealStack {
            dir: dir.join("stack"),
            python,
            script: root.join("interop/defaults_stack.py"),
            cache,
            upstreams: Vec::new(),
            rpc_ports: Vec::new(),
            chain: RealChain {
                height: 0,
                txids: Vec::new(),
                tx_heights: Vec::new(),
                scripthashes: Vec::new(),
            },
        };
        let out = stack.ctl(&["up"])?;
        let path = out.lines().last().unwrap_or_default().trim().to_string();
        let text = std::fs::read_to_string(&path).map_err(|e| format!("{path}: {e}"))?;
        let v: Value = serde_json::from_str(&text).map_err(|e| format!("{path}: {e}"))?;
        stack.upstreams = v["electrumx"]
            .as_array()
            .ok_or("chain.json: no electrumx")?
            .iter()
            .map(|a| {
                a.as_str()
                    .and_then(|a| a.parse().ok())
                    .ok_or("chain.json: electrumx")
            })
            .collect::<Result<_, _>>()?;
        stack.rpc_ports = v["rpc"]
            .as_array()
            .ok_or("chain.json: no rpc")?
            .iter()
            .map(|p| p.as_u64().map(|p| p as u16).ok_or("chain.json: rpc"))
            .collect::<Result<_, _>>()?;
        stack.chain = RealChain::from_json(&v)?;
        Ok(stack)
    }

    /// `defaults_stack.py --dir DIR ARGS...`; its standard output.
    fn ctl(&self, args: &[&str]) -> Result<String, String> {
        let out = Command::new(&self.python)
            .arg(&self.script)
            .arg("--dir")
            .arg(&self.dir)
            .args(args)
            .env("INTEROP_CACHE", &self.cache)
            .stdin(Stdio::null())
            .stderr(Stdio::inherit())
            .output()
            .map_err(|e| format!("{}: {e}", self.script.display()))?;
        if !out.status.success() {
            return Err(format!(
                "interop/defaults_stack.py {}: {}",
                args.join(" "),
                out.status
            ));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Stop and start both ElectrumX: no session, cost or counter left
    /// from the run before.
    pub(crate) fn restart(&self) {
        for n in ["1", "2"] {
            if let Err(e) = self.ctl(&["restart", n]) {
                panic!("{e}");
            }
        }
    }

    /// What each ElectrumX counted since its restart; `worst`: what
    /// [`RealStack::watch_sessions`] saw during the run.
    pub(crate) async fn counts(&self, worst: &[UpstreamCounts]) -> Vec<UpstreamCounts> {
        let mut all = Vec::new();
        for (i, &port) in self.rpc_ports.iter().enumerate() {
            let info = admin_rpc(port, "getinfo").await;
            let mut c = worst.get(i).cloned().unwrap_or_default();
            if let Some(counts) = info["request counts"].as_object() {
                for (method, n) in counts {
                    if method.contains('.') || method == "invalid method" {
                        let n = n.as_u64().unwrap_or(0);
                        if method.contains('.') {
                            c.requests += n;
                        }
                        c.by_method.push((method.clone(), n));
                    }
                }
                c.by_method.sort_by_key(|m| std::cmp::Reverse(m.1));
                c.sessions = counts
                    .get("server.version")
                    .and_then(Value::as_u64)
                    .unwrap_or(0);
            }
            all.push(c);
        }
        all
    }

    /// Sample every ElectrumX's sessions each second until `stop` fires:
    /// the highest session cost and the lowest concurrency seen.
    pub(crate) fn watch_sessions(
        &self,
        mut stop: tokio::sync::oneshot::Receiver<()>,
    ) -> tokio::task::JoinHandle<Vec<UpstreamCounts>> {
        let ports = self.rpc_ports.clone();
        tokio::spawn(async move {
            let mut worst = vec![UpstreamCounts::default(); ports.len()];
            loop {
                for (c, &port) in worst.iter_mut().zip(&ports) {
                    sample_sessions(port, c).await;
                }
                tokio::select! {
                    _ = &mut stop => return worst,
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
            }
        })
    }
}

/// Fold ElectrumX's `sessions` into `c`. Rows: [id, flags, address, client,
/// protocol, cost, extra cost, unanswered, txs sent, subscriptions,
/// messages received, bytes received, ...]; flags: the kind's initial ("T" TCP,
/// "S" TLS, "R" admin RPC), "C" if closing, then the concurrency granted now.
async fn sample_sessions(port: u16, c: &mut UpstreamCounts) {
    for row in admin_rpc(port, "sessions")
        .await
        .as_array()
        .into_iter()
        .flatten()
    {
        let flags = row[1].as_str().unwrap_or("");
        if !flags.starts_with('T') && !flags.starts_with('S') {
            continue;
        }
        let cost = row[5].as_f64().unwrap_or(0.0);
        if cost > c.max_cost {
            c.max_cost = cost;
            c.costliest_subs = row[9].as_u64().unwrap_or(0);
            c.costliest_requests = row[10].as_u64().unwrap_or(0);
        }
        let digits: String = flags.chars().filter(char::is_ascii_digit).collect();
        if let Ok(n) = digits.parse::<u64>() {
            c.min_concurrency = Some(c.min_concurrency.map_or(n, |m| m.min(n)));
        }
    }
}

impl Drop for RealStack {
    fn drop(&mut self) {
        if let Err(e) = self.ctl(&["down"]) {
            eprintln!("{e}");
        }
    }
}

/// One call to an ElectrumX admin RPC port (newline-delimited JSON-RPC).
pub(crate) async fn admin_rpc(port: u16, method: &str) -> Value {
    let mut s = TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("ElectrumX admin RPC");
    let line = format!("{{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"{method}\",\"params\":[]}}\n");
    s.write_all(line.as_bytes()).await.expect("write");
    let mut buf = Vec::new();
    let mut chunk = [0u8; 16 * 1024];
    while !buf.ends_with(b"\n") {
        let n = s.read(&mut chunk).await.expect("read");
        assert!(n > 0, "ElectrumX closed its admin RPC");
        buf.extend_from_slice(&chunk[..n]);
    }
    let v: Value = serde_json::from_slice(&buf).expect("JSON");
    v["result"].clone()
}
