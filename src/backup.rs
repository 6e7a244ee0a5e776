//! The operator commands `backup`, `restore` and `verify` (the file format: `snapshot.rs` and
//! docs/snapshot.md).
//!
//! - `backup` asks the running service for a snapshot through the admin API
//!   (`GET /api/backup`), or, with `--data-dir`, opens a stopped data directory itself.
//! - `restore` checks a snapshot whole, loads it into a new data directory beside the target and
//!   only then puts it in the target's place: a failure leaves the target as it was.
//! - `verify` reads a stopped data directory (a copy of it: opening sled writes) and checks
//!   everything it holds.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs::File;
use std::io::{BufReader, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};

use crate::cli::{BackupArgs, RestoreArgs, VerifyArgs};
use crate::config::{Config, StoreConfig};
use crate::delivery::now_ms;
use crate::snapshot::{self, Summary};
use crate::store::{MessageId, Record, RedisStore, SiteStats, SledStore, Store, StoreError};

/// Page cache of a store opened by a command.
const CACHE_BYTES: u64 = 64 << 20;

/// `sio-push backup`: through the admin API, or with `--data-dir` from a stopped data directory;
/// returns the report for the operator.
pub async fn backup_command(config: &Config, args: BackupArgs) -> anyhow::Result<String> {
    let summary = match &args.data.data_dir {
        Some(_) => backup_offline(config, &args.output).await?,
        None => backup_online(config, args.admin_url, args.token, &args.output).await?,
    };
    let mut report = format!("wrote {}: ", args.output.display());
    summarize(&summary, &mut report);
    Ok(report)
}

/// `sio-push restore`; returns the report for the operator.
pub async fn restore_command(config: &Config, args: RestoreArgs) -> anyhow::Result<String> {
    let restored = restore(config, &args.input, args.force).await?;
    let target = match &config.store {
        StoreConfig::Redis(redis) => format!("Redis (key prefix {})", redis.key_prefix),
        StoreConfig::Sled => config.server.data_dir.display().to_string(),
    };
    let mut report = format!("restored {} into {target}: ", args.input.display());
    summarize(&restored.summary, &mut report);
    if let Some(aside) = restored.kept_aside {
        let _ =
            writeln!(report, "the earlier contents are in {} (remove it once you no longer need it)", aside.display());
    }
    Ok(report)
}

/// `sio-push verify`: prints the report and the damage found; `Err` if there is any.
pub async fn verify_command(config: &Config, args: VerifyArgs) -> anyhow::Result<()> {
    let verified = verify(config, args.scratch.as_deref()).await?;
    print!("{}", verified.report);
    for damage in &verified.damage {
        println!("DAMAGE: {damage}");
    }
    if !verified.damage.is_empty() {
        bail!(
            "the data directory is damaged: restore the last backup (sio-push restore --force), or keep what reads \
             with sio-push backup --data-dir and restore that"
        );
    }
    println!("no damage found");
    Ok(())
}

/// `sio-push backup` through the running service's admin API.
pub async fn backup_online(
    config: &Config,
    admin_url: Option<String>,
    token: Option<String>,
    output: &Path,
) -> anyhow::Result<Summary> {
    let client = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(10))
        .read_timeout(Duration::from_secs(120))
        .build()?;
    let mut response = crate::ops::admin_get(&client, config, admin_url, token, "/api/backup").await?;
    let mut file = NewFile::create(output)?;
    while let Some(chunk) = response.chunk().await.context("the backup stream broke off")? {
        file.write_all(&chunk)?;
    }
    file.commit_checked()
}

/// `sio-push backup --data-dir`: a snapshot of a stopped data directory.
pub async fn backup_offline(config: &Config, output: &Path) -> anyhow::Result<Summary> {
    let dir = sled_dir(config)?;
    require_data(&dir)?;
    let store = open_stopped(&dir)?;
    let export = store.export().await?;
    let file = NewFile::create(output)?;
    let written = tokio::task::spawn_blocking(move || snapshot::write(export, file, now_ms())).await?;
    store.close().await;
    let (_, file) = written.context("cannot write the backup")?;
    file.commit_checked()
}

/// What `restore` did.
#[derive(Debug)]
pub struct Restored {
    /// What the snapshot held.
    pub summary: Summary,
    /// Where the target's earlier contents were moved, if it had any.
    pub kept_aside: Option<PathBuf>,
}

/// `sio-push restore`: the snapshot at `input` becomes the data directory (or, with the Redis
/// store, the contents of its sites there).
pub async fn restore(config: &Config, input: &Path, force: bool) -> anyhow::Result<Restored> {
    if let StoreConfig::Redis(redis) = &config.store {
        return restore_into_redis(redis, input).await;
    }
    let target = sled_dir(config)?;
    let open = || File::open(input).map(BufReader::new).with_context(|| format!("cannot open {}", input.display()));
    let (_, summary) = tokio::task::block_in_place(|| snapshot::check(open()?).map_err(anyhow::Error::from))
        .with_context(|| format!("{} is not a usable backup; nothing was changed", input.display()))?;
    let non_empty = match std::fs::read_dir(&target) {
        Ok(mut entries) => entries.next().is_some(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", target.display())),
    };
    ensure_stopped(&target)?;
    if non_empty && !force {
        bail!(
            "{} is not empty; restore with the service stopped, and add --force to replace it (its contents are \
             then kept aside beside it)",
            target.display()
        );
    }
    let staging = sibling(&target, "restoring");
    remove_dir_if_exists(&staging)?;
    let loaded = load_into(&staging, open()?, &summary).await;
    if let Err(e) = loaded {
        let _ = std::fs::remove_dir_all(&staging);
        return Err(e.context(format!("restore failed; {} was not changed", target.display())));
    }
    let swapped = give_to_owner_of(&staging, &target).and_then(|()| match non_empty {
        true => {
            let aside = sibling(&target, &format!("before-restore-{}", now_ms() / 1000));
            std::fs::rename(&target, &aside)
                .with_context(|| format!("cannot move {} aside to {}", target.display(), aside.display()))?;
            Ok(Some(aside))
        }
        false => remove_dir_if_exists(&target).map(|()| None),
    });
    let kept_aside = match swapped {
        Ok(kept_aside) => kept_aside,
        Err(e) => {
            let _ = std::fs::remove_dir_all(&staging);
            return Err(e.context(format!(
                "restore failed; {} was not changed (it must be a directory of its own, not a mount point)",
                target.display()
            )));
        }
    };
    if let Err(e) = std::fs::rename(&staging, &target) {
        // Put the earlier contents back where they were.
        if let Some(aside) = &kept_aside {
            let _ = std::fs::rename(aside, &target);
        }
        let _ = std::fs::remove_dir_all(&staging);
        return Err(e)
            .with_context(|| format!("cannot move the restored data to {}; nothing was changed", target.display()));
    }
    sync_parent(&target)?;
    Ok(Restored { summary, kept_aside })
}

/// `sio-push restore` with the Redis store: moving from one VM to several nodes. The sites of
/// the snapshot must hold no device in Redis yet (a second run would otherwise queue every
/// message twice, as their ids are given again). Devices come in disconnected. Message ids are
/// given again from each site's counter on, in the same order: the Redis store counts in Lua
/// numbers (below 2^53), and a data dir that imported the old service's flake ids holds larger.
async fn restore_into_redis(redis: &crate::config::RedisConfig, input: &Path) -> anyhow::Result<Restored> {
    let open = || File::open(input).map(BufReader::new).with_context(|| format!("cannot open {}", input.display()));
    let (summary, ids) = tokio::task::block_in_place(|| snapshot::check_ids(open()?).map_err(anyhow::Error::from))
        .with_context(|| format!("{} is not a usable backup; nothing was changed", input.display()))?;
    let store = RedisStore::open(redis.options()).await.context("cannot reach Redis")?;
    let before = store.stats().await?;
    let mut first = BTreeMap::new();
    for site in summary.sites.keys() {
        if before.get(site).is_some_and(|s| s.devices > 0) {
            bail!(
                "site {site} already has devices in Redis (key prefix {}); restore into sites that hold nothing, \
                 or under another key_prefix. Nothing was changed",
                redis.key_prefix
            );
        }
        first.insert(site.clone(), store.last_id(site).await? + 1);
    }
    let renumber = |site: &str, id: MessageId| {
        let of_site = &ids[site];
        first[site] + of_site.partition_point(|&other| other < id) as MessageId
    };
    let reader = snapshot::SnapshotReader::new(open()?)?;
    let loaded = snapshot::load_with(&store, reader, |record| match record {
        Record::Ids { .. } => None,
        Record::Message { device, mut message, shared } => {
            message.id = renumber(&device.site, message.id);
            Some(Record::Message { device, message, shared })
        }
        Record::Device { key, mut state } => {
            // Owed before any message given from here on.
            state.resync_at = state.resync_at.map(|_| first[&*key.site] - 1);
            Some(Record::Device { key, state })
        }
        other => Some(other),
    })
    .await;
    let stats = store.stats().await;
    if let Err(e) = loaded {
        let keys: Vec<String> = summary.sites.keys().map(|site| format!("{{{}:{site}}}:*", redis.key_prefix)).collect();
        bail!("restore into Redis stopped part way ({e}): remove the keys {} and run it again", keys.join(" "));
    }
    let stats = stats?;
    same_counts(&summary, &stats, "Redis now")?;
    Ok(Restored { summary, kept_aside: None })
}

/// Loads a checked snapshot into a new store at `dir` and checks what it holds.
async fn load_into(dir: &Path, input: BufReader<File>, summary: &Summary) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let store = SledStore::open(dir, CACHE_BYTES, 0)?;
    let reader = snapshot::SnapshotReader::new(input)?;
    let loaded = snapshot::load(&store, reader).await;
    let audited = store.audit().await;
    let stats = store.stats().await;
    store.close().await;
    loaded?;
    audited.map_err(|e| anyhow::anyhow!("the restored store does not check out: {e}"))?;
    let stats = stats?;
    same_counts(summary, &stats, "the restored store")
}

/// Every site holds the devices, messages and bytes the snapshot counted.
fn same_counts(summary: &Summary, stats: &BTreeMap<String, SiteStats>, holder: &str) -> anyhow::Result<()> {
    for (site, expected) in &summary.sites {
        let got = stats.get(site).cloned().unwrap_or_default();
        if (got.devices, got.queued_messages, got.queued_bytes) != (expected.devices, expected.messages, expected.bytes)
        {
            bail!("site {site}: the backup holds {expected:?}, {holder} {got:?}");
        }
    }
    Ok(())
}

/// What `verify` found.
#[derive(Debug, Default)]
pub struct Verified {
    /// The report, for people.
    pub report: String,
    /// Damage found (empty: none).
    pub damage: Vec<String>,
}

/// `sio-push verify`: reads a stopped data directory whole and checks it. Writes nothing there:
/// sled is opened on a copy under `scratch` (the system's temporary directory by default).
pub async fn verify(config: &Config, scratch: Option<&Path>) -> anyhow::Result<Verified> {
    let dir = sled_dir(config)?;
    require_data(&dir)?;
    ensure_stopped(&dir)?;
    let mut out = Verified::default();
    let _ = writeln!(out.report, "data directory {}", dir.display());
    for file in
        crate::store::sled::wal_report(&dir).with_context(|| format!("cannot read the log in {}", dir.display()))?
    {
        let _ = write!(
            out.report,
            "write-ahead log {}: {} records of generation {} replayed, up to byte {} of {}",
            file.name,
            file.records,
            file.generation.map_or("-".into(), |g| g.to_string()),
            file.end,
            file.size
        );
        match file.record_past_end {
            None => out.report.push('\n'),
            Some(_) if file.damaged => {
                out.report.push('\n');
                out.damage.push(format!(
                    "the write-ahead log file {} is damaged at byte {}: a later record shows it had been synced \
                     past there",
                    file.name, file.end
                ));
            }
            Some(at) => {
                let _ = writeln!(
                    out.report,
                    "; a whole record lies at byte {at}, past one a crash cut before it was synced (nothing \
                     answered 200 was in it)",
                );
            }
        }
    }
    let scratch = scratch.map(Path::to_path_buf).unwrap_or_else(std::env::temp_dir);
    let copy = scratch.join(format!("sio-push-verify-{}", std::process::id()));
    remove_dir_if_exists(&copy)?;
    let checked = async {
        copy_dir(&dir, &copy).with_context(|| format!("cannot copy {} to {}", dir.display(), copy.display()))?;
        let store = match SledStore::open(&copy, CACHE_BYTES, 0) {
            Ok(store) => store,
            Err(e) => {
                out.damage.push(format!("the store does not open: {e}"));
                return anyhow::Ok(());
            }
        };
        if let Err(e) = store.audit().await {
            out.damage.push(format!("the store does not check out: {e}"));
        }
        match store.export().await {
            Ok(export) => {
                let written = tokio::task::spawn_blocking(move || snapshot::write(export, std::io::sink(), 0)).await?;
                match written {
                    Ok((summary, _)) => summarize(&summary, &mut out.report),
                    Err(e) => out.damage.push(format!("a record does not read: {e}")),
                }
            }
            Err(e) => out.damage.push(format!("the store does not read: {e}")),
        }
        store.close().await;
        Ok(())
    }
    .await;
    let _ = std::fs::remove_dir_all(&copy);
    checked?;
    Ok(out)
}

/// Per-site counts of a snapshot, for people.
pub fn summarize(summary: &Summary, out: &mut String) {
    let _ = writeln!(
        out,
        "{} devices, {} queued messages, {} user room lists, {} idempotency keys",
        summary.devices, summary.messages, summary.users, summary.idempotency_keys
    );
    for (site, s) in &summary.sites {
        let _ =
            writeln!(out, "  site {site}: {} devices, {} queued messages ({} bytes)", s.devices, s.messages, s.bytes);
    }
}

/// The data directory of the embedded store.
fn sled_dir(config: &Config) -> anyhow::Result<PathBuf> {
    match &config.store {
        StoreConfig::Sled if config.server.ephemeral => bail!("an --ephemeral service keeps nothing to back up"),
        StoreConfig::Sled => Ok(config.server.data_dir.clone()),
        StoreConfig::Redis(_) => bail!(
            "the store is Redis ([store] backend = \"redis\"): back it up with Redis's own persistence \
             (RDB/AOF files, BGSAVE); these commands work on the embedded store's data directory"
        ),
    }
}

/// Refuses a directory without a sled database in it.
fn require_data(dir: &Path) -> anyhow::Result<()> {
    if !dir.join("db").exists() {
        bail!("{} holds no sio-push data (no sled database in it)", dir.display());
    }
    Ok(())
}

/// Opens (or creates) the store in the configured data directory for a command that writes to
/// it, refusing one a running service holds.
pub(crate) fn open_for_writing(config: &Config) -> anyhow::Result<SledStore> {
    let dir = sled_dir(config)?;
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    open_stopped(&dir)
}

fn open_stopped(dir: &Path) -> anyhow::Result<SledStore> {
    match SledStore::open(dir, CACHE_BYTES, 0) {
        Ok(store) => Ok(store),
        Err(StoreError::Io(e)) if e.contains("could not acquire lock") => {
            bail!("{} is in use by a running service: stop it first (systemctl stop sio-push)", dir.display())
        }
        Err(e) => Err(e).with_context(|| format!("cannot open the store in {}", dir.display())),
    }
}

/// Refuses a data directory whose database a running service holds (sled locks its `db` file).
fn ensure_stopped(dir: &Path) -> anyhow::Result<()> {
    use std::os::fd::AsRawFd;
    let Ok(db) = File::open(dir.join("db")) else { return Ok(()) };
    // SAFETY: flock on a descriptor this function owns; the lock goes with the file.
    let locked = unsafe { libc::flock(db.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0;
    if locked {
        bail!("{} is in use by a running service: stop it first (systemctl stop sio-push)", dir.display());
    }
    Ok(())
}

/// A file written under a temporary name and renamed into place once whole and synced.
struct NewFile {
    path: PathBuf,
    partial: PathBuf,
    file: std::io::BufWriter<File>,
}

impl NewFile {
    /// Creates `PATH.partial`, readable by its owner only (it holds other people's messages).
    fn create(path: &Path) -> anyhow::Result<Self> {
        let partial = sibling(path, "partial");
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&partial)
            .with_context(|| format!("cannot create {}", partial.display()))?;
        Ok(Self { path: path.to_owned(), partial, file: std::io::BufWriter::with_capacity(1 << 20, file) })
    }

    /// Syncs the file, checks it whole as a snapshot, and gives it its name.
    fn commit_checked(mut self) -> anyhow::Result<Summary> {
        let done = (|| {
            self.file.flush()?;
            self.file.get_ref().sync_all()?;
            let (_, summary) = snapshot::check(BufReader::new(File::open(&self.partial)?))?;
            std::fs::rename(&self.partial, &self.path)?;
            sync_parent(&self.path)?;
            anyhow::Ok(summary)
        })();
        if done.is_err() {
            let _ = std::fs::remove_file(&self.partial);
        }
        done.with_context(|| format!("the backup was not written to {}", self.path.display()))
    }
}

impl Write for NewFile {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.file.write(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.file.flush()
    }
}

impl Drop for NewFile {
    fn drop(&mut self) {
        // Not committed (the rename moved it otherwise): leave no partial file behind.
        let _ = std::fs::remove_file(&self.partial);
    }
}

/// `PATH.suffix`, beside `path`.
fn sibling(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.file_name().map(|n| n.to_os_string()).unwrap_or_else(|| "data".into());
    name.push(format!(".{suffix}"));
    path.with_file_name(name)
}

fn remove_dir_if_exists(dir: &Path) -> anyhow::Result<()> {
    match std::fs::remove_dir_all(dir) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(e).with_context(|| format!("cannot remove {}", dir.display()))
        }
        _ => Ok(()),
    }
}

/// Syncs the directory holding `path`, so that a rename into it survives a power cut.
fn sync_parent(path: &Path) -> anyhow::Result<()> {
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    File::open(parent).and_then(|d| d.sync_all()).with_context(|| format!("cannot sync {}", parent.display()))
}

/// Gives everything under `dir` the owner of `like` (or of its parent, if it does not exist),
/// and `dir` itself the mode of `like`: a restore run as root must leave files the service's
/// user can open, and no wider than they were.
fn give_to_owner_of(dir: &Path, like: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    if let Ok(like) = std::fs::metadata(like) {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(like.mode() & 0o7777))?;
    }
    let owner = std::fs::metadata(like).or_else(|_| std::fs::metadata(like.parent().unwrap_or(Path::new("."))));
    let Ok(owner) = owner else { return Ok(()) };
    let (uid, gid) = (owner.uid(), owner.gid());
    let mut stack = vec![dir.to_path_buf()];
    while let Some(path) = stack.pop() {
        let meta = std::fs::symlink_metadata(&path)?;
        if meta.uid() != uid || meta.gid() != gid {
            std::os::unix::fs::lchown(&path, Some(uid), Some(gid))
                .with_context(|| format!("cannot give {} to uid {uid}", path.display()))?;
        }
        if meta.is_dir() {
            for entry in std::fs::read_dir(&path)? {
                stack.push(entry?.path());
            }
        }
    }
    Ok(())
}

/// Copies a data directory (files and subdirectories) to `to`.
fn copy_dir(from: &Path, to: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let target = to.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            copy_dir(&entry.path(), &target)?;
        } else {
            std::fs::copy(entry.path(), &target)?;
        }
    }
    Ok(())
}
