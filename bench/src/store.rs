//! The `store` scenario: the sled store alone, as the server opens it (64 MiB page cache), filled
//! the way the server fills it, then timed on what runs on its writer at every scrape and every
//! sweep. A job on the writer holds up every `/send`, connect and ack behind it, so its time is
//! what they wait.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::stream::{self, StreamExt, TryStreamExt};
use serde_json::json;
use sio_push::store::{DeviceKey, Expiry, Idempotency, QueueLimits, SledStore, Store};

/// Jobs in flight while filling, as many concurrent requests would be.
const IN_FLIGHT: usize = 256;
const HOUR_MS: u64 = 3_600_000;

pub async fn run(devices: usize, per_device: usize) -> anyhow::Result<serde_json::Map<String, serde_json::Value>> {
    let dir = tempfile::tempdir()?;
    let store = SledStore::open(dir.path(), 64 << 20, 0)?;
    let now = 1_000 * HOUR_MS;
    let expiry = Expiry { now, ttl_ms: HOUR_MS };
    let started = Instant::now();
    let keys: Vec<DeviceKey> = (0..devices).map(|i| DeviceKey::new("bench", &format!("user_{i}"), "d")).collect();
    stream::iter(&keys)
        .map(|dev| {
            let store = &store;
            async move {
                store.connect(dev, &[dev.user.to_string(), "all".into()], Some(100)).await?;
                store.disconnect(dev, now).await
            }
        })
        .buffer_unordered(IN_FLIGHT)
        .try_collect::<()>()
        .await?;
    let limits = QueueLimits { max_len: per_device as u64 + 1, ..QueueLimits::default() };
    for round in 0..per_device {
        let users = store.users_in_room("bench", "all").await?;
        let entry: Arc<str> = json!(["msg", round]).to_string().into();
        store.enqueue("bench", users, entry, expiry, limits, None).await?;
    }
    stream::iter(0..devices)
        .map(|i| {
            let store = &store;
            let idempotency = Idempotency { key: format!("key-{i}"), fingerprint: 1, expires_at: now + HOUR_MS };
            async move {
                let entry: Arc<str> = json!(["once", i]).to_string().into();
                store.enqueue("bench", vec![], entry, expiry, limits, Some(idempotency)).await
            }
        })
        .buffer_unordered(IN_FLIGHT)
        .try_collect::<Vec<_>>()
        .await?;
    let filled = started.elapsed();

    let time = |took: Duration| (took.as_secs_f64() * 100_000.0).round() / 100.0;
    let timed = async |what: &str| -> anyhow::Result<f64> {
        let started = Instant::now();
        match what {
            "stats" => drop(store.stats().await?),
            "sweep" => drop(store.sweep(expiry).await?),
            _ => drop(store.sweep(Expiry { now: now + HOUR_MS, ttl_ms: 0 }).await?),
        }
        Ok(time(started.elapsed()))
    };
    let first_stats = timed("stats").await?;
    let stats = store.stats().await?;
    let queued = stats.get("bench").map_or(0, |s| s.queued_messages);
    let mut later_stats = Vec::new();
    for _ in 0..5 {
        later_stats.push(timed("stats").await?);
    }
    let sweep = timed("sweep").await?;
    // While the keys expire, another job at a time (as a send or an ack would be): the longest it
    // waited is the pause the sweep causes.
    let (sweep_expiring_keys, longest_wait) = {
        let done = std::sync::atomic::AtomicBool::new(false);
        let probe = async {
            let mut longest = Duration::ZERO;
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                let started = Instant::now();
                store.device(&keys[0]).await?;
                longest = longest.max(started.elapsed());
            }
            anyhow::Ok(longest)
        };
        let sweep = async {
            let took = timed("expire").await;
            done.store(true, std::sync::atomic::Ordering::Relaxed);
            took
        };
        let (took, longest) = futures_util::future::join(sweep, probe).await;
        (took?, time(longest?))
    };
    let sweep_after = timed("expire").await?;
    store.close().await;
    let figures = json!({
        "devices": devices,
        "queued_messages": queued,
        "idempotency_keys": devices,
        "secs_to_fill": time(filled) / 1000.0,
        "ms_first_stats_counting_everything": first_stats,
        "ms_stats_after": later_stats,
        "ms_sweep_nothing_expired": sweep,
        "ms_sweep_every_key_expired": sweep_expiring_keys,
        "ms_longest_wait_of_another_job_meanwhile": longest_wait,
        "ms_sweep_after_that": sweep_after,
    });
    Ok(figures.as_object().cloned().expect("an object"))
}
