//! The `[limits]` table: its keys, defaults and validation, and the exempt
//! networks it names.

use super::group::GroupKey;
use serde::{Deserialize, Deserializer};
use std::net::IpAddr;

/// The `[limits]` table.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Client connections open at once, over every coin and listener
    /// (TLS handshakes and PROXY headers in progress included).
    pub max_sessions: usize,
    /// Client connections open at once from one IP group.
    pub max_sessions_per_group: usize,
    /// Prefix length that groups IPv4 clients (24: one /24 is one group).
    pub ipv4_group_bits: u8,
    /// Prefix length that groups IPv6 clients (48: one /48 is one group).
    pub ipv6_group_bits: u8,
    /// Networks (CIDR) exempt from the group limit and the token buckets.
    pub exempt: Vec<String>,
    /// Points per second refilled into each session's bucket.
    pub session_rate: f64,
    /// Capacity of each session's bucket, in points.
    pub session_burst: f64,
    /// Points per second refilled into each IP group's shared bucket.
    pub group_rate: f64,
    /// Capacity of each IP group's shared bucket, in points.
    pub group_burst: f64,
    /// Bytes received or sent that cost one point.
    pub bytes_per_point: u64,
    /// Refused requests in a row after which a session is disconnected.
    pub max_refusals: u32,
    /// Requests (or batches) of one session awaiting an answer before the
    /// session is no longer read.
    pub max_in_flight: usize,
    /// Largest reply line relayed to a client; larger ones become errors.
    pub max_response_bytes: usize,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            max_sessions: 20_000,
            max_sessions_per_group: 200,
            ipv4_group_bits: 24,
            ipv6_group_bits: 48,
            exempt: vec!["127.0.0.0/8".into(), "::1/128".into()],
            // 500 headers or 100 histories a second, after a burst worth a
            // large wallet's first synchronisation.
            session_rate: 5_000.0,
            session_burst: 100_000.0,
            group_rate: 20_000.0,
            group_burst: 400_000.0,
            bytes_per_point: 1024,
            max_refusals: 100,
            max_in_flight: 100,
            max_response_bytes: 4 * 1024 * 1024,
        }
    }
}

impl LimitsConfig {
    /// Reject contradictions, naming the offending key.
    pub fn validate(&self) -> Result<(), (String, String)> {
        let err = |k: &str, r: &str| Err((format!("limits.{k}"), r.to_string()));
        let at_least_one = [
            ("max_sessions", self.max_sessions),
            ("max_sessions_per_group", self.max_sessions_per_group),
            ("max_in_flight", self.max_in_flight),
            ("bytes_per_point", self.bytes_per_point as usize),
            ("max_refusals", self.max_refusals as usize),
        ];
        for (k, v) in at_least_one {
            if v == 0 {
                return err(k, "must be at least 1");
            }
        }
        if self.ipv4_group_bits > 32 {
            return err("ipv4_group_bits", "must be at most 32");
        }
        if self.ipv6_group_bits > 128 {
            return err("ipv6_group_bits", "must be at most 128");
        }
        let rates = [
            ("session_rate", self.session_rate),
            ("session_burst", self.session_burst),
            ("group_rate", self.group_rate),
            ("group_burst", self.group_burst),
        ];
        for (k, v) in rates {
            if !(v.is_finite() && v > 0.0) {
                return err(k, "must be a positive number");
            }
        }
        if self.max_response_bytes < 1024 {
            return err("max_response_bytes", "must be at least 1024");
        }
        for (i, net) in self.exempt.iter().enumerate() {
            if let Err(e) = parse_net(net) {
                return Err((format!("limits.exempt[{i}]"), e));
            }
        }
        Ok(())
    }
}

/// `deserialize_with` for the `[limits]` field of the config: the table,
/// checked, so a contradiction is reported like any other config error.
pub fn deserialize_checked<'de, D: Deserializer<'de>>(d: D) -> Result<LimitsConfig, D::Error> {
    let config = LimitsConfig::deserialize(d)?;
    config
        .validate()
        .map_err(|(key, reason)| serde::de::Error::custom(format!("{key}: {reason}")))?;
    Ok(config)
}

/// `ADDR/BITS` (or a bare address: all its bits).
pub(super) fn parse_net(s: &str) -> Result<Net, String> {
    let (addr, bits) = match s.split_once('/') {
        Some((a, b)) => (a, Some(b)),
        None => (s, None),
    };
    let ip: IpAddr = addr
        .trim()
        .parse()
        .map_err(|_| format!("`{s}` is not a network such as 10.0.0.0/8"))?;
    let max = if ip.is_ipv4() { 32 } else { 128 };
    let bits = match bits {
        Some(b) => b
            .trim()
            .parse::<u8>()
            .ok()
            .filter(|b| *b <= max)
            .ok_or_else(|| format!("`{s}`: prefix length must be 0 to {max}"))?,
        None => max,
    };
    Ok(Net {
        key: GroupKey::of(ip, bits, bits),
        bits,
    })
}

/// A network, as the key of its first address.
#[derive(Debug, Clone, Copy)]
pub(super) struct Net {
    pub(super) key: GroupKey,
    pub(super) bits: u8,
}

impl Net {
    pub(super) fn contains(&self, ip: IpAddr) -> bool {
        GroupKey::of(ip, self.bits, self.bits) == self.key
    }
}
