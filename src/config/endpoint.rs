//! Listener and upstream URLs (`tcp://`, `ssl://`, and for listeners `ws://`
//! and `wss://`) and the options an entry may carry as a table; a pinned
//! certificate fingerprint is parsed here so that both validation and the
//! TLS setup read it the same way.

use serde::de::{self, Deserializer, MapAccess, Visitor};
use serde::Deserialize;
use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;

/// The transport of a listener or upstream URL.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Scheme {
    Tcp,
    Ssl,
    /// WebSocket (listeners only), one JSON-RPC message per frame.
    Ws,
    /// WebSocket over TLS (listeners only).
    Wss,
}

impl Scheme {
    pub fn as_str(self) -> &'static str {
        match self {
            Scheme::Tcp => "tcp",
            Scheme::Ssl => "ssl",
            Scheme::Ws => "ws",
            Scheme::Wss => "wss",
        }
    }

    /// The connection starts with a TLS handshake (`ssl://`, `wss://`).
    pub fn is_tls(self) -> bool {
        matches!(self, Scheme::Ssl | Scheme::Wss)
    }

    /// The connection is upgraded to WebSocket (`ws://`, `wss://`).
    pub fn is_websocket(self) -> bool {
        matches!(self, Scheme::Ws | Scheme::Wss)
    }
}

impl fmt::Display for Scheme {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `scheme://host:port`, split. `host` keeps no brackets for IPv6.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Url {
    pub scheme: Scheme,
    pub host: String,
    pub port: u16,
}

impl fmt::Display for Url {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "{}://[{}]:{}", self.scheme, self.host, self.port)
        } else {
            write!(f, "{}://{}:{}", self.scheme, self.host, self.port)
        }
    }
}

impl std::str::FromStr for Url {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (scheme, rest) = s.split_once("://").ok_or_else(|| {
            format!("`{s}` is not a URL: expected tcp://HOST:PORT or ssl://HOST:PORT")
        })?;
        let scheme = match scheme {
            "tcp" => Scheme::Tcp,
            "ssl" | "tls" => Scheme::Ssl,
            "ws" => Scheme::Ws,
            "wss" => Scheme::Wss,
            other => {
                return Err(format!(
                    "unknown scheme `{other}` in `{s}`: use tcp://, ssl://, ws:// or wss://"
                ))
            }
        };
        let rest = rest.trim_end_matches('/');
        let (host, port) = if let Some(stripped) = rest.strip_prefix('[') {
            let (h, p) = stripped
                .split_once("]:")
                .ok_or_else(|| format!("`{s}`: an IPv6 address needs the form [ADDR]:PORT"))?;
            (h, p)
        } else {
            rest.rsplit_once(':')
                .ok_or_else(|| format!("`{s}` has no port"))?
        };
        if host.is_empty() {
            return Err(format!("`{s}` has no host"));
        }
        let port: u16 = port
            .parse()
            .map_err(|_| format!("`{s}`: `{port}` is not a port number"))?;
        Ok(Url {
            scheme,
            host: host.to_string(),
            port,
        })
    }
}

impl Url {
    /// The socket address of a listener URL (its host must be an IP literal).
    pub fn socket_addr(&self) -> Result<SocketAddr, String> {
        let ip: std::net::IpAddr = self
            .host
            .parse()
            .map_err(|_| format!("listener host `{}` must be an IP address", self.host))?;
        Ok(SocketAddr::new(ip, self.port))
    }
}

/// A `listen` entry: a URL string or a table with options.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenEntry {
    pub url: Url,
    /// Expect a PROXY protocol (v1 or v2) header on every connection.
    pub proxy_protocol: bool,
    /// `ws://` and `wss://` only: the HTTP path the upgrade is accepted on
    /// (`None`: `/`).
    pub path: Option<String>,
    /// `ws://` and `wss://` only: the `Origin` values accepted (`None`: any).
    pub origins: Option<Vec<String>>,
}

impl ListenEntry {
    /// The path a WebSocket upgrade is accepted on.
    pub fn ws_path(&self) -> &str {
        self.path.as_deref().unwrap_or("/")
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ListenTable {
    url: String,
    #[serde(default)]
    proxy_protocol: bool,
    #[serde(default)]
    path: Option<String>,
    #[serde(default)]
    origins: Option<Vec<String>>,
}

impl TryFrom<ListenTable> for ListenEntry {
    type Error = String;
    fn try_from(t: ListenTable) -> Result<Self, String> {
        Ok(ListenEntry {
            url: t.url.parse()?,
            proxy_protocol: t.proxy_protocol,
            path: t.path,
            origins: t.origins,
        })
    }
}

impl TryFrom<String> for ListenEntry {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        Ok(ListenEntry {
            url: s.parse()?,
            proxy_protocol: false,
            path: None,
            origins: None,
        })
    }
}

/// An `upstreams` entry: a URL string or a table with options.
#[derive(Debug, Clone, PartialEq)]
pub struct UpstreamEntry {
    pub url: Url,
    /// Relative share of new requests among primaries.
    pub weight: u32,
    /// Used only while no primary upstream is healthy.
    pub backup: bool,
    /// PEM file of CA certificates to verify an `ssl://` upstream against,
    /// instead of the system roots.
    pub ca_file: Option<PathBuf>,
    /// SHA-256 fingerprint (hex, `:` allowed) the upstream's certificate must
    /// have; replaces CA verification.
    pub fingerprint: Option<String>,
    /// Skip certificate verification entirely (logged as a warning).
    pub insecure: bool,
    pub min_connections: usize,
    pub max_connections: usize,
    /// Ceiling of the in-flight limit each connection learns from answer
    /// times (see `upstream::limit`).
    pub max_in_flight: usize,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UpstreamTable {
    url: String,
    #[serde(default = "default_weight")]
    weight: u32,
    #[serde(default)]
    backup: bool,
    #[serde(default)]
    ca_file: Option<PathBuf>,
    #[serde(default)]
    fingerprint: Option<String>,
    #[serde(default)]
    insecure: bool,
    #[serde(default = "default_min_connections")]
    min_connections: usize,
    #[serde(default = "default_max_connections")]
    max_connections: usize,
    #[serde(default = "default_max_in_flight")]
    max_in_flight: usize,
}

fn default_weight() -> u32 {
    1
}
fn default_min_connections() -> usize {
    1
}
/// Against ElectrumX at its default limits, 8 per upstream gave parity
/// with HAProxy at 16 wallets and 16 gave more (issue 14); the pool opens
/// them only while requests queue, and never more than the coin's client
/// sessions.
fn default_max_connections() -> usize {
    16
}
fn default_max_in_flight() -> usize {
    256
}

impl TryFrom<UpstreamTable> for UpstreamEntry {
    type Error = String;
    fn try_from(t: UpstreamTable) -> Result<Self, String> {
        Ok(UpstreamEntry {
            url: t.url.parse()?,
            weight: t.weight,
            backup: t.backup,
            ca_file: t.ca_file,
            fingerprint: t.fingerprint,
            insecure: t.insecure,
            min_connections: t.min_connections,
            max_connections: t.max_connections,
            max_in_flight: t.max_in_flight,
        })
    }
}

impl TryFrom<String> for UpstreamEntry {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        UpstreamTable {
            url: s,
            weight: default_weight(),
            backup: false,
            ca_file: None,
            fingerprint: None,
            insecure: false,
            min_connections: default_min_connections(),
            max_connections: default_max_connections(),
            max_in_flight: default_max_in_flight(),
        }
        .try_into()
    }
}

/// Deserialize "a URL string or a table" into `T` with readable errors
/// (an untagged enum would only say "did not match any variant").
fn string_or_table<'de, D, T, Tab>(d: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: TryFrom<String, Error = String> + TryFrom<Tab, Error = String>,
    Tab: Deserialize<'de>,
{
    struct V<T, Tab>(std::marker::PhantomData<(T, Tab)>);
    impl<'de, T, Tab> Visitor<'de> for V<T, Tab>
    where
        T: TryFrom<String, Error = String> + TryFrom<Tab, Error = String>,
        Tab: Deserialize<'de>,
    {
        type Value = T;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a URL string or a table with `url`")
        }
        fn visit_str<E: de::Error>(self, s: &str) -> Result<T, E> {
            T::try_from(s.to_string()).map_err(E::custom)
        }
        fn visit_map<M: MapAccess<'de>>(self, map: M) -> Result<T, M::Error> {
            let table = Tab::deserialize(de::value::MapAccessDeserializer::new(map))?;
            T::try_from(table).map_err(de::Error::custom)
        }
    }
    d.deserialize_any(V::<T, Tab>(std::marker::PhantomData))
}

impl<'de> Deserialize<'de> for ListenEntry {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        string_or_table::<D, ListenEntry, ListenTable>(d)
    }
}

impl<'de> Deserialize<'de> for UpstreamEntry {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        string_or_table::<D, UpstreamEntry, UpstreamTable>(d)
    }
}

/// A SHA-256 certificate fingerprint in hex, colons and spaces allowed.
pub fn parse_fingerprint(text: &str) -> Result<[u8; 32], String> {
    let clean: String = text
        .chars()
        .filter(|c| *c != ':' && !c.is_whitespace())
        .collect();
    let bytes = hex::decode(&clean).map_err(|_| "must be hex (colons allowed)".to_string())?;
    bytes
        .try_into()
        .map_err(|_| "must be a SHA-256 fingerprint (32 bytes, 64 hex digits)".to_string())
}
