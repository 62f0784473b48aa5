//! One `[coins.NAME]` table: a coin's listeners, upstreams, what the proxy
//! says about it, and its subscription limits.

use super::{ListenEntry, UpstreamEntry};
use serde::Deserialize;

/// One coin: its listeners, its upstreams and what the proxy says about it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CoinConfig {
    pub listen: Vec<ListenEntry>,
    pub upstreams: Vec<UpstreamEntry>,
    /// Text of `server.banner`.
    #[serde(default)]
    pub banner: Option<String>,
    /// Answer of `server.donation_address`.
    #[serde(default)]
    pub donation_address: Option<String>,
    /// Host name advertised in `server.features` `hosts`.
    #[serde(default)]
    pub hostname: Option<String>,
    /// Genesis block hash for `server.features`; learned from an upstream
    /// when not set.
    #[serde(default)]
    pub genesis_hash: Option<String>,
    /// Protocol version the proxy asks every upstream of this coin for.
    #[serde(default = "default_upstream_protocol")]
    pub upstream_protocol: String,
    /// Highest protocol version asked of an upstream that offers more than
    /// `upstream_protocol`, on one extra connection (its protocol slot);
    /// equal to `upstream_protocol`: no extra connection.
    #[serde(default = "default_upstream_protocol_max")]
    pub upstream_protocol_max: String,
    /// Base58check version byte of P2PKH addresses (built-in for known coins).
    #[serde(default)]
    pub p2pkh_version: Option<u8>,
    /// Base58check version byte of P2SH addresses (built-in for known coins).
    #[serde(default)]
    pub p2sh_version: Option<u8>,
    /// Blocks an upstream may trail the best tip among this coin's upstreams
    /// before it leaves rotation.
    #[serde(default = "default_max_lag")]
    pub max_lag: u64,
    /// Most subscriptions one session may hold.
    #[serde(default = "default_max_subs_per_session")]
    pub max_subscriptions_per_session: usize,
    /// Most distinct scripthash subscriptions held for this coin.
    #[serde(default = "default_max_subs_total")]
    pub max_subscriptions_total: usize,
}

fn default_upstream_protocol() -> String {
    "1.4".into()
}
fn default_upstream_protocol_max() -> String {
    crate::protocol::PROTOCOL_MAX.to_string()
}
fn default_max_lag() -> u64 {
    2
}
fn default_max_subs_per_session() -> usize {
    // ElectrumX's default MAX_SUBS_PER_SESSION is 50,000.
    50_000
}
fn default_max_subs_total() -> usize {
    1_000_000
}
