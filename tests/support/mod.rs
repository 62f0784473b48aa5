//! Shared test support: a mock ElectrumX upstream, a line-based JSON client,
//! and helpers that start the real proxy in-process on ports from the OS.
#![allow(dead_code)]

pub mod mock;
pub mod ws;

use electrum_lb::config::Scheme;
use electrum_lb::{Config, Server};
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

/// How long a test waits for any single expected line before failing.
pub const WAIT: Duration = Duration::from_secs(10);

/// A TLS certificate for `localhost` made at test time.
pub struct TestCert {
    pub cert_pem: String,
    pub key_pem: String,
    pub der: Vec<u8>,
}

pub fn make_cert() -> TestCert {
    let key = rcgen::KeyPair::generate().unwrap();
    let params =
        rcgen::CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])
            .unwrap();
    let cert = params.self_signed(&key).unwrap();
    TestCert {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
        der: cert.der().to_vec(),
    }
}

impl TestCert {
    /// A rustls server configuration serving this certificate.
    pub fn server_config(&self) -> Arc<rustls::ServerConfig> {
        let certs: Vec<_> = rustls_pemfile::certs(&mut self.cert_pem.as_bytes())
            .collect::<Result<_, _>>()
            .unwrap();
        let key = rustls_pemfile::private_key(&mut self.key_pem.as_bytes())
            .unwrap()
            .unwrap();
        Arc::new(
            rustls::ServerConfig::builder_with_provider(Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .unwrap(),
        )
    }

    /// Write cert and key into `dir`; returns their paths.
    pub fn write(
        &self,
        dir: &std::path::Path,
        stem: &str,
    ) -> (std::path::PathBuf, std::path::PathBuf) {
        let c = dir.join(format!("{stem}.crt"));
        let k = dir.join(format!("{stem}.key"));
        std::fs::write(&c, &self.cert_pem).unwrap();
        std::fs::write(&k, &self.key_pem).unwrap();
        (c, k)
    }
}

/// The `[metrics]` (port from the OS) and `[tls]` (the shipped development
/// certificate) tables every test configuration starts with.
pub fn config_head() -> String {
    let root = env!("CARGO_MANIFEST_DIR");
    format!(
        "[metrics]\nlisten = \"127.0.0.1:0\"\n\n[tls]\ncert = \"{root}/certs/server.crt\"\nkey = \"{root}/certs/server.key\"\n"
    )
}

/// A TOML config for one coin `test` in front of `upstreams`, with TCP and
/// TLS listeners on ports from the OS. `extra` is appended to the coin table.
pub fn config_text(upstreams: &[String], extra: &str) -> String {
    let head = config_head();
    let ups: Vec<String> = upstreams.iter().map(|u| format!("{u:?}")).collect();
    format!(
        r#"
{head}
[server]
request_timeout_secs = 5
shutdown_grace_secs = 2
upstream_stall_secs = 2

[coins.test]
listen = ["tcp://127.0.0.1:0", "ssl://127.0.0.1:0"]
upstreams = [{}]
{extra}
"#,
        ups.join(", ")
    )
}

/// Start the proxy from config text.
pub async fn start_proxy(text: &str) -> Server {
    let config = Config::parse(text, "test.toml").unwrap_or_else(|e| panic!("{e}"));
    electrum_lb::start(config).await.unwrap()
}

/// Start the proxy for one coin `test` in front of `upstreams` and wait
/// until at least one upstream connection is ready.
pub async fn proxy_for(upstreams: &[String]) -> Server {
    proxy_with(upstreams, "").await
}

pub async fn proxy_with(upstreams: &[String], extra: &str) -> Server {
    let server = start_proxy(&config_text(upstreams, extra)).await;
    wait_ready(&server, "test").await;
    server
}

/// Wait until `coin` has a ready upstream connection.
pub async fn wait_ready(server: &Server, coin: &str) {
    wait_until(|| server.coins[coin].router.pool.any_ready()).await;
}

/// Poll a condition every 10 ms until it holds (fails the test after WAIT).
pub async fn wait_until(mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !cond() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "condition not reached within {WAIT:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

pub fn tcp_addr(server: &Server, coin: &str) -> SocketAddr {
    server.addr(coin, Scheme::Tcp).unwrap()
}

pub fn ssl_addr(server: &Server, coin: &str) -> SocketAddr {
    server.addr(coin, Scheme::Ssl).unwrap()
}

type Boxed = Box<dyn Io>;
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// A line-based JSON client.
pub struct Client {
    reader: BufReader<tokio::io::ReadHalf<Boxed>>,
    writer: tokio::io::WriteHalf<Boxed>,
    next_id: u64,
}

impl Client {
    pub async fn connect(addr: SocketAddr) -> Client {
        let s = TcpStream::connect(addr).await.unwrap();
        Client::from_stream(Box::new(s))
    }

    /// TLS without certificate verification (the proxy's dev certificate).
    pub async fn connect_tls(addr: SocketAddr) -> Client {
        let s = TcpStream::connect(addr).await.unwrap();
        let tls = tls_connector()
            .connect("localhost".try_into().unwrap(), s)
            .await
            .unwrap();
        Client::from_stream(Box::new(tls))
    }

    pub fn from_stream(s: Boxed) -> Client {
        let (r, w) = tokio::io::split(s);
        Client {
            reader: BufReader::new(r),
            writer: w,
            next_id: 1,
        }
    }

    pub async fn send_raw(&mut self, bytes: &[u8]) {
        self.writer.write_all(bytes).await.unwrap();
    }

    /// Close the sending half only (like `nc` at the end of its input): the
    /// proxy sees EOF but can still write.
    pub async fn shutdown_write(&mut self) {
        self.writer.shutdown().await.unwrap();
    }

    pub async fn send(&mut self, v: &Value) {
        let mut line = v.to_string();
        line.push('\n');
        self.send_raw(line.as_bytes()).await;
    }

    /// The next line as JSON, or `None` when the proxy closed the connection.
    pub async fn recv_opt(&mut self) -> Option<Value> {
        let mut line = String::new();
        let n = tokio::time::timeout(WAIT, self.reader.read_line(&mut line))
            .await
            .expect("no line from the proxy in time")
            .ok()?;
        if n == 0 {
            return None;
        }
        Some(
            serde_json::from_str(&line)
                .unwrap_or_else(|e| panic!("invalid JSON from proxy: {e}: {line}")),
        )
    }

    /// The next line as raw text (without the newline).
    pub async fn recv_line(&mut self) -> Option<String> {
        let mut line = String::new();
        let n = tokio::time::timeout(WAIT, self.reader.read_line(&mut line))
            .await
            .expect("no line from the proxy in time")
            .ok()?;
        if n == 0 {
            return None;
        }
        Some(line.trim_end_matches('\n').to_string())
    }

    pub async fn recv(&mut self) -> Value {
        self.recv_opt().await.expect("connection closed")
    }

    /// Send a request and return the reply with the same id (notifications
    /// arriving meanwhile are skipped).
    pub async fn request(&mut self, method: &str, params: Value) -> Value {
        let id = self.next_id;
        self.next_id += 1;
        self.send(&json!({"jsonrpc":"2.0","id":id,"method":method,"params":params}))
            .await;
        loop {
            let v = self.recv().await;
            if v["id"] == json!(id) {
                return v;
            }
        }
    }

    /// `request`, expecting a result.
    pub async fn call(&mut self, method: &str, params: Value) -> Value {
        let v = self.request(method, params).await;
        assert!(v.get("error").is_none(), "{method} failed: {v}");
        v["result"].clone()
    }

    /// Wait for a notification of `method` (replies meanwhile are skipped).
    pub async fn notification(&mut self, method: &str) -> Value {
        loop {
            let v = self.recv().await;
            if v["method"] == json!(method) && v.get("id").is_none() {
                return v["params"].clone();
            }
        }
    }

    /// True when the proxy closed the connection (EOF) within WAIT.
    pub async fn closed(&mut self) -> bool {
        loop {
            match self.recv_line().await {
                None => return true,
                Some(_) => continue,
            }
        }
    }
}

pub fn tls_connector() -> tokio_rustls::TlsConnector {
    #[derive(Debug)]
    struct Any(Arc<rustls::crypto::CryptoProvider>);
    impl rustls::client::danger::ServerCertVerifier for Any {
        fn verify_server_cert(
            &self,
            _: &rustls::pki_types::CertificateDer<'_>,
            _: &[rustls::pki_types::CertificateDer<'_>],
            _: &rustls::pki_types::ServerName<'_>,
            _: &[u8],
            _: rustls::pki_types::UnixTime,
        ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
            Ok(rustls::client::danger::ServerCertVerified::assertion())
        }
        fn verify_tls12_signature(
            &self,
            m: &[u8],
            c: &rustls::pki_types::CertificateDer<'_>,
            d: &rustls::DigitallySignedStruct,
        ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls12_signature(
                m,
                c,
                d,
                &self.0.signature_verification_algorithms,
            )
        }
        fn verify_tls13_signature(
            &self,
            m: &[u8],
            c: &rustls::pki_types::CertificateDer<'_>,
            d: &rustls::DigitallySignedStruct,
        ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls13_signature(
                m,
                c,
                d,
                &self.0.signature_verification_algorithms,
            )
        }
        fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
            self.0.signature_verification_algorithms.supported_schemes()
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(Any(provider)))
        .with_no_client_auth();
    tokio_rustls::TlsConnector::from(Arc::new(config))
}

/// A scripthash for test number `i`.
pub fn scripthash(i: usize) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(format!("script-{i}").as_bytes()))
}

/// A fake txid for test number `i`.
pub fn txid(i: usize) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(format!("tx-{i}").as_bytes()))
}

/// `[server]` settings every test config gets unless it sets them itself.
const TEST_SERVER_DEFAULTS: [(&str, &str); 3] = [
    ("request_timeout_secs", "5"),
    ("shutdown_grace_secs", "2"),
    ("upstream_stall_secs", "2"),
];

/// A TOML config with any number of coins, each with TCP and TLS listeners
/// on ports from the OS. A coin is `(name, upstreams, extra)`: `upstreams`
/// are TOML values (see [`upstream_toml`]; a plain URL is `format!("{url:?}")`)
/// and `extra` is appended to the coin table. `server_extra` is appended to
/// the `[server]` table; keys it sets replace the test defaults
/// (request timeout 5 s, grace 2 s, stall 2 s).
pub fn config_multi(server_extra: &str, coins: &[(&str, Vec<String>, &str)]) -> String {
    let root = env!("CARGO_MANIFEST_DIR");
    let mut text = format!(
        "[metrics]\nlisten = \"127.0.0.1:0\"\n\n[tls]\ncert = \"{root}/certs/server.crt\"\nkey = \"{root}/certs/server.key\"\n\n[server]\n"
    );
    for (key, value) in TEST_SERVER_DEFAULTS {
        let overridden = server_extra
            .lines()
            .any(|l| l.split('=').next().map(str::trim) == Some(key));
        if !overridden {
            text.push_str(&format!("{key} = {value}\n"));
        }
    }
    text.push_str(server_extra);
    text.push('\n');
    for (name, upstreams, extra) in coins {
        text.push_str(&format!(
            "\n[coins.{name}]\nlisten = [\"tcp://127.0.0.1:0\", \"ssl://127.0.0.1:0\"]\nupstreams = [{}]\n{extra}\n",
            upstreams.join(", ")
        ));
    }
    text
}

/// An upstream entry in table form, e.g.
/// `upstream_toml(&mock.url(), "max_connections = 1")`.
pub fn upstream_toml(url: &str, options: &str) -> String {
    if options.is_empty() {
        format!("{{ url = {url:?} }}")
    } else {
        format!("{{ url = {url:?}, {options} }}")
    }
}

/// A `tcp://127.0.0.1:PORT` URL where nothing listens (the port was bound
/// and released).
pub fn unreachable_url() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    drop(l);
    format!("tcp://127.0.0.1:{port}")
}

/// A fresh directory for this test's files, under the target directory.
pub fn temp_dir(name: &str) -> std::path::PathBuf {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!(
        "electrum-lb-test-{}-{name}-{n}",
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// GET a path on the side port; returns (status, body).
pub async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut buf = Vec::new();
    tokio::time::timeout(WAIT, tokio::io::AsyncReadExt::read_to_end(&mut s, &mut buf))
        .await
        .unwrap()
        .unwrap();
    let text = String::from_utf8(buf).unwrap();
    let status: u16 = text.split_whitespace().nth(1).unwrap().parse().unwrap();
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

/// The value of one sample line `name{labels} value`, by exact prefix.
pub fn sample(metrics: &str, series: &str) -> Option<f64> {
    metrics
        .lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// Send `server.ping` and return every message that arrived before its
/// answer: what the session was sent up to now.
pub async fn fence(c: &mut Client) -> Vec<Value> {
    c.send(&json!({"jsonrpc":"2.0","id":"fence","method":"server.ping","params":[]}))
        .await;
    let mut seen = Vec::new();
    loop {
        let v = c.recv().await;
        if v["id"] == json!("fence") {
            assert_eq!(v["result"], Value::Null, "{v}");
            return seen;
        }
        seen.push(v);
    }
}

/// A wallet session at `addr` that negotiated 1.4 and subscribed to `sh`:
/// the session and the status it was answered.
pub async fn subscribed_wallet(addr: SocketAddr, sh: &str) -> (Client, Value) {
    let mut wallet = Client::connect(addr).await;
    wallet
        .call("server.version", json!(["wallet", "1.4"]))
        .await;
    let status = wallet
        .call("blockchain.scripthash.subscribe", json!([sh]))
        .await;
    (wallet, status)
}

/// Set by `.ci/run`: a test that needs an external program (HAProxy,
/// Chromium, ...) fails when it is missing instead of skipping.
pub const REQUIRE_TOOLS_ENV: &str = "ELECTRUM_LB_REQUIRE_TOOLS";

/// The path of an external program a test drives (`haproxy`, `chromium`),
/// found on `PATH`. Missing: the test is skipped with a note on stderr, so
/// `cargo test` passes on a machine without it; but under `.ci/run`
/// ([`REQUIRE_TOOLS_ENV`] set) a missing program fails the test, so what CI
/// reports as passed really ran.
pub fn require_tool(name: &str) -> Option<std::path::PathBuf> {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join(name))
            .find(|p| p.is_file())
    });
    if found.is_none() {
        if std::env::var_os(REQUIRE_TOOLS_ENV).is_some() {
            panic!("`{name}` is not installed, and {REQUIRE_TOOLS_ENV} requires it (.ci/run installs it)");
        }
        eprintln!("skipped: `{name}` is not installed (apt-get install {name}); .ci/run installs it and runs this test");
    }
    found
}
