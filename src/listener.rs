//! Accept loops: one per configured listener.
//!
//! Owns: binding, accepting without ever waiting on one client, and what
//! happens before a session: a slot among `limits.max_sessions` (taken at
//! accept), the PROXY protocol header on listeners that expect one, the
//! client's admission into its IP group (refused with an error line, or a
//! plain close on TLS and WebSocket), the TLS handshake (inside the spawned
//! task, with a timeout; its costly step on a TLS worker thread, see
//! [`handshake`]) and starting the session in a tracing span that
//! names the coin, the real client (`peer`), the balancer it came through
//! (`via`) and the transport; on `ws://` and `wss://` the session starts
//! after the WebSocket upgrade (`ws`). It does not parse anything the client
//! sends after the PROXY header (that is `ws`, `session` and `router`).

pub mod bind;
pub mod handshake;

use crate::config::Scheme;
use crate::limits::{CoinLimits, ConnPermit, GroupFull, Limit};
use crate::metrics::GaugeGuard;
use crate::proxy_protocol;
use crate::router::Router;
use crate::session::{self, SessionLimits, Stops};
use crate::ws::WsOptions;
use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::task::TaskTracker;
use tracing::Instrument;

/// The TLS configuration every `ssl://` and `wss://` listener reads at each
/// handshake, so a reload applies to new handshakes only.
pub type TlsHandle = Arc<RwLock<Arc<rustls::ServerConfig>>>;

/// One bound listener, ready to accept.
pub struct Listener {
    pub coin: String,
    pub scheme: Scheme,
    pub socket: TcpListener,
    pub local_addr: SocketAddr,
    /// Every connection starts with a PROXY protocol (v1 or v2) header.
    pub proxy_protocol: bool,
    /// `ws://` and `wss://`: how connections are upgraded and served.
    pub ws: Option<Arc<WsOptions>>,
}

impl Listener {
    /// Listen on `addr`, on a socket handed over by a predecessor when
    /// `sockets` holds one for that address (see [`bind`]).
    pub fn bind(
        coin: &str,
        scheme: Scheme,
        addr: SocketAddr,
        sockets: &bind::Sockets,
    ) -> Result<Listener, String> {
        let socket = sockets
            .listen(addr)
            .map_err(|e| format!("coin {coin}: cannot listen on {scheme}://{addr}: {e}"))?;
        let local_addr = socket.local_addr().map_err(|e| e.to_string())?;
        Ok(Listener {
            coin: coin.to_string(),
            scheme,
            socket,
            local_addr,
            proxy_protocol: false,
            ws: None,
        })
    }

    /// Accept until the drain token fires (then the socket is dropped: it
    /// closes unless a successor holds it); sessions go into `tracker`.
    /// Connections already accepted finish their PROXY header and TLS
    /// handshake and are served as draining sessions.
    pub async fn serve(
        self,
        router: Arc<Router>,
        tls: Option<TlsHandle>,
        limits: SessionLimits,
        edge: Arc<CoinLimits>,
        stops: Stops,
        tracker: TaskTracker,
    ) {
        tracing::info!(coin = %self.coin, proxy_protocol = self.proxy_protocol, listen = %format!("{}://{}", self.scheme, self.local_addr), "listening");
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
            // At max_sessions the connection is closed before anything is
            // spent on it.
            let Some(permit) = edge.connection() else {
                tracing::debug!(coin = %self.coin, %peer, "max_sessions reached: connection refused");
                continue;
            };
            let _ = stream.set_nodelay(true);
            // `peer` is the real client, known after any PROXY header.
            // At `debug`, where the session's own lines are: an enabled span
            // lives as long as the session, and the subscriber keeps its
            // fields formatted, about 0.4 KiB per idle session at `info`
            // for lines that all log at `debug`.
            let span = tracing::debug_span!(
                "session",
                coin = %self.coin,
                peer = tracing::field::Empty,
                via = tracing::field::Empty,
                transport = %self.scheme
            );
            let conn = Connection {
                stream,
                peer,
                scheme: self.scheme,
                ws: self.ws.clone(),
                proxy_protocol: self.proxy_protocol,
                permit,
                tls: tls.clone(),
                router: router.clone(),
                limits: limits.clone(),
                stops: stops.clone(),
                tracker: tracker.clone(),
            };
            // `--per-core`: each connection to the next runtime in turn
            // (its session stays there); otherwise this one.
            crate::cores::spawn_on(
                crate::cores::next(),
                tracker.track_future(conn.run().instrument(span)),
            );
        }
    }
}

struct Connection {
    stream: TcpStream,
    /// The socket's peer (the balancer, on a PROXY protocol listener).
    peer: SocketAddr,
    scheme: Scheme,
    ws: Option<Arc<WsOptions>>,
    proxy_protocol: bool,
    permit: ConnPermit,
    tls: Option<TlsHandle>,
    router: Arc<Router>,
    limits: SessionLimits,
    stops: Stops,
    /// Where the session's own task goes (see [`Connection::start_session`]).
    tracker: TaskTracker,
}

impl Connection {
    async fn run(mut self) {
        let span = tracing::Span::current();
        let mut client = self.peer;
        if self.proxy_protocol {
            let read = tokio::time::timeout(
                self.limits.first_line_timeout,
                proxy_protocol::read_header(&mut self.stream),
            );
            let header = tokio::select! {
                _ = self.stops.hard.cancelled() => return,
                r = read => r,
            };
            match header {
                Ok(Ok(h)) => client = h.client(self.peer),
                Ok(Err(e)) => {
                    span.record("via", tracing::field::display(self.peer));
                    tracing::debug!(error = %e, "PROXY header refused: closing");
                    self.permit.coin().hit(Limit::ProxyHeader);
                    return;
                }
                Err(_) => {
                    span.record("via", tracing::field::display(self.peer));
                    tracing::debug!("no PROXY header in time: closing");
                    self.permit.coin().hit(Limit::ProxyHeader);
                    return;
                }
            }
            span.record("via", tracing::field::display(self.peer));
        }
        span.record("peer", tracing::field::display(client));
        tracing::debug!("connection accepted");
        let gate = match self.permit.admit(client.ip()) {
            Ok(gate) => gate,
            Err(full) => {
                tracing::debug!(group = %full.group, "too many sessions from this group: refused");
                if self.scheme == Scheme::Tcp {
                    // Boxed: its 4 KiB read buffer would otherwise be part
                    // of every session's task.
                    Box::pin(refuse(self.stream, full)).await;
                }
                return;
            }
        };
        let transport = self.scheme.as_str();
        match self.tls {
            None => match self.ws {
                None => {
                    let open = self.router.metrics.session_opened(transport);
                    let run = session::run(self.stream, self.router, self.limits, self.stops, gate);
                    start_session(&self.tracker, run, open);
                }
                // Boxed, as TLS below: WebSocket states off every TCP task.
                Some(ws) => {
                    Box::pin(crate::ws::serve(
                        self.stream,
                        ws,
                        transport,
                        self.router,
                        self.limits,
                        self.stops,
                        gate,
                    ))
                    .await
                }
            },
            Some(handle) => {
                let config = handle.read().unwrap_or_else(|p| p.into_inner()).clone();
                // The TLS states live on the heap: inline, they would make
                // every session's task (plain TCP ones too) about 1.2 KB
                // larger, and idle wallets are the common case.
                let handshake = tokio::time::timeout(
                    self.limits.first_line_timeout,
                    Box::pin(handshake::accept(self.stream, config)),
                );
                let stream = tokio::select! {
                    _ = self.stops.hard.cancelled() => return,
                    r = handshake => match r {
                        Ok(Ok(s)) => s,
                        Ok(Err(e)) => {
                            tracing::debug!(error = %e, "TLS handshake failed");
                            return;
                        }
                        Err(_) => {
                            tracing::debug!("TLS handshake timed out");
                            gate.refused(Limit::Handshake);
                            return;
                        }
                    },
                };
                if let Some(ws) = self.ws {
                    return Box::pin(crate::ws::serve(
                        stream,
                        ws,
                        transport,
                        self.router,
                        self.limits,
                        self.stops,
                        gate,
                    ))
                    .await;
                }
                let open = self.router.metrics.session_opened(transport);
                let run = session::run(stream, self.router, self.limits, self.stops, gate);
                start_session(&self.tracker, run, open);
            }
        }
    }
}

/// Run a session in a task of its own, in the connection's span, the
/// connection's task ending here. Its task is sized for the session alone:
/// awaited inside the connection's task, the session would carry the
/// connection's own state (PROXY header, admission, the TLS handshake) for
/// its whole life, about 0.6 KiB more per idle session.
fn start_session<F>(tracker: &TaskTracker, run: F, open: GaugeGuard)
where
    F: std::future::Future<Output = ()> + Send + 'static,
{
    use futures_util::FutureExt;
    // The guard (the open-sessions gauge) lives as long as the session.
    let run = run.inspect(move |_| drop(open));
    tracker.spawn(run.instrument(tracing::Span::current()));
}

/// Tell a plain-TCP client why it is refused, then close without a reset
/// (reading what it sent meanwhile, briefly and boundedly, so the error line
/// is not lost to a RST).
async fn refuse(mut stream: TcpStream, full: GroupFull) {
    const LINGER: Duration = Duration::from_secs(1);
    let mut line = full.error_line();
    line.push(b'\n');
    let _ = tokio::time::timeout(LINGER, async {
        stream.write_all(&line).await?;
        stream.shutdown().await?;
        let mut sink = [0u8; 4096];
        let mut left = 64 * 1024;
        while left > 0 {
            match stream.read(&mut sink).await? {
                0 => break,
                n => left -= n.min(left),
            }
        }
        Ok::<_, std::io::Error>(())
    })
    .await;
}
