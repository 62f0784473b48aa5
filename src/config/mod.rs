//! The TOML configuration: schema, defaults, loading and validation.
//!
//! Owns: turning a file into a checked [`Config`]. Every error names the file,
//! the key and the reason. It does not open sockets or read certificates
//! (that is `tls` and `app`); `validate` only checks what can be known from
//! the text itself.
//!
//! Layout: this file holds the whole-file [`Config`], loading and the
//! validation that spans tables; `server` the process-wide tables
//! (`[server]`, `[metrics]`, `[tls]`, `[cache]`); `coin` one `[coins.NAME]`
//! table; `endpoint` listener and upstream URLs and their options.

mod coin;
mod endpoint;
mod server;

pub use coin::CoinConfig;
pub use endpoint::{parse_fingerprint, ListenEntry, Scheme, UpstreamEntry, Url};
pub use server::{CacheConfig, MetricsConfig, ServerConfig, TlsFiles, ADMIN_PATHS};

use serde::Deserialize;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;

/// The whole file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub metrics: MetricsConfig,
    /// Certificate and key for every `ssl://` listener.
    pub tls: Option<TlsFiles>,
    #[serde(default)]
    pub server: ServerConfig,
    /// `[limits]`: abuse limits at the edge, checked as they are read.
    #[serde(default, deserialize_with = "crate::limits::deserialize_checked")]
    pub limits: crate::limits::LimitsConfig,
    #[serde(default)]
    pub coins: BTreeMap<String, CoinConfig>,
    #[serde(default)]
    pub cache: CacheConfig,
}

/// A configuration problem, naming where it is.
#[derive(Debug, thiserror::Error)]
#[error("{file}: {key}: {reason}")]
pub struct ConfigError {
    pub file: String,
    pub key: String,
    pub reason: String,
}

impl Config {
    /// Read, parse and validate a file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            file: file.clone(),
            key: "(file)".into(),
            reason: format!("cannot read: {e}"),
        })?;
        Config::parse(&text, &file)
    }

    /// Parse and validate TOML text; `file` only labels errors.
    pub fn parse(text: &str, file: &str) -> Result<Config, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|e| {
            let (line, col) = e.span().map(|s| line_col(text, s.start)).unwrap_or((0, 0));
            let place = format!("line {line}, column {col}");
            let key = match e.span().and_then(|s| key_at(text, s.start)) {
                Some(key) => format!("{key} ({place})"),
                None => place,
            };
            ConfigError {
                file: file.to_string(),
                key,
                reason: e.message().to_string(),
            }
        })?;
        config.validate().map_err(|(key, reason)| ConfigError {
            file: file.to_string(),
            key,
            reason,
        })?;
        Ok(config)
    }

    /// Reject contradictions, naming the offending key.
    pub fn validate(&self) -> Result<(), (String, String)> {
        self.cache.validate()?;
        let s = &self.server;
        if s.max_line_bytes < 1024 {
            return Err((
                "server.max_line_bytes".into(),
                "must be at least 1024".into(),
            ));
        }
        if s.session_queue == 0 {
            return Err(("server.session_queue".into(), "must be at least 1".into()));
        }
        if s.request_timeout_secs == 0 {
            return Err((
                "server.request_timeout_secs".into(),
                "must be at least 1".into(),
            ));
        }
        if s.handshake_timeout_secs == 0 {
            return Err((
                "server.handshake_timeout_secs".into(),
                "must be at least 1".into(),
            ));
        }
        if s.upstream_stall_secs == 0
            || s.upstream_ping_secs == 0
            || s.upstream_connect_timeout_secs == 0
        {
            return Err((
                "server.upstream_*_secs".into(),
                "upstream_ping_secs, upstream_stall_secs and upstream_connect_timeout_secs must be at least 1".into(),
            ));
        }
        if s.upstream_reconnect_max_ms < 200 {
            return Err((
                "server.upstream_reconnect_max_ms".into(),
                "must be at least 200 (the first retry comes after 200 ms)".into(),
            ));
        }
        if s.health_interval_ms < 10 || s.upstream_idle_close_secs == 0 {
            return Err((
                "server.health_interval_ms".into(),
                "health_interval_ms must be at least 10 and upstream_idle_close_secs at least 1"
                    .into(),
            ));
        }
        if s.max_batch == 0 {
            return Err(("server.max_batch".into(), "must be at least 1".into()));
        }
        if s.drain_notice_secs > 3600 || s.shutdown_grace_secs > 3600 {
            return Err((
                "server.drain_notice_secs".into(),
                "drain_notice_secs and shutdown_grace_secs must be at most 3600".into(),
            ));
        }
        if let Some(path) = &s.handoff_socket {
            // sun_path holds 108 bytes, and a temporary name adds ".PID".
            if path.as_os_str().is_empty() || path.as_os_str().len() > 90 {
                return Err((
                    "server.handoff_socket".into(),
                    "must be a path of 1 to 90 bytes (a Unix socket's limit)".into(),
                ));
            }
        }
        self.metrics.validate()?;
        if self.coins.is_empty() {
            return Err(("coins".into(), "no coin is configured".into()));
        }
        let mut bound: BTreeMap<SocketAddr, String> = BTreeMap::new();
        bound.insert(self.metrics.listen, "metrics.listen".into());
        for (name, coin) in &self.coins {
            let key = |k: &str| format!("coins.{name}.{k}");
            if coin.listen.is_empty() {
                return Err((key("listen"), "needs at least one listener".into()));
            }
            for (i, l) in coin.listen.iter().enumerate() {
                let addr = l
                    .url
                    .socket_addr()
                    .map_err(|e| (format!("{}[{i}]", key("listen")), e))?;
                if l.url.scheme.is_tls() && self.tls.is_none() {
                    return Err((
                        format!("{}[{i}]", key("listen")),
                        format!(
                            "{} {}:// listener needs a [tls] table with cert and key",
                            if l.url.scheme == Scheme::Ssl {
                                "an"
                            } else {
                                "a"
                            },
                            l.url.scheme
                        ),
                    ));
                }
                validate_websocket(l)
                    .map_err(|(k, e)| (format!("{}[{i}]{k}", key("listen")), e))?;
                if addr.port() != 0 {
                    if let Some(prev) = bound.insert(addr, format!("{}[{i}]", key("listen"))) {
                        return Err((
                            format!("{}[{i}]", key("listen")),
                            format!("address {addr} is already used by {prev}"),
                        ));
                    }
                }
            }
            if coin.upstreams.is_empty() {
                return Err((key("upstreams"), "needs at least one upstream".into()));
            }
            for (i, u) in coin.upstreams.iter().enumerate() {
                let k = format!("{}[{i}]", key("upstreams"));
                if u.max_in_flight == 0 {
                    return Err((format!("{k}.max_in_flight"), "must be at least 1".into()));
                }
                if u.max_connections == 0 || u.min_connections > u.max_connections {
                    return Err((
                        format!("{k}.max_connections"),
                        "must be at least 1 and at least min_connections".into(),
                    ));
                }
                if u.weight == 0 {
                    return Err((format!("{k}.weight"), "must be at least 1".into()));
                }
                if u.url.scheme.is_websocket() {
                    return Err((
                        k,
                        "WebSocket upstreams are not supported: use tcp:// or ssl://".into(),
                    ));
                }
                let tls_opts = u.ca_file.is_some() || u.fingerprint.is_some() || u.insecure;
                if u.url.scheme == Scheme::Tcp && tls_opts {
                    return Err((
                        k,
                        "ca_file, fingerprint and insecure apply only to ssl:// upstreams".into(),
                    ));
                }
                let modes = [u.ca_file.is_some(), u.fingerprint.is_some(), u.insecure]
                    .iter()
                    .filter(|b| **b)
                    .count();
                if modes > 1 {
                    return Err((k, "choose one of ca_file, fingerprint and insecure".into()));
                }
                if let Some(fp) = &u.fingerprint {
                    parse_fingerprint(fp).map_err(|e| (format!("{k}.fingerprint"), e))?;
                }
            }
            let version = |field: &str, v: &str| {
                v.parse::<crate::protocol::Version>()
                    .ok()
                    .filter(|v| v.0 == 1)
                    .ok_or_else(|| {
                        (
                            key(field),
                            "must be a protocol version such as \"1.4\"".to_string(),
                        )
                    })
            };
            let min = version("upstream_protocol", &coin.upstream_protocol)?;
            let max = version("upstream_protocol_max", &coin.upstream_protocol_max)?;
            if max < min {
                return Err((
                    key("upstream_protocol_max"),
                    format!("must not be below upstream_protocol ({min})"),
                ));
            }
            if max > crate::protocol::PROTOCOL_MAX {
                return Err((
                    key("upstream_protocol_max"),
                    format!("this proxy speaks up to {}", crate::protocol::PROTOCOL_MAX),
                ));
            }
            if let Some(g) = &coin.genesis_hash {
                if g.len() != 64 || hex::decode(g).is_err() {
                    return Err((key("genesis_hash"), "must be 64 hex digits".into()));
                }
            }
            if coin.max_subscriptions_per_session == 0 {
                return Err((
                    key("max_subscriptions_per_session"),
                    "must be at least 1".into(),
                ));
            }
        }
        Ok(())
    }
}

/// The WebSocket options of one listener: only on `ws://` and `wss://`, a
/// path that starts with `/`, origins written as browsers send them
/// (`scheme://host[:port]`, no path). The error's key is relative to the
/// entry (`.path`, `.origins`).
fn validate_websocket(l: &ListenEntry) -> Result<(), (String, String)> {
    if !l.url.scheme.is_websocket() {
        if l.path.is_some() || l.origins.is_some() {
            return Err((
                String::new(),
                "path and origins apply only to ws:// and wss:// listeners".into(),
            ));
        }
        return Ok(());
    }
    if let Some(path) = &l.path {
        if !path.starts_with('/') || path.contains(char::is_whitespace) || path.contains('?') {
            return Err((
                ".path".into(),
                "must be an HTTP path such as \"/\" or \"/electrum\" (no query)".into(),
            ));
        }
    }
    for origin in l.origins.iter().flatten() {
        let ok = origin.split_once("://").is_some_and(|(scheme, host)| {
            !scheme.is_empty() && !host.is_empty() && !host.contains('/')
        });
        if !ok && origin != "null" {
            return Err((
                ".origins".into(),
                format!(
                    "`{origin}` is not an origin: write it as a browser sends it, e.g. \"https://wallet.example.org\" (scheme and host, no path)"
                ),
            ));
        }
    }
    Ok(())
}

/// The dotted key whose value sits at `offset`: the last `[table]` header
/// above it, plus the `key =` on its own line. `None` when the error is not
/// inside a `key = value` line (a bad header, say), where line and column
/// say enough.
fn key_at(text: &str, offset: usize) -> Option<String> {
    let offset = offset.min(text.len());
    let line_start = text[..offset].rfind('\n').map(|i| i + 1).unwrap_or(0);
    let line_end = text[offset..]
        .find('\n')
        .map(|i| offset + i)
        .unwrap_or(text.len());
    let line = &text[line_start..line_end];
    let (key, _) = line.split_once('=')?;
    let key = key.trim().trim_matches('"');
    if key.is_empty()
        || key.starts_with('#')
        || key.starts_with('[')
        || key.contains(char::is_whitespace)
    {
        return None;
    }
    let table = text[..line_start]
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| l.starts_with('[') && !l.starts_with("[["))
        .map(|l| l.trim_matches(|c| c == '[' || c == ']').trim().to_string());
    // Inside an inline table (`{ url = ..., weight = "x" }`), name the
    // member too: the last `name =` before the error.
    let mut key = key.to_string();
    let before = &text[line_start..offset];
    if let Some(brace) = before.rfind('{') {
        if let Some(eq) = before[brace..].rfind('=') {
            let inner = before[brace..brace + eq]
                .rsplit([',', '{'])
                .next()
                .unwrap_or("")
                .trim();
            if !inner.is_empty() && !inner.contains(char::is_whitespace) {
                key = format!("{key}.{inner}");
            }
        }
    }
    Some(match table {
        Some(t) if !t.is_empty() => format!("{t}.{key}"),
        _ => key,
    })
}

fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let col = before.len() - before.rfind('\n').map(|i| i + 1).unwrap_or(0) + 1;
    (line, col)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    const MINIMAL: &str = r#"
[coins.test]
listen = ["tcp://127.0.0.1:0"]
upstreams = ["tcp://127.0.0.1:1"]
"#;

    #[test]
    fn minimal_config_gets_defaults() {
        let c = Config::parse(MINIMAL, "t.toml").unwrap();
        assert_eq!(c.server.max_line_bytes, 1024 * 1024);
        assert_eq!(c.server.request_timeout_secs, 30);
        assert_eq!(c.metrics.listen.port(), 9105);
        let coin = &c.coins["test"];
        assert_eq!(coin.upstreams[0].max_in_flight, 256);
        assert_eq!(coin.upstream_protocol, "1.4");
        assert_eq!(coin.upstream_protocol_max, "1.7");
        assert_eq!(c.server.failover_hold(), Duration::from_secs(10));
    }

    #[test]
    fn failover_hold_is_capped_by_the_request_timeout() {
        let c = Config::parse(
            &format!("[server]\nrequest_timeout_secs = 5\n{MINIMAL}"),
            "t.toml",
        )
        .unwrap();
        assert_eq!(c.server.failover_hold(), Duration::from_millis(2500));
        let c = Config::parse(
            &format!("[server]\nfailover_hold_ms = 0\n{MINIMAL}"),
            "t.toml",
        )
        .unwrap();
        assert_eq!(c.server.failover_hold(), Duration::ZERO);
    }

    #[test]
    fn urls() {
        let u: Url = "ssl://[::1]:50002".parse().unwrap();
        assert_eq!(
            (u.scheme, u.host.as_str(), u.port),
            (Scheme::Ssl, "::1", 50002)
        );
        assert_eq!(u.to_string(), "ssl://[::1]:50002");
        let u: Url = "tcp://onix.araguaneybits.com:50001".parse().unwrap();
        assert_eq!(u.host, "onix.araguaneybits.com");
        assert!("http://x:1".parse::<Url>().is_err());
        assert!("tcp://x".parse::<Url>().is_err());
        assert!("tcp://x:99999".parse::<Url>().is_err());
        assert!("x:1".parse::<Url>().is_err());
    }

    #[test]
    fn upstream_table_form() {
        let text = r#"
[coins.test]
listen = [{ url = "tcp://127.0.0.1:0", proxy_protocol = true }]
upstreams = ["tcp://a:1", { url = "ssl://b:2", insecure = true, backup = true, weight = 3 }]
"#;
        let c = Config::parse(text, "t.toml").unwrap();
        let coin = &c.coins["test"];
        assert!(coin.listen[0].proxy_protocol);
        assert!(coin.upstreams[1].insecure && coin.upstreams[1].backup);
        assert_eq!(coin.upstreams[1].weight, 3);
    }

    #[test]
    fn websocket_listeners() {
        let text = format!(
            r#"{}
[coins.test]
listen = ["ws://127.0.0.1:0", {{ url = "wss://127.0.0.1:0", path = "/electrum", origins = ["https://wallet.example.org"] }}]
upstreams = ["tcp://a:1"]
"#,
            "[tls]\ncert = \"c.pem\"\nkey = \"k.pem\"\n"
        );
        let c = Config::parse(&text, "t.toml").unwrap();
        let coin = &c.coins["test"];
        assert_eq!(coin.listen[0].url.scheme, Scheme::Ws);
        assert_eq!(coin.listen[0].ws_path(), "/");
        assert_eq!(coin.listen[1].url.scheme, Scheme::Wss);
        assert_eq!(coin.listen[1].ws_path(), "/electrum");
        assert_eq!(
            coin.listen[1].origins.as_deref(),
            Some(&["https://wallet.example.org".to_string()][..])
        );
        assert_eq!(c.server.ws_ping_secs, 20);
    }

    #[test]
    fn websocket_errors_name_the_key() {
        let e = err("[coins.x]\nlisten = [\"wss://127.0.0.1:0\"]\nupstreams = [\"tcp://a:1\"]\n");
        assert_eq!(
            e,
            "bad.toml: coins.x.listen[0]: a wss:// listener needs a [tls] table with cert and key"
        );
        let e = err("[coins.x]\nlisten = [{ url = \"tcp://127.0.0.1:0\", path = \"/\" }]\nupstreams = [\"tcp://a:1\"]\n");
        assert_eq!(
            e,
            "bad.toml: coins.x.listen[0]: path and origins apply only to ws:// and wss:// listeners"
        );
        let e = err("[coins.x]\nlisten = [{ url = \"ws://127.0.0.1:0\", path = \"electrum\" }]\nupstreams = [\"tcp://a:1\"]\n");
        assert!(
            e.starts_with("bad.toml: coins.x.listen[0].path: must be an HTTP path"),
            "{e}"
        );
        let e = err("[coins.x]\nlisten = [{ url = \"ws://127.0.0.1:0\", origins = [\"https://a.org/wallet\"] }]\nupstreams = [\"tcp://a:1\"]\n");
        assert!(
            e.starts_with(
                "bad.toml: coins.x.listen[0].origins: `https://a.org/wallet` is not an origin"
            ),
            "{e}"
        );
        let e = err("[coins.x]\nlisten = [\"ws://127.0.0.1:0\"]\nupstreams = [\"ws://a:1\"]\n");
        assert_eq!(
            e,
            "bad.toml: coins.x.upstreams[0]: WebSocket upstreams are not supported: use tcp:// or ssl://"
        );
    }

    fn err(text: &str) -> String {
        Config::parse(text, "bad.toml").unwrap_err().to_string()
    }

    #[test]
    fn errors_name_file_key_and_reason() {
        let e = err(
            "[coins.x]\nlisten = [\"tcp://127.0.0.1:0\"]\nupstreams = [\"tcp://a:1\"]\nbogus = 1\n",
        );
        assert!(
            e.starts_with("bad.toml: coins.x.bogus (line 4, column 1): unknown field `bogus`"),
            "{e}"
        );
        let e = err("[server]\nrequest_timeout_secs = \"soon\"\n[coins.x]\nlisten = [\"tcp://127.0.0.1:0\"]\nupstreams = [\"tcp://a:1\"]\n");
        assert!(
            e.starts_with(
                "bad.toml: server.request_timeout_secs (line 2, column 24): invalid type"
            ),
            "{e}"
        );
        let e = err("[coins.x]\nlisten = [\"tcp://127.0.0.1:0\"]\nupstreams = [{ url = \"tcp://a:1\", weight = \"x\" }]\n");
        assert!(e.starts_with("bad.toml: coins.x.upstreams.weight ("), "{e}");
        let e = err("[coins.x]\nlisten = [\"udp://127.0.0.1:0\"]\nupstreams = [\"tcp://a:1\"]\n");
        assert!(e.contains("unknown scheme `udp`"), "{e}");
        let e = err("[coins.x]\nlisten = [\"ssl://127.0.0.1:0\"]\nupstreams = [\"tcp://a:1\"]\n");
        assert_eq!(
            e,
            "bad.toml: coins.x.listen[0]: an ssl:// listener needs a [tls] table with cert and key"
        );
        let e = err("[coins.x]\nlisten = [\"tcp://127.0.0.1:0\"]\nupstreams = []\n");
        assert_eq!(
            e,
            "bad.toml: coins.x.upstreams: needs at least one upstream"
        );
        let e = err("[coins.x]\nlisten = [\"tcp://localhost:1\"]\nupstreams = [\"tcp://a:1\"]\n");
        assert!(
            e.contains("coins.x.listen[0]: listener host `localhost` must be an IP address"),
            "{e}"
        );
        let e = err("[coins.x]\nlisten = [\"tcp://127.0.0.1:5\"]\nupstreams = [{url=\"ssl://a:1\", insecure=true, fingerprint=\"00\"}]\n");
        assert!(e.contains("choose one of"), "{e}");
        let e = err("[coins.x]\nlisten = [\"tcp://127.0.0.1:5\", \"tcp://127.0.0.1:5\"]\nupstreams = [\"tcp://a:1\"]\n");
        assert!(e.contains("already used by coins.x.listen[0]"), "{e}");
        assert_eq!(err(""), "bad.toml: coins: no coin is configured");
        let coin = "[coins.x]\nlisten = [\"tcp://127.0.0.1:5\"]\nupstreams = [\"tcp://a:1\"]\n";
        let e = err(&format!("{coin}upstream_protocol_max = \"1.8\"\n"));
        assert!(
            e.contains("coins.x.upstream_protocol_max: this proxy speaks up to 1.7"),
            "{e}"
        );
        let e = err(&format!(
            "{coin}upstream_protocol = \"1.6\"\nupstream_protocol_max = \"1.4\"\n"
        ));
        assert!(
            e.contains("coins.x.upstream_protocol_max: must not be below"),
            "{e}"
        );
        let e = err(&format!("{coin}upstream_protocol = \"x\"\n"));
        assert!(
            e.contains("coins.x.upstream_protocol: must be a protocol version"),
            "{e}"
        );
    }

    #[test]
    fn shipped_configs_load() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("config");
        let mut n = 0;
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().and_then(|e| e.to_str()) == Some("toml") {
                Config::load(&path).unwrap_or_else(|e| panic!("{e}"));
                n += 1;
            }
        }
        assert!(n >= 1);
    }
}
