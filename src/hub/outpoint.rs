//! Outpoints (protocol 1.7 `blockchain.outpoint.subscribe`): one upstream
//! subscription per outpoint however many sessions watch it.
//!
//! Owns: the coin's outpoint entries and, for each, the choice between a
//! *native* upstream subscription (on a connection that negotiated 1.7; see
//! `upstream` for its lifecycle) and *emulation*: the entry watches the
//! scripthash entry of the output script (a subscription the coin's 1.4
//! wallets may share), and every status that entry announces recomputes the
//! outpoint's status with [`crate::outpoint::emulate`] from the script's
//! history (read where the status came from, see `reads`) and the
//! transactions in it. The output script comes from the client's hint or,
//! without one, from the funding transaction. An upstream that negotiated
//! 1.7 but refuses outpoint subscriptions (its node cannot look up
//! spenders) is not asked again for that outpoint: it is emulated.
//!
//! An outpoint whose funding transaction cannot be found is answered `{}`
//! (as ElectrumX does) and looked up again at each new block.

use super::actor::Actor;
use super::entry::{answer, Entry, Value};
use super::{Command, Outpoint, Topic};
use crate::jsonrpc::{self, ErrorCode, RpcError};
use crate::outpoint::{self as op_status, Emulated, Status, TxFetch};
use crate::reply::{Answer, Responder};
use crate::upstream::{Job, Need, Reroute};
use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use tokio::sync::oneshot;
use tokio::time::Instant;

/// The upstream methods of this kind.
pub(super) const SUBSCRIBE: &str = "blockchain.outpoint.subscribe";
pub(super) const UNSUBSCRIBE: &str = "blockchain.outpoint.unsubscribe";

/// One watched outpoint.
#[derive(Default)]
pub(super) struct OutpointEntry {
    pub entry: Entry,
    /// The output script, once known (hint or funding transaction).
    pub spk: Option<Vec<u8>>,
    /// Bumped by every lookup started; older results are dropped.
    epoch: u64,
    /// Looking up the output script is in flight.
    resolving: bool,
    /// A 1.7 upstream refused to subscribe to it: emulate from now on.
    native_failed: bool,
    /// Transactions of the script's history known not to spend it.
    not_spenders: HashSet<String>,
}

/// Every outpoint watched for a coin's sessions.
#[derive(Default)]
pub(super) struct Outpoints {
    pub entries: HashMap<Outpoint, OutpointEntry>,
}

impl Outpoints {
    /// Outpoints with a known script and nothing holding their status.
    pub fn orphans(&self) -> Vec<Outpoint> {
        self.entries
            .iter()
            .filter(|(_, e)| e.spk.is_some() && e.entry.orphaned())
            .map(|(op, _)| op.clone())
            .collect()
    }

    /// Outpoints whose script is still unknown (looked up again per block).
    pub fn unresolved(&self) -> Vec<Outpoint> {
        self.entries
            .iter()
            .filter(|(_, e)| e.spk.is_none() && !e.resolving)
            .map(|(op, _)| op.clone())
            .collect()
    }
}

/// Work done off the actor, coming back.
pub(super) enum Done {
    /// The funding transaction's output script (`None`: no such output).
    Resolved {
        op: Outpoint,
        epoch: u64,
        result: Result<Option<Vec<u8>>, RpcError>,
    },
    /// An emulated status.
    Computed {
        op: Outpoint,
        epoch: u64,
        result: Result<Emulated, RpcError>,
    },
}

/// The params of the native subscribe (ElectrumX 2.0 wants the hint).
pub(super) fn subscribe_params(op: &Outpoint, hint: Option<&[u8]>) -> String {
    format!(
        "[{},{},{}]",
        jsonrpc::quote(&op.txid),
        op.vout,
        jsonrpc::quote(&hex::encode(hint.unwrap_or_default()))
    )
}

/// The params of the native unsubscribe.
pub(super) fn unsubscribe_params(op: &Outpoint) -> String {
    format!("[{},{}]", jsonrpc::quote(&op.txid), op.vout)
}

/// A status from a native subscribe answer, in the canonical text.
pub(super) fn parse_result(result: &str) -> Option<Value> {
    Status::parse(result).map(|s| Value::Status(s.to_json()))
}

/// The outpoint and status of native notification params
/// (`[tx_hash, txout_idx, status]`).
pub(super) fn parse_notification(params: &str) -> Option<(Outpoint, Value)> {
    let (txid, vout, status) =
        serde_json::from_str::<(String, u32, Box<serde_json::value::RawValue>)>(params).ok()?;
    let op = Outpoint {
        txid: txid.to_ascii_lowercase(),
        vout,
    };
    Some((op, parse_result(status.get())?))
}

pub(super) fn notification(op: &Outpoint, rendered: &str) -> jsonrpc::Line {
    jsonrpc::notification_line(
        SUBSCRIBE,
        &format!("[{},{},{}]", jsonrpc::quote(&op.txid), op.vout, rendered),
    )
}

impl Actor {
    /// Give an outpoint entry something that keeps its status current: a
    /// native subscription where a 1.7 connection is up, else emulation.
    pub(super) fn start_outpoint(&mut self, op: Outpoint) {
        let native = self.pool.preferred_for(Topic::Outpoint(op.clone()).need());
        let any = self.pool.any_ready();
        let Some(e) = self.outpoints.entries.get_mut(&op) else {
            return;
        };
        if e.spk.is_none() {
            if !e.resolving && any {
                self.resolve_script(op);
            } else if !any {
                // Nothing to ask: the waiters fail now, as elsewhere.
                self.start_subscribe(Topic::Outpoint(op));
            }
            return;
        }
        if native.is_some() && !e.native_failed {
            self.unwatch(&op);
            self.start_subscribe(Topic::Outpoint(op));
        } else if any {
            self.watch(op);
        } else {
            self.start_subscribe(Topic::Outpoint(op));
        }
    }

    /// A native subscribe was refused: emulate instead of retrying it.
    pub(super) fn native_refused(&mut self, op: &Outpoint, why: &str) {
        if let Some(e) = self.outpoints.entries.get_mut(op) {
            tracing::debug!(coin = %self.config.coin, txid = %op.txid, vout = op.vout, why, "native outpoint subscription refused: emulated");
            e.native_failed = true;
            e.entry.pending = None;
            self.start_outpoint(op.clone());
        }
    }

    /// Look the output script up in the funding transaction.
    fn resolve_script(&mut self, op: Outpoint) {
        let Some(e) = self.outpoints.entries.get_mut(&op) else {
            return;
        };
        e.resolving = true;
        e.epoch += 1;
        let epoch = e.epoch;
        let fetch = self.tx_fetcher();
        let back = self.self_tx.clone();
        tokio::spawn(async move {
            let result = match fetch(op.txid.clone()).await {
                Ok(Some(raw)) => op_status::output_script(&raw, op.vout),
                Ok(None) => Ok(None),
                Err(e) => Err(e),
            };
            let _ = back.send(Command::Outpoint(Done::Resolved { op, epoch, result }));
        });
    }

    /// Emulate over the output script's status.
    fn watch(&mut self, op: Outpoint) {
        let Some(e) = self.outpoints.entries.get_mut(&op) else {
            return;
        };
        let sh = crate::coin::script_hash(e.spk.as_deref().unwrap_or_default());
        if e.entry.watching.as_deref() == Some(sh.as_str()) {
            return;
        }
        e.entry.conn = None;
        e.entry.pending = None;
        e.entry.hold = None;
        if e.entry.watching.replace(sh.clone()).is_none() {
            self.stats
                .outpoints_emulated
                .fetch_add(1, Ordering::Relaxed);
        }
        let new = !self.scripts.entries.contains_key(&sh);
        if new {
            self.scripts.entries.insert(sh.clone(), Entry::default());
            self.stats
                .upstream_subscriptions
                .fetch_add(1, Ordering::Relaxed);
        }
        let script = self.scripts.entries.get_mut(&sh).expect("present");
        script.watchers.insert(op.clone());
        let ready = script.value.is_some();
        if script.orphaned() {
            self.start_subscribe(Topic::Script(sh));
        } else if ready {
            self.recompute(op);
        }
    }

    /// Stop emulating (the outpoint got a native subscription or left).
    pub(super) fn unwatch(&mut self, op: &Outpoint) {
        let Some(e) = self.outpoints.entries.get_mut(op) else {
            return;
        };
        let Some(sh) = e.entry.watching.take() else {
            return;
        };
        self.stats
            .outpoints_emulated
            .fetch_sub(1, Ordering::Relaxed);
        if let Some(script) = self.scripts.entries.get_mut(&sh) {
            script.watchers.remove(op);
        }
        self.drop_if_unused(&Topic::Script(sh));
    }

    /// A script's status changed (or arrived): recompute the outpoints
    /// emulated over it.
    pub(super) fn script_changed(&mut self, sh: &str) {
        let watchers: Vec<Outpoint> = match self.scripts.entries.get(sh) {
            Some(e) if !e.watchers.is_empty() => e.watchers.iter().cloned().collect(),
            _ => return,
        };
        for op in watchers {
            self.recompute(op);
        }
    }

    /// Recompute an emulated outpoint's status from its script's history.
    fn recompute(&mut self, op: Outpoint) {
        let timeout = self.config.request_timeout;
        let Some(e) = self.outpoints.entries.get_mut(&op) else {
            return;
        };
        let (Some(sh), Some(spk)): (Option<String>, Option<Vec<u8>>) =
            (e.entry.watching.clone(), e.spk.clone())
        else {
            return;
        };
        e.epoch += 1;
        let epoch = e.epoch;
        let not_spenders = e.not_spenders.clone();
        let (tx, rx) = oneshot::channel();
        let mut job = Job::new(
            jsonrpc::request_prefix(
                "blockchain.scripthash.get_history",
                &format!("[{}]", jsonrpc::quote(&sh)),
            ),
            Responder::Internal(tx),
            Instant::now() + timeout,
        );
        job.need = Need::below(crate::protocol::V1_7);
        // A retry comes back through the hub, as a wallet's read would.
        let back = self.self_tx.clone();
        let again = sh.clone();
        job.reroute = Some(Reroute(Arc::new(move |job| {
            let read = Command::Read {
                scripthash: again.clone(),
                job,
            };
            if let Err(tokio::sync::mpsc::error::SendError(Command::Read { job, .. })) =
                back.send(read)
            {
                job.responder.fail(RpcError::new(
                    ErrorCode::UpstreamUnavailable,
                    "shutting down",
                ));
            }
        })));
        // Where the status came from (or parked while it moves).
        self.on_read(sh, job);
        let fetch = self.tx_fetcher();
        let back = self.self_tx.clone();
        tokio::spawn(async move {
            let history = match rx.await {
                Ok(Ok(Answer::Result(raw))) => op_status::history_pairs(raw.get()),
                Ok(Ok(Answer::Error(e))) => Err(RpcError::new(
                    ErrorCode::InternalError,
                    format!("history of the output script refused: {}", e.get()),
                )),
                Ok(Err(e)) => Err(e),
                Err(_) => Err(RpcError::new(ErrorCode::InternalError, "request dropped")),
            };
            let result = match history {
                Ok(history) => op_status::emulate(&op, &spk, history, not_spenders, fetch).await,
                Err(e) => Err(e),
            };
            let _ = back.send(Command::Outpoint(Done::Computed { op, epoch, result }));
        });
    }

    pub(super) fn on_outpoint_done(&mut self, done: Done) {
        match done {
            Done::Resolved { op, epoch, result } => {
                let Some(e) = self.outpoints.entries.get_mut(&op) else {
                    return;
                };
                if e.epoch != epoch {
                    return;
                }
                e.resolving = false;
                match result {
                    Ok(Some(spk)) => {
                        e.spk = Some(spk);
                        self.start_outpoint(op);
                    }
                    // No such output (yet): `{}`, looked up again per block.
                    Ok(None) => self.set_outpoint(&op, Status::default()),
                    Err(err) => self.fail_waiting(&Topic::Outpoint(op), |_| err.clone(), None),
                }
            }
            Done::Computed { op, epoch, result } => {
                let Some(e) = self.outpoints.entries.get_mut(&op) else {
                    return;
                };
                if e.epoch != epoch || e.entry.watching.is_none() {
                    return;
                }
                match result {
                    Ok(em) => {
                        e.not_spenders = em.not_spenders;
                        self.set_outpoint(&op, em.status);
                    }
                    Err(err) => {
                        tracing::debug!(coin = %self.config.coin, txid = %op.txid, vout = op.vout, error = %err.message, "outpoint emulation failed");
                        self.fail_waiting(&Topic::Outpoint(op), |_| err.clone(), None);
                    }
                }
            }
        }
    }

    /// A status worked out by the proxy: answer waiters, announce a change.
    fn set_outpoint(&mut self, op: &Outpoint, status: Status) {
        let Some(e) = self.outpoints.entries.get_mut(op) else {
            return;
        };
        let value = Value::Status(status.to_json());
        let changed = e.entry.value.as_ref().is_some_and(|v| *v != value);
        e.entry.value = Some(value.clone());
        for w in std::mem::take(&mut e.entry.waiting) {
            answer(w.responder, &w.form, &value);
        }
        let topic = Topic::Outpoint(op.clone());
        if changed {
            self.fan_out(&topic);
        }
        // Those answered may have unsubscribed meanwhile.
        self.drop_if_unused(&topic);
    }

    /// New block: look up the scripts not found so far.
    pub(super) fn retry_unresolved(&mut self) {
        if !self.pool.any_ready() {
            return;
        }
        for op in self.outpoints.unresolved() {
            self.resolve_script(op);
        }
    }

    /// Fetches raw transactions through the cache (they are immutable).
    fn tx_fetcher(
        &self,
    ) -> impl Fn(String) -> std::pin::Pin<Box<dyn std::future::Future<Output = TxFetch> + Send>>
           + Send
           + Sync
           + 'static {
        let pool = self.pool.clone();
        let cache = self.config.cache.clone();
        let timeout = self.config.request_timeout;
        move |txid: String| {
            let (tx, rx) = oneshot::channel();
            let params = format!("[{}]", jsonrpc::quote(&txid));
            let method = "blockchain.transaction.get";
            let send = |r: Responder| {
                pool.dispatch(Job::new(
                    jsonrpc::request_prefix(method, &params),
                    r,
                    Instant::now() + timeout,
                ))
            };
            match &cache {
                Some(cache) => cache.serve(method, &params, Responder::Internal(tx), send),
                None => send(Responder::Internal(tx)),
            }
            Box::pin(async move {
                match rx.await {
                    Ok(Ok(Answer::Result(raw))) => serde_json::from_str::<String>(raw.get())
                        .map(Some)
                        .map_err(|_| {
                            RpcError::new(
                                ErrorCode::InternalError,
                                "unexpected transaction from upstream",
                            )
                        }),
                    // The upstream's own error: it knows no such transaction.
                    Ok(Ok(Answer::Error(_))) => Ok(None),
                    Ok(Err(e)) => Err(e),
                    Err(_) => Err(RpcError::new(ErrorCode::InternalError, "request dropped")),
                }
            })
        }
    }
}
