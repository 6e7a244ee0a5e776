//! The server under test: a mock auth endpoint and the sio-push binary on a fresh data dir,
//! configured through the old service's environment variables, with its CPU time and RSS read
//! from /proc.

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

/// A running server and what it needs.
pub struct Server {
    /// Where it listens.
    pub addr: SocketAddr,
    send_url: String,
    child: Child,
    pid: u32,
    data: tempfile::TempDir,
    auth: tokio::task::JoinHandle<()>,
}

/// token `uN` -> rooms `user_N` and `all`.
async fn auth(headers: HeaderMap) -> Json<Vec<String>> {
    let token = headers.get("authorization").and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer u"));
    Json(vec![format!("user_{}", token.unwrap_or("x")), "all".to_string()])
}

impl Server {
    /// Starts the mock auth endpoint and the server on a fresh data dir; returns once it serves.
    pub async fn start(bin: &str) -> anyhow::Result<Self> {
        Self::start_on(bin, tempfile::tempdir()?).await
    }

    /// As [`Server::start`], on an existing data dir (see [`Server::stop`]).
    pub async fn start_on(bin: &str, data: tempfile::TempDir) -> anyhow::Result<Self> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let auth_addr = listener.local_addr()?;
        let auth = tokio::spawn(async move {
            let _ = axum::serve(listener, Router::new().route("/auth", get(auth))).await;
        });
        let mut child = Command::new(bin)
            .arg("serve")
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            // Per-message log lines would measure the logger: keep warnings and the start line.
            .env("RUST_LOG", "warn,sio_push::app=info")
            .env("PORT", "0")
            .env("SIO_PUSH_DATA_DIR", data.path())
            .env("SITE_NAME", "bench")
            .env("AUTH_URL", format!("http://{auth_addr}/auth"))
            .env("API_KEY", "bench-key")
            .env("USER_ROOM_PREFIX", "user_")
            .env("DEVICE_TTL", "0")
            .env("SIO_PUSH_SERVER__MAX_CONCURRENT_AUTH", "256")
            .env("SIO_PUSH_SITES__BENCH__RATE_LIMIT_PER_SEC", "0")
            .env("SIO_PUSH_SERVER__MIN_FREE_DISK_BYTES", "0")
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
        Ok(Self { addr, send_url, child, pid, data, auth })
    }

    /// `POST /send` to the bench site; fails on anything but `200`.
    pub async fn send(&self, http: &reqwest::Client, body: &serde_json::Value) -> anyhow::Result<()> {
        let res = http.post(&self.send_url).json(body).send().await?;
        if res.status() != 200 {
            bail!("POST /send answered {}", res.status());
        }
        Ok(())
    }

    /// The server's user + system CPU time so far, in seconds.
    pub fn cpu_secs(&self) -> anyhow::Result<f64> {
        Ok(self.cpu()?.total())
    }

    /// The server's user and system CPU time so far.
    pub fn cpu(&self) -> anyhow::Result<Cpu> {
        Ok(cpu_of(&std::fs::read_to_string(format!("/proc/{}/stat", self.pid))?)?.1)
    }

    /// The server's CPU time so far by thread name (the store's writer, tokio's workers, ...),
    /// in seconds: where its CPU goes. Threads that have ended are not counted.
    pub fn cpu_secs_by_thread(&self) -> anyhow::Result<BTreeMap<String, f64>> {
        let mut out = BTreeMap::new();
        for task in std::fs::read_dir(format!("/proc/{}/task", self.pid))? {
            let Ok(stat) = std::fs::read_to_string(task?.path().join("stat")) else { continue };
            let (name, cpu) = cpu_of(&stat)?;
            *out.entry(name).or_default() += cpu.total();
        }
        Ok(out)
    }

    /// The server's resident memory, in KiB.
    pub fn rss_kib(&self) -> anyhow::Result<u64> {
        self.status_kib("VmRSS:")
    }

    /// The server's peak resident memory so far, in KiB.
    pub fn peak_rss_kib(&self) -> anyhow::Result<u64> {
        self.status_kib("VmHWM:")
    }

    fn status_kib(&self, field: &str) -> anyhow::Result<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid))?;
        let line = status.lines().find(|l| l.starts_with(field)).with_context(|| format!("no {field}"))?;
        Ok(line.split_whitespace().nth(1).with_context(|| format!("malformed {field}"))?.parse()?)
    }

    /// Bytes the server has caused to be written to storage so far (`write_bytes` of
    /// `/proc/PID/io`: what reached the page cache for the disk, not what the process asked).
    pub fn written_bytes(&self) -> anyhow::Result<u64> {
        let io = std::fs::read_to_string(format!("/proc/{}/io", self.pid))?;
        let line = io.lines().find(|l| l.starts_with("write_bytes:")).context("no write_bytes")?;
        Ok(line.split_whitespace().nth(1).context("malformed write_bytes")?.parse()?)
    }

    /// SIGTERM, and wait for a clean exit; returns the data dir, for a restart on it.
    pub async fn stop(self) -> anyhow::Result<tempfile::TempDir> {
        self.stop_within(Duration::from_secs(25)).await
    }

    /// As [`Server::stop`], waiting up to `limit` for the exit.
    pub async fn stop_within(mut self, limit: Duration) -> anyhow::Result<tempfile::TempDir> {
        // SAFETY: sending a signal to our own child.
        unsafe { libc::kill(self.pid as i32, libc::SIGTERM) };
        let status = tokio::time::timeout(limit, self.child.wait()).await.context("the server did not stop")??;
        self.auth.abort();
        if !status.success() {
            bail!("the server exited with {status}");
        }
        Ok(self.data)
    }
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
