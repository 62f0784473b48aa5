//! Figures over a recent window, from counters that only grow.
//!
//! Owns: the samples of cumulative counters (upstream latency histograms,
//! cache results) taken every [`EVERY`] and kept for [`WINDOW`], so the page
//! can show latency percentiles and a cache hit rate over the last minute
//! instead of since start (a p99 over three weeks says nothing about now);
//! the last-seen limit counters, whose increases become `refusals` events;
//! and the quantile estimate over histogram buckets.
//!
//! Nothing here is on a request path: it reads the same counters Prometheus
//! scrapes, every few seconds and when a snapshot is taken.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How often the counters are sampled.
pub const EVERY: Duration = Duration::from_secs(10);
/// How far back "recent" figures reach.
pub const WINDOW: Duration = Duration::from_secs(60);

/// A histogram's cumulative buckets (upper bounds without `+Inf`) and its
/// total count (which includes the `+Inf` bucket).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Buckets {
    pub bounds: Vec<f64>,
    pub cumulative: Vec<u64>,
    pub count: u64,
}

impl Buckets {
    /// What was added since `base` (a sample of the same histogram).
    pub fn since(&self, base: Option<&Buckets>) -> Buckets {
        let Some(base) = base.filter(|b| b.bounds == self.bounds) else {
            return self.clone();
        };
        Buckets {
            bounds: self.bounds.clone(),
            cumulative: self
                .cumulative
                .iter()
                .zip(&base.cumulative)
                .map(|(a, b)| a.saturating_sub(*b))
                .collect(),
            count: self.count.saturating_sub(base.count),
        }
    }

    /// The `q` quantile (0..1) in the unit of the bounds, interpolated
    /// linearly inside the bucket it falls in (as Prometheus'
    /// `histogram_quantile` does); `None` without observations. Past the
    /// last bound it is that bound (the estimate cannot say more).
    pub fn quantile(&self, q: f64) -> Option<f64> {
        if self.count == 0 {
            return None;
        }
        let rank = q * self.count as f64;
        let mut lower = 0.0;
        let mut below = 0u64;
        for (bound, cum) in self.bounds.iter().zip(&self.cumulative) {
            if *cum as f64 >= rank && *cum > below {
                let inside = (*cum - below) as f64;
                return Some(lower + (bound - lower) * ((rank - below as f64) / inside));
            }
            lower = *bound;
            below = *cum;
        }
        self.bounds.last().copied()
    }
}

/// One sample of the counters a window is computed over.
#[derive(Debug, Default)]
pub struct Counts {
    /// (coin, upstream) -> its request latency histogram.
    pub latency: HashMap<(String, String), Buckets>,
    /// coin -> cache results `[hit, miss, coalesced]`.
    pub cache: HashMap<String, [u64; 3]>,
}

/// The samples of the last [`WINDOW`] and the last-seen limit counters.
#[derive(Default)]
pub struct Sampler {
    samples: Mutex<VecDeque<(Instant, Arc<Counts>)>>,
    /// (coin, limit) -> `limit_hits_total` when last looked at.
    limits_seen: Mutex<HashMap<(String, String), u64>>,
}

impl Sampler {
    /// Keep a sample taken at `at`, dropping those older than the window.
    pub fn push(&self, at: Instant, counts: Counts) {
        let mut s = self.samples.lock().unwrap_or_else(|p| p.into_inner());
        s.push_back((at, Arc::new(counts)));
        while s
            .front()
            .is_some_and(|(t, _)| at.saturating_duration_since(*t) > WINDOW)
        {
            s.pop_front();
        }
    }

    /// The oldest sample within the window and its age: what "recent"
    /// figures are counted from. `None` before the first sample (then
    /// figures count from the start).
    pub fn baseline(&self, now: Instant) -> Option<(Duration, Arc<Counts>)> {
        let s = self.samples.lock().unwrap_or_else(|p| p.into_inner());
        s.iter()
            .find(|(t, _)| now.saturating_duration_since(*t) <= WINDOW)
            .map(|(t, c)| (now.saturating_duration_since(*t), c.clone()))
    }

    /// Given every `(coin, limit, count)` now, what grew since the last
    /// call: `(coin, limit, increase)` for each that did.
    pub fn limit_increases(&self, now: Vec<(String, String, u64)>) -> Vec<(String, String, u64)> {
        let mut seen = self.limits_seen.lock().unwrap_or_else(|p| p.into_inner());
        let mut grew = Vec::new();
        for (coin, limit, count) in now {
            let last = seen.entry((coin.clone(), limit.clone())).or_insert(0);
            if count > *last {
                grew.push((coin, limit, count - *last));
            }
            *last = count;
        }
        grew
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn buckets(cumulative: &[u64], count: u64) -> Buckets {
        Buckets {
            bounds: vec![0.001, 0.01, 0.1, 1.0],
            cumulative: cumulative.to_vec(),
            count,
        }
    }

    #[test]
    fn quantiles_interpolate_inside_the_bucket() {
        let b = buckets(&[0, 100, 100, 100], 100);
        // Every observation in (1 ms, 10 ms]: the median is half-way.
        let p50 = b.quantile(0.5).unwrap();
        assert!((p50 - 0.0055).abs() < 1e-9, "{p50}");
        let b = buckets(&[50, 90, 99, 100], 100);
        assert!((b.quantile(0.5).unwrap() - 0.001).abs() < 1e-9);
        assert!((b.quantile(0.9).unwrap() - 0.01).abs() < 1e-9);
        assert!((b.quantile(0.99).unwrap() - 0.1).abs() < 1e-9);
        // Beyond the last bound: the last bound.
        assert_eq!(buckets(&[0, 0, 0, 0], 3).quantile(0.5), Some(1.0));
        assert_eq!(buckets(&[0, 0, 0, 0], 0).quantile(0.5), None);
    }

    #[test]
    fn a_window_counts_only_what_came_after_its_baseline() {
        let old = buckets(&[10, 10, 10, 10], 10);
        let now = buckets(&[10, 30, 30, 30], 30);
        let d = now.since(Some(&old));
        assert_eq!(d.cumulative, vec![0, 20, 20, 20]);
        assert_eq!(d.count, 20);
        assert!(d.quantile(0.5).unwrap() > 0.001);
        assert_eq!(now.since(None), now);
    }

    #[test]
    fn samples_older_than_the_window_are_dropped() {
        let s = Sampler::default();
        let t0 = Instant::now();
        assert!(s.baseline(t0).is_none());
        s.push(t0, Counts::default());
        s.push(t0 + EVERY, Counts::default());
        let (age, _) = s.baseline(t0 + EVERY).unwrap();
        assert_eq!(age, EVERY);
        s.push(t0 + WINDOW + EVERY, Counts::default());
        let (age, _) = s.baseline(t0 + WINDOW + EVERY).unwrap();
        assert_eq!(age, WINDOW);
    }

    #[test]
    fn limit_increases_are_reported_once() {
        let s = Sampler::default();
        let row = |n| vec![("c".to_string(), "rate".to_string(), n)];
        assert_eq!(s.limit_increases(row(0)), vec![]);
        assert_eq!(
            s.limit_increases(row(7)),
            vec![("c".to_string(), "rate".to_string(), 7)]
        );
        assert_eq!(s.limit_increases(row(7)), vec![]);
        assert_eq!(s.limit_increases(row(9))[0].2, 2);
    }
}
