//! The socket side: a client's connect sequence (PROTOCOL.md, Part A) and its disconnect.

use serde_json::Value;
use socketioxide::extract::SocketRef;

use super::ack::AckArgs;
use super::emit::{self, Item};
use super::sockets::Removed;
use super::{now_ms, resync_sent, Client, Delivery};
use crate::callbacks::Presence;
use crate::config::SiteConfig;
use crate::metrics;
use crate::store::{Ack, Connected, DeviceKey, Queued, StoreError};

impl Delivery {
    /// Runs the accepted-connection sequence of PROTOCOL.md for one socket. Each device is
    /// registered (socket, then store) under its order lock; then the socket gets `_settings`,
    /// and for each device `_resync` if owed, its `_batch`, and what came for it meanwhile. A
    /// client that has seen `_settings` gets every message sent from then on.
    pub async fn connect(&self, site: &SiteConfig, socket: SocketRef, client: &Client) {
        socket.join(client.rooms.clone());
        let mut registered = Vec::new();
        let mut refused = false;
        let mut failed = false;
        if site.reliable() {
            for user in client.rooms.iter().filter(|r| site.is_user_room(r)) {
                let dev = DeviceKey::new(&site.name, user, &client.device);
                let order = self.sockets.order(&dev).await;
                // Registered before the store reads the queue: what is stored from now on comes
                // here (held until the `_batch` is out), not only at the next connect.
                if let Some(evicted) = order.add(socket.clone(), self.settings.max_sockets_per_device) {
                    tracing::warn!(site = %site.name, room = %user, device = %dev.device, sid = %evicted.id, "too many sockets for one device: the oldest is disconnected");
                    let _ = evicted.disconnect();
                }
                // The public channel's devices are anonymous visitors: only `device_ttl` bounds them.
                let max_devices =
                    (site.public_channel.as_deref() != Some(user)).then_some(self.settings.max_devices_per_user);
                match self.store.connect(&dev, &client.rooms, max_devices).await {
                    Ok(connected) => {
                        for gone in &connected.forgotten {
                            tracing::warn!(site = %site.name, room = %user, device = %gone.device, new_device = %dev.device, "device forgotten with its queue: its user room reached server.max_devices_per_user and it disconnected first");
                        }
                        registered.push((dev, connected));
                    }
                    Err(e @ StoreError::TooManyDevices { .. }) => {
                        order.remove(socket.id);
                        refused = true;
                        tracing::warn!(site = %site.name, room = %user, device = %dev.device, sid = %socket.id, error.message = %e, "new device refused and disconnected");
                    }
                    Err(e) => {
                        order.remove(socket.id);
                        failed = true;
                        tracing::error!(site = %site.name, room = %user, device = %dev.device, sid = %socket.id, error.message = %e, "device not registered: the client's transport is closed, so that it connects again");
                    }
                }
            }
        }
        // A client whose device did not fit is disconnected before `_settings`: it must not
        // believe it will get what is sent while it is away.
        if refused {
            socket.extensions.insert(Refused);
            // Its disconnect handler takes the devices registered above off again.
            let _ = socket.disconnect();
            return;
        }
        // The store failed (Redis unreachable): the client reconnects, as after a network
        // failure, and finds the node ready or is refused with the reason.
        if failed {
            socket.extensions.insert(Refused);
            socket.close_transport();
            return;
        }
        let ttl = self.settings.device_ttl.as_secs();
        if let Err(e) = socket.emit("_settings", &serde_json::json!({ "device_ttl": ttl })) {
            tracing::debug!(site = %site.name, error.message = %e, "_settings not sent");
        }
        for (dev, connected) in registered {
            tracing::info!(site = %site.name, room = %dev.user, device = %dev.device, sid = %socket.id, queued = connected.pending.len(), "device connected");
            self.open(&dev, &socket, connected).await;
            if site.public_channel.as_deref() != Some(&*dev.user) {
                self.callbacks.presence(site, &dev.user, &client.token, Presence::Connected);
            }
        }
        // A disconnect during the awaits above found no handler yet, or ran before the socket was
        // registered: settle it now.
        if !socket.connected() {
            self.disconnect(site, &socket, client).await;
        }
    }

    /// Ends a device's connect on `socket`: `_resync` if owed, the `_batch`, then the live
    /// messages held meanwhile.
    async fn open(&self, dev: &DeviceKey, socket: &SocketRef, connected: Connected) {
        let Connected { pending, resync, watermark, .. } = connected;
        let batch = batch(dev, &pending);
        let mut failed = None;
        let mut resyncs_sent = Vec::new();
        let opened = self.sockets.open(dev, socket.id, watermark, |socket, due| {
            if resync {
                if let Err(e) = emit::send_resync(socket, &dev.site) {
                    failed = Some(e);
                }
            }
            if let Some(batch) = batch {
                match socket.emit_with_ack::<_, AckArgs>("_batch", &batch) {
                    Ok(ack) => {
                        let ids = pending.iter().map(|q| q.id).collect();
                        self.acks.watch(ack, Ack::Batch { device: dev.clone(), ids });
                        metrics::delivered_batch(&dev.site, pending.len() as u64);
                        tracing::info!(site = %dev.site, room = %dev.user, device = %dev.device, messages = pending.len(), "_batch sent");
                    }
                    Err(e) => failed = Some(e),
                }
            }
            for item in due {
                match emit::emit(&self.acks, socket, dev, &item) {
                    Ok(()) if matches!(item, Item::Resync(_)) => resyncs_sent.push(item.seq()),
                    Ok(()) => {}
                    Err(e) => failed = Some(e),
                }
            }
        });
        if !opened {
            return; // the socket left meanwhile; its messages stay queued
        }
        if let Some(e) = failed {
            emit::emit_failed(socket.clone(), dev, &e);
        }
        for seq in resyncs_sent {
            resync_sent(&*self.store, dev, seq).await;
        }
    }

    /// Runs the disconnect side: devices this socket spoke for are marked disconnected once
    /// their last socket is gone.
    pub async fn disconnect(&self, site: &SiteConfig, socket: &SocketRef, client: &Client) {
        if !site.reliable() {
            return;
        }
        let refused = socket.extensions.get::<Refused>().is_some();
        for user in client.rooms.iter().filter(|r| site.is_user_room(r)) {
            let dev = DeviceKey::new(&site.name, user, &client.device);
            let order = self.sockets.order(&dev).await;
            match order.remove(socket.id) {
                Removed::Last => {
                    if let Err(e) = self.store.disconnect(&dev, now_ms()).await {
                        tracing::error!(site = %site.name, device = %dev.device, error.message = %e, "disconnect not recorded");
                    }
                    tracing::info!(site = %site.name, room = %user, device = %dev.device, sid = %socket.id, "device disconnected");
                }
                Removed::OthersRemain => {
                    tracing::info!(site = %site.name, room = %user, device = %dev.device, sid = %socket.id, "socket left; the device's newest remaining socket gets live messages");
                }
                Removed::Unknown => {}
            }
            drop(order);
            // Not for a socket refused at its connect: its connect was not reported either.
            if !refused && site.public_channel.as_deref() != Some(user.as_str()) {
                self.callbacks.presence(site, user, &client.token, Presence::Disconnected);
            }
        }
    }
}

/// Marks a socket disconnected at its connect because a device of it did not fit under
/// `max_devices_per_user`: no presence PUT was sent for its connect, so none is for its disconnect.
#[derive(Clone)]
struct Refused;

/// A device's queue as the `_batch` argument, `[[event, ...args], ...]`; `None` if empty or
/// unreadable (logged).
fn batch(dev: &DeviceKey, pending: &[Queued]) -> Option<Value> {
    if pending.is_empty() {
        return None;
    }
    let mut body = String::with_capacity(pending.iter().map(|q| q.entry.len() + 1).sum::<usize>() + 2);
    body.push('[');
    for (i, q) in pending.iter().enumerate() {
        if i > 0 {
            body.push(',');
        }
        body.push_str(&q.entry);
    }
    body.push(']');
    match serde_json::from_str(&body) {
        Ok(batch) => Some(batch),
        Err(e) => {
            tracing::error!(site = %dev.site, device = %dev.device, error.message = %e, "stored batch unreadable");
            None
        }
    }
}
