//! The subscription hub of one coin: one upstream subscription per distinct
//! thing, fanned out to every session that asked for it.
//!
//! Owns: which sessions subscribed to what (and in which form), the last
//! value each upstream subscription reported, where each subscription lives
//! (which upstream connection), re-subscribing elsewhere when that
//! connection dies (and notifying whatever changed meanwhile), and the
//! scripthash -> route affinity the router uses to keep histories
//! consistent with statuses. It does not pick upstreams (the pool does) nor
//! decide what a method means (the router does).
//!
//! It runs as one actor task: sessions and connections talk to it through a
//! channel, so no lock is held anywhere on this path. Fan-out formats each
//! notification once per form and pushes it into each session's queue.
//!
//! # Layout
//!
//! - this file: the handle ([`Hub`]) and the vocabulary the router speaks
//!   ([`Topic`], [`Form`], [`Route`]);
//! - `actor`: the task; it dispatches commands and pool events to the parts
//!   below and owns nothing else;
//! - `entry`: one subscription's state, whatever its kind (subscribers,
//!   value, connection, waiters) and how a value is answered;
//! - one file per subscription kind, which knows its upstream method, how
//!   to read its answers and notifications and how to write its
//!   notifications: `headers` (the tip), `scripthash` (statuses, in the
//!   scripthash, address and scriptpubkey forms) and `outpoint` (spend
//!   statuses: native on 1.7 upstreams, emulated over a script's status
//!   below 1.7);
//! - `members`: which session holds what, the subscription limits, and
//!   dropping an entry with its last subscriber;
//! - `upstream`: an entry's upstream subscription: subscribing, the answer,
//!   notifications;
//! - `failover`: the status hold after a subscription moved;
//! - `reads`: reads that follow a subscription (affinity) and wait while it
//!   moves, and the status each scripthash's kept answers follow (see
//!   `cache::answers`);
//! - `read_subs`: scripthashes read but not subscribed, subscribed by the
//!   hub so their reads are answered from memory.

mod actor;
mod entry;
mod failover;
mod headers;
mod members;
mod outpoint;
mod read_subs;
mod reads;
mod scripthash;
mod upstream;

use crate::header::HeaderForm;
use crate::jsonrpc::{ErrorCode, RpcError};
use crate::reply::{InternalReply, Outbound, Responder};
use crate::status::events::CoinEvents;
use crate::text_keys::TextKeys;
use crate::upstream::{ConnId, Job, Pool, PoolEvent, Reroute};
use actor::Actor;
use dashmap::DashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Identifies a client session within the process.
pub type SessionId = u64;

pub use crate::outpoint::Outpoint;

/// What is subscribed to.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Topic {
    Headers,
    /// A scripthash, lowercase hex.
    Script(String),
    /// A transaction output (protocol 1.7).
    Outpoint(Outpoint),
}

/// How a subscriber wants its answers and notifications.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Form {
    Header(HeaderForm),
    Scripthash,
    /// `blockchain.address.subscribe`: notifications carry this address.
    Address(String),
    /// `blockchain.scriptpubkey.subscribe` (1.7): notifications are
    /// `blockchain.scriptpubkey.subscribe [scripthash, status]`, as
    /// ElectrumX 2.0 sends them.
    ScriptPubKey,
    /// `blockchain.outpoint.subscribe` (1.7).
    Outpoint,
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
    /// Distinct outpoints watched for sessions.
    pub outpoints: AtomicUsize,
    /// Of those, the ones emulated over a script's status (no 1.7
    /// upstream connection held them when they were last subscribed).
    pub outpoints_emulated: AtomicUsize,
    /// Session subscriptions by form: see [`FORM_KINDS`].
    pub session_forms: [AtomicUsize; FORM_KINDS.len()],
}

/// The labels of [`HubStats::session_forms`].
pub const FORM_KINDS: [&str; 6] = [
    "headers",
    "numblocks",
    "scripthash",
    "address",
    "scriptpubkey",
    "outpoint",
];

impl Form {
    /// Index into [`FORM_KINDS`].
    pub fn kind(&self) -> usize {
        match self {
            Form::Header(HeaderForm::Height) => 1,
            Form::Header(_) => 0,
            Form::Scripthash => 2,
            Form::Address(_) => 3,
            Form::ScriptPubKey => 4,
            Form::Outpoint => 5,
        }
    }
}

/// The handle sessions and the router use. Cheap to clone.
#[derive(Clone)]
pub struct Hub {
    tx: mpsc::UnboundedSender<Command>,
    affinity: Arc<DashMap<String, Route, TextKeys>>,
    pub stats: Arc<HubStats>,
    /// Whether reads of unsubscribed scripthashes are told to the hub
    /// (read-driven subscriptions are on).
    noticing: bool,
    /// Where they are told (the actor takes them in batches).
    notices: Arc<read_subs::Notices>,
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
        /// Most scripthash and outpoint subscriptions this session may hold.
        limit: usize,
        /// An outpoint's output script, when the client gave it.
        hint: Option<Vec<u8>>,
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
    /// An emulated outpoint's work came back (see `outpoint`).
    Outpoint(outpoint::Done),
    /// Reads of scripthashes nobody was told a status of are waiting in
    /// the shared batch (see `read_subs`): one command per batch.
    Noticed,
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
        let noticing = config
            .cache
            .as_ref()
            .is_some_and(|c| c.read_subscriptions().0 > 0);
        let hub = Hub {
            tx: tx.clone(),
            affinity: Arc::new(DashMap::default()),
            stats: Arc::new(HubStats::default()),
            noticing,
            notices: Arc::default(),
        };
        let actor = Actor::new(
            config,
            pool,
            tx,
            hub.affinity.clone(),
            hub.stats.clone(),
            hub.notices.clone(),
        );
        tracker.spawn(actor.run(rx, events, shutdown.clone()));
        hub
    }

    /// Subscribe a session; `responder` gets the current status or tip.
    /// `limit` is the most scripthash (and outpoint) subscriptions the
    /// session may hold;
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
        self.send_subscribe(session, out, topic, form, limit, None, responder);
    }

    /// Subscribe a session to an outpoint (protocol 1.7); `hint` is the
    /// output script when the client gave it (`spk_hint`). As
    /// [`Hub::subscribe`] otherwise.
    pub fn subscribe_outpoint(
        &self,
        session: SessionId,
        out: &Outbound,
        outpoint: Outpoint,
        hint: Option<Vec<u8>>,
        limit: usize,
        responder: Responder,
    ) {
        let topic = Topic::Outpoint(outpoint);
        self.send_subscribe(session, out, topic, Form::Outpoint, limit, hint, responder);
    }

    #[allow(clippy::too_many_arguments)]
    fn send_subscribe(
        &self,
        session: SessionId,
        out: &Outbound,
        topic: Topic,
        form: Form,
        limit: usize,
        hint: Option<Vec<u8>>,
        responder: Responder,
    ) {
        let cmd = Command::Subscribe {
            session,
            out: out.clone(),
            topic,
            form,
            limit,
            hint,
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

    /// A wallet reads this scripthash (lowercase) and [`Hub::route`] said
    /// nobody was told a status of it: read again soon, the hub may
    /// subscribe to it itself (see `read_subs`).
    pub fn notice_read(&self, scripthash: &str) {
        if self.noticing && self.notices.push(scripthash) && self.tx.send(Command::Noticed).is_err()
        {
            // Shutting down: nobody takes the batch.
            self.notices.clear();
        }
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
