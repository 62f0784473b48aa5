//! Methods old wallets still call, translated onto what modern upstreams serve.
//!
//! Owns: `blockchain.block.get_header` (from `blockchain.block.header`,
//! decoded), `blockchain.block.get_chunk` (from `blockchain.block.headers`),
//! protocol 1.0's `blockchain.transaction.get(txid, height)`,
//! `blockchain.relayfee` where an upstream dropped it (protocol 1.6), and the
//! 1.4 form of `blockchain.block.headers` (`hex`) where an upstream answers
//! the 1.6 form (`headers`): the proxy serves clients at most protocol 1.4.2,
//! whatever its upstreams speak. Anything else is forwarded unchanged.
//! Address methods and header shapes of subscriptions live in the router and
//! the hub, which serve every session alike.

use crate::header::{self, HeaderForm};
use crate::jsonrpc::{self, ErrorCode, RpcError};
use crate::protocol::V1_6;
use crate::reply::internal::{dropped, relay, unexpected};
use crate::reply::{Answer, InternalReply, Responder};
use crate::router::Router;
use crate::upstream::{Capability, Job, Need, Pool};
use serde_json::value::RawValue;
use serde_json::Value;
use std::collections::HashMap;
use std::time::Duration;
use tokio::sync::oneshot;
use tokio::time::Instant;

/// Headers per chunk in `blockchain.block.get_chunk`.
const CHUNK: u64 = 2016;

/// What `blockchain.relayfee` answers when no upstream can tell: ElectrumX's
/// and Bitcoin Core's default minimum relay fee, in coins per kB.
pub const DEFAULT_RELAY_FEE: &str = "0.00001";

/// Route a method the router has no special case for.
pub fn route(router: &Router, method: &str, params: &str, responder: Responder) {
    match method {
        "blockchain.block.get_header" => get_header(router, params, responder),
        "blockchain.block.get_chunk" => get_chunk(router, params, responder),
        "blockchain.block.headers" => translate(router, method, params, responder, |raw| {
            headers_in_1_4_form(raw).map(|text| text.unwrap_or_else(|| raw.to_string()))
        }),
        "blockchain.transaction.get" => match params_1_0_tx_get(params) {
            Some(params) => router.forward(method, &params, responder, None),
            None => router.forward(method, params, responder, None),
        },
        "blockchain.relayfee" => relay_fee(router, responder),
        _ => router.forward(method, params, responder, None),
    }
}

/// `blockchain.block.get_header(height)`: the pre-1.3 deserialized header.
fn get_header(router: &Router, params: &str, responder: Responder) {
    let height = match uint_arg(params, "height") {
        Ok(h) => h,
        Err(e) => return responder.fail(e),
    };
    translate(
        router,
        "blockchain.block.header",
        &format!("[{height}]"),
        responder,
        move |raw| {
            let hex: String = serde_json::from_str(raw).map_err(|_| unexpected(raw))?;
            header::render(HeaderForm::Deserialized, height, &hex)
                .map_err(|e| RpcError::new(ErrorCode::InternalError, e))
        },
    );
}

/// `blockchain.block.get_chunk(index)`: 2016 headers as one hex string.
fn get_chunk(router: &Router, params: &str, responder: Responder) {
    let index = match uint_arg(params, "index") {
        Ok(i) => i,
        Err(e) => return responder.fail(e),
    };
    let Some(start) = index.checked_mul(CHUNK) else {
        return responder.fail(RpcError::new(
            ErrorCode::InvalidParams,
            format!("invalid chunk index: {index}"),
        ));
    };
    translate(
        router,
        "blockchain.block.headers",
        &format!("[{start},{CHUNK}]"),
        responder,
        |raw| Ok(jsonrpc::quote(&headers_hex(raw)?)),
    );
}

/// The concatenated hex of a `blockchain.block.headers` result, from either
/// the 1.4 form (`hex`) or the 1.6 form (`headers`, a list).
fn headers_hex(raw: &str) -> Result<String, RpcError> {
    #[derive(serde::Deserialize)]
    struct Headers {
        hex: Option<String>,
        headers: Option<Vec<String>>,
    }
    match serde_json::from_str::<Headers>(raw) {
        Ok(Headers { hex: Some(hex), .. }) => Ok(hex),
        Ok(Headers {
            headers: Some(list),
            ..
        }) => Ok(list.concat()),
        _ => Err(unexpected(raw)),
    }
}

/// A `blockchain.block.headers` result in the 1.4 form, or `None` when it is
/// already in it (then it is relayed byte for byte).
fn headers_in_1_4_form(raw: &str) -> Result<Option<String>, RpcError> {
    // A 1.4 answer never carries this member name; skip parsing it.
    if !raw.contains("\"headers\"") {
        return Ok(None);
    }
    let mut members: serde_json::Map<String, Value> =
        serde_json::from_str(raw).map_err(|_| unexpected(raw))?;
    if members.contains_key("hex") {
        return Ok(None);
    }
    let hex = headers_hex(raw)?;
    members.remove("headers");
    members.insert("hex".into(), Value::String(hex));
    Ok(Some(Value::Object(members).to_string()))
}

/// Protocol 1.0's `blockchain.transaction.get(txid, height)`: the second
/// argument was the block height, not `verbose`; modern servers refuse a
/// number there (or, for 1, answer verbose JSON). Returns the params to
/// forward when they need changing.
fn params_1_0_tx_get(params: &str) -> Option<String> {
    // Most calls carry the txid alone: no need to parse them.
    if !params.contains(',') {
        return None;
    }
    let args: Vec<Value> = serde_json::from_str(params).ok()?;
    match args.as_slice() {
        [txid, h] if h.is_number() || h.is_null() => Some(format!("[{txid}]")),
        _ => None,
    }
}

/// `blockchain.relayfee`, which protocol 1.6 removed: when the upstream does
/// not know it, answer `minrelaytxfee` from `mempool.get_info` (1.6's
/// replacement), and failing that the default relay fee.
fn relay_fee(router: &Router, responder: Responder) {
    // Asked of a connection that still has the method (below 1.6) when
    // there is one: selection alone may pick a 1.6/1.7 connection.
    let below = Need::below(V1_6);
    let need = match router.pool.capability(below) {
        Capability::Now => below,
        _ => Need::ANY,
    };
    let first = ask(
        &router.pool,
        router.request_timeout,
        "blockchain.relayfee",
        "[]",
        need,
    );
    let pool = router.pool.clone();
    let timeout = router.request_timeout;
    tokio::spawn(async move {
        let reply = first.await.unwrap_or_else(|_| Err(dropped()));
        match reply {
            Ok(Answer::Error(e)) if is_method_not_found(e.get()) => {
                let info = ask(
                    &pool,
                    timeout,
                    "mempool.get_info",
                    "[]",
                    Need::at_least(V1_6),
                )
                .await;
                let fee = match info {
                    Ok(Ok(Answer::Result(raw))) => min_relay_fee(raw.get()),
                    _ => None,
                };
                responder.deliver_text(fee.as_deref().unwrap_or(DEFAULT_RELAY_FEE));
            }
            other => relay(other, responder, |raw| Ok(raw.to_string())),
        }
    });
}

/// Whether an upstream error object says the method does not exist.
fn is_method_not_found(error: &str) -> bool {
    #[derive(serde::Deserialize)]
    struct Code {
        code: Option<i64>,
    }
    serde_json::from_str::<Code>(error)
        .ok()
        .and_then(|c| c.code)
        .is_some_and(|c| c == ErrorCode::MethodNotFound.code())
}

/// The `minrelaytxfee` member of a `mempool.get_info` result, verbatim, when
/// it is a number.
fn min_relay_fee(raw: &str) -> Option<String> {
    let members: HashMap<String, Box<RawValue>> = serde_json::from_str(raw).ok()?;
    let fee = members.get("minrelaytxfee")?.get();
    match serde_json::from_str::<Value>(fee) {
        Ok(Value::Number(_)) => Some(fee.to_string()),
        _ => None,
    }
}

/// The unsigned integer parameter at position 0 or named `name`. Numeric
/// strings are accepted, as ElectrumX did.
fn uint_arg(params: &str, name: &str) -> Result<u64, RpcError> {
    let invalid =
        |v: &Value| RpcError::new(ErrorCode::InvalidParams, format!("invalid {name}: {v}"));
    let value = match serde_json::from_str::<Value>(params) {
        Ok(Value::Array(mut args)) if !args.is_empty() => args.swap_remove(0),
        Ok(Value::Object(mut named)) if named.contains_key(name) => {
            named.remove(name).expect("present")
        }
        _ => {
            return Err(RpcError::new(
                ErrorCode::InvalidParams,
                format!("expected the {name} as the first parameter"),
            ))
        }
    };
    match &value {
        Value::Number(n) => n.as_u64().ok_or_else(|| invalid(&value)),
        Value::String(s) => s.trim().parse().map_err(|_| invalid(&value)),
        _ => Err(invalid(&value)),
    }
}

/// Send one request to the pool for the proxy itself.
fn ask(
    pool: &Pool,
    timeout: Duration,
    method: &str,
    params: &str,
    need: Need,
) -> oneshot::Receiver<InternalReply> {
    let (tx, rx) = oneshot::channel();
    let mut job = Job::new(
        jsonrpc::request_prefix(method, params),
        Responder::Internal(tx),
        Instant::now() + timeout,
    );
    job.need = need;
    pool.dispatch(job);
    rx
}

/// Forward `method` upstream and turn its result into the legacy form with
/// `convert`; upstream errors are relayed unchanged.
fn translate<F>(router: &Router, method: &str, params: &str, responder: Responder, convert: F)
where
    F: FnOnce(&str) -> Result<String, RpcError> + Send + 'static,
{
    let (tx, rx) = oneshot::channel();
    router.forward(method, params, Responder::Internal(tx), None);
    tokio::spawn(async move {
        let reply = rx.await.unwrap_or_else(|_| Err(dropped()));
        relay(reply, responder, convert);
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn integer_arguments() {
        assert_eq!(uint_arg("[5]", "height"), Ok(5));
        assert_eq!(uint_arg("[\"7\", true]", "height"), Ok(7));
        assert_eq!(uint_arg("{\"height\":9}", "height"), Ok(9));
        for bad in ["[]", "{}", "[-1]", "[1.5]", "[\"x\"]", "[null]", "[[1]]"] {
            let e = uint_arg(bad, "height").unwrap_err();
            assert_eq!(e.code, ErrorCode::InvalidParams, "{bad}");
            assert!(e.message.contains("height"), "{bad}: {}", e.message);
        }
    }

    #[test]
    fn headers_of_both_protocols() {
        let v14 = r#"{"hex":"aabb","count":2,"max":2016}"#;
        let v16 = r#"{"headers":["aa","bb"],"count":2,"max":2016}"#;
        assert_eq!(headers_hex(v14).unwrap(), "aabb");
        assert_eq!(headers_hex(v16).unwrap(), "aabb");
        assert_eq!(
            headers_hex("[]").unwrap_err().code,
            ErrorCode::InternalError
        );
        // The 1.4 form passes untouched; the 1.6 form is rewritten into it.
        assert_eq!(headers_in_1_4_form(v14).unwrap(), None);
        let rewritten: Value =
            serde_json::from_str(&headers_in_1_4_form(v16).unwrap().unwrap()).unwrap();
        assert_eq!(
            rewritten,
            serde_json::json!({"hex":"aabb","count":2,"max":2016})
        );
        // Checkpoint members stay.
        let cp = r#"{"headers":["aa"],"count":1,"max":2016,"root":"r","branch":["b"]}"#;
        let rewritten: Value =
            serde_json::from_str(&headers_in_1_4_form(cp).unwrap().unwrap()).unwrap();
        assert_eq!(rewritten["root"], "r");
        assert_eq!(rewritten["hex"], "aa");
        assert!(rewritten.get("headers").is_none());
    }

    #[test]
    fn transaction_get_of_protocol_1_0() {
        let txid = "ab".repeat(32);
        assert_eq!(
            params_1_0_tx_get(&format!("[\"{txid}\", 120]")),
            Some(format!("[\"{txid}\"]"))
        );
        assert_eq!(
            params_1_0_tx_get(&format!("[\"{txid}\", null]")),
            Some(format!("[\"{txid}\"]"))
        );
        assert_eq!(params_1_0_tx_get(&format!("[\"{txid}\", true]")), None);
        assert_eq!(params_1_0_tx_get(&format!("[\"{txid}\"]")), None);
        assert_eq!(params_1_0_tx_get("{\"tx_hash\":\"x\"}"), None);
    }

    #[test]
    fn relay_fee_sources() {
        assert!(is_method_not_found(
            r#"{"code":-32601,"message":"unknown method \"blockchain.relayfee\""}"#
        ));
        assert!(!is_method_not_found(
            r#"{"code":2,"message":"daemon error"}"#
        ));
        assert!(!is_method_not_found("\"weird\""));
        assert_eq!(
            min_relay_fee(
                r#"{"mempoolminfee":3e-05,"minrelaytxfee":1e-05,"incrementalrelayfee":1e-05}"#
            ),
            Some("1e-05".to_string())
        );
        assert_eq!(min_relay_fee(r#"{"minrelaytxfee":"x"}"#), None);
        assert_eq!(min_relay_fee(r#"{"mempoolminfee":1}"#), None);
        assert_eq!(min_relay_fee("null"), None);
        let default: f64 = DEFAULT_RELAY_FEE.parse().unwrap();
        assert_eq!(default, 0.00001);
    }
}
