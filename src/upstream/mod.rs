//! The upstream side of one coin: shared connections to ElectrumX servers.
//!
//! Owns: everything between the router and the upstream sockets. Many
//! sessions share few sockets here.
//!
//! Layout, in the order a request meets them:
//! - `pool`: the coin's pool handle; builds each generation (reload),
//!   reports status;
//! - `state`: one generation's upstreams and slots; dispatch, and growing
//!   connections when requests queue in the proxy;
//! - `select`: the pure choice of a connection for a job (cost, throttled
//!   upstreams passed over while others have room, where an answer waits
//!   least on an upstream that holds small replies: `hold`);
//! - `levels`: protocol levels: which connections can answer a job;
//! - `supervisor`: keeps one connection slot connected, with backoff, and
//!   retries what a dead connection left unanswered;
//! - `conn`: the per-socket actor that rewrites ids, learns its in-flight
//!   limit (`limit`) and resends "busy" answers; `handshake` opens it;
//!   `shared` is what it shares with selection; `lag` is how late the
//!   proxy itself runs tasks (the limiter's noise floor);
//! - `connect`: dialing, TCP or TLS;
//! - `monitor`: the loop that judges health (`health`: the rise/fall
//!   rules), throttling (`throttle`: the upstream's own metering, made
//!   visible) and retires connections that are not needed.
//!
//! Imports go one way, no circles: `pool` -> (`monitor`, `supervisor`) ->
//! `state` -> (`select`, `health`, `throttle`, `conn` -> `handshake` ->
//! `shared` -> `hold`); `levels` adds capability methods to `pool` and `state`.

pub mod conn;
pub mod connect;
mod handshake;
pub mod health;
pub mod hold;
pub mod lag;
pub mod levels;
pub mod limit;
mod monitor;
pub mod pool;
pub mod select;
pub mod shared;
mod state;
mod supervisor;
pub mod throttle;

pub use levels::Capability;
pub use pool::Pool;
pub use select::Need;

use crate::reply::Responder;
use serde_json::value::RawValue;
use std::sync::Arc;
use tokio::time::Instant;

/// Identifies one established upstream connection (a reconnect gets a new id).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnId(pub u64);

/// One request on its way to an upstream.
#[derive(Debug)]
pub struct Job {
    /// The request without its id (see `jsonrpc::request_prefix`).
    pub prefix: Vec<u8>,
    pub responder: Responder,
    /// The client's deadline: after it the request is failed, not retried.
    pub deadline: Instant,
    /// Whether it may be resent after its connection died with it written.
    /// Never true for `blockchain.transaction.broadcast`.
    pub retryable: bool,
    /// How many times it has been resent.
    pub attempts: u8,
    /// Index of the connection slot it last went to (skipped on retry).
    pub last_conn: Option<usize>,
    /// Where it goes when it must move (its connection was lost before
    /// answering or sending it), instead of the pool's own choice. Reads of
    /// a subscribed scripthash carry the hub's, so a retry still reaches
    /// the connection that holds the subscription.
    pub reroute: Option<Reroute>,
    /// The protocol levels that can answer it (see `select::Need`).
    pub need: Need,
}

/// See [`Job::reroute`].
#[derive(Clone)]
pub struct Reroute(pub Arc<dyn Fn(Job) + Send + Sync>);

impl std::fmt::Debug for Reroute {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Reroute")
    }
}

impl Job {
    pub fn new(prefix: Vec<u8>, responder: Responder, deadline: Instant) -> Job {
        Job {
            prefix,
            responder,
            deadline,
            retryable: true,
            attempts: 0,
            last_conn: None,
            reroute: None,
            need: Need::ANY,
        }
    }
}

/// What the pool reports to whoever keeps state on connections (the hub).
#[derive(Debug)]
pub enum PoolEvent {
    /// A connection is usable (new, or its upstream is back in rotation).
    Up { conn: ConnId },
    /// A connection is gone or its upstream left rotation: move what it holds.
    Down { conn: ConnId },
    Notification {
        conn: ConnId,
        method: String,
        params: Box<RawValue>,
    },
}

/// A point-in-time view of one upstream, for logs, metrics and readiness.
#[derive(Debug, Clone)]
pub struct UpstreamStatus {
    pub url: String,
    /// In rotation (connected, not lagging, not flapping).
    pub healthy: bool,
    pub backup: bool,
    pub connections: usize,
    pub ready_connections: usize,
    pub in_flight: usize,
    /// Tip height last heard from this upstream (0: unknown).
    pub height: u64,
    /// The protocol level each ready connection negotiated.
    pub levels: Vec<crate::protocol::Version>,
    pub info: conn::UpstreamInfo,
    /// The upstream is throttling us (see `throttle`), and why.
    pub throttled: bool,
    pub throttle_reason: String,
    /// The learned in-flight limits of its ready connections, summed.
    pub in_flight_limit: usize,
}
