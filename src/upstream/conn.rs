//! One upstream connection: the actor that owns the socket and id rewriting.
//!
//! Owns: the connection's own `u64` ids and the pending map id -> (job,
//! sent time), writing at most the learned in-flight limit (`limit`: the
//! rest waits in the connection's queue, where the pool sees it), batching
//! every queued request into one write, matching answers back, deadlines,
//! keep-alive pings, stall detection, and handing upstream notifications to
//! the pool's event stream. When the socket dies, every pending job is
//! handed back to the supervisor (which retries what may be retried and
//! fails the rest); nothing is leaked.
//!
//! Answer times feed the limiter and selection (`shared`), and so do the
//! time of the last read and whether replies come padded (`hold`). An answer that
//! is ElectrumX's "excessive resource usage" (-101) or "server busy" (-102)
//! is a throttle signal (`throttle`) and halves the limit; the request,
//! which the upstream did not serve, is resent to another connection
//! within the client's deadline (never a broadcast), so the wallet does not
//! see it while another upstream can answer.
//!
//! The handshake (`server.version`, `server.features`, the tip
//! subscription) is `handshake`'s; afterwards the tip notifications keep
//! the connection's height current, which health uses to spot a lagging
//! upstream. It does not choose upstreams (that is `select`), judge health
//! (`health`) or reconnect (`supervisor`).

use super::connect::BoxStream;
use super::handshake::{handshake, tip_height, Hello};
use super::limit::Limiter;
use super::throttle::{self, Signal};
use super::{Job, PoolEvent};
use crate::codec::{Frame, LineReader};
use crate::jsonrpc::{self, ErrorCode, Json, RpcError, UpstreamMessage};
use crate::reply::Responder;
use crate::u64_keys::U64Keys;
use serde_json::value::RawValue;
use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Longest line accepted from an upstream (big histories and header chunks).
const UPSTREAM_MAX_LINE: usize = 64 * 1024 * 1024;
/// What one read of an upstream connection takes at most (its buffer is
/// kept: connections are few, and one read carries many answers).
const UPSTREAM_READ: usize = 64 * 1024;
/// How often deadlines are checked.
const SWEEP_EVERY: Duration = Duration::from_millis(250);
/// Jobs a connection holds beyond its in-flight limit, besides its
/// channel: here their deadlines are kept (see `Actor::waiting`).
const WAITING_MAX: usize = 4096;
/// Times a request answered "busy" (-101/-102) is resent elsewhere.
const BUSY_RESENDS: u8 = 2;

pub use super::shared::{ConnShared, UpstreamInfo};

/// A job that has been written and awaits its answer.
pub struct Pending {
    pub job: Job,
    pub sent: Instant,
}

impl Pending {
    /// Written jobs by their id: inserted and removed once per request, so
    /// a hash map (a B-tree shifted its large values on every insert and
    /// removal), keyed by the connection's own ids.
    fn map() -> HashMap<u64, Pending, U64Keys> {
        HashMap::default()
    }
}

/// What a connection needs from its supervisor.
pub struct ConnCtx<'a> {
    pub coin: &'a str,
    pub label: &'a str,
    pub shared: &'a Arc<ConnShared>,
    pub events: &'a mpsc::UnboundedSender<PoolEvent>,
    pub client_name: &'a str,
    /// The version asked of the upstream; with `protocol_max`, the range
    /// `[protocol, protocol_max]`.
    pub protocol: &'a str,
    pub protocol_max: Option<&'a str>,
    pub ping_interval: Duration,
    /// A connection with a request this old and nothing received since it
    /// was sent is declared stalled and dropped (its requests are retried).
    pub stall_after: Duration,
    /// Close the connection after this long without a job (`None` for the
    /// connections an upstream always keeps).
    pub idle_close: Option<Duration>,
    pub latency: Option<&'a prometheus::Histogram>,
    /// Sends a job answered "busy" to another connection (its in-flight
    /// count already released here).
    pub resend: &'a (dyn Fn(Job) + Send + Sync),
    /// Told when this connection is up, so the upstream's other slots
    /// waiting out a backoff reconnect now (the upstream is back).
    pub reachable: &'a tokio::sync::Notify,
    pub shutdown: &'a CancellationToken,
}

/// How a served connection ended.
pub struct Ended {
    pub reason: String,
    /// Jobs written to the socket that got no answer.
    pub unanswered: Vec<Job>,
    /// Jobs received but never written: they may go anywhere.
    pub queued: Vec<Job>,
    /// Whether the handshake completed (the connection was ever ready).
    pub was_ready: bool,
    /// The upstream closed it (rather than an error, a stall or shutdown).
    pub closed_by_upstream: bool,
}

/// Serve one established connection until it fails or shutdown.
pub async fn serve(stream: BoxStream, rx: &mut mpsc::Receiver<Job>, ctx: ConnCtx<'_>) -> Ended {
    let (rd, mut wr) = tokio::io::split(stream);
    let mut reader = LineReader::keeping(rd, UPSTREAM_MAX_LINE, UPSTREAM_READ);
    let mut actor = Actor {
        ctx: &ctx,
        next_id: 3,
        pending: Pending::map(),
        deadlines: BinaryHeap::new(),
        last_read: Instant::now(),
        last_write: Instant::now(),
        last_job: Instant::now(),
        limiter: Limiter::new(ctx.shared.ceiling),
        waiting: VecDeque::new(),
    };
    actor.publish_limit();

    let hello = Hello {
        coin: ctx.coin,
        label: ctx.label,
        shared: ctx.shared,
        client_name: ctx.client_name,
        protocol: ctx.protocol,
        protocol_max: ctx.protocol_max,
    };
    if let Err(reason) = handshake(&hello, &mut reader, &mut wr).await {
        return Ended {
            reason,
            unanswered: Vec::new(),
            queued: actor.waiting.drain(..).collect(),
            was_ready: false,
            closed_by_upstream: false,
        };
    }
    actor.last_read = Instant::now();
    ctx.shared
        .last_read_ms
        .store(super::hold::now_ms(), Ordering::Relaxed);
    let conn = ctx.shared.conn_id();
    {
        let info = ctx.shared.info.lock().unwrap_or_else(|p| p.into_inner());
        tracing::info!(
            coin = ctx.coin,
            upstream = ctx.label,
            server = info.server_version.as_deref().unwrap_or("?"),
            protocol = info.protocol.as_deref().unwrap_or("?"),
            "upstream connection up"
        );
    }
    ctx.shared.ready.store(true, Ordering::Release);
    ctx.reachable.notify_waiters();
    let _ = ctx.events.send(PoolEvent::Up { conn });

    let reason = actor.run(&mut reader, &mut wr, rx).await;
    ctx.shared.ready.store(false, Ordering::Release);
    let _ = ctx.events.send(PoolEvent::Down { conn });
    // Oldest first, as they were written.
    let mut unanswered: Vec<(u64, Pending)> =
        std::mem::take(&mut actor.pending).into_iter().collect();
    unanswered.sort_unstable_by_key(|(id, _)| *id);
    let unanswered = unanswered.into_iter().map(|(_, p)| p.job).collect();
    Ended {
        closed_by_upstream: reason == CLOSED,
        reason,
        unanswered,
        queued: actor.waiting.drain(..).collect(),
        was_ready: true,
    }
}

struct Actor<'a> {
    ctx: &'a ConnCtx<'a>,
    next_id: u64,
    pending: HashMap<u64, Pending, U64Keys>,
    deadlines: BinaryHeap<Reverse<(Instant, u64)>>,
    last_read: Instant,
    last_write: Instant,
    last_job: Instant,
    /// Learns how many requests to keep written (see `limit`).
    limiter: Limiter,
    /// Jobs received while the connection was at its limit, oldest first.
    /// Taken out of the channel so that their deadlines are enforced
    /// while they wait (a job's client must not wait past it).
    waiting: VecDeque<Job>,
}

/// Why `Actor::run` returned without an error.
pub const IDLE: &str = "idle";
/// Why it returned when the upstream closed the socket.
const CLOSED: &str = "closed by upstream";

type Reader = LineReader<tokio::io::ReadHalf<BoxStream>>;
type Writer = tokio::io::WriteHalf<BoxStream>;

impl Actor<'_> {
    async fn run(
        &mut self,
        reader: &mut Reader,
        wr: &mut Writer,
        rx: &mut mpsc::Receiver<Job>,
    ) -> String {
        let mut sweep = tokio::time::interval(SWEEP_EVERY);
        sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut buf: Vec<u8> = Vec::with_capacity(4096);
        self.last_job = Instant::now();
        // Registered once, not once per line.
        let shutdown = self.ctx.shutdown.cancelled();
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                _ = &mut shutdown => return "shutting down".into(),
                frame = reader.next_frame() => match frame {
                    Ok(Frame::Line(line)) => {
                        self.last_read = Instant::now();
                        self.ctx
                            .shared
                            .last_read_ms
                            .store(super::hold::ms_at(self.last_read), Ordering::Relaxed);
                        self.on_line(line);
                        // Everything else that read brought in, without a
                        // trip through the select for each line.
                        loop {
                            match reader.next_buffered() {
                                Ok(Some(line)) => self.on_line(line),
                                Ok(None) => break,
                                Err(e) => return e.to_string(),
                            }
                        }
                        // Answers made room: write what waits.
                        self.fill(&mut buf, rx);
                        if let Err(e) = self.flush(wr, &mut buf).await {
                            return e;
                        }
                    }
                    Ok(Frame::Eof) => return CLOSED.into(),
                    Err(e) => return e.to_string(),
                },
                job = rx.recv(), if self.waiting.len() < WAITING_MAX => {
                    let Some(job) = job else { return "pool closed".into() };
                    self.last_job = Instant::now();
                    self.waiting.push_back(job);
                    self.fill(&mut buf, rx);
                    if self.pending.len() < self.limiter.limit() {
                        // Let the sessions that are ready run first: what
                        // they send joins this write instead of costing a
                        // syscall (and an upstream wakeup) of its own.
                        tokio::task::yield_now().await;
                        self.fill(&mut buf, rx);
                    }
                    if let Err(e) = self.flush(wr, &mut buf).await {
                        return e;
                    }
                }
                _ = sweep.tick() => {
                    if let Some(stalled) = self.expire() {
                        return stalled;
                    }
                    if let Some(idle) = self.ctx.idle_close {
                        // Idle, or retired by the monitor (no new jobs
                        // come once it is not active): close once empty.
                        let retired = !self.ctx.shared.is_active();
                        if self.pending.is_empty() && rx.is_empty() && self.waiting.is_empty()
                            && (retired || self.last_job.elapsed() >= idle)
                        {
                            return IDLE.into();
                        }
                    }
                    if self.last_write.elapsed() >= self.ctx.ping_interval {
                        let (tx, _rx) = tokio::sync::oneshot::channel();
                        let now = Instant::now();
                        let ping = Job::new(
                            jsonrpc::request_prefix("server.ping", "[]"),
                            Responder::Internal(tx),
                            now + self.ctx.ping_interval.max(Duration::from_secs(10)),
                        );
                        self.ctx.shared.in_flight.fetch_add(1, Ordering::Relaxed);
                        self.enqueue(&mut buf, ping, now);
                        if let Err(e) = wr.write_all(&buf).await {
                            return format!("write: {e}");
                        }
                        buf.clear();
                        self.last_write = Instant::now();
                    }
                }
            }
        }
    }

    /// Enqueue what waits, then what is queued in the channel, up to the
    /// in-flight limit. The clock is read once per call, and only when
    /// something is sent.
    fn fill(&mut self, buf: &mut Vec<u8>, rx: &mut mpsc::Receiver<Job>) {
        let mut now = None;
        while self.pending.len() < self.limiter.limit() {
            let job = match self.waiting.pop_front() {
                Some(job) => job,
                None => match rx.try_recv() {
                    Ok(job) => job,
                    Err(_) => break,
                },
            };
            let now = *now.get_or_insert_with(Instant::now);
            self.enqueue(buf, job, now);
        }
    }

    /// Write what `buf` holds, if anything.
    async fn flush(&mut self, wr: &mut Writer, buf: &mut Vec<u8>) -> Result<(), String> {
        if buf.is_empty() {
            return Ok(());
        }
        wr.write_all(buf).await.map_err(|e| format!("write: {e}"))?;
        self.last_write = Instant::now();
        if buf.capacity() > 64 * 1024 {
            *buf = Vec::with_capacity(4096);
        } else {
            buf.clear();
        }
        Ok(())
    }

    /// Assign an id, append the request to the write buffer, remember it
    /// as sent `now`.
    fn enqueue(&mut self, buf: &mut Vec<u8>, job: Job, now: Instant) {
        if job.responder.is_abandoned() || job.deadline <= now {
            // Nobody waits for it, or it is already too late: do not spend
            // upstream work on it.
            self.ctx.shared.release();
            job.responder.fail(RpcError::new(
                ErrorCode::UpstreamTimeout,
                "request timed out before it was sent",
            ));
            return;
        }
        let id = self.next_id;
        self.next_id += 1;
        jsonrpc::finish_request(buf, &job.prefix, id);
        self.deadlines.push(Reverse((job.deadline, id)));
        self.pending.insert(id, Pending { job, sent: now });
    }

    fn on_line(&mut self, line: &[u8]) {
        if super::hold::padded(line) && !self.ctx.shared.pads() {
            tracing::debug!(
                coin = self.ctx.coin,
                upstream = self.ctx.label,
                "the upstream pads its replies (and holds small ones): packing requests"
            );
            self.ctx.shared.pads.store(true, Ordering::Relaxed);
        }
        let msgs = match jsonrpc::parse_upstream_line(line) {
            Ok(m) => m,
            Err(_) => {
                tracing::warn!(
                    upstream = self.ctx.label,
                    "upstream sent invalid JSON: ignored"
                );
                return;
            }
        };
        for msg in msgs {
            match msg {
                UpstreamMessage::Response { id, outcome } => {
                    let in_flight = self.pending.len();
                    if let Some(p) = self.pending.remove(&id) {
                        self.ctx.shared.release();
                        // Every line of one read arrived when it was read.
                        let rtt = self.last_read.saturating_duration_since(p.sent);
                        if let Some(h) = self.ctx.latency {
                            h.observe(rtt.as_secs_f64());
                        }
                        if let Err(e) = outcome {
                            if let Some(signal) = throttle::busy_signal(e.get()) {
                                self.on_busy(signal, p.job, e);
                                continue;
                            }
                        }
                        self.learn(rtt, in_flight);
                        p.job.responder.deliver(outcome);
                    }
                }
                UpstreamMessage::Notification { method, params } => {
                    if method == "blockchain.headers.subscribe" {
                        let height = params.and_then(|p| {
                            serde_json::from_str::<Vec<&RawValue>>(p.get())
                                .ok()
                                .and_then(|v| v.first().and_then(|h| tip_height(h.get())))
                        });
                        if let Some(h) = height {
                            self.ctx.shared.tip.store(h, Ordering::Relaxed);
                        }
                    }
                    let params: Box<RawValue> = match params {
                        Some(p) => p.to_owned(),
                        None => RawValue::from_string("[]".into()).expect("valid JSON"),
                    };
                    let _ = self.ctx.events.send(PoolEvent::Notification {
                        conn: self.ctx.shared.conn_id(),
                        method: method.into_owned(),
                        params,
                    });
                }
                UpstreamMessage::Unmatched => {
                    tracing::debug!(
                        upstream = self.ctx.label,
                        "upstream answer with an unknown id"
                    );
                }
            }
        }
    }

    /// Show the limiter's limit and whether it has settled to selection
    /// and the pool's growth (see `shared`).
    fn publish_limit(&self) {
        let shared = self.ctx.shared;
        shared.limit.store(self.limiter.limit(), Ordering::Relaxed);
        shared
            .settled
            .store(self.limiter.settled(), Ordering::Relaxed);
    }

    /// Feed one answer time to the limiter and selection.
    fn learn(&mut self, rtt: Duration, in_flight: usize) {
        let shared = self.ctx.shared;
        shared.observe_rtt(rtt);
        self.limiter.set_noise(super::lag::current());
        let changed = self.limiter.on_answer(rtt, in_flight);
        self.publish_limit();
        if let Some(limit) = changed {
            tracing::trace!(
                coin = self.ctx.coin,
                upstream = self.ctx.label,
                limit,
                "in-flight limit"
            );
        }
        if let Some(base) = self.limiter.base() {
            shared
                .base_us
                .store((base * 1e6) as u64 + 1, Ordering::Relaxed);
        }
    }

    /// The upstream answered "excessive resource usage" or "busy": it did
    /// not serve the request, so a read is resent to another connection
    /// (selection now prefers upstreams that are not throttled) while the
    /// client's deadline allows; a broadcast, or one resent too often,
    /// gets the upstream's error.
    fn on_busy(&mut self, signal: Signal, mut job: Job, error: Json<'_>) {
        self.limiter.on_busy();
        self.publish_limit();
        self.ctx
            .shared
            .throttle
            .signal(signal, "answered a request with it");
        if job.retryable
            && job.attempts < BUSY_RESENDS
            && job.deadline > Instant::now()
            && !job.responder.is_abandoned()
        {
            job.attempts += 1;
            (self.ctx.resend)(job);
        } else {
            job.responder.deliver(Err(error));
        }
    }

    /// Fail jobs whose deadline passed, and report a stalled connection:
    /// its oldest request has waited `stall_after` and nothing at all has
    /// arrived since that request was written.
    fn expire(&mut self) -> Option<String> {
        let now = Instant::now();
        // Jobs still waiting for room past their deadline (or abandoned).
        if self
            .waiting
            .iter()
            .any(|j| j.deadline <= now || j.responder.is_abandoned())
        {
            let (late, keep): (VecDeque<Job>, VecDeque<Job>) = std::mem::take(&mut self.waiting)
                .into_iter()
                .partition(|j| j.deadline <= now || j.responder.is_abandoned());
            self.waiting = keep;
            for job in late {
                self.ctx.shared.release();
                job.responder.fail(RpcError::new(
                    ErrorCode::UpstreamTimeout,
                    "request timed out waiting for room on the upstream connection",
                ));
            }
        }
        if let Some(oldest) = self.pending.values().map(|p| p.sent).min() {
            if now.duration_since(oldest) >= self.ctx.stall_after && self.last_read < oldest {
                return Some(format!(
                    "stalled: nothing received for {:.1}s with requests outstanding",
                    self.last_read.elapsed().as_secs_f64()
                ));
            }
        }
        while let Some(Reverse((deadline, id))) = self.deadlines.peek().copied() {
            if deadline > now {
                break;
            }
            self.deadlines.pop();
            if let Some(p) = self.pending.remove(&id) {
                self.ctx.shared.release();
                p.job.responder.fail(RpcError::new(
                    ErrorCode::UpstreamTimeout,
                    "upstream did not answer in time",
                ));
            }
        }
        // Keep the heap from growing with ids already answered.
        if self.deadlines.len() > 1024 && self.deadlines.len() > 4 * self.pending.len() {
            let live: BinaryHeap<_> = self
                .deadlines
                .drain()
                .filter(|Reverse((_, id))| self.pending.contains_key(id))
                .collect();
            self.deadlines = live;
        }
        None
    }
}
