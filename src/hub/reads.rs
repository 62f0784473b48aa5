//! Reads follow the status: where a read of a subscribed scripthash goes,
//! and reads that wait while its subscription moves.
//!
//! A wallet checks every status it is sent against `get_history`, so reads
//! of a subscribed scripthash (history, mempool, balance, unspent: see the
//! router) go where the status came from: the connection holding the
//! subscription ([`Route::Conn`]). While no connection holds it or its
//! status is held ([`Route::Wait`]) the old upstream is gone (or out of
//! rotation) and the new one may disagree with what subscribers were told,
//! so reads wait in the hub (bounded by the hold and by their own
//! deadline) and go to the new connection once the subscription has
//! settled: by then that upstream agrees with the status subscribers have,
//! or the status it reports was announced first. A read whose connection
//! died before it was answered comes back here too ([`super::Hub::reroute`])
//! instead of going to any upstream.
//!
//! What a wallet sees across a failover: no notification while the new
//! upstream catches up (or one, later, for a real change), and reads of its
//! scripthashes that take up to the hold longer; never a history that
//! contradicts the last status it was sent, but for a read crossing an
//! announcement (as on any single server). With no upstream at all, reads
//! fail at once, as everything else does.
//!
//! Owns: [`route_of`] (published to the router through the affinity map),
//! the reads parked in entries and their index, sending them once the
//! subscription has settled, failing those whose deadline passed, and
//! telling the cache what each scripthash's kept answers follow (its
//! status, and whether its reads go to a settled connection: see
//! `cache::answers`) before anyone is told of a change.

use super::actor::Actor;
use super::entry::{Entry, Value};
use super::{Route, Topic};
use crate::jsonrpc::{ErrorCode, RpcError};
use crate::upstream::Job;
use std::sync::atomic::Ordering;
use tokio::time::Instant;

/// Where reads of an entry go (see [`Route`]).
pub(super) fn route_of(entry: &Entry) -> Option<Route> {
    match entry.conn {
        Some(conn) if entry.hold.is_none() => Some(Route::Conn(conn)),
        // Moving, held, or waiting for an upstream: the reads wait with it.
        _ if entry.value.is_some() => Some(Route::Wait),
        // Nobody was told anything yet.
        _ => None,
    }
}

impl Actor {
    /// A read of a subscribed scripthash: to the connection holding the
    /// subscription, or parked until the subscription has settled.
    pub(super) fn on_read(&mut self, sh: String, job: Job) {
        let Some(entry) = self.scripts.entries.get_mut(&sh) else {
            return self.pool.dispatch(job);
        };
        let job = match route_of(entry) {
            None => return self.pool.dispatch(job),
            Some(Route::Conn(conn)) => match self.pool.dispatch_to(conn, job) {
                Ok(()) => return,
                // The connection is gone and its `Down` is on its way: the
                // read waits for the subscription to move.
                Err(job) => job,
            },
            Some(Route::Wait) => {
                if entry.conn.is_none() && entry.pending.is_none() && !self.pool.any_ready() {
                    // No upstream at all: fail now rather than at the deadline.
                    return self.pool.dispatch(job);
                }
                job
            }
        };
        entry.parked.push(job);
        self.stats.parked_reads.fetch_add(1, Ordering::Relaxed);
        self.parked.insert(sh);
    }

    /// After any change to a scripthash entry: publish where its reads go,
    /// send its parked reads once that is a connection (or anywhere, when
    /// nobody was told a status), and keep the indexes of held and parked
    /// entries.
    pub(super) fn settle(&mut self, sh: &str) {
        self.follow_answers(sh);
        let Some(entry) = self.scripts.entries.get_mut(sh) else {
            self.affinity.remove(sh);
            self.holds
                .track(&Topic::Script(sh.to_string()), false, &self.stats);
            self.parked.remove(sh);
            return;
        };
        let route = route_of(entry);
        match route {
            Some(r) => {
                self.affinity.insert(sh.to_string(), r);
            }
            None => {
                self.affinity.remove(sh);
            }
        }
        let held = entry.hold.is_some();
        self.holds
            .track(&Topic::Script(sh.to_string()), held, &self.stats);
        let Some(entry) = self.scripts.entries.get_mut(sh) else {
            return;
        };
        if entry.parked.is_empty() || route == Some(Route::Wait) {
            return;
        }
        let jobs = std::mem::take(&mut entry.parked);
        // Counted out before they go (an answer may come back at once).
        self.stats
            .parked_reads
            .fetch_sub(jobs.len(), Ordering::Relaxed);
        let mut kept = Vec::new();
        for job in jobs {
            match route {
                Some(Route::Conn(conn)) => {
                    if let Err(job) = self.pool.dispatch_to(conn, job) {
                        // Lost as well: wait for its `Down`.
                        kept.push(job);
                    }
                }
                _ => self.pool.dispatch(job),
            }
        }
        self.stats
            .parked_reads
            .fetch_add(kept.len(), Ordering::Relaxed);
        if kept.is_empty() {
            self.parked.remove(sh);
        }
        entry.parked = kept;
    }

    /// Tell the cache what subscribers of `sh` were told and whether its
    /// reads go to a settled connection: kept answers follow that (see
    /// `cache::answers`).
    pub(super) fn follow_answers(&self, sh: &str) {
        let Some(cache) = &self.config.cache else {
            return;
        };
        let Some(entry) = self.scripts.entries.get(sh) else {
            return cache.forget_status(sh);
        };
        let settled = matches!(route_of(entry), Some(Route::Conn(_)));
        let status = match &entry.value {
            Some(Value::Status(s)) => Some(s.as_str()),
            _ => None,
        };
        cache.follow_status(sh, settled, status);
    }

    /// Fail parked reads whose deadline passed (a subscription that takes
    /// that long to settle: the upstreams keep failing).
    pub(super) fn expire_parked(&mut self) {
        if self.parked.is_empty() {
            return;
        }
        let now = Instant::now();
        let mut expired = 0;
        let mut emptied = Vec::new();
        for sh in &self.parked {
            let Some(entry) = self.scripts.entries.get_mut(sh) else {
                emptied.push(sh.clone());
                continue;
            };
            let (late, kept): (Vec<Job>, Vec<Job>) = std::mem::take(&mut entry.parked)
                .into_iter()
                .partition(|j| j.deadline <= now);
            entry.parked = kept;
            for job in late {
                expired += 1;
                job.responder.fail(RpcError::new(
                    ErrorCode::UpstreamTimeout,
                    "timed out waiting for the subscription to move to another upstream",
                ));
            }
            if entry.parked.is_empty() {
                emptied.push(sh.clone());
            }
        }
        for sh in emptied {
            self.parked.remove(&sh);
        }
        self.stats
            .parked_reads
            .fetch_sub(expired, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hub::entry::Value;
    use crate::hub::failover::Hold;
    use crate::jsonrpc;
    use crate::upstream::ConnId;

    fn status(s: &str) -> Value {
        Value::Status(jsonrpc::quote(s))
    }

    #[test]
    fn reads_wait_exactly_while_a_told_status_has_no_settled_connection() {
        // First subscribe on its way: nobody was told anything.
        let mut e = Entry {
            pending: Some((ConnId(1), 1)),
            ..Entry::default()
        };
        assert_eq!(route_of(&e), None);
        // Settled.
        e.pending = None;
        e.conn = Some(ConnId(1));
        e.value = Some(status("s1"));
        assert_eq!(route_of(&e), Some(Route::Conn(ConnId(1))));
        // Moving after a failover.
        e.conn = None;
        e.pending = Some((ConnId(2), 2));
        assert_eq!(route_of(&e), Some(Route::Wait));
        // On the new connection, its status held.
        e.pending = None;
        e.conn = Some(ConnId(2));
        e.hold = Some(Hold {
            upstream: status("s0"),
            until: Instant::now(),
        });
        assert_eq!(route_of(&e), Some(Route::Wait));
        e.hold = None;
        assert_eq!(route_of(&e), Some(Route::Conn(ConnId(2))));
        // No upstream found: still told a status, so reads wait (the hub
        // fails them at once when no upstream is ready at all).
        e.conn = None;
        assert_eq!(route_of(&e), Some(Route::Wait));
    }
}
