//! Byte layout of the sled keys. Private to the store.
//!
//! Every record lives in one tree, written through the write-ahead log (`wal.rs`). A key is a
//! kind byte followed by length-prefixed parts (u16 big-endian length, then the bytes), so a
//! prefix of whole parts selects exactly the records below it, whatever bytes names contain.
//! Queue keys end in the message id, big-endian, so a device's queue scans in send order.
//!
//! A message is stored once, however many devices it is queued for: a queue entry of a message
//! for one device holds the message itself; a message for more is kept under its id (`b`) with
//! the number of queue entries referring to it (`n`), and the last entry to go takes both.
//!
//! | kind | parts                          | value                      |
//! |------|--------------------------------|----------------------------|
//! | `d`  | site, user room, device        | `DeviceState` (JSON); its queue counts are stale, the writer counts queues |
//! | `u`  | site, user room                | room list (JSON)           |
//! | `r`  | site, lowercased room, user    | empty: shared-room index   |
//! | `k`  | site, idempotency key          | fingerprint, expires-at ms (2 x u64 BE) |
//! | `x`  | expires-at ms (u64 BE), then the whole `k` key | empty: the `k` records by expiry, for the sweep |
//! | `t`  | disconnected-at ms (u64 BE), then the whole `d` key | empty: the disconnected devices by time, for the sweep |
//! | `q`  | site, user room, device, id    | queued-at ms (u64 BE), entry bytes (u64 BE), `1` if the entry follows (else `0`), event length (u16 BE), event, then the entry `[event, ...args]` if it follows |
//! | `b`  | id (u64 BE)                    | the entry of a message queued for several devices |
//! | `n`  | id (u64 BE)                    | queue entries referring to `b` of that id (u64 BE) |
//! | `i`  | (none)                         | message ids reserved: every id below it may be in use (u64 BE) |

use crate::store::{DeviceKey, MessageId, Millis, StoreError};

pub(super) const DEVICE: u8 = b'd';
pub(super) const USER: u8 = b'u';
pub(super) const ROOM: u8 = b'r';
pub(super) const QUEUE: u8 = b'q';
pub(super) const IDEMPOTENCY: u8 = b'k';
pub(super) const IDEMPOTENCY_EXPIRY: u8 = b'x';
pub(super) const DISCONNECTED: u8 = b't';
pub(super) const BODY: u8 = b'b';
pub(super) const REFS: u8 = b'n';
/// The one key holding how far message ids are reserved.
pub(super) const IDS_RESERVED: &[u8] = b"i";

/// Longest name part a key can hold.
pub(super) const MAX_PART: usize = u16::MAX as usize;

/// Builds a key (or a prefix) from its kind and parts.
pub(super) fn key(kind: u8, parts: &[&str]) -> Result<Vec<u8>, StoreError> {
    let mut out = Vec::with_capacity(1 + parts.iter().map(|p| p.len() + 2).sum::<usize>() + 8);
    out.push(kind);
    for part in parts {
        let len = u16::try_from(part.len())
            .map_err(|_| StoreError::TooLong { what: "a site, room or device name", max: MAX_PART })?;
        out.extend_from_slice(&len.to_be_bytes());
        out.extend_from_slice(part.as_bytes());
    }
    Ok(out)
}

pub(super) fn device(dev: &DeviceKey) -> Result<Vec<u8>, StoreError> {
    key(DEVICE, &[&dev.site, &dev.user, &dev.device])
}

pub(super) fn user(site: &str, user: &str) -> Result<Vec<u8>, StoreError> {
    key(USER, &[site, user])
}

pub(super) fn room(site: &str, room: &str, user: &str) -> Result<Vec<u8>, StoreError> {
    key(ROOM, &[site, &room.to_lowercase(), user])
}

/// The prefix of every device of one user room.
pub(super) fn devices_of(site: &str, user: &str) -> Result<Vec<u8>, StoreError> {
    key(DEVICE, &[site, user])
}

/// The prefix of every index entry of one shared room.
pub(super) fn room_members(site: &str, room: &str) -> Result<Vec<u8>, StoreError> {
    key(ROOM, &[site, &room.to_lowercase()])
}

/// The prefix of one device's queue.
pub(super) fn queue(dev: &DeviceKey) -> Result<Vec<u8>, StoreError> {
    key(QUEUE, &[&dev.site, &dev.user, &dev.device])
}

/// One queue entry's key: the queue prefix and the id.
pub(super) fn queued(queue_prefix: &[u8], id: MessageId) -> Vec<u8> {
    let mut out = Vec::with_capacity(queue_prefix.len() + 8);
    out.extend_from_slice(queue_prefix);
    out.extend_from_slice(&id.to_be_bytes());
    out
}

/// A queue entry's value, split (see the table above).
#[derive(Debug, PartialEq, Eq)]
pub(super) struct QueuedValue<'a> {
    /// When it was queued.
    pub at: Millis,
    /// Bytes of the entry (what `queue_bytes` counts).
    pub size: u64,
    /// The event of the entry, for the order check of `resync` acks.
    pub event: &'a str,
    /// The entry itself, for a message queued for one device; `None` when it is kept once under
    /// [`body`].
    pub inline: Option<&'a str>,
}

/// A queue entry's value.
pub(super) fn queued_value(at: Millis, size: usize, event: &str, inline: Option<&str>) -> Vec<u8> {
    let event = &event.as_bytes()[..event.len().min(u16::MAX as usize)];
    let entry = inline.unwrap_or("").as_bytes();
    let mut out = Vec::with_capacity(19 + event.len() + entry.len());
    out.extend_from_slice(&at.to_be_bytes());
    out.extend_from_slice(&(size as u64).to_be_bytes());
    out.push(u8::from(inline.is_some()));
    out.extend_from_slice(&(event.len() as u16).to_be_bytes());
    out.extend_from_slice(event);
    out.extend_from_slice(entry);
    out
}

/// The parts of a queue value; `None` if it is not well formed.
pub(super) fn split_queued_value(value: &[u8]) -> Option<QueuedValue<'_>> {
    let u64_at = |at: usize| Some(u64::from_be_bytes(value.get(at..at + 8)?.try_into().ok()?));
    let (at, size, inline) = (u64_at(0)?, u64_at(8)?, *value.get(16)?);
    let event_len = u16::from_be_bytes(value.get(17..19)?.try_into().ok()?) as usize;
    let event = std::str::from_utf8(value.get(19..19 + event_len)?).ok()?;
    let rest = &value[19 + event_len..];
    let inline = match inline {
        0 if rest.is_empty() => None,
        1 => Some(std::str::from_utf8(rest).ok()?),
        _ => return None,
    };
    Some(QueuedValue { at, size, event, inline })
}

/// A queue value as schema 1 wrote it (queued-at ms, then the entry): `(at, entry)`. Its ninth
/// byte is the entry's `[`, where a value of today's layout has the high byte of a size.
pub(super) fn split_v1_queued_value(value: &[u8]) -> Option<(Millis, &str)> {
    let at: [u8; 8] = value.get(..8)?.try_into().ok()?;
    let entry = std::str::from_utf8(value.get(8..)?).ok()?;
    entry.starts_with('[').then_some((Millis::from_be_bytes(at), entry))
}

/// The key of a message kept once for several devices.
pub(super) fn body(id: MessageId) -> [u8; 9] {
    by_id(BODY, id)
}

/// The key of the count of queue entries referring to [`body`].
pub(super) fn refs(id: MessageId) -> [u8; 9] {
    by_id(REFS, id)
}

fn by_id(kind: u8, id: MessageId) -> [u8; 9] {
    let mut out = [kind; 9];
    out[1..].copy_from_slice(&id.to_be_bytes());
    out
}

/// An idempotency record's key.
pub(super) fn idempotency(site: &str, idempotency_key: &str) -> Result<Vec<u8>, StoreError> {
    key(IDEMPOTENCY, &[site, idempotency_key])
}

/// An idempotency record's value.
pub(super) fn idempotency_value(fingerprint: u64, expires_at: Millis) -> Vec<u8> {
    [fingerprint.to_be_bytes(), expires_at.to_be_bytes()].concat()
}

/// The key of an idempotency record's entry in the index by expiry.
pub(super) fn idempotency_expiry(expires_at: Millis, record: &[u8]) -> Vec<u8> {
    by_time(IDEMPOTENCY_EXPIRY, expires_at, record)
}

/// The key of a disconnected device's entry in the index by disconnect time.
pub(super) fn disconnected(at: Millis, device: &[u8]) -> Vec<u8> {
    by_time(DISCONNECTED, at, device)
}

fn by_time(kind: u8, at: Millis, record: &[u8]) -> Vec<u8> {
    [&[kind][..], &at.to_be_bytes(), record].concat()
}

/// The time and the record key of an entry of an index by time (`x`, `t`).
pub(super) fn split_by_time(key: &[u8]) -> Option<(Millis, &[u8])> {
    let at: [u8; 8] = key.get(1..9)?.try_into().ok()?;
    Some((Millis::from_be_bytes(at), &key[9..]))
}

/// The fingerprint and expiry of an idempotency record.
pub(super) fn split_idempotency_value(value: &[u8]) -> Option<(u64, Millis)> {
    let fingerprint: [u8; 8] = value.get(..8)?.try_into().ok()?;
    let expires_at: [u8; 8] = value.get(8..16)?.try_into().ok()?;
    Some((u64::from_be_bytes(fingerprint), Millis::from_be_bytes(expires_at)))
}

/// Splits a key into its parts (after the kind byte); `None` if it is not well formed.
pub(super) fn parts(key: &[u8]) -> Option<Vec<&str>> {
    let mut rest = key.get(1..)?;
    let mut parts = Vec::with_capacity(4);
    while !rest.is_empty() {
        let len = u16::from_be_bytes([*rest.first()?, *rest.get(1)?]) as usize;
        let part = rest.get(2..2 + len)?;
        parts.push(std::str::from_utf8(part).ok()?);
        rest = &rest[2 + len..];
    }
    Some(parts)
}

/// The first part of a key (the site, for every kind that has parts).
pub(super) fn first_part(key: &[u8]) -> Option<&str> {
    let len = u16::from_be_bytes([*key.get(1)?, *key.get(2)?]) as usize;
    std::str::from_utf8(key.get(3..3 + len)?).ok()
}

/// The message id at the end of a queue key.
pub(super) fn queued_id(key: &[u8]) -> Option<MessageId> {
    let tail: [u8; 8] = key.get(key.len().checked_sub(8)?..)?.try_into().ok()?;
    Some(MessageId::from_be_bytes(tail))
}

/// Decodes a device key back into its `DeviceKey`.
pub(super) fn parse_device(key: &[u8]) -> Option<DeviceKey> {
    match parts(key)?.as_slice() {
        [site, user, device] if key.first() == Some(&DEVICE) => Some(DeviceKey::new(site, user, device)),
        _ => None,
    }
}

/// A key up to the end of its second part: a device key's `devices_of` prefix (kind, site, user
/// room), a shared-room key's `room_members` prefix (kind, site, room).
pub(super) fn two_part_prefix(key: &[u8]) -> Option<&[u8]> {
    let mut at = 1;
    for _ in 0..2 {
        let len = u16::from_be_bytes([*key.get(at)?, *key.get(at + 1)?]) as usize;
        at += 2 + len;
    }
    key.get(..at)
}

/// Prints a key for error messages.
pub(super) fn show(key: &[u8]) -> String {
    key.escape_ascii().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_keys_round_trip_whatever_the_names_hold() {
        for (site, user, device) in [("s", "user_1", ""), ("a\0b", "ü\u{2}", "x/y?z"), ("", "", "")] {
            let dev = DeviceKey::new(site, user, device);
            assert_eq!(parse_device(&device_key(&dev)), Some(dev));
        }
    }

    fn device_key(dev: &DeviceKey) -> Vec<u8> {
        device(dev).unwrap()
    }

    #[test]
    fn a_user_prefix_never_matches_another_user_with_a_longer_name() {
        let prefix = devices_of("s", "user_1").unwrap();
        let other = device(&DeviceKey::new("s", "user_12", "d")).unwrap();
        let own = device(&DeviceKey::new("s", "user_1", "d")).unwrap();
        assert!(!other.starts_with(&prefix));
        assert!(own.starts_with(&prefix));
    }

    #[test]
    fn device_and_room_keys_name_their_group_prefix() {
        for (site, user, device) in [("s", "user_1", "d"), ("", "", ""), ("a\0b", "ü", "x")] {
            let key = device_key(&DeviceKey::new(site, user, device));
            assert_eq!(two_part_prefix(&key), Some(devices_of(site, user).unwrap().as_slice()));
            let key = room(site, "Staff", user).unwrap();
            assert_eq!(two_part_prefix(&key), Some(room_members(site, "staff").unwrap().as_slice()));
        }
        assert_eq!(two_part_prefix(&[DEVICE, 0]), None);
    }

    #[test]
    fn queue_keys_sort_by_id() {
        let prefix = queue(&DeviceKey::new("s", "u", "d")).unwrap();
        let ids = [0u64, 1, 255, 256, 65_536, u64::MAX];
        let keys: Vec<_> = ids.iter().map(|id| queued(&prefix, *id)).collect();
        let mut sorted = keys.clone();
        sorted.sort();
        assert_eq!(keys, sorted);
        assert_eq!(keys.iter().map(|k| queued_id(k).unwrap()).collect::<Vec<_>>(), ids);
    }

    #[test]
    fn queue_values_round_trip() {
        let value = queued_value(1_700_000_000_123, 7, "e", Some(r#"["e",1]"#));
        let split = QueuedValue { at: 1_700_000_000_123, size: 7, event: "e", inline: Some(r#"["e",1]"#) };
        assert_eq!(split_queued_value(&value), Some(split));
        let value = queued_value(5, 300_000, "ü\n", None);
        assert_eq!(split_queued_value(&value), Some(QueuedValue { at: 5, size: 300_000, event: "ü\n", inline: None }));
        assert_eq!(split_queued_value(b"short"), None);
        assert_eq!(split_v1_queued_value(&value), None);
    }

    #[test]
    fn schema_1_queue_values_are_told_apart() {
        let mut v1 = 1_700_000_000_123u64.to_be_bytes().to_vec();
        v1.extend_from_slice(br#"["e",1]"#);
        assert_eq!(split_v1_queued_value(&v1), Some((1_700_000_000_123, r#"["e",1]"#)));
        assert_eq!(split_queued_value(&v1), None);
    }

    #[test]
    fn idempotency_records_index_by_expiry() {
        let record = idempotency("s", "key-1").unwrap();
        let (early, late) = (idempotency_expiry(255, &record), idempotency_expiry(256, &record));
        assert!(early < late);
        assert_eq!(split_by_time(&late), Some((256, record.as_slice())));
        let device = device(&DeviceKey::new("s", "u", "d")).unwrap();
        assert!(disconnected(1, &device) < disconnected(2, &device));
        assert_eq!(split_by_time(&disconnected(7, &device)), Some((7, device.as_slice())));
        assert_eq!(first_part(&record), Some("s"));
    }

    #[test]
    fn message_keys_sort_by_id_and_differ_by_kind() {
        assert!(body(255) < body(256) && refs(0) < refs(u64::MAX));
        assert_ne!(body(7), refs(7));
        assert_eq!(body(7)[0], BODY);
    }

    #[test]
    fn shared_rooms_are_indexed_lowercase() {
        assert_eq!(room("s", "Staff", "user_1").unwrap(), room("s", "staff", "user_1").unwrap());
        assert!(room("s", "STAFF", "u").unwrap().starts_with(&room_members("s", "staff").unwrap()));
    }

    #[test]
    fn overlong_names_are_refused() {
        let long = "x".repeat(MAX_PART + 1);
        assert!(matches!(user("s", &long), Err(StoreError::TooLong { .. })));
    }
}
