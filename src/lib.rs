//! sio-push: a socket.io push service with durable per-device inboxes.
//!
//! Crate map:
//! - `cli`: the command line.
//! - `ops`: the operator commands `status` and `send`.
//! - `import`: the old service's YAML configuration turned into our TOML; `import::redis` its queued messages.
//! - `config`: defaults, TOML file and environment merged into a validated `Config`.
//! - `telemetry`: log setup.
//! - `app`: `Application::build` (store, sockets, port) and `run_until_stopped` (serve, drain).
//! - `net`: the accept loop: connection caps, header deadlines, no Nagle.
//! - `tls`: optional https/wss on the main listener.
//! - `shutdown`: signals to a cancellation token.
//! - `notify`: systemd readiness notification.
//! - `error`: `ApiError` and its one HTTP mapping.
//! - `names`: limits of names from outside, reserved event names, escaping text for logs and errors.
//! - `admin`: the admin API and status page (own listener, bearer token).
//! - `http`: `POST /send`, `GET /healthcheck`, the demo, the router.
//! - `sites`: the live set of sites, which reload changes.
//! - `reload`: SIGHUP and admin reloads.
//! - `realtime`: socket.io namespaces and the auth handshake.
//! - `delivery`: persist, fan out, acks, `_batch`, `_resync`, presence.
//! - `metrics`: Prometheus metrics and the totals behind the status page.
//! - `callbacks`: calls to the customer's website (auth, presence PUT).
//! - `store`: the `Store` trait, its sled and Redis backends and in-memory twin.
//! - `snapshot`: the backup file format, independent of the backend.
//! - `backup`: the operator commands `backup`, `restore` and `verify`.
#![warn(missing_docs)]

pub mod admin;
pub mod app;
pub mod backup;
pub mod callbacks;
pub mod cli;
pub mod config;
pub mod delivery;
pub mod error;
pub mod http;
pub mod import;
pub mod metrics;
pub mod names;
pub mod net;
pub mod notify;
pub mod ops;
pub mod realtime;
pub mod relay;
pub mod reload;
pub mod shutdown;
pub mod sites;
pub mod snapshot;
pub mod store;
pub mod telemetry;
pub mod tls;

pub use app::Application;
pub use config::Config;

use tokio_util::sync::CancellationToken;

/// Builds and runs the service until `shutdown` is cancelled; `sources` are re-read on reload.
pub async fn run(config: Config, sources: config::Sources, shutdown: CancellationToken) -> anyhow::Result<()> {
    Application::build(config, Some(sources)).await?.run_until_stopped(shutdown).await
}
