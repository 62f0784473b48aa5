//! How many requests one upstream connection may have written and
//! unanswered: learned from its answer times, not configured by hand.
//!
//! Owns: the limiter ([`Limiter`], pure and unit-tested) each connection
//! actor feeds with its answer times. It does not queue anything: the
//! connection stops writing at the limit and the pool, seeing requests wait
//! in the proxy, opens another connection.
//!
//! Why: ElectrumX runs at most `INITIAL_CONCURRENT` (10) requests of a
//! session at a time, fewer as the session's cost rises, and makes each one
//! sleep once past its soft limit. Requests written beyond that wait inside
//! the upstream, where nothing else can take them. So the limiter starts
//! at that 10 and follows what the upstream actually serves, Vegas style:
//!
//! - `base`: the shortest answer time seen over the last one or two windows
//!   of [`WINDOW`] answers (what an answer costs with no queue);
//! - each *round* (as many answers as the limit) yields its mean answer
//!   time `recent`, and the requests that were waiting upstream rather than
//!   being served are estimated as `queued = limit × (recent − base −
//!   SLACK) / recent`;
//! - `queued` below [`ALPHA`] and the connection was kept full during the
//!   round: one more (answers do not slow down as it fills); above
//!   [`BETA`]: fewer, by the excess over `BETA` halved (at least one);
//!   between: unchanged;
//! - an upstream's "busy" answer (ElectrumX's -101 / -102) halves it.
//!
//! Until answers queue in [`SETTLE_ROUNDS`] rounds in a row, the limit
//! doubles each full round instead of growing by one (a slow start), and
//! the limiter is not yet *settled*: the pool opens another connection
//! only for a connection whose limit is settled (answers queued round
//! after round, the upstream said busy, or the ceiling is reached). One
//! slow round is not enough: a burst of new sessions, a page fault, a busy
//! moment of the proxy's own make single rounds look queued. A connection still finding its limit is not full, it is
//! learning: an upstream that serves everything at once (a loopback mock,
//! a server without per-session limits) then carries the load on few
//! connections, each write carrying many requests, and one that meters
//! its sessions gets more of them as soon as its answers say so.
//!
//! Slower answers alone never take the limit below [`INITIAL`]: ElectrumX
//! 2.0 holds replies while less than 1 KiB of them waits on a session,
//! until a second after its previous send (its traffic-analysis padding),
//! so on a connection carrying few requests answers get *slower* as the
//! limit falls. Measured against two ElectrumX at their default limits
//! (`interop/defaults_pass.py`): a limiter free to go lower read the hold
//! as a queue, fell to one or two per connection, opened a connection per
//! wallet and served 10 answers a second. Below 10 ElectrumX is throttling
//! the session (its concurrency falls only past the soft limit), which
//! shows as busy answers and in `throttle`, and moves load elsewhere.
//!
//! It stays within `[1, ceiling]`, the ceiling being the upstream's
//! `max_in_flight`. [`SLACK`] keeps jitter and queues shorter than a wallet
//! would notice from reading as a queue, and twice the proxy's own scheduling lag (see
//! `lag`, given with [`Limiter::set_noise`]) the time an answer waits in
//! its socket for a busy proxy to read it.

use std::time::Duration;

/// Where a limit starts: what ElectrumX grants a fresh session.
pub const INITIAL: usize = 10;
/// Answers per window of the `base` answer time.
pub const WINDOW: u32 = 500;
/// Queued requests below which the limit grows.
pub const ALPHA: f64 = 2.0;
/// Queued requests above which the limit shrinks.
pub const BETA: f64 = 4.0;
/// Rounds in a row whose answers queued before the limit counts as settled.
pub const SETTLE_ROUNDS: u32 = 3;
/// Answer-time differences below this are noise, not a queue: a loopback
/// upstream's jitter, a busy machine's scheduling (both proxy and upstream
/// wait for a core), a queue too short for a wallet to notice. What more
/// sessions buy from ElectrumX is escaping its sleeps (2.5 s by default)
/// and reply hold (up to 1 s), not a millisecond.
pub const SLACK: Duration = Duration::from_millis(2);

/// The learned in-flight limit of one connection.
#[derive(Debug, Clone)]
pub struct Limiter {
    limit: usize,
    ceiling: usize,
    /// Shortest answer time of the current and the previous window (s).
    window_min: f64,
    prev_min: f64,
    window_n: u32,
    /// This round: answers, their summed time, whether the connection was
    /// full at some answer.
    round_n: usize,
    round_sum: f64,
    round_full: bool,
    /// Whether answers have queued (or the upstream said busy) since the
    /// connection opened: the slow start is over.
    queued_once: bool,
    /// Rounds in a row whose answers queued.
    queued_rounds: u32,
    /// See the module doc.
    settled: bool,
    /// Answer-time differences below this are noise (at least [`SLACK`]).
    noise: f64,
}

impl Limiter {
    pub fn new(ceiling: usize) -> Limiter {
        let ceiling = ceiling.max(1);
        Limiter {
            limit: INITIAL.min(ceiling),
            ceiling,
            window_min: f64::INFINITY,
            prev_min: f64::INFINITY,
            window_n: 0,
            round_n: 0,
            round_sum: 0.0,
            round_full: false,
            queued_once: false,
            queued_rounds: 0,
            settled: INITIAL >= ceiling,
            noise: SLACK.as_secs_f64(),
        }
    }

    /// The proxy's own scheduling lag now: answer times within twice it of
    /// the base are not a queue (see the module doc).
    pub fn set_noise(&mut self, lag: Duration) {
        self.noise = SLACK.max(lag * 2).as_secs_f64();
    }

    /// Whether the limit is where answers queue (or at its ceiling), so that
    /// requests beyond it need another connection (see the module doc).
    pub fn settled(&self) -> bool {
        self.settled
    }

    pub fn limit(&self) -> usize {
        self.limit
    }

    /// The answer time with no queue, as far as it is known (seconds).
    pub fn base(&self) -> Option<f64> {
        let b = self.window_min.min(self.prev_min);
        b.is_finite().then_some(b)
    }

    /// One answer took `rtt`; `in_flight` requests were written and
    /// unanswered when it arrived (itself included). Returns the new limit
    /// when it changed.
    pub fn on_answer(&mut self, rtt: Duration, in_flight: usize) -> Option<usize> {
        let rtt = rtt.as_secs_f64();
        self.window_min = self.window_min.min(rtt);
        self.window_n += 1;
        if self.window_n >= WINDOW {
            self.prev_min = self.window_min;
            self.window_min = f64::INFINITY;
            self.window_n = 0;
        }
        self.round_n += 1;
        self.round_sum += rtt;
        self.round_full |= in_flight >= self.limit;
        if self.round_n < self.limit {
            return None;
        }
        let recent = self.round_sum / self.round_n as f64;
        let full = self.round_full;
        self.round_n = 0;
        self.round_sum = 0.0;
        self.round_full = false;
        let base = self.base()?;
        let queued = if recent > 0.0 {
            self.limit as f64 * ((recent - base - self.noise).max(0.0) / recent)
        } else {
            0.0
        };
        let old = self.limit;
        if queued < ALPHA {
            self.queued_rounds = 0;
            if full {
                let step = if self.queued_once { 1 } else { self.limit };
                self.limit = (self.limit + step).min(self.ceiling);
            }
            self.settled = self.limit >= self.ceiling;
        } else if queued > BETA {
            self.queued();
            // Answer times alone never take it below what ElectrumX grants
            // a fresh session (see the module doc); a busy answer can.
            let floor = INITIAL.min(self.ceiling).min(old);
            let cut = (((queued - BETA) / 2.0).ceil() as usize).max(1);
            self.limit = self.limit.saturating_sub(cut).max(floor);
        } else {
            self.queued();
        }
        (self.limit != old).then_some(self.limit)
    }

    /// This round's answers queued: settled after enough such rounds.
    fn queued(&mut self) {
        self.queued_rounds += 1;
        if self.queued_rounds >= SETTLE_ROUNDS {
            self.queued_once = true;
            self.settled = true;
        }
    }

    /// The upstream said it is busy: halve. Returns the new limit.
    pub fn on_busy(&mut self) -> usize {
        self.limit = (self.limit / 2).max(1);
        self.queued_once = true;
        self.settled = true;
        self.round_n = 0;
        self.round_sum = 0.0;
        self.round_full = false;
        self.limit
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    /// Feed `rounds` rounds of answers from an upstream that serves
    /// `concurrency` requests at a time, each taking `service`, with the
    /// connection kept full at the limit (a closed loop).
    fn drive(l: &mut Limiter, concurrency: usize, service: Duration, rounds: usize) {
        for _ in 0..rounds {
            let limit = l.limit();
            // With `limit` written and `concurrency` served at a time, an
            // answer waits for the ones ahead of it.
            let waves = limit.div_ceil(concurrency) as u32;
            for i in 0..limit {
                let wave = (i / concurrency) as u32 + 1;
                let rtt = service * wave.min(waves);
                l.on_answer(rtt, limit);
            }
        }
    }

    #[test]
    fn starts_at_what_electrumx_grants_and_stays_under_the_ceiling() {
        assert_eq!(Limiter::new(256).limit(), 10);
        assert_eq!(Limiter::new(4).limit(), 4);
        let mut l = Limiter::new(12);
        drive(&mut l, 1000, 10 * MS, 50);
        assert_eq!(l.limit(), 12, "answers never slow: grows to the ceiling");
    }

    #[test]
    fn grows_while_answers_do_not_slow_down() {
        let mut l = Limiter::new(256);
        drive(&mut l, 1000, 10 * MS, 30);
        assert!(l.limit() > 30, "{}", l.limit());
    }

    #[test]
    fn settles_near_the_upstream_concurrency() {
        // ElectrumX at a raised cost: 4 at a time. Requests beyond that
        // queue upstream, answers slow down, the limit comes down to it.
        let mut l = Limiter::new(256);
        // It does not grow past the 10 it starts at...
        drive(&mut l, 4, 10 * MS, 200);
        assert_eq!(l.limit(), 10);
        // ...and from a high start it comes down to 10, no lower on answer
        // times alone (ElectrumX's reply hold, see the module doc).
        let mut l = Limiter::new(256);
        drive(&mut l, 1000, 10 * MS, 60);
        assert!(l.limit() > 40);
        drive(&mut l, 4, 10 * MS, 400);
        assert_eq!(l.limit(), 10);
        // Below 10 only after a busy answer; from there it grows back
        // while answers allow, not past where they queue.
        assert_eq!(l.on_busy(), 5);
        drive(&mut l, 4, 10 * MS, 50);
        assert!((5..=10).contains(&l.limit()), "{}", l.limit());
    }

    #[test]
    fn settled_once_answers_queue_and_not_while_they_do_not() {
        // An upstream that serves everything at once: the limit doubles
        // to the ceiling, and is settled only there.
        let mut l = Limiter::new(256);
        drive(&mut l, 1000, 10 * MS, 3);
        assert!(!l.settled() && l.limit() >= 40, "{}", l.limit());
        drive(&mut l, 1000, 10 * MS, 10);
        assert!(l.settled() && l.limit() == 256);
        // One serving 4 at a time: settled after SETTLE_ROUNDS rounds
        // queued in a row, at 10.
        let mut l = Limiter::new(256);
        drive(&mut l, 4, 10 * MS, SETTLE_ROUNDS as usize - 1);
        assert!(!l.settled());
        drive(&mut l, 4, 10 * MS, 1);
        assert!(l.settled() && l.limit() == 10);
        // A slow round now and then is not a queue.
        let mut l = Limiter::new(256);
        for _ in 0..20 {
            drive(&mut l, 4, 10 * MS, 1);
            drive(&mut l, 1000, 10 * MS, 1);
        }
        assert!(!l.settled());
        // A busy answer settles it too.
        let mut l = Limiter::new(256);
        assert!(!l.settled());
        l.on_busy();
        assert!(l.settled());
    }

    #[test]
    fn the_proxys_own_lag_is_not_a_queue() {
        // A busy proxy reads answers 3 ms late, whatever the upstream does:
        // told so, the limiter still grows; not told, it reads a queue.
        let late = |l: &mut Limiter| {
            for i in 0..2000u64 {
                let rtt = Duration::from_micros(100 + (i % 7) * 500);
                l.on_answer(rtt, l.limit());
            }
        };
        let mut told = Limiter::new(256);
        told.set_noise(Duration::from_millis(2));
        assert_eq!(told.noise, 0.004);
        late(&mut told);
        assert_eq!(told.limit(), 256);
        let mut blind = Limiter::new(256);
        blind.noise = Duration::from_micros(500).as_secs_f64();
        late(&mut blind);
        assert!(blind.settled() && blind.limit() < 256, "{}", blind.limit());
    }

    #[test]
    fn an_idle_connection_does_not_grow() {
        let mut l = Limiter::new(256);
        for _ in 0..1000 {
            l.on_answer(10 * MS, 1);
        }
        assert_eq!(l.limit(), 10);
    }

    #[test]
    fn busy_halves_and_jitter_is_not_a_queue() {
        let mut l = Limiter::new(256);
        assert_eq!(l.on_busy(), 5);
        assert_eq!(l.on_busy(), 2);
        assert_eq!(l.on_busy(), 1);
        assert_eq!(l.on_busy(), 1);
        // Loopback answers in 50-250 us: under SLACK, so it grows.
        let mut l = Limiter::new(64);
        for i in 0..5000u64 {
            l.on_answer(Duration::from_micros(50 + (i * 37) % 200), l.limit());
        }
        assert_eq!(l.limit(), 64);
    }
}
