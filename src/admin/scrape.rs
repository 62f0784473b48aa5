//! Scrape-time metrics, written from a status snapshot.
//!
//! Owns: copying the values that live in pools, hubs and caches (upstream
//! state, subscriptions, cache counts) into their Prometheus series. They
//! are written from the same [`Snapshot`] `/status.json` serves, so what a
//! scrape shows and what the page shows are one reading. Everything else
//! is counted where it happens and needs nothing here.

use crate::status::{Snapshot, Status};

/// Move a Prometheus counter up to a count kept elsewhere.
fn follow(counter: &prometheus::IntCounter, count: u64) {
    let seen = counter.get();
    if count > seen {
        counter.inc_by(count - seen);
    }
}

/// Write `snap` into the metrics of `status`.
pub fn refresh(status: &Status, snap: &Snapshot) {
    let m = &status.metrics;
    // Levels come and go with connections: only the current ones show.
    m.upstream_protocol.reset();
    for coin in &snap.coins {
        let name = coin.name.as_str();
        for u in &coin.upstreams {
            for (level, n) in &u.levels {
                m.upstream_protocol
                    .with_label_values(&[name, u.url.as_str(), level])
                    .set(*n as i64);
            }
            let labels = [name, u.url.as_str()];
            m.upstream_up.with_label_values(&labels).set(u.up as i64);
            m.upstream_height
                .with_label_values(&labels)
                .set(u.height as i64);
            m.upstream_in_flight
                .with_label_values(&labels)
                .set(u.in_flight as i64);
            m.upstream_connections
                .with_label_values(&labels)
                .set(u.connections as i64);
            m.upstream_throttled
                .with_label_values(&labels)
                .set(u.throttled as i64);
            m.upstream_in_flight_limit
                .with_label_values(&labels)
                .set(u.in_flight_limit as i64);
        }
        let subs = &coin.subscriptions;
        for (kind, n) in [
            ("upstream", subs.upstream),
            ("session", subs.session),
            ("held", subs.held),
            ("outpoint", subs.outpoint),
            ("outpoint_emulated", subs.outpoint_emulated),
        ] {
            m.subscriptions
                .with_label_values(&[name, kind])
                .set(n as i64);
        }
        for (form, n) in &subs.by_form {
            m.session_subscriptions
                .with_label_values(&[name, form])
                .set(*n as i64);
        }
        // The hub counts fan-out itself; the counter follows it.
        if let Some(source) = status.coins.get(name) {
            follow(&source.router.metrics.notifications, coin.notifications);
        }
        // So does the cache.
        let c = &coin.cache;
        for (result, n) in [
            ("hit", c.hits),
            ("miss", c.misses),
            ("coalesced", c.coalesced),
        ] {
            follow(&m.cache_requests.with_label_values(&[name, result]), n);
        }
        follow(&m.cache_reorgs.with_label_values(&[name]), c.reorgs);
        m.cache_entries
            .with_label_values(&[name])
            .set(c.entries as i64);
        m.cache_bytes.with_label_values(&[name]).set(c.bytes as i64);
    }
}
