//! The shipped deployment files (deploy/) agree with each other and with
//! what the proxy does: every configuration loads, every stop timeline
//! leaves the drain its time, HAProxy checks the port the instances serve
//! `/readyz` on and sends the header they expect. (`.ci/run` validates
//! the Kubernetes manifests against the API schemas and the HAProxy file
//! with `haproxy -c`.)

use electrum_lb::Config;
use std::path::Path;

fn read(path: &str) -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(path))
        .unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn load(path: &str) -> Config {
    Config::load(&Path::new(env!("CARGO_MANIFEST_DIR")).join(path))
        .unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// The number after `key` (e.g. `"inter "`, `"TimeoutStopSec="`).
fn number_after(text: &str, key: &str) -> u64 {
    let at = text.find(key).unwrap_or_else(|| panic!("no {key:?}")) + key.len();
    text[at..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect::<String>()
        .parse()
        .unwrap_or_else(|_| panic!("no number after {key:?}"))
}

#[test]
fn every_shipped_configuration_loads() {
    for path in [
        "config/electrum-lb.toml",
        "deploy/haproxy/electrum-lb.toml",
        "deploy/kubernetes/electrum-lb.toml",
    ] {
        let config = load(path);
        assert_eq!(config.coins.len(), 4, "{path}");
    }
}

#[test]
fn haproxy_and_its_instances_agree() {
    let cfg = read("deploy/haproxy/haproxy.cfg");
    let instance = load("deploy/haproxy/electrum-lb.toml");
    // HAProxy takes an instance out of rotation after `fall` failed checks
    // `inter` apart: the instance must still accept that long after SIGTERM.
    let servers = cfg
        .lines()
        .find(|l| l.trim_start().starts_with("default-server "))
        .expect("a default-server line");
    let (inter, fall) = (
        number_after(servers, "inter "),
        number_after(servers, "fall "),
    );
    assert!(
        servers.contains(&format!("inter {inter}s")),
        "inter in seconds"
    );
    assert!(
        instance.server.drain_notice_secs >= inter * fall,
        "drain_notice_secs {} < {fall} x {inter} s",
        instance.server.drain_notice_secs
    );
    // Health from /readyz on the instances' metrics port.
    assert!(cfg.contains("option httpchk GET /readyz"));
    assert_eq!(
        number_after(servers, "check port "),
        instance.metrics.listen.port() as u64
    );
    // PROXY v2 on every connection, expected on every listener; one HAProxy
    // section per listener, toward the same port.
    assert!(cfg.contains("default-server send-proxy-v2"));
    for (coin, c) in &instance.coins {
        for l in &c.listen {
            assert!(l.proxy_protocol, "{coin}: {}", l.url);
            let port = l.url.socket_addr().unwrap().port();
            let section = format!("listen {coin}-{}\n    bind :{port}\n", l.url.scheme);
            assert!(cfg.contains(&section), "no {section:?}");
        }
    }
    // The systemd unit waits for the drain before it kills.
    let unit = read("deploy/electrum-lb@.service");
    let stop = number_after(&unit, "TimeoutStopSec=");
    let s = &instance.server;
    assert!(
        stop > s.drain_notice_secs + s.shutdown_grace_secs,
        "TimeoutStopSec {stop} <= {} + {}",
        s.drain_notice_secs,
        s.shutdown_grace_secs
    );
    assert!(unit.contains("--takeover"));
    assert!(s
        .handoff_socket
        .as_ref()
        .unwrap()
        .starts_with("/run/electrum-lb/"));
    assert!(unit.contains("RuntimeDirectory=electrum-lb\n"));
}

#[test]
fn the_plain_systemd_unit_waits_for_the_drain() {
    let unit = read("deploy/electrum-lb.service");
    let s = load("config/electrum-lb.toml").server;
    assert!(number_after(&unit, "TimeoutStopSec=") > s.drain_notice_secs + s.shutdown_grace_secs);
}

#[test]
fn kubernetes_stop_timeline_and_probes_fit_the_configuration() {
    let deployment = read("deploy/kubernetes/deployment.yaml");
    let config = load("deploy/kubernetes/electrum-lb.toml");
    let s = &config.server;
    let grace = number_after(&deployment, "terminationGracePeriodSeconds: ");
    let pre_stop = number_after(&deployment, "command: [\"sleep\", \"");
    assert!(
        grace >= pre_stop + s.drain_notice_secs + s.shutdown_grace_secs + 5,
        "terminationGracePeriodSeconds {grace} < preStop {pre_stop} + notice {} + grace {} + 5",
        s.drain_notice_secs,
        s.shutdown_grace_secs
    );
    // Probes on the metrics port the configuration serves.
    assert!(deployment.contains("httpGet: { path: /readyz, port: metrics }"));
    assert!(deployment.contains("httpGet: { path: /healthz, port: metrics }"));
    let metrics_port = number_after(&deployment, "name: metrics, containerPort: ");
    assert_eq!(metrics_port, config.metrics.listen.port() as u64);
    // Every listener is a container port and a Service port.
    let service = read("deploy/kubernetes/service.yaml");
    for c in config.coins.values() {
        for l in &c.listen {
            let port = l.url.socket_addr().unwrap().port();
            assert!(
                deployment.contains(&format!("containerPort: {port},")),
                "{port}"
            );
            assert!(service.contains(&format!("port: {port},")), "{port}");
        }
    }
    // The certificate files the configuration names are the Secret's keys,
    // mounted where it looks.
    let tls = config.tls.as_ref().unwrap();
    assert_eq!(tls.cert, Path::new("/etc/electrum-lb/tls/tls.crt"));
    assert_eq!(tls.key, Path::new("/etc/electrum-lb/tls/tls.key"));
    assert!(deployment.contains("mountPath: /etc/electrum-lb/tls"));
    assert!(deployment.contains("mountPath: /etc/electrum-lb/config"));
}

#[test]
fn kubernetes_secret_holds_the_certificate_of_certs() {
    let secret = read("deploy/kubernetes/secret.yaml");
    // The block after `name: |`, without its indentation.
    let block = |name: &str| -> String {
        let start = secret.find(&format!("  {name}: |\n")).unwrap() + name.len() + 6;
        secret[start..]
            .lines()
            .take_while(|l| l.starts_with("    "))
            .map(|l| format!("{}\n", &l[4..]))
            .collect()
    };
    assert_eq!(block("tls.crt").trim(), read("certs/server.crt").trim());
    assert_eq!(block("tls.key").trim(), read("certs/server.key").trim());
}

/// The shipped units and image run electrum-lb with the same glibc
/// settings, and the proxy bench measures it with them (README
/// "Performance"): a change to one is a change to all.
#[test]
fn units_image_and_bench_share_the_glibc_settings() {
    const SETTING: &str = "glibc.malloc.tcache_count=256";
    for unit in ["deploy/electrum-lb.service", "deploy/electrum-lb@.service"] {
        let text = read(unit);
        assert!(
            text.contains(&format!("\nEnvironment=GLIBC_TUNABLES={SETTING}\n")),
            "{unit}"
        );
    }
    assert!(read("Dockerfile").contains(&format!("\nENV GLIBC_TUNABLES={SETTING}\n")));
    assert!(read("benches/proxy/procs.rs").contains(&format!(
        "const ELECTRUM_LB_TUNABLES: &str = \"{SETTING}\";"
    )));
}
