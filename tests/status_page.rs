//! The status page and `/status.json`: what an operator sees in a browser,
//! read from the page Chromium renders, and checked against `/metrics`.
mod support;

use electrum_lb::Server;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;
use support::mock::{Mock, MockOptions};
use support::*;

/// Health judged every 50 ms: an upstream leaves rotation in 100 ms.
const FAST_HEALTH: &str = "health_interval_ms = 50\nupstream_reconnect_max_ms = 200";

/// Coin `test`: a proxy in front of two mock upstreams, the second stopped
/// and judged down; wallets: two over TCP (one subscribed), one over TLS.
/// Coin `other`: two upstreams on one chain, one of them 5 blocks behind
/// the other (more than `max_lag`), judged lagging.
struct Scene {
    up: Mock,
    down: Mock,
    ahead: Mock,
    behind: Mock,
    server: Server,
    _wallets: Vec<Client>,
}

/// The snapshot's state of one upstream.
fn state_of(server: &Server, coin: &str, url: &str) -> Option<String> {
    let snap = server.admin.status.snapshot();
    let c = snap.coins.iter().find(|c| c.name == coin)?;
    let u = c.upstreams.iter().find(|u| u.url == url)?;
    Some(serde_json::to_value(u.state).unwrap().as_str()?.to_string())
}

async fn scene() -> Scene {
    let up = Mock::start().await;
    let down = Mock::start().await;
    let same_chain = MockOptions {
        seed: 7,
        ..MockOptions::default()
    };
    let ahead = Mock::start_with(same_chain.clone()).await;
    let behind = Mock::start_with(same_chain).await;
    let text = config_multi(
        FAST_HEALTH,
        &[
            (
                "test",
                vec![format!("{:?}", up.url()), format!("{:?}", down.url())],
                "",
            ),
            (
                "other",
                vec![format!("{:?}", ahead.url()), format!("{:?}", behind.url())],
                "",
            ),
        ],
    );
    let server = start_proxy(&text).await;
    wait_until(|| {
        let all = server.upstreams();
        all.values().flatten().all(|u| u.healthy)
    })
    .await;
    down.stop();
    ahead.mine(5);
    wait_until(|| state_of(&server, "test", &down.url()).as_deref() == Some("down")).await;
    wait_until(|| state_of(&server, "other", &behind.url()).as_deref() == Some("lagging")).await;
    let down_url = down.url();
    wait_until(|| {
        server.metrics.journal.recent().iter().any(|e| {
            e.kind == electrum_lb::status::events::EventKind::UpstreamDown
                && e.upstream.as_deref() == Some(down_url.as_str())
        })
    })
    .await;
    let (wallet, _) = subscribed_wallet(tcp_addr(&server, "test"), &scripthash(1)).await;
    let mut idle = Client::connect(tcp_addr(&server, "test")).await;
    idle.call("server.ping", json!([])).await;
    let mut tls = Client::connect_tls(ssl_addr(&server, "test")).await;
    tls.call("blockchain.block.header", json!([5])).await;
    Scene {
        up,
        down,
        ahead,
        behind,
        server,
        _wallets: vec![wallet, idle, tls],
    }
}

/// Headless Chromium with a fresh profile, no network but what it is sent to.
fn chromium(program: &Path, profile: &Path) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new(program);
    cmd.args([
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--hide-scrollbars",
    ])
    .arg(format!("--user-data-dir={}", profile.display()))
    .kill_on_drop(true)
    .stdin(std::process::Stdio::null());
    cmd
}

/// Run Chromium to the end (it exits once its virtual time is spent).
async fn run(mut cmd: tokio::process::Command) -> String {
    let out = tokio::time::timeout(Duration::from_secs(60), cmd.output())
        .await
        .expect("chromium did not finish within 60 s")
        .expect("chromium runs");
    assert!(
        out.status.success(),
        "chromium failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// The page as Chromium renders it: the DOM once the page's script has
/// drawn `/status.json` (it has a few seconds of virtual time to do so).
async fn rendered(program: &Path, url: &str) -> String {
    let dir = temp_dir("chromium");
    let mut cmd = chromium(program, &dir.join("profile"));
    cmd.args(["--virtual-time-budget=5000", "--dump-dom", url]);
    run(cmd).await
}

/// The element starting at the first `marker`, up to its closing `</tag>`.
fn element<'a>(dom: &'a str, marker: &str, tag: &str) -> &'a str {
    let start = dom
        .find(marker)
        .unwrap_or_else(|| panic!("no {marker} in the page:\n{dom}"));
    let start = dom[..start].rfind('<').unwrap();
    let end = dom[start..].find(&format!("</{tag}>")).unwrap() + start;
    &dom[start..end]
}

/// The text of the element carrying `data-field="field"`, inside `within`.
fn field<'a>(within: &'a str, field: &str) -> &'a str {
    let marker = format!("data-field=\"{field}\">");
    let at = within
        .find(&marker)
        .unwrap_or_else(|| panic!("no {field} in:\n{within}"))
        + marker.len();
    let text = &within[at..];
    &text[..text.find('<').unwrap()]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chromium_shows_the_states_the_counts_and_the_events() {
    let Some(program) = require_tool("chromium") else {
        return;
    };
    let s = scene().await;
    let url = format!("http://{}/", s.server.metrics_addr);
    let dom = rendered(&program, &url).await;
    assert!(
        dom.contains("<body data-ready=\"1\">"),
        "the page never drew status.json:\n{dom}"
    );

    // States: one upstream up, the stopped one down, with its failure.
    let up = element(&dom, &format!("data-upstream=\"{}\"", s.up.url()), "tr");
    assert!(up.contains("data-state=\"up\""), "{up}");
    assert_eq!(field(up, "state"), "up");
    assert_eq!(field(up, "connections"), "1");
    let down = element(&dom, &format!("data-upstream=\"{}\"", s.down.url()), "tr");
    assert_eq!(field(down, "state"), "down");
    assert!(
        field(down, "reason").starts_with("no connection: connect:"),
        "{down}"
    );
    assert_ne!(field(down, "failures"), "0", "{down}");
    assert!(dom.contains("data-field=\"coin-ready\">serving<"));

    // A lagging upstream, with how far behind it is.
    let lagging = element(&dom, &format!("data-upstream=\"{}\"", s.behind.url()), "tr");
    assert_eq!(field(lagging, "state"), "lagging");
    assert_eq!(
        field(lagging, "reason"),
        "5 blocks behind the best tip (max_lag 2)"
    );
    let ahead = element(&dom, &format!("data-upstream=\"{}\"", s.ahead.url()), "tr");
    assert_eq!(field(ahead, "state"), "up");
    let lag_event = element(&dom, "data-kind=\"upstream_lagging\"", "li");
    assert!(lag_event.contains(&s.behind.url()), "{lag_event}");

    // Counts: three sessions (two TCP, one TLS), one subscription upstream.
    let coin = element(&dom, "data-coin=\"test\"", "section");
    assert_eq!(field(coin, "sessions"), "3");
    assert!(
        coin.contains("data-field=\"transport-tcp\">tcp <b>2</b>"),
        "{coin}"
    );
    assert!(
        coin.contains("data-field=\"transport-ssl\">ssl <b>1</b>"),
        "{coin}"
    );
    assert_eq!(field(coin, "subscriptions"), "1");
    assert_eq!(field(coin, "held"), "0");
    let tip = s.up.tip().0.to_string();
    assert_eq!(field(coin, "tip"), tip);

    // The event: the stopped upstream left rotation, with a time.
    let event = element(&dom, "data-kind=\"upstream_down\"", "li");
    assert!(event.contains(&s.down.url()), "{event}");
    assert_eq!(field(event, "message"), "out of rotation: no connection");
    assert!(event.contains("<time datetime=\""), "{event}");
    let lost = element(&dom, "data-kind=\"connection_lost\"", "li");
    assert!(lost.contains(&s.down.url()), "{lost}");

    // `STATUS_SCREENSHOT=path` keeps a picture of it (see the README);
    // `STATUS_SCREENSHOT_SIZE=390,844` as a phone shows it.
    if let Some(path) = std::env::var_os("STATUS_SCREENSHOT") {
        let size = std::env::var("STATUS_SCREENSHOT_SIZE").unwrap_or("1280,1000".into());
        screenshot(&program, &url, &PathBuf::from(path), &size).await;
    }
}

/// A PNG of the page at `size` ("width,height").
async fn screenshot(program: &Path, url: &str, path: &Path, size: &str) {
    let dir = temp_dir("chromium-shot");
    let mut cmd = chromium(program, &dir.join("profile"));
    cmd.arg(format!("--screenshot={}", path.display()))
        .arg(format!("--window-size={size}"))
        .args(["--virtual-time-budget=5000", url]);
    run(cmd).await;
    assert!(path.is_file(), "no screenshot at {}", path.display());
}

/// Every value `/status.json` shows that `/metrics` also has, keyed like a
/// series.
fn from_json(j: &Value) -> BTreeMap<String, i64> {
    let mut out = BTreeMap::new();
    for c in j["coins"].as_array().unwrap() {
        let coin = c["name"].as_str().unwrap();
        for u in c["upstreams"].as_array().unwrap() {
            let url = u["url"].as_str().unwrap();
            let key = |m: &str| format!("{m}{{coin=\"{coin}\",upstream=\"{url}\"}}");
            out.insert(key("upstream_up"), u["up"].as_bool().unwrap() as i64);
            out.insert(key("upstream_height"), u["height"].as_i64().unwrap());
            out.insert(key("upstream_in_flight"), u["in_flight"].as_i64().unwrap());
            out.insert(
                key("upstream_connections"),
                u["connections"].as_i64().unwrap(),
            );
        }
        for kind in ["upstream", "session", "held"] {
            out.insert(
                format!("subscriptions{{coin=\"{coin}\",kind=\"{kind}\"}}"),
                c["subscriptions"][kind].as_i64().unwrap(),
            );
        }
        for (t, n) in c["sessions"]["by_transport"].as_object().unwrap() {
            out.insert(
                format!("sessions_open{{coin=\"{coin}\",transport=\"{t}\"}}"),
                n.as_i64().unwrap(),
            );
        }
        for (result, field) in [
            ("hit", "hits"),
            ("miss", "misses"),
            ("coalesced", "coalesced"),
        ] {
            out.insert(
                format!("cache_requests_total{{coin=\"{coin}\",result=\"{result}\"}}"),
                c["cache"][field].as_i64().unwrap(),
            );
        }
        out.insert(
            format!("cache_entries{{coin=\"{coin}\"}}"),
            c["cache"]["entries"].as_i64().unwrap(),
        );
        out.insert(
            format!("cache_bytes{{coin=\"{coin}\"}}"),
            c["cache"]["bytes"].as_i64().unwrap(),
        );
        out.insert(
            format!("notifications_total{{coin=\"{coin}\"}}"),
            c["notifications"].as_i64().unwrap(),
        );
        for (kind, n) in c["errors"].as_object().unwrap() {
            out.insert(
                format!("errors_total{{coin=\"{coin}\",kind=\"{kind}\"}}"),
                n.as_i64().unwrap(),
            );
        }
    }
    out
}

/// The same series read from the text exposition (`electrum_lb_` dropped).
fn from_metrics(text: &str, keys: &BTreeMap<String, i64>) -> BTreeMap<String, i64> {
    keys.keys()
        .map(|k| {
            let v = sample(text, &format!("electrum_lb_{k}"))
                .unwrap_or_else(|| panic!("{k} is not in /metrics"));
            (k.clone(), v as i64)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_json_agrees_with_metrics() {
    let s = scene().await;
    let addr = s.server.metrics_addr;
    // Something in every family: a cache hit, a parse error.
    let mut c = Client::connect(tcp_addr(&s.server, "test")).await;
    for _ in 0..2 {
        c.call("blockchain.block.header", json!([5])).await;
    }
    c.send_raw(b"not json\n").await;
    assert_eq!(c.recv().await["error"]["code"], -32700);

    // Read both while nothing moves: the same values twice in /metrics
    // around one /status.json.
    let mut agreed = false;
    for _ in 0..20 {
        let (_, before) = http_get(addr, "/metrics").await;
        let (status, body) = http_get(addr, "/status.json").await;
        let (_, after) = http_get(addr, "/metrics").await;
        assert_eq!(status, 200);
        let j: Value = serde_json::from_str(&body).unwrap();
        let shown = from_json(&j);
        let (m1, m2) = (from_metrics(&before, &shown), from_metrics(&after, &shown));
        if m1 != m2 {
            continue; // something changed meanwhile (a health check, a ping)
        }
        assert_eq!(shown, m1, "/status.json and /metrics disagree");
        assert_eq!(
            shown["cache_requests_total{coin=\"test\",result=\"hit\"}"],
            2
        );
        assert_eq!(shown["errors_total{coin=\"test\",kind=\"parse\"}"], 1);
        assert_eq!(shown["sessions_open{coin=\"test\",transport=\"tcp\"}"], 3);
        assert_eq!(
            shown[&format!("upstream_up{{coin=\"test\",upstream=\"{}\"}}", s.down.url())],
            0
        );
        // Readiness: the page's and /readyz's.
        assert_eq!(j["ready"], json!(true));
        assert_eq!(http_get(addr, "/readyz").await.0, 200);
        agreed = true;
        break;
    }
    assert!(agreed, "the state never held still for three requests");
}
