//! Backups of the sled store: a consistent export while it serves, and loading records back.
//!
//! Only the writer thread changes sled's tree, and only at checkpoints. An export is a job that
//! copies the changes sled has not been given yet (at most a checkpoint's worth, some
//! megabytes) and pins the tree: while the pin is held, the writer gives sled nothing (rounds go
//! on, logged and kept in memory as always, and the log grows past its checkpoint size). The
//! export then reads the tree with the copy over it on its own thread, a state no later change
//! reaches. Dropping the export, finished or not, releases the pin.

use std::sync::Arc;

use sled::{IVec, Tree};

use super::round::{Changes, Pending, Scan, View};
use super::{keys, queue_entries, read_device, read_rooms, Durability, SledStore, Writer};
use crate::store::{DeviceKey, DeviceState, Export, Idempotency, Loaded, MessageId, Record, RecordSink, StoreError};

/// sled's tree as of the export, with the changes it had not been given then.
struct Frozen {
    tree: Tree,
    over: Pending,
}

impl View for Frozen {
    fn get(&self, key: &[u8]) -> Result<Option<IVec>, StoreError> {
        match self.over.lookup(key) {
            Some(value) => Ok(value),
            None => View::get(&self.tree, key),
        }
    }

    fn scan(&self, prefix: &[u8]) -> Scan<'_> {
        self.over.scan_over(View::scan(&self.tree, prefix), prefix)
    }
}

impl SledStore {
    /// See [`crate::store::Store::export`].
    pub(super) async fn export_now(&self) -> Result<Export, StoreError> {
        let (frozen, next_id, pin) = self
            .job(Durability::Written, |w| {
                let over = Pending::stacked(&[&w.frozen, &w.pending, &w.round]);
                Ok((Frozen { tree: w.tree.clone(), over }, w.ids.next, w.pin.clone()))
            })
            .await?;
        Ok(Export {
            next_id,
            write: Box::new(move |sink| {
                let _pin = pin;
                write_all(&frozen, sink)
            }),
        })
    }

    /// See [`crate::store::Store::load`].
    pub(super) async fn load_now(&self, records: Vec<Record>) -> Result<Loaded, StoreError> {
        self.job(Durability::Written, move |w| {
            let mut loaded = Loaded::default();
            for record in records {
                match w.load_one(record)? {
                    true => loaded.written += 1,
                    false => loaded.skipped += 1,
                }
            }
            // Counts, the event index and cached devices follow from what is stored.
            w.forget_caches();
            Ok(loaded)
        })
        .await
    }
}

fn write_all(view: &Frozen, sink: &mut RecordSink<'_>) -> Result<(), StoreError> {
    let mut put = |record| sink(record).map_err(|e| StoreError::Io(format!("cannot write the backup: {e}")));
    let corrupt = |key: &[u8]| StoreError::Corrupt { key: keys::show(key) };
    for item in view.scan(&[keys::USER]) {
        let (k, _) = item?;
        let parts = keys::parts(&k);
        let Some([site, user]) = parts.as_deref() else { return Err(corrupt(&k)) };
        let record = Record::User { site: site.to_string(), user: user.to_string(), rooms: read_rooms(view, &k)? };
        put(record)?;
    }
    for item in view.scan(&[keys::DEVICE]) {
        let (k, _) = item?;
        let device = keys::parse_device(&k).ok_or_else(|| corrupt(&k))?;
        let state = read_device(view, &k)?.ok_or_else(|| corrupt(&k))?;
        let state = DeviceState { queue_len: 0, queue_bytes: 0, ..state };
        put(Record::Device { key: device.clone(), state })?;
        for entry in queue_entries(view, &keys::queue(&device)?) {
            let (message, shared) = entry?;
            put(Record::Message { device: device.clone(), message, shared })?;
        }
    }
    for item in view.scan(&[keys::IDEMPOTENCY]) {
        let (k, v) = item?;
        let parts = keys::parts(&k);
        let Some([site, key]) = parts.as_deref() else { return Err(corrupt(&k)) };
        let (fingerprint, expires_at) = keys::split_idempotency_value(&v).ok_or_else(|| corrupt(&k))?;
        let record = Idempotency { key: key.to_string(), fingerprint, expires_at };
        put(Record::Idempotency { site: site.to_string(), record })?;
    }
    Ok(())
}

impl Writer {
    /// The tree is pinned by an export under way: give sled nothing.
    pub(super) fn pinned(&self) -> bool {
        Arc::strong_count(&self.pin) > 1
    }

    /// Writes one record unless it is there already; `true` if it wrote.
    fn load_one(&mut self, record: Record) -> Result<bool, StoreError> {
        let mut batch = Changes::default();
        match record {
            Record::User { site, user, rooms } => {
                let key = keys::user(&site, &user)?;
                for room in read_rooms(self, &key)? {
                    batch.remove(keys::room(&site, &room, &user)?);
                }
                for room in &rooms {
                    batch.insert(keys::room(&site, room, &user)?, []);
                }
                batch.insert(key, serde_json::to_vec(&rooms).expect("strings serialize"));
            }
            Record::Device { key, state } => {
                let key = keys::device(&key)?;
                if self.get(&key)?.is_some() {
                    return Ok(false);
                }
                batch.insert(key, super::encode(&DeviceState { queue_len: 0, queue_bytes: 0, ..state }));
            }
            Record::Message { device, message, shared } => {
                if !self.load_message(&device, message, shared, &mut batch)? {
                    return Ok(false);
                }
            }
            Record::Ids { next } => {
                if next <= self.ids.next {
                    return Ok(false);
                }
                self.reserve_past(next - 1);
                return Ok(true);
            }
            Record::Idempotency { site, record } => {
                let key = keys::idempotency(&site, &record.key)?;
                if self.get(&key)?.is_some() {
                    return Ok(false);
                }
                batch.insert(keys::idempotency_expiry(record.expires_at, &key), []);
                batch.insert(key, keys::idempotency_value(record.fingerprint, record.expires_at));
            }
        }
        self.apply(batch);
        Ok(true)
    }

    /// A message's queue entry, kept once under its id when `shared` (or when an earlier
    /// device's copy already is). Ids given out later stay above it.
    fn load_message(
        &mut self,
        device: &DeviceKey,
        message: crate::store::Queued,
        shared: bool,
        batch: &mut Changes,
    ) -> Result<bool, StoreError> {
        let dkey = keys::device(device)?;
        if self.get(&dkey)?.is_none() {
            return Err(StoreError::Corrupt {
                key: format!("a message of {}, a device not loaded", keys::show(&dkey)),
            });
        }
        let key = keys::queued(&keys::queue(device)?, message.id);
        if self.get(&key)?.is_some() {
            return Ok(false);
        }
        self.reserve_past(message.id);
        let id = message.id;
        let refs = match self.get(&keys::refs(id))? {
            Some(v) => Some(u64::from_be_bytes(
                v.as_ref().try_into().map_err(|_| StoreError::Corrupt { key: keys::show(&keys::refs(id)) })?,
            )),
            None => None,
        };
        let event = crate::store::entry_event(&message.entry).unwrap_or_default();
        let inline = match refs {
            Some(n) => {
                batch.insert(keys::refs(id), (n + 1).to_be_bytes());
                None
            }
            None if shared => {
                batch.insert(keys::body(id), message.entry.as_bytes());
                batch.insert(keys::refs(id), 1u64.to_be_bytes());
                None
            }
            None => Some(&*message.entry),
        };
        batch.insert(key, keys::queued_value(message.queued_at, message.entry.len(), &event, inline));
        Ok(true)
    }

    /// Makes every id up to `id` used, durably with the round.
    fn reserve_past(&mut self, id: MessageId) {
        if id < self.ids.next {
            return;
        }
        self.ids.next = id + 1;
        if self.ids.next > self.ids.reserved {
            self.ids.reserved = self.ids.next;
            let mut reserve = Changes::default();
            reserve.insert(keys::IDS_RESERVED, self.ids.reserved.to_be_bytes());
            self.apply(reserve);
        }
    }
}
