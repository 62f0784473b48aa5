//! electrum-lb: a multi-coin, protocol-aware Electrum load-balancing proxy.
//!
//! # Layout
//!
//! The tree follows a request from a wallet to an upstream and back:
//!
//! - [`config`]: the TOML schema, defaults and validation.
//! - [`app`]: wires one isolated set per coin (pool, hub, router, listeners)
//!   and owns the start order; [`drain`] owns the stop order (not ready,
//!   notice, stop accepting, sessions end once answered, hard stop).
//! - [`listener`]: accept loops; PROXY protocol headers ([`proxy_protocol`])
//!   and TLS handshakes are read in the spawned task, under [`limits`].
//!   `listener::bind` is where every listening socket comes from (bound
//!   afresh or handed over by a predecessor through [`handoff`], for
//!   in-place upgrades).
//! - [`tls`]: rustls configuration for listeners and for `ssl://` upstreams.
//! - [`ws`]: `ws://` and `wss://` listeners: the HTTP upgrade, and an
//!   adapter that turns WebSocket messages into lines for the session.
//! - [`session`]: one client, transport-agnostic: a reader loop and a writer
//!   task joined by a bounded queue.
//! - [`codec`]: bounded newline framing; [`jsonrpc`]: classifying lines and
//!   writing replies without building JSON trees; [`scan`]: the byte scans
//!   both make sixteen bytes at a time.
//! - [`router`]: the method table of a coin: local `server.*` answers
//!   ([`local`]; [`protocol`] negotiates versions), protocols 1.6 and 1.7
//!   over upstreams of any level ([`router::bridge`]; outpoint statuses in
//!   [`outpoint`], read from transactions with [`tx`]), subscriptions to
//!   the [`hub`], translations in [`router::legacy`] and [`coin`] (addresses),
//!   [`header`] shapes, and forwarding to the [`upstream`] pool through the
//!   [`cache`] (immutable answers from memory; identical reads in flight
//!   share one request, see [`coalesce`]; scripthash reads answered from
//!   memory while the hub's subscription says their status is unchanged,
//!   `cache::answers`, the hub subscribing to what wallets read,
//!   `hub::read_subs`).
//! - [`upstream`]: per-upstream connection supervisors; `upstream::conn` is
//!   the actor that rewrites ids (and learns each connection's protocol
//!   level); `upstream::select` picks a connection among those whose level
//!   answers the request (`upstream::levels`).
//! - [`reply`]: how an answer gets back to whoever asked.
//! - [`admin`]: the side HTTP port (status page, `/status.json`, `/metrics`,
//!   probes); what it shows is one [`status`] snapshot per request, read
//!   from the pools, hubs, caches, metrics ([`metrics`]) and limits, plus
//!   the recent events (`status::events`) those record.
//!
//! ```text
//! wallet --TCP/TLS/WS--> listener --> session --> router --+-- local answer (server.*)
//!                                        ^                 +-- hub (subscriptions) --+
//!                                        |                 '-- cache -- forward ----+--> pool --> conn --> ElectrumX
//!                                        '---- bounded queue <--- answers / notifications <---'
//! ```
#![forbid(unsafe_code)]

pub mod admin;
pub mod app;
pub mod cache;
pub mod coalesce;
pub mod codec;
pub mod coin;
pub mod config;
pub mod cores;
pub mod drain;
pub mod handoff;
pub mod header;
pub mod hub;
pub mod jsonrpc;
pub mod limits;
pub mod listener;
pub mod local;
pub mod metrics;
pub mod outpoint;
pub mod protocol;
pub mod proxy_protocol;
pub mod reply;
pub mod router;
pub mod scan;
pub mod session;
pub mod status;
pub mod text_keys;
pub mod tls;
pub mod tx;
pub mod u64_keys;
pub mod upstream;
pub mod ws;

pub use app::{start, start_with, Listen, Server};
pub use config::Config;

/// Run the proxy until `shutdown` completes, then shut down gracefully.
pub async fn run(
    config: Config,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    let server = start(config).await?;
    shutdown.await;
    tracing::info!("shutting down");
    server.shutdown().await;
    Ok(())
}
