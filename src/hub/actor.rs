//! The hub's task: one loop that owns every subscription of a coin and
//! dispatches what comes in (session commands, pool events, timers) to the
//! part of the hub that handles it.
//!
//! Owns: the [`Actor`] state (the kinds' tables, the session index, the
//! failover and parking indexes) and the loop; fan-out of an entry's value
//! to its subscribers; re-subscribing orphans; failing whoever still waits
//! at shutdown. The rules live in the other files of `hub`.

use super::entry::Entry;
use super::failover::Holds;
use super::headers::Headers;
use super::members::SessionSubs;
use super::outpoint::Outpoints;
use super::read_subs::{Notices, ReadSubs};
use super::scripthash::Scripts;
use super::{Command, Form, HubConfig, HubStats, Route, SessionId, Topic};
use crate::jsonrpc::{self, ErrorCode, RpcError};
use crate::text_keys::TextKeys;
use crate::upstream::{Pool, PoolEvent};
use dashmap::DashMap;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// How often orphaned subscriptions (no upstream was available) are retried.
const RETRY_EVERY: Duration = Duration::from_millis(500);

pub(super) struct Actor {
    pub config: HubConfig,
    pub pool: Pool,
    /// Answers of the hub's own upstream requests come back through here.
    pub self_tx: mpsc::UnboundedSender<Command>,
    /// Read by the router (see `reads`).
    pub affinity: Arc<DashMap<String, Route, TextKeys>>,
    pub stats: Arc<HubStats>,
    pub headers: Headers,
    pub scripts: Scripts,
    pub outpoints: Outpoints,
    /// What each session holds (see `members`).
    pub sessions: HashMap<SessionId, SessionSubs>,
    /// Tells answers of superseded upstream subscribes apart.
    pub next_generation: u64,
    /// Statuses held after a failover (see `failover`).
    pub holds: Holds,
    /// Scripthashes with parked reads (see `reads`).
    pub parked: HashSet<String, TextKeys>,
    /// Subscriptions the hub holds because wallets read (see `read_subs`).
    pub read_subs: ReadSubs,
    /// Reads told by the router, taken on `Command::Noticed` (see
    /// `read_subs`).
    pub notices: Arc<Notices>,
}

impl Actor {
    pub fn new(
        config: HubConfig,
        pool: Pool,
        self_tx: mpsc::UnboundedSender<Command>,
        affinity: Arc<DashMap<String, Route, TextKeys>>,
        stats: Arc<HubStats>,
        notices: Arc<Notices>,
    ) -> Actor {
        let (limit, idle) = config
            .cache
            .as_ref()
            .map_or((0, Duration::from_secs(1)), |c| c.read_subscriptions());
        Actor {
            config,
            pool,
            self_tx,
            affinity,
            stats,
            headers: Headers::default(),
            scripts: Scripts::default(),
            outpoints: Outpoints::default(),
            sessions: HashMap::new(),
            next_generation: 1,
            holds: Holds::default(),
            parked: HashSet::default(),
            read_subs: ReadSubs::new(limit, idle),
            notices,
        }
    }

    pub async fn run(
        mut self,
        mut rx: mpsc::UnboundedReceiver<Command>,
        mut events: mpsc::UnboundedReceiver<PoolEvent>,
        shutdown: CancellationToken,
    ) {
        let mut retry = tokio::time::interval(RETRY_EVERY);
        retry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let hold_ends = self.holds.next_end();
            tokio::select! {
                _ = shutdown.cancelled() => break,
                Some(cmd) = rx.recv() => self.on_command(cmd),
                Some(ev) = events.recv() => self.on_event(ev),
                _ = retry.tick() => {
                    self.retry_orphans();
                    self.expire_parked();
                    self.sweep_read_subs();
                }
                _ = sleep_until_some(hold_ends), if hold_ends.is_some() => self.end_holds(),
            }
        }
        // Whoever still waits gets an answer.
        let entries =
            std::iter::once(&mut self.headers.entry).chain(self.scripts.entries.values_mut());
        for entry in entries {
            for w in entry.waiting.drain(..) {
                w.responder.fail(RpcError::new(
                    ErrorCode::UpstreamUnavailable,
                    "shutting down",
                ));
            }
            for job in entry.parked.drain(..) {
                job.responder.fail(RpcError::new(
                    ErrorCode::UpstreamUnavailable,
                    "shutting down",
                ));
            }
        }
    }

    /// The entry of a topic, if it exists (the header entry always does).
    pub fn entry(&mut self, topic: &Topic) -> Option<&mut Entry> {
        match topic {
            Topic::Headers => Some(&mut self.headers.entry),
            Topic::Script(sh) => self.scripts.entries.get_mut(sh),
            Topic::Outpoint(op) => self.outpoints.entries.get_mut(op).map(|o| &mut o.entry),
        }
    }

    /// Give a topic's entry an upstream subscription (or, for an outpoint
    /// without a 1.7 connection, emulation).
    pub fn start_upstream(&mut self, topic: Topic) {
        match topic {
            Topic::Outpoint(op) => self.start_outpoint(op),
            topic => self.start_subscribe(topic),
        }
    }

    fn on_command(&mut self, cmd: Command) {
        match cmd {
            Command::Subscribe {
                session,
                out,
                topic,
                form,
                limit,
                hint,
                responder,
            } => self.subscribe(session, out, topic, form, limit, hint, responder),
            Command::Unsubscribe {
                session,
                topic,
                form,
                responder,
            } => {
                let existed = self.remove(session, &topic, &form);
                responder.deliver_text(if existed { "true" } else { "false" });
            }
            Command::SessionClosed { session } => self.session_closed(session),
            Command::Subscribed {
                topic,
                conn,
                generation,
                reply,
            } => self.on_subscribed(topic, conn, generation, reply),
            Command::Read { scripthash, job } => self.on_read(scripthash, job),
            Command::Outpoint(done) => self.on_outpoint_done(done),
            Command::Noticed => self.on_notices(),
        }
    }

    fn on_event(&mut self, ev: PoolEvent) {
        match ev {
            PoolEvent::Up { .. } => {
                if self.headers.entry.orphaned() {
                    self.start_subscribe(Topic::Headers);
                }
                self.retry_orphans();
            }
            PoolEvent::Down { conn } => self.on_down(conn),
            PoolEvent::Notification {
                conn,
                method,
                params,
            } => self.on_notification(conn, &method, params.get()),
        }
    }

    /// Write the entry's current value to every subscriber, each in its form
    /// (and recompute the outpoints emulated over a script's status).
    pub fn fan_out(&mut self, topic: &Topic) {
        let Some(entry) = self.entry(topic) else {
            return;
        };
        let Some(value) = entry.value.clone() else {
            return;
        };
        if let Topic::Script(sh) = topic {
            // Kept answers of the old status go before anyone hears of
            // the new one.
            self.follow_answers(sh);
        }
        let Some(entry) = self.entry(topic) else {
            return;
        };
        let mut lines: HashMap<&Form, Option<jsonrpc::Line>> = HashMap::new();
        let mut sent = 0u64;
        for sub in entry.subscribers.values() {
            for form in &sub.forms {
                let line = lines
                    .entry(form)
                    .or_insert_with(|| topic.notification(form, &value));
                if let Some(line) = line {
                    sub.out.send(line);
                    sent += 1;
                }
            }
        }
        self.stats.notifications.fetch_add(sent, Ordering::Relaxed);
        if let Topic::Script(sh) = topic {
            self.script_changed(sh);
        }
    }

    /// Re-subscribe entries that lost their upstream and found none since.
    pub fn retry_orphans(&mut self) {
        if !self.pool.any_ready() {
            return;
        }
        if self.headers.entry.orphaned() {
            self.start_subscribe(Topic::Headers);
        }
        for sh in self.scripts.orphans() {
            self.start_subscribe(Topic::Script(sh));
        }
        for op in self.outpoints.orphans() {
            self.start_outpoint(op);
        }
    }
}

/// Sleep until `at`; forever without it.
async fn sleep_until_some(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
