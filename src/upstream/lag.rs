//! How late this process runs a task that is ready: the noise floor under
//! the answer times the limiter reads (see `limit`).
//!
//! An answer's time runs from the write to when the connection's task
//! reads the answer. While the proxy itself is busy (every core taken by
//! sessions and connections), an answer that has arrived waits in its
//! socket for the task's turn, and that wait reads exactly like requests
//! queueing inside the upstream: the limiter would cut the in-flight limit
//! and the pool open more connections to an upstream that has all the room
//! it wants, each carrying fewer requests per write, which costs the busy
//! proxy more CPU still (measured on the lean bench mock: 32 upstream
//! connections instead of 2, 2x the CPU per request).
//!
//! So one probe per process measures a scheduler pass, every [`PERIOD`]:
//! how long a task that yields waits before it runs again (every task
//! ready then runs first, and the I/O driver is polled). [`current`] is the
//! recent worst of those (rises at once, decays over about a second), and
//! the limiter counts as queueing only what exceeds twice it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// How often the probe measures.
pub const PERIOD: Duration = Duration::from_millis(50);

/// The process's scheduling lag (µs): shared by every runtime thread and
/// every server in the process (tests run several), the largest wins.
static LAG_US: AtomicU64 = AtomicU64::new(0);

/// The recent scheduling lag (see the module doc).
pub fn current() -> Duration {
    Duration::from_micros(LAG_US.load(Ordering::Relaxed))
}

/// Fold one measured pass into the estimate: a larger one is taken at once,
/// a smaller one moves it a tenth of the way (about a second at `PERIOD`).
fn fold(previous_us: u64, measured_us: u64) -> u64 {
    if measured_us >= previous_us {
        measured_us
    } else {
        previous_us - (previous_us - measured_us) / 10
    }
}

/// Measure until `stop` (spawned once per server).
pub async fn probe(stop: CancellationToken) {
    let mut tick = tokio::time::interval(PERIOD);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let started = Instant::now();
        tokio::task::yield_now().await;
        let measured = started.elapsed().as_micros() as u64;
        let _ = LAG_US.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |prev| {
            Some(fold(prev, measured))
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rises_at_once_and_decays_slowly() {
        assert_eq!(fold(100, 900), 900);
        assert_eq!(fold(900, 100), 820);
        let mut lag = 2_000;
        for _ in 0..60 {
            lag = fold(lag, 0);
        }
        assert!(lag < 10, "{lag}");
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_busy_runtime_shows_as_lag() {
        let stop = CancellationToken::new();
        let probe = tokio::spawn(probe(stop.clone()));
        // A task that keeps the only thread busy in 5 ms slices while
        // staying ready: the probe waits behind it.
        let busy = tokio::spawn(async {
            let until = Instant::now() + Duration::from_millis(400);
            while Instant::now() < until {
                let slice = Instant::now();
                while slice.elapsed() < Duration::from_millis(5) {
                    std::hint::spin_loop();
                }
                tokio::task::yield_now().await;
            }
        });
        busy.await.unwrap();
        assert!(current() >= Duration::from_millis(4), "{:?}", current());
        stop.cancel();
        probe.await.unwrap();
    }
}
