//! The cache of one coin: answers that cannot change are served from memory,
//! and identical reads in flight share one upstream request.
//!
//! Owns: the policy (which methods, with which params, may be cached or
//! coalesced), the store (bounded in bytes: key and result text plus a fixed
//! overhead per entry), the chain tip as the hub last reported it, and reorg
//! invalidation. [`Cache::serve`] is the read-through path the router calls
//! for every forwarded request: a hit is answered at once; a miss joins an
//! identical request in flight or sends one (see `coalesce`), and a
//! successful answer is stored when the policy allows.
//!
//! What is cached (the key is method + params text, the value the raw
//! result text; only successful results):
//! - `blockchain.transaction.get` without `verbose`: a raw transaction is
//!   immutable by txid (the txid is its hash), so it is kept whatever its
//!   height, even unconfirmed: a reorg can move a transaction to another
//!   block or drop it, never change its bytes. Verbose answers carry
//!   `confirmations` and are never cached.
//! - `blockchain.block.header(s)` (with or without `cp_height`),
//!   `blockchain.transaction.get_merkle` and `blockchain.transaction.id_from_pos`
//!   when every height they involve is at least `reorg_margin` blocks below
//!   the tip.
//! - `blockchain.estimatefee`, `blockchain.relayfee` and
//!   `mempool.get_fee_histogram` for `fee_ttl`, and `mempool.recent`
//!   (protocol 1.7: the same few transactions for every wallet) as well.
//!
//! Histories, balances, unspents and mempool answers of a scripthash are
//! not under this policy: `answers` joins them within one status generation
//! and keeps them only while the hub's subscription to that scripthash says
//! nothing changed (DESIGN, constraint 2). They share the store and its
//! byte budget.
//!
//! Reorgs: the hub reports every new tip ([`Cache::on_tip`]). A tip below the
//! previous one, or another header at the same height, is a reorg. A tip
//! notification does not tell how deep the fork is (the proxy cannot hash
//! headers: the coins use different proof-of-work hashes, so it cannot follow
//! `prev_block_hash` links), and only a reorg deeper than `reorg_margin`
//! touches a cached entry at all; so every height-dependent entry is dropped
//! (fork point 0), raw transactions and fee estimates stay. Requests in
//! flight at that moment are not stored when they land. A reorg that first
//! shows as a higher tip (a longer branch announced at once) cannot be told
//! from an ordinary block: `reorg_margin` is what protects against it.

mod answers;
mod policy;

pub use answers::{history_status, read_of, AnswerCounters, EVENTS as ANSWER_EVENTS, READS};
pub use policy::{policy, Policy};

use crate::coalesce::Coalescer;
use crate::config::CacheConfig;
use crate::jsonrpc::{ErrorCode, RpcError};
use crate::reply::{Answer, Hook, HookReply, Responder};
use answers::Answers;
use serde_json::value::RawValue;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Bytes counted per entry beyond its key and value text (table slot,
/// allocation headers, the entry itself).
const ENTRY_OVERHEAD: u64 = 96;
/// Average entry size assumed to size the table up front.
const AVERAGE_ENTRY: u64 = 1024;

/// One stored answer. Cloned on every hit: keep it cheap.
#[derive(Clone)]
struct Entry {
    result: Arc<str>,
    /// Whether a reorg drops it (headers and proofs).
    at_height: bool,
    expires: Option<Instant>,
    /// The status generation a scripthash read was answered in (see
    /// `answers`); 0 for every other answer.
    generation: u64,
}

#[derive(Clone)]
struct Weigh;

impl quick_cache::Weighter<Box<str>, Entry> for Weigh {
    fn weight(&self, key: &Box<str>, entry: &Entry) -> u64 {
        key.len() as u64 + entry.result.len() as u64 + ENTRY_OVERHEAD
    }
}

type Store = quick_cache::sync::Cache<Box<str>, Entry, Weigh>;

/// Counters for tests, benchmarks and metrics.
#[derive(Debug, Default)]
pub struct CacheStats {
    /// Requests answered from memory.
    pub hits: AtomicU64,
    /// Cacheable or coalescable requests that were sent upstream.
    pub misses: AtomicU64,
    /// Requests that waited for an identical one in flight.
    pub coalesced: AtomicU64,
    /// Answers stored.
    pub stored: AtomicU64,
    /// Reorgs that dropped height-dependent entries.
    pub reorgs: AtomicU64,
}

/// The last tip the hub reported, and the invalidation epoch.
#[derive(Default)]
struct Chain {
    tip: Option<(u64, String)>,
    /// Bumped by each reorg: an answer to a request sent in an older epoch
    /// is not stored.
    epoch: u64,
}

/// One coin's cache. Shared by the router (lookups) and the hub (tips).
pub struct Cache {
    /// `None` when caching is disabled (coalescing still works).
    store: Option<Store>,
    flights: Coalescer,
    chain: Mutex<Chain>,
    /// Tip height for the hot path (0: unknown).
    tip: AtomicU64,
    reorg_margin: u64,
    fee_ttl: Duration,
    pub stats: CacheStats,
    /// Scripthash reads: their generations, flights and counters.
    answers: Answers,
    /// `[cache] read_subscriptions` and `read_subscription_idle_secs`, for
    /// the hub.
    read_subscriptions: (usize, Duration),
}

impl std::fmt::Debug for Cache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cache")
            .field("entries", &self.len())
            .field("bytes", &self.bytes())
            .field("tip", &self.tip())
            .finish_non_exhaustive()
    }
}

impl Cache {
    pub fn new(config: &CacheConfig) -> Cache {
        let store = (config.enabled && config.max_bytes > 0).then(|| {
            let items = (config.max_bytes / AVERAGE_ENTRY).clamp(16, 1 << 20) as usize;
            Store::with_weighter(items, config.max_bytes, Weigh)
        });
        Cache {
            store,
            flights: Coalescer::default(),
            chain: Mutex::new(Chain::default()),
            tip: AtomicU64::new(0),
            reorg_margin: config.reorg_margin,
            fee_ttl: Duration::from_secs(config.fee_ttl_secs),
            stats: CacheStats::default(),
            answers: Answers::new(AnswerCounters::detached()),
            read_subscriptions: (
                config.read_subscriptions,
                Duration::from_secs(config.read_subscription_idle_secs),
            ),
        }
    }

    /// Count reads and kept answers in these (registered) counters.
    pub fn with_counters(mut self, counters: AnswerCounters) -> Cache {
        self.answers = Answers::new(counters);
        self
    }

    /// How many read-driven subscriptions the hub may hold, and after how
    /// long without a read it drops one (0: none; nothing is kept without
    /// the store either).
    pub fn read_subscriptions(&self) -> (usize, Duration) {
        if self.store.is_none() {
            return (0, self.read_subscriptions.1);
        }
        self.read_subscriptions
    }

    /// Answer `method(params)` from memory, join an identical request in
    /// flight, or send it with `fetch` (and store the answer if allowed).
    /// Requests the policy knows nothing about go straight to `fetch`.
    pub fn serve(
        self: &Arc<Self>,
        method: &str,
        params: &str,
        responder: Responder,
        fetch: impl FnOnce(Responder),
    ) {
        if let Some(sh) = read_of(method, params) {
            return self.serve_read(&sh, method, params, responder, fetch);
        }
        let Some(policy) = policy(method, params) else {
            return fetch(responder);
        };
        let mut key = String::with_capacity(method.len() + params.len());
        key.push_str(method);
        key.push_str(params);
        if let Some(result) = self.get(&key) {
            self.stats.hits.fetch_add(1, Ordering::Relaxed);
            return responder.deliver_text(&result);
        }
        let Some(flight) = self.flights.join(&key, responder) else {
            self.stats.coalesced.fetch_add(1, Ordering::Relaxed);
            return;
        };
        // An identical request may have landed between the lookup and the
        // join: a flight stores its answer before it leaves the map, so the
        // answer is in the cache now (two upstream requests otherwise).
        if let Some(result) = self.get(&key) {
            self.stats.hits.fetch_add(1, Ordering::Relaxed);
            let reply = RawValue::from_string(result.to_string())
                .map(Answer::Result)
                .map_err(|e| RpcError::new(ErrorCode::InternalError, e.to_string()));
            return flight.land(&reply);
        }
        self.stats.misses.fetch_add(1, Ordering::Relaxed);
        // Whether the answer may be kept is decided now, against the tip
        // this request was sent under.
        let epoch = self.storable(policy).then(|| lock(&self.chain).epoch);
        let cache = self.clone();
        fetch(Responder::Hook(Hook::new(move |reply: HookReply<'_>| {
            if let (Some(epoch), Ok(Ok(result))) = (epoch, &reply) {
                cache.store(flight.key(), result.get(), policy, epoch);
            }
            flight.land_borrowed(reply);
        })));
    }

    /// A stored, still valid result.
    fn get(&self, key: &str) -> Option<Arc<str>> {
        let store = self.store.as_ref()?;
        let entry = store.get(key)?;
        if entry.expires.is_some_and(|t| t <= Instant::now()) {
            store.remove(key);
            return None;
        }
        Some(entry.result)
    }

    /// Whether an answer under `policy` may be stored, given the tip now.
    fn storable(&self, policy: Policy) -> bool {
        if self.store.is_none() {
            return false;
        }
        match policy {
            Policy::Forever => true,
            Policy::Fees => !self.fee_ttl.is_zero(),
            Policy::Height(h) => self.is_deep(h),
        }
    }

    /// Whether `height` is at least `reorg_margin` blocks below the tip.
    pub fn is_deep(&self, height: u64) -> bool {
        let tip = self.tip.load(Ordering::Acquire);
        tip != 0
            && tip
                .checked_sub(self.reorg_margin)
                .is_some_and(|d| height <= d)
    }

    fn store(&self, key: &str, result: &str, policy: Policy, epoch: u64) {
        let Some(store) = &self.store else {
            return;
        };
        let entry = Entry {
            result: result.into(),
            at_height: matches!(policy, Policy::Height(_)),
            expires: matches!(policy, Policy::Fees).then(|| Instant::now() + self.fee_ttl),
            generation: 0,
        };
        // Under the chain lock: a reorg cannot slip between the epoch check
        // and the insert and leave an answer from the old branch behind.
        let chain = lock(&self.chain);
        if chain.epoch == epoch {
            store.insert(key.into(), entry);
            self.stats.stored.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The hub saw a new tip (its headers subscription, or a resubscription
    /// after failover). Called before subscribers are told, so a client that
    /// has the notification never gets an answer from the old branch.
    /// Every scripthash answer is dropped on a reorg too (their statuses
    /// follow in the upstream's notifications; see `answers`).
    pub fn on_tip(&self, height: u64, hex: &str) {
        let mut chain = lock(&self.chain);
        let reorg = chain
            .tip
            .as_ref()
            .is_some_and(|(h, x)| height < *h || (height == *h && x != hex));
        chain.tip = Some((height, hex.to_string()));
        self.tip.store(height, Ordering::Release);
        if reorg {
            chain.epoch += 1;
            if let Some(store) = &self.store {
                store.retain(|_, e| !e.at_height && e.generation == 0);
            }
            self.reorg_answers();
            self.flights.detach_all();
            self.stats.reorgs.fetch_add(1, Ordering::Relaxed);
            tracing::info!(
                height,
                "chain reorganisation: cached headers and proofs dropped"
            );
        }
    }

    /// The tip height last reported (0: none yet).
    pub fn tip(&self) -> u64 {
        self.tip.load(Ordering::Acquire)
    }

    /// Entries stored.
    pub fn len(&self) -> usize {
        self.store.as_ref().map_or(0, |s| s.len())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes accounted to stored entries.
    pub fn bytes(&self) -> u64 {
        self.store.as_ref().map_or(0, |s| s.weight())
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(max_bytes: u64) -> CacheConfig {
        CacheConfig {
            enabled: true,
            max_bytes,
            reorg_margin: 6,
            fee_ttl_secs: 5,
            ..CacheConfig::default()
        }
    }

    #[test]
    fn depth_follows_the_tip() {
        let c = Cache::new(&config(1 << 20));
        assert!(!c.is_deep(1), "unknown tip: nothing is deep");
        c.on_tip(100, "aa");
        assert!(c.is_deep(94));
        assert!(!c.is_deep(95));
        c.on_tip(101, "bb");
        assert!(c.is_deep(95));
    }

    #[test]
    fn reorg_drops_height_entries_only() {
        let c = Cache::new(&config(1 << 20));
        c.on_tip(100, "aa");
        let epoch = lock(&c.chain).epoch;
        c.store("h[1]", "\"x\"", Policy::Height(1), epoch);
        c.store("t[1]", "\"y\"", Policy::Forever, epoch);
        c.on_tip(101, "bb");
        assert_eq!(c.len(), 2, "an ordinary new block drops nothing");
        c.on_tip(101, "cc");
        assert!(c.get("h[1]").is_none());
        assert_eq!(c.get("t[1]").as_deref(), Some("\"y\""));
        // An answer to a request sent before the reorg is not stored.
        c.store("h[2]", "\"z\"", Policy::Height(2), epoch);
        assert!(c.get("h[2]").is_none());
        c.on_tip(99, "dd");
        assert_eq!(c.stats.reorgs.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn bounded_in_bytes() {
        let c = Cache::new(&config(64 * 1024));
        for i in 0..1000 {
            c.store(&format!("k{i}"), &"x".repeat(500), Policy::Forever, 0);
        }
        assert!(c.bytes() <= 64 * 1024, "{} bytes", c.bytes());
        assert!(c.len() < 1000);
    }

    #[test]
    fn fees_expire() {
        let mut cfg = config(1 << 20);
        cfg.fee_ttl_secs = 0;
        let c = Cache::new(&cfg);
        assert!(!c.storable(Policy::Fees), "a zero TTL stores nothing");
        let c = Cache::new(&config(1 << 20));
        c.store("f", "1", Policy::Fees, 0);
        assert_eq!(c.get("f").as_deref(), Some("1"));
        // Age the entry instead of waiting for it.
        let store = c.store.as_ref().unwrap();
        let mut e = store.get("f").unwrap();
        e.expires = Some(Instant::now() - Duration::from_millis(1));
        store.insert("f".into(), e);
        assert!(c.get("f").is_none());
    }

    #[test]
    fn disabled_stores_nothing() {
        let mut cfg = config(1 << 20);
        cfg.enabled = false;
        let c = Cache::new(&cfg);
        assert!(!c.storable(Policy::Forever));
        c.store("k", "1", Policy::Forever, 0);
        assert!(c.is_empty());
    }
}
