//! The one background loop per coin (per pool generation) that watches the
//! upstreams every `health_interval_ms`.
//!
//! Owns, each check:
//! - health: applies `health`'s rise/fall rule to what the connections
//!   report, logs each flip once, records it, and tells the hub
//!   (`PoolEvent::Up`/`Down`) so subscriptions move;
//! - throttling: an upstream whose answers have become [`SLOW_RATIO`] times
//!   its own unqueued answer time (and at least [`SLOW_EXCESS`] more) while
//!   another upstream's answers are at their usual pace gets a `slow`
//!   signal (see `throttle`); a throttled upstream clears after
//!   `throttle::HOLD` without a signal; a connection asked nothing since
//!   the last check has its recent answer time eased a fifth of the way
//!   back to its unqueued one, so selection tries it again;
//! - shrinking: an upstream whose requests have not queued for
//!   `upstream_idle_close_secs` (its load would fit in half of what its
//!   other connections take) has one extra connection retired; and when
//!   the coin has more upstream connections than client sessions, one
//!   extra connection is retired at each check until it does not. A retired
//!   connection takes no new request and closes once its answers are in
//!   (its subscriptions move like on any close). Growing is `state`'s.

use super::health::{self, Finding, HealthRules};
use super::state::PoolInner;
use super::throttle::Signal;
use super::PoolEvent;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Answers this many times slower than unqueued ones read as throttling.
pub const SLOW_RATIO: u64 = 4;
/// ... when they are also at least this much slower. ElectrumX 2.0 holds
/// a small reply up to 1 s after its previous send on the connection (its
/// padding, see the README): a connection's answers can take a second
/// longer with no throttling at all, so only more than that counts. Its
/// throttling sleeps pass it once the session is 60% of the way from the
/// soft limit to the hard one (`frac × 2.5 s`).
pub const SLOW_EXCESS: Duration = Duration::from_millis(1500);

/// Run the checks every `rules.interval` until shutdown.
pub(super) async fn run(pool: Arc<PoolInner>, rules: HealthRules, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(rules.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut watch = Watch::new(&pool);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tick.tick() => {
                check_health(&pool, &rules);
                watch.throttling(&pool);
                watch.shrink(&pool);
            }
        }
    }
}

/// What the loop remembers between checks.
struct Watch {
    /// Per slot: answers counted at the last check.
    answered: Vec<u64>,
    /// Per upstream: since when its requests have not queued.
    quiet_since: Vec<Instant>,
}

impl Watch {
    fn new(pool: &PoolInner) -> Watch {
        Watch {
            answered: vec![0; pool.slots.len()],
            quiet_since: vec![Instant::now(); pool.upstreams.len()],
        }
    }

    /// Expire throttling and look for upstreams that slow down alone.
    fn throttling(&mut self, pool: &PoolInner) {
        // Per upstream: whether its recent answers are slow, fine, or
        // there were none since the last check.
        let mut pace: Vec<Option<bool>> = vec![None; pool.upstreams.len()];
        for (i, s) in pool.slots.iter().enumerate() {
            let answered = s.shared.answered.load(Ordering::Relaxed);
            let fresh = answered > self.answered[i];
            self.answered[i] = answered;
            let rtt = s.shared.rtt_us.load(Ordering::Relaxed);
            let base = s.shared.base_us.load(Ordering::Relaxed);
            if base == 0 || !s.shared.is_ready() {
                continue;
            }
            if !fresh {
                // Asked nothing since the last check (selection avoided
                // it): its answer time drifts back toward the unqueued
                // one, so it is tried again and measured afresh.
                if rtt > base {
                    let eased = base + (rtt - base) * 4 / 5;
                    s.shared.rtt_us.store(eased, Ordering::Relaxed);
                }
                continue;
            }
            let slow = rtt >= base * SLOW_RATIO && rtt - base >= SLOW_EXCESS.as_micros() as u64;
            let p = &mut pace[s.upstream];
            *p = Some(p.unwrap_or(false) || slow);
        }
        for (i, u) in pool.upstreams.iter().enumerate() {
            u.throttle.expire();
            if pace[i] != Some(true) {
                continue;
            }
            let others_fine = pool.upstreams.iter().enumerate().any(|(j, o)| {
                j != i && pace[j] == Some(false) && o.healthy.load(Ordering::Acquire)
            });
            if others_fine {
                u.throttle.signal(
                    Signal::Slow,
                    &format!(
                        "answers {SLOW_RATIO}x slower than unqueued while another upstream's are not"
                    ),
                );
            }
        }
    }

    /// Retire extra connections that are not needed (see the module doc).
    fn shrink(&mut self, pool: &PoolInner) {
        let now = Instant::now();
        let idle = pool.settings.idle_close;
        for i in 0..pool.upstreams.len() {
            let active: Vec<_> = pool
                .slots
                .iter()
                .filter(|s| s.upstream == i && !s.top && s.shared.is_active())
                .collect();
            let demand: usize = active.iter().map(|s| s.shared.in_flight()).sum();
            let limits: Vec<usize> = active.iter().map(|s| s.shared.limit()).collect();
            let without_one = limits.iter().sum::<usize>() - limits.iter().max().unwrap_or(&0);
            if demand * 2 > without_one || !active.iter().any(|s| s.elastic) {
                self.quiet_since[i] = now;
                continue;
            }
            if now.duration_since(self.quiet_since[i]) >= idle {
                self.quiet_since[i] = now;
                pool.retire_one(
                    Some(i),
                    "requests have not queued for upstream_idle_close_secs",
                );
            }
        }
        if let Some(clients) = pool.client_sessions() {
            if pool.kept_open() > clients {
                pool.retire_one(None, "more upstream connections than client sessions");
            }
        }
    }
}

/// One health check of every upstream.
fn check_health(pool: &PoolInner, rules: &HealthRules) {
    let tips: Vec<Option<u64>> = (0..pool.upstreams.len())
        .map(|i| {
            pool.slots
                .iter()
                .filter(|s| s.upstream == i && s.shared.is_ready())
                .map(|s| s.shared.tip())
                .max()
        })
        .collect();
    let best = tips.iter().flatten().copied().max().unwrap_or(0);
    for (i, u) in pool.upstreams.iter().enumerate() {
        let finding = health::judge(tips[i], best, rules.max_lag);
        let flip = u
            .health
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .observe(finding == Finding::Ok, rules);
        let Some(now_healthy) = flip else { continue };
        u.healthy.store(now_healthy, Ordering::Release);
        match finding {
            Finding::Ok => {
                tracing::info!(coin = %pool.coin, upstream = %u.label, "upstream back in rotation")
            }
            Finding::NoConnection => {
                tracing::warn!(coin = %pool.coin, upstream = %u.label, "upstream out of rotation: no connection")
            }
            Finding::Lagging { behind, best } => tracing::warn!(
                coin = %pool.coin, upstream = %u.label, behind, best_tip = best,
                "upstream out of rotation: lagging behind the best tip"
            ),
        }
        pool.journal
            .record(finding.event_kind(), Some(&u.label), finding.to_string());
        // Whatever lives on its connections moves (or may come back).
        for s in pool
            .slots
            .iter()
            .filter(|s| s.upstream == i && s.shared.is_ready())
        {
            let conn = s.shared.conn_id();
            let ev = if now_healthy {
                PoolEvent::Up { conn }
            } else {
                PoolEvent::Down { conn }
            };
            let _ = pool.events.send(ev);
        }
    }
}
