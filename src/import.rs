//! `sio-push import-config`: the old Node.js service's `config.yml`, `sites.yml` and environment
//! turned into our TOML, so migrating is one command.
//!
//! The YAML is mapped onto the same document that `config` loads, the old environment variables
//! are applied with the same code `serve` uses, and the result is validated before it is
//! printed: what this writes, `serve` reads. Settings with no meaning here (`redis`, `flakeid`,
//! `servers`) are dropped with a note.

pub mod redis;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_norway::Value as Yaml;

use crate::config::{overlay_env, set, validate_document, ConfigError};

/// Why an import failed.
#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    /// A file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A file is not YAML of the expected shape.
    #[error("{path}: {reason}")]
    Shape {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The merged result is not a valid configuration.
    #[error(transparent)]
    Config(#[from] ConfigError),
}

/// The TOML text and the notes (one line each) about what was dropped or assumed.
#[derive(Debug)]
pub struct Imported {
    /// The configuration file to write.
    pub toml: String,
    /// What the user should know.
    pub notes: Vec<String>,
}

/// The old `sites.yml` keys and ours.
const SITE_KEYS: [(&str, &str); 6] = [
    ("authUrl", "auth_url"),
    ("authScheme", "auth_scheme"),
    ("apiKey", "api_key"),
    ("userRoomPrefix", "user_room_prefix"),
    ("updateUserUrl", "update_user_url"),
    ("publicChannel", "public_channel"),
];

/// Imports the given files (either may be absent) and environment. `NODE_ENV` picks the
/// `config.yml` section, as it did for the old service (default `production`).
pub fn import(
    config_yml: Option<&Path>,
    sites_yml: Option<&Path>,
    env: &BTreeMap<String, String>,
    data_dir: &Path,
) -> Result<Imported, ImportError> {
    let mut doc = toml::Table::new();
    let mut notes = Vec::new();
    set(&mut doc, &["server", "data_dir"], data_dir.display().to_string().into());
    if let Some(path) = config_yml {
        let section = env.get("NODE_ENV").map_or("production", String::as_str);
        import_config(&mut doc, &mut notes, path, section)?;
    }
    if let Some(path) = sites_yml {
        import_sites(&mut doc, &mut notes, path)?;
    }
    notes.extend(overlay_env(&mut doc, env)?);
    let config = validate_document(&doc, "imported configuration")?;
    if config.server.listen.port() < 1024 {
        notes.push(format!(
            "listen port {} is below 1024: the packaged systemd unit needs CAP_NET_BIND_SERVICE for it (see README.Debian)",
            config.server.listen.port()
        ));
    }
    if config.sites.is_empty() {
        notes.push("no site was found: add a [sites.<name>] table before starting".into());
    }
    let header = "# sio-push configuration, written by `sio-push import-config` from the Node.js service's\n\
                  # configuration. Every key is explained in config.example.toml.\n\n";
    let body = toml::to_string_pretty(&doc).expect("a TOML table serializes");
    Ok(Imported { toml: format!("{header}{}\n", body.trim_end()), notes })
}

fn read_yaml(path: &Path) -> Result<Yaml, ImportError> {
    let text = std::fs::read_to_string(path).map_err(|source| ImportError::Read { path: path.into(), source })?;
    serde_norway::from_str(&text).map_err(|e| shape(path, &e.to_string()))
}

fn shape(path: &Path, reason: &str) -> ImportError {
    ImportError::Shape { path: path.into(), reason: reason.into() }
}

/// A YAML scalar as text (keys like `apiKey: 54321` are numbers in YAML).
fn scalar(value: &Yaml) -> Option<String> {
    match value {
        Yaml::String(s) => Some(s.clone()),
        Yaml::Number(n) => Some(n.to_string()),
        Yaml::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

fn number(path: &Path, key: &str, value: &Yaml) -> Result<i64, ImportError> {
    scalar(value)
        .and_then(|s| s.trim().parse::<i64>().ok())
        .filter(|n| *n >= 0)
        .ok_or_else(|| shape(path, &format!("{key} must be a whole number, 0 or more")))
}

fn import_config(
    doc: &mut toml::Table,
    notes: &mut Vec<String>,
    path: &Path,
    section: &str,
) -> Result<(), ImportError> {
    let yaml = read_yaml(path)?;
    let Some(settings) = yaml.get(section) else {
        return Err(shape(path, &format!("no `{section}:` section (NODE_ENV picks it; default production)")));
    };
    let Some(settings) = settings.as_mapping() else {
        return Err(shape(path, &format!("`{section}:` is not a mapping")));
    };
    for (key, value) in settings {
        let key = scalar(key).unwrap_or_default();
        match key.as_str() {
            "port" => {
                let port = number(path, "port", value)?;
                set(doc, &["server", "listen"], format!("0.0.0.0:{port}").into());
            }
            "device_ttl" => set(doc, &["server", "device_ttl_secs"], number(path, "device_ttl", value)?.into()),
            "io" => {
                for (io_key, io_value) in value.as_mapping().into_iter().flatten() {
                    let io_key = scalar(io_key).unwrap_or_default();
                    let ours = match io_key.as_str() {
                        "pingTimeout" => "ping_timeout_ms",
                        "pingInterval" => "ping_interval_ms",
                        other => {
                            notes.push(format!("io.{other} has no equivalent: dropped"));
                            continue;
                        }
                    };
                    set(doc, &["server", ours], number(path, &format!("io.{io_key}"), io_value)?.into());
                }
            }
            "redis" => notes.push(
                "redis: sio-push keeps its data in its embedded store: dropped. Its queued messages move with \
                 `sio-push import-redis --redis-url URL` (both services stopped)"
                    .into(),
            ),
            "flakeid" | "servers" => notes.push(format!("{key}: not needed by sio-push: dropped")),
            other => notes.push(format!("{other}: unknown setting: dropped")),
        }
    }
    Ok(())
}

fn import_sites(doc: &mut toml::Table, notes: &mut Vec<String>, path: &Path) -> Result<(), ImportError> {
    let yaml = read_yaml(path)?;
    let Some(sites) = yaml.as_mapping() else {
        return Err(shape(path, "expected a mapping of site names to their settings"));
    };
    for (name, settings) in sites {
        let name = scalar(name).ok_or_else(|| shape(path, "a site name is not text"))?;
        let Some(settings) = settings.as_mapping() else {
            return Err(shape(path, &format!("site {name} is not a mapping")));
        };
        for (key, value) in settings {
            let key = scalar(key).unwrap_or_default();
            let Some((_, ours)) = SITE_KEYS.iter().find(|(old, _)| *old == key) else {
                notes.push(format!("{name}.{key}: unknown site setting: dropped"));
                continue;
            };
            if value.is_null() {
                continue;
            }
            let text = scalar(value).ok_or_else(|| shape(path, &format!("{name}.{key} must be text")))?;
            set(doc, &["sites", &name, ours], text.into());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests;
