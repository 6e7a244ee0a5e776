//! The store's write-ahead log: what makes a change durable without flushing sled.
//!
//! sled 0.34 makes a change durable with `flush()`, which hands the write to its I/O thread
//! pool and waits on `sync_file_range` (still not a real sync: see `Sync` in `mod.rs`). Doing
//! that for every group-commit round cost more CPU than everything else a message needs. So the
//! jobs of a round are logged here instead, as physical operations (put this key, remove that
//! key), and the round is durable once its record is written and `fdatasync`ed: one write and one
//! sync on one thread. sled gets the changes (`round.rs`) and is flushed and synced only at a
//! checkpoint.
//!
//! There are two log files. Rounds go to the active one. A checkpoint seals it (synced) and
//! makes the other, empty one active, then gives the sealed file's changes to sled a little at a
//! time between rounds, so that no round waits for the whole checkpoint (giving a second of
//! changes to sled took 20 to 130 ms). Once sled holds them durably the sealed file is
//! released: started over, empty, for the next checkpoint.
//!
//! Recovery replays both files, the older generation first, onto whatever state sled recovered.
//! That is correct from any sled state since the last completed checkpoint: replaying, in order,
//! every put and remove since then leaves each key with the value of its last operation, or
//! untouched if it has none. sled's recovery yields a prefix of the operations it was given, and
//! it is given changes only after their records were synced (a sealed file is synced whole).
//!
//! A file is written in place, never appended to. Appending made every `fdatasync` write the
//! inode too (the file's new size): on this kind of VM a second synchronous I/O, about a quarter
//! of each sync's CPU and time. So a file is zero-filled ahead of the records in steps of
//! `GROW_BY` and keeps its size when it starts over; a sync then writes only the record's blocks.
//! Starting over gives the file a new generation, higher than any before, in its header instead
//! of truncating it, and a record counts only if it carries its file's generation, so records of
//! an earlier generation that still sit in the file are never replayed, even where a new record
//! happens to end exactly where an old one did.
//!
//! Layout of a file: a 16-byte header (`MAGIC`, then the generation: u64 LE), then records of
//! `[len: u32 LE][crc32 of generation LE and payload: u32 LE][payload]`, one per round; a payload
//! is the record's sync mark (u64 LE: how far the file had been synced when it was written), then
//! ops of `[1][klen: u32][key][vlen: u32][value]` (put) or `[0][klen: u32][key]` (remove).
//! Replay of a file stops at its first short, zero-length, damaged or older record: a round whose
//! write was cut off, and nobody was told it was stored. Such a record can also be followed by a
//! whole one (the disk may write a later page before an earlier one, and a crash between leaves
//! that), but only while neither was synced: if a later record's sync mark says the file had been
//! synced past the one that does not read, that one reached the disk whole and was damaged since,
//! and the log refuses to open rather than start without what it held. Logs of the earlier
//! layouts are still replayed (the second: the same without sync marks; the first: one file,
//! records from offset 0, the crc over the payload only, no header), then started over.

use std::fs::File;
use std::io::{self, Read};
use std::os::unix::fs::FileExt;
use std::path::Path;

use super::round::Op;

/// The log files' names, inside the data directory (beside sled's files).
pub const FILE_NAMES: [&str; 2] = ["sio-push.wal", "sio-push.wal.2"];

/// The first bytes of a log file of this layout.
const MAGIC: &[u8; 8] = b"siowal\x00\x03";
/// The first bytes of a log file of the second layout (records without a sync mark).
const MAGIC_2: &[u8; 8] = b"siowal\x00\x02";
/// A record's sync mark: how far its file had been synced when it was written (u64 LE).
const SYNC_MARK: usize = 8;
/// The header: `MAGIC` and the generation.
const FILE_HEADER: u64 = 16;
/// A record's header: its length and crc.
const HEADER: usize = 8;
/// Where a round's operations start in the record being built: after its header and sync mark.
const ROUND_START: usize = HEADER + SYNC_MARK;
/// A file is zero-filled ahead of the records in steps of this size.
const GROW_BY: u64 = 1 << 20;
/// Starting over, a file that grew beyond this (a huge round) gives the rest of its space back.
const KEEP: u64 = 16 << 20;

fn put_bytes(out: &mut Vec<u8>, bytes: &[u8]) {
    let len = u32::try_from(bytes.len()).expect("keys and values are far below 4 GiB");
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(bytes);
}

/// The open log. Owned by the writer thread.
pub struct Wal {
    files: [LogFile; 2],
    /// The file rounds are written to.
    active: usize,
    /// The other file holds records that sled may not hold durably yet.
    sealed: bool,
    /// The current round's record: an 8-byte header to fill in, then its operations.
    round: Vec<u8>,
    /// The records found at open must reach sled (a checkpoint, then `reset`) before anything
    /// new is written: a new record could otherwise come to be followed by a stale one that a
    /// crash left behind the first torn record.
    replay_pending: bool,
    /// The highest generation given out.
    generation: u64,
}

/// One of the two files.
struct LogFile {
    file: File,
    /// Its records carry this; `None` for a file without a header (new, or the first layout).
    generation: Option<u64>,
    /// Where the next record is written: the end of its generation's records.
    end: u64,
    /// The file's size: from `end` up to here it holds zeros or stale records.
    allocated: u64,
    /// Records were written since the last sync.
    unsynced: bool,
    /// How far the file is synced: each record carries it as its sync mark.
    synced: u64,
}

impl Wal {
    /// Opens (or creates) the log in `dir` and returns it with one batch per complete record,
    /// older file first, to be applied in order, and made durable, before [`Wal::reset`] lets
    /// anything new be written.
    pub fn open(dir: &Path) -> io::Result<(Self, Vec<sled::Batch>)> {
        let (first, first_batches) = LogFile::open(&dir.join(FILE_NAMES[0]))?;
        let (second, second_batches) = LogFile::open(&dir.join(FILE_NAMES[1]))?;
        let newer = usize::from(second.generation > first.generation);
        let generation = first.generation.max(second.generation).unwrap_or(0);
        let (mut batches, newer_batches) =
            if newer == 1 { (first_batches, second_batches) } else { (second_batches, first_batches) };
        batches.extend(newer_batches);
        let mut wal = Self {
            files: [first, second],
            active: newer,
            sealed: true,
            round: vec![0; ROUND_START],
            replay_pending: !batches.is_empty(),
            generation,
        };
        if batches.is_empty() {
            wal.reset()?;
        }
        Ok((wal, batches))
    }

    /// Adds a job's changes to the current round.
    #[cfg(test)]
    pub fn log(&mut self, changes: &super::round::Changes) {
        for (key, op) in &changes.0 {
            self.log_one(key, op);
        }
    }

    /// Adds one change to the round being logged.
    pub fn log_one(&mut self, key: &[u8], op: &Op) {
        match op {
            Op::Put(value) | Op::PutNew(value) => {
                self.round.push(1);
                put_bytes(&mut self.round, key);
                put_bytes(&mut self.round, value);
            }
            Op::Remove => {
                self.round.push(0);
                put_bytes(&mut self.round, key);
            }
        }
    }

    /// Writes the current round as one record of the active file, and with `sync` syncs the
    /// file: this record and every one written before it. On failure the record is dropped.
    pub fn commit(&mut self, sync: bool) -> io::Result<()> {
        let write = self.round.len() > ROUND_START;
        let active = &mut self.files[self.active];
        let sync = sync && (write || active.unsynced);
        if !write && !sync {
            return Ok(());
        }
        if self.replay_pending {
            self.round.truncate(ROUND_START);
            return Err(io::Error::other("the records replayed at open are not checkpointed yet"));
        }
        let result = active.commit(&mut self.round, write, sync);
        self.round.truncate(ROUND_START);
        result
    }

    /// Bytes of records in the active file.
    pub fn len(&self) -> u64 {
        self.files[self.active].end.saturating_sub(FILE_HEADER)
    }

    /// A checkpoint's first step: syncs the active file and makes the other, empty one active.
    /// The sealed file keeps its records until [`Wal::release`].
    pub fn seal(&mut self) -> io::Result<()> {
        if self.sealed {
            return Err(io::Error::other("a sealed log file is not released yet"));
        }
        let active = &mut self.files[self.active];
        if active.unsynced {
            sync_file(&active.file)?;
            active.unsynced = false;
            active.synced = active.end;
        }
        self.active = 1 - self.active;
        self.sealed = true;
        Ok(())
    }

    /// A sealed file is waiting for sled to hold its changes.
    pub fn is_sealed(&self) -> bool {
        self.sealed
    }

    /// Starts the sealed file over, in a generation above the active one's (it becomes the
    /// active one at the next seal). Call only once sled holds every change it logged durably.
    pub fn release(&mut self) -> io::Result<()> {
        if self.sealed {
            let generation = self.next_generation();
            self.files[1 - self.active].reset(generation)?;
            self.sealed = false;
        }
        Ok(())
    }

    /// Starts both files over. Call only once sled holds every logged change durably.
    pub fn reset(&mut self) -> io::Result<()> {
        // The other file last, with the higher generation: it is the active one after the next
        // seal, and the active file's records must replay after the sealed one's.
        for i in [self.active, 1 - self.active] {
            let generation = self.next_generation();
            self.files[i].reset(generation)?;
        }
        self.sealed = false;
        self.replay_pending = false;
        Ok(())
    }

    /// A generation above every one given out or found, and above the clock, so that a file
    /// whose header was lost can never come back to the generation of its stale records.
    fn next_generation(&mut self) -> u64 {
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        self.generation = self.generation.max(now.as_nanos() as u64) + 1;
        self.generation
    }
}

impl LogFile {
    /// Opens (or creates) one file; returns it with the batches of its complete records.
    fn open(path: &Path) -> io::Result<(Self, Vec<sled::Batch>)> {
        let mut file = std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(false).open(path)?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes)?;
        let layout = Layout::of(&bytes);
        let (batches, end) = decode(&bytes, layout.first_record(), layout);
        if layout == Layout::First && !batches.is_empty() {
            tracing::info!(path = %path.display(), "write-ahead log of the first layout: replayed, then started over in the current one");
        }
        if let Some(at) = proven_damage(&bytes, end, layout) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "{} is damaged at byte {at}: the record there does not read, yet a later record shows the file \
                     had been synced past it, so it is not a write cut by a crash",
                    path.display()
                ),
            ));
        }
        let allocated = file.metadata()?.len();
        let (generation, end) = (layout.generation(), end as u64);
        Ok((Self { file, generation, end, allocated, unsynced: false, synced: end }, batches))
    }

    /// Writes `round` (with `write`) as a record at `end`, and with `sync` syncs the file. On
    /// failure the record's header is zeroed, so a later record never follows a torn one.
    fn commit(&mut self, round: &mut [u8], write: bool, sync: bool) -> io::Result<()> {
        let before = self.end;
        let mut result = if write { self.write_record(round) } else { Ok(()) };
        if result.is_ok() && write {
            self.unsynced = true;
        }
        if result.is_ok() && sync {
            result = sync_file(&self.file);
            self.unsynced &= result.is_err();
            if result.is_ok() {
                self.synced = self.end;
            }
        }
        if result.is_err() && write {
            let _ = self.file.write_all_at(&[0; HEADER], before);
            self.end = before;
        }
        result
    }

    /// Writes the record at `end` and moves `end` past it; on failure `end` stays.
    fn write_record(&mut self, record: &mut [u8]) -> io::Result<()> {
        let generation = self.generation.ok_or_else(|| io::Error::other("a log file without a header"))?;
        let payload_len = u32::try_from(record.len() - HEADER)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "a round of over 4 GiB"))?;
        record[HEADER..ROUND_START].copy_from_slice(&self.synced.to_le_bytes());
        let crc = record_crc(generation, &record[HEADER..]);
        record[..4].copy_from_slice(&payload_len.to_le_bytes());
        record[4..HEADER].copy_from_slice(&crc.to_le_bytes());
        let end = self.end + record.len() as u64;
        self.grow_to(end)?;
        self.file.write_all_at(record, self.end)?;
        self.end = end;
        Ok(())
    }

    /// Zero-fills the file up to at least `len`, in steps of `GROW_BY`. Only these writes change
    /// the file's size, so only the syncs after them write its inode.
    fn grow_to(&mut self, len: u64) -> io::Result<()> {
        if len <= self.allocated {
            return Ok(());
        }
        let target = len.div_ceil(GROW_BY) * GROW_BY;
        let zeros = vec![0; (target - self.allocated).min(GROW_BY) as usize];
        while self.allocated < target {
            let n = (target - self.allocated).min(zeros.len() as u64) as usize;
            self.file.write_all_at(&zeros[..n], self.allocated)?;
            self.allocated += n as u64;
        }
        Ok(())
    }

    /// Starts the file over in `generation`, which makes every record in it stale.
    fn reset(&mut self, generation: u64) -> io::Result<()> {
        if self.allocated > KEEP {
            self.file.set_len(KEEP)?;
            self.allocated = KEEP;
        }
        let mut header = [0; FILE_HEADER as usize + HEADER];
        header[..8].copy_from_slice(MAGIC);
        header[8..16].copy_from_slice(&generation.to_le_bytes());
        // The zeroed record header after it marks the end, whatever stale bytes follow.
        self.grow_to(GROW_BY)?;
        self.file.write_all_at(&header, 0)?;
        sync_file(&self.file)?;
        self.generation = Some(generation);
        self.end = FILE_HEADER;
        self.unsynced = false;
        self.synced = FILE_HEADER;
        Ok(())
    }
}

/// A failed `fdatasync` of a log file. The kernel may have dropped the pages it could not write
/// and reported it once: a later sync can succeed without them, so nothing written since the
/// last good sync can be trusted to be on disk. The store stops on one (the writer checks with
/// [`is_sync_failure`]); the next start replays what reached the disk.
#[derive(Debug)]
struct SyncFailed(io::Error);

impl std::fmt::Display for SyncFailed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "fdatasync of the write-ahead log failed: {}", self.0)
    }
}

impl std::error::Error for SyncFailed {}

/// `fdatasync`, its failure marked as a [`SyncFailed`].
fn sync_file(file: &File) -> io::Result<()> {
    file.sync_data().map_err(|e| io::Error::new(e.kind(), SyncFailed(e)))
}

/// The error is a failed sync of the log: see [`SyncFailed`].
pub fn is_sync_failure(e: &io::Error) -> bool {
    e.get_ref().is_some_and(|inner| inner.is::<SyncFailed>())
}

/// How a file's records are laid out, from its header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Layout {
    /// No header: records from offset 0, each crc over its payload only.
    First,
    /// `MAGIC_2` and a generation: each crc over the generation and the payload.
    Second(u64),
    /// `MAGIC` and a generation: as the second, and each payload starts with its sync mark.
    Third(u64),
}

impl Layout {
    fn of(bytes: &[u8]) -> Self {
        let generation = || Some(u64::from_le_bytes(bytes.get(8..16)?.try_into().ok()?));
        match (bytes.get(..8), generation()) {
            (Some(magic), Some(generation)) if magic == MAGIC => Layout::Third(generation),
            (Some(magic), Some(generation)) if magic == MAGIC_2 => Layout::Second(generation),
            _ => Layout::First,
        }
    }

    fn generation(self) -> Option<u64> {
        match self {
            Layout::First => None,
            Layout::Second(generation) | Layout::Third(generation) => Some(generation),
        }
    }

    /// Where the records start.
    fn first_record(self) -> usize {
        match self {
            Layout::First => 0,
            _ => FILE_HEADER as usize,
        }
    }

    /// Bytes before a payload's operations (the sync mark).
    fn mark_len(self) -> usize {
        match self {
            Layout::Third(_) => SYNC_MARK,
            _ => 0,
        }
    }
}

/// The generation (`None`: no header, the first layout), the batches of the complete records of
/// that generation, and where they end.
#[cfg(test)]
fn parse(bytes: &[u8]) -> (Option<u64>, Vec<sled::Batch>, usize) {
    let layout = Layout::of(bytes);
    let (batches, end) = decode(bytes, layout.first_record(), layout);
    (layout.generation(), batches, end)
}

/// A record's crc: over its generation and its payload.
fn record_crc(generation: u64, payload: &[u8]) -> u32 {
    let mut crc = crc32fast::Hasher::new();
    crc.update(&generation.to_le_bytes());
    crc.update(payload);
    crc.finalize()
}

/// Decodes the complete, intact records from `at` on: their batches, and where they end.
fn decode(bytes: &[u8], mut at: usize, layout: Layout) -> (Vec<sled::Batch>, usize) {
    let mut batches = Vec::new();
    while let Some((batch, _, next)) = record_at(bytes, at, layout) {
        batches.push(batch);
        at = next;
    }
    (batches, at)
}

/// The intact record at `at`: its batch, its sync mark (the third layout), and where it ends.
fn record_at(bytes: &[u8], at: usize, layout: Layout) -> Option<(sled::Batch, Option<u64>, usize)> {
    let header = bytes.get(at..at + HEADER)?;
    let len = u32::from_le_bytes(header[..4].try_into().expect("4 bytes")) as usize;
    let crc = u32::from_le_bytes(header[4..].try_into().expect("4 bytes"));
    let payload = bytes.get(at + HEADER..(at + HEADER).checked_add(len)?)?;
    let expected = match layout.generation() {
        Some(generation) => record_crc(generation, payload),
        None => crc32fast::hash(payload),
    };
    if len == 0 || crc != expected {
        return None;
    }
    let (mark, ops) = payload.split_at_checked(layout.mark_len())?;
    let mark = (!mark.is_empty()).then(|| u64::from_le_bytes(mark.try_into().expect("8 bytes")));
    Some((decode_round(ops)?, mark, at + HEADER + len))
}

fn decode_round(mut payload: &[u8]) -> Option<sled::Batch> {
    fn take<'a>(input: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
        let (head, rest) = (input.get(..n)?, input.get(n..)?);
        *input = rest;
        Some(head)
    }
    fn take_len(input: &mut &[u8]) -> Option<usize> {
        Some(u32::from_le_bytes(take(input, 4)?.try_into().ok()?) as usize)
    }
    let mut batch = sled::Batch::default();
    while !payload.is_empty() {
        let kind = take(&mut payload, 1)?[0];
        let klen = take_len(&mut payload)?;
        let key = take(&mut payload, klen)?;
        match kind {
            1 => {
                let vlen = take_len(&mut payload)?;
                batch.insert(key, take(&mut payload, vlen)?);
            }
            0 => batch.remove(key),
            _ => return None,
        }
    }
    Some(batch)
}

/// The first intact record of the file's generation past `end` (where replay stopped), if any:
/// where it starts, and its sync mark.
fn record_past(bytes: &[u8], end: usize, layout: Layout) -> Option<(usize, Option<u64>)> {
    layout.generation()?;
    (end + 1..bytes.len()).find_map(|at| {
        let (_, mark, _) = could_be_record(&bytes[at..], layout.mark_len()).then(|| record_at(bytes, at, layout))??;
        Some((at, mark))
    })
}

/// Damage that a crash cannot explain: replay stopped at `end`, yet a later record of the same
/// generation says the file had been synced past `end` when it was written, so the bytes at `end`
/// had reached the disk whole. (A record cut by a crash, or one whose page the disk did not
/// write while a later one's it did, was never synced, and nobody was told it was stored.)
fn proven_damage(bytes: &[u8], end: usize, layout: Layout) -> Option<usize> {
    match record_past(bytes, end, layout)? {
        (_, Some(mark)) if mark > end as u64 => Some(end),
        _ => None,
    }
}

/// One log file, as `sio-push verify` reports it.
#[derive(Debug)]
pub struct FileReport {
    /// Its name in the data directory.
    pub name: &'static str,
    /// Its size.
    pub size: u64,
    /// Its generation (`None`: the first layout, or no file).
    pub generation: Option<u64>,
    /// The records replay takes from it.
    pub records: usize,
    /// Where replay stops.
    pub end: u64,
    /// A whole record of the file's generation found past `end`: the record at `end` is damaged
    /// or was cut. Replay ignores it and what follows.
    pub record_past_end: Option<u64>,
    /// That record shows the file had been synced past `end`: the record there is damaged, not
    /// cut by a crash (the store refuses to open).
    pub damaged: bool,
}

/// Reads both log files and reports on each; changes nothing.
pub fn inspect(dir: &Path) -> io::Result<Vec<FileReport>> {
    let mut reports = Vec::new();
    for name in FILE_NAMES {
        let bytes = match std::fs::read(dir.join(name)) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(e),
        };
        let layout = Layout::of(&bytes);
        let (batches, end) = decode(&bytes, layout.first_record(), layout);
        let past = record_past(&bytes, end, layout);
        reports.push(FileReport {
            name,
            size: bytes.len() as u64,
            generation: layout.generation(),
            records: batches.len(),
            end: end as u64,
            record_past_end: past.map(|(at, _)| at as u64),
            damaged: matches!(past, Some((_, Some(mark))) if mark > end as u64),
        });
    }
    Ok(reports)
}

/// A cheap look at whether a record could start at the front of `bytes`, before its crc is
/// computed: its length fits, and its operations' kinds and lengths (after `mark` bytes) add up
/// to exactly that length, walked without reading the keys and values. Scanning a file at every
/// offset must not checksum a random length's worth of bytes at each.
fn could_be_record(bytes: &[u8], mark: usize) -> bool {
    let word = |at: usize| bytes.get(at..at + 4).map(|b| u32::from_le_bytes(b.try_into().expect("4 bytes")) as usize);
    let Some(len) = word(0) else { return false };
    let end = HEADER + len;
    if len <= mark || end > bytes.len() {
        return false;
    }
    let mut at = HEADER + mark;
    while at < end {
        let (kind, Some(klen)) = (bytes[at], word(at + 1)) else { return false };
        at = at.saturating_add(5).saturating_add(klen);
        match kind {
            0 => {}
            1 => match word(at) {
                Some(vlen) => at = at.saturating_add(4).saturating_add(vlen),
                None => return false,
            },
            _ => return false,
        }
    }
    at == end
}

/// The log's records in replay order: both files, the older generation first (reading the
/// files only).
#[cfg(test)]
fn logged(dir: &Path) -> Vec<sled::Batch> {
    let mut files: Vec<_> =
        FILE_NAMES.iter().map(|name| parse(&std::fs::read(dir.join(name)).unwrap_or_default())).collect();
    files.sort_by_key(|(generation, _, _)| *generation);
    files.into_iter().flat_map(|(_, batches, _)| batches).collect()
}

/// How many records of their files' generations the log in `dir` holds; changes nothing.
#[cfg(test)]
pub fn records(dir: &Path) -> usize {
    logged(dir).len()
}

#[cfg(test)]
mod tests {
    use super::super::round::Changes;
    use super::*;

    fn round(ops: &[(&str, Option<&str>)]) -> Changes {
        let mut changes = Changes::default();
        for (k, v) in ops {
            match v {
                Some(v) => changes.insert(k, v),
                None => changes.remove(k),
            }
        }
        changes
    }

    /// Logs and commits one round.
    fn append(wal: &mut Wal, changes: &Changes) -> io::Result<()> {
        wal.log(changes);
        wal.commit(true)
    }

    /// The log's records applied to an empty database.
    fn replay(dir: &Path) -> sled::Db {
        let db = sled::Config::new().temporary(true).open().unwrap();
        for b in logged(dir) {
            db.apply_batch(b).unwrap();
        }
        db
    }

    fn value(db: &sled::Db, key: &str) -> Option<String> {
        db.get(key).unwrap().map(|v| String::from_utf8(v.to_vec()).unwrap())
    }

    /// The active file's path and where its records end.
    fn active(dir: &tempfile::TempDir, wal: &Wal) -> (std::path::PathBuf, u64) {
        (dir.path().join(FILE_NAMES[wal.active]), wal.files[wal.active].end)
    }

    #[test]
    fn appended_rounds_replay_in_order_and_a_torn_tail_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let (path, last_end) = {
            let (mut wal, batches) = Wal::open(dir.path()).unwrap();
            assert!(batches.is_empty());
            append(&mut wal, &round(&[("a", Some("1")), ("b", Some("2"))])).unwrap();
            append(&mut wal, &round(&[("a", None)])).unwrap();
            append(&mut wal, &round(&[("b", Some("3")), ("c", Some("4"))])).unwrap();
            active(&dir, &wal)
        };
        let db = replay(dir.path());
        assert_eq!((value(&db, "a"), value(&db, "b"), value(&db, "c")), (None, Some("3".into()), Some("4".into())));

        // Cut the last record short, as a crash in the middle of its write would: the file is
        // zero-filled ahead, so its last bytes are zeros then.
        let file = std::fs::OpenOptions::new().write(true).open(path).unwrap();
        file.write_all_at(&[0; 3], last_end - 3).unwrap();
        let db = replay(dir.path());
        assert_eq!((value(&db, "a"), value(&db, "b"), value(&db, "c")), (None, Some("2".into()), None));
    }

    /// Starting over keeps the old records in the file; they must never count again, not even
    /// where a new record ends exactly where an old one did and the next old one follows.
    #[test]
    fn records_of_an_earlier_generation_are_never_replayed() {
        let dir = tempfile::tempdir().unwrap();
        let (mut wal, _) = Wal::open(dir.path()).unwrap();
        append(&mut wal, &round(&[("a", Some("1"))])).unwrap();
        let (path, first_end) = active(&dir, &wal);
        append(&mut wal, &round(&[("b", Some("2"))])).unwrap();
        wal.reset().unwrap();
        append(&mut wal, &round(&[("c", Some("3"))])).unwrap();
        assert_eq!(active(&dir, &wal), (path, first_end), "the new record ends where the first old one did");
        let db = replay(dir.path());
        assert_eq!((value(&db, "a"), value(&db, "b"), value(&db, "c")), (None, None, Some("3".into())));
    }

    /// A crash can leave complete records behind a torn one. Until what was replayed is in sled
    /// and the log has started over, a new record could come to be followed by one of those.
    #[test]
    fn nothing_new_is_written_before_the_replayed_records_are_checkpointed() {
        let dir = tempfile::tempdir().unwrap();
        append(&mut Wal::open(dir.path()).unwrap().0, &round(&[("a", Some("1"))])).unwrap();
        let (mut wal, batches) = Wal::open(dir.path()).unwrap();
        assert_eq!(batches.len(), 1);
        assert!(append(&mut wal, &round(&[("b", Some("2"))])).is_err());
        assert_eq!(records(dir.path()), 1, "the refused round left the log as it was");
        wal.reset().unwrap();
        append(&mut wal, &round(&[("b", Some("2"))])).unwrap();
        let db = replay(dir.path());
        assert_eq!((value(&db, "a"), value(&db, "b")), (None, Some("2".into())));
    }

    /// The point of the layout: a round's sync writes no inode, because the size stays.
    #[test]
    fn rounds_are_written_in_place_and_the_file_grows_in_whole_steps() {
        let dir = tempfile::tempdir().unwrap();
        let (mut wal, _) = Wal::open(dir.path()).unwrap();
        let path = active(&dir, &wal).0;
        let size = || std::fs::metadata(&path).unwrap().len();
        assert_eq!(size(), GROW_BY, "zero-filled ahead from the start");
        for i in 0..100 {
            append(&mut wal, &round(&[(&format!("k{i}"), Some("v"))])).unwrap();
        }
        assert_eq!(size(), GROW_BY);
        let big = "x".repeat(GROW_BY as usize);
        append(&mut wal, &round(&[("big", Some(&big))])).unwrap();
        assert_eq!(size(), 2 * GROW_BY);
        assert_eq!(value(&replay(dir.path()), "big").map(|v| v.len()), Some(big.len()));
        wal.reset().unwrap();
        assert_eq!(size(), 2 * GROW_BY, "starting over keeps the space");
        assert_eq!(records(dir.path()), 0);
    }

    #[test]
    fn a_log_of_the_first_layout_is_replayed_then_started_over() {
        let dir = tempfile::tempdir().unwrap();
        // [len][crc32 of the payload][payload] from offset 0, no header: put a = 1.
        let payload = [1, 1, 0, 0, 0, b'a', 1, 0, 0, 0, b'1'];
        let mut bytes = (payload.len() as u32).to_le_bytes().to_vec();
        bytes.extend(crc32fast::hash(&payload).to_le_bytes());
        bytes.extend(payload);
        std::fs::write(dir.path().join(FILE_NAMES[0]), &bytes).unwrap();
        let (mut wal, batches) = Wal::open(dir.path()).unwrap();
        assert_eq!(batches.len(), 1);
        assert_eq!(value(&replay(dir.path()), "a"), Some("1".into()), "opening it changed nothing yet");
        wal.reset().unwrap();
        append(&mut wal, &round(&[("b", Some("2"))])).unwrap();
        let db = replay(dir.path());
        assert_eq!((value(&db, "a"), value(&db, "b")), (None, Some("2".into())));
    }

    #[test]
    fn a_log_of_the_second_layout_is_replayed_then_started_over() {
        let dir = tempfile::tempdir().unwrap();
        // MAGIC_2, the generation, then [len][crc32 of generation and payload][payload]: put a = 1.
        let payload = [1, 1, 0, 0, 0, b'a', 1, 0, 0, 0, b'1'];
        let mut bytes = MAGIC_2.to_vec();
        bytes.extend(7u64.to_le_bytes());
        bytes.extend((payload.len() as u32).to_le_bytes());
        bytes.extend(record_crc(7, &payload).to_le_bytes());
        bytes.extend(payload);
        std::fs::write(dir.path().join(FILE_NAMES[0]), &bytes).unwrap();
        let (mut wal, batches) = Wal::open(dir.path()).unwrap();
        assert_eq!(batches.len(), 1);
        wal.reset().unwrap();
        append(&mut wal, &round(&[("b", Some("2"))])).unwrap();
        let db = replay(dir.path());
        assert_eq!((value(&db, "a"), value(&db, "b")), (None, Some("2".into())));
        assert_eq!(&std::fs::read(dir.path().join(FILE_NAMES[wal.active])).unwrap()[..8], MAGIC);
    }

    /// Three rounds, the first synced and the others `synced` or not; the second then damaged.
    fn damaged_second_round(synced: bool) -> (tempfile::TempDir, u64) {
        let dir = tempfile::tempdir().unwrap();
        let (mut wal, _) = Wal::open(dir.path()).unwrap();
        append(&mut wal, &round(&[("a", Some("1"))])).unwrap();
        let first_end = wal.files[wal.active].end;
        for key in ["b", "c"] {
            wal.log(&round(&[(key, Some("2"))]));
            wal.commit(synced).unwrap();
        }
        let path = dir.path().join(FILE_NAMES[wal.active]);
        let file = std::fs::OpenOptions::new().write(true).open(path).unwrap();
        file.write_all_at(&[0xee], first_end + HEADER as u64 + SYNC_MARK as u64 + 2).unwrap();
        (dir, first_end)
    }

    /// A record that does not read, followed by one whose sync mark shows the file was synced
    /// past it: damage, not a crash. The log refuses to open, naming the file and the offset.
    #[test]
    fn a_damaged_record_the_file_was_synced_past_stops_the_open() {
        let (dir, at) = damaged_second_round(true);
        let err = Wal::open(dir.path()).err().expect("refused");
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        assert!(err.to_string().contains(&format!("is damaged at byte {at}")), "{err}");
        let report = inspect(dir.path()).unwrap().into_iter().find(|r| r.end == at).unwrap();
        assert!(report.damaged && report.record_past_end.is_some());
    }

    /// The same bytes, but nothing was synced after the first round: what a power cut can leave
    /// when the disk wrote the third round's page and not the second's. It opens, without them.
    #[test]
    fn a_torn_unsynced_record_before_a_whole_one_still_opens() {
        let (dir, at) = damaged_second_round(false);
        let report = inspect(dir.path()).unwrap().into_iter().find(|r| r.end == at).unwrap();
        assert!(!report.damaged && report.record_past_end.is_some());
        let (_, batches) = Wal::open(dir.path()).unwrap();
        assert_eq!(batches.len(), 1);
    }

    /// Recovery replays the whole log onto whatever prefix of its operations sled had made
    /// durable, even one that ends inside a round.
    #[test]
    fn replaying_onto_any_prefix_of_the_logged_operations_gives_the_same_state() {
        let rounds = [
            round(&[("q/1", Some("m1")), ("dev", Some("len=1"))]),
            round(&[("q/2", Some("m2")), ("dev", Some("len=2"))]),
            round(&[("q/1", None), ("dev", Some("len=1"))]),
            round(&[("q/1", Some("m1-again")), ("q/2", None), ("dev", Some("len=1'"))]),
            round(&[("q/1", None), ("dev", None)]),
            round(&[("q/3", Some("m3")), ("dev", Some("len=1''"))]),
        ];
        let dir = tempfile::tempdir().unwrap();
        let (mut wal, _) = Wal::open(dir.path()).unwrap();
        for r in &rounds {
            append(&mut wal, r).unwrap();
        }
        let dump = |db: &sled::Db| -> Vec<(Vec<u8>, Vec<u8>)> {
            db.iter().map(|kv| kv.map(|(k, v)| (k.to_vec(), v.to_vec())).unwrap()).collect()
        };
        let expected = dump(&replay(dir.path()));
        assert_eq!(expected.len(), 2, "q/3 and dev are left");
        let ops: Vec<_> = rounds.iter().flat_map(|r| r.0.iter()).collect();
        for prefix in 0..=ops.len() {
            let db = sled::Config::new().temporary(true).open().unwrap();
            for (k, op) in &ops[..prefix] {
                match op {
                    Op::Put(v) | Op::PutNew(v) => db.insert(k.as_slice(), v.as_slice()).map(drop),
                    Op::Remove => db.remove(k.as_slice()).map(drop),
                }
                .unwrap();
            }
            for b in logged(dir.path()) {
                db.apply_batch(b).unwrap();
            }
            assert_eq!(dump(&db), expected, "replay onto the first {prefix} operations");
        }
    }

    #[test]
    fn a_damaged_record_ends_the_replay() {
        let dir = tempfile::tempdir().unwrap();
        let (path, last_end) = {
            let (mut wal, _) = Wal::open(dir.path()).unwrap();
            append(&mut wal, &round(&[("a", Some("1"))])).unwrap();
            append(&mut wal, &round(&[("b", Some("2"))])).unwrap();
            active(&dir, &wal)
        };
        let file = std::fs::OpenOptions::new().read(true).write(true).open(path).unwrap();
        let mut byte = [0];
        file.read_exact_at(&mut byte, last_end - 1).unwrap();
        file.write_all_at(&[byte[0] ^ 0xff], last_end - 1).unwrap();
        let db = replay(dir.path());
        assert_eq!((value(&db, "a"), value(&db, "b")), (Some("1".into()), None));
    }

    /// `verify` tells a log that ends cleanly from one with a whole record past a damaged one.
    #[test]
    fn inspect_finds_a_whole_record_past_a_damaged_one() {
        let dir = tempfile::tempdir().unwrap();
        let (path, ends) = {
            let (mut wal, _) = Wal::open(dir.path()).unwrap();
            let mut ends = Vec::new();
            for key in ["a", "b", "c"] {
                append(&mut wal, &round(&[(key, Some("1"))])).unwrap();
                ends.push(active(&dir, &wal).1);
            }
            (active(&dir, &wal).0, ends)
        };
        let report = |dir: &Path| inspect(dir).unwrap().into_iter().find(|r| r.records > 0).unwrap();
        let clean = report(dir.path());
        assert_eq!((clean.records, clean.end, clean.record_past_end), (3, ends[2], None));
        // Damage the second record: replay stops there, and the third is found past it.
        let file = std::fs::OpenOptions::new().read(true).write(true).open(path).unwrap();
        file.write_all_at(&[0xff], ends[1] - 1).unwrap();
        let damaged = report(dir.path());
        assert_eq!((damaged.records, damaged.end, damaged.record_past_end), (1, ends[0], Some(ends[1])));
    }

    #[test]
    fn rounds_written_without_a_sync_are_in_the_log_and_tracked_until_synced() {
        let dir = tempfile::tempdir().unwrap();
        let (mut wal, _) = Wal::open(dir.path()).unwrap();
        wal.log(&round(&[("a", Some("1"))]));
        wal.commit(false).unwrap();
        assert!(wal.files[wal.active].unsynced);
        // A sync request with nothing new still syncs what was written before.
        wal.commit(true).unwrap();
        assert!(!wal.files[wal.active].unsynced);
        wal.log(&round(&[("b", Some("2"))]));
        wal.commit(false).unwrap();
        assert_eq!(records(dir.path()), 2);
        wal.reset().unwrap();
        assert!(!wal.files[wal.active].unsynced, "a checkpoint leaves nothing to sync");
    }

    #[test]
    fn reset_empties_the_log() {
        let dir = tempfile::tempdir().unwrap();
        let (mut wal, _) = Wal::open(dir.path()).unwrap();
        append(&mut wal, &round(&[("a", Some("1"))])).unwrap();
        assert!(wal.len() > 0);
        wal.reset().unwrap();
        assert_eq!(wal.len(), 0);
        assert_eq!(records(dir.path()), 0);
    }

    /// A checkpoint seals the active file and logs on in the other; until the sealed one is
    /// released, recovery replays both, the sealed one first.
    #[test]
    fn a_sealed_file_replays_before_the_active_one_until_it_is_released() {
        let dir = tempfile::tempdir().unwrap();
        let (mut wal, _) = Wal::open(dir.path()).unwrap();
        append(&mut wal, &round(&[("a", Some("1")), ("b", Some("1"))])).unwrap();
        wal.log(&round(&[("c", Some("1"))]));
        wal.commit(false).unwrap();
        let sealed = wal.active;
        wal.seal().unwrap();
        assert!(!wal.files[sealed].unsynced, "sealing syncs what was only written");
        assert_ne!(wal.active, sealed);
        assert!(wal.seal().is_err(), "one sealed file at a time");
        append(&mut wal, &round(&[("a", Some("2"))])).unwrap();
        let db = replay(dir.path());
        assert_eq!(
            (value(&db, "a"), value(&db, "b"), value(&db, "c")),
            (Some("2".into()), Some("1".into()), Some("1".into()))
        );
        // What Wal::open (a restart) sees is the same, in the same order.
        let reopened = sled::Config::new().temporary(true).open().unwrap();
        for b in Wal::open(dir.path()).unwrap().1 {
            reopened.apply_batch(b).unwrap();
        }
        assert_eq!(value(&reopened, "a"), Some("2".into()));

        wal.release().unwrap();
        assert_eq!(value(&replay(dir.path()), "b"), None, "released: only the active file's records");
        assert_eq!(value(&replay(dir.path()), "a"), Some("2".into()));
        // The next checkpoint goes back to the first file, whose old records stay stale.
        wal.seal().unwrap();
        assert_eq!(wal.active, sealed);
        append(&mut wal, &round(&[("d", Some("1"))])).unwrap();
        let db = replay(dir.path());
        assert_eq!((value(&db, "a"), value(&db, "b"), value(&db, "d")), (Some("2".into()), None, Some("1".into())));
    }

    /// What a crash or a bad disk can do to a file, byte by byte: cut it anywhere after its last
    /// records, or flip any byte of its header, its records or the stale records of an earlier
    /// generation behind them. Replay never panics, never takes a damaged record or anything
    /// after it, never takes a record of an earlier generation, and always gives a prefix of the
    /// rounds written in the file's generation: exactly the records before the damage.
    #[test]
    fn any_cut_or_flipped_byte_replays_a_prefix_of_the_current_rounds() {
        let dir = tempfile::tempdir().unwrap();
        let (mut wal, _) = Wal::open(dir.path()).unwrap();
        // An earlier generation's rounds, longer than the current ones, stay behind them.
        for i in 0..8 {
            append(&mut wal, &round(&[(&format!("old{i}"), Some(&"o".repeat(40 + i)))])).unwrap();
        }
        wal.reset().unwrap();
        let mut ends = Vec::new();
        for i in 0..6 {
            let value = format!("v{i}");
            let ops: Vec<(String, Option<&str>)> =
                (0..=i).map(|k| (format!("k{k}"), if k % 3 == 2 { None } else { Some(value.as_str()) })).collect();
            let ops: Vec<(&str, Option<&str>)> = ops.iter().map(|(k, v)| (k.as_str(), *v)).collect();
            append(&mut wal, &round(&ops)).unwrap();
            ends.push(wal.files[wal.active].end as usize);
        }
        let path = dir.path().join(FILE_NAMES[wal.active]);
        let bytes = std::fs::read(&path).unwrap();
        let (generation, batches, end) = parse(&bytes);
        assert_eq!((generation.is_some(), batches.len(), end), (true, 6, ends[5]));
        // How many rounds are whole before `at`.
        let before = |at: usize| ends.iter().filter(|end| **end <= at).count();
        // The round a byte belongs to (6: past the last, in zeros or stale records).
        let round_of = |at: usize| ends.iter().position(|end| at < *end).unwrap_or(6);

        // Cut: the file ends there, or (zero-filled ahead) holds zeros from there on.
        for cut in FILE_HEADER as usize..=end {
            let (_, short, _) = parse(&bytes[..cut]);
            assert_eq!(short.len(), before(cut), "file cut at {cut}");
            let mut zeroed = bytes.clone();
            zeroed[cut..].iter_mut().for_each(|b| *b = 0);
            let (_, zeroed_batches, _) = parse(&zeroed);
            assert_eq!(zeroed_batches.len(), before(cut), "zeros from {cut}");
        }
        // Flip: in the header nothing counts; in a round, the rounds before it do.
        let stale_end = (end + 8 * 60).min(bytes.len());
        for at in 0..stale_end {
            for mask in [0x01u8, 0x80, 0xff] {
                let mut damaged = bytes.clone();
                damaged[at] ^= mask;
                // The rounds and some stale records after them: scanning the whole zero-filled
                // file for a record past the end at every flip would take minutes.
                let damaged = &damaged[..stale_end];
                let (_, got, end) = parse(damaged);
                let expected = if at < FILE_HEADER as usize { 0 } else { round_of(at) };
                assert_eq!(got.len(), expected, "byte {at} flipped with {mask:#x}");
                // Every round was synced: damage in one before the last is proven by the next.
                let proven = (FILE_HEADER as usize..ends[4]).contains(&at).then_some(end);
                let layout = Layout::of(damaged);
                assert_eq!(proven_damage(damaged, end, layout), proven, "byte {at} flipped with {mask:#x}");
            }
        }
        // What is replayed is those rounds, and nothing of the earlier generation.
        let db = replay(dir.path());
        assert!(db.iter().keys().all(|k| !k.unwrap().starts_with(b"old")), "no record of the earlier generation");
        assert_eq!((value(&db, "k0"), value(&db, "k2"), value(&db, "k5")), (Some("v5".into()), None, None));
    }
}
