//! The import against a real `redis-server` filled in the old service's layout.

use super::*;
use crate::store::{MemoryStore, SledStore};

const HOUR_MS: u64 = 3_600_000;
const NOW: Millis = 1_750_000_000_000; // a past time: flake times from the future are not believed

fn config() -> Config {
    Config::from_toml(
        r#"
        [server]
        device_ttl_secs = 3600
        [sites.shop]
        api_key = "k1"
        auth_url = "http://127.0.0.1:9/auth"
        user_room_prefix = "user_"
        [sites.news]
        api_key = "k2"
        auth_url = "http://127.0.0.1:9/auth"
        user_room_prefix = "user_"
        "#,
    )
    .unwrap()
}

/// A flake id made at `at` (ms since 1970), as flake-idgen lays them out.
fn flake(at: Millis, seq: u64) -> u64 {
    (at << 22) | seq
}

/// Fills database `db` of the test Redis in the old layout; returns its URL.
fn fill(db: u32) -> String {
    let url = format!("redis+unix://{}?db={db}", crate::store::tests::redis_socket().display());
    let mut redis = ::redis::Client::open(url.as_str()).unwrap().get_connection().unwrap();
    let cmd = |args: &[&str]| {
        let mut c = ::redis::cmd(args[0]);
        for a in &args[1..] {
            c.arg(*a);
        }
        c
    };
    cmd(&["FLUSHDB"]).query::<()>(&mut redis).unwrap();
    let t = NOW - HOUR_MS;
    let push = |redis: &mut ::redis::Connection, key: &str, items: &[(u64, &str)]| {
        for (id, entry) in items {
            cmd(&["RPUSH", key, &format!("{id}:{entry}")]).query::<()>(redis).unwrap();
        }
    };
    // user_1's phone: two events interleaved in time; disconnected 10 minutes ago.
    push(
        &mut redis,
        "/shop:socket.io:user_1:phone:order",
        &[(flake(t, 1), r#"["order",{"id":1}]"#), (flake(t + 3, 0), r#"["order",{"id":2}]"#)],
    );
    push(
        &mut redis,
        "/shop:socket.io:user_1:phone:chat",
        &[(flake(t + 2, 0), r#"["chat","hi"]"#), (flake(t + 4, 0), r#"["chat","ü\n"]"#)],
    );
    for key in ["/shop:socket.io:user_1:phone:order", "/shop:socket.io:user_1:phone:chat"] {
        cmd(&["PEXPIRE", key, &(50 * 60_000).to_string()]).query::<()>(&mut redis).unwrap();
    }
    // user_1's browser (no deviceId), connected when the old service stopped: no TTL. It got
    // the first order too, under the same id.
    push(&mut redis, "/shop:socket.io:user_1::order", &[(flake(t, 1), r#"["order",{"id":1}]"#)]);
    // Another site, and one not configured.
    push(&mut redis, "/news:socket.io:user_7:tablet:news", &[(flake(t, 5), r#"["news",null]"#)]);
    push(&mut redis, "/gone:socket.io:user_7:tablet:news", &[(flake(t, 6), r#"["news",1]"#)]);
    // Keys that cannot be split without guessing, an item that is not <id>:<JSON>, a non-list.
    push(&mut redis, "/shop:socket.io:user_2:a:b:news", &[(flake(t, 7), r#"["news",1]"#)]);
    cmd(&["RPUSH", "/shop:socket.io:user_3:pad:news", "garbage"]).query::<()>(&mut redis).unwrap();
    push(&mut redis, "/shop:socket.io:user_3:pad:news", &[(flake(t, 8), r#"["news",2]"#)]);
    cmd(&["SET", "/shop:socket.io:user_4:pad:news", "x"]).query::<()>(&mut redis).unwrap();
    url
}

async fn entries(store: &dyn Store, user: &str, device: &str) -> Vec<String> {
    let queued = store.pending(&DeviceKey::new("shop", user, device)).await.unwrap();
    queued.iter().map(|q| q.entry.to_string()).collect()
}

async fn imports_the_old_queues(store: &dyn Store, db: u32) {
    let url = fill(db);
    let report = import(&config(), &url, store, NOW).await.unwrap();
    assert_eq!(report.sites["shop"], SiteReport { devices: 3, messages: 6, disconnected: 1 });
    assert_eq!(report.sites["news"], SiteReport { devices: 1, messages: 1, disconnected: 0 });
    assert_eq!(report.other_sites, BTreeMap::from([("gone".to_string(), 1)]));
    assert_eq!(report.left.len(), 3, "{:?}", report.left);
    assert!(report.left[0].starts_with("/shop:socket.io:user_2:a:b:news: cannot be split"), "{:?}", report.left);
    assert!(report.left[1].contains("user_3:pad:news: an item is not <id>:<JSON>: garbage"), "{:?}", report.left);
    assert!(report.left[2].contains("user_4:pad:news: a string, not a list"), "{:?}", report.left);

    // Send order across events; the message of both devices kept once.
    let phone = [r#"["order",{"id":1}]"#, r#"["chat","hi"]"#, r#"["order",{"id":2}]"#, "[\"chat\",\"ü\\n\"]"];
    assert_eq!(entries(store, "user_1", "phone").await, phone);
    assert_eq!(entries(store, "user_1", "").await, [r#"["order",{"id":1}]"#]);
    let state = store.device(&DeviceKey::new("shop", "user_1", "phone")).await.unwrap().unwrap();
    assert!(!state.connected);
    // As long ago as its TTL had run (give or take the moments the test took).
    let since = NOW - state.disconnected_at;
    assert!((10 * 60_000..10 * 60_000 + 5_000).contains(&since), "disconnected {since} ms before");
    let browser = store.device(&DeviceKey::new("shop", "user_1", "")).await.unwrap().unwrap();
    assert_eq!(browser.disconnected_at, NOW, "connected at the stop: its clock starts at the import");
    let queued = store.pending(&DeviceKey::new("shop", "user_1", "phone")).await.unwrap();
    assert_eq!(queued[0].queued_at, NOW - HOUR_MS, "the time is the flake id's");

    // Ids given out later are above the imported ones: a new message goes last.
    let out = store
        .enqueue(
            "shop",
            vec!["user_1".into()],
            "[\"new\"]".into(),
            crate::store::Expiry { now: NOW, ttl_ms: HOUR_MS },
            Default::default(),
            None,
        )
        .await
        .unwrap();
    assert_eq!(out.devices.len(), 2);
    assert_eq!(entries(store, "user_1", "phone").await.last().unwrap(), "[\"new\"]");

    // Again: nothing new.
    let again = import(&config(), &url, store, NOW + 1).await.unwrap();
    assert_eq!(again.loaded.written, 0, "{:?}", again.loaded);
    assert_eq!(entries(store, "user_1", "phone").await.len(), 5);
}

#[tokio::test]
async fn imports_the_old_queues_into_memory() {
    imports_the_old_queues(&MemoryStore::new(), 1).await;
}

#[tokio::test]
async fn imports_the_old_queues_into_sled() {
    let dir = tempfile::tempdir().unwrap();
    let store = SledStore::open(dir.path(), 1 << 20, 0).unwrap();
    imports_the_old_queues(&store, 2).await;
    store.audit().await.unwrap();
}

#[test]
fn keys_split_only_when_unambiguous() {
    assert_eq!(split_key("/shop:socket.io:user_1:phone:order"), Some(("shop", "user_1", "phone", "order")));
    assert_eq!(split_key("/shop:socket.io:user_1::order"), Some(("shop", "user_1", "", "order")));
    assert_eq!(split_key("/a:b:socket.io:user_1:d:e"), Some(("a:b", "user_1", "d", "e")));
    for bad in
        ["/shop:socket.io:user_1:a:b:order", "shop:socket.io:u:d:e", "/shop:socket.io:u:d", "/shop:socket.io::d:e"]
    {
        assert_eq!(split_key(bad), None, "{bad}");
    }
    assert_eq!(split_item(b"42:[\"e\",1]"), Some((42, "[\"e\",1]".into())));
    assert_eq!(split_item(b"42:{}"), None);
    assert_eq!(split_item(b"x:[1]"), None);
    assert_eq!(flake_time(flake(NOW, 3)), Some(NOW));
    assert_eq!(flake_time(7), None);
}
