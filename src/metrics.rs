//! Metrics: one function per event, feeding the Prometheus exporter (`GET /metrics`) and the
//! process totals behind the status page's rate chart.
//!
//! Labels are per site (and protocol, outcome, path of delivery), never per user or device, so
//! the series count stays bounded by the number of sites. Gauges that describe the store
//! (devices, queued messages and bytes) are set from a registry scan when `/metrics` is
//! scraped, so they are true after a restart too.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, RwLock};
use std::time::Duration;

use metrics::{counter, gauge, histogram, Counter, Histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use crate::store::SiteStats;

/// Process-wide running totals, for the status page's rates.
#[derive(Debug, Default)]
pub struct Totals {
    /// `/send` requests accepted.
    pub accepted: AtomicU64,
    /// Copies stored into device queues.
    pub stored: AtomicU64,
    /// Messages emitted live or in a `_batch`.
    pub delivered: AtomicU64,
    /// Messages acknowledged.
    pub acked: AtomicU64,
}

/// A copy of the totals at one moment.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TotalsSnapshot {
    /// See [`Totals::accepted`].
    pub accepted: u64,
    /// See [`Totals::stored`].
    pub stored: u64,
    /// See [`Totals::delivered`].
    pub delivered: u64,
    /// See [`Totals::acked`].
    pub acked: u64,
}

static TOTALS: Totals = Totals {
    accepted: AtomicU64::new(0),
    stored: AtomicU64::new(0),
    delivered: AtomicU64::new(0),
    acked: AtomicU64::new(0),
};

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

const LATENCY_BUCKETS: &[f64] = &[0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];
const SIZE_BUCKETS: &[f64] = &[1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0, 5000.0];

/// Installs the Prometheus recorder once per process and returns its handle.
pub fn install() -> &'static PrometheusHandle {
    HANDLE.get_or_init(|| {
        let recorder = PrometheusBuilder::new()
            .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), LATENCY_BUCKETS)
            .and_then(|b| b.set_buckets_for_metric(Matcher::Suffix("_size".into()), SIZE_BUCKETS))
            .expect("bucket lists are not empty")
            .build_recorder();
        let handle = recorder.handle();
        // Another recorder may already be installed (several apps in one test process): then
        // this handle renders nothing, which only tests would see.
        let _ = metrics::set_global_recorder(recorder);
        describe();
        handle
    })
}

/// How often recorded histogram samples are folded into their buckets.
pub const UPKEEP_EVERY: Duration = Duration::from_secs(5);

/// Folds the histogram samples recorded since the last scrape into their buckets, every
/// `period` until `stop`. The recorder keeps each sample until a scrape or this: a server that
/// nobody scrapes grew by about 8 bytes per sample, without bound (1.3 samples per message:
/// 3-4 MB more RSS after 300,000 messages).
pub async fn upkeep(period: Duration, stop: tokio_util::sync::CancellationToken) {
    let mut ticks = tokio::time::interval(period);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticks.tick() => install().run_upkeep(),
            _ = stop.cancelled() => return,
        }
    }
}

fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_gauge!("sio_push_sockets_connected", "Connected sockets, per site and protocol generation");
    describe_gauge!("sio_push_devices_registered", "Devices in the registry");
    describe_gauge!("sio_push_devices_connected", "Devices with a connected socket");
    describe_gauge!("sio_push_queued_messages", "Messages waiting in device queues");
    describe_gauge!("sio_push_queued_bytes", Unit::Bytes, "Bytes waiting in device queues");
    describe_counter!(
        "sio_push_relay_notices_total",
        "Live messages handed between nodes of a Redis store, by direction (sent, received)"
    );
    describe_counter!(
        "sio_push_redis_round_trips_total",
        "Requests to Redis (one command or one pipeline each) made by this node"
    );
    describe_counter!("sio_push_relay_gaps_total", "Times this node's relay subscription was lost and restored");
    describe_counter!(
        "sio_push_relay_missing_total",
        "Live messages from another node that never came, each reconnecting its socket to get its queue in order"
    );
    describe_counter!("sio_push_messages_accepted_total", "POST /send requests accepted (200)");
    describe_counter!("sio_push_messages_stored_total", "Message copies stored into device queues");
    describe_counter!("sio_push_messages_delivered_total", "Messages emitted to sockets, by path (live or batch)");
    describe_counter!("sio_push_messages_acked_total", "Messages acknowledged by clients");
    describe_counter!("sio_push_messages_dropped_total", "Messages dropped from full queues");
    describe_counter!("sio_push_devices_expired_total", "Devices forgotten after device_ttl");
    describe_counter!("sio_push_resyncs_total", "_resync events sent");
    describe_counter!("sio_push_slow_consumers_total", "Sockets disconnected because their buffer was full");
    describe_gauge!("sio_push_connections_open", "TCP connections open on the main listener");
    describe_counter!("sio_push_connections_refused_total", "Connections closed at once, over a connection cap");
    describe_gauge!("sio_push_sessions_unauthenticated", "socket.io sessions that have not joined a site yet");
    describe_counter!(
        "sio_push_sessions_refused_total",
        "socket.io sessions closed at once, over max_unauthenticated_sessions"
    );
    describe_counter!("sio_push_auth_requests_total", "Calls to auth_url, by outcome");
    describe_histogram!("sio_push_auth_duration_seconds", Unit::Seconds, "Latency of auth_url calls");
    describe_counter!("sio_push_presence_callbacks_total", "Presence PUTs to update_user_url, by outcome");
    describe_histogram!("sio_push_send_duration_seconds", Unit::Seconds, "Latency of POST /send");
    describe_histogram!(
        "sio_push_store_flush_duration_seconds",
        Unit::Seconds,
        "Latency of one write of the store's write-ahead log, with its sync when the round holds a message or a registration"
    );
    describe_histogram!("sio_push_store_round_size", "Store jobs sharing one write-ahead log write");
    describe_histogram!("sio_push_batch_size", "Messages per _batch");
}

/// The current totals.
pub fn totals() -> TotalsSnapshot {
    TotalsSnapshot {
        accepted: TOTALS.accepted.load(Ordering::Relaxed),
        stored: TOTALS.stored.load(Ordering::Relaxed),
        delivered: TOTALS.delivered.load(Ordering::Relaxed),
        acked: TOTALS.acked.load(Ordering::Relaxed),
    }
}

/// The handles of the metrics every message touches, registered once per site. Through the
/// macros, each call built a labelled key (allocating the label) and looked it up in the
/// registry: several allocations and hashes per message.
struct SiteHandles {
    accepted: Counter,
    send_duration: Histogram,
    stored: Counter,
    delivered_live: Counter,
    acked: Counter,
}

impl SiteHandles {
    fn new(site: &str) -> Self {
        let site = site.to_owned();
        Self {
            accepted: counter!("sio_push_messages_accepted_total", "site" => site.clone()),
            send_duration: histogram!("sio_push_send_duration_seconds", "site" => site.clone()),
            stored: counter!("sio_push_messages_stored_total", "site" => site.clone()),
            delivered_live: counter!("sio_push_messages_delivered_total", "site" => site.clone(), "via" => "live"),
            acked: counter!("sio_push_messages_acked_total", "site" => site),
        }
    }
}

/// The per-site handles, registered with the recorder on first use.
fn site_handles(site: &str) -> Arc<SiteHandles> {
    static SITES: OnceLock<RwLock<HashMap<String, Arc<SiteHandles>>>> = OnceLock::new();
    let sites = SITES.get_or_init(|| {
        install(); // handles taken before the recorder exists would record nothing
        RwLock::default()
    });
    if let Some(handles) = sites.read().unwrap_or_else(|e| e.into_inner()).get(site) {
        return handles.clone();
    }
    let mut sites = sites.write().unwrap_or_else(|e| e.into_inner());
    sites.entry(site.to_owned()).or_insert_with(|| Arc::new(SiteHandles::new(site))).clone()
}

/// A `/send` was answered 200 after `took`.
pub fn accepted(site: &str, took: Duration) {
    TOTALS.accepted.fetch_add(1, Ordering::Relaxed);
    let handles = site_handles(site);
    handles.accepted.increment(1);
    handles.send_duration.record(took.as_secs_f64());
}

/// `n` copies of a message were stored.
pub fn stored(site: &str, n: u64) {
    TOTALS.stored.fetch_add(n, Ordering::Relaxed);
    site_handles(site).stored.increment(n);
}

/// `n` messages were emitted live.
pub fn delivered_live(site: &str, n: u64) {
    TOTALS.delivered.fetch_add(n, Ordering::Relaxed);
    site_handles(site).delivered_live.increment(n);
}

/// A `_batch` of `n` messages was emitted.
pub fn delivered_batch(site: &str, n: u64) {
    TOTALS.delivered.fetch_add(n, Ordering::Relaxed);
    counter!("sio_push_messages_delivered_total", "site" => site.to_owned(), "via" => "batch").increment(n);
    histogram!("sio_push_batch_size", "site" => site.to_owned()).record(n as f64);
}

/// `n` messages were acknowledged.
pub fn acked(site: &str, n: u64) {
    TOTALS.acked.fetch_add(n, Ordering::Relaxed);
    site_handles(site).acked.increment(n);
}

/// `n` messages were dropped from a full queue.
pub fn dropped(site: &str, n: u64) {
    counter!("sio_push_messages_dropped_total", "site" => site.to_owned()).increment(n);
}

/// A device expired.
pub fn expired(site: &str) {
    counter!("sio_push_devices_expired_total", "site" => site.to_owned()).increment(1);
}

/// A socket was disconnected for not reading.
pub fn slow_consumer(site: &str) {
    counter!("sio_push_slow_consumers_total", "site" => site.to_owned()).increment(1);
}

/// The main listener holds `open` connections.
pub fn connections(open: usize) {
    static OPEN: OnceLock<metrics::Gauge> = OnceLock::new();
    OPEN.get_or_init(|| gauge!("sio_push_connections_open")).set(open as f64);
}

/// Sets the count of sessions that have not joined a site, and adds those refused since.
pub fn unauthenticated_sessions(open: usize, refused: u64) {
    gauge!("sio_push_sessions_unauthenticated").set(open as f64);
    counter!("sio_push_sessions_refused_total").increment(refused);
}

/// A connection was closed at once, over a cap.
pub fn connection_refused() {
    static REFUSED: OnceLock<metrics::Counter> = OnceLock::new();
    REFUSED.get_or_init(|| counter!("sio_push_connections_refused_total")).increment(1);
}

/// A relay notice was sent to another node, or received (`direction`).
pub fn relay_notice(direction: &'static str) {
    counter!("sio_push_relay_notices_total", "direction" => direction).increment(1);
}

/// The relay subscription was lost and is back: notices published meanwhile were missed.
pub fn relay_gap() {
    counter!("sio_push_relay_gaps_total").increment(1);
}

/// A request (a command or a pipeline) went to Redis.
pub fn redis_round_trip() {
    counter!("sio_push_redis_round_trips_total").increment(1);
}

/// A live message that a later one follows never came from its node.
pub fn relay_missing() {
    counter!("sio_push_relay_missing_total").increment(1);
}

/// A `_resync` was sent.
pub fn resync(site: &str) {
    counter!("sio_push_resyncs_total", "site" => site.to_owned()).increment(1);
}

/// An auth call ended with `outcome` (`ok`, `refused`, `error`; `busy` when no slot could be had)
/// after `took`.
pub fn auth(site: &str, outcome: &'static str, took: Duration) {
    counter!("sio_push_auth_requests_total", "site" => site.to_owned(), "outcome" => outcome).increment(1);
    histogram!("sio_push_auth_duration_seconds", "site" => site.to_owned()).record(took.as_secs_f64());
}

/// A presence callback ended with `outcome` (`ok`, `refused`, `error`).
pub fn presence(site: &str, outcome: &'static str) {
    counter!("sio_push_presence_callbacks_total", "site" => site.to_owned(), "outcome" => outcome).increment(1);
}

/// A socket of `protocol` (`v4` for 1.x/2.x clients, `v5` for 3.x/4.x) connected (+1) or left (-1).
pub fn socket(site: &str, protocol: &'static str, delta: f64) {
    gauge!("sio_push_sockets_connected", "site" => site.to_owned(), "protocol" => protocol).increment(delta);
}

/// One store round of `jobs` jobs shared a log write (and sync) that took `took`.
pub fn store_round(jobs: usize, took: Duration) {
    histogram!("sio_push_store_flush_duration_seconds").record(took.as_secs_f64());
    histogram!("sio_push_store_round_size").record(jobs as f64);
}

/// Sets the registry gauges of one site from a store scan.
pub fn registry(site: &str, s: &SiteStats) {
    gauge!("sio_push_devices_registered", "site" => site.to_owned()).set(s.devices as f64);
    gauge!("sio_push_devices_connected", "site" => site.to_owned()).set(s.connected as f64);
    gauge!("sio_push_queued_messages", "site" => site.to_owned()).set(s.queued_messages as f64);
    gauge!("sio_push_queued_bytes", "site" => site.to_owned()).set(s.queued_bytes as f64);
}
