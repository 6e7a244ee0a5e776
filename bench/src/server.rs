//! The server under test: a mock auth endpoint and the sio-push binary on a fresh data dir,
//! configured through the old service's environment variables, with its CPU time and RSS read
//! from /proc. With `Store::Redis`, several sio-push nodes on one `redis-server` (Debian's,
//! started here with the AOF fsynced on every write, the sled promise), with Redis's CPU time
//! and command counts beside theirs.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{bail, Context};
use axum::http::HeaderMap;
use axum::routing::get;
use axum::{Json, Router};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// Where the server keeps its data.
#[derive(Clone, Copy, Debug)]
pub enum Store {
    /// One node on sled (the default).
    Sled,
    /// `nodes` nodes on one Redis, its AOF fsynced `always` or `everysec`.
    Redis { nodes: usize, fsync_always: bool },
}

/// A running server (one node, or several on one Redis) and what it needs.
pub struct Server {
    /// Where the first node listens.
    pub addr: SocketAddr,
    nodes: Vec<Node>,
    redis: Option<Redis>,
    data: tempfile::TempDir,
    auth: tokio::task::JoinHandle<()>,
}

/// One sio-push process.
struct Node {
    addr: SocketAddr,
    send_url: String,
    child: Child,
    pid: u32,
}

/// The `redis-server` the nodes share.
pub struct Redis {
    /// Its loopback port.
    pub port: u16,
    child: Child,
    pid: u32,
}

/// The old service's environment for the one site `bench` (user rooms `user_N`, devices that
/// never expire), with its data in `data`: what the server and the operator commands read.
pub fn site_env(data: &std::path::Path, auth_url: &str) -> Vec<(&'static str, String)> {
    vec![
        ("SIO_PUSH_DATA_DIR", data.display().to_string()),
        ("SITE_NAME", "bench".to_owned()),
        ("AUTH_URL", auth_url.to_owned()),
        ("API_KEY", "bench-key".to_owned()),
        ("USER_ROOM_PREFIX", "user_".to_owned()),
        ("DEVICE_TTL", "0".to_owned()),
    ]
}

/// token `uN` -> rooms `user_N` and `all`.
async fn auth(headers: HeaderMap) -> Json<Vec<String>> {
    let token = headers.get("authorization").and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer u"));
    Json(vec![format!("user_{}", token.unwrap_or("x")), "all".to_string()])
}

impl Server {
    /// Starts the mock auth endpoint and the server on a fresh data dir; returns once it serves.
    pub async fn start(bin: &str, store: Store) -> anyhow::Result<Self> {
        Self::start_on(bin, store, tempfile::tempdir()?).await
    }

    /// As [`Server::start`], on an existing data dir (see [`Server::stop`]).
    pub async fn start_on(bin: &str, store: Store, data: tempfile::TempDir) -> anyhow::Result<Self> {
        Self::start_with(bin, store, data, Vec::new()).await
    }

    /// As [`Server::start_on`], with more environment variables.
    pub async fn start_with(
        bin: &str,
        store: Store,
        data: tempfile::TempDir,
        extra: Vec<(&'static str, String)>,
    ) -> anyhow::Result<Self> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let auth_addr = listener.local_addr()?;
        let auth = tokio::spawn(async move {
            let _ = axum::serve(listener, Router::new().route("/auth", get(auth))).await;
        });
        let mut env = site_env(data.path(), &format!("http://{auth_addr}/auth"));
        env.extend([
            // Per-message log lines would measure the logger: keep warnings and the start line.
            ("RUST_LOG", "warn,sio_push::app=info".to_owned()),
            ("PORT", "0".to_owned()),
            ("SIO_PUSH_SERVER__MAX_CONCURRENT_AUTH", "256".to_owned()),
            ("SIO_PUSH_SITES__BENCH__RATE_LIMIT_PER_SEC", "0".to_owned()),
            ("SIO_PUSH_SERVER__MIN_FREE_DISK_BYTES", "0".to_owned()),
        ]);
        env.extend(extra);
        let (count, redis) = match store {
            Store::Sled => (1, None),
            Store::Redis { nodes, fsync_always } => {
                let redis = Redis::start(data.path(), fsync_always).await?;
                env.push(("SIO_PUSH_STORE__BACKEND", "redis".to_owned()));
                env.push(("SIO_PUSH_STORE__REDIS_URL", format!("redis://127.0.0.1:{}/", redis.port)));
                (nodes.max(1), Some(redis))
            }
        };
        let mut nodes = Vec::with_capacity(count);
        for _ in 0..count {
            nodes.push(Node::start(bin, &env).await?);
        }
        Ok(Self { addr: nodes[0].addr, nodes, redis, data, auth })
    }

    /// Where client `index` connects: the nodes in turn.
    pub fn addr_for(&self, index: usize) -> SocketAddr {
        self.nodes[index % self.nodes.len()].addr
    }

    /// How many sio-push nodes.
    pub fn node_count(&self) -> usize {
        self.nodes.len()
    }

    /// `POST /send` for client `index`'s user, through the node after the one the client is on:
    /// with several nodes, every such message crosses nodes.
    pub async fn send_for(&self, http: &reqwest::Client, index: usize, body: &serde_json::Value) -> anyhow::Result<()> {
        post(http, &self.nodes[(index + 1) % self.nodes.len()].send_url, body).await
    }

    /// `POST /send` to the first node.
    pub async fn send(&self, http: &reqwest::Client, body: &serde_json::Value) -> anyhow::Result<()> {
        post(http, &self.nodes[0].send_url, body).await
    }

    /// The nodes' user and system CPU time so far.
    pub fn cpu(&self) -> anyhow::Result<Cpu> {
        let mut total = Cpu::default();
        for node in &self.nodes {
            total = total + cpu_of(&std::fs::read_to_string(format!("/proc/{}/stat", node.pid))?)?.1;
        }
        Ok(total)
    }

    /// The nodes' user + system CPU time so far, in seconds.
    pub fn cpu_secs(&self) -> anyhow::Result<f64> {
        Ok(self.cpu()?.total())
    }

    /// The nodes' CPU time so far by thread name (the store's writer, tokio's workers, ...),
    /// in seconds: where their CPU goes. Threads that have ended are not counted.
    pub fn cpu_secs_by_thread(&self) -> anyhow::Result<BTreeMap<String, f64>> {
        let mut out = BTreeMap::new();
        for node in &self.nodes {
            for task in std::fs::read_dir(format!("/proc/{}/task", node.pid))? {
                let Ok(stat) = std::fs::read_to_string(task?.path().join("stat")) else { continue };
                let (name, cpu) = cpu_of(&stat)?;
                *out.entry(name).or_default() += cpu.total();
            }
        }
        Ok(out)
    }

    /// With Redis: what Redis and the nodes' Redis clients have done so far.
    pub async fn redis_work(&self, http: &reqwest::Client) -> anyhow::Result<Option<RedisWork>> {
        let Some(redis) = &self.redis else { return Ok(None) };
        let mut round_trips = 0.0;
        for node in &self.nodes {
            let text = http.get(format!("http://{}/metrics", node.addr)).send().await?.text().await?;
            let line = text.lines().find(|l| l.starts_with("sio_push_redis_round_trips_total"));
            round_trips += line.and_then(|l| l.split_whitespace().last()?.parse::<f64>().ok()).unwrap_or(0.0);
        }
        let cpu = cpu_of(&std::fs::read_to_string(format!("/proc/{}/stat", redis.pid))?)?.1;
        Ok(Some(RedisWork { round_trips, commands: redis.commands().await?, cpu }))
    }

    /// The server's resident memory (all nodes), in KiB.
    pub fn rss_kib(&self) -> anyhow::Result<u64> {
        self.status_kib("VmRSS:")
    }

    /// The server's peak resident memory so far (all nodes), in KiB.
    pub fn peak_rss_kib(&self) -> anyhow::Result<u64> {
        self.status_kib("VmHWM:")
    }

    fn status_kib(&self, field: &str) -> anyhow::Result<u64> {
        let mut total = 0;
        for node in &self.nodes {
            let status = std::fs::read_to_string(format!("/proc/{}/status", node.pid))?;
            let line = status.lines().find(|l| l.starts_with(field)).with_context(|| format!("no {field}"))?;
            total += line.split_whitespace().nth(1).with_context(|| format!("malformed {field}"))?.parse::<u64>()?;
        }
        Ok(total)
    }

    /// Bytes the server has caused to be written to storage so far (`write_bytes` of
    /// `/proc/PID/io`: what reached the page cache for the disk, not what the process asked).
    pub fn written_bytes(&self) -> anyhow::Result<u64> {
        let io = std::fs::read_to_string(format!("/proc/{}/io", self.nodes[0].pid))?;
        let line = io.lines().find(|l| l.starts_with("write_bytes:")).context("no write_bytes")?;
        Ok(line.split_whitespace().nth(1).context("malformed write_bytes")?.parse()?)
    }

    /// SIGTERM, and wait for a clean exit; returns the data dir, for a restart on it.
    pub async fn stop(self) -> anyhow::Result<tempfile::TempDir> {
        self.stop_within(Duration::from_secs(25)).await
    }

    /// As [`Server::stop`], waiting up to `limit` for the exit.
    pub async fn stop_within(self, limit: Duration) -> anyhow::Result<tempfile::TempDir> {
        let Self { nodes, redis, data, auth, .. } = self;
        for mut node in nodes {
            // SAFETY: sending a signal to our own child.
            unsafe { libc::kill(node.pid as i32, libc::SIGTERM) };
            let status = tokio::time::timeout(limit, node.child.wait()).await.context("the server did not stop")??;
            if !status.success() {
                bail!("the server exited with {status}");
            }
        }
        auth.abort();
        if let Some(mut redis) = redis {
            // SAFETY: as above.
            unsafe { libc::kill(redis.pid as i32, libc::SIGTERM) };
            let _ = tokio::time::timeout(limit, redis.child.wait()).await;
        }
        Ok(data)
    }
}

/// What Redis and the nodes' Redis clients did, as counted so far.
#[derive(Clone, Debug)]
pub struct RedisWork {
    /// Requests the nodes made (a command or a pipeline each).
    pub round_trips: f64,
    /// Commands Redis ran, by name (those that scripts ran included), from `INFO commandstats`.
    pub commands: BTreeMap<String, f64>,
    /// Redis's CPU time.
    pub cpu: Cpu,
}

impl RedisWork {
    /// What was done since `earlier`, per `unit` (a message, a connect), as figures.
    pub fn per(&self, earlier: &RedisWork, units: usize, unit: &str) -> serde_json::Value {
        let n = units as f64;
        let round = |x: f64| (x * 100.0).round() / 100.0;
        let mut commands: Vec<(String, f64)> = self
            .commands
            .iter()
            .map(|(name, calls)| (name.clone(), calls - earlier.commands.get(name).unwrap_or(&0.0)))
            .filter(|(name, calls)| *calls > 0.0 && name != "info")
            .collect();
        commands.sort_by(|a, b| b.1.total_cmp(&a.1));
        let total: f64 = commands.iter().map(|c| c.1).sum();
        let by_name: serde_json::Map<String, serde_json::Value> =
            commands.into_iter().map(|(name, calls)| (name, round(calls / n).into())).collect();
        serde_json::json!({
            format!("redis_round_trips_per_{unit}"): round((self.round_trips - earlier.round_trips) / n),
            format!("redis_commands_per_{unit}"): round(total / n),
            format!("redis_commands_per_{unit}_by_name"): by_name,
            format!("redis_cpu_ms_per_{unit}"): ((self.cpu - earlier.cpu).total() * 1000.0 / n * 1000.0).round() / 1000.0,
        })
    }
}

impl Node {
    async fn start(bin: &str, env: &[(&str, String)]) -> anyhow::Result<Self> {
        let mut child = Command::new(bin)
            .arg("serve")
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("cannot start {bin}"))?;
        let pid = child.id().context("no pid")?;
        let mut lines = BufReader::new(child.stderr.take().context("no stderr")?).lines();
        let addr = tokio::time::timeout(Duration::from_secs(15), async {
            while let Some(line) = lines.next_line().await? {
                if let Some(rest) = line.split(": serving listen=").nth(1) {
                    let port: u16 = rest
                        .split(|c: char| !c.is_ascii_digit() && c != ':' && c != '.')
                        .next()
                        .unwrap_or("")
                        .rsplit(':')
                        .next()
                        .unwrap_or("")
                        .parse()?;
                    return anyhow::Ok(SocketAddr::from(([127, 0, 0, 1], port)));
                }
            }
            bail!("the server exited before serving")
        })
        .await
        .context("the server did not start within 15 s")??;
        // Keep draining stderr so the server never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        let send_url = format!("http://{addr}/send?site=bench&apiKey=bench-key");
        Ok(Self { addr, send_url, child, pid })
    }
}

impl Redis {
    /// Starts Debian's `redis-server` on a free loopback port, its AOF under `dir`.
    pub async fn start(dir: &std::path::Path, fsync_always: bool) -> anyhow::Result<Self> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "yes"])
            .args(["--appendfsync", if fsync_always { "always" } else { "everysec" }])
            .arg("--dir")
            .arg(dir)
            .stdout(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .context("cannot start redis-server (install Debian's redis-server)")?;
        let pid = child.id().context("no pid")?;
        let redis = Self { port, child, pid };
        for _ in 0..500 {
            if redis.commands().await.is_ok() {
                return Ok(redis);
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        bail!("redis-server did not answer within 5 s")
    }

    /// `INFO commandstats`: calls per command so far.
    async fn commands(&self) -> anyhow::Result<BTreeMap<String, f64>> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut conn = tokio::net::TcpStream::connect(("127.0.0.1", self.port)).await?;
        conn.write_all(b"INFO commandstats\r\n").await?;
        // A bulk string: `$<len>\r\n<text>\r\n`.
        let mut reply = Vec::new();
        let mut buf = [0u8; 8192];
        loop {
            let n = conn.read(&mut buf).await?;
            if n == 0 {
                bail!("redis closed the connection");
            }
            reply.extend_from_slice(&buf[..n]);
            let text = String::from_utf8_lossy(&reply);
            if let Some((head, body)) = text.split_once("\r\n") {
                let len: usize = head.trim_start_matches('$').parse().context("INFO reply")?;
                if body.len() >= len {
                    let mut out = BTreeMap::new();
                    for line in body[..len].lines() {
                        // cmdstat_get:calls=1,usec=...
                        let Some((name, stats)) = line.strip_prefix("cmdstat_").and_then(|l| l.split_once(':')) else {
                            continue;
                        };
                        let calls = stats.split(',').find_map(|kv| kv.strip_prefix("calls="));
                        out.insert(name.to_owned(), calls.context("no calls")?.parse()?);
                    }
                    return Ok(out);
                }
            }
        }
    }
}

async fn post(http: &reqwest::Client, url: &str, body: &serde_json::Value) -> anyhow::Result<()> {
    let res = http.post(url).json(body).send().await?;
    if res.status() != 200 {
        bail!("POST /send answered {}", res.status());
    }
    Ok(())
}

/// This process's (the load generator's) user and system CPU time so far: the other half of the
/// two cores' work in a run.
pub fn own_cpu() -> anyhow::Result<Cpu> {
    Ok(cpu_of(&std::fs::read_to_string("/proc/self/stat")?)?.1)
}

/// CPU time in seconds: in the process itself (user) and in the kernel on its behalf (system:
/// its syscalls, and over loopback also the receiving side's TCP work that runs in them).
#[derive(Clone, Copy, Debug, Default)]
pub struct Cpu {
    pub user: f64,
    pub system: f64,
}

impl Cpu {
    pub fn total(self) -> f64 {
        self.user + self.system
    }
}

impl std::ops::Add for Cpu {
    type Output = Cpu;

    fn add(self, other: Cpu) -> Cpu {
        Cpu { user: self.user + other.user, system: self.system + other.system }
    }
}

impl std::ops::Sub for Cpu {
    type Output = Cpu;

    fn sub(self, earlier: Cpu) -> Cpu {
        Cpu { user: self.user - earlier.user, system: self.system - earlier.system }
    }
}

/// The command (thread) name and CPU time in a `/proc/.../stat` line.
fn cpu_of(stat: &str) -> anyhow::Result<(String, Cpu)> {
    let (head, after) = stat.rsplit_once(')').context("malformed stat")?;
    let name = head.split_once('(').context("malformed stat")?.1.to_string();
    // Fields after the command name (which may hold spaces) start at field 3.
    let fields: Vec<&str> = after.split_whitespace().collect();
    // SAFETY: sysconf has no preconditions.
    let per_sec = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let (user, system) = (fields[11].parse::<f64>()? / per_sec, fields[12].parse::<f64>()? / per_sec);
    Ok((name, Cpu { user, system }))
}
