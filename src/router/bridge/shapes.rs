//! Reply shapes that changed with protocol 1.6, for sessions at 1.6 or
//! later, whatever level the upstream that answers speaks.
//!
//! Owns: `blockchain.block.headers` as a `headers` list (an upstream below
//! 1.6 answers one `hex` string, cut here into equal headers), the
//! canonical mempool order of `get_mempool` and of the mempool part of
//! `get_history` (unconfirmed inputs last, then by txid: ElectrumX 2.0's
//! order, the order statuses are computed in), and `blockchain.estimatefee`
//! with the optional mode (checked as ElectrumX checks it, sent only to
//! upstreams of 1.6 or later, dropped toward older ones).
//!
//! Statuses are relayed as the upstream computed them: an upstream below
//! 1.6 may have hashed two or more unconfirmed transactions in another
//! order, and recomputing would cost a history request per status change.

use super::translate;
use crate::jsonrpc::{ErrorCode, RpcError};
use crate::protocol::V1_6;
use crate::reply::Responder;
use crate::router::Router;
use crate::upstream::{Capability, Need};
use serde_json::value::RawValue;
use serde_json::Value;

/// `blockchain.block.headers` in the 1.6 form.
pub(super) fn headers_as_list(router: &Router, params: &str, responder: Responder) {
    translate(
        router,
        "blockchain.block.headers",
        params,
        None,
        responder,
        |raw| headers_list(raw).map(|t| t.unwrap_or_else(|| raw.to_string())),
    );
}

/// A `blockchain.block.headers` result in the 1.6 form (`count`, `max`,
/// `headers`, then any checkpoint members), or `None` when it is already
/// in it (relayed byte for byte).
pub(crate) fn headers_list(raw: &str) -> Result<Option<String>, RpcError> {
    if raw.contains("\"headers\"") {
        return Ok(None);
    }
    let members: serde_json::Map<String, Value> =
        serde_json::from_str(raw).map_err(|_| crate::reply::internal::unexpected(raw))?;
    let (Some(hex), Some(count)) = (
        members.get("hex").and_then(Value::as_str),
        members.get("count").and_then(Value::as_u64),
    ) else {
        return Err(crate::reply::internal::unexpected(raw));
    };
    let count = count as usize;
    // Every header of a chain has the same length (80 bytes for Bitcoin).
    if count == 0 && !hex.is_empty() || count > 0 && hex.len() % count != 0 {
        return Err(crate::reply::internal::unexpected(raw));
    }
    let size = hex.len().checked_div(count).unwrap_or(0);
    let headers: Vec<&str> = (0..count).map(|i| &hex[i * size..(i + 1) * size]).collect();
    let mut out = format!(
        "{{\"count\":{count},\"max\":{},\"headers\":{}",
        members.get("max").cloned().unwrap_or(Value::Null),
        serde_json::to_string(&headers).expect("strings serialize")
    );
    for (k, v) in &members {
        if !matches!(k.as_str(), "hex" | "count" | "max") {
            out.push_str(&format!(
                ",{}:{v}",
                serde_json::to_string(k).expect("string")
            ));
        }
    }
    out.push('}');
    Ok(Some(out))
}

/// `get_history` / `get_mempool` with the mempool part in canonical order.
pub(super) fn in_canonical_order(
    router: &Router,
    method: &str,
    params: &str,
    responder: Responder,
) {
    let affinity = crate::router::scripthash_arg(params).map(|s| s.into_owned());
    translate(
        router,
        method,
        params,
        affinity.as_deref(),
        responder,
        |raw| Ok(canonical(raw)?.unwrap_or_else(|| raw.to_string())),
    );
}

/// A history (or mempool) list with its mempool entries in canonical
/// order, or `None` when it is in that order already.
pub(crate) fn canonical(raw: &str) -> Result<Option<String>, RpcError> {
    #[derive(serde::Deserialize)]
    struct Item {
        tx_hash: String,
        height: i64,
    }
    let items: Vec<&RawValue> =
        serde_json::from_str(raw).map_err(|_| crate::reply::internal::unexpected(raw))?;
    let mut keyed = Vec::with_capacity(items.len());
    for item in &items {
        let i: Item = serde_json::from_str(item.get())
            .map_err(|_| crate::reply::internal::unexpected(raw))?;
        keyed.push((i.height, i.tx_hash.to_ascii_lowercase(), *item));
    }
    // Confirmed entries keep the upstream's (block) order; the mempool
    // tail is sorted: height 0 before -1, then by txid.
    let first_unconfirmed = keyed
        .iter()
        .position(|(h, _, _)| *h <= 0)
        .unwrap_or(keyed.len());
    let tail = &mut keyed[first_unconfirmed..];
    let sorted = tail.is_sorted_by(|a, b| mempool_key(a) <= mempool_key(b));
    if sorted {
        return Ok(None);
    }
    tail.sort_by(|a, b| mempool_key(a).cmp(&mempool_key(b)));
    let parts: Vec<&str> = keyed.iter().map(|(_, _, r)| r.get()).collect();
    Ok(Some(format!("[{}]", parts.join(","))))
}

fn mempool_key<'a>(item: &'a (i64, String, &RawValue)) -> (bool, &'a str) {
    (item.0 != 0, item.1.as_str())
}

/// `blockchain.estimatefee(number, mode=None)`.
pub(super) fn estimatefee(router: &Router, params: &str, responder: Responder) {
    // Almost every call is `[number]`: forwarded untouched.
    if !params.contains(',') && !params.trim_start().starts_with('{') {
        return router.forward("blockchain.estimatefee", params, responder, None);
    }
    match fee_params(params) {
        Err(e) => responder.fail(e),
        Ok((number, None)) => router.forward(
            "blockchain.estimatefee",
            &format!("[{number}]"),
            responder,
            None,
        ),
        Ok((number, Some(mode))) => {
            let need = Need::at_least(V1_6);
            let with_mode = format!("[{number},\"{mode}\"]");
            if router.pool.capability(need) == Capability::Now {
                router.forward_to("blockchain.estimatefee", &with_mode, responder, None, need)
            } else {
                // No upstream takes the mode: the node's default estimate.
                router.forward(
                    "blockchain.estimatefee",
                    &format!("[{number}]"),
                    responder,
                    None,
                )
            }
        }
    }
}

/// The number (as given) and the mode (upper case) of estimatefee params.
/// ElectrumX ignores a mode that is not a string and refuses an unknown one.
fn fee_params(params: &str) -> Result<(Value, Option<String>), RpcError> {
    let (number, mode) = match serde_json::from_str::<Value>(params) {
        Ok(Value::Array(mut a)) if !a.is_empty() => {
            let mode = if a.len() > 1 {
                a.swap_remove(1)
            } else {
                Value::Null
            };
            (a.swap_remove(0), mode)
        }
        Ok(Value::Object(mut named)) if named.contains_key("number") => (
            named.remove("number").expect("present"),
            named.remove("mode").unwrap_or(Value::Null),
        ),
        _ => {
            return Err(RpcError::new(
                ErrorCode::InvalidParams,
                "expected the number of blocks as the first parameter",
            ))
        }
    };
    let mode = match mode {
        Value::String(m) => {
            let m = m.to_ascii_uppercase();
            if !matches!(m.as_str(), "CONSERVATIVE" | "ECONOMICAL") {
                return Err(RpcError::new(
                    ErrorCode::BadRequest,
                    format!("unknown estimatefee mode: {m}"),
                ));
            }
            Some(m)
        }
        _ => None,
    };
    Ok((number, mode))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_become_a_list() {
        let v14 = r#"{"hex":"aabbccdd","count":2,"max":2016}"#;
        let list: Value = serde_json::from_str(&headers_list(v14).unwrap().unwrap()).unwrap();
        assert_eq!(
            list,
            serde_json::json!({"count":2,"max":2016,"headers":["aabb","ccdd"]})
        );
        let cp = r#"{"hex":"aa","count":1,"max":2016,"root":"r","branch":["b"]}"#;
        let list: Value = serde_json::from_str(&headers_list(cp).unwrap().unwrap()).unwrap();
        assert_eq!(list["headers"], serde_json::json!(["aa"]));
        assert_eq!(list["root"], "r");
        assert!(list.get("hex").is_none());
        let empty: Value = serde_json::from_str(
            &headers_list(r#"{"hex":"","count":0,"max":2016}"#)
                .unwrap()
                .unwrap(),
        )
        .unwrap();
        assert_eq!(empty["headers"], serde_json::json!([]));
        assert_eq!(
            headers_list(r#"{"headers":[],"count":0,"max":1}"#).unwrap(),
            None
        );
        assert!(headers_list(r#"{"hex":"aab","count":2,"max":1}"#).is_err());
    }

    #[test]
    fn mempool_tail_is_sorted() {
        let a = "aa".repeat(32);
        let b = "bb".repeat(32);
        let c = "cc".repeat(32);
        let h = |t: &str, h: i64| format!(r#"{{"tx_hash":"{t}","height":{h}}}"#);
        let raw = format!("[{},{},{},{}]", h(&c, 5), h(&b, -1), h(&c, 0), h(&a, 0));
        let sorted = canonical(&raw).unwrap().unwrap();
        assert_eq!(
            sorted,
            format!("[{},{},{},{}]", h(&c, 5), h(&a, 0), h(&c, 0), h(&b, -1))
        );
        assert_eq!(canonical(&sorted).unwrap(), None);
        // Confirmed order is the upstream's, untouched.
        let confirmed = format!("[{},{}]", h(&c, 5), h(&a, 7));
        assert_eq!(canonical(&confirmed).unwrap(), None);
        assert!(canonical("{}").is_err());
    }

    #[test]
    fn estimatefee_modes() {
        assert_eq!(fee_params("[2]").unwrap(), (serde_json::json!(2), None));
        assert_eq!(
            fee_params(r#"[2, "economical"]"#).unwrap().1.as_deref(),
            Some("ECONOMICAL")
        );
        assert_eq!(fee_params("[2, 7]").unwrap().1, None);
        assert_eq!(
            fee_params(r#"{"number":3,"mode":"CONSERVATIVE"}"#)
                .unwrap()
                .1
                .as_deref(),
            Some("CONSERVATIVE")
        );
        assert_eq!(
            fee_params(r#"[2, "fast"]"#).unwrap_err().code,
            ErrorCode::BadRequest
        );
        assert_eq!(fee_params("[]").unwrap_err().code, ErrorCode::InvalidParams);
    }
}
