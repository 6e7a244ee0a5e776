//! `RedisStore`: the store on Redis, shared by any number of sio-push nodes.
//!
//! Each operation reads what the rules need (a user room's devices with the room's version, the
//! ids of an event's queued messages, an idempotency record), applies the rules of `rules.rs` in
//! Rust, and hands the outcome to one Lua script, which writes it only if what was read is still
//! current, else answers `changed` and the operation reads again (at most [`TRIES`] times). So the
//! rules are written once, and every change is atomic across nodes. The one rule a script runs
//! itself is the trim of a full queue (`QueueLimits::exceeded`), which must happen inside the
//! append; the conformance suite checks it on every backend.
//!
//! Every key of a site carries the hash tag `{prefix:site}`, so one site lives in one hash slot
//! and a Redis Cluster serves the sites from all its primaries. The layout (docs/redis.md):
//!
//! | key | type | holds |
//! |---|---|---|
//! | `T:ids` | string | the last message id |
//! | `T:ver` | string | the last version given to a user room |
//! | `T:u:<user>` | hash | `v`: the room's version; `d<device>`: the device's record (JSON) |
//! | `T:rl:<user>` / `T:r:<room>` | set / set | the user's lowercased rooms / the users of a room |
//! | `T:q:<dev>` / `T:qv:<dev>` | sorted set / hash | queued ids / id -> entry (see `lua/lib.lua`) |
//! | `T:e:<dev><event>` | sorted set | the queued ids of one event (the `resync` check) |
//! | `T:b` / `T:n` | hash / hash | id -> a message for several devices / its references |
//! | `T:qb`, `T:of`, `T:rs` | hash | device -> queued bytes / overflowed / owed resync number |
//! | `T:k` / `T:kx` | hash / sorted set | idempotency key -> fingerprint:expiry / keys by expiry |
//! | `T:t` | sorted set | disconnected devices by time, for the sweep |
//! | `T:cn:<node>` / `T:nodes` | set / set | devices whose socket is on a node / those nodes |
//! | `T:totals` | hash | devices, connected, queued messages and bytes |
//! | `P:sites`, `P:alive:<node>` | set, string | the sites; a node's heartbeat (expires) |
//!
//! `<dev>` is `len(user):user` `len(device):device`. A node's id is random per process; its
//! heartbeat lapses when it dies, and the sweep then marks its devices disconnected.

mod conn;

use std::collections::{BTreeMap, HashSet};
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use redis::{AsyncCommands, Script, Value};

pub use self::conn::{once_more_if_unsent, Conn, Target};
use super::{
    devices_to_forget, entry_event, in_order, Ack, Connected, DeviceInfo, DeviceKey, DeviceState, Enqueued, Expiry,
    Idempotency, InOrder, Loaded, MessageId, Millis, QueueLimits, Queued, Record, Resync, SiteStats, Store, StoreError,
};

/// How often an operation reads again after another node changed what it read.
const TRIES: usize = 64;
/// How many devices or keys the sweep takes per step.
const SWEEP_STEP: isize = 1000;
/// How long a node's heartbeat lives; it is refreshed every third of it.
const HEARTBEAT: Duration = Duration::from_secs(6);

/// How the store uses Redis (`[store]` in the config).
#[derive(Clone, Debug)]
pub struct RedisOptions {
    /// Where Redis is.
    pub target: Target,
    /// Prefix of every key, so that several services can share one Redis.
    pub prefix: String,
    /// Replicas that must have a write before it counts as durable (`WAIT`); 0: the primary's
    /// reply suffices.
    pub wait_replicas: u32,
}

/// The Lua scripts, each with `lua/lib.lua` in front.
struct Scripts {
    connect: Script,
    disconnect: Script,
    enqueue: Script,
    remove: Script,
    clear_event: Script,
    forget: Script,
    describe: Script,
    pending: Script,
    settle_resync: Script,
    expire_keys: Script,
    drop_node: Script,
    load: Script,
}

/// A script: `lua/lib.lua`, then the script's body run as a function, so that the counts its
/// removals changed are written (`flush`) after whichever `return` it ends at.
macro_rules! script {
    ($name:literal) => {
        Script::new(concat!(
            include_str!("lua/lib.lua"),
            "local function main()\n",
            include_str!(concat!("lua/", $name, ".lua")),
            "\nend\nlocal out = main()\nflush()\nreturn out\n"
        ))
    };
}

impl Scripts {
    fn new() -> Self {
        Self {
            connect: script!("connect"),
            disconnect: script!("disconnect"),
            enqueue: script!("enqueue"),
            remove: script!("remove"),
            clear_event: script!("clear_event"),
            forget: script!("forget"),
            describe: script!("describe"),
            pending: script!("pending"),
            settle_resync: script!("settle_resync"),
            expire_keys: script!("expire_keys"),
            drop_node: script!("drop_node"),
            load: script!("load"),
        }
    }
}

/// The store on Redis. Dropping it stops its heartbeat.
pub struct RedisStore {
    conn: Conn,
    prefix: String,
    node: String,
    wait_replicas: u32,
    timeout: Duration,
    scripts: Arc<Scripts>,
    healthy: Arc<AtomicBool>,
    sites: Mutex<HashSet<String>>,
    heartbeat: tokio::task::JoinHandle<()>,
}

impl Drop for RedisStore {
    fn drop(&mut self) {
        self.heartbeat.abort();
    }
}

/// What the store keeps about a device in its user room's hash.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
struct DeviceRecord {
    #[serde(rename = "c")]
    connected: bool,
    #[serde(rename = "d")]
    disconnected_at: Millis,
    /// The node holding its newest socket, while connected.
    #[serde(rename = "n", default, skip_serializing_if = "String::is_empty")]
    node: String,
}

/// One device as `describe` read it.
struct Seen {
    device: String,
    record: DeviceRecord,
    state: DeviceState,
    oldest: Option<Millis>,
}

/// A user room as read: its version and devices.
struct UserRead {
    version: String,
    devices: Vec<Seen>,
}

impl UserRead {
    fn get(&self, device: &str) -> Option<&Seen> {
        self.devices.iter().find(|d| d.device == device)
    }
}

fn unavailable(e: redis::RedisError) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

fn contended() -> StoreError {
    StoreError::Unavailable(format!("the data changed under {TRIES} tries in a row"))
}

/// A reply item as text (scripts answer numbers and strings).
fn text(v: &Value) -> String {
    match v {
        Value::BulkString(b) => String::from_utf8_lossy(b).into_owned(),
        Value::Int(n) => n.to_string(),
        Value::SimpleString(s) => s.clone(),
        Value::Okay => "OK".into(),
        _ => String::new(),
    }
}

fn number(v: &Value) -> u64 {
    text(v).parse().unwrap_or(0)
}

fn is_changed(v: &Value) -> bool {
    match v {
        Value::Array(items) => items.first().map(text).as_deref() == Some("changed"),
        other => text(other) == "changed",
    }
}

fn items(v: Value) -> Vec<Value> {
    match v {
        Value::Array(items) => items,
        _ => Vec::new(),
    }
}

/// The key part of one device, as `lua/lib.lua` builds it.
fn dk(user: &str, device: &str) -> String {
    format!("{}:{user}{}:{device}", user.len(), device.len())
}

/// Splits a device key part back into user and device.
fn parse_dk(dk: &str) -> Option<(&str, &str)> {
    let split = |s: &str| -> Option<(usize, usize)> {
        let colon = s.find(':')?;
        Some((colon + 1, s[..colon].parse().ok()?))
    };
    let (start, len) = split(dk)?;
    let user = dk.get(start..start + len)?;
    let rest = &dk[start + len..];
    let (start, len) = split(rest)?;
    Some((user, rest.get(start..start + len)?))
}

fn queued(triples: &[Value]) -> Vec<Queued> {
    triples
        .chunks_exact(3)
        .map(|t| Queued { id: number(&t[0]), queued_at: number(&t[1]), entry: Arc::from(text(&t[2])) })
        .collect()
}

fn new_node_id() -> String {
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u32(std::process::id());
    hasher
        .write_u128(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos());
    format!("{:016x}", hasher.finish())
}

impl RedisStore {
    /// Connects and starts the node's heartbeat. A plain server may be down at this point: the
    /// store then reports itself closed until it answers.
    pub async fn open(options: RedisOptions) -> Result<Self, StoreError> {
        let conn = Conn::open(&options.target).await.map_err(unavailable)?;
        let node = new_node_id();
        let alive = format!("{}:alive:{node}", options.prefix);
        // The first beat before serving, so that a node whose Redis answers is open at once.
        let first = beat(&mut conn.clone(), &alive).await;
        if let Err(e) = &first {
            tracing::error!(error = %e, "Redis is unreachable: the node is not ready until it answers");
        }
        let healthy = Arc::new(AtomicBool::new(first.is_ok()));
        let heartbeat = tokio::spawn(heartbeat(conn.clone(), alive, healthy.clone()));
        Ok(Self {
            conn,
            prefix: options.prefix,
            node,
            wait_replicas: options.wait_replicas,
            timeout: options.target.timeout,
            scripts: Arc::new(Scripts::new()),
            healthy,
            sites: Mutex::new(HashSet::new()),
            heartbeat,
        })
    }

    /// This node's id (random per process).
    pub fn node(&self) -> &str {
        &self.node
    }

    fn tag(&self, site: &str) -> String {
        format!("{{{}:{site}}}", self.prefix)
    }

    fn sites_key(&self) -> String {
        format!("{}:sites", self.prefix)
    }

    fn conn(&self) -> Conn {
        self.conn.clone()
    }

    /// Runs a script on a site's slot.
    async fn run(&self, script: &Script, tag: &str, args: &[&str]) -> Result<Value, StoreError> {
        let mut call = script.key(format!("{tag}:ids"));
        call.arg(tag);
        for a in args {
            call.arg(*a);
        }
        let out = once_more_if_unsent(|| async { call.invoke_async(&mut self.conn()).await }).await;
        if out.is_ok() {
            self.healthy.store(true, Ordering::Relaxed);
        }
        out.map_err(|e| self.failed(e))
    }

    /// The error as the store's; a Redis that does not answer makes the node unready (and refuse
    /// connects) at once, not at the next heartbeat.
    fn failed(&self, e: redis::RedisError) -> StoreError {
        if e.is_io_error() || e.is_timeout() || e.is_connection_dropped() || e.is_connection_refusal() {
            self.healthy.store(false, Ordering::Relaxed);
        }
        unavailable(e)
    }

    /// With `wait_replicas`, waits until that many replicas have every write so far.
    async fn replicated(&self, tag: &str) -> Result<(), StoreError> {
        if self.wait_replicas == 0 {
            return Ok(());
        }
        // Redis answers WAIT when its own timeout ends: within the reply timeout, with room to spare.
        let wait = self.timeout * 3 / 4;
        let got =
            self.conn().wait(&format!("{tag}:ids"), self.wait_replicas, wait).await.map_err(|e| self.failed(e))?;
        if got < self.wait_replicas {
            return Err(StoreError::Unavailable(format!(
                "{got} of {} replicas confirmed the write (store.wait_replicas)",
                self.wait_replicas
            )));
        }
        Ok(())
    }

    async fn note_site(&self, site: &str) -> Result<(), StoreError> {
        if self.sites.lock().unwrap_or_else(|p| p.into_inner()).contains(site) {
            return Ok(());
        }
        let _: i64 = self.conn().sadd(self.sites_key(), site).await.map_err(|e| self.failed(e))?;
        self.sites.lock().unwrap_or_else(|p| p.into_inner()).insert(site.to_owned());
        Ok(())
    }

    async fn all_sites(&self) -> Result<Vec<String>, StoreError> {
        let mut sites: Vec<String> = self.conn().smembers(self.sites_key()).await.map_err(|e| self.failed(e))?;
        sites.sort();
        Ok(sites)
    }

    /// Reads a user room atomically: its version and its devices (`devices` empty: all).
    async fn describe(&self, tag: &str, user: &str, devices: &[&str]) -> Result<UserRead, StoreError> {
        let mut args = vec![user];
        args.extend_from_slice(devices);
        let reply = items(self.run(&self.scripts.describe, tag, &args).await?);
        let version = reply.first().map(text).unwrap_or_default();
        let mut seen = Vec::new();
        for d in reply.get(1..).unwrap_or_default().chunks_exact(7) {
            let record: DeviceRecord = serde_json::from_str(&text(&d[1]))
                .map_err(|_| StoreError::Corrupt { key: format!("{tag}:u:{user} {}", text(&d[0])) })?;
            let state = DeviceState {
                connected: record.connected,
                disconnected_at: record.disconnected_at,
                queue_len: number(&d[2]),
                queue_bytes: number(&d[3]),
                overflowed: !text(&d[4]).is_empty(),
                resync_at: text(&d[5]).parse().ok(),
            };
            let oldest = text(&d[6]).parse().ok();
            seen.push(Seen { device: text(&d[0]), record, state, oldest });
        }
        seen.sort_by(|a, b| a.device.cmp(&b.device));
        Ok(UserRead { version, devices: seen })
    }

    /// Marks a device disconnected if its socket is on `node`. Returns whether it was.
    async fn disconnect_from(&self, device: &DeviceKey, node: &str, now: Millis) -> Result<bool, StoreError> {
        let tag = self.tag(&device.site);
        for _ in 0..TRIES {
            let read = self.describe(&tag, &device.user, &[&device.device]).await?;
            let Some(seen) = read.get(&device.device) else { return Ok(false) };
            if seen.record.connected && seen.record.node != node {
                // A newer socket of the device is on another node.
                return Ok(false);
            }
            let mut state = seen.state.clone();
            state.disconnect(now);
            let record = DeviceRecord {
                connected: state.connected,
                disconnected_at: state.disconnected_at,
                node: String::new(),
            };
            let json = serde_json::to_string(&record).expect("a record serializes");
            let held = if seen.record.connected { seen.record.node.as_str() } else { "" };
            let now = now.to_string();
            let args = [&*device.user, &*device.device, &read.version, &json, held, &now];
            if !is_changed(&self.run(&self.scripts.disconnect, &tag, &args).await?) {
                return Ok(seen.record.connected);
            }
        }
        Err(contended())
    }

    /// Disconnects every device whose socket was on `node`, in every site.
    async fn disconnect_node(&self, site: &str, node: &str, now: Millis) -> Result<u64, StoreError> {
        let tag = self.tag(site);
        let members: Vec<String> =
            self.conn().smembers(format!("{tag}:cn:{node}")).await.map_err(|e| self.failed(e))?;
        let mut count = 0;
        for member in &members {
            if let Some((user, device)) = parse_dk(member) {
                count += u64::from(self.disconnect_from(&DeviceKey::new(site, user, device), node, now).await?);
            }
        }
        self.run(&self.scripts.drop_node, &tag, &[node]).await?;
        Ok(count)
    }

    /// Marks disconnected the devices of nodes whose heartbeat has lapsed.
    async fn sweep_dead_nodes(&self, site: &str, now: Millis) -> Result<(), StoreError> {
        let nodes: Vec<String> =
            self.conn().smembers(format!("{}:nodes", self.tag(site))).await.map_err(|e| self.failed(e))?;
        for node in nodes.iter().filter(|n| **n != self.node) {
            let alive: bool =
                self.conn().exists(format!("{}:alive:{node}", self.prefix)).await.map_err(|e| self.failed(e))?;
            if !alive {
                let count = self.disconnect_node(site, node, now).await?;
                tracing::info!(site, node = %node, devices = count, "a node stopped: its devices are disconnected");
            }
        }
        Ok(())
    }

    /// Forgets the expired devices of one site; returns them.
    async fn sweep_devices(&self, site: &str, expiry: Expiry) -> Result<Vec<DeviceKey>, StoreError> {
        let tag = self.tag(site);
        let mut out = Vec::new();
        if expiry.ttl_ms == 0 || expiry.now <= expiry.ttl_ms {
            return Ok(out);
        }
        let before = format!("({}", expiry.now - expiry.ttl_ms);
        loop {
            let found: Vec<String> = self
                .conn()
                .zrangebyscore_limit(format!("{tag}:t"), "-inf", &before, 0, SWEEP_STEP)
                .await
                .map_err(|e| self.failed(e))?;
            let mut by_user = BTreeMap::<&str, Vec<&str>>::new();
            for (user, device) in found.iter().filter_map(|m| parse_dk(m)) {
                by_user.entry(user).or_default().push(device);
            }
            let progress = out.len();
            for (user, devices) in by_user {
                out.extend(self.forget_expired(&tag, site, user, &devices, expiry).await?);
            }
            if found.len() < SWEEP_STEP as usize || out.len() == progress {
                return Ok(out);
            }
        }
    }

    async fn forget_expired(
        &self,
        tag: &str,
        site: &str,
        user: &str,
        devices: &[&str],
        expiry: Expiry,
    ) -> Result<Vec<DeviceKey>, StoreError> {
        for _ in 0..TRIES {
            let read = self.describe(tag, user, devices).await?;
            let expired: Vec<&Seen> = read.devices.iter().filter(|d| expiry.is_expired(&d.state)).collect();
            if expired.is_empty() {
                return Ok(Vec::new());
            }
            let mut args = vec![user, read.version.as_str()];
            for seen in &expired {
                args.extend([seen.device.as_str(), held(&seen.record)]);
            }
            if !is_changed(&self.run(&self.scripts.forget, tag, &args).await?) {
                return Ok(expired.iter().map(|d| DeviceKey::new(site, user, &d.device)).collect());
            }
        }
        Err(contended())
    }

    async fn sweep_keys(&self, site: &str, now: Millis) -> Result<(), StoreError> {
        let tag = self.tag(site);
        loop {
            let keys: Vec<String> = self
                .conn()
                .zrangebyscore_limit(format!("{tag}:kx"), "-inf", now, 0, SWEEP_STEP)
                .await
                .map_err(|e| self.failed(e))?;
            let now = now.to_string();
            let mut args = vec![now.as_str()];
            args.extend(keys.iter().map(String::as_str));
            let dropped = number(&self.run(&self.scripts.expire_keys, &tag, &args).await?);
            if keys.len() < SWEEP_STEP as usize || dropped == 0 {
                return Ok(());
            }
        }
    }

    /// Runs the removals gathered for one site (see `lua/remove.lua`).
    async fn remove(&self, site: &str, groups: &[(DeviceKey, Vec<MessageId>)]) -> Result<u64, StoreError> {
        if groups.is_empty() {
            return Ok(0);
        }
        let mut args: Vec<String> = Vec::new();
        for (dev, ids) in groups {
            args.extend([dev.user.to_string(), dev.device.to_string(), ids.len().to_string()]);
            args.extend(ids.iter().map(u64::to_string));
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        Ok(number(&self.run(&self.scripts.remove, &self.tag(site), &args).await?))
    }

    /// The ack of a message sent with `resync=true` (see [`Ack::Live`]).
    async fn checked_ack(
        &self,
        device: DeviceKey,
        id: MessageId,
        event: Arc<str>,
    ) -> Result<Option<Resync>, StoreError> {
        let tag = self.tag(&device.site);
        let key = format!("{tag}:e:{}{event}", dk(&device.user, &device.device));
        for _ in 0..TRIES {
            let same_event: Vec<MessageId> = self.conn().zrange(&key, 0, -1).await.map_err(|e| self.failed(e))?;
            match in_order(same_event.iter().copied(), id) {
                InOrder::NotQueued => return Ok(None),
                InOrder::Oldest => {
                    self.remove(&device.site.clone(), &[(device, vec![id])]).await?;
                    return Ok(None);
                }
                InOrder::Late(ids) => {
                    let mut args = vec![
                        device.user.to_string(),
                        device.device.to_string(),
                        event.to_string(),
                        same_event.len().to_string(),
                        same_event.last().map(u64::to_string).unwrap_or_default(),
                    ];
                    args.extend(ids.iter().map(u64::to_string));
                    let args: Vec<&str> = args.iter().map(String::as_str).collect();
                    let reply = self.run(&self.scripts.clear_event, &tag, &args).await?;
                    if is_changed(&reply) {
                        continue;
                    }
                    let reply = items(reply);
                    let (cleared, seq) = (number(&reply[1]), number(&reply[2]));
                    return Ok(Some(Resync { device, event, cleared, seq }));
                }
            }
        }
        Err(contended())
    }
}

/// The node of a device's socket if it is connected, else "" (the scripts' convention).
fn held(record: &DeviceRecord) -> &str {
    if record.connected {
        &record.node
    } else {
        ""
    }
}

/// Refreshes the node's heartbeat key; its outcome is the store's health.
/// Sets the node's heartbeat key.
async fn beat(conn: &mut Conn, key: &str) -> redis::RedisResult<()> {
    redis::cmd("SET").arg(key).arg(1).arg("PX").arg(HEARTBEAT.as_millis() as u64).query_async::<()>(conn).await
}

/// Beats every third of [`HEARTBEAT`] after the first (in `open`), and keeps `healthy` current.
async fn heartbeat(mut conn: Conn, key: String, healthy: Arc<AtomicBool>) {
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + HEARTBEAT / 3, HEARTBEAT / 3);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut was = healthy.load(Ordering::Relaxed);
    loop {
        tick.tick().await;
        let ok = beat(&mut conn, &key).await;
        if let Err(e) = &ok {
            if was {
                tracing::error!(error = %e, "Redis is unreachable: the node is not ready until it answers");
            }
        } else if !was {
            tracing::info!("Redis answers again");
        }
        was = ok.is_ok();
        healthy.store(was, Ordering::Relaxed);
    }
}

#[async_trait]
impl Store for RedisStore {
    async fn connect(
        &self,
        device: &DeviceKey,
        rooms: &[String],
        max_devices: Option<u64>,
    ) -> Result<Connected, StoreError> {
        self.note_site(&device.site).await?;
        let tag = self.tag(&device.site);
        let rooms: Vec<String> = rooms.iter().map(|r| r.to_lowercase()).collect();
        for _ in 0..TRIES {
            let read = self.describe(&tag, &device.user, &[]).await?;
            let seen = read.get(&device.device);
            let mut forgotten = Vec::new();
            if let Some(max) = max_devices.filter(|_| seen.is_none()) {
                let keys: Vec<DeviceKey> =
                    read.devices.iter().map(|d| DeviceKey::new(&device.site, &device.user, &d.device)).collect();
                forgotten = devices_to_forget(keys.iter().zip(read.devices.iter().map(|d| &d.state)), max)?;
            }
            let mut state = seen.map(|s| s.state.clone()).unwrap_or_default();
            state.connect();
            let record = DeviceRecord {
                connected: state.connected,
                disconnected_at: state.disconnected_at,
                node: self.node.clone(),
            };
            let json = serde_json::to_string(&record).expect("a record serializes");
            let before = seen.map(|s| held(&s.record)).unwrap_or("");
            let count = forgotten.len().to_string();
            let mut args = vec![
                &*device.user,
                &*device.device,
                &read.version,
                &json,
                &self.node,
                before,
                if seen.is_none() { "1" } else { "0" },
                &count,
            ];
            for dev in &forgotten {
                let gone = read.get(&dev.device).expect("forgotten devices were read");
                args.extend([&*dev.device, held(&gone.record)]);
            }
            args.extend(rooms.iter().map(String::as_str));
            let reply = self.run(&self.scripts.connect, &tag, &args).await?;
            if is_changed(&reply) {
                continue;
            }
            self.replicated(&tag).await?;
            let reply = items(reply);
            let mut owed = DeviceState {
                overflowed: !text(&reply[2]).is_empty(),
                resync_at: text(&reply[3]).parse().ok(),
                ..DeviceState::default()
            };
            return Ok(Connected {
                pending: queued(&reply[4..]),
                resync: owed.connect(),
                watermark: number(&reply[1]) + 1,
                forgotten,
            });
        }
        Err(contended())
    }

    async fn disconnect(&self, device: &DeviceKey, now: Millis) -> Result<(), StoreError> {
        self.disconnect_from(device, &self.node, now).await.map(drop)
    }

    async fn disconnect_all(&self, now: Millis) -> Result<u64, StoreError> {
        let mut count = 0;
        for site in self.all_sites().await? {
            count += self.disconnect_node(&site, &self.node, now).await?;
        }
        Ok(count)
    }

    async fn users_in_room(&self, site: &str, room: &str) -> Result<Vec<String>, StoreError> {
        let key = format!("{}:r:{}", self.tag(site), room.to_lowercase());
        let mut users: Vec<String> = self.conn().smembers(key).await.map_err(|e| self.failed(e))?;
        users.sort();
        Ok(users)
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
        let tag = self.tag(site);
        let event = entry_event(&entry).unwrap_or_default();
        let (at, size) = (expiry.now.to_string(), entry.len().to_string());
        let (max_len, max_bytes) = (limits.max_len.to_string(), limits.max_bytes.to_string());
        for _ in 0..TRIES {
            let mut pipe = redis::pipe();
            for user in &users {
                pipe.hgetall(format!("{tag}:u:{user}"));
            }
            if let Some(idem) = &idempotency {
                pipe.hget(format!("{tag}:k"), &idem.key);
            }
            let mut read: Vec<Value> = once_more_if_unsent(|| async { pipe.query_async(&mut self.conn()).await })
                .await
                .map_err(|e| self.failed(e))?;
            let key_read = match &idempotency {
                Some(idem) => {
                    let raw = text(&read.pop().unwrap_or(Value::Nil));
                    let earlier = raw.split_once(':').and_then(|(f, e)| Some((f.parse().ok()?, e.parse().ok()?)));
                    if let Some(replay) = idem.replay_of(earlier, expiry.now) {
                        return Ok(Enqueued { replay: Some(replay), ..Enqueued::default() });
                    }
                    raw
                }
                None => String::new(),
            };
            let mut versions: Vec<(&str, String)> = Vec::new();
            let mut forget: Vec<(&str, String, String)> = Vec::new();
            // (user, device, the node of its socket if connected).
            let mut queue: Vec<(&str, String, String)> = Vec::new();
            for (user, fields) in users.iter().zip(read) {
                let mut fields: BTreeMap<String, String> = redis::from_redis_value(fields)
                    .map_err(|e| StoreError::Corrupt { key: format!("{tag}:u:{user} ({e})") })?;
                versions.push((user, fields.remove("v").unwrap_or_default()));
                for (field, json) in fields {
                    let Some(device) = field.strip_prefix('d') else { continue };
                    let record: DeviceRecord = serde_json::from_str(&json)
                        .map_err(|_| StoreError::Corrupt { key: format!("{tag}:u:{user} {device}") })?;
                    let state = DeviceState {
                        connected: record.connected,
                        disconnected_at: record.disconnected_at,
                        ..DeviceState::default()
                    };
                    if expiry.is_expired(&state) {
                        forget.push((user, device.to_owned(), held(&record).to_owned()));
                    } else {
                        queue.push((user, device.to_owned(), held(&record).to_owned()));
                    }
                }
            }
            let (key, key_new, key_expires) = match &idempotency {
                Some(idem) => (
                    idem.key.as_str(),
                    format!("{}:{}", idem.fingerprint, idem.expires_at),
                    idem.expires_at.to_string(),
                ),
                None => ("", String::new(), String::new()),
            };
            let counts = [versions.len().to_string(), forget.len().to_string(), queue.len().to_string()];
            let mut args: Vec<&str> =
                vec![&at, &event, &size, &entry, &max_len, &max_bytes, key, &key_read, &key_new, &key_expires];
            args.push(&counts[0]);
            for (user, version) in &versions {
                args.extend([*user, version.as_str()]);
            }
            args.push(&counts[1]);
            for (user, device, node) in &forget {
                args.extend([*user, device.as_str(), node.as_str()]);
            }
            args.push(&counts[2]);
            for (user, device, node) in &queue {
                args.extend([*user, device.as_str(), if node.is_empty() { "" } else { "1" }]);
            }
            let reply = self.run(&self.scripts.enqueue, &tag, &args).await?;
            if is_changed(&reply) {
                continue;
            }
            self.replicated(&tag).await?;
            let reply = items(reply);
            let devices: Vec<DeviceKey> = queue.iter().map(|(u, d, _)| DeviceKey::new(site, u, d)).collect();
            let mut elsewhere = BTreeMap::<&str, Vec<DeviceKey>>::new();
            for ((_, _, node), dev) in queue.iter().zip(&devices) {
                if !node.is_empty() && *node != self.node {
                    elsewhere.entry(node.as_str()).or_default().push(dev.clone());
                }
            }
            let follows: Vec<MessageId> = reply[2..2 + queue.len()].iter().map(number).collect();
            let overflowed = reply[2 + queue.len()..]
                .chunks_exact(2)
                .map(|p| (devices[number(&p[0]) as usize].clone(), number(&p[1])))
                .collect();
            return Ok(Enqueued {
                id: number(&reply[1]),
                expired: forget.iter().map(|(u, d, _)| DeviceKey::new(site, u, d)).collect(),
                devices,
                overflowed,
                replay: None,
                elsewhere: elsewhere.into_iter().map(|(node, devs)| (node.to_owned(), devs)).collect(),
                follows,
            });
        }
        Err(contended())
    }

    async fn pending(&self, device: &DeviceKey) -> Result<Vec<Queued>, StoreError> {
        let reply = self.run(&self.scripts.pending, &self.tag(&device.site), &[&device.user, &device.device]).await?;
        Ok(queued(&items(reply)))
    }

    async fn acks(&self, acks: Vec<Ack>) -> Result<Vec<Resync>, StoreError> {
        let mut resyncs = Vec::new();
        // Removals that need no check go out together, per site, in the order given.
        let mut batch: Vec<(DeviceKey, Vec<MessageId>)> = Vec::new();
        for ack in acks {
            let (device, ids, checked) = match ack {
                Ack::Batch { device, ids } => (device, ids, None),
                Ack::Live { device, id, checked } => (device, vec![id], checked.map(|e| (id, e))),
            };
            if batch.first().is_some_and(|(d, _)| d.site != device.site) || checked.is_some() {
                let site = batch.first().map(|(d, _)| d.site.clone());
                if let Some(site) = site {
                    self.remove(&site, &std::mem::take(&mut batch)).await?;
                }
            }
            match checked {
                Some((id, event)) => resyncs.extend(self.checked_ack(device, id, event).await?),
                None => batch.push((device, ids)),
            }
        }
        if let Some((first, _)) = batch.first() {
            let site = first.site.clone();
            self.remove(&site, &batch).await?;
        }
        Ok(resyncs)
    }

    async fn resync_sent(&self, device: &DeviceKey, seq: MessageId) -> Result<(), StoreError> {
        let tag = self.tag(&device.site);
        let read = self.describe(&tag, &device.user, &[&device.device]).await?;
        let Some(seen) = read.get(&device.device) else { return Ok(()) };
        let mut state = seen.state.clone();
        state.resync_delivered(seq);
        if let (Some(owed), None) = (seen.state.resync_at, state.resync_at) {
            let owed = owed.to_string();
            self.run(&self.scripts.settle_resync, &tag, &[&device.user, &device.device, &owed]).await?;
        }
        Ok(())
    }

    async fn sweep(&self, expiry: Expiry) -> Result<Vec<DeviceKey>, StoreError> {
        let mut out = Vec::new();
        for site in self.all_sites().await? {
            // One node sweeps a site at a time; the lock lapses by itself if that node dies.
            let lock = format!("{}:sweep", self.tag(&site));
            let took: Option<String> = redis::cmd("SET")
                .arg(&lock)
                .arg(&self.node)
                .arg("NX")
                .arg("PX")
                .arg(60_000)
                .query_async(&mut self.conn())
                .await
                .map_err(|e| self.failed(e))?;
            let holder: Option<String> =
                if took.is_some() { None } else { self.conn().get(&lock).await.map_err(|e| self.failed(e))? };
            if holder.is_some_and(|h| h != self.node) {
                continue;
            }
            let done = async {
                self.sweep_dead_nodes(&site, expiry.now).await?;
                out.extend(self.sweep_devices(&site, expiry).await?);
                self.sweep_keys(&site, expiry.now).await
            }
            .await;
            // Only if still this node's: a sweep that outlived the lock must not end another's.
            let release = Script::new("if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end");
            let _: Result<(), _> = release.key(&lock).arg(&self.node).invoke_async(&mut self.conn()).await;
            done?;
        }
        Ok(out)
    }

    async fn device(&self, device: &DeviceKey) -> Result<Option<DeviceState>, StoreError> {
        let read = self.describe(&self.tag(&device.site), &device.user, &[&device.device]).await?;
        Ok(read.devices.into_iter().next().map(|d| d.state))
    }

    async fn stats(&self) -> Result<BTreeMap<String, SiteStats>, StoreError> {
        let mut out = BTreeMap::new();
        for site in self.all_sites().await? {
            let t: BTreeMap<String, u64> =
                self.conn().hgetall(format!("{}:totals", self.tag(&site))).await.map_err(|e| self.failed(e))?;
            let get = |k: &str| t.get(k).copied().unwrap_or(0);
            let stats = SiteStats {
                devices: get("devices"),
                connected: get("connected"),
                queued_messages: get("queued_messages"),
                queued_bytes: get("queued_bytes"),
            };
            if stats.devices > 0 {
                out.insert(site, stats);
            }
        }
        Ok(out)
    }

    async fn user_devices(&self, site: &str, user: &str) -> Result<Vec<DeviceInfo>, StoreError> {
        let read = self.describe(&self.tag(site), user, &[]).await?;
        Ok(read
            .devices
            .into_iter()
            .map(|d| DeviceInfo { device: d.device, state: d.state, oldest_queued_at: d.oldest })
            .collect())
    }

    async fn clear_queue(&self, device: &DeviceKey) -> Result<u64, StoreError> {
        let key = format!("{}:q:{}", self.tag(&device.site), dk(&device.user, &device.device));
        let ids: Vec<MessageId> = self.conn().zrange(key, 0, -1).await.map_err(|e| self.failed(e))?;
        self.remove(&device.site, &[(device.clone(), ids)]).await
    }

    async fn flush(&self) -> Result<(), StoreError> {
        Ok(())
    }

    /// As the trait says, with two differences. A device is loaded disconnected: if it was
    /// connected, as of now (no node holds its socket). Ids must be below 2^53 (the scripts
    /// count in Lua numbers); `sio-push restore` renumbers a snapshot's messages to fit.
    async fn load(&self, records: Vec<Record>) -> Result<Loaded, StoreError> {
        let now = crate::delivery::now_ms();
        let mut loaded = Loaded::default();
        let mut batches = BTreeMap::<String, LoadBatch>::new();
        let mut next_id = None;
        for record in records {
            let (site, args) = match record {
                Record::User { site, user, rooms } => {
                    let mut args = vec!["u".to_owned(), user, rooms.len().to_string()];
                    args.extend(rooms.iter().map(|r| r.to_lowercase()));
                    (site, args)
                }
                Record::Device { key, state } => {
                    let at = if state.connected || state.disconnected_at == 0 { now } else { state.disconnected_at };
                    let record = DeviceRecord { connected: false, disconnected_at: at, node: String::new() };
                    let json = serde_json::to_string(&record).expect("a record serializes");
                    let resync = state.resync_at.map(|seq| seq.to_string()).unwrap_or_default();
                    let overflowed = if state.overflowed { "1" } else { "" };
                    let (user, device) = (key.user.to_string(), key.device.to_string());
                    let args = vec!["d".into(), user, device, json, at.to_string(), overflowed.into(), resync];
                    (key.site.to_string(), args)
                }
                Record::Message { device, message, shared } => {
                    if message.id >= MAX_ID {
                        return Err(ids_too_large());
                    }
                    let event = entry_event(&message.entry).unwrap_or_default();
                    let args = vec![
                        "m".into(),
                        device.user.to_string(),
                        device.device.to_string(),
                        message.id.to_string(),
                        message.queued_at.to_string(),
                        event,
                        message.entry.to_string(),
                        if shared { "1" } else { "" }.into(),
                    ];
                    (device.site.to_string(), args)
                }
                Record::Ids { next } => {
                    if next > MAX_ID {
                        return Err(ids_too_large());
                    }
                    next_id = next_id.max(Some(next));
                    continue;
                }
                Record::Idempotency { site, record } => {
                    let value = format!("{}:{}", record.fingerprint, record.expires_at);
                    (site, vec!["k".into(), record.key, value, record.expires_at.to_string()])
                }
            };
            let batch = batches.entry(site.clone()).or_default();
            batch.push(args);
            if batch.is_full() {
                let args = std::mem::take(batch).args;
                self.load_batch(&site, &args, &mut loaded).await?;
            }
        }
        for (site, batch) in batches {
            self.load_batch(&site, &batch.args, &mut loaded).await?;
        }
        // One record, raising the counter of every site there is (none before the first load:
        // the messages loaded raise them).
        if let Some(next) = next_id {
            let mut raised = Loaded::default();
            for site in self.all_sites().await? {
                let last = next.saturating_sub(1).to_string();
                self.load_batch(&site, &["i".to_owned(), last], &mut raised).await?;
            }
            match raised.written {
                0 => loaded.skipped += 1,
                _ => loaded.written += 1,
            }
        }
        Ok(loaded)
    }

    fn is_open(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }
}

/// Message ids stay below this: the scripts count in Lua numbers (doubles).
const MAX_ID: MessageId = 1 << 53;

fn ids_too_large() -> StoreError {
    StoreError::Unsupported("message ids from 2^53 up do not fit the Redis store; sio-push restore renumbers them")
}

/// Records of one site for one run of the `load` script.
#[derive(Default)]
struct LoadBatch {
    args: Vec<String>,
    bytes: usize,
    records: usize,
}

impl LoadBatch {
    fn push(&mut self, args: Vec<String>) {
        self.bytes += args.iter().map(String::len).sum::<usize>();
        self.records += 1;
        self.args.extend(args);
    }

    /// A script run holds a few MiB of arguments at most, whatever the messages' sizes.
    fn is_full(&self) -> bool {
        self.bytes >= 4 << 20 || self.records >= 1000
    }
}

impl RedisStore {
    /// The last message id given out in `site` (0: none yet).
    pub async fn last_id(&self, site: &str) -> Result<MessageId, StoreError> {
        let last: Option<MessageId> =
            self.conn().get(format!("{}:ids", self.tag(site))).await.map_err(|e| self.failed(e))?;
        Ok(last.unwrap_or(0))
    }

    /// Runs the `load` script on one site's records, adding to `loaded` what it did.
    async fn load_batch(&self, site: &str, args: &[String], loaded: &mut Loaded) -> Result<(), StoreError> {
        if args.is_empty() {
            return Ok(());
        }
        self.note_site(site).await?;
        let tag = self.tag(site);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let reply = items(self.run(&self.scripts.load, &tag, &args).await?);
        if text(&reply[0]) == "unknown" {
            return Err(StoreError::Corrupt {
                key: format!(
                    "a message of the unknown device {} of {} in site {site}",
                    text(&reply[2]),
                    text(&reply[1])
                ),
            });
        }
        self.replicated(&tag).await?;
        loaded.written += number(&reply[0]);
        loaded.skipped += number(&reply[1]);
        Ok(())
    }
}

#[cfg(test)]
mod tests;
