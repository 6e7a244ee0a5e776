//! The store's write-ahead log: what makes a change durable without flushing sled.
//!
//! sled 0.34 makes a change durable with `flush()`, which hands the write to its I/O thread
//! pool and waits on `sync_file_range` (still not a real sync: see `Sync` in `sled.rs`). Doing
//! that for every group-commit round cost more CPU than everything else a message needs. So the
//! jobs of a round are logged here instead, as physical operations (put this key, remove that
//! key), and the round is durable once its record is written and `fdatasync`ed: one write and one
//! sync on one thread. sled gets the changes (`round.rs`) and is flushed and synced only at a
//! checkpoint, after which the log starts over.
//!
//! Recovery replays the log onto whatever state sled recovered. That is correct from any sled
//! state between the last checkpoint and the crash: replaying, in order, every put and remove
//! since the checkpoint leaves each key with the value of its last operation, or untouched if it
//! has none. sled's recovery yields a prefix of the operations it was given, and it is given
//! changes only at a checkpoint, long after their records were synced.
//!
//! Layout: records of `[len: u32 LE][crc32 of payload: u32 LE][payload]`, one per round; a
//! payload is ops of `[1][klen: u32][key][vlen: u32][value]` (put) or `[0][klen: u32][key]`
//! (remove). Replay stops at the first short or damaged record: a round whose write was cut off,
//! and nobody was told it was stored.

use std::fs::File;
use std::io::{self, Read};
use std::os::unix::fs::FileExt;
use std::path::Path;

use super::round::{Changes, Op};

/// The log's file name, inside the data directory (beside sled's files).
pub const FILE_NAME: &str = "sio-push.wal";

fn put_bytes(out: &mut Vec<u8>, bytes: &[u8]) {
    let len = u32::try_from(bytes.len()).expect("keys and values are far below 4 GiB");
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(bytes);
}

/// The open log. Owned by the writer thread.
pub struct Wal {
    file: File,
    /// Bytes of complete records in the file; the next record is written here.
    len: u64,
    /// The current round's record: an 8-byte header to fill in, then its operations.
    round: Vec<u8>,
    /// Records were written since the last sync.
    unsynced: bool,
}

const HEADER: usize = 8;

impl Wal {
    /// Opens (or creates) the log in `dir` and returns it with one batch per complete record, to
    /// be applied in order before anything else is written. An incomplete tail is cut off.
    pub fn open(dir: &Path) -> io::Result<(Self, Vec<sled::Batch>)> {
        let path = dir.join(FILE_NAME);
        let mut file = std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(false).open(&path)?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes)?;
        let (batches, len) = decode(&bytes);
        if len < bytes.len() {
            file.set_len(len as u64)?;
            file.sync_all()?;
            tracing::warn!(path = %path.display(), kept = len, cut = bytes.len() - len, "write-ahead log ends in an incomplete record (a write cut off by a crash): it is dropped");
        }
        Ok((Self { file, len: len as u64, round: vec![0; HEADER], unsynced: false }, batches))
    }

    /// Adds a job's changes to the current round.
    pub fn log(&mut self, changes: &Changes) {
        for (key, op) in &changes.0 {
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
    }

    /// Writes the current round as one record, and with `sync` syncs the log: this record and
    /// every one written before it. On failure the record is cut off again: the round is
    /// dropped, and a later record never follows a torn one.
    pub fn commit(&mut self, sync: bool) -> io::Result<()> {
        let write = self.round.len() > HEADER;
        let sync = sync && (write || self.unsynced);
        if !write && !sync {
            return Ok(());
        }
        let before = self.len;
        let mut result = if write { self.write_round() } else { Ok(()) };
        if result.is_ok() && write {
            self.unsynced = true;
        }
        if result.is_ok() && sync {
            result = self.file.sync_data();
            self.unsynced &= result.is_err();
        }
        self.round.truncate(HEADER);
        if result.is_err() && write {
            let _ = self.file.set_len(before);
            self.len = before;
        }
        result
    }

    fn write_round(&mut self) -> io::Result<()> {
        let payload_len = u32::try_from(self.round.len() - HEADER)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "a round of over 4 GiB"))?;
        let crc = crc32fast::hash(&self.round[HEADER..]);
        self.round[..4].copy_from_slice(&payload_len.to_le_bytes());
        self.round[4..HEADER].copy_from_slice(&crc.to_le_bytes());
        self.file.write_all_at(&self.round, self.len)?;
        self.len += self.round.len() as u64;
        Ok(())
    }

    /// Bytes of records since the last checkpoint.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Starts the log over. Call only once sled holds every logged change durably.
    pub fn reset(&mut self) -> io::Result<()> {
        self.file.set_len(0)?;
        self.file.sync_all()?;
        self.len = 0;
        self.unsynced = false;
        Ok(())
    }
}

/// Decodes the complete, intact records at the start of `bytes`: their batches, and how many
/// bytes they take.
fn decode(bytes: &[u8]) -> (Vec<sled::Batch>, usize) {
    let mut batches = Vec::new();
    let mut at = 0;
    while let Some(header) = bytes.get(at..at + HEADER) {
        let len = u32::from_le_bytes(header[..4].try_into().expect("4 bytes")) as usize;
        let crc = u32::from_le_bytes(header[4..].try_into().expect("4 bytes"));
        let Some(payload) = bytes.get(at + HEADER..at + HEADER + len) else { break };
        if crc32fast::hash(payload) != crc {
            break;
        }
        let Some(batch) = decode_round(payload) else { break };
        batches.push(batch);
        at += HEADER + len;
    }
    (batches, at)
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

#[cfg(test)]
mod tests {
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

    fn replay(dir: &Path) -> sled::Db {
        let db = sled::Config::new().temporary(true).open().unwrap();
        for b in Wal::open(dir).unwrap().1 {
            db.apply_batch(b).unwrap();
        }
        db
    }

    fn value(db: &sled::Db, key: &str) -> Option<String> {
        db.get(key).unwrap().map(|v| String::from_utf8(v.to_vec()).unwrap())
    }

    #[test]
    fn appended_rounds_replay_in_order_and_a_torn_tail_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (mut wal, batches) = Wal::open(dir.path()).unwrap();
            assert!(batches.is_empty());
            append(&mut wal, &round(&[("a", Some("1")), ("b", Some("2"))])).unwrap();
            append(&mut wal, &round(&[("a", None)])).unwrap();
            append(&mut wal, &round(&[("b", Some("3")), ("c", Some("4"))])).unwrap();
        }
        let db = replay(dir.path());
        assert_eq!((value(&db, "a"), value(&db, "b"), value(&db, "c")), (None, Some("3".into()), Some("4".into())));

        // Cut the last record short, as a crash in the middle of its write would.
        let path = dir.path().join(FILE_NAME);
        let len = std::fs::metadata(&path).unwrap().len();
        std::fs::OpenOptions::new().write(true).open(&path).unwrap().set_len(len - 3).unwrap();
        let db = replay(dir.path());
        assert_eq!((value(&db, "a"), value(&db, "b"), value(&db, "c")), (None, Some("2".into()), None));

        // The torn tail is gone: a new record follows the complete ones.
        {
            let (mut wal, batches) = Wal::open(dir.path()).unwrap();
            assert_eq!(batches.len(), 2);
            append(&mut wal, &round(&[("d", Some("5"))])).unwrap();
        }
        assert_eq!(value(&replay(dir.path()), "d"), Some("5".into()));
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
            for b in Wal::open(dir.path()).unwrap().1 {
                db.apply_batch(b).unwrap();
            }
            assert_eq!(dump(&db), expected, "replay onto the first {prefix} operations");
        }
    }

    #[test]
    fn a_damaged_record_ends_the_replay() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (mut wal, _) = Wal::open(dir.path()).unwrap();
            append(&mut wal, &round(&[("a", Some("1"))])).unwrap();
            append(&mut wal, &round(&[("b", Some("2"))])).unwrap();
        }
        let path = dir.path().join(FILE_NAME);
        let mut bytes = std::fs::read(&path).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 0xff;
        std::fs::write(&path, &bytes).unwrap();
        let db = replay(dir.path());
        assert_eq!((value(&db, "a"), value(&db, "b")), (Some("1".into()), None));
    }

    #[test]
    fn rounds_written_without_a_sync_are_in_the_log_and_tracked_until_synced() {
        let dir = tempfile::tempdir().unwrap();
        let (mut wal, _) = Wal::open(dir.path()).unwrap();
        wal.log(&round(&[("a", Some("1"))]));
        wal.commit(false).unwrap();
        assert!(wal.unsynced);
        // A sync request with nothing new still syncs what was written before.
        wal.commit(true).unwrap();
        assert!(!wal.unsynced);
        wal.log(&round(&[("b", Some("2"))]));
        wal.commit(false).unwrap();
        assert_eq!(Wal::open(dir.path()).unwrap().1.len(), 2);
        wal.reset().unwrap();
        assert!(!wal.unsynced, "a checkpoint leaves nothing to sync");
    }

    #[test]
    fn reset_empties_the_log() {
        let dir = tempfile::tempdir().unwrap();
        let (mut wal, _) = Wal::open(dir.path()).unwrap();
        append(&mut wal, &round(&[("a", Some("1"))])).unwrap();
        assert!(wal.len() > 0);
        wal.reset().unwrap();
        assert_eq!(wal.len(), 0);
        assert!(Wal::open(dir.path()).unwrap().1.is_empty());
    }
}
