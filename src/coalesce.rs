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
//! Locks: one map mutex, held only to look up, insert or remove a flight,
//! never across an await; each flight's waiter list has its own mutex, taken
//! while the map lock is held (join) or after the flight left the map (land).

use crate::jsonrpc::{ErrorCode, RpcError};
use crate::reply::{Answer, HookReply, InternalReply, Responder};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

type Waiters = Arc<Mutex<Vec<Responder>>>;
type Flights = Mutex<HashMap<Box<str>, Waiters>>;

/// The requests of one coin that are on their way upstream, by key.
#[derive(Default)]
pub struct Coalescer {
    flights: Arc<Flights>,
}

/// The one request sent upstream for a key. Its owner sends the request and
/// calls [`Flight::land`] with the answer; dropped without landing, it fails
/// every waiter (nobody is left waiting for an answer that never comes).
pub struct Flight {
    key: Box<str>,
    waiters: Waiters,
    flights: Arc<Flights>,
    landed: bool,
}

impl Coalescer {
    /// Wait for the answer of the identical request already in flight, or
    /// start a flight for `key` (returned: the caller must send the request).
    #[must_use]
    pub fn join(&self, key: &str, responder: Responder) -> Option<Flight> {
        let mut flights = lock(&self.flights);
        if let Some(waiters) = flights.get(key) {
            lock(waiters).push(responder);
            return None;
        }
        let waiters = Arc::new(Mutex::new(vec![responder]));
        flights.insert(key.into(), waiters.clone());
        Some(Flight {
            key: key.into(),
            waiters,
            flights: self.flights.clone(),
            landed: false,
        })
    }

    /// Let later requests start flights of their own: those in flight keep
    /// their waiters and land as usual. Used after a reorg, so that nobody
    /// who has seen the new tip joins a request sent before it.
    pub fn detach_all(&self) {
        lock(&self.flights).clear();
    }

    /// Keys in flight (for tests and metrics).
    pub fn in_flight(&self) -> usize {
        lock(&self.flights).len()
    }
}

impl Flight {
    pub fn key(&self) -> &str {
        &self.key
    }

    /// Give the answer to every waiter.
    pub fn land(self, reply: &InternalReply) {
        self.land_borrowed(match reply {
            Ok(Answer::Result(raw)) => Ok(Ok(raw)),
            Ok(Answer::Error(e)) => Ok(Err(e)),
            Err(e) => Err(e.clone()),
        })
    }

    /// [`Flight::land`] with the answer borrowed from where it arrived.
    pub fn land_borrowed(mut self, reply: HookReply<'_>) {
        self.landed = true;
        for responder in self.take() {
            match &reply {
                Ok(outcome) => responder.deliver(*outcome),
                Err(e) => responder.fail(e.clone()),
            }
        }
    }

    /// Leave the map (unless detached meanwhile) and take the waiters: after
    /// this nobody can join, so the list is final.
    fn take(&mut self) -> Vec<Responder> {
        {
            let mut flights = lock(&self.flights);
            if flights
                .get(&self.key)
                .is_some_and(|w| Arc::ptr_eq(w, &self.waiters))
            {
                flights.remove(&self.key);
            }
        }
        std::mem::take(&mut *lock(&self.waiters))
    }
}

impl Drop for Flight {
    fn drop(&mut self) {
        if self.landed {
            return;
        }
        for responder in self.take() {
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
}
