//! Protocol 1.6 and 1.7 for wallets, over upstreams of any level.
//!
//! Owns: the methods protocols 1.6 and 1.7 added, the rules of each client
//! level (what a level removed is refused as ElectrumX 2.0 refuses it, what
//! a level reshaped is answered in its shape), and which upstream levels
//! can answer each method ([`upstream_need`]: selection offers a request
//! only the connections whose negotiated level fits). Where no upstream
//! speaks a level, the proxy bridges or refuses:
//!
//! - `scriptpubkey`: `blockchain.scriptpubkey.*` through the scripthash of
//!   the script (one upstream subscription shared with 1.4 wallets);
//! - `outpoint`: `blockchain.outpoint.*`, native on 1.7 upstreams, else
//!   emulated from the output script's history (the hub shares
//!   subscriptions);
//! - `mempool`: `mempool.get_info`, `mempool.recent`, `broadcast_package`,
//!   `testmempoolaccept`: routed to a capable upstream or refused with an
//!   error that says why, never answered in part;
//! - `shapes`: the 1.6 shapes of `blockchain.block.headers`, the canonical
//!   mempool order, `blockchain.estimatefee`'s mode.
//!
//! Requests it does not take go back to the router's table (1.4 and
//! legacy forms live there and in `legacy`).

mod mempool;
mod outpoint;
mod scriptpubkey;
mod shapes;

use crate::jsonrpc::{ErrorCode, RpcError};
use crate::protocol::{V1_6, V1_7};
use crate::reply::Responder;
use crate::router::{Router, SessionState};
use crate::upstream::Need;

/// The upstream levels that answer `method` in the shape it is asked in
/// (ElectrumX 2.0's tables): the scripthash methods are gone at 1.7;
/// `mempool.get_info` and `broadcast_package` came with 1.6;
/// `testmempoolaccept`, `mempool.recent`, and the outpoint and scriptpubkey
/// methods with 1.7.
pub fn upstream_need(method: &str) -> Need {
    if method.starts_with("blockchain.scripthash.") {
        return Need::below(V1_7);
    }
    match method {
        "mempool.get_info" | "blockchain.transaction.broadcast_package" => Need::at_least(V1_6),
        "mempool.recent" | "blockchain.transaction.testmempoolaccept" => Need::at_least(V1_7),
        m if m.starts_with("blockchain.outpoint.") || m.starts_with("blockchain.scriptpubkey.") => {
            Need::at_least(V1_7)
        }
        _ => Need::ANY,
    }
}

/// Route a request of protocol 1.6 or 1.7, or one whose shape depends on
/// the session's level; give the responder back for anything else.
pub fn route(
    router: &Router,
    st: &mut SessionState,
    method: &str,
    params: &str,
    responder: Responder,
) -> Option<Responder> {
    let level = st.level;
    match method {
        // Removed by 1.6 and 1.7: unknown, as on ElectrumX 2.0.
        "blockchain.relayfee" if level.at_least(V1_6) => responder.fail(unknown(method)),
        m if m.starts_with("blockchain.scripthash.") && level.at_least(V1_7) => {
            responder.fail(unknown(method))
        }
        m if m.starts_with("blockchain.scriptpubkey.") => {
            scriptpubkey::route(router, st, method, params, responder)
        }
        m if m.starts_with("blockchain.outpoint.") => {
            outpoint::route(router, st, method, params, responder)
        }
        "mempool.get_info"
        | "mempool.recent"
        | "blockchain.transaction.broadcast_package"
        | "blockchain.transaction.testmempoolaccept" => {
            mempool::route(router, method, params, responder)
        }
        "blockchain.block.headers" if level.at_least(V1_6) => {
            shapes::headers_as_list(router, params, responder)
        }
        "blockchain.scripthash.get_history" | "blockchain.scripthash.get_mempool"
            if level.at_least(V1_6) =>
        {
            shapes::in_canonical_order(router, method, params, responder)
        }
        "blockchain.estimatefee" => shapes::estimatefee(router, params, responder),
        _ => return Some(responder),
    }
    None
}

/// ElectrumX's answer to a method it does not have.
fn unknown(method: &str) -> RpcError {
    RpcError::new(
        ErrorCode::MethodNotFound,
        format!("unknown method \"{method}\""),
    )
}

/// Forward `method` and turn its result with `convert`; upstream errors are
/// relayed unchanged.
fn translate<F>(
    router: &Router,
    method: &str,
    params: &str,
    affinity: Option<&str>,
    responder: Responder,
    convert: F,
) where
    F: FnOnce(&str) -> Result<String, RpcError> + Send + 'static,
{
    let (tx, rx) = tokio::sync::oneshot::channel();
    router.forward(method, params, Responder::Internal(tx), affinity);
    tokio::spawn(async move {
        let reply = rx
            .await
            .unwrap_or_else(|_| Err(crate::reply::internal::dropped()));
        crate::reply::internal::relay(reply, responder, convert);
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn needs_follow_electrumx_2_0s_tables() {
        let v14 = crate::protocol::Version(1, 4, 2);
        let ok = |m: &str, v| crate::upstream::select::capable(v, upstream_need(m));
        assert!(ok("blockchain.scripthash.get_history", v14));
        assert!(!ok("blockchain.scripthash.get_history", V1_7));
        assert!(ok("blockchain.scripthash.subscribe", V1_6));
        assert!(!ok("mempool.get_info", v14) && ok("mempool.get_info", V1_6));
        assert!(!ok("blockchain.transaction.broadcast_package", v14));
        assert!(!ok("mempool.recent", V1_6) && ok("mempool.recent", V1_7));
        assert!(!ok("blockchain.outpoint.subscribe", V1_6));
        assert!(ok("blockchain.transaction.get", v14) && ok("blockchain.transaction.get", V1_7));
    }
}
