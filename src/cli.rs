//! The command line (clap derive).

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::config::Sources;

/// A socket.io push service with durable per-device inboxes.
#[derive(Debug, Parser)]
#[command(name = "sio-push", version, about)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the service.
    Serve(ConfigArgs),
    /// Validate the configuration and print the effective settings (secrets masked).
    CheckConfig(ConfigArgs),
    /// Turn the Node.js service's config.yml, sites.yml and environment into a config.toml.
    ImportConfig(ImportArgs),
    /// Show sites, connections and queues (from the admin API).
    Status(StatusArgs),
    /// POST a message to /send (for operations and smoke tests).
    Send(SendArgs),
    /// Write a snapshot of the store to a file: from the running service through the admin API,
    /// or from a stopped data directory with --data-dir.
    Backup(BackupArgs),
    /// Replace a stopped service's data directory with a snapshot's contents (with the Redis
    /// store: load it into sites that hold nothing there yet).
    Restore(RestoreArgs),
    /// Check a stopped service's data directory and print what it holds; exits 1 on damage.
    Verify(VerifyArgs),
    /// Copy the messages the old Node.js service left queued in its Redis into the data
    /// directory (both services stopped); safe to run again.
    ImportRedis(ImportRedisArgs),
}

/// `sio-push import-redis`.
#[derive(Debug, Args)]
pub struct ImportRedisArgs {
    /// The old service's Redis (its REDIS_URL), e.g. redis://:password@host:6379/0.
    #[arg(long, value_name = "URL", env = "REDIS_URL", hide_env_values = true)]
    pub redis_url: String,
    /// Which data directory, and the sites to import.
    #[command(flatten)]
    pub data: DataArgs,
}

/// Which data directory, as `serve` finds it.
#[derive(Debug, Args)]
pub struct DataArgs {
    /// Config file [default: /etc/sio-push/config.toml if it exists, else built-in defaults].
    #[arg(long, value_name = "PATH")]
    pub config: Option<PathBuf>,
    /// Data directory [env: SIO_PUSH_DATA_DIR] [default: data_dir in the config].
    #[arg(long, value_name = "PATH")]
    pub data_dir: Option<PathBuf>,
}

impl DataArgs {
    /// The configuration sources these flags name.
    pub fn sources(&self) -> Sources {
        Sources { file: self.config.clone(), data_dir: self.data_dir.clone(), ..Sources::default() }
    }
}

/// `sio-push backup`.
#[derive(Debug, Args)]
pub struct BackupArgs {
    /// The file to write (written as FILE.partial, renamed once whole and checked).
    #[arg(long, short, value_name = "FILE")]
    pub output: PathBuf,
    /// Read a stopped service's data directory instead of asking the running service.
    #[command(flatten)]
    pub data: DataArgs,
    /// Admin API base URL [default: admin.listen in the config].
    #[arg(long, value_name = "URL", conflicts_with = "data_dir")]
    pub admin_url: Option<String>,
    /// Admin token [default: admin.token in the config].
    #[arg(long, env = "SIO_PUSH_ADMIN_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
}

/// `sio-push restore`.
#[derive(Debug, Args)]
pub struct RestoreArgs {
    /// The snapshot to restore.
    #[arg(long, short, value_name = "FILE")]
    pub input: PathBuf,
    /// Where to restore to.
    #[command(flatten)]
    pub data: DataArgs,
    /// Replace a data directory that is not empty (its contents are moved aside, not deleted).
    /// With the Redis store there is nothing to replace: its sites must hold no device yet.
    #[arg(long)]
    pub force: bool,
}

/// `sio-push verify`.
#[derive(Debug, Args)]
pub struct VerifyArgs {
    /// Which data directory.
    #[command(flatten)]
    pub data: DataArgs,
    /// Where to put the copy that is opened (opening sled writes) [default: the temporary directory].
    #[arg(long, value_name = "DIR")]
    pub scratch: Option<PathBuf>,
}

/// `sio-push status`.
#[derive(Debug, Args)]
pub struct StatusArgs {
    /// Config file to take the admin address and token from [default: /etc/sio-push/config.toml].
    #[arg(long, value_name = "PATH")]
    pub config: Option<PathBuf>,
    /// Admin API base URL [default: admin.listen in the config].
    #[arg(long, value_name = "URL")]
    pub admin_url: Option<String>,
    /// Admin token [default: admin.token in the config].
    #[arg(long, env = "SIO_PUSH_ADMIN_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
}

/// `sio-push send`.
#[derive(Debug, Args)]
pub struct SendArgs {
    /// The site.
    #[arg(long)]
    pub site: String,
    /// Rooms (repeat, or separate with commas).
    #[arg(long, required = true, value_delimiter = ',')]
    pub rooms: Vec<String>,
    /// The event name.
    #[arg(long)]
    pub event: String,
    /// The arguments as JSON: an array is spread, another value is one argument.
    #[arg(long, value_name = "JSON")]
    pub args: Option<String>,
    /// Ask for a resync when acks arrive out of order.
    #[arg(long)]
    pub resync: bool,
    /// Config file to take the address and the site's API key from [default: /etc/sio-push/config.toml].
    #[arg(long, value_name = "PATH")]
    pub config: Option<PathBuf>,
    /// Base URL of the service [default: server.listen in the config].
    #[arg(long, value_name = "URL")]
    pub url: Option<String>,
    /// The site's API key [default: from the config].
    #[arg(long, env = "SIO_PUSH_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
}

/// Where the old service's configuration is.
#[derive(Debug, Args)]
pub struct ImportArgs {
    /// The old config.yml (NODE_ENV picks its section; default production).
    #[arg(long, value_name = "PATH")]
    pub config_yml: Option<PathBuf>,
    /// The old sites.yml.
    #[arg(long, value_name = "PATH")]
    pub sites_yml: Option<PathBuf>,
    /// The data directory to write into the result.
    #[arg(long, value_name = "PATH", default_value = "/var/lib/sio-push")]
    pub data_dir: PathBuf,
    /// Write here (mode 0640, as it holds API keys) instead of standard output.
    #[arg(long, short, value_name = "PATH")]
    pub output: Option<PathBuf>,
}

/// Where the configuration comes from.
#[derive(Debug, Args)]
pub struct ConfigArgs {
    /// Config file [default: /etc/sio-push/config.toml if it exists, else built-in defaults].
    #[arg(long, value_name = "PATH")]
    pub config: Option<PathBuf>,
    /// Data directory for the embedded store [env: SIO_PUSH_DATA_DIR] [default: ./data].
    #[arg(long, value_name = "PATH")]
    pub data_dir: Option<PathBuf>,
    /// Address to listen on, e.g. 0.0.0.0:1337 [env: PORT sets the port].
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<String>,
    /// Keep everything in memory: nothing survives a restart.
    #[arg(long)]
    pub ephemeral: bool,
}

impl ConfigArgs {
    /// The configuration sources these flags name.
    pub fn sources(&self) -> Sources {
        Sources {
            file: self.config.clone(),
            data_dir: self.data_dir.clone(),
            listen: self.listen.clone(),
            ephemeral: self.ephemeral,
        }
    }
}
