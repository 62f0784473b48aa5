//! Basic auth on the side port: the page and `/status.json` behind
//! credentials, what Prometheus and probes read left open unless the
//! operator closes it too, and credentials replaced by a reload.
mod support;

use std::net::SocketAddr;
use support::mock::Mock;
use support::*;

/// GET with an optional `user:password`; returns (status, headers, body).
async fn get(addr: SocketAddr, path: &str, credentials: Option<&str>) -> (u16, String, String) {
    use base64::Engine;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let auth = credentials
        .map(|c| {
            let token = base64::engine::general_purpose::STANDARD.encode(c);
            format!("Authorization: Basic {token}\r\n")
        })
        .unwrap_or_default();
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: x\r\n{auth}\r\n").as_bytes())
        .await
        .unwrap();
    let mut buf = Vec::new();
    tokio::time::timeout(WAIT, s.read_to_end(&mut buf))
        .await
        .unwrap()
        .unwrap();
    let text = String::from_utf8(buf).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    (status, head.to_ascii_lowercase(), body.to_string())
}

fn config(mock: &Mock, metrics: &str) -> String {
    config_multi("", &[("test", vec![format!("{:?}", mock.url())], "")]).replace(
        "[metrics]\nlisten = \"127.0.0.1:0\"\n",
        &format!("[metrics]\nlisten = \"127.0.0.1:0\"\n{metrics}\n"),
    )
}

#[tokio::test]
async fn the_page_needs_credentials_and_probes_do_not() {
    let mock = Mock::start().await;
    let server = start_proxy(&config(&mock, "username = \"ops\"\npassword = \"s3cret\"")).await;
    wait_ready(&server, "test").await;
    let addr = server.metrics_addr;
    for path in ["/", "/status.json", "/nope"] {
        let (code, head, _) = get(addr, path, None).await;
        assert_eq!(code, 401, "{path}");
        assert!(
            head.contains("www-authenticate: basic realm=\"electrum-lb\""),
            "{head}"
        );
        assert_eq!(get(addr, path, Some("ops:wrong")).await.0, 401, "{path}");
        assert_eq!(get(addr, path, Some("Ops:s3cret")).await.0, 401, "{path}");
    }
    let (code, head, page) = get(addr, "/", Some("ops:s3cret")).await;
    assert_eq!(code, 200);
    assert!(head.contains("content-type: text/html"), "{head}");
    assert!(
        head.contains("content-security-policy: default-src 'none'"),
        "{head}"
    );
    assert!(page.contains("fetch(\"status.json\""));
    // No external asset: nothing is loaded from another origin.
    assert!(!page.contains("http://") && !page.contains("https://") && !page.contains("//cdn"));
    let (code, _, body) = get(addr, "/status.json", Some("ops:s3cret")).await;
    assert_eq!(code, 200);
    let snap: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(snap["coins"][0]["name"], "test");
    // What Prometheus and probes read stays open by default.
    for path in ["/metrics", "/healthz", "/readyz"] {
        assert_eq!(get(addr, path, None).await.0, 200, "{path}");
    }
    assert_eq!(get(addr, "/nope", Some("ops:s3cret")).await.0, 404);
}

#[tokio::test]
async fn a_password_hash_and_closed_metrics() {
    let mock = Mock::start().await;
    // What `printf %s s3cret | sha256sum` prints.
    let hash = {
        use sha2::Digest;
        hex::encode(sha2::Sha256::digest(b"s3cret"))
    };
    let text = config(
        &mock,
        &format!("username = \"ops\"\npassword_sha256 = \"{hash}\"\nopen_paths = [\"/healthz\"]"),
    );
    let server = start_proxy(&text).await;
    let addr = server.metrics_addr;
    assert_eq!(get(addr, "/healthz", None).await.0, 200);
    for path in ["/metrics", "/readyz", "/status.json"] {
        assert_eq!(get(addr, path, None).await.0, 401, "{path}");
        assert_ne!(get(addr, path, Some("ops:s3cret")).await.0, 401, "{path}");
        assert_eq!(
            get(addr, path, Some(&format!("ops:{hash}"))).await.0,
            401,
            "{path}"
        );
    }
}

#[tokio::test]
async fn a_reload_replaces_the_credentials() {
    let mock = Mock::start().await;
    let text = config(&mock, "username = \"ops\"\npassword = \"old\"");
    let server = start_proxy(&text).await;
    let addr = server.metrics_addr;
    assert_eq!(get(addr, "/", Some("ops:old")).await.0, 200);
    let new = text.replace("password = \"old\"", "password = \"new\"");
    server
        .reload(electrum_lb::Config::parse(&new, "test.toml").unwrap())
        .unwrap();
    assert_eq!(get(addr, "/", Some("ops:old")).await.0, 401);
    assert_eq!(get(addr, "/", Some("ops:new")).await.0, 200);
    // Credentials removed: open again.
    let open = text.replace("username = \"ops\"\npassword = \"old\"", "");
    server
        .reload(electrum_lb::Config::parse(&open, "test.toml").unwrap())
        .unwrap();
    assert_eq!(get(addr, "/status.json", None).await.0, 200);
}

#[test]
fn half_set_credentials_are_refused_naming_the_key() {
    let text = config_multi("", &[("test", vec!["\"tcp://127.0.0.1:1\"".into()], "")]).replace(
        "[metrics]\nlisten = \"127.0.0.1:0\"\n",
        "[metrics]\nlisten = \"127.0.0.1:0\"\npassword = \"x\"\n",
    );
    let err = electrum_lb::Config::parse(&text, "t.toml").unwrap_err();
    assert_eq!(err.key, "metrics.username", "{err}");
}
