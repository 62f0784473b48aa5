//! An entry's upstream subscription: subscribing on a connection, its
//! answer, its notifications, and moving it when the connection goes.
//!
//! Owns: the subscribe request (one per entry at a time, told apart from
//! superseded ones by a generation), answering waiters with the first value
//! or failing them with the upstream's error, the notifications that arrive
//! before the answer they follow (`Entry::early`), and moving every
//! subscription off a connection that went down or left rotation, and
//! releasing an upstream subscription nobody needs any more. Whether a
//! changed value after a move is announced or held is `failover`'s call.
//! Each kind subscribes only on the connections whose level serves it
//! (`Topic::need`): scripthashes below 1.7, outpoints from 1.7.

use super::actor::Actor;
use super::entry::{answer, Value};
use super::{headers, outpoint, scripthash, Command, Form, Topic};
use crate::jsonrpc::{self, ErrorCode, RpcError};
use crate::reply::{Answer, InternalReply, Responder};
use crate::status::events::EventKind;
use crate::upstream::{ConnId, Job};
use std::sync::atomic::Ordering;
use tokio::sync::oneshot;
use tokio::time::Instant;

impl Actor {
    /// Send an upstream subscribe for `topic` on the preferred connection
    /// of the levels that serve it.
    pub(super) fn start_subscribe(&mut self, topic: Topic) {
        let conn = self.pool.preferred_for(topic.need());
        let hint = match &topic {
            Topic::Outpoint(op) => self.outpoints.entries.get(op).and_then(|e| e.spk.clone()),
            _ => None,
        };
        let timeout = self.config.request_timeout;
        let generation = self.next_generation;
        self.next_generation += 1;
        let Some(entry) = self.entry(&topic) else {
            return;
        };
        entry.conn = None;
        entry.early = None;
        // A hold belongs to the connection it was started on.
        entry.hold = None;
        let Some(conn) = conn else {
            entry.pending = None;
            // No upstream at all: reads waiting for this subscription fail
            // now instead of at their deadline.
            let parked = std::mem::take(&mut entry.parked);
            self.stats
                .parked_reads
                .fetch_sub(parked.len(), Ordering::Relaxed);
            for job in parked {
                self.pool.dispatch(job);
            }
            if let Topic::Script(sh) = &topic {
                self.settle(sh);
            }
            self.fail_waiting(
                &topic,
                |_| {
                    RpcError::new(
                        ErrorCode::UpstreamUnavailable,
                        "no upstream server available",
                    )
                },
                None,
            );
            if let Topic::Script(sh) = &topic {
                self.abandon_read_sub(sh);
            }
            return;
        };
        entry.pending = Some((conn, generation));
        if let Topic::Script(sh) = &topic {
            self.settle(sh);
        }
        let (method, params) = topic.subscribe_request(hint.as_deref());
        let (tx, rx) = oneshot::channel();
        let mut job = Job::new(
            jsonrpc::request_prefix(method, &params),
            Responder::Internal(tx),
            Instant::now() + timeout,
        );
        // The hub re-subscribes by itself; a retry elsewhere would answer
        // from a connection it does not know about.
        job.retryable = false;
        self.stats
            .upstream_subscribe_requests
            .fetch_add(1, Ordering::Relaxed);
        if let Err(job) = self.pool.dispatch_to(conn, job) {
            job.responder.fail(RpcError::new(
                ErrorCode::UpstreamUnavailable,
                "upstream connection went away",
            ));
        }
        let back = self.self_tx.clone();
        tokio::spawn(async move {
            let reply = rx.await.unwrap_or_else(|_| {
                Err(RpcError::new(ErrorCode::UpstreamUnavailable, "no answer"))
            });
            let _ = back.send(Command::Subscribed {
                topic,
                conn,
                generation,
                reply,
            });
        });
    }

    /// Answer every waiter of `topic` with an error and unsubscribe it: a
    /// subscriber that never got a status is not subscribed. `relay` is an
    /// upstream error object, relayed verbatim instead when present.
    pub(super) fn fail_waiting(
        &mut self,
        topic: &Topic,
        err: impl Fn(&Form) -> RpcError,
        relay: Option<&serde_json::value::RawValue>,
    ) {
        let Some(entry) = self.entry(topic) else {
            return;
        };
        let waiting = std::mem::take(&mut entry.waiting);
        for w in waiting {
            match relay {
                Some(e) => w.responder.deliver(Err(e.into())),
                None => w.responder.fail(err(&w.form)),
            }
            if let Some(subs) = self.sessions.get_mut(&w.session) {
                if subs.keys.remove(&(topic.clone(), w.form.clone())) {
                    if super::members::limited(topic) {
                        subs.limited -= 1;
                    }
                    if subs.keys.is_empty() {
                        self.sessions.remove(&w.session);
                    }
                }
            }
            self.detach(w.session, topic, &w.form, false);
        }
        self.drop_if_unused(topic);
    }

    pub(super) fn on_subscribed(
        &mut self,
        topic: Topic,
        conn: ConnId,
        generation: u64,
        reply: InternalReply,
    ) {
        let pool_has_conn = self.pool.is_up(conn);
        let current = self
            .entry(&topic)
            .is_some_and(|e| e.pending == Some((conn, generation)));
        if !current {
            // A stale answer: the entry was dropped or moved meanwhile. An
            // upstream subscription nobody uses any more is released.
            if let (Ok(Answer::Result(_)), true) = (&reply, pool_has_conn) {
                let in_use = self.entry(&topic).is_some_and(|e| e.on_conn(conn));
                if !in_use {
                    self.release_upstream(conn, &topic);
                }
            }
            return;
        }
        let new_tip = self.pool.conn_tip(conn);
        let entry = self.entry(&topic).expect("current entry exists");
        entry.pending = None;
        // Moved off a connection that was behind this one: not a lag.
        let ahead = entry
            .moved_from_tip
            .take()
            .zip(new_tip)
            .is_some_and(|(old, new)| new > old);
        let early = entry.early.take();
        // Whether the value comes from a notification the upstream sent
        // after its answer, rather than from the answer itself.
        let notified = early.is_some();
        let value = match &reply {
            Ok(Answer::Result(raw)) if pool_has_conn => {
                topic.parse_result(raw.get()).map(|v| early.unwrap_or(v))
            }
            _ => None,
        };
        let Some(value) = value else {
            if let (Topic::Outpoint(op), true) = (&topic, pool_has_conn) {
                // A 1.7 upstream that cannot serve outpoints (its node
                // cannot look spenders up): emulated instead.
                return self.native_refused(op, "refused or unreadable answer");
            }
            // Those waiting get the upstream's error, or the proxy's. The
            // entry is retried while it has subscribers.
            let relay = match &reply {
                Ok(Answer::Error(e)) => Some(e.clone()),
                _ => None,
            };
            self.fail_waiting(
                &topic,
                |_| match &reply {
                    Ok(Answer::Result(_)) if !pool_has_conn => RpcError::new(
                        ErrorCode::UpstreamUnavailable,
                        "upstream connection lost while subscribing",
                    ),
                    Ok(Answer::Result(r)) => RpcError::new(
                        ErrorCode::InternalError,
                        format!("unexpected subscription answer from upstream: {}", r.get()),
                    ),
                    Ok(Answer::Error(_)) => {
                        RpcError::new(ErrorCode::InternalError, "upstream refused")
                    }
                    Err(e) => e.clone(),
                },
                relay.as_deref(),
            );
            if let Topic::Script(sh) = &topic {
                // A read-driven subscription is not retried.
                self.abandon_read_sub(sh);
                self.settle(sh);
            }
            return;
        };
        entry.conn = Some(conn);
        let changed = entry.value.as_ref().is_some_and(|old| *old != value);
        let value = if changed && !notified && !ahead {
            // Moved, and the new upstream answers another value: it may only
            // lag (see `failover`).
            match self.hold_or_pass(&topic, value) {
                Some(value) => value,
                None => return,
            }
        } else {
            value
        };
        let entry = self.entry(&topic).expect("current entry exists");
        let first = entry.value.is_none();
        entry.value = Some(value.clone());
        let waiting = std::mem::take(&mut entry.waiting);
        // Affinity first: a subscriber that asks for the history as soon as
        // it has the status must reach this connection.
        if let Topic::Script(sh) = &topic {
            self.settle(sh);
        }
        if let Value::Tip { height, hex } = &value {
            self.set_tip(*height, hex);
        }
        for w in waiting {
            answer(w.responder, &w.form, &value);
        }
        if changed {
            // The status moved while the subscription was being moved: tell
            // every subscriber, or a payment goes unnoticed.
            self.fan_out(&topic);
        } else if let (true, Topic::Script(sh)) = (first, &topic) {
            // Outpoints emulated over this script start from it.
            self.script_changed(sh);
        }
        // Those answered may have unsubscribed meanwhile.
        self.drop_if_unused(&topic);
    }

    /// Tell the upstream it may forget a subscription (scripthashes:
    /// protocol 1.4.2; outpoints: 1.7). A connection of a lower level is
    /// not asked: ElectrumX answers a method its level lacks with an error
    /// and charges the session 100 for it (the session keeps the
    /// subscription until it closes). Later notifications for it are
    /// ignored.
    pub(super) fn release_upstream(&self, conn: ConnId, topic: &Topic) {
        let level = self.pool.conn_level(conn);
        let (method, params) = match topic {
            Topic::Headers => return,
            Topic::Script(_) if level.is_some_and(|l| l < crate::protocol::Version(1, 4, 2)) => {
                return
            }
            Topic::Script(sh) => (scripthash::UNSUBSCRIBE, scripthash::subscribe_params(sh)),
            Topic::Outpoint(op) => (outpoint::UNSUBSCRIBE, outpoint::unsubscribe_params(op)),
        };
        let (tx, rx) = oneshot::channel();
        let mut job = Job::new(
            jsonrpc::request_prefix(method, &params),
            Responder::Internal(tx),
            Instant::now() + self.config.request_timeout,
        );
        job.retryable = false;
        // Keep the receiver alive until the answer arrives, or the connection
        // would skip the request as abandoned.
        if self.pool.dispatch_to(conn, job).is_ok() {
            self.stats
                .upstream_unsubscribe_requests
                .fetch_add(1, Ordering::Relaxed);
            tokio::spawn(async move {
                let _ = rx.await;
            });
        }
    }

    /// A connection is gone or its upstream left rotation: every
    /// subscription established or asked for there moves.
    pub(super) fn on_down(&mut self, conn: ConnId) {
        let mut moved = Vec::new();
        if self.headers.entry.on_conn(conn) {
            moved.push(Topic::Headers);
        }
        let old_tip = self.pool.conn_tip(conn);
        // Subscriptions established there (not only asked for).
        let mut established = Vec::new();
        for (sh, entry) in self.scripts.entries.iter_mut() {
            if entry.on_conn(conn) {
                entry.moved_from_tip = old_tip;
                if entry.conn == Some(conn) {
                    established.push(Topic::Script(sh.clone()));
                }
                moved.push(Topic::Script(sh.clone()));
            }
        }
        for (op, e) in self.outpoints.entries.iter_mut() {
            if e.entry.on_conn(conn) {
                e.entry.moved_from_tip = old_tip;
                if e.entry.conn == Some(conn) {
                    established.push(Topic::Outpoint(op.clone()));
                }
                moved.push(Topic::Outpoint(op.clone()));
            }
        }
        if !moved.is_empty() {
            tracing::info!(coin = %self.config.coin, subscriptions = moved.len(), "moving subscriptions off a lost upstream connection");
            self.config.journal.record(
                EventKind::Failover,
                self.pool.upstream_of(conn).as_deref(),
                format!("subscriptions moved off a lost connection: {}", moved.len()),
            );
        }
        for topic in moved {
            self.start_upstream(topic);
        }
        // A connection taken out of rotation (lagging, or gone from
        // the configuration) may still be open: tell its upstream to
        // stop watching. To a dead one nothing is sent.
        for topic in established {
            self.release_upstream(conn, &topic);
        }
    }

    pub(super) fn on_notification(&mut self, conn: ConnId, method: &str, params: &str) {
        let (topic, value) = match method {
            scripthash::SUBSCRIBE => match scripthash::parse_notification(params) {
                Some((sh, value)) => (Topic::Script(sh), value),
                None => return,
            },
            headers::SUBSCRIBE => match headers::parse_notification(params) {
                Some(value) => (Topic::Headers, value),
                None => return,
            },
            outpoint::SUBSCRIBE => match outpoint::parse_notification(params) {
                Some((op, value)) => (Topic::Outpoint(op), value),
                None => return,
            },
            // Unsolicited chatter (relayfee, estimatefee, peers, the 1.7
            // `server.ping` noise): nobody subscribed to it through the proxy.
            _ => return,
        };
        let Some(entry) = self.entry(&topic) else {
            return;
        };
        if entry.conn != Some(conn) {
            if entry.pending.is_some_and(|(c, _)| c == conn) {
                // Sent after the subscribe's answer, seen before it.
                entry.early = Some(value);
            }
            return;
        }
        if entry.hold.is_some() {
            return self.notified_while_held(&topic, value);
        }
        if entry.value.as_ref() == Some(&value) {
            return;
        }
        if let Value::Tip { height, hex } = &value {
            self.set_tip(*height, hex);
        }
        let entry = self.entry(&topic).expect("present");
        entry.value = Some(value);
        self.fan_out(&topic);
    }
}
