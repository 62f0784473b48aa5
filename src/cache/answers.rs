//! Reads of mutable scripthash data: joined while in flight, and kept while
//! the status of a scripthash the hub subscribes to does not change.
//!
//! Owns: the table "scripthash -> status generation" the hub keeps current
//! ([`Cache::follow_status`], [`Cache::forget_status`]), the read path for
//! `get_history`, `get_balance`, `get_mempool` and `listunspent`
//! ([`Cache::serve_read`]), and keeping their answers in the cache's store
//! (same byte budget as immutable answers). It does not route reads (the
//! router sends them to the connection holding the subscription) nor decide
//! what is subscribed (the hub does, read-driven subscriptions included).
//!
//! The rules (DESIGN, constraint 2):
//!
//! - A scripthash's *generation* changes whenever the hub learns a new
//!   status for it, whenever its subscription stops being settled on one
//!   connection (moving after a failover, status held, no upstream), and
//!   on every reorg. The hub bumps it before it writes a notification to
//!   any subscriber.
//! - Identical reads join one upstream request only within one generation
//!   (the flight key carries it): a wallet told a new status never joins a
//!   read sent before the hub knew it. Scripthashes nobody was told a
//!   status of are generation 0: their reads join too (nobody can be
//!   contradicted; an answer is at most one round trip older than the
//!   request that joined it).
//! - An answer is kept only when the subscription was settled when the
//!   read was sent and its generation has not changed when the answer
//!   lands; a `get_history` answer is also checked against the status (its
//!   own status must be the one subscribers have). It is dropped when the
//!   generation changes. Between changes, reads are answered from memory.
//! - A reply from memory is written to the session's queue under the same
//!   lock the hub takes to bump a generation, so it is queued before any
//!   notification of a newer status.

use super::{lock, Cache, Entry};
use crate::reply::{Answer, Hook, HookReply, Responder};
use crate::text_keys::TextKeys;
use prometheus::IntCounter;
use serde_json::value::RawValue;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// The reads whose answers follow a scripthash's status.
pub const READS: [&str; 4] = [
    "blockchain.scripthash.get_balance",
    "blockchain.scripthash.get_history",
    "blockchain.scripthash.get_mempool",
    "blockchain.scripthash.listunspent",
];

const GET_HISTORY: &str = "blockchain.scripthash.get_history";

/// Room for `#` and a generation (`u64::MAX` has 20 digits) in a key.
const GENERATION_ROOM: usize = 21;

/// The events of `electrum_lb_read_answers_total` (see `metrics`).
pub const EVENTS: [&str; 10] = [
    "hit",
    "join",
    "miss",
    "store",
    "mismatch",
    "invalidate",
    "subscribe",
    "unsubscribe",
    "checked",
    "recheck",
];

/// Counters of what happened to reads and their kept answers. Registered
/// per coin by `metrics`; unregistered (counted, not exported) otherwise.
#[derive(Clone)]
pub struct AnswerCounters {
    /// Answered from memory.
    pub hit: IntCounter,
    /// Joined an identical read in flight.
    pub join: IntCounter,
    /// Sent upstream.
    pub miss: IntCounter,
    /// Answers kept.
    pub store: IntCounter,
    /// `get_history` answers not kept: their status was not the one
    /// subscribers have (a read crossing an announcement).
    pub mismatch: IntCounter,
    /// Generations changed while answers were kept for them.
    pub invalidate: IntCounter,
    /// Read-driven subscriptions started by the hub.
    pub subscribe: IntCounter,
    /// Read-driven subscriptions dropped (idle, evicted or failed).
    pub unsubscribe: IntCounter,
    /// History reads of subscribed scripthashes sent to any connection,
    /// their answers checked against the status (see `router`).
    pub checked: IntCounter,
    /// Checked answers that disagreed, sent again to the connection
    /// holding the subscription.
    pub recheck: IntCounter,
}

impl AnswerCounters {
    /// Counters registered nowhere.
    pub fn detached() -> Self {
        Self::from_fn(|name| IntCounter::new(name, name).expect("valid counter"))
    }

    /// One counter per event of [`EVENTS`], in order.
    pub fn from_fn(mut make: impl FnMut(&str) -> IntCounter) -> Self {
        AnswerCounters {
            hit: make(EVENTS[0]),
            join: make(EVENTS[1]),
            miss: make(EVENTS[2]),
            store: make(EVENTS[3]),
            mismatch: make(EVENTS[4]),
            invalidate: make(EVENTS[5]),
            subscribe: make(EVENTS[6]),
            unsubscribe: make(EVENTS[7]),
            checked: make(EVENTS[8]),
            recheck: make(EVENTS[9]),
        }
    }
}

/// What the cache knows of the scripthashes the hub told a status of.
pub(super) struct Answers {
    table: Mutex<Table>,
    /// Reads in flight, keyed by generation, method and params.
    flights: crate::coalesce::Coalescer,
    pub counters: AnswerCounters,
}

#[derive(Default)]
struct Table {
    scripts: HashMap<Box<str>, Script, TextKeys>,
    /// The last generation handed out (0: never told a status).
    generation: u64,
}

struct Script {
    generation: u64,
    /// Settled on the connection holding its subscription, status not
    /// held: answers may be kept.
    settled: bool,
    /// The status subscribers have, as JSON text (`null` or `"hex"`).
    status: Box<str>,
    /// Store keys of the answers kept for this generation.
    keys: Vec<Box<str>>,
    /// Read since the hub last asked (read-driven subscriptions).
    touched: bool,
}

impl Answers {
    pub fn new(counters: AnswerCounters) -> Self {
        Answers {
            table: Mutex::new(Table::default()),
            flights: Default::default(),
            counters,
        }
    }
}

/// The scripthash a read is about, when `method` is one of [`READS`].
pub fn read_of<'a>(method: &str, params: &'a str) -> Option<std::borrow::Cow<'a, str>> {
    if READS.contains(&method) {
        crate::router::scripthash_arg(params)
    } else {
        None
    }
}

impl Cache {
    /// A read of [`READS`] about `sh`: from memory, joined, or sent with
    /// `fetch` (and its answer kept when the rules allow). `sh` is what
    /// [`read_of`] finds in `params`: the router, which has parsed it
    /// already to route the read, passes it here instead of going through
    /// [`Cache::serve`], which would parse it again.
    pub(crate) fn serve_read(
        self: &Arc<Self>,
        sh: &str,
        method: &str,
        params: &str,
        responder: Responder,
        fetch: impl FnOnce(Responder),
    ) {
        debug_assert_eq!(read_of(method, params).as_deref(), Some(sh));
        let answers = &self.answers;
        // One string for every key of this read: the store's is method and
        // params, the flight's the same with `#generation` after it. Only
        // looked up with, never kept (a flight copies its key): the
        // thread's scratch string, not an allocation per read.
        let mut key = ScratchKey::take();
        key.reserve(method.len() + params.len() + GENERATION_ROOM);
        key.push_str(method);
        key.push_str(params);
        let generation = {
            let mut table = lock(&answers.table);
            match table.scripts.get_mut(sh) {
                None => 0,
                Some(script) => {
                    script.touched = true;
                    let generation = script.generation;
                    let kept = script.settled.then(|| self.kept(&key, generation));
                    if let Some(result) = kept.flatten() {
                        answers.counters.hit.inc();
                        // Still under the lock: see the module doc.
                        return responder.deliver_text(&result);
                    }
                    generation
                }
            }
        };
        self.join_read(sh, method, key, generation, responder, fetch)
    }

    /// Join the read in flight for `key` (the store's key) in `generation`,
    /// or send it.
    fn join_read(
        self: &Arc<Self>,
        sh: &str,
        method: &str,
        mut key: ScratchKey,
        generation: u64,
        responder: Responder,
        fetch: impl FnOnce(Responder),
    ) {
        let answers = &self.answers;
        let stored = key.len();
        key.push('#');
        key.extend(
            crate::jsonrpc::decimal(generation, &mut [0; 20])
                .iter()
                .map(|&d| char::from(d)),
        );
        let Some(flight) = answers.flights.join(&key, responder) else {
            answers.counters.join.inc();
            return;
        };
        // An identical read may have landed between the lookup and the
        // join (a flight keeps its answer before it leaves the map).
        if generation != 0 {
            if let Some(result) = self.kept(&key[..stored], generation) {
                answers.counters.hit.inc();
                if let Ok(raw) = RawValue::from_string(result.to_string()) {
                    return flight.land(&Ok(Answer::Result(raw)));
                }
            }
        }
        drop(key);
        answers.counters.miss.inc();
        // Generation 0 keeps nothing (see the module doc): nothing to carry.
        let keep = (generation != 0).then(|| (self.clone(), Box::<str>::from(sh)));
        let history = method == GET_HISTORY;
        fetch(Responder::Hook(Hook::new(move |reply: HookReply<'_>| {
            if let (Some((cache, sh)), Ok(Ok(result))) = (keep, &reply) {
                let key = &flight.key()[..stored];
                cache.keep(&sh, history, key, result.get(), generation);
            }
            flight.land_borrowed(reply);
        })));
    }

    /// A kept answer of this generation.
    fn kept(&self, key: &str, generation: u64) -> Option<Arc<str>> {
        let entry = self.store.as_ref()?.get(key)?;
        (entry.generation == generation).then_some(entry.result)
    }

    /// Keep an answer to a read sent in `generation`, if that is still the
    /// scripthash's generation and it was settled (see the module doc).
    fn keep(&self, sh: &str, history: bool, key: &str, result: &str, generation: u64) {
        let Some(store) = &self.store else {
            return;
        };
        let mut table = lock(&self.answers.table);
        let Some(script) = table.scripts.get_mut(sh) else {
            return;
        };
        if !script.settled || script.generation != generation {
            return;
        }
        if history && history_status(result).as_deref() != Some(&*script.status) {
            self.answers.counters.mismatch.inc();
            return;
        }
        let entry = Entry {
            result: result.into(),
            at_height: false,
            expires: None,
            generation,
        };
        store.insert(key.into(), entry);
        if !script.keys.iter().any(|k| &**k == key) {
            script.keys.push(key.into());
        }
        self.answers.counters.store.inc();
    }

    /// The hub's view of a scripthash changed (or may have): `settled`
    /// when reads go to the connection holding its subscription, `status`
    /// what subscribers were told (`None`: nobody was told anything yet).
    /// A change of either starts a new generation and drops what was kept.
    pub fn follow_status(&self, sh: &str, settled: bool, status: Option<&str>) {
        let Some(status) = status else {
            return self.forget_status(sh);
        };
        let mut table = lock(&self.answers.table);
        table.generation += 1;
        let fresh = table.generation;
        let script = table.scripts.entry(sh.into()).or_insert_with(|| Script {
            generation: 0,
            settled: false,
            status: "".into(),
            keys: Vec::new(),
            // Just subscribed or just read: not idle yet.
            touched: true,
        });
        if script.generation != 0 && script.settled == settled && *script.status == *status {
            return;
        }
        script.generation = fresh;
        script.settled = settled;
        script.status = status.into();
        let keys = std::mem::take(&mut script.keys);
        self.drop_kept(keys);
    }

    /// The hub holds nothing for `sh` any more (or was never asked).
    pub fn forget_status(&self, sh: &str) {
        let mut table = lock(&self.answers.table);
        if let Some(script) = table.scripts.remove(sh) {
            self.drop_kept(script.keys);
        }
    }

    /// The status subscribers of `sh` were told, if it has settled: a
    /// `get_history` answer can be checked against it.
    pub fn settled_status(&self, sh: &str) -> Option<Box<str>> {
        lock(&self.answers.table)
            .scripts
            .get(sh)
            .filter(|s| s.settled)
            .map(|s| s.status.clone())
    }

    /// Whether `sh` was read since the last call (and clear the mark).
    pub fn take_touched(&self, sh: &str) -> bool {
        let mut table = lock(&self.answers.table);
        table
            .scripts
            .get_mut(sh)
            .is_some_and(|s| std::mem::take(&mut s.touched))
    }

    /// Mark `sh` as read (a read-driven subscription starts read).
    pub fn touch(&self, sh: &str) {
        if let Some(s) = lock(&self.answers.table).scripts.get_mut(sh) {
            s.touched = true;
        }
    }

    /// A reorg: every scripthash starts a new generation (the store has
    /// dropped the answers themselves).
    pub(super) fn reorg_answers(&self) {
        let mut table = lock(&self.answers.table);
        let Table {
            scripts,
            generation,
        } = &mut *table;
        for script in scripts.values_mut() {
            *generation += 1;
            script.generation = *generation;
            if !script.keys.is_empty() {
                script.keys.clear();
                self.answers.counters.invalidate.inc();
            }
        }
    }

    /// Whether answers can be kept at all (the store is on).
    pub fn keeps_answers(&self) -> bool {
        self.store.is_some()
    }

    /// The counters of reads and kept answers.
    pub fn answer_counters(&self) -> &AnswerCounters {
        &self.answers.counters
    }

    /// Scripthashes the cache follows the status of (for tests).
    pub fn followed(&self) -> usize {
        lock(&self.answers.table).scripts.len()
    }

    fn drop_kept(&self, keys: Vec<Box<str>>) {
        if keys.is_empty() {
            return;
        }
        self.answers.counters.invalidate.inc();
        if let Some(store) = &self.store {
            for k in keys {
                store.remove(&*k);
            }
        }
    }
}

/// The thread's string for building a read's keys, taken for one read
/// and put back when dropped (a read that starts another on the same
/// thread while it holds it, which none does today, gets a new one).
struct ScratchKey(String);

thread_local! {
    static SCRATCH_KEY: std::cell::Cell<String> = const { std::cell::Cell::new(String::new()) };
}

/// Keys longer than this are not kept for the next read (a client's
/// params can be large; the thread would hold the largest for good).
const SCRATCH_KEEP: usize = 1024;

impl ScratchKey {
    fn take() -> ScratchKey {
        let mut s = SCRATCH_KEY.take();
        s.clear();
        ScratchKey(s)
    }
}

impl std::ops::Deref for ScratchKey {
    type Target = String;
    fn deref(&self) -> &String {
        &self.0
    }
}

impl std::ops::DerefMut for ScratchKey {
    fn deref_mut(&mut self) -> &mut String {
        &mut self.0
    }
}

impl Drop for ScratchKey {
    fn drop(&mut self) {
        if self.0.capacity() <= SCRATCH_KEEP {
            SCRATCH_KEY.set(std::mem::take(&mut self.0));
        }
    }
}

/// The status (JSON text: `null` or `"hex"`) of a `get_history` result,
/// computed as wallets do; `None` when it is not a history.
pub fn history_status(result: &str) -> Option<String> {
    use sha2::{Digest, Sha256};
    #[derive(serde::Deserialize)]
    struct Item<'a> {
        #[serde(borrow)]
        tx_hash: std::borrow::Cow<'a, str>,
        height: i64,
    }
    let items: Vec<Item<'_>> = serde_json::from_str(result).ok()?;
    if items.is_empty() {
        return Some("null".into());
    }
    let mut hasher = Sha256::new();
    for item in &items {
        hasher.update(item.tx_hash.as_bytes());
        hasher.update(format!(":{}:", item.height).as_bytes());
    }
    Some(format!("\"{}\"", hex::encode(hasher.finalize())))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::CacheConfig;

    fn cache() -> Arc<Cache> {
        Arc::new(Cache::new(&CacheConfig::default()))
    }

    const SH: &str = "ab";

    #[test]
    fn history_status_is_the_wallets() {
        assert_eq!(history_status("[]").as_deref(), Some("null"));
        let h = r#"[{"tx_hash":"aa","height":5},{"tx_hash":"bb","height":0,"fee":1}]"#;
        use sha2::{Digest, Sha256};
        let want = hex::encode(Sha256::digest(b"aa:5:bb:0:"));
        assert_eq!(history_status(h), Some(format!("\"{want}\"")));
        assert_eq!(history_status("{\"confirmed\":1}"), None);
    }

    #[test]
    fn kept_only_within_a_settled_generation() {
        let c = cache();
        let key = format!("{GET_HISTORY}[\"{SH}\"]");
        // Unknown scripthash: nothing kept.
        c.keep(SH, true, &key, "[]", 0);
        assert!(c.is_empty());
        c.follow_status(SH, true, Some("null"));
        let g = lock(&c.answers.table).scripts[SH].generation;
        // A history whose status is not the subscribers' is refused.
        c.keep(SH, true, &key, r#"[{"tx_hash":"aa","height":1}]"#, g);
        assert!(c.kept(&key, g).is_none());
        c.keep(SH, true, &key, "[]", g);
        assert_eq!(c.kept(&key, g).as_deref(), Some("[]"));
        // Same view again: nothing changes.
        c.follow_status(SH, true, Some("null"));
        assert_eq!(c.kept(&key, g).as_deref(), Some("[]"));
        // A new status: dropped, and an answer of the old generation is
        // not kept.
        c.follow_status(SH, true, Some("\"ff\""));
        assert!(c.get(&key).is_none());
        c.keep(SH, true, &key, "[]", g);
        assert!(c.get(&key).is_none());
        // Not settled (moving, held): nothing kept.
        c.follow_status(SH, false, Some("\"ff\""));
        let g2 = lock(&c.answers.table).scripts[SH].generation;
        c.keep(SH, false, "k", "{}", g2);
        assert!(c.get("k").is_none());
        assert_eq!(c.answers.counters.invalidate.get(), 1);
    }

    #[test]
    fn a_reorg_starts_new_generations() {
        let c = cache();
        c.on_tip(100, "aa");
        c.follow_status(SH, true, Some("null"));
        let g = lock(&c.answers.table).scripts[SH].generation;
        c.keep(SH, false, "k", "{}", g);
        assert!(c.kept("k", g).is_some());
        c.on_tip(100, "bb");
        assert!(c.get("k").is_none());
        let g2 = lock(&c.answers.table).scripts[SH].generation;
        assert_ne!(g, g2);
        c.forget_status(SH);
        assert_eq!(c.followed(), 0);
    }
}
