//! Who holds what: joining and leaving entries, the session index, the
//! subscription limits.
//!
//! Owns: [`SessionSubs`] (each session's subscriptions, for its limit and
//! for cleanup when it closes), subscribe and unsubscribe of one session,
//! the per-session and per-coin limits on scripthash and outpoint
//! subscriptions (the tip is not limited), and dropping an entry with its
//! last subscriber (releasing its upstream subscription). A new entry's
//! upstream subscribe is started here and carried on in `upstream` (and
//! `outpoint`).

use super::actor::Actor;
use super::entry::{answer, Entry, Subscriber, Waiter};
use super::outpoint::OutpointEntry;
use super::{Form, SessionId, Topic};
use crate::jsonrpc::{ErrorCode, RpcError};
use crate::reply::{Outbound, Responder};
use std::collections::HashSet;
use std::sync::atomic::Ordering;

/// What one session holds, for its limit and for cleanup when it closes.
#[derive(Default)]
pub(super) struct SessionSubs {
    pub keys: HashSet<(Topic, Form)>,
    /// How many of `keys` are scripthash or outpoint subscriptions (the
    /// limited kinds).
    pub limited: usize,
}

/// Whether subscriptions to `topic` count against the limits.
pub(super) fn limited(topic: &Topic) -> bool {
    !matches!(topic, Topic::Headers)
}

impl Actor {
    #[allow(clippy::too_many_arguments)]
    pub(super) fn subscribe(
        &mut self,
        session: SessionId,
        out: Outbound,
        topic: Topic,
        form: Form,
        limit: usize,
        hint: Option<Vec<u8>>,
        responder: Responder,
    ) {
        if let (Topic::Headers, Form::Header(shape)) = (&topic, &form) {
            self.replace_header_shape(session, *shape);
        }
        let key = (topic, form);
        let held = self.sessions.get(&session);
        let already = held.is_some_and(|s| s.keys.contains(&key));
        let (topic, form) = key;
        if !already {
            if limited(&topic) {
                if held.map_or(0, |s| s.limited) >= limit {
                    responder.fail(RpcError::new(
                        ErrorCode::LimitExceeded,
                        format!("too many subscriptions in this session (limit {limit})"),
                    ));
                    return;
                }
                if self.entry(&topic).is_none() {
                    let mut held = self.scripts.entries.len() + self.outpoints.entries.len();
                    // A wallet's subscription takes the place of one the hub
                    // holds for reads.
                    if held >= self.config.max_topics && self.evict_read_sub(true) {
                        held = self.scripts.entries.len() + self.outpoints.entries.len();
                    }
                    if held >= self.config.max_topics {
                        responder.fail(RpcError::new(
                            ErrorCode::LimitExceeded,
                            format!(
                                "this server holds its maximum of {} subscriptions for {}",
                                self.config.max_topics, self.config.coin
                            ),
                        ));
                        return;
                    }
                    self.create(&topic);
                }
            }
            let subs = self.sessions.entry(session).or_default();
            if limited(&topic) {
                subs.limited += 1;
            }
            subs.keys.insert((topic.clone(), form.clone()));
            self.count_form(&form, true);
        }
        if let (Topic::Outpoint(op), Some(hint)) = (&topic, hint) {
            let e = self.outpoints.entries.get_mut(op).expect("created");
            // The first script given wins (a wrong hint is the client's).
            e.spk.get_or_insert(hint);
        }
        let current = match &topic {
            Topic::Headers => self.headers.current(),
            _ => None,
        };
        let entry = self.entry(&topic).expect("entry exists");
        if !already {
            entry
                .subscribers
                .entry(session)
                .or_insert_with(|| Subscriber {
                    out,
                    forms: Vec::new(),
                })
                .forms
                .push(form.clone());
        }
        // The tip falls back on the last one seen while it resubscribes.
        let value = current.or_else(|| entry.value.clone());
        let needs_upstream = entry.orphaned();
        match value {
            Some(v) => answer(responder, &form, &v),
            None => entry.waiting.push(Waiter {
                responder,
                form,
                session,
            }),
        }
        if needs_upstream {
            self.start_upstream(topic);
        }
    }

    /// A new scripthash or outpoint entry.
    fn create(&mut self, topic: &Topic) {
        match topic {
            Topic::Headers => {}
            Topic::Script(sh) => {
                self.scripts.entries.insert(sh.clone(), Entry::default());
                self.stats
                    .upstream_subscriptions
                    .fetch_add(1, Ordering::Relaxed);
            }
            Topic::Outpoint(op) => {
                self.outpoints
                    .entries
                    .insert(op.clone(), OutpointEntry::default());
                self.stats.outpoints.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Keep the session subscription gauges (total and by form) in step.
    pub(super) fn count_form(&self, form: &Form, added: bool) {
        let by_form = &self.stats.session_forms[form.kind()];
        if added {
            self.stats
                .session_subscriptions
                .fetch_add(1, Ordering::Relaxed);
            by_form.fetch_add(1, Ordering::Relaxed);
        } else {
            self.stats
                .session_subscriptions
                .fetch_sub(1, Ordering::Relaxed);
            by_form.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// Drop everything a closed session held.
    pub(super) fn session_closed(&mut self, session: SessionId) {
        let Some(subs) = self.sessions.remove(&session) else {
            return;
        };
        for (topic, form) in subs.keys {
            self.detach(session, &topic, &form, false);
            self.drop_if_unused(&topic);
        }
    }

    pub(super) fn remove(&mut self, session: SessionId, topic: &Topic, form: &Form) -> bool {
        let key = (topic.clone(), form.clone());
        let mut indexed = false;
        if let Some(subs) = self.sessions.get_mut(&session) {
            if subs.keys.remove(&key) {
                indexed = true;
                if limited(topic) {
                    subs.limited -= 1;
                }
                if subs.keys.is_empty() {
                    self.sessions.remove(&session);
                }
            }
        }
        // A subscribe still waiting for the upstream is answered when the
        // upstream answers, as a server taking requests in order would.
        let detached = self.detach(session, topic, form, true);
        self.drop_if_unused(topic);
        indexed || detached
    }

    /// Take `(session, form)` out of a topic's entry (not out of the session
    /// index). A subscribe of it still waiting for the upstream keeps
    /// waiting with `keep_waiting` (it keeps the entry until answered), and
    /// is answered with an error otherwise (the session is gone).
    pub(super) fn detach(
        &mut self,
        session: SessionId,
        topic: &Topic,
        form: &Form,
        keep_waiting: bool,
    ) -> bool {
        let Some(entry) = self.entry(topic) else {
            return false;
        };
        let mut existed = false;
        if let Some(sub) = entry.subscribers.get_mut(&session) {
            if let Some(pos) = sub.forms.iter().position(|f| f == form) {
                sub.forms.swap_remove(pos);
                existed = true;
            }
            if sub.forms.is_empty() {
                entry.subscribers.remove(&session);
            }
        }
        let mut i = 0;
        while i < entry.waiting.len() && !keep_waiting {
            if entry.waiting[i].session == session && entry.waiting[i].form == *form {
                entry.waiting.swap_remove(i).responder.fail(RpcError::new(
                    ErrorCode::UpstreamUnavailable,
                    "unsubscribed before the upstream answered",
                ));
            } else {
                i += 1;
            }
        }
        if existed {
            self.count_form(form, false);
        }
        existed
    }

    /// Drop a scripthash or outpoint entry nobody holds any more, and
    /// release its upstream subscription (or what it watched).
    pub(super) fn drop_if_unused(&mut self, topic: &Topic) {
        match topic {
            Topic::Headers => {}
            Topic::Script(sh) => self.drop_script(sh),
            Topic::Outpoint(op) => {
                if !self
                    .outpoints
                    .entries
                    .get(op)
                    .is_some_and(|e| e.entry.unused())
                {
                    return;
                }
                self.unwatch(op);
                let e = self.outpoints.entries.remove(op).expect("present");
                self.stats.outpoints.fetch_sub(1, Ordering::Relaxed);
                if let Some(conn) = e.entry.conn {
                    self.release_upstream(conn, topic);
                }
            }
        }
    }

    fn drop_script(&mut self, sh: &str) {
        let unused = self.scripts.entries.get(sh).is_some_and(Entry::unused);
        if !unused {
            return;
        }
        let entry = self.scripts.entries.remove(sh).expect("present");
        self.settle(sh);
        self.stats
            .upstream_subscriptions
            .fetch_sub(1, Ordering::Relaxed);
        // Nobody is subscribed any more: reads waiting for it go anywhere.
        self.stats
            .parked_reads
            .fetch_sub(entry.parked.len(), Ordering::Relaxed);
        for job in entry.parked {
            self.pool.dispatch(job);
        }
        if let Some(conn) = entry.conn {
            self.release_upstream(conn, &super::Topic::Script(sh.to_string()));
        }
        // A subscribe still in flight is released when its answer arrives
        // (see `on_subscribed`).
    }
}
