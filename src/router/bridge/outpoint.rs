//! `blockchain.outpoint.*` (protocol 1.7) on upstreams of any level.
//!
//! Owns: the params checks (as ElectrumX 2.0 checks them; the script hint
//! is optional here), handing subscriptions to the hub (which shares one
//! upstream subscription per outpoint, native or emulated: see
//! `hub::outpoint`), and `get_status`: asked of a 1.7 upstream when one is
//! connected, else (or when that upstream cannot answer it: its node may
//! not look spenders up) emulated once from the output script's history
//! with `crate::outpoint::emulate`. Answers are in ElectrumX 2.0's shape.

use crate::cache::Cache;
use crate::hub::{Form, Hub, Topic};
use crate::jsonrpc::{self, ErrorCode, RpcError};
use crate::outpoint::{self, Outpoint, Status, TxFetch};
use crate::protocol::V1_7;
use crate::reply::{Answer, InternalReply, Responder};
use crate::router::{Router, SessionState};
use crate::upstream::{Capability, Job, Need, Pool};
use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::oneshot;
use tokio::time::Instant;

pub(super) fn route(
    router: &Router,
    st: &mut SessionState,
    method: &str,
    params: &str,
    responder: Responder,
) {
    let (op, hint) = match outpoint::params(params) {
        Ok(p) => p,
        Err(e) => return responder.fail(e),
    };
    match method {
        "blockchain.outpoint.subscribe" => router.hub.subscribe_outpoint(
            st.id,
            &st.out,
            op,
            hint,
            router.max_subs_per_session,
            responder,
        ),
        "blockchain.outpoint.unsubscribe" => {
            router.unsubscribe(st, Topic::Outpoint(op), Form::Outpoint, responder)
        }
        "blockchain.outpoint.get_status" => get_status(router, op, hint, responder),
        _ => responder.fail(super::unknown(method)),
    }
}

fn get_status(router: &Router, op: Outpoint, hint: Option<Vec<u8>>, responder: Responder) {
    let up = Upstream::of(router);
    let need = Need::at_least(V1_7);
    let native = router.pool.capability(need) == Capability::Now;
    tokio::spawn(async move {
        if native {
            let params = format!(
                "[{},{},{}]",
                jsonrpc::quote(&op.txid),
                op.vout,
                jsonrpc::quote(&hex::encode(hint.as_deref().unwrap_or_default()))
            );
            let reply = up.ask("blockchain.outpoint.get_status", &params, None, need);
            if let Ok(Ok(Answer::Result(raw))) = reply.await {
                if let Some(status) = Status::parse(raw.get()) {
                    return responder.deliver_text(&status.to_json());
                }
            }
            // Refused (the node cannot look spenders up) or unreadable.
        }
        match emulate_once(&up, &op, hint).await {
            Ok(status) => responder.deliver_text(&status.to_json()),
            Err(e) => responder.fail(e),
        }
    });
}

/// One outpoint status computed from the output script's history.
async fn emulate_once(
    up: &Upstream,
    op: &Outpoint,
    hint: Option<Vec<u8>>,
) -> Result<Status, RpcError> {
    let spk = match hint {
        Some(spk) => spk,
        None => match up.tx(op.txid.clone()).await? {
            Some(raw) => match outpoint::output_script(&raw, op.vout)? {
                Some(spk) => spk,
                None => return Ok(Status::default()),
            },
            None => return Ok(Status::default()),
        },
    };
    let sh = crate::coin::script_hash(&spk);
    let params = format!("[{}]", jsonrpc::quote(&sh));
    let history = up.ask(
        "blockchain.scripthash.get_history",
        &params,
        Some(&sh),
        Need::below(V1_7),
    );
    let history = match history.await {
        Ok(Ok(Answer::Result(raw))) => outpoint::history_pairs(raw.get())?,
        Ok(Ok(Answer::Error(e))) => {
            return Err(RpcError::new(
                ErrorCode::InternalError,
                format!("history of the output script refused: {}", e.get()),
            ))
        }
        Ok(Err(e)) => return Err(e),
        Err(_) => return Err(crate::reply::internal::dropped()),
    };
    let fetch = |txid: String| up.tx(txid);
    Ok(outpoint::emulate(op, &spk, history, HashSet::new(), fetch)
        .await?
        .status)
}

/// What `get_status` needs of the router, owned (it runs in its own task).
#[derive(Clone)]
struct Upstream {
    pool: Pool,
    hub: Hub,
    cache: Arc<Cache>,
    timeout: Duration,
}

impl Upstream {
    fn of(router: &Router) -> Upstream {
        Upstream {
            pool: router.pool.clone(),
            hub: router.hub.clone(),
            cache: router.cache.clone(),
            timeout: router.request_timeout,
        }
    }

    /// Ask through the cache; a read about a subscribed scripthash
    /// (`affinity`) follows its subscription.
    fn ask(
        &self,
        method: &str,
        params: &str,
        affinity: Option<&str>,
        need: Need,
    ) -> oneshot::Receiver<InternalReply> {
        let (tx, rx) = oneshot::channel();
        self.cache
            .serve(method, params, Responder::Internal(tx), |responder| {
                let mut job = Job::new(
                    jsonrpc::request_prefix(method, params),
                    responder,
                    Instant::now() + self.timeout,
                );
                job.need = need;
                match affinity {
                    Some(sh) if self.hub.route(sh).is_some() => self.hub.read(sh, job),
                    _ => self.pool.dispatch(job),
                }
            });
        rx
    }

    /// A raw transaction; `None` when the upstream knows no such one.
    async fn tx(&self, txid: String) -> TxFetch {
        let params = format!("[{}]", jsonrpc::quote(&txid));
        match self
            .ask("blockchain.transaction.get", &params, None, Need::ANY)
            .await
        {
            Ok(Ok(Answer::Result(raw))) => serde_json::from_str::<String>(raw.get())
                .map(Some)
                .map_err(|_| crate::reply::internal::unexpected(raw.get())),
            Ok(Ok(Answer::Error(_))) => Ok(None),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(crate::reply::internal::dropped()),
        }
    }
}
