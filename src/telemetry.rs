//! Logging setup.
//!
//! One subscriber for the whole process, filtered by `RUST_LOG` (default `info`). Under systemd
//! (`JOURNAL_STREAM` set) lines carry no timestamp and no colour, since the journal adds its own.
//! Nothing here ever formats a token, an API key or a message body: callers log ids only.

use std::io::IsTerminal;

use tracing_subscriber::{fmt, EnvFilter};

/// How log lines are written.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// One human-readable line per event.
    #[default]
    Text,
    /// One JSON object per event.
    Json,
}

/// Installs the global subscriber. Safe to call more than once: later calls do nothing.
pub fn init(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let under_journal = std::env::var_os("JOURNAL_STREAM").is_some();
    let builder = fmt().with_env_filter(filter).with_writer(std::io::stderr);
    let result = match (format, under_journal) {
        (LogFormat::Json, _) => builder.json().flatten_event(true).try_init(),
        (LogFormat::Text, true) => builder.without_time().with_ansi(false).try_init(),
        (LogFormat::Text, false) => builder.with_ansi(std::io::stderr().is_terminal()).try_init(),
    };
    drop(result);
}
