//! `sio-push-bench`: a load generator for sio-push.
//!
//! It starts the server binary itself (on a fresh data dir, configured through the old service's
//! environment variables) and a mock auth endpoint, then drives the server with its own
//! socket.io protocol-5 clients over websocket: a few hundred bytes each, so one process can hold
//! tens of thousands of connections. Every scenario is bounded in time, prints one JSON line and
//! a table, and reports the server's CPU time (from /proc) beside throughput, so figures can be
//! compared as work per CPU second.
//!
//! Scenarios: `connect` (N idle clients: connect latency, RSS and CPU per connection),
//! `unicast` (M messages to N acking clients with C requests in flight: throughput, latency from
//! POST start to client receipt, exactly-once check), `fanout` (one POST to a shared room of N
//! users, repeated: deliveries/s, time until the last device has it, CPU in the second after)
//! and `replay` (N offline devices with K queued messages reconnect: time until every batch is
//! complete) and `restart` (a data dir holding K messages on each of N devices: time until the
//! restarted server answers `/healthcheck` and a first `_batch` arrives, and its RSS). `smoke`
//! runs each small, for the test suite: it checks correctness only.

mod backup;
mod client;
mod server;
mod store;

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::{Args, Parser, Subcommand};
use serde_json::json;
use tokio::sync::mpsc;

use crate::client::{Client, Received};
use crate::server::{own_cpu, RedisWork, Server, Store};

#[derive(Parser)]
#[command(name = "sio-push-bench", about = "Load generator for sio-push")]
struct Cli {
    #[command(subcommand)]
    scenario: Scenario,
}

#[derive(Subcommand)]
enum Scenario {
    /// Open N idle clients: connect time, server RSS and CPU per connection.
    Connect(ConnectArgs),
    /// M messages to N acking clients, C requests in flight.
    Unicast(UnicastArgs),
    /// One POST to a shared room of N connected users, repeated R times.
    Fanout(FanoutArgs),
    /// N offline devices with K queued messages each reconnect at once.
    Replay(ReplayArgs),
    /// A data dir with K queued messages on each of N devices: time until serving again.
    Restart(ReplayArgs),
    /// R POSTs of B bytes to a shared room of N offline devices: what one message costs the
    /// store as its audience grows (time to answer, bytes written, memory).
    Queue(QueueArgs),
    /// The store alone, filled with N devices, K messages queued on each and N idempotency keys:
    /// what `/metrics` (the store's totals) and the sweep cost its writer.
    Store(StoreArgs),
    /// A snapshot of N devices with K queued messages each: restore, verify, an online backup and
    /// the /send latency while it runs; and `import-redis` of M messages in the old layout.
    Backup(BackupArgs),
    /// Each, small, checking only correctness (for the test suite); `restart` only on sled.
    Smoke(Common),
}

#[derive(Args, Clone)]
struct Common {
    /// The sio-push binary to start.
    #[arg(long, default_value = "target/release/sio-push")]
    server_bin: String,
    /// Give up after this many seconds.
    #[arg(long, default_value_t = 300)]
    timeout_secs: u64,
    /// Run this many nodes on one Redis (a `redis-server` started here) instead of one on
    /// sled. Clients connect to the nodes in turn; a message for a client is posted to
    /// another node than the client's (`connect`, `unicast`, `fanout`, `replay`).
    #[arg(long, default_value_t = 0)]
    redis_nodes: usize,
    /// With `--redis-nodes`: Redis's `appendfsync` (`always` gives the sled promise).
    #[arg(long, default_value = "always", value_parser = ["always", "everysec"])]
    redis_fsync: String,
}

impl Common {
    /// How long a scenario may run.
    fn limit(&self) -> Duration {
        Duration::from_secs(self.timeout_secs)
    }

    fn store(&self) -> Store {
        match self.redis_nodes {
            0 => Store::Sled,
            nodes => Store::Redis { nodes, fsync_always: self.redis_fsync == "always" },
        }
    }

    async fn start(&self) -> anyhow::Result<Server> {
        Server::start(&self.server_bin, self.store()).await
    }

    /// Scenarios that restart or measure one data dir run on sled only.
    fn sled_only(&self, scenario: &str) -> anyhow::Result<()> {
        if self.redis_nodes > 0 {
            bail!("{scenario} measures sled's data dir: it does not take --redis-nodes");
        }
        Ok(())
    }
}

/// Adds Redis's figures since `before` (if the server runs on Redis), per `units` `unit`s.
async fn add_redis_work(
    figures: &mut serde_json::Value,
    server: &Server,
    http: &reqwest::Client,
    before: Option<RedisWork>,
    units: usize,
    unit: &str,
) -> anyhow::Result<()> {
    if let (Some(before), Some(after)) = (before, server.redis_work(http).await?) {
        let extra = after.per(&before, units, unit);
        let out = figures.as_object_mut().expect("an object");
        out.insert("nodes".into(), server.node_count().into());
        out.extend(extra.as_object().cloned().expect("an object"));
    }
    Ok(())
}

#[derive(Args)]
struct ConnectArgs {
    #[command(flatten)]
    common: Common,
    /// Clients to open.
    #[arg(long, default_value_t = 1000)]
    clients: usize,
    /// Connections being opened at once.
    #[arg(long, default_value_t = 100)]
    concurrency: usize,
}

#[derive(Args)]
struct UnicastArgs {
    #[command(flatten)]
    common: Common,
    /// Connected, acking clients (distinct users).
    #[arg(long, default_value_t = 1000)]
    clients: usize,
    /// Messages to send, round-robin over the clients' user rooms.
    #[arg(long, default_value_t = 20_000)]
    messages: usize,
    /// POST /send requests in flight.
    #[arg(long, default_value_t = 50)]
    concurrency: usize,
}

#[derive(Args)]
struct FanoutArgs {
    #[command(flatten)]
    common: Common,
    /// Connected users, all in the shared room.
    #[arg(long, default_value_t = 10_000)]
    clients: usize,
    /// POSTs to the shared room, one after the other.
    #[arg(long, default_value_t = 10)]
    rounds: usize,
}

#[derive(Args)]
struct ReplayArgs {
    #[command(flatten)]
    common: Common,
    /// Offline devices.
    #[arg(long, default_value_t = 1000)]
    clients: usize,
    /// Messages queued for each.
    #[arg(long, default_value_t = 100)]
    per_device: usize,
}

#[derive(Args)]
struct QueueArgs {
    #[command(flatten)]
    common: Common,
    /// Offline devices, all in the shared room.
    #[arg(long, default_value_t = 10_000)]
    clients: usize,
    /// POSTs to the shared room, one after the other.
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    /// Size of each message's argument, in bytes (`max_message_bytes` is 512 KiB).
    #[arg(long, default_value_t = 500_000)]
    bytes: usize,
}

#[derive(Args)]
struct BackupArgs {
    /// The sio-push binary.
    #[arg(long, default_value = "target/release/sio-push")]
    server_bin: String,
    /// Devices in the snapshot.
    #[arg(long, default_value_t = 10_000)]
    devices: usize,
    /// Messages queued on each.
    #[arg(long, default_value_t = 100)]
    per_device: usize,
    /// Messages in the old service's Redis layout to import.
    #[arg(long, default_value_t = 100_000)]
    import_messages: usize,
    /// Give up after this many seconds.
    #[arg(long, default_value_t = 900)]
    timeout_secs: u64,
}

#[derive(Args)]
struct StoreArgs {
    /// Registered devices (one user room each, all in one shared room), and idempotency keys.
    #[arg(long, default_value_t = 100_000)]
    devices: usize,
    /// Messages queued on every device (each one `/send` to the shared room).
    #[arg(long, default_value_t = 10)]
    per_device: usize,
    /// Give up after this many seconds.
    #[arg(long, default_value_t = 900)]
    timeout_secs: u64,
}

/// One thread: the generator then competes with the server for at most one of the two cores,
/// and its threads do not wake each other (with two workers, context switches were the largest
/// part of its profile, and they slowed the server too: unicast measured 16k msg/s at 0.071 ms
/// of server CPU per message, against 19k at 0.062 ms on one thread).
#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    raise_fd_limit();
    let cli = Cli::parse();
    match cli.scenario {
        Scenario::Connect(a) => run("connect", a.common.limit(), connect(&a.common, a.clients, a.concurrency)).await,
        Scenario::Unicast(a) => {
            run("unicast", a.common.limit(), unicast(&a.common, a.clients, a.messages, a.concurrency)).await
        }
        Scenario::Fanout(a) => run("fanout", a.common.limit(), fanout(&a.common, a.clients, a.rounds)).await,
        Scenario::Replay(a) => run("replay", a.common.limit(), replay(&a.common, a.clients, a.per_device)).await,
        Scenario::Restart(a) => run("restart", a.common.limit(), restart(&a.common, a.clients, a.per_device)).await,
        Scenario::Queue(a) => run("queue", a.common.limit(), queue(&a.common, a.clients, a.rounds, a.bytes)).await,
        Scenario::Store(a) => {
            run("store", Duration::from_secs(a.timeout_secs), crate::store::run(a.devices, a.per_device)).await
        }
        Scenario::Backup(a) => {
            let figures = backup::run(&a.server_bin, a.devices, a.per_device, a.import_messages);
            run("backup", Duration::from_secs(a.timeout_secs), figures).await
        }
        Scenario::Smoke(common) => {
            let limit = common.limit().min(Duration::from_secs(120));
            run("connect", limit, connect(&common, 50, 10)).await?;
            run("unicast", limit, unicast(&common, 50, 1000, 20)).await?;
            run("fanout", limit, fanout(&common, 50, 5)).await?;
            run("replay", limit, replay(&common, 20, 10)).await?;
            if common.redis_nodes == 0 {
                run("restart", limit, restart(&common, 20, 10)).await?;
            }
            println!("smoke: every message arrived exactly once");
            Ok(())
        }
    }
}

/// Runs one scenario within `limit` and reports its figures.
async fn run(
    scenario: &str,
    limit: Duration,
    figures: impl std::future::Future<Output = anyhow::Result<serde_json::Map<String, serde_json::Value>>>,
) -> anyhow::Result<()> {
    let out = tokio::time::timeout(limit, figures)
        .await
        .map_err(|_| anyhow::anyhow!("{scenario} did not finish within {} s", limit.as_secs()))??;
    report(scenario, &out);
    Ok(())
}

/// Prints the figures as one JSON line, then as a table.
fn report(scenario: &str, figures: &serde_json::Map<String, serde_json::Value>) {
    let mut line = figures.clone();
    line.insert("scenario".into(), scenario.into());
    println!("{}", serde_json::Value::Object(line));
    for (key, value) in figures {
        println!("  {key:<32} {value}");
    }
}

/// Lets this process and the server it starts hold tens of thousands of sockets.
fn raise_fd_limit() {
    // SAFETY: getrlimit/setrlimit with a valid, zero-initialised struct.
    unsafe {
        let mut limit: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 {
            // Tens of thousands of clients, and the server (a child) as many: root may raise the
            // hard limit too; anyone may raise the soft limit to the hard one.
            let hard = limit.rlim_max;
            limit.rlim_cur = hard.max(1 << 18);
            limit.rlim_max = limit.rlim_cur;
            if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                limit.rlim_cur = hard;
                limit.rlim_max = hard;
                libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
            }
        }
    }
}

/// CPU seconds per server thread name between two readings (to the millisecond), leaving out
/// threads that did not run.
fn cpu_by_thread_since(before: &BTreeMap<String, f64>, after: &BTreeMap<String, f64>) -> serde_json::Value {
    let spent = after.iter().filter_map(|(name, secs)| {
        let secs = secs - before.get(name).unwrap_or(&0.0);
        (secs > 0.0).then(|| (name.clone(), serde_json::Value::from(self::secs(secs))))
    });
    serde_json::Value::Object(spent.collect())
}

/// The `p` quantile of sorted durations, in milliseconds to two decimals.
/// Seconds rounded to milliseconds, for the JSON line.
fn secs(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    (sorted[i].as_secs_f64() * 100_000.0).round() / 100.0
}

/// Opens `n` clients, `concurrency` at a time; returns them with their connect times.
async fn open_clients(
    server: &Server,
    n: usize,
    concurrency: usize,
    received: Option<mpsc::UnboundedSender<Received>>,
) -> anyhow::Result<(Vec<Client>, Vec<Duration>)> {
    let mut clients = Vec::with_capacity(n);
    let mut times = Vec::with_capacity(n);
    for chunk in (0..n).collect::<Vec<_>>().chunks(concurrency) {
        let batch = futures_util::future::join_all(chunk.iter().map(|i| {
            let received = received.clone();
            async move {
                let started = Instant::now();
                let client = Client::connect(server.addr_for(*i), "bench", *i, received).await?;
                anyhow::Ok((client, started.elapsed()))
            }
        }))
        .await;
        for result in batch {
            let (client, took) = result?;
            clients.push(client);
            times.push(took);
        }
    }
    Ok((clients, times))
}

async fn connect(
    common: &Common,
    n: usize,
    concurrency: usize,
) -> anyhow::Result<serde_json::Map<String, serde_json::Value>> {
    let server = common.start().await?;
    let http = reqwest::Client::new();
    let redis_before = server.redis_work(&http).await?;
    let (rss_before, cpu_before, threads_before) =
        (server.rss_kib()?, server.cpu_secs()?, server.cpu_secs_by_thread()?);
    let own_before = own_cpu()?;
    let started = Instant::now();
    let (clients, mut times) = open_clients(&server, n, concurrency, None).await?;
    let elapsed = started.elapsed();
    // Let the connections settle (auth done, _settings sent) before measuring memory.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (rss_after, cpu_after) = (server.rss_kib()?, server.cpu_secs()?);
    let threads = cpu_by_thread_since(&threads_before, &server.cpu_secs_by_thread()?);
    let own = (own_cpu()? - own_before).total(); // its clients and the mock auth endpoint
    times.sort();
    let mut figures = json!({
        "clients": n,
        "connect_concurrency": concurrency,
        "connects_per_sec": (n as f64 / elapsed.as_secs_f64()).round(),
        "connect_ms_p50": percentile(&times, 0.5),
        "connect_ms_p99": percentile(&times, 0.99),
        "server_rss_kib_before": rss_before,
        "server_rss_kib_after": rss_after,
        "server_kib_per_connection": ((rss_after as f64 - rss_before as f64) / n as f64 * 10.0).round() / 10.0,
        "server_cpu_ms_per_connect": secs((cpu_after - cpu_before) * 1000.0 / n as f64),
        "server_cpu_secs_by_thread": threads,
        "generator_cpu_secs": secs(own),
    });
    add_redis_work(&mut figures, &server, &http, redis_before, n, "connect").await?;
    drop(clients);
    server.stop().await?;
    Ok(figures.as_object().cloned().expect("an object"))
}

async fn unicast(
    common: &Common,
    n: usize,
    m: usize,
    concurrency: usize,
) -> anyhow::Result<serde_json::Map<String, serde_json::Value>> {
    let server = common.start().await?;
    let (tx, mut rx) = mpsc::unbounded_channel();
    let (clients, _) = open_clients(&server, n, 100, Some(tx)).await?;
    let http = reqwest::Client::builder().pool_max_idle_per_host(concurrency).build()?;
    let redis_before = server.redis_work(&http).await?;
    let (cpu_before, threads_before) = (server.cpu()?, server.cpu_secs_by_thread()?);
    let (own_before, rss_before) = (own_cpu()?, server.rss_kib()?);
    let started = Instant::now();
    let next = std::sync::atomic::AtomicUsize::new(0);
    let sent_at: Vec<std::sync::Mutex<Option<Instant>>> = (0..m).map(|_| std::sync::Mutex::new(None)).collect();
    // A scope, so the senders' borrow of `server` ends before it is stopped.
    let (counts, mut latencies, delivered, posted) = {
        let senders = (0..concurrency).map(|_| async {
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= m {
                    return anyhow::Ok(());
                }
                *sent_at[i].lock().unwrap() = Some(Instant::now());
                let body = json!({ "rooms": [format!("user_{}", i % n)], "event": "msg", "args": [i] });
                server.send_for(&http, i % n, &body).await?;
            }
        });
        let posting = futures_util::future::try_join_all(senders);
        let receiving = async {
            let mut counts: HashMap<usize, u32> = HashMap::with_capacity(m);
            let mut latencies = Vec::with_capacity(m);
            while counts.len() < m {
                let got = rx.recv().await.context("clients stopped")?;
                *counts.entry(got.id).or_default() += 1;
                if let Some(at) = *sent_at[got.id].lock().unwrap() {
                    latencies.push(got.at.saturating_duration_since(at));
                }
            }
            anyhow::Ok((counts, latencies))
        };
        tokio::pin!(posting, receiving);
        let mut posted = None;
        let (counts, latencies) = loop {
            tokio::select! {
                r = &mut posting, if posted.is_none() => { r?; posted = Some(started.elapsed()); }
                r = &mut receiving => break r?,
            }
        };
        let delivered = started.elapsed();
        let posted = match posted {
            Some(p) => p,
            None => {
                posting.await?;
                started.elapsed()
            }
        };
        (counts, latencies, delivered, posted)
    };
    // Acks travel after receipt: give the server a moment to record them before reading its CPU.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let cpu = server.cpu()? - cpu_before;
    let threads = cpu_by_thread_since(&threads_before, &server.cpu_secs_by_thread()?);
    let (own, rss_after) = (own_cpu()? - own_before, server.rss_kib()?);
    let duplicates: u32 = counts.values().map(|c| c - 1).sum();
    latencies.sort();
    let mut figures = json!({
        "clients": n,
        "messages": m,
        "posts_in_flight": concurrency,
        "posts_per_sec": (m as f64 / posted.as_secs_f64()).round(),
        "delivered_per_sec": (m as f64 / delivered.as_secs_f64()).round(),
        "latency_ms_p50": percentile(&latencies, 0.5),
        "latency_ms_p99": percentile(&latencies, 0.99),
        "latency_ms_max": percentile(&latencies, 1.0),
        "server_cpu_secs": secs(cpu.total()),
        "server_kernel_cpu_secs": secs(cpu.system),
        "server_cpu_ms_per_message": secs(cpu.total() * 1000.0 / m as f64),
        "server_cpu_secs_by_thread": threads,
        "generator_cpu_secs": secs(own.total()),
        "generator_kernel_cpu_secs": secs(own.system),
        "server_rss_kib_before": rss_before,
        "server_rss_kib_after": rss_after,
        "lost": m - counts.len(),
        "duplicates": duplicates,
    });
    add_redis_work(&mut figures, &server, &http, redis_before, m, "message").await?;
    drop(clients);
    server.stop().await?;
    if duplicates > 0 {
        bail!("{duplicates} duplicate deliveries: {figures}");
    }
    Ok(figures.as_object().cloned().expect("an object"))
}

async fn fanout(
    common: &Common,
    n: usize,
    rounds: usize,
) -> anyhow::Result<serde_json::Map<String, serde_json::Value>> {
    let server = common.start().await?;
    let (tx, mut rx) = mpsc::unbounded_channel();
    let (clients, _) = open_clients(&server, n, 100, Some(tx)).await?;
    let http = reqwest::Client::new();
    let redis_before = server.redis_work(&http).await?;
    let (cpu_before, threads_before) = (server.cpu()?, server.cpu_secs_by_thread()?);
    let own_before = own_cpu()?;
    let started = Instant::now();
    let mut reach = Vec::with_capacity(rounds);
    for round in 0..rounds {
        let posted = Instant::now();
        let body = json!({ "rooms": ["all"], "event": "msg", "args": [round] });
        server.send_for(&http, round, &body).await?;
        let mut reached = vec![false; n];
        let (mut count, mut last) = (0, posted);
        while count < n {
            let got = rx.recv().await.context("clients stopped")?;
            if got.id != round || std::mem::replace(&mut reached[got.client], true) {
                bail!("client {} got message {} unexpectedly (round {round})", got.client, got.id);
            }
            count += 1;
            last = last.max(got.at);
        }
        reach.push(last.saturating_duration_since(posted));
    }
    let elapsed = started.elapsed();
    let cpu = server.cpu()? - cpu_before;
    let threads = cpu_by_thread_since(&threads_before, &server.cpu_secs_by_thread()?);
    let own = own_cpu()? - own_before;
    // No backlog: how busy the server still is in the second after the last delivery.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let cpu_after = (server.cpu()? - cpu_before - cpu).total();
    reach.sort();
    let mut figures = json!({
        "clients": n,
        "rounds": rounds,
        "deliveries_per_sec": ((n * rounds) as f64 / elapsed.as_secs_f64()).round(),
        "last_device_ms_p50": percentile(&reach, 0.5),
        "last_device_ms_max": percentile(&reach, 1.0),
        "server_cpu_secs": secs(cpu.total()),
        "server_kernel_cpu_secs": secs(cpu.system),
        "server_cpu_secs_in_the_second_after": secs(cpu_after),
        "server_cpu_secs_by_thread": threads,
        "generator_cpu_secs": secs(own.total()),
        "generator_kernel_cpu_secs": secs(own.system),
    });
    add_redis_work(&mut figures, &server, &http, redis_before, n * rounds, "delivery").await?;
    drop(clients);
    server.stop().await?;
    Ok(figures.as_object().cloned().expect("an object"))
}

async fn queue(
    common: &Common,
    n: usize,
    rounds: usize,
    bytes: usize,
) -> anyhow::Result<serde_json::Map<String, serde_json::Value>> {
    common.sled_only("queue")?;
    let server = common.start().await?;
    register_offline(&server, n).await?;
    let http = reqwest::Client::new();
    let (written_before, cpu_before) = (server.written_bytes()?, server.cpu_secs()?);
    let mut answered = Vec::with_capacity(rounds);
    for round in 0..rounds {
        let body = json!({ "rooms": ["all"], "event": "msg", "args": [round, "x".repeat(bytes)] });
        let posted = Instant::now();
        server.send(&http, &body).await?;
        answered.push(posted.elapsed());
    }
    let written = server.written_bytes()? - written_before;
    let cpu = server.cpu_secs()? - cpu_before;
    let peak = server.peak_rss_kib()?;
    answered.sort();
    let stopping = Instant::now();
    let data = server.stop_within(Duration::from_secs(600)).await?;
    let stopped = stopping.elapsed();
    let figures = json!({
        "devices": n,
        "rounds": rounds,
        "message_bytes": bytes,
        "ms_to_answer_p50": percentile(&answered, 0.5),
        "ms_to_answer_max": percentile(&answered, 1.0),
        "mib_written_per_message": (written as f64 / rounds as f64 / (1 << 20) as f64 * 10.0).round() / 10.0,
        "server_cpu_secs_per_message": secs(cpu / rounds as f64),
        "server_peak_rss_mib": (peak as f64 / 1024.0 * 10.0).round() / 10.0,
    "secs_to_stop": secs(stopped.as_secs_f64()),
        "data_dir_mib_after_stop": (dir_bytes(data.path())? as f64 / (1 << 20) as f64 * 10.0).round() / 10.0,
    });
    Ok(figures.as_object().cloned().expect("an object"))
}

/// Bytes of the files under `dir`.
fn dir_bytes(dir: &std::path::Path) -> anyhow::Result<u64> {
    let mut total = 0;
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let meta = entry.metadata()?;
        total += if meta.is_dir() { dir_bytes(&entry.path())? } else { meta.len() };
    }
    Ok(total)
}

/// Registers `n` devices (clients 0..n), then takes them all offline.
async fn register_offline(server: &Server, n: usize) -> anyhow::Result<()> {
    let (clients, _) = open_clients(server, n, 100, None).await?;
    drop(clients);
    // The server notices closed websockets at once; give it a moment to record them.
    tokio::time::sleep(Duration::from_millis(500)).await;
    Ok(())
}

async fn replay(common: &Common, n: usize, k: usize) -> anyhow::Result<serde_json::Map<String, serde_json::Value>> {
    let server = common.start().await?;
    register_offline(&server, n).await?;
    let http = reqwest::Client::new();
    let next = std::sync::atomic::AtomicUsize::new(0);
    let senders = (0..50).map(|_| async {
        loop {
            let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            if i >= n * k {
                return anyhow::Ok(());
            }
            let body = json!({ "rooms": [format!("user_{}", i % n)], "event": "msg", "args": [i] });
            server.send_for(&http, i % n, &body).await?;
        }
    });
    futures_util::future::try_join_all(senders).await?;
    let (tx, mut rx) = mpsc::unbounded_channel();
    let redis_before = server.redis_work(&http).await?;
    let cpu_before = server.cpu_secs()?;
    let started = Instant::now();
    let (clients, _) = open_clients(&server, n, 100, Some(tx)).await?;
    let mut seen = vec![false; n * k];
    for _ in 0..n * k {
        let got = rx.recv().await.context("clients stopped")?;
        if got.id % n != got.client || std::mem::replace(&mut seen[got.id], true) {
            bail!("client {} got message {} unexpectedly", got.client, got.id);
        }
    }
    let elapsed = started.elapsed();
    let cpu = server.cpu_secs()? - cpu_before;
    let mut figures = json!({
        "devices": n,
        "messages_per_device": k,
        "ms_until_every_batch": (elapsed.as_secs_f64() * 100_000.0).round() / 100.0,
        "server_cpu_secs": secs(cpu),
    });
    // Per device: its connect, its `_batch` of `k` and the batch's ack.
    add_redis_work(&mut figures, &server, &http, redis_before, n, "reconnect_with_batch").await?;
    drop(clients);
    server.stop().await?;
    Ok(figures.as_object().cloned().expect("an object"))
}

async fn restart(common: &Common, n: usize, k: usize) -> anyhow::Result<serde_json::Map<String, serde_json::Value>> {
    common.sled_only("restart")?;
    let server = common.start().await?;
    register_offline(&server, n).await?;
    // Fill: each POST to the shared room queues one message on every (offline) device.
    let http = reqwest::Client::new();
    for round in 0..k {
        let body = json!({ "rooms": ["all"], "event": "msg", "args": [round] });
        server.send(&http, &body).await?;
    }
    let data = server.stop().await?;
    let started = Instant::now();
    let server = Server::start_on(&common.server_bin, common.store(), data).await?;
    let serving = started.elapsed();
    let health = http.get(format!("http://{}/healthcheck", server.addr)).send().await?;
    if health.status() != 200 {
        bail!("/healthcheck answered {}", health.status());
    }
    let healthy = started.elapsed();
    let (tx, mut rx) = mpsc::unbounded_channel();
    let (first, _) = open_clients(&server, 1, 1, Some(tx)).await?;
    let mut seen = vec![false; k];
    for _ in 0..k {
        let got = rx.recv().await.context("client stopped")?;
        if got.client != 0 || got.id >= k || std::mem::replace(&mut seen[got.id], true) {
            bail!("client {} got message {} unexpectedly", got.client, got.id);
        }
    }
    let first_batch = started.elapsed();
    let rss = server.rss_kib()?;
    let figures = json!({
        "devices": n,
        "messages_per_device": k,
        "queued_messages": n * k,
        "ms_until_serving": (serving.as_secs_f64() * 100_000.0).round() / 100.0,
        "ms_until_healthcheck": (healthy.as_secs_f64() * 100_000.0).round() / 100.0,
        "ms_until_first_batch": (first_batch.as_secs_f64() * 100_000.0).round() / 100.0,
        "server_rss_mib": (rss as f64 / 1024.0 * 10.0).round() / 10.0,
    });
    drop(first);
    server.stop().await?;
    Ok(figures.as_object().cloned().expect("an object"))
}
