//! Which sockets speak for each connected device, newest last, and the order in which a
//! device's connects, disconnects and deliveries happen.
//!
//! Only the newest socket of a device gets live messages; when it leaves, the next newest takes
//! over. A device counts as disconnected (in the store) once its last socket is gone. At most
//! `max_sockets_per_device` are kept: a new one beyond that evicts the oldest, so a client stuck
//! in a reconnect loop cannot pile up sockets.
//!
//! Two orders are kept here, because the store alone cannot know them:
//! - **Connect and disconnect records.** Each device has an async lock ([`DeviceSockets::order`])
//!   held from the decision ("a new socket", "its last socket left") until the store has
//!   recorded it, so the store sees a device's connects and disconnects in the order they were
//!   decided, and its state always matches the sockets here.
//! - **What a socket is sent.** A socket is registered before its connect reads the device's
//!   queue, so that nothing sent meanwhile is missed, but it may be sent nothing before
//!   `_settings` and `_batch`. Until its connect ends, its [`Gate`] holds what comes for it.
//!   The connect's watermark then splits it: everything numbered below it was queued before
//!   the connect and is in the `_batch` (or was taken by the connect), everything at or above
//!   it is sent live, in order, after the `_batch`. So a message never arrives both ways.
//!
//! A std mutex over the map and one per device: every use is a few operations and emits into a
//! socket's channel, never an `.await`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use socketioxide::extract::SocketRef;
use socketioxide::socket::Sid;
use socketioxide::SendError;

use super::emit::Item;
use crate::store::{DeviceKey, MessageId};

/// What removing a socket meant for its device.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Removed {
    /// The socket was not registered for the device (evicted, or never registered).
    Unknown,
    /// Other sockets of the device remain.
    OthersRemain,
    /// It was the device's last socket.
    Last,
}

/// What became of something offered to a device's newest socket.
pub(super) enum Offered {
    /// Emitted.
    Sent,
    /// Held until the socket's connect ends.
    Held,
    /// The socket's connect took care of it (a message in its `_batch`, a resync it sent).
    Skipped,
    /// The device has no socket here.
    NoSocket,
    /// The emit failed: the socket may need to be disconnected (outside the lock).
    Failed(SocketRef, SendError),
}

/// What a socket may be sent, from its registration to the end of its connect. Items are
/// numbered like message ids (see [`Item::seq`]).
#[derive(Debug)]
pub(super) enum Gate {
    /// Its connect has not ended: what comes for it waits here, in order. Bounded by what the
    /// store answers in the rounds around the connect (its job queue holds 16,384 jobs).
    Connecting(Vec<Item>),
    /// Its connect ended with this watermark: items below it were the connect's business.
    Open(MessageId),
}

/// What to do with an item offered to a socket.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Decision {
    Send,
    Held,
    Skip,
}

impl Gate {
    /// Decides about `item`, keeping it if the connect has not ended.
    pub(super) fn offer(&mut self, item: &Item) -> Decision {
        match self {
            Gate::Connecting(held) => {
                held.push(item.clone());
                Decision::Held
            }
            Gate::Open(watermark) if item.seq() >= *watermark => Decision::Send,
            Gate::Open(_) => Decision::Skip,
        }
    }

    /// Ends the connect at `watermark`: returns the held items to send now, in order.
    pub(super) fn open(&mut self, watermark: MessageId) -> Vec<Item> {
        let held = match std::mem::replace(self, Gate::Open(watermark)) {
            Gate::Connecting(held) => held,
            Gate::Open(_) => Vec::new(),
        };
        held.into_iter().filter(|item| item.seq() >= watermark).collect()
    }
}

struct Registered {
    socket: SocketRef,
    gate: Gate,
}

struct Device {
    /// Orders the device's connect and disconnect records (see the module docs).
    order: Arc<tokio::sync::Mutex<()>>,
    /// Its sockets, oldest first.
    sockets: Mutex<Vec<Registered>>,
}

impl Device {
    fn sockets(&self) -> MutexGuard<'_, Vec<Registered>> {
        self.sockets.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The connected devices' sockets. Share it as `Arc<DeviceSockets>`.
#[derive(Default)]
pub(super) struct DeviceSockets {
    map: Mutex<HashMap<DeviceKey, Arc<Device>>>,
}

/// A device's order lock, held: its sockets may be added and removed, and the store told.
pub(super) struct Ordered<'a> {
    sockets: &'a DeviceSockets,
    dev: DeviceKey,
    device: Arc<Device>,
    guard: Option<tokio::sync::OwnedMutexGuard<()>>,
}

impl DeviceSockets {
    fn map(&self) -> MutexGuard<'_, HashMap<DeviceKey, Arc<Device>>> {
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn get(&self, dev: &DeviceKey) -> Option<Arc<Device>> {
        self.map().get(dev).cloned()
    }

    /// Takes the device's order lock, waiting for whoever holds it.
    pub(super) async fn order(&self, dev: &DeviceKey) -> Ordered<'_> {
        loop {
            let device = self
                .map()
                .entry(dev.clone())
                .or_insert_with(|| Arc::new(Device { order: Default::default(), sockets: Default::default() }))
                .clone();
            let guard = device.order.clone().lock_owned().await;
            // The entry may have been dropped (and made anew) while this waited: the lock of a
            // dropped entry orders nothing.
            if self.get(dev).is_some_and(|current| Arc::ptr_eq(&current, &device)) {
                return Ordered { sockets: self, dev: dev.clone(), device, guard: Some(guard) };
            }
        }
    }

    /// Offers `item` to the device's newest socket; `emit` sends it if it is due now.
    pub(super) fn offer(
        &self,
        dev: &DeviceKey,
        item: &Item,
        emit: impl FnOnce(&SocketRef) -> Result<(), SendError>,
    ) -> Offered {
        let Some(device) = self.get(dev) else { return Offered::NoSocket };
        let mut sockets = device.sockets();
        let Some(newest) = sockets.last_mut() else { return Offered::NoSocket };
        match newest.gate.offer(item) {
            Decision::Held => Offered::Held,
            Decision::Skip => Offered::Skipped,
            Decision::Send => match emit(&newest.socket) {
                Ok(()) => Offered::Sent,
                Err(e) => Offered::Failed(newest.socket.clone(), e),
            },
        }
    }

    /// Ends the connect of socket `sid` of the device at `watermark`: `emit` gets the socket and
    /// the held items due now, to send after the connect's own events. `false` if the socket
    /// is no longer registered (it left meanwhile).
    pub(super) fn open(
        &self,
        dev: &DeviceKey,
        sid: Sid,
        watermark: MessageId,
        emit: impl FnOnce(&SocketRef, Vec<Item>),
    ) -> bool {
        let Some(device) = self.get(dev) else { return false };
        let mut sockets = device.sockets();
        let Some(registered) = sockets.iter_mut().find(|r| r.socket.id == sid) else { return false };
        let due = registered.gate.open(watermark);
        emit(&registered.socket, due);
        true
    }
}

impl Ordered<'_> {
    /// Registers `socket` as the device's newest, its connect not ended yet; returns the oldest
    /// if that exceeds `max`.
    pub(super) fn add(&self, socket: SocketRef, max: usize) -> Option<SocketRef> {
        let mut sockets = self.device.sockets();
        sockets.push(Registered { socket, gate: Gate::Connecting(Vec::new()) });
        (sockets.len() > max.max(1)).then(|| sockets.remove(0).socket)
    }

    /// Unregisters a socket of the device.
    pub(super) fn remove(&self, sid: Sid) -> Removed {
        let mut sockets = self.device.sockets();
        let before = sockets.len();
        sockets.retain(|r| r.socket.id != sid);
        match (sockets.len() < before, sockets.is_empty()) {
            (false, _) => Removed::Unknown,
            (true, false) => Removed::OthersRemain,
            (true, true) => Removed::Last,
        }
    }
}

impl Drop for Ordered<'_> {
    /// Releases the lock, and forgets the device once it has no socket and nobody waits.
    fn drop(&mut self) {
        drop(self.guard.take());
        let mut map = self.sockets.map();
        let idle = self.device.sockets().is_empty() && self.device.order.try_lock().is_ok();
        if idle && map.get(&self.dev).is_some_and(|current| Arc::ptr_eq(current, &self.device)) {
            map.remove(&self.dev);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(items: &[Item]) -> Vec<MessageId> {
        items.iter().map(Item::seq).collect()
    }

    #[test]
    fn a_gate_holds_until_its_connect_ends_then_splits_at_the_watermark() {
        let mut gate = Gate::Connecting(Vec::new());
        for seq in [3, 7, 5, 9] {
            assert_eq!(gate.offer(&Item::Resync(seq)), Decision::Held);
        }
        // 3 and 5 were queued before the connect read the queue: they are in its `_batch`.
        assert_eq!(ids(&gate.open(6)), [7, 9], "held items due live, in the order they came");
        assert_eq!(gate.offer(&Item::Resync(5)), Decision::Skip);
        assert_eq!(gate.offer(&Item::Resync(6)), Decision::Send);
        assert!(gate.open(8).is_empty(), "an open gate holds nothing");
    }

    #[tokio::test]
    async fn the_order_lock_serializes_a_device_and_its_entry_goes_with_its_last_socket() {
        let sockets = DeviceSockets::default();
        let dev = DeviceKey::new("s", "user_1", "d");
        let first = sockets.order(&dev).await;
        // A second taker waits for the first.
        let second = sockets.order(&dev);
        tokio::pin!(second);
        assert!(futures_util::poll!(&mut second).is_pending());
        drop(first);
        let second = second.await;
        drop(second);
        assert!(sockets.map().is_empty(), "no sockets, nobody waiting: forgotten");
    }
}
