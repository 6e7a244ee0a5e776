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
    /// Its connect has not ended: what comes for it waits here, in order, each with what it
    /// follows (see [`Gate::offer`]). Bounded by what the store answers in the rounds around the
    /// connect (its job queue holds 16,384 jobs).
    Connecting(Vec<(Item, Option<MessageId>)>),
    /// Its connect ended with this watermark: items below it were the connect's business.
    Open(Opened),
}

/// A socket past its connect.
#[derive(Debug, Default)]
pub(super) struct Opened {
    /// Items below it were the connect's business.
    watermark: MessageId,
    /// Every message of the device numbered up to here was the connect's or has been sent.
    after: MessageId,
    /// Messages that came before one they follow, by id, with the id they follow.
    waiting: std::collections::BTreeMap<MessageId, (Item, MessageId)>,
}

/// What to do with an item offered to a socket.
#[derive(Debug)]
pub(super) enum Decision {
    /// Send these, in this order: the item, and any that waited for it.
    Send(Vec<Item>),
    Held,
    Skip,
}

impl Gate {
    /// Decides about `item`, keeping it if the connect has not ended.
    ///
    /// `follows` is the newest message its device's queue held before it (0: none), when the
    /// store says (a store shared by nodes: a message can reach this node from another node
    /// after a newer one sent here). Such a message is sent only once the one it follows has
    /// been sent (or was the connect's), so that a device gets its messages in send order;
    /// until then it waits here. Without `follows` (one node, where messages are handed out in
    /// order) it is sent at once.
    pub(super) fn offer(&mut self, item: &Item, follows: Option<MessageId>) -> Decision {
        match self {
            Gate::Connecting(held) => {
                held.push((item.clone(), follows));
                Decision::Held
            }
            Gate::Open(open) => open.offer(item, follows),
        }
    }

    /// Ends the connect at `watermark`: returns the held items to send now, in order.
    pub(super) fn open(&mut self, watermark: MessageId) -> Vec<Item> {
        let mut open = Opened { watermark, after: watermark.saturating_sub(1), ..Opened::default() };
        let held = match std::mem::replace(self, Gate::Open(Opened::default())) {
            Gate::Connecting(held) => held,
            Gate::Open(_) => Vec::new(),
        };
        let mut due = Vec::new();
        for (item, follows) in held {
            if let Decision::Send(items) = open.offer(&item, follows) {
                due.extend(items);
            }
        }
        *self = Gate::Open(open);
        due
    }

    /// Whether message `id` still waits for one it follows.
    fn waits(&self, id: MessageId) -> bool {
        matches!(self, Gate::Open(open) if open.waiting.contains_key(&id))
    }
}

impl Opened {
    fn offer(&mut self, item: &Item, follows: Option<MessageId>) -> Decision {
        let seq = item.seq();
        if seq < self.watermark {
            return Decision::Skip;
        }
        let Some(follows) = follows else { return Decision::Send(vec![item.clone()]) };
        if seq <= self.after || self.waiting.contains_key(&seq) {
            return Decision::Skip; // already here
        }
        if follows > self.after {
            self.waiting.insert(seq, (item.clone(), follows));
            return Decision::Held;
        }
        self.after = seq;
        let mut due = vec![item.clone()];
        while let Some(entry) = self.waiting.first_entry() {
            if entry.get().1 > self.after {
                break;
            }
            let (item, _) = entry.remove();
            self.after = item.seq();
            due.push(item);
        }
        Decision::Send(due)
    }
}

/// How long a message may wait for one it follows before its socket is closed: the one it
/// waits for was lost on its way from another node (that node died, or the relay dropped it),
/// and the client, reconnecting, gets both in its `_batch`, in order.
const FOLLOW_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

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

    /// Offers `item` to the device's newest socket; `emit` sends what is due now (see
    /// [`Gate::offer`] for `follows`).
    pub(super) fn offer(
        &self,
        dev: &DeviceKey,
        item: &Item,
        follows: Option<MessageId>,
        mut emit: impl FnMut(&SocketRef, &Item) -> Result<(), SendError>,
    ) -> Offered {
        let Some(device) = self.get(dev) else { return Offered::NoSocket };
        let mut sockets = device.sockets();
        let Some(newest) = sockets.last_mut() else { return Offered::NoSocket };
        match newest.gate.offer(item, follows) {
            Decision::Held => {
                if newest.gate.waits(item.seq()) {
                    watch_wait(&device, dev, newest.socket.id, item.seq());
                }
                Offered::Held
            }
            Decision::Skip => Offered::Skipped,
            Decision::Send(due) => match due.iter().try_for_each(|item| emit(&newest.socket, item)) {
                Ok(()) => Offered::Sent,
                Err(e) => Offered::Failed(newest.socket.clone(), e),
            },
        }
    }

    /// The devices with a socket here.
    pub(super) fn devices(&self) -> Vec<DeviceKey> {
        self.map().keys().cloned().collect()
    }

    /// Closes the transports of the device's sockets, as a network failure would: their clients
    /// reconnect. Returns how many.
    pub(super) fn close_transports(&self, dev: &DeviceKey) -> usize {
        let Some(device) = self.get(dev) else { return 0 };
        let sockets: Vec<SocketRef> = device.sockets().iter().map(|r| r.socket.clone()).collect();
        sockets.iter().for_each(|s| s.close_transport());
        sockets.len()
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
        if let Gate::Open(open) = &registered.gate {
            open.waiting.keys().for_each(|seq| watch_wait(&device, dev, sid, *seq));
        }
        emit(&registered.socket, due);
        true
    }
}

/// Closes socket `sid`'s transport if message `seq` still waits there after [`FOLLOW_WAIT`].
fn watch_wait(device: &Arc<Device>, dev: &DeviceKey, sid: Sid, seq: MessageId) {
    let (device, dev) = (Arc::downgrade(device), dev.clone());
    tokio::spawn(async move {
        tokio::time::sleep(FOLLOW_WAIT).await;
        let Some(device) = device.upgrade() else { return };
        let socket =
            device.sockets().iter().find(|r| r.socket.id == sid && r.gate.waits(seq)).map(|r| r.socket.clone());
        if let Some(socket) = socket {
            tracing::warn!(site = %dev.site, room = %dev.user, device = %dev.device, id = seq, "a message from another node never came: the socket reconnects to get its queue in order");
            crate::metrics::relay_missing();
            socket.close_transport();
        }
    });
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

    /// What `decision` sends, by number; `None` if nothing (held or skipped).
    fn sent(decision: Decision) -> Option<Vec<MessageId>> {
        match decision {
            Decision::Send(items) => Some(ids(&items)),
            Decision::Held | Decision::Skip => None,
        }
    }

    fn message(id: MessageId) -> Item {
        Item::Message(Arc::new(super::super::emit::LiveMessage { id, event: "e".into(), args: vec![], resync: false }))
    }

    #[test]
    fn a_gate_holds_until_its_connect_ends_then_splits_at_the_watermark() {
        let mut gate = Gate::Connecting(Vec::new());
        for seq in [3, 7, 5, 9] {
            assert!(matches!(gate.offer(&Item::Resync(seq), None), Decision::Held));
        }
        // 3 and 5 were queued before the connect read the queue: they are in its `_batch`.
        assert_eq!(ids(&gate.open(6)), [7, 9], "held items due live, in the order they came");
        assert!(matches!(gate.offer(&Item::Resync(5), None), Decision::Skip));
        assert_eq!(sent(gate.offer(&Item::Resync(6), None)), Some(vec![6]));
        assert!(gate.open(8).is_empty(), "an open gate holds nothing");
    }

    #[test]
    fn a_message_waits_for_the_one_it_follows() {
        let mut gate = Gate::Connecting(Vec::new());
        // 12 follows 11, which is still on its way from another node; 8 is the connect's.
        assert!(matches!(gate.offer(&message(12), Some(11)), Decision::Held));
        assert!(matches!(gate.offer(&message(8), Some(5)), Decision::Held));
        assert!(gate.open(10).is_empty(), "8 was in the _batch, 12 waits for 11");
        assert!(gate.waits(12));
        assert_eq!(sent(gate.offer(&message(11), Some(8))), Some(vec![11, 12]), "8 was the connect's: 11 goes");
        assert!(!gate.waits(12));
        assert_eq!(sent(gate.offer(&message(12), Some(11))), None, "sent already");
        assert_eq!(sent(gate.offer(&message(20), Some(12))), Some(vec![20]));
        assert_eq!(sent(gate.offer(&Item::Resync(15), None)), Some(vec![15]), "without `follows`: at once");
    }

    /// A device's messages, each following the one before, offered in every order (as two
    /// nodes may deliver them), and held across the connect's end or not: the socket gets each
    /// once, in send order, as soon as all before it are there.
    #[test]
    fn messages_offered_in_any_order_go_out_in_send_order() {
        let chain: Vec<(MessageId, MessageId)> = vec![(3, 0), (4, 3), (6, 4), (7, 6), (9, 7), (10, 9)];
        let mut seed = 7u64;
        for round in 0..2000 {
            let mut order = chain.clone();
            for i in (1..order.len()).rev() {
                seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                order.swap(i, (seed >> 33) as usize % (i + 1));
            }
            // Some offers come before the connect ends (watermark 5: 3 and 4 are its `_batch`).
            let early = round % (order.len() + 1);
            let mut gate = Gate::Connecting(Vec::new());
            let mut out = Vec::new();
            for (n, (id, follows)) in order.iter().enumerate() {
                if n == early {
                    out.extend(ids(&gate.open(5)));
                }
                out.extend(sent(gate.offer(&message(*id), Some(*follows))).unwrap_or_default());
                let expected: Vec<MessageId> = chain
                    .iter()
                    .map(|c| c.0)
                    .filter(|id| *id >= 5)
                    .take_while(|id| order[..=n].iter().any(|o| o.0 == *id))
                    .collect();
                if n >= early {
                    assert_eq!(out, expected, "round {round}: {order:?}, open after {early}");
                }
            }
            if early == order.len() {
                out.extend(ids(&gate.open(5)));
            }
            assert_eq!(out, [6, 7, 9, 10], "round {round}: {order:?}");
        }
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
