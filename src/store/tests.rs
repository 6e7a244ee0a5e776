//! The conformance suite: every case runs against `MemoryStore` and `SledStore` alike.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use super::*;

const HOUR: u64 = 3_600_000;

fn dev(user: &str, device: &str) -> DeviceKey {
    DeviceKey::new("site", user, device)
}

fn rooms(list: &[&str]) -> Vec<String> {
    list.iter().map(|r| r.to_string()).collect()
}

fn users(list: &[&str]) -> Vec<String> {
    rooms(list)
}

fn entry(text: &str) -> Arc<str> {
    Arc::from(text)
}

fn at(now: Millis) -> Expiry {
    Expiry { now, ttl_ms: HOUR }
}

async fn send(store: &impl Store, to: &[&str], text: &str, now: Millis) -> Enqueued {
    store.enqueue("site", users(to), entry(text), at(now), QueueLimits::default(), None).await.unwrap()
}

/// Acks messages as a `_batch` ack would.
async fn ack(store: &impl Store, device: &DeviceKey, ids: &[MessageId]) {
    assert!(store.acks(vec![Ack::Batch { device: device.clone(), ids: ids.to_vec() }]).await.unwrap().is_empty());
}

/// The ack of a live message sent with `resync=true`.
fn checked(device: &DeviceKey, id: MessageId, event: &str) -> Ack {
    Ack::Live { device: device.clone(), id, checked: Some(event.into()) }
}

async fn entries(store: &impl Store, device: &DeviceKey) -> Vec<String> {
    store.pending(device).await.unwrap().iter().map(|q| q.entry.to_string()).collect()
}

async fn users_never_connected_get_nothing_stored(store: impl Store) {
    let out = send(&store, &["user_1"], r#"["e",1]"#, 0).await;
    assert!(out.devices.is_empty());
    assert_eq!(store.device(&dev("user_1", "")).await.unwrap(), None);
}

async fn queues_keep_send_order_across_events_and_devices(store: impl Store) {
    store.connect(&dev("user_1", "a"), &rooms(&["user_1"]), None).await.unwrap();
    store.connect(&dev("user_1", "b"), &rooms(&["user_1"]), None).await.unwrap();
    let first = send(&store, &["user_1"], r#"["x",1]"#, 0).await;
    let second = send(&store, &["user_1"], r#"["y",2]"#, 0).await;
    send(&store, &["user_1"], r#"["x",3]"#, 0).await;
    assert!(second.id > first.id);
    assert_eq!(first.devices, vec![dev("user_1", "a"), dev("user_1", "b")]);
    for device in ["a", "b"] {
        assert_eq!(entries(&store, &dev("user_1", device)).await, [r#"["x",1]"#, r#"["y",2]"#, r#"["x",3]"#]);
    }
    let state = store.device(&dev("user_1", "a")).await.unwrap().unwrap();
    assert_eq!((state.queue_len, state.queue_bytes), (3, 21));
}

async fn ack_removes_exactly_the_acked_messages(store: impl Store) {
    let d = dev("user_1", "a");
    store.connect(&d, &rooms(&["user_1"]), None).await.unwrap();
    let batch: Vec<_> =
        [send(&store, &["user_1"], "[\"e\",1]", 0).await.id, send(&store, &["user_1"], "[\"e\",2]", 0).await.id].into();
    // Arrives while the batch is in flight: the batch ack must not remove it.
    send(&store, &["user_1"], "[\"e\",3]", 0).await;
    ack(&store, &d, &batch).await;
    ack(&store, &d, &batch).await; // a repeated ack is harmless
    assert_eq!(entries(&store, &d).await, ["[\"e\",3]"]);
    let state = store.device(&d).await.unwrap().unwrap();
    assert_eq!((state.queue_len, state.queue_bytes), (1, 7));
}

async fn live_acks_remove_one_message_from_each_device(store: impl Store) {
    let (a, b, c) = (dev("user_1", "a"), dev("user_2", "b"), dev("user_3", "c"));
    for d in [&a, &b, &c] {
        store.connect(d, &rooms(&[&d.user]), None).await.unwrap();
    }
    let first = send(&store, &["user_1", "user_2", "user_3"], "[1]", 0).await.id;
    send(&store, &["user_1", "user_2", "user_3"], "[2]", 0).await;
    let live = |device: &DeviceKey| Ack::Live { device: device.clone(), id: first, checked: None };
    let acks = vec![live(&a), live(&b), live(&dev("user_9", "unknown"))];
    assert!(store.acks(acks).await.unwrap().is_empty());
    assert_eq!(entries(&store, &a).await, ["[2]"]);
    assert_eq!(entries(&store, &b).await, ["[2]"]);
    assert_eq!(entries(&store, &c).await, ["[1]", "[2]"]);
    assert_eq!(store.device(&b).await.unwrap().unwrap().queue_len, 1);
}

async fn checked_ack_resyncs_when_an_older_message_of_the_event_waits(store: impl Store) {
    let d = dev("user_1", "a");
    store.connect(&d, &rooms(&["user_1"]), None).await.unwrap();
    let a1 = send(&store, &["user_1"], r#"["a",1]"#, 0).await.id;
    let b1 = send(&store, &["user_1"], r#"["b",1]"#, 0).await.id;
    let a2 = send(&store, &["user_1"], r#"["a",2]"#, 0).await.id;
    let a3 = send(&store, &["user_1"], r#"["a",3]"#, 0).await.id;
    assert!(store.acks(vec![checked(&d, a1, "a")]).await.unwrap().is_empty());
    let resyncs = store.acks(vec![checked(&d, a3, "a")]).await.unwrap();
    assert_eq!(resyncs.len(), 1);
    assert_eq!((&resyncs[0].device, &*resyncs[0].event, resyncs[0].cleared), (&d, "a", 2));
    assert_eq!(entries(&store, &d).await, [r#"["b",1]"#]);
    // An ack for a message no longer queued changes nothing.
    assert!(store.acks(vec![checked(&d, a2, "a"), checked(&d, b1, "b")]).await.unwrap().is_empty());
    assert!(entries(&store, &d).await.is_empty());
}

/// Acks are judged in the order given: that is the order the client sent them.
async fn acks_are_checked_in_the_order_given(store: impl Store) {
    let d = dev("user_1", "a");
    let batch = store.connect(&d, &rooms(&["user_1"]), None).await.unwrap().watermark;
    let queued: Vec<MessageId> = {
        let mut ids = Vec::new();
        for i in 0..4 {
            ids.push(send(&store, &["user_1"], &format!(r#"["e",{i}]"#), 0).await.id);
        }
        ids
    };
    assert!(queued[0] >= batch);
    // A `_batch` ack, then live acks of later messages of the event, in send order: no resync.
    let in_order = vec![
        Ack::Batch { device: d.clone(), ids: vec![queued[0]] },
        checked(&d, queued[1], "e"),
        checked(&d, queued[2], "e"),
    ];
    assert!(store.acks(in_order).await.unwrap().is_empty());
    assert_eq!(entries(&store, &d).await, [r#"["e",3]"#]);
    // Given the other way round, the same acks are out of order.
    let later =
        [send(&store, &["user_1"], r#"["e",4]"#, 0).await.id, send(&store, &["user_1"], r#"["e",5]"#, 0).await.id];
    let resyncs = store.acks(vec![checked(&d, later[1], "e"), checked(&d, later[0], "e")]).await.unwrap();
    assert_eq!(resyncs.iter().map(|r| r.cleared).collect::<Vec<_>>(), [3], "one resync, for the first");
    assert!(entries(&store, &d).await.is_empty());
}

/// Sends two messages of one event and acks the second first; returns the resync's number.
async fn resync_after(store: &impl Store, d: &DeviceKey) -> MessageId {
    let first = send(store, &[&d.user], r#"["e",1]"#, 0).await.id;
    let second = send(store, &[&d.user], r#"["e",2]"#, 0).await.id;
    let resyncs = store.acks(vec![checked(d, second, "e"), checked(d, first, "e")]).await.unwrap();
    assert_eq!(resyncs.len(), 1);
    resyncs[0].seq
}

/// The `_resync` an out-of-order ack owes is kept with the device until it is delivered: by the
/// live path (`resync_sent`, only for the mark it delivered) or by the next connect.
async fn an_owed_resync_is_kept_until_delivered(store: impl Store) {
    let d = dev("user_1", "a");
    store.connect(&d, &rooms(&["user_1"]), None).await.unwrap();
    let first = resync_after(&store, &d).await;
    assert_eq!(store.device(&d).await.unwrap().unwrap().resync_at, Some(first));
    // A connect after the ack takes the mark: its watermark is above the mark.
    let connected = store.connect(&d, &rooms(&["user_1"]), None).await.unwrap();
    assert!(connected.resync && connected.watermark > first);
    assert!(!store.connect(&d, &rooms(&["user_1"]), None).await.unwrap().resync, "taken once");
    // Delivered live: cleared, but only by the mark it delivered.
    let second = resync_after(&store, &d).await;
    let third = resync_after(&store, &d).await;
    assert!(third > second);
    store.resync_sent(&d, second).await.unwrap();
    assert_eq!(store.device(&d).await.unwrap().unwrap().resync_at, Some(third), "a later mark stays");
    store.resync_sent(&d, third).await.unwrap();
    assert!(!store.device(&d).await.unwrap().unwrap().owes_resync());
    assert!(!store.connect(&d, &rooms(&["user_1"]), None).await.unwrap().resync);
    store.resync_sent(&dev("user_9", "x"), third).await.unwrap();
}

/// A connect's watermark splits messages: those sent before it are below it (and in its
/// queue), those sent after are at or above it.
async fn a_connect_watermark_splits_messages_before_and_after(store: impl Store) {
    let d = dev("user_1", "a");
    store.connect(&d, &rooms(&["user_1"]), None).await.unwrap();
    let before = send(&store, &["user_1"], "[1]", 0).await.id;
    let connected = store.connect(&d, &rooms(&["user_1"]), None).await.unwrap();
    assert!(before < connected.watermark);
    assert_eq!(connected.pending.iter().map(|q| q.id).collect::<Vec<_>>(), [before]);
    let after = send(&store, &["user_1"], "[2]", 0).await.id;
    assert!(after >= connected.watermark);
    assert!(store.connect(&d, &rooms(&["user_1"]), None).await.unwrap().watermark > after);
}

async fn devices_expire_from_their_latest_disconnect(store: impl Store) {
    let (a, b) = (dev("user_1", "a"), dev("user_1", "b"));
    store.connect(&a, &rooms(&["user_1", "staff"]), None).await.unwrap();
    store.connect(&b, &rooms(&["user_1", "staff"]), None).await.unwrap();
    store.disconnect(&a, 0).await.unwrap();
    store.disconnect(&b, 0).await.unwrap();
    // b reconnects and disconnects later: its clock restarts.
    store.connect(&b, &rooms(&["user_1", "staff"]), None).await.unwrap();
    store.disconnect(&b, HOUR).await.unwrap();
    let out = send(&store, &["user_1"], "[\"e\"]", HOUR + 1).await;
    assert_eq!(out.expired, vec![a.clone()]);
    assert_eq!(out.devices, vec![b.clone()]);
    assert_eq!(store.device(&a).await.unwrap(), None);
    assert!(store.pending(&a).await.unwrap().is_empty());
    assert_eq!(store.users_in_room("site", "staff").await.unwrap(), ["user_1"]);
}

/// Every change of a user's devices counts for the very next message: a store that keeps the
/// devices of a user in memory must drop them whenever one changes.
async fn each_message_sees_the_devices_as_they_are_now(store: impl Store) {
    let (a, b) = (dev("user_1", "a"), dev("user_1", "b"));
    store.connect(&a, &rooms(&["user_1"]), None).await.unwrap();
    assert_eq!(send(&store, &["user_1"], "[1]", 0).await.devices, vec![a.clone()]);
    store.connect(&b, &rooms(&["user_1"]), None).await.unwrap();
    assert_eq!(send(&store, &["user_1"], "[2]", 0).await.devices, vec![a.clone(), b.clone()]);
    store.disconnect(&a, 0).await.unwrap();
    let out = send(&store, &["user_1"], "[3]", HOUR + 1).await;
    assert_eq!((out.expired, out.devices), (vec![a.clone()], vec![b.clone()]));
    assert_eq!(send(&store, &["user_1"], "[4]", HOUR + 2).await.devices, vec![b.clone()]);
    store.connect(&a, &rooms(&["user_1"]), None).await.unwrap();
    assert_eq!(send(&store, &["user_1"], "[5]", HOUR + 3).await.devices, vec![a.clone(), b.clone()]);
    assert_eq!(entries(&store, &a).await, ["[5]"]);
    store.disconnect(&b, HOUR + 3).await.unwrap();
    assert_eq!(store.sweep(at(3 * HOUR)).await.unwrap(), vec![b.clone()]);
    assert_eq!(send(&store, &["user_1"], "[6]", 3 * HOUR).await.devices, vec![a.clone()]);
    assert_eq!(store.disconnect_all(3 * HOUR).await.unwrap(), 1);
    let out = send(&store, &["user_1"], "[7]", 5 * HOUR).await;
    assert_eq!((out.expired, out.devices), (vec![a.clone()], vec![]));
    // A queue over its cap flags the device; the flag is what the next connect reads.
    store.connect(&a, &rooms(&["user_1"]), None).await.unwrap();
    let one = QueueLimits { max_len: 1, max_bytes: 1 << 20 };
    for text in ["[8]", "[9]"] {
        store.enqueue("site", users(&["user_1"]), entry(text), at(5 * HOUR), one, None).await.unwrap();
    }
    assert!(store.device(&a).await.unwrap().unwrap().overflowed);
    assert!(store.connect(&a, &rooms(&["user_1"]), None).await.unwrap().resync);
}

async fn connected_devices_never_expire_and_ttl_zero_keeps_all(store: impl Store) {
    let (a, b) = (dev("user_1", "a"), dev("user_2", "b"));
    store.connect(&a, &rooms(&["user_1"]), None).await.unwrap();
    store.connect(&b, &rooms(&["user_2"]), None).await.unwrap();
    store.disconnect(&b, 0).await.unwrap();
    let forever = Expiry { now: 100 * HOUR, ttl_ms: 0 };
    let out = store
        .enqueue("site", users(&["user_1", "user_2"]), entry("[1]"), forever, QueueLimits::default(), None)
        .await
        .unwrap();
    assert_eq!(out.devices, vec![a.clone(), b.clone()]);
    assert!(store.sweep(forever).await.unwrap().is_empty());
    assert_eq!(store.sweep(at(100 * HOUR)).await.unwrap(), vec![b]);
    assert!(store.device(&a).await.unwrap().unwrap().connected);
}

async fn sweeping_the_last_device_forgets_the_user(store: impl Store) {
    let a = dev("user_1", "a");
    store.connect(&a, &rooms(&["user_1", "Staff"]), None).await.unwrap();
    send(&store, &["user_1"], "[1]", 0).await;
    store.disconnect(&a, 0).await.unwrap();
    assert_eq!(store.sweep(at(HOUR)).await.unwrap(), Vec::<DeviceKey>::new());
    assert_eq!(store.sweep(at(HOUR + 1)).await.unwrap(), vec![a.clone()]);
    assert!(store.users_in_room("site", "staff").await.unwrap().is_empty());
    assert!(store.pending(&a).await.unwrap().is_empty());
    // Forgotten users get nothing stored.
    assert!(send(&store, &["user_1"], "[2]", HOUR + 2).await.devices.is_empty());
}

async fn shared_rooms_match_case_insensitively_and_follow_the_latest_list(store: impl Store) {
    store.connect(&dev("user_1", "a"), &rooms(&["user_1", "Staff"]), None).await.unwrap();
    store.connect(&dev("user_2", "a"), &rooms(&["user_2", "staff", "reviewer"]), None).await.unwrap();
    store.connect(&dev("other", "a"), &rooms(&["user_1", "staff"]), None).await.unwrap();
    let mut staff = store.users_in_room("site", "STAFF").await.unwrap();
    staff.sort();
    assert_eq!(staff, ["other", "user_1", "user_2"]);
    // The latest connection's list replaces the earlier one.
    store.connect(&dev("user_2", "b"), &rooms(&["user_2"]), None).await.unwrap();
    assert!(store.users_in_room("site", "reviewer").await.unwrap().is_empty());
    assert!(store.users_in_room("other-site", "staff").await.unwrap().is_empty());
}

/// Every change of a shared room's members counts for the very next message: a store that
/// keeps a room's members in memory must drop them whenever one joins or leaves.
async fn each_message_sees_the_room_members_as_they_are_now(store: impl Store) {
    async fn staff(store: &impl Store) -> Vec<String> {
        let mut users = store.users_in_room("site", "staff").await.unwrap();
        users.sort();
        users
    }
    let (one, two) = (dev("user_1", "a"), dev("user_2", "a"));
    assert!(staff(&store).await.is_empty());
    store.connect(&one, &rooms(&["user_1", "Staff"]), None).await.unwrap();
    assert_eq!(staff(&store).await, ["user_1"]);
    store.connect(&two, &rooms(&["user_2", "staff"]), None).await.unwrap();
    assert_eq!(staff(&store).await, ["user_1", "user_2"]);
    // The same rooms again, in another case: nothing changes.
    store.connect(&one, &rooms(&["STAFF", "user_1"]), None).await.unwrap();
    assert_eq!(staff(&store).await, ["user_1", "user_2"]);
    // A user's latest list replaces the earlier one, whichever device sent it.
    store.connect(&dev("user_2", "b"), &rooms(&["user_2"]), None).await.unwrap();
    assert_eq!(staff(&store).await, ["user_1"]);
    store.connect(&two, &rooms(&["user_2", "staff"]), None).await.unwrap();
    assert_eq!(staff(&store).await, ["user_1", "user_2"]);
    // A forgotten user leaves its rooms.
    store.disconnect(&one, 0).await.unwrap();
    assert_eq!(store.sweep(at(HOUR + 1)).await.unwrap(), vec![one.clone()]);
    assert_eq!(staff(&store).await, ["user_2"]);
    store.connect(&one, &rooms(&["user_1", "staff"]), None).await.unwrap();
    assert_eq!(staff(&store).await, ["user_1", "user_2"]);
}

async fn full_queues_drop_their_oldest_and_flag_the_device(store: impl Store) {
    let d = dev("user_1", "a");
    store.connect(&d, &rooms(&["user_1"]), None).await.unwrap();
    let limits = QueueLimits { max_len: 2, max_bytes: 1_000 };
    for i in 1..=4 {
        let out =
            store.enqueue("site", users(&["user_1"]), entry(&format!("[{i}]")), at(0), limits, None).await.unwrap();
        assert_eq!(out.overflowed, if i > 2 { vec![(d.clone(), 1)] } else { vec![] });
    }
    assert_eq!(entries(&store, &d).await, ["[3]", "[4]"]);
    let by_bytes = QueueLimits { max_len: 100, max_bytes: 7 };
    store.enqueue("site", users(&["user_1"]), entry("[5]"), at(0), by_bytes, None).await.unwrap();
    assert_eq!(entries(&store, &d).await, ["[4]", "[5]"]);
    let connected = store.connect(&d, &rooms(&["user_1"]), None).await.unwrap();
    assert!(connected.resync);
    assert_eq!(connected.pending.len(), 2);
    assert!(!store.connect(&d, &rooms(&["user_1"]), None).await.unwrap().resync);
}

/// A message queued for several devices is kept until its last device is done with it, whatever
/// takes it from the others (an ack, an overflow, expiry, an operator).
async fn a_message_for_many_devices_outlives_each_removal(store: impl Store) {
    let (a, b, c, d) = (dev("user_1", "a"), dev("user_1", "b"), dev("user_2", "a"), dev("user_3", "a"));
    for (device, user) in [(&a, "user_1"), (&b, "user_1"), (&c, "user_2"), (&d, "user_3")] {
        store.connect(device, &rooms(&[user]), None).await.unwrap();
    }
    let shared = send(&store, &["user_1", "user_2", "user_3"], r#"["e","shared"]"#, 0).await;
    assert_eq!(shared.devices.len(), 4);
    // `a` and `b` overflow it away, `c` acks it, `d` goes offline and is not expired yet.
    let one = QueueLimits { max_len: 1, max_bytes: 1_000 };
    let out = store.enqueue("site", users(&["user_1"]), entry(r#"["e","next"]"#), at(0), one, None).await.unwrap();
    assert_eq!(out.overflowed, vec![(a.clone(), 1), (b.clone(), 1)]);
    ack(&store, &c, &[shared.id, shared.id]).await;
    store.disconnect(&d, 0).await.unwrap();
    assert_eq!(entries(&store, &a).await, [r#"["e","next"]"#]);
    assert_eq!(entries(&store, &c).await, Vec::<String>::new());
    assert_eq!(entries(&store, &d).await, [r#"["e","shared"]"#]);
    let state = store.device(&d).await.unwrap().unwrap();
    assert_eq!((state.queue_len, state.queue_bytes), (1, r#"["e","shared"]"#.len() as u64));
    // A message to the remaining devices after expiry has taken `d`.
    store.disconnect(&c, 2 * HOUR).await.unwrap();
    let late = send(&store, &["user_2", "user_3"], r#"["e","late"]"#, HOUR + 1).await;
    assert_eq!((late.devices, late.expired), (vec![c.clone()], vec![d.clone()]));
    assert_eq!(entries(&store, &c).await, [r#"["e","late"]"#]);
    assert_eq!(store.clear_queue(&a).await.unwrap(), 1);
    assert_eq!(entries(&store, &b).await, [r#"["e","next"]"#]);
}

/// The order check of `resync` acks follows the queue as other changes come between.
async fn checked_acks_follow_the_queue_as_it_changes(store: impl Store) {
    let d = dev("user_1", "a");
    store.connect(&d, &rooms(&["user_1"]), None).await.unwrap();
    let send_e = |text: &'static str| {
        let store = &store;
        async move { send(store, &["user_1"], text, 0).await.id }
    };
    let (first, second) = (send_e(r#"["e",1]"#).await, send_e(r#"["e",2]"#).await);
    let other = send_e(r#"["f",1]"#).await;
    // In order: only the acked message goes.
    assert!(store.acks(vec![checked(&d, first, "e")]).await.unwrap().is_empty());
    // A `_batch` ack takes the next one; then a new message is the oldest of its event.
    ack(&store, &d, &[second]).await;
    let third = send_e(r#"["e",3]"#).await;
    assert!(store.acks(vec![checked(&d, third, "e")]).await.unwrap().is_empty());
    // Out of order: both of its event go, the other event's message stays.
    let (fourth, fifth) = (send_e(r#"["e",4]"#).await, send_e(r#"["e",5]"#).await);
    let resyncs = store.acks(vec![checked(&d, fifth, "e")]).await.unwrap();
    assert_eq!(resyncs.iter().map(|r| r.cleared).collect::<Vec<_>>(), [2]);
    assert!(store.acks(vec![checked(&d, fourth, "e")]).await.unwrap().is_empty(), "no longer queued");
    assert_eq!(entries(&store, &d).await, [r#"["f",1]"#]);
    assert!(store.acks(vec![checked(&d, other, "f")]).await.unwrap().is_empty());
    assert_eq!(entries(&store, &d).await, Vec::<String>::new());
}

/// Past the cap on devices per user room a new device forgets the one that disconnected first,
/// with its queue; known devices come back freely; with every device connected it is refused.
async fn a_user_room_past_its_device_cap_forgets_the_oldest_disconnected(store: impl Store) {
    let cap = Some(2);
    let (a, b, c, d) = (dev("user_1", "a"), dev("user_1", "b"), dev("user_1", "c"), dev("user_1", "d"));
    store.connect(&a, &rooms(&["user_1"]), cap).await.unwrap();
    store.connect(&b, &rooms(&["user_1"]), cap).await.unwrap();
    store.disconnect(&b, 5).await.unwrap();
    store.disconnect(&a, 7).await.unwrap();
    let kept = send(&store, &["user_1"], "[1]", 10).await;
    let connected = store.connect(&c, &rooms(&["user_1"]), cap).await.unwrap();
    assert_eq!(connected.forgotten, vec![b.clone()], "b disconnected first");
    assert_eq!(store.device(&b).await.unwrap(), None);
    assert_eq!(store.pending(&b).await.unwrap(), vec![]);
    // A known device is not a new one: no cap check.
    let back = store.connect(&a, &rooms(&["user_1"]), cap).await.unwrap();
    assert_eq!((back.pending.len(), back.forgotten.len(), back.pending[0].id), (1, 0, kept.id));
    // All connected: refused, and nothing changed.
    let refused = store.connect(&d, &rooms(&["user_1", "staff"]), cap).await;
    assert!(matches!(refused, Err(StoreError::TooManyDevices { max: 2 })), "{refused:?}");
    assert_eq!(store.device(&d).await.unwrap(), None);
    assert!(store.users_in_room("site", "staff").await.unwrap().is_empty());
    // Other user rooms have their own cap, and none is applied without one.
    store.connect(&dev("user_2", "a"), &rooms(&["user_2"]), Some(1)).await.unwrap();
    store.connect(&d, &rooms(&["user_1"]), None).await.unwrap();
    assert_eq!(store.user_devices("site", "user_1").await.unwrap().len(), 3);
}

async fn disconnect_all_starts_every_connected_clock(store: impl Store) {
    store.connect(&dev("user_1", "a"), &rooms(&["user_1"]), None).await.unwrap();
    store.connect(&dev("user_2", "a"), &rooms(&["user_2"]), None).await.unwrap();
    store.disconnect(&dev("user_2", "a"), 5).await.unwrap();
    assert_eq!(store.disconnect_all(10).await.unwrap(), 1);
    let state = store.device(&dev("user_1", "a")).await.unwrap().unwrap();
    assert!(!state.connected);
    assert_eq!(state.disconnected_at, 10);
    assert_eq!(store.device(&dev("user_2", "a")).await.unwrap().unwrap().disconnected_at, 5);
}

async fn unknown_devices_are_ignored(store: impl Store) {
    let d = dev("user_9", "x");
    store.disconnect(&d, 1).await.unwrap();
    ack(&store, &d, &[1, 2]).await;
    assert!(store.acks(vec![checked(&d, 1, "e")]).await.unwrap().is_empty());
    assert_eq!(store.device(&d).await.unwrap(), None);
    store.flush().await.unwrap();
}

async fn operators_see_counts_devices_and_can_drop_a_queue(store: impl Store) {
    let (a, b) = (dev("user_1", "a"), dev("user_1", "b"));
    store.connect(&a, &rooms(&["user_1"]), None).await.unwrap();
    store.connect(&b, &rooms(&["user_1"]), None).await.unwrap();
    store.disconnect(&b, 5).await.unwrap();
    send(&store, &["user_1"], "[1]", 100).await;
    send(&store, &["user_1"], "[22]", 200).await;
    let other = DeviceKey::new("other", "user_1", "a");
    store.connect(&other, &rooms(&["user_1"]), None).await.unwrap();

    let stats = store.stats().await.unwrap();
    let want = SiteStats { devices: 2, connected: 1, queued_messages: 4, queued_bytes: 14 };
    assert_eq!(stats["site"], want);
    assert_eq!(stats["other"], SiteStats { devices: 1, connected: 1, ..SiteStats::default() });

    let devices = store.user_devices("site", "user_1").await.unwrap();
    assert_eq!(devices.iter().map(|d| d.device.as_str()).collect::<Vec<_>>(), ["a", "b"]);
    assert_eq!(devices[0].oldest_queued_at, Some(100));
    assert!(devices[0].state.connected && !devices[1].state.connected);
    assert_eq!(devices[1].state.disconnected_at, 5);

    assert_eq!(store.clear_queue(&a).await.unwrap(), 2);
    assert!(store.pending(&a).await.unwrap().is_empty());
    assert_eq!(entries(&store, &b).await, ["[1]", "[22]"]);
    assert_eq!(store.user_devices("site", "user_1").await.unwrap()[0].oldest_queued_at, None);
    assert_eq!(store.stats().await.unwrap()["site"].queued_messages, 2);
    assert_eq!(store.clear_queue(&dev("nobody", "x")).await.unwrap(), 0);
}

async fn queued_messages_carry_their_queue_time(store: impl Store) {
    let d = dev("user_1", "a");
    store.connect(&d, &rooms(&["user_1"]), None).await.unwrap();
    send(&store, &["user_1"], "[1]", 42).await;
    assert_eq!(store.pending(&d).await.unwrap()[0].queued_at, 42);
}

async fn a_repeated_idempotency_key_stores_nothing_new_until_it_expires(store: impl Store) {
    let d = dev("user_1", "a");
    store.connect(&d, &rooms(&["user_1"]), None).await.unwrap();
    let key = |fingerprint| Some(Idempotency { key: "k-1".into(), fingerprint, expires_at: 100 });
    let limits = QueueLimits::default();
    let first = store.enqueue("site", users(&["user_1"]), entry("[1]"), at(10), limits, key(7)).await.unwrap();
    assert_eq!((first.replay, first.devices.len()), (None, 1));
    let again = store.enqueue("site", users(&["user_1"]), entry("[1]"), at(20), limits, key(7)).await.unwrap();
    assert_eq!(again.replay, Some(Replay::Same));
    assert!(again.devices.is_empty());
    let other = store.enqueue("site", users(&["user_1"]), entry("[2]"), at(30), limits, key(8)).await.unwrap();
    assert_eq!(other.replay, Some(Replay::Different));
    assert_eq!(entries(&store, &d).await, ["[1]"]);
    // The same key on another site is another key.
    let elsewhere = store.enqueue("shop", users(&["user_1"]), entry("[1]"), at(30), limits, key(7)).await.unwrap();
    assert_eq!(elsewhere.replay, None);
    // Swept once expired, the key may be used again.
    store.sweep(at(100)).await.unwrap();
    let later = store.enqueue("site", users(&["user_1"]), entry("[3]"), at(101), limits, key(7)).await.unwrap();
    assert_eq!(later.replay, None);
    assert_eq!(entries(&store, &d).await, ["[1]", "[3]"]);
    // Used again once expired but before a sweep: sweeping the old expiry keeps the new record.
    let reused = |fingerprint, expires_at| Some(Idempotency { key: "k-2".into(), fingerprint, expires_at });
    let send_reused = |text: &'static str, now, fingerprint, expires_at| {
        store.enqueue("site", users(&["user_1"]), entry(text), at(now), limits, reused(fingerprint, expires_at))
    };
    assert_eq!(send_reused("[4]", 101, 1, 150).await.unwrap().replay, None);
    assert_eq!(send_reused("[5]", 160, 2, 400).await.unwrap().replay, None);
    store.sweep(at(200)).await.unwrap();
    assert_eq!(send_reused("[6]", 210, 2, 500).await.unwrap().replay, Some(Replay::Same));
    store.sweep(at(400)).await.unwrap();
    assert_eq!(send_reused("[7]", 410, 2, 600).await.unwrap().replay, None);
}

async fn concurrent_changes_keep_order_and_counts_true(store: impl Store) {
    let (a, b) = (dev("user_1", "a"), dev("user_2", "b"));
    store.connect(&a, &rooms(&["user_1"]), None).await.unwrap();
    store.connect(&b, &rooms(&["user_2"]), None).await.unwrap();
    // Many requests at once share writer rounds; each must see the ones before it.
    let sends = (0..40).map(|i| {
        let text = format!("[{i}]");
        let store = &store;
        async move {
            store
                .enqueue("site", users(&["user_1", "user_2"]), entry(&text), at(0), QueueLimits::default(), None)
                .await
                .unwrap()
        }
    });
    let ids: Vec<MessageId> = futures_util::future::join_all(sends).await.iter().map(|out| out.id).collect();
    let acks = ids.iter().step_by(2).map(|id| ack(&store, &a, std::slice::from_ref(id)));
    futures_util::future::join_all(acks).await;
    let (state_a, state_b) = (store.device(&a).await.unwrap().unwrap(), store.device(&b).await.unwrap().unwrap());
    assert_eq!((state_a.queue_len, state_b.queue_len), (20, 40));
    let pending = store.pending(&a).await.unwrap();
    assert_eq!(state_a.queue_bytes, pending.iter().map(|q| q.entry.len() as u64).sum::<u64>());
    let mut expected: Vec<MessageId> = ids.iter().skip(1).step_by(2).copied().collect();
    expected.sort();
    assert_eq!(pending.iter().map(|q| q.id).collect::<Vec<_>>(), expected, "send order, without the acked");
}

/// New devices racing for the last places under the device cap, with disconnects between them,
/// round after round: the room never holds more than the cap, a refused device is not
/// registered, every accepted one is registered unless a later one forgot it, and a message
/// reaches exactly the registered ones.
async fn racing_connects_never_pass_the_device_cap(store: impl Store) {
    const CAP: u64 = 5;
    for round in 0..100u64 {
        let user = format!("user_{round}");
        let connects = (0..12).map(|i| {
            let (store, d) = (&store, dev(&user, &format!("d{i}")));
            let rooms = rooms(&[&user]);
            async move {
                let got = store.connect(&d, &rooms, Some(CAP)).await;
                if i % 3 == 0 && got.is_ok() {
                    store.disconnect(&d, round * 100 + i).await.unwrap();
                }
                got
            }
        });
        let results = futures_util::future::join_all(connects).await;
        let registered = store.user_devices("site", &user).await.unwrap();
        assert!(registered.len() as u64 <= CAP, "round {round}: {} devices", registered.len());
        for (i, got) in results.iter().enumerate() {
            match got {
                Ok(_) => {}
                Err(StoreError::TooManyDevices { max: CAP }) => {
                    assert!(!registered.iter().any(|d| d.device == format!("d{i}")), "round {round}: d{i}");
                }
                Err(e) => panic!("round {round}: d{i}: {e}"),
            }
        }
        let accepted = results.iter().filter(|r| r.is_ok()).count();
        let forgotten: usize = results.iter().filter_map(|r| r.as_ref().ok()).map(|c| c.forgotten.len()).sum();
        assert_eq!(
            accepted - forgotten,
            registered.len(),
            "round {round}: every accepted device is registered or was forgotten"
        );
        let out = send(&store, &[&user], "[1]", round * 100 + 50).await;
        assert_eq!(out.devices.len(), registered.len(), "round {round}");
    }
}

macro_rules! conformance {
    ($($case:ident),* $(,)?) => {
        mod memory {
            $(#[tokio::test]
            async fn $case() {
                super::$case(super::MemoryStore::new()).await;
            })*
        }
        mod sled {
            $(#[tokio::test]
            async fn $case() {
                let dir = tempfile::tempdir().unwrap();
                super::$case(super::SledStore::open(dir.path(), 1 << 20, 0).unwrap()).await;
            })*
        }
        /// Each case on its own key prefix of one `redis-server` started for the test process.
        mod redis {
            $(#[tokio::test]
            async fn $case() {
                super::$case(super::redis_store().await).await;
            })*
        }
        /// Each case on its own key prefix of one 3-primary Redis Cluster started for the test
        /// process: the prefix's sites hash to different primaries.
        mod redis_cluster {
            $(#[tokio::test]
            async fn $case() {
                super::$case(super::redis_cluster_store().await).await;
            })*
        }
        /// A checkpoint begun after every round: reads go through the changes it is giving sled.
        mod sled_checkpointing {
            $(#[tokio::test]
            async fn $case() {
                let dir = tempfile::tempdir().unwrap();
                let store = super::SledStore::open_with(dir.path(), 1 << 20, 0, std::time::Duration::ZERO).unwrap();
                super::$case(store).await;
            })*
        }
    };
}

/// Starts `binary` with `args`, tied to the test process: its parent-death signal is tied to a
/// thread that lives as long as the process, so it stops with it. `REDIS_SERVER` names another
/// binary than Debian's `redis-server`.
fn spawn_redis(args: Vec<std::ffi::OsString>) {
    std::thread::spawn(move || {
        use std::os::unix::process::CommandExt;
        let binary = std::env::var("REDIS_SERVER").unwrap_or_else(|_| "redis-server".into());
        let mut command = std::process::Command::new(&binary);
        command.args(&args).stdout(std::process::Stdio::null());
        // SAFETY: prctl is async-signal-safe; it only sets a flag of the child.
        unsafe {
            command.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let mut child = command.spawn().unwrap_or_else(|e| {
            panic!("cannot start {binary} (install Debian's redis-server, or run scripts/test.sh): {e}")
        });
        let _ = child.wait();
    });
}

/// Waits (bounded) until `ready` holds.
fn wait_for(what: &str, mut ready: impl FnMut() -> bool) {
    for _ in 0..1000 {
        if ready() {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    panic!("{what} did not come up within 10 s");
}

/// A `redis-server` for this test process, on a Unix socket in a temporary directory.
pub(crate) fn redis_socket() -> &'static std::path::Path {
    static SOCKET: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();
    SOCKET.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap().keep();
        let socket = dir.join("redis.sock");
        let mut args: Vec<std::ffi::OsString> =
            ["--port", "0", "--save", "", "--appendonly", "no", "--unixsocket"].map(Into::into).into();
        args.extend([socket.clone().into(), "--dir".into(), dir.into()]);
        spawn_redis(args);
        wait_for("redis-server", || std::os::unix::net::UnixStream::connect(&socket).is_ok());
        socket
    })
}

/// A Redis Cluster of three primaries (no replicas) for this test process, on loopback ports:
/// the URLs of its nodes.
pub(crate) fn redis_cluster_urls() -> &'static [String] {
    static URLS: std::sync::OnceLock<Vec<String>> = std::sync::OnceLock::new();
    URLS.get_or_init(|| {
        let free_port = || std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let mut nodes = Vec::new();
        for _ in 0..3 {
            let (port, bus) = (free_port(), free_port());
            let dir = tempfile::tempdir().unwrap().keep();
            let (port_s, bus_s) = (port.to_string(), bus.to_string());
            let mut args: Vec<std::ffi::OsString> = [
                "--port",
                &port_s,
                "--cluster-port",
                &bus_s,
                "--bind",
                "127.0.0.1",
                "--cluster-enabled",
                "yes",
                "--cluster-node-timeout",
                "5000",
                "--save",
                "",
                "--appendonly",
                "no",
            ]
            .map(Into::into)
            .into();
            args.extend([
                "--dir".into(),
                dir.join("").into(),
                "--cluster-config-file".into(),
                dir.join("nodes.conf").into(),
            ]);
            spawn_redis(args);
            nodes.push(format!("127.0.0.1:{port}"));
        }
        for node in &nodes {
            wait_for("a cluster node", || std::net::TcpStream::connect(node).is_ok());
        }
        let cli = std::env::var("REDIS_CLI").unwrap_or_else(|_| "redis-cli".into());
        let out = std::process::Command::new(&cli)
            .args(["--cluster", "create"])
            .args(&nodes)
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .output()
            .unwrap_or_else(|e| panic!("cannot run {cli} (install Debian's redis-tools): {e}"));
        assert!(out.status.success(), "redis-cli --cluster create: {}", String::from_utf8_lossy(&out.stdout));
        let urls: Vec<String> = nodes.iter().map(|n| format!("redis://{n}/")).collect();
        for url in &urls {
            wait_for("the cluster", || {
                let info: Option<String> = ::redis::Client::open(url.as_str())
                    .and_then(|c| c.get_connection())
                    .and_then(|mut c| ::redis::cmd("CLUSTER").arg("INFO").query(&mut c))
                    .ok();
                info.is_some_and(|i| i.contains("cluster_state:ok"))
            });
        }
        urls
    })
}

/// A store on the test Redis Cluster, under a key prefix of its own.
pub(crate) async fn redis_cluster_store() -> RedisStore {
    redis_cluster_store_on(&next_prefix()).await
}

/// Another node on the test Redis Cluster: stores opened with one prefix share their data.
pub(crate) async fn redis_cluster_store_on(prefix: &str) -> RedisStore {
    let options = RedisOptions {
        target: super::redis::Target {
            urls: redis_cluster_urls().to_vec(),
            cluster: true,
            timeout: Duration::from_secs(5),
        },
        prefix: prefix.to_owned(),
        wait_replicas: 0,
    };
    RedisStore::open(options).await.unwrap()
}

fn next_prefix() -> String {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    format!("test{}-{n}", std::process::id())
}

/// A store on the test `redis-server`, under a key prefix of its own.
pub(crate) async fn redis_store() -> RedisStore {
    redis_store_on(&next_prefix()).await
}

/// Another node on the test `redis-server`: stores opened with one prefix share their data.
pub(crate) async fn redis_store_on(prefix: &str) -> RedisStore {
    let url = format!("redis+unix://{}", redis_socket().display());
    let options = RedisOptions {
        target: super::redis::Target { urls: vec![url], cluster: false, timeout: Duration::from_secs(5) },
        prefix: prefix.to_owned(),
        wait_replicas: 0,
    };
    RedisStore::open(options).await.unwrap()
}

conformance!(
    users_never_connected_get_nothing_stored,
    queues_keep_send_order_across_events_and_devices,
    ack_removes_exactly_the_acked_messages,
    live_acks_remove_one_message_from_each_device,
    checked_ack_resyncs_when_an_older_message_of_the_event_waits,
    acks_are_checked_in_the_order_given,
    an_owed_resync_is_kept_until_delivered,
    a_connect_watermark_splits_messages_before_and_after,
    devices_expire_from_their_latest_disconnect,
    each_message_sees_the_devices_as_they_are_now,
    connected_devices_never_expire_and_ttl_zero_keeps_all,
    sweeping_the_last_device_forgets_the_user,
    shared_rooms_match_case_insensitively_and_follow_the_latest_list,
    each_message_sees_the_room_members_as_they_are_now,
    full_queues_drop_their_oldest_and_flag_the_device,
    a_message_for_many_devices_outlives_each_removal,
    a_user_room_past_its_device_cap_forgets_the_oldest_disconnected,
    checked_acks_follow_the_queue_as_it_changes,
    disconnect_all_starts_every_connected_clock,
    unknown_devices_are_ignored,
    operators_see_counts_devices_and_can_drop_a_queue,
    queued_messages_carry_their_queue_time,
    a_repeated_idempotency_key_stores_nothing_new_until_it_expires,
    concurrent_changes_keep_order_and_counts_true,
    racing_connects_never_pass_the_device_cap,
);

mod backup;

/// Backup cases, from one store into another of the same kind (Redis has no backup of its own).
macro_rules! backups {
    ($($case:ident),* $(,)?) => {
        mod backups {
            $(mod $case {
                #[tokio::test]
                async fn memory() {
                    super::super::backup::$case(&super::super::MemoryStore::new(), &super::super::MemoryStore::new()).await;
                }
                #[tokio::test]
                async fn sled() {
                    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
                    let open = |dir: &tempfile::TempDir| super::super::SledStore::open(dir.path(), 1 << 20, 0).unwrap();
                    let (from, into) = (open(&a), open(&b));
                    super::super::backup::$case(&from, &into).await;
                    into.audit().await.unwrap();
                }
                #[tokio::test]
                async fn sled_checkpointing() {
                    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
                    let open = |dir: &tempfile::TempDir| {
                        super::super::SledStore::open_with(dir.path(), 1 << 20, 0, std::time::Duration::ZERO).unwrap()
                    };
                    let (from, into) = (open(&a), open(&b));
                    super::super::backup::$case(&from, &into).await;
                    into.audit().await.unwrap();
                }
            })*
        }
    };
}

backups!(a_backup_restores_the_same_state, loading_a_backup_twice_changes_nothing);

/// A copy of the data dir taken while the store runs is what `kill -9` would leave: what was
/// answered as durable must be in it, whether or not sled has flushed it yet.
#[tokio::test]
async fn sled_recovers_durable_changes_from_a_crash_image() {
    let dir = tempfile::tempdir().unwrap();
    let d = dev("user_1", "a");
    let store = SledStore::open_with(dir.path(), 1 << 20, 0, Duration::MAX).unwrap();
    store.connect(&d, &rooms(&["user_1", "staff"]), None).await.unwrap();
    for i in 0..3 {
        send(&store, &["user_1"], &format!("[{i}]"), 0).await;
    }
    let image = crash_image(dir.path());
    assert!(
        super::sled::wal::records(image.path()) > 0,
        "the changes are still in the write-ahead log (no checkpoint yet)"
    );
    store.close().await;

    let recovered = SledStore::open(image.path(), 1 << 20, 0).unwrap();
    assert_eq!(entries(&recovered, &d).await, ["[0]", "[1]", "[2]"]);
    assert_eq!(recovered.device(&d).await.unwrap().unwrap().queue_len, 3);
    assert_eq!(recovered.users_in_room("site", "staff").await.unwrap(), ["user_1"]);
}

/// A checkpoint gives sled new queue entries only once it is an interval old, and an ack takes
/// an entry out of it meanwhile. Jobs are served while it waits, and a crash at any moment
/// recovers the same queues: before the checkpoint ends and after.
#[tokio::test]
async fn sled_acks_during_a_checkpoint_are_served_and_recovered() {
    let dir = tempfile::tempdir().unwrap();
    let (d1, d2) = (dev("user_1", "a"), dev("user_2", "a"));
    let every = Duration::from_millis(200);
    let store = SledStore::open_with(dir.path(), 1 << 20, 0, every).unwrap();
    store.connect(&d1, &rooms(&["user_1"]), None).await.unwrap();
    store.connect(&d2, &rooms(&["user_2"]), None).await.unwrap();
    tokio::time::sleep(every + Duration::from_millis(50)).await;
    // This round starts the checkpoint: its entries are frozen, new, and wait.
    let first = send(&store, &["user_1", "user_2"], "[1]", 0).await.id;
    ack(&store, &d1, &[first]).await;
    send(&store, &["user_1"], "[2]", 0).await;
    assert_eq!(entries(&store, &d1).await, ["[2]"]);
    assert_eq!(entries(&store, &d2).await, ["[1]"]);
    let during = crash_image(dir.path());
    // Past the wait the checkpoint ends; the next round's job sees the same.
    tokio::time::sleep(every + Duration::from_millis(100)).await;
    assert_eq!(entries(&store, &d1).await, ["[2]"]);
    let after = crash_image(dir.path());
    store.close().await;
    for image in [during, after, crash_image(dir.path())] {
        let recovered = SledStore::open(image.path(), 1 << 20, 0).unwrap();
        assert_eq!(entries(&recovered, &d1).await, ["[2]"]);
        assert_eq!(entries(&recovered, &d2).await, ["[1]"]);
        assert_eq!(recovered.device(&d1).await.unwrap().unwrap().queue_len, 1);
        recovered.close().await;
    }
}

#[tokio::test]
async fn sled_keeps_queues_and_registry_across_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let d = dev("user_1", "a");
    let store = SledStore::open(dir.path(), 1 << 20, 0).unwrap();
    store.connect(&d, &rooms(&["user_1", "staff"]), None).await.unwrap();
    let first_id = send(&store, &["user_1"], "[\"e\",1]", 0).await.id;
    store.close().await;

    let store = SledStore::open(dir.path(), 1 << 20, 0).unwrap();
    assert_eq!(entries(&store, &d).await, ["[\"e\",1]"]);
    assert_eq!(store.users_in_room("site", "staff").await.unwrap(), ["user_1"]);
    assert!(store.device(&d).await.unwrap().unwrap().connected);
    assert!(send(&store, &["user_1"], "[\"e\",2]", 0).await.id > first_id);
}

#[tokio::test]
async fn sled_refuses_a_data_dir_of_another_schema() {
    let dir = tempfile::tempdir().unwrap();
    {
        let db = ::sled::open(dir.path()).unwrap();
        db.open_tree("meta").unwrap().insert("schema", &99u32.to_be_bytes()).unwrap();
        db.flush().unwrap();
    }
    // sled lets go of its file lock only once its I/O threads drop the database, a moment after
    // the last handle: while another test keeps those threads busy, the first open finds it held.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let err = loop {
        match SledStore::open(dir.path(), 1 << 20, 0) {
            Err(StoreError::Io(e)) if e.contains("could not acquire lock") && std::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(10)).await
            }
            other => break other.err().expect("must refuse"),
        }
    };
    assert!(matches!(err, StoreError::Schema { found: 99, expected: 2 }), "{err}");
}

/// A writer thread that dies is not survived: the store says why, refuses further work, and
/// is not ready.
#[tokio::test]
async fn sled_reports_a_dead_writer() {
    let dir = tempfile::tempdir().unwrap();
    let store = SledStore::open(dir.path(), 1 << 20, 0).unwrap();
    let d = dev("user_1", "a");
    store.connect(&d, &rooms(&["user_1"]), None).await.unwrap();
    assert_eq!((store.failure(), store.is_open()), (None, true));
    store.panic_writer().await;
    let failure = store.failure().expect("a failure is reported");
    assert!(failure.contains("writer thread panicked: injected"), "{failure}");
    assert!(!store.is_open());
    assert!(matches!(store.pending(&d).await, Err(StoreError::Closed)));
}

/// sled 0.34 takes a snapshot file it left half-written (killed during its own recovery) for
/// the newest one and cannot open the directory; such files are removed first.
#[tokio::test]
async fn sled_opens_a_data_dir_with_an_unfinished_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let d = dev("user_1", "a");
    let store = SledStore::open(dir.path(), 1 << 20, 0).unwrap();
    store.connect(&d, &rooms(&["user_1"]), None).await.unwrap();
    send(&store, &["user_1"], "[1]", 0).await;
    store.close().await;
    let unfinished = dir.path().join("snap.FFFFFFFFFFFFFF00.generating");
    std::fs::write(&unfinished, b"half a snapshot").unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let store = loop {
        match SledStore::open(dir.path(), 1 << 20, 0) {
            // See `sled_refuses_a_data_dir_of_another_schema`: sled's lock outlives its handle.
            Err(StoreError::Io(e)) if e.contains("could not acquire lock") && std::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(10)).await
            }
            other => break other.expect("opens"),
        }
    };
    assert!(!unfinished.exists());
    assert_eq!(entries(&store, &d).await, ["[1]"]);
}

/// Copies the data dir of a running store: what `kill -9` at this moment would leave.
pub(super) fn crash_image(dir: &std::path::Path) -> tempfile::TempDir {
    let image = tempfile::tempdir().unwrap();
    for file in std::fs::read_dir(dir).unwrap() {
        let file = file.unwrap();
        if file.file_type().unwrap().is_file() {
            std::fs::copy(file.path(), image.path().join(file.file_name())).unwrap();
        }
    }
    image
}

/// Crash after crash, with sends, shared rooms and acks in between, checkpointing after every
/// round in odd generations and never in even ones: every acknowledged send is recovered, and
/// ids are never used twice (a reused id would overwrite a queued message: sled's own id
/// generator did that after a crash).
#[tokio::test]
async fn sled_recovers_every_change_over_repeated_crashes() {
    let mut dir = tempfile::tempdir().unwrap();
    let devs: Vec<DeviceKey> = (0..6).map(|u| dev(&format!("user_{u}"), "dev")).collect();
    let mut expected: Vec<Vec<MessageId>> = vec![Vec::new(); devs.len()];
    let mut last_id = None;
    for generation in 0..5 {
        let before_crash = last_id;
        let every = if generation % 2 == 1 { Duration::ZERO } else { Duration::MAX };
        let store = SledStore::open_with(dir.path(), 1 << 20, 0, every).unwrap();
        for (u, d) in devs.iter().enumerate() {
            let got: Vec<MessageId> = store.pending(d).await.unwrap().iter().map(|q| q.id).collect();
            assert_eq!(got, expected[u], "generation {generation}, user_{u}");
            let queued = store.device(d).await.unwrap().map_or(0, |state| state.queue_len);
            assert_eq!(queued, expected[u].len() as u64, "counts recovered too");
            store.connect(d, &rooms(&[&format!("user_{u}"), "crowd"]), None).await.unwrap();
        }
        for round in 0..10 + 7 * generation {
            let sends = (0..20).map(|i| {
                let store = &store;
                async move {
                    let to = if i % 5 == 0 {
                        store.users_in_room("site", "crowd").await.unwrap()
                    } else {
                        users(&[&format!("user_{}", i % 6)])
                    };
                    let text = format!("[{round},{i}]");
                    let out =
                        store.enqueue("site", to.clone(), entry(&text), at(0), QueueLimits::default(), None).await;
                    (to, out.unwrap().id)
                }
            });
            for (to, id) in futures_util::future::join_all(sends).await {
                assert!(before_crash.is_none_or(|last| id > last), "ids grow across crashes");
                last_id = last_id.max(Some(id));
                for user in to {
                    expected[user["user_".len()..].parse::<usize>().unwrap()].push(id);
                }
            }
            // Even users ack everything; odd users stay offline with growing queues.
            for u in (0..devs.len()).step_by(2) {
                ack(&store, &devs[u], &std::mem::take(&mut expected[u])).await;
            }
            expected.iter_mut().for_each(|ids| ids.sort());
        }
        dir = crash_image(dir.path());
        drop(store);
    }
}

/// An export is the state as of its call, whatever changes come while it is read, and while it
/// is held sled is given nothing (the log keeps the changes); once it is gone, checkpoints go on.
#[tokio::test]
async fn sled_export_is_the_state_when_it_began_while_changes_go_on() {
    let dir = tempfile::tempdir().unwrap();
    let store = SledStore::open_with(dir.path(), 1 << 20, 0, Duration::ZERO).unwrap();
    let d = dev("user_1", "a");
    store.connect(&d, &rooms(&["user_1"]), None).await.unwrap();
    let mut ids = Vec::new();
    for i in 0..50 {
        ids.push(send(&store, &["user_1"], &format!("[{i}]"), 0).await.id);
    }
    let before = entries(&store, &d).await;
    for round in 0..2 {
        let late = dev(&format!("late_{round}"), "b");
        let export = store.export().await.unwrap();
        ack(&store, &d, &ids[..25]).await;
        for i in 0..30 {
            send(&store, &["user_1"], &format!("[\"later\",{i}]"), 0).await;
        }
        store.connect(&late, &rooms(&[&late.user]), None).await.unwrap();
        assert!(super::sled::wal::records(dir.path()) > 0, "round {round}: sled was given nothing");
        if round == 0 {
            drop(export); // abandoned: the pin goes with it
        } else {
            let bytes = tokio::task::spawn_blocking(move || crate::snapshot::write(export, Vec::new(), 0).unwrap().1);
            let bytes = bytes.await.unwrap();
            let copy = MemoryStore::new();
            crate::snapshot::load(&copy, crate::snapshot::SnapshotReader::new(&bytes[..]).unwrap()).await.unwrap();
            assert_eq!(entries(&copy, &d).await, before);
            assert_eq!(copy.device(&late).await.unwrap(), None);
        }
        // Unpinned: the next rounds checkpoint everything logged (bounded wait).
        let mut waited = 0;
        while super::sled::wal::records(dir.path()) > 0 {
            assert!(waited < 500, "round {round}: checkpoints did not resume");
            store.disconnect(&late, 1).await.unwrap();
            tokio::time::sleep(Duration::from_millis(10)).await;
            waited += 1;
        }
        store.connect(&d, &rooms(&["user_1"]), None).await.unwrap();
        for id in store.pending(&d).await.unwrap().iter().map(|q| q.id).collect::<Vec<_>>() {
            ack(&store, &d, &[id]).await;
        }
        for (i, id) in ids.iter_mut().enumerate() {
            *id = send(&store, &["user_1"], &format!("[{i}]"), 0).await.id;
        }
    }
    store.audit().await.unwrap();
}

/// sled recovers an emptied, cut or missing database file as an empty database: the store must
/// not start on it as if it had never held anything (its messages silently gone).
#[tokio::test]
async fn sled_refuses_a_data_dir_whose_database_file_lost_its_contents() {
    for damage in ["emptied", "cut", "removed"] {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(dir.path(), 1 << 20, 0).unwrap();
        store.connect(&dev("user_1", "a"), &rooms(&["user_1"]), None).await.unwrap();
        send(&store, &["user_1"], "[\"e\",1]", 0).await;
        store.close().await;
        let db = dir.path().join("db");
        match damage {
            "emptied" => std::fs::File::create(&db).map(drop).unwrap(),
            "cut" => std::fs::OpenOptions::new().write(true).open(&db).and_then(|f| f.set_len(100)).unwrap(),
            _ => std::fs::remove_file(&db).unwrap(),
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        let err = loop {
            match SledStore::open(dir.path(), 1 << 20, 0) {
                Err(StoreError::Io(e))
                    if e.contains("could not acquire lock") && std::time::Instant::now() < deadline =>
                {
                    tokio::time::sleep(Duration::from_millis(10)).await
                }
                other => break other.err().unwrap_or_else(|| panic!("{damage}: opened as an empty store")),
            }
        };
        assert!(matches!(err, StoreError::Damaged(_)), "{damage}: {err}");
        assert!(err.to_string().contains("db was emptied, cut or replaced"), "{err}");
    }
}

/// Exports taken at random moments while a device's queue changes, each checkpointing round
/// pinned by the export or not: every export is exactly a state the queue was in between the
/// export's call and its answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sled_exports_taken_during_changes_are_each_a_state_the_store_was_in() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    const OPS: usize = 3_000;
    let dir = tempfile::tempdir().unwrap();
    let store = SledStore::open_with(dir.path(), 1 << 20, 0, Duration::ZERO).unwrap();
    let d = dev("user_1", "a");
    store.connect(&d, &rooms(&["user_1"]), None).await.unwrap();
    // The queue after each number of operations: op j sends ["m",j], every third acks the oldest.
    let mut states = vec![Vec::<String>::new()];
    let mut queue = std::collections::VecDeque::new();
    for j in 0..OPS {
        match j % 3 {
            2 => drop(queue.pop_front()),
            _ => queue.push_back(format!("[\"m\",{j}]")),
        }
        states.push(queue.iter().cloned().collect());
    }
    let done = Arc::new(AtomicUsize::new(0));
    let changes = {
        let (store, d, done) = (store.clone(), d.clone(), done.clone());
        tokio::spawn(async move {
            let mut ids = std::collections::VecDeque::new();
            for j in 0..OPS {
                match j % 3 {
                    2 => ack(&store, &d, &[ids.pop_front().unwrap()]).await,
                    _ => ids.push_back(send(&store, &["user_1"], &format!("[\"m\",{j}]"), 0).await.id),
                }
                done.store(j + 1, Ordering::SeqCst);
            }
        })
    };
    let mut exports = 0;
    while !changes.is_finished() && exports < 300 {
        let from = done.load(Ordering::SeqCst);
        let export = store.export().await.unwrap();
        let to = done.load(Ordering::SeqCst);
        let bytes = tokio::task::spawn_blocking(move || crate::snapshot::write(export, Vec::new(), 0).unwrap().1);
        let bytes = bytes.await.unwrap();
        let mut reader = crate::snapshot::SnapshotReader::new(&bytes[..]).unwrap();
        let mut got = Vec::new();
        while let Some(record) = reader.next_record().unwrap() {
            if let Record::Message { message, .. } = record {
                got.push(message.entry.to_string());
            }
        }
        let fits = (from..=(to + 1).min(OPS)).any(|j| states[j] == got);
        assert!(fits, "export {exports}, taken after {from} to {to} operations, is no state in between: {got:?}");
        exports += 1;
    }
    changes.await.unwrap();
    assert!(exports >= 50, "only {exports} exports ran during the changes");
    store.audit().await.unwrap();
}

/// A record of the write-ahead log damaged after it was synced (a later record says so) stops
/// the store at open, naming the file and the offset, instead of starting without what it held.
#[tokio::test]
async fn sled_refuses_a_log_damaged_inside_its_synced_records() {
    let dir = tempfile::tempdir().unwrap();
    let store = SledStore::open_with(dir.path(), 1 << 20, 0, Duration::MAX).unwrap();
    store.connect(&dev("user_1", "a"), &rooms(&["user_1"]), None).await.unwrap();
    for i in 0..3 {
        send(&store, &["user_1"], &format!("[\"e\",{i}]"), 0).await;
    }
    let image = crash_image(dir.path());
    store.close().await;
    // The file holding the records: its first record starts right after the 16-byte header.
    let (name, mut bytes) = super::sled::wal::FILE_NAMES
        .iter()
        .map(|name| (*name, std::fs::read(image.path().join(name)).unwrap()))
        .find(|(_, bytes)| bytes[16..20] != [0; 4])
        .expect("a log file with records");
    bytes[16 + 8 + 8 + 3] ^= 0x40;
    std::fs::write(image.path().join(name), &bytes).unwrap();
    let err = SledStore::open(image.path(), 1 << 20, 0).err().expect("refused");
    assert!(matches!(err, StoreError::Damaged(_)), "{err}");
    assert!(err.to_string().contains(&format!("{name} is damaged at byte 16")), "{err}");
}

/// What a store holds, in a form both backends share (their message ids differ): room lists,
/// devices with their state and queue texts in order, idempotency keys.
#[derive(Debug, Default, PartialEq)]
struct Canonical {
    users: BTreeMap<(String, String), Vec<String>>,
    devices: BTreeMap<DeviceKey, (bool, Millis, bool, bool, Vec<String>)>,
    keys: BTreeMap<(String, String), (u64, Millis)>,
}

async fn canonical(store: &impl Store) -> Canonical {
    let export = store.export().await.unwrap();
    let mut records = Vec::new();
    (export.write)(&mut |record| {
        records.push(record);
        Ok(())
    })
    .unwrap();
    let mut out = Canonical::default();
    for record in records {
        match record {
            Record::User { site, user, rooms } => drop(out.users.insert((site, user), rooms)),
            Record::Device { key, state } => {
                let value =
                    (state.connected, state.disconnected_at, state.overflowed, state.resync_at.is_some(), vec![]);
                out.devices.insert(key, value);
            }
            Record::Message { device, message, .. } => {
                out.devices.get_mut(&device).unwrap().4.push(message.entry.to_string())
            }
            Record::Idempotency { site, record } => {
                out.keys.insert((site, record.key), (record.fingerprint, record.expires_at));
            }
            Record::Ids { .. } => {}
        }
    }
    out
}

/// Random operations on the sled store and its in-memory twin in lockstep, then a crash at a
/// random step: the recovered sled store holds exactly what the twin held at the crash (a crash
/// image keeps what was written), and with the log cut anywhere past its last sync (what a power
/// cut may leave), what the twin held at some step since that sync.
#[tokio::test]
async fn sled_recovers_the_state_of_its_in_memory_twin_at_any_crash() {
    struct Dice(u64);
    impl Dice {
        fn below(&mut self, n: u64) -> u64 {
            self.0 = self.0.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
            (self.0 >> 33) % n
        }
    }
    let devs: Vec<DeviceKey> = (0..6).map(|i| dev(&format!("user_{}", i % 3), &format!("d{i}"))).collect();
    for seed in 0..24u64 {
        let mut dice = Dice(seed + 1);
        let every = [Duration::ZERO, Duration::MAX, Duration::from_millis(3)][seed as usize % 3];
        let dir = tempfile::tempdir().unwrap();
        let sled = SledStore::open_with(dir.path(), 1 << 20, 0, every).unwrap();
        let twin = MemoryStore::new();
        let steps = 20 + dice.below(60);
        let synced_at = dice.below(steps);
        let mut states = Vec::new();
        let mut log_at_sync = None;
        for step in 0..steps {
            let now = step * 100;
            let d = &devs[dice.below(6) as usize];
            let op = dice.below(10);
            let users: Vec<String> = (0..3).filter(|_| dice.below(2) == 0).map(|u| format!("user_{u}")).collect();
            let limits = QueueLimits { max_len: 1 + dice.below(4), max_bytes: 1_000 };
            let text = format!(r#"["e{}",{step}]"#, dice.below(2));
            let key =
                Idempotency { key: format!("k{}", dice.below(3)), fingerprint: dice.below(2), expires_at: now + 500 };
            let key = (dice.below(2) == 0).then_some(key);
            let room = ["staff", "Staff", "other"][dice.below(3) as usize].to_string();
            let pick = dice.below(4) as usize;
            let expiry = Expiry { now, ttl_ms: 700 };
            macro_rules! both {
                ($store:expr) => {{
                    let store = $store;
                    match op {
                        0..=2 => {
                            let out = store
                                .enqueue("site", users.clone(), entry(&text), expiry, limits, key.clone())
                                .await
                                .unwrap();
                            format!("{} {:?}", out.devices.len(), out.replay)
                        }
                        3 => {
                            let rooms = vec![d.user.to_string(), room.clone()];
                            let out = store.connect(d, &rooms, Some(3)).await;
                            format!(
                                "{:?}",
                                out.map(|c| (c.pending.len(), c.resync, c.forgotten)).map_err(|e| e.to_string())
                            )
                        }
                        4 => format!("{:?}", store.disconnect(d, now).await.unwrap()),
                        5 | 6 => {
                            let queue = store.pending(d).await.unwrap();
                            let acks = match queue.get(pick) {
                                Some(q) if op == 5 => {
                                    let checked = entry_event(&q.entry).map(Arc::from);
                                    vec![Ack::Live { device: d.clone(), id: q.id, checked }]
                                }
                                _ => vec![Ack::Batch {
                                    device: d.clone(),
                                    ids: queue.iter().take(pick).map(|q| q.id).collect(),
                                }],
                            };
                            format!("{}", store.acks(acks).await.unwrap().len())
                        }
                        7 => format!("{}", store.sweep(expiry).await.unwrap().len()),
                        8 => format!("{}", store.clear_queue(d).await.unwrap()),
                        _ => format!("{:?}", store.users_in_room("site", &room).await.unwrap().len()),
                    }
                }};
            }
            let (a, b) = (both!(&sled), both!(&twin));
            assert_eq!(a, b, "seed {seed}, step {step}, op {op}: the answers differ");
            states.push(canonical(&twin).await);
            if step == synced_at {
                sled.flush().await.unwrap();
                let image = crash_image(dir.path());
                log_at_sync = super::sled::wal_report(image.path()).unwrap().into_iter().max_by_key(|f| f.generation);
            }
        }
        let image = crash_image(dir.path());
        drop(sled);
        let recovered = SledStore::open(image.path(), 1 << 20, 0).unwrap();
        assert_eq!(canonical(&recovered).await, *states.last().unwrap(), "seed {seed}: after the crash");
        recovered.audit().await.unwrap();
        recovered.close().await;

        // A power cut: the active log file loses everything past its last sync from some byte on.
        let at_sync = log_at_sync.unwrap();
        let report = super::sled::wal_report(image.path()).unwrap();
        let active = report.iter().max_by_key(|f| f.generation).unwrap();
        if active.generation != at_sync.generation {
            continue; // a checkpoint started the files over since: the sync is in sled
        }
        let path = image.path().join(active.name);
        let mut bytes = std::fs::read(&path).unwrap();
        let cut = at_sync.end as usize + dice.below(active.end - at_sync.end + 1) as usize;
        bytes[cut..].iter_mut().for_each(|b| *b = 0);
        std::fs::write(&path, &bytes).unwrap();
        let cut_store = SledStore::open(image.path(), 1 << 20, 0).unwrap();
        let got = canonical(&cut_store).await;
        let fits = states[synced_at as usize..].contains(&got);
        assert!(fits, "seed {seed}: the log cut at {cut} (synced to {}) recovers no state since the sync", at_sync.end);
        cut_store.audit().await.unwrap();
        cut_store.close().await;
    }
}
