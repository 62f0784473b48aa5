//! Wiring: from a checked [`Config`] to running coins, and back down.
//!
//! Owns: building each coin's isolated set (upstream pool, subscription hub,
//! router, listeners), the TLS acceptor configuration, the order of a
//! graceful shutdown (stop accepting and reading; let in-flight requests
//! finish within the grace period; then stop upstreams), and the [`Server`]
//! handle that tests and `main` hold.

use crate::admin::AdminState;
use crate::cache::Cache;
use crate::config::{CoinConfig, Config, Scheme};
use crate::hub::{Hub, HubConfig};
use crate::limits::Limits;
use crate::listener::{Listener, TlsHandle};
use crate::metrics::Metrics;
use crate::router::{CoinInfo, Router};
use crate::session::{SessionLimits, Stops};
use crate::upstream::health::HealthRules;
use crate::upstream::pool::PoolOptions;
use crate::upstream::{Pool, UpstreamStatus};
use crate::ws::WsOptions;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// One running coin.
pub struct CoinHandle {
    pub router: Arc<Router>,
    /// Bound listener addresses (the real ports when the config said 0).
    pub listeners: Vec<(Scheme, SocketAddr)>,
}

/// A running proxy.
pub struct Server {
    pub coins: BTreeMap<String, CoinHandle>,
    /// Bound address of the side HTTP port.
    pub metrics_addr: SocketAddr,
    pub metrics: Arc<Metrics>,
    /// Connection slots and IP groups, shared by every coin.
    pub limits: Arc<Limits>,
    stops: Stops,
    /// Sessions (and their connections).
    sessions: TaskTracker,
    /// Upstream supervisors, hubs, listeners.
    background: TaskTracker,
    grace: Duration,
    tls: Option<TlsHandle>,
    /// The configuration now in force (replaced by a successful reload).
    config: std::sync::Mutex<Config>,
}

/// Load every file the configuration names (TLS certificate and key, CA
/// files of `ssl://` upstreams) without opening a socket: what `--check`
/// and a reload verify before anything runs.
pub fn preflight(config: &Config) -> Result<(), String> {
    if let Some(files) = &config.tls {
        crate::tls::server_config(files).map_err(|e| format!("tls: {e}"))?;
    }
    for (name, coin) in &config.coins {
        for (i, u) in coin.upstreams.iter().enumerate() {
            crate::upstream::connect::Dialer::new(u.clone())
                .map_err(|e| format!("coins.{name}.upstreams[{i}]: {e}"))?;
        }
    }
    Ok(())
}

/// Start everything the configuration describes. Upstreams connect in the
/// background; this returns once every listener is bound.
pub async fn start(config: Config) -> anyhow::Result<Server> {
    let stops = Stops {
        drain: CancellationToken::new(),
        hard: CancellationToken::new(),
    };
    let sessions = TaskTracker::new();
    let background = TaskTracker::new();
    let tls: Option<TlsHandle> = match &config.tls {
        Some(files) => Some(Arc::new(RwLock::new(
            crate::tls::server_config(files).map_err(|e| anyhow::anyhow!("[tls]: {e}"))?,
        ))),
        None => None,
    };
    let limits = SessionLimits {
        max_line: config.server.max_line_bytes,
        queue: config.server.session_queue,
        first_line_timeout: config.server.handshake_timeout(),
        idle_timeout: config.server.idle_timeout(),
    };

    let metrics = Metrics::new();
    let edge = Limits::new(&config.limits, &metrics.registry);
    // Bind the side port first: a port conflict is reported before anything runs.
    let admin_listener = crate::admin::bind(config.metrics.listen)
        .await
        .map_err(anyhow::Error::msg)?;
    let metrics_addr = admin_listener.local_addr()?;
    let mut coins = BTreeMap::new();
    for (name, coin) in &config.coins {
        let coin_metrics = metrics.coin(name);
        let mut listeners = Vec::new();
        for entry in &coin.listen {
            let addr = entry.url.socket_addr().map_err(anyhow::Error::msg)?;
            let mut listener = Listener::bind(name, entry.url.scheme, addr)
                .await
                .map_err(anyhow::Error::msg)?;
            listener.proxy_protocol = entry.proxy_protocol;
            if entry.url.scheme.is_websocket() {
                listener.ws = Some(Arc::new(WsOptions::new(entry, &config.server)));
            }
            listeners.push(listener);
        }
        let (pool, events) = Pool::start(
            name,
            &coin.upstreams,
            &config.server,
            PoolOptions {
                rules: HealthRules {
                    interval: Duration::from_millis(config.server.health_interval_ms),
                    rise: config.server.health_rise,
                    fall: config.server.health_fall,
                    max_lag: coin.max_lag,
                },
                protocol: coin.upstream_protocol.clone(),
                metrics: Some(coin_metrics.clone()),
            },
            &stops.hard,
            &background,
        )
        .map_err(anyhow::Error::msg)?;
        let cache = Arc::new(Cache::new(&config.cache));
        let hub = Hub::start(
            HubConfig {
                coin: name.clone(),
                max_topics: coin.max_subscriptions_total,
                request_timeout: config.server.request_timeout(),
                failover_hold: config.server.failover_hold(),
                cache: Some(cache.clone()),
            },
            pool.clone(),
            events,
            &stops.hard,
            &background,
        );
        let bound: Vec<(Scheme, SocketAddr)> =
            listeners.iter().map(|l| (l.scheme, l.local_addr)).collect();
        let router = Arc::new(Router {
            coin: name.clone(),
            pool,
            hub,
            info: coin_info(name, coin, &config, &bound),
            request_timeout: config.server.request_timeout(),
            max_batch: config.server.max_batch,
            max_subs_per_session: coin.max_subscriptions_per_session,
            metrics: coin_metrics,
            cache,
        });
        for l in listeners {
            let tls = if l.scheme.is_tls() { tls.clone() } else { None };
            background.spawn(l.serve(
                router.clone(),
                tls,
                limits.clone(),
                edge.for_coin(router.metrics.clone()),
                stops.clone(),
                sessions.clone(),
            ));
        }
        coins.insert(
            name.clone(),
            CoinHandle {
                router,
                listeners: bound,
            },
        );
    }
    let admin = Arc::new(AdminState {
        metrics: metrics.clone(),
        routers: coins
            .iter()
            .map(|(n, c)| (n.clone(), c.router.clone()))
            .collect(),
    });
    background.spawn(crate::admin::serve(
        admin_listener,
        admin,
        stops.hard.clone(),
        background.clone(),
    ));
    tracing::info!(listen = %metrics_addr, "metrics, /healthz and /readyz served");
    Ok(Server {
        metrics_addr,
        metrics,
        limits: edge,
        coins,
        stops,
        sessions,
        background,
        grace: config.server.shutdown_grace(),
        tls,
        config: std::sync::Mutex::new(config.clone()),
    })
}

/// The `[server]` settings a pool generation is built from.
fn upstream_settings(
    s: &crate::config::ServerConfig,
) -> (u64, u64, u64, u64, u64, u32, u32, u64, String) {
    (
        s.upstream_ping_secs,
        s.upstream_stall_secs,
        s.upstream_connect_timeout_secs,
        s.upstream_idle_close_secs,
        s.health_interval_ms,
        s.health_rise,
        s.health_fall,
        s.upstream_reconnect_max_ms,
        s.server_name.clone(),
    )
}

fn coin_info(
    name: &str,
    coin: &CoinConfig,
    config: &Config,
    bound: &[(Scheme, SocketAddr)],
) -> CoinInfo {
    let port = |scheme| {
        bound
            .iter()
            .find(|(s, _)| *s == scheme)
            .map(|(_, a)| a.port())
    };
    let host = coin.hostname.clone().unwrap_or_else(|| "localhost".into());
    let mut ports = serde_json::Map::new();
    if let Some(p) = port(Scheme::Tcp) {
        ports.insert("tcp_port".into(), p.into());
    }
    if let Some(p) = port(Scheme::Ssl) {
        ports.insert("ssl_port".into(), p.into());
    }
    // As ElectrumX reports its WebSocket services.
    if let Some(p) = port(Scheme::Ws) {
        ports.insert("ws_port".into(), p.into());
    }
    if let Some(p) = port(Scheme::Wss) {
        ports.insert("wss_port".into(), p.into());
    }
    let hosts = serde_json::json!({ host: ports }).to_string();
    let versions = match (
        coin.p2pkh_version,
        coin.p2sh_version,
        crate::coin::builtin_versions(name),
    ) {
        (Some(p2pkh), Some(p2sh), _) => Some(crate::coin::AddressVersions { p2pkh, p2sh }),
        (p2pkh, p2sh, Some(b)) => Some(crate::coin::AddressVersions {
            p2pkh: p2pkh.unwrap_or(b.p2pkh),
            p2sh: p2sh.unwrap_or(b.p2sh),
        }),
        _ => None,
    };
    CoinInfo {
        server_name: config.server.server_name.clone(),
        banner: coin.banner.clone().unwrap_or_else(|| {
            format!("Welcome to {name}, served by {}", config.server.server_name)
        }),
        donation_address: coin.donation_address.clone().unwrap_or_default(),
        hosts,
        genesis_hash: coin.genesis_hash.clone(),
        address_versions: versions,
    }
}

impl Server {
    /// The bound address of a coin's first listener of `scheme`.
    pub fn addr(&self, coin: &str, scheme: Scheme) -> Option<SocketAddr> {
        self.coins
            .get(coin)?
            .listeners
            .iter()
            .find(|(s, _)| *s == scheme)
            .map(|(_, a)| *a)
    }

    /// Upstream status per coin.
    pub fn upstreams(&self) -> BTreeMap<String, Vec<UpstreamStatus>> {
        self.coins
            .iter()
            .map(|(name, c)| (name.clone(), c.router.pool.status()))
            .collect()
    }

    /// Apply a new configuration without dropping client sessions: TLS
    /// certificates are re-read (new handshakes get them) and every coin
    /// whose upstreams changed gets a new upstream set. Everything is checked
    /// before anything changes: an error leaves the running proxy as it was.
    /// `[limits]` apply to new connections and to every session's next
    /// request (a session keeps the in-flight and reply-size limits it was
    /// opened with). Returns what could not be applied live (listeners,
    /// added or removed coins, the cache): those need a restart.
    pub fn reload(&self, new: Config) -> Result<Vec<String>, String> {
        let mut current = self.config.lock().unwrap_or_else(|p| p.into_inner());
        let tls = match (&new.tls, &self.tls) {
            (Some(files), Some(_)) => {
                Some(crate::tls::server_config(files).map_err(|e| format!("[tls]: {e}"))?)
            }
            (Some(_), None) => {
                return Err("[tls]: TLS listeners cannot be added by a reload; restart".into())
            }
            (None, _) => None,
        };
        // Check every upstream entry (TLS options, CA files) before applying.
        for (name, coin) in &new.coins {
            for (i, u) in coin.upstreams.iter().enumerate() {
                crate::upstream::connect::Dialer::new(u.clone())
                    .map_err(|e| format!("coins.{name}.upstreams[{i}]: {e}"))?;
            }
        }
        let mut needs_restart = Vec::new();
        if new.metrics.listen != current.metrics.listen {
            needs_restart.push("metrics.listen".to_string());
        }
        if new.cache != current.cache {
            needs_restart.push("cache".to_string());
        }
        if new.server.failover_hold_ms != current.server.failover_hold_ms {
            needs_restart.push("server.failover_hold_ms".to_string());
        }
        for name in current.coins.keys().filter(|n| !new.coins.contains_key(*n)) {
            needs_restart.push(format!("coins.{name} (removed)"));
        }
        for (name, coin) in &new.coins {
            let Some(old) = current.coins.get(name) else {
                needs_restart.push(format!("coins.{name} (added)"));
                continue;
            };
            if old.listen != coin.listen {
                needs_restart.push(format!("coins.{name}.listen"));
            }
            let changed = old.upstreams != coin.upstreams
                || old.upstream_protocol != coin.upstream_protocol
                || old.max_lag != coin.max_lag
                || upstream_settings(&current.server) != upstream_settings(&new.server);
            if changed {
                let router = &self.coins[name].router;
                let options = PoolOptions {
                    rules: HealthRules {
                        interval: Duration::from_millis(new.server.health_interval_ms),
                        rise: new.server.health_rise,
                        fall: new.server.health_fall,
                        max_lag: coin.max_lag,
                    },
                    protocol: coin.upstream_protocol.clone(),
                    metrics: Some(router.metrics.clone()),
                };
                router.pool.reconfigure(
                    &coin.upstreams,
                    &new.server,
                    options,
                    new.server.request_timeout(),
                )?;
                tracing::info!(coin = %name, upstreams = coin.upstreams.len(), "upstream set replaced");
            }
        }
        if let Some(config) = tls {
            self.set_tls(config);
            tracing::info!("TLS certificate reloaded: new handshakes use it");
        }
        if new.limits != current.limits {
            self.limits.reload(&new.limits);
            tracing::info!(
                "[limits] reloaded: new connections and every session's next request use them"
            );
        }
        for what in &needs_restart {
            tracing::warn!(setting = %what, "changed in the configuration but only applied on restart");
        }
        *current = new;
        Ok(needs_restart)
    }

    /// Replace the certificate served to new TLS handshakes.
    pub fn set_tls(&self, config: Arc<rustls::ServerConfig>) -> bool {
        match &self.tls {
            Some(handle) => {
                *handle.write().unwrap_or_else(|p| p.into_inner()) = config;
                true
            }
            None => false,
        }
    }

    /// Graceful shutdown: stop accepting and reading, give in-flight
    /// requests the grace period, then stop everything.
    pub async fn shutdown(self) {
        self.stops.drain.cancel();
        self.sessions.close();
        if tokio::time::timeout(self.grace, self.sessions.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                sessions = self.sessions.len(),
                "grace period over with requests still in flight: closing them"
            );
        }
        self.stops.hard.cancel();
        self.sessions.wait().await;
        self.background.close();
        self.background.wait().await;
    }

    /// Number of live session tasks (for tests and metrics).
    pub fn session_count(&self) -> usize {
        self.sessions.len()
    }
}
