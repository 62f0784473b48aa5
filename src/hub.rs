//! The subscription hub of one coin: one upstream subscription per distinct
//! thing, fanned out to every session that asked for it.
//!
//! Owns: which sessions subscribed to the tip and to which scripthashes (and
//! in which form: scripthash, address, header shape), the last status and tip
//! each upstream subscription reported, where each subscription lives (which
//! upstream connection), re-subscribing elsewhere when that connection dies
//! (and notifying whatever changed meanwhile), and the scripthash -> route
//! affinity the router uses to keep histories consistent with statuses.
//!
//! It runs as one actor task: sessions and connections talk to it through a
//! channel, so no lock is held anywhere on this path. Fan-out formats each
//! notification once per form and pushes it into each session's queue.
//!
//! # Failover without going backwards
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
//! # Reads follow the status
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
//! died before it was answered comes back here too ([`Hub::reroute`])
//! instead of going to any upstream.
//!
//! What a wallet sees across a failover: no notification while the new
//! upstream catches up (or one, later, for a real change), and reads of its
//! scripthashes that take up to the hold longer; never a history that
//! contradicts the last status it was sent, but for a read crossing an
//! announcement (as on any single server). With no upstream at all, reads
//! fail at once, as everything else does.

use crate::header::{self, HeaderForm};
use crate::jsonrpc::{self, ErrorCode, RpcError};
use crate::reply::{Answer, InternalReply, Outbound, Responder};
use crate::status::events::{CoinEvents, EventKind};
use crate::upstream::{ConnId, Job, Pool, PoolEvent, Reroute};
use dashmap::DashMap;
use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, HashSet};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Identifies a client session within the process.
pub type SessionId = u64;

/// What is subscribed to.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Topic {
    Headers,
    /// A scripthash, lowercase hex.
    Script(String),
}

/// How a subscriber wants its answers and notifications.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Form {
    Header(HeaderForm),
    Scripthash,
    /// `blockchain.address.subscribe`: notifications carry this address.
    Address(String),
}

/// Counters the metrics module reads.
#[derive(Debug, Default)]
pub struct HubStats {
    /// Distinct scripthash subscriptions held for sessions (each is one
    /// subscription upstream once established).
    pub upstream_subscriptions: AtomicUsize,
    /// Subscriptions held by sessions (one per session, topic and form).
    pub session_subscriptions: AtomicUsize,
    /// Notifications written into session queues.
    pub notifications: AtomicU64,
    /// Upstream subscribe requests sent (first subscriptions and failovers).
    pub upstream_subscribe_requests: AtomicU64,
    /// Upstream `blockchain.scripthash.unsubscribe` requests sent.
    pub upstream_unsubscribe_requests: AtomicU64,
    /// Height of the tip the hub last reported (0: none yet).
    pub tip_height: AtomicU64,
    /// Scripthash statuses held now: moved to an upstream that reports
    /// another status than the one subscribers have (see the module doc).
    pub held_statuses: AtomicUsize,
    /// Reads of subscribed scripthashes waiting for their subscription to
    /// settle (moving to another upstream, or its status held).
    pub parked_reads: AtomicUsize,
}

/// The handle sessions and the router use. Cheap to clone.
#[derive(Clone)]
pub struct Hub {
    tx: mpsc::UnboundedSender<Command>,
    affinity: Arc<DashMap<String, Route>>,
    pub stats: Arc<HubStats>,
}

/// Where a read about a subscribed scripthash goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// The connection holding its subscription.
    Conn(ConnId),
    /// Nowhere yet: subscribers were told a status, and the subscription is
    /// moving to another upstream or its status is held. Give the read to
    /// [`Hub::read`]; it goes out once the subscription has settled.
    Wait,
}

enum Command {
    Subscribe {
        session: SessionId,
        out: Outbound,
        topic: Topic,
        form: Form,
        /// Most scripthash subscriptions this session may hold.
        limit: usize,
        responder: Responder,
    },
    Unsubscribe {
        session: SessionId,
        topic: Topic,
        form: Form,
        responder: Responder,
    },
    SessionClosed {
        session: SessionId,
    },
    Subscribed {
        topic: Topic,
        conn: ConnId,
        generation: u64,
        reply: InternalReply,
    },
    /// A read about a subscribed scripthash (lowercase) that could not go
    /// straight to the connection holding the subscription.
    Read {
        scripthash: String,
        job: Job,
    },
}

/// Hub settings.
#[derive(Debug, Clone)]
pub struct HubConfig {
    pub coin: String,
    pub max_topics: usize,
    pub request_timeout: Duration,
    /// How long a status that differs after a failover is held before it is
    /// announced (see the module doc); zero announces at once.
    pub failover_hold: Duration,
    /// Told of every new tip before any subscriber is (drops what a reorg
    /// touched).
    pub cache: Option<Arc<crate::cache::Cache>>,
    /// Failovers and held statuses are recorded here.
    pub journal: CoinEvents,
}

impl Hub {
    pub fn start(
        config: HubConfig,
        pool: Pool,
        events: mpsc::UnboundedReceiver<PoolEvent>,
        shutdown: &CancellationToken,
        tracker: &TaskTracker,
    ) -> Hub {
        let (tx, rx) = mpsc::unbounded_channel();
        let hub = Hub {
            tx: tx.clone(),
            affinity: Arc::new(DashMap::new()),
            stats: Arc::new(HubStats::default()),
        };
        let actor = Actor {
            config,
            pool,
            self_tx: tx,
            affinity: hub.affinity.clone(),
            stats: hub.stats.clone(),
            headers: Entry::default(),
            scripts: HashMap::new(),
            sessions: HashMap::new(),
            tip: None,
            next_generation: 1,
            hold_deadlines: BinaryHeap::new(),
            held: HashSet::new(),
            parked: HashSet::new(),
        };
        tracker.spawn(actor.run(rx, events, shutdown.clone()));
        hub
    }

    /// Subscribe a session; `responder` gets the current status or tip.
    /// `limit` is the most scripthash subscriptions the session may hold;
    /// the hub keeps the count, so a refused or failed subscription never
    /// counts against it.
    pub fn subscribe(
        &self,
        session: SessionId,
        out: &Outbound,
        topic: Topic,
        form: Form,
        limit: usize,
        responder: Responder,
    ) {
        let cmd = Command::Subscribe {
            session,
            out: out.clone(),
            topic,
            form,
            limit,
            responder,
        };
        if let Err(mpsc::error::SendError(Command::Subscribe { responder, .. })) = self.tx.send(cmd)
        {
            responder.fail(RpcError::new(
                ErrorCode::UpstreamUnavailable,
                "shutting down",
            ));
        }
    }

    /// Unsubscribe; `responder` gets `true` if the subscription existed.
    pub fn unsubscribe(&self, session: SessionId, topic: Topic, form: Form, responder: Responder) {
        let cmd = Command::Unsubscribe {
            session,
            topic,
            form,
            responder,
        };
        if let Err(mpsc::error::SendError(Command::Unsubscribe { responder, .. })) =
            self.tx.send(cmd)
        {
            responder.fail(RpcError::new(
                ErrorCode::UpstreamUnavailable,
                "shutting down",
            ));
        }
    }

    /// Drop everything a closed session held. The hub keeps its own index of
    /// each session's subscriptions; `_subs` is ignored (kept so callers
    /// that still pass the session's list compile).
    pub fn session_closed(&self, session: SessionId, _subs: Vec<(Topic, Form)>) {
        let _ = self.tx.send(Command::SessionClosed { session });
    }

    /// Where a read about this scripthash (lowercase) must go: `None` when
    /// nobody was told a status of it (no subscription, or its first
    /// subscribe is still on its way), and it may go anywhere.
    pub fn route(&self, scripthash: &str) -> Option<Route> {
        self.affinity.get(scripthash).map(|r| *r)
    }

    /// Send a read of a subscribed scripthash (lowercase) to the connection
    /// holding its subscription once it has settled: at once, or when the
    /// subscription has moved and its status is no longer held. The job's
    /// retries come back here (see [`Hub::reroute`]).
    pub fn read(&self, scripthash: &str, mut job: Job) {
        job.reroute = Some(self.reroute(scripthash));
        self.send_read(scripthash.to_string(), job);
    }

    fn send_read(&self, scripthash: String, job: Job) {
        if let Err(mpsc::error::SendError(Command::Read { job, .. })) =
            self.tx.send(Command::Read { scripthash, job })
        {
            job.responder.fail(RpcError::new(
                ErrorCode::UpstreamUnavailable,
                "shutting down",
            ));
        }
    }

    /// What a read of this scripthash carries so that, if its connection is
    /// lost before it is answered, it is retried through the hub (on the
    /// connection the subscription moves to) rather than anywhere.
    pub fn reroute(&self, scripthash: &str) -> Reroute {
        let hub = self.clone();
        let scripthash = scripthash.to_string();
        Reroute(Arc::new(move |job| hub.send_read(scripthash.clone(), job)))
    }
}

/// The last value an upstream subscription reported.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Value {
    /// A scripthash status as JSON text: `null` or a quoted hex string.
    Status(String),
    Tip {
        height: u64,
        hex: String,
    },
}

/// One topic: its subscribers and where its upstream subscription lives.
///
/// Invariants: every `(session, form)` in `waiting` is also in
/// `subscribers` and in the actor's session index; a scripthash entry with no
/// subscribers is removed at once.
#[derive(Default)]
struct Entry {
    subscribers: HashMap<SessionId, Subscriber>,
    /// The last value subscribers were told (or are answered with).
    value: Option<Value>,
    /// Where the upstream subscription lives; `None` while (re)subscribing or
    /// while no upstream is available.
    conn: Option<ConnId>,
    /// The upstream subscribe in flight: its connection and generation.
    /// Answers with another generation are stale.
    pending: Option<(ConnId, u64)>,
    /// A notification that arrived on the pending connection before the
    /// hub saw the subscribe's answer: it is newer than that answer.
    early: Option<Value>,
    /// Subscribers that wait for the first answer.
    waiting: Vec<Waiter>,
    /// Set while the status is held: the subscription moved to `conn`,
    /// whose upstream reports another status than `value`.
    hold: Option<Hold>,
    /// Reads waiting for the subscription to settle (see [`Route::Wait`]).
    parked: Vec<Job>,
    /// The tip of the connection the subscription is moving off, when that
    /// connection is still up (it left rotation, e.g. lagging): a new
    /// upstream with more blocks than that is ahead, not behind, and its
    /// different status is news, announced without a hold.
    moved_from_tip: Option<u64>,
}

/// A status held after a failover.
struct Hold {
    /// What the new upstream reports.
    upstream: Value,
    /// When `upstream` is announced if nothing changed meanwhile.
    until: Instant,
}

/// Where reads of an entry go (see [`Route`]).
fn route_of(entry: &Entry) -> Option<Route> {
    match entry.conn {
        Some(conn) if entry.hold.is_none() => Some(Route::Conn(conn)),
        // Moving, held, or waiting for an upstream: the reads wait with it.
        _ if entry.value.is_some() => Some(Route::Wait),
        // Nobody was told anything yet.
        _ => None,
    }
}

struct Waiter {
    responder: Responder,
    form: Form,
    session: SessionId,
}

struct Subscriber {
    out: Outbound,
    forms: Vec<Form>,
}

/// What one session holds, for its limit and for cleanup when it closes.
#[derive(Default)]
struct SessionSubs {
    keys: std::collections::HashSet<(Topic, Form)>,
    /// How many of `keys` are scripthash subscriptions (the limited kind).
    scripts: usize,
}

struct Actor {
    config: HubConfig,
    pool: Pool,
    self_tx: mpsc::UnboundedSender<Command>,
    affinity: Arc<DashMap<String, Route>>,
    stats: Arc<HubStats>,
    headers: Entry,
    scripts: HashMap<String, Entry>,
    sessions: HashMap<SessionId, SessionSubs>,
    tip: Option<(u64, String)>,
    next_generation: u64,
    /// When each hold ends (stale items are skipped when they come up).
    hold_deadlines: BinaryHeap<Reverse<(Instant, String)>>,
    /// Scripthashes whose status is held.
    held: HashSet<String>,
    /// Scripthashes with parked reads.
    parked: HashSet<String>,
}

/// How often orphaned subscriptions (no upstream was available) are retried.
const RETRY_EVERY: Duration = Duration::from_millis(500);

impl Actor {
    async fn run(
        mut self,
        mut rx: mpsc::UnboundedReceiver<Command>,
        mut events: mpsc::UnboundedReceiver<PoolEvent>,
        shutdown: CancellationToken,
    ) {
        let mut retry = tokio::time::interval(RETRY_EVERY);
        retry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let hold_ends = self.hold_deadlines.peek().map(|Reverse((at, _))| *at);
            tokio::select! {
                _ = shutdown.cancelled() => break,
                Some(cmd) = rx.recv() => self.on_command(cmd),
                Some(ev) = events.recv() => self.on_event(ev),
                _ = retry.tick() => {
                    self.retry_orphans();
                    self.expire_parked();
                }
                _ = sleep_until_some(hold_ends), if hold_ends.is_some() => self.end_holds(),
            }
        }
        // Whoever still waits gets an answer.
        for entry in std::iter::once(&mut self.headers).chain(self.scripts.values_mut()) {
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

    fn entry(&mut self, topic: &Topic) -> Option<&mut Entry> {
        match topic {
            Topic::Headers => Some(&mut self.headers),
            Topic::Script(sh) => self.scripts.get_mut(sh),
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
                responder,
            } => self.subscribe(session, out, topic, form, limit, responder),
            Command::Unsubscribe {
                session,
                topic,
                form,
                responder,
            } => {
                let existed = self.remove(session, &topic, &form);
                responder.deliver_text(if existed { "true" } else { "false" });
            }
            Command::SessionClosed { session } => {
                let Some(subs) = self.sessions.remove(&session) else {
                    return;
                };
                for (topic, form) in subs.keys {
                    self.detach(session, &topic, &form);
                    self.drop_if_unused(&topic);
                }
            }
            Command::Subscribed {
                topic,
                conn,
                generation,
                reply,
            } => self.on_subscribed(topic, conn, generation, reply),
            Command::Read { scripthash, job } => self.on_read(scripthash, job),
        }
    }

    /// A read of a subscribed scripthash: to the connection holding the
    /// subscription, or parked until the subscription has settled.
    fn on_read(&mut self, sh: String, job: Job) {
        let Some(entry) = self.scripts.get_mut(&sh) else {
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
    fn settle(&mut self, sh: &str) {
        let Some(entry) = self.scripts.get_mut(sh) else {
            self.affinity.remove(sh);
            if self.held.remove(sh) {
                self.stats.held_statuses.fetch_sub(1, Ordering::Relaxed);
            }
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
        if entry.hold.is_some() {
            if self.held.insert(sh.to_string()) {
                self.stats.held_statuses.fetch_add(1, Ordering::Relaxed);
            }
        } else if self.held.remove(sh) {
            self.stats.held_statuses.fetch_sub(1, Ordering::Relaxed);
        }
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

    /// Announce what the new upstream reports for every hold that ran out.
    fn end_holds(&mut self) {
        let now = Instant::now();
        while let Some(Reverse((at, sh))) = self.hold_deadlines.peek() {
            if *at > now {
                break;
            }
            let sh = sh.clone();
            self.hold_deadlines.pop();
            let Some(entry) = self.scripts.get_mut(&sh) else {
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

    /// Fail parked reads whose deadline passed (a subscription that takes
    /// that long to settle: the upstreams keep failing).
    fn expire_parked(&mut self) {
        if self.parked.is_empty() {
            return;
        }
        let now = Instant::now();
        let mut expired = 0;
        let mut emptied = Vec::new();
        for sh in &self.parked {
            let Some(entry) = self.scripts.get_mut(sh) else {
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

    fn subscribe(
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
                if !self.scripts.contains_key(sh) {
                    if self.scripts.len() >= self.config.max_topics {
                        responder.fail(RpcError::new(
                            ErrorCode::LimitExceeded,
                            format!(
                                "this server holds its maximum of {} subscriptions for {}",
                                self.config.max_topics, self.config.coin
                            ),
                        ));
                        return;
                    }
                    self.scripts.insert(sh.clone(), Entry::default());
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
        let tip = self.tip.clone();
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
        let fallback = match (&topic, tip) {
            (Topic::Headers, Some((height, hex))) => Some(Value::Tip { height, hex }),
            _ => None,
        };
        let value = entry.value.clone().or(fallback);
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

    /// A session holds one header subscription, as on ElectrumX: subscribing
    /// again in another shape (before and after negotiating, or a 1.2 client
    /// toggling `raw`) replaces the shape instead of adding a second stream
    /// of notifications. `numblocks.subscribe` is a different method and
    /// stays apart. A waiter of the old shape is still answered in it.
    fn replace_header_shape(&mut self, session: SessionId, shape: HeaderForm) {
        let is_shape = |h: &HeaderForm| *h != HeaderForm::Height;
        if !is_shape(&shape) {
            return;
        }
        let Some(subs) = self.sessions.get_mut(&session) else {
            return;
        };
        let stale: Vec<Form> = subs
            .keys
            .iter()
            .filter_map(|(t, f)| match (t, f) {
                (Topic::Headers, Form::Header(h)) if is_shape(h) && *h != shape => Some(f.clone()),
                _ => None,
            })
            .collect();
        for form in stale {
            subs.keys.remove(&(Topic::Headers, form.clone()));
            self.stats
                .session_subscriptions
                .fetch_sub(1, Ordering::Relaxed);
            if let Some(sub) = self.headers.subscribers.get_mut(&session) {
                sub.forms.retain(|f| *f != form);
            }
        }
    }

    /// Remove one form of one session (an unsubscribe); drop the entry with
    /// its last subscriber. Returns whether the session held it.
    fn remove(&mut self, session: SessionId, topic: &Topic, form: &Form) -> bool {
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
    fn detach(&mut self, session: SessionId, topic: &Topic, form: &Form) -> bool {
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
    fn drop_if_unused(&mut self, topic: &Topic) {
        let Topic::Script(sh) = topic else {
            return;
        };
        let unused = self
            .scripts
            .get(sh)
            .is_some_and(|e| e.subscribers.is_empty() && e.waiting.is_empty());
        if !unused {
            return;
        }
        let entry = self.scripts.remove(sh).expect("present");
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

    /// Tell the upstream it may forget a scripthash (protocol 1.4.2). An
    /// upstream that does not know the method answers an error, ignored; its
    /// later notifications for it are ignored too.
    fn release_upstream(&self, conn: ConnId, sh: &str) {
        let (tx, rx) = oneshot::channel();
        let params = format!("[{}]", jsonrpc::quote(sh));
        let mut job = Job::new(
            jsonrpc::request_prefix("blockchain.scripthash.unsubscribe", &params),
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

    /// Send an upstream subscribe for `topic` on the preferred connection.
    fn start_subscribe(&mut self, topic: Topic) {
        let conn = self.pool.preferred();
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
            return;
        };
        entry.pending = Some((conn, generation));
        if let Topic::Script(sh) = &topic {
            self.settle(sh);
        }
        let (method, params) = match &topic {
            Topic::Headers => ("blockchain.headers.subscribe", "[]".to_string()),
            Topic::Script(sh) => (
                "blockchain.scripthash.subscribe",
                format!("[{}]", jsonrpc::quote(sh)),
            ),
        };
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
    fn fail_waiting(
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
                Some(e) => w.responder.deliver(Err(e)),
                None => w.responder.fail(err(&w.form)),
            }
            if let Some(subs) = self.sessions.get_mut(&w.session) {
                if subs.keys.remove(&(topic.clone(), w.form.clone())) {
                    if matches!(topic, Topic::Script(_)) {
                        subs.scripts -= 1;
                    }
                    if subs.keys.is_empty() {
                        self.sessions.remove(&w.session);
                    }
                }
            }
            self.detach(w.session, topic, &w.form);
        }
        self.drop_if_unused(topic);
    }

    fn on_subscribed(&mut self, topic: Topic, conn: ConnId, generation: u64, reply: InternalReply) {
        let pool_has_conn = self.pool.is_up(conn);
        let current = match &topic {
            Topic::Headers => Some(&self.headers),
            Topic::Script(sh) => self.scripts.get(sh),
        }
        .is_some_and(|e| e.pending == Some((conn, generation)));
        if !current {
            // A stale answer: the entry was dropped or moved meanwhile. An
            // upstream subscription nobody uses any more is released.
            if let (Topic::Script(sh), Ok(Answer::Result(_)), true) =
                (&topic, &reply, pool_has_conn)
            {
                let in_use = self.scripts.get(sh).is_some_and(|e| {
                    e.conn == Some(conn) || e.pending.is_some_and(|(c, _)| c == conn)
                });
                if !in_use {
                    self.release_upstream(conn, sh);
                }
            }
            return;
        }
        let hold = self.config.failover_hold;
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
                parse_value(&topic, raw.get()).map(|v| early.unwrap_or(v))
            }
            _ => None,
        };
        let Some(value) = value else {
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
                self.settle(sh);
            }
            return;
        };
        entry.conn = Some(conn);
        let changed = entry.value.as_ref().is_some_and(|old| *old != value);
        if changed && !notified && !ahead && matches!(topic, Topic::Script(_)) && !hold.is_zero() {
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
            if let Topic::Script(sh) = &topic {
                tracing::debug!(coin = %self.config.coin, scripthash = %sh, "the new upstream reports another status: held");
                self.config.journal.record(
                    EventKind::StatusHeld,
                    None,
                    "statuses held: the new upstream reports another status",
                );
                self.hold_deadlines.push(Reverse((until, sh.clone())));
                self.settle(sh);
            }
            return;
        }
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
        }
    }

    fn on_event(&mut self, ev: PoolEvent) {
        match ev {
            PoolEvent::Up { .. } => {
                if self.headers.conn.is_none() && self.headers.pending.is_none() {
                    self.start_subscribe(Topic::Headers);
                }
                self.retry_orphans();
            }
            PoolEvent::Down { conn } => {
                let on_conn =
                    |e: &Entry| e.conn == Some(conn) || e.pending.is_some_and(|(c, _)| c == conn);
                let mut moved = Vec::new();
                if on_conn(&self.headers) {
                    moved.push(Topic::Headers);
                }
                let old_tip = self.pool.conn_tip(conn);
                // Subscriptions established there (not only asked for).
                let mut established = Vec::new();
                for (sh, entry) in self.scripts.iter_mut() {
                    if on_conn(entry) {
                        entry.moved_from_tip = old_tip;
                        if entry.conn == Some(conn) {
                            established.push(sh.clone());
                        }
                        moved.push(Topic::Script(sh.clone()));
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
                    self.start_subscribe(topic);
                }
                // A connection taken out of rotation (lagging, or gone from
                // the configuration) may still be open: tell its upstream to
                // stop watching. To a dead one nothing is sent.
                for sh in established {
                    self.release_upstream(conn, &sh);
                }
            }
            PoolEvent::Notification {
                conn,
                method,
                params,
            } => self.on_notification(conn, &method, params.get()),
        }
    }

    fn on_notification(&mut self, conn: ConnId, method: &str, params: &str) {
        let (topic, value) = match method {
            "blockchain.scripthash.subscribe" => {
                let Ok((sh, status)) = serde_json::from_str::<(String, Option<String>)>(params)
                else {
                    return;
                };
                let value = Value::Status(match status {
                    Some(s) => jsonrpc::quote(&s),
                    None => "null".into(),
                });
                (Topic::Script(sh.to_ascii_lowercase()), value)
            }
            "blockchain.headers.subscribe" => {
                let Ok(list) = serde_json::from_str::<Vec<&serde_json::value::RawValue>>(params)
                else {
                    return;
                };
                let Some(value) = list
                    .first()
                    .and_then(|v| parse_value(&Topic::Headers, v.get()))
                else {
                    return;
                };
                (Topic::Headers, value)
            }
            // Unsolicited chatter (relayfee, estimatefee, peers): nobody
            // subscribed to it through the proxy.
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
        if let Some(hold) = &entry.hold {
            if hold.upstream == value {
                return; // nothing new from the upstream: still held
            }
            // The upstream's status changed: it caught up with what
            // subscribers have (nothing to announce), or this is news.
            entry.hold = None;
            let news = entry.value.as_ref() != Some(&value);
            if news {
                entry.value = Some(value);
                self.fan_out(&topic);
            }
            if let Topic::Script(sh) = &topic {
                self.settle(sh);
            }
            return;
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

    fn set_tip(&mut self, height: u64, hex: &str) {
        if let Some(cache) = &self.config.cache {
            cache.on_tip(height, hex);
        }
        self.stats.tip_height.store(height, Ordering::Relaxed);
        self.tip = Some((height, hex.to_string()));
    }

    /// Write the entry's current value to every subscriber, each in its form.
    fn fan_out(&mut self, topic: &Topic) {
        let Some(entry) = self.entry(topic) else {
            return;
        };
        let Some(value) = entry.value.clone() else {
            return;
        };
        let mut lines: HashMap<&Form, Option<jsonrpc::Line>> = HashMap::new();
        let mut sent = 0u64;
        for sub in entry.subscribers.values() {
            for form in &sub.forms {
                let line = lines
                    .entry(form)
                    .or_insert_with(|| notification(topic, form, &value));
                if let Some(line) = line {
                    sub.out.send(line.clone());
                    sent += 1;
                }
            }
        }
        self.stats.notifications.fetch_add(sent, Ordering::Relaxed);
    }

    /// Re-subscribe entries that lost their upstream and found none since.
    fn retry_orphans(&mut self) {
        if !self.pool.any_ready() {
            return;
        }
        if self.headers.conn.is_none() && self.headers.pending.is_none() {
            self.start_subscribe(Topic::Headers);
        }
        let orphans: Vec<String> = self
            .scripts
            .iter()
            .filter(|(_, e)| e.conn.is_none() && e.pending.is_none())
            .map(|(sh, _)| sh.clone())
            .collect();
        for sh in orphans {
            self.start_subscribe(Topic::Script(sh));
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

fn parse_value(topic: &Topic, result: &str) -> Option<Value> {
    match topic {
        Topic::Script(_) => {
            let status: Option<String> = serde_json::from_str(result).ok()?;
            Some(Value::Status(match status {
                Some(s) => jsonrpc::quote(&s),
                None => "null".into(),
            }))
        }
        Topic::Headers => {
            #[derive(serde::Deserialize)]
            struct Tip {
                height: u64,
                hex: String,
            }
            let tip: Tip = serde_json::from_str(result).ok()?;
            Some(Value::Tip {
                height: tip.height,
                hex: tip.hex,
            })
        }
    }
}

/// The result text a subscriber in `form` is answered with.
fn render(form: &Form, value: &Value) -> Result<String, String> {
    match (form, value) {
        (Form::Header(hf), Value::Tip { height, hex }) => header::render(*hf, *height, hex),
        (_, Value::Status(s)) => Ok(s.clone()),
        (_, Value::Tip { height, hex }) => Ok(header::modern(*height, hex)),
    }
}

fn answer(responder: Responder, form: &Form, value: &Value) {
    match render(form, value) {
        Ok(text) => responder.deliver_text(&text),
        Err(e) => responder.fail(RpcError::new(ErrorCode::InternalError, e)),
    }
}

fn notification(topic: &Topic, form: &Form, value: &Value) -> Option<jsonrpc::Line> {
    let rendered = render(form, value).ok()?;
    Some(match (topic, form) {
        (Topic::Script(_), Form::Address(addr)) => jsonrpc::notification_line(
            "blockchain.address.subscribe",
            &format!("[{},{}]", jsonrpc::quote(addr), rendered),
        ),
        (Topic::Script(sh), _) => jsonrpc::notification_line(
            "blockchain.scripthash.subscribe",
            &format!("[{},{}]", jsonrpc::quote(sh), rendered),
        ),
        (Topic::Headers, Form::Header(HeaderForm::Height)) => {
            jsonrpc::notification_line("blockchain.numblocks.subscribe", &format!("[{rendered}]"))
        }
        (Topic::Headers, _) => {
            jsonrpc::notification_line("blockchain.headers.subscribe", &format!("[{rendered}]"))
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

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
