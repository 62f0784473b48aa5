//! The tip: `blockchain.headers.subscribe`, and the header shapes and
//! `blockchain.numblocks.subscribe` built on the same upstream
//! subscription.
//!
//! Owns: the one header entry of a coin and the last tip it reported (told
//! to the cache before any subscriber), reading tips from answers and
//! notifications, writing header notifications in each form, and the rule
//! that a session holds one header shape at a time. A tip that differs
//! after a failover is announced at once: tips are never held.

use super::actor::Actor;
use super::entry::{Entry, Value};
use super::{Form, SessionId, Topic};
use crate::header::HeaderForm;
use crate::jsonrpc;
use serde_json::value::RawValue;
use std::sync::atomic::Ordering;

/// The upstream method of this kind.
pub(super) const SUBSCRIBE: &str = "blockchain.headers.subscribe";

/// The header subscription of one coin.
#[derive(Default)]
pub(super) struct Headers {
    pub entry: Entry,
    /// The last tip any answer or notification reported.
    pub tip: Option<(u64, String)>,
}

impl Headers {
    /// What a new subscriber is answered with: the entry's value, or the
    /// last tip while the entry is (re)subscribing.
    pub fn current(&self) -> Option<Value> {
        self.entry.value.clone().or_else(|| {
            self.tip
                .clone()
                .map(|(height, hex)| Value::Tip { height, hex })
        })
    }
}

/// A tip from a subscribe answer (`{"hex":..,"height":..}`).
pub(super) fn parse_result(result: &str) -> Option<Value> {
    #[derive(serde::Deserialize)]
    struct Tip {
        height: u64,
        hex: String,
    }
    let tip: Tip = serde_json::from_str(result).ok()?;
    Some(Value::Tip {
        height: tip.height,
        hex: tip.hex,
    })
}

/// A tip from notification params (`[{"hex":..,"height":..}]`).
pub(super) fn parse_notification(params: &str) -> Option<Value> {
    let list = serde_json::from_str::<Vec<&RawValue>>(params).ok()?;
    parse_result(list.first()?.get())
}

/// The notification line for a subscriber in `form`, given the rendered tip.
pub(super) fn notification(form: &Form, rendered: &str) -> jsonrpc::Line {
    match form {
        Form::Header(HeaderForm::Height) => {
            jsonrpc::notification_line("blockchain.numblocks.subscribe", &format!("[{rendered}]"))
        }
        _ => jsonrpc::notification_line(SUBSCRIBE, &format!("[{rendered}]")),
    }
}

impl Actor {
    /// A session holds one header subscription, as on ElectrumX: subscribing
    /// again in another shape (before and after negotiating, or a 1.2 client
    /// toggling `raw`) replaces the shape instead of adding a second stream
    /// of notifications. `numblocks.subscribe` is a different method and
    /// stays apart. A waiter of the old shape is still answered in it.
    pub(super) fn replace_header_shape(&mut self, session: SessionId, shape: HeaderForm) {
        let is_shape = |h: &HeaderForm| *h != HeaderForm::Height;
        if !is_shape(&shape) {
            return;
        }
        let Some(subs) = self.sessions.get_mut(&session) else {
            return;
        };
        let stale: Vec<Form> = subs
            .keys
            .iter()
            .filter_map(|(t, f)| match (t, f) {
                (Topic::Headers, Form::Header(h)) if is_shape(h) && *h != shape => Some(f.clone()),
                _ => None,
            })
            .collect();
        for form in stale {
            subs.keys.remove(&(Topic::Headers, form.clone()));
            self.stats
                .session_subscriptions
                .fetch_sub(1, Ordering::Relaxed);
            if let Some(sub) = self.headers.entry.subscribers.get_mut(&session) {
                sub.forms.retain(|f| *f != form);
            }
        }
    }

    /// Record a new tip: the cache first (it drops what a reorg touched),
    /// then the stats.
    pub(super) fn set_tip(&mut self, height: u64, hex: &str) {
        if let Some(cache) = &self.config.cache {
            cache.on_tip(height, hex);
        }
        self.stats.tip_height.store(height, Ordering::Relaxed);
        self.headers.tip = Some((height, hex.to_string()));
    }
}
