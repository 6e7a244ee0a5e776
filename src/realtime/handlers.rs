//! The handlers of one site's namespace: auth on connect, then the delivery sequence.

use std::sync::Arc;

use socketioxide::extract::SocketRef;
use socketioxide::handler::ConnectHandler;
use socketioxide::{ProtocolVersion, SocketIo};

use crate::callbacks::{AuthError, Callbacks};
use crate::config::SiteConfig;
use crate::delivery::{Client, Delivery};
use crate::metrics;
use crate::names;
use crate::sites::Sites;

/// The connection query: `?token=..&deviceId=..&meta=..`.
#[derive(Default)]
struct Query {
    token: String,
    device: String,
    meta: Option<String>,
}

fn query(socket: &SocketRef) -> Query {
    let mut q = Query::default();
    let Some(raw) = socket.req_parts().uri.query() else {
        return q;
    };
    for (key, value) in form_urlencoded::parse(raw.as_bytes()) {
        match key.as_ref() {
            "token" => q.token = value.into_owned(),
            "deviceId" => q.device = value.into_owned(),
            "meta" => q.meta = Some(value.into_owned()),
            _ => {}
        }
    }
    q
}

/// Registers `/<name>` with the auth middleware and the connect handler. The site's settings
/// are looked up in `sites` at each connection, so a reload's changes apply to the next one.
pub fn register_site(io: &SocketIo, name: &str, sites: Sites, delivery: Arc<Delivery>, callbacks: Callbacks) {
    let path = format!("/{name}");
    let name = name.to_owned();
    let delivery_a = delivery.clone();
    let authenticate = async move |socket: SocketRef| -> Result<(), AuthError> {
        let refuse = |e: AuthError| {
            tracing::info!(site = %name, sid = %socket.id, reason = %e, "connection refused");
            e
        };
        let Some(site) = sites.get(&name) else {
            return Err(refuse(AuthError::UnknownSite));
        };
        if let Some(origin) = socket.req_parts().headers.get(axum::http::header::ORIGIN) {
            if !site.allows_origin(origin.to_str().unwrap_or("")) {
                return Err(refuse(AuthError::OriginNotAllowed));
            }
        }
        // Without its store a node cannot register the device: a clear refusal now, not a
        // `_settings` that promises what it cannot keep.
        if site.reliable() && !delivery_a.store().is_open() {
            return Err(refuse(AuthError::Other(
                "Service unavailable: its storage is unreachable, retry later".into(),
            )));
        }
        let q = query(&socket);
        // Names over the limit are refused here, before the auth call and the store: the store
        // could not key them, and a client must not be told it connected when it is not.
        let max = delivery_a.settings().max_name_bytes;
        names::check_length("deviceId", &q.device, max).map_err(|e| refuse(AuthError::Other(e)))?;
        // A client that leaves while it waits for an auth slot, or for the call, takes its place
        // in the queue and the call with it: the website is not asked about clients long gone.
        let rooms = tokio::select! {
            biased;
            _ = socket.transport_closed() => {
                tracing::info!(site = %name, sid = %socket.id, "client left while being authenticated: auth call dropped");
                return Err(AuthError::Other("the client left".into()));
            }
            rooms = callbacks.rooms(&site, &q.token, q.meta.as_deref()) => rooms.map_err(refuse)?,
        };
        for room in &rooms {
            names::check_length("A room name from the auth endpoint", room, max)
                .map_err(|e| refuse(AuthError::Other(e)))?;
        }
        if site.reliable() && !rooms.iter().any(|r| site.is_user_room(r)) {
            return Err(refuse(AuthError::MissingUserRoom));
        }
        socket.extensions.insert(Client { token: q.token, device: q.device, rooms });
        socket.extensions.insert(site);
        Ok(())
    };
    let on_connect = async move |socket: SocketRef| {
        let (Some(client), Some(site)) =
            (socket.extensions.get::<Client>(), socket.extensions.get::<Arc<SiteConfig>>())
        else {
            return;
        };
        let protocol = protocol_label(&socket);
        metrics::socket(&site.name, protocol, 1.0);
        let (site_d, delivery_d, client_d) = (site.clone(), delivery.clone(), client.clone());
        socket.on_disconnect(async move |socket: SocketRef| {
            metrics::socket(&site_d.name, protocol, -1.0);
            delivery_d.disconnect(&site_d, &socket, &client_d).await;
        });
        delivery.connect(&site, socket, &client).await;
    };
    io.ns(path, on_connect.with(authenticate));
}

/// `v4` for clients 1.x/2.x, `v5` for 3.x/4.x: the socket.io protocol revision.
fn protocol_label(socket: &SocketRef) -> &'static str {
    match socket.protocol() {
        ProtocolVersion::V4 => "v4",
        ProtocolVersion::V5 => "v5",
    }
}
