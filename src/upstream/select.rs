//! Choosing a connection for a new request: a pure function, unit-tested.
//!
//! Rules: only ready connections; among them, healthy primaries first, then
//! healthy backups (used only while no primary is healthy), and only when
//! no upstream is healthy at all, whatever is still connected (serving from
//! a lagging upstream beats failing every request). Within the chosen tier,
//! the fewest outstanding requests relative to the upstream's weight. A connection at its in-flight limit can still be
//! picked: its queue holds the request until a slot frees up (the pool's
//! growth, not selection, answers saturation).

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
}
