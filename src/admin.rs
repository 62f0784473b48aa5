//! The side HTTP port: `/metrics`, `/healthz`, `/readyz`.
//!
//! Owns: the small HTTP/1 server (hyper) on `[metrics] listen` and what each
//! path answers. Values that live in pools, hubs and caches (upstream state,
//! subscriptions) are read into the metrics at scrape time; everything else
//! is counted where it happens. While the process drains, `/readyz`
//! answers 503 so that balancers stop sending it new connections.

use crate::listener::bind::Sockets;
use crate::metrics::Metrics;
use crate::router::Router;
use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Move a Prometheus counter up to a count kept elsewhere.
fn follow(counter: &prometheus::IntCounter, count: u64) {
    let seen = counter.get();
    if count > seen {
        counter.inc_by(count - seen);
    }
}

/// What the admin port reads from.
pub struct AdminState {
    pub metrics: Arc<Metrics>,
    pub routers: BTreeMap<String, Arc<Router>>,
    /// Set once when the process starts draining; never cleared.
    pub draining: AtomicBool,
}

impl AdminState {
    /// Copy scrape-time values (upstreams, subscriptions) into the metrics.
    fn refresh(&self) {
        let m = &self.metrics;
        for (coin, router) in &self.routers {
            for u in router.pool.status() {
                let labels = [coin.as_str(), u.url.as_str()];
                m.upstream_up
                    .with_label_values(&labels)
                    .set(u.healthy as i64);
                m.upstream_height
                    .with_label_values(&labels)
                    .set(u.height as i64);
                m.upstream_in_flight
                    .with_label_values(&labels)
                    .set(u.in_flight as i64);
                m.upstream_connections
                    .with_label_values(&labels)
                    .set(u.ready_connections as i64);
            }
            let stats = &router.hub.stats;
            m.subscriptions
                .with_label_values(&[coin, "upstream"])
                .set(stats.upstream_subscriptions.load(Ordering::Relaxed) as i64);
            m.subscriptions
                .with_label_values(&[coin, "session"])
                .set(stats.session_subscriptions.load(Ordering::Relaxed) as i64);
            m.subscriptions
                .with_label_values(&[coin, "held"])
                .set(stats.held_statuses.load(Ordering::Relaxed) as i64);
            // The hub counts fan-out itself; the counter follows it.
            follow(
                &router.metrics.notifications,
                stats.notifications.load(Ordering::Relaxed),
            );
            // So does the cache.
            let cache = &router.cache;
            let cs = &cache.stats;
            for (result, n) in [
                ("hit", &cs.hits),
                ("miss", &cs.misses),
                ("coalesced", &cs.coalesced),
            ] {
                follow(
                    &m.cache_requests.with_label_values(&[coin, result]),
                    n.load(Ordering::Relaxed),
                );
            }
            follow(
                &m.cache_reorgs.with_label_values(&[coin]),
                cs.reorgs.load(Ordering::Relaxed),
            );
            m.cache_entries
                .with_label_values(&[coin])
                .set(cache.len() as i64);
            m.cache_bytes
                .with_label_values(&[coin])
                .set(cache.bytes() as i64);
        }
    }

    /// Coins without a healthy upstream.
    pub fn coins_without_upstream(&self) -> Vec<String> {
        self.routers
            .iter()
            .filter(|(_, r)| !r.pool.any_healthy())
            .map(|(c, _)| c.clone())
            .collect()
    }

    fn answer(&self, req: &Request<hyper::body::Incoming>) -> Response<Full<Bytes>> {
        let reply = |status: StatusCode, ctype: &str, body: String| {
            Response::builder()
                .status(status)
                .header("content-type", ctype)
                .body(Full::new(Bytes::from(body)))
                .expect("valid response")
        };
        if req.method() != Method::GET && req.method() != Method::HEAD {
            return reply(
                StatusCode::METHOD_NOT_ALLOWED,
                "text/plain",
                "GET only\n".into(),
            );
        }
        match req.uri().path() {
            "/metrics" => {
                self.refresh();
                reply(
                    StatusCode::OK,
                    "text/plain; version=0.0.4",
                    self.metrics.render(),
                )
            }
            "/healthz" => reply(StatusCode::OK, "text/plain", "ok\n".into()),
            "/readyz" => {
                let missing = self.coins_without_upstream();
                if self.draining.load(Ordering::Acquire) {
                    reply(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "application/json",
                        "{\"ready\":false,\"draining\":true}\n".into(),
                    )
                } else if missing.is_empty() {
                    reply(
                        StatusCode::OK,
                        "application/json",
                        "{\"ready\":true}\n".into(),
                    )
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
            _ => reply(StatusCode::NOT_FOUND, "text/plain", "not found\n".into()),
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
/// connections until `shutdown`.
pub async fn serve(
    listener: TcpListener,
    state: Arc<AdminState>,
    shutdown: CancellationToken,
    accepting: CancellationToken,
    tracker: TaskTracker,
) {
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
