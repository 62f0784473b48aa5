//! Reading a request's parameters where the router needs them: the
//! scripthash of a read (in place for the usual form), the first string
//! parameter, and the header form `blockchain.headers.subscribe` asks for.

use crate::coin;
use crate::header::HeaderForm;
use crate::jsonrpc::{ErrorCode, RpcError};
use crate::protocol::{Level, Version};
use serde_json::Value;

/// The header shape a session gets from `blockchain.headers.subscribe`.
pub(super) fn header_form(level: Level, params: &str) -> HeaderForm {
    match level {
        Level::Unnegotiated => HeaderForm::Hybrid,
        Level::Modern(_) => HeaderForm::Modern,
        Level::Legacy(v) => {
            // Protocol 1.2 added `raw`: true asks for the modern form.
            let raw = v >= Version::new(1, 2)
                && serde_json::from_str::<Vec<Value>>(params)
                    .ok()
                    .and_then(|p| p.first().and_then(Value::as_bool))
                    .unwrap_or(false);
            if raw {
                HeaderForm::Modern
            } else {
                HeaderForm::Deserialized
            }
        }
    }
}

/// The scripthash a read is about (its first parameter), lowercase.
/// Every history, balance and unspent request passes here: the usual
/// `["<64 lowercase hex>", ...]` is read in place, without a JSON tree or
/// a copy; anything else takes the general path.
pub(crate) fn scripthash_arg(params: &str) -> Option<std::borrow::Cow<'_, str>> {
    match fast_scripthash(params) {
        Some(sh) => Some(sh.into()),
        None => first_string(params)
            .filter(|s| coin::is_scripthash(s))
            .map(|s| s.to_ascii_lowercase().into()),
    }
}

/// `["<64 lowercase hex>"` at the start of `params` (ASCII whitespace
/// allowed around the bracket): the scripthash, borrowed.
fn fast_scripthash(params: &str) -> Option<&str> {
    let bytes = params.as_bytes();
    let rest = bytes
        .trim_ascii_start()
        .strip_prefix(b"[")?
        .trim_ascii_start();
    let quoted = rest.get(..66)?;
    if quoted[0] != b'"' || quoted[65] != b'"' || !crate::scan::all_lower_hex(&quoted[1..65]) {
        return None;
    }
    // Every byte before it is ASCII: a character boundary.
    let start = bytes.len() - rest.len() + 1;
    params.get(start..start + 64)
}

/// The first positional parameter, when it is a string.
pub(crate) fn first_string(params: &str) -> Option<String> {
    if let Ok(v) = serde_json::from_str::<Vec<Value>>(params) {
        return v.into_iter().next().and_then(|v| match v {
            Value::String(s) => Some(s),
            _ => None,
        });
    }
    None
}

pub(super) fn scripthash_param(params: &str) -> Result<String, RpcError> {
    match first_string(params) {
        Some(sh) if coin::is_scripthash(&sh) => Ok(sh.to_ascii_lowercase()),
        Some(sh) => Err(RpcError::new(
            ErrorCode::InvalidParams,
            format!("invalid scripthash: {sh}"),
        )),
        None => Err(RpcError::new(
            ErrorCode::InvalidParams,
            "expected a scripthash as the first parameter",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_forms_follow_the_level() {
        assert_eq!(header_form(Level::Unnegotiated, "[]"), HeaderForm::Hybrid);
        assert_eq!(
            header_form(Level::Modern(Version::new(1, 4)), "[]"),
            HeaderForm::Modern
        );
        assert_eq!(
            header_form(Level::Legacy(Version::new(0, 9)), "[true]"),
            HeaderForm::Deserialized
        );
        assert_eq!(
            header_form(Level::Legacy(Version::new(1, 2)), "[true]"),
            HeaderForm::Modern
        );
        assert_eq!(
            header_form(Level::Legacy(Version::new(1, 2)), "[]"),
            HeaderForm::Deserialized
        );
    }

    #[test]
    fn scripthash_args_fast_and_general() {
        let sh = "ab".repeat(32);
        // The usual form is read in place.
        for params in [format!("[\"{sh}\"]"), format!(" [ \"{sh}\" , 1]")] {
            assert!(
                matches!(scripthash_arg(&params), Some(std::borrow::Cow::Borrowed(s)) if s == sh),
                "{params}"
            );
        }
        for params in [
            format!("[\"{sh}\"]"),
            format!(" [ \"{sh}\" , 1]"),
            format!("[\"{}\"]", sh.to_uppercase()),
            format!("[\"\\u0061b{}\"]", &sh[2..]),
        ] {
            assert_eq!(
                scripthash_arg(&params).as_deref(),
                Some(sh.as_str()),
                "{params}"
            );
        }
        for params in [
            "[]".to_string(),
            format!("[\"{}\"]", &sh[1..]),
            format!("[\"{sh}0\"]"),
            format!("{{\"scripthash\":\"{sh}\"}}"),
            format!("[\"{}xy\"]", &sh[2..]),
        ] {
            assert_eq!(scripthash_arg(&params), None, "{params}");
        }
    }

    #[test]
    fn scripthash_params() {
        let sh = "AB".repeat(32);
        assert_eq!(
            scripthash_param(&format!("[\"{sh}\"]")).unwrap(),
            "ab".repeat(32)
        );
        assert_eq!(
            scripthash_param("[\"xyz\"]").unwrap_err().code,
            ErrorCode::InvalidParams
        );
        assert_eq!(
            scripthash_param("[]").unwrap_err().code,
            ErrorCode::InvalidParams
        );
        assert_eq!(
            scripthash_param("{}").unwrap_err().code,
            ErrorCode::InvalidParams
        );
    }
}
