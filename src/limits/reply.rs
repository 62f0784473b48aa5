//! The reply side of a session's limits: reply sizes (checked as a reply
//! is queued), and the bytes sent that the next request pays for.

use super::{CoinLimits, Limit};
use crate::jsonrpc::{self, ErrorCode, Line, RpcError};
use serde::Deserialize;
use serde_json::value::RawValue;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// The reply side of a session's limits.
#[derive(Debug)]
pub struct ReplyLimits {
    pub(super) max_bytes: usize,
    pub(super) bytes: Arc<AtomicU64>,
    pub(super) coin: Option<Arc<CoinLimits>>,
}

impl ReplyLimits {
    /// Replies over `max_bytes`, counted nowhere (unit tests).
    #[cfg(test)]
    pub fn capped(max_bytes: usize) -> ReplyLimits {
        ReplyLimits {
            max_bytes,
            bytes: Arc::new(AtomicU64::new(0)),
            coin: None,
        }
    }

    /// What to write instead of `line` when it is too large: `None` when
    /// it fits; else an error (or a batch of errors) with the same ids, or
    /// nothing (`Some(None)`) for a notification too large to relay.
    pub fn oversized(&self, line: &[u8]) -> Option<Option<Line>> {
        if line.len() <= self.max_bytes {
            return None;
        }
        if let Some(c) = &self.coin {
            c.refused(Limit::Response);
        }
        tracing::debug!(
            bytes = line.len(),
            max = self.max_bytes,
            "reply too large: replaced by an error"
        );
        Some(oversized_reply(line, self.max_bytes))
    }

    /// Count bytes written to the client (charged at its next request).
    pub fn sent(&self, n: usize) {
        self.bytes.fetch_add(n as u64, Ordering::Relaxed);
    }
}

/// The replacement of a reply line larger than `max` bytes: an error with
/// the reply's id, a batch of errors for a batch reply, nothing for a
/// notification (nobody asked for it, so nobody waits for it).
pub fn oversized_reply(line: &[u8], max: usize) -> Option<Line> {
    #[derive(Deserialize)]
    struct Member<'a> {
        #[serde(default, borrow)]
        id: Option<&'a RawValue>,
        #[serde(default, borrow)]
        method: Option<&'a RawValue>,
    }
    let err = RpcError::new(
        ErrorCode::LimitExceeded,
        format!(
            "response of {} bytes exceeds the limit of {max} bytes",
            line.len()
        ),
    );
    let text = std::str::from_utf8(line).ok();
    let first = text.and_then(|t| t.trim_start().bytes().next());
    if first == Some(b'[') {
        let members: Vec<Member> = text
            .and_then(|t| serde_json::from_str(t).ok())
            .unwrap_or_default();
        let errors: Vec<Line> = members
            .iter()
            .filter_map(|m| m.id)
            .map(|id| jsonrpc::error_line(id.get(), &err))
            .collect();
        if errors.is_empty() {
            return Some(jsonrpc::error_line(jsonrpc::NULL_ID, &err));
        }
        return Some(jsonrpc::batch_line(errors));
    }
    match text.and_then(|t| serde_json::from_str::<Member>(t).ok()) {
        Some(Member {
            id: None,
            method: Some(_),
        }) => None,
        Some(Member { id: Some(id), .. }) => Some(jsonrpc::error_line(id.get(), &err)),
        _ => Some(jsonrpc::error_line(jsonrpc::NULL_ID, &err)),
    }
}
