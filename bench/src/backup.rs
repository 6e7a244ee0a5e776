//! The `backup` scenario: what moving the data costs. A snapshot of N devices with K queued
//! messages each is generated, then timed through the real binary: `restore` into a fresh data
//! dir, `verify`, a server on it, `backup` through its admin API (and the file's size), and
//! how `/send` latency (one request at a time) changes while that backup runs. Then `M`
//! messages in the old service's Redis layout are loaded into a `redis-server` and timed
//! through `import-redis`.

use std::io::Write;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde_json::json;
use sio_push::snapshot::SnapshotWriter;
use sio_push::store::{DeviceKey, DeviceState, Queued, Record};

use crate::server::{site_env, Redis, Server, Store};
use crate::{dir_bytes, percentile, secs};

const TOKEN: &str = "bench-admin-token-0123456789";

/// One message as the bench queues it: about 100 bytes, like a small notification.
fn entry(device: usize, i: usize) -> String {
    format!(r#"["msg",{{"id":{i},"device":{device},"text":"a message of about a hundred bytes, for sizes"}}]"#)
}

pub async fn run(
    bin: &str,
    devices: usize,
    per_device: usize,
    import: usize,
) -> anyhow::Result<serde_json::Map<String, serde_json::Value>> {
    let work = tempfile::tempdir()?;
    let snapshot = work.path().join("generated.snapshot");
    let started = Instant::now();
    generate(&snapshot, devices, per_device)?;
    let generated = started.elapsed();
    let data = tempfile::tempdir()?;
    let env = site_env(data.path(), "http://127.0.0.1:9/auth");

    let restore = timed(bin, &["restore", "--input", path(&snapshot), "--force"], &env).await?;
    let verify = timed(bin, &["verify"], &env).await?;
    let data_bytes = dir_bytes(data.path())?;

    let admin_port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let admin = vec![
        ("SIO_PUSH_ADMIN__LISTEN", format!("127.0.0.1:{admin_port}")),
        ("SIO_PUSH_ADMIN__TOKEN", TOKEN.to_owned()),
    ];
    let server = Server::start_with(bin, Store::Sled, data, admin.clone()).await?;
    let http = reqwest::Client::new();
    let body = json!({ "rooms": ["user_0"], "event": "msg", "args": ["latency probe"] });
    // Latency without a backup, then during one (as many sends as the backup lasts).
    let quiet = sends_while(&server, &http, &body, SendsFor::Count(2_000)).await?;
    let backup_file = work.path().join("online.snapshot");
    let mut backup_env = env.clone();
    backup_env.extend(admin);
    let backup = spawn(bin, &["backup", "--output", path(&backup_file)], &backup_env)?;
    let backup_started = Instant::now();
    let during = sends_while(&server, &http, &body, SendsFor::Process(backup)).await?;
    let backup_secs = backup_started.elapsed();
    let backup_bytes = std::fs::metadata(&backup_file)?.len();
    server.stop().await?;

    let imported = import_old_layout(bin, work.path(), import).await?;
    let figures = json!({
        "devices": devices,
        "messages_per_device": per_device,
        "queued_messages": devices * per_device,
        "snapshot_mib": mib(std::fs::metadata(&snapshot)?.len()),
        "generate_secs": secs(generated.as_secs_f64()),
        "restore_secs": secs(restore.as_secs_f64()),
        "restored_data_dir_mib": mib(data_bytes),
        "verify_secs": secs(verify.as_secs_f64()),
        "online_backup_secs": secs(backup_secs.as_secs_f64()),
        "online_backup_mib": mib(backup_bytes),
        "send_p50_ms_quiet": percentile(&quiet, 0.5),
        "send_p99_ms_quiet": percentile(&quiet, 0.99),
        "send_max_ms_quiet": percentile(&quiet, 1.0),
        "sends_during_backup": during.len(),
        "send_p50_ms_during_backup": percentile(&during, 0.5),
        "send_p99_ms_during_backup": percentile(&during, 0.99),
        "send_max_ms_during_backup": percentile(&during, 1.0),
        "import_messages": import,
        "import_secs": secs(imported.as_secs_f64()),
    });
    Ok(figures.as_object().cloned().expect("an object"))
}

/// Writes a snapshot of `devices` devices of site `bench` (user `user_N`, device `d`), each with
/// `per_device` messages.
fn generate(file: &Path, devices: usize, per_device: usize) -> anyhow::Result<()> {
    let out = std::io::BufWriter::with_capacity(1 << 20, std::fs::File::create(file)?);
    let next_id = (devices * per_device + 1) as u64;
    let mut writer = SnapshotWriter::new(out, 0, next_id)?;
    let mut id = 1u64;
    for d in 0..devices {
        let key = DeviceKey::new("bench", &format!("user_{d}"), "d");
        let state = DeviceState { disconnected_at: 1, ..DeviceState::default() };
        writer.record(Record::Device { key: key.clone(), state })?;
        for i in 0..per_device {
            let message = Queued { id, queued_at: 1, entry: entry(d, i).into() };
            writer.record(Record::Message { device: key.clone(), message, shared: false })?;
            id += 1;
        }
    }
    writer.finish()?.1.flush()?;
    Ok(())
}

enum SendsFor {
    Count(usize),
    /// Until this process exits (successfully).
    Process(tokio::process::Child),
}

/// `POST /send` one at a time; the latency of each, sorted.
async fn sends_while(
    server: &Server,
    http: &reqwest::Client,
    body: &serde_json::Value,
    until: SendsFor,
) -> anyhow::Result<Vec<Duration>> {
    let mut took = Vec::new();
    match until {
        SendsFor::Count(n) => {
            for _ in 0..n {
                let t = Instant::now();
                server.send(http, body).await?;
                took.push(t.elapsed());
            }
        }
        SendsFor::Process(mut child) => loop {
            if let Some(status) = child.try_wait()? {
                if !status.success() {
                    bail!("the backup failed: {status}");
                }
                break;
            }
            let t = Instant::now();
            server.send(http, body).await?;
            took.push(t.elapsed());
        },
    }
    took.sort();
    Ok(took)
}

/// Fills a `redis-server` with `messages` messages in the old service's layout (1,000 devices
/// or fewer, three events each) and times `import-redis` into a fresh data dir.
async fn import_old_layout(bin: &str, work: &Path, messages: usize) -> anyhow::Result<Duration> {
    let redis_dir = tempfile::tempdir_in(work)?;
    let redis = Redis::start(redis_dir.path(), false).await?;
    let devices = messages.clamp(1, 1_000);
    let mut resp = Vec::new();
    for n in 0..messages {
        let (device, event) = (n % devices, ["order", "chat", "news"][n % 3]);
        let key = format!("/bench:socket.io:user_{device}:d:{event}");
        let flake = ((1_767_225_600_000u64 + n as u64) << 22).to_string();
        let item = format!("{flake}:{}", entry(device, n).replace("\"msg\"", &format!("\"{event}\"")));
        write!(resp, "*3\r\n$5\r\nRPUSH\r\n${}\r\n{key}\r\n${}\r\n{item}\r\n", key.len(), item.len())?;
    }
    let mut cli = tokio::process::Command::new("redis-cli")
        .args(["-p", &redis.port.to_string(), "--pipe"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .context("cannot run redis-cli (Debian's redis-tools)")?;
    {
        use tokio::io::AsyncWriteExt;
        let mut stdin = cli.stdin.take().context("no stdin")?;
        stdin.write_all(&resp).await?;
    }
    let out = cli.wait_with_output().await?;
    if !out.status.success() || !String::from_utf8_lossy(&out.stdout).contains("errors: 0") {
        bail!("redis-cli --pipe: {}", String::from_utf8_lossy(&out.stdout));
    }
    let data = tempfile::tempdir_in(work)?;
    let mut env = site_env(data.path(), "http://127.0.0.1:9/auth");
    env.push(("REDIS_URL", format!("redis://127.0.0.1:{}/", redis.port)));
    let took = timed(bin, &["import-redis"], &env).await?;
    drop(redis);
    Ok(took)
}

fn spawn(bin: &str, args: &[&str], env: &[(&str, String)]) -> anyhow::Result<tokio::process::Child> {
    tokio::process::Command::new(bin)
        .args(args)
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("cannot start {bin}"))
}

/// Runs an operator command to its end; how long it took.
async fn timed(bin: &str, args: &[&str], env: &[(&str, String)]) -> anyhow::Result<Duration> {
    let started = Instant::now();
    let status = spawn(bin, args, env)?.wait().await?;
    if !status.success() {
        bail!("sio-push {} failed: {status}", args.join(" "));
    }
    Ok(started.elapsed())
}

fn path(p: &Path) -> &str {
    p.to_str().expect("temporary paths are UTF-8")
}

fn mib(bytes: u64) -> f64 {
    (bytes as f64 / (1 << 20) as f64 * 10.0).round() / 10.0
}
