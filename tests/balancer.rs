//! Several electrum-lb instances as operators run them: real processes
//! (the binary cargo built) behind a real HAProxy running the shipped
//! configuration (deploy/haproxy/haproxy.cfg), wallet-like sessions from
//! distinct loopback addresses, and the mock ElectrumX upstream.
//!
//! - Rolling restart: each instance in turn gets SIGTERM and is started
//!   again under load. No request fails, every cut session reconnects
//!   through HAProxy and learns the payments made meanwhile, and the
//!   per-network session limit applies to the wallet's address that
//!   HAProxy passed on (PROXY v2), not to HAProxy's.
//! - In-place upgrade on one host: a new process takes the listening
//!   sockets over (`--takeover`) twice, under load: no connection refused,
//!   no request lost.
//!
//! Each prints its figures (README: "Running several instances").

mod support;

mod balancer {
    pub mod procs;
    pub mod wallet;
}

use balancer::procs::{check_config, reserve, HaProxy, Instance, Reserved};
use balancer::wallet::{Truth, Wallet};
use serde_json::{json, Value};
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use support::mock::Mock;
use support::*;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio_util::sync::CancellationToken;

/// The ports of one instance, held for the whole test.
struct Ports {
    tcp: Reserved,
    ssl: Reserved,
    metrics: Reserved,
}

fn ports() -> Ports {
    Ports {
        tcp: reserve(),
        ssl: reserve(),
        metrics: reserve(),
    }
}

/// An instance behind HAProxy, as deploy/haproxy/electrum-lb.toml has it
/// (PROXY v2 listeners, a drain notice longer than HAProxy's detection),
/// with a session limit of 2 per /24 that loopback is not exempt from.
fn instance_config(p: &Ports, mock: &Mock) -> String {
    let root = env!("CARGO_MANIFEST_DIR");
    format!(
        r#"
[metrics]
listen = "{m}"

[tls]
cert = "{root}/certs/server.crt"
key = "{root}/certs/server.key"

[server]
request_timeout_secs = 5
upstream_stall_secs = 2
drain_notice_secs = 1
shutdown_grace_secs = 5

[limits]
exempt = []
max_sessions_per_group = 2

[coins.test]
listen = [{{ url = "tcp://{t}", proxy_protocol = true }}, {{ url = "ssl://{s}", proxy_protocol = true }}]
upstreams = ["{u}"]
"#,
        m = p.metrics.addr,
        t = p.tcp.addr,
        s = p.ssl.addr,
        u = mock.url(),
    )
}

/// The test's `listen` sections: the shipped form, loopback addresses.
fn sections(front_tcp: SocketAddr, front_ssl: SocketAddr, a: &Ports, b: &Ports) -> String {
    let server = |name: &str, addr: SocketAddr, p: &Ports| {
        format!(
            "    server {name} {addr} check port {}\n",
            p.metrics.addr.port()
        )
    };
    format!(
        "\nlisten test-tcp\n    bind {front_tcp}\n{}{}\nlisten test-ssl\n    bind {front_ssl}\n{}{}",
        server("a", a.tcp.addr, a),
        server("b", b.tcp.addr, b),
        server("a", a.ssl.addr, a),
        server("b", b.ssl.addr, b),
    )
}

/// Wait until `cond` holds (fails with `what` after `within`).
async fn wait_for(what: &str, within: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + within;
    while !cond() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: not within {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn total(wallets: &[Arc<Wallet>], f: impl Fn(&Wallet) -> &AtomicU64) -> u64 {
    wallets.iter().map(|w| f(w).load(Ordering::SeqCst)).sum()
}

fn failures(wallets: &[Arc<Wallet>]) -> Vec<String> {
    wallets
        .iter()
        .flat_map(|w| w.failures.lock().unwrap().clone())
        .collect()
}

/// Until every wallet is connected and knows its scripthash's current
/// status and the tip.
async fn all_know(wallets: &[Arc<Wallet>], truth: &Truth, what: &str) {
    let tip = truth.mock.tip().0;
    let deadline = tokio::time::Instant::now() + WAIT;
    while !wallets.iter().all(|w| w.knows(&truth.current(&w.sh), tip)) {
        if tokio::time::Instant::now() > deadline {
            let behind: Vec<String> = wallets
                .iter()
                .filter(|w| !w.knows(&truth.current(&w.sh), tip))
                .map(|w| {
                    format!(
                        "{}: connected {}, status {:?} (now {:?}), tip {} (now {tip}), {:?}",
                        w.source,
                        w.connected.load(Ordering::SeqCst),
                        w.status.lock().unwrap(),
                        truth.current(&w.sh),
                        w.tip.load(Ordering::SeqCst),
                        w.counters,
                    )
                })
                .collect();
            panic!("{what}: not within {WAIT:?}: {behind:#?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Open sessions from three addresses of one /24 through `front`: with a
/// limit of 2 per network and one instance in rotation, two are served and
/// the third is refused with an error naming the wallets' network.
async fn crowd(front: SocketAddr) -> Vec<Value> {
    let mut held = Vec::new();
    let mut answers = Vec::new();
    for host in 1..=3u8 {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket
            .bind(SocketAddr::from((Ipv4Addr::new(127, 20, 0, host), 0)))
            .unwrap();
        let stream = socket.connect(front).await.unwrap();
        let (rd, mut wr) = stream.into_split();
        wr.write_all(b"{\"id\":1,\"method\":\"server.version\",\"params\":[\"crowd\",\"1.4\"]}\n")
            .await
            .unwrap();
        let mut line = String::new();
        let mut rd = BufReader::new(rd);
        tokio::time::timeout(WAIT, rd.read_line(&mut line))
            .await
            .unwrap()
            .unwrap();
        answers.push(serde_json::from_str(&line).unwrap());
        held.push((rd, wr));
    }
    answers
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rolling_restart_behind_haproxy_fails_no_request_and_misses_no_payment() {
    let Some(haproxy) = require_tool("haproxy") else {
        return;
    };
    let started = Instant::now();
    let dir = temp_dir("balancer");
    // The shipped configuration itself is valid.
    let (ok, out) = check_config(
        &haproxy,
        std::path::Path::new(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/deploy/haproxy/haproxy.cfg"
        )),
    );
    assert!(ok, "{out}");

    let mock = Arc::new(Mock::start().await);
    let truth = Arc::new(Truth::new(mock.clone()));
    let (a, b) = (ports(), ports());
    let mut instances = [
        Instance::spawn("a", &dir, &instance_config(&a, &mock), a.metrics.addr),
        Instance::spawn("b", &dir, &instance_config(&b, &mock), b.metrics.addr),
    ];
    for i in instances.iter_mut() {
        i.wait_ready().await;
    }
    let (front_tcp, front_ssl) = (reserve(), reserve());
    let ha = HaProxy::start(
        &haproxy,
        &dir,
        &sections(front_tcp.addr, front_ssl.addr, &a, &b),
        front_tcp.addr,
    )
    .await;
    let servers = |name: &'static str| [("test-tcp", name), ("test-ssl", name)];
    ha.wait_status(&[servers("a"), servers("b")].concat(), "UP")
        .await;

    // Ten wallets, each from its own /24, half of them over TLS (passed
    // through HAProxy to electrum-lb).
    let stop = CancellationToken::new();
    let wallets: Vec<Arc<Wallet>> = (0..10u8)
        .map(|i| {
            let sh = scripthash(i as usize);
            truth.watch(&sh);
            let (front, tls) = if i % 2 == 0 {
                (front_tcp.addr, false)
            } else {
                (front_ssl.addr, true)
            };
            Wallet::new(Ipv4Addr::new(127, 10, i, 1), front, tls, sh, truth.clone())
        })
        .collect();
    let tasks: Vec<_> = wallets
        .iter()
        .map(|w| tokio::spawn(w.clone().run(stop.clone())))
        .collect();
    all_know(&wallets, &truth, "wallets connected").await;
    let mut payment = 1000;
    let mut report = Vec::new();

    for (round, name) in ["a", "b"].into_iter().enumerate() {
        let cut_before: Vec<u64> = wallets
            .iter()
            .map(|w| w.counters.cut.load(Ordering::SeqCst))
            .collect();
        let answered_before = total(&wallets, |w| &w.counters.answered);
        let t = Instant::now();
        instances[round].term();
        // A payment while the instance is draining (its sessions are still
        // served and notified) ...
        for w in &wallets {
            payment += 1;
            truth.pay_next(&w.sh, payment);
        }
        ha.wait_status(&servers(name), "DOWN").await;
        let out_of_rotation = t.elapsed();
        let status = instances[round].wait_exit(WAIT).await;
        assert!(status.success(), "{name} exited with {status}");
        let stopped = t.elapsed();
        // ... and a block and another payment while it is gone: the cut
        // sessions are on the other instance by now, or reconnecting.
        mock.mine(1);
        for w in &wallets {
            payment += 1;
            truth.pay_next(&w.sh, payment);
        }
        if round == 0 {
            // One instance in rotation: the limit of 2 sessions per /24
            // counts the wallets' network, which HAProxy passed on.
            let answers = crowd(front_tcp.addr).await;
            assert_eq!(answers[0]["result"][1], "1.4", "{answers:?}");
            assert_eq!(answers[1]["result"][1], "1.4", "{answers:?}");
            let refused = answers[2]["error"]["message"].as_str().unwrap_or_default();
            assert!(refused.contains("127.20.0.0/24"), "{answers:?}");
        }
        instances[round].start(&[]);
        instances[round].wait_ready().await;
        ha.wait_status(&servers(name), "UP").await;
        all_know(
            &wallets,
            &truth,
            "every wallet knows the payments and the block",
        )
        .await;
        let cut: Vec<usize> = (0..wallets.len())
            .filter(|&i| wallets[i].counters.cut.load(Ordering::SeqCst) > cut_before[i])
            .collect();
        assert!(!cut.is_empty(), "restarting {name} cut no session");
        report.push(format!(
            "restart {name}: out of HAProxy's rotation {:.2} s after SIGTERM, exited after {:.2} s, {} sessions cut and resumed, {} requests answered meanwhile",
            out_of_rotation.as_secs_f64(),
            stopped.as_secs_f64(),
            cut.len(),
            total(&wallets, |w| &w.counters.answered) - answered_before,
        ));
    }
    stop.cancel();
    for t in tasks {
        t.await.unwrap();
    }
    let fails = failures(&wallets);
    let c = |f: fn(&Wallet) -> &AtomicU64| total(&wallets, f);
    eprintln!(
        "rolling restart of 2 instances behind HAProxy, {} wallets: {} requests answered, {} failed, {} re-sent after a cut, {} sessions ({} cut by a drain), {} notifications; {:.1} s",
        wallets.len(),
        c(|w| &w.counters.answered),
        c(|w| &w.counters.failed),
        c(|w| &w.counters.resent),
        c(|w| &w.counters.sessions),
        c(|w| &w.counters.cut),
        c(|w| &w.counters.notifications),
        started.elapsed().as_secs_f64()
    );
    for line in &report {
        eprintln!("  {line}");
    }
    assert!(fails.is_empty(), "failed requests: {fails:#?}");
    for i in instances.iter_mut() {
        i.term();
        assert!(i.wait_exit(WAIT).await.success());
    }
}

/// Connections opened one after another from one address, each asking two
/// things in one write and closing once both are answered.
#[derive(Default)]
struct Connector {
    connections: AtomicU64,
    answered: AtomicU64,
    failed: AtomicU64,
    failures: std::sync::Mutex<Vec<String>>,
}

impl Connector {
    fn fail(&self, what: String) {
        self.failed.fetch_add(1, Ordering::SeqCst);
        self.failures.lock().unwrap().push(what);
    }

    async fn run(
        self: Arc<Self>,
        source: Ipv4Addr,
        target: SocketAddr,
        mock: Arc<Mock>,
        stop: CancellationToken,
    ) {
        let mut n = 0u64;
        while !stop.is_cancelled() {
            n += 1;
            let h = (n % 100) as usize;
            match self.once(source, target, h).await {
                Ok(answers) => {
                    self.connections.fetch_add(1, Ordering::SeqCst);
                    let ok = answers.len() == 2
                        && answers[0]["result"][1] == "1.4"
                        && answers[1]["result"] == json!(mock.header_hex(h));
                    if ok {
                        self.answered.fetch_add(2, Ordering::SeqCst);
                    } else {
                        self.fail(format!("wrong answers {answers:?}"));
                    }
                }
                Err(e) => self.fail(e),
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    async fn once(
        &self,
        source: Ipv4Addr,
        target: SocketAddr,
        h: usize,
    ) -> Result<Vec<Value>, String> {
        let socket = tokio::net::TcpSocket::new_v4().map_err(|e| e.to_string())?;
        socket
            .bind(SocketAddr::from((source, 0)))
            .map_err(|e| e.to_string())?;
        let stream = socket
            .connect(target)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let (rd, mut wr) = stream.into_split();
        let ask = format!(
            "{{\"id\":1,\"method\":\"server.version\",\"params\":[\"c\",\"1.4\"]}}\n{{\"id\":2,\"method\":\"blockchain.block.header\",\"params\":[{h}]}}\n"
        );
        wr.write_all(ask.as_bytes())
            .await
            .map_err(|e| format!("write: {e}"))?;
        let mut rd = BufReader::new(rd);
        let mut answers: Vec<Value> = Vec::new();
        while answers.len() < 2 {
            let mut line = String::new();
            let n = tokio::time::timeout(WAIT, rd.read_line(&mut line))
                .await
                .map_err(|_| "no answer in time".to_string())?
                .map_err(|e| format!("read: {e}"))?;
            if n == 0 {
                return Err(format!("closed after {} of 2 answers", answers.len()));
            }
            answers.push(serde_json::from_str(&line).map_err(|e| e.to_string())?);
        }
        answers.sort_by_key(|v| v["id"].as_u64());
        Ok(answers)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_place_upgrade_refuses_no_connection_and_loses_no_request() {
    let started = Instant::now();
    let dir = temp_dir("upgrade");
    let mock = Arc::new(Mock::start().await);
    let truth = Arc::new(Truth::new(mock.clone()));
    let (tcp, metrics) = (reserve(), reserve());
    let root = env!("CARGO_MANIFEST_DIR");
    let config = format!(
        r#"
[metrics]
listen = "{m}"

[tls]
cert = "{root}/certs/server.crt"
key = "{root}/certs/server.key"

[server]
request_timeout_secs = 5
upstream_stall_secs = 2
shutdown_grace_secs = 5
handoff_socket = "{sock}"

[coins.test]
listen = ["tcp://{t}"]
upstreams = ["{u}"]
"#,
        m = metrics.addr,
        t = tcp.addr,
        u = mock.url(),
        sock = dir.join("handoff.sock").display(),
    );
    let mut current = Instance::spawn("u1", &dir, &config, metrics.addr);
    current.wait_ready().await;

    let stop = CancellationToken::new();
    let wallets: Vec<Arc<Wallet>> = (0..6u8)
        .map(|i| {
            let sh = scripthash(100 + i as usize);
            truth.watch(&sh);
            Wallet::new(
                Ipv4Addr::new(127, 30, i, 1),
                tcp.addr,
                false,
                sh,
                truth.clone(),
            )
        })
        .collect();
    let mut tasks: Vec<_> = wallets
        .iter()
        .map(|w| tokio::spawn(w.clone().run(stop.clone())))
        .collect();
    // Four connectors: new connections arrive all the time, some of them
    // while the sockets change hands.
    let connector = Arc::new(Connector::default());
    for i in 1..=4 {
        tasks.push(tokio::spawn(connector.clone().run(
            Ipv4Addr::new(127, 31, 0, i),
            tcp.addr,
            mock.clone(),
            stop.clone(),
        )));
    }
    all_know(&wallets, &truth, "wallets connected").await;
    wait_for("the connector runs", WAIT, || {
        connector.connections.load(Ordering::SeqCst) > 10
    })
    .await;

    let mut report = Vec::new();
    let mut payment = 2000;
    for round in 2..=5 {
        let before = connector.connections.load(Ordering::SeqCst);
        let t = Instant::now();
        let mut next = current.successor(&format!("u{round}"), &["--takeover"]);
        // A payment while the processes change hands.
        for w in &wallets {
            payment += 1;
            truth.pay_next(&w.sh, payment);
        }
        let status = current.wait_exit(WAIT).await;
        assert!(status.success(), "{} exited with {status}", current.name);
        let handed = t.elapsed();
        assert!(current.log_text().contains("listeners handed over"));
        next.wait_ready().await;
        assert!(
            next.log_text().contains("took the listening sockets over"),
            "{}",
            next.log_text()
        );
        all_know(&wallets, &truth, "every wallet knows the payment").await;
        let during = connector.connections.load(Ordering::SeqCst) - before;
        report.push(format!(
            "upgrade to {}: the old process exited {:.2} s after the new one started; {during} new connections meanwhile",
            next.name,
            handed.as_secs_f64(),
        ));
        current = next;
    }
    stop.cancel();
    for t in tasks {
        t.await.unwrap();
    }
    let c = |f: fn(&Wallet) -> &AtomicU64| total(&wallets, f);
    eprintln!(
        "in-place upgrade 4 times under load: {} wallets answered {} requests ({} failed, {} re-sent after a cut, {} sessions cut); {} connections answered {} requests ({} failed); {:.1} s",
        wallets.len(),
        c(|w| &w.counters.answered),
        c(|w| &w.counters.failed),
        c(|w| &w.counters.resent),
        c(|w| &w.counters.cut),
        connector.connections.load(Ordering::SeqCst),
        connector.answered.load(Ordering::SeqCst),
        connector.failed.load(Ordering::SeqCst),
        started.elapsed().as_secs_f64()
    );
    for line in &report {
        eprintln!("  {line}");
    }
    let conn_failures = connector.failures.lock().unwrap().clone();
    assert!(conn_failures.is_empty(), "connections: {conn_failures:#?}");
    let fails = failures(&wallets);
    assert!(fails.is_empty(), "wallets: {fails:#?}");
    assert!(c(|w| &w.counters.cut) > 0, "the upgrades moved no session");
    current.term();
    assert!(current.wait_exit(WAIT).await.success());
}
