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
pub fn layer(server: &ServerConfig) -> (SocketIoLayer, SocketIo) {
    SocketIo::builder()
        .ping_interval(server.ping_interval)
        .ping_timeout(server.ping_timeout)
        .ack_timeout(server.ack_timeout)
        .max_buffer_size(server.max_buffer_packets)
        .ws_read_buffer_size(WS_READ_BUFFER)
        .build_layer()
}

/// Registers the root namespace and one namespace per site.
pub fn register(io: &SocketIo, sites: &Sites, delivery: Arc<Delivery>, callbacks: Callbacks) {
    use socketioxide::extract::SocketRef;
    use socketioxide::handler::ConnectHandler;

    let root_guard = async |socket: SocketRef| match socket.protocol() {
        ProtocolVersion::V4 => Ok(()),
        ProtocolVersion::V5 => Err("Invalid namespace"),
    };
    io.ns("/", { async || {} }.with(root_guard));
    for site in sites.all() {
        register_site(io, &site.name, sites.clone(), delivery.clone(), callbacks.clone());
    }
}
