//! How a request leaves the router for the upstream pool: past the cache
//! (which may answer it, or join it to an identical one in flight), the
//! job it becomes (its retry rule and the levels that may serve it), the
//! connection it goes to (any, the one holding its scripthash's
//! subscription, or through the hub while that subscription moves), and
//! the check of a history read sent anywhere ([`CheckedHistory`]).

use super::{bridge, Router, SCRIPTHASH_READS};
use crate::hub::{Hub, Route};
use crate::jsonrpc;
use crate::reply::{Hook, HookReply, Responder};
use crate::upstream::{Job, Need};
use tokio::time::Instant;

impl Router {
    /// Forward a request upstream, unless the cache answers it or an
    /// identical one is already in flight; a read about a subscribed
    /// scripthash (`affinity`) goes to the connection holding its
    /// subscription, and is answered from memory while its status has not
    /// changed (see `cache::answers`).
    pub(crate) fn forward(
        &self,
        method: &str,
        params: &str,
        responder: Responder,
        affinity: Option<&str>,
    ) {
        let need = bridge::upstream_need(method);
        self.forward_to(method, params, responder, affinity, need);
    }

    /// [`Router::forward`] to connections of the levels in `need` only.
    pub(crate) fn forward_to(
        &self,
        method: &str,
        params: &str,
        responder: Responder,
        affinity: Option<&str>,
        need: Need,
    ) {
        let fetch = |r| self.send(method, params, r, affinity, need);
        match affinity {
            Some(sh) if SCRIPTHASH_READS.contains(&method) => {
                // The scripthash is parsed already: the cache is handed it.
                self.cache.serve_read(sh, method, params, responder, fetch)
            }
            _ => self.cache.serve(method, params, responder, fetch),
        }
    }

    /// Send a request to the pool; a read of a subscribed scripthash goes
    /// to the connection holding its subscription, or through the hub when
    /// that subscription is moving (see `hub`, "Failover"); a history read
    /// of one whose status has settled goes anywhere, checked (see
    /// [`CheckedHistory`]).
    fn send(
        &self,
        method: &str,
        params: &str,
        responder: Responder,
        affinity: Option<&str>,
        need: Need,
    ) {
        let deadline = Instant::now() + self.request_timeout;
        let prefix = jsonrpc::request_prefix(method, params);
        let route = affinity.map(|sh| (sh, self.hub.route(sh)));
        let Some((sh, Some(route))) = route else {
            if let Some((sh, None)) = route {
                if SCRIPTHASH_READS.contains(&method) {
                    // Nobody was told a status of it: a scripthash read
                    // again and again may be subscribed by the hub (see
                    // `hub::read_subs`). Told here, where the read goes
                    // upstream, so that one lookup of its route serves
                    // both (a read the cache or an identical read in
                    // flight answers is not told).
                    self.hub.notice_read(sh);
                }
            }
            let job = new_job(prefix, responder, deadline, method, need);
            return self.pool.dispatch(job);
        };
        if let (Route::Conn(_), GET_HISTORY) = (route, method) {
            if let Some(sent) = self.cache.settled_status(sh) {
                let check = CheckedHistory {
                    sent,
                    sh: sh.to_string(),
                    prefix: prefix.clone(),
                    deadline,
                    need,
                    hub: self.hub.clone(),
                    cache: self.cache.clone(),
                    responder,
                };
                let hook = Responder::Hook(check.hook());
                let mut job = new_job(prefix, hook, deadline, method, need);
                // Lost with its connection, it is retried through the hub
                // like any read of a subscribed scripthash (held while
                // the subscription moves).
                job.reroute = Some(self.hub.reroute(sh));
                return self.pool.dispatch(job);
            }
        }
        let mut job = new_job(prefix, responder, deadline, method, need);
        if let Route::Conn(conn) = route {
            // A retry comes back through the hub.
            job.reroute = Some(self.hub.reroute(sh));
            match self.pool.dispatch_to(conn, job) {
                Ok(()) => return,
                Err(j) => job = j,
            }
        }
        self.hub.read(sh, job);
    }
}

const GET_HISTORY: &str = "blockchain.scripthash.get_history";

fn new_job(
    prefix: Vec<u8>,
    responder: Responder,
    deadline: Instant,
    method: &str,
    need: Need,
) -> Job {
    let mut job = Job::new(prefix, responder, deadline);
    // A broadcast written to a socket is never sent again.
    job.retryable = !matches!(
        method,
        "blockchain.transaction.broadcast" | "blockchain.transaction.broadcast_package"
    );
    // Only connections of the levels that serve this method take it.
    job.need = need;
    job
}

/// A history read of a subscribed scripthash whose status has settled:
/// sent to whichever connection selection picks, not only to the one
/// holding the subscription, and its answer checked against the status
/// subscribers were told when it arrives. One that disagrees (the upstream
/// that answered is behind or ahead) is sent again through the hub to the
/// subscription's connection. Either way a wallet never gets a history
/// that contradicts its status (DESIGN rule 2 allows both). Why: the
/// subscriptions of a coin sit on the few connections an upstream always
/// keeps, and ElectrumX meters each session: routing every history miss
/// there too made that one session the costliest, throttled to 4 at a
/// time with 1.5 s sleeps, while the other sessions had room (measured in
/// `cargo bench --bench proxy -- --upstream real`, see the README).
struct CheckedHistory {
    /// The settled status when the read was sent.
    sent: Box<str>,
    sh: String,
    prefix: Vec<u8>,
    deadline: Instant,
    need: Need,
    hub: Hub,
    cache: std::sync::Arc<crate::cache::Cache>,
    responder: Responder,
}

impl CheckedHistory {
    fn hook(self) -> Hook {
        self.cache.answer_counters().checked.inc();
        Hook::new(move |reply: HookReply<'_>| self.land(reply))
    }

    /// Whether a history agrees with the status when the read was sent
    /// (what the asker could have been told) or now.
    fn agrees(&self, result: &str) -> bool {
        let Some(status) = crate::cache::history_status(result) else {
            return false;
        };
        *status == *self.sent || self.cache.settled_status(&self.sh).as_deref() == Some(&*status)
    }

    fn land(self, reply: HookReply<'_>) {
        match reply {
            Ok(Ok(result)) if self.agrees(result.get()) => self.responder.deliver(Ok(result)),
            Ok(Ok(_)) => {
                self.cache.answer_counters().recheck.inc();
                let mut job = Job::new(self.prefix, self.responder, self.deadline);
                job.need = self.need;
                self.hub.read(&self.sh, job);
            }
            Ok(Err(error)) => self.responder.deliver(Err(error)),
            Err(e) => self.responder.fail(e),
        }
    }
}
