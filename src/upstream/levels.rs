//! Protocol levels on the pool side: which connections can answer a job
//! of a given [`Need`](select::Need), and whether the coin's upstreams can
//! answer it at all.
//!
//! Owns: the capability view of the pool (`Pool::preferred_for`,
//! `Pool::capability`, `Pool::conn_level`); the filter of `select::capable`
//! over what dispatch offers a job is `state`'s (`PoolInner::offer_into`).
//! Learning a connection's
//! level is `conn`'s; the protocol slot that asks for the highest level is
//! built by `pool`.

use super::pool::Pool;
use super::state::{Offer, Slot};
use super::{select, ConnId};

/// See [`Pool::capability`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Capability {
    Now,
    Later,
    Never,
}

impl Pool {
    /// The connection a new job of `need` would go to right now, or,
    /// when that is an extra connection (see `state`), the same upstream's
    /// best connection that it always keeps: the hub places subscriptions
    /// here, and extra connections are retired when not needed, which
    /// would move their subscriptions (and cost the upstream new ones).
    pub fn preferred_for(&self, need: select::Need) -> Option<ConnId> {
        let inner = self.inner();
        let mut offer = Offer::new();
        inner.offer_into(need, &mut offer);
        let mut chosen = offer.pick(None)?;
        let slot = &inner.slots[chosen];
        if slot.elastic {
            let upstream = slot.upstream;
            for (c, &i) in offer.candidates.iter_mut().zip(&offer.slots) {
                let s = &inner.slots[i];
                c.ready = s.upstream == upstream && !s.elastic;
            }
            chosen = offer.pick(None).unwrap_or(chosen);
        }
        Some(inner.slots[chosen].shared.conn_id())
    }

    /// Whether a job of `need` can be served: by a connection that is up
    /// now, later (an upstream offers the level but its connection is not
    /// up yet), or never (no upstream offers it).
    pub fn capability(&self, need: select::Need) -> Capability {
        let inner = self.inner();
        let ready = |s: &&Slot| s.shared.is_ready();
        if inner
            .slots
            .iter()
            .filter(ready)
            .any(|s| select::capable(s.shared.level(), need))
        {
            return Capability::Now;
        }
        // What each upstream offers, as its connections learned it.
        let offers = inner.slots.iter().any(|s| {
            let info = s.shared.info.lock().unwrap_or_else(|p| p.into_inner());
            let max = info.protocol_max.as_deref().and_then(|v| v.parse().ok());
            s.top && max.is_some_and(|max| select::capable(max, need))
        });
        if offers {
            Capability::Later
        } else {
            Capability::Never
        }
    }

    /// The protocol level a (ready) connection negotiated.
    pub fn conn_level(&self, conn: ConnId) -> Option<crate::protocol::Version> {
        let inner = self.inner();
        inner.slot_of(conn).map(|i| inner.slots[i].shared.level())
    }
}
