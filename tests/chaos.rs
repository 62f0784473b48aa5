//! Chaos: steady well-behaved load while upstreams are killed, stopped,
//! stalled and restarted, and while misbehaving clients connect (TLS never
//! finished, a 10 MiB line, request floods from their own networks, a client
//! that never reads). At the end every well-behaved request got its right
//! answer or a clean JSON-RPC error, every well-behaved session is still
//! open, every misbehaving client was closed by the proxy, and the proxy's
//! sessions, tasks and memory are back to their baseline.
//!
//! Phases advance on progress (requests answered), never on a clock, so the
//! test takes as long as the machine needs (about ten seconds on 2 cores).

mod support;

use electrum_lb::proxy_protocol::v1_header;
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use support::mock::{status_of, Mock};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const SCRIPTS: usize = 3;
const WELL_BEHAVED_TCP: usize = 4;
const WELL_BEHAVED_TLS: usize = 2;

type History = Vec<(String, i64)>;

/// What every well-behaved client expects: the same on every upstream.
struct Expect {
    headers: Vec<String>,
    histories: Vec<History>,
}

#[derive(Default)]
struct Stats {
    ok: AtomicU64,
    /// -32001 (no upstream), -32002 (timeout), -32003 (limit).
    clean: [AtomicU64; 3],
    stop: AtomicBool,
}

impl Stats {
    fn answered(&self) -> u64 {
        self.ok.load(Ordering::Relaxed) + self.clean_total()
    }
    fn clean_total(&self) -> u64 {
        self.clean.iter().map(|c| c.load(Ordering::Relaxed)).sum()
    }
}

fn config(mocks: &[Mock]) -> String {
    let head = config_head();
    let ups: Vec<String> = mocks.iter().map(|m| format!("{:?}", m.url())).collect();
    format!(
        r#"
{head}
[server]
request_timeout_secs = 2
shutdown_grace_secs = 1
handshake_timeout_secs = 2
idle_timeout_secs = 3
session_queue = 64
upstream_stall_secs = 1
upstream_connect_timeout_secs = 1
upstream_idle_close_secs = 1
health_interval_ms = 200

[limits]
exempt = []
max_sessions_per_group = 50
session_rate = 2000
session_burst = 4000
group_rate = 10000
group_burst = 50000
bytes_per_point = 1048576
max_refusals = 50

[coins.test]
listen = [
  "tcp://127.0.0.1:0",
  "ssl://127.0.0.1:0",
  {{ url = "tcp://127.0.0.1:0", proxy_protocol = true }},
]
upstreams = [{}]
banner = "{}"
"#,
        ups.join(", "),
        // Replies of 64 KiB for the client that never reads.
        "b".repeat(64 * 1024)
    )
}

/// One answer checked: the expected result, or a clean error.
fn check(v: &Value, expected: &Value, stats: &Stats) {
    if let Some(err) = v.get("error") {
        let slot = match err["code"].as_i64() {
            Some(-32001) => 0,
            Some(-32002) => 1,
            Some(-32003) => 2,
            _ => panic!("not a clean error: {v}"),
        };
        stats.clean[slot].fetch_add(1, Ordering::Relaxed);
    } else {
        assert_eq!(&v["result"], expected, "a wrong answer: {v}");
        stats.ok.fetch_add(1, Ordering::Relaxed);
    }
}

fn history_json(h: &History) -> Value {
    json!(h
        .iter()
        .map(|(t, height)| json!({"tx_hash": t, "height": height}))
        .collect::<Vec<_>>())
}

/// A wallet: negotiates, subscribes, then asks a mix of questions at a
/// steady pace until told to stop; finally proves its session is open.
async fn wallet(mut c: Client, k: usize, stats: Arc<Stats>, expect: Arc<Expect>) {
    let v = c.call("server.version", json!(["chaos", "1.4"])).await;
    assert_eq!(v[1], "1.4");
    let tip = c.request("blockchain.headers.subscribe", json!([])).await;
    assert!(
        tip.get("error").is_some() || tip["result"]["height"].as_u64() >= Some(99),
        "{tip}"
    );
    for s in 0..SCRIPTS {
        let v = c
            .request("blockchain.scripthash.subscribe", json!([scripthash(s)]))
            .await;
        check(&v, &json!(status_of(&expect.histories[s])), &stats);
    }
    let mut tick = tokio::time::interval(Duration::from_millis(25));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut i = k;
    while !stats.stop.load(Ordering::Relaxed) {
        tick.tick().await;
        i += 1;
        let s = i % SCRIPTS;
        let h = (i * 7) % expect.headers.len();
        let (method, params, expected) = match i % 4 {
            0 => ("server.ping", json!([]), Value::Null),
            1 => (
                "blockchain.block.header",
                json!([h]),
                json!(expect.headers[h]),
            ),
            2 => (
                "blockchain.scripthash.get_history",
                json!([scripthash(s)]),
                history_json(&expect.histories[s]),
            ),
            _ => (
                "blockchain.scripthash.get_history",
                json!([scripthash((s + 1) % SCRIPTS)]),
                history_json(&expect.histories[(s + 1) % SCRIPTS]),
            ),
        };
        let v = c.request(method, params).await;
        check(&v, &expected, &stats);
    }
    // Still connected: the proxy closed no well-behaved session.
    assert_eq!(c.call("server.ping", json!([])).await, Value::Null);
}

/// Wait until the wallets have had `n` more answers.
async fn progress(stats: &Stats, n: u64) {
    let target = stats.answered() + n;
    eventually(|| stats.answered() >= target).await;
}

/// Poll until `cond` holds. Upstreams that were down come back after their
/// reconnection backoff (seconds, doubling), so this allows a minute.
async fn eventually(mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while !cond() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "condition not reached within a minute"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// True when the proxy ends the connection (EOF or reset) within WAIT.
async fn read_until_closed(s: &mut TcpStream) -> (bool, Vec<u8>) {
    let mut got = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match tokio::time::timeout(WAIT, s.read(&mut buf)).await {
            Err(_) => return (false, got),
            Ok(Ok(0)) | Ok(Err(_)) => return (true, got),
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n.min(4096)]),
        }
    }
}

/// Opens TLS, sends a third of a record header, never finishes.
async fn tls_never_finished(addr: SocketAddr) -> bool {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let _ = s.write_all(&[0x16, 0x03]).await;
    read_until_closed(&mut s).await.0
}

/// Sends one 10 MiB line.
async fn huge_line(addr: SocketAddr) -> bool {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let chunk = vec![b'x'; 64 * 1024];
    for _ in 0..160 {
        if s.write_all(&chunk).await.is_err() {
            break;
        }
    }
    let (closed, got) = read_until_closed(&mut s).await;
    let text = String::from_utf8_lossy(&got);
    closed && (got.is_empty() || text.contains("exceeds the limit"))
}

/// From its own network (through the PROXY listener): 5,000 requests at once.
async fn flooder(addr: SocketAddr, n: u8) -> bool {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let src: SocketAddr = format!("198.51.{n}.7:40000").parse().unwrap();
    let mut bytes = v1_header(src, addr);
    for i in 0..5000 {
        bytes.extend_from_slice(
            format!(
                "{{\"id\":{i},\"method\":\"blockchain.block.header\",\"params\":[{}]}}\n",
                i % 100
            )
            .as_bytes(),
        );
    }
    let _ = s.write_all(&bytes).await;
    read_until_closed(&mut s).await.0
}

/// Asks for 64 KiB banners and never reads a byte: writes until the proxy
/// gives up on it (the write then fails).
async fn never_reads(addr: SocketAddr) -> bool {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let mut chunk = Vec::new();
    for i in 0..100 {
        chunk
            .extend_from_slice(format!("{{\"id\":{i},\"method\":\"server.banner\"}}\n").as_bytes());
    }
    let written = async {
        loop {
            if s.write_all(&chunk).await.is_err() {
                return;
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(30), written)
        .await
        .is_ok()
}

fn vm_rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

fn alive_tasks() -> usize {
    tokio::runtime::Handle::current()
        .metrics()
        .num_alive_tasks()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos() {
    let mut mocks = vec![
        Mock::start().await,
        Mock::start().await,
        Mock::start().await,
    ];
    let expect = Arc::new(Expect {
        headers: (0..100).map(|h| mocks[0].header_hex(h)).collect(),
        histories: (0..SCRIPTS)
            .map(|s| (0..=s).map(|t| (txid(10 * s + t), 50 + t as i64)).collect())
            .collect(),
    });
    for m in &mocks {
        for (s, h) in expect.histories.iter().enumerate() {
            m.set_history_silently(&scripthash(s), h.clone());
        }
    }
    let server = start_proxy(&config(&mocks)).await;
    let all_up = |server: &electrum_lb::Server| {
        server.upstreams()["test"]
            .iter()
            .filter(|u| u.healthy)
            .count()
            == 3
    };
    eventually(|| all_up(&server)).await;
    let l = server.coins["test"].listeners.clone();
    let (tcp, ssl, proxied) = (l[0].1, l[1].1, l[2].1);

    // Baseline, after a warm-up session.
    let mut warm = Client::connect(tcp).await;
    warm.call("blockchain.block.header", json!([1])).await;
    drop(warm);
    wait_until(|| server.session_count() == 0).await;
    let (tasks0, rss0) = (alive_tasks(), vm_rss_kib());

    let stats = Arc::new(Stats::default());
    let mut wallets = Vec::new();
    for k in 0..WELL_BEHAVED_TCP + WELL_BEHAVED_TLS {
        let c = if k < WELL_BEHAVED_TCP {
            Client::connect(tcp).await
        } else {
            Client::connect_tls(ssl).await
        };
        wallets.push(tokio::spawn(wallet(c, k, stats.clone(), expect.clone())));
    }
    progress(&stats, 100).await;

    // The misbehaving clients arrive while the load runs.
    let mut bad = Vec::new();
    for _ in 0..5 {
        bad.push(("tls never finished", tokio::spawn(tls_never_finished(ssl))));
    }
    for _ in 0..2 {
        bad.push(("10 MiB line", tokio::spawn(huge_line(tcp))));
    }
    for n in 0..4 {
        bad.push(("request flood", tokio::spawn(flooder(proxied, 100 + n))));
    }
    for _ in 0..2 {
        bad.push(("never reads", tokio::spawn(never_reads(tcp))));
    }

    // Upstream chaos, one step at a time.
    mocks[0].kill_connections();
    progress(&stats, 150).await;
    mocks[1].stop();
    progress(&stats, 150).await;
    mocks[2].set_stalled(true);
    progress(&stats, 150).await;
    mocks[2].set_stalled(false);
    mocks[1].restart().await;
    for m in &mocks {
        m.mine(1);
    }
    eventually(|| all_up(&server)).await;
    progress(&stats, 150).await;
    // Everything down: only clean errors now.
    for m in &mocks {
        m.stop();
    }
    let errors = stats.clean_total();
    eventually(|| stats.clean_total() >= errors + 30).await;
    for m in mocks.iter_mut() {
        m.restart().await;
    }
    eventually(|| all_up(&server)).await;
    progress(&stats, 200).await;

    // Every misbehaving client was closed by the proxy.
    let mut handled = std::collections::BTreeMap::<&str, usize>::new();
    for (what, task) in bad {
        assert!(
            task.await.unwrap(),
            "a {what} client was not closed by the proxy"
        );
        *handled.entry(what).or_default() += 1;
    }
    stats.stop.store(true, Ordering::Relaxed);
    for w in wallets {
        w.await.unwrap();
    }

    // Back to the baseline: no session, no slot, no stray task, no growth.
    wait_until(|| server.session_count() == 0).await;
    wait_until(|| server.limits.open_connections() == 0).await;
    eventually(|| alive_tasks() <= tasks0 + 4).await;
    let (tasks1, rss1) = (alive_tasks(), vm_rss_kib());
    let clean: Vec<u64> = stats
        .clean
        .iter()
        .map(|c| c.load(Ordering::Relaxed))
        .collect();
    let rendered = server.metrics.render();
    let limit_hits: Vec<&str> = rendered
        .lines()
        .filter(|l| l.starts_with("electrum_lb_limit_hits_total") && !l.ends_with(" 0"))
        .collect();
    println!(
        "chaos: requests ok {}, clean errors {} (no upstream {}, timeout {}, limit {}); misbehaving clients handled {} {:?}",
        stats.ok.load(Ordering::Relaxed),
        clean.iter().sum::<u64>(),
        clean[0],
        clean[1],
        clean[2],
        handled.values().sum::<usize>(),
        handled
    );
    println!("chaos: tasks {tasks0} -> {tasks1}; VmRSS {rss0} -> {rss1} KiB");
    println!("chaos: {}", limit_hits.join("; "));
    assert!(stats.ok.load(Ordering::Relaxed) > 0);
    assert_eq!(handled.values().sum::<usize>(), 13);
    // Generous: the allocator keeps some of what the 10 MiB lines and the
    // 64 KiB banners needed.
    assert!(
        rss1 < rss0 + 96 * 1024,
        "memory did not return near its baseline: {rss0} -> {rss1} KiB"
    );
    server.shutdown().await;
}
