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
//! (that is `session`). How a forwarded request leaves for the pool is
//! `upstream`'s; reading parameters is `params`'.

pub mod bridge;
pub mod legacy;
mod params;
mod upstream;

pub(crate) use params::{first_string, scripthash_arg};
use params::{header_form, scripthash_param};

use crate::coin::{self, AddressVersions};
use crate::header::HeaderForm;
use crate::hub::{Form, Hub, SessionId, Topic};
use crate::jsonrpc::{self, ClientMessage, ErrorCode, LineError, Request, RpcError};
use crate::limits::{Limit, SessionGate};
use crate::protocol::Level;
use crate::reply::{Batch, ClientId, Outbound, Responder};
use crate::upstream::Pool;
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
