//! What only the Redis store has: several nodes on one Redis, their heartbeats, and the
//! bookkeeping the scripts keep (references, counts, indexes), audited after concurrent changes.

use std::collections::{BTreeMap, HashMap};

use redis::AsyncCommands;

use super::*;
use crate::store::tests::{redis_cluster_store_on, redis_cluster_urls, redis_store, redis_store_on};

impl RedisStore {
    /// Recounts one site from its keys and compares with what the scripts keep: the totals, each
    /// device's bytes, the references of shared messages, the event index, the disconnected and
    /// connected indexes.
    pub(crate) async fn audit(&self, site: &str) -> Result<(), String> {
        let tag = self.tag(site);
        let mut conn = self.conn();
        let keys: Vec<String> = conn.keys(format!("{tag}:*")).await.map_err(|e| e.to_string())?;
        let (mut devices, mut connected, mut messages, mut bytes) = (0u64, 0u64, 0u64, 0u64);
        let mut refs = HashMap::<String, i64>::new();
        let mut events = 0usize;
        for key in &keys {
            let rest = &key[tag.len() + 1..];
            if let Some(user) = rest.strip_prefix("u:") {
                let read = self.describe(&tag, user, &[]).await.map_err(|e| e.to_string())?;
                for seen in &read.devices {
                    devices += 1;
                    let dkey = dk(user, &seen.device);
                    let in_t: Option<f64> = conn.zscore(format!("{tag}:t"), &dkey).await.map_err(|e| e.to_string())?;
                    if seen.record.connected {
                        connected += 1;
                        let member: bool = conn
                            .sismember(format!("{tag}:cn:{}", seen.record.node), &dkey)
                            .await
                            .map_err(|e| e.to_string())?;
                        if !member || in_t.is_some() {
                            return Err(format!("{dkey}: connected but indexed wrong"));
                        }
                    } else if in_t != Some(seen.record.disconnected_at as f64) {
                        return Err(format!(
                            "{dkey}: disconnected at {} but indexed {in_t:?}",
                            seen.record.disconnected_at
                        ));
                    }
                    let entries: BTreeMap<String, String> =
                        conn.hgetall(format!("{tag}:qv:{dkey}")).await.map_err(|e| e.to_string())?;
                    let ids: Vec<String> =
                        conn.zrange(format!("{tag}:q:{dkey}"), 0, -1).await.map_err(|e| e.to_string())?;
                    if ids.len() != entries.len() || seen.state.queue_len != ids.len() as u64 {
                        return Err(format!("{dkey}: {} ids, {} entries", ids.len(), entries.len()));
                    }
                    let mut sum = 0;
                    for (id, value) in &entries {
                        let size: u64 = value[1..].split(',').next().and_then(|s| s.parse().ok()).unwrap_or(0);
                        sum += size;
                        if value.starts_with('s') {
                            *refs.entry(id.clone()).or_default() += 1;
                        }
                        let event_start = value.find(':').map(|i| i + 1).unwrap_or(0);
                        let event_len: usize = value[..event_start - 1].rsplit(',').next().unwrap().parse().unwrap();
                        let event = &value[event_start..event_start + event_len];
                        let indexed: Option<f64> =
                            conn.zscore(format!("{tag}:e:{dkey}{event}"), id).await.map_err(|e| e.to_string())?;
                        if indexed.is_none() {
                            return Err(format!("{dkey}: {id} missing from the index of {event:?}"));
                        }
                        events += 1;
                    }
                    if sum != seen.state.queue_bytes {
                        return Err(format!("{dkey}: {sum} bytes queued, {} counted", seen.state.queue_bytes));
                    }
                    messages += ids.len() as u64;
                    bytes += sum;
                }
            }
        }
        let indexed: usize = {
            let mut n = 0;
            for key in keys.iter().filter(|k| k[tag.len() + 1..].starts_with("e:")) {
                n += conn.zcard::<_, usize>(key).await.map_err(|e| e.to_string())?;
            }
            n
        };
        if indexed != events {
            return Err(format!("{indexed} ids in event indexes, {events} queued"));
        }
        let counted: BTreeMap<String, i64> = conn.hgetall(format!("{tag}:n")).await.map_err(|e| e.to_string())?;
        let bodies: i64 = conn.hlen(format!("{tag}:b")).await.map_err(|e| e.to_string())?;
        if counted != refs.clone().into_iter().collect::<BTreeMap<_, _>>() || bodies != refs.len() as i64 {
            return Err(format!("references {counted:?} ({bodies} bodies), queues refer {refs:?}"));
        }
        let totals: BTreeMap<String, u64> = conn.hgetall(format!("{tag}:totals")).await.map_err(|e| e.to_string())?;
        let get = |k: &str| totals.get(k).copied().unwrap_or(0);
        let kept = (get("devices"), get("connected"), get("queued_messages"), get("queued_bytes"));
        if kept != (devices, connected, messages, bytes) {
            return Err(format!("totals {kept:?}, recounted {:?}", (devices, connected, messages, bytes)));
        }
        Ok(())
    }
}

/// A message to `user_1` of `site`, with the default caps and no expiry.
async fn send_one(store: &RedisStore, entry: &str) -> Result<Enqueued, StoreError> {
    let now = Expiry { now: 0, ttl_ms: 0 };
    store.enqueue("site", vec!["user_1".into()], entry.into(), now, QueueLimits::default(), None).await
}

fn prefix(name: &str) -> String {
    format!("test{}-{name}", std::process::id())
}

fn devs(site: &str, n: usize) -> Vec<DeviceKey> {
    (0..n).map(|i| DeviceKey::new(site, &format!("user_{}", i % 7), &format!("d{i}"))).collect()
}

/// Two nodes send, ack, clear, connect and disconnect at once on one site, round after round:
/// every change lands exactly once and the bookkeeping stays exact.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_nodes_changing_one_site_at_once_keep_it_exact() {
    let prefix = prefix("two-nodes");
    let nodes = [redis_store_on(&prefix).await, redis_store_on(&prefix).await];
    change_at_once(&nodes, "site", 40).await;
}

/// The same on a Redis Cluster of three primaries, on three sites at once whose hash slots are
/// on different primaries: the scripts find every key of a site on its slot's primary.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_nodes_on_a_redis_cluster_keep_every_site_exact() {
    let prefix = prefix("cluster");
    let nodes = [redis_cluster_store_on(&prefix).await, redis_cluster_store_on(&prefix).await];
    let sites = sites_on_each_primary(&prefix).await;
    futures_util::future::join_all(sites.iter().map(|site| change_at_once(&nodes, site, 15))).await;
    for url in redis_cluster_urls() {
        let mut conn = redis::Client::open(url.as_str()).unwrap().get_multiplexed_async_connection().await.unwrap();
        let keys: Vec<String> = conn.keys(format!("{{{prefix}:*")).await.unwrap();
        assert!(!keys.is_empty(), "{url} holds none of the sites");
    }
}

/// A site name for each primary of the test cluster, whose keys under `prefix` it holds.
async fn sites_on_each_primary(prefix: &str) -> Vec<String> {
    let mut conn = redis::Client::open(redis_cluster_urls()[0].as_str())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    // [[first slot, last slot, [host, port, ..], ..], ..]: the primary's port names it.
    let ranges: Vec<Vec<Value>> = redis::cmd("CLUSTER").arg("SLOTS").query_async(&mut conn).await.unwrap();
    let owner = |slot: i64| {
        ranges.iter().find_map(|r| {
            let (first, last) = (number(&r[0]) as i64, number(&r[1]) as i64);
            (first..=last).contains(&slot).then(|| format!("{:?}", items(r[2].clone()).get(1)))
        })
    };
    let mut found = BTreeMap::new();
    for n in 0..200 {
        let site = format!("site{n}");
        let slot: i64 = redis::cmd("CLUSTER")
            .arg("KEYSLOT")
            .arg(format!("{{{prefix}:{site}}}"))
            .query_async(&mut conn)
            .await
            .unwrap();
        found.entry(owner(slot).expect("every slot has a primary")).or_insert(site);
    }
    assert_eq!(found.len(), 3, "three primaries");
    found.into_values().collect()
}

async fn change_at_once(nodes: &[RedisStore; 2], site: &str, rounds: usize) {
    let devs = devs(site, 20);
    for (i, d) in devs.iter().enumerate() {
        nodes[i % 2].connect(d, &[d.user.to_string(), "staff".into()], None).await.unwrap();
    }
    let users: Vec<String> = (0..7).map(|i| format!("user_{i}")).collect();
    let now = Expiry { now: 0, ttl_ms: 0 };
    for round in 0..rounds {
        let limits = QueueLimits { max_len: 6, max_bytes: 1 << 20 };
        let sends = (0..20).map(|i| {
            let (node, users) = (&nodes[i % 2], users[..(i % 7) + 1].to_vec());
            async move {
                // Several in a row, so that sends overlap the other changes, not only precede them.
                for n in 0..3 {
                    let entry = format!("[\"e{}\",{round},{n}]", (i + n) % 3);
                    node.enqueue(site, users.clone(), entry.into(), now, limits, None).await.unwrap();
                }
            }
        });
        let others = devs.iter().enumerate().map(|(i, d)| {
            let node = &nodes[(i + round) % 2];
            async move {
                let pending = node.pending(d).await.unwrap();
                match (i + round) % 5 {
                    0 => {
                        node.clear_queue(d).await.unwrap();
                    }
                    1 => {
                        node.disconnect(d, round as u64).await.unwrap();
                        node.connect(d, &[d.user.to_string()], Some(50)).await.unwrap();
                    }
                    2 => {
                        if let Some(q) = pending.get(1) {
                            let event = entry_event(&q.entry).unwrap();
                            let ack = Ack::Live { device: d.clone(), id: q.id, checked: Some(event.into()) };
                            node.acks(vec![ack]).await.unwrap();
                        }
                    }
                    _ => {
                        let ids = pending.iter().map(|q| q.id).step_by(2).collect();
                        node.acks(vec![Ack::Batch { device: d.clone(), ids }]).await.unwrap();
                    }
                }
            }
        });
        futures_util::future::join(futures_util::future::join_all(sends), futures_util::future::join_all(others)).await;
        nodes[0].audit(site).await.unwrap_or_else(|e| panic!("{site} round {round}: {e}"));
    }
    let stats = nodes[1].stats().await.unwrap();
    assert_eq!(stats[site].devices, 20);
}

/// The newest socket of a device wins across nodes: the older node's disconnect changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_newest_socket_wins_across_nodes() {
    let prefix = prefix("takeover");
    let (a, b) = (redis_store_on(&prefix).await, redis_store_on(&prefix).await);
    let d = DeviceKey::new("site", "user_1", "phone");
    for round in 0..50 {
        a.connect(&d, &["user_1".into()], None).await.unwrap();
        b.connect(&d, &["user_1".into()], None).await.unwrap();
        a.disconnect(&d, round).await.unwrap();
        assert!(b.device(&d).await.unwrap().unwrap().connected, "round {round}");
        b.disconnect(&d, round + 1).await.unwrap();
        let state = a.device(&d).await.unwrap().unwrap();
        assert_eq!((state.connected, state.disconnected_at), (false, round + 1));
    }
    a.audit("site").await.unwrap();
}

/// A node that stops (its heartbeat lapses) leaves no device connected: the next sweep of any
/// node marks them disconnected, and they expire from then on.
#[tokio::test]
async fn a_dead_nodes_devices_are_disconnected_by_the_sweep() {
    let prefix = prefix("dead-node");
    let (dead, alive) = (redis_store_on(&prefix).await, redis_store_on(&prefix).await);
    let d = DeviceKey::new("site", "user_1", "phone");
    dead.connect(&d, &["user_1".into()], None).await.unwrap();
    let node = dead.node().to_owned();
    drop(dead);
    let expiry = Expiry { now: 1_000, ttl_ms: 500 };
    assert!(alive.sweep(expiry).await.unwrap().is_empty());
    assert!(alive.device(&d).await.unwrap().unwrap().connected, "its heartbeat has not lapsed yet");
    let _: () = alive.conn().del(format!("{prefix}:alive:{node}")).await.unwrap();
    assert!(alive.sweep(expiry).await.unwrap().is_empty(), "disconnected now, not expired yet");
    let state = alive.device(&d).await.unwrap().unwrap();
    assert_eq!((state.connected, state.disconnected_at), (false, 1_000));
    assert_eq!(alive.sweep(Expiry { now: 1_501, ttl_ms: 500 }).await.unwrap(), vec![d]);
    alive.audit("site").await.unwrap();
    let lock: Option<String> = alive.conn().get(format!("{}:sweep", alive.tag("site"))).await.unwrap();
    assert_eq!(lock, None, "the sweep let its lock go");
    // Another node's lock stays.
    let _: () = alive.conn().set(format!("{}:sweep", alive.tag("site")), "another").await.unwrap();
    alive.sweep(Expiry { now: 1_600, ttl_ms: 500 }).await.unwrap();
    let lock: Option<String> = alive.conn().get(format!("{}:sweep", alive.tag("site"))).await.unwrap();
    assert_eq!(lock.as_deref(), Some("another"));
}

/// A store whose Redis is gone answers `Unavailable` within its timeout and reports itself not
/// open; it never hangs.
#[tokio::test]
async fn an_unreachable_redis_fails_fast_and_shows() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("redis+unix://{}", dir.path().join("nothing.sock").display());
    let options = RedisOptions {
        target: Target { urls: vec![url], cluster: false, timeout: Duration::from_millis(500) },
        prefix: prefix("gone"),
        wait_replicas: 0,
    };
    let store = RedisStore::open(options).await.unwrap();
    let d = DeviceKey::new("site", "user_1", "phone");
    let started = std::time::Instant::now();
    let out = store.connect(&d, &[], None).await;
    assert!(matches!(out, Err(StoreError::Unavailable(_))), "{out:?}");
    let out = send_one(&store, "[1]").await;
    assert!(matches!(out, Err(StoreError::Unavailable(_))), "{out:?}");
    assert!(started.elapsed() < Duration::from_secs(10), "{:?}", started.elapsed());
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(!store.is_open());
}

/// The conformance store is what `redis_store` gives; this checks the audit itself fails on a
/// broken count, so that the tests above can fail.
#[tokio::test]
async fn the_audit_sees_a_wrong_count() {
    let store = redis_store().await;
    let d = DeviceKey::new("site", "user_1", "phone");
    store.connect(&d, &["user_1".into()], None).await.unwrap();
    send_one(&store, "[1]").await.unwrap();
    store.audit("site").await.unwrap();
    let _: () = store.conn().hincr(format!("{}:totals", store.tag("site")), "queued_bytes", 1).await.unwrap();
    assert!(store.audit("site").await.is_err());
}

#[test]
fn device_key_parts_come_back_whatever_they_hold() {
    for (user, device) in [("u", "d"), ("", ""), ("a:1b", "2:c"), ("12:x", ":"), ("ü", "ß")] {
        assert_eq!(parse_dk(&dk(user, device)), Some((user, device)));
    }
    assert_eq!(parse_dk("5:ab"), None);
}

/// A script given a version that is no longer current writes nothing and says so: the check
/// every operation relies on across nodes.
#[tokio::test]
async fn a_stale_read_is_refused_by_the_script() {
    let store = redis_store().await;
    let d = DeviceKey::new("site", "user_1", "phone");
    store.connect(&d, &["user_1".into()], None).await.unwrap();
    let tag = store.tag("site");
    let stale = store.describe(&tag, "user_1", &[]).await.unwrap().version;
    store.connect(&DeviceKey::new("site", "user_1", "tablet"), &["user_1".into()], None).await.unwrap();
    let args = ["user_1", "phone", stale.as_str(), r#"{"c":false,"d":5}"#, store.node(), "5"];
    assert!(is_changed(&store.run(&store.scripts.disconnect, &tag, &args).await.unwrap()));
    assert!(store.device(&d).await.unwrap().unwrap().connected, "nothing written");
    let current = store.describe(&tag, "user_1", &[]).await.unwrap().version;
    let args = ["user_1", "phone", current.as_str(), r#"{"c":false,"d":5}"#, store.node(), "5"];
    assert!(!is_changed(&store.run(&store.scripts.disconnect, &tag, &args).await.unwrap()));
    assert!(!store.device(&d).await.unwrap().unwrap().connected);
    store.audit("site").await.unwrap();
}

/// For a connected device, each message names the newest one its queue held before it (what
/// the node holding its socket waits for); a disconnected device's messages name none.
#[tokio::test]
async fn each_message_names_the_one_it_follows_for_connected_devices() {
    let store = redis_store().await;
    let (on, off) = (DeviceKey::new("site", "user_1", "on"), DeviceKey::new("site", "user_1", "off"));
    store.connect(&on, &["user_1".into()], None).await.unwrap();
    store.connect(&off, &["user_1".into()], None).await.unwrap();
    store.disconnect(&off, 1).await.unwrap();
    let mut previous = 0;
    for n in 0..5 {
        let out = send_one(&store, &format!("[\"e\",{n}]")).await.unwrap();
        let follows: BTreeMap<&DeviceKey, MessageId> = out.devices.iter().zip(out.follows.iter().copied()).collect();
        assert_eq!((follows[&on], follows[&off]), (previous, 0), "message {n}");
        previous = out.id;
    }
    let acked = store.pending(&on).await.unwrap().last().unwrap().id;
    store.acks(vec![Ack::Batch { device: on.clone(), ids: vec![acked] }]).await.unwrap();
    let out = send_one(&store, "[\"e\"]").await.unwrap();
    let at = out.devices.iter().position(|d| *d == on).unwrap();
    assert!(out.follows[at] < acked, "the newest still queued");
}

/// Queues longer than a script's chunk of arguments are read, acked and forgotten whole.
#[tokio::test]
async fn long_queues_are_read_acked_and_forgotten_in_chunks() {
    let store = redis_store().await;
    let (a, b) = (DeviceKey::new("site", "user_1", "a"), DeviceKey::new("site", "user_1", "b"));
    for d in [&a, &b] {
        store.connect(d, &["user_1".into()], None).await.unwrap();
    }
    for n in 0..2_500 {
        send_one(&store, &format!("[\"e{}\",{n}]", n % 3)).await.unwrap();
    }
    let queued = store.pending(&a).await.unwrap();
    assert_eq!(queued.len(), 2_500);
    assert!(queued.windows(2).all(|w| w[0].id < w[1].id), "oldest first");
    let mut ids: Vec<MessageId> = queued.iter().map(|q| q.id).collect();
    ids.extend(ids.clone()); // an id named twice is removed once
    store.acks(vec![Ack::Batch { device: a.clone(), ids }]).await.unwrap();
    assert!(store.pending(&a).await.unwrap().is_empty());
    assert_eq!(store.pending(&b).await.unwrap().len(), 2_500, "the other device's copies stay");
    store.audit("site").await.unwrap();
    assert_eq!(store.clear_queue(&b).await.unwrap(), 2_500);
    store.audit("site").await.unwrap();
    let stats = store.stats().await.unwrap();
    assert_eq!((stats["site"].queued_messages, stats["site"].queued_bytes), (0, 0));
}

/// A `redis-server` on a loopback port for one test, killed when dropped.
struct OwnRedis {
    child: std::process::Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl OwnRedis {
    fn start(extra: &[&str]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let binary = std::env::var("REDIS_SERVER").unwrap_or_else(|_| "redis-server".into());
        let child = std::process::Command::new(binary)
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--dir"])
            .arg(dir.path())
            .args(extra)
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("redis-server starts");
        for _ in 0..500 {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Self { child, port, _dir: dir }
    }
}

impl Drop for OwnRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// With `wait_replicas`, a message counts as stored once a replica has it: while the replica
/// answers, sends succeed; once it is gone, they fail with the reason, within the timeout.
#[tokio::test]
async fn with_wait_replicas_a_send_waits_for_the_replica() {
    let primary = OwnRedis::start(&[]);
    let replica = OwnRedis::start(&["--replicaof", "127.0.0.1", &primary.port.to_string()]);
    let options = RedisOptions {
        target: Target {
            urls: vec![format!("redis://127.0.0.1:{}/", primary.port)],
            cluster: false,
            // Generous: a loaded test machine may take a while to pass an ack along.
            timeout: Duration::from_millis(4_000),
        },
        prefix: prefix("replicas"),
        wait_replicas: 1,
    };
    let store = RedisStore::open(options).await.unwrap();
    let d = DeviceKey::new("site", "user_1", "phone");
    // The replica's first sync takes a moment: until then WAIT counts none.
    let mut synced = false;
    for _ in 0..10 {
        if store.connect(&d, &["user_1".into()], None).await.is_ok() {
            synced = true;
            break;
        }
    }
    assert!(synced, "a connect succeeds once the replica has synced");
    let send = || send_one(&store, "[\"e\"]");
    for _ in 0..20 {
        send().await.unwrap();
    }
    drop(replica);
    let started = std::time::Instant::now();
    let out = send().await;
    assert!(matches!(&out, Err(StoreError::Unavailable(reason)) if reason.contains("0 of 1 replicas")), "{out:?}");
    assert!(started.elapsed() < Duration::from_secs(8), "within the timeout: {:?}", started.elapsed());
}

/// A node whose Redis stops answering is unready from the first failed operation (so it refuses
/// connects at once), not from its next heartbeat; and ready again once Redis answers.
#[tokio::test]
async fn the_first_failed_operation_makes_the_node_unready() {
    let redis = OwnRedis::start(&[]);
    let port = redis.port;
    let options = RedisOptions {
        target: Target {
            urls: vec![format!("redis://127.0.0.1:{port}/")],
            cluster: false,
            timeout: Duration::from_millis(500),
        },
        prefix: prefix("unready"),
        wait_replicas: 0,
    };
    let store = RedisStore::open(options).await.unwrap();
    assert!(store.is_open(), "the first heartbeat ran before open returned");
    send_one(&store, "[1]").await.unwrap();
    drop(redis);
    assert!(matches!(send_one(&store, "[2]").await, Err(StoreError::Unavailable(_))));
    assert!(!store.is_open(), "unready at once");
    let _again = OwnRedis::start(&["--port", &port.to_string()]);
    let mut back = false;
    for _ in 0..50 {
        if send_one(&store, "[3]").await.is_ok() {
            back = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(back && store.is_open(), "ready again once Redis answers");
}
