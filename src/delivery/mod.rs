//! The domain core: accept a message, persist it, fan it out to live sockets, handle acks.
//!
//! `POST /send` calls [`Delivery::send`]; the socket.io handlers call [`Delivery::connect`] and
//! [`Delivery::disconnect`]. Which socket currently speaks for a device lives in memory here
//! (`sockets`: only the newest socket of a device gets live messages); everything that
//! must survive a restart lives in the [`Store`].
//!
//! A message is emitted only after the store has made it durable, so every emitted message can
//! be acked away. Its ack removes exactly that message; a `_batch` ack removes exactly the batch.

mod ack;
mod sockets;

use std::collections::HashSet;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures_util::stream::{FuturesUnordered, StreamExt};
use futures_util::FutureExt;
use serde::ser::SerializeTuple;
use serde_json::Value;
use socketioxide::extract::SocketRef;
use socketioxide::SocketIo;

use crate::callbacks::{Callbacks, Presence};
use crate::config::SiteConfig;
use crate::metrics;
use crate::store::{
    CheckedAck, DeviceKey, Expiry, Idempotency, MessageId, Millis, QueueLimits, Replay, Store, StoreError,
};

pub use self::ack::{acked, AckArgs};
use self::sockets::{DeviceSockets, Removed};

/// A message accepted by `POST /send`.
#[derive(Clone, Debug, PartialEq)]
pub struct Message {
    /// Rooms to deliver to: user rooms, the public channel, or shared rooms.
    pub rooms: Vec<String>,
    /// The socket.io event name.
    pub event: String,
    /// The event's arguments, spread into the emit.
    pub args: Vec<Value>,
    /// Check ack order and ask for a resync when an older message of the event is unacked.
    pub resync: bool,
}

impl Message {
    /// The `[event, ...args]` JSON array: the queued form, and a `_batch` entry.
    pub fn entry(&self) -> String {
        let mut out = String::with_capacity(64);
        out.push('[');
        out.push_str(&Value::from(self.event.as_str()).to_string());
        for arg in &self.args {
            out.push(',');
            out.push_str(&arg.to_string());
        }
        out.push(']');
        out
    }
}

/// What a connecting client told us and what its site's auth endpoint answered.
#[derive(Clone, Debug)]
pub struct Client {
    /// The `token` query parameter (a secret: never logged).
    pub token: String,
    /// The `deviceId` query parameter, `""` when absent.
    pub device: String,
    /// The client's rooms, as the auth endpoint listed them.
    pub rooms: Vec<String>,
}

/// Settings delivery needs.
#[derive(Clone, Copy, Debug)]
pub struct Settings {
    /// See `ServerConfig::device_ttl`.
    pub device_ttl: Duration,
    /// See `ServerConfig::queue_limits`.
    pub queue_limits: QueueLimits,
    /// See `ServerConfig::max_message_bytes`.
    pub max_message_bytes: usize,
    /// See `ServerConfig::idempotency_window`.
    pub idempotency_window: Duration,
    /// See `ServerConfig::max_sockets_per_device`.
    pub max_sockets_per_device: usize,
}

/// Why a message was not accepted.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// The stored form would exceed `max_message_bytes`.
    #[error("The message is {size} bytes as [event, ...args] JSON; server.max_message_bytes is {max}.")]
    TooLarge {
        /// Its size.
        size: usize,
        /// The limit.
        max: usize,
    },
    /// The `Idempotency-Key` was used before for a different request.
    #[error("This Idempotency-Key was already used for a different request.")]
    KeyReused,
    /// The store failed; nothing was accepted.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// How a `POST /send` was carried out.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Sent {
    /// Device queues the message was stored in.
    pub stored: usize,
    /// Devices it was emitted to live.
    pub live: usize,
    /// A retry of an earlier request with the same `Idempotency-Key`: nothing was done.
    pub replayed: bool,
}

/// The delivery service. Share it as `Arc<Delivery>`.
pub struct Delivery {
    store: Arc<dyn Store>,
    io: SocketIo,
    callbacks: Callbacks,
    settings: Settings,
    /// The socket that currently speaks for each connected device. A std mutex: every use is a
    /// single map operation, never held across an `.await`.
    sockets: DeviceSockets,
}

/// Serializes arguments so that socket.io spreads them: `emit(event, ...args)`.
struct Spread<'a>(&'a [Value]);

impl serde::Serialize for Spread<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut tuple = serializer.serialize_tuple(self.0.len())?;
        for arg in self.0 {
            tuple.serialize_element(arg)?;
        }
        tuple.end()
    }
}

/// The current time in milliseconds since the epoch.
pub fn now_ms() -> Millis {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as Millis)
}

impl Delivery {
    /// Builds the service over a store and the socket.io handle.
    pub fn new(store: Arc<dyn Store>, io: SocketIo, callbacks: Callbacks, settings: Settings) -> Self {
        Self { store, io, callbacks, settings, sockets: DeviceSockets::default() }
    }

    /// Connected sockets of a site.
    pub fn socket_count(&self, site: &str) -> usize {
        self.io.of(format!("/{site}")).map_or(0, |ns| ns.sockets().len())
    }

    /// The store, for background jobs.
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    fn expiry(&self) -> Expiry {
        Expiry { now: now_ms(), ttl_ms: self.settings.device_ttl.as_millis() as u64 }
    }

    fn live_socket(&self, device: &DeviceKey) -> Option<SocketRef> {
        self.sockets.newest(device)
    }

    /// Delivers a message per PROTOCOL.md: queued and emitted in reliable mode, broadcast
    /// otherwise. Returns once every queued copy is durable.
    ///
    /// With an idempotency key (`Idempotency-Key` and a fingerprint of the request), a retry
    /// within `idempotency_window` does nothing and says so; the key is stored with the message.
    pub async fn send(&self, site: &SiteConfig, msg: &Message, key: Option<(String, u64)>) -> Result<Sent, SendError> {
        let entry: Arc<str> = msg.entry().into();
        if entry.len() > self.settings.max_message_bytes {
            return Err(SendError::TooLarge { size: entry.len(), max: self.settings.max_message_bytes });
        }
        let expiry = self.expiry();
        let window = self.settings.idempotency_window.as_millis() as u64;
        let idempotency =
            key.map(|(key, fingerprint)| Idempotency { key, fingerprint, expires_at: expiry.now + window });
        let users = if site.reliable() { self.targets(site, &msg.rooms).await? } else { Vec::new() };
        if users.is_empty() && idempotency.is_none() {
            if !site.reliable() {
                self.broadcast(site, msg).await;
            }
            return Ok(Sent::default());
        }
        // Outside reliable mode this stores only the idempotency key.
        let limits = self.settings.queue_limits;
        let targets = users.len();
        let out = self.store.enqueue(&site.name, users, entry, expiry, limits, idempotency).await?;
        match out.replay {
            Some(Replay::Same) => {
                tracing::info!(site = %site.name, event = %msg.event, "retry with a known Idempotency-Key: nothing done");
                return Ok(Sent { replayed: true, ..Sent::default() });
            }
            Some(Replay::Different) => return Err(SendError::KeyReused),
            None => {}
        }
        if !site.reliable() {
            self.broadcast(site, msg).await;
            return Ok(Sent::default());
        }
        out.expired.iter().for_each(forgotten);
        for (dev, dropped) in &out.overflowed {
            tracing::warn!(site = %dev.site, room = %dev.user, device = %dev.device, dropped, "queue full: oldest messages dropped, device will get _resync");
            metrics::dropped(&dev.site, *dropped);
        }
        let stored = out.devices.len();
        metrics::stored(&site.name, stored as u64);
        let acks = FuturesUnordered::new();
        for dev in out.devices {
            let Some(socket) = self.live_socket(&dev) else { continue };
            match socket.emit_with_ack::<_, AckArgs>(&msg.event, &Spread(&msg.args)) {
                Ok(ack) => acks.push(async move { acked(ack).await.then_some((dev, socket)) }),
                Err(e) => emit_failed(&socket, &dev, &e),
            }
        }
        let live = acks.len();
        if live > 0 {
            let ack = LiveAck { store: self.store.clone(), id: out.id, event: msg.event.clone(), resync: msg.resync };
            tokio::spawn(ack.record_as_they_come(acks));
        }
        metrics::delivered_live(&site.name, live as u64);
        tracing::info!(site = %site.name, event = %msg.event, id = out.id, users = targets, stored, live, "message stored");
        Ok(Sent { stored, live, replayed: false })
    }

    /// The user rooms a message goes to: its user rooms, and the users of its shared rooms,
    /// each once, in the order first named.
    async fn targets(&self, site: &SiteConfig, rooms: &[String]) -> Result<Vec<String>, StoreError> {
        let mut users = Vec::new();
        for room in rooms {
            if site.is_user_room(room) {
                users.push(room.clone());
            } else {
                users.extend(self.store.users_in_room(&site.name, room).await?);
            }
        }
        // One room names each user once: only several can repeat one. (A fan-out to one big room
        // skips hashing every user.)
        if rooms.len() > 1 {
            let mut seen = HashSet::with_capacity(users.len());
            users.retain(|user| seen.insert(user.clone()));
        }
        Ok(users)
    }

    async fn broadcast(&self, site: &SiteConfig, msg: &Message) {
        let Some(ns) = self.io.of(format!("/{}", site.name)) else {
            return;
        };
        if msg.rooms.is_empty() {
            return;
        }
        match ns.to(msg.rooms.clone()).emit(&msg.event, &Spread(&msg.args)).await {
            Ok(()) => {
                tracing::info!(site = %site.name, event = %msg.event, rooms = msg.rooms.len(), "message broadcast")
            }
            Err(e) => tracing::warn!(site = %site.name, error.message = %e, "broadcast failed"),
        }
    }

    /// Runs the accepted-connection sequence of PROTOCOL.md for one socket. Devices are
    /// registered before `_settings` is emitted, so a client that has seen `_settings` gets
    /// every message sent from then on; the client still sees `_settings` before `_batch`.
    pub async fn connect(&self, site: &SiteConfig, socket: SocketRef, client: &Client) {
        socket.join(client.rooms.clone());
        let mut registered = Vec::new();
        if site.reliable() {
            for user in client.rooms.iter().filter(|r| site.is_user_room(r)) {
                let dev = DeviceKey::new(&site.name, user, &client.device);
                // Take over before reading the queue: a message stored from now on is emitted live.
                if let Some(evicted) = self.sockets.add(&dev, socket.clone(), self.settings.max_sockets_per_device) {
                    tracing::warn!(site = %site.name, room = %user, device = %dev.device, sid = %evicted.id, "too many sockets for one device: the oldest is disconnected");
                    let _ = evicted.disconnect();
                }
                match self.store.connect(&dev, &client.rooms).await {
                    Ok(connected) => registered.push((dev, connected)),
                    Err(e) => {
                        tracing::error!(site = %site.name, room = %user, device = %dev.device, error.message = %e, "device not registered")
                    }
                }
            }
        }
        let ttl = self.settings.device_ttl.as_secs();
        if let Err(e) = socket.emit("_settings", &serde_json::json!({ "device_ttl": ttl })) {
            tracing::debug!(site = %site.name, error.message = %e, "_settings not sent");
        }
        for (dev, connected) in registered {
            tracing::info!(site = %site.name, room = %dev.user, device = %dev.device, sid = %socket.id, queued = connected.pending.len(), "device connected");
            if connected.overflowed {
                send_resync(&socket, &site.name);
            }
            let user = dev.user.clone();
            if !connected.pending.is_empty() {
                self.send_batch(&socket, dev, connected.pending);
            }
            if site.public_channel.as_deref() != Some(&*user) {
                self.callbacks.presence(site, &user, &client.token, Presence::Connected);
            }
        }
        // A disconnect during the awaits above found no handler yet, or ran before the store
        // marked the devices connected: settle it now.
        if !socket.connected() {
            self.disconnect(site, &socket, client).await;
        }
    }

    fn send_batch(&self, socket: &SocketRef, dev: DeviceKey, pending: Vec<crate::store::Queued>) {
        let mut body = String::with_capacity(pending.iter().map(|q| q.entry.len() + 1).sum::<usize>() + 2);
        body.push('[');
        for (i, q) in pending.iter().enumerate() {
            if i > 0 {
                body.push(',');
            }
            body.push_str(&q.entry);
        }
        body.push(']');
        let batch: Value = match serde_json::from_str(&body) {
            Ok(v) => v,
            Err(e) => {
                tracing::error!(site = %dev.site, device = %dev.device, error.message = %e, "stored batch unreadable");
                return;
            }
        };
        let ids: Vec<_> = pending.iter().map(|q| q.id).collect();
        match socket.emit_with_ack::<_, AckArgs>("_batch", &batch) {
            Ok(ack) => {
                tracing::info!(site = %dev.site, room = %dev.user, device = %dev.device, messages = ids.len(), "_batch sent");
                metrics::delivered_batch(&dev.site, ids.len() as u64);
                let store = self.store.clone();
                tokio::spawn(async move {
                    if acked(ack).await {
                        match store.ack(&dev, &ids).await {
                            Ok(()) => {
                                metrics::acked(&dev.site, ids.len() as u64);
                                tracing::info!(site = %dev.site, room = %dev.user, device = %dev.device, messages = ids.len(), "_batch acked")
                            }
                            Err(e) => {
                                tracing::error!(site = %dev.site, device = %dev.device, error.message = %e, "batch ack not recorded")
                            }
                        }
                    }
                });
            }
            Err(e) => emit_failed(socket, &dev, &e),
        }
    }

    /// Runs the disconnect side: devices this socket spoke for are marked disconnected.
    pub async fn disconnect(&self, site: &SiteConfig, socket: &SocketRef, client: &Client) {
        if !site.reliable() {
            return;
        }
        let now = now_ms();
        for user in client.rooms.iter().filter(|r| site.is_user_room(r)) {
            let dev = DeviceKey::new(&site.name, user, &client.device);
            match self.sockets.remove(&dev, socket.id) {
                Removed::Last => {
                    if let Err(e) = self.store.disconnect(&dev, now).await {
                        tracing::error!(site = %site.name, device = %dev.device, error.message = %e, "disconnect not recorded");
                    }
                    tracing::info!(site = %site.name, room = %user, device = %dev.device, sid = %socket.id, "device disconnected");
                }
                Removed::OthersRemain => {
                    tracing::info!(site = %site.name, room = %user, device = %dev.device, sid = %socket.id, "socket left; the device's newest remaining socket gets live messages");
                }
                Removed::Unknown => {}
            }
            if site.public_channel.as_deref() != Some(user.as_str()) {
                self.callbacks.presence(site, user, &client.token, Presence::Disconnected);
            }
        }
    }

    /// Forgets expired devices. Run periodically by the sweeper.
    pub async fn sweep(&self) -> Result<usize, StoreError> {
        let expired = self.store.sweep(self.expiry()).await?;
        expired.iter().for_each(forgotten);
        Ok(expired.len())
    }
}

/// Most acks of one message recorded by one store job.
const ACK_GROUP: usize = 1024;

/// What recording the live acks of one message needs.
struct LiveAck {
    store: Arc<dyn Store>,
    id: MessageId,
    event: String,
    resync: bool,
}

impl LiveAck {
    /// Records the acks as they arrive: those that arrived together in one store job, instead
    /// of a task and a job for each device of a fan-out.
    async fn record_as_they_come<F>(self, mut acks: FuturesUnordered<F>)
    where
        F: Future<Output = Option<(DeviceKey, SocketRef)>>,
    {
        let this = Arc::new(self);
        while let Some(first) = acks.next().await {
            // With the acks that have arrived meanwhile. (`now_or_never` polls with a no-op
            // waker; the `.await` above registers the task's again before it waits.)
            let mut group = Vec::with_capacity((acks.len() + 1).min(ACK_GROUP));
            group.extend(first);
            while group.len() < ACK_GROUP {
                match acks.next().now_or_never() {
                    Some(Some(more)) => group.extend(more),
                    _ => break,
                }
            }
            if acks.is_empty() {
                this.record(group).await; // the last group, or a unicast's only one
            } else {
                // Written while the next group is collected: awaiting it here would hold the
                // next group back by a whole store round.
                let this = this.clone();
                tokio::spawn(async move { this.record(group).await });
            }
        }
    }

    /// Records the acks of some devices. An ack of a `resync` message is checked for order: out
    /// of order, the event's queue is cleared and the device gets `_resync`.
    async fn record(&self, acked: Vec<(DeviceKey, SocketRef)>) {
        let Some((first, _)) = acked.first() else { return };
        let (store, id) = (&*self.store, self.id);
        if self.resync {
            let checks = acked.iter().map(|(dev, socket)| ack_in_order(store, dev, socket, id, &self.event));
            futures_util::future::join_all(checks).await;
            return;
        }
        let site = first.site.clone();
        let devices = acked.len();
        match store.ack_each(acked.into_iter().map(|(dev, _)| dev).collect(), id).await {
            Ok(()) => {
                metrics::acked(&site, devices as u64);
                tracing::debug!(site = %site, id, devices, "acked");
            }
            Err(e) => tracing::error!(site = %site, id, devices, error.message = %e, "acks not recorded"),
        }
    }
}

/// Records the ack of a `resync` message, checked for order.
async fn ack_in_order(store: &dyn Store, dev: &DeviceKey, socket: &SocketRef, id: MessageId, event: &str) {
    match store.ack_checked(dev, id, event).await {
        Ok(outcome) => {
            metrics::acked(&dev.site, 1);
            if let CheckedAck::Resync { cleared } = outcome {
                tracing::info!(site = %dev.site, room = %dev.user, device = %dev.device, %event, cleared, "ack out of order: queue of the event cleared, _resync sent");
                send_resync(socket, &dev.site);
            }
            tracing::debug!(site = %dev.site, room = %dev.user, device = %dev.device, id, "acked");
        }
        Err(e) => tracing::error!(site = %dev.site, device = %dev.device, error.message = %e, "ack not recorded"),
    }
}

/// Logs and counts a device forgotten after `device_ttl`.
fn forgotten(dev: &DeviceKey) {
    tracing::info!(site = %dev.site, room = %dev.user, device = %dev.device, "device expired: forgotten with its queue");
    metrics::expired(&dev.site);
}

/// Handles an emit that could not be queued for a socket; what it carried stays in the store.
/// A full buffer means the client stopped reading: it is disconnected, so that neither it nor its
/// buffer lingers until the heartbeat times out.
fn emit_failed(socket: &SocketRef, dev: &DeviceKey, e: &socketioxide::SendError) {
    use socketioxide::{SendError, SocketError};
    if matches!(e, SendError::Socket(SocketError::InternalChannelFull)) {
        tracing::warn!(site = %dev.site, room = %dev.user, device = %dev.device, sid = %socket.id, "slow consumer: its buffer is full, disconnected; its messages stay queued");
        metrics::slow_consumer(&dev.site);
        let _ = socket.clone().disconnect();
    } else {
        tracing::debug!(site = %dev.site, device = %dev.device, error.message = %e, "emit failed: the message stays queued");
    }
}

/// Tells a client to resync (no arguments).
fn send_resync(socket: &SocketRef, site: &str) {
    if socket.emit("_resync", &Spread(&[])).is_ok() {
        metrics::resync(site);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::store::MemoryStore;

    const SITE: &str = r#"
        [sites.shop]
        auth_url = "http://127.0.0.1:9/auth"
        api_key = "k"
        user_room_prefix = "user_"
        public_channel = "browse"
    "#;

    async fn delivery_with(users: &[(&str, &[&str])]) -> (Delivery, Arc<SiteConfig>) {
        let config = Config::from_toml(SITE).unwrap();
        let store = MemoryStore::new();
        for (user, rooms) in users {
            let rooms: Vec<String> = rooms.iter().map(|r| r.to_string()).collect();
            store.connect(&DeviceKey::new("shop", user, "d"), &rooms).await.unwrap();
        }
        let (_svc, io) = SocketIo::new_svc();
        let callbacks = Callbacks::new(&config.server).unwrap();
        let settings = Settings {
            device_ttl: config.server.device_ttl,
            queue_limits: config.server.queue_limits,
            max_message_bytes: config.server.max_message_bytes,
            idempotency_window: config.server.idempotency_window,
            max_sockets_per_device: config.server.max_sockets_per_device,
        };
        let site = Arc::new(config.sites["shop"].clone());
        (Delivery::new(Arc::new(store), io, callbacks, settings), site)
    }

    fn rooms(list: &[&str]) -> Vec<String> {
        list.iter().map(|r| r.to_string()).collect()
    }

    #[tokio::test]
    async fn shared_rooms_expand_case_insensitively_and_targets_are_deduplicated() {
        let (delivery, site) = delivery_with(&[
            ("user_1", &["user_1", "Staff"]),
            ("user_2", &["user_2", "staff", "reviewer"]),
            ("user_3", &["user_3"]),
        ])
        .await;
        let mut got = delivery.targets(&site, &rooms(&["STAFF", "user_2", "reviewer"])).await.unwrap();
        got.sort();
        assert_eq!(got, ["user_1", "user_2"]);
        // User rooms and the public channel are targets as named, known or not.
        let got = delivery.targets(&site, &rooms(&["user_9_admin", "browse", "nobody-here"])).await.unwrap();
        assert_eq!(got, ["user_9_admin", "browse"]);
    }

    #[tokio::test]
    async fn messages_to_users_that_never_connected_store_nothing() {
        let (delivery, site) = delivery_with(&[("user_1", &["user_1"])]).await;
        let msg = Message { rooms: rooms(&["user_2", "staff"]), event: "e".into(), args: vec![], resync: false };
        assert_eq!(delivery.send(&site, &msg, None).await.unwrap(), Sent::default());
        let msg = Message { rooms: rooms(&["user_1"]), ..msg };
        assert_eq!(delivery.send(&site, &msg, None).await.unwrap(), Sent { stored: 1, live: 0, replayed: false });
    }

    #[tokio::test]
    async fn oversized_messages_are_refused_before_anything_is_stored() {
        let (delivery, site) = delivery_with(&[("user_1", &["user_1"])]).await;
        let big = Value::String("x".repeat(512 * 1024));
        let msg = Message { rooms: rooms(&["user_1"]), event: "e".into(), args: vec![big], resync: false };
        let err = delivery.send(&site, &msg, None).await.unwrap_err();
        assert!(matches!(err, SendError::TooLarge { max: 524_288, .. }), "{err}");
        assert!(delivery.store().pending(&DeviceKey::new("shop", "user_1", "d")).await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn a_retried_request_is_answered_like_the_first_and_a_reused_key_is_refused() {
        let (delivery, site) = delivery_with(&[("user_1", &["user_1"])]).await;
        let msg = Message { rooms: rooms(&["user_1"]), event: "e".into(), args: vec![], resync: false };
        let key = |fp| Some(("retry-1".to_string(), fp));
        assert_eq!(delivery.send(&site, &msg, key(1)).await.unwrap().stored, 1);
        assert!(delivery.send(&site, &msg, key(1)).await.unwrap().replayed);
        assert!(matches!(delivery.send(&site, &msg, key(2)).await, Err(SendError::KeyReused)));
        assert_eq!(delivery.store().pending(&DeviceKey::new("shop", "user_1", "d")).await.unwrap().len(), 1);
    }

    #[test]
    fn entries_are_event_then_args() {
        let msg = Message {
            rooms: vec![],
            event: "up\"d".into(),
            args: vec![Value::Null, serde_json::json!({"a":[1]})],
            resync: false,
        };
        assert_eq!(msg.entry(), r#"["up\"d",null,{"a":[1]}]"#);
        let none = Message { args: vec![], ..msg };
        assert_eq!(none.entry(), r#"["up\"d"]"#);
    }
}
