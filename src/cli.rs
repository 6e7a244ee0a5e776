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
