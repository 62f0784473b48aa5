//! Choosing a connection for a new request: a pure function, unit-tested.
//!
//! Rules: only ready connections; among them, healthy primaries first, then
//! healthy backups (used only while no primary is healthy), and only when
//! no upstream is healthy at all, whatever is still connected (serving from
//! a lagging upstream beats failing every request). Within the chosen tier,
//! throttled upstreams (see `throttle`) are passed over while a connection
//! of an upstream that is not throttled has room (fewer requests than its
//! learned limit); a throttled upstream that is the only one left still
//! serves. Then the lowest cost wins: outstanding requests (plus this one)
//! times the connection's recent answer time, divided by the upstream's
//! weight, so a slowing upstream gets less. Answer times below
//! [`RTT_FLOOR_US`] count as that floor (between fast upstreams, it is the
//! fewest outstanding requests per unit of weight). A connection at its
//! in-flight limit can still be picked: its queue holds the request until a
//! slot frees up (the pool's growth, not selection, answers saturation).
//!
//! Upstreams that hold small replies (ElectrumX 2.0, see `hold`): among
//! the connections with room, one that answers at once (quiet for the hold
//! window, or an upstream that does not hold) comes first, by cost as
//! above; then one whose answers in flight are filling a packet, the fullest
//! first (packing: answers that travel together are not held), while its
//! estimated cost to the upstream is under [`hold::PACK_UNTIL`]; then the
//! rest by cost. Packing happens within one upstream: the upstream is
//! chosen first, by its load over all its connections. Cost
//! alone would spread requests evenly, which on a holding upstream leaves
//! each session a trickle of small answers that each wait out the hold.
//!
//! Capability is a separate filter ([`capable`]): a request that only some
//! protocol levels answer (see [`Need`]) is offered only the connections
//! whose negotiated level fits, before `pick` runs.

use super::hold::{self, Hold};
use crate::protocol::Version;

/// What selection needs to know about one connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Candidate {
    /// Connected, and kept open (not retired by the pool's shrinking).
    pub ready: bool,
    /// The upstream is in rotation (see `health`).
    pub healthy: bool,
    pub in_flight: usize,
    /// The connection's learned in-flight limit.
    pub limit: usize,
    /// Recent answer time in microseconds (0: unknown).
    pub rtt_us: u64,
    pub weight: u32,
    pub backup: bool,
    /// The upstream is throttling us.
    pub throttled: bool,
    /// Index of its upstream (connections of one upstream share it).
    pub upstream: usize,
    /// Its upstream pads and holds small replies (see `hold`).
    pub pads: bool,
    /// Where an answer would go on this connection (see `hold`).
    pub hold: Hold,
    /// Estimated cost of this session to its upstream ([`hold::Work`];
    /// counted only where the upstream holds).
    pub work: u32,
}

/// Answer times below this (µs) are not told apart.
pub const RTT_FLOOR_US: u64 = 1000;

impl Candidate {
    fn has_room(&self) -> bool {
        self.in_flight < self.limit
    }

    /// (outstanding + 1) × answer time; compared across weights below.
    fn cost(&self) -> u128 {
        (self.in_flight as u128 + 1) * self.rtt_us.max(RTT_FLOOR_US) as u128
    }

    /// 0: answered at once; 1: packed into a filling packet; 2: the rest.
    fn rank(&self) -> u8 {
        match self.hold {
            Hold::None => 0,
            Hold::Filling if self.has_room() && self.work < hold::PACK_UNTIL => 1,
            Hold::Filling | Hold::Held => 2,
        }
    }
}

/// Which of two candidates is the better choice (`Less`: `a`).
fn better(a: &Candidate, b: &Candidate) -> std::cmp::Ordering {
    a.rank().cmp(&b.rank()).then_with(|| {
        if a.rank() == 1 {
            // Packing: the fullest buffer first.
            b.in_flight.cmp(&a.in_flight)
        } else {
            // Compare cost / weight without division: a/wa < b/wb <=> a*wb < b*wa.
            let la = a.cost() * b.weight as u128;
            let lb = b.cost() * a.weight as u128;
            la.cmp(&lb)
        }
    })
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
    let in_tier = |i: usize, c: &Candidate| usable(i, c) && tier(c) == best_tier;
    let room_unthrottled = candidates
        .iter()
        .enumerate()
        .any(|(i, c)| in_tier(i, c) && !c.throttled && c.has_room());
    let eligible = |i: usize, c: &Candidate| in_tier(i, c) && !(room_unthrottled && c.throttled);
    let holding = candidates
        .iter()
        .enumerate()
        .any(|(i, c)| eligible(i, c) && c.pads);
    if !holding {
        return candidates
            .iter()
            .enumerate()
            .filter(|(i, c)| eligible(*i, c))
            .min_by(|(_, a), (_, b)| better(a, b))
            .map(|(i, _)| i);
    }
    // Packing concentrates requests on some connections of an upstream,
    // which must not draw more of them to that upstream (each ElectrumX is
    // one process): the upstream is chosen by its load over all its
    // connections, then the connection within it.
    let upstream = least_loaded_upstream(candidates, &eligible)?;
    candidates
        .iter()
        .enumerate()
        .filter(|(i, c)| eligible(*i, c) && c.upstream == upstream)
        .min_by(|(_, a), (_, b)| better(a, b))
        .map(|(i, _)| i)
}

/// The upstream with the least load per unit of weight among the eligible
/// candidates: (its outstanding requests + 1) × its connections' mean
/// answer time, over its weight. Not per connection: an ElectrumX is one
/// process, and more sessions to it do not make it answer sooner.
fn least_loaded_upstream(
    candidates: &[Candidate],
    eligible: &impl Fn(usize, &Candidate) -> bool,
) -> Option<usize> {
    let mut best: Option<(usize, u128, u128)> = None;
    for (i, c) in candidates.iter().enumerate() {
        let first = candidates[..i]
            .iter()
            .enumerate()
            .all(|(j, d)| !(eligible(j, d) && d.upstream == c.upstream));
        if !eligible(i, c) || !first {
            continue;
        }
        let (mut outstanding, mut conns, mut rtt) = (0u128, 0u128, 0u128);
        for (j, d) in candidates.iter().enumerate().skip(i) {
            if eligible(j, d) && d.upstream == c.upstream {
                outstanding += d.in_flight as u128;
                conns += 1;
                rtt += d.rtt_us.max(RTT_FLOOR_US) as u128;
            }
        }
        // load = (outstanding + 1) * (rtt / conns) / weight
        let load = (outstanding + 1) * rtt;
        let per = conns * c.weight.max(1) as u128;
        // a/pa < b/pb <=> a*pb < b*pa
        if best.is_none_or(|(_, l, p)| load * p < l * per) {
            best = Some((c.upstream, load, per));
        }
    }
    best.map(|(u, _, _)| u)
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
            limit: 10,
            rtt_us: 0,
            weight,
            backup,
            throttled: false,
            upstream: 0,
            pads: false,
            hold: Hold::None,
            work: 0,
        }
    }

    #[test]
    fn a_slower_upstream_gets_less() {
        // 2 outstanding at 100 ms costs more than 5 at 20 ms.
        let mut slow = c(true, 2, 1, false);
        slow.rtt_us = 100_000;
        let mut fast = c(true, 5, 1, false);
        fast.rtt_us = 20_000;
        assert_eq!(pick(&[slow, fast], None), Some(1));
        // Sub-millisecond differences are noise: outstanding decides.
        slow.rtt_us = 900;
        fast.rtt_us = 100;
        assert_eq!(pick(&[slow, fast], None), Some(0));
    }

    #[test]
    fn throttled_only_when_no_other_has_room() {
        let mut throttled = c(true, 0, 1, false);
        throttled.throttled = true;
        // The other one has room (3 < 10): the throttled one is passed over.
        let cs = [throttled, c(true, 3, 1, false)];
        assert_eq!(pick(&cs, None), Some(1));
        // The other one is full: cost decides again.
        let cs = [throttled, c(true, 12, 1, false)];
        assert_eq!(pick(&cs, None), Some(0));
        // Alone, it still serves.
        assert_eq!(pick(&[throttled], None), Some(0));
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
    fn a_holding_upstream_gets_requests_packed() {
        let held = |in_flight| Candidate {
            pads: true,
            hold: if in_flight > 0 {
                Hold::Filling
            } else {
                Hold::Held
            },
            ..c(true, in_flight, 1, false)
        };
        // Cost alone would take the emptiest; the fullest filling one wins.
        let cs = [held(0), held(3), held(5), held(1)];
        assert_eq!(pick(&cs, None), Some(2));
        // A connection quiet for the window answers at once: it comes first.
        let quiet = Candidate {
            pads: true,
            hold: Hold::None,
            ..c(true, 0, 1, false)
        };
        let cs = [held(3), quiet];
        assert_eq!(pick(&cs, None), Some(1));
        // A full one is not packed further: the next fullest with room is.
        let cs = [held(10), held(4), held(0)];
        assert_eq!(pick(&cs, None), Some(1));
        // Nor one whose estimated cost has reached half the soft limit.
        let mut busy = held(6);
        busy.work = hold::PACK_UNTIL;
        let cs = [busy, held(2), held(0)];
        assert_eq!(pick(&cs, None), Some(1));
        // Nothing filling: the least loaded by cost, as without holds.
        let cs = [busy, held(0)];
        assert_eq!(pick(&cs, None), Some(1));
    }

    #[test]
    fn packing_does_not_draw_requests_to_one_upstream() {
        let on = |upstream, in_flight| Candidate {
            upstream,
            pads: true,
            hold: if in_flight > 0 {
                Hold::Filling
            } else {
                Hold::Held
            },
            ..c(true, in_flight, 1, false)
        };
        // Upstream 0 has 6 outstanding packed on one of its two
        // connections; upstream 1 has 2: upstream 1 gets the next one, on
        // its filling connection, though upstream 0 has an empty one.
        let cs = [on(0, 6), on(0, 0), on(1, 0), on(1, 2)];
        assert_eq!(pick(&cs, None), Some(3));
        // Nor do more connections: 4 outstanding over four connections
        // weigh as much as 4 on one.
        let cs = [on(0, 4), on(0, 0), on(0, 0), on(0, 0), on(1, 3)];
        assert_eq!(pick(&cs, None), Some(4));
        // Even: the first upstream, its fullest connection with room.
        let cs = [on(0, 2), on(0, 0), on(1, 2), on(1, 0)];
        assert_eq!(pick(&cs, None), Some(0));
        // Weight 3 carries three times the load.
        let mut heavy = [on(0, 5), on(0, 0), on(1, 2), on(1, 0)];
        heavy[0].weight = 3;
        heavy[1].weight = 3;
        assert_eq!(pick(&heavy, None), Some(0));
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
