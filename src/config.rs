//! Configuration: built-in defaults, then the TOML file, then environment variables.
//!
//! Environment variables come in two families. The old Node.js service's names (`PORT`,
//! `DEVICE_TTL`, `SITE_NAME`, `AUTH_URL`, ...) keep their meaning, so a user can switch without
//! touching anything; `REDIS_URL` is accepted and ignored with a warning. Every other key can be
//! set as `SIO_PUSH_<SECTION>__<KEY>` (e.g. `SIO_PUSH_SERVER__MAX_BODY_BYTES`,
//! `SIO_PUSH_SITES__SHOP__API_KEY`), and `SIO_PUSH_DATA_DIR` sets the data directory.
//!
//! The merged document is deserialized into raw structs (unknown keys are errors) and then
//! validated into [`Config`], whose fields have real types. Every error names the key, the value
//! and what is accepted. `sio-push check-config` runs exactly this step.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use reqwest::Url;
use serde::Deserialize;

use crate::store::QueueLimits;
use crate::telemetry::LogFormat;

/// Where `serve` looks for a config file when `--config` is not given.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/sio-push/config.toml";

/// The most `server.max_name_bytes` may be: the store keys a name part by a 16-bit length.
const MAX_NAME_BYTES: u64 = u16::MAX as u64;

/// Everything that can be wrong with a configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The TOML is malformed, has an unknown key or a value of the wrong type.
    #[error("{origin}: {message}")]
    Parse {
        /// The file, or "environment".
        origin: String,
        /// The parser's words, which name the key.
        message: String,
    },
    /// A value has the right type but is not acceptable.
    #[error("{key} = {value:?}: {reason}")]
    Invalid {
        /// The dotted key, or the environment variable.
        key: String,
        /// The offending value.
        value: String,
        /// What is accepted.
        reason: String,
    },
}

/// The validated configuration.
#[derive(Clone, Debug)]
pub struct Config {
    /// Process-wide settings.
    pub server: ServerConfig,
    /// The sites, by name (the socket.io namespace without `/`).
    pub sites: BTreeMap<String, SiteConfig>,
    /// The admin API and status page, when configured.
    pub admin: Option<AdminConfig>,
    /// Where the data lives (`[store]`).
    pub store: StoreConfig,
    /// Things worth a warning line at startup (ignored settings).
    pub warnings: Vec<String>,
}

/// Process-wide settings (`[server]`).
#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// Address and port to listen on.
    pub listen: SocketAddr,
    /// Serve https/wss with this certificate chain and key (PEM), instead of plain http.
    pub tls: Option<TlsFiles>,
    /// Where the sled database lives.
    pub data_dir: PathBuf,
    /// Keep everything in memory instead (tests, demos): nothing survives a restart.
    pub ephemeral: bool,
    /// How long a disconnected device keeps its queue; zero keeps it forever.
    pub device_ttl: Duration,
    /// engine.io ping interval.
    pub ping_interval: Duration,
    /// engine.io ping timeout.
    pub ping_timeout: Duration,
    /// How long a live message waits for its ack before it is left for the next `_batch`.
    pub ack_timeout: Duration,
    /// Packets buffered per socket; a client that lets it fill is disconnected.
    pub max_buffer_packets: usize,
    /// Sockets one device may hold; a new one beyond this evicts the oldest.
    pub max_sockets_per_device: usize,
    /// Devices one user room may have registered (the public channel excepted): a new device
    /// beyond this forgets the room's device that disconnected first, or is refused if all are
    /// connected.
    pub max_devices_per_user: u64,
    /// Timeout of one call to a site's auth endpoint.
    pub auth_timeout: Duration,
    /// Timeout of one presence callback (`update_user_url`).
    pub callback_timeout: Duration,
    /// Most bytes a `POST /send` body may have.
    pub max_body_bytes: usize,
    /// Most rooms one `POST /send` may name.
    pub max_rooms_per_request: usize,
    /// Longest room name, event name or device id, in bytes.
    pub max_name_bytes: usize,
    /// Largest message as stored (`[event, ...args]` JSON).
    pub max_message_bytes: usize,
    /// How long an `Idempotency-Key` is remembered.
    pub idempotency_window: Duration,
    /// Per-device queue caps.
    pub queue_limits: QueueLimits,
    /// Most auth calls in flight at once, across sites.
    pub max_concurrent_auth: usize,
    /// Most connections waiting for an auth slot; more are refused at once.
    pub max_auth_queue: usize,
    /// How long a new session has to complete its namespace CONNECT, auth included.
    pub connect_timeout: Duration,
    /// Largest websocket message or frame a client may send.
    pub max_client_message_bytes: usize,
    /// Most socket.io sessions that have not joined a site yet; a new one past it is closed at
    /// once (its client retries).
    pub max_unauthenticated_sessions: usize,
    /// Caps on connections, and their header deadline (see `net`).
    pub connections: crate::net::Limits,
    /// sled's page cache size.
    pub cache_bytes: u64,
    /// Free disk space below which new messages are refused (507); 0 disables the check.
    pub min_free_disk_bytes: u64,
    /// Longest a `POST /send` may take before it is answered 503.
    pub request_timeout: Duration,
    /// How often expired devices are swept.
    pub sweep_interval: Duration,
    /// How long a graceful shutdown may take before the process exits anyway.
    pub shutdown_timeout: Duration,
    /// Log line format.
    pub log_format: LogFormat,
    /// Serve the built-in demo page and demo auth endpoint (`/demo`).
    pub demo: bool,
}

/// Where the data lives (`[store]`).
#[derive(Clone, Debug, Default)]
pub enum StoreConfig {
    /// The embedded sled database under `server.data_dir` (the default).
    #[default]
    Sled,
    /// Redis, shared by every node of the service.
    Redis(RedisConfig),
}

/// `[store] backend = "redis"` and its settings.
#[derive(Clone)]
pub struct RedisConfig {
    /// `redis_url`: one server's URL, or a cluster's nodes separated by commas. May hold a
    /// password: never printed.
    pub urls: Vec<String>,
    /// `redis_cluster`: the URLs name nodes of a Redis Cluster.
    pub cluster: bool,
    /// `key_prefix`: the start of every key, so that services can share one Redis.
    pub key_prefix: String,
    /// `redis_timeout_ms`: longest wait for a connection or a reply.
    pub timeout: Duration,
    /// `wait_replicas`: replicas that must have a write before `/send` is answered (`WAIT`).
    pub wait_replicas: u32,
}

impl fmt::Debug for RedisConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisConfig")
            .field("urls", &self.urls.iter().map(|u| masked_url(u)).collect::<Vec<_>>())
            .field("cluster", &self.cluster)
            .field("key_prefix", &self.key_prefix)
            .field("timeout", &self.timeout)
            .field("wait_replicas", &self.wait_replicas)
            .finish()
    }
}

impl RedisConfig {
    /// The store's options.
    pub fn options(&self) -> crate::store::RedisOptions {
        crate::store::RedisOptions {
            target: crate::store::redis::Target {
                urls: self.urls.clone(),
                cluster: self.cluster,
                timeout: self.timeout,
            },
            prefix: self.key_prefix.clone(),
            wait_replicas: self.wait_replicas,
        }
    }
}

/// A URL with its password, if any, masked.
fn masked_url(url: &str) -> String {
    match Url::parse(url) {
        Ok(mut u) if u.password().is_some() => {
            let _ = u.set_password(Some("(hidden)"));
            u.to_string()
        }
        Ok(u) if u.query_pairs().any(|(k, _)| k == "pass" || k == "password") => {
            let mut u = u.clone();
            u.set_query(Some("(hidden)"));
            u.to_string()
        }
        _ => url.to_owned(),
    }
}

/// The admin listener (`[admin]`): admin API, status page. Off unless the table is present.
#[derive(Clone, Debug)]
pub struct AdminConfig {
    /// Its own address; keep it on loopback or a private network.
    pub listen: SocketAddr,
    /// The bearer token every admin request must present.
    pub token: ApiKey,
}

/// The PEM files of `[server] tls_cert_path` and `tls_key_path`.
#[derive(Clone, Debug, PartialEq)]
pub struct TlsFiles {
    /// The certificate chain, leaf first.
    pub cert: PathBuf,
    /// The private key.
    pub key: PathBuf,
}

/// One customer website (`[sites.<name>]`).
#[derive(Clone, Debug, PartialEq)]
pub struct SiteConfig {
    /// The site's name and namespace (`/<name>`).
    pub name: String,
    /// Called with the client's token to learn its rooms.
    pub auth_url: Url,
    /// Prefix of the `Authorization` header sent to `auth_url`.
    pub auth_scheme: String,
    /// The key `POST /send` must present.
    pub api_key: ApiKey,
    /// Rooms starting with this are user rooms; set means reliable mode.
    pub user_room_prefix: Option<String>,
    /// Presence callback; `:id` is replaced by the user id.
    pub update_user_url: Option<String>,
    /// A room treated as one anonymous shared user.
    pub public_channel: Option<String>,
    /// Sustained `POST /send` requests per second; 0 (the default) means no limit.
    pub rate_limit_per_sec: u32,
    /// Requests allowed in a burst above the sustained rate (default: twice the rate).
    pub rate_limit_burst: u32,
    /// Origins browsers may connect from (`Origin` header); empty means any.
    pub allowed_origins: Vec<String>,
}

impl SiteConfig {
    /// Reliable mode: messages are queued per device and need acks.
    pub fn reliable(&self) -> bool {
        self.user_room_prefix.is_some()
    }

    /// Browsers on `origin` may connect: it is listed, or the site lists none. Clients that send
    /// no `Origin` (apps, servers) are not browsers on another origin and are not checked.
    pub fn allows_origin(&self, origin: &str) -> bool {
        self.allowed_origins.is_empty() || self.allowed_origins.iter().any(|o| o == origin)
    }

    /// A user room or the public channel: a room whose devices get their own queues.
    pub fn is_user_room(&self, room: &str) -> bool {
        self.user_room_prefix.as_deref().is_some_and(|p| room.starts_with(p))
            || self.public_channel.as_deref() == Some(room)
    }
}

/// An API key. Prints as `set`, compares in constant time.
#[derive(Clone)]
pub struct ApiKey(String);

impl ApiKey {
    /// Wraps a key.
    pub fn new(key: impl Into<String>) -> Self {
        Self(key.into())
    }

    /// The key itself, for the operator commands that present it. Never log it.
    pub fn expose_secret(&self) -> &str {
        &self.0
    }

    /// Compares with a presented key in time independent of where they differ.
    pub fn matches(&self, presented: &str) -> bool {
        use subtle::ConstantTimeEq;
        self.0.len() == presented.len() && bool::from(self.0.as_bytes().ct_eq(presented.as_bytes()))
    }
}

impl PartialEq for ApiKey {
    fn eq(&self, other: &Self) -> bool {
        self.matches(&other.0)
    }
}

impl fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("\"set\"")
    }
}

// ---- raw, as written -------------------------------------------------------------------------

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    server: RawServer,
    #[serde(default)]
    sites: BTreeMap<String, RawSite>,
    #[serde(default)]
    admin: Option<RawAdmin>,
    #[serde(default)]
    store: RawStore,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawStore {
    backend: String,
    redis_url: Option<String>,
    redis_cluster: bool,
    key_prefix: String,
    redis_timeout_ms: u64,
    wait_replicas: u32,
}

impl Default for RawStore {
    fn default() -> Self {
        Self {
            backend: "sled".into(),
            redis_url: None,
            redis_cluster: false,
            key_prefix: "sio-push".into(),
            // Far below request_timeout_secs, far above a healthy Redis's worst reply.
            redis_timeout_ms: 5_000,
            wait_replicas: 0,
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAdmin {
    #[serde(default = "default_admin_listen")]
    listen: String,
    token: String,
}

fn default_admin_listen() -> String {
    "127.0.0.1:1338".into()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawServer {
    listen: String,
    tls_cert_path: Option<PathBuf>,
    tls_key_path: Option<PathBuf>,
    data_dir: PathBuf,
    ephemeral: bool,
    device_ttl_secs: u64,
    ping_interval_ms: u64,
    ping_timeout_ms: u64,
    ack_timeout_secs: u64,
    max_buffer_packets: u64,
    max_sockets_per_device: u64,
    max_devices_per_user: u64,
    auth_timeout_ms: u64,
    callback_timeout_ms: u64,
    max_body_bytes: u64,
    max_rooms_per_request: u64,
    max_name_bytes: u64,
    max_message_bytes: u64,
    idempotency_window_secs: u64,
    max_queue_len: u64,
    max_queue_bytes: u64,
    max_concurrent_auth: u64,
    max_auth_queue: u64,
    connect_timeout_secs: u64,
    max_client_message_bytes: u64,
    max_unauthenticated_sessions: u64,
    max_connections: u64,
    max_connections_per_address: u64,
    header_read_timeout_secs: u64,
    cache_bytes: u64,
    min_free_disk_bytes: u64,
    request_timeout_secs: u64,
    sweep_interval_secs: u64,
    shutdown_timeout_secs: u64,
    log_format: LogFormat,
    demo: bool,
}

impl Default for RawServer {
    fn default() -> Self {
        let queue = QueueLimits::default();
        Self {
            listen: "0.0.0.0:1337".into(),
            tls_cert_path: None,
            tls_key_path: None,
            data_dir: "./data".into(),
            ephemeral: false,
            device_ttl_secs: 3600,
            ping_interval_ms: 25_000,
            // socket.io 1.x's default, which the old service ran with.
            ping_timeout_ms: 60_000,
            ack_timeout_secs: 300,
            // A long-polling client takes what was buffered once per round trip: a burst of a few
            // hundred messages to one user must not count as a client that stopped reading.
            max_buffer_packets: 1024,
            // One device id in every tab of a browser: generous for tabs, bounded for loops.
            max_sockets_per_device: 32,
            // Phones, tablets and browsers of one person, with room to spare; a client picks its
            // deviceId, so without a cap one token could register devices without end.
            max_devices_per_user: 100,
            auth_timeout_ms: 10_000,
            callback_timeout_ms: 10_000,
            max_body_bytes: 1024 * 1024,
            // The old service's 100 KB body held up to about 10,000 short room names.
            max_rooms_per_request: 10_000,
            // Far above any room, event or device name a site uses, far below what the store
            // can key (64 KiB).
            max_name_bytes: 1024,
            max_message_bytes: 512 * 1024,
            idempotency_window_secs: 24 * 3600,
            max_queue_len: queue.max_len,
            max_queue_bytes: queue.max_bytes,
            max_concurrent_auth: 64,
            max_auth_queue: 1024,
            // Room for a wait for an auth slot and the call itself, each up to auth_timeout_ms.
            connect_timeout_secs: 30,
            // Clients send acks and a namespace CONNECT; the engine.io default was 64 MiB.
            max_client_message_bytes: 64 * 1024,
            // About 8 KiB each: 80 MiB at most, whoever opens them; a reconnect storm of this many
            // clients waits for auth slots anyway.
            max_unauthenticated_sessions: 10_000,
            // 0: the process's descriptor limit, less what the rest of it needs.
            max_connections: 0,
            // Generous for a carrier NAT; reverse proxies on private addresses are not counted.
            max_connections_per_address: 4096,
            header_read_timeout_secs: 10,
            cache_bytes: 64 * 1024 * 1024,
            min_free_disk_bytes: 256 * 1024 * 1024,
            request_timeout_secs: 30,
            sweep_interval_secs: 60,
            shutdown_timeout_secs: 20,
            log_format: LogFormat::Text,
            demo: false,
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSite {
    auth_url: String,
    #[serde(default = "default_auth_scheme")]
    auth_scheme: String,
    api_key: String,
    #[serde(default)]
    user_room_prefix: Option<String>,
    #[serde(default)]
    update_user_url: Option<String>,
    #[serde(default)]
    public_channel: Option<String>,
    #[serde(default)]
    rate_limit_per_sec: u32,
    #[serde(default)]
    rate_limit_burst: Option<u32>,
    #[serde(default)]
    allowed_origins: Vec<String>,
}

fn default_auth_scheme() -> String {
    "Bearer".into()
}

// ---- loading ---------------------------------------------------------------------------------

/// Where the configuration comes from.
#[derive(Clone, Debug, Default)]
pub struct Sources {
    /// The file (must exist). [`Config::load`] uses [`DEFAULT_CONFIG_PATH`] when this is `None`
    /// and that file exists; [`Config::load_with_env`] then reads no file.
    pub file: Option<PathBuf>,
    /// `--data-dir`, overriding file and environment.
    pub data_dir: Option<PathBuf>,
    /// `--listen`, overriding file and environment.
    pub listen: Option<String>,
    /// `--ephemeral`.
    pub ephemeral: bool,
}

impl Config {
    /// Loads defaults, the file and the process environment, then validates.
    pub fn load(sources: &Sources) -> Result<Self, ConfigError> {
        let default = Path::new(DEFAULT_CONFIG_PATH);
        match &sources.file {
            None if default.exists() => {
                let sources = Sources { file: Some(default.into()), ..sources.clone() };
                Self::load_with_env(&sources, std::env::vars())
            }
            _ => Self::load_with_env(sources, std::env::vars()),
        }
    }

    /// As [`Config::load`], with the environment given (tests).
    pub fn load_with_env(
        sources: &Sources,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        let (mut doc, origin) = match &sources.file {
            Some(path) => (read_file(path)?, path.display().to_string()),
            None => (toml::Table::new(), "environment".to_string()),
        };
        let env: BTreeMap<String, String> = env.into_iter().collect();
        let mut warnings = overlay_env(&mut doc, &env)?;
        if let Some(dir) = &sources.data_dir {
            set(&mut doc, &["server", "data_dir"], dir.display().to_string().into());
        }
        if let Some(listen) = &sources.listen {
            set(&mut doc, &["server", "listen"], listen.clone().into());
        }
        if sources.ephemeral {
            set(&mut doc, &["server", "ephemeral"], true.into());
        }
        let config = Self::validate(deserialize(doc, origin)?)?;
        if config.sites.is_empty() {
            warnings.push("no site is configured: every connection will be refused with 'Invalid namespace'".into());
        }
        Ok(Self { warnings, ..config })
    }

    /// Parses a TOML document alone (no environment), for tests and fuzzing.
    pub fn from_toml(text: &str) -> Result<Self, ConfigError> {
        let doc = text
            .parse::<toml::Table>()
            .map_err(|e| ConfigError::Parse { origin: "config".into(), message: one_line(&e) })?;
        Self::validate(deserialize(doc, "config".into())?)
    }

    fn validate(raw: RawConfig) -> Result<Self, ConfigError> {
        let s = raw.server;
        let listen =
            s.listen.parse().map_err(|_| invalid("server.listen", &s.listen, "an address like 0.0.0.0:1337"))?;
        let positive = |key: &str, v: u64| -> Result<u64, ConfigError> {
            if v == 0 {
                Err(invalid(key, &v.to_string(), "a number above 0"))
            } else {
                Ok(v)
            }
        };
        let tls = match (s.tls_cert_path, s.tls_key_path) {
            (None, None) => None,
            (Some(cert), Some(key)) => {
                crate::tls::server_config(&cert, &key)
                    .map_err(|e| invalid("server.tls_cert_path", &cert.display().to_string(), &e.to_string()))?;
                Some(TlsFiles { cert, key })
            }
            (cert, _) => {
                let (key, value) =
                    if cert.is_some() { ("server.tls_key_path", "") } else { ("server.tls_cert_path", "") };
                return Err(invalid(key, value, "tls_cert_path and tls_key_path go together"));
            }
        };
        if s.data_dir.as_os_str().is_empty() && !s.ephemeral {
            return Err(invalid(
                "server.data_dir",
                "",
                "a directory (data_dir, SIO_PUSH_DATA_DIR or --data-dir); empty would mean the current one",
            ));
        }
        let server = ServerConfig {
            listen,
            tls,
            data_dir: s.data_dir,
            ephemeral: s.ephemeral,
            device_ttl: Duration::from_secs(s.device_ttl_secs),
            ping_interval: Duration::from_millis(positive("server.ping_interval_ms", s.ping_interval_ms)?),
            ping_timeout: Duration::from_millis(positive("server.ping_timeout_ms", s.ping_timeout_ms)?),
            ack_timeout: Duration::from_secs(positive("server.ack_timeout_secs", s.ack_timeout_secs)?),
            max_buffer_packets: positive("server.max_buffer_packets", s.max_buffer_packets)? as usize,
            max_sockets_per_device: positive("server.max_sockets_per_device", s.max_sockets_per_device)? as usize,
            max_devices_per_user: positive("server.max_devices_per_user", s.max_devices_per_user)?,
            auth_timeout: Duration::from_millis(positive("server.auth_timeout_ms", s.auth_timeout_ms)?),
            callback_timeout: Duration::from_millis(positive("server.callback_timeout_ms", s.callback_timeout_ms)?),
            max_body_bytes: positive("server.max_body_bytes", s.max_body_bytes)? as usize,
            max_rooms_per_request: positive("server.max_rooms_per_request", s.max_rooms_per_request)? as usize,
            max_name_bytes: match s.max_name_bytes {
                n @ 1..=MAX_NAME_BYTES => n as usize,
                n => return Err(invalid("server.max_name_bytes", &n.to_string(), "1 to 65535 bytes")),
            },
            max_message_bytes: positive("server.max_message_bytes", s.max_message_bytes)? as usize,
            idempotency_window: Duration::from_secs(positive(
                "server.idempotency_window_secs",
                s.idempotency_window_secs,
            )?),
            queue_limits: QueueLimits {
                max_len: positive("server.max_queue_len", s.max_queue_len)?,
                max_bytes: positive("server.max_queue_bytes", s.max_queue_bytes)?,
            },
            max_concurrent_auth: positive("server.max_concurrent_auth", s.max_concurrent_auth)? as usize,
            max_auth_queue: positive("server.max_auth_queue", s.max_auth_queue)? as usize,
            connect_timeout: {
                let secs = positive("server.connect_timeout_secs", s.connect_timeout_secs)?;
                if secs.saturating_mul(1000) <= s.auth_timeout_ms.saturating_mul(2) {
                    return Err(invalid(
                        "server.connect_timeout_secs",
                        &secs.to_string(),
                        "more than twice auth_timeout_ms (a wait for an auth slot, then the call)",
                    ));
                }
                Duration::from_secs(secs)
            },
            connections: crate::net::Limits {
                max_connections: match s.max_connections {
                    0 => crate::net::default_max_connections(),
                    n => n as usize,
                },
                max_per_address: s.max_connections_per_address as usize,
                header_read_timeout: Duration::from_secs(positive(
                    "server.header_read_timeout_secs",
                    s.header_read_timeout_secs,
                )?),
            },
            max_client_message_bytes: match s.max_client_message_bytes {
                n @ 1024..=0x4000_0000 => n as usize,
                n => return Err(invalid("server.max_client_message_bytes", &n.to_string(), "1 KiB to 1 GiB")),
            },
            max_unauthenticated_sessions: positive(
                "server.max_unauthenticated_sessions",
                s.max_unauthenticated_sessions,
            )? as usize,
            cache_bytes: positive("server.cache_bytes", s.cache_bytes)?,
            min_free_disk_bytes: s.min_free_disk_bytes,
            request_timeout: Duration::from_secs(positive("server.request_timeout_secs", s.request_timeout_secs)?),
            sweep_interval: Duration::from_secs(positive("server.sweep_interval_secs", s.sweep_interval_secs)?),
            shutdown_timeout: Duration::from_secs(positive("server.shutdown_timeout_secs", s.shutdown_timeout_secs)?),
            log_format: s.log_format,
            demo: s.demo,
        };
        let mut sites = BTreeMap::new();
        for (name, site) in raw.sites {
            sites.insert(name.clone(), validate_site(name, site)?);
        }
        let admin = raw.admin.map(validate_admin).transpose()?;
        let store = validate_store(raw.store, &server)?;
        Ok(Self { admin, server, sites, store, warnings: Vec::new() })
    }
}

fn validate_store(raw: RawStore, server: &ServerConfig) -> Result<StoreConfig, ConfigError> {
    match raw.backend.as_str() {
        "sled" => return Ok(StoreConfig::Sled),
        "redis" => {}
        other => return Err(invalid("store.backend", other, "\"sled\" (the embedded default) or \"redis\"")),
    }
    let Some(url) = raw.redis_url.filter(|u| !u.trim().is_empty()) else {
        return Err(invalid(
            "store.redis_url",
            "",
            "a URL like redis://127.0.0.1:6379/ (rediss:// for TLS) when store.backend is \"redis\"",
        ));
    };
    let urls: Vec<String> = url.split(',').map(|u| u.trim().to_owned()).filter(|u| !u.is_empty()).collect();
    for u in &urls {
        if let Err(e) = redis::IntoConnectionInfo::into_connection_info(u.as_str()) {
            return Err(invalid("store.redis_url", &masked_url(u), &format!("{e}; a URL like redis://host:6379/")));
        }
    }
    if urls.len() > 1 && !raw.redis_cluster {
        return Err(invalid(
            "store.redis_url",
            &urls.iter().map(|u| masked_url(u)).collect::<Vec<_>>().join(","),
            "one URL, unless store.redis_cluster = true (then any of the cluster's nodes)",
        ));
    }
    let prefix_ok = !raw.key_prefix.is_empty()
        && raw.key_prefix.len() <= 64
        && raw.key_prefix.bytes().all(|b| b.is_ascii_graphic() && !matches!(b, b'{' | b'}'));
    if !prefix_ok {
        return Err(invalid(
            "store.key_prefix",
            &raw.key_prefix,
            "1 to 64 printable characters, without braces or spaces",
        ));
    }
    let timeout = Duration::from_millis(raw.redis_timeout_ms);
    if raw.redis_timeout_ms == 0 || timeout >= server.request_timeout {
        return Err(invalid(
            "store.redis_timeout_ms",
            &raw.redis_timeout_ms.to_string(),
            "above 0 and below server.request_timeout_secs, so that a /send is answered 503 in time",
        ));
    }
    Ok(StoreConfig::Redis(RedisConfig {
        urls,
        cluster: raw.redis_cluster,
        key_prefix: raw.key_prefix,
        timeout,
        wait_replicas: raw.wait_replicas,
    }))
}

fn validate_admin(raw: RawAdmin) -> Result<AdminConfig, ConfigError> {
    let listen =
        raw.listen.parse().map_err(|_| invalid("admin.listen", &raw.listen, "an address like 127.0.0.1:1338"))?;
    if raw.token.len() < 16 {
        return Err(invalid("admin.token", "(hidden)", "a secret of at least 16 characters"));
    }
    Ok(AdminConfig { listen, token: ApiKey::new(raw.token) })
}

fn validate_site(name: String, raw: RawSite) -> Result<SiteConfig, ConfigError> {
    let key = |field: &str| format!("sites.{name}.{field}");
    let name_ok =
        !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '~'));
    if !name_ok {
        return Err(invalid(&format!("sites.{name}"), &name, "a site name of letters, digits, '-', '_', '.' or '~'"));
    }
    let auth_url = parse_http_url(&key("auth_url"), &raw.auth_url)?;
    if let Some(url) = &raw.update_user_url {
        parse_http_url(&key("update_user_url"), url)?;
    }
    if raw.api_key.trim().is_empty() {
        return Err(invalid(&key("api_key"), "(blank)", "a key that is not empty or only spaces"));
    }
    if raw.auth_scheme.contains(['\r', '\n']) {
        return Err(invalid(&key("auth_scheme"), &raw.auth_scheme, "a single-line word like Bearer"));
    }
    let mut allowed_origins = Vec::with_capacity(raw.allowed_origins.len());
    for origin in &raw.allowed_origins {
        let serialized = Url::parse(origin)
            .ok()
            .filter(|u| matches!(u.scheme(), "http" | "https"))
            .map(|u| u.origin().ascii_serialization());
        match serialized {
            Some(o) if o == origin.trim_end_matches('/') => allowed_origins.push(o),
            _ => {
                return Err(invalid(
                    &key("allowed_origins"),
                    origin,
                    "origins like https://shop.example or http://localhost:3000, without a path",
                ))
            }
        }
    }
    let non_empty = |v: Option<String>| v.filter(|v| !v.is_empty());
    Ok(SiteConfig {
        name,
        auth_url,
        auth_scheme: raw.auth_scheme,
        api_key: ApiKey::new(raw.api_key),
        user_room_prefix: non_empty(raw.user_room_prefix),
        update_user_url: non_empty(raw.update_user_url),
        public_channel: non_empty(raw.public_channel),
        rate_limit_per_sec: raw.rate_limit_per_sec,
        // Unset: two seconds' worth, so that a site at its limit still absorbs a short peak.
        rate_limit_burst: raw.rate_limit_burst.unwrap_or(raw.rate_limit_per_sec.saturating_mul(2)).max(1),
        allowed_origins,
    })
}

fn parse_http_url(key: &str, value: &str) -> Result<Url, ConfigError> {
    match Url::parse(value) {
        Ok(url) if matches!(url.scheme(), "http" | "https") => Ok(url),
        _ => Err(invalid(key, value, "an http:// or https:// URL")),
    }
}

fn invalid(key: &str, value: &str, reason: &str) -> ConfigError {
    ConfigError::Invalid { key: key.into(), value: value.into(), reason: reason.into() }
}

/// Validates a merged document as `load` would (used by `import-config` on what it writes).
pub(crate) fn validate_document(doc: &toml::Table, origin: &str) -> Result<Config, ConfigError> {
    Config::validate(deserialize(doc.clone(), origin.to_string())?)
}

fn deserialize(doc: toml::Table, origin: String) -> Result<RawConfig, ConfigError> {
    toml::Value::Table(doc)
        .try_into()
        .map_err(|e: toml::de::Error| ConfigError::Parse { origin, message: one_line(&e) })
}

/// toml's errors span several lines (a source excerpt); keep one.
fn one_line(e: &toml::de::Error) -> String {
    e.to_string().split('\n').filter(|l| !l.trim().is_empty() && !l.contains('|')).collect::<Vec<_>>().join("; ")
}

fn read_file(path: &Path) -> Result<toml::Table, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.into(), source })?;
    text.parse::<toml::Table>()
        .map_err(|e| ConfigError::Parse { origin: path.display().to_string(), message: one_line(&e) })
}

/// Sets a nested key, creating tables on the way (replacing non-tables).
pub(crate) fn set(doc: &mut toml::Table, path: &[&str], value: toml::Value) {
    let (last, parents) = path.split_last().expect("non-empty path");
    let mut table = doc;
    for part in parents {
        let entry = table.entry(part.to_string()).or_insert_with(|| toml::Table::new().into());
        if !entry.is_table() {
            *entry = toml::Table::new().into();
        }
        table = entry.as_table_mut().expect("made a table above");
    }
    table.insert(last.to_string(), value);
}

/// A value from the environment: a TOML number, boolean or array if it reads as one, else the
/// text.
fn env_value(text: &str) -> toml::Value {
    match format!("v = {text}").parse::<toml::Table>() {
        Ok(mut t) => match t.remove("v") {
            Some(
                v @ (toml::Value::Integer(_) | toml::Value::Boolean(_) | toml::Value::Float(_) | toml::Value::Array(_)),
            ) => v,
            _ => text.into(),
        },
        Err(_) => text.into(),
    }
}

/// Applies the environment to the document; returns warnings about ignored variables.
pub(crate) fn overlay_env(doc: &mut toml::Table, env: &BTreeMap<String, String>) -> Result<Vec<String>, ConfigError> {
    let mut warnings = Vec::new();
    for (var, value) in env.range("SIO_PUSH_".to_string()..).take_while(|(k, _)| k.starts_with("SIO_PUSH_")) {
        let name = &var["SIO_PUSH_".len()..];
        if name == "DATA_DIR" {
            set(doc, &["server", "data_dir"], value.clone().into());
        } else if name.contains("__") {
            let path: Vec<String> = name.split("__").map(str::to_lowercase).collect();
            let path: Vec<&str> = path.iter().map(String::as_str).collect();
            set(doc, &path, env_value(value));
        } else {
            warnings.push(format!("{var} is not a setting (use SIO_PUSH_<SECTION>__<KEY>): ignored"));
        }
    }

    // The old service's names.
    if env.contains_key("REDIS_URL") {
        warnings.push(
            "REDIS_URL is set but ignored: sio-push keeps its data in its embedded store unless [store] backend = \
             \"redis\" with redis_url (SIO_PUSH_STORE__BACKEND=redis, SIO_PUSH_STORE__REDIS_URL=...)"
                .into(),
        );
    }
    if let Some(port) = env.get("PORT") {
        let port: u16 = port.trim().parse().map_err(|_| invalid("PORT", port, "a TCP port number"))?;
        let listen = doc
            .get("server")
            .and_then(|s| s.get("listen"))
            .and_then(|l| l.as_str())
            .map(str::to_owned)
            .unwrap_or_else(|| RawServer::default().listen);
        let host = listen
            .parse::<SocketAddr>()
            .map(|a| a.ip())
            .map_err(|_| invalid("server.listen", &listen, "an address like 0.0.0.0:1337"))?;
        set(doc, &["server", "listen"], SocketAddr::new(host, port).to_string().into());
    }
    if let Some(ttl) = env.get("DEVICE_TTL") {
        let secs: i64 = ttl
            .trim()
            .parse()
            .ok()
            .filter(|s| *s >= 0)
            .ok_or_else(|| invalid("DEVICE_TTL", ttl, "whole seconds, 0 or more (0: devices never expire)"))?;
        set(doc, &["server", "device_ttl_secs"], secs.into());
    }
    const SITE_VARS: [(&str, &str); 6] = [
        ("AUTH_URL", "auth_url"),
        ("AUTH_SCHEME", "auth_scheme"),
        ("API_KEY", "api_key"),
        ("USER_ROOM_PREFIX", "user_room_prefix"),
        ("UPDATE_USER_URL", "update_user_url"),
        ("PUBLIC_CHANNEL", "public_channel"),
    ];
    if env.get("SITE_NAME").is_some_and(|s| s.trim().is_empty()) {
        return Err(invalid("SITE_NAME", "", "a site name; empty would leave the site unconfigured"));
    }
    match env.get("SITE_NAME") {
        Some(site) => {
            for (var, key) in SITE_VARS {
                if let Some(value) = env.get(var) {
                    set(doc, &["sites", site, key], value.clone().into());
                }
            }
        }
        None => {
            for (var, _) in SITE_VARS.iter().filter(|(var, _)| env.contains_key(*var)) {
                warnings.push(format!("{var} is set but SITE_NAME is not: ignored"));
            }
        }
    }
    Ok(warnings)
}

impl fmt::Display for Config {
    /// The effective settings, secrets masked, as `check-config` prints them.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = &self.server;
        writeln!(f, "[server]")?;
        writeln!(f, "listen = \"{}\"", s.listen)?;
        if let Some(tls) = &s.tls {
            writeln!(f, "tls_cert_path = {:?}", tls.cert.display().to_string())?;
            writeln!(f, "tls_key_path = {:?}", tls.key.display().to_string())?;
        }
        writeln!(f, "data_dir = {:?}", s.data_dir.display().to_string())?;
        writeln!(f, "ephemeral = {}", s.ephemeral)?;
        writeln!(f, "device_ttl_secs = {}", s.device_ttl.as_secs())?;
        writeln!(f, "ping_interval_ms = {}", s.ping_interval.as_millis())?;
        writeln!(f, "ping_timeout_ms = {}", s.ping_timeout.as_millis())?;
        writeln!(f, "ack_timeout_secs = {}", s.ack_timeout.as_secs())?;
        writeln!(f, "max_buffer_packets = {}", s.max_buffer_packets)?;
        writeln!(f, "max_sockets_per_device = {}", s.max_sockets_per_device)?;
        writeln!(f, "max_devices_per_user = {}", s.max_devices_per_user)?;
        writeln!(f, "auth_timeout_ms = {}", s.auth_timeout.as_millis())?;
        writeln!(f, "callback_timeout_ms = {}", s.callback_timeout.as_millis())?;
        writeln!(f, "max_body_bytes = {}", s.max_body_bytes)?;
        writeln!(f, "max_rooms_per_request = {}", s.max_rooms_per_request)?;
        writeln!(f, "max_name_bytes = {}", s.max_name_bytes)?;
        writeln!(f, "max_message_bytes = {}", s.max_message_bytes)?;
        writeln!(f, "idempotency_window_secs = {}", s.idempotency_window.as_secs())?;
        writeln!(f, "max_queue_len = {}", s.queue_limits.max_len)?;
        writeln!(f, "max_queue_bytes = {}", s.queue_limits.max_bytes)?;
        writeln!(f, "max_concurrent_auth = {}", s.max_concurrent_auth)?;
        writeln!(f, "max_auth_queue = {}", s.max_auth_queue)?;
        writeln!(f, "connect_timeout_secs = {}", s.connect_timeout.as_secs())?;
        writeln!(f, "max_client_message_bytes = {}", s.max_client_message_bytes)?;
        writeln!(f, "max_unauthenticated_sessions = {}", s.max_unauthenticated_sessions)?;
        writeln!(f, "max_connections = {}", s.connections.max_connections)?;
        writeln!(f, "max_connections_per_address = {}", s.connections.max_per_address)?;
        writeln!(f, "header_read_timeout_secs = {}", s.connections.header_read_timeout.as_secs())?;
        writeln!(f, "cache_bytes = {}", s.cache_bytes)?;
        writeln!(f, "min_free_disk_bytes = {}", s.min_free_disk_bytes)?;
        writeln!(f, "request_timeout_secs = {}", s.request_timeout.as_secs())?;
        writeln!(f, "sweep_interval_secs = {}", s.sweep_interval.as_secs())?;
        writeln!(f, "shutdown_timeout_secs = {}", s.shutdown_timeout.as_secs())?;
        writeln!(f, "log_format = \"{}\"", if s.log_format == LogFormat::Json { "json" } else { "text" })?;
        writeln!(f, "demo = {}", s.demo)?;
        writeln!(f, "\n[store]")?;
        match &self.store {
            StoreConfig::Sled => writeln!(f, "backend = \"sled\"")?,
            StoreConfig::Redis(r) => {
                writeln!(f, "backend = \"redis\"")?;
                let urls: Vec<String> = r.urls.iter().map(|u| masked_url(u)).collect();
                writeln!(f, "redis_url = {:?}", urls.join(","))?;
                writeln!(f, "redis_cluster = {}", r.cluster)?;
                writeln!(f, "key_prefix = {:?}", r.key_prefix)?;
                writeln!(f, "redis_timeout_ms = {}", r.timeout.as_millis())?;
                writeln!(f, "wait_replicas = {}", r.wait_replicas)?;
            }
        }
        if let Some(admin) = &self.admin {
            writeln!(f, "\n[admin]\nlisten = \"{}\"\ntoken = (set)", admin.listen)?;
        }
        for site in self.sites.values() {
            writeln!(f, "\n[sites.{}]", site.name)?;
            writeln!(f, "auth_url = \"{}\"", site.auth_url)?;
            writeln!(f, "auth_scheme = {:?}", site.auth_scheme)?;
            writeln!(f, "api_key = (set)")?;
            let opt = |v: &Option<String>| v.as_ref().map_or("(not set)".to_string(), |v| format!("{v:?}"));
            writeln!(f, "user_room_prefix = {}", opt(&site.user_room_prefix))?;
            writeln!(f, "update_user_url = {}", opt(&site.update_user_url))?;
            writeln!(f, "public_channel = {}", opt(&site.public_channel))?;
            writeln!(f, "rate_limit_per_sec = {}", site.rate_limit_per_sec)?;
            writeln!(f, "rate_limit_burst = {}", site.rate_limit_burst)?;
            writeln!(f, "allowed_origins = {:?}", site.allowed_origins)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
