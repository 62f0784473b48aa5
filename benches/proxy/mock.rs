//! The mock upstreams (a child process).

use super::*;
use serde::Deserialize;
use serde_json::value::RawValue;
use std::borrow::Cow;
use std::io::Write;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// What one mock upstream received.
#[derive(Default)]
pub(crate) struct UpstreamStats {
    pub(crate) requests: AtomicU64,
}

pub(crate) struct MockState {
    pub(crate) data: Data,
    /// CPU time spent on each request, like a real server's work.
    pub(crate) cost: Model,
    /// `blockchain.transaction.get` requests per txid, over both upstreams.
    pub(crate) per_txid: Vec<AtomicU32>,
}

pub(crate) fn mock_main() {
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
pub(crate) async fn wait_for_stdin_eof() {
    let _ = tokio::task::spawn_blocking(|| {
        let mut sink = String::new();
        while std::io::stdin().read_line(&mut sink).unwrap_or(0) > 0 {
            sink.clear();
        }
    })
    .await;
}

pub(crate) async fn mock_conn(
    mut stream: TcpStream,
    state: Arc<MockState>,
    stats: Arc<UpstreamStats>,
) {
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
pub(crate) struct MockRequest<'a> {
    #[serde(borrow)]
    pub(crate) id: Option<&'a RawValue>,
    #[serde(borrow)]
    pub(crate) method: Cow<'a, str>,
    #[serde(borrow, default)]
    pub(crate) params: Option<&'a RawValue>,
}

pub(crate) fn mock_answer(
    line: &[u8],
    state: &MockState,
    stats: &UpstreamStats,
    out: &mut Vec<u8>,
) {
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
