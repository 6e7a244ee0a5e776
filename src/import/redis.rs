//! `sio-push import-redis`: the messages the old service left queued in its Redis, copied into
//! the store, so that switching loses none of them.
//!
//! The old layout (from its source): one Redis list per device and event, under
//! `/<site>:socket.io:<user room>:<device id>:<event>`, of items `<id>:<JSON [event, ...args]>`
//! pushed with RPUSH. Ids are 64-bit flake ids in decimal: time-ordered, so they give the send
//! order across a device's events, and they become the messages' ids here (clients never see
//! them; ids given out later are above them). While a device was disconnected its lists had a
//! TTL (`EXPIRE device_ttl` at disconnect, `PERSIST` at connect). The device registry and room
//! lists lived in process memory only: each device is registered under its user room, and its
//! room list comes with its first connection.
//!
//! Only sites of the configuration are imported. A key that cannot be split without guessing
//! (a `:` in a device id or event name) is reported and left. What is already in the store is
//! skipped, so running it twice imports nothing twice.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use redis::AsyncCommands;

use crate::config::Config;
use crate::store::{DeviceKey, DeviceState, Loaded, MessageId, Millis, Queued, Record, Store};

/// What separates the namespace from the rest of an old key.
const MARK: &str = ":socket.io:";
/// Items read from a list at a time.
const RANGE: isize = 10_000;
/// Records given to the store at a time.
const CHUNK: usize = 2_000;

/// What `import-redis` did.
#[derive(Debug, Default)]
pub struct Report {
    /// Per configured site: what was found.
    pub sites: BTreeMap<String, SiteReport>,
    /// Keys of sites not in the configuration, by site: left alone.
    pub other_sites: BTreeMap<String, u64>,
    /// Keys or items left, each with why.
    pub left: Vec<String>,
    /// What the store wrote and skipped (already there).
    pub loaded: Loaded,
}

/// One site's part of a [`Report`].
#[derive(Debug, Default, PartialEq, Eq)]
pub struct SiteReport {
    /// Devices with queued messages.
    pub devices: u64,
    /// Messages queued over all of them.
    pub messages: u64,
    /// Devices whose lists had a TTL (disconnected when the old service stopped).
    pub disconnected: u64,
}

/// One device's lists, gathered.
#[derive(Default)]
struct Device {
    items: Vec<(MessageId, Arc<str>)>,
    /// The longest remaining TTL of its lists (the latest disconnect), if every list had one.
    ttl: Option<Duration>,
    /// A list without TTL: the device was connected when the old service stopped.
    persisted: bool,
}

/// `sio-push import-redis`: copies the old service's queues from the Redis at `url` into the
/// configured data directory (created if need be), with sio-push stopped; returns the report
/// for the operator.
pub async fn command(config: &Config, url: &str) -> anyhow::Result<String> {
    use std::fmt::Write as _;
    let started = std::time::Instant::now();
    let store = crate::backup::open_for_writing(config)?;
    let report = import(config, url, &store, crate::delivery::now_ms()).await;
    store.close().await;
    let report = report?;
    let mut out = String::new();
    for (site, s) in &report.sites {
        let _ = writeln!(
            out,
            "site {site}: {} devices ({} disconnected), {} queued messages",
            s.devices, s.disconnected, s.messages
        );
    }
    for (site, keys) in &report.other_sites {
        let _ = writeln!(out, "left: {keys} keys of site {site:?}, which the configuration does not name");
    }
    for left in &report.left {
        let _ = writeln!(out, "left: {left}");
    }
    let _ = writeln!(
        out,
        "imported into {} in {:.1} s: {} records written, {} already there",
        config.server.data_dir.display(),
        started.elapsed().as_secs_f64(),
        report.loaded.written,
        report.loaded.skipped
    );
    Ok(out)
}

/// Copies the old service's queues from the Redis at `url` into `store`.
pub async fn import(config: &Config, url: &str, store: &dyn Store, now: Millis) -> anyhow::Result<Report> {
    let client = redis::Client::open(url).context("not a Redis URL")?;
    let connect = client.get_multiplexed_async_connection();
    let mut redis = tokio::time::timeout(Duration::from_secs(10), connect)
        .await
        .map_err(|_| anyhow::anyhow!("Redis did not answer within 10 s"))?
        .context("cannot connect to Redis")?;
    let mut report = Report::default();
    let mut devices = BTreeMap::<DeviceKey, Device>::new();
    let mut keys: Vec<Vec<u8>> = Vec::new();
    {
        let mut scan = redis.scan_match::<_, Vec<u8>>(format!("*{MARK}*")).await.context("SCAN failed")?;
        while let Some(key) = futures_util::StreamExt::next(&mut scan).await {
            keys.push(key.context("SCAN failed")?);
        }
    }
    keys.sort();
    for key in keys {
        let Ok(text) = std::str::from_utf8(&key) else {
            report.left.push(format!("{}: not UTF-8", key.escape_ascii()));
            continue;
        };
        let Some((site, user, device, _event)) = split_key(text) else {
            report.left.push(format!("{text}: cannot be split into user room, device id and event without guessing"));
            continue;
        };
        if !config.sites.contains_key(site) {
            *report.other_sites.entry(site.to_owned()).or_default() += 1;
            continue;
        }
        let kind: String = redis::cmd("TYPE").arg(&key).query_async(&mut redis).await.context("TYPE failed")?;
        if kind != "list" {
            if kind != "none" {
                report.left.push(format!("{text}: a {kind}, not a list"));
            }
            continue;
        }
        let ttl: i64 = redis::cmd("PTTL").arg(&key).query_async(&mut redis).await.context("PTTL failed")?;
        let mut items: Vec<Vec<u8>> = Vec::new();
        let mut from = 0;
        loop {
            let range: Vec<Vec<u8>> = redis.lrange(&key, from, from + RANGE - 1).await.context("LRANGE failed")?;
            let done = range.len() < RANGE as usize;
            items.extend(range);
            if done {
                break;
            }
            from += RANGE;
        }
        if ttl == -2 || items.is_empty() {
            continue; // gone meanwhile (expired), or empty
        }
        let dev = devices.entry(DeviceKey::new(site, user, device)).or_default();
        match ttl {
            ms if ms >= 0 => dev.ttl = dev.ttl.max(Some(Duration::from_millis(ms as u64))),
            _ => dev.persisted = true,
        }
        for item in items {
            match split_item(&item) {
                Some((id, entry)) => dev.items.push((id, entry)),
                None => report.left.push(format!("{text}: an item is not <id>:<JSON>: {}", show(&item))),
            }
        }
    }

    // A message for several devices was pushed to each under one id: kept once when the copies
    // agree.
    let mut copies = HashMap::<MessageId, (u32, Option<Arc<str>>)>::new();
    for dev in devices.values_mut() {
        dev.items.sort_by_key(|(id, _)| *id);
        dev.items.dedup_by_key(|(id, _)| *id);
        for (id, entry) in &dev.items {
            let seen = copies.entry(*id).or_insert((0, Some(entry.clone())));
            seen.0 += 1;
            if seen.1.as_ref().is_some_and(|first| first != entry) {
                seen.1 = None;
            }
        }
    }
    let ttl_ms = config.server.device_ttl.as_millis() as u64;
    let mut chunk = Vec::with_capacity(CHUNK);
    for (key, dev) in devices {
        let site = report.sites.entry(key.site.to_string()).or_default();
        site.devices += 1;
        site.messages += dev.items.len() as u64;
        let disconnected_at = match (dev.persisted, dev.ttl) {
            (false, Some(left)) if ttl_ms > 0 => {
                site.disconnected += 1;
                now.saturating_sub(ttl_ms.saturating_sub(left.as_millis() as u64))
            }
            (false, Some(_)) => {
                site.disconnected += 1;
                now
            }
            _ => now,
        };
        let state = DeviceState { connected: false, disconnected_at, ..DeviceState::default() };
        chunk.push(Record::Device { key: key.clone(), state });
        for (id, entry) in dev.items {
            let shared = copies.get(&id).is_some_and(|(n, same)| *n > 1 && same.is_some());
            let message = Queued { id, queued_at: flake_time(id).unwrap_or(now), entry };
            chunk.push(Record::Message { device: key.clone(), message, shared });
        }
        if chunk.len() >= CHUNK {
            add(&mut report.loaded, store.load(std::mem::take(&mut chunk)).await?);
        }
    }
    if !chunk.is_empty() {
        add(&mut report.loaded, store.load(chunk).await?);
    }
    store.flush().await?;
    Ok(report)
}

fn add(total: &mut Loaded, more: Loaded) {
    total.written += more.written;
    total.skipped += more.skipped;
}

/// `/<site>:socket.io:<user room>:<device id>:<event>` into its parts; `None` when a part holds
/// a `:` (then the split would be a guess) or the key is not of that shape.
fn split_key(key: &str) -> Option<(&str, &str, &str, &str)> {
    let (namespace, rest) = key.split_once(MARK)?;
    let site = namespace.strip_prefix('/')?;
    let mut parts = rest.split(':');
    let (user, device, event) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() || site.is_empty() || user.is_empty() || event.is_empty() {
        return None;
    }
    Some((site, user, device, event))
}

/// `<id>:<JSON>` into the id and the entry; `None` if it is not of that shape.
fn split_item(item: &[u8]) -> Option<(MessageId, Arc<str>)> {
    let text = std::str::from_utf8(item).ok()?;
    let (id, entry) = text.split_once(':')?;
    let id = id.parse().ok()?;
    serde_json::from_str::<&serde_json::value::RawValue>(entry).ok().filter(|raw| raw.get().starts_with('['))?;
    Some((id, Arc::from(entry)))
}

/// When a flake id was made (its top 42 bits are milliseconds since 1970, as flake-idgen makes
/// them by default), if that is a plausible time.
fn flake_time(id: MessageId) -> Option<Millis> {
    let at = id >> 22;
    let plausible = 1_262_304_000_000..=crate::delivery::now_ms() + 86_400_000; // 2010 to tomorrow
    plausible.contains(&at).then_some(at)
}

/// An item for a report line: escaped, and short.
fn show(item: &[u8]) -> String {
    let shown: String = item.escape_ascii().to_string().chars().take(80).collect();
    shown
}

#[cfg(test)]
mod tests;
