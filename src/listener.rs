//! Accept loops: one per configured listener.
//!
//! Owns: binding, accepting without ever waiting on one client, the TLS
//! handshake (inside the spawned task, with a timeout) and starting a session
//! in a tracing span that names the coin, the peer and the transport. It does
//! not parse anything the client sends (that is `session` and `router`).

use crate::config::Scheme;
use crate::router::Router;
use crate::session::{self, SessionLimits, Stops};
use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::task::TaskTracker;
use tracing::Instrument;

/// The TLS configuration every `ssl://` listener reads at each handshake, so
/// a reload applies to new handshakes only.
pub type TlsHandle = Arc<RwLock<Arc<rustls::ServerConfig>>>;

/// One bound listener, ready to accept.
pub struct Listener {
    pub coin: String,
    pub scheme: Scheme,
    pub socket: TcpListener,
    pub local_addr: SocketAddr,
}

impl Listener {
    pub async fn bind(coin: &str, scheme: Scheme, addr: SocketAddr) -> Result<Listener, String> {
        let socket = TcpListener::bind(addr)
            .await
            .map_err(|e| format!("coin {coin}: cannot listen on {scheme}://{addr}: {e}"))?;
        let local_addr = socket.local_addr().map_err(|e| e.to_string())?;
        Ok(Listener {
            coin: coin.to_string(),
            scheme,
            socket,
            local_addr,
        })
    }

    /// Accept until the drain token fires; sessions go into `tracker`.
    pub async fn serve(
        self,
        router: Arc<Router>,
        tls: Option<TlsHandle>,
        limits: SessionLimits,
        stops: Stops,
        tracker: TaskTracker,
    ) {
        tracing::info!(coin = %self.coin, listen = %format!("{}://{}", self.scheme, self.local_addr), "listening");
        loop {
            let accepted = tokio::select! {
                _ = stops.drain.cancelled() => break,
                r = self.socket.accept() => r,
            };
            let (stream, peer) = match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and the like: do not spin.
                    tracing::warn!(coin = %self.coin, error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let _ = stream.set_nodelay(true);
            let span = tracing::info_span!("session", coin = %self.coin, peer = %peer, transport = %self.scheme);
            let conn = Connection {
                stream,
                tls: tls.clone(),
                router: router.clone(),
                limits: limits.clone(),
                stops: stops.clone(),
            };
            tracker.spawn(conn.run().instrument(span));
        }
    }
}

struct Connection {
    stream: TcpStream,
    tls: Option<TlsHandle>,
    router: Arc<Router>,
    limits: SessionLimits,
    stops: Stops,
}

impl Connection {
    async fn run(self) {
        tracing::debug!("connection accepted");
        match self.tls {
            None => {
                let _open = self.router.metrics.session_opened("tcp");
                session::run(self.stream, self.router, self.limits, self.stops).await
            }
            Some(handle) => {
                let config = handle.read().unwrap_or_else(|p| p.into_inner()).clone();
                let acceptor = tokio_rustls::TlsAcceptor::from(config);
                let handshake = tokio::time::timeout(
                    self.limits.first_line_timeout,
                    acceptor.accept(self.stream),
                );
                let stream = tokio::select! {
                    _ = self.stops.drain.cancelled() => return,
                    r = handshake => match r {
                        Ok(Ok(s)) => s,
                        Ok(Err(e)) => {
                            tracing::debug!(error = %e, "TLS handshake failed");
                            return;
                        }
                        Err(_) => {
                            tracing::debug!("TLS handshake timed out");
                            return;
                        }
                    },
                };
                let _open = self.router.metrics.session_opened("ssl");
                session::run(stream, self.router, self.limits, self.stops).await
            }
        }
    }
}
