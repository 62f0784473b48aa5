//! Scripthash statuses: `blockchain.scripthash.subscribe`, and the address
//! form (`blockchain.address.subscribe`) built on the same upstream
//! subscription.
//!
//! Owns: the coin's scripthash entries (one per distinct scripthash, removed
//! with their last subscriber), reading statuses from answers and
//! notifications, writing status notifications in each form, and releasing
//! an upstream subscription nobody needs (`blockchain.scripthash.unsubscribe`).
//! Statuses are the kind the failover hold and read affinity are about (see
//! `failover` and `reads`).

use super::actor::Actor;
use super::entry::{Entry, Value};
use super::Form;
use crate::jsonrpc;
use crate::reply::Responder;
use crate::upstream::{ConnId, Job};
use std::collections::HashMap;
use std::sync::atomic::Ordering;
use tokio::sync::oneshot;
use tokio::time::Instant;

/// The upstream method of this kind.
pub(super) const SUBSCRIBE: &str = "blockchain.scripthash.subscribe";

/// Every scripthash subscription of one coin, by lowercase scripthash.
#[derive(Default)]
pub(super) struct Scripts {
    pub entries: HashMap<String, Entry>,
}

impl Scripts {
    /// Scripthashes that lost their upstream subscription and have none
    /// on its way.
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
        _ => {
            jsonrpc::notification_line(SUBSCRIBE, &format!("[{},{}]", jsonrpc::quote(sh), rendered))
        }
    }
}

impl Actor {
    /// Tell the upstream it may forget a scripthash (protocol 1.4.2). An
    /// upstream that does not know the method answers an error, ignored; its
    /// later notifications for it are ignored too.
    pub(super) fn release_upstream(&self, conn: ConnId, sh: &str) {
        let (tx, rx) = oneshot::channel();
        let mut job = Job::new(
            jsonrpc::request_prefix("blockchain.scripthash.unsubscribe", &subscribe_params(sh)),
            Responder::Internal(tx),
            Instant::now() + self.config.request_timeout,
        );
        job.retryable = false;
        // Keep the receiver alive until the answer arrives, or the connection
        // would skip the request as abandoned.
        if self.pool.dispatch_to(conn, job).is_ok() {
            self.stats
                .upstream_unsubscribe_requests
                .fetch_add(1, Ordering::Relaxed);
            tokio::spawn(async move {
                let _ = rx.await;
            });
        }
    }
}
