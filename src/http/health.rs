//! Liveness, readiness and metrics.
//!
//! `GET /healthcheck` answers `ok` while the process serves (the old service's check), and `503`
//! once a component it cannot do without has died (the store after a failed sync or a panic of
//! its writer, the task recording acks): the process then exits, for its supervisor to restart.
//! `GET /readyz` answers `ready` only while the store accepts writes (with Redis: answers, and this
//! node hears the other nodes) and no drain has begun, so a
//! load balancer stops sending traffic before the sockets close. `GET /metrics` is the
//! Prometheus text format; its registry gauges come from totals the store keeps (no scan).

use std::sync::atomic::Ordering;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;

use super::AppState;
use crate::store::SiteStats;

/// `200 ok`, or `503 failed` once a vital component died (the log says which and why).
pub async fn healthcheck(State(state): State<AppState>) -> (StatusCode, &'static str) {
    match state.delivery.failure() {
        None => (StatusCode::OK, "ok"),
        Some(_) => (StatusCode::SERVICE_UNAVAILABLE, "failed"),
    }
}

/// `200 ready`, or `503` with the reason.
pub async fn readyz(State(state): State<AppState>) -> (StatusCode, &'static str) {
    if state.delivery.failure().is_some() {
        (StatusCode::SERVICE_UNAVAILABLE, "failed")
    } else if !state.delivery.store().is_open() {
        (StatusCode::SERVICE_UNAVAILABLE, "store closed")
    } else if !state.delivery.relay_subscribed() {
        (StatusCode::SERVICE_UNAVAILABLE, "not subscribed to the other nodes")
    } else if !state.ready.load(Ordering::SeqCst) {
        (StatusCode::SERVICE_UNAVAILABLE, "draining")
    } else {
        (StatusCode::OK, "ready")
    }
}

/// The Prometheus exposition.
pub async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    refresh_registry_gauges(&state).await;
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], crate::metrics::install().render())
}

/// Sets the per-site registry gauges (zero for sites with nothing stored).
pub(crate) async fn refresh_registry_gauges(state: &AppState) -> std::collections::BTreeMap<String, SiteStats> {
    let stats = match state.delivery.store().stats().await {
        Ok(stats) => stats,
        Err(e) => {
            tracing::error!(error.message = %e, "store stats unavailable");
            return Default::default();
        }
    };
    for site in state.sites.all() {
        crate::metrics::registry(&site.name, &stats.get(&site.name).cloned().unwrap_or_default());
    }
    stats
}
