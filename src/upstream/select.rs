//! Choosing a connection for a new request: a pure function, unit-tested.
//!
//! Rules: only ready connections; among them, healthy primaries first, then
//! healthy backups (used only while no primary is healthy), and only when
//! no upstream is healthy at all, whatever is still connected (serving from
//! a lagging upstream beats failing every request). Within the chosen tier,
//! the fewest outstanding requests relative to the upstream's weight. A connection at its in-flight limit can still be
//! picked: its queue holds the request until a slot frees up (the pool's
//! growth, not selection, answers saturation).
//!
//! Capability is a separate filter ([`capable`]): a request that only some
//! protocol levels answer (see [`Need`]) is offered only the connections
//! whose negotiated level fits, before `pick` runs.

use crate::protocol::Version;

/// What selection needs to know about one connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Candidate {
    pub ready: bool,
    /// The upstream is in rotation (see `health`).
    pub healthy: bool,
    pub in_flight: usize,
    pub max_in_flight: usize,
    pub weight: u32,
    pub backup: bool,
}

/// Index of the connection to use, or `None` when none can take a request.
/// `skip` excludes one index (the connection a retried request came from).
pub fn pick(candidates: &[Candidate], skip: Option<usize>) -> Option<usize> {
    let usable = |i: usize, c: &Candidate| c.ready && Some(i) != skip;
    // Tier 0: healthy primaries; 1: healthy backups; 2: anything connected.
    let tier = |c: &Candidate| match (c.healthy, c.backup) {
        (true, false) => 0,
        (true, true) => 1,
        (false, _) => 2,
    };
    let best_tier = candidates
        .iter()
        .enumerate()
        .filter(|(i, c)| usable(*i, c))
        .map(|(_, c)| tier(c))
        .min()?;
    candidates
        .iter()
        .enumerate()
        .filter(|(i, c)| usable(*i, c) && tier(c) == best_tier)
        // Compare in_flight / weight without division: a/wa < b/wb <=> a*wb < b*wa.
        .min_by(|(_, a), (_, b)| {
            let la = (a.in_flight as u64 + 1) * b.weight as u64;
            let lb = (b.in_flight as u64 + 1) * a.weight as u64;
            la.cmp(&lb)
        })
        .map(|(i, _)| i)
}

/// The protocol levels of the upstream connections that can answer a
/// request in the shape it was written: ElectrumX 2.0 dropped the
/// `blockchain.scripthash.*` methods at 1.7 and added
/// `mempool.get_info` / `broadcast_package` at 1.6 and
/// `testmempoolaccept`, `mempool.recent` and `blockchain.outpoint.*` at 1.7.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Need {
    /// The connection must have negotiated at least this.
    pub min: Option<Version>,
    /// The connection must have negotiated less than this.
    pub below: Option<Version>,
}

impl Need {
    /// Any connection will do.
    pub const ANY: Need = Need {
        min: None,
        below: None,
    };

    pub const fn at_least(v: Version) -> Need {
        Need {
            min: Some(v),
            below: None,
        }
    }

    pub const fn below(v: Version) -> Need {
        Need {
            min: None,
            below: Some(v),
        }
    }

    pub fn is_any(&self) -> bool {
        *self == Need::ANY
    }
}

impl std::fmt::Display for Need {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (self.min, self.below) {
            (Some(min), Some(below)) => write!(f, "protocol {min} or later, below {below}"),
            (Some(min), None) => write!(f, "protocol {min} or later"),
            (None, Some(below)) => write!(f, "a protocol below {below}"),
            (None, None) => write!(f, "any protocol"),
        }
    }
}

/// Whether a connection that negotiated `level` can answer a request of
/// `need`.
pub fn capable(level: Version, need: Need) -> bool {
    need.min.is_none_or(|min| level >= min) && need.below.is_none_or(|below| level < below)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(ready: bool, in_flight: usize, weight: u32, backup: bool) -> Candidate {
        Candidate {
            ready,
            healthy: true,
            in_flight,
            max_in_flight: 10,
            weight,
            backup,
        }
    }

    #[test]
    fn least_outstanding_wins() {
        let cs = [
            c(true, 5, 1, false),
            c(true, 2, 1, false),
            c(true, 3, 1, false),
        ];
        assert_eq!(pick(&cs, None), Some(1));
    }

    #[test]
    fn not_ready_is_skipped_and_full_is_a_last_resort() {
        let cs = [
            c(false, 0, 1, false),
            c(true, 10, 1, false),
            c(true, 9, 1, false),
        ];
        assert_eq!(pick(&cs, None), Some(2));
        let cs = [c(false, 0, 1, false), c(true, 12, 1, false)];
        assert_eq!(pick(&cs, None), Some(1));
        let cs = [c(false, 0, 1, false), c(false, 0, 1, true)];
        assert_eq!(pick(&cs, None), None);
    }

    #[test]
    fn weight_scales_load() {
        // 4 outstanding on weight 3 beats 2 outstanding on weight 1.
        let cs = [c(true, 2, 1, false), c(true, 4, 3, false)];
        assert_eq!(pick(&cs, None), Some(1));
    }

    #[test]
    fn backups_only_without_a_ready_primary() {
        let cs = [c(true, 9, 1, false), c(true, 0, 1, true)];
        assert_eq!(pick(&cs, None), Some(0));
        let cs = [c(false, 0, 1, false), c(true, 0, 1, true)];
        assert_eq!(pick(&cs, None), Some(1));
        // A busy primary does not open the backups.
        let cs = [c(true, 10, 1, false), c(true, 0, 1, true)];
        assert_eq!(pick(&cs, None), Some(0));
    }

    #[test]
    fn unhealthy_only_as_a_last_resort() {
        let mut lagging = c(true, 0, 1, false);
        lagging.healthy = false;
        let cs = [lagging, c(true, 5, 1, true)];
        assert_eq!(pick(&cs, None), Some(1));
        let cs = [lagging, c(false, 0, 1, false)];
        assert_eq!(pick(&cs, None), Some(0));
    }

    #[test]
    fn skip_excludes_the_previous_connection() {
        let cs = [c(true, 0, 1, false), c(true, 5, 1, false)];
        assert_eq!(pick(&cs, Some(0)), Some(1));
        assert_eq!(pick(&cs[..1], Some(0)), None);
    }

    #[test]
    fn capability_by_level() {
        let v14 = Version(1, 4, 2);
        let v16 = Version::new(1, 6);
        let v17 = Version::new(1, 7);
        let scripthash = Need::below(v17);
        let package = Need::at_least(v16);
        let outpoint = Need::at_least(v17);
        assert!(capable(v14, Need::ANY) && capable(v17, Need::ANY));
        assert!(capable(v14, scripthash) && capable(v16, scripthash));
        assert!(!capable(v17, scripthash));
        assert!(!capable(v14, package) && capable(v16, package) && capable(v17, package));
        assert!(!capable(v16, outpoint) && capable(v17, outpoint));
        assert_eq!(package.to_string(), "protocol 1.6 or later");
    }
}
