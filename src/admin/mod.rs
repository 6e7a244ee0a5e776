//! The admin listener: a JSON API for operators and a live status page.
//!
//! Off unless `[admin]` is configured; it listens on its own address (default loopback). Every
//! `/api/*` request must carry `Authorization: Bearer <admin.token>`, compared in constant time.
//! The page itself (`/`) holds no data: it asks for the token and calls the API, so nothing
//! secret is ever in a URL the server sees.
//!
//! - `GET /api/status`: sites with their figures, totals and the last ten minutes of totals.
//! - `GET /api/sites/{site}/rooms/{room}/devices`: a user room's devices and their queues.
//! - `DELETE /api/sites/{site}/rooms/{room}/queue?device=ID`: drop one device's queue.
//! - `POST /api/reload`: re-read the configuration (as SIGHUP does).
//! - `GET /api/backup`: a snapshot of the store (`sio-push backup`), streamed.

mod backup;
mod history;

use axum::extract::{Path, Query, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};

pub use self::history::{History, Sample};
use crate::config::ApiKey;
use crate::delivery::now_ms;
use crate::http::AppState;
use crate::metrics::TotalsSnapshot;
use crate::store::{DeviceInfo, DeviceKey, Millis};

/// The admin router, guarded by `token`.
pub fn router(state: AppState, token: ApiKey) -> Router {
    let api = Router::new()
        .route("/api/status", get(status))
        .route("/api/sites/{site}/rooms/{room}/devices", get(devices))
        .route("/api/sites/{site}/rooms/{room}/queue", delete(drop_queue))
        .route("/api/reload", post(reload))
        .route("/api/backup", get(backup::backup))
        .route_layer(middleware::from_fn_with_state(token, require_token));
    Router::new().route("/", get(page)).merge(api).with_state(state)
}

async fn require_token(State(token): State<ApiKey>, request: Request, next: Next) -> Response {
    let presented = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    match presented {
        Some(presented) if token.matches(presented) => next.run(request).await,
        _ => (StatusCode::UNAUTHORIZED, "Missing or wrong admin token (Authorization: Bearer ...).").into_response(),
    }
}

async fn page() -> Html<&'static str> {
    Html(include_str!("status.html"))
}

/// One site's figures.
#[derive(Debug, Serialize, Deserialize)]
pub struct SiteStatus {
    /// The site's name.
    pub name: String,
    /// Reliable mode (queues and acks).
    pub reliable: bool,
    /// Connected sockets.
    pub sockets: usize,
    /// Registered devices.
    pub devices: u64,
    /// Devices with a connected socket.
    pub connected_devices: u64,
    /// Messages waiting in queues.
    pub queued_messages: u64,
    /// Bytes waiting in queues.
    pub queued_bytes: u64,
}

/// `GET /api/status`.
#[derive(Debug, Serialize, Deserialize)]
pub struct Status {
    /// The running version.
    pub version: String,
    /// On a store shared by several nodes (Redis), this node's id: then `sockets` and `totals`
    /// are this node's, and the devices and queues of `sites` the whole service's.
    #[serde(default)]
    pub node: Option<String>,
    /// The sites.
    pub sites: Vec<SiteStatus>,
    /// Running totals since start.
    pub totals: TotalsSnapshot,
    /// Totals over the last ten minutes, oldest first, the last taken now.
    pub history: Vec<HistoryPoint>,
}

/// A sample as the API shows it.
#[derive(Debug, Serialize, Deserialize)]
pub struct HistoryPoint {
    /// When (ms since the epoch).
    pub t: Millis,
    /// `/send` requests accepted so far.
    pub accepted: u64,
    /// Copies stored so far.
    pub stored: u64,
    /// Messages delivered so far.
    pub delivered: u64,
    /// Messages acked so far.
    pub acked: u64,
}

async fn status(State(state): State<AppState>) -> Json<Status> {
    let stats = crate::http::health::refresh_registry_gauges(&state).await;
    let sites = state
        .sites
        .all()
        .into_iter()
        .map(|site| {
            let s = stats.get(&site.name).cloned().unwrap_or_default();
            SiteStatus {
                sockets: state.delivery.socket_count(&site.name),
                name: site.name.clone(),
                reliable: site.reliable(),
                devices: s.devices,
                connected_devices: s.connected,
                queued_messages: s.queued_messages,
                queued_bytes: s.queued_bytes,
            }
        })
        .collect();
    let history: Vec<HistoryPoint> = state
        .history
        .with_now()
        .into_iter()
        .map(|Sample { t, totals }| HistoryPoint {
            t,
            accepted: totals.accepted,
            stored: totals.stored,
            delivered: totals.delivered,
            acked: totals.acked,
        })
        .collect();
    Json(Status {
        version: env!("CARGO_PKG_VERSION").into(),
        node: state.delivery.node().map(str::to_owned),
        sites,
        totals: crate::metrics::totals(),
        history,
    })
}

/// A device as `GET .../devices` shows it.
#[derive(Debug, Serialize)]
struct DeviceView {
    #[serde(flatten)]
    info: DeviceInfo,
    /// Seconds since the oldest queued message was queued.
    oldest_message_age_secs: Option<u64>,
}

async fn devices(
    State(state): State<AppState>,
    Path((site, room)): Path<(String, String)>,
) -> Result<Json<Vec<DeviceView>>, (StatusCode, String)> {
    known_site(&state, &site)?;
    let devices = state.delivery.store().user_devices(&site, &room).await.map_err(internal)?;
    let now = now_ms();
    Ok(Json(
        devices
            .into_iter()
            .map(|info| DeviceView {
                oldest_message_age_secs: info.oldest_queued_at.map(|at| now.saturating_sub(at) / 1000),
                info,
            })
            .collect(),
    ))
}

#[derive(Deserialize)]
struct DeviceParam {
    #[serde(default)]
    device: String,
}

async fn drop_queue(
    State(state): State<AppState>,
    Path((site, room)): Path<(String, String)>,
    Query(q): Query<DeviceParam>,
) -> Result<Json<serde_json::Value>, (StatusCode, String)> {
    known_site(&state, &site)?;
    let dev = DeviceKey::new(&site, &room, &q.device);
    let dropped = state.delivery.store().clear_queue(&dev).await.map_err(internal)?;
    tracing::warn!(site = %site, room = %room, device = %q.device, dropped, "queue dropped by an operator");
    Ok(Json(serde_json::json!({ "dropped": dropped })))
}

async fn reload(State(state): State<AppState>) -> Result<Json<crate::reload::Report>, (StatusCode, String)> {
    let Some(reloader) = &state.reloader else {
        return Err((
            StatusCode::CONFLICT,
            "This instance was not started from a configuration it can re-read.".into(),
        ));
    };
    reloader
        .reload_and_log()
        .await
        .map(Json)
        .map_err(|e| (StatusCode::UNPROCESSABLE_ENTITY, format!("Reload refused: {e}")))
}

fn known_site(state: &AppState, site: &str) -> Result<(), (StatusCode, String)> {
    match state.sites.get(site) {
        Some(_) => Ok(()),
        None => Err((StatusCode::NOT_FOUND, format!("No site named {site:?}."))),
    }
}

fn internal(e: crate::store::StoreError) -> (StatusCode, String) {
    tracing::error!(error.message = %e, "admin request failed in the store");
    (StatusCode::INTERNAL_SERVER_ERROR, "Store unavailable.".into())
}
