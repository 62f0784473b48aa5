//! Read-driven subscriptions: scripthashes wallets read without
//! subscribing, subscribed by the hub itself so that their reads are
//! answered from memory between status changes (see `cache::answers`).
//!
//! Why: a subscription costs the upstream about one history read to start
//! (ElectrumX computes the status), a status computation per change it
//! notifies, a little memory, and one `blockchain.scripthash.unsubscribe`
//! to end. A scripthash read over and over without a subscription (web
//! wallets polling balances, services re-reading histories) costs a full
//! read every time. With the subscription, every read between two changes
//! is answered from memory; and its reads follow the subscription's
//! connection, so they agree with each other.
//!
//! The rules:
//! - admission on the second read: a scripthash read once is only
//!   remembered (the last `limit` of them); read again while remembered, it
//!   is subscribed. A one-off lookup costs nothing more than before;
//! - at most `limit` per coin (`[cache] read_subscriptions`), and they count
//!   against the coin's subscription limit like any other: a wallet's
//!   subscribe that finds the coin full takes the place of one;
//! - when full, the least recently read one goes (second-chance order: a
//!   scripthash read since the hub last looked is passed over once), but
//!   only if one of the next few looked at was not read since the hub last
//!   looked: when every one is being read, a newcomer is not subscribed
//!   (replacing hot subscriptions with each other would cost a subscribe
//!   and an unsubscribe per read);
//! - one not read for `idle` (`[cache] read_subscription_idle_secs`) goes;
//! - one whose subscribe fails (an error, no upstream of a level that has
//!   scripthash subscriptions) goes at once, and is not retried: the last
//!   `limit` refused scripthashes are remembered and their reads go on as
//!   plain reads (an upstream that refuses subscriptions would otherwise
//!   be asked a subscribe and an unsubscribe every second read).
//!
//! Going means: the entry loses its read-driven mark, and is dropped and
//! unsubscribed upstream (`blockchain.scripthash.unsubscribe`, protocol
//! 1.4.2; an upstream without it answers an error and keeps notifying, and
//! the hub ignores what it notifies) unless a wallet subscribed to it
//! meanwhile.
//!
//! Reads are told to the actor in batches ([`Notices`]): the router adds
//! each scripthash to a shared buffer, and only the first of a batch sends
//! a command, so a busy coin costs the actor one wake per batch rather
//! than one channel message (and one string) per read.
//!
//! Owns: [`ReadSubs`] (the remembered reads, the read-driven entries in
//! second-chance order, the idle sweep), [`Notices`] and the actor's
//! handlers for them.

use super::actor::Actor;
use super::entry::Entry;
use super::Topic;
use crate::text_keys::TextKeys;
use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;

/// How many read-driven subscriptions a newcomer may look at for one to
/// replace.
const EVICTION_LOOKS: usize = 8;

/// The read-driven subscriptions of one coin.
pub(super) struct ReadSubs {
    /// Most read-driven subscriptions (0: off).
    pub limit: usize,
    /// How long one may go unread.
    idle: Duration,
    /// Scripthashes read once (at most `limit`), each with its place in
    /// `seen_order`.
    seen: HashMap<Arc<str>, u64, TextKeys>,
    /// The order they were read in, oldest first: places of scripthashes
    /// since admitted (or read again) stay behind as stale entries, skipped
    /// when reached and swept out once they are as many as the live ones,
    /// so that an admission costs no scan of the others.
    seen_order: VecDeque<(u64, Arc<str>)>,
    /// The next place in `seen_order`.
    next_place: u64,
    /// The read-driven entries, in second-chance order.
    ring: VecDeque<String>,
    /// Scripthashes whose read-driven subscribe failed, oldest first (at
    /// most `limit`): not subscribed again while remembered.
    refused: VecDeque<String>,
    refused_set: HashSet<String, TextKeys>,
    /// When the idle sweep runs next.
    next_sweep: Instant,
    /// The batch of [`Notices`] being handled (kept for its capacity).
    batch: String,
}

/// Reads of scripthashes nobody was told a status of, not yet handled by
/// the actor: one line per read, in the order they were told. Shared by
/// the [`super::Hub`] handles (which add) and the actor (which takes the
/// whole batch when woken by `Command::Noticed`).
#[derive(Default)]
pub(super) struct Notices(Mutex<String>);

impl Notices {
    /// Add a read of `sh`; true when it starts a batch, and the actor must
    /// be woken (later ones until it takes the batch ride along).
    pub fn push(&self, sh: &str) -> bool {
        // Scripthashes are hex: a line each.
        debug_assert!(!sh.contains('\n'));
        let mut batch = lock(&self.0);
        let first = batch.is_empty();
        batch.push_str(sh);
        batch.push('\n');
        first
    }

    /// Take the batch, leaving `spare` (empty) in its place.
    fn take(&self, spare: &mut String) {
        std::mem::swap(&mut *lock(&self.0), spare);
    }

    /// Drop the batch (nobody will take it: the actor is gone).
    pub fn clear(&self) {
        lock(&self.0).clear();
    }
}

/// A poisoned lock only means a panic elsewhere; the text is intact.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl ReadSubs {
    pub fn new(limit: usize, idle: Duration) -> Self {
        ReadSubs {
            limit,
            idle,
            seen: HashMap::default(),
            seen_order: VecDeque::new(),
            next_place: 0,
            ring: VecDeque::new(),
            refused: VecDeque::new(),
            refused_set: HashSet::default(),
            next_sweep: Instant::now() + idle,
            batch: String::new(),
        }
    }

    /// Read-driven subscriptions held now.
    pub fn len(&self) -> usize {
        self.ring.len()
    }

    /// Remember a first read; true when `sh` was read before (admitted).
    fn admit(&mut self, sh: &str) -> bool {
        if self.seen.remove(sh).is_some() {
            // Its place in `seen_order` goes stale.
            return true;
        }
        self.remember(sh);
        false
    }

    /// Remember that a subscribe of `sh` failed (see the module doc).
    fn refuse(&mut self, sh: &str) {
        if self.refused_set.contains(sh) {
            return;
        }
        if self.refused.len() >= self.limit.max(1) {
            if let Some(old) = self.refused.pop_front() {
                self.refused_set.remove(&old);
            }
        }
        self.refused.push_back(sh.to_string());
        self.refused_set.insert(sh.to_string());
    }

    fn is_refused(&self, sh: &str) -> bool {
        self.refused_set.contains(sh)
    }

    /// Remember that `sh` was read, forgetting the oldest beyond `limit`.
    fn remember(&mut self, sh: &str) {
        let place = self.next_place;
        self.next_place += 1;
        // One string, shared by the map and the order.
        let sh: Arc<str> = sh.into();
        if self.seen.insert(sh.clone(), place).is_none() {
            while self.seen.len() > self.limit.max(1) {
                let Some((old_place, old)) = self.seen_order.pop_front() else {
                    break;
                };
                if self.seen.get(&old) == Some(&old_place) {
                    self.seen.remove(&old);
                }
            }
        }
        self.seen_order.push_back((place, sh));
        if self.seen_order.len() > 2 * self.seen.len() + 16 {
            let seen = &self.seen;
            self.seen_order
                .retain(|(place, sh)| seen.get(sh) == Some(place));
        }
    }
}

impl Actor {
    /// Handle the batch of reads told since the last one, in order.
    pub(super) fn on_notices(&mut self) {
        let mut batch = std::mem::take(&mut self.read_subs.batch);
        self.notices.take(&mut batch);
        // A line per scripthash; memchr finds the ends with SIMD (str's
        // own line splitting was about 250 instructions per notice).
        let mut rest = batch.as_str();
        while let Some(end) = memchr::memchr(b'\n', rest.as_bytes()) {
            self.on_noticed(&rest[..end]);
            rest = &rest[end + 1..];
        }
        batch.clear();
        self.read_subs.batch = batch;
    }

    /// A wallet read `sh`, and nobody was told a status of it.
    fn on_noticed(&mut self, sh: &str) {
        if self.read_subs.limit == 0
            || self.scripts.entries.contains_key(sh)
            || self.read_subs.is_refused(sh)
        {
            return;
        }
        if !self.read_subs.admit(sh) {
            return;
        }
        if self.read_subs.len() >= self.read_subs.limit && !self.evict_read_sub(false) {
            // Its next read tries again (the marks looked at are cleared).
            self.read_subs.remember(sh);
            return;
        }
        let sh = sh.to_string();
        let held = self.scripts.entries.len() + self.outpoints.entries.len();
        if held >= self.config.max_topics {
            // Wallets' subscriptions fill the coin: they come first.
            return;
        }
        self.scripts.entries.insert(
            sh.clone(),
            Entry {
                read_driven: true,
                ..Entry::default()
            },
        );
        self.stats
            .upstream_subscriptions
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.read_subs.ring.push_back(sh.clone());
        if let Some(cache) = &self.config.cache {
            cache.answer_counters().subscribe.inc();
        }
        self.start_subscribe(Topic::Script(sh));
    }

    /// Drop the least recently read read-driven subscription; false when
    /// there is none, or, unless `force`, none of the next
    /// [`EVICTION_LOOKS`] went unread since the hub last looked.
    pub(super) fn evict_read_sub(&mut self, force: bool) -> bool {
        // Forced: two rounds clear every mark, and the last look evicts
        // whatever it finds.
        let mut looks = if force {
            self.read_subs.ring.len() * 2
        } else {
            EVICTION_LOOKS.min(self.read_subs.ring.len())
        };
        while looks > 0 {
            let Some(sh) = self.read_subs.ring.pop_front() else {
                break;
            };
            looks -= 1;
            let read = self
                .config
                .cache
                .as_ref()
                .is_some_and(|c| c.take_touched(&sh));
            if read && (looks > 0 || !force) {
                self.read_subs.ring.push_back(sh);
                continue;
            }
            self.end_read_sub(&sh);
            return true;
        }
        false
    }

    /// Drop read-driven subscriptions nobody read since the last sweep.
    pub(super) fn sweep_read_subs(&mut self) {
        let now = Instant::now();
        if self.read_subs.ring.is_empty() || now < self.read_subs.next_sweep {
            return;
        }
        self.read_subs.next_sweep = now + self.read_subs.idle;
        let ring = std::mem::take(&mut self.read_subs.ring);
        for sh in ring {
            let read = self
                .config
                .cache
                .as_ref()
                .is_some_and(|c| c.take_touched(&sh));
            if read {
                self.read_subs.ring.push_back(sh);
            } else {
                self.end_read_sub(&sh);
            }
        }
    }

    /// A read-driven subscription's subscribe failed: give it up.
    pub(super) fn abandon_read_sub(&mut self, sh: &str) {
        let driven = self.scripts.entries.get(sh).is_some_and(|e| e.read_driven);
        if driven {
            self.read_subs.refuse(sh);
            self.read_subs.ring.retain(|s| s != sh);
            self.end_read_sub(sh);
        }
    }

    /// Take the read-driven mark off `sh` (already out of the ring) and
    /// drop its entry unless a wallet holds it.
    fn end_read_sub(&mut self, sh: &str) {
        let Some(entry) = self.scripts.entries.get_mut(sh) else {
            return;
        };
        entry.read_driven = false;
        if let Some(cache) = &self.config.cache {
            cache.answer_counters().unsubscribe.inc();
        }
        self.drop_if_unused(&Topic::Script(sh.to_string()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admitted_on_the_second_read_among_the_last_limit() {
        let mut r = ReadSubs::new(2, Duration::from_secs(1));
        assert!(!r.admit("a"));
        assert!(r.admit("a"), "second read");
        assert!(!r.admit("a"), "admitted once, remembered afresh");
        assert!(!r.admit("b"));
        assert!(!r.admit("c"), "pushes the oldest (a) out");
        assert!(!r.admit("a"));
        assert!(r.admit("c"));
        assert!(r.seen.len() <= 2);
    }

    #[test]
    fn the_oldest_live_read_is_forgotten_past_stale_places() {
        let mut r = ReadSubs::new(2, Duration::from_secs(1));
        assert!(!r.admit("a"));
        assert!(!r.admit("b"));
        assert!(r.admit("a"), "a's place goes stale");
        assert!(!r.admit("c"));
        // Full (b, c): d pushes out b, the oldest live one, past a's
        // stale place.
        assert!(!r.admit("d"));
        assert!(!r.admit("b"), "b was forgotten");
        assert!(r.admit("d"), "d is remembered");
        // a read again: a new place; its old one must not forget it.
        assert!(!r.admit("a"));
        assert!(!r.admit("e"));
        assert!(r.admit("a"), "a is among the last two");
        // Stale places are swept: the log stays within a few times the
        // live ones, however many admissions.
        for i in 0..1000 {
            let sh = format!("x{i}");
            assert!(!r.admit(&sh));
            assert!(r.admit(&sh));
        }
        assert!(
            r.seen_order.len() <= 2 * r.seen.len() + 17,
            "{}",
            r.seen_order.len()
        );
    }

    #[test]
    fn notices_wake_once_per_batch() {
        let n = Notices::default();
        assert!(n.push("aa"), "the first of a batch wakes the actor");
        assert!(!n.push("bb"));
        assert!(!n.push("aa"));
        let mut batch = String::new();
        n.take(&mut batch);
        assert_eq!(batch.lines().collect::<Vec<_>>(), ["aa", "bb", "aa"]);
        assert!(n.push("cc"), "taken: the next one starts a batch");
        n.clear();
        assert!(n.push("dd"));
    }

    #[test]
    fn refused_ones_are_remembered_among_the_last_limit() {
        let mut r = ReadSubs::new(2, Duration::from_secs(1));
        r.refuse("a");
        r.refuse("a");
        assert!(r.is_refused("a"));
        r.refuse("b");
        r.refuse("c");
        assert!(!r.is_refused("a"), "the oldest is forgotten");
        assert!(r.is_refused("b") && r.is_refused("c"));
        assert_eq!(r.refused.len(), r.refused_set.len());
    }
}
