//! Methods old wallets still call, translated onto what modern upstreams serve.
//!
//! Owns: `blockchain.block.get_header` (from `blockchain.block.header`,
//! decoded), `blockchain.block.get_chunk` (from `blockchain.block.headers`),
//! protocol 1.0's `blockchain.transaction.get(txid, height)`, and
//! `blockchain.relayfee` where an upstream dropped it. Anything else is
//! forwarded unchanged. Address methods and header shapes of subscriptions
//! live in the router and the hub, which serve every session alike.

use crate::header::{self, HeaderForm};
use crate::jsonrpc::{self, ErrorCode, RpcError};
use crate::reply::{Answer, Responder};
use crate::router::Router;
use serde_json::Value;
use tokio::sync::oneshot;

/// Headers per chunk in `blockchain.block.get_chunk`.
const CHUNK: u64 = 2016;

/// Route a method the router has no special case for.
pub fn route(router: &Router, method: &str, params: &str, responder: Responder) {
    let args: Option<Vec<Value>> = match method {
        "blockchain.block.get_header"
        | "blockchain.block.get_chunk"
        | "blockchain.transaction.get" => serde_json::from_str(params).ok(),
        _ => None,
    };
    match (method, args.as_deref()) {
        ("blockchain.block.get_header", Some([h, ..])) => {
            let Some(height) = h.as_u64() else {
                return responder.fail(bad_height(h));
            };
            translate(
                router,
                "blockchain.block.header",
                format!("[{height}]"),
                responder,
                move |raw| {
                    let hex: String = serde_json::from_str(raw).map_err(|_| unexpected(raw))?;
                    header::render(HeaderForm::Deserialized, height, &hex)
                        .map_err(|e| RpcError::new(ErrorCode::InternalError, e))
                },
            );
        }
        ("blockchain.block.get_chunk", Some([i, ..])) => {
            let Some(index) = i.as_u64() else {
                return responder.fail(bad_height(i));
            };
            translate(
                router,
                "blockchain.block.headers",
                format!("[{},{}]", index * CHUNK, CHUNK),
                responder,
                |raw| {
                    #[derive(serde::Deserialize)]
                    struct Headers {
                        hex: String,
                    }
                    let h: Headers = serde_json::from_str(raw).map_err(|_| unexpected(raw))?;
                    Ok(jsonrpc::quote(&h.hex))
                },
            );
        }
        // Protocol 1.0: the second argument was the height, not `verbose`.
        ("blockchain.transaction.get", Some([txid, h])) if h.is_number() => {
            let params = format!("[{}]", txid);
            router.forward(method, &params, responder, None);
        }
        _ => router.forward(method, params, responder, None),
    }
}

fn bad_height(v: &Value) -> RpcError {
    RpcError::new(ErrorCode::InvalidParams, format!("invalid height: {v}"))
}

fn unexpected(raw: &str) -> RpcError {
    let shown: String = raw.chars().take(80).collect();
    RpcError::new(
        ErrorCode::InternalError,
        format!("unexpected upstream answer: {shown}"),
    )
}

/// Forward `method` upstream and turn its result into the legacy form with
/// `convert`; upstream errors are relayed unchanged.
fn translate<F>(router: &Router, method: &str, params: String, responder: Responder, convert: F)
where
    F: FnOnce(&str) -> Result<String, RpcError> + Send + 'static,
{
    let (tx, rx) = oneshot::channel();
    router.forward(method, &params, Responder::Internal(tx), None);
    tokio::spawn(async move {
        match rx.await {
            Ok(Ok(Answer::Result(raw))) => match convert(raw.get()) {
                Ok(text) => responder.deliver_text(&text),
                Err(e) => responder.fail(e),
            },
            Ok(Ok(Answer::Error(e))) => responder.deliver(Err(&e)),
            Ok(Err(e)) => responder.fail(e),
            Err(_) => responder.fail(RpcError::new(ErrorCode::InternalError, "request dropped")),
        }
    });
}
