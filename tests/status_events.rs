//! The recent events `/status.json` (and the page) show: recorded where
//! things happen (health flips, lost connections, failovers, held
//! statuses, reloads, limit refusals), with times, and merged when they
//! repeat.
mod support;

use serde_json::{json, Value};
use support::mock::{status_of, Mock};
use support::*;

/// `/status.json` now.
async fn status(server: &electrum_lb::Server) -> Value {
    let (code, body) = http_get(server.metrics_addr, "/status.json").await;
    assert_eq!(code, 200, "{body}");
    serde_json::from_str(&body).unwrap()
}

/// The events of `kind` in a snapshot.
fn events<'a>(snap: &'a Value, kind: &str) -> Vec<&'a Value> {
    snap["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["kind"] == kind)
        .collect()
}

/// Wait until `/status.json` shows an event of `kind`; return it.
async fn wait_event(server: &electrum_lb::Server, kind: &str) -> Value {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let snap = status(server).await;
        if let Some(e) = events(&snap, kind).first() {
            return (*e).clone();
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no {kind} event: {}",
            snap["events"]
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failover_shows_the_lost_upstream_the_move_and_the_held_status() {
    let started = electrum_lb::status::events::now_ms();
    let (a, b) = (Mock::start().await, Mock::start().await);
    let sh = scripthash(0);
    let h0 = vec![(txid(1), 10)];
    let h1 = vec![(txid(1), 10), (txid(2), 0)];
    a.set_history_silently(&sh, h0.clone());
    b.set_history_silently(&sh, h0.clone());
    let text = config_multi(
        "health_interval_ms = 50\nfailover_hold_ms = 200",
        &[(
            "test",
            vec![format!("{:?}", a.url()), format!("{:?}", b.url())],
            "",
        )],
    );
    let server = start_proxy(&text).await;
    wait_until(|| {
        server.upstreams()["test"]
            .iter()
            .all(|u| u.ready_connections > 0)
    })
    .await;
    let (mut wallet, s0) = subscribed_wallet(tcp_addr(&server, "test"), &sh).await;
    assert_eq!(s0, json!(status_of(&h0)));
    let (holder, other) = if a.subscriptions() == 1 {
        (a, b)
    } else {
        (b, a)
    };
    // A payment only the holder has seen; then the holder goes away.
    holder.set_history(&sh, h1.clone());
    assert_eq!(
        wallet.notification("blockchain.scripthash.subscribe").await[1],
        json!(status_of(&h1))
    );
    holder.stop();

    let moved = wait_event(&server, "failover").await;
    assert_eq!(moved["coin"], "test");
    assert_eq!(moved["upstream"], json!(holder.url()));
    assert!(
        moved["message"]
            .as_str()
            .unwrap()
            .contains("subscriptions moved"),
        "{moved}"
    );
    let held = wait_event(&server, "status_held").await;
    assert_eq!(held["count"], 1, "{held}");
    // The other upstream never catches up: after the hold, its status is
    // announced, and that is an event too.
    let announced = wait_event(&server, "hold_announced").await;
    assert_eq!(
        wallet.notification("blockchain.scripthash.subscribe").await[1],
        json!(status_of(&h0))
    );
    let lost = wait_event(&server, "connection_lost").await;
    assert_eq!(lost["upstream"], json!(holder.url()));
    let down = wait_event(&server, "upstream_down").await;
    assert_eq!(down["upstream"], json!(holder.url()));
    assert_eq!(down["message"], "out of rotation: no connection");

    // Times: within the test, in order; the newest first.
    let now = electrum_lb::status::events::now_ms();
    for e in [&moved, &held, &announced, &lost, &down] {
        let (first, last) = (
            e["first_ms"].as_u64().unwrap(),
            e["last_ms"].as_u64().unwrap(),
        );
        assert!(started <= first && first <= last && last <= now, "{e}");
    }
    let snap = status(&server).await;
    let times: Vec<u64> = snap["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["last_ms"].as_u64().unwrap())
        .collect();
    assert!(times.windows(2).all(|w| w[0] >= w[1]), "{times:?}");
    // The holder's record: its failures and the last one's reason.
    let ups = snap["coins"][0]["upstreams"].as_array().unwrap();
    let gone = ups
        .iter()
        .find(|u| u["url"] == json!(holder.url()))
        .unwrap();
    assert_eq!(gone["state"], "down");
    assert!(gone["failures"].as_u64().unwrap() >= 1, "{gone}");
    assert!(gone["last_failure"]["at_ms"].as_u64().unwrap() >= started);
    let kept = ups.iter().find(|u| u["url"] == json!(other.url())).unwrap();
    assert_eq!(
        (kept["state"].as_str(), kept["failures"].as_u64()),
        (Some("up"), Some(0))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_by_limits_are_summed_into_one_event() {
    let mock = Mock::start().await;
    let text = config_multi(
        "max_batch = 2",
        &[("test", vec![format!("{:?}", mock.url())], "")],
    );
    let server = start_proxy(&text).await;
    wait_ready(&server, "test").await;
    let mut c = Client::connect(tcp_addr(&server, "test")).await;
    let batch = json!([
        {"id": 1, "method": "server.ping"},
        {"id": 2, "method": "server.ping"},
        {"id": 3, "method": "server.ping"},
    ]);
    c.send(&batch).await;
    assert_eq!(c.recv().await["error"]["code"], -32600);
    let e = wait_event(&server, "refusals").await;
    assert_eq!(e["message"], "batches refused: over max_batch");
    assert_eq!(
        (e["coin"].as_str(), e["count"].as_u64()),
        (Some("test"), Some(1))
    );
    for _ in 0..2 {
        c.send(&batch).await;
        assert_eq!(c.recv().await["error"]["code"], -32600);
    }
    // Counted on the same entry, not three entries.
    let snap = status(&server).await;
    let refusals = events(&snap, "refusals");
    assert_eq!(refusals.len(), 1, "{}", snap["events"]);
    assert_eq!(refusals[0]["count"], 3);
    assert!(refusals[0]["last_ms"].as_u64() >= refusals[0]["first_ms"].as_u64());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reloads_applied_and_rejected_are_events() {
    let mock = Mock::start().await;
    let text = config_multi("", &[("test", vec![format!("{:?}", mock.url())], "")]);
    let server = start_proxy(&text).await;
    let changed = text.replace("request_timeout_secs = 5", "request_timeout_secs = 6");
    assert_ne!(changed, text);
    let config = electrum_lb::Config::parse(&changed, "test.toml").unwrap();
    server.reload(config).unwrap();
    let e = wait_event(&server, "reload").await;
    assert_eq!(e["message"], "configuration reloaded");
    assert_eq!(e["coin"], Value::Null);

    let dir = temp_dir("reload-event");
    let path = dir.join("broken.toml");
    std::fs::write(&path, "[coins.test]\nlisten = 5\n").unwrap();
    assert!(server.reload_file(&path).is_err());
    let e = wait_event(&server, "reload_rejected").await;
    let message = e["message"].as_str().unwrap();
    assert!(message.starts_with("reload rejected: "), "{message}");
    assert!(message.contains("broken.toml"), "{message}");
}
