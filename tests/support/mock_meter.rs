//! The mock upstream's ElectrumX-like session metering (`MockOptions::meter`).
//!
//! It follows ElectrumX 2.0's rules (electrumx/server/session.py, see
//! notes in the README's "Upstream options and the health rules"), with
//! parameters scaled so tests run in seconds:
//!
//! - each session has a `cost`: every request adds `per_request`, and every
//!   byte received or sent adds `1 / bandwidth_unit`; the cost decays by
//!   `decay_per_sec` per second;
//! - the cost that counts is the session's own, plus (with `group`) every
//!   other session's and what closed sessions left behind (`retained`,
//!   decaying the same way): ElectrumX's per-/24 group, which on a public
//!   address makes all of one proxy's sessions share one budget;
//! - `frac = (cost - soft) / (hard - soft)`, clamped at 0: the session
//!   runs at most `ceil((1 - frac) × initial_concurrent)` requests at a
//!   time, and each one sleeps `frac × request_sleep` inside its slot
//!   before it is handled; handling takes `service`;
//! - at `frac >= 1` the request is answered with error -101 "excessive
//!   resource usage" and the session is closed, its other requests
//!   unanswered.

use super::{methods, Shared};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, Notify};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// How a metering mock charges (see the module doc).
#[derive(Debug, Clone)]
pub struct MeterParams {
    pub per_request: f64,
    pub bandwidth_unit: f64,
    pub soft: f64,
    pub hard: f64,
    pub decay_per_sec: f64,
    pub initial_concurrent: usize,
    pub request_sleep: Duration,
    pub service: Duration,
    pub group: bool,
}

impl Default for MeterParams {
    /// ElectrumX's defaults, cost-wise, with a 10 ms handling time. Tests
    /// lower `soft`/`hard` to reach them in seconds.
    fn default() -> Self {
        MeterParams {
            per_request: 1.0,
            bandwidth_unit: 5000.0,
            soft: 1000.0,
            hard: 10000.0,
            decay_per_sec: 1.0,
            initial_concurrent: 10,
            request_sleep: Duration::from_millis(2500),
            service: Duration::from_millis(10),
            group: false,
        }
    }
}

struct Session {
    cost: f64,
    /// Requests being handled now (in a concurrency slot).
    active: usize,
}

struct State {
    sessions: HashMap<u64, Session>,
    /// Cost left behind by closed sessions (counted with `group`).
    retained: f64,
    last_decay: Instant,
}

/// The metering of one mock upstream; give it in `MockOptions::meter`.
pub struct Meter {
    pub params: MeterParams,
    state: Mutex<State>,
    /// Wakes requests waiting for a concurrency slot.
    freed: Notify,
    /// Requests answered with -101 (and sessions closed for it).
    refused: AtomicU64,
    /// Requests served.
    served: AtomicU64,
    /// The most sessions open at once.
    peak_sessions: AtomicU64,
}

impl Meter {
    pub fn new(params: MeterParams) -> Arc<Meter> {
        Arc::new(Meter {
            params,
            state: Mutex::new(State {
                sessions: HashMap::new(),
                retained: 0.0,
                last_decay: Instant::now(),
            }),
            freed: Notify::new(),
            refused: AtomicU64::new(0),
            served: AtomicU64::new(0),
            peak_sessions: AtomicU64::new(0),
        })
    }

    pub fn refused(&self) -> u64 {
        self.refused.load(Ordering::SeqCst)
    }

    pub fn served(&self) -> u64 {
        self.served.load(Ordering::SeqCst)
    }

    /// The most sessions that were open at the same time.
    pub fn peak_sessions(&self) -> u64 {
        self.peak_sessions.load(Ordering::SeqCst)
    }

    /// Sessions open now.
    pub fn sessions(&self) -> usize {
        self.state.lock().unwrap().sessions.len()
    }

    /// Apply the decay since the last time.
    fn decay(&self, st: &mut State) {
        let now = Instant::now();
        let d = now.duration_since(st.last_decay).as_secs_f64() * self.params.decay_per_sec;
        st.last_decay = now;
        for s in st.sessions.values_mut() {
            s.cost = (s.cost - d).max(0.0);
        }
        st.retained = (st.retained - d).max(0.0);
    }

    /// The cost that counts for session `id` (its own, or its group's).
    fn effective(&self, st: &State, id: u64) -> f64 {
        if self.params.group {
            st.retained + st.sessions.values().map(|s| s.cost).sum::<f64>()
        } else {
            st.sessions.get(&id).map(|s| s.cost).unwrap_or(0.0)
        }
    }

    fn frac(&self, cost: f64) -> f64 {
        let p = &self.params;
        ((cost - p.soft) / (p.hard - p.soft)).max(0.0)
    }

    fn charge(&self, id: u64, cost: f64) {
        let mut st = self.state.lock().unwrap();
        if let Some(s) = st.sessions.get_mut(&id) {
            s.cost += cost;
        }
    }

    pub(super) fn open(&self, id: u64) {
        let mut st = self.state.lock().unwrap();
        st.sessions.insert(
            id,
            Session {
                cost: 0.0,
                active: 0,
            },
        );
        self.peak_sessions
            .fetch_max(st.sessions.len() as u64, Ordering::SeqCst);
    }

    pub(super) fn close(&self, id: u64) {
        let mut st = self.state.lock().unwrap();
        if let Some(s) = st.sessions.remove(&id) {
            st.retained += s.cost;
        }
        self.freed.notify_waiters();
    }

    /// Charge a request's arrival; `Err(())` when the session is past its
    /// hard limit (answer -101 and close).
    fn admit(&self, id: u64, bytes: usize) -> Result<(), ()> {
        let p = &self.params;
        let mut st = self.state.lock().unwrap();
        self.decay(&mut st);
        let Some(s) = st.sessions.get_mut(&id) else {
            return Err(());
        };
        s.cost += p.per_request + bytes as f64 / p.bandwidth_unit;
        if self.frac(self.effective(&st, id)) >= 1.0 {
            return Err(());
        }
        Ok(())
    }

    /// Wait for a concurrency slot; returns the sleep the request takes.
    async fn slot(&self, id: u64) -> Option<Duration> {
        loop {
            let freed = self.freed.notified();
            {
                let mut st = self.state.lock().unwrap();
                let frac = self.frac(self.effective(&st, id)).min(1.0);
                let target = ((1.0 - frac) * self.params.initial_concurrent as f64).ceil() as usize;
                let s = st.sessions.get_mut(&id)?;
                if s.active < target.max(1) {
                    s.active += 1;
                    return Some(self.params.request_sleep.mul_f64(frac));
                }
            }
            freed.await;
        }
    }

    fn release(&self, id: u64) {
        if let Some(s) = self.state.lock().unwrap().sessions.get_mut(&id) {
            s.active -= 1;
        }
        self.freed.notify_waiters();
    }
}

/// Handle one request of session `id` the way a metering ElectrumX does
/// (see the module doc): refuse and close, or wait, sleep, answer, charge.
pub(super) fn handle(
    shared: Arc<Shared>,
    meter: Arc<Meter>,
    id: u64,
    req: Value,
    bytes: usize,
    tx: mpsc::UnboundedSender<String>,
    kill: CancellationToken,
) {
    let req_id = req.get("id").cloned();
    if meter.admit(id, bytes).is_err() {
        meter.refused.fetch_add(1, Ordering::SeqCst);
        if let Some(rid) = req_id {
            let _ = tx.send(
                json!({"jsonrpc":"2.0","error":{"code":-101,"message":"excessive resource usage"},"id":rid})
                    .to_string(),
            );
        }
        // Let the writer send the error before the session goes.
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(20)).await;
            kill.cancel();
        });
        return;
    }
    tokio::spawn(async move {
        let Some(sleep) = meter.slot(id).await else {
            return;
        };
        tokio::select! {
            _ = kill.cancelled() => { meter.release(id); return; }
            _ = tokio::time::sleep(sleep + meter.params.service) => {}
        }
        let reply = methods::answer(&shared, id, &req);
        meter.release(id);
        meter.served.fetch_add(1, Ordering::SeqCst);
        let Some(rid) = req_id else { return };
        let line = match reply {
            Ok(result) => json!({"jsonrpc":"2.0","result":result,"id":rid}),
            Err((code, msg)) => {
                json!({"jsonrpc":"2.0","error":{"code":code,"message":msg},"id":rid})
            }
        }
        .to_string();
        // Replies are padded to 1 KiB by ElectrumX: charge at least that.
        meter.charge(
            id,
            line.len().max(1024) as f64 / meter.params.bandwidth_unit,
        );
        let _ = tx.send(line);
    });
}
