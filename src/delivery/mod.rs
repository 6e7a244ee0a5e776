//! The domain core: accept a message, persist it, fan it out to live sockets, record acks.
//!
//! `POST /send` calls [`Delivery::send`] (`send.rs`); the socket.io handlers call
//! [`Delivery::connect`] and [`Delivery::disconnect`] (`connect.rs`). Which socket currently
//! speaks for a device, and in what order a device's connects, disconnects and deliveries
//! happen, lives in memory here (`sockets.rs`); everything that must survive a restart lives in
//! the [`Store`]. Acks are recorded in the order clients sent them by one task (`ack.rs`).
//!
//! A message is emitted only after the store has made it durable, so every emitted message can
//! be acked away. Its ack removes exactly that message; a `_batch` ack removes exactly the
//! batch. What a client sees on one connection: `_settings`, then (if it owes one) `_resync`,
//! then one `_batch` with everything queued before its connect, then live messages, each
//! message once.

mod ack;
mod connect;
mod emit;
mod send;
mod sockets;

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::Value;
use socketioxide::SocketIo;

use crate::callbacks::Callbacks;
use crate::metrics;
use crate::relay::{Notice, Relay, Relayed};
use crate::store::{Ack, DeviceKey, Expiry, Millis, QueueLimits, Resync, Store, StoreError};

pub use self::ack::AckArgs;
use self::ack::Acks;
use self::emit::{Item, LiveMessage};
use self::sockets::{DeviceSockets, Offered};

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
    /// See `ServerConfig::max_devices_per_user`.
    pub max_devices_per_user: u64,
    /// See `ServerConfig::max_name_bytes`.
    pub max_name_bytes: usize,
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
    /// The task carrying the message out panicked; whether it was stored is not known.
    #[error("the delivery task failed: {0}")]
    Internal(String),
}

/// How a `POST /send` was carried out.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Sent {
    /// Device queues the message was stored in.
    pub stored: usize,
    /// Devices it was emitted to live, or held for until their connect ends.
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
    sockets: Arc<DeviceSockets>,
    acks: Arc<Acks>,
    /// The task recording acks (see [`Delivery::new`]); if it ever ends, acks are lost, so
    /// [`Delivery::failure`] reports it.
    recorder: tokio::task::JoinHandle<()>,
    /// With a Redis store: the other nodes, and the task delivering what they send here.
    relay: Option<(Relay, tokio::task::JoinHandle<()>)>,
}

/// The current time in milliseconds since the epoch.
pub fn now_ms() -> Millis {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as Millis)
}

impl Delivery {
    /// Builds the service over a store and the socket.io handle. Spawns the task that records
    /// acks; call it within a tokio runtime.
    pub fn new(store: Arc<dyn Store>, io: SocketIo, callbacks: Callbacks, settings: Settings) -> Self {
        let (sockets, acks) = (Arc::new(DeviceSockets::default()), Arc::new(Acks::default()));
        let recorder = tokio::spawn(record_acks(store.clone(), sockets.clone(), acks.clone()));
        Self { store, io, callbacks, settings, sockets, acks, recorder, relay: None }
    }

    /// Joins the other nodes of a shared store: live messages for devices held elsewhere go
    /// through `relay`, and what other nodes send here is delivered to this node's sockets.
    pub fn with_relay(mut self, relay: Relay, notices: tokio::sync::mpsc::Receiver<Relayed>) -> Self {
        let task = tokio::spawn(relayed(
            notices,
            self.store.clone(),
            self.sockets.clone(),
            self.acks.clone(),
            self.io.clone(),
            relay.node().to_owned(),
        ));
        self.relay = Some((relay, task));
        self
    }

    /// This node's id, on a store shared by several nodes.
    pub fn node(&self) -> Option<&str> {
        self.relay.as_ref().map(|(relay, _)| relay.node())
    }

    /// Whether this node hears the other nodes (always, without a relay).
    pub fn relay_subscribed(&self) -> bool {
        self.relay.as_ref().is_none_or(|(relay, _)| relay.is_subscribed())
    }

    /// Connected sockets of a site.
    pub fn socket_count(&self, site: &str) -> usize {
        self.io.of(format!("/{site}")).map_or(0, |ns| ns.sockets().len())
    }

    /// The store, for background jobs.
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    /// The settings it runs with.
    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// Why delivery cannot go on, if it cannot: the store stopped, or the ack recorder died.
    pub fn failure(&self) -> Option<String> {
        if self.recorder.is_finished() {
            return Some("the task recording acks stopped".into());
        }
        if self.relay.as_ref().is_some_and(|(_, task)| task.is_finished()) {
            return Some("the task delivering relayed messages stopped".into());
        }
        self.store.failure()
    }

    fn expiry(&self) -> Expiry {
        Expiry { now: now_ms(), ttl_ms: self.settings.device_ttl.as_millis() as u64 }
    }

    /// Forgets expired devices. Run periodically by the sweeper.
    pub async fn sweep(&self) -> Result<usize, StoreError> {
        let expired = self.store.sweep(self.expiry()).await?;
        expired.iter().for_each(forgotten);
        Ok(expired.len())
    }
}

/// Records acks as they arrive, in order, as many as have arrived in one store job; delivers
/// the `_resync` an out-of-order ack owes. Runs for the life of the process.
async fn record_acks(store: Arc<dyn Store>, sockets: Arc<DeviceSockets>, acks: Arc<Acks>) {
    loop {
        let arrived = acks.next().await;
        let counts = count_by_site(&arrived);
        let batches: Vec<(DeviceKey, usize)> = arrived
            .iter()
            .filter_map(|ack| match ack {
                Ack::Batch { device, ids } => Some((device.clone(), ids.len())),
                Ack::Live { .. } => None,
            })
            .collect();
        let resyncs = match store.acks(arrived).await {
            Ok(resyncs) => resyncs,
            Err(e) => {
                tracing::error!(error.message = %e, acks = counts.iter().map(|(_, n)| n).sum::<u64>(), "acks not recorded: those messages will be delivered again");
                continue;
            }
        };
        for (site, n) in counts {
            metrics::acked(&site, n);
        }
        for dev in &batches {
            tracing::info!(site = %dev.0.site, room = %dev.0.user, device = %dev.0.device, messages = dev.1, "_batch acked");
        }
        for resync in resyncs {
            let dev = &resync.device;
            tracing::info!(site = %dev.site, room = %dev.user, device = %dev.device, event = %resync.event, cleared = resync.cleared, "ack out of order: the queue of the event was cleared, the device owes a _resync");
            tokio::spawn(deliver_resync(store.clone(), sockets.clone(), acks.clone(), resync));
        }
    }
}

/// Delivers what other nodes relay here to this node's sockets, as a local send would. After a
/// gap in the relay, sockets of devices with queued messages reconnect to get them (see `relay`).
async fn relayed(
    mut notices: tokio::sync::mpsc::Receiver<Relayed>,
    store: Arc<dyn Store>,
    sockets: Arc<DeviceSockets>,
    acks: Arc<Acks>,
    io: SocketIo,
    node: String,
) {
    while let Some(relayed) = notices.recv().await {
        match relayed {
            Relayed::Notice(Notice::Message { site, id, event, args, resync, devices }) => {
                metrics::relay_notice("received");
                let item = Item::Message(Arc::new(LiveMessage { id, event: event.into(), args, resync }));
                for (user, device, follows) in devices {
                    let dev = DeviceKey::new(&site, &user, &device);
                    if let Offered::Failed(socket, e) =
                        sockets.offer(&dev, &item, Some(follows), |s, item| emit::emit(&acks, s, &dev, item))
                    {
                        emit::emit_failed(socket, &dev, &e);
                    }
                }
            }
            Relayed::Notice(Notice::Broadcast { from, site, rooms, event, args }) if from != node => {
                if let Some(ns) = io.of(format!("/{site}")) {
                    if let Err(e) = ns.to(rooms).emit(&event, &emit::Spread(&args)).await {
                        tracing::warn!(site = %site, error.message = %e, "relayed broadcast failed");
                    }
                }
            }
            Relayed::Notice(Notice::Broadcast { .. }) => {}
            Relayed::Resumed => {
                let mut reconnected = 0;
                for dev in sockets.devices() {
                    // Unknown (the store failing again): reconnect too, the safe side.
                    if store.device(&dev).await.map_or(true, |d| d.is_some_and(|d| d.queue_len > 0)) {
                        reconnected += sockets.close_transports(&dev);
                    }
                }
                tracing::warn!(
                    sockets = reconnected,
                    "after a gap in the relay: sockets of devices with queued messages reconnect to get them"
                );
            }
        }
    }
}

/// How long after an out-of-order ack its `_resync` goes to the live socket. A client that acks
/// and leaves at once (a reload) is often still seen connected for some milliseconds, its close
/// a few packets behind the ack, and a `_resync` sent then would be lost with it. Past this
/// grace a client that left is seen gone, and the `_resync` waits for its next connect.
const RESYNC_GRACE: Duration = Duration::from_millis(250);

/// Sends the `_resync` an out-of-order ack owes to the device's newest socket, once the grace
/// is over, and records that it did. Otherwise the mark stays for the next connect.
async fn deliver_resync(store: Arc<dyn Store>, sockets: Arc<DeviceSockets>, acks: Arc<Acks>, resync: Resync) {
    tokio::time::sleep(RESYNC_GRACE).await;
    let dev = &resync.device;
    let item = Item::Resync(resync.seq);
    let told = match sockets.offer(dev, &item, None, |socket, item| emit::emit(&acks, socket, dev, item)) {
        Offered::Sent => {
            resync_sent(&*store, dev, resync.seq).await;
            "sent"
        }
        Offered::Held => "sent once its connect ends",
        Offered::Skipped => "sent by its connect",
        Offered::NoSocket => "owed: sent at its next connect",
        Offered::Failed(socket, e) => {
            emit::emit_failed(socket, dev, &e);
            "owed: sent at its next connect"
        }
    };
    tracing::info!(site = %dev.site, room = %dev.user, device = %dev.device, "_resync {told}");
}

/// Acks per site, for the metrics: counted before the store takes them.
fn count_by_site(acks: &[Ack]) -> Vec<(Arc<str>, u64)> {
    let mut counts: Vec<(Arc<str>, u64)> = Vec::new();
    for ack in acks {
        let (site, n) = match ack {
            Ack::Live { device, .. } => (&device.site, 1),
            Ack::Batch { device, ids } => (&device.site, ids.len() as u64),
        };
        match counts.iter_mut().find(|(s, _)| s == site) {
            Some((_, count)) => *count += n,
            None => counts.push((site.clone(), n)),
        }
    }
    counts
}

/// Records that the `_resync` owed since `seq` reached a live socket.
async fn resync_sent(store: &dyn Store, dev: &DeviceKey, seq: u64) {
    if let Err(e) = store.resync_sent(dev, seq).await {
        tracing::warn!(site = %dev.site, device = %dev.device, error.message = %e, "a delivered _resync not recorded: it is sent again at the next connect");
    }
}

/// Logs and counts a device forgotten after `device_ttl`.
fn forgotten(dev: &DeviceKey) {
    tracing::info!(site = %dev.site, room = %dev.user, device = %dev.device, "device expired: forgotten with its queue");
    metrics::expired(&dev.site);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Config, SiteConfig};
    use crate::store::MemoryStore;

    const SITE: &str = r#"
        [sites.shop]
        auth_url = "http://127.0.0.1:9/auth"
        api_key = "k"
        user_room_prefix = "user_"
        public_channel = "browse"
    "#;

    async fn delivery_with(users: &[(&str, &[&str])]) -> (Arc<Delivery>, Arc<SiteConfig>) {
        let config = Config::from_toml(SITE).unwrap();
        let store = MemoryStore::new();
        for (user, rooms) in users {
            let rooms: Vec<String> = rooms.iter().map(|r| r.to_string()).collect();
            store.connect(&DeviceKey::new("shop", user, "d"), &rooms, None).await.unwrap();
        }
        let (_svc, io) = SocketIo::new_svc();
        let callbacks = Callbacks::new(&config.server).unwrap();
        let settings = Settings {
            device_ttl: config.server.device_ttl,
            queue_limits: config.server.queue_limits,
            max_message_bytes: config.server.max_message_bytes,
            idempotency_window: config.server.idempotency_window,
            max_sockets_per_device: config.server.max_sockets_per_device,
            max_devices_per_user: config.server.max_devices_per_user,
            max_name_bytes: config.server.max_name_bytes,
        };
        let site = Arc::new(config.sites["shop"].clone());
        (Arc::new(Delivery::new(Arc::new(store), io, callbacks, settings)), site)
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
        assert_eq!(delivery.send(&site, msg.clone(), None).await.unwrap(), Sent::default());
        let msg = Message { rooms: rooms(&["user_1"]), ..msg };
        assert_eq!(
            delivery.send(&site, msg.clone(), None).await.unwrap(),
            Sent { stored: 1, live: 0, replayed: false }
        );
    }

    #[tokio::test]
    async fn oversized_messages_are_refused_before_anything_is_stored() {
        let (delivery, site) = delivery_with(&[("user_1", &["user_1"])]).await;
        let big = Value::String("x".repeat(512 * 1024));
        let msg = Message { rooms: rooms(&["user_1"]), event: "e".into(), args: vec![big], resync: false };
        let err = delivery.send(&site, msg.clone(), None).await.unwrap_err();
        assert!(matches!(err, SendError::TooLarge { max: 524_288, .. }), "{err}");
        assert!(delivery.store().pending(&DeviceKey::new("shop", "user_1", "d")).await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn a_retried_request_is_answered_like_the_first_and_a_reused_key_is_refused() {
        let (delivery, site) = delivery_with(&[("user_1", &["user_1"])]).await;
        let msg = Message { rooms: rooms(&["user_1"]), event: "e".into(), args: vec![], resync: false };
        let key = |fp| Some(("retry-1".to_string(), fp));
        assert_eq!(delivery.send(&site, msg.clone(), key(1)).await.unwrap().stored, 1);
        assert!(delivery.send(&site, msg.clone(), key(1)).await.unwrap().replayed);
        assert!(matches!(delivery.send(&site, msg.clone(), key(2)).await, Err(SendError::KeyReused)));
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
