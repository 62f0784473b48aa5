//! What the proxy does with the answers to requests it sent for a client
//! and translates (legacy methods, protocol bridges): relay them through a
//! conversion, and the errors it answers when an upstream's answer is not
//! what was asked for or never came.

use super::{Answer, InternalReply, Responder};
use crate::jsonrpc::{ErrorCode, RpcError};

/// An upstream answered something else than the form asked for.
pub(crate) fn unexpected(raw: &str) -> RpcError {
    let shown: String = raw.chars().take(80).collect();
    RpcError::new(
        ErrorCode::InternalError,
        format!("unexpected upstream answer: {shown}"),
    )
}

/// The request was dropped before an answer came.
pub(crate) fn dropped() -> RpcError {
    RpcError::new(ErrorCode::InternalError, "request dropped")
}

/// Answer the client from an internal reply: a result through `convert`, an
/// upstream error object verbatim, the proxy's own error otherwise.
pub(crate) fn relay<F>(reply: InternalReply, responder: Responder, convert: F)
where
    F: FnOnce(&str) -> Result<String, RpcError>,
{
    match reply {
        Ok(Answer::Result(raw)) => match convert(raw.get()) {
            Ok(text) => responder.deliver_text(&text),
            Err(e) => responder.fail(e),
        },
        Ok(Answer::Error(e)) => responder.deliver(Err((&*e).into())),
        Err(e) => responder.fail(e),
    }
}
