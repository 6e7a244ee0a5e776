//! The snapshot format: a backup of the store that does not depend on the backend's own files.
//!
//! A snapshot is UTF-8 text, one JSON object per line (docs/snapshot.md has the full
//! description). The first line names the format and its version; then come the user rooms with
//! their room lists, each device followed by its queue in send order, the idempotency keys, and
//! a last line with the counts and the CRC-32 of every byte before it. A file that lacks the last
//! line, or whose checksum or counts differ, is refused whole: a backup cut short is never
//! mistaken for a small one.
//!
//! ```text
//! {"format":"sio-push-snapshot","version":1,"created_at":1764756000000,"next_id":1048576}
//! {"user":{"site":"shop","user":"user_3","rooms":["staff"]}}
//! {"device":{"site":"shop","user":"user_3","device":"phone","connected":false,"disconnected_at":1764755000000}}
//! {"message":{"id":42,"queued_at":1764754000000,"entry":["order",{"id":7}]}}
//! {"message":{"id":43,"queued_at":1764754000100,"shared":true,"entry":["news","hi"]}}
//! {"idempotency":{"site":"shop","key":"k-1","fingerprint":99,"expires_at":1764842400000}}
//! {"end":{"lines":6,"users":1,"devices":1,"messages":2,"idempotency_keys":1,"crc32":"1a2b3c4d"}}
//! ```
//!
//! A message queued for several devices is written in full once, marked `shared`; its later
//! copies carry only its id and time.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::{self, BufRead, Read, Write};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::store::{
    DeviceKey, DeviceState, Export, Idempotency, Loaded, MessageId, Millis, Queued, Record, Store, StoreError,
};

/// The `format` of the first line.
pub const FORMAT: &str = "sio-push-snapshot";
/// The version this build writes and reads.
pub const VERSION: u32 = 1;
/// The longest line a reader accepts: a device's queue is capped far below this per message.
const MAX_LINE: usize = 256 << 20;

/// The first line.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Header {
    /// Always [`FORMAT`].
    pub format: String,
    /// The format's version.
    pub version: u32,
    /// When the copy was taken (ms since the epoch).
    pub created_at: Millis,
    /// Every message id in the snapshot is below this; a restored store gives out ids from here.
    pub next_id: MessageId,
}

/// What a snapshot holds, counted.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Summary {
    /// Lines before the last.
    pub lines: u64,
    /// User rooms with a room list.
    pub users: u64,
    /// Devices.
    pub devices: u64,
    /// Queued messages (a message queued for three devices counts three times).
    pub messages: u64,
    /// Idempotency keys.
    pub idempotency_keys: u64,
    /// Devices and queued messages per site.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub sites: BTreeMap<String, SiteSummary>,
}

/// One site's part of a [`Summary`].
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SiteSummary {
    /// Devices.
    pub devices: u64,
    /// Queued messages.
    pub messages: u64,
    /// Bytes of queued entries.
    pub bytes: u64,
}

/// A line after the first, as written.
#[derive(Serialize)]
#[serde(rename_all = "snake_case")]
enum Line<'a> {
    User { site: &'a str, user: &'a str, rooms: &'a [String] },
    Device(DeviceLine<'a>),
    Message(MessageLine<'a>),
    Idempotency { site: &'a str, key: &'a str, fingerprint: u64, expires_at: Millis },
    End(EndLine<'a>),
}

#[derive(Serialize, Deserialize)]
struct DeviceLine<'a> {
    site: &'a str,
    user: &'a str,
    device: &'a str,
    connected: bool,
    disconnected_at: Millis,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    overflowed: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    resync_at: Option<MessageId>,
}

#[derive(Serialize, Deserialize)]
struct MessageLine<'a> {
    id: MessageId,
    queued_at: Millis,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    shared: bool,
    #[serde(borrow, default, skip_serializing_if = "Option::is_none")]
    entry: Option<&'a RawValue>,
}

#[derive(Serialize)]
struct EndLine<'a> {
    #[serde(flatten)]
    summary: &'a Summary,
    crc32: String,
}

/// A line after the first, as read (owned where the text may hold escapes).
#[derive(Deserialize)]
#[serde(rename_all = "snake_case")]
enum ReadLine<'a> {
    User {
        site: String,
        user: String,
        rooms: Vec<String>,
    },
    Device(ReadDevice),
    #[serde(borrow)]
    Message(MessageLine<'a>),
    Idempotency {
        site: String,
        key: String,
        fingerprint: u64,
        expires_at: Millis,
    },
    End {
        #[serde(flatten)]
        summary: Summary,
        crc32: String,
    },
}

#[derive(Deserialize)]
struct ReadDevice {
    site: String,
    user: String,
    device: String,
    connected: bool,
    disconnected_at: Millis,
    #[serde(default)]
    overflowed: bool,
    #[serde(default)]
    resync_at: Option<MessageId>,
}

/// Writes a snapshot to `out`: [`SnapshotWriter::new`], [`SnapshotWriter::record`] for each
/// record in export order, then [`SnapshotWriter::finish`].
pub struct SnapshotWriter<W: Write> {
    out: Crc<W>,
    summary: Summary,
    /// The device the next message belongs to.
    device: Option<DeviceKey>,
    /// Ids of shared messages written in full.
    shared: HashSet<MessageId>,
    line: Vec<u8>,
}

impl<W: Write> SnapshotWriter<W> {
    /// Writes the first line.
    pub fn new(out: W, created_at: Millis, next_id: MessageId) -> io::Result<Self> {
        let mut writer = Self {
            out: Crc { inner: out, hasher: crc32fast::Hasher::new() },
            summary: Summary::default(),
            device: None,
            shared: HashSet::new(),
            line: Vec::with_capacity(4096),
        };
        let header = Header { format: FORMAT.into(), version: VERSION, created_at, next_id };
        writer.write_line(&header)?;
        Ok(writer)
    }

    /// Writes one record. A message must come after its device's record.
    pub fn record(&mut self, record: Record) -> io::Result<()> {
        match &record {
            Record::User { site, user, rooms } => {
                self.summary.users += 1;
                self.write_line(&Line::User { site, user, rooms })?;
            }
            Record::Device { key, state } => {
                self.summary.devices += 1;
                self.summary.sites.entry(key.site.to_string()).or_default().devices += 1;
                self.write_line(&Line::Device(DeviceLine {
                    site: &key.site,
                    user: &key.user,
                    device: &key.device,
                    connected: state.connected,
                    disconnected_at: state.disconnected_at,
                    overflowed: state.overflowed,
                    resync_at: state.resync_at,
                }))?;
                self.device = Some(key.clone());
            }
            Record::Message { device, message, shared } => {
                if self.device.as_ref() != Some(device) {
                    return Err(io::Error::other(format!(
                        "message {} of {device:?} does not follow its device's record",
                        message.id
                    )));
                }
                let site = self.summary.sites.entry(device.site.to_string()).or_default();
                site.messages += 1;
                site.bytes += message.entry.len() as u64;
                self.summary.messages += 1;
                let written_before = *shared && !self.shared.insert(message.id);
                let entry = match written_before {
                    true => None,
                    false => Some(
                        serde_json::from_str::<&RawValue>(&message.entry)
                            .map_err(|e| io::Error::other(format!("message {} is not JSON: {e}", message.id)))?,
                    ),
                };
                self.write_line(&Line::Message(MessageLine {
                    id: message.id,
                    queued_at: message.queued_at,
                    shared: *shared,
                    entry,
                }))?;
            }
            Record::Ids { .. } => return Err(io::Error::other("the next message id goes in the header")),
            Record::Idempotency { site, record } => {
                self.summary.idempotency_keys += 1;
                self.write_line(&Line::Idempotency {
                    site,
                    key: &record.key,
                    fingerprint: record.fingerprint,
                    expires_at: record.expires_at,
                })?;
            }
        }
        self.summary.lines += 1;
        Ok(())
    }

    /// Writes the last line and flushes; returns the counts and the writer.
    pub fn finish(mut self) -> io::Result<(Summary, W)> {
        let crc32 = format!("{:08x}", self.out.hasher.clone().finalize());
        let summary = std::mem::take(&mut self.summary);
        self.write_line(&Line::End(EndLine { summary: &summary, crc32 }))?;
        self.out.flush()?;
        Ok((summary, self.out.inner))
    }

    fn write_line(&mut self, line: &impl Serialize) -> io::Result<()> {
        self.line.clear();
        serde_json::to_writer(&mut self.line, line)?;
        // serde_json escapes control characters inside strings, and a raw entry is re-checked
        // as one JSON value, which compact or not never holds a bare newline outside a string…
        // unless it was pretty-printed: refuse that rather than break the framing.
        if self.line.contains(&b'\n') {
            return Err(io::Error::other("a record holds a line break outside a JSON string"));
        }
        self.line.push(b'\n');
        self.out.write_all(&self.line)
    }
}

/// A writer that keeps the CRC-32 of what went through it.
struct Crc<W> {
    inner: W,
    hasher: crc32fast::Hasher,
}

impl<W: Write> Write for Crc<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Why a snapshot was refused.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// It could not be read.
    #[error("cannot read the snapshot: {0}")]
    Io(#[from] io::Error),
    /// A line is not what the format allows there.
    #[error("line {line}: {reason}")]
    Bad {
        /// Its number, from 1.
        line: u64,
        /// What is wrong.
        reason: String,
    },
}

/// Reads a snapshot, checking it as it goes: [`SnapshotReader::new`] reads the first line, then
/// each [`SnapshotReader::next_record`] one record, and `Ok(None)` comes only after a last line
/// whose counts and checksum match. Records returned before an error must not be trusted: read
/// the file through once ([`check`]) before using any of it.
pub struct SnapshotReader<R: BufRead> {
    input: R,
    header: Header,
    line_no: u64,
    hasher: crc32fast::Hasher,
    counted: Summary,
    device: Option<DeviceKey>,
    /// The last message id of the current device.
    last_id: Option<MessageId>,
    /// Shared messages read so far, for their later copies.
    shared: HashMap<MessageId, Arc<str>>,
    done: bool,
    line: Vec<u8>,
}

impl<R: BufRead> SnapshotReader<R> {
    /// Reads and checks the first line.
    pub fn new(input: R) -> Result<Self, SnapshotError> {
        let mut reader = Self {
            input,
            header: Header { format: String::new(), version: 0, created_at: 0, next_id: 0 },
            line_no: 0,
            hasher: crc32fast::Hasher::new(),
            counted: Summary::default(),
            device: None,
            last_id: None,
            shared: HashMap::new(),
            done: false,
            line: Vec::new(),
        };
        if !reader.read_line()? {
            return Err(reader.bad("empty file: not a sio-push snapshot"));
        }
        let header: Header = serde_json::from_slice(&reader.line)
            .map_err(|e| reader.bad(format!("not a sio-push snapshot header: {e}")))?;
        if header.format != FORMAT {
            return Err(reader.bad(format!("format {:?}, expected {FORMAT:?}", header.format)));
        }
        if header.version != VERSION {
            return Err(reader.bad(format!("format version {}, this build reads {VERSION}", header.version)));
        }
        reader.header = header;
        Ok(reader)
    }

    /// The next record; `None` after a last line that matched.
    pub fn next_record(&mut self) -> Result<Option<Record>, SnapshotError> {
        if self.done {
            return Ok(None);
        }
        let crc_before = self.hasher.clone().finalize();
        if !self.read_line()? {
            return Err(self.bad("the file ends before its last line: the backup was cut short"));
        }
        let line = std::mem::take(&mut self.line);
        let parsed = serde_json::from_slice::<ReadLine>(&line).map_err(|e| self.bad(format!("not a record: {e}")));
        let record = match parsed? {
            ReadLine::End { summary, crc32 } => {
                let crc = format!("{crc_before:08x}");
                if crc32 != crc {
                    return Err(self.bad(format!("checksum {crc32} in the file, {crc} computed: the file is damaged")));
                }
                if summary != self.counted {
                    return Err(self.bad(format!("counts {summary:?} in the file, {:?} read", self.counted)));
                }
                let mut rest = [0u8; 1];
                if self.input.read(&mut rest)? != 0 {
                    return Err(self.bad("bytes after the last line"));
                }
                self.done = true;
                self.line = line;
                return Ok(None);
            }
            ReadLine::User { site, user, rooms } => {
                self.counted.users += 1;
                Record::User { site, user, rooms }
            }
            ReadLine::Device(d) => {
                let key = DeviceKey::new(&d.site, &d.user, &d.device);
                self.counted.devices += 1;
                self.counted.sites.entry(d.site).or_default().devices += 1;
                self.device = Some(key.clone());
                self.last_id = None;
                let state = DeviceState {
                    connected: d.connected,
                    disconnected_at: d.disconnected_at,
                    overflowed: d.overflowed,
                    resync_at: d.resync_at,
                    ..DeviceState::default()
                };
                Record::Device { key, state }
            }
            ReadLine::Message(m) => self.message(m)?,
            ReadLine::Idempotency { site, key, fingerprint, expires_at } => {
                self.counted.idempotency_keys += 1;
                Record::Idempotency { site, record: Idempotency { key, fingerprint, expires_at } }
            }
        };
        self.counted.lines += 1;
        self.line = line;
        Ok(Some(record))
    }

    fn message(&mut self, m: MessageLine<'_>) -> Result<Record, SnapshotError> {
        let Some(device) = self.device.clone() else {
            return Err(self.bad("a message before any device"));
        };
        if m.id >= self.header.next_id {
            return Err(self.bad(format!("message id {} is not below next_id {}", m.id, self.header.next_id)));
        }
        if self.last_id.is_some_and(|last| m.id <= last) {
            return Err(self.bad(format!(
                "message id {} does not follow {} in its queue",
                m.id,
                self.last_id.unwrap_or(0)
            )));
        }
        let entry: Arc<str> = match (m.entry, m.shared) {
            (Some(entry), shared) => {
                if !entry.get().starts_with('[') {
                    return Err(self.bad(format!("message {}: the entry is not an array [event, ...args]", m.id)));
                }
                let entry: Arc<str> = entry.get().into();
                if shared {
                    self.shared.insert(m.id, entry.clone());
                }
                entry
            }
            (None, true) => match self.shared.get(&m.id) {
                Some(entry) => entry.clone(),
                None => return Err(self.bad(format!("message {} refers to a shared message not written before", m.id))),
            },
            (None, false) => return Err(self.bad(format!("message {} has no entry", m.id))),
        };
        self.last_id = Some(m.id);
        self.counted.messages += 1;
        let site = self.counted.sites.entry(device.site.to_string()).or_default();
        site.messages += 1;
        site.bytes += entry.len() as u64;
        Ok(Record::Message { device, message: Queued { id: m.id, queued_at: m.queued_at, entry }, shared: m.shared })
    }

    /// Reads the next line (without its newline) into `self.line`, adding it to the checksum;
    /// `false` at the end of the input.
    fn read_line(&mut self) -> Result<bool, SnapshotError> {
        self.line.clear();
        let read = Read::take(&mut self.input, MAX_LINE as u64 + 1).read_until(b'\n', &mut self.line)?;
        if read == 0 {
            return Ok(false);
        }
        self.line_no += 1;
        if self.line.last() != Some(&b'\n') {
            let reason = match self.line.len() > MAX_LINE {
                true => format!("a line longer than {MAX_LINE} bytes"),
                false => "the file ends inside a line: the backup was cut short".into(),
            };
            return Err(self.bad(reason));
        }
        self.hasher.update(&self.line);
        self.line.pop();
        Ok(true)
    }

    fn bad(&self, reason: impl Into<String>) -> SnapshotError {
        SnapshotError::Bad { line: self.line_no, reason: reason.into() }
    }
}

/// Writes `export` as a snapshot to `out` (blocking: call it from a blocking thread).
pub fn write<W: Write>(export: Export, out: W, created_at: Millis) -> io::Result<(Summary, W)> {
    let mut writer = SnapshotWriter::new(out, created_at, export.next_id)?;
    let mut failed = None;
    let exported = (export.write)(&mut |record| {
        writer.record(record).inspect_err(|e| failed = Some(io::Error::new(e.kind(), e.to_string())))
    });
    if let Some(e) = failed {
        return Err(e);
    }
    exported.map_err(io::Error::other)?;
    writer.finish()
}

/// Records loaded into a store at a time.
const LOAD_CHUNK: usize = 2_000;

/// Loads every record of a snapshot into `store`, then makes it durable. Read the snapshot
/// through once with [`check`] first: a damage found on the way leaves what came before loaded.
pub async fn load<R: BufRead>(store: &dyn Store, reader: SnapshotReader<R>) -> Result<Loaded, LoadError> {
    load_with(store, reader, Some).await
}

/// As [`load`], each record (the next id first) passed through `map`, which may leave it out.
pub async fn load_with<R: BufRead>(
    store: &dyn Store,
    mut reader: SnapshotReader<R>,
    mut map: impl FnMut(Record) -> Option<Record> + Send,
) -> Result<Loaded, LoadError> {
    let mut total = match map(Record::Ids { next: reader.header.next_id }) {
        Some(ids) => store.load(vec![ids]).await?,
        None => Loaded::default(),
    };
    let mut chunk = Vec::with_capacity(LOAD_CHUNK);
    loop {
        let record = reader.next_record()?;
        let end = record.is_none();
        chunk.extend(record.and_then(&mut map));
        if chunk.len() == LOAD_CHUNK || (end && !chunk.is_empty()) {
            let loaded = store.load(std::mem::take(&mut chunk)).await?;
            total.written += loaded.written;
            total.skipped += loaded.skipped;
        }
        if end {
            break;
        }
    }
    store.flush().await?;
    Ok(total)
}

/// Why [`load`] stopped.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The snapshot.
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
    /// The store.
    #[error("the store refused the records: {0}")]
    Store(#[from] StoreError),
}

/// Reads a whole snapshot and checks it; returns its header and counts.
pub fn check(input: impl BufRead) -> Result<(Header, Summary), SnapshotError> {
    let mut reader = SnapshotReader::new(input)?;
    while reader.next_record()?.is_some() {}
    Ok((reader.header.clone(), reader.counted))
}

/// As [`check`], and returns the ids of the snapshot's messages per site, in order, once each.
pub fn check_ids(input: impl BufRead) -> Result<(Summary, BTreeMap<String, Vec<MessageId>>), SnapshotError> {
    let mut reader = SnapshotReader::new(input)?;
    let mut ids = BTreeMap::<String, Vec<MessageId>>::new();
    while let Some(record) = reader.next_record()? {
        if let Record::Message { device, message, .. } = record {
            ids.entry(device.site.to_string()).or_default().push(message.id);
        }
    }
    for of_site in ids.values_mut() {
        of_site.sort_unstable();
        of_site.dedup();
    }
    Ok((reader.counted, ids))
}

#[cfg(test)]
mod tests;
