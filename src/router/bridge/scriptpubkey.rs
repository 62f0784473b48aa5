//! `blockchain.scriptpubkey.*` (protocol 1.7) through the scripthash of the
//! script, on upstreams of any level.
//!
//! Owns: turning a script (hex) into its scripthash (sha256, byte-reversed:
//! ElectrumX's rule), and the 1.7 result shapes ElectrumX 2.0 writes:
//! `get_history` and `get_mempool` are `{"history": [...]}` (mempool in
//! canonical order), `listunspent` is `{"utxos": [...]}`, `get_balance` and
//! `subscribe` / `unsubscribe` answer as the scripthash methods do.
//! Subscriptions go to the hub in the scriptpubkey form, so a 1.4 wallet on
//! the scripthash and a 1.7 wallet on the script share one upstream
//! subscription; reads follow it like scripthash reads.

use super::{shapes, translate};
use crate::coin;
use crate::hub::{Form, Topic};
use crate::jsonrpc::{self, ErrorCode, RpcError};
use crate::reply::Responder;
use crate::router::{first_string, Router, SessionState};

pub(super) fn route(
    router: &Router,
    st: &mut SessionState,
    method: &str,
    params: &str,
    responder: Responder,
) {
    let sh = match script_param(params) {
        Ok(sh) => sh,
        Err(e) => return responder.fail(e),
    };
    let sh_params = format!("[{}]", jsonrpc::quote(&sh));
    let suffix = &method["blockchain.scriptpubkey.".len()..];
    let upstream = format!("blockchain.scripthash.{suffix}");
    match suffix {
        "subscribe" => router.subscribe(st, Topic::Script(sh), Form::ScriptPubKey, responder),
        "unsubscribe" => router.unsubscribe(st, Topic::Script(sh), Form::ScriptPubKey, responder),
        "get_balance" => router.forward(&upstream, &sh_params, responder, Some(&sh)),
        "get_history" | "get_mempool" => {
            translate(router, &upstream, &sh_params, Some(&sh), responder, |raw| {
                let list = shapes::canonical(raw)?;
                Ok(format!(
                    "{{\"history\":{}}}",
                    list.as_deref().unwrap_or(raw)
                ))
            })
        }
        "listunspent" => translate(router, &upstream, &sh_params, Some(&sh), responder, |raw| {
            Ok(format!("{{\"utxos\":{raw}}}"))
        }),
        _ => responder.fail(super::unknown(method)),
    }
}

/// The scripthash of the script in the first parameter (even-length hex,
/// as ElectrumX requires).
fn script_param(params: &str) -> Result<String, RpcError> {
    match first_string(params) {
        Some(spk) => match hex::decode(&spk) {
            Ok(script) => Ok(coin::script_hash(&script)),
            Err(_) => Err(RpcError::new(
                ErrorCode::BadRequest,
                format!("{spk} should be a hex string"),
            )),
        },
        None => Err(RpcError::new(
            ErrorCode::InvalidParams,
            "expected a scriptPubKey (hex) as the first parameter",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scripts_become_scripthashes() {
        // sha256 of the empty script, byte-reversed.
        assert_eq!(
            script_param(r#"[""]"#).unwrap(),
            "55b852781b9995a44c939b64e441ae2724b96f99c8f4fb9a141cfc9842c4b0e3"
        );
        assert_eq!(
            script_param(r#"["abc"]"#).unwrap_err().code,
            ErrorCode::BadRequest
        );
        assert_eq!(
            script_param("[]").unwrap_err().code,
            ErrorCode::InvalidParams
        );
    }
}
