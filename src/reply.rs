//! How an answer finds its way back to whoever asked.
//!
//! Owns: [`Outbound`], the sending side of a session's bounded queue, and
//! [`Responder`], the "where does this answer go" that travels with every
//! forwarded request. An upstream connection formats a client's reply itself
//! (original id restored) and pushes it straight into that client's queue: no
//! task per request, no copy of the result into an intermediate tree.
//! [`queue`] is the bounded queue between them and the session's writer.

pub mod internal;
pub mod queue;

use crate::jsonrpc::{self, Json, Line, RpcError};
use crate::limits::ReplyLimits;
use crate::metrics::{CoinMetrics, Outcome};
pub use queue::{recycle, Taken};
use queue::{Pushed, Queue};
use serde_json::value::RawValue;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use tokio::sync::{oneshot, Notify};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// An upstream's answer, borrowed from the line it arrived on:
/// `Ok(result)` or `Err(error object)`, both relayed verbatim.
pub type UpstreamOutcome<'a> = Result<Json<'a>, Json<'a>>;

/// An owned upstream answer, for the proxy's own consumers (hub, translations).
#[derive(Debug, Clone)]
pub enum Answer {
    Result(Box<RawValue>),
    /// The upstream's error object, verbatim.
    Error(Box<RawValue>),
}

/// What an internal requester receives: the upstream's answer, or the proxy's
/// own error when there was none.
pub type InternalReply = Result<Answer, RpcError>;

/// The producing side of one session's outbound queue. The session's writer
/// task holds the [`Inbox`]. Cloned into every pending request of the
/// session, so a clone is one reference count: everything it carries lives
/// in one shared allocation.
#[derive(Debug)]
pub struct Outbound {
    inner: Arc<OutboundInner>,
}

#[derive(Debug)]
struct OutboundInner {
    queue: Queue,
    /// Signalled by the writer whenever it has taken lines off the queue
    /// (the session's reader may be waiting for room).
    room: Notify,
    /// Cancelled to disconnect the session (queue overflow, fatal error).
    kill: CancellationToken,
    /// Requests of this session that still await an answer.
    pending: AtomicUsize,
    /// Where answered requests are counted (none in unit tests).
    metrics: Option<Arc<CoinMetrics>>,
}

impl Clone for Outbound {
    fn clone(&self) -> Self {
        self.inner.queue.sender_added();
        Outbound {
            inner: self.inner.clone(),
        }
    }
}

impl Drop for Outbound {
    fn drop(&mut self) {
        self.inner.queue.sender_dropped();
    }
}

/// The consuming side of a session's outbound queue: its writer's.
#[derive(Debug)]
pub struct Inbox {
    inner: Arc<OutboundInner>,
}

impl Inbox {
    /// Every queued line, waiting for one; `None` once nothing more can
    /// come (every [`Outbound`] is gone, or the inbox was closed and is empty).
    pub async fn recv_all(&mut self) -> Option<Taken> {
        self.ready().await?;
        Some(self.try_recv_all())
    }

    /// Wait for a queued line without taking it: `Some(bytes queued)`, or
    /// `None` once nothing more can come (as [`Inbox::recv_all`]).
    pub async fn ready(&mut self) -> Option<usize> {
        std::future::poll_fn(|cx| self.inner.queue.poll_ready(cx)).await
    }

    /// Requests of the session still awaiting an answer (as
    /// [`Outbound::pending`]): when none is, a line queued is all there is
    /// to write for now.
    pub fn pending(&self) -> usize {
        self.inner.pending.load(Ordering::Relaxed)
    }

    /// Every queued line, without waiting.
    pub fn try_recv_all(&mut self) -> Taken {
        self.inner.queue.take()
    }

    /// Lines were taken: wake the session's reader if it waits for room.
    pub fn made_room(&self) {
        self.inner.room.notify_one();
    }
}

impl Drop for Inbox {
    fn drop(&mut self) {
        self.inner.queue.receiver_dropped();
    }
}

/// A session's outbound queue of at most `capacity` lines: the producing
/// side (cloned into requests and subscriptions) and the writer's side.
/// Replies over the size in `limits` are replaced as they are queued;
/// answered requests are counted in `metrics`, when given.
pub fn channel(
    capacity: usize,
    kill: CancellationToken,
    limits: Option<ReplyLimits>,
    metrics: Option<Arc<CoinMetrics>>,
) -> (Outbound, Inbox) {
    let inner = Arc::new(OutboundInner {
        queue: Queue::new(capacity, limits),
        room: Notify::new(),
        kill,
        pending: AtomicUsize::new(0),
        metrics,
    });
    (
        Outbound {
            inner: inner.clone(),
        },
        Inbox { inner },
    )
}

impl Outbound {
    pub fn metrics(&self) -> Option<&Arc<CoinMetrics>> {
        self.inner.metrics.as_ref()
    }

    fn record(&self, meta: &Meta, outcome: Outcome, err: Option<&RpcError>) {
        if let Some(m) = &self.inner.metrics {
            m.request(meta.method, outcome, meta.started.elapsed());
            if let Some(e) = err {
                m.error(e.code);
            }
        }
    }

    /// Queue a line for the client. A client whose queue is full is not
    /// reading: it is disconnected rather than buffered without limit.
    pub fn send(&self, line: &[u8]) {
        self.sent(self.inner.queue.push(line));
    }

    /// Queue the line `write` appends (formatted straight into the queue:
    /// no allocation of its own), as [`Outbound::send`] does.
    pub fn send_with(&self, write: impl FnOnce(&mut Vec<u8>)) {
        self.sent(self.inner.queue.push_with(write));
    }

    fn sent(&self, pushed: Pushed) {
        match pushed {
            Pushed::Queued | Pushed::Closed => {}
            Pushed::Full => {
                tracing::debug!("client queue full: disconnecting a slow reader");
                self.inner.kill.cancel();
            }
        }
    }

    /// Lines the queue can still take.
    pub fn free_slots(&self) -> usize {
        self.inner.queue.free()
    }

    /// Wakes when the writer took lines off the queue.
    pub fn room(&self) -> &Notify {
        &self.inner.room
    }

    /// A drained session ends: nothing more is queued (a late notification
    /// is dropped), and the writer writes what is queued and ends, without
    /// waiting for the hub to let go of its clones.
    pub fn finish(&self) {
        self.inner.queue.close();
    }

    pub fn kill_token(&self) -> &CancellationToken {
        &self.inner.kill
    }

    pub fn is_closed(&self) -> bool {
        self.inner.queue.is_closed() || self.inner.kill.is_cancelled()
    }

    /// Count one more request awaiting an answer.
    pub fn begin_request(&self) {
        self.inner.pending.fetch_add(1, Ordering::Relaxed);
    }

    fn end_request(&self) {
        self.inner.pending.fetch_sub(1, Ordering::Relaxed);
    }

    /// Requests of this session still awaiting an answer.
    pub fn pending(&self) -> usize {
        self.inner.pending.load(Ordering::Relaxed)
    }
}

/// What is recorded about a client request when it is answered.
#[derive(Debug, Clone, Copy)]
pub struct Meta {
    /// Index into `metrics::METHODS`.
    pub method: u8,
    pub started: Instant,
}

impl Meta {
    /// A request read at `started` (the session reads the clock once per
    /// line, for its idle deadline and this).
    pub fn at(method: &str, started: Instant) -> Meta {
        Meta {
            method: crate::metrics::method_index(method),
            started,
        }
    }
}

/// Where one forwarded request's answer goes.
#[derive(Debug)]
pub enum Responder {
    /// Straight to a client, under its original id.
    Client {
        id: ClientId,
        out: Outbound,
        meta: Meta,
    },
    /// Into one slot of a client batch.
    Slot { index: usize, batch: Arc<Batch> },
    /// To the proxy itself (hub, translations, probes).
    Internal(oneshot::Sender<InternalReply>),
    /// To code run where the answer arrives (see [`Hook`]).
    Hook(Hook),
}

/// What a [`Hook`] is given: the upstream's answer, borrowed, or the
/// proxy's own error.
pub type HookReply<'a> = Result<UpstreamOutcome<'a>, RpcError>;

/// An answer's consumer run in the task the answer arrives in (an upstream
/// connection's, usually) with the answer borrowed from its line: the
/// cache keeping an answer and handing it to every joined request needs no
/// task, channel or copy of its own per request. Dropped unrun, it runs
/// nothing: what it captured (a flight) answers its waiters on drop.
pub struct Hook(Box<dyn for<'a> FnOnce(HookReply<'a>) + Send>);

impl Hook {
    pub fn new(f: impl for<'a> FnOnce(HookReply<'a>) + Send + 'static) -> Hook {
        Hook(Box::new(f))
    }
}

impl std::fmt::Debug for Hook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Hook")
    }
}

impl Responder {
    /// A responder for a client request read at `started`; counts it as
    /// pending on the session.
    pub fn client(id: &str, out: &Outbound, method: &str, started: Instant) -> Responder {
        out.begin_request();
        Responder::Client {
            id: ClientId::new(id),
            out: out.clone(),
            meta: Meta::at(method, started),
        }
    }

    /// Deliver an upstream answer.
    pub fn deliver(self, outcome: UpstreamOutcome<'_>) {
        match self {
            Responder::Client { id, out, meta } => {
                out.record(&meta, outcome_kind(&outcome), None);
                out.send_with(|buf| match outcome {
                    Ok(result) => jsonrpc::push_result(buf, id.bytes(), result.get()),
                    Err(error) => jsonrpc::push_error_object(buf, id.bytes(), error.get()),
                });
                out.end_request();
            }
            Responder::Slot { index, batch } => {
                let id = batch.id(index);
                batch
                    .out
                    .record(&batch.meta(index), outcome_kind(&outcome), None);
                let line = outcome_line(id, outcome);
                batch.fill(index, line);
            }
            Responder::Internal(tx) => {
                let raw = |j: Json<'_>| RawValue::from_string(j.get().to_owned());
                let answer = match outcome {
                    Ok(r) => raw(r).map(Answer::Result),
                    Err(e) => raw(e).map(Answer::Error),
                };
                let _ =
                    tx.send(answer.map_err(|e| {
                        RpcError::new(jsonrpc::ErrorCode::InternalError, e.to_string())
                    }));
            }
            Responder::Hook(hook) => (hook.0)(Ok(outcome)),
        }
    }

    /// Deliver the proxy's own error instead of an answer.
    pub fn fail(self, err: RpcError) {
        match self {
            Responder::Client { id, out, meta } => {
                out.record(&meta, Outcome::ProxyError, Some(&err));
                out.send(&jsonrpc::error_line(id.get(), &err));
                out.end_request();
            }
            Responder::Slot { index, batch } => {
                let id = batch.id(index);
                batch
                    .out
                    .record(&batch.meta(index), Outcome::ProxyError, Some(&err));
                batch.fill(index, jsonrpc::error_line(id.get(), &err));
            }
            Responder::Internal(tx) => {
                let _ = tx.send(Err(err));
            }
            Responder::Hook(hook) => (hook.0)(Err(err)),
        }
    }

    /// Deliver a result the proxy produced itself (local answers, hub,
    /// cache), given as JSON text.
    pub fn deliver_text(self, result: &str) {
        match self {
            Responder::Client { id, out, meta } => {
                out.record(&meta, Outcome::Ok, None);
                out.send_with(|buf| jsonrpc::push_result(buf, id.bytes(), result));
                out.end_request();
            }
            Responder::Slot { index, batch } => {
                let id = batch.id(index);
                batch.out.record(&batch.meta(index), Outcome::Ok, None);
                batch.fill(index, jsonrpc::result_line(id.get(), result));
            }
            Responder::Internal(tx) => {
                let answer = RawValue::from_string(result.to_string())
                    .map(Answer::Result)
                    .map_err(|e| RpcError::new(jsonrpc::ErrorCode::InternalError, e.to_string()));
                let _ = tx.send(answer);
            }
            Responder::Hook(hook) => match RawValue::from_string(result.to_string()) {
                Ok(raw) => (hook.0)(Ok(Ok(Json::from(&*raw)))),
                Err(e) => (hook.0)(Err(RpcError::new(
                    jsonrpc::ErrorCode::InternalError,
                    e.to_string(),
                ))),
            },
        }
    }

    /// Whether nobody is waiting for this answer any more.
    pub fn is_abandoned(&self) -> bool {
        match self {
            Responder::Client { out, .. } => out.is_closed(),
            Responder::Slot { batch, .. } => batch.out.is_closed(),
            Responder::Internal(tx) => tx.is_closed(),
            Responder::Hook(_) => false,
        }
    }
}

/// A client request's id, as its JSON text. Kept inline when short (the
/// usual number, or a short string), so that forwarding a request
/// allocates nothing for it; a longer one is boxed.
#[derive(Debug, Clone)]
pub enum ClientId {
    Inline { len: u8, text: [u8; ID_INLINE] },
    Heap(Box<str>),
}

/// Longest id text kept inline.
const ID_INLINE: usize = 22;

impl ClientId {
    pub fn new(text: &str) -> ClientId {
        if text.len() > ID_INLINE {
            return ClientId::Heap(text.into());
        }
        let mut inline = [0; ID_INLINE];
        inline[..text.len()].copy_from_slice(text.as_bytes());
        ClientId::Inline {
            len: text.len() as u8,
            text: inline,
        }
    }

    pub fn get(&self) -> &str {
        match self {
            ClientId::Inline { len, text } => {
                std::str::from_utf8(&text[..*len as usize]).expect("copied from a str")
            }
            ClientId::Heap(text) => text,
        }
    }

    /// [`ClientId::get`] as bytes, without checking again that they are
    /// UTF-8 (they were copied from a `str`): how answers are written.
    pub fn bytes(&self) -> &[u8] {
        match self {
            ClientId::Inline { len, text } => &text[..*len as usize],
            ClientId::Heap(text) => text.as_bytes(),
        }
    }
}

fn outcome_kind(outcome: &UpstreamOutcome<'_>) -> Outcome {
    match outcome {
        Ok(_) => Outcome::Ok,
        Err(_) => Outcome::UpstreamError,
    }
}

fn outcome_line(id: &ClientId, outcome: UpstreamOutcome<'_>) -> Line {
    match outcome {
        Ok(result) => jsonrpc::result_line(id.get(), result.get()),
        Err(error) => jsonrpc::error_object_line(id.get(), error.get()),
    }
}

/// A client batch being assembled: one slot per member that expects an
/// answer, written as one array line once the last slot is filled.
#[derive(Debug)]
pub struct Batch {
    ids: Vec<ClientId>,
    /// Method of each answered member, for metrics.
    methods: Vec<u8>,
    started: Instant,
    state: Mutex<BatchState>,
    out: Outbound,
}

#[derive(Debug)]
struct BatchState {
    slots: Vec<Option<Line>>,
    remaining: usize,
}

impl Batch {
    /// A batch whose answered members have these ids and methods, in
    /// request order.
    pub fn new(members: Vec<(ClientId, &str)>, out: &Outbound) -> Arc<Batch> {
        out.begin_request();
        let n = members.len();
        let methods = members
            .iter()
            .map(|(_, m)| crate::metrics::method_index(m))
            .collect();
        let ids = members.into_iter().map(|(id, _)| id).collect();
        Arc::new(Batch {
            ids,
            methods,
            started: Instant::now(),
            state: Mutex::new(BatchState {
                slots: (0..n).map(|_| None).collect(),
                remaining: n,
            }),
            out: out.clone(),
        })
    }

    fn id(&self, index: usize) -> &ClientId {
        &self.ids[index]
    }

    fn meta(&self, index: usize) -> Meta {
        Meta {
            method: self.methods[index],
            started: self.started,
        }
    }

    /// The responder for member `index`.
    pub fn slot(self: &Arc<Self>, index: usize) -> Responder {
        Responder::Slot {
            index,
            batch: self.clone(),
        }
    }

    fn fill(&self, index: usize, line: Line) {
        let done = {
            let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
            if st.slots[index].is_some() {
                return;
            }
            st.slots[index] = Some(line);
            st.remaining -= 1;
            if st.remaining == 0 {
                Some(std::mem::take(&mut st.slots))
            } else {
                None
            }
        };
        if let Some(slots) = done {
            self.out
                .send(&jsonrpc::batch_line(slots.into_iter().flatten()));
            self.out.end_request();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(s: &str) -> Box<RawValue> {
        RawValue::from_string(s.to_string()).unwrap()
    }

    #[test]
    fn client_ids_short_and_long_keep_their_text() {
        for text in [
            "1",
            "\"abc\"",
            "null",
            "\"exactly-20-chars-xx\"",
            "\"a somewhat longer id than that\"",
        ] {
            assert_eq!(ClientId::new(text).get(), text);
        }
        assert!(matches!(ClientId::new("12345"), ClientId::Inline { .. }));
        assert!(matches!(ClientId::new(&"9".repeat(23)), ClientId::Heap(_)));
    }

    #[tokio::test]
    async fn client_reply_restores_id() {
        let (out, mut rx) = channel(4, CancellationToken::new(), None, None);
        let r = Responder::client("\"abc\"", &out, "server.ping", Instant::now());
        assert_eq!(out.pending(), 1);
        r.deliver(Ok((&*raw("[1,2]")).into()));
        let taken = rx.recv_all().await.unwrap();
        assert_eq!(taken.lines, 1);
        assert_eq!(
            taken.bytes,
            b"{\"jsonrpc\":\"2.0\",\"result\":[1,2],\"id\":\"abc\"}\n"
        );
        assert_eq!(out.pending(), 0);
    }

    #[tokio::test]
    async fn batch_waits_for_every_slot_and_keeps_order() {
        let (out, mut rx) = channel(4, CancellationToken::new(), None, None);
        let batch = Batch::new(
            vec![(ClientId::new("1"), "a"), (ClientId::new("2"), "b")],
            &out,
        );
        batch.slot(1).deliver(Ok((&*raw("\"b\"")).into()));
        assert_eq!(rx.try_recv_all().lines, 0);
        batch
            .slot(0)
            .fail(RpcError::new(crate::jsonrpc::ErrorCode::InternalError, "x"));
        let line = String::from_utf8(rx.recv_all().await.unwrap().bytes).unwrap();
        assert_eq!(
            line,
            "[{\"jsonrpc\":\"2.0\",\"error\":{\"code\":-32603,\"message\":\"x\"},\"id\":1},{\"jsonrpc\":\"2.0\",\"result\":\"b\",\"id\":2}]\n"
        );
        assert_eq!(out.pending(), 0);
    }

    #[tokio::test]
    async fn full_queue_disconnects() {
        let (out, _rx) = channel(1, CancellationToken::new(), None, None);
        out.send(b"1");
        assert!(!out.kill_token().is_cancelled());
        out.send(b"2");
        assert!(out.kill_token().is_cancelled());
    }
}
