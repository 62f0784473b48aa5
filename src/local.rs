//! The session-level methods the proxy answers itself: `server.*`.
//!
//! Owns: the answers that describe the proxy rather than one upstream
//! (version negotiation through `protocol`, banner, donation address,
//! features, peers, ping), in the shape of the session's protocol level:
//! protocol 1.7's `server.ping(pong_len, data)` answers `{"data": ...}` and
//! its `server.features` has no `hash_function`, as ElectrumX 2.0 does. A
//! `server.ping` without an id (1.7 allows it as a notification, in both
//! directions) is accepted and gets nothing; the proxy sends clients no
//! ping notifications of its own. Nothing here reaches an upstream.

use crate::jsonrpc::{self, ErrorCode, RpcError};
use crate::protocol::{self, Negotiated, V1_7};
use crate::router::{Router, SessionState};
use serde_json::Value;

/// Longest `pong_len` a 1.7 `server.ping` may ask for (ElectrumX's default
/// `MAX_SEND`).
const MAX_PONG: u64 = 1_000_000;

/// The answer of a `server.*` method, or `None` for methods not answered
/// locally. `answered` is false for a request without an id.
pub fn answer(
    router: &Router,
    st: &mut SessionState,
    method: &str,
    params: &str,
    answered: bool,
) -> Option<Result<String, RpcError>> {
    let text = match method {
        "server.version" => {
            return Some(
                match protocol::negotiate(params, st.level, &router.info.server_name) {
                    Negotiated::Accept { level, result } => {
                        st.set_level(level);
                        Ok(result)
                    }
                    Negotiated::Refuse { error, disconnect } => {
                        if disconnect {
                            st.close = true;
                        }
                        Err(error)
                    }
                },
            )
        }
        "server.ping" if st.level.at_least(V1_7) => return Some(ping(params)),
        "server.ping" => "null".to_string(),
        "server.banner" => jsonrpc::quote(&router.info.banner),
        "server.donation_address" => jsonrpc::quote(&router.info.donation_address),
        "server.peers.subscribe" => "[]".to_string(),
        "server.add_peer" => "false".to_string(),
        "server.features" => {
            if !answered {
                return Some(Ok(String::new()));
            }
            features(router, st)
        }
        _ => return None,
    };
    Some(Ok(text))
}

/// Protocol 1.7's `server.ping(pong_len=0, data="")`: `data` must be hex
/// (odd length allowed), the answer carries `pong_len` zeros.
fn ping(params: &str) -> Result<String, RpcError> {
    let bad = |m: String| RpcError::new(ErrorCode::BadRequest, m);
    let args: Vec<Value> = match serde_json::from_str::<Value>(params) {
        Ok(Value::Array(a)) => a,
        Ok(Value::Object(mut named)) => ["pong_len", "data"]
            .iter()
            .map(|k| named.remove(*k).unwrap_or(Value::Null))
            .collect(),
        _ => Vec::new(),
    };
    let pong_len = match args.first() {
        None | Some(Value::Null) => 0,
        Some(Value::Number(n)) => n
            .as_u64()
            .ok_or_else(|| bad(format!("{n} should be a non-negative integer")))?,
        Some(Value::String(s)) => s
            .trim()
            .parse::<u64>()
            .map_err(|_| bad(format!("{s} should be a non-negative integer")))?,
        Some(other) => return Err(bad(format!("{other} should be a non-negative integer"))),
    };
    match args.get(1) {
        None | Some(Value::Null) => {}
        Some(Value::String(s)) if s.bytes().all(|b| b.is_ascii_hexdigit()) => {}
        Some(other) => return Err(bad(format!("{other} should be a hex string"))),
    }
    if pong_len > MAX_PONG {
        return Err(bad("pong_len value too high".into()));
    }
    Ok(format!(
        "{{\"data\":\"{}\"}}",
        "0".repeat(pong_len as usize)
    ))
}

fn features(router: &Router, st: &SessionState) -> String {
    let genesis = router
        .info
        .genesis_hash
        .clone()
        .or_else(|| router.pool.genesis_hash());
    let mut features = serde_json::json!({
        "hosts": serde_json::from_str::<Value>(&router.info.hosts).unwrap_or(Value::Null),
        "genesis_hash": genesis,
        "protocol_min": protocol::PROTOCOL_MIN.to_string(),
        "protocol_max": protocol::PROTOCOL_MAX.to_string(),
        "server_version": router.info.server_name,
        "hash_function": "sha256",
        "pruning": Value::Null,
        "services": [],
    });
    // Protocol 1.7 dropped it (ElectrumX 2.0 leaves it out from 1.7 on).
    if st.level.at_least(V1_7) {
        if let Some(map) = features.as_object_mut() {
            map.remove("hash_function");
        }
    }
    features.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pings_of_protocol_1_7() {
        assert_eq!(ping("[]").unwrap(), r#"{"data":""}"#);
        assert_eq!(ping("[3]").unwrap(), r#"{"data":"000"}"#);
        assert_eq!(ping(r#"[2, "abc"]"#).unwrap(), r#"{"data":"00"}"#);
        assert_eq!(ping(r#"{"pong_len":1}"#).unwrap(), r#"{"data":"0"}"#);
        for bad in ["[-1]", r#"[0, "xyz"]"#, "[1000001]", "[[1]]"] {
            assert_eq!(ping(bad).unwrap_err().code, ErrorCode::BadRequest, "{bad}");
        }
    }
}
