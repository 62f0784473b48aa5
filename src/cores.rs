//! Per-core runtimes (`--per-core`): one single-threaded tokio runtime per
//! worker thread, instead of one multi-threaded runtime whose tasks wake
//! each other across threads.
//!
//! How work is placed:
//! - the first runtime runs on the main thread and holds everything that is
//!   one per process or per coin: the listeners' accept loops, the hubs,
//!   the pools' monitors, metrics, reload and hand-over;
//! - each accepted connection (its PROXY header, TLS handshake, session
//!   reader and writer) goes to the next runtime in turn ([`next`]);
//! - each upstream connection slot belongs to one runtime ([`of_slot`]):
//!   its supervisor and connection task run there. Selection still picks
//!   the upstream (health, tier, throttling, cost); the request then goes
//!   to that upstream's connection on the session's own runtime when it is
//!   ready and has room (`upstream::state`), so the common path (read a
//!   request, write it upstream, read the answer, write it to the client)
//!   stays on one thread with no cross-thread wake-up.
//!
//! What crosses threads: subscriptions and notifications (the hub),
//! reads of a subscribed scripthash (its subscription's connection), and
//! a request whose runtime has no ready connection. Every such path was
//! already `Send` (the multi-threaded runtime runs it too).
//!
//! Without `--per-core` nothing is installed: [`count`] is 1 and
//! [`spawn_on`] is `tokio::spawn`.

use std::cell::Cell;
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;
use tokio::runtime::Handle;

static HANDLES: OnceLock<Vec<Handle>> = OnceLock::new();
static NEXT: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    static CURRENT: Cell<usize> = const { Cell::new(0) };
}

/// Install the runtimes (once, before serving; the first is the main
/// thread's). Returns false when already installed.
pub fn install(handles: Vec<Handle>) -> bool {
    HANDLES.set(handles).is_ok()
}

/// Mark the calling thread as runtime `core`'s (before its `block_on`).
pub fn enter(core: usize) {
    CURRENT.with(|c| c.set(core));
}

/// How many runtimes serve (1 without `--per-core`).
pub fn count() -> usize {
    HANDLES.get().map_or(1, Vec::len)
}

/// The runtime the calling thread runs (0 on the main thread, and always
/// 0 without `--per-core`).
pub fn current() -> usize {
    CURRENT.with(Cell::get)
}

/// The runtime for the next accepted connection: each in turn.
pub fn next() -> usize {
    match count() {
        1 => 0,
        n => NEXT.fetch_add(1, Ordering::Relaxed) % n,
    }
}

/// The runtime of the `n`th connection slot of an upstream: slots are
/// dealt out in turn, so the first `count()` slots of an upstream give
/// each runtime one.
pub fn of_slot(n: usize) -> usize {
    n % count()
}

/// Spawn `task` on runtime `core`; without `--per-core`, on the current
/// runtime.
pub fn spawn_on<F>(core: usize, task: F)
where
    F: Future<Output = ()> + Send + 'static,
{
    match HANDLES.get() {
        Some(handles) if handles.len() > 1 => {
            handles[core % handles.len()].spawn(task);
        }
        _ => {
            tokio::spawn(task);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_runtimes_everything_is_core_zero() {
        // Unit tests never install runtimes (main does).
        assert_eq!(count(), 1);
        assert_eq!(current(), 0);
        assert_eq!(next(), 0);
        assert_eq!(of_slot(5), 0);
    }

    #[test]
    fn a_thread_knows_its_core() {
        let seen = std::thread::spawn(|| {
            enter(3);
            current()
        })
        .join()
        .expect("thread");
        assert_eq!(seen, 3);
        assert_eq!(current(), 0);
    }
}
