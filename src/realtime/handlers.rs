//! The handlers of one site's namespace: auth on connect, then the delivery sequence.

use std::sync::Arc;

use socketioxide::extract::SocketRef;
use socketioxide::handler::ConnectHandler;
use socketioxide::SocketIo;

use crate::callbacks::{AuthError, Callbacks};
use crate::config::SiteConfig;
use crate::delivery::{Client, Delivery};

/// Longest `deviceId` accepted; longer ones are refused as an auth error.
const MAX_DEVICE_ID: usize = 1024;

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

/// Registers `/<site>` with the auth middleware and the connect handler.
pub(super) fn register_site(io: &SocketIo, site: Arc<SiteConfig>, delivery: Arc<Delivery>, callbacks: Callbacks) {
    let path = format!("/{}", site.name);
    let auth_site = site.clone();
    let authenticate = async move |socket: SocketRef| -> Result<(), AuthError> {
        let site = &auth_site;
        let q = query(&socket);
        let refuse = |e: AuthError| {
            tracing::info!(site = %site.name, sid = %socket.id, reason = %e, "connection refused");
            e
        };
        if q.device.len() > MAX_DEVICE_ID {
            return Err(refuse(AuthError::Other(format!(
                "deviceId is longer than {MAX_DEVICE_ID} bytes"
            ))));
        }
        let rooms = callbacks
            .rooms(site, &q.token, q.meta.as_deref())
            .await
            .map_err(refuse)?;
        if site.reliable() && !rooms.iter().any(|r| site.is_user_room(r)) {
            return Err(refuse(AuthError::MissingUserRoom));
        }
        socket.extensions.insert(Client {
            token: q.token,
            device: q.device,
            rooms,
        });
        Ok(())
    };
    let on_connect = async move |socket: SocketRef| {
        let Some(client) = socket.extensions.get::<Client>() else {
            return;
        };
        let (site_d, delivery_d, client_d) = (site.clone(), delivery.clone(), client.clone());
        socket.on_disconnect(async move |socket: SocketRef| {
            delivery_d.disconnect(&site_d, &socket, &client_d).await;
        });
        delivery.connect(&site, socket, &client).await;
    };
    io.ns(path, on_connect.with(authenticate));
}
