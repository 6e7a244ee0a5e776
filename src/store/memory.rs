//! `MemoryStore`: the in-memory twin of the sled store.
//!
//! Same semantics as `SledStore` (both pass `store::tests`), nothing on disk. It backs unit tests
//! and `serve --ephemeral`. All state sits behind one std `Mutex`: every method locks, does a few
//! map operations and unlocks, never across an `.await`.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};

use async_trait::async_trait;

use super::{
    devices_to_forget, entry_event, in_order, Ack, Connected, DeviceInfo, DeviceKey, DeviceState, Enqueued, Expiry,
    Export, Idempotency, InOrder, Loaded, MessageId, Millis, QueueLimits, Queued, Record, Resync, SiteStats, Store,
    StoreError,
};

/// Keeps everything in process memory. Cloning shares the same state.
#[derive(Clone, Default)]
pub struct MemoryStore {
    state: Arc<Mutex<State>>,
}

#[derive(Default)]
struct State {
    devices: BTreeMap<DeviceKey, DeviceState>,
    /// (site, user room) -> that user's latest room list.
    users: BTreeMap<(Arc<str>, Arc<str>), Vec<String>>,
    queues: HashMap<DeviceKey, BTreeMap<MessageId, Queued>>,
    /// (site, idempotency key) -> (fingerprint, expires at).
    keys: HashMap<(String, String), (u64, Millis)>,
    next_id: MessageId,
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave a half-applied change visible to callers
        // that matters more than serving on, so recover the guard.
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl State {
    fn forget(&mut self, dev: &DeviceKey) {
        self.devices.remove(dev);
        self.queues.remove(dev);
        let user = (dev.site.clone(), dev.user.clone());
        let has_devices = self
            .devices
            .range(DeviceKey::new(&dev.site, &dev.user, "")..)
            .next()
            .is_some_and(|(k, _)| k.site == dev.site && k.user == dev.user);
        if !has_devices {
            self.users.remove(&user);
        }
    }

    fn pending(&self, dev: &DeviceKey) -> Vec<Queued> {
        self.queues.get(dev).map(|q| q.values().cloned().collect()).unwrap_or_default()
    }

    fn devices_of(&self, site: &str, user: &str) -> Vec<DeviceKey> {
        self.devices
            .range(DeviceKey::new(site, user, "")..)
            .take_while(|(k, _)| &*k.site == site && &*k.user == user)
            .map(|(k, _)| k.clone())
            .collect()
    }

    fn remove(&mut self, dev: &DeviceKey, ids: impl IntoIterator<Item = MessageId>) -> u64 {
        let (Some(queue), Some(state)) = (self.queues.get_mut(dev), self.devices.get_mut(dev)) else {
            return 0;
        };
        let mut removed = 0;
        for id in ids {
            if let Some(queued) = queue.remove(&id) {
                state.queue_len -= 1;
                state.queue_bytes -= queued.entry.len() as u64;
                removed += 1;
            }
        }
        removed
    }
}

#[async_trait]
impl Store for MemoryStore {
    async fn connect(
        &self,
        device: &DeviceKey,
        rooms: &[String],
        max_devices: Option<u64>,
    ) -> Result<Connected, StoreError> {
        let mut state = self.lock();
        let mut forgotten = Vec::new();
        if let Some(max) = max_devices.filter(|_| !state.devices.contains_key(device)) {
            let others = state.devices_of(&device.site, &device.user);
            forgotten = devices_to_forget(others.iter().map(|dev| (dev, &state.devices[dev])), max)?;
            for dev in &forgotten {
                state.forget(dev);
            }
        }
        state.users.insert((device.site.clone(), device.user.clone()), rooms.to_vec());
        let watermark = state.next_id;
        let resync = state.devices.entry(device.clone()).or_default().connect();
        let pending = state.pending(device);
        Ok(Connected { pending, resync, watermark, forgotten })
    }

    async fn disconnect(&self, device: &DeviceKey, now: Millis) -> Result<(), StoreError> {
        if let Some(dev) = self.lock().devices.get_mut(device) {
            dev.disconnect(now);
        }
        Ok(())
    }

    async fn disconnect_all(&self, now: Millis) -> Result<u64, StoreError> {
        let mut count = 0;
        for dev in self.lock().devices.values_mut().filter(|d| d.connected) {
            dev.disconnect(now);
            count += 1;
        }
        Ok(count)
    }

    async fn users_in_room(&self, site: &str, room: &str) -> Result<Vec<String>, StoreError> {
        let room = room.to_lowercase();
        Ok(self
            .lock()
            .users
            .iter()
            .filter(|((s, _), rooms)| &**s == site && rooms.iter().any(|r| r.to_lowercase() == room))
            .map(|((_, user), _)| user.to_string())
            .collect())
    }

    async fn enqueue(
        &self,
        site: &str,
        users: Vec<String>,
        entry: Arc<str>,
        expiry: Expiry,
        limits: QueueLimits,
        idempotency: Option<Idempotency>,
    ) -> Result<Enqueued, StoreError> {
        let mut state = self.lock();
        if let Some(idem) = &idempotency {
            let slot = (site.to_owned(), idem.key.clone());
            if let Some(replay) = idem.replay_of(state.keys.get(&slot).copied(), expiry.now) {
                return Ok(Enqueued { replay: Some(replay), ..Enqueued::default() });
            }
            state.keys.insert(slot, (idem.fingerprint, idem.expires_at));
        }
        let id = state.next_id;
        state.next_id += 1;
        let mut out = Enqueued { id, ..Enqueued::default() };
        for user in &users {
            for dev in state.devices_of(site, user) {
                if expiry.is_expired(&state.devices[&dev]) {
                    state.forget(&dev);
                    out.expired.push(dev);
                    continue;
                }
                let State { queues, devices, .. } = &mut *state;
                let queue = queues.entry(dev.clone()).or_default();
                queue.insert(id, Queued { id, queued_at: expiry.now, entry: entry.clone() });
                let d = devices.get_mut(&dev).expect("listed above");
                d.queue_len += 1;
                d.queue_bytes += entry.len() as u64;
                let mut dropped = 0;
                while limits.exceeded(d.queue_len, d.queue_bytes) {
                    let (_, oldest) = queue.pop_first().expect("queue_len counts its entries");
                    d.queue_len -= 1;
                    d.queue_bytes -= oldest.entry.len() as u64;
                    dropped += 1;
                }
                if dropped > 0 {
                    d.overflowed = true;
                    out.overflowed.push((dev.clone(), dropped));
                }
                out.devices.push(dev);
            }
        }
        Ok(out)
    }

    async fn pending(&self, device: &DeviceKey) -> Result<Vec<Queued>, StoreError> {
        Ok(self.lock().pending(device))
    }

    async fn acks(&self, acks: Vec<Ack>) -> Result<Vec<Resync>, StoreError> {
        let mut state = self.lock();
        let mut resyncs = Vec::new();
        for ack in acks {
            match ack {
                Ack::Batch { device, ids } => {
                    state.remove(&device, ids);
                }
                Ack::Live { device, id, checked: None } => {
                    state.remove(&device, [id]);
                }
                Ack::Live { device, id, checked: Some(event) } => {
                    let queue = state.queues.get(&device).into_iter().flat_map(|q| q.values());
                    let same_event = queue.filter(|q| entry_event(&q.entry).as_deref() == Some(&*event));
                    match in_order(same_event.map(|q| q.id), id) {
                        InOrder::NotQueued => {}
                        InOrder::Oldest => {
                            state.remove(&device, [id]);
                        }
                        InOrder::Late(ids) => {
                            let cleared = state.remove(&device, ids);
                            let seq = state.next_id;
                            state.next_id += 1;
                            if let Some(dev) = state.devices.get_mut(&device) {
                                dev.resync_at = Some(seq);
                            }
                            resyncs.push(Resync { device, event, cleared, seq });
                        }
                    }
                }
            }
        }
        Ok(resyncs)
    }

    async fn resync_sent(&self, device: &DeviceKey, seq: MessageId) -> Result<(), StoreError> {
        if let Some(dev) = self.lock().devices.get_mut(device) {
            dev.resync_delivered(seq);
        }
        Ok(())
    }

    async fn sweep(&self, expiry: Expiry) -> Result<Vec<DeviceKey>, StoreError> {
        let mut state = self.lock();
        let expired: Vec<DeviceKey> =
            state.devices.iter().filter(|(_, d)| expiry.is_expired(d)).map(|(k, _)| k.clone()).collect();
        for dev in &expired {
            state.forget(dev);
        }
        state.keys.retain(|_, (_, expires_at)| *expires_at > expiry.now);
        Ok(expired)
    }

    async fn device(&self, device: &DeviceKey) -> Result<Option<DeviceState>, StoreError> {
        Ok(self.lock().devices.get(device).cloned())
    }

    async fn stats(&self) -> Result<BTreeMap<String, SiteStats>, StoreError> {
        let mut out = BTreeMap::<String, SiteStats>::new();
        for (dev, state) in &self.lock().devices {
            out.entry(dev.site.to_string()).or_default().add(state);
        }
        Ok(out)
    }

    async fn user_devices(&self, site: &str, user: &str) -> Result<Vec<DeviceInfo>, StoreError> {
        let state = self.lock();
        Ok(state
            .devices_of(site, user)
            .into_iter()
            .map(|dev| DeviceInfo {
                oldest_queued_at: state.queues.get(&dev).and_then(|q| q.values().next()).map(|q| q.queued_at),
                state: state.devices[&dev].clone(),
                device: dev.device.to_string(),
            })
            .collect())
    }

    async fn clear_queue(&self, device: &DeviceKey) -> Result<u64, StoreError> {
        let mut state = self.lock();
        let ids: Vec<MessageId> = state.queues.get(device).map(|q| q.keys().copied().collect()).unwrap_or_default();
        Ok(state.remove(device, ids))
    }

    async fn flush(&self) -> Result<(), StoreError> {
        Ok(())
    }

    async fn export(&self) -> Result<Export, StoreError> {
        let state = self.lock();
        let mut records = Vec::new();
        for ((site, user), rooms) in &state.users {
            records.push(Record::User { site: site.to_string(), user: user.to_string(), rooms: rooms.clone() });
        }
        let mut shared = HashMap::<MessageId, usize>::new();
        for queue in state.queues.values() {
            for id in queue.keys() {
                *shared.entry(*id).or_default() += 1;
            }
        }
        for (key, device) in &state.devices {
            records.push(Record::Device { key: key.clone(), state: device.clone() });
            for message in state.queues.get(key).into_iter().flat_map(|q| q.values()) {
                let shared = shared[&message.id] > 1;
                records.push(Record::Message { device: key.clone(), message: message.clone(), shared });
            }
        }
        let mut keys: Vec<_> = state.keys.iter().collect();
        keys.sort();
        for ((site, key), (fingerprint, expires_at)) in keys {
            let record = Idempotency { key: key.clone(), fingerprint: *fingerprint, expires_at: *expires_at };
            records.push(Record::Idempotency { site: site.clone(), record });
        }
        Ok(Export {
            next_id: state.next_id,
            write: Box::new(move |sink| {
                for record in records {
                    sink(record).map_err(|e| StoreError::Io(e.to_string()))?;
                }
                Ok(())
            }),
        })
    }

    async fn load(&self, records: Vec<Record>) -> Result<Loaded, StoreError> {
        let mut state = self.lock();
        let mut loaded = Loaded::default();
        for record in records {
            let written = match record {
                Record::User { site, user, rooms } => {
                    state.users.insert((site.as_str().into(), user.as_str().into()), rooms);
                    true
                }
                Record::Device { key, state: device } => match state.devices.contains_key(&key) {
                    true => false,
                    false => {
                        let device = DeviceState { queue_len: 0, queue_bytes: 0, ..device };
                        state.devices.insert(key, device);
                        true
                    }
                },
                Record::Message { device, message, .. } => {
                    state.next_id = state.next_id.max(message.id + 1);
                    let state = &mut *state;
                    let Some(dev) = state.devices.get_mut(&device) else {
                        return Err(StoreError::Corrupt { key: format!("a message of the unknown device {device:?}") });
                    };
                    match state.queues.entry(device).or_default().entry(message.id) {
                        std::collections::btree_map::Entry::Occupied(_) => false,
                        std::collections::btree_map::Entry::Vacant(e) => {
                            dev.queue_len += 1;
                            dev.queue_bytes += message.entry.len() as u64;
                            e.insert(message);
                            true
                        }
                    }
                }
                Record::Ids { next } => {
                    let raised = next > state.next_id;
                    state.next_id = state.next_id.max(next);
                    raised
                }
                Record::Idempotency { site, record } => match state.keys.entry((site, record.key)) {
                    std::collections::hash_map::Entry::Occupied(_) => false,
                    std::collections::hash_map::Entry::Vacant(e) => {
                        e.insert((record.fingerprint, record.expires_at));
                        true
                    }
                },
            };
            match written {
                true => loaded.written += 1,
                false => loaded.skipped += 1,
            }
        }
        Ok(loaded)
    }
}
