//! The router of one coin: decides where each client request goes.
//!
//! Owns: the method table. Session-level `server.*` methods are answered
//! locally (see `local`); methods of protocol 1.6 and 1.7 and the rules of
//! each level are `bridge`'s; subscriptions go to the hub; legacy methods
//! are translated (see `legacy`); requests about a subscribed scripthash go
//! to the connection that holds its subscription, or, for histories,
//! anywhere with the answer checked against the status; everything else is
//! forwarded to the pool with its id rewritten by the connection, only to
//! connections whose protocol level serves the method. It also owns
//! per-session protocol state ([`SessionState`]), but not the transport
//! (that is `session`).

pub mod bridge;
pub mod legacy;

use crate::coin::{self, AddressVersions};
use crate::header::HeaderForm;
use crate::hub::{Form, Hub, Route, SessionId, Topic};
use crate::jsonrpc::{self, ClientMessage, ErrorCode, LineError, Request, RpcError};
use crate::limits::{Limit, SessionGate};
use crate::protocol::{Level, Version};
use crate::reply::{Batch, ClientId, Hook, HookReply, Outbound, Responder};
use crate::upstream::{Job, Need, Pool};
use serde_json::Value;
use std::collections::HashSet;
use std::time::Duration;
use tokio::time::Instant;

/// What the proxy says about a coin in `server.*` answers.
#[derive(Debug, Clone)]
pub struct CoinInfo {
    pub server_name: String,
    pub banner: String,
    pub donation_address: String,
    /// JSON object text for `server.features` `hosts`.
    pub hosts: String,
    /// Configured genesis hash; otherwise learned from an upstream.
    pub genesis_hash: Option<String>,
    pub address_versions: Option<AddressVersions>,
}

/// Per-coin routing state shared by all sessions of the coin.
pub struct Router {
    pub coin: String,
    pub pool: Pool,
    pub hub: Hub,
    pub info: CoinInfo,
    pub request_timeout: Duration,
    pub max_batch: usize,
    pub max_subs_per_session: usize,
    pub metrics: std::sync::Arc<crate::metrics::CoinMetrics>,
    /// Immutable answers and coalescing of identical reads; every forwarded
    /// request passes through it.
    pub cache: std::sync::Arc<crate::cache::Cache>,
}

/// What one session has settled so far.
pub struct SessionState {
    pub id: SessionId,
    pub level: Level,
    pub out: Outbound,
    /// Unused: the hub keeps each session's subscriptions (for its limit
    /// and for cleanup when the session closes). Kept so that
    /// `hub.session_closed(id, subs)` callers compile; always empty.
    pub subs: HashSet<(Topic, Form)>,
    /// Set when the session must be closed once its queue is flushed.
    pub close: bool,
    /// The session's budgets and slots (see `limits`); asked before each
    /// request is routed.
    pub gate: SessionGate,
    /// When the line being handled was read (the session reads the clock
    /// once per line: its idle deadline and the request's start).
    pub line_at: Instant,
}

impl SessionState {
    pub fn new(id: SessionId, out: Outbound) -> Self {
        let st = Self {
            id,
            level: Level::Unnegotiated,
            out,
            subs: HashSet::new(),
            close: false,
            gate: SessionGate::unlimited(),
            line_at: Instant::now(),
        };
        st.count_level(true);
        st
    }

    /// Settle the session's protocol level (kept in the sessions-by-level
    /// gauge).
    pub fn set_level(&mut self, level: Level) {
        self.count_level(false);
        self.level = level;
        self.count_level(true);
    }

    fn count_level(&self, open: bool) {
        if let Some(m) = self.out.metrics() {
            let gauge = &m.sessions_by_level[crate::metrics::level_index(self.level)];
            if open {
                gauge.inc();
            } else {
                gauge.dec();
            }
        }
    }
}

impl Drop for SessionState {
    fn drop(&mut self) {
        self.count_level(false);
    }
}

/// Methods whose answer depends on a scripthash's subscription state.
const SCRIPTHASH_READS: [&str; 4] = crate::cache::READS;

impl Router {
    /// Handle one line from a client.
    pub fn handle_line(&self, st: &mut SessionState, line: &[u8]) {
        st.gate.received(line.len());
        match jsonrpc::parse_client_line(line) {
            Ok(ClientMessage::Single(Ok(req))) => {
                let responder = req
                    .id
                    .map(|id| Responder::client(id.get(), &st.out, &req.method, st.line_at));
                self.handle_request(st, &req, responder);
            }
            Ok(ClientMessage::Single(Err(invalid))) => {
                let id = invalid.id.map(|i| i.get()).unwrap_or(jsonrpc::NULL_ID);
                let err = admit(st, "").err().unwrap_or(invalid.error);
                send_error(st, id, &err);
            }
            Ok(ClientMessage::Batch(members)) => self.handle_batch(st, members),
            Err(e) => {
                // Garbage costs like a request: a flood of it is refused too.
                let err = admit(st, "").err().unwrap_or_else(|| match e {
                    LineError::Parse => RpcError::new(ErrorCode::ParseError, "invalid JSON"),
                    LineError::NotRequest(why) => RpcError::new(ErrorCode::InvalidRequest, why),
                });
                send_error(st, jsonrpc::NULL_ID, &err);
            }
        }
    }

    fn handle_batch(
        &self,
        st: &mut SessionState,
        members: Vec<Result<Request<'_>, jsonrpc::Invalid<'_>>>,
    ) {
        if members.len() > self.max_batch {
            st.gate.refused(Limit::Batch);
            st.out.send(&jsonrpc::error_line(
                jsonrpc::NULL_ID,
                &RpcError::new(
                    ErrorCode::InvalidRequest,
                    format!(
                        "batch of {} requests exceeds the limit of {}",
                        members.len(),
                        self.max_batch
                    ),
                ),
            ));
            return;
        }
        // Members without an id are notifications: run, never answered.
        let ids: Vec<_> = members
            .iter()
            .filter_map(|m| match m {
                Ok(r) => r.id.map(|i| (ClientId::new(i.get()), r.method.as_ref())),
                Err(inv) => Some((
                    ClientId::new(inv.id.map_or(jsonrpc::NULL_ID, |i| i.get())),
                    "",
                )),
            })
            .collect();
        let batch = if ids.is_empty() {
            None
        } else {
            Some(Batch::new(ids, &st.out))
        };
        let mut slot = 0;
        for member in members {
            let answered = match &member {
                Ok(r) => r.id.is_some(),
                Err(_) => true,
            };
            let responder = match (&batch, answered) {
                (Some(b), true) => {
                    slot += 1;
                    Some(b.slot(slot - 1))
                }
                _ => None,
            };
            match member {
                Ok(req) => self.handle_request(st, &req, responder),
                Err(inv) => {
                    if let Some(r) = responder {
                        r.fail(inv.error);
                    }
                }
            }
        }
    }

    /// Route one request. `responder` is `None` for client notifications.
    fn handle_request(
        &self,
        st: &mut SessionState,
        req: &Request<'_>,
        responder: Option<Responder>,
    ) {
        let method = req.method.as_ref();
        let params = req.params_str();
        // Every request, notifications included, is paid for before it runs.
        if let Err(e) = admit(st, method) {
            match responder {
                Some(r) => r.fail(e),
                None => {
                    if let Some(m) = st.out.metrics() {
                        m.error(e.code);
                    }
                }
            }
            return;
        }
        // Local answers first: they describe the proxy, not an upstream.
        if let Some(result) = crate::local::answer(self, st, method, params, responder.is_some()) {
            if let Some(r) = responder {
                match result {
                    Ok(text) => r.deliver_text(&text),
                    Err(e) => r.fail(e),
                }
            }
            return;
        }
        let Some(responder) = responder else {
            // A notification asks for no answer: spend no upstream work on it,
            // except for subscriptions, which have an effect.
            if !method.ends_with("subscribe") {
                return;
            }
            let (tx, rx) = tokio::sync::oneshot::channel();
            tokio::spawn(async move {
                let _ = rx.await;
            });
            return self.route(st, method, params, Responder::Internal(tx));
        };
        self.route(st, method, params, responder);
    }

    fn route(&self, st: &mut SessionState, method: &str, params: &str, responder: Responder) {
        // Methods of protocol 1.6 and 1.7, and the rules of each level.
        let Some(responder) = bridge::route(self, st, method, params, responder) else {
            return;
        };
        match method {
            "blockchain.headers.subscribe" => {
                let form = header_form(st.level, params);
                self.subscribe(st, Topic::Headers, Form::Header(form), responder);
            }
            "blockchain.numblocks.subscribe" => self.subscribe(
                st,
                Topic::Headers,
                Form::Header(HeaderForm::Height),
                responder,
            ),
            "blockchain.scripthash.subscribe" => match scripthash_param(params) {
                Ok(sh) => self.subscribe(st, Topic::Script(sh), Form::Scripthash, responder),
                Err(e) => responder.fail(e),
            },
            "blockchain.scripthash.unsubscribe" => match scripthash_param(params) {
                Ok(sh) => self.unsubscribe(st, Topic::Script(sh), Form::Scripthash, responder),
                Err(e) => responder.fail(e),
            },
            m if m.starts_with("blockchain.address.") => {
                self.address_method(st, m, params, responder)
            }
            // Answered by `legacy` without `forward`: cached here instead.
            "blockchain.relayfee" => self.cache.serve(method, params, responder, |r| {
                legacy::route(self, method, params, r)
            }),
            m if SCRIPTHASH_READS.contains(&m) => {
                let affinity = scripthash_arg(params);
                self.forward(m, params, responder, affinity.as_deref());
            }
            _ => legacy::route(self, method, params, responder),
        }
    }

    /// Subscribe through the hub, which keeps each session's subscriptions
    /// and enforces both the per-session and the per-coin limit.
    pub(crate) fn subscribe(
        &self,
        st: &mut SessionState,
        topic: Topic,
        form: Form,
        responder: Responder,
    ) {
        self.hub.subscribe(
            st.id,
            &st.out,
            topic,
            form,
            self.max_subs_per_session,
            responder,
        );
    }

    pub(crate) fn unsubscribe(
        &self,
        st: &mut SessionState,
        topic: Topic,
        form: Form,
        responder: Responder,
    ) {
        self.hub.unsubscribe(st.id, topic, form, responder);
    }

    /// `blockchain.address.*`: translated to the scripthash twin.
    fn address_method(
        &self,
        st: &mut SessionState,
        method: &str,
        params: &str,
        responder: Responder,
    ) {
        let Some(address) = first_string(params) else {
            return responder.fail(RpcError::new(
                ErrorCode::InvalidParams,
                "expected an address as the first parameter",
            ));
        };
        let sh = match coin::address_to_scripthash(&address, self.info.address_versions) {
            Ok(sh) => sh,
            Err(e) => {
                return responder.fail(RpcError::new(ErrorCode::InvalidParams, e.to_string()))
            }
        };
        let suffix = &method["blockchain.address.".len()..];
        match suffix {
            "subscribe" => self.subscribe(st, Topic::Script(sh), Form::Address(address), responder),
            "unsubscribe" => {
                self.unsubscribe(st, Topic::Script(sh), Form::Address(address), responder)
            }
            "get_balance" | "get_history" | "get_mempool" | "listunspent" => {
                let method = format!("blockchain.scripthash.{suffix}");
                let params = format!("[{}]", jsonrpc::quote(&sh));
                self.forward(&method, &params, responder, Some(&sh));
            }
            _ => responder.fail(RpcError::new(
                ErrorCode::MethodNotFound,
                format!("unknown method \"{method}\""),
            )),
        }
    }

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

/// Ask the session's gate about one request of `method` (`""` for a line
/// that is not a request); a session refused too often is marked for closing.
fn admit(st: &mut SessionState, method: &str) -> Result<(), RpcError> {
    st.gate.admit(method).map_err(|refusal| {
        if refusal.disconnect {
            st.close = true;
        }
        refusal.error
    })
}

/// An error line the proxy writes without a request to answer (the line
/// could not be read as one), counted in the metrics.
fn send_error(st: &SessionState, id: &str, err: &RpcError) {
    if let Some(m) = st.out.metrics() {
        m.error(err.code);
    }
    st.out.send(&jsonrpc::error_line(id, err));
}

/// The header shape a session gets from `blockchain.headers.subscribe`.
fn header_form(level: Level, params: &str) -> HeaderForm {
    match level {
        Level::Unnegotiated => HeaderForm::Hybrid,
        Level::Modern(_) => HeaderForm::Modern,
        Level::Legacy(v) => {
            // Protocol 1.2 added `raw`: true asks for the modern form.
            let raw = v >= Version::new(1, 2)
                && serde_json::from_str::<Vec<Value>>(params)
                    .ok()
                    .and_then(|p| p.first().and_then(Value::as_bool))
                    .unwrap_or(false);
            if raw {
                HeaderForm::Modern
            } else {
                HeaderForm::Deserialized
            }
        }
    }
}

/// The scripthash a read is about (its first parameter), lowercase.
/// Every history, balance and unspent request passes here: the usual
/// `["<64 lowercase hex>", ...]` is read in place, without a JSON tree or
/// a copy; anything else takes the general path.
pub(crate) fn scripthash_arg(params: &str) -> Option<std::borrow::Cow<'_, str>> {
    match fast_scripthash(params) {
        Some(sh) => Some(sh.into()),
        None => first_string(params)
            .filter(|s| coin::is_scripthash(s))
            .map(|s| s.to_ascii_lowercase().into()),
    }
}

/// `["<64 lowercase hex>"` at the start of `params` (ASCII whitespace
/// allowed around the bracket): the scripthash, borrowed.
fn fast_scripthash(params: &str) -> Option<&str> {
    let bytes = params.as_bytes();
    let rest = bytes
        .trim_ascii_start()
        .strip_prefix(b"[")?
        .trim_ascii_start();
    let quoted = rest.get(..66)?;
    if quoted[0] != b'"' || quoted[65] != b'"' || !crate::scan::all_lower_hex(&quoted[1..65]) {
        return None;
    }
    // Every byte before it is ASCII: a character boundary.
    let start = bytes.len() - rest.len() + 1;
    params.get(start..start + 64)
}

/// The first positional parameter, when it is a string.
pub(crate) fn first_string(params: &str) -> Option<String> {
    if let Ok(v) = serde_json::from_str::<Vec<Value>>(params) {
        return v.into_iter().next().and_then(|v| match v {
            Value::String(s) => Some(s),
            _ => None,
        });
    }
    None
}

fn scripthash_param(params: &str) -> Result<String, RpcError> {
    match first_string(params) {
        Some(sh) if coin::is_scripthash(&sh) => Ok(sh.to_ascii_lowercase()),
        Some(sh) => Err(RpcError::new(
            ErrorCode::InvalidParams,
            format!("invalid scripthash: {sh}"),
        )),
        None => Err(RpcError::new(
            ErrorCode::InvalidParams,
            "expected a scripthash as the first parameter",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_forms_follow_the_level() {
        assert_eq!(header_form(Level::Unnegotiated, "[]"), HeaderForm::Hybrid);
        assert_eq!(
            header_form(Level::Modern(Version::new(1, 4)), "[]"),
            HeaderForm::Modern
        );
        assert_eq!(
            header_form(Level::Legacy(Version::new(0, 9)), "[true]"),
            HeaderForm::Deserialized
        );
        assert_eq!(
            header_form(Level::Legacy(Version::new(1, 2)), "[true]"),
            HeaderForm::Modern
        );
        assert_eq!(
            header_form(Level::Legacy(Version::new(1, 2)), "[]"),
            HeaderForm::Deserialized
        );
    }

    #[test]
    fn scripthash_args_fast_and_general() {
        let sh = "ab".repeat(32);
        // The usual form is read in place.
        for params in [format!("[\"{sh}\"]"), format!(" [ \"{sh}\" , 1]")] {
            assert!(
                matches!(scripthash_arg(&params), Some(std::borrow::Cow::Borrowed(s)) if s == sh),
                "{params}"
            );
        }
        for params in [
            format!("[\"{sh}\"]"),
            format!(" [ \"{sh}\" , 1]"),
            format!("[\"{}\"]", sh.to_uppercase()),
            format!("[\"\\u0061b{}\"]", &sh[2..]),
        ] {
            assert_eq!(
                scripthash_arg(&params).as_deref(),
                Some(sh.as_str()),
                "{params}"
            );
        }
        for params in [
            "[]".to_string(),
            format!("[\"{}\"]", &sh[1..]),
            format!("[\"{sh}0\"]"),
            format!("{{\"scripthash\":\"{sh}\"}}"),
            format!("[\"{}xy\"]", &sh[2..]),
        ] {
            assert_eq!(scripthash_arg(&params), None, "{params}");
        }
    }

    #[test]
    fn scripthash_params() {
        let sh = "AB".repeat(32);
        assert_eq!(
            scripthash_param(&format!("[\"{sh}\"]")).unwrap(),
            "ab".repeat(32)
        );
        assert_eq!(
            scripthash_param("[\"xyz\"]").unwrap_err().code,
            ErrorCode::InvalidParams
        );
        assert_eq!(
            scripthash_param("[]").unwrap_err().code,
            ErrorCode::InvalidParams
        );
        assert_eq!(
            scripthash_param("{}").unwrap_err().code,
            ErrorCode::InvalidParams
        );
    }
}
