//! Wiring: from a checked [`Config`] to running coins, and back down.
//!
//! Owns: building each coin's isolated set (upstream pool, subscription hub,
//! router, listeners), the TLS acceptor configuration, the start order
//! (fresh: bind first; taking over: upstreams ready first, then the
//! predecessor's sockets, see `handoff`), and the [`Server`] handle that
//! tests and `main` hold. The stop order is `drain`'s.

use crate::admin::AdminState;
use crate::cache::Cache;
use crate::config::{CoinConfig, Config, Scheme};
use crate::drain::Drain;
use crate::handoff::{Offer, Takeover};
use crate::hub::{Hub, HubConfig};
use crate::limits::Limits;
use crate::listener::bind::Sockets;
use crate::listener::{Listener, TlsHandle};
use crate::metrics::Metrics;
use crate::router::{CoinInfo, Router};
use crate::session::{SessionLimits, Stops};
use crate::status::events::EventKind;
use crate::status::{CoinSource, Status};
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
    /// The side port's state (the status sources, the credentials).
    pub admin: Arc<AdminState>,
    /// The stop order and its tokens.
    drain: Drain,
    /// Sessions (and their connections).
    sessions: TaskTracker,
    /// Upstream supervisors, hubs, listeners.
    background: TaskTracker,
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

/// Where the listening sockets come from.
#[derive(Debug, Clone, Copy)]
pub enum Listen {
    /// Bind every listener afresh.
    Fresh,
    /// Take them over from the process serving `[server] handoff_socket`
    /// once every coin has a healthy upstream (waiting at most `wait`), so
    /// no wallet meets a proxy that cannot forward yet. With no process
    /// answering there, bind afresh.
    Takeover { wait: Duration },
}

/// Start everything the configuration describes. Upstreams connect in the
/// background; this returns once every listener is bound.
pub async fn start(config: Config) -> anyhow::Result<Server> {
    start_with(config, Listen::Fresh).await
}

/// [`start`], with the listening sockets from `listen`.
pub async fn start_with(config: Config, listen: Listen) -> anyhow::Result<Server> {
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
    let handoff_path = config.server.handoff_socket.clone();
    let mut sockets = Arc::new(Sockets::fresh());
    let mut offer = None;
    // Fresh: bind first, so a port conflict (or another instance on the
    // handoff socket) is reported before anything runs.
    let mut bound = match listen {
        Listen::Fresh => {
            if let Some(path) = &handoff_path {
                offer = Some(Offer::bind(path).map_err(anyhow::Error::msg)?);
            }
            Some(bind_all(&config, &sockets)?)
        }
        Listen::Takeover { .. } => None,
    };
    let mut parts = Vec::new();
    for (name, coin) in &config.coins {
        let coin_metrics = metrics.coin(name);
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
                protocol_max: protocol_slot(coin),
                metrics: Some(coin_metrics.clone()),
            },
            &stops.hard,
            &background,
        )
        .map_err(anyhow::Error::msg)?;
        let cache = Arc::new(Cache::new(&config.cache).with_counters(coin_metrics.read_answers()));
        let hub = Hub::start(
            HubConfig {
                coin: name.clone(),
                max_topics: coin.max_subscriptions_total,
                request_timeout: config.server.request_timeout(),
                failover_hold: config.server.failover_hold(),
                cache: Some(cache.clone()),
                journal: coin_metrics.journal.clone(),
            },
            pool.clone(),
            events,
            &stops.hard,
            &background,
        );
        parts.push((name.clone(), coin, coin_metrics, pool, hub, cache));
    }
    let mut takeover = None;
    if let Listen::Takeover { wait } = listen {
        let path = handoff_path
            .clone()
            .ok_or_else(|| anyhow::anyhow!("--takeover needs [server] handoff_socket"))?;
        let pools: Vec<_> = parts.iter().map(|p| p.3.clone()).collect();
        let ready = tokio::time::timeout(wait, async {
            while !pools.iter().all(|p| p.any_healthy()) {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await;
        if ready.is_err() {
            stops.hard.cancel();
            anyhow::bail!(
                "not ready after {wait:?} (a coin has no healthy upstream): not taking over; the running instance keeps serving"
            );
        }
        let p = path.clone();
        match tokio::task::spawn_blocking(move || Takeover::request(&p)).await? {
            Ok(Some(mut t)) => {
                sockets = Arc::new(Sockets::inherited(t.listeners()));
                tracing::info!(path = %path.display(), "took the listening sockets over");
                takeover = Some(t);
            }
            Ok(None) => {
                tracing::info!(path = %path.display(), "no running instance to take over from: binding afresh");
            }
            Err(e) => {
                stops.hard.cancel();
                anyhow::bail!("taking over through {}: {e}", path.display());
            }
        }
        bound = Some(bind_all(&config, &sockets)?);
        for addr in sockets.unclaimed() {
            tracing::warn!(%addr, "a handed-over socket this configuration does not use: closed");
        }
        sockets.drop_unclaimed();
    }
    let Some((admin_listener, mut coin_listeners)) = bound else {
        unreachable!("bound above in both cases")
    };
    let metrics_addr = admin_listener.local_addr()?;
    let mut coins = BTreeMap::new();
    for (name, coin, coin_metrics, pool, hub, cache) in parts {
        let listeners = coin_listeners.remove(&name).unwrap_or_default();
        let bound: Vec<(Scheme, SocketAddr)> =
            listeners.iter().map(|l| (l.scheme, l.local_addr)).collect();
        let router = Arc::new(Router {
            coin: name.clone(),
            pool,
            hub,
            info: coin_info(&name, coin, &config, &bound),
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
    let sources = coins
        .iter()
        .map(|(n, c)| {
            let source = CoinSource {
                router: c.router.clone(),
                listeners: c.listeners.clone(),
                max_subscriptions_total: config.coins[n].max_subscriptions_total,
                cache_max_bytes: if config.cache.enabled {
                    config.cache.max_bytes
                } else {
                    0
                },
            };
            (n.clone(), source)
        })
        .collect();
    let status = Status::new(
        metrics.clone(),
        edge.clone(),
        sources,
        config.server.server_name.clone(),
    );
    let admin = Arc::new(AdminState::new(Arc::new(status), &config.metrics));
    let drain = Drain::new(stops.clone(), admin.clone(), sockets.clone());
    background.spawn(crate::upstream::lag::probe(stops.hard.clone()));
    background.spawn(crate::admin::serve(
        admin_listener,
        admin.clone(),
        stops.hard.clone(),
        drain.admin_accept.clone(),
        background.clone(),
    ));
    tracing::info!(listen = %metrics_addr, "status page, /status.json, /metrics, /healthz and /readyz served");
    // Everything serves: only now may the predecessor stop accepting.
    if let (Some(t), Some(path)) = (takeover, handoff_path.clone()) {
        let next = tokio::task::spawn_blocking(move || t.finish(&path)).await?;
        offer = Some(next.map_err(anyhow::Error::msg)?);
    }
    if let Some(offer) = offer {
        let d = drain.clone();
        background.spawn(offer.serve(sockets.clone(), move || d.hand_over(), stops.drain.clone()));
    }
    Ok(Server {
        metrics_addr,
        metrics,
        limits: edge,
        admin,
        coins,
        drain,
        sessions,
        background,
        tls,
        config: std::sync::Mutex::new(config.clone()),
    })
}

/// The highest protocol a coin's protocol slots ask for; `None` when it is
/// what every connection asks anyway (no protocol slot).
fn protocol_slot(coin: &CoinConfig) -> Option<String> {
    let parse = |v: &str| v.parse::<crate::protocol::Version>().ok();
    (parse(&coin.upstream_protocol_max) > parse(&coin.upstream_protocol))
        .then(|| coin.upstream_protocol_max.clone())
}

/// Listeners of one coin, by coin name.
type CoinListeners = BTreeMap<String, Vec<Listener>>;

/// Bind (or claim from `sockets`) the admin port and every coin listener.
fn bind_all(
    config: &Config,
    sockets: &Sockets,
) -> anyhow::Result<(tokio::net::TcpListener, CoinListeners)> {
    let admin = crate::admin::bind(config.metrics.listen, sockets).map_err(anyhow::Error::msg)?;
    let mut coins = BTreeMap::new();
    for (name, coin) in &config.coins {
        let mut listeners = Vec::new();
        for entry in &coin.listen {
            let addr = entry.url.socket_addr().map_err(anyhow::Error::msg)?;
            let mut listener = Listener::bind(name, entry.url.scheme, addr, sockets)
                .map_err(anyhow::Error::msg)?;
            listener.proxy_protocol = entry.proxy_protocol;
            if entry.url.scheme.is_websocket() {
                listener.ws = Some(Arc::new(WsOptions::new(entry, &config.server)));
            }
            listeners.push(listener);
        }
        coins.insert(name.clone(), listeners);
    }
    Ok((admin, coins))
}

/// The `[server]` settings a pool generation is built from.
fn upstream_settings(
    s: &crate::config::ServerConfig,
) -> (u64, u64, u64, u64, u64, u32, u32, u64, u64, String) {
    (
        s.upstream_ping_secs,
        s.upstream_stall_secs,
        s.upstream_connect_timeout_secs,
        s.upstream_idle_close_secs,
        s.health_interval_ms,
        s.health_rise,
        s.health_fall,
        s.upstream_reconnect_max_ms,
        s.upstream_reply_hold_ms,
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
        let result = self.apply(new);
        let (kind, what) = match &result {
            Ok(later) if later.is_empty() => (EventKind::Reload, "configuration reloaded".into()),
            Ok(later) => (
                EventKind::Reload,
                format!(
                    "configuration reloaded; applied on restart: {}",
                    later.join(", ")
                ),
            ),
            Err(e) => (EventKind::ReloadRejected, format!("reload rejected: {e}")),
        };
        self.metrics.journal.record(kind, None, None, &what, 1);
        result
    }

    /// Read the configuration file again and [`Server::reload`] it (SIGHUP).
    pub fn reload_file(&self, path: &std::path::Path) -> Result<Vec<String>, String> {
        match Config::load(path) {
            Ok(config) => self.reload(config),
            Err(e) => {
                let what = format!("reload rejected: {e}");
                let kind = EventKind::ReloadRejected;
                self.metrics.journal.record(kind, None, None, &what, 1);
                Err(e.to_string())
            }
        }
    }

    fn apply(&self, new: Config) -> Result<Vec<String>, String> {
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
        if new.server.handoff_socket != current.server.handoff_socket {
            needs_restart.push("server.handoff_socket".to_string());
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
                || old.upstream_protocol_max != coin.upstream_protocol_max
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
                    protocol_max: protocol_slot(coin),
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
        self.admin.set_auth(&new.metrics);
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

    /// Graceful shutdown (see `drain`): `/readyz` 503 and
    /// `drain_notice_secs` of serving as usual (not after a hand-over), then
    /// stop accepting; sessions end once every request they sent is
    /// answered, within `shutdown_grace_secs`; then stop everything.
    pub async fn shutdown(self) {
        let (notice, grace) = {
            let c = self.config.lock().unwrap_or_else(|p| p.into_inner());
            (c.server.drain_notice(), c.server.shutdown_grace())
        };
        self.drain.run(notice, grace, &self.sessions).await;
        self.background.close();
        self.background.wait().await;
    }

    /// Completes once a successor has taken the listeners over (then call
    /// [`Server::shutdown`]: the sessions still drain).
    pub async fn handed_over(&self) {
        self.drain.handed_over.cancelled().await
    }

    /// A token that, cancelled, ends a shutdown in progress at once (a
    /// second SIGTERM).
    pub fn hard_stop(&self) -> CancellationToken {
        self.drain.stops.hard.clone()
    }

    /// Number of live session tasks (for tests and metrics).
    pub fn session_count(&self) -> usize {
        self.sessions.len()
    }
}
