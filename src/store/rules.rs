//! The domain rules of the store, once for every backend: pure functions and methods over what a
//! backend reads, which it then writes in its own way, atomically. A backend keeps only its
//! storage; what a queue cap, an expiry, an idempotency key, a connect or an ack *means* is here,
//! and `store::tests` checks each backend against it.

use super::{
    DeviceKey, DeviceState, Expiry, Idempotency, MessageId, Millis, QueueLimits, Replay, SiteStats, StoreError,
};

impl Idempotency {
    /// How a request carrying this key relates to the record of an earlier one, if any.
    pub(crate) fn replay_of(&self, earlier: Option<(u64, Millis)>, now: Millis) -> Option<Replay> {
        let (fingerprint, _) = earlier.filter(|(_, expires_at)| *expires_at > now)?;
        Some(if fingerprint == self.fingerprint { Replay::Same } else { Replay::Different })
    }
}

impl SiteStats {
    /// Counts one device in.
    pub(crate) fn add(&mut self, device: &DeviceState) {
        self.devices += 1;
        self.connected += u64::from(device.connected);
        self.queued_messages += device.queue_len;
        self.queued_bytes += device.queue_bytes;
    }
}

impl Expiry {
    pub(crate) fn is_expired(&self, device: &DeviceState) -> bool {
        self.ttl_ms != 0 && !device.connected && self.now.saturating_sub(device.disconnected_at) > self.ttl_ms
    }
}

impl QueueLimits {
    /// A queue of `len` entries and `bytes` is over a cap and may drop its oldest entry: never
    /// its last one, whatever its size.
    pub(crate) fn exceeded(&self, len: u64, bytes: u64) -> bool {
        len > 1 && (len > self.max_len || bytes > self.max_bytes)
    }
}

impl DeviceState {
    /// The device is owed a `_resync`: its queue overflowed, or an ack came out of order.
    pub fn owes_resync(&self) -> bool {
        self.overflowed || self.resync_at.is_some()
    }

    /// A socket of the device connected: it takes an owed `_resync` (returned) with it.
    pub(crate) fn connect(&mut self) -> bool {
        let owed = self.owes_resync();
        (self.overflowed, self.resync_at) = (false, None);
        self.connected = true;
        owed
    }

    /// Its last socket left at `now`.
    pub(crate) fn disconnect(&mut self, now: Millis) {
        self.connected = false;
        self.disconnected_at = now;
    }

    /// The `_resync` owed since `seq` reached a live socket: settled, unless a connect took it
    /// first or a later out-of-order ack replaced it.
    pub(crate) fn resync_delivered(&mut self, seq: MessageId) {
        if self.resync_at == Some(seq) {
            self.resync_at = None;
        }
    }
}

/// The rule of the cap on devices per user room, for every backend: which of the room's
/// `devices` to forget so that one more fits under `max`, disconnected longest first (by key
/// among equals). `Err` when too few are disconnected.
pub(crate) fn devices_to_forget<'a>(
    devices: impl IntoIterator<Item = (&'a DeviceKey, &'a DeviceState)>,
    max: u64,
) -> Result<Vec<DeviceKey>, StoreError> {
    let mut count = 0u64;
    let mut disconnected = Vec::new();
    for (dev, state) in devices {
        count += 1;
        if !state.connected {
            disconnected.push((state.disconnected_at, dev));
        }
    }
    let excess = (count + 1).saturating_sub(max.max(1)) as usize;
    if excess > disconnected.len() {
        return Err(StoreError::TooManyDevices { max });
    }
    disconnected.sort();
    Ok(disconnected.into_iter().take(excess).map(|(_, dev)| dev.clone()).collect())
}

/// The event name of a queued `[event, ...args]` entry.
pub(crate) fn entry_event(entry: &str) -> Option<String> {
    let items: Vec<&serde_json::value::RawValue> = serde_json::from_str(entry).ok()?;
    serde_json::from_str(items.first()?.get()).ok()
}

/// What an ack checked for order does to a queue: the rule of `resync=true`, for every backend.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum InOrder {
    /// The message is no longer queued: nothing to do.
    NotQueued,
    /// It is the oldest queued message of its event: remove it.
    Oldest,
    /// An older message of its event is still queued: remove all of these (every queued message
    /// of the event) and owe the device a `_resync`.
    Late(Vec<MessageId>),
}

/// Applies the rule to the ids of the queued messages of the acked message's event, oldest
/// first. The oldest is settled by the first id, so a backend that keeps those ids at hand (the
/// sled store indexes them) checks an ack in order without reading the queue.
pub(crate) fn in_order(same_event: impl IntoIterator<Item = MessageId>, id: MessageId) -> InOrder {
    let mut same_event = same_event.into_iter();
    match same_event.next() {
        Some(oldest) if oldest == id => InOrder::Oldest,
        Some(oldest) => {
            let ids: Vec<MessageId> = std::iter::once(oldest).chain(same_event).collect();
            if ids.contains(&id) {
                InOrder::Late(ids)
            } else {
                InOrder::NotQueued
            }
        }
        None => InOrder::NotQueued,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dev(user: &str, device: &str) -> DeviceKey {
        DeviceKey::new("site", user, device)
    }

    #[test]
    fn the_device_cap_forgets_by_disconnect_time_then_key() {
        let state = |connected, disconnected_at| DeviceState { connected, disconnected_at, ..DeviceState::default() };
        let devs = [dev("u", "a"), dev("u", "b"), dev("u", "c"), dev("u", "d")];
        let states = [state(false, 9), state(true, 0), state(false, 3), state(false, 3)];
        let forget = |max| devices_to_forget(devs.iter().zip(states.iter()), max);
        assert_eq!(forget(5).unwrap(), vec![]);
        assert_eq!(forget(4).unwrap(), vec![devs[2].clone()]);
        assert_eq!(forget(2).unwrap(), vec![devs[2].clone(), devs[3].clone(), devs[0].clone()]);
        assert!(matches!(forget(1), Err(StoreError::TooManyDevices { max: 1 })));
    }

    #[test]
    fn an_ack_in_order_is_the_oldest_of_its_event() {
        assert_eq!(in_order([3, 5, 9], 3), InOrder::Oldest);
        assert_eq!(in_order([3, 5, 9], 5), InOrder::Late(vec![3, 5, 9]));
        assert_eq!(in_order([3, 5, 9], 4), InOrder::NotQueued);
        assert_eq!(in_order([], 4), InOrder::NotQueued);
    }

    #[test]
    fn a_queue_drops_its_oldest_while_over_a_cap_but_never_its_last() {
        let limits = QueueLimits { max_len: 2, max_bytes: 100 };
        assert!(!limits.exceeded(2, 100));
        assert!(limits.exceeded(3, 10));
        assert!(limits.exceeded(2, 101));
        assert!(!limits.exceeded(1, 1_000), "a single message larger than the cap stays");
    }

    #[test]
    fn a_connect_takes_the_owed_resync_and_a_late_delivery_leaves_a_newer_one() {
        let mut state = DeviceState { overflowed: true, ..DeviceState::default() };
        assert!(state.connect());
        assert!(!state.connect() && state.connected);
        state.disconnect(42);
        assert_eq!((state.connected, state.disconnected_at), (false, 42));
        state.resync_at = Some(7);
        state.resync_delivered(6);
        assert_eq!(state.resync_at, Some(7), "a newer out-of-order ack owes its own");
        state.resync_delivered(7);
        assert!(!state.owes_resync());
    }
}
