//! The upstream pool in front of upstreams that meter sessions like
//! ElectrumX (`support/mock_meter.rs`): connections grow while requests
//! queue and shrink after, never beyond the client sessions; a throttled
//! upstream loses its load, its "excessive resource usage" errors never
//! reach a wallet while another upstream can answer, and the throttled
//! state shows in /metrics and /status.json. Real proxy, real sockets.
mod support;

use serde_json::{json, Value};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use support::mock::meter::{Meter, MeterParams};
use support::mock::{Mock, MockOptions};
use support::*;

/// A config for coin `test`, cache off (the tests count what reaches each
/// upstream); `upstreams` are TOML values.
fn config(upstreams: &[String], server_extra: &str) -> String {
    let head = config_head();
    format!(
        r#"
{head}[server]
request_timeout_secs = 20
shutdown_grace_secs = 1
upstream_idle_close_secs = 1
{server_extra}
[cache]
enabled = false
[coins.test]
listen = ["tcp://127.0.0.1:0"]
upstreams = [{}]
"#,
        upstreams.join(", ")
    )
}

async fn metering_mock(params: MeterParams) -> (Mock, Arc<Meter>) {
    let meter = Meter::new(params);
    let mock = Mock::start_with(MockOptions {
        meter: Some(meter.clone()),
        ..MockOptions::default()
    })
    .await;
    (mock, meter)
}

/// A meter that never throttles: ElectrumX's concurrency of `concurrent`
/// per session, each request taking 20 ms.
fn roomy(concurrent: usize) -> MeterParams {
    MeterParams {
        soft: 1e12,
        hard: 2e12,
        initial_concurrent: concurrent,
        service: Duration::from_millis(20),
        ..MeterParams::default()
    }
}

/// Send `n` `get_history` requests (distinct scripthashes from `first`)
/// keeping `depth` in flight; return every answer.
async fn pipeline(c: &mut Client, first: usize, n: usize, depth: usize) -> Vec<Value> {
    let mut answers = Vec::with_capacity(n);
    let mut sent = 0;
    while answers.len() < n {
        while sent < n && sent - answers.len() < depth {
            c.send(&json!({"jsonrpc":"2.0","id":sent,"method":"blockchain.scripthash.get_history","params":[scripthash(first + sent)]}))
                .await;
            sent += 1;
        }
        answers.push(c.recv().await);
    }
    answers
}

/// `clients` wallets, each pipelining `n` reads `depth` deep; returns the
/// wallets (still connected) and every answer.
async fn load(
    addr: SocketAddr,
    clients: usize,
    n: usize,
    depth: usize,
) -> Vec<(Client, Vec<Value>)> {
    let mut tasks = Vec::new();
    for k in 0..clients {
        tasks.push(tokio::spawn(async move {
            let mut c = Client::connect(addr).await;
            let answers = pipeline(&mut c, k * 100_000, n, depth).await;
            (c, answers)
        }));
    }
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.unwrap());
    }
    out
}

fn assert_all_results(answers: &[Value]) {
    for a in answers {
        assert!(a.get("result").is_some(), "a wallet got {a}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_grow_while_requests_queue_and_shrink_after() {
    // Requests of 60 ms: the queue behind 4 at a time then adds about
    // 50 ms to a round's mean answer time, more than a busy machine's
    // noise allowance (twice the proxy's scheduling lag, see
    // upstream/limit.rs) takes away. With 20 ms requests, by the same
    // arithmetic, a lag above about 4.5 ms is enough for a full round at
    // 10 to read as unqueued (a loaded CI run saw one limit at 11).
    let (mock, meter) = metering_mock(MeterParams {
        service: Duration::from_millis(60),
        ..roomy(4)
    })
    .await;
    let up = upstream_toml(&mock.url(), "max_connections = 8");
    let server = start_proxy(&config(&[up], "health_interval_ms = 100")).await;
    wait_ready(&server, "test").await;
    assert_eq!(mock.connections(), 1);
    let addr = tcp_addr(&server, "test");
    let running = tokio::spawn(load(addr, 6, 150, 8));
    // 48 requests in flight, 4 served at a time per upstream session.
    wait_until(|| mock.connections() > 2).await;
    // Subscriptions made now stay on the connection that is always kept:
    // the extra ones are retired after the load, with nothing to move.
    let mut watcher = Client::connect(addr).await;
    watcher.call("server.version", json!(["w", "1.4"])).await;
    for i in 0..5 {
        watcher
            .call(
                "blockchain.scripthash.subscribe",
                json!([scripthash(900 + i)]),
            )
            .await;
    }
    let wallets = running.await.unwrap();
    for (_, answers) in &wallets {
        assert_all_results(answers);
    }
    assert!(
        meter.peak_sessions() <= 7,
        "{} upstream sessions for 7 client sessions",
        meter.peak_sessions()
    );
    // Each session serves 4 at a time: requests beyond that wait inside
    // the upstream, so the limits never grew past the 10 they start at
    // (and answer times alone take them no lower: see upstream/limit.rs).
    let st = &server.coins["test"].router.pool.status()[0];
    assert!(
        st.in_flight_limit <= 10 * st.connections,
        "limits {} over {} connections",
        st.in_flight_limit,
        st.connections
    );
    // The wallets stay connected and one keeps reading, a request at a
    // time: nothing queues, so the extra connections close although none
    // is ever idle for long.
    let mut wallets = wallets;
    let (mut reader, _) = wallets.pop().unwrap();
    let stop = tokio_util::sync::CancellationToken::new();
    let reading = tokio::spawn({
        let stop = stop.clone();
        async move {
            let mut n = 0;
            while !stop.is_cancelled() {
                assert_all_results(&pipeline(&mut reader, 500_000 + n * 10, 10, 1).await);
                n += 1;
            }
        }
    });
    wait_until(|| mock.connections() == 1).await;
    stop.cancel();
    reading.await.unwrap();
    assert_eq!(server.coins["test"].router.pool.status()[0].connections, 1);
    assert_eq!(mock.subscriptions(), 5);
    let (_, body) = http_get(server.metrics_addr, "/status.json").await;
    let snap: Value = serde_json::from_str(&body).unwrap();
    let moved: Vec<&Value> = snap["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["kind"] == "failover")
        .collect();
    assert!(moved.is_empty(), "subscriptions moved: {moved:?}");
    drop(watcher);
    drop(wallets);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn never_more_upstream_sessions_than_client_sessions() {
    let (mock, meter) = metering_mock(roomy(2)).await;
    let up = upstream_toml(&mock.url(), "max_connections = 16");
    let server = start_proxy(&config(&[up], "health_interval_ms = 100")).await;
    wait_ready(&server, "test").await;
    let addr = tcp_addr(&server, "test");
    // Two wallets with 32 requests in flight each: 16 connections would
    // be wanted at a concurrency of 2 (and 4 would already be more than
    // HAProxy opens for two wallets).
    let running = tokio::spawn(load(addr, 2, 200, 32));
    wait_until(|| mock.connections() == 2).await;
    let wallets = running.await.unwrap();
    for (_, answers) in &wallets {
        assert_all_results(answers);
    }
    assert_eq!(meter.peak_sessions(), 2, "upstream sessions for 2 wallets");
    // A third wallet (the two others still connected) raises the cap by one.
    let running = tokio::spawn(load(addr, 1, 400, 32));
    wait_until(|| mock.connections() == 3).await;
    assert_all_results(&running.await.unwrap()[0].1);
    assert_eq!(meter.peak_sessions(), 3, "upstream sessions for 3 wallets");
    drop(wallets);
    server.shutdown().await;
}

/// Poll `/status.json` until upstream `url` is in `state`.
async fn wait_state(server: &electrum_lb::Server, url: &str, state: &str) -> Value {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let (code, body) = http_get(server.metrics_addr, "/status.json").await;
        assert_eq!(code, 200);
        let snap: Value = serde_json::from_str(&body).unwrap();
        let up = snap["coins"][0]["upstreams"]
            .as_array()
            .unwrap()
            .iter()
            .find(|u| u["url"] == json!(url))
            .cloned()
            .unwrap();
        if up["state"] == json!(state) {
            return snap;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{url} never {state}: {up}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_throttling_upstream_loses_its_load_and_its_errors_never_reach_a_wallet() {
    // A: fast, with a small budget (the hard limit at about 40 requests'
    // cost, slow decay, next to no sleeps to slow it down first): it
    // answers -101 and closes the session, like ElectrumX past
    // COST_HARD_LIMIT. B: slower, with room to spare.
    let (a, a_meter) = metering_mock(MeterParams {
        soft: 40.0,
        hard: 50.0,
        decay_per_sec: 0.5,
        request_sleep: Duration::from_millis(1),
        service: Duration::from_millis(1),
        ..MeterParams::default()
    })
    .await;
    let (b, _) = metering_mock(MeterParams {
        service: Duration::from_millis(5),
        ..roomy(10)
    })
    .await;
    let ups = [format!("{:?}", a.url()), format!("{:?}", b.url())];
    let server = start_proxy(&config(&ups, "")).await;
    let pool = &server.coins["test"].router.pool;
    wait_until(|| pool.status().iter().all(|u| u.ready_connections > 0)).await;
    let addr = tcp_addr(&server, "test");

    // Enough reads that A's sessions pass their hard limit.
    let wallets = load(addr, 4, 150, 4).await;
    assert!(a_meter.refused() > 0, "A never reached its hard limit");
    for (_, answers) in &wallets {
        assert_all_results(answers);
    }

    // Visible: status, metrics, the event log.
    let snap = wait_state(&server, &a.url(), "throttled").await;
    let events = snap["events"].as_array().unwrap();
    assert!(
        events
            .iter()
            .any(|e| e["kind"] == "upstream_throttled" && e["upstream"] == json!(a.url())),
        "{events:?}"
    );
    let (_, metrics) = http_get(server.metrics_addr, "/metrics").await;
    let labels = format!("{{coin=\"test\",upstream=\"{}\"", a.url());
    assert_eq!(
        sample(
            &metrics,
            &format!("electrum_lb_upstream_throttled{labels}}}")
        ),
        Some(1.0),
        "{metrics}"
    );
    let refusals = sample(
        &metrics,
        &format!(
            "electrum_lb_upstream_throttle_signals_total{{coin=\"test\",kind=\"excessive_resource_usage\",upstream=\"{}\"}}",
            a.url()
        ),
    )
    .unwrap_or(0.0);
    assert!(refusals >= 1.0, "{metrics}");
    assert_eq!(
        sample(
            &metrics,
            &format!(
                "electrum_lb_upstream_throttled{{coin=\"test\",upstream=\"{}\"}}",
                b.url()
            )
        ),
        Some(0.0)
    );

    // While it is throttled, new reads go to B, which has room.
    a.reset_counts();
    b.reset_counts();
    let (mut c, _) = wallets.into_iter().next().unwrap();
    let answers = pipeline(&mut c, 900_000, 40, 1).await;
    assert_all_results(&answers);
    let on_a = a.count("blockchain.scripthash.get_history");
    let on_b = b.count("blockchain.scripthash.get_history");
    assert_eq!(on_a + on_b, 40);
    assert_eq!(on_a, 0, "a throttled upstream got {on_a} of 40 reads");
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_that_slows_alone_is_throttled_and_gets_less() {
    // Two fast upstreams; then A's answers take 2 s (a server sleeping its
    // requests, as ElectrumX does well past its soft limit) and B's do not.
    let a = Mock::start().await;
    let b = Mock::start().await;
    let ups = [format!("{:?}", a.url()), format!("{:?}", b.url())];
    let server = start_proxy(&config(&ups, "health_interval_ms = 100")).await;
    let pool = &server.coins["test"].router.pool;
    wait_until(|| pool.status().iter().all(|u| u.ready_connections > 0)).await;
    let mut wallet = Client::connect(tcp_addr(&server, "test")).await;
    assert_all_results(&pipeline(&mut wallet, 0, 200, 8).await);
    assert!(!pool.status()[0].throttled);
    a.set_delay(Duration::from_secs(2));
    let mut n = 1;
    while !pool.status()[0].throttled {
        assert_all_results(&pipeline(&mut wallet, n * 1000, 50, 8).await);
        n += 1;
        assert!(n < 500, "A never judged slow");
    }
    let status = pool.status();
    assert!(status[0].throttle_reason.starts_with("slow"), "{status:?}");
    assert!(!status[1].throttled);
    let (_, metrics) = http_get(server.metrics_addr, "/metrics").await;
    let slow = format!(
        "electrum_lb_upstream_throttle_signals_total{{coin=\"test\",kind=\"slow\",upstream=\"{}\"}}",
        a.url()
    );
    assert!(sample(&metrics, &slow).unwrap_or(0.0) >= 1.0, "{metrics}");
    // B has room: it takes the reads.
    a.reset_counts();
    b.reset_counts();
    assert_all_results(&pipeline(&mut wallet, 900_000, 20, 1).await);
    let on_a = a.count("blockchain.scripthash.get_history");
    let on_b = b.count("blockchain.scripthash.get_history");
    assert!(on_b > on_a, "A {on_a} B {on_b}");
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_back_in_rotation_gets_its_share_of_the_connections() {
    // Two equal upstreams, each serving 2 requests at a time per session.
    let (a, _) = metering_mock(roomy(2)).await;
    let (mut b, _) = metering_mock(roomy(2)).await;
    let ups = [
        upstream_toml(&a.url(), "max_connections = 8"),
        upstream_toml(&b.url(), "max_connections = 8"),
    ];
    let server = start_proxy(&config(
        &ups,
        "health_interval_ms = 100\nupstream_reconnect_max_ms = 200",
    ))
    .await;
    let pool = &server.coins["test"].router.pool;
    wait_until(|| pool.status().iter().all(|u| u.ready_connections > 0)).await;
    // B goes away and out of rotation: A alone takes all 8 wallets' load
    // and grows to the cap, one connection per wallet.
    b.stop();
    wait_until(|| !pool.status()[1].healthy).await;
    let addr = tcp_addr(&server, "test");
    let stop = tokio_util::sync::CancellationToken::new();
    let mut wallets = Vec::new();
    for k in 0..8 {
        let stop = stop.clone();
        wallets.push(tokio::spawn(async move {
            let mut c = Client::connect(addr).await;
            let mut round = 0;
            while !stop.is_cancelled() {
                let answers = pipeline(&mut c, k * 1_000_000 + round * 100, 64, 16).await;
                assert_all_results(&answers);
                round += 1;
            }
        }));
    }
    wait_until(|| a.connections() == 8).await;
    // B comes back: its one connection queues while the cap is reached, so
    // A's extra connections are retired, one at a time, until each has its
    // half of the cap.
    b.restart().await;
    wait_until(|| pool.status()[1].healthy).await;
    wait_until(|| b.connections() == 4 && a.connections() == 4).await;
    stop.cancel();
    for w in wallets {
        w.await.unwrap();
    }
    assert!(
        pool.status().iter().map(|u| u.connections).sum::<usize>() <= 8,
        "{:?}",
        pool.status()
    );
    server.shutdown().await;
}
