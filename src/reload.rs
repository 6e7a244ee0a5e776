//! Reload: re-read the configuration (SIGHUP or `POST /api/reload`) and apply what can change
//! while serving.
//!
//! Sites can be added (a namespace is registered), removed (its namespace is deleted, its
//! sockets disconnected) or changed (keys, URLs, prefixes apply from the next request or
//! connection). Sockets of unchanged sites stay connected. Server and admin settings need a
//! restart; a reload names the ones that differ. An invalid new configuration changes nothing
//! and the old one keeps running.

use std::collections::BTreeSet;
use std::sync::Arc;

use socketioxide::SocketIo;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;

use crate::callbacks::Callbacks;
use crate::config::{Config, ConfigError, Sources};
use crate::delivery::Delivery;
use crate::realtime;
use crate::sites::Sites;

/// What a reload changed.
#[derive(Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Report {
    /// Sites now served that were not.
    pub added: Vec<String>,
    /// Sites no longer served.
    pub removed: Vec<String>,
    /// Sites whose settings changed.
    pub changed: Vec<String>,
    /// Server or admin settings that differ and apply only after a restart.
    pub needs_restart: Vec<String>,
}

/// Applies new configurations to the running service.
pub struct Reloader {
    sources: Sources,
    running: Mutex<Config>,
    sites: Sites,
    io: SocketIo,
    delivery: Arc<Delivery>,
    callbacks: Callbacks,
}

impl Reloader {
    /// A reloader for a service started from `running`, which came from `sources`.
    pub fn new(
        sources: Sources,
        running: Config,
        sites: Sites,
        io: SocketIo,
        delivery: Arc<Delivery>,
        callbacks: Callbacks,
    ) -> Self {
        Self { sources, running: Mutex::new(running), sites, io, delivery, callbacks }
    }

    /// Re-reads the configuration and applies it; on error nothing changes. Reloads run one at
    /// a time.
    pub async fn reload(&self) -> Result<Report, ConfigError> {
        let next = Config::load(&self.sources)?;
        let mut running = self.running.lock().await;
        let mut report = Report { needs_restart: restart_keys(&running, &next), ..Report::default() };
        let removed: Vec<String> = running.sites.keys().filter(|n| !next.sites.contains_key(*n)).cloned().collect();
        for name in removed {
            self.sites.remove(&name);
            let path = format!("/{name}");
            // `delete_ns` alone closes the sockets without telling the clients: disconnect first.
            if let Some(ns) = self.io.of(&path) {
                if let Err(e) = ns.disconnect().await {
                    tracing::warn!(site = %name, error.message = %e, "some sockets of a removed site were not disconnected");
                }
            }
            self.io.delete_ns(path);
            report.removed.push(name);
        }
        for (name, site) in &next.sites {
            match running.sites.get(name) {
                None => {
                    self.sites.set(site.clone());
                    realtime::register_site(
                        &self.io,
                        name,
                        self.sites.clone(),
                        self.delivery.clone(),
                        self.callbacks.clone(),
                    );
                    report.added.push(name.clone());
                }
                Some(old) if old != site => {
                    self.sites.set(site.clone());
                    report.changed.push(name.clone());
                }
                Some(_) => {}
            }
        }
        for warning in &next.warnings {
            tracing::warn!("{warning}");
        }
        *running = next;
        Ok(report)
    }

    /// Reloads and logs the outcome.
    pub async fn reload_and_log(&self) -> Result<Report, ConfigError> {
        let result = self.reload().await;
        match &result {
            Ok(r) => tracing::info!(
                added = ?r.added, removed = ?r.removed, changed = ?r.changed, needs_restart = ?r.needs_restart,
                "configuration reloaded"
            ),
            Err(e) => tracing::error!(error.message = %e, "reload refused: the running configuration stays"),
        }
        result
    }

    /// Reloads on every SIGHUP until `shutdown`.
    pub fn reload_on_sighup(self: Arc<Self>, shutdown: CancellationToken) -> std::io::Result<()> {
        let mut hangup = signal(SignalKind::hangup())?;
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = hangup.recv() => {
                        tracing::info!(signal = "SIGHUP", "reloading the configuration");
                        let _ = self.reload_and_log().await;
                    }
                    _ = shutdown.cancelled() => return,
                }
            }
        });
        Ok(())
    }
}

/// The `[server]` and `[admin]` keys whose values differ (as `check-config` prints them).
fn restart_keys(old: &Config, new: &Config) -> Vec<String> {
    fn settings(config: &Config) -> BTreeSet<String> {
        let text = config.to_string();
        let head = text.split("\n[sites.").next().unwrap_or_default().to_owned();
        head.lines().filter(|l| l.contains(" = ")).map(str::to_owned).collect()
    }
    let (old, new) = (settings(old), settings(new));
    let mut keys: Vec<String> =
        old.symmetric_difference(&new).filter_map(|line| line.split(" = ").next().map(str::to_owned)).collect();
    keys.dedup();
    keys
}
