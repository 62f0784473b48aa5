//! Scripthash statuses: `blockchain.scripthash.subscribe`, and the address
//! form (`blockchain.address.subscribe`) and the 1.7 scriptpubkey form
//! (`blockchain.scriptpubkey.subscribe`) built on the same upstream
//! subscription: a 1.4 wallet on a scripthash and a 1.7 wallet on its
//! script share one.
//!
//! Owns: the coin's scripthash entries (one per distinct scripthash, removed
//! with their last subscriber), reading statuses from answers and
//! notifications, and writing status notifications in each form.
//! Statuses are the kind the failover hold and read affinity are about (see
//! `failover` and `reads`).

use super::entry::{Entry, Value};
use super::Form;
use crate::jsonrpc;
use crate::text_keys::TextKeys;
use std::collections::HashMap;

/// The upstream methods of this kind.
pub(super) const SUBSCRIBE: &str = "blockchain.scripthash.subscribe";
/// Protocol 1.4.2; an upstream that does not know it answers an error.
pub(super) const UNSUBSCRIBE: &str = "blockchain.scripthash.unsubscribe";

/// Every scripthash subscription of one coin, by lowercase scripthash.
#[derive(Default)]
pub(super) struct Scripts {
    pub entries: HashMap<String, Entry, TextKeys>,
}

impl Scripts {
    /// Scripthashes that lost their upstream subscription and have none
    /// on its way (emulated outpoints keep an entry as subscribers do).
    pub fn orphans(&self) -> Vec<String> {
        self.entries
            .iter()
            .filter(|(_, e)| e.orphaned())
            .map(|(sh, _)| sh.clone())
            .collect()
    }
}

/// The params of the upstream subscribe.
pub(super) fn subscribe_params(sh: &str) -> String {
    format!("[{}]", jsonrpc::quote(sh))
}

/// A status from a subscribe answer: `null` or a hex string.
pub(super) fn parse_result(result: &str) -> Option<Value> {
    let status: Option<String> = serde_json::from_str(result).ok()?;
    Some(status_value(status))
}

/// The scripthash (lowercase) and status of notification params
/// (`[scripthash, status]`).
pub(super) fn parse_notification(params: &str) -> Option<(String, Value)> {
    let (sh, status) = serde_json::from_str::<(String, Option<String>)>(params).ok()?;
    Some((sh.to_ascii_lowercase(), status_value(status)))
}

fn status_value(status: Option<String>) -> Value {
    Value::Status(match status {
        Some(s) => jsonrpc::quote(&s),
        None => "null".into(),
    })
}

/// The notification line for a subscriber in `form`, given the rendered
/// status.
pub(super) fn notification(sh: &str, form: &Form, rendered: &str) -> jsonrpc::Line {
    match form {
        Form::Address(addr) => jsonrpc::notification_line(
            "blockchain.address.subscribe",
            &format!("[{},{}]", jsonrpc::quote(addr), rendered),
        ),
        // ElectrumX 2.0 names the scripthash, not the script.
        Form::ScriptPubKey => jsonrpc::notification_line(
            "blockchain.scriptpubkey.subscribe",
            &format!("[{},{}]", jsonrpc::quote(sh), rendered),
        ),
        _ => {
            jsonrpc::notification_line(SUBSCRIBE, &format!("[{},{}]", jsonrpc::quote(sh), rendered))
        }
    }
}
