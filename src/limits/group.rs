//! Client IP groups (a /24 or /48 by default) and the token buckets that
//! sessions and groups spend from.

use std::collections::HashMap;
use std::fmt;
use std::net::IpAddr;
use std::sync::atomic::AtomicUsize;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// One client IP group: the address with only its group prefix kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GroupKey {
    V4(u32, u8),
    V6(u128, u8),
}

impl GroupKey {
    /// The group of `ip` (an IPv4-mapped IPv6 address is its IPv4 address).
    pub fn of(ip: IpAddr, v4_bits: u8, v6_bits: u8) -> GroupKey {
        fn mask32(bits: u8) -> u32 {
            u32::MAX.checked_shl(32 - bits.min(32) as u32).unwrap_or(0)
        }
        fn mask128(bits: u8) -> u128 {
            u128::MAX
                .checked_shl(128 - bits.min(128) as u32)
                .unwrap_or(0)
        }
        match canonical(ip) {
            IpAddr::V4(a) => GroupKey::V4(u32::from(a) & mask32(v4_bits), v4_bits.min(32)),
            IpAddr::V6(a) => GroupKey::V6(u128::from(a) & mask128(v6_bits), v6_bits.min(128)),
        }
    }
}

impl fmt::Display for GroupKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            GroupKey::V4(a, b) => write!(f, "{}/{b}", std::net::Ipv4Addr::from(*a)),
            GroupKey::V6(a, b) => write!(f, "{}/{b}", std::net::Ipv6Addr::from(*a)),
        }
    }
}

/// An IPv4-mapped IPv6 address (a dual-stack listener) as IPv4.
pub fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(a) => a.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(IpAddr::V6(a)),
        v4 => v4,
    }
}

/// A token bucket in points; it may go below zero when bytes are charged
/// after the fact (never below minus its capacity).
#[derive(Debug, Clone)]
pub(super) struct Bucket {
    pub(super) tokens: f64,
    pub(super) last: Instant,
}

impl Bucket {
    pub(super) fn full(burst: f64, now: Instant) -> Bucket {
        Bucket {
            tokens: burst,
            last: now,
        }
    }

    pub(super) fn refill(&mut self, now: Instant, rate: f64, burst: f64) {
        let dt = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + dt * rate).min(burst);
        self.last = now;
    }

    pub(super) fn charge(&mut self, points: f64, burst: f64) {
        self.tokens = (self.tokens - points).max(-burst);
    }

    /// Time until `cost` points are available.
    pub(super) fn wait(&self, cost: f64, rate: f64) -> Duration {
        Duration::from_secs_f64(((cost - self.tokens) / rate).clamp(0.0, 3600.0))
    }
}

/// One IP group: its open sessions and its shared bucket.
#[derive(Debug)]
pub(super) struct Group {
    pub(super) sessions: AtomicUsize,
    pub(super) bucket: Mutex<Bucket>,
}

#[derive(Debug)]
pub(super) struct Registry {
    pub(super) groups: HashMap<GroupKey, Arc<Group>>,
    pub(super) last_sweep: Instant,
}

/// Groups without sessions are forgotten once their bucket has refilled;
/// the registry is swept at most this often.
pub(super) const SWEEP_EVERY: Duration = Duration::from_secs(10);
