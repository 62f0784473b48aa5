//! Upstream health, balancing, retries, elastic pools and TLS to upstreams,
//! through real sockets against mock ElectrumX servers.
mod support;

use serde_json::{json, Value};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use support::mock::{Mock, MockOptions};
use support::*;

/// A config for coin `test` with fast health checks; `upstreams` are TOML
/// values (strings or inline tables).
fn config(upstreams: &[String], server_extra: &str) -> String {
    let head = config_head();
    format!(
        r#"
{head}[server]
request_timeout_secs = 8
shutdown_grace_secs = 1
upstream_stall_secs = 1
health_interval_ms = 100
health_rise = 3
health_fall = 2
{server_extra}
# These tests count the requests each upstream receives: none may be
# answered from the cache.
[cache]
enabled = false
[coins.test]
listen = ["tcp://127.0.0.1:0"]
upstreams = [{}]
"#,
        upstreams.join(", ")
    )
}

fn q(s: &str) -> String {
    format!("{s:?}")
}

async fn start(upstreams: &[String], server_extra: &str) -> electrum_lb::Server {
    let server = start_proxy(&config(upstreams, server_extra)).await;
    wait_ready(&server, "test").await;
    server
}

fn status(server: &electrum_lb::Server, i: usize) -> electrum_lb::upstream::UpstreamStatus {
    server.coins["test"].router.pool.status()[i].clone()
}

/// Two mocks serving the same chain.
async fn twins() -> (Mock, Mock) {
    let a = Mock::start_with(MockOptions {
        seed: 1,
        ..Default::default()
    })
    .await;
    let b = Mock::start_with(MockOptions {
        seed: 1,
        ..Default::default()
    })
    .await;
    (a, b)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_upstream_under_steady_load_fails_no_read_only_request() {
    let (a, b) = twins().await;
    let server = start(&[q(&a.url()), q(&b.url())], "").await;
    wait_until(|| {
        status(&server, 0).ready_connections == 1 && status(&server, 1).ready_connections == 1
    })
    .await;
    let addr = tcp_addr(&server, "test");
    let done = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for t in 0..8 {
        let done = done.clone();
        tasks.push(tokio::spawn(async move {
            let mut c = Client::connect(addr).await;
            let mut errors = Vec::new();
            for i in 0..150 {
                let h = (t * 7 + i) % 100;
                let v = c.request("blockchain.block.header", json!([h])).await;
                if v.get("result").is_none() {
                    errors.push(v);
                }
                done.fetch_add(1, Ordering::Relaxed);
            }
            errors
        }));
    }
    wait_until(|| done.load(Ordering::Relaxed) >= 400).await;
    a.stop();
    let mut errors: Vec<Value> = Vec::new();
    for t in tasks {
        errors.extend(t.await.unwrap());
    }
    assert_eq!(done.load(Ordering::Relaxed), 1200);
    assert!(errors.is_empty(), "failed requests: {errors:?}");
    assert!(
        a.count("blockchain.block.header") > 0,
        "the killed upstream took part before dying"
    );
    assert!(b.count("blockchain.block.header") > 0);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_upstream_leaves_rotation_and_its_requests_are_retried() {
    let (a, b) = twins().await;
    let server = start(&[q(&a.url()), q(&b.url())], "").await;
    wait_until(|| {
        status(&server, 0).ready_connections == 1 && status(&server, 1).ready_connections == 1
    })
    .await;
    a.set_stalled(true);
    let addr = tcp_addr(&server, "test");
    let mut tasks = Vec::new();
    for i in 0..20 {
        tasks.push(tokio::spawn(async move {
            let mut c = Client::connect(addr).await;
            c.request("blockchain.block.header", json!([i])).await
        }));
    }
    for (i, t) in tasks.into_iter().enumerate() {
        let v = t.await.unwrap();
        assert_eq!(v["result"], json!(b.header_hex(i)), "request {i}: {v}");
    }
    assert!(
        a.count("blockchain.block.header") > 0,
        "some requests went to the stalled upstream first"
    );
    // It reconnects, but its handshake is never answered: out of rotation.
    wait_until(|| !status(&server, 0).healthy).await;
    b.reset_counts();
    let mut c = Client::connect(addr).await;
    for i in 0..10 {
        c.call("blockchain.block.header", json!([i])).await;
    }
    assert_eq!(b.count("blockchain.block.header"), 10);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lagging_upstream_stops_receiving_requests_until_it_catches_up() {
    let (a, b) = twins().await;
    let server = start(&[q(&a.url()), q(&b.url())], "").await;
    wait_until(|| {
        status(&server, 0).ready_connections == 1 && status(&server, 1).ready_connections == 1
    })
    .await;
    // b falls 3 blocks behind (max_lag is 2).
    a.mine(3);
    wait_until(|| !status(&server, 1).healthy).await;
    a.reset_counts();
    b.reset_counts();
    let mut c = Client::connect(tcp_addr(&server, "test")).await;
    for i in 0..30 {
        c.call("blockchain.block.header", json!([i])).await;
    }
    assert_eq!(
        b.count("blockchain.block.header"),
        0,
        "a lagging upstream got requests"
    );
    assert_eq!(a.count("blockchain.block.header"), 30);
    // It catches up and, after `rise` good checks, is back.
    b.mine(3);
    wait_until(|| status(&server, 1).healthy).await;
    let mut seen_b = false;
    for i in 0..30 {
        // Sequential requests alternate between equally idle upstreams only
        // by load; send a few concurrently to give both a share (different
        // heights: identical requests in flight would share one).
        let (x, y) = tokio::join!(c.request("blockchain.block.header", json!([i])), async {
            Client::connect(tcp_addr(&server, "test"))
                .await
                .request("blockchain.block.header", json!([i + 30]))
                .await
        });
        assert!(x.get("result").is_some() && y.get("result").is_some());
        if b.count("blockchain.block.header") > 0 {
            seen_b = true;
            break;
        }
    }
    assert!(seen_b, "the recovered upstream never got a request");
    server.shutdown().await;
}

/// A subscription held on an upstream that falls behind moves to the other
/// one, and the lagging upstream (still connected) is told to stop watching.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscription_leaves_a_lagging_upstream_and_is_released_there() {
    let (a, b) = twins().await;
    let server = start(&[q(&a.url()), q(&b.url())], "").await;
    wait_until(|| {
        status(&server, 0).ready_connections == 1 && status(&server, 1).ready_connections == 1
    })
    .await;
    let sh = scripthash(7);
    let mut c = Client::connect(tcp_addr(&server, "test")).await;
    c.call("blockchain.scripthash.subscribe", json!([sh])).await;
    let subscribes = |m: &Mock| m.count("blockchain.scripthash.subscribe");
    let (holder, other) = if subscribes(&a) == 1 {
        (&a, &b)
    } else {
        (&b, &a)
    };
    assert_eq!(subscribes(holder), 1);
    assert_eq!(subscribes(other), 0);
    // The holder falls 3 blocks behind (max_lag is 2): out of rotation.
    other.mine(3);
    wait_until(|| subscribes(other) == 1).await;
    wait_until(|| holder.count("blockchain.scripthash.unsubscribe") == 1).await;
    // The session is still served, from the upstream that moved ahead.
    assert_eq!(
        c.call("blockchain.scripthash.get_history", json!([sh]))
            .await,
        json!([])
    );
    server.shutdown().await;
}

/// An upstream that accepts and hangs up at once, so that every attempt
/// fails: its port, and when each attempt came.
async fn hanging_up_upstream() -> (u16, Arc<std::sync::Mutex<Vec<Instant>>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let attempts = Arc::new(std::sync::Mutex::new(Vec::<Instant>::new()));
    let seen = attempts.clone();
    tokio::spawn(async move {
        loop {
            let (s, _) = listener.accept().await.unwrap();
            seen.lock().unwrap().push(Instant::now());
            drop(s);
        }
    });
    (port, attempts)
}

#[tokio::test]
async fn unreachable_upstream_is_retried_with_growing_delays() {
    let (port, attempts) = hanging_up_upstream().await;
    let server = start_proxy(&config(&[q(&format!("tcp://127.0.0.1:{port}"))], "")).await;
    wait_until(|| attempts.lock().unwrap().len() >= 5).await;
    let t = attempts.lock().unwrap().clone();
    let gaps: Vec<Duration> = t.windows(2).map(|w| w[1] - w[0]).collect();
    // Backoff doubles from 200 ms with +-25% jitter: each gap is at least
    // 1.2x the previous, so the fourth is well over twice the first.
    assert!(gaps[3] > gaps[0] * 2, "delays did not grow: {gaps:?}");
    assert!(
        gaps[0] >= Duration::from_millis(100),
        "retried too fast: {gaps:?}"
    );
    // Meanwhile requests are answered at once with an error.
    let mut c = Client::connect(tcp_addr(&server, "test")).await;
    let v = c.request("blockchain.block.header", json!([1])).await;
    assert_eq!(v["error"]["code"], -32001, "{v}");
    server.shutdown().await;
}

/// `upstream_reconnect_max_ms` caps the backoff: ten attempts come within
/// seconds (uncapped, the tenth would come after more than 100 s).
#[tokio::test]
async fn the_reconnect_delay_stops_growing_at_its_cap() {
    let (port, attempts) = hanging_up_upstream().await;
    let server = start_proxy(&config(
        &[q(&format!("tcp://127.0.0.1:{port}"))],
        "upstream_reconnect_max_ms = 400",
    ))
    .await;
    wait_until(|| attempts.lock().unwrap().len() >= 10).await;
    let t = attempts.lock().unwrap().clone();
    let gaps: Vec<Duration> = t.windows(2).map(|w| w[1] - w[0]).collect();
    // 400 ms +- 25%, and some room for a loaded machine.
    assert!(
        gaps.iter().all(|g| *g < Duration::from_millis(1500)),
        "a delay beyond the cap: {gaps:?}"
    );
    server.shutdown().await;
    // And a cap below the first delay is refused, naming the key.
    let err = electrum_lb::Config::parse(
        &config(&[q("tcp://127.0.0.1:1")], "upstream_reconnect_max_ms = 10"),
        "t.toml",
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("server.upstream_reconnect_max_ms"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broadcast_is_answered_with_an_error_not_resent_when_its_upstream_dies() {
    let (a, b) = twins().await;
    let server = start(&[q(&a.url()), q(&b.url())], "").await;
    wait_until(|| {
        status(&server, 0).ready_connections == 1 && status(&server, 1).ready_connections == 1
    })
    .await;
    a.set_delay(Duration::from_secs(3));
    b.set_delay(Duration::from_secs(3));
    let mut c = Client::connect(tcp_addr(&server, "test")).await;
    c.send(&json!({"id": 1, "method": "blockchain.transaction.broadcast", "params": ["0100"]}))
        .await;
    wait_until(|| {
        a.count("blockchain.transaction.broadcast") + b.count("blockchain.transaction.broadcast")
            == 1
    })
    .await;
    let (dead, alive) = if a.count("blockchain.transaction.broadcast") == 1 {
        (&a, &b)
    } else {
        (&b, &a)
    };
    dead.stop();
    let v = c.recv().await;
    assert_eq!(v["id"], 1);
    assert_eq!(v["error"]["code"], -32001, "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("not resent"),
        "{v}"
    );
    assert_eq!(
        alive.count("blockchain.transaction.broadcast"),
        0,
        "the broadcast was sent twice"
    );
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn saturated_connections_grow_the_pool_and_idle_ones_close() {
    let a = Mock::start().await;
    let up = format!(
        "{{ url = {}, min_connections = 1, max_connections = 3, max_in_flight = 2 }}",
        q(&a.url())
    );
    let server = start(&[up], "upstream_idle_close_secs = 1").await;
    wait_until(|| a.connections() == 1).await;
    a.set_delay(Duration::from_millis(400));
    let addr = tcp_addr(&server, "test");
    let mut tasks = Vec::new();
    for i in 0..12 {
        tasks.push(tokio::spawn(async move {
            let mut c = Client::connect(addr).await;
            c.request("blockchain.block.header", json!([i])).await
        }));
    }
    wait_until(|| a.connections() == 3).await;
    for t in tasks {
        assert!(t.await.unwrap().get("result").is_some());
    }
    a.set_delay(Duration::ZERO);
    // Back to min_connections once the extra ones have been idle a second.
    wait_until(|| a.connections() == 1).await;
    let mut c = Client::connect(addr).await;
    c.call("blockchain.block.header", json!([1])).await;
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backup_is_used_only_while_no_primary_is_healthy() {
    let (a, b) = twins().await;
    let backup = format!("{{ url = {}, backup = true }}", q(&b.url()));
    let server = start(&[q(&a.url()), backup], "").await;
    // Both ready: while the primary's first connection is still being
    // made (a loaded machine), no primary is healthy and the backup serves.
    wait_until(|| status(&server, 1).ready_connections == 1).await;
    wait_until(|| status(&server, 0).ready_connections >= 1).await;
    let mut c = Client::connect(tcp_addr(&server, "test")).await;
    for i in 0..20 {
        c.call("blockchain.block.header", json!([i])).await;
    }
    assert_eq!(b.count("blockchain.block.header"), 0);
    a.stop();
    wait_until(|| status(&server, 0).ready_connections == 0).await;
    for i in 0..5 {
        c.call("blockchain.block.header", json!([i])).await;
    }
    assert_eq!(b.count("blockchain.block.header"), 5);
    server.shutdown().await;
}

/// A CA and a `localhost` certificate it signed.
struct Pki {
    ca_pem: String,
    leaf: TestCert,
}

fn pki() -> Pki {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "test CA");
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let params = rcgen::CertificateParams::new(vec!["localhost".to_string()]).unwrap();
    let leaf = params.signed_by(&key, &ca, &ca_key).unwrap();
    Pki {
        ca_pem: ca.pem(),
        leaf: TestCert {
            cert_pem: leaf.pem(),
            key_pem: key.serialize_pem(),
            der: leaf.der().to_vec(),
        },
    }
}

async fn tls_mock(cert: &TestCert) -> Mock {
    Mock::start_with(MockOptions {
        tls: Some(cert.server_config()),
        ..Default::default()
    })
    .await
}

/// Whether a proxy with this upstream entry serves requests: it becomes
/// ready, or the mock has seen a second connection attempt (the first one
/// failed) without the proxy becoming ready.
async fn serves(m: &Mock, entry: String) -> bool {
    let before = m.accepted();
    let server = start_proxy(&config(&[entry], "")).await;
    wait_until(|| server.coins["test"].router.pool.any_ready() || m.accepted() >= before + 2).await;
    let ok = if server.coins["test"].router.pool.any_ready() {
        let mut c = Client::connect(tcp_addr(&server, "test")).await;
        c.request("blockchain.block.header", json!([1]))
            .await
            .get("result")
            .is_some()
    } else {
        false
    };
    server.shutdown().await;
    ok
}

#[tokio::test]
async fn tls_upstream_verified_against_a_ca_file() {
    let pki = pki();
    let dir = tempdir();
    let ca = dir.join("ca.pem");
    std::fs::write(&ca, &pki.ca_pem).unwrap();
    let m = tls_mock(&pki.leaf).await;
    assert!(
        serves(
            &m,
            format!(
                "{{ url = {}, ca_file = {} }}",
                q(&m.url()),
                q(ca.to_str().unwrap())
            )
        )
        .await
    );
    // Without the CA (system roots only) the same upstream is refused.
    assert!(!serves(&m, q(&m.url())).await);
}

#[tokio::test]
async fn tls_upstream_with_a_pinned_fingerprint() {
    let cert = make_cert();
    let m = tls_mock(&cert).await;
    let right = electrum_lb::tls::fingerprint_hex(&cert.der);
    assert!(
        serves(
            &m,
            format!("{{ url = {}, fingerprint = {} }}", q(&m.url()), q(&right))
        )
        .await
    );
    let wrong = "00".repeat(32);
    assert!(
        !serves(
            &m,
            format!("{{ url = {}, fingerprint = {} }}", q(&m.url()), q(&wrong))
        )
        .await
    );
}

#[tokio::test]
async fn tls_upstream_insecure_accepts_a_self_signed_certificate() {
    let cert = make_cert();
    let m = tls_mock(&cert).await;
    assert!(serves(&m, format!("{{ url = {}, insecure = true }}", q(&m.url()))).await);
}

fn tempdir() -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "electrum-lb-test-{}-{}",
        std::process::id(),
        rand_suffix()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn rand_suffix() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(Instant::now().elapsed().as_nanos() as u64);
    h.finish()
}

/// The X.509 v1 certificate ElectrumX's documented `openssl x509 -req
/// -signkey` recipe makes (tests/fixtures): webpki will not parse it, yet a
/// pinned or insecure upstream serving it must be reachable.
fn v1_cert() -> TestCert {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let cert_pem = std::fs::read_to_string(root.join("v1.crt")).unwrap();
    let key_pem = std::fs::read_to_string(root.join("v1.key")).unwrap();
    let der = rustls_pemfile::certs(&mut cert_pem.as_bytes())
        .next()
        .unwrap()
        .unwrap()
        .to_vec();
    TestCert {
        cert_pem,
        key_pem,
        der,
    }
}

#[tokio::test]
async fn tls_upstream_with_an_x509_v1_certificate_pinned_or_insecure() {
    let cert = v1_cert();
    // rustls' own `with_single_cert` would refuse the v1 certificate while
    // checking it against the key: serve it through a fixed resolver.
    #[derive(Debug)]
    struct Fixed(Arc<rustls::sign::CertifiedKey>);
    impl rustls::server::ResolvesServerCert for Fixed {
        fn resolve(
            &self,
            _: rustls::server::ClientHello<'_>,
        ) -> Option<Arc<rustls::sign::CertifiedKey>> {
            Some(self.0.clone())
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let key = rustls_pemfile::private_key(&mut cert.key_pem.as_bytes())
        .unwrap()
        .unwrap();
    let signer = provider.key_provider.load_private_key(key).unwrap();
    let certified = rustls::sign::CertifiedKey::new(vec![cert.der.clone().into()], signer);
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(Fixed(Arc::new(certified))));
    let m = Mock::start_with(MockOptions {
        tls: Some(Arc::new(config)),
        ..Default::default()
    })
    .await;
    let pin = electrum_lb::tls::fingerprint_hex(&cert.der);
    assert!(
        serves(
            &m,
            format!("{{ url = {}, fingerprint = {} }}", q(&m.url()), q(&pin))
        )
        .await
    );
    assert!(serves(&m, format!("{{ url = {}, insecure = true }}", q(&m.url()))).await);
    // A pin of another certificate is still refused.
    let other = electrum_lb::tls::fingerprint_hex(&make_cert().der);
    assert!(
        !serves(
            &m,
            format!("{{ url = {}, fingerprint = {} }}", q(&m.url()), q(&other))
        )
        .await
    );
}
