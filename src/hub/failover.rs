//! The status hold: failover without going backwards.
//!
//! When the connection holding a scripthash subscription goes away, the
//! subscription is sent again on another connection. If that upstream
//! answers the status subscribers already have, nothing happens. If it
//! answers another one, that may be news (a block, a reorg, a payment that
//! was double-spent away) or only lag: a payment that reached the old
//! upstream's mempool a moment ago may not be in the new one's yet, and
//! announcing its older status would make the wallet's balance flicker
//! (the payment goes, and comes back a moment later). So the status is
//! *held*: subscribers keep the status they have, and
//!
//! - a notification from the new upstream ends the hold: if it is the
//!   status subscribers have, the upstream caught up and nothing is
//!   announced; if it is another, it is announced (the upstream's state
//!   changed, that is news). A notification repeating what it answered
//!   changes nothing;
//! - otherwise, after `failover_hold` (`[server] failover_hold_ms`, at most
//!   half the request timeout), what the upstream answered is announced:
//!   the difference persisted, it was real.
//!
//! A change seen by the new upstream's notifications during the move itself
//! (see `Entry::early`) is announced at once, as is every change of the tip:
//! only scripthash statuses are held. So is the status of a subscription
//! that left a connection still up but behind (out of rotation for lag)
//! for one whose tip is higher: the new upstream is ahead, not lagging, and
//! what differs is news (`Entry::moved_from_tip`).
//!
//! Owns: [`Hold`], the index of held statuses and when each hold ends, the
//! decision to hold a value a moved subscription answered, what a
//! notification does to a hold, and announcing a hold that ran out. Where
//! reads go while a status is held is `reads`' business.

use super::actor::Actor;
use super::entry::Value;
use super::{HubStats, Topic};
use crate::status::events::EventKind;
use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashSet};
use std::sync::atomic::Ordering;
use tokio::time::Instant;

/// A status held after a failover.
pub(super) struct Hold {
    /// What the new upstream reports.
    pub upstream: Value,
    /// When `upstream` is announced if nothing changed meanwhile.
    pub until: Instant,
}

/// The held statuses of a coin.
#[derive(Default)]
pub(super) struct Holds {
    /// When each hold ends (stale items are skipped when they come up).
    deadlines: BinaryHeap<Reverse<(Instant, String)>>,
    /// Scripthashes whose status is held.
    held: HashSet<String>,
}

impl Holds {
    /// When the next hold runs out.
    pub fn next_end(&self) -> Option<Instant> {
        self.deadlines.peek().map(|Reverse((at, _))| *at)
    }

    /// Keep the index (and its gauge) in step with whether `sh` is held.
    pub fn track(&mut self, sh: &str, held: bool, stats: &HubStats) {
        if held {
            if self.held.insert(sh.to_string()) {
                stats.held_statuses.fetch_add(1, Ordering::Relaxed);
            }
        } else if self.held.remove(sh) {
            stats.held_statuses.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

impl Actor {
    /// A moved subscription answered `value`, which differs from what
    /// subscribers have: hold it (`None`) or let it through to be announced
    /// (tips, and every value when the hold is off).
    pub(super) fn hold_or_pass(&mut self, topic: &Topic, value: Value) -> Option<Value> {
        let hold = self.config.failover_hold;
        let Topic::Script(sh) = topic else {
            return Some(value);
        };
        if hold.is_zero() {
            return Some(value);
        }
        let entry = self
            .scripts
            .entries
            .get_mut(sh)
            .expect("current entry exists");
        // The subscription moved and the new upstream answers another
        // status than subscribers have: it may only lag (its mempool has
        // not seen a payment yet). Hold what subscribers have until the
        // upstream notifies a change, or announce its status when the
        // hold runs out (see the module doc).
        let until = Instant::now() + hold;
        entry.hold = Some(Hold {
            upstream: value,
            until,
        });
        // (Nobody waits: `value` was set, so subscribers were answered.)
        tracing::debug!(coin = %self.config.coin, scripthash = %sh, "the new upstream reports another status: held");
        self.config.journal.record(
            EventKind::StatusHeld,
            None,
            "statuses held: the new upstream reports another status",
        );
        self.holds.deadlines.push(Reverse((until, sh.clone())));
        self.settle(sh);
        None
    }

    /// A notification from the upstream of a held entry.
    pub(super) fn notified_while_held(&mut self, topic: &Topic, value: Value) {
        let entry = self.entry(topic).expect("present");
        let Some(hold) = &entry.hold else {
            return;
        };
        if hold.upstream == value {
            return; // nothing new from the upstream: still held
        }
        // The upstream's status changed: it caught up with what
        // subscribers have (nothing to announce), or this is news.
        entry.hold = None;
        let news = entry.value.as_ref() != Some(&value);
        if news {
            entry.value = Some(value);
            self.fan_out(topic);
        }
        if let Topic::Script(sh) = topic {
            self.settle(sh);
        }
    }

    /// Announce what the new upstream reports for every hold that ran out.
    pub(super) fn end_holds(&mut self) {
        let now = Instant::now();
        while let Some(Reverse((at, sh))) = self.holds.deadlines.peek() {
            if *at > now {
                break;
            }
            let sh = sh.clone();
            self.holds.deadlines.pop();
            let Some(entry) = self.scripts.entries.get_mut(&sh) else {
                continue;
            };
            let Some(hold) = entry.hold.take_if(|h| h.until <= now) else {
                continue; // ended already; a newer hold has its own item
            };
            tracing::debug!(coin = %self.config.coin, scripthash = %sh, "status still differs on the new upstream after the hold: announced");
            self.config.journal.record(
                EventKind::HoldAnnounced,
                None,
                "a held status still differed when the hold ran out: announced",
            );
            entry.value = Some(hold.upstream);
            let topic = Topic::Script(sh.clone());
            self.fan_out(&topic);
            self.settle(&sh);
        }
    }
}
