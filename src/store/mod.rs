//! Durable state behind one small, domain-shaped trait.
//!
//! The store keeps, per site: every user room's latest room list (for shared-room expansion),
//! every device's connection state (connected, or disconnected since when) and every device's
//! queue of unacknowledged messages in send order. Nothing above this module names sled: the
//! delivery code holds an `Arc<dyn Store>`, so another backend (Redis, say) only has to pass the
//! same conformance suite (`store::tests`).
//!
//! The rules (expiry, queue caps, the order of `resync` acks, idempotency, the cap on devices)
//! are written once, in `rules.rs`; each backend, in its own folder or file (`sled/`,
//! `memory.rs`), only stores and reads.
//!
//! Each method is one atomic unit of work. Methods that accept data from `POST /send`, register
//! a device or act for an operator return only once the change is durable. Acknowledgements,
//! disconnect times and expiry may be lazier (the sled store makes them durable with the next
//! durable change, or within a second): a lost removal only means a duplicate delivery, and a
//! lost disconnect time is set again at the next start.

pub mod memory;
pub mod redis;
mod rules;
pub mod sled;

use std::collections::BTreeMap;
use std::sync::Arc;

use async_trait::async_trait;

pub use self::memory::MemoryStore;
pub use self::redis::{RedisOptions, RedisStore};
pub use self::sled::SledStore;

/// Milliseconds since the Unix epoch.
pub type Millis = u64;

/// Identifies one queued message. Ids grow with send order, across restarts.
pub type MessageId = u64;

/// One device of one user room of one site: the unit that owns a queue.
///
/// Its parts are shared, not copied, by clones: a message to a user room of 10,000 devices
/// clones 10,000 keys on the store's writer, and the workers drop them.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DeviceKey {
    /// The site (socket.io namespace without its leading `/`).
    pub site: Arc<str>,
    /// The user room (or public channel) the device is registered under.
    pub user: Arc<str>,
    /// The client's `deviceId`; `""` when the client gave none.
    pub device: Arc<str>,
}

impl DeviceKey {
    /// Builds a key from its three parts.
    pub fn new(site: &str, user: &str, device: &str) -> Self {
        Self { site: site.into(), user: user.into(), device: device.into() }
    }
}

/// One message waiting in a device's queue.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Queued {
    /// The message's id, shared by every device the message was queued for.
    pub id: MessageId,
    /// When it was queued.
    pub queued_at: Millis,
    /// The message as the JSON array `[event, ...args]`, the shape `_batch` entries take.
    pub entry: Arc<str>,
}

/// When a disconnected device is forgotten.
#[derive(Clone, Copy, Debug)]
pub struct Expiry {
    /// The current time.
    pub now: Millis,
    /// How long a device may stay disconnected; `0` means forever.
    pub ttl_ms: u64,
}

/// Per-device caps on a queue. When a new message does not fit, the oldest messages are dropped
/// and the device is flagged so it gets `_resync` on its next connect.
#[derive(Clone, Copy, Debug)]
pub struct QueueLimits {
    /// Most messages one device may have queued.
    pub max_len: u64,
    /// Most bytes (of `[event, ...args]` JSON) one device may have queued.
    pub max_bytes: u64,
}

impl Default for QueueLimits {
    fn default() -> Self {
        Self { max_len: 10_000, max_bytes: 16 * 1024 * 1024 }
    }
}

/// What the store keeps about one device.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DeviceState {
    /// A socket of this device is connected.
    pub connected: bool,
    /// When the device last disconnected (0 while it never did).
    pub disconnected_at: Millis,
    /// Messages in its queue.
    pub queue_len: u64,
    /// Bytes of the entries in its queue.
    pub queue_bytes: u64,
    /// Messages were dropped from the queue to respect its caps since the last connect.
    pub overflowed: bool,
    /// An out-of-order ack cleared the queue of an event and the device has not been told yet:
    /// it gets `_resync` on a live socket or at its next connect. The value orders that ack
    /// against connects, as message ids do (see [`Connected::watermark`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resync_at: Option<MessageId>,
}

/// What a site holds, for metrics and operators.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct SiteStats {
    /// Registered devices.
    pub devices: u64,
    /// Devices with a connected socket.
    pub connected: u64,
    /// Messages queued over all devices.
    pub queued_messages: u64,
    /// Bytes queued over all devices.
    pub queued_bytes: u64,
}

/// One device of a user room, for operators.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct DeviceInfo {
    /// The device id (`""` for clients without one).
    pub device: String,
    /// What the store keeps about it.
    #[serde(flatten)]
    pub state: DeviceState,
    /// When its oldest queued message was queued.
    pub oldest_queued_at: Option<Millis>,
}

/// A `/send` retry guard: the first request with `key` is stored, a repeat within the window is
/// answered like it and stores nothing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Idempotency {
    /// The `Idempotency-Key` the website sent.
    pub key: String,
    /// A hash of the request, to tell a retry from a different request reusing the key.
    pub fingerprint: u64,
    /// When the key may be forgotten.
    pub expires_at: Millis,
}

/// A repeated `Idempotency-Key`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Replay {
    /// The same request again: nothing was stored.
    Same,
    /// Another request with a used key: nothing was stored.
    Different,
}

/// The result of queueing one message.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Enqueued {
    /// The message's id.
    pub id: MessageId,
    /// Devices the message was queued for.
    pub devices: Vec<DeviceKey>,
    /// Devices found expired on the way, forgotten together with their queues.
    pub expired: Vec<DeviceKey>,
    /// Devices whose oldest messages were dropped to make room, with how many.
    pub overflowed: Vec<(DeviceKey, u64)>,
    /// Set when the idempotency key was seen before: then nothing else was done.
    pub replay: Option<Replay>,
    /// A store shared by several nodes: the devices among `devices` whose newest socket is on
    /// another node, by node, for that node to emit the message live. Empty otherwise.
    pub elsewhere: Vec<(String, Vec<DeviceKey>)>,
    /// A store shared by several nodes: for each of `devices`, the newest message its queue held
    /// before this one (0: none), so that the node holding its socket emits them in order (a
    /// message from another node may come after a newer one). Empty otherwise.
    pub follows: Vec<MessageId>,
}

/// What a device learns when it connects.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Connected {
    /// Its queue, oldest first.
    pub pending: Vec<Queued>,
    /// It was owed a `_resync` (its queue overflowed, or an ack came out of order): send it now.
    /// Taking it clears it.
    pub resync: bool,
    /// Splits the device's messages between this connect and live delivery: every message
    /// queued before the connect has an id below it (and is in `pending` if still queued),
    /// every later one an id at or above it. Owed resyncs are numbered the same way.
    pub watermark: MessageId,
    /// Disconnected devices of the same user room forgotten, with their queues, to make room for
    /// this one under the cap on devices per user (oldest disconnect first).
    pub forgotten: Vec<DeviceKey>,
}

/// One acknowledgement from a client, recorded in the order the clients sent them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Ack {
    /// The ack of a live message: removes exactly that message.
    Live {
        /// Whose queue.
        device: DeviceKey,
        /// The message.
        id: MessageId,
        /// Set for a message sent with `resync=true`: its event. The ack is then checked for
        /// order: if an older message of the event is still queued, every queued message of
        /// the event is removed and the device is owed a `_resync`.
        checked: Option<Arc<str>>,
    },
    /// The ack of a `_batch`: removes exactly the messages it carried.
    Batch {
        /// Whose queue.
        device: DeviceKey,
        /// The batch's messages.
        ids: Vec<MessageId>,
    },
}

/// An out-of-order ack: the queue of its event was cleared and the device owes a `_resync`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Resync {
    /// The device.
    pub device: DeviceKey,
    /// The event whose queue was cleared.
    pub event: Arc<str>,
    /// How many messages were removed.
    pub cleared: u64,
    /// Orders this against the device's connects ([`Connected::watermark`]): a connect with a
    /// watermark above it delivered the `_resync`; otherwise the live path must, then call
    /// [`Store::resync_sent`].
    pub seq: MessageId,
}

/// Everything that can go wrong in a store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The backend failed to read or write (disk full, I/O error).
    #[error("storage I/O failed: {0}")]
    Io(String),
    /// Stored bytes could not be decoded.
    #[error("corrupt record under key {key}")]
    Corrupt {
        /// The key, printed escaped.
        key: String,
    },
    /// A new device would pass the cap on devices per user room, and every device of the room
    /// is connected, so none could be forgotten to make room.
    #[error("user room has {max} devices, all connected (server.max_devices_per_user)")]
    TooManyDevices {
        /// The cap.
        max: u64,
    },
    /// A name is longer than the store can encode.
    #[error("{what} is longer than {max} bytes")]
    TooLong {
        /// Which name.
        what: &'static str,
        /// The limit.
        max: usize,
    },
    /// The data disk is below its free-space floor: nothing new is accepted until space is
    /// freed (acks and expiry still run, and free space).
    #[error("disk almost full: {free} bytes free, min_free_disk_bytes is {min}")]
    DiskFull {
        /// Bytes free for the service.
        free: u64,
        /// The floor.
        min: u64,
    },
    /// The shared store (Redis) did not answer, or answered an error: the change may or may not
    /// have been made.
    #[error("the store is unreachable: {0}")]
    Unavailable(String),
    /// The store's writer has stopped (shutdown, a failed sync, or a crash of its thread).
    #[error("the store is closed")]
    Closed,
    /// The data directory is damaged beyond what recovery repairs: the store does not open.
    #[error("data dir damaged: {0}")]
    Damaged(String),
    /// This backend cannot do what was asked (a backup of Redis, say).
    #[error("{0}")]
    Unsupported(&'static str),
    /// The data directory was written by an incompatible version.
    #[error("data dir has schema version {found}, this build reads {expected}")]
    Schema {
        /// The version on disk.
        found: u32,
        /// The version this build writes.
        expected: u32,
    },
}

/// One piece of a store's state, as a backup (`crate::snapshot`) or an import carries it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Record {
    /// A user room's latest room list.
    User {
        /// The site.
        site: String,
        /// The user room.
        user: String,
        /// Its room list.
        rooms: Vec<String>,
    },
    /// A device. Its queue figures are ignored: the queue is what its messages make it.
    Device {
        /// Which.
        key: DeviceKey,
        /// Its state.
        state: DeviceState,
    },
    /// A message in a device's queue.
    Message {
        /// Whose queue.
        device: DeviceKey,
        /// The message.
        message: Queued,
        /// Queued for several devices under the same id (kept once where the backend can).
        shared: bool,
    },
    /// Message ids below `next` may be in use: later ones are given out from there (a snapshot
    /// carries it in its header).
    Ids {
        /// The first id free.
        next: MessageId,
    },
    /// A `/send` retry guard.
    Idempotency {
        /// The site.
        site: String,
        /// The key, its request's fingerprint and expiry.
        record: Idempotency,
    },
}

/// A consistent copy of a store's state, taken when [`Store::export`] answered: `write` streams
/// it, in the order a snapshot holds it (users, then each device followed by its queue in send
/// order, then idempotency keys). It runs on the calling thread and may block: call it from a
/// blocking thread. The store keeps serving meanwhile.
pub struct Export {
    /// Every message id in the copy is below this.
    pub next_id: MessageId,
    /// Streams the records to a sink; stops at the sink's first error.
    pub write: ExportFn,
}

/// The body of an [`Export`].
pub type ExportFn = Box<dyn FnOnce(&mut RecordSink<'_>) -> Result<(), StoreError> + Send>;

/// Where an [`Export`] puts its records.
pub type RecordSink<'a> = dyn FnMut(Record) -> std::io::Result<()> + 'a;

/// What [`Store::load`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Loaded {
    /// Records written.
    pub written: u64,
    /// Records skipped because the store already held them (a second run of an import).
    pub skipped: u64,
}

/// The durable state of sio-push. See the module docs for the guarantees.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Registers `device` as connected under its user room, replaces the user's room list with
    /// `rooms`, and returns the device's queue with the split between it and live delivery.
    /// Takes (clears) an owed `_resync`. With `max_devices`, a device new to its user room that
    /// would pass the cap makes room by forgetting the room's devices that disconnected first
    /// (the rule is in `rules.rs`); if they are all connected it is refused
    /// (`StoreError::TooManyDevices`) and nothing changes.
    async fn connect(
        &self,
        device: &DeviceKey,
        rooms: &[String],
        max_devices: Option<u64>,
    ) -> Result<Connected, StoreError>;

    /// Marks `device` as disconnected since `now`. Unknown devices are ignored.
    async fn disconnect(&self, device: &DeviceKey, now: Millis) -> Result<(), StoreError>;

    /// Marks every device connected at startup (left so by a crash) as disconnected since `now`.
    async fn disconnect_all(&self, now: Millis) -> Result<u64, StoreError>;

    /// The user rooms of `site` whose room list holds `room`, compared case-insensitively.
    async fn users_in_room(&self, site: &str, room: &str) -> Result<Vec<String>, StoreError>;

    /// Appends `entry` to the queue of every live device of every user in `users`, forgetting
    /// expired devices on the way. With `idempotency`, a key seen before (and not expired)
    /// makes this a no-op that says so; a new key is stored with the message, atomically.
    /// Returns once durable. `users` names each user room once (the caller removes repeats): a
    /// repeat would queue the message twice on the same devices.
    async fn enqueue(
        &self,
        site: &str,
        users: Vec<String>,
        entry: Arc<str>,
        expiry: Expiry,
        limits: QueueLimits,
        idempotency: Option<Idempotency>,
    ) -> Result<Enqueued, StoreError>;

    /// The device's queue, oldest first.
    async fn pending(&self, device: &DeviceKey) -> Result<Vec<Queued>, StoreError>;

    /// Records acknowledgements in the given order (see [`Ack`]); ids no longer queued are
    /// ignored. Returns the out-of-order acks: each cleared its event's queue and, in the same
    /// atomic change, marked the device as owed a `_resync`.
    async fn acks(&self, acks: Vec<Ack>) -> Result<Vec<Resync>, StoreError>;

    /// The `_resync` owed since `seq` reached a live socket: clears it, unless a connect took it
    /// first or a later out-of-order ack replaced it.
    async fn resync_sent(&self, device: &DeviceKey, seq: MessageId) -> Result<(), StoreError>;

    /// Forgets every expired device with its queue, and every expired idempotency key, and
    /// returns the devices.
    async fn sweep(&self, expiry: Expiry) -> Result<Vec<DeviceKey>, StoreError>;

    /// What is known about one device, if anything.
    async fn device(&self, device: &DeviceKey) -> Result<Option<DeviceState>, StoreError>;

    /// Counts per site. The sled store counts once and then keeps them through every change, so
    /// this is cheap to call at every scrape.
    async fn stats(&self) -> Result<BTreeMap<String, SiteStats>, StoreError>;

    /// The devices of one user room, with their queue figures.
    async fn user_devices(&self, site: &str, user: &str) -> Result<Vec<DeviceInfo>, StoreError>;

    /// Removes every queued message of one device (an operator's action); returns how many.
    async fn clear_queue(&self, device: &DeviceKey) -> Result<u64, StoreError>;

    /// Makes everything written so far durable.
    async fn flush(&self) -> Result<(), StoreError>;

    /// A consistent copy of everything, as of now: every change answered before this call is
    /// in it, none begun after it. See [`Export`].
    async fn export(&self) -> Result<Export, StoreError> {
        Err(StoreError::Unsupported("this store has no backup of its own: back up Redis with its own tools"))
    }

    /// Writes records as they are (ids included), in the order given: a device before its
    /// messages. A device, message or idempotency key the store already holds is skipped, so
    /// loading the same records twice changes nothing; a user's room list is replaced. Message
    /// ids given out later are above every id loaded. Durable once [`Store::flush`] returns.
    async fn load(&self, records: Vec<Record>) -> Result<Loaded, StoreError> {
        let _ = records;
        Err(StoreError::Unsupported("loading a backup or an import is built for the embedded store only"))
    }

    /// The store accepts writes (for `/readyz`).
    fn is_open(&self) -> bool {
        true
    }

    /// Why the store stopped for good, if it did (a failed sync, a dead writer): then the
    /// process must stop too, so that its supervisor restarts it and recovery runs.
    fn failure(&self) -> Option<String> {
        None
    }
}

pub(crate) use self::rules::{devices_to_forget, entry_event, in_order, InOrder};

#[cfg(test)]
pub(crate) mod tests;
