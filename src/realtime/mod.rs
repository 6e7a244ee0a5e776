//! socket.io: one namespace per site, with the auth handshake as connect middleware.
//!
//! Both protocol generations share the port: engine.io v3 (clients 1.x/2.x) and v4 (3.x/4.x).
//! `token`, `deviceId` and `meta` are read from the query of the engine.io handshake request,
//! which both generations send. The root namespace `/` is registered because protocol-v4 clients
//! are implicitly connected to it; a v5 client asking for it is refused like any unknown
//! namespace.

mod handlers;

pub use handlers::register_site;

use std::sync::Arc;
use std::time::Duration;

use socketioxide::layer::SocketIoLayer;
use socketioxide::{ProtocolVersion, SocketIo};

use crate::callbacks::Callbacks;
use crate::config::ServerConfig;
use crate::delivery::Delivery;
use crate::sites::Sites;

/// Bytes a websocket connection reserves for reading. Clients send little (acks, pings), and a
/// larger frame still arrives whole: the buffer grows for it. engineioxide's default, 4 KiB, was
/// an eighth of an idle connection's memory.
const WS_READ_BUFFER: usize = 1024;

/// Builds the socket.io layer and its handle from the server settings.
///
/// A client sends little (acks, a namespace CONNECT), so its websocket messages and frames are
/// capped at `max_client_message_bytes`, not engine.io's 64 MiB, which anyone could make the
/// server buffer before any auth. Long-polling payloads keep engine.io's 100 KB cap, which also
/// sizes what one poll takes out, so it cannot be lowered without slowing big messages down.
/// `connect_timeout` bounds how long a protocol-v5 session may go without a namespace CONNECT
/// (auth included); protocol-v4 sessions get the same deadline in [`register`].
pub fn layer(server: &ServerConfig) -> (SocketIoLayer, SocketIo) {
    SocketIo::builder()
        .ping_interval(server.ping_interval)
        .ping_timeout(server.ping_timeout)
        .ack_timeout(server.ack_timeout)
        .max_buffer_size(server.max_buffer_packets)
        .ws_read_buffer_size(WS_READ_BUFFER)
        .ws_max_message_size(server.max_client_message_bytes)
        .ws_max_frame_size(server.max_client_message_bytes)
        .connect_timeout(server.connect_timeout)
        .max_pending_sessions(server.max_unauthenticated_sessions)
        .build_layer()
}

/// Reports, every `period` until `stop`, the sessions that have not joined a site (a metric),
/// and those closed at once for finding `max_unauthenticated_sessions` reached (a metric, and one
/// log line per period in which any was).
pub async fn watch_unauthenticated(io: SocketIo, period: Duration, stop: tokio_util::sync::CancellationToken) {
    let max = io.config().max_pending_sessions;
    let mut ticks = tokio::time::interval(period);
    let mut reported = 0;
    loop {
        tokio::select! {
            _ = ticks.tick() => {}
            _ = stop.cancelled() => return,
        }
        let (open, refused) = io.pending_sessions();
        let new = refused - reported;
        reported = refused;
        crate::metrics::unauthenticated_sessions(open, new);
        if new > 0 {
            tracing::warn!(refused = new, max, "sessions closed at once: server.max_unauthenticated_sessions reached (sessions that have not joined a site yet)");
        }
    }
}

/// Registers the root namespace and one namespace per site.
///
/// Protocol-v4 clients (1.x/2.x) join the root namespace with the engine.io handshake, before
/// any auth, and socketioxide's connect timeout does not apply to them. A session that has not
/// joined a site's namespace `connect_timeout` after that is closed, like a v5 session that
/// never sends its CONNECT.
pub fn register(
    io: &SocketIo,
    sites: &Sites,
    delivery: Arc<Delivery>,
    callbacks: Callbacks,
    connect_timeout: Duration,
) {
    use socketioxide::extract::SocketRef;
    use socketioxide::handler::ConnectHandler;

    let root_guard = async |socket: SocketRef| match socket.protocol() {
        ProtocolVersion::V4 => Ok(()),
        ProtocolVersion::V5 => Err("Invalid namespace"),
    };
    let (root_io, root_sites) = (io.clone(), sites.clone());
    let deadline = async move |socket: SocketRef| {
        tokio::spawn(async move {
            tokio::select! {
                _ = tokio::time::sleep(connect_timeout) => {}
                _ = socket.transport_closed() => return,
            }
            let joined = root_sites
                .all()
                .iter()
                .any(|site| root_io.of(format!("/{}", site.name)).is_some_and(|ns| ns.get_socket(socket.id).is_some()));
            if !joined {
                tracing::info!(sid = %socket.id, "session closed: no site's namespace joined within connect_timeout_secs");
                socket.close_transport();
            }
        });
    };
    io.ns("/", deadline.with(root_guard));
    for site in sites.all() {
        register_site(io, &site.name, sites.clone(), delivery.clone(), callbacks.clone());
    }
}
