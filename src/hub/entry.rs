//! One subscription's state, whatever its kind, and how its value is
//! answered.
//!
//! Owns: [`Entry`] (subscribers and their forms, the value they were told,
//! the connection holding the upstream subscription, the subscribe in
//! flight, waiters, the failover hold and the parked reads) and
//! [`Value`], with the rendering of a value in a subscriber's form. The
//! kinds (`headers`, `scripthash`) say how values are read and how their
//! notifications are written; the lifecycle is in `upstream`.

use super::failover::Hold;
use super::{headers, outpoint, scripthash, Form, Outpoint, SessionId, Topic};
use crate::header;
use crate::jsonrpc::{self, ErrorCode, RpcError};
use crate::protocol::V1_7;
use crate::reply::{Outbound, Responder};
use crate::upstream::{ConnId, Job, Need};
use std::collections::{HashMap, HashSet};

/// The last value an upstream subscription reported.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Value {
    /// A scripthash status as JSON text (`null` or a quoted hex string), or
    /// an outpoint status (a JSON object, see `crate::outpoint::Status`).
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
pub(super) struct Entry {
    pub subscribers: HashMap<SessionId, Subscriber>,
    /// The last value subscribers were told (or are answered with).
    pub value: Option<Value>,
    /// Where the upstream subscription lives; `None` while (re)subscribing or
    /// while no upstream is available.
    pub conn: Option<ConnId>,
    /// The upstream subscribe in flight: its connection and generation.
    /// Answers with another generation are stale.
    pub pending: Option<(ConnId, u64)>,
    /// A notification that arrived on the pending connection before the
    /// hub saw the subscribe's answer: it is newer than that answer.
    pub early: Option<Value>,
    /// Subscribers that wait for the first answer.
    pub waiting: Vec<Waiter>,
    /// Set while the status is held: the subscription moved to `conn`,
    /// whose upstream reports another status than `value`.
    pub hold: Option<Hold>,
    /// Reads waiting for the subscription to settle (see `reads`).
    pub parked: Vec<Job>,
    /// The tip of the connection the subscription is moving off, when that
    /// connection is still up (it left rotation, e.g. lagging): a new
    /// upstream with more blocks than that is ahead, not behind, and its
    /// different status is news, announced without a hold.
    pub moved_from_tip: Option<u64>,
    /// Scripthash entries: the outpoints emulated over this status (they
    /// keep the entry alive as subscribers do).
    pub watchers: HashSet<Outpoint>,
    /// Outpoint entries: the scripthash whose status this outpoint is
    /// emulated over, instead of an upstream subscription of its own.
    pub watching: Option<String>,
    /// Scripthash entries: subscribed by the hub because wallets read it
    /// (see `read_subs`); keeps the entry alive as subscribers do.
    pub read_driven: bool,
}

impl Entry {
    /// Whether the upstream subscription is established or on its way.
    pub fn on_conn(&self, conn: ConnId) -> bool {
        self.conn == Some(conn) || self.pending.is_some_and(|(c, _)| c == conn)
    }

    /// Neither established nor asked for, nor emulated: it needs an
    /// upstream subscribe.
    pub fn orphaned(&self) -> bool {
        self.conn.is_none() && self.pending.is_none() && self.watching.is_none()
    }

    /// Nobody holds it any more.
    pub fn unused(&self) -> bool {
        self.subscribers.is_empty()
            && self.waiting.is_empty()
            && self.watchers.is_empty()
            && !self.read_driven
    }
}

pub(super) struct Waiter {
    pub responder: Responder,
    pub form: Form,
    pub session: SessionId,
}

pub(super) struct Subscriber {
    pub out: Outbound,
    pub forms: Vec<Form>,
}

/// The result text a subscriber in `form` is answered with.
pub(super) fn render(form: &Form, value: &Value) -> Result<String, String> {
    match (form, value) {
        (Form::Header(hf), Value::Tip { height, hex }) => header::render(*hf, *height, hex),
        (_, Value::Status(s)) => Ok(s.clone()),
        (_, Value::Tip { height, hex }) => Ok(header::modern(*height, hex)),
    }
}

pub(super) fn answer(responder: Responder, form: &Form, value: &Value) {
    match render(form, value) {
        Ok(text) => responder.deliver_text(&text),
        Err(e) => responder.fail(RpcError::new(ErrorCode::InternalError, e)),
    }
}

impl Topic {
    /// The upstream request that subscribes to this topic; `hint` is an
    /// outpoint's output script.
    pub(super) fn subscribe_request(&self, hint: Option<&[u8]>) -> (&'static str, String) {
        match self {
            Topic::Headers => (headers::SUBSCRIBE, "[]".to_string()),
            Topic::Script(sh) => (scripthash::SUBSCRIBE, scripthash::subscribe_params(sh)),
            Topic::Outpoint(op) => (outpoint::SUBSCRIBE, outpoint::subscribe_params(op, hint)),
        }
    }

    /// The connections that can hold this topic's upstream subscription:
    /// scripthash subscriptions are gone at 1.7, outpoints came with it.
    pub(super) fn need(&self) -> Need {
        match self {
            Topic::Headers => Need::ANY,
            Topic::Script(_) => Need::below(V1_7),
            Topic::Outpoint(_) => Need::at_least(V1_7),
        }
    }

    /// The value in an upstream subscribe answer.
    pub(super) fn parse_result(&self, result: &str) -> Option<Value> {
        match self {
            Topic::Headers => headers::parse_result(result),
            Topic::Script(_) => scripthash::parse_result(result),
            Topic::Outpoint(_) => outpoint::parse_result(result),
        }
    }

    /// The notification a subscriber in `form` gets for `value`; `None`
    /// when the value has no rendering in that form.
    pub(super) fn notification(&self, form: &Form, value: &Value) -> Option<jsonrpc::Line> {
        let rendered = render(form, value).ok()?;
        Some(match self {
            Topic::Script(sh) => scripthash::notification(sh, form, &rendered),
            Topic::Headers => headers::notification(form, &rendered),
            Topic::Outpoint(op) => outpoint::notification(op, &rendered),
        })
    }
}
