//! What an operator sees: the live state of the whole proxy, read at one
//! moment, and what recently happened.
//!
//! Owns: [`Status`], the set of sources a snapshot is read from (each coin's
//! router with its pool, hub and cache, its bound listeners, the metric
//! families, the limits, the event log); the [`Snapshot`] type that is the
//! body of `/status.json` and feeds the page and the scrape-time metrics
//! alike; the sampler task that keeps the baselines of "recent" figures and
//! turns new limit hits into `refusals` events; and the page itself
//! ([`page::PAGE`]). Serving HTTP is `admin`'s job.
//!
//! Layout: `snapshot` (the types), `read` (reading them), `events` (the
//! event log the pool, hub, limits and reloads record into), `sampler`
//! (windows over growing counters), `page` (the self-contained HTML page).
//!
//! Adding a field: declare it in `snapshot`, fill it in `read` from the
//! source its metric reads (a scrape-time metric is then written from the
//! snapshot in `admin::scrape`, never read twice), and draw it in
//! `page.html`. Adding an event: a variant of `events::EventKind` and one
//! `journal.record(kind, upstream, message)` where the thing happens, on
//! a flip, never per request. The README ("Status page") has the details.

pub mod events;
pub mod page;
mod read;
pub mod sampler;
mod snapshot;

pub use snapshot::{
    judge, CacheView, CoinView, Connections, Latency, ListenerView, Sessions, Snapshot, State,
    Subscriptions, UpstreamView,
};

use crate::config::Scheme;
use crate::limits::Limits;
use crate::metrics::Metrics;
use crate::router::Router;
use events::EventKind;
use sampler::{Counts, Sampler};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;
use tokio_util::sync::CancellationToken;

/// What the status of one coin is read from.
pub struct CoinSource {
    pub router: Arc<Router>,
    /// Bound listener addresses.
    pub listeners: Vec<(Scheme, SocketAddr)>,
    /// `max_subscriptions_total` (applied at start).
    pub max_subscriptions_total: usize,
    /// `[cache] max_bytes`, 0 when the cache is disabled.
    pub cache_max_bytes: u64,
}

/// Everything a snapshot is read from. One per running proxy.
pub struct Status {
    pub metrics: Arc<Metrics>,
    pub limits: Arc<Limits>,
    pub coins: BTreeMap<String, CoinSource>,
    pub server_name: String,
    /// Unix time in milliseconds the proxy started.
    pub started_ms: u64,
    pub sampler: Sampler,
}

/// Limits whose hits are not refusals worth an event: a paused read
/// (`in_flight`) and an idle session closed (`idle`) are normal operation.
const NOT_REFUSALS: [&str; 2] = ["in_flight", "idle"];

/// The event text of refusals by one limit (its `limit` label).
fn refusal_message(limit: &str) -> String {
    let what = match limit {
        "sessions" => "connections refused: max_sessions reached",
        "group_sessions" => "connections refused: max_sessions_per_group reached",
        "rate" => "requests refused by the rate limits",
        "abuse" => "sessions closed after max_refusals refusals in a row",
        "batch" => "batches refused: over max_batch",
        "line" => "sessions closed: line over max_line_bytes",
        "response" => "replies replaced: over max_response_bytes",
        "first_line" => "connections closed: no first line in time",
        "handshake" => "connections closed: no TLS handshake in time",
        "proxy_header" => "connections closed: PROXY header missing or bad",
        other => return format!("refused by limit {other}"),
    };
    what.to_string()
}

impl Status {
    pub fn new(
        metrics: Arc<Metrics>,
        limits: Arc<Limits>,
        coins: BTreeMap<String, CoinSource>,
        server_name: String,
    ) -> Status {
        Status {
            metrics,
            limits,
            coins,
            server_name,
            started_ms: events::now_ms(),
            sampler: Sampler::default(),
        }
    }

    /// Turn limit hits counted since the last look into `refusals` events
    /// (one per coin and limit, merged with the previous one while they
    /// keep coming).
    pub fn record_refusals(&self) {
        let counts = self.limits.hit_counts();
        for (coin, limit, n) in self.sampler.limit_increases(counts) {
            if NOT_REFUSALS.contains(&limit.as_str()) {
                continue;
            }
            self.metrics.journal.record(
                EventKind::Refusals,
                Some(&coin),
                None,
                &refusal_message(&limit),
                n,
            );
        }
    }

    /// Take one sample of the counters "recent" figures are computed over.
    pub fn sample(&self) {
        let mut counts = Counts::default();
        for (name, source) in &self.coins {
            for u in source.router.pool.status() {
                let h = self
                    .metrics
                    .upstream_seconds
                    .with_label_values(&[name, &u.url]);
                counts
                    .latency
                    .insert((name.clone(), u.url), read::buckets(&h));
            }
            let cs = &source.router.cache.stats;
            counts.cache.insert(
                name.clone(),
                [
                    cs.hits.load(Ordering::Relaxed),
                    cs.misses.load(Ordering::Relaxed),
                    cs.coalesced.load(Ordering::Relaxed),
                ],
            );
        }
        self.sampler.push(Instant::now(), counts);
        self.record_refusals();
    }

    /// Sample every [`sampler::EVERY`] until shutdown (the first at once).
    pub async fn run_sampler(self: Arc<Self>, shutdown: CancellationToken) {
        let mut tick = tokio::time::interval(sampler::EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tick.tick() => self.sample(),
            }
        }
    }
}
