//! Operating the proxy: metrics, health endpoints, live reload (in-process
//! and through the real binary's SIGHUP).
mod support;

use electrum_lb::Config;
use serde_json::json;
use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use support::mock::{Mock, MockOptions};
use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_move_with_real_traffic() {
    let mock = Mock::start().await;
    let server = proxy_for(&[mock.url()]).await;
    let mut c = Client::connect(tcp_addr(&server, "test")).await;
    c.call("server.ping", json!([])).await;
    c.call("blockchain.block.header", json!([3])).await;
    c.call("blockchain.scripthash.subscribe", json!([scripthash(1)]))
        .await;
    c.send_raw(b"this is not json\n").await;
    let v = c.recv().await;
    assert_eq!(v["error"]["code"], -32700);
    let v = c
        .request("blockchain.transaction.get", json!([txid(1)]))
        .await;
    assert_eq!(
        v["error"]["code"], 2,
        "the mock's own error is relayed: {v}"
    );

    let (status, m) = http_get(server.metrics_addr, "/metrics").await;
    assert_eq!(status, 200);
    let req = |method: &str, outcome: &str| {
        sample(
            &m,
            &format!("electrum_lb_requests_total{{coin=\"test\",method=\"{method}\",outcome=\"{outcome}\"}}"),
        )
    };
    assert_eq!(req("server.ping", "ok"), Some(1.0));
    assert_eq!(req("blockchain.block.header", "ok"), Some(1.0));
    assert_eq!(req("blockchain.scripthash.subscribe", "ok"), Some(1.0));
    assert_eq!(
        req("blockchain.transaction.get", "upstream_error"),
        Some(1.0)
    );
    assert_eq!(
        sample(&m, "electrum_lb_errors_total{coin=\"test\",kind=\"parse\"}"),
        Some(1.0)
    );
    assert_eq!(
        sample(
            &m,
            "electrum_lb_sessions_open{coin=\"test\",transport=\"tcp\"}"
        ),
        Some(1.0)
    );
    assert!(
        sample(
            &m,
            "electrum_lb_sessions_total{coin=\"test\",transport=\"tcp\"}"
        )
        .unwrap()
            >= 1.0
    );
    assert_eq!(
        sample(&m, "electrum_lb_request_duration_seconds_count{coin=\"test\",method=\"blockchain.block.header\"}"),
        Some(1.0)
    );
    let up = format!("coin=\"test\",upstream=\"{}\"", mock.url());
    assert_eq!(
        sample(&m, &format!("electrum_lb_upstream_up{{{up}}}")),
        Some(1.0)
    );
    assert_eq!(
        sample(&m, &format!("electrum_lb_upstream_height{{{up}}}")),
        Some(99.0)
    );
    assert_eq!(
        sample(&m, &format!("electrum_lb_upstream_connections{{{up}}}")),
        Some(1.0)
    );
    assert!(
        sample(
            &m,
            &format!("electrum_lb_upstream_request_duration_seconds_count{{{up}}}")
        )
        .unwrap()
            >= 2.0
    );
    assert_eq!(
        sample(
            &m,
            "electrum_lb_subscriptions{coin=\"test\",kind=\"session\"}"
        ),
        Some(1.0)
    );
    // No status is held (nothing failed over).
    assert_eq!(
        sample(&m, "electrum_lb_subscriptions{coin=\"test\",kind=\"held\"}"),
        Some(0.0)
    );
    // The hub also holds the tip subscription.
    assert!(
        sample(
            &m,
            "electrum_lb_subscriptions{coin=\"test\",kind=\"upstream\"}"
        )
        .unwrap()
            >= 1.0
    );
    assert!(sample(&m, "electrum_lb_client_received_bytes_total{coin=\"test\"}").unwrap() > 100.0);
    assert!(sample(&m, "electrum_lb_client_sent_bytes_total{coin=\"test\"}").unwrap() > 100.0);
    assert!(
        m.contains("process_resident_memory_bytes"),
        "process metrics are exported"
    );
    assert!(m.contains("process_open_fds"));

    // A notification fanned out is counted.
    mock.set_history(&scripthash(1), vec![(txid(9), 100)]);
    c.notification("blockchain.scripthash.subscribe").await;
    let (_, m) = http_get(server.metrics_addr, "/metrics").await;
    assert_eq!(
        sample(&m, "electrum_lb_notifications_total{coin=\"test\"}"),
        Some(1.0)
    );
    drop(c);
    wait_until(|| server.session_count() == 0).await;
    let (_, m) = http_get(server.metrics_addr, "/metrics").await;
    assert_eq!(
        sample(
            &m,
            "electrum_lb_sessions_open{coin=\"test\",transport=\"tcp\"}"
        ),
        Some(0.0)
    );
    check_with_promtool(&m);
    server.shutdown().await;
}

/// `promtool check metrics` where it is installed (.ci/run installs it).
fn check_with_promtool(metrics: &str) {
    use std::io::Write;
    let Ok(mut child) = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
    else {
        eprintln!("promtool not installed: skipping the exposition-format check");
        return;
    };
    child
        .stdin
        .take()
        .unwrap()
        .write_all(metrics.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test]
async fn random_method_names_leave_the_method_label_bounded() {
    let mock = Mock::start().await;
    let server = proxy_for(&[mock.url()]).await;
    let mut c = Client::connect(tcp_addr(&server, "test")).await;
    for i in 0..300 {
        let v = c
            .request(&format!("random.method.{i}.{}", i * 7919), json!([]))
            .await;
        assert_eq!(v["error"]["code"], -32601);
    }
    let (_, m) = http_get(server.metrics_addr, "/metrics").await;
    let methods: BTreeSet<String> = m
        .lines()
        .filter(|l| l.starts_with("electrum_lb_requests_total{"))
        .filter_map(|l| {
            l.split("method=\"")
                .nth(1)
                .and_then(|r| r.split('"').next())
                .map(str::to_string)
        })
        .collect();
    assert!(
        methods.len() <= electrum_lb::metrics::METHODS.len(),
        "{methods:?}"
    );
    assert!(methods.contains("other"));
    assert!(
        !methods.iter().any(|m| m.starts_with("random")),
        "{methods:?}"
    );
    server.shutdown().await;
}

#[tokio::test]
async fn readyz_follows_the_upstreams() {
    let mut mock = Mock::start().await;
    let server = proxy_for(&[mock.url()]).await;
    assert_eq!(http_get(server.metrics_addr, "/healthz").await.0, 200);
    let (status, body) = http_get(server.metrics_addr, "/readyz").await;
    assert_eq!((status, body.trim()), (200, "{\"ready\":true}"));
    mock.stop();
    wait_until(|| !server.coins["test"].router.pool.any_healthy()).await;
    let (status, body) = http_get(server.metrics_addr, "/readyz").await;
    assert_eq!(status, 503);
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["coins_without_upstream"], json!(["test"]));
    mock.restart().await;
    wait_until(|| server.coins["test"].router.pool.any_healthy()).await;
    assert_eq!(http_get(server.metrics_addr, "/readyz").await.0, 200);
    assert_eq!(http_get(server.metrics_addr, "/nope").await.0, 404);
    server.shutdown().await;
}

fn tempdir() -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "electrum-lb-ops-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A config whose TLS files live in `dir`.
fn config_in(dir: &Path, upstream: &str) -> String {
    format!(
        r#"
[metrics]
listen = "127.0.0.1:0"
[tls]
cert = "{d}/server.crt"
key = "{d}/server.key"
[server]
request_timeout_secs = 5
shutdown_grace_secs = 1
health_interval_ms = 100
[coins.test]
listen = ["tcp://127.0.0.1:0", "ssl://127.0.0.1:0"]
upstreams = ["{upstream}"]
"#,
        d = dir.display()
    )
}

/// The leaf certificate a TLS server presents.
async fn served_cert(addr: SocketAddr) -> Vec<u8> {
    let s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let tls = tls_connector()
        .connect("localhost".try_into().unwrap(), s)
        .await
        .unwrap();
    tls.get_ref().1.peer_certificates().unwrap()[0].to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_swaps_certificate_and_upstreams_without_dropping_sessions() {
    let dir = tempdir();
    let first = make_cert();
    first.write(&dir, "server");
    let a = Mock::start_with(MockOptions {
        seed: 3,
        ..Default::default()
    })
    .await;
    let b = Mock::start_with(MockOptions {
        seed: 3,
        ..Default::default()
    })
    .await;
    let text = config_in(&dir, &a.url());
    let server = start_proxy(&text).await;
    wait_ready(&server, "test").await;
    let ssl = ssl_addr(&server, "test");
    assert_eq!(served_cert(ssl).await, first.der);

    // An old session over TLS, subscribed to something.
    let mut old = Client::connect_tls(ssl).await;
    old.call("server.version", json!(["old", "1.4"])).await;
    old.call("blockchain.scripthash.subscribe", json!([scripthash(5)]))
        .await;

    // New certificate on disk, upstream a -> b.
    let second = make_cert();
    second.write(&dir, "server");
    let text = config_in(&dir, &b.url());
    let cfg = Config::parse(&text, "reload.toml").unwrap();
    let needs_restart = server.reload(cfg).unwrap();
    assert!(needs_restart.is_empty(), "{needs_restart:?}");
    assert_eq!(
        served_cert(ssl).await,
        second.der,
        "new handshakes get the new certificate"
    );

    // The old session goes on, now served by b; its subscription moved there.
    wait_until(|| b.subscriptions() == 1).await;
    b.reset_counts();
    old.call("blockchain.block.header", json!([2])).await;
    assert_eq!(b.count("blockchain.block.header"), 1);
    b.set_history(&scripthash(5), vec![(txid(1), 50)]);
    let n = old.notification("blockchain.scripthash.subscribe").await;
    assert_eq!(n[0], json!(scripthash(5)));
    // The old generation is closed after the grace period.
    wait_until(|| a.connections() == 0).await;

    // A broken configuration changes nothing.
    let broken = Config::parse(&config_in(&dir, "tcp://127.0.0.1:1"), "x.toml").unwrap();
    std::fs::write(dir.join("server.key"), "not a key").unwrap();
    assert!(server.reload(broken).unwrap_err().contains("server.key"));
    assert_eq!(served_cert(ssl).await, second.der);
    old.call("blockchain.block.header", json!([3])).await;
    assert_eq!(b.count("blockchain.block.header"), 2);
    server.shutdown().await;
}

/// Start the real binary on `config`; returns the child and its stderr lines.
fn spawn_binary(config: &Path) -> (std::process::Child, std::sync::mpsc::Receiver<String>) {
    spawn_binary_with(config, &[])
}

/// [`spawn_binary`] with more arguments.
fn spawn_binary_with(
    config: &Path,
    args: &[&str],
) -> (std::process::Child, std::sync::mpsc::Receiver<String>) {
    use std::io::BufRead;
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_electrum-lb"))
        .arg("--config")
        .arg(config)
        .args(args)
        .env("RUST_LOG", "info")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            // Strip ANSI colours.
            let mut clean = String::new();
            let mut skip = false;
            for ch in line.chars() {
                match (skip, ch) {
                    (_, '\u{1b}') => skip = true,
                    (true, 'm') => skip = false,
                    (true, _) => {}
                    (false, c) => clean.push(c),
                }
            }
            if tx.send(clean).is_err() {
                break;
            }
        }
    });
    (child, rx)
}

/// Wait until every needle has matched a log line, in any order (lines come
/// from different tasks); returns the matching lines in needle order.
fn wait_lines(rx: &std::sync::mpsc::Receiver<String>, needles: &[&str]) -> Vec<String> {
    let mut found: Vec<Option<String>> = vec![None; needles.len()];
    while found.iter().any(Option::is_none) {
        let line = rx
            .recv_timeout(WAIT)
            .unwrap_or_else(|_| panic!("no log lines with all of {needles:?} (found {found:?})"));
        for (i, n) in needles.iter().enumerate() {
            if found[i].is_none() && line.contains(n) {
                found[i] = Some(line.clone());
            }
        }
    }
    found.into_iter().flatten().collect()
}

/// Kills the child process when the test ends, even by a panic.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Wait for a log line containing `needle`.
fn wait_line(rx: &std::sync::mpsc::Receiver<String>, needle: &str) -> String {
    loop {
        let line = rx
            .recv_timeout(WAIT)
            .unwrap_or_else(|_| panic!("no log line with {needle:?}"));
        if line.contains(needle) {
            return line;
        }
    }
}

fn hup(child: &std::process::Child) {
    let ok = std::process::Command::new("kill")
        .args(["-HUP", &child.id().to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_the_certificate_and_a_broken_config_changes_nothing() {
    let dir = tempdir();
    let first = make_cert();
    first.write(&dir, "server");
    let mock = Mock::start().await;
    let path = dir.join("electrum-lb.toml");
    std::fs::write(&path, config_in(&dir, &mock.url())).unwrap();
    let (child, logs) = spawn_binary(&path);
    let child = KillOnDrop(child);
    let lines = wait_lines(&logs, &["listen=ssl://", "upstream connection up"]);
    let line = &lines[0];
    let ssl: SocketAddr = line
        .rsplit("ssl://")
        .next()
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert_eq!(served_cert(ssl).await, first.der);
    let mut old = Client::connect_tls(ssl).await;
    old.call("server.ping", json!([])).await;

    let second = make_cert();
    second.write(&dir, "server");
    hup(&child.0);
    wait_line(&logs, "configuration reloaded");
    assert_eq!(served_cert(ssl).await, second.der);
    old.call("blockchain.block.header", json!([1])).await;

    std::fs::write(&path, "[coins.test]\nlisten = 5\n").unwrap();
    hup(&child.0);
    let rejected = wait_line(&logs, "reload rejected");
    assert!(rejected.contains("electrum-lb.toml"), "{rejected}");
    assert_eq!(served_cert(ssl).await, second.der);
    old.call("blockchain.block.header", json!([2])).await;

    drop(child);
}

/// `--per-core`: two single-threaded runtimes. Connections are dealt out to
/// them in turn, each runtime holds an upstream connection of its own, and
/// a session's reads go to its runtime's connection: eight sessions of ten
/// reads each put exactly forty on each of the two connections (one
/// runtime would send all eighty to its one connection). SIGTERM stops
/// both runtimes cleanly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_core_runtimes_serve_their_sessions_from_their_own_connections() {
    let dir = tempdir();
    let mock = Mock::start().await;
    let path = dir.join("electrum-lb.toml");
    std::fs::write(
        &path,
        format!(
            "[server]\nshutdown_grace_secs = 1\n[coins.test]\nlisten = [\"tcp://127.0.0.1:0\"]\nupstreams = [\"{}\"]\n",
            mock.url()
        ),
    )
    .unwrap();
    let (child, logs) = spawn_binary_with(&path, &["--per-core", "--threads", "2"]);
    let mut child = KillOnDrop(child);
    // Listening, and both runtimes' upstream connections ready (a read
    // finds its runtime's connection ready, or goes to another).
    let mut listen = None;
    let mut per_core = false;
    let mut up = 0;
    while listen.is_none() || !per_core || up < 2 {
        let line = logs.recv_timeout(WAIT).expect("log lines");
        if line.contains("listen=tcp://") {
            listen = Some(line.clone());
        }
        per_core |= line.contains("per_core=true");
        up += usize::from(line.contains("upstream connection up"));
    }
    let addr: SocketAddr = listen
        .unwrap()
        .rsplit("tcp://")
        .next()
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let comm = |task: std::fs::DirEntry| std::fs::read_to_string(task.path().join("comm")).ok();
    let threads: Vec<String> = std::fs::read_dir(format!("/proc/{}/task", child.0.id()))
        .unwrap()
        .filter_map(|t| t.ok().and_then(comm))
        .collect();
    assert!(
        threads.iter().any(|t| t.trim() == "electrum-lb-1"),
        "the second runtime's thread: {threads:?}"
    );

    let before = mock.histories_by_connection();
    for s in 0..8usize {
        let mut c = Client::connect(addr).await;
        for k in 0..10usize {
            // Each scripthash read once: nothing is cached or subscribed.
            let v = c
                .call(
                    "blockchain.scripthash.get_history",
                    json!([scripthash(5000 + s * 10 + k)]),
                )
                .await;
            assert!(v.is_array(), "{v}");
        }
    }
    let after = mock.histories_by_connection();
    let mut served: Vec<u64> = after
        .iter()
        .enumerate()
        .map(|(i, n)| n - before.get(i).copied().unwrap_or(0))
        .filter(|n| *n > 0)
        .collect();
    served.sort();
    assert_eq!(served, vec![40, 40], "reads per upstream connection");

    let ok = std::process::Command::new("kill")
        .args(["-TERM", &child.0.id().to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok);
    let status = child.0.wait().unwrap();
    assert!(status.success(), "{status:?}");
}
