//! Backups: what a store exports, written as a snapshot, read back and loaded into an empty
//! store, is the same state; loading it twice changes nothing.

use super::*;
use crate::snapshot;

/// A store with a bit of everything: room lists, connected and disconnected devices, a message
/// for several devices, an overflowed queue, an owed resync and an idempotency key.
async fn fill(store: &impl Store) -> MessageId {
    let (a, b, c) = (dev("user_1", "a"), dev("user_1", "b"), dev("user_2", "ü\n\"x"));
    store.connect(&a, &rooms(&["user_1", "Staff"]), None).await.unwrap();
    store.connect(&b, &rooms(&["user_1", "Staff"]), None).await.unwrap();
    store.connect(&c, &rooms(&["user_2", "staff", "other"]), None).await.unwrap();
    store.disconnect(&b, 1_000).await.unwrap();
    send(store, &["user_1", "user_2"], r#"["all",{"n":1}]"#, 10).await;
    send(store, &["user_1"], r#"["one","ü"]"#, 11).await;
    let limits = QueueLimits { max_len: 2, max_bytes: 1 << 20 };
    for i in 0..3 {
        store.enqueue("site", users(&["user_2"]), entry(&format!("[\"c\",{i}]")), at(12), limits, None).await.unwrap();
    }
    // An out-of-order checked ack owes user_1's device a a resync.
    let x1 = send(store, &["user_1"], r#"["x",1]"#, 13).await.id;
    let x2 = send(store, &["user_1"], r#"["x",2]"#, 13).await.id;
    assert_eq!(store.acks(vec![checked(&a, x2, "x")]).await.unwrap().len(), 1);
    assert!(x1 < x2);
    let idem = Idempotency { key: "k-1".into(), fingerprint: 7, expires_at: 10 * HOUR };
    store
        .enqueue("site", users(&["user_1"]), entry("[\"i\"]"), at(14), QueueLimits::default(), Some(idem))
        .await
        .unwrap();
    x2
}

fn snapshot_of(export: Export) -> Vec<u8> {
    snapshot::write(export, Vec::new(), 42).unwrap().1
}

async fn restored(bytes: &[u8], into: &impl Store) -> Loaded {
    snapshot::check(bytes).unwrap();
    snapshot::load(into, snapshot::SnapshotReader::new(bytes).unwrap()).await.unwrap()
}

pub(super) async fn a_backup_restores_the_same_state(from: &impl Store, into: &impl Store) {
    let last = fill(from).await;
    let bytes = snapshot_of(from.export().await.unwrap());
    let (header, summary) = snapshot::check(&bytes[..]).unwrap();
    assert!(header.next_id > last);
    assert_eq!((summary.users, summary.devices, summary.messages, summary.idempotency_keys), (2, 3, 10, 1));

    let loaded = restored(&bytes, into).await;
    assert_eq!(loaded.skipped, 0);
    // The same records again, and the same figures.
    assert_eq!(
        String::from_utf8(snapshot_of(into.export().await.unwrap())).unwrap(),
        String::from_utf8(bytes.clone()).unwrap()
    );
    assert_eq!(into.stats().await.unwrap(), from.stats().await.unwrap());
    for device in [dev("user_1", "a"), dev("user_1", "b"), dev("user_2", "ü\n\"x")] {
        assert_eq!(into.pending(&device).await.unwrap(), from.pending(&device).await.unwrap(), "{device:?}");
        assert_eq!(into.device(&device).await.unwrap(), from.device(&device).await.unwrap(), "{device:?}");
    }
    let mut staff = into.users_in_room("site", "STAFF").await.unwrap();
    staff.sort();
    assert_eq!(staff, ["user_1", "user_2"]);

    // It behaves the same: the key is known, ids go on above, the owed resync is delivered at the
    // next connect, a message for several devices outlives one device's ack.
    let idem = Idempotency { key: "k-1".into(), fingerprint: 7, expires_at: 10 * HOUR };
    let again = into.enqueue("site", users(&["user_1"]), entry("[\"i\"]"), at(15), QueueLimits::default(), Some(idem));
    assert_eq!(again.await.unwrap().replay, Some(Replay::Same));
    assert!(send(into, &["user_1"], "[\"n\"]", 16).await.id >= header.next_id);
    let (a, b, c) = (dev("user_1", "a"), dev("user_1", "b"), dev("user_2", "ü\n\"x"));
    let shared = into.pending(&a).await.unwrap()[0].id;
    ack(into, &a, &[shared]).await;
    assert_eq!(entries(into, &b).await[0], r#"["all",{"n":1}]"#);
    assert!(into.connect(&a, &rooms(&["user_1"]), None).await.unwrap().resync);
    let connected = into.connect(&c, &rooms(&["user_2"]), None).await.unwrap();
    assert!(connected.resync, "the overflowed queue still owes a resync");
}

pub(super) async fn loading_a_backup_twice_changes_nothing(from: &impl Store, into: &impl Store) {
    fill(from).await;
    let bytes = snapshot_of(from.export().await.unwrap());
    let first = restored(&bytes, into).await;
    let second = restored(&bytes, into).await;
    assert_eq!(second, Loaded { written: 2, skipped: first.written - 2 }, "only the two room lists are written again");
    assert_eq!(snapshot_of(into.export().await.unwrap()), bytes);
}

/// A snapshot loads into the Redis store too, with the same queues, rooms, flags and keys;
/// its devices come in disconnected (no node holds their sockets), and a second load skips
/// everything it already holds.
#[tokio::test]
async fn a_backup_loads_into_redis() {
    let (from, into) = (MemoryStore::new(), redis_store().await);
    let last = fill(&from).await;
    let bytes = snapshot_of(from.export().await.unwrap());
    let first = restored(&bytes, &into).await;
    assert_eq!(first.skipped, 1, "the next id, with no site yet to raise");
    into.audit("site").await.unwrap();
    let (want, got) = (&from.stats().await.unwrap()["site"], &into.stats().await.unwrap()["site"]);
    assert_eq!(
        (got.devices, got.queued_messages, got.queued_bytes),
        (want.devices, want.queued_messages, want.queued_bytes)
    );
    assert_eq!(got.connected, 0);
    let (a, b, c) = (dev("user_1", "a"), dev("user_1", "b"), dev("user_2", "ü\n\"x"));
    for device in [&a, &b, &c] {
        assert_eq!(into.pending(device).await.unwrap(), from.pending(device).await.unwrap(), "{device:?}");
        let (want, got) = (from.device(device).await.unwrap().unwrap(), into.device(device).await.unwrap().unwrap());
        assert_eq!(
            DeviceState { connected: false, disconnected_at: 0, ..got },
            DeviceState { connected: false, disconnected_at: 0, ..want }
        );
        assert!(!got.connected && got.disconnected_at > 0);
    }
    assert_eq!(into.device(&b).await.unwrap().unwrap().disconnected_at, 1_000, "a disconnected device keeps its time");
    let mut staff = into.users_in_room("site", "STAFF").await.unwrap();
    staff.sort();
    assert_eq!(staff, ["user_1", "user_2"]);

    let second = restored(&bytes, &into).await;
    let all = first.written + first.skipped;
    assert_eq!(second, Loaded { written: 2, skipped: all - 2 }, "only the two room lists are written again");
    into.audit("site").await.unwrap();

    let idem = Idempotency { key: "k-1".into(), fingerprint: 7, expires_at: 10 * HOUR };
    let again = into.enqueue("site", users(&["user_1"]), entry("[\"i\"]"), at(15), QueueLimits::default(), Some(idem));
    assert_eq!(again.await.unwrap().replay, Some(Replay::Same));
    assert!(send(&into, &["user_1"], "[\"n\"]", 16).await.id > last, "ids go on above the loaded ones");
    let shared = into.pending(&a).await.unwrap()[0].id;
    ack(&into, &a, &[shared]).await;
    assert_eq!(entries(&into, &b).await[0], r#"["all",{"n":1}]"#);
    assert!(into.connect(&a, &rooms(&["user_1"]), None).await.unwrap().resync);
    assert!(into.connect(&c, &rooms(&["user_2"]), None).await.unwrap().resync, "the overflowed queue owes a resync");
    into.audit("site").await.unwrap();
}

/// Ids the Redis scripts cannot count exactly are refused before anything is written.
#[tokio::test]
async fn redis_refuses_ids_past_2_to_the_53() {
    let store = redis_store().await;
    let device = dev("user_1", "a");
    let state = DeviceState { disconnected_at: 5, ..DeviceState::default() };
    let big = Queued { id: 1 << 53, queued_at: 1, entry: entry(r#"["e",1]"#) };
    let records = vec![
        Record::Device { key: device.clone(), state },
        Record::Message { device: device.clone(), message: big, shared: false },
    ];
    assert!(matches!(store.load(records).await, Err(StoreError::Unsupported(_))));
    assert!(matches!(store.load(vec![Record::Ids { next: (1 << 53) + 1 }]).await, Err(StoreError::Unsupported(_))));
    assert_eq!(store.device(&device).await.unwrap(), None, "nothing was written");
}
