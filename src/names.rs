//! Names that come from outside (rooms, events, device ids): how long they may be, which event
//! names the clients keep for themselves, and how such text is shown back in an error or a log
//! line without letting its sender forge lines or make them unbounded.

use std::fmt;

/// Event names that socket.io clients handle themselves, and ours. An emit under one of them
/// breaks clients: 4.x drops the connection with a parse error, 2.x runs its own handlers with
/// forged arguments.
pub const RESERVED_EVENTS: &[&str] = &[
    // socket.io-client 3.x/4.x
    "connect",
    "connect_error",
    "disconnect",
    "disconnecting",
    "newListener",
    "removeListener",
    // socket.io-client 1.x/2.x, besides the above
    "connect_timeout",
    "connecting",
    "error",
    "ping",
    "pong",
    "reconnect",
    "reconnect_attempt",
    "reconnect_error",
    "reconnect_failed",
    "reconnecting",
    // sio-push's own
    "_batch",
    "_resync",
    "_settings",
];

/// Longest text from outside a log line or an error shows of one value.
pub const SHOWN_CHARS: usize = 200;

/// Checks a name against `max` bytes; the error names what it is and the setting.
pub fn check_length(what: &str, name: &str, max: usize) -> Result<(), String> {
    if name.len() > max {
        return Err(format!("{what} of {} bytes is longer than server.max_name_bytes ({max}).", name.len()));
    }
    Ok(())
}

/// Text from outside, quoted, with control characters escaped and cut to [`SHOWN_CHARS`]
/// characters: safe to put in an error reply or a log line.
pub fn shown(text: &str) -> String {
    let mut out = String::with_capacity(text.len().min(SHOWN_CHARS) + 2);
    out.push('"');
    let _ = Escaped::new(&mut out, SHOWN_CHARS).write_all(text);
    out.push('"');
    out
}

/// A writer that escapes control characters (so a value cannot start a line of its own) and
/// stops after `max` characters, then says how much it left out.
pub struct Escaped<W: fmt::Write> {
    inner: W,
    left: usize,
    dropped: usize,
}

impl<W: fmt::Write> Escaped<W> {
    /// Escapes into `inner`, at most `max` characters.
    pub fn new(inner: W, max: usize) -> Self {
        Self { inner, left: max, dropped: 0 }
    }

    /// Writes `text`, then the marker of what was cut, if anything was.
    pub fn write_all(mut self, text: &str) -> fmt::Result {
        fmt::Write::write_str(&mut self, text)?;
        self.finish()
    }

    /// Writes the marker of what was cut, if anything was.
    pub fn finish(mut self) -> fmt::Result {
        if self.dropped > 0 {
            write!(self.inner, "…[{} more bytes]", self.dropped)?;
        }
        Ok(())
    }
}

impl<W: fmt::Write> fmt::Write for Escaped<W> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        for (i, c) in s.char_indices() {
            if self.left == 0 {
                self.dropped += s.len() - i;
                return Ok(());
            }
            self.left -= 1;
            if c.is_control() {
                write!(self.inner, "{}", c.escape_default())?;
            } else {
                self.inner.write_char(c)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shown_text_cannot_break_a_line_or_run_on() {
        assert_eq!(shown("staff"), "\"staff\"");
        assert_eq!(shown("a\nINFO forged line\r\u{1b}[31m"), "\"a\\nINFO forged line\\r\\u{1b}[31m\"");
        let long = "x".repeat(30_000);
        let cut = shown(&long);
        assert!(cut.len() < 300, "{}", cut.len());
        assert!(cut.ends_with(&format!("…[{} more bytes]\"", 30_000 - SHOWN_CHARS)));
        assert_eq!(shown(&"é".repeat(SHOWN_CHARS)).chars().count(), SHOWN_CHARS + 2, "cut by characters");
    }

    #[test]
    fn lengths_are_checked_in_bytes_and_the_error_names_the_setting() {
        assert!(check_length("Room name", "abc", 3).is_ok());
        let err = check_length("Room name", "abcd", 3).unwrap_err();
        assert_eq!(err, "Room name of 4 bytes is longer than server.max_name_bytes (3).");
    }
}
