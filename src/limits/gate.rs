//! One session's gate: the cost of each method and the decision on each
//! request against the session's and its group's buckets.

use super::group::{Bucket, Group};
use super::{CoinLimits, ConnPermit, GroupKey, Limit, ReplyLimits};
use crate::jsonrpc::{ErrorCode, RpcError};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

/// The cost of one request, in points, before its bytes are counted.
pub fn method_cost(method: &str) -> f64 {
    match method {
        // Answered by the proxy itself.
        "server.version"
        | "server.ping"
        | "server.banner"
        | "server.features"
        | "server.donation_address"
        | "server.peers.subscribe"
        | "server.add_peer" => 1.0,
        // One lookup upstream (or a shared subscription).
        "blockchain.headers.subscribe"
        | "blockchain.numblocks.subscribe"
        | "blockchain.block.header"
        | "blockchain.block.get_header"
        | "blockchain.estimatefee"
        | "blockchain.relayfee"
        | "mempool.get_fee_histogram"
        | "mempool.get_info"
        | "blockchain.scripthash.unsubscribe"
        | "blockchain.address.unsubscribe" => 10.0,
        // An index lookup, or a status that needs a history upstream.
        "blockchain.transaction.get"
        | "blockchain.transaction.get_merkle"
        | "blockchain.transaction.id_from_pos"
        | "blockchain.scripthash.subscribe"
        | "blockchain.address.subscribe"
        | "blockchain.scripthash.get_balance"
        | "blockchain.address.get_balance" => 20.0,
        // Whole histories, unspent sets, header chunks.
        "blockchain.scripthash.get_history"
        | "blockchain.address.get_history"
        | "blockchain.scripthash.get_mempool"
        | "blockchain.address.get_mempool"
        | "blockchain.scripthash.listunspent"
        | "blockchain.address.listunspent"
        | "blockchain.block.headers"
        | "blockchain.block.get_chunk" => 50.0,
        "blockchain.transaction.broadcast" => 100.0,
        // Unknown methods (forwarded, answered with an error) and lines
        // that are not requests at all.
        _ => 10.0,
    }
}

/// A request the gate refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub error: RpcError,
    /// Too many refusals in a row: close the session after this reply.
    pub disconnect: bool,
}

/// What one session may still do: its bucket, its group's, its slot.
/// Held by the session's state; dropping it frees the slots.
#[derive(Debug)]
pub struct SessionGate {
    /// `None` only for the unlimited gate of tests and internal sessions.
    pub(super) permit: Option<ConnPermit>,
    /// `None` for exempt clients.
    pub(super) group: Option<(GroupKey, Arc<Group>)>,
    pub(super) bucket: Option<Bucket>,
    pub(super) refusals: u32,
    /// Bytes received and sent not yet charged (the writer adds to it).
    pub(super) bytes: Arc<AtomicU64>,
}

impl Drop for SessionGate {
    fn drop(&mut self) {
        if let Some((_, g)) = &self.group {
            g.sessions.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

impl SessionGate {
    /// A gate that refuses nothing and counts nothing.
    pub fn unlimited() -> SessionGate {
        SessionGate {
            permit: None,
            group: None,
            bucket: None,
            refusals: 0,
            bytes: Arc::new(AtomicU64::new(0)),
        }
    }

    pub(super) fn coin(&self) -> Option<&Arc<CoinLimits>> {
        self.permit.as_ref().map(|p| &p.coin)
    }

    /// Count a limit hit on this session's coin (`limit_hits_total`).
    pub fn hit(&self, limit: Limit) {
        if let Some(c) = self.coin() {
            c.hit(limit);
        }
    }

    /// Count a limit that closes or refuses without a counted reply.
    pub fn refused(&self, limit: Limit) {
        if let Some(c) = self.coin() {
            c.refused(limit);
        }
    }

    /// Requests of this session awaiting answers before reading pauses.
    pub fn max_in_flight(&self) -> usize {
        self.coin()
            .map(|c| c.config().max_in_flight)
            .unwrap_or(usize::MAX)
    }

    /// The IP group the session counts in (`None` when exempt).
    pub fn group(&self) -> Option<GroupKey> {
        self.group.as_ref().map(|(k, _)| *k)
    }

    /// Count a line of `n` bytes received (charged at the next request).
    pub fn received(&self, n: usize) {
        if self.bucket.is_some() {
            self.bytes.fetch_add(n as u64, Ordering::Relaxed);
        }
    }

    /// Decide on one request of `method`, charging the bytes received and
    /// sent since the last one.
    pub fn admit(&mut self, method: &str) -> Result<(), Refusal> {
        let (Some(coin), Some(bucket), Some((key, group))) =
            (self.coin(), self.bucket.as_ref(), self.group.as_ref())
        else {
            return Ok(());
        };
        let c = coin.config();
        let (key, group, mut bucket) = (*key, group.clone(), bucket.clone());
        let now = Instant::now();
        let bytes = self.bytes.swap(0, Ordering::Relaxed);
        let debt = (bytes / c.bytes_per_point) as f64;
        // Keep the remainder for next time so small lines add up.
        self.bytes
            .fetch_add(bytes % c.bytes_per_point, Ordering::Relaxed);
        // A request dearer than a bucket can hold needs a full bucket.
        let cost = method_cost(method);
        bucket.refill(now, c.session_rate, c.session_burst);
        bucket.charge(debt, c.session_burst);
        let session_cost = cost.min(c.session_burst);
        let mut refused = None;
        {
            let mut g = group.bucket.lock().unwrap_or_else(|p| p.into_inner());
            g.refill(now, c.group_rate, c.group_burst);
            g.charge(debt, c.group_burst);
            let group_cost = cost.min(c.group_burst);
            if bucket.tokens < session_cost {
                refused = Some(format!(
                    "request rate limit exceeded for this session: retry in {} ms",
                    bucket.wait(session_cost, c.session_rate).as_millis().max(1)
                ));
            } else if g.tokens < group_cost {
                refused = Some(format!(
                    "request rate limit exceeded for your network {key}: retry in {} ms",
                    g.wait(group_cost, c.group_rate).as_millis().max(1)
                ));
            } else {
                g.tokens -= group_cost;
                bucket.tokens -= session_cost;
            }
        }
        let max_refusals = c.max_refusals;
        self.bucket = Some(bucket);
        let Some(message) = refused else {
            self.refusals = 0;
            return Ok(());
        };
        self.refusals += 1;
        self.hit(Limit::Rate);
        let disconnect = self.refusals >= max_refusals;
        let message = if disconnect {
            self.hit(Limit::Abuse);
            format!("{message}; {max_refusals} requests refused in a row: closing the connection")
        } else {
            message
        };
        Err(Refusal {
            error: RpcError::new(ErrorCode::LimitExceeded, message),
            disconnect,
        })
    }

    /// What the session's replies need: the size limit (its queue checks
    /// it) and where to count the bytes written (its writer does).
    pub fn reply_limits(&self) -> ReplyLimits {
        ReplyLimits {
            max_bytes: self
                .coin()
                .map(|c| c.config().max_response_bytes)
                .unwrap_or(usize::MAX),
            bytes: self.bytes.clone(),
            coin: self.coin().cloned(),
        }
    }
}
