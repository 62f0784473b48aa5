//! Upstream health: when an upstream is in rotation, apart from selection.
//!
//! Owns: the rise/fall rule ([`Health`], a pure state machine) and the
//! judgement of one check ([`judge`]); `monitor`'s loop applies them each
//! interval to what the connections report (connected or not, tip height). An upstream leaves
//! rotation after `fall` bad checks in a row (no ready connection, or more
//! than `max_lag` blocks behind the best tip among the coin's upstreams) and
//! comes back after `rise` good ones. Each flip is logged once and reported to
//! the hub, which moves subscriptions off an upstream leaving rotation.
//! Stalls and dead sockets are detected by the connections themselves.

use crate::status::events::EventKind;
use std::fmt;
use std::time::Duration;

/// The rules health is judged by.
#[derive(Debug, Clone, Copy)]
pub struct HealthRules {
    pub interval: Duration,
    /// Good checks in a row before an upstream returns to rotation.
    pub rise: u32,
    /// Bad checks in a row before an upstream leaves rotation.
    pub fall: u32,
    /// Blocks an upstream may trail the best tip and stay in rotation.
    pub max_lag: u64,
}

/// The rise/fall state of one upstream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Health {
    healthy: bool,
    /// Checks in a row that contradict the current state.
    streak: u32,
}

impl Default for Health {
    /// Upstreams start in rotation: a fresh proxy should serve as soon as a
    /// connection is up, not after `rise` intervals.
    fn default() -> Self {
        Health {
            healthy: true,
            streak: 0,
        }
    }
}

impl Health {
    pub fn is_healthy(&self) -> bool {
        self.healthy
    }

    /// Record one check; returns the new state when it flips.
    pub fn observe(&mut self, ok: bool, rules: &HealthRules) -> Option<bool> {
        if ok == self.healthy {
            self.streak = 0;
            return None;
        }
        self.streak += 1;
        let needed = if self.healthy { rules.fall } else { rules.rise };
        if self.streak >= needed.max(1) {
            self.healthy = ok;
            self.streak = 0;
            Some(ok)
        } else {
            None
        }
    }
}

/// What one check found about an upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finding {
    Ok,
    NoConnection,
    Lagging { behind: u64, best: u64 },
}

impl Finding {
    /// How a flip to this finding shows in the event log.
    pub fn event_kind(&self) -> EventKind {
        match self {
            Finding::Ok => EventKind::UpstreamUp,
            Finding::NoConnection => EventKind::UpstreamDown,
            Finding::Lagging { .. } => EventKind::UpstreamLagging,
        }
    }
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Finding::Ok => f.write_str("back in rotation"),
            Finding::NoConnection => f.write_str("out of rotation: no connection"),
            Finding::Lagging { behind, best } => write!(
                f,
                "out of rotation: {behind} blocks behind the best tip {best}"
            ),
        }
    }
}

/// Judge one upstream: `tip` is its height (`None` when no connection is
/// ready; 0 when unknown), `best` the best tip among connected upstreams.
pub fn judge(tip: Option<u64>, best: u64, max_lag: u64) -> Finding {
    match tip {
        None => Finding::NoConnection,
        // An unknown tip cannot be judged for lag.
        Some(0) => Finding::Ok,
        Some(t) if best.saturating_sub(t) > max_lag => Finding::Lagging {
            behind: best - t,
            best,
        },
        Some(_) => Finding::Ok,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const RULES: HealthRules = HealthRules {
        interval: Duration::from_secs(1),
        rise: 3,
        fall: 2,
        max_lag: 2,
    };

    #[test]
    fn falls_after_two_bad_checks_and_rises_after_three_good() {
        let mut h = Health::default();
        assert_eq!(h.observe(false, &RULES), None);
        assert_eq!(h.observe(false, &RULES), Some(false));
        assert!(!h.is_healthy());
        assert_eq!(h.observe(true, &RULES), None);
        assert_eq!(h.observe(true, &RULES), None);
        assert_eq!(h.observe(true, &RULES), Some(true));
        assert!(h.is_healthy());
    }

    #[test]
    fn a_contrary_check_resets_the_streak() {
        let mut h = Health::default();
        assert_eq!(h.observe(false, &RULES), None);
        assert_eq!(h.observe(true, &RULES), None);
        assert_eq!(h.observe(false, &RULES), None);
        assert!(h.is_healthy());
    }

    #[test]
    fn lag_rule() {
        assert_eq!(judge(Some(100), 102, 2), Finding::Ok);
        assert_eq!(
            judge(Some(100), 103, 2),
            Finding::Lagging {
                behind: 3,
                best: 103
            }
        );
        assert_eq!(judge(None, 103, 2), Finding::NoConnection);
        assert_eq!(judge(Some(0), 103, 2), Finding::Ok);
    }
}
