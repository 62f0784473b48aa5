//! Reading a [`Snapshot`] from the live state, at one moment.
//!
//! Owns: where each figure comes from: each coin's pool (`Pool::status`,
//! the health rules it judges by), hub and cache counters, the metric
//! families counted where things happen (sessions by transport, errors,
//! requests, upstream latency), the limits and the event log. It keeps no
//! state but the sampler's baselines. The Prometheus refresh
//! (`admin::scrape`) writes the metrics from the same snapshot, so the
//! page and `/metrics` cannot disagree.

use super::sampler::{Buckets, Counts};
use super::snapshot::*;
use super::{CoinSource, Status};
use prometheus::core::{Collector, Metric};
use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

/// Every series of a metric family, as (labels, value) for one coin.
fn series(c: &dyn Collector, coin: &str) -> Vec<(BTreeMap<String, String>, f64)> {
    let mut out = Vec::new();
    for family in c.collect() {
        for m in family.get_metric() {
            let labels: BTreeMap<String, String> = m
                .get_label()
                .iter()
                .map(|l| (l.name().to_string(), l.value().to_string()))
                .collect();
            if labels.get("coin").map(String::as_str) != Some(coin) {
                continue;
            }
            let value = if family.get_field_type() == prometheus::proto::MetricType::GAUGE {
                m.get_gauge().get_value()
            } else {
                m.get_counter().get_value()
            };
            out.push((labels, value));
        }
    }
    out
}

/// A histogram's buckets.
pub(super) fn buckets(h: &prometheus::Histogram) -> Buckets {
    let m = h.metric();
    let h = m.get_histogram();
    Buckets {
        bounds: h.get_bucket().iter().map(|b| b.upper_bound()).collect(),
        cumulative: h
            .get_bucket()
            .iter()
            .map(|b| b.cumulative_count())
            .collect(),
        count: h.get_sample_count(),
    }
}

fn ratio(hits: u64, all: u64) -> Option<f64> {
    (all > 0).then(|| hits as f64 / all as f64)
}

fn ms(seconds: Option<f64>) -> Option<f64> {
    seconds.map(|s| (s * 1e6).round() / 1e3)
}

impl Status {
    /// Read everything once.
    pub fn snapshot(&self) -> Snapshot {
        // New limit hits become events now, so a snapshot shows them.
        self.record_refusals();
        let now = Instant::now();
        let baseline = self.sampler.baseline(now);
        let window = baseline
            .as_ref()
            .map(|(age, _)| *age)
            .unwrap_or(Duration::ZERO);
        let base = baseline.as_ref().map(|(_, c)| c.as_ref());
        let coins: Vec<CoinView> = self
            .coins
            .iter()
            .map(|(name, source)| self.coin_view(name, source, base))
            .collect();
        let missing: Vec<String> = coins
            .iter()
            .filter(|c| !c.ready)
            .map(|c| c.name.clone())
            .collect();
        let limits = self.limits.config();
        let draining = self.metrics.draining.get() != 0;
        Snapshot {
            server: self.server_name.clone(),
            now_ms: super::events::now_ms(),
            started_ms: self.started_ms,
            ready: !draining && missing.is_empty(),
            draining,
            coins_without_upstream: missing,
            connections: Connections {
                open: self.limits.open_connections(),
                max: limits.max_sessions,
                groups: self.limits.groups(),
            },
            window_secs: (window.as_secs_f64() * 10.0).round() / 10.0,
            coins,
            events: self.metrics.journal.recent(),
        }
    }

    fn coin_view(&self, name: &str, source: &CoinSource, base: Option<&Counts>) -> CoinView {
        let router = &source.router;
        let m = &self.metrics;
        let rules = router.pool.rules();
        let statuses = router.pool.status();
        let best = statuses
            .iter()
            .filter(|u| u.ready_connections > 0)
            .map(|u| u.height)
            .max()
            .unwrap_or(0);
        let upstreams = statuses
            .iter()
            .map(|u| {
                let lag = (u.ready_connections > 0 && u.height > 0)
                    .then(|| best.saturating_sub(u.height));
                let failure = m.journal.failure(name, &u.url);
                let (state, reason) = judge(u, lag, &rules, failure.as_ref());
                let hist = buckets(&m.upstream_seconds.with_label_values(&[name, &u.url]));
                let recent =
                    hist.since(base.and_then(|b| b.latency.get(&(name.into(), u.url.clone()))));
                UpstreamView {
                    url: u.url.clone(),
                    state,
                    reason,
                    up: u.healthy,
                    backup: u.backup,
                    height: u.height,
                    lag,
                    max_lag: rules.max_lag,
                    protocol: u.info.protocol.clone(),
                    server_version: u.info.server_version.clone(),
                    protocol_max: u.info.protocol_max.clone(),
                    levels: u.levels.iter().fold(BTreeMap::new(), |mut by, l| {
                        *by.entry(l.to_string()).or_insert(0) += 1;
                        by
                    }),
                    connections: u.ready_connections,
                    slots_active: u.connections,
                    in_flight: u.in_flight,
                    in_flight_limit: u.in_flight_limit,
                    throttled: u.throttled,
                    latency: Latency {
                        count: recent.count,
                        p50_ms: ms(recent.quantile(0.5)),
                        p90_ms: ms(recent.quantile(0.9)),
                        p99_ms: ms(recent.quantile(0.99)),
                    },
                    requests: hist.count,
                    failures: failure.as_ref().map(|f| f.count).unwrap_or(0),
                    last_failure: failure,
                }
            })
            .collect::<Vec<_>>();

        let mut by_transport = BTreeMap::new();
        for (labels, v) in series(&m.sessions_open, name) {
            by_transport.insert(labels["transport"].clone(), v as i64);
        }
        let mut by_protocol = BTreeMap::new();
        for (labels, v) in series(&m.sessions_by_level, name) {
            by_protocol.insert(labels["level"].clone(), v as i64);
        }
        let mut errors = BTreeMap::new();
        for (labels, v) in series(&m.errors, name) {
            if v > 0.0 {
                errors.insert(labels["kind"].clone(), v as u64);
            }
        }
        let requests = series(&m.requests, name)
            .iter()
            .map(|(_, v)| *v as u64)
            .sum();

        let stats = &router.hub.stats;
        let cs = &router.cache.stats;
        let cache_now = [
            cs.hits.load(Ordering::Relaxed),
            cs.misses.load(Ordering::Relaxed),
            cs.coalesced.load(Ordering::Relaxed),
        ];
        let cache_base = base
            .and_then(|b| b.cache.get(name))
            .copied()
            .unwrap_or_default();
        let recent: Vec<u64> = (0..3)
            .map(|i| cache_now[i].saturating_sub(cache_base[i]))
            .collect();
        CoinView {
            name: name.to_string(),
            ready: upstreams.iter().any(|u| u.up),
            tip_height: stats.tip_height.load(Ordering::Relaxed),
            listeners: source
                .listeners
                .iter()
                .map(|(scheme, addr)| ListenerView {
                    transport: scheme.to_string(),
                    addr: addr.to_string(),
                })
                .collect(),
            sessions: Sessions {
                open: by_transport.values().sum(),
                by_transport,
                by_protocol,
            },
            subscriptions: Subscriptions {
                upstream: stats.upstream_subscriptions.load(Ordering::Relaxed),
                session: stats.session_subscriptions.load(Ordering::Relaxed),
                held: stats.held_statuses.load(Ordering::Relaxed),
                parked_reads: stats.parked_reads.load(Ordering::Relaxed),
                outpoint: stats.outpoints.load(Ordering::Relaxed),
                outpoint_emulated: stats.outpoints_emulated.load(Ordering::Relaxed),
                by_form: crate::hub::FORM_KINDS
                    .iter()
                    .zip(&stats.session_forms)
                    .map(|(f, n)| (f.to_string(), n.load(Ordering::Relaxed)))
                    .collect(),
                max_total: source.max_subscriptions_total,
                max_per_session: router.max_subs_per_session,
            },
            cache: CacheView {
                hits: cache_now[0],
                misses: cache_now[1],
                coalesced: cache_now[2],
                hit_rate: ratio(cache_now[0], cache_now.iter().sum()),
                recent_hit_rate: ratio(recent[0], recent.iter().sum()),
                entries: router.cache.len(),
                bytes: router.cache.bytes(),
                max_bytes: source.cache_max_bytes,
                reorgs: cs.reorgs.load(Ordering::Relaxed),
            },
            requests,
            errors,
            notifications: stats.notifications.load(Ordering::Relaxed),
            upstreams,
        }
    }
}
