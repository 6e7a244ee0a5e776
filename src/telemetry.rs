//! Logging setup.
//!
//! One subscriber for the whole process, filtered by `RUST_LOG` (default `info`). Under systemd
//! (`JOURNAL_STREAM` set) lines carry no timestamp and no colour, since the journal adds its own.
//! Nothing here ever formats a token, an API key or a message body: callers log ids only.
//!
//! Many logged values come from outside (device ids, rooms, event names, refusal reasons). In
//! text lines every value has its control characters escaped and is cut after
//! [`LOG_VALUE_CHARS`] characters, so that a client can neither start a forged line of its own
//! nor make one unbounded. JSON lines escape by their format; the names in them are bounded by
//! `server.max_name_bytes` before they are logged.

use std::io::IsTerminal;

use tracing_subscriber::{fmt, EnvFilter};

use crate::names::Escaped;

/// Longest value a text log line shows of one field (an error's cause chain fits).
pub const LOG_VALUE_CHARS: usize = 1024;

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
        (LogFormat::Text, true) => builder.fmt_fields(safe_fields()).without_time().with_ansi(false).try_init(),
        (LogFormat::Text, false) => {
            builder.fmt_fields(safe_fields()).with_ansi(std::io::stderr().is_terminal()).try_init()
        }
    };
    drop(result);
}

/// Text fields as `name=value`, each value escaped and cut (see the module docs).
fn safe_fields() -> impl for<'w> tracing_subscriber::fmt::FormatFields<'w> + Send + Sync + 'static {
    use std::fmt::Write;
    use tracing_subscriber::field::MakeExt;
    tracing_subscriber::fmt::format::debug_fn(|w, field, value| {
        if field.name() != "message" {
            write!(w, "{field}=")?;
        }
        let mut escaped = Escaped::new(&mut *w, LOG_VALUE_CHARS);
        write!(escaped, "{value:?}")?;
        escaped.finish()
    })
    .delimited(" ")
}
