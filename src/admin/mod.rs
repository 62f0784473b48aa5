//! The side HTTP port: the status page, `/status.json`, `/metrics`,
//! `/healthz`, `/readyz`.
//!
//! Owns: the small HTTP/1 server (hyper) on `[metrics] listen`, what each
//! path answers, and who may ask (`auth`: optional basic auth, replaced on
//! reload). What is shown comes from one `status::Snapshot` per request:
//! `/status.json` serializes it, the page (`/`) fetches it, and `/metrics`
//! writes it into the scrape-time series (`scrape`) before rendering, so
//! the three never disagree. The data itself is `status`'s. While the
//! process drains, `/readyz` answers 503 so that balancers stop sending it
//! new connections.
//!
//! Layout: this file serves and routes; `auth` checks credentials;
//! `scrape` writes a snapshot into Prometheus series.

pub mod auth;
mod scrape;

use crate::config::MetricsConfig;
use crate::listener::bind::Sockets;
use crate::status::{page, Status};
use arc_swap::ArcSwapOption;
use auth::Auth;
use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// The page runs only its own inline script and style, talks only to this
/// origin, and may not be framed.
const PAGE_POLICY: &str = "default-src 'none'; script-src 'unsafe-inline'; \
    style-src 'unsafe-inline'; connect-src 'self'; img-src data:; \
    base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// What the admin port reads from.
pub struct AdminState {
    pub status: Arc<Status>,
    /// `None`: no credentials configured, every path is open.
    auth: ArcSwapOption<Auth>,
    /// Set once when the process starts draining; never cleared.
    pub draining: AtomicBool,
}

type Reply = Response<Full<Bytes>>;

fn reply(status: StatusCode, ctype: &str, body: impl Into<Bytes>) -> Reply {
    Response::builder()
        .status(status)
        .header("content-type", ctype)
        .header("cache-control", "no-store")
        .body(Full::new(body.into()))
        .expect("valid response")
}

impl AdminState {
    pub fn new(status: Arc<Status>, config: &MetricsConfig) -> AdminState {
        AdminState {
            status,
            auth: ArcSwapOption::from(Auth::from_config(config).map(Arc::new)),
            draining: AtomicBool::new(false),
        }
    }

    /// Apply the credentials of a new (checked) `[metrics]` table.
    pub fn set_auth(&self, config: &MetricsConfig) {
        self.auth.store(Auth::from_config(config).map(Arc::new));
    }

    /// Coins without a healthy upstream.
    pub fn coins_without_upstream(&self) -> Vec<String> {
        self.status
            .coins
            .iter()
            .filter(|(_, c)| !c.router.pool.any_healthy())
            .map(|(name, _)| name.clone())
            .collect()
    }

    fn answer(&self, req: &Request<hyper::body::Incoming>) -> Reply {
        if req.method() != Method::GET && req.method() != Method::HEAD {
            return reply(StatusCode::METHOD_NOT_ALLOWED, "text/plain", "GET only\n");
        }
        let path = req.uri().path();
        if let Some(auth) = self.auth.load().as_ref() {
            let header = req
                .headers()
                .get(hyper::header::AUTHORIZATION)
                .map(|v| v.as_bytes());
            if !auth.is_open(path) && !auth.accepts(header) {
                let mut r = reply(
                    StatusCode::UNAUTHORIZED,
                    "text/plain",
                    "credentials required\n",
                );
                r.headers_mut().insert(
                    hyper::header::WWW_AUTHENTICATE,
                    hyper::header::HeaderValue::from_static(
                        "Basic realm=\"electrum-lb\", charset=\"UTF-8\"",
                    ),
                );
                return r;
            }
        }
        match path {
            "/" => {
                let mut r = reply(StatusCode::OK, "text/html; charset=utf-8", page::PAGE);
                let h = r.headers_mut();
                h.insert(
                    "content-security-policy",
                    hyper::header::HeaderValue::from_static(PAGE_POLICY),
                );
                h.insert(
                    "x-content-type-options",
                    hyper::header::HeaderValue::from_static("nosniff"),
                );
                r
            }
            "/status.json" => {
                let snap = self.status.snapshot();
                scrape::refresh(&self.status, &snap);
                let body = serde_json::to_vec(&snap).unwrap_or_default();
                reply(StatusCode::OK, "application/json", body)
            }
            "/metrics" => {
                let snap = self.status.snapshot();
                scrape::refresh(&self.status, &snap);
                reply(
                    StatusCode::OK,
                    "text/plain; version=0.0.4",
                    self.status.metrics.render(),
                )
            }
            "/healthz" => reply(StatusCode::OK, "text/plain", "ok\n"),
            "/readyz" => {
                let missing = self.coins_without_upstream();
                if self.status.metrics.draining.get() != 0 {
                    reply(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "application/json",
                        "{\"ready\":false,\"draining\":true}\n",
                    )
                } else if missing.is_empty() {
                    reply(StatusCode::OK, "application/json", "{\"ready\":true}\n")
                } else {
                    let body =
                        serde_json::json!({"ready": false, "coins_without_upstream": missing});
                    reply(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "application/json",
                        format!("{body}\n"),
                    )
                }
            }
            _ => reply(StatusCode::NOT_FOUND, "text/plain", "not found\n"),
        }
    }
}

/// Bind the admin port (on the predecessor's socket after a hand-over).
pub fn bind(addr: SocketAddr, sockets: &Sockets) -> Result<TcpListener, String> {
    sockets
        .listen(addr)
        .map_err(|e| format!("metrics.listen: cannot listen on {addr}: {e}"))
}

/// Serve HTTP: accept until `accepting` or `shutdown` fires (a hand-over
/// stops accepting: the successor answers on this port), answer open
/// connections until `shutdown`; the status sampler runs alongside.
pub async fn serve(
    listener: TcpListener,
    state: Arc<AdminState>,
    shutdown: CancellationToken,
    accepting: CancellationToken,
    tracker: TaskTracker,
) {
    tracker.spawn(state.status.clone().run_sampler(shutdown.clone()));
    loop {
        let (stream, _) = tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = accepting.cancelled() => break,
            r = listener.accept() => match r {
                Ok(a) => a,
                Err(_) => continue,
            },
        };
        let state = state.clone();
        let stop = shutdown.clone();
        tracker.spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let state = state.clone();
                async move { Ok::<_, Infallible>(state.answer(&req)) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service);
            tokio::select! {
                _ = conn => {}
                _ = stop.cancelled() => {}
            }
        });
    }
}
