//! `SledStore`: the embedded, durable store.
//!
//! One writer thread owns the database and runs every job, reads included: it takes all jobs
//! queued since its last round and runs each against sled's tree with the changes not yet given
//! to sled over it (`round.rs`), so a job sees every earlier one. It logs the round's changes as
//! one record of the write-ahead log (`wal.rs`) with one `fdatasync`, and only then answers. That
//! is group commit: concurrent `/send` requests share one sync. sled gets the changes, and is
//! flushed and synced, only at checkpoints (every second while there are changes, or every
//! 8 MiB of log). A checkpoint seals the log's active file and freezes the changes it logged,
//! then gives them to sled `CHECKPOINT_STEP` at a time between rounds and while no job waits,
//! and releases the sealed file once sled holds them durably. One writer also keeps sled 0.34
//! away from its deadlock under concurrent `flush_async` calls (sled#1308).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;
use std::sync::{Arc, OnceLock};

use async_trait::async_trait;
use sled::Tree;
use tokio::sync::{mpsc, oneshot};

mod backup;
mod keys;
mod round;
pub(super) mod wal;

pub use self::wal::FileReport as LogFileReport;

use self::round::{Changes, Op, Pending, Scan, View};
use self::wal::{is_sync_failure, Wal};
use super::{
    devices_to_forget, entry_event, in_order, Ack, Connected, DeviceInfo, DeviceKey, DeviceState, Enqueued, Expiry,
    Export, Idempotency, InOrder, Loaded, MessageId, Millis, QueueLimits, Queued, Record, Resync, SiteStats, Store,
    StoreError,
};

/// The layout version this build reads and writes. Version 1 (a copy of a message in every
/// queue entry) is upgraded at open.
const SCHEMA_VERSION: u32 = 2;
/// Most jobs one writer round takes before it flushes.
const MAX_ROUND: usize = 4096;
/// Jobs that may wait for the writer before senders wait too.
const QUEUE_DEPTH: usize = 16_384;
/// Log size that triggers a checkpoint. Bounds what a restart replays (about 0.1 s per MiB).
const CHECKPOINT_BYTES: u64 = 8 << 20;
/// Message ids reserved at a time (one durable write per block).
const ID_BLOCK: u64 = 1 << 20;
/// Changes a checkpoint gives sled between two rounds (about a millisecond's work).
const CHECKPOINT_STEP: usize = 256;
/// Most user rooms whose devices the writer keeps in memory; past it, it starts over.
const MAX_CACHED_USERS: usize = 100_000;
/// Most shared-room members the writer keeps in memory, over all rooms; past it, it starts over.
const MAX_CACHED_MEMBERS: usize = 1_000_000;
/// Most queued message ids the writer keeps indexed by event, over all queues; past it, it
/// starts over.
const MAX_INDEXED_EVENTS: usize = 1_000_000;
/// Most expired devices, and most expired idempotency keys, one job of a sweep forgets.
const SWEEP_STEP: usize = 5_000;
/// How often an idle writer looks whether an export still pins sled's tree.
const PINNED_POLL: std::time::Duration = std::time::Duration::from_millis(100);
/// Time after which logged changes are checkpointed into sled.
const CHECKPOINT_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

/// The sled-backed store. Cloning shares the database and its writer.
#[derive(Clone)]
pub struct SledStore {
    jobs: mpsc::Sender<Job>,
    /// Closes (errors on `changed`) once the writer thread has flushed and released the database.
    stopped: tokio::sync::watch::Receiver<()>,
    /// Set, once, when the writer stopped for good: a failed sync or a panic (see `Writer::fail`).
    failure: Arc<OnceLock<String>>,
}

/// Work for the writer thread.
enum Job {
    /// A change: `run` applies it and returns how to answer the caller once the round's commit
    /// result is known. A `Durability::Synced` change makes its round sync the log; the others
    /// are answered once written (see [`Durability`]).
    Change { run: Box<dyn FnOnce(&mut Writer) -> Reply + Send>, durable: Durability },
    /// Flush what came before and exit.
    Stop,
}

type Reply = Box<dyn FnOnce(Result<(), RoundError>) + Send>;

/// Why a round was not committed.
#[derive(Clone, Debug)]
enum RoundError {
    /// The log could not be written: nothing of the round remains (a 507 for a message).
    Io(String),
    /// Its sync failed and the store stopped (see [`Writer::fail`]): a 503, like every job after.
    Stopped(String),
}

impl From<RoundError> for StoreError {
    fn from(e: RoundError) -> Self {
        match e {
            RoundError::Io(e) => StoreError::Io(e),
            RoundError::Stopped(_) => StoreError::Closed,
        }
    }
}

impl std::fmt::Display for RoundError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RoundError::Io(e) | RoundError::Stopped(e) => f.write_str(e),
        }
    }
}

/// When a job's caller is answered.
///
/// An accepted message must be on disk before its answer (PROTOCOL.md: `200` means fsynced),
/// and so must a device's registration: a device that has seen `_settings` must get what is
/// sent while it is away, even across a crash. Acks, disconnect times and expiry heal
/// themselves if a crash loses their last moment: a lost ack means the message is delivered
/// again (the duplicate the protocol allows after a lost ack), a lost disconnect time is set
/// again at the next start, a lost expiry is found again by the next sweep. Those, and reads,
/// are answered once their record is written. The log is sequential, so the next synced round,
/// or the checkpoint at most `CHECKPOINT_EVERY` later, makes them durable too. This saves a
/// sync per round of acks: most rounds of a fan-out.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Durability {
    /// Answered once synced.
    Synced,
    /// Answered once written; synced by the next synced round or checkpoint.
    Written,
}

/// What the writer thread owns.
struct Writer {
    db: sled::Db,
    tree: Tree,
    /// Changes of committed rounds since the last checkpoint began, not yet given to sled.
    pending: Pending,
    /// Changes of the rounds before that, which the checkpoint under way is giving to sled.
    frozen: Pending,
    /// Where the checkpoint under way goes on giving sled the frozen changes other than new
    /// keys' values; `None` once past the last. New keys' values (queue entries, mostly of
    /// messages delivered live) wait until the checkpoint is one interval old
    /// (`new_keys_wait`), so that their acks take them out first: such a message never
    /// reaches sled (`Pending::absorb`).
    drain_from: Option<Vec<u8>>,
    /// Changes of the current round, until it is committed.
    round: Pending,
    /// Message ids: the next one, and how far they are reserved in the round and durably.
    ids: Ids,
    /// Each device's queue length and bytes, by queue prefix: counted from the queue when first
    /// needed, then kept as entries come and go, instead of rewriting the device's state for
    /// every message and ack. Cleared whenever a job or a round fails; the queues are the truth.
    counts: HashMap<Vec<u8>, Counts>,
    /// Each user room's devices, by `devices_of` prefix, as a message to the user needs them:
    /// read once instead of scanned and decoded for every message. Any change of a device key
    /// drops its user's entry (in `apply`); cleared with `counts`.
    devices: HashMap<Vec<u8>, Arc<[UserDevice]>>,
    /// Each shared room's members, as a message to the room needs them: read once instead of
    /// scanned for every message (sled's iterator costs more per item than the rest of a
    /// delivery's storage). Any change of one of its keys drops the room's entry (in `apply`).
    members: Members,
    /// Each queue's message ids by event, for the order check of `resync` acks (see [`Events`]).
    events: Events,
    /// Per-site totals of the registry and the queues (what `/metrics` shows): counted from the
    /// tree when first asked for, then kept by [`Writer::apply`] from each change, so that a
    /// scrape costs no scan. `None` until then, and again after a round that could not be logged.
    totals: Option<BTreeMap<String, SiteStats>>,
    /// Messages kept once for several devices (`keys::body`) whose queue entries the current job
    /// removed, with how many: [`Writer::settle`] counts them off their references before the
    /// job's changes are applied.
    released: BTreeMap<MessageId, u64>,
    wal: Wal,
    /// When the last checkpoint began.
    checkpointed: std::time::Instant,
    /// Age of logged changes that triggers a checkpoint.
    checkpoint_every: std::time::Duration,
    sync: Sync,
    space: DiskSpace,
    /// Set when the writer must stop: see [`Writer::fail`].
    failure: Arc<OnceLock<String>>,
    /// Held by each export under way (`backup.rs`): while it is, sled is given nothing.
    pin: Arc<()>,
}

/// Message ids. They must grow with send order across restarts and crashes, and are never used
/// twice: a reused id would overwrite a queued message. sled's own `generate_id` does not
/// survive a crash when sled has not been flushed since (which the write-ahead log makes the
/// common case), so ids are reserved in blocks by a key written through the log like any change.
struct Ids {
    next: u64,
    /// Reserved up to here, counting the current round.
    reserved: u64,
    /// Reserved up to here durably.
    durable: u64,
}

/// One device of a user room, as stored.
struct UserDevice {
    /// Its key in the tree.
    key: Vec<u8>,
    dev: DeviceKey,
    /// The prefix of its queue.
    queue: Vec<u8>,
    state: DeviceState,
}

/// A device queue's length and size.
#[derive(Clone, Copy, Default)]
struct Counts {
    len: u64,
    bytes: u64,
}

/// The free-space floor. sled 0.34 does not answer (it hangs) once its disk is full, so the
/// writer never lets it get there: below `min_free` bytes, new messages and registrations are
/// refused (`StoreError::DiskFull`, a 507), while acks and expiry, which free space, go on.
/// Checked once per round with `statvfs`.
struct DiskSpace {
    dir: std::ffi::CString,
    min_free: u64,
    free: u64,
}

impl DiskSpace {
    fn new(dir: &Path, min_free: u64) -> Result<Self, StoreError> {
        use std::os::unix::ffi::OsStrExt;
        let dir = std::ffi::CString::new(dir.as_os_str().as_bytes()).map_err(|e| StoreError::Io(e.to_string()))?;
        let mut space = Self { dir, min_free, free: u64::MAX };
        space.refresh();
        Ok(space)
    }

    /// Reads the free space (for unprivileged users) of the data directory's filesystem.
    fn refresh(&mut self) {
        if self.min_free == 0 {
            return;
        }
        // SAFETY: `dir` is a NUL-terminated path and `stat` a zeroed out-parameter of the right type.
        let mut stat: libc::statvfs = unsafe { std::mem::zeroed() };
        if unsafe { libc::statvfs(self.dir.as_ptr(), &mut stat) } == 0 {
            // Both are u64 on 64-bit Linux and u32 on some 32-bit targets.
            #[allow(clippy::useless_conversion)]
            let (blocks, size) = (u64::from(stat.f_bavail), u64::from(stat.f_frsize));
            self.free = blocks.saturating_mul(size);
        }
    }

    /// `Err` while below the floor.
    fn check(&self) -> Result<(), StoreError> {
        if self.free < self.min_free {
            return Err(StoreError::DiskFull { free: self.free, min: self.min_free });
        }
        Ok(())
    }
}

/// What makes a checkpoint durable, beyond sled's own `flush()`.
///
/// On Linux sled 0.34's `flush()` ends in `sync_file_range(WAIT_BEFORE|WRITE|WAIT_AFTER)` on the
/// log range it wrote, and a real `fsync` happens only in its background flusher (every 500 ms).
/// `sync_file_range` commits neither the file's metadata (its new size) nor the disk's write
/// cache, so it survives `kill -9` but not a power cut. So after each flush the writer
/// `fdatasync`s the log file.
///
/// Pages too large for the log (over segment_size / 4: a big message, or a node of many) go to
/// files under `blobs/`, which our sled syncs, with their directory, as it writes them
/// (vendor/README.md). `tests/e2e/fsync.test.mjs` checks with strace that blobs are synced.
///
/// A file's name is durable only once its directory is synced (and a directory's own name once
/// its parent is): sled syncs no directory but `blobs/`, so the data dir is synced at open,
/// once sled and the log have made their files, and after each checkpoint.
///
/// `tests/e2e/powercut.test.mjs` found both: without the directory syncs a power cut could take
/// away every file of a new data dir, and with unsynced blobs sled could not open the data dir
/// after one.
struct Sync {
    log: std::fs::File,
    dir: std::path::PathBuf,
}

impl Sync {
    fn open(dir: &Path) -> Result<Self, StoreError> {
        let log = std::fs::File::open(dir.join("db"))
            .map_err(|e| StoreError::Io(format!("cannot open sled's log file {}/db: {e}", dir.display())))?;
        Ok(Self { log, dir: dir.to_path_buf() })
    }

    /// Flushes `db` and makes everything it flushed durable.
    fn flush(&self, db: &sled::Db) -> std::io::Result<()> {
        db.flush().map_err(std::io::Error::other)?;
        self.log.sync_data()?;
        // sled renames and removes snapshot files of its own at open.
        sync_dir(&self.dir)
    }

    /// Makes the names in the data dir durable, and the data dir's own name in its parent. The
    /// parent may be one the service cannot open (a sandbox's): that is worth a warning, not a
    /// refusal to start, as the data dir normally exists from the install on.
    fn sync_names(&self) -> std::io::Result<()> {
        sync_dir(&self.dir)?;
        let parent = self.dir.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
        if let Err(e) = sync_dir(parent) {
            tracing::warn!(dir = %parent.display(), error = %e, "cannot sync the data dir's parent directory");
        }
        Ok(())
    }
}

/// `fsync` of a directory: makes the names in it durable.
fn sync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

/// Removes the snapshot files sled 0.34 left half-written (`snap.<lsn>.generating`). sled
/// writes a snapshot under that name, syncs it and renames it; a kill before the rename (during
/// sled's own recovery, say) leaves it behind, and sled's next open takes it for the newest
/// snapshot and fails with "Read corrupted data" (sled#1527, #1533). Such a file is never
/// needed: sled recovers from the previous snapshot and its log, as it would have without it.
fn remove_unfinished_snapshots(dir: &Path) -> Result<(), StoreError> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(StoreError::Io(format!("cannot read {}: {e}", dir.display()))),
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with("snap.") && name.ends_with(".generating") {
            tracing::warn!(file = %entry.path().display(), "removing a snapshot file sled left unfinished");
            std::fs::remove_file(entry.path())
                .map_err(|e| StoreError::Io(format!("cannot remove {}: {e}", entry.path().display())))?;
        }
    }
    Ok(())
}

/// Reads the write-ahead log files in `dir` and reports on each (`sio-push verify`); changes
/// nothing.
pub fn wal_report(dir: &Path) -> std::io::Result<Vec<LogFileReport>> {
    wal::inspect(dir)
}

/// A sled error as a store error.
pub(super) fn io(e: sled::Error) -> StoreError {
    StoreError::Io(e.to_string())
}

fn unsynced(dir: &Path, e: std::io::Error) -> StoreError {
    StoreError::Io(format!("cannot sync the data dir {}: {e}", dir.display()))
}

impl SledStore {
    /// Opens (or creates) the database under `dir`, with a page cache of at most `cache_bytes`.
    /// Spawns the writer thread, which ends when the last clone of the store is dropped.
    /// Below `min_free_bytes` of free disk space new data is refused (0: never).
    pub fn open(dir: &Path, cache_bytes: u64, min_free_bytes: u64) -> Result<Self, StoreError> {
        Self::open_with(dir, cache_bytes, min_free_bytes, CHECKPOINT_EVERY)
    }

    /// As [`SledStore::open`], checkpointing once logged changes are `checkpoint_every` old
    /// (tests choose every round, or never but on close and size).
    pub(super) fn open_with(
        dir: &Path,
        cache_bytes: u64,
        min_free_bytes: u64,
        checkpoint_every: std::time::Duration,
    ) -> Result<Self, StoreError> {
        remove_unfinished_snapshots(dir)?;
        let db = sled::Config::new().path(dir).cache_capacity(cache_bytes).open().map_err(io)?;
        let sync = Sync::open(dir)?;
        let meta = db.open_tree("meta").map_err(io)?;
        let schema = match meta.get("schema").map_err(io)? {
            // The schema is made durable before the log files are first created: a log without
            // it means sled lost what it held (its file emptied, cut or replaced).
            None if wal::FILE_NAMES.iter().any(|name| dir.join(name).exists()) => {
                return Err(StoreError::Damaged(format!(
                    "sled's database in {} holds nothing, yet the write-ahead log beside it shows the \
                     directory in use: the file {}/db was emptied, cut or replaced",
                    dir.display(),
                    dir.display()
                )));
            }
            None => {
                meta.insert("schema", &SCHEMA_VERSION.to_be_bytes()).map_err(io)?;
                sync.flush(&db).and_then(|()| sync.sync_names()).map_err(|e| unsynced(dir, e))?;
                SCHEMA_VERSION
            }
            Some(v) => match v.as_ref().try_into().map(u32::from_be_bytes).unwrap_or(0) {
                found @ (1 | SCHEMA_VERSION) => found,
                found => return Err(StoreError::Schema { found, expected: SCHEMA_VERSION }),
            },
        };
        let tree = db.open_tree("state").map_err(io)?;
        let (wal, replay) = Wal::open(dir).map_err(|e| match e.kind() {
            std::io::ErrorKind::InvalidData => StoreError::Damaged(e.to_string()),
            _ => StoreError::Io(format!("cannot open the write-ahead log in {}: {e}", dir.display())),
        })?;
        // The log's files, and whatever sled made or renamed while opening.
        sync.sync_names().map_err(|e| unsynced(dir, e))?;
        let replayed = replay.len();
        for batch in replay {
            tree.apply_batch(batch).map_err(io)?;
        }
        // Ids below the reservation may have been used; sled's generator covers data dirs from
        // before the reservation key.
        let reserved = match tree.get(keys::IDS_RESERVED).map_err(io)? {
            Some(v) => v
                .as_ref()
                .try_into()
                .map(u64::from_be_bytes)
                .map_err(|_| StoreError::Corrupt { key: keys::show(keys::IDS_RESERVED) })?,
            None => db.generate_id().map_err(io)?,
        };
        let mut writer = Writer {
            ids: Ids { next: reserved, reserved, durable: reserved },
            counts: HashMap::new(),
            devices: HashMap::new(),
            members: Members::default(),
            events: Events::default(),
            released: BTreeMap::new(),
            totals: None,
            db,
            tree,
            pending: Pending::default(),
            frozen: Pending::default(),
            drain_from: None,
            round: Pending::default(),
            wal,
            checkpointed: std::time::Instant::now(),
            checkpoint_every,
            sync,
            space: DiskSpace::new(dir, min_free_bytes)?,
            failure: Arc::new(OnceLock::new()),
            pin: Arc::new(()),
        };
        if replayed > 0 {
            writer.checkpoint().map_err(StoreError::Io)?;
            tracing::info!(batches = replayed, "changes replayed from the write-ahead log");
        }
        if schema == 1 {
            let upgraded = upgrade_from_v1(&writer.tree)?;
            writer.make_sled_durable().map_err(StoreError::Io)?;
            meta.insert("schema", &SCHEMA_VERSION.to_be_bytes()).map_err(io)?;
            writer.make_sled_durable().map_err(StoreError::Io)?;
            tracing::info!(queue_entries = upgraded, "data dir upgraded from schema 1");
        }
        let (jobs, rx) = mpsc::channel(QUEUE_DEPTH);
        let (stopping, stopped) = tokio::sync::watch::channel(());
        let failure = writer.failure.clone();
        std::thread::Builder::new()
            .name("sio-push-store".into())
            .spawn(move || {
                let failure = writer.failure.clone();
                // A panic drops the writer (and the job receiver) on the way out: later jobs get
                // `StoreError::Closed`, and the failure tells the process to stop.
                if let Err(panic) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| writer.run(rx))) {
                    let what = panic
                        .downcast_ref::<&str>()
                        .map(|s| s.to_string())
                        .or_else(|| panic.downcast_ref::<String>().cloned())
                        .unwrap_or_default();
                    let reason = format!("the store's writer thread panicked: {what}");
                    tracing::error!("{reason}");
                    let _ = failure.set(reason);
                }
                drop(stopping);
            })
            .map_err(|e| StoreError::Io(e.to_string()))?;
        Ok(Self { jobs, stopped, failure })
    }

    /// Makes the writer flush everything sent before and exit, and waits for it. Later changes
    /// through any clone fail with `StoreError::Closed`. The database files are released once
    /// every clone is dropped too.
    pub async fn close(self) {
        let mut stopped = self.stopped.clone();
        let _ = self.jobs.send(Job::Stop).await;
        drop(self);
        while stopped.changed().await.is_ok() {}
    }

    /// Makes the writer thread panic, as a bug would, and waits for the thread to end (tests of
    /// what follows).
    #[cfg(test)]
    pub(super) async fn panic_writer(&self) {
        let _ = self.job(Durability::Written, |_| -> Result<(), StoreError> { panic!("injected") }).await;
        let mut stopped = self.stopped.clone();
        while stopped.changed().await.is_ok() {}
    }

    /// Runs `f` on the writer thread, which sees every change; answers once its round is
    /// `durable`.
    async fn job<T, F>(&self, durable: Durability, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&mut Writer) -> Result<T, StoreError> + Send + 'static,
    {
        let (tx, rx) = oneshot::channel();
        let run = Box::new(move |w: &mut Writer| -> Reply {
            let result = f(w);
            // The job may have counted changes it never applied; a refusal checked before any
            // change has not, and must not cost every later job a cold cache (a client could
            // repeat it at will).
            if result
                .as_ref()
                .is_err_and(|e| !matches!(e, StoreError::TooManyDevices { .. } | StoreError::DiskFull { .. }))
            {
                w.forget_caches();
            }
            debug_assert!(w.released.is_empty(), "a job removed queue entries it never settled");
            Box::new(move |flushed: Result<(), RoundError>| {
                let _ = tx.send(flushed.map_err(StoreError::from).and(result));
            })
        });
        self.jobs.send(Job::Change { run, durable }).await.map_err(|_| StoreError::Closed)?;
        rx.await.map_err(|_| StoreError::Closed)?
    }
}

impl View for Writer {
    fn get(&self, key: &[u8]) -> Result<Option<sled::IVec>, StoreError> {
        let changed = self.round.lookup(key).or_else(|| self.pending.lookup(key)).or_else(|| self.frozen.lookup(key));
        match changed {
            Some(value) => Ok(value),
            None => View::get(&self.tree, key),
        }
    }

    fn scan(&self, prefix: &[u8]) -> Scan<'_> {
        let given = self.frozen.scan_over(View::scan(&self.tree, prefix), prefix);
        self.round.scan_over(self.pending.scan_over(given, prefix), prefix)
    }
}

impl Writer {
    fn run(mut self, mut rx: mpsc::Receiver<Job>) {
        // Both kept across rounds: a new vector per round was a large allocation, and glibc
        // consolidates its free lists for each one (4% of the writer's time in a fan-out).
        let mut round = Vec::with_capacity(64);
        let mut waiting = Vec::with_capacity(64);
        let mut stopping = false;
        // A checkpoint under way gives sled its changes a step at a time while no job waits
        // (and a step after every round, so that it ends under load too); not after a failure.
        let mut step_while_idle = true;
        while !stopping {
            if self.failure.get().is_some() {
                return; // see `Writer::fail`: no checkpoint, no final flush
            }
            let first = match self.checkpoint_wait().filter(|_| step_while_idle) {
                Some(wait) => match recv_within(&mut rx, wait) {
                    Next::Job(job) => Some(job),
                    Next::Idle => {
                        step_while_idle = self.checkpoint_step();
                        continue;
                    }
                    Next::Closed => None,
                },
                None => rx.blocking_recv(),
            };
            let Some(first) = first else { break };
            self.space.refresh();
            round.push(first);
            while round.len() < MAX_ROUND {
                match rx.try_recv() {
                    Ok(job) => round.push(job),
                    Err(_) => break,
                }
            }
            let mut sync = false;
            for job in round.drain(..) {
                match job {
                    Job::Change { run, durable } => {
                        sync |= durable == Durability::Synced;
                        waiting.push(run(&mut self));
                    }
                    Job::Stop => stopping = true,
                }
            }
            let started = std::time::Instant::now();
            let committed = self.commit(sync);
            if let Err(e) = &committed {
                tracing::error!(error.message = %e, "store write failed");
            }
            if !waiting.is_empty() {
                crate::metrics::store_round(waiting.len(), started.elapsed());
            }
            for reply in waiting.drain(..) {
                reply(committed.clone());
            }
            if self.pinned() {
                // An export reads sled's tree: it is given nothing until the export ends.
            } else if self.wal.is_sealed() {
                step_while_idle = self.checkpoint_step();
            } else if self.wal.len() >= CHECKPOINT_BYTES
                || (self.wal.len() > 0 && self.checkpointed.elapsed() >= self.checkpoint_every)
            {
                step_while_idle = self.checkpoint_start();
            }
        }
        if self.failure.get().is_some() {
            return;
        }
        if self.pinned() {
            // An export still reads sled's tree: leave the changes to the log, which the next
            // start replays.
            if let Err(e) = self.commit(true) {
                tracing::error!(error.message = %e, "final store write failed");
            }
            return;
        }
        if let Err(e) = self.commit(true).map_err(|e| e.to_string()).and_then(|()| self.checkpoint()) {
            tracing::error!(error.message = %e, "final store checkpoint failed; the write-ahead log is replayed at the next start");
        }
        // `self` (the database) is dropped here, before the caller signals `stopped`.
    }

    /// Writes the round to the write-ahead log, syncs the log when `sync` (or when the round
    /// reserves message ids) and adds the round to the pending changes. A round that cannot be
    /// logged is dropped whole: its callers get the error and nothing of it remains.
    fn commit(&mut self, sync: bool) -> Result<(), RoundError> {
        let round = std::mem::take(&mut self.round);
        let sync = sync || self.ids.reserved != self.ids.durable;
        if let Err(e) = self.wal.commit(sync) {
            self.ids.reserved = self.ids.durable;
            self.forget_caches();
            self.totals = None;
            let error = format!("cannot write the write-ahead log: {e}");
            if is_sync_failure(&e) {
                self.fail(error.clone());
                return Err(RoundError::Stopped(error));
            }
            return Err(RoundError::Io(error));
        }
        self.ids.durable = self.ids.reserved;
        self.pending.absorb(round, &mut self.frozen);
        Ok(())
    }

    /// A new message id, reserving a block in the current round when needed. The reservation
    /// is a change of its own, so it is logged whatever becomes of the job that asked.
    fn new_id(&mut self) -> MessageId {
        if self.ids.next >= self.ids.reserved {
            self.ids.reserved = self.ids.next + ID_BLOCK;
            let mut reserve = Changes::default();
            reserve.insert(keys::IDS_RESERVED, self.ids.reserved.to_be_bytes());
            self.apply(reserve);
        }
        self.ids.next += 1;
        self.ids.next - 1
    }

    /// Makes sled hold every change durably at once, then starts both log files over (at open
    /// after a replay, and at close).
    fn checkpoint(&mut self) -> Result<(), String> {
        self.drain_from = None;
        self.frozen.drain_into(&self.tree).map_err(|e| e.to_string())?;
        self.pending.drain_into(&self.tree).map_err(|e| e.to_string())?;
        self.make_sled_durable()?;
        self.wal.reset().map_err(|e| format!("cannot reset the write-ahead log: {e}"))?;
        self.checkpointed = std::time::Instant::now();
        Ok(())
    }

    /// Begins a checkpoint: the log's active file is sealed and the changes it logged are
    /// frozen, for [`Writer::checkpoint_step`] to give to sled. `false` if it failed (logged).
    fn checkpoint_start(&mut self) -> bool {
        self.checkpointed = std::time::Instant::now();
        if let Err(e) = self.wal.seal() {
            if is_sync_failure(&e) {
                self.fail(format!("store checkpoint failed: {e}"));
            }
            tracing::error!(error.message = %e, "store checkpoint failed; the write-ahead log keeps growing");
            return false;
        }
        self.frozen = std::mem::take(&mut self.pending);
        self.drain_from = Some(Vec::new());
        true
    }

    /// How long until the checkpoint under way has a step to take; `None` if none is.
    fn checkpoint_wait(&self) -> Option<std::time::Duration> {
        if self.pinned() {
            // Look again in a while: the export may be over.
            return (!self.frozen.is_empty()).then_some(PINNED_POLL);
        }
        match (self.frozen.is_empty(), &self.drain_from) {
            (true, _) => None,
            (false, Some(_)) => Some(std::time::Duration::ZERO),
            (false, None) => Some(self.new_keys_wait().saturating_sub(self.checkpointed.elapsed())),
        }
    }

    /// How long after its start a checkpoint gives sled new keys' values: one checkpoint
    /// interval, so that most live messages are acked by then.
    fn new_keys_wait(&self) -> std::time::Duration {
        self.checkpoint_every.min(CHECKPOINT_EVERY)
    }

    /// Gives sled the next `CHECKPOINT_STEP` frozen changes; after the last, makes sled durable
    /// and releases the sealed log file. `false` if it failed (logged): retried after the next
    /// round.
    fn checkpoint_step(&mut self) -> bool {
        if self.pinned() {
            return true;
        }
        let step = match self.drain_from.take() {
            Some(from) => match self.frozen.drain_some_old_into(&self.tree, CHECKPOINT_STEP, &from) {
                Ok(next) => {
                    self.drain_from = next;
                    Ok(())
                }
                Err(e) => {
                    self.drain_from = Some(from);
                    Err(e)
                }
            },
            None if self.checkpointed.elapsed() >= self.new_keys_wait() => {
                self.frozen.drain_some_into(&self.tree, CHECKPOINT_STEP)
            }
            None => Ok(()),
        };
        let done = step.map_err(|e| e.to_string()).and_then(|()| {
            if !self.frozen.is_empty() {
                return Ok(());
            }
            self.make_sled_durable()?;
            self.wal.release().map_err(|e| {
                let error = format!("cannot release the sealed write-ahead log file: {e}");
                if is_sync_failure(&e) {
                    self.fail(error.clone());
                }
                error
            })
        });
        if let Err(e) = done {
            tracing::error!(error.message = %e, "store checkpoint failed; the write-ahead log keeps growing");
            return false;
        }
        true
    }

    /// Flushes and syncs what sled was given. A failure stops the store (see [`Writer::fail`]):
    /// the sealed log file is then never released, and the next start replays it.
    fn make_sled_durable(&mut self) -> Result<(), String> {
        let synced = self.sync.flush(&self.db).map_err(|e| e.to_string());
        if let Err(e) = &synced {
            self.fail(format!("cannot make the checkpoint durable in sled: {e}"));
        }
        synced
    }

    /// Stops the store for good after a failed sync. Like PostgreSQL after a failed `fsync`, it
    /// does not retry and carry on: the kernel may have dropped the pages it could not write, so
    /// a later sync could succeed without them. The writer answers the round at hand with the
    /// error, gives sled nothing more and exits; later jobs get `StoreError::Closed` (503); the
    /// process sees the failure, exits non-zero, and its next start replays the log.
    fn fail(&mut self, reason: String) {
        tracing::error!(reason = %reason, "store stopped: nothing more is accepted until a restart replays the write-ahead log");
        let _ = self.failure.set(reason);
    }

    /// Applies one job's atomic set of changes to the current round, with what follows from
    /// them: the index of disconnected devices by time (logged with them, so a crash keeps both or
    /// neither) and the totals.
    fn apply(&mut self, changes: Changes) {
        for (key, op) in changes.0 {
            match (key.first(), keys::two_part_prefix(&key)) {
                (Some(&keys::DEVICE), Some(owner)) => drop(self.devices.remove(owner)),
                (Some(&keys::ROOM), Some(room)) => self.members.forget(room),
                _ => {}
            }
            match key.first() {
                Some(&keys::DEVICE) => self.follow_device(&key, &op),
                Some(&keys::QUEUE) if self.totals.is_some() => self.count_entry(&key, &op),
                _ => {}
            }
            self.apply_one(key, op);
        }
    }

    fn apply_one(&mut self, key: Vec<u8>, op: Op) {
        self.wal.log_one(&key, &op);
        self.round.apply_one(key, op);
    }

    /// What a change of a device record changes besides: its entry in the index of disconnected
    /// devices by time, and the totals. Read against the value it replaces; a value that cannot
    /// be read (a failing disk) leaves the index to the sweep, which drops entries that no longer
    /// match, and the totals to a recount.
    fn follow_device(&mut self, key: &[u8], op: &Op) {
        let state = |v: &[u8]| serde_json::from_slice::<DeviceState>(v).ok();
        let new = match op {
            Op::Put(value) | Op::PutNew(value) => state(value),
            Op::Remove => None,
        };
        let old = match self.get(key) {
            Ok(old) => old.and_then(|v| state(&v)),
            Err(_) => {
                self.totals = None;
                return;
            }
        };
        let since = |s: &Option<DeviceState>| s.as_ref().filter(|s| !s.connected).map(|s| s.disconnected_at);
        let (was, is) = (since(&old), since(&new));
        if was != is {
            if let Some(at) = was {
                self.apply_one(keys::disconnected(at, key), Op::Remove);
            }
            if let Some(at) = is {
                self.apply_one(keys::disconnected(at, key), Op::Put(Vec::new()));
            }
        }
        let (Some(site), Some(totals)) = (keys::first_part(key), self.totals.as_mut()) else { return };
        let site_totals = site_totals(totals, site);
        let connected = |s: &Option<DeviceState>| u64::from(s.as_ref().is_some_and(|s| s.connected));
        delta(&mut site_totals.devices, u64::from(old.is_some()), u64::from(new.is_some()));
        delta(&mut site_totals.connected, connected(&old), connected(&new));
    }

    /// Keeps the totals true through one change of a queue entry.
    fn count_entry(&mut self, key: &[u8], op: &Op) {
        let size = |v: &[u8]| keys::split_queued_value(v).map(|q| q.size);
        let new = match op {
            Op::Put(value) | Op::PutNew(value) => size(value),
            Op::Remove => None,
        };
        let old = match op {
            Op::PutNew(_) => None, // a new key: nothing to read
            _ => match self.get(key) {
                Ok(old) => old.and_then(|v| size(&v)),
                Err(_) => return self.totals = None, // counted again when next asked for
            },
        };
        let (Some(site), Some(totals)) = (keys::first_part(key), self.totals.as_mut()) else { return };
        let site_totals = site_totals(totals, site);
        delta(&mut site_totals.queued_messages, u64::from(old.is_some()), u64::from(new.is_some()));
        delta(&mut site_totals.queued_bytes, old.unwrap_or(0), new.unwrap_or(0));
    }

    /// The totals, counted from the tree: every device and every queue entry.
    fn count_all(&self) -> Result<BTreeMap<String, SiteStats>, StoreError> {
        let mut totals = BTreeMap::<String, SiteStats>::new();
        for item in self.scan(&[keys::DEVICE]) {
            let (k, v) = item?;
            let corrupt = || StoreError::Corrupt { key: keys::show(&k) };
            let state: DeviceState = serde_json::from_slice(&v).map_err(|_| corrupt())?;
            let site = totals.entry(keys::first_part(&k).ok_or_else(corrupt)?.to_owned()).or_default();
            site.devices += 1;
            site.connected += u64::from(state.connected);
        }
        for item in self.scan(&[keys::QUEUE]) {
            let (k, v) = item?;
            let corrupt = || StoreError::Corrupt { key: keys::show(&k) };
            let queued = keys::split_queued_value(&v).ok_or_else(corrupt)?;
            let site = totals.entry(keys::first_part(&k).ok_or_else(corrupt)?.to_owned()).or_default();
            site.queued_messages += 1;
            site.queued_bytes += queued.size;
        }
        Ok(totals)
    }

    /// Drops what the writer keeps in memory of the tree; the tree (with the changes over it)
    /// is the truth.
    fn forget_caches(&mut self) {
        self.counts.clear();
        self.devices.clear();
        self.members.clear();
        self.events.clear();
        self.released.clear();
    }

    /// The users of a shared room, by its `room_members` prefix.
    fn room_members(&mut self, prefix: &[u8]) -> Result<Arc<[String]>, StoreError> {
        if let Some(users) = self.members.rooms.get(prefix) {
            return Ok(users.clone());
        }
        let users = self
            .scan(prefix)
            .map(|item| {
                let (k, _) = item?;
                keys::parts(&k)
                    .and_then(|p| p.get(2).map(|u| u.to_string()))
                    .ok_or_else(|| StoreError::Corrupt { key: keys::show(&k) })
            })
            .collect::<Result<Arc<[String]>, _>>()?;
        self.members.keep(prefix, users.clone());
        Ok(users)
    }

    /// The devices of a user room, read from the tree once and then kept until one changes.
    fn user_devices(&mut self, site: &str, user: &str) -> Result<Arc<[UserDevice]>, StoreError> {
        let prefix = keys::devices_of(site, user)?;
        if let Some(devices) = self.devices.get(&prefix) {
            return Ok(devices.clone());
        }
        let mut devices = Vec::new();
        for item in self.scan(&prefix) {
            let (k, v) = item?;
            let corrupt = || StoreError::Corrupt { key: keys::show(&k) };
            let dev = keys::parse_device(&k).ok_or_else(corrupt)?;
            let state = serde_json::from_slice(&v).map_err(|_| corrupt())?;
            devices.push(UserDevice { key: k.to_vec(), queue: keys::queue(&dev)?, dev, state });
        }
        let devices: Arc<[UserDevice]> = devices.into();
        if self.devices.len() >= MAX_CACHED_USERS {
            self.devices.clear();
        }
        self.devices.insert(prefix, devices.clone());
        Ok(devices)
    }

    /// The counts of the queue under `prefix`, counted from the queue if not known yet.
    fn counts(&mut self, prefix: &[u8]) -> Result<Counts, StoreError> {
        if let Some(counts) = self.counts.get(prefix) {
            return Ok(*counts);
        }
        let mut counts = Counts::default();
        for item in self.scan(prefix) {
            let (k, v) = item?;
            counts.len += 1;
            counts.bytes +=
                keys::split_queued_value(&v).ok_or_else(|| StoreError::Corrupt { key: keys::show(&k) })?.size;
        }
        self.counts.insert(prefix.to_vec(), counts);
        Ok(counts)
    }

    /// Keeps the counts of the queue under `prefix`.
    fn set_counts(&mut self, prefix: &[u8], counts: Counts) {
        match self.counts.get_mut(prefix) {
            Some(known) => *known = counts,
            None => drop(self.counts.insert(prefix.to_vec(), counts)),
        }
    }

    /// A stored device state with its queue counts filled in.
    fn with_counts(&mut self, dev: &DeviceKey, mut state: DeviceState) -> Result<DeviceState, StoreError> {
        let counts = self.counts(&keys::queue(dev)?)?;
        (state.queue_len, state.queue_bytes) = (counts.len, counts.bytes);
        Ok(state)
    }

    /// Changes a registered device's state (an unknown device is left alone).
    fn update_device(&mut self, dev: &DeviceKey, change: impl FnOnce(&mut DeviceState)) -> Result<(), StoreError> {
        let key = keys::device(dev)?;
        let Some(mut state) = read_device(self, &key)? else { return Ok(()) };
        let before = state.clone();
        change(&mut state);
        if state != before {
            let mut batch = Changes::default();
            batch.insert(key, encode(&state));
            self.apply(batch);
        }
        Ok(())
    }

    /// Adds to `batch` the removal of a device and its queue (settle it before applying).
    fn forget_device(&mut self, dev: &DeviceKey, batch: &mut Changes) -> Result<(), StoreError> {
        batch.remove(keys::device(dev)?);
        let prefix = keys::queue(dev)?;
        let entries: Vec<_> = self.scan(&prefix).collect::<Result<_, _>>()?;
        for (key, value) in entries {
            self.drop_entry(&prefix, key.to_vec(), &value, batch)?;
        }
        self.counts.remove(&prefix);
        self.events.forget(&prefix);
        Ok(())
    }

    /// Adds to `batch` the removal of one queue entry (its key and value as stored) and releases
    /// its message if it is kept once for several devices; returns the entry's size. The job
    /// must [`settle`](Writer::settle) the batch before applying it.
    fn drop_entry(
        &mut self,
        prefix: &[u8],
        key: Vec<u8>,
        value: &[u8],
        batch: &mut Changes,
    ) -> Result<u64, StoreError> {
        let (Some(id), Some(entry)) = (keys::queued_id(&key), keys::split_queued_value(value)) else {
            return Err(StoreError::Corrupt { key: keys::show(&key) });
        };
        if entry.inline.is_none() {
            *self.released.entry(id).or_default() += 1;
        }
        self.events.remove(prefix, entry.event, id);
        batch.remove(key);
        Ok(entry.size)
    }

    /// Adds to `batch` what the queue entries removed by the job do to the messages they
    /// referred to: each message's count of references goes down, and the last reference takes
    /// the message with it. A count that is missing (never, unless the data dir was damaged)
    /// leaves the message in place: kept too long rather than lost.
    fn settle(&mut self, batch: &mut Changes) -> Result<(), StoreError> {
        for (id, released) in std::mem::take(&mut self.released) {
            let key = keys::refs(id);
            let Some(value) = self.get(&key)? else { continue };
            let refs: [u8; 8] = value.as_ref().try_into().map_err(|_| StoreError::Corrupt { key: keys::show(&key) })?;
            match u64::from_be_bytes(refs).saturating_sub(released) {
                0 => {
                    batch.remove(key);
                    batch.remove(keys::body(id));
                }
                left => batch.insert(key, left.to_be_bytes()),
            }
        }
        Ok(())
    }

    /// The queued message ids of one event in the queue under `prefix`, oldest first: indexed
    /// from the queue the first time, then kept as entries come and go.
    fn event_ids(&mut self, prefix: &[u8], event: &str) -> Result<&BTreeSet<MessageId>, StoreError> {
        static NONE: BTreeSet<MessageId> = BTreeSet::new();
        if !self.events.queues.contains_key(prefix) {
            let mut index = HashMap::<Box<str>, BTreeSet<MessageId>>::new();
            for item in self.scan(prefix) {
                let (k, v) = item?;
                let (Some(id), Some(entry)) = (keys::queued_id(&k), keys::split_queued_value(&v)) else {
                    return Err(StoreError::Corrupt { key: keys::show(&k) });
                };
                index.entry(entry.event.into()).or_default().insert(id);
            }
            self.events.keep(prefix, index);
        }
        Ok(self.events.queues.get(prefix).and_then(|queue| queue.get(event)).unwrap_or(&NONE))
    }

    /// Forgets up to `step` expired devices (with their queues, and their users once the last
    /// device is gone) and up to `step` expired idempotency keys; `true` if more may be left.
    fn sweep_some(&mut self, expiry: Expiry, step: usize) -> Result<(Vec<DeviceKey>, bool), StoreError> {
        let corrupt = |key: &[u8]| StoreError::Corrupt { key: keys::show(key) };
        // Disconnected devices by time, up to the first that has not expired: the sweep reads what
        // expires, not the registry. An entry that no longer matches its device (left by a read
        // that failed while it was kept) goes.
        let (mut expired, mut seen) = (Vec::new(), 0);
        let mut stale = Changes::default();
        for item in self.scan(&[keys::DISCONNECTED]).take(step) {
            let (t, _) = item?;
            let (at, dkey) = keys::split_by_time(&t).ok_or_else(|| corrupt(&t))?;
            if expiry.ttl_ms == 0 || expiry.now.saturating_sub(at) <= expiry.ttl_ms {
                break;
            }
            seen += 1;
            match read_device(self, dkey)? {
                Some(state) if !state.connected && state.disconnected_at == at => {
                    expired.push(keys::parse_device(dkey).ok_or_else(|| corrupt(dkey))?);
                }
                _ => stale.remove(&t),
            }
        }
        self.apply(stale);
        // One batch per device, so the check for a user's last device sees earlier removals.
        for dev in &expired {
            let mut batch = Changes::default();
            self.forget_device(dev, &mut batch)?;
            self.settle(&mut batch)?;
            self.apply(batch);
            if self.scan(&keys::devices_of(&dev.site, &dev.user)?).next().is_none() {
                let mut batch = Changes::default();
                self.forget_user(&dev.site, &dev.user, &mut batch)?;
                self.apply(batch);
            }
        }
        // Idempotency keys by expiry, up to the first that has not expired. A key used again after
        // it expired has a newer entry; its record goes with that one, not this one.
        let (mut batch, mut keys_seen) = (Changes::default(), 0);
        for item in self.scan(&[keys::IDEMPOTENCY_EXPIRY]).take(step) {
            let (x, _) = item?;
            let (expires_at, record) = keys::split_by_time(&x).ok_or_else(|| corrupt(&x))?;
            if expires_at > expiry.now {
                break;
            }
            keys_seen += 1;
            if let Some(v) = self.get(record)? {
                let (_, current) = keys::split_idempotency_value(&v).ok_or_else(|| corrupt(record))?;
                if current == expires_at {
                    batch.remove(record);
                }
            }
            batch.remove(x);
        }
        self.apply(batch);
        Ok((expired, seen == step || keys_seen == step))
    }

    /// Adds to `batch` the removal of a user's room list and index entries.
    fn forget_user(&self, site: &str, user: &str, batch: &mut Changes) -> Result<(), StoreError> {
        let ukey = keys::user(site, user)?;
        for room in read_rooms(self, &ukey)? {
            batch.remove(keys::room(site, &room, user)?);
        }
        batch.remove(ukey);
        Ok(())
    }

    /// Removes the given queue entries of one device in one batch, keeping its counts true.
    fn remove_entries(&mut self, dev: &DeviceKey, ids: &[MessageId]) -> Result<u64, StoreError> {
        let prefix = keys::queue(dev)?;
        let mut counts = self.counts(&prefix)?;
        let mut batch = Changes::default();
        let mut removed = 0;
        // Each id once: the batch is not applied yet, so a repeated id would be released twice.
        for id in ids.iter().copied().collect::<BTreeSet<_>>() {
            let key = keys::queued(&prefix, id);
            if let Some(value) = self.get(&key)? {
                let size = self.drop_entry(&prefix, key, &value, &mut batch)?;
                counts.len = counts.len.saturating_sub(1);
                counts.bytes = counts.bytes.saturating_sub(size);
                removed += 1;
            }
        }
        self.set_counts(&prefix, counts);
        self.settle(&mut batch)?;
        self.apply(batch);
        Ok(removed)
    }
}

/// The writer's copy of shared rooms' members (`Writer::room_members`), bounded by their total:
/// a room counts as at least one, so that rooms without members cannot pile up either.
struct Members {
    rooms: HashMap<Vec<u8>, Arc<[String]>>,
    /// Users (or 1 for a room without any) over all rooms kept.
    total: usize,
    limit: usize,
}

impl Default for Members {
    fn default() -> Self {
        Self::with_limit(MAX_CACHED_MEMBERS)
    }
}

impl Members {
    fn with_limit(limit: usize) -> Self {
        Self { rooms: HashMap::new(), total: 0, limit }
    }

    /// What a room counts for.
    fn weight(users: &[String]) -> usize {
        users.len().max(1)
    }

    fn keep(&mut self, prefix: &[u8], users: Arc<[String]>) {
        self.forget(prefix);
        let weight = Self::weight(&users);
        if self.total + weight > self.limit {
            self.clear();
            if weight > self.limit {
                return;
            }
        }
        self.total += weight;
        self.rooms.insert(prefix.to_vec(), users);
    }

    fn forget(&mut self, prefix: &[u8]) {
        if let Some(users) = self.rooms.remove(prefix) {
            self.total -= Self::weight(&users);
        }
    }

    fn clear(&mut self) {
        *self = Self::with_limit(self.limit);
    }
}

/// The writer's index of queued message ids by event (`Writer::event_ids`): with it, checking
/// that a `resync` ack is the oldest of its event costs a lookup instead of a read of the
/// device's queue (which made draining a queue that way quadratic). Bounded by the ids it holds.
struct Events {
    queues: HashMap<Vec<u8>, HashMap<Box<str>, BTreeSet<MessageId>>>,
    /// Ids over all queues kept.
    total: usize,
    limit: usize,
}

impl Default for Events {
    fn default() -> Self {
        Self { queues: HashMap::new(), total: 0, limit: MAX_INDEXED_EVENTS }
    }
}

impl Events {
    /// Keeps the index of one queue, starting over first if it would pass the bound (the queue
    /// at hand is kept whatever its size: its queue caps bound it).
    fn keep(&mut self, prefix: &[u8], index: HashMap<Box<str>, BTreeSet<MessageId>>) {
        self.forget(prefix);
        let ids: usize = index.values().map(BTreeSet::len).sum();
        if self.total + ids > self.limit {
            self.clear();
        }
        self.total += ids;
        self.queues.insert(prefix.to_vec(), index);
    }

    /// A new entry of an indexed queue.
    fn add(&mut self, prefix: &[u8], event: &str, id: MessageId) {
        if let Some(queue) = self.queues.get_mut(prefix) {
            if queue.entry(event.into()).or_default().insert(id) {
                self.total += 1;
            }
            if self.total > self.limit {
                self.clear();
            }
        }
    }

    /// An entry gone from an indexed queue.
    fn remove(&mut self, prefix: &[u8], event: &str, id: MessageId) {
        let Some(queue) = self.queues.get_mut(prefix) else { return };
        let Some(ids) = queue.get_mut(event) else { return };
        if ids.remove(&id) {
            self.total -= 1;
        }
        if ids.is_empty() {
            queue.remove(event);
        }
    }

    fn forget(&mut self, prefix: &[u8]) {
        if let Some(queue) = self.queues.remove(prefix) {
            self.total -= queue.values().map(BTreeSet::len).sum::<usize>();
        }
    }

    fn clear(&mut self) {
        self.queues.clear();
        self.total = 0;
    }
}

/// What came for the writer.
enum Next {
    Job(Job),
    /// Nothing within the wait.
    Idle,
    /// Every sender is gone.
    Closed,
}

/// The next job, if one comes within `wait`.
fn recv_within(rx: &mut mpsc::Receiver<Job>, wait: std::time::Duration) -> Next {
    use std::task::{Context, Poll, Wake, Waker};
    if wait.is_zero() {
        return match rx.try_recv() {
            Ok(job) => Next::Job(job),
            Err(mpsc::error::TryRecvError::Empty) => Next::Idle,
            Err(mpsc::error::TryRecvError::Disconnected) => Next::Closed,
        };
    }
    /// Wakes the waiting writer thread when a job is sent.
    struct Unpark(std::thread::Thread);
    impl Wake for Unpark {
        fn wake(self: Arc<Self>) {
            self.0.unpark();
        }
    }
    let deadline = std::time::Instant::now() + wait;
    let waker = Waker::from(Arc::new(Unpark(std::thread::current())));
    let mut cx = Context::from_waker(&waker);
    loop {
        match rx.poll_recv(&mut cx) {
            Poll::Ready(Some(job)) => return Next::Job(job),
            Poll::Ready(None) => return Next::Closed,
            Poll::Pending => {}
        }
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            return Next::Idle;
        }
        std::thread::park_timeout(left);
    }
}

/// A site's entry of the totals.
fn site_totals<'a>(totals: &'a mut BTreeMap<String, SiteStats>, site: &str) -> &'a mut SiteStats {
    if !totals.contains_key(site) {
        totals.insert(site.to_owned(), SiteStats::default());
    }
    totals.get_mut(site).expect("inserted above")
}

/// Moves a total from what a change replaced to what it wrote.
fn delta(total: &mut u64, old: u64, new: u64) {
    *total = (*total + new).saturating_sub(old);
}

fn encode(state: &DeviceState) -> Vec<u8> {
    serde_json::to_vec(state).expect("DeviceState serializes")
}

fn read_device(view: &impl View, key: &[u8]) -> Result<Option<DeviceState>, StoreError> {
    match view.get(key)? {
        None => Ok(None),
        Some(v) => serde_json::from_slice(&v).map(Some).map_err(|_| StoreError::Corrupt { key: keys::show(key) }),
    }
}

fn read_rooms(view: &impl View, key: &[u8]) -> Result<Vec<String>, StoreError> {
    match view.get(key)? {
        None => Ok(Vec::new()),
        Some(v) => serde_json::from_slice(&v).map_err(|_| StoreError::Corrupt { key: keys::show(key) }),
    }
}

fn read_queue(view: &impl View, dev: &DeviceKey) -> Result<Vec<Queued>, StoreError> {
    queue_entries(view, &keys::queue(dev)?).map(|item| item.map(|(queued, _)| queued)).collect()
}

/// A queue's messages, oldest first, each with whether it is kept once for several devices.
fn queue_entries<'a>(
    view: &'a impl View,
    prefix: &[u8],
) -> impl Iterator<Item = Result<(Queued, bool), StoreError>> + 'a {
    view.scan(prefix).map(move |item| {
        let (k, v) = item?;
        let corrupt = |key: &[u8]| StoreError::Corrupt { key: keys::show(key) };
        let id = keys::queued_id(&k).ok_or_else(|| corrupt(&k))?;
        let queued = keys::split_queued_value(&v).ok_or_else(|| corrupt(&k))?;
        let entry = match queued.inline {
            Some(entry) => Arc::from(entry),
            None => {
                let key = keys::body(id);
                let body = view.get(&key)?.ok_or_else(|| corrupt(&key))?;
                Arc::from(std::str::from_utf8(&body).map_err(|_| corrupt(&key))?)
            }
        };
        Ok((Queued { id, queued_at: queued.at, entry }, queued.inline.is_none()))
    })
}

/// Rewrites the queue entries of a schema 1 data dir in today's layout, each keeping its message
/// (schema 1 kept a copy in every entry), and indexes its idempotency records by expiry and its
/// disconnected devices by time. Runs
/// again after a crash part way: entries already rewritten are told apart and left, index
/// entries are written again. Returns how many queue entries it rewrote.
fn upgrade_from_v1(tree: &Tree) -> Result<u64, StoreError> {
    let mut upgraded = 0;
    let mut batch = sled::Batch::default();
    let mut in_batch = 0;
    for item in tree.scan_prefix([keys::QUEUE]) {
        let (k, v) = item.map_err(io)?;
        let Some((at, entry)) = keys::split_v1_queued_value(&v) else { continue };
        let event = entry_event(entry).unwrap_or_default();
        batch.insert(k, keys::queued_value(at, entry.len(), &event, Some(entry)));
        (upgraded, in_batch) = (upgraded + 1, in_batch + 1);
        if in_batch == 10_000 {
            tree.apply_batch(std::mem::take(&mut batch)).map_err(io)?;
            in_batch = 0;
        }
    }
    tree.apply_batch(batch).map_err(io)?;
    let mut index = sled::Batch::default();
    for item in tree.scan_prefix([keys::DEVICE]) {
        let (k, v) = item.map_err(io)?;
        let state: DeviceState = serde_json::from_slice(&v).map_err(|_| StoreError::Corrupt { key: keys::show(&k) })?;
        if !state.connected {
            index.insert(keys::disconnected(state.disconnected_at, &k), &[]);
        }
    }
    for item in tree.scan_prefix([keys::IDEMPOTENCY]) {
        let (k, v) = item.map_err(io)?;
        let (_, expires_at) =
            keys::split_idempotency_value(&v).ok_or_else(|| StoreError::Corrupt { key: keys::show(&k) })?;
        index.insert(keys::idempotency_expiry(expires_at, &k), &[]);
    }
    tree.apply_batch(index).map_err(io)?;
    Ok(upgraded)
}

#[async_trait]
impl Store for SledStore {
    async fn connect(
        &self,
        device: &DeviceKey,
        rooms: &[String],
        max_devices: Option<u64>,
    ) -> Result<Connected, StoreError> {
        let (device, rooms) = (device.clone(), rooms.to_vec());
        self.job(Durability::Synced, move |w| {
            w.space.check()?;
            let ukey = keys::user(&device.site, &device.user)?;
            let dkey = keys::device(&device)?;
            let old_rooms = read_rooms(w, &ukey)?;
            let known = read_device(w, &dkey)?;
            let mut batch = Changes::default();
            let mut forgotten = Vec::new();
            if let Some(max) = max_devices.filter(|_| known.is_none()) {
                let others = w.user_devices(&device.site, &device.user)?;
                forgotten = devices_to_forget(others.iter().map(|d| (&d.dev, &d.state)), max)?;
                for dev in &forgotten {
                    w.forget_device(dev, &mut batch)?;
                }
                w.settle(&mut batch)?;
            }
            let mut state = known.unwrap_or_default();
            let resync = state.connect();

            // Only the shared-room keys that change: most connects name the same rooms again.
            let room_keys = |list: &[String]| -> Result<BTreeSet<Vec<u8>>, StoreError> {
                list.iter().map(|room| keys::room(&device.site, room, &device.user)).collect()
            };
            let (old_keys, new_keys) = (room_keys(&old_rooms)?, room_keys(&rooms)?);
            for gone in old_keys.difference(&new_keys) {
                batch.remove(gone.clone());
            }
            for added in new_keys.difference(&old_keys) {
                batch.insert(added.clone(), []);
            }
            batch.insert(ukey, serde_json::to_vec(&rooms).expect("strings serialize"));
            batch.insert(dkey, encode(&state));
            w.apply(batch);
            Ok(Connected { pending: read_queue(w, &device)?, resync, watermark: w.ids.next, forgotten })
        })
        .await
    }

    async fn disconnect(&self, device: &DeviceKey, now: Millis) -> Result<(), StoreError> {
        let dkey = keys::device(device)?;
        self.job(Durability::Written, move |w| {
            if let Some(mut state) = read_device(w, &dkey)? {
                state.disconnect(now);
                let mut batch = Changes::default();
                batch.insert(dkey, encode(&state));
                w.apply(batch);
            }
            Ok(())
        })
        .await
    }

    async fn disconnect_all(&self, now: Millis) -> Result<u64, StoreError> {
        self.job(Durability::Synced, move |w| {
            let mut batch = Changes::default();
            let mut count = 0;
            for item in w.scan(&[keys::DEVICE]) {
                let (k, v) = item?;
                let mut state: DeviceState =
                    serde_json::from_slice(&v).map_err(|_| StoreError::Corrupt { key: keys::show(&k) })?;
                if state.connected {
                    state.disconnect(now);
                    batch.insert(k, encode(&state));
                    count += 1;
                }
            }
            w.apply(batch);
            Ok(count)
        })
        .await
    }

    async fn users_in_room(&self, site: &str, room: &str) -> Result<Vec<String>, StoreError> {
        let prefix = keys::room_members(site, room)?;
        self.job(Durability::Written, move |w| Ok(w.room_members(&prefix)?.to_vec())).await
    }

    async fn enqueue(
        &self,
        site: &str,
        users: Vec<String>,
        entry: Arc<str>,
        expiry: Expiry,
        limits: QueueLimits,
        idempotency: Option<Idempotency>,
    ) -> Result<Enqueued, StoreError> {
        let site = site.to_owned();
        self.job(Durability::Synced, move |w| {
            w.space.check()?;
            let mut batch = Changes::default();
            if let Some(idem) = &idempotency {
                let key = keys::idempotency(&site, &idem.key)?;
                let earlier = match w.get(&key)? {
                    Some(v) => Some(
                        keys::split_idempotency_value(&v)
                            .ok_or_else(|| StoreError::Corrupt { key: keys::show(&key) })?,
                    ),
                    None => None,
                };
                if let Some(replay) = idem.replay_of(earlier, expiry.now) {
                    return Ok(Enqueued { replay: Some(replay), ..Enqueued::default() });
                }
                batch.insert(keys::idempotency_expiry(idem.expires_at, &key), []);
                batch.insert(key, keys::idempotency_value(idem.fingerprint, idem.expires_at));
            }
            let id = w.new_id();
            let mut out = Enqueued { id, ..Enqueued::default() };
            // The devices first: the message is kept once for all of them, or in the queue entry
            // of the only one.
            let mut live = Vec::new();
            for user in &users {
                let devices = w.user_devices(&site, user)?;
                let (mut kept, mut gone) = (0, 0);
                for (i, device) in devices.iter().enumerate() {
                    if expiry.is_expired(&device.state) {
                        w.forget_device(&device.dev, &mut batch)?;
                        out.expired.push(device.dev.clone());
                        gone += 1;
                    } else {
                        live.push((devices.clone(), i));
                        kept += 1;
                    }
                }
                if kept == 0 && gone > 0 {
                    w.forget_user(&site, user, &mut batch)?;
                }
            }
            let event = entry_event(&entry).unwrap_or_default();
            let inline = (live.len() == 1).then_some(&*entry);
            if live.len() > 1 {
                batch.insert_new(keys::body(id), entry.as_bytes());
                batch.insert_new(keys::refs(id), (live.len() as u64).to_be_bytes());
            }
            let value = keys::queued_value(expiry.now, entry.len(), &event, inline);
            for (devices, i) in &live {
                let device = &devices[*i];
                let prefix = &device.queue;
                batch.insert_new(keys::queued(prefix, id), &value);
                w.events.add(prefix, &event, id);
                let mut counts = w.counts(prefix)?;
                counts.len += 1;
                counts.bytes += entry.len() as u64;
                // The oldest go while the queue is over a cap (never the new message itself).
                let mut oldest = Vec::new();
                if limits.exceeded(counts.len, counts.bytes) {
                    for old in w.scan(prefix) {
                        if !limits.exceeded(counts.len, counts.bytes) {
                            break;
                        }
                        let (old_key, old_value) = old?;
                        let size = keys::split_queued_value(&old_value)
                            .ok_or_else(|| StoreError::Corrupt { key: keys::show(&old_key) })?
                            .size;
                        counts.len = counts.len.saturating_sub(1);
                        counts.bytes = counts.bytes.saturating_sub(size);
                        oldest.push((old_key, old_value));
                    }
                }
                w.set_counts(prefix, counts);
                for (old_key, old_value) in &oldest {
                    w.drop_entry(prefix, old_key.to_vec(), old_value, &mut batch)?;
                }
                if !oldest.is_empty() {
                    let state = DeviceState { overflowed: true, ..device.state.clone() };
                    batch.insert(&device.key, encode(&state));
                    out.overflowed.push((device.dev.clone(), oldest.len() as u64));
                }
                out.devices.push(device.dev.clone());
            }
            w.settle(&mut batch)?;
            w.apply(batch);
            Ok(out)
        })
        .await
    }

    async fn pending(&self, device: &DeviceKey) -> Result<Vec<Queued>, StoreError> {
        let device = device.clone();
        self.job(Durability::Written, move |w| read_queue(w, &device)).await
    }

    async fn acks(&self, acks: Vec<Ack>) -> Result<Vec<Resync>, StoreError> {
        // Written, not synced (see `Durability`): an owed resync is written in the same round
        // as the clearing it answers for, so a crash keeps both or neither.
        self.job(Durability::Written, move |w| {
            let mut resyncs = Vec::new();
            for ack in acks {
                match ack {
                    Ack::Batch { device, ids } => drop(w.remove_entries(&device, &ids)?),
                    Ack::Live { device, id, checked: None } => drop(w.remove_entries(&device, &[id])?),
                    Ack::Live { device, id, checked: Some(event) } => {
                        let prefix = keys::queue(&device)?;
                        match in_order(w.event_ids(&prefix, &event)?.iter().copied(), id) {
                            InOrder::NotQueued => {}
                            InOrder::Oldest => drop(w.remove_entries(&device, &[id])?),
                            InOrder::Late(ids) => {
                                let cleared = w.remove_entries(&device, &ids)?;
                                let seq = w.new_id();
                                w.update_device(&device, |state| state.resync_at = Some(seq))?;
                                resyncs.push(Resync { device, event, cleared, seq });
                            }
                        }
                    }
                }
            }
            Ok(resyncs)
        })
        .await
    }

    async fn resync_sent(&self, device: &DeviceKey, seq: MessageId) -> Result<(), StoreError> {
        let device = device.clone();
        self.job(Durability::Written, move |w| w.update_device(&device, |state| state.resync_delivered(seq))).await
    }

    async fn sweep(&self, expiry: Expiry) -> Result<Vec<DeviceKey>, StoreError> {
        // In jobs of at most `SWEEP_STEP` devices and as many keys, so that a sweep with much to
        // forget does not hold up the sends and acks behind it.
        let mut expired = Vec::new();
        loop {
            let (some, more) = self.job(Durability::Written, move |w| w.sweep_some(expiry, SWEEP_STEP)).await?;
            expired.extend(some);
            if !more {
                return Ok(expired);
            }
        }
    }

    async fn device(&self, device: &DeviceKey) -> Result<Option<DeviceState>, StoreError> {
        let (key, device) = (keys::device(device)?, device.clone());
        self.job(Durability::Written, move |w| match read_device(w, &key)? {
            Some(state) => w.with_counts(&device, state).map(Some),
            None => Ok(None),
        })
        .await
    }

    async fn stats(&self) -> Result<BTreeMap<String, SiteStats>, StoreError> {
        self.job(Durability::Written, |w| {
            if w.totals.is_none() {
                w.totals = Some(w.count_all()?);
            }
            Ok(w.totals.clone().unwrap_or_default())
        })
        .await
    }

    async fn user_devices(&self, site: &str, user: &str) -> Result<Vec<DeviceInfo>, StoreError> {
        let prefix = keys::devices_of(site, user)?;
        self.job(Durability::Written, move |w| {
            let mut out = Vec::new();
            let devices: Vec<_> = w.scan(&prefix).collect::<Result<_, _>>()?;
            for (k, v) in devices {
                let corrupt = || StoreError::Corrupt { key: keys::show(&k) };
                let dev = keys::parse_device(&k).ok_or_else(corrupt)?;
                let state = w.with_counts(&dev, serde_json::from_slice(&v).map_err(|_| corrupt())?)?;
                let oldest = match w.scan(&keys::queue(&dev)?).next() {
                    Some(item) => {
                        let (qk, qv) = item?;
                        let queued = keys::split_queued_value(&qv)
                            .ok_or_else(|| StoreError::Corrupt { key: keys::show(&qk) })?;
                        Some(queued.at)
                    }
                    None => None,
                };
                out.push(DeviceInfo { device: dev.device.to_string(), state, oldest_queued_at: oldest });
            }
            Ok(out)
        })
        .await
    }

    async fn clear_queue(&self, device: &DeviceKey) -> Result<u64, StoreError> {
        let device = device.clone();
        self.job(Durability::Synced, move |w| {
            let ids = w
                .scan(&keys::queue(&device)?)
                .map(|item| {
                    let (k, _) = item?;
                    keys::queued_id(&k).ok_or_else(|| StoreError::Corrupt { key: keys::show(&k) })
                })
                .collect::<Result<Vec<_>, _>>()?;
            w.remove_entries(&device, &ids)
        })
        .await
    }

    async fn export(&self) -> Result<Export, StoreError> {
        self.export_now().await
    }

    async fn load(&self, records: Vec<Record>) -> Result<Loaded, StoreError> {
        self.load_now(records).await
    }

    async fn flush(&self) -> Result<(), StoreError> {
        self.job(Durability::Synced, |_| Ok(())).await
    }

    fn is_open(&self) -> bool {
        !self.jobs.is_closed()
    }

    fn failure(&self) -> Option<String> {
        self.failure.get().cloned()
    }
}

impl SledStore {
    /// Checks what the store keeps against itself (`sio-push verify`, and tests after every
    /// change): every queue belongs to a registered device and holds ids below those given out;
    /// each message kept once is referred to by exactly as many queue entries as its count says;
    /// the indexes (shared rooms, disconnected devices by time, idempotency keys by expiry)
    /// match their records; the writer's counts and event index match the queues. `Err` names
    /// the first mismatch.
    pub async fn audit(&self) -> Result<(), String> {
        self.job(Durability::Written, |w| Ok(w.audit())).await.map_err(|e| e.to_string())?
    }
}

impl Writer {
    fn audit(&mut self) -> Result<(), String> {
        let all = |w: &Writer, kind: u8| -> Result<Vec<(sled::IVec, sled::IVec)>, String> {
            w.scan(&[kind]).collect::<Result<_, _>>().map_err(|e| e.to_string())
        };
        let mut referred = BTreeMap::<MessageId, u64>::new();
        let mut queues = BTreeMap::<Vec<u8>, (Counts, HashMap<Box<str>, BTreeSet<MessageId>>)>::new();
        for (k, v) in all(self, keys::QUEUE)? {
            let (id, queued) = keys::queued_id(&k).zip(keys::split_queued_value(&v)).ok_or("a bad queue entry")?;
            if queued.inline.is_none() {
                *referred.entry(id).or_default() += 1;
            }
            let (counts, events) = queues.entry(k[..k.len() - 8].to_vec()).or_default();
            (counts.len, counts.bytes) = (counts.len + 1, counts.bytes + queued.size);
            events.entry(queued.event.into()).or_default().insert(id);
        }
        for prefix in queues.keys() {
            let parts = keys::parts(prefix).ok_or("a bad queue key")?;
            let [site, user, device] = parts.as_slice() else {
                return Err(format!("a bad queue key {}", keys::show(prefix)));
            };
            if self
                .get(&keys::device(&DeviceKey::new(site, user, device)).map_err(|e| e.to_string())?)
                .map_err(|e| e.to_string())?
                .is_none()
            {
                return Err(format!("the queue {} has no device", keys::show(prefix)));
            }
        }
        if let Some(id) = queues.values().flat_map(|(_, events)| events.values()).filter_map(|ids| ids.last()).max() {
            if *id >= self.ids.next {
                return Err(format!("message id {id} is queued, but ids are given out from {}", self.ids.next));
            }
        }
        let mut members = BTreeSet::new();
        for (k, v) in all(self, keys::USER)? {
            let parts = keys::parts(&k).ok_or("a bad user key")?;
            let [site, user] = parts.as_slice() else { return Err(format!("a bad user key {}", keys::show(&k))) };
            let list: Vec<String> =
                serde_json::from_slice(&v).map_err(|_| format!("a bad room list under {}", keys::show(&k)))?;
            for room in list {
                members.insert(keys::room(site, &room, user).map_err(|e| e.to_string())?);
            }
        }
        let indexed: BTreeSet<Vec<u8>> = all(self, keys::ROOM)?.into_iter().map(|(k, _)| k.to_vec()).collect();
        if indexed != members {
            return Err(format!(
                "{} shared-room memberships in the room lists, {} in the index",
                members.len(),
                indexed.len()
            ));
        }
        let counted: BTreeMap<MessageId, u64> = all(self, keys::REFS)?
            .iter()
            .map(|(k, v)| {
                let count = v.as_ref().try_into().map(u64::from_be_bytes);
                keys::queued_id(k).zip(count.ok()).ok_or_else(|| format!("a bad reference count {}", keys::show(k)))
            })
            .collect::<Result<_, _>>()?;
        if counted != referred {
            return Err(format!("references counted {counted:?}, queue entries refer {referred:?}"));
        }
        let bodies: Vec<MessageId> = all(self, keys::BODY)?.iter().filter_map(|(k, _)| keys::queued_id(k)).collect();
        if bodies != counted.keys().copied().collect::<Vec<_>>() {
            return Err(format!("messages kept {bodies:?}, counted {counted:?}"));
        }
        for (prefix, counts) in &self.counts {
            let truth = queues.get(prefix).map(|(c, _)| *c).unwrap_or_default();
            if (counts.len, counts.bytes) != (truth.len, truth.bytes) {
                return Err(format!("counts of {} are off", keys::show(prefix)));
            }
        }
        for (prefix, events) in &self.events.queues {
            if Some(events) != queues.get(prefix).map(|(_, e)| e).or(Some(&HashMap::new())) {
                return Err(format!("the event index of {} is off", keys::show(prefix)));
            }
        }
        if let Some(totals) = &self.totals {
            let kept: BTreeMap<_, _> = totals.iter().filter(|(_, t)| **t != SiteStats::default()).collect();
            let counted = self.count_all().map_err(|e| e.to_string())?;
            if kept != counted.iter().collect() {
                return Err(format!("totals kept {kept:?}, counted {counted:?}"));
            }
        }
        for (k, v) in all(self, keys::IDEMPOTENCY)? {
            let (_, expires_at) = keys::split_idempotency_value(&v).ok_or("a bad idempotency record")?;
            if self.get(&keys::idempotency_expiry(expires_at, &k)).map_err(|e| e.to_string())?.is_none() {
                return Err(format!("idempotency record {} is not indexed by its expiry", keys::show(&k)));
            }
        }
        let mut disconnected = BTreeSet::new();
        for (k, v) in all(self, keys::DEVICE)? {
            let state: DeviceState = serde_json::from_slice(&v).map_err(|e| e.to_string())?;
            if !state.connected {
                disconnected.insert(keys::disconnected(state.disconnected_at, &k));
            }
        }
        let index: BTreeSet<Vec<u8>> = all(self, keys::DISCONNECTED)?.into_iter().map(|(k, _)| k.to_vec()).collect();
        if index != disconnected {
            return Err(format!("{} devices disconnected, {} in the index by time", disconnected.len(), index.len()));
        }
        let indexed: usize = self.events.queues.values().flat_map(|e| e.values()).map(BTreeSet::len).sum();
        if indexed != self.events.total {
            return Err(format!("the event index counts {} ids, holds {indexed}", self.events.total));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    /// A data dir as schema 1 left it (a copy of the message in every queue entry), some of its
    /// entries already rewritten as if an upgrade had crashed part way: it opens with the same
    /// queues, counts and order checks, and is schema 2 from then on.
    #[tokio::test]
    async fn a_schema_1_data_dir_is_upgraded_at_open() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (DeviceKey::new("site", "user_1", "a"), DeviceKey::new("site", "user_2", "b"));
        let v1 = |at: Millis, entry: &str| [&at.to_be_bytes()[..], entry.as_bytes()].concat();
        {
            let db = ::sled::open(dir.path()).unwrap();
            db.open_tree("meta").unwrap().insert("schema", &1u32.to_be_bytes()).unwrap();
            let tree = db.open_tree("state").unwrap();
            for (dev, user) in [(&a, "user_1"), (&b, "user_2")] {
                tree.insert(keys::device(dev).unwrap(), encode(&DeviceState::default())).unwrap();
                tree.insert(keys::user("site", user).unwrap(), br#"["staff"]"#.to_vec()).unwrap();
                tree.insert(keys::room("site", "staff", user).unwrap(), b"").unwrap();
            }
            let (qa, qb) = (keys::queue(&a).unwrap(), keys::queue(&b).unwrap());
            tree.insert(keys::queued(&qa, 7), v1(70, r#"["e",1]"#)).unwrap();
            tree.insert(keys::queued(&qa, 8), v1(80, r#"["e",2]"#)).unwrap();
            tree.insert(keys::queued(&qb, 7), keys::queued_value(70, 7, "e", Some(r#"["e",1]"#))).unwrap();
            tree.insert(keys::IDS_RESERVED, &9u64.to_be_bytes()).unwrap();
            tree.insert(keys::idempotency("site", "k-1").unwrap(), keys::idempotency_value(3, 500)).unwrap();
            db.flush().unwrap();
        }
        let store = loop {
            match SledStore::open(dir.path(), 1 << 20, 0) {
                // sled's lock outlives its handle a moment (see `sled_refuses_a_data_dir_of_another_schema`).
                Err(StoreError::Io(e)) if e.contains("could not acquire lock") => {
                    tokio::time::sleep(Duration::from_millis(10)).await
                }
                other => break other.unwrap(),
            }
        };
        let pending = store.pending(&a).await.unwrap();
        let got: Vec<_> = pending.iter().map(|q| (q.id, q.queued_at, &*q.entry)).collect();
        assert_eq!(got, [(7, 70, r#"["e",1]"#), (8, 80, r#"["e",2]"#)]);
        assert_eq!(store.pending(&b).await.unwrap().len(), 1);
        let state = store.device(&a).await.unwrap().unwrap();
        assert_eq!((state.queue_len, state.queue_bytes), (2, 14));
        let late = vec![Ack::Live { device: a.clone(), id: 8, checked: Some("e".into()) }];
        assert_eq!(store.acks(late).await.unwrap().len(), 1, "the event of an upgraded entry is known");
        store.stats().await.unwrap();
        store.audit().await.unwrap(); // idempotency records indexed by expiry too
        store.sweep(Expiry { now: 500, ttl_ms: 0 }).await.unwrap();
        let reused = Idempotency { key: "k-1".into(), fingerprint: 4, expires_at: 900 };
        let out = store.enqueue(
            "site",
            vec![],
            "[1]".into(),
            Expiry { now: 501, ttl_ms: 0 },
            QueueLimits::default(),
            Some(reused),
        );
        assert_eq!(out.await.unwrap().replay, None, "the upgraded record expired and was swept");
        store.audit().await.unwrap();
        store.close().await;
        let db = loop {
            match ::sled::open(dir.path()) {
                Err(e) if e.to_string().contains("could not acquire lock") => {
                    tokio::time::sleep(Duration::from_millis(10)).await
                }
                other => break other.unwrap(),
            }
        };
        let schema = db.open_tree("meta").unwrap().get("schema").unwrap().unwrap();
        assert_eq!(schema.as_ref(), SCHEMA_VERSION.to_be_bytes());
    }

    /// Shared messages sent, acked, overflowed and cleared by many tasks at once, so that rounds
    /// of the writer mix them: the references still match the queues, round after round.
    #[tokio::test]
    async fn messages_kept_once_stay_counted_under_concurrent_changes() {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open_with(dir.path(), 1 << 20, 0, Duration::from_millis(2)).unwrap();
        store.stats().await.unwrap();
        let devs: Vec<DeviceKey> = (0..20).map(|i| DeviceKey::new("site", &format!("user_{i}"), "d")).collect();
        for d in &devs {
            store.connect(d, &[d.user.to_string()], None).await.unwrap();
        }
        let users: Vec<String> = devs.iter().map(|d| d.user.to_string()).collect();
        let now = Expiry { now: 0, ttl_ms: 0 };
        for round in 0..20 {
            let limits = QueueLimits { max_len: 8, max_bytes: 1 << 20 };
            let sends = (0..30).map(|i| {
                let (store, users) = (&store, users[..(i % 20) + 1].to_vec());
                async move {
                    store.enqueue("site", users, format!("[{round},{i}]").into(), now, limits, None).await.unwrap()
                }
            });
            let acks = devs.iter().enumerate().map(|(i, d)| {
                let store = &store;
                async move {
                    let ids: Vec<MessageId> = store.pending(d).await.unwrap().iter().map(|q| q.id).step_by(2).collect();
                    store.acks(vec![Ack::Batch { device: d.clone(), ids }]).await.unwrap();
                    if i % 7 == round % 7 {
                        store.clear_queue(d).await.unwrap();
                    }
                }
            });
            let (_, _) =
                futures_util::future::join(futures_util::future::join_all(sends), futures_util::future::join_all(acks))
                    .await;
            store.audit().await.unwrap_or_else(|e| panic!("round {round}: {e}"));
        }
    }

    /// A sweep with more to forget than one job takes goes on in further jobs until all is done.
    #[tokio::test]
    async fn a_large_sweep_goes_in_steps() {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(dir.path(), 1 << 20, 0).unwrap();
        store.stats().await.unwrap();
        for i in 0..10 {
            let d = DeviceKey::new("site", &format!("user_{i}"), "d");
            store.connect(&d, &[d.user.to_string()], None).await.unwrap();
            store.disconnect(&d, i).await.unwrap();
            let idem = Idempotency { key: format!("k{i}"), fingerprint: 1, expires_at: 50 + i };
            let users = vec![d.user.to_string()];
            store
                .enqueue("site", users, "[1]".into(), Expiry { now: 0, ttl_ms: 0 }, QueueLimits::default(), Some(idem))
                .await
                .unwrap();
        }
        let expiry = Expiry { now: 1_000, ttl_ms: 100 };
        let step = move |w: &mut Writer| w.sweep_some(expiry, 4).map(|(expired, more)| (expired.len(), more));
        assert_eq!(store.job(Durability::Written, step).await.unwrap(), (4, true));
        assert_eq!(store.job(Durability::Written, step).await.unwrap(), (4, true));
        assert_eq!(store.job(Durability::Written, step).await.unwrap(), (2, false));
        store.audit().await.unwrap();
        assert_eq!(store.stats().await.unwrap().get("site").map(|s| s.devices), Some(0));
        // Through the trait, all at once.
        for i in 0..7 {
            let d = DeviceKey::new("site", &format!("user_{i}"), "e");
            store.connect(&d, &[d.user.to_string()], None).await.unwrap();
            store.disconnect(&d, i).await.unwrap();
        }
        assert_eq!(store.sweep(expiry).await.unwrap().len(), 7);
        store.audit().await.unwrap();
    }

    /// A deterministic stream of pseudo-random numbers (a test needs no better).
    struct Dice(u64);

    impl Dice {
        fn below(&mut self, n: u64) -> u64 {
            self.0 = self.0.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
            (self.0 >> 33) % n
        }
    }

    /// Sends to random audiences, acks (in order, out of order, as batches), overflows, expiry,
    /// operators clearing queues and crashes, with a checkpoint after every round in one run and
    /// none in the other: after each step every message kept once has exactly the references
    /// its count says, and a crash image recovers the same.
    #[tokio::test]
    async fn messages_kept_once_are_counted_through_every_change_and_crash() {
        for (seed, every) in [(1, Duration::ZERO), (2, Duration::MAX), (3, Duration::from_millis(5))] {
            let mut dice = Dice(seed);
            let mut dir = tempfile::tempdir().unwrap();
            let devs: Vec<DeviceKey> =
                (0..8).map(|i| DeviceKey::new("site", &format!("user_{}", i % 4), &format!("d{i}"))).collect();
            for generation in 0..3 {
                let store = SledStore::open_with(dir.path(), 1 << 20, 0, every).unwrap();
                store.stats().await.unwrap(); // from now on kept through every change, and audited
                store.audit().await.unwrap_or_else(|e| panic!("seed {seed}, after recovery {generation}: {e}"));
                for step in 0..150 {
                    let now = generation * 10_000 + step * 10;
                    let d = &devs[dice.below(8) as usize];
                    match dice.below(10) {
                        0..=3 => {
                            let users: Vec<String> =
                                (0..4).filter(|_| dice.below(2) == 0).map(|u| format!("user_{u}")).collect();
                            let limits = QueueLimits { max_len: 1 + dice.below(6), max_bytes: 1_000 };
                            let text = format!(r#"["e{}",{step}]"#, dice.below(2));
                            let expiry = Expiry { now, ttl_ms: 400 };
                            let key = format!("key-{}", dice.below(5));
                            let idem =
                                Idempotency { key, fingerprint: dice.below(2), expires_at: now + dice.below(300) };
                            let idem = (dice.below(2) == 0).then_some(idem);
                            store.enqueue("site", users, text.into(), expiry, limits, idem).await.unwrap();
                        }
                        4 => drop(store.connect(d, &[d.user.to_string()], None).await.unwrap()),
                        5 => store.disconnect(d, now).await.unwrap(),
                        6 | 7 => {
                            let queue = store.pending(d).await.unwrap();
                            if let Some(q) = queue.get(dice.below(queue.len() as u64 + 1) as usize) {
                                let event = entry_event(&q.entry).map(Arc::from);
                                store
                                    .acks(vec![Ack::Live { device: d.clone(), id: q.id, checked: event }])
                                    .await
                                    .unwrap();
                            }
                        }
                        8 => {
                            let ids: Vec<MessageId> = store
                                .pending(d)
                                .await
                                .unwrap()
                                .iter()
                                .map(|q| q.id)
                                .filter(|_| dice.below(2) == 0)
                                .collect();
                            store.acks(vec![Ack::Batch { device: d.clone(), ids }]).await.unwrap();
                        }
                        _ if dice.below(3) == 0 => drop(store.clear_queue(d).await.unwrap()),
                        _ => drop(store.sweep(Expiry { now, ttl_ms: 400 }).await.unwrap()),
                    }
                    store
                        .audit()
                        .await
                        .unwrap_or_else(|e| panic!("seed {seed}, generation {generation}, step {step}: {e}"));
                }
                store.flush().await.unwrap();
                let image = crate::store::tests::crash_image(dir.path());
                drop(store);
                dir = image;
            }
        }
    }

    #[test]
    fn kept_room_members_stay_within_their_bound() {
        let users = |n: usize| -> Arc<[String]> { (0..n).map(|i| format!("user_{i}")).collect() };
        let mut members = Members::with_limit(10);
        members.keep(b"a", users(4));
        members.keep(b"b", users(0)); // counts as one
        members.keep(b"a", users(5)); // replaces the 4
        assert_eq!((members.rooms.len(), members.total), (2, 6));
        members.forget(b"a");
        assert_eq!((members.rooms.len(), members.total), (1, 1));
        // Rooms without members cannot pile up past the bound.
        for i in 0..100u32 {
            members.keep(&i.to_be_bytes(), users(0));
            assert!(members.total <= 10 && members.rooms.len() <= 10);
        }
        // Past the bound it starts over; a room larger than the bound is not kept at all.
        members.keep(b"big", users(11));
        assert!(members.rooms.is_empty() && members.total == 0);
        members.keep(b"c", users(10));
        assert_eq!(members.total, 10);
        members.keep(b"d", users(1));
        assert_eq!((members.rooms.len(), members.total), (1, 1));
    }
}
