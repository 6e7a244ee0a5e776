//! The HTTP side: `POST /send`, `GET /healthcheck`, `/readyz` and `/metrics`, the optional
//! demo, and the socket.io layer.
//!
//! Request spans carry the method, the path and a request id, never the raw URI
//! (its query may carry an API key).

mod demo;
pub(crate) mod health;
mod limit;
pub mod publish;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use axum::http::{HeaderValue, Request};
use axum::routing::{get, post};
use axum::Router;
use socketioxide::layer::SocketIoLayer;
use tower_http::cors::CorsLayer;
use tower_http::request_id::{MakeRequestId, PropagateRequestIdLayer, RequestId, SetRequestIdLayer};
use tower_http::trace::TraceLayer;

use crate::admin::History;
use crate::config::ServerConfig;
use crate::delivery::Delivery;
use crate::reload::Reloader;
use crate::sites::Sites;

pub use self::limit::RateLimiter;

/// What every handler can reach. Cheap to clone.
#[derive(Clone)]
pub struct AppState {
    /// The sites, by name; reload changes them.
    pub sites: Sites,
    /// The delivery service.
    pub delivery: Arc<Delivery>,
    /// Server settings (limits).
    pub server: Arc<ServerConfig>,
    /// Serving and not draining (`/readyz`).
    pub ready: Arc<AtomicBool>,
    /// Applies a new configuration, when the service knows where its configuration came from.
    pub reloader: Option<Arc<Reloader>>,
    /// Recent totals, for the status page's rates.
    pub history: Arc<History>,
    /// Per-site `/send` rate limits.
    pub limiter: Arc<RateLimiter>,
}

/// Request ids: a process-wide counter, short and unique per run.
#[derive(Clone, Default)]
struct Counter(Arc<AtomicU64>);

impl MakeRequestId for Counter {
    fn make_request_id<B>(&mut self, _: &Request<B>) -> Option<RequestId> {
        let id = self.0.fetch_add(1, Ordering::Relaxed);
        HeaderValue::from_str(&format!("{id:x}")).ok().map(RequestId::new)
    }
}

/// The whole router: HTTP routes, socket.io, request ids and tracing.
pub fn router(state: AppState, socketio: SocketIoLayer) -> Router {
    let demo = state.server.demo;
    let mut app = Router::new()
        .route("/send", post(publish::send))
        .route("/healthcheck", get(health::healthcheck))
        .route("/readyz", get(health::readyz))
        .route("/metrics", get(health::metrics));
    if demo {
        app = app.merge(demo::routes());
    }
    let header = axum::http::HeaderName::from_static("x-request-id");
    app.with_state(state)
        .layer(socketio)
        // Browsers on the website's origin long-poll across origins, as socket.io 1.x allowed.
        .layer(CorsLayer::very_permissive())
        .layer(TraceLayer::new_for_http().make_span_with(|req: &Request<_>| {
            // The path only: the query may hold an API key or a token.
            let route = req.uri().path();
            let id = req.extensions().get::<RequestId>().and_then(|id| id.header_value().to_str().ok()).unwrap_or("-");
            tracing::info_span!("http", method = %req.method(), route, request_id = id)
        }))
        .layer(PropagateRequestIdLayer::new(header.clone()))
        .layer(SetRequestIdLayer::new(header, Counter::default()))
}
