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
use std::task::{Context, Poll};

use axum::http::{HeaderValue, Request};
use axum::routing::{get, post};
use axum::Router;
use futures_util::future::Either;
use socketioxide::layer::SocketIoLayer;
use tower::{Layer, Service, ServiceBuilder};
use tower_http::cors::{AllowOrigin, CorsLayer};
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

/// CORS for socket.io's long-polling: browsers on a website's origin poll across origins, as
/// socket.io 1.x allowed. The engine.io request does not name a site yet, so an origin passes if
/// any site allows it (each site's own list is enforced when the client joins its namespace).
/// Nothing else gets CORS headers (see [`SocketIoOnly`]): `/send` is for servers.
fn socket_io_cors(sites: Sites) -> SocketIoOnly<CorsLayer> {
    let allow = AllowOrigin::predicate(move |origin, _| {
        origin.to_str().is_ok_and(|origin| sites.all().iter().any(|s| s.allows_origin(origin)))
    });
    SocketIoOnly(
        CorsLayer::new()
            .allow_origin(allow)
            .allow_credentials(true)
            .allow_methods([axum::http::Method::GET, axum::http::Method::POST])
            .allow_headers(tower_http::cors::AllowHeaders::mirror_request()),
    )
}

fn is_socket_io<B>(req: &Request<B>) -> bool {
    req.uri().path().starts_with("/socket.io/")
}

/// Applies a layer to socket.io requests only; the others go straight to the inner service.
/// tower-http's CORS layer otherwise adds `Vary` and `Access-Control-Allow-Credentials` to every
/// response, and costs a `/send` several allocations, for headers no server-side caller wants.
#[derive(Clone)]
struct SocketIoOnly<L>(L);

impl<S: Clone, L: Layer<S>> Layer<S> for SocketIoOnly<L> {
    type Service = SocketIoOnlyService<L::Service, S>;

    fn layer(&self, inner: S) -> Self::Service {
        SocketIoOnlyService { layered: self.0.layer(inner.clone()), inner }
    }
}

#[derive(Clone)]
struct SocketIoOnlyService<W, S> {
    layered: W,
    inner: S,
}

impl<B, W, S> Service<Request<B>> for SocketIoOnlyService<W, S>
where
    W: Service<Request<B>>,
    S: Service<Request<B>, Response = W::Response, Error = W::Error>,
{
    type Response = W::Response;
    type Error = W::Error;
    type Future = Either<W::Future, S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        match (self.layered.poll_ready(cx)?, self.inner.poll_ready(cx)?) {
            (Poll::Ready(()), Poll::Ready(())) => Poll::Ready(Ok(())),
            _ => Poll::Pending,
        }
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        if is_socket_io(&req) {
            Either::Left(self.layered.call(req))
        } else {
            Either::Right(self.inner.call(req))
        }
    }
}

/// Copies a socket.io request's URI and header values out of hyper's read buffer.
///
/// engineioxide keeps a clone of the request head, extensions included, for the whole life of a
/// session. hyper parses the URI and the header values as slices of the connection's read buffer
/// (8 to 16 KiB), and axum's `OriginalUri` extension is another slice of it, so every idle
/// connection kept that whole buffer alive after the websocket upgrade: about a third of its
/// memory. With the head in allocations of its own, the buffer is freed after the upgrade.
async fn own_request_head(mut req: Request<axum::body::Body>) -> Request<axum::body::Body> {
    if !is_socket_io(&req) {
        return req;
    }
    if let Ok(uri) = axum::http::Uri::try_from(req.uri().to_string()) {
        *req.uri_mut() = uri.clone();
        req.extensions_mut().insert(axum::extract::OriginalUri(uri));
    }
    for value in req.headers_mut().values_mut() {
        if let Ok(mut owned) = HeaderValue::from_bytes(value.as_bytes()) {
            owned.set_sensitive(value.is_sensitive());
            *value = owned;
        }
    }
    req
}

/// Gives an error answer without a body (a 404, a 405, ...) one naming its status, so that no
/// error reaches a caller as an empty page.
async fn reason_for_empty_errors(response: axum::response::Response) -> axum::response::Response {
    use axum::body::HttpBody;
    let status = response.status();
    if !(status.is_client_error() || status.is_server_error()) || response.body().size_hint().exact() != Some(0) {
        return response;
    }
    let (mut parts, _) = response.into_parts();
    parts.headers.remove(axum::http::header::CONTENT_LENGTH);
    parts.headers.insert(axum::http::header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    let reason = format!("{}.", status.canonical_reason().unwrap_or("Error"));
    axum::response::Response::from_parts(parts, axum::body::Body::from(reason))
}

/// A connection admitted from the reserve (`net::RESERVE`, over `max_connections`) is for
/// `/send` and the health checks; a socket.io session there is refused.
async fn no_sessions_on_the_reserve(
    request: Request<axum::body::Body>,
) -> Result<Request<axum::body::Body>, axum::response::Response> {
    use axum::response::IntoResponse;
    let on_reserve = request.extensions().get::<crate::net::Peer>().is_some_and(|peer| peer.reserve);
    if on_reserve && is_socket_io(&request) {
        let reason = "Server full: too many connections (server.max_connections); retry later.";
        return Err((axum::http::StatusCode::SERVICE_UNAVAILABLE, [(axum::http::header::CONNECTION, "close")], reason)
            .into_response());
    }
    Ok(request)
}

/// The whole router: HTTP routes, socket.io, request ids and tracing.
///
/// The layers are one tower stack around the routes, not `Router::layer` calls: each of those
/// wraps every route in a boxed service that is cloned, and whose response body is boxed again,
/// for every request (six layers made about 35 allocations of every `/send`).
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
    let cors = socket_io_cors(state.sites.clone());
    let stack = ServiceBuilder::new()
        .layer(SetRequestIdLayer::new(header.clone(), Counter::default()))
        .layer(PropagateRequestIdLayer::new(header))
        .layer(TraceLayer::new_for_http().make_span_with(|req: &Request<_>| {
            // The path only: the query may hold an API key or a token.
            let route = req.uri().path();
            let id = req.extensions().get::<RequestId>().and_then(|id| id.header_value().to_str().ok()).unwrap_or("-");
            tracing::info_span!("http", method = %req.method(), route, request_id = id)
        }))
        .layer(axum::middleware::map_response(reason_for_empty_errors))
        .layer(axum::middleware::map_request(no_sessions_on_the_reserve))
        .layer(cors)
        .layer(axum::middleware::map_request(own_request_head))
        .layer(socketio)
        .service(app.with_state(state));
    Router::new().fallback_service(stack)
}
