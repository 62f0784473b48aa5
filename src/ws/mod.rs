//! WebSocket listeners (`ws://`, `wss://`): browser wallets reach the proxy
//! the way they reach ElectrumX and Fulcrum.
//!
//! Owns: what happens between the listener's admission (PROXY header, IP
//! group, TLS: all as for TCP, see `listener`) and the session: the HTTP
//! upgrade ([`upgrade`]) and the adapter that makes a WebSocket look like a
//! stream of lines ([`lines`]), so that the very same session, router, hub,
//! limits and metrics serve it. It does not parse JSON-RPC.
//!
//! WebSocket framing is tokio-tungstenite's; the HTTP request is hyper's.

pub mod lines;
pub mod upgrade;

use crate::config::{ListenEntry, ServerConfig};
use crate::limits::{Limit, SessionGate};
use crate::router::Router;
use crate::session::{self, SessionLimits, Stops};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};
use tokio_tungstenite::WebSocketStream;

pub use lines::WsLines;
pub use upgrade::UpgradeRules;

/// Read buffer of a WebSocket connection: the first allocation of every
/// idle browser session (tungstenite's default is 128 KiB), and the most
/// read from the socket at once.
const READ_BUFFER: usize = 1024;

/// Everything a `ws://` or `wss://` listener needs to upgrade and serve.
#[derive(Debug, Clone)]
pub struct WsOptions {
    pub rules: UpgradeRules,
    /// Largest message accepted: `[server] max_line_bytes`, as for a line.
    pub max_message: usize,
    /// Ping a client silent for this long (`[server] ws_ping_secs`).
    pub ping: Option<Duration>,
}

impl WsOptions {
    pub fn new(entry: &ListenEntry, server: &ServerConfig) -> WsOptions {
        WsOptions {
            rules: UpgradeRules {
                path: entry.ws_path().to_string(),
                origins: entry.origins.as_ref().map(|list| {
                    list.iter()
                        .map(|o| o.trim_end_matches('/').to_ascii_lowercase())
                        .collect()
                }),
            },
            max_message: server.max_line_bytes,
            ping: (server.ws_ping_secs > 0).then(|| Duration::from_secs(server.ws_ping_secs)),
        }
    }

    fn frame_config(&self) -> WebSocketConfig {
        WebSocketConfig::default()
            .read_buffer_size(READ_BUFFER)
            // Frames queue up to this much before they are written; a flush
            // (after every batch the session writes) sends the rest.
            .write_buffer_size(lines::FRAGMENT)
            .max_message_size(Some(self.max_message))
            .max_frame_size(Some(self.max_message))
    }
}

/// Upgrade a connection the listener has admitted (and, on `wss://`,
/// decrypted), then run its session. `transport` labels its metrics.
pub async fn serve<S>(
    stream: S,
    options: Arc<WsOptions>,
    transport: &'static str,
    router: Arc<Router>,
    limits: SessionLimits,
    stops: Stops,
    gate: SessionGate,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    // Boxed: hyper's connection state is large, and inline it would stay
    // part of this future for the whole session.
    let upgrade = tokio::time::timeout(
        limits.first_line_timeout,
        Box::pin(upgrade::accept(stream, &options.rules)),
    );
    let upgraded = tokio::select! {
        _ = stops.drain.cancelled() => return,
        r = upgrade => match r {
            Ok(Ok(io)) => io,
            Ok(Err(refused)) => {
                tracing::debug!(%refused, "WebSocket upgrade refused");
                return;
            }
            Err(_) => {
                tracing::debug!("WebSocket upgrade timed out");
                gate.refused(Limit::Handshake);
                return;
            }
        },
    };
    let ws = WebSocketStream::from_raw_socket(upgraded, Role::Server, Some(options.frame_config()))
        .await;
    tracing::debug!("WebSocket upgraded");
    let _open = router.metrics.session_opened(transport);
    // Boxed: the adapter is larger than a TCP stream, and the session's
    // future keeps room for its argument.
    let lines = Box::new(WsLines::new(ws, options.ping));
    session::run(lines, router, limits, stops, gate).await
}
