//! Coalescing: identical requests in flight at the same time share one
//! upstream request.
//!
//! Owns: the map "request key -> everyone waiting for that answer" and the
//! fan-out of one answer (result, upstream error or the proxy's own error)
//! to all of them. It does not decide what may be coalesced (that is the
//! cache's policy: reads whose answer does not depend on when they were
//! sent, and scripthash reads within one status generation, whose key
//! carries it: see `cache::answers`) and does not send anything itself:
//! whoever gets a [`Flight`] from [`Coalescer::join`] sends the one request
//! and lands its answer.
//!
//! Cost: this is on the path of every uncached read, and most flights are
//! never joined. A flight is one allocation (its key, shared by the map and
//! the [`Flight`] as an `Arc<str>`); the one who started it is kept in the
//! [`Flight`] itself, and the list of those who joined stays empty, so
//! unallocated, until someone does. The key is hashed once, when it joins
//! (aHash with random keys, see `text_keys`: keys are client text); the
//! map is indexed by that hash (see `u64_keys`), so landing does not hash
//! the text again. Two keys with the same hash are told apart by their
//! text: the later one flies alone (never joined), which is always
//! correct.
//!
//! Locks: one mutex over the map, held only to look up, insert or remove a
//! flight, never across an await nor while answers are delivered.

use crate::jsonrpc::{ErrorCode, RpcError};
use crate::reply::{Answer, HookReply, InternalReply, Responder};
use crate::text_keys::TextKeys;
use crate::u64_keys::U64Keys;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// The requests of one coin that are on their way upstream, by key.
#[derive(Default)]
pub struct Coalescer {
    flights: Arc<Mutex<Flights>>,
    /// Hashes keys (keyed with random secrets, see `text_keys`).
    hasher: TextKeys,
}

#[derive(Default)]
struct Flights {
    /// Flights that can be joined, by the hash of their key.
    open: HashMap<u64, Open, U64Keys>,
    /// Who joined flights detached by [`Coalescer::detach_all`], by flight
    /// number, until they land.
    detached: HashMap<u64, Vec<Responder>, U64Keys>,
    /// Numbers flights (tells a detached flight from a newer one with the
    /// same key).
    next: u64,
}

/// An open flight in the map.
struct Open {
    key: Arc<str>,
    number: u64,
    /// Who joined (the one who started it is in its [`Flight`]).
    joined: Vec<Responder>,
}

/// The one request sent upstream for a key. Its owner sends the request and
/// calls [`Flight::land`] with the answer; dropped without landing, it fails
/// every waiter (nobody is left waiting for an answer that never comes).
pub struct Flight {
    key: Arc<str>,
    hash: u64,
    number: u64,
    /// The one who started it; `None` once landed.
    first: Option<Responder>,
    flights: Arc<Mutex<Flights>>,
}

impl Coalescer {
    /// Wait for the answer of the identical request already in flight, or
    /// start a flight for `key` (returned: the caller must send the request).
    #[must_use]
    pub fn join(&self, key: &str, responder: Responder) -> Option<Flight> {
        self.join_hashed(self.hasher.hash_one(key), key, responder)
    }

    fn join_hashed(&self, hash: u64, key: &str, responder: Responder) -> Option<Flight> {
        let mut flights = lock(&self.flights);
        let number = flights.next;
        flights.next += 1;
        let key: Arc<str> = match flights.open.get_mut(&hash) {
            Some(open) if *open.key == *key => {
                open.joined.push(responder);
                return None;
            }
            // Another key with the same hash: this one flies alone.
            Some(_) => key.into(),
            None => {
                let key: Arc<str> = key.into();
                let open = Open {
                    key: key.clone(),
                    number,
                    joined: Vec::new(),
                };
                flights.open.insert(hash, open);
                key
            }
        };
        Some(Flight {
            key,
            hash,
            number,
            first: Some(responder),
            flights: self.flights.clone(),
        })
    }

    /// Let later requests start flights of their own: those in flight keep
    /// their waiters and land as usual. Used after a reorg, so that nobody
    /// who has seen the new tip joins a request sent before it.
    pub fn detach_all(&self) {
        let mut flights = lock(&self.flights);
        let Flights { open, detached, .. } = &mut *flights;
        for (_, flight) in open.drain() {
            if !flight.joined.is_empty() {
                detached.insert(flight.number, flight.joined);
            }
        }
    }

    /// Keys in flight (for tests and metrics).
    pub fn in_flight(&self) -> usize {
        lock(&self.flights).open.len()
    }
}

impl Flight {
    pub fn key(&self) -> &str {
        &self.key
    }

    /// Give the answer to every waiter.
    pub fn land(self, reply: &InternalReply) {
        self.land_borrowed(match reply {
            Ok(Answer::Result(raw)) => Ok(Ok((&**raw).into())),
            Ok(Answer::Error(e)) => Ok(Err((&**e).into())),
            Err(e) => Err(e.clone()),
        })
    }

    /// [`Flight::land`] with the answer borrowed from where it arrived.
    pub fn land_borrowed(mut self, reply: HookReply<'_>) {
        let (first, joined) = self.take();
        for responder in first.into_iter().chain(joined) {
            match &reply {
                Ok(outcome) => responder.deliver(*outcome),
                Err(e) => responder.fail(e.clone()),
            }
        }
    }

    /// Leave the map (unless detached meanwhile) and take the waiters: after
    /// this nobody can join, so the list is final.
    fn take(&mut self) -> (Option<Responder>, Vec<Responder>) {
        let first = self.first.take();
        if first.is_none() {
            return (None, Vec::new());
        }
        let mut flights = lock(&self.flights);
        let joined = match flights.open.get(&self.hash) {
            Some(open) if open.number == self.number => {
                flights.open.remove(&self.hash).map(|o| o.joined)
            }
            _ => flights.detached.remove(&self.number),
        };
        (first, joined.unwrap_or_default())
    }
}

impl Drop for Flight {
    fn drop(&mut self) {
        let (first, joined) = self.take();
        for responder in first.into_iter().chain(joined) {
            responder.fail(RpcError::new(ErrorCode::InternalError, "request dropped"));
        }
    }
}

/// A poisoned lock only means a panic elsewhere; the map itself is intact.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::value::RawValue;
    use tokio::sync::oneshot;

    fn internal() -> (Responder, oneshot::Receiver<InternalReply>) {
        let (tx, rx) = oneshot::channel();
        (Responder::Internal(tx), rx)
    }

    fn result_text(reply: InternalReply) -> String {
        match reply {
            Ok(Answer::Result(r)) => r.get().to_string(),
            other => panic!("not a result: {other:?}"),
        }
    }

    #[test]
    fn identical_requests_share_one_flight() {
        let c = Coalescer::default();
        let (a, rx_a) = internal();
        let (b, rx_b) = internal();
        let flight = c.join("k", a).expect("first starts a flight");
        assert!(c.join("k", b).is_none(), "second waits for it");
        assert_eq!(c.in_flight(), 1);
        let raw = RawValue::from_string("\"r\"".into()).unwrap();
        flight.land(&Ok(Answer::Result(raw)));
        assert_eq!(c.in_flight(), 0);
        assert_eq!(result_text(rx_a.blocking_recv().unwrap()), "\"r\"");
        assert_eq!(result_text(rx_b.blocking_recv().unwrap()), "\"r\"");
        // A later request starts a new flight.
        let (d, _rx) = internal();
        assert!(c.join("k", d).is_some());
    }

    #[test]
    fn errors_reach_every_waiter_and_dropped_flights_fail() {
        let c = Coalescer::default();
        let (a, rx_a) = internal();
        let (b, rx_b) = internal();
        let flight = c.join("k", a).unwrap();
        assert!(c.join("k", b).is_none());
        let err = RawValue::from_string(r#"{"code":2,"message":"no"}"#.into()).unwrap();
        flight.land(&Ok(Answer::Error(err)));
        for rx in [rx_a, rx_b] {
            assert!(matches!(rx.blocking_recv().unwrap(), Ok(Answer::Error(_))));
        }
        let (e, rx_e) = internal();
        drop(c.join("k", e).unwrap());
        assert!(rx_e.blocking_recv().unwrap().is_err());
        assert_eq!(c.in_flight(), 0);
    }

    #[test]
    fn detached_flights_keep_their_waiters() {
        let c = Coalescer::default();
        let (a, rx_a) = internal();
        let old = c.join("k", a).unwrap();
        c.detach_all();
        let (b, rx_b) = internal();
        let new = c.join("k", b).expect("after a detach, a new flight starts");
        let raw = |s: &str| RawValue::from_string(s.into()).unwrap();
        old.land(&Ok(Answer::Result(raw("1"))));
        // The old flight's landing leaves the new one in place.
        assert_eq!(c.in_flight(), 1);
        new.land(&Ok(Answer::Result(raw("2"))));
        assert_eq!(result_text(rx_a.blocking_recv().unwrap()), "1");
        assert_eq!(result_text(rx_b.blocking_recv().unwrap()), "2");
    }

    #[test]
    fn keys_with_the_same_hash_fly_apart() {
        let c = Coalescer::default();
        let (a, rx_a) = internal();
        let (b, rx_b) = internal();
        let (d, rx_d) = internal();
        let first = c.join_hashed(7, "k1", a).unwrap();
        let other = c
            .join_hashed(7, "k2", b)
            .expect("another key is not joined");
        assert!(c.join_hashed(7, "k1", d).is_none(), "the first is joined");
        let raw = |s: &str| RawValue::from_string(s.into()).unwrap();
        // The lone flight's landing leaves the first in place.
        other.land(&Ok(Answer::Result(raw("2"))));
        assert_eq!(c.in_flight(), 1);
        first.land(&Ok(Answer::Result(raw("1"))));
        assert_eq!(c.in_flight(), 0);
        assert_eq!(result_text(rx_a.blocking_recv().unwrap()), "1");
        assert_eq!(result_text(rx_b.blocking_recv().unwrap()), "2");
        assert_eq!(result_text(rx_d.blocking_recv().unwrap()), "1");
    }
}
