//! The hasher of maps keyed by text a client chooses: scripthashes (the
//! hub's routes and read tracking, the cache's status table) and request
//! keys (the coalescer).
//!
//! A client picks these keys, so the hash must be keyed with secrets it
//! cannot learn, or it could pick keys that all land in one bucket
//! (HashDoS). std's `RandomState` (SipHash-1-3) is keyed, and was about
//! 1,100 of the proxy's ~12,900 instructions per uncached answer (three
//! lookups of 64 to 110 bytes each; `benches/instructions.py --top`).
//! aHash is keyed too, with random keys drawn per map from the operating
//! system, and is built for exactly this use (in-memory maps, resistant
//! to HashDoS, not a cryptographic hash), at a fraction of the cost.

/// `HashMap<String, V, TextKeys>`, `DashMap<String, V, TextKeys>`.
pub type TextKeys = ahash::RandomState;
