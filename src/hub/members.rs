//! Who holds what: joining and leaving entries, the session index, the
//! subscription limits.
//!
//! Owns: [`SessionSubs`] (each session's subscriptions, for its limit and
//! for cleanup when it closes), subscribe and unsubscribe of one session,
//! the per-session and per-coin limits on scripthash subscriptions, and
//! dropping a scripthash entry with its last subscriber (releasing its
//! upstream subscription). A new entry's upstream subscribe is started
//! here and carried on in `upstream`.

use super::actor::Actor;
use super::entry::{answer, Entry, Subscriber, Waiter};
use super::{Form, SessionId, Topic};
use crate::jsonrpc::{ErrorCode, RpcError};
use crate::reply::{Outbound, Responder};
use std::collections::HashSet;
use std::sync::atomic::Ordering;

/// What one session holds, for its limit and for cleanup when it closes.
#[derive(Default)]
pub(super) struct SessionSubs {
    pub keys: HashSet<(Topic, Form)>,
    /// How many of `keys` are scripthash subscriptions (the limited kind).
    pub scripts: usize,
}

impl Actor {
    pub(super) fn subscribe(
        &mut self,
        session: SessionId,
        out: Outbound,
        topic: Topic,
        form: Form,
        limit: usize,
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
            if let Topic::Script(sh) = &topic {
                if held.map_or(0, |s| s.scripts) >= limit {
                    responder.fail(RpcError::new(
                        ErrorCode::LimitExceeded,
                        format!("too many subscriptions in this session (limit {limit})"),
                    ));
                    return;
                }
                if !self.scripts.entries.contains_key(sh) {
                    if self.scripts.entries.len() >= self.config.max_topics {
                        responder.fail(RpcError::new(
                            ErrorCode::LimitExceeded,
                            format!(
                                "this server holds its maximum of {} subscriptions for {}",
                                self.config.max_topics, self.config.coin
                            ),
                        ));
                        return;
                    }
                    self.scripts.entries.insert(sh.clone(), Entry::default());
                    self.stats
                        .upstream_subscriptions
                        .fetch_add(1, Ordering::Relaxed);
                }
            }
            let subs = self.sessions.entry(session).or_default();
            if matches!(topic, Topic::Script(_)) {
                subs.scripts += 1;
            }
            subs.keys.insert((topic.clone(), form.clone()));
            self.stats
                .session_subscriptions
                .fetch_add(1, Ordering::Relaxed);
        }
        let current = match &topic {
            Topic::Headers => self.headers.current(),
            Topic::Script(_) => None,
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
        let needs_upstream = entry.conn.is_none() && entry.pending.is_none();
        match value {
            Some(v) => answer(responder, &form, &v),
            None => entry.waiting.push(Waiter {
                responder,
                form,
                session,
            }),
        }
        if needs_upstream {
            self.start_subscribe(topic);
        }
    }

    /// Drop everything a closed session held.
    pub(super) fn session_closed(&mut self, session: SessionId) {
        let Some(subs) = self.sessions.remove(&session) else {
            return;
        };
        for (topic, form) in subs.keys {
            self.detach(session, &topic, &form);
            self.drop_if_unused(&topic);
        }
    }

    pub(super) fn remove(&mut self, session: SessionId, topic: &Topic, form: &Form) -> bool {
        let key = (topic.clone(), form.clone());
        let mut indexed = false;
        if let Some(subs) = self.sessions.get_mut(&session) {
            if subs.keys.remove(&key) {
                indexed = true;
                if matches!(topic, Topic::Script(_)) {
                    subs.scripts -= 1;
                }
                if subs.keys.is_empty() {
                    self.sessions.remove(&session);
                }
            }
        }
        let detached = self.detach(session, topic, form);
        self.drop_if_unused(topic);
        indexed || detached
    }

    /// Take `(session, form)` out of a topic's entry (not out of the session
    /// index). A subscribe of it still waiting for the upstream is answered
    /// with an error.
    pub(super) fn detach(&mut self, session: SessionId, topic: &Topic, form: &Form) -> bool {
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
        while i < entry.waiting.len() {
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
            self.stats
                .session_subscriptions
                .fetch_sub(1, Ordering::Relaxed);
        }
        existed
    }

    /// Drop a scripthash entry nobody holds any more, and release its
    /// upstream subscription.
    pub(super) fn drop_if_unused(&mut self, topic: &Topic) {
        let Topic::Script(sh) = topic else {
            return;
        };
        let unused = self
            .scripts
            .entries
            .get(sh)
            .is_some_and(|e| e.subscribers.is_empty() && e.waiting.is_empty());
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
            self.release_upstream(conn, sh);
        }
        // A subscribe still in flight is released when its answer arrives
        // (see `on_subscribed`).
    }
}
