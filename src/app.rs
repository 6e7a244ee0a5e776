//! `Application`: open the store, bind the port, serve until told to stop, then drain.
//!
//! Drain order on shutdown: stop accepting HTTP while socket.io closes every socket (their
//! disconnects are recorded in the store), let in-flight `/send` requests finish, then flush the
//! store. `server.shutdown_timeout_secs` bounds the whole sequence. `/readyz` fails from the
//! moment the drain starts.
//!
//! A vital component that dies (the store after a failed sync or a panic of its writer, the task
//! recording acks) stops the process the same way, and `run_until_stopped` then returns the
//! failure: `main` exits non-zero, systemd restarts the service, and recovery replays the log.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::Context;
use axum::serve::ListenerExt;
use axum::Router;
use socketioxide::SocketIo;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::admin::History;
use crate::callbacks::Callbacks;
use crate::config::{Config, Sources, StoreConfig};
use crate::delivery::{now_ms, Delivery, Settings};
use crate::http::{self, AppState, RateLimiter};
use crate::net;
use crate::realtime;
use crate::relay::Relay;
use crate::reload::Reloader;
use crate::sites::Sites;
use crate::store::{MemoryStore, RedisStore, SledStore, Store};
use crate::tls::TlsListener;

/// A built, bound, not yet serving instance.
pub struct Application {
    listener: TcpListener,
    router: Router,
    admin: Option<(TcpListener, Router)>,
    state: AppState,
    io: SocketIo,
    sled: Option<SledStore>,
}

impl Application {
    /// Opens the store, wires the services and binds the listen addresses. With `sources`, the
    /// configuration can be reloaded (SIGHUP, admin API) from the same sources.
    pub async fn build(config: Config, sources: Option<Sources>) -> anyhow::Result<Self> {
        for warning in &config.warnings {
            tracing::warn!("{warning}");
        }
        crate::metrics::install();
        let server = Arc::new(config.server.clone());
        let mut relay = None;
        let (store, sled): (Arc<dyn Store>, _) = match &config.store {
            _ if server.ephemeral => {
                tracing::warn!("ephemeral store: nothing survives a restart");
                (Arc::new(MemoryStore::new()), None)
            }
            StoreConfig::Redis(redis) => {
                let options = redis.options();
                let store = RedisStore::open(options.clone()).await.context("cannot reach Redis")?;
                let joined = Relay::start(&options.target, &options.prefix, store.node())
                    .await
                    .context("cannot reach Redis for the relay between nodes")?;
                relay = Some(joined);
                tracing::info!(node = store.node(), cluster = redis.cluster, key_prefix = %redis.key_prefix, "store on Redis");
                (Arc::new(store), None)
            }
            StoreConfig::Sled => {
                let (dir, cache, min_free) = (server.data_dir.clone(), server.cache_bytes, server.min_free_disk_bytes);
                let sled = tokio::task::spawn_blocking(move || {
                    std::fs::create_dir_all(&dir)?;
                    SledStore::open(&dir, cache, min_free).map_err(anyhow::Error::from)
                })
                .await?
                .with_context(|| {
                    format!(
                        "cannot open the store in {dir}; `sio-push verify --data-dir {dir}` checks it, and \
                         `sio-push restore --force` puts the last backup in its place",
                        dir = server.data_dir.display()
                    )
                })?;
                let left_connected = sled.disconnect_all(now_ms()).await?;
                tracing::info!(data_dir = %server.data_dir.display(), devices_left_connected = left_connected, "store open");
                (Arc::new(sled.clone()), Some(sled))
            }
        };

        let callbacks = Callbacks::new(&server).context("cannot build the HTTP client")?;
        let (layer, io) = realtime::layer(&server);
        let settings = Settings {
            device_ttl: server.device_ttl,
            queue_limits: server.queue_limits,
            max_message_bytes: server.max_message_bytes,
            idempotency_window: server.idempotency_window,
            max_sockets_per_device: server.max_sockets_per_device,
            max_devices_per_user: server.max_devices_per_user,
            max_name_bytes: server.max_name_bytes,
        };
        let mut delivery = Delivery::new(store, io.clone(), callbacks.clone(), settings);
        if let Some((relay, notices)) = relay {
            delivery = delivery.with_relay(relay, notices);
        }
        let delivery = Arc::new(delivery);
        let sites = Sites::new(config.sites.values().cloned());
        realtime::register(&io, &sites, delivery.clone(), callbacks.clone(), server.connect_timeout);
        for site in sites.all() {
            tracing::info!(site = %site.name, reliable = site.reliable(), "site configured");
        }
        let admin_config = config.admin.clone();
        let reloader = sources.map(|sources| {
            Arc::new(Reloader::new(sources, config, sites.clone(), io.clone(), delivery.clone(), callbacks))
        });
        let state = AppState {
            sites,
            delivery,
            server: server.clone(),
            ready: Arc::new(AtomicBool::new(false)),
            reloader,
            history: Arc::new(History::default()),
            limiter: Arc::new(RateLimiter::default()),
        };
        let router = http::router(state.clone(), layer);
        let listener = net::bind(server.listen).with_context(|| format!("cannot listen on {}", server.listen))?;
        let admin = match admin_config {
            Some(admin) => {
                let listener = TcpListener::bind(admin.listen)
                    .await
                    .with_context(|| format!("cannot listen on {} (admin.listen)", admin.listen))?;
                Some((listener, crate::admin::router(state.clone(), admin.token)))
            }
            None => None,
        };
        Ok(Self { listener, router, admin, state, io, sled })
    }

    /// The bound address (its port is the real one when the config said port 0).
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Serves until `shutdown` is cancelled, then drains (see the module docs).
    pub async fn run_until_stopped(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let Self { listener, router, admin, state, io, sled } = self;
        let server = state.server.clone();
        let tasks = TaskTracker::new();
        let failed = Arc::new(std::sync::OnceLock::new());
        tasks.spawn(watch_vitals(state.delivery.clone(), failed.clone(), shutdown.clone()));
        tasks.spawn(sweeper(state.delivery.clone(), server.sweep_interval, shutdown.clone()));
        tasks.spawn(crate::metrics::upkeep(crate::metrics::UPKEEP_EVERY, shutdown.clone()));
        tasks.spawn(net::trim_after_floods(TRIM_EVERY, shutdown.clone()));
        tasks.spawn(realtime::watch_unauthenticated(io.clone(), UNAUTHENTICATED_EVERY, shutdown.clone()));
        if let Some((admin_listener, admin_router)) = admin {
            tracing::info!(listen = %admin_listener.local_addr()?, "admin API serving");
            tasks.spawn(state.history.clone().sample_until(shutdown.clone()));
            // Operators only, on loopback or a private network: the same header deadline, and a
            // small cap of its own.
            let limits = net::Limits { max_connections: ADMIN_CONNECTIONS, max_per_address: 0, ..server.connections };
            let listener = admin_listener.tap_io(|tcp| net::no_delay(tcp));
            let admission = net::Admission::new(limits, false);
            tasks.spawn(net::serve(listener, admin_router, admission, shutdown.clone().cancelled_owned()));
        }
        if let Some(reloader) = &state.reloader {
            reloader.clone().reload_on_sighup(shutdown.clone())?;
        }
        let closer = {
            let (io, shutdown, ready) = (io.clone(), shutdown.clone(), state.ready.clone());
            tasks.spawn(async move {
                shutdown.cancelled().await;
                ready.store(false, Ordering::SeqCst);
                crate::notify::notify("STOPPING=1");
                io.close().await;
            })
        };
        tasks.close();

        state.ready.store(true, Ordering::SeqCst);
        if server.listen.port() == 0 {
            // As the old service did (Node's listen(0)); what tests want, not a production setting.
            tracing::warn!(
                port = listener.local_addr()?.port(),
                "listen port 0 (PORT=0): serving on a port the system chose"
            );
        }
        tracing::info!(listen = %listener.local_addr()?, tls = server.tls.is_some(), "serving");
        crate::notify::notify("READY=1");
        let stop = shutdown.clone().cancelled_owned();
        let admission = net::Admission::new(server.connections, true);
        let serve: std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>> = match &server.tls {
            Some(files) => {
                let config = crate::tls::server_config(&files.cert, &files.key)?;
                let listener = TlsListener::new(listener, config, shutdown.clone())?;
                Box::pin(net::serve(listener, router, admission, stop))
            }
            None => Box::pin(net::serve(listener.tap_io(|tcp| net::no_delay(tcp)), router, admission, stop)),
        };
        let store = state.delivery.store().clone();
        let drain = async {
            serve.await;
            let _ = closer.await;
            tasks.wait().await;
            store.flush().await?;
            anyhow::Ok(())
        };
        let result = tokio::select! {
            r = drain => r,
            _ = async {
                shutdown.cancelled().await;
                tokio::time::sleep(server.shutdown_timeout).await;
            } => Err(anyhow::anyhow!("shutdown took longer than {:?}", server.shutdown_timeout)),
        };
        drop((state, io, store));
        if let Some(sled) = sled {
            // Everything acknowledged is already durable; this records what the drain added.
            sled.close().await;
        }
        if let Some(reason) = failed.get() {
            return Err(anyhow::anyhow!("stopped because {reason}"));
        }
        if result.is_ok() {
            tracing::info!("stopped");
        }
        result
    }
}

/// Connections the admin listener takes at once.
const ADMIN_CONNECTIONS: usize = 64;
/// How often to check whether a passed flood left memory to give back.
const TRIM_EVERY: std::time::Duration = std::time::Duration::from_secs(10);
/// How often the count of sessions that have not joined a site is reported.
const UNAUTHENTICATED_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

/// How often the vital components are checked.
const VITALS_EVERY: std::time::Duration = std::time::Duration::from_millis(100);

/// Stops the service once a vital component has died (see the module docs), noting why in
/// `failed`.
async fn watch_vitals(delivery: Arc<Delivery>, failed: Arc<std::sync::OnceLock<String>>, shutdown: CancellationToken) {
    let mut ticks = tokio::time::interval(VITALS_EVERY);
    loop {
        tokio::select! {
            _ = ticks.tick() => {}
            _ = shutdown.cancelled() => return,
        }
        if let Some(reason) = delivery.failure() {
            tracing::error!(reason = %reason, "a vital component failed: stopping, to be restarted");
            let _ = failed.set(reason);
            shutdown.cancel();
            return;
        }
    }
}

/// Forgets expired devices every `interval` until shutdown.
async fn sweeper(delivery: Arc<Delivery>, interval: std::time::Duration, shutdown: CancellationToken) {
    let mut ticks = tokio::time::interval(interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticks.tick() => {}
            _ = shutdown.cancelled() => return,
        }
        match delivery.sweep().await {
            Ok(0) => {}
            Ok(n) => tracing::info!(expired = n, "sweep done"),
            Err(e) => tracing::error!(error.message = %e, "sweep failed"),
        }
    }
}
