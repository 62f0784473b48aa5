//! Methods only an upstream of a given level can answer: `mempool.get_info`
//! and `blockchain.transaction.broadcast_package` (1.6),
//! `blockchain.transaction.testmempoolaccept` and `mempool.recent` (1.7).
//!
//! Owns: routing them to a connection that negotiated the level, and the
//! refusal when no upstream of the coin offers it: a JSON-RPC error
//! (`-32601`, the method is not available here) that names the level
//! needed and what the upstreams speak, before anything is sent. A package
//! is never split into single broadcasts, and is never resent once written
//! (see the router). While an upstream that offers the level has no
//! connection up yet, the request fails like any request without an
//! upstream (`-32001`). `mempool.recent` is the same for every wallet: the
//! cache keeps one shared answer for a few seconds (`[cache] fee_ttl_secs`)
//! and identical requests in flight share one upstream request.

use super::upstream_need;
use crate::jsonrpc::{ErrorCode, RpcError};
use crate::reply::Responder;
use crate::router::Router;
use crate::upstream::Capability;

pub(super) fn route(router: &Router, method: &str, params: &str, responder: Responder) {
    let need = upstream_need(method);
    if router.pool.capability(need) == Capability::Never {
        return responder.fail(refusal(router, method, need));
    }
    router.forward(method, params, responder, None);
}

/// Why `method` is refused: no upstream offers the level it needs.
fn refusal(router: &Router, method: &str, need: crate::upstream::Need) -> RpcError {
    let mut speak: Vec<String> = router
        .pool
        .status()
        .iter()
        .filter_map(|u| u.info.protocol_max.clone().or(u.info.protocol.clone()))
        .collect();
    speak.sort();
    speak.dedup();
    let speak = if speak.is_empty() {
        "none is connected".to_string()
    } else {
        format!("they offer up to {}", speak.join(", "))
    };
    let what = match method {
        "blockchain.transaction.broadcast_package" => {
            "; the package was not broadcast, not even in part"
        }
        "blockchain.transaction.testmempoolaccept" => "; nothing was tested",
        _ => "",
    };
    RpcError::new(
        ErrorCode::MethodNotFound,
        format!(
            "{method} is not available: it needs an upstream server of {} speaking {need}, and {speak}{what}",
            router.coin
        ),
    )
}
