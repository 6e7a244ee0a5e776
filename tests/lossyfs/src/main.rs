//! lossyfs: a file system for power-cut tests. It keeps every file in memory twice: as written,
//! and as a disk would hold it after a power cut. A file's contents become durable only when the
//! file is `fsync`ed or `fdatasync`ed; a directory's names (created, renamed, removed) only when
//! the directory itself is `fsync`ed. That is all POSIX promises, and all a careful program may
//! count on. `sync_file_range`, `sync()` and closing a file make nothing durable.
//!
//! Usage: `sio-push-lossyfs MOUNTPOINT` (as root: it mounts with mount(2)). It prints `mounted`,
//! then reads commands on stdin, one per line, and answers each on stdout:
//!
//! - `cut`: the power goes off now. From here every operation fails with EIO, so nothing more
//!   is written and no later sync can succeed. Answers `cut`.
//! - `cut-at-write NAME N`: the power goes off just before the Nth write from now to a file
//!   named NAME (say sled's `db`, which is written only at checkpoints). Answers `armed`, then
//!   `cut NAME` when it happens.
//! - `power-on`: the disk comes back as it was durable at the cut: every file's durable
//!   contents under the durable names. Run it once the program using the mount is dead (its
//!   open files are gone with it). Answers `on FILES BYTES`.
//! - `stats`: answers `stats writes=N syncs=N dir-syncs=N`, counted since the mount.
//!
//! At the end of stdin it unmounts and exits.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::ffi::{OsStr, OsString};
use std::io::{BufRead, Write};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use fuser::{
    Config, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo, MountOption, OpenFlags,
    RenameFlags, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs,
    ReplyWrite, Request, TimeOrNow, WriteFlags,
};

/// Nothing is cached in the kernel: after a power-on every name and size must be asked again.
const TTL: Duration = Duration::ZERO;
/// Durability is tracked in pages of this size.
const PAGE: usize = 4096;

enum Node {
    File {
        data: Vec<u8>,
        durable: Vec<u8>,
        /// Pages written since the last sync.
        dirty: BTreeSet<usize>,
    },
    Dir {
        entries: BTreeMap<OsString, u64>,
        durable: BTreeMap<OsString, u64>,
    },
}

impl Node {
    fn empty_file() -> Self {
        Node::File { data: Vec::new(), durable: Vec::new(), dirty: BTreeSet::new() }
    }
}

struct Inode {
    node: Node,
    perm: u16,
    uid: u32,
    gid: u32,
    mtime: SystemTime,
    /// The name it was last given, for `cut-at-write`.
    name: OsString,
}

struct Trigger {
    name: OsString,
    writes_left: u64,
}

#[derive(Default)]
struct Stats {
    writes: u64,
    syncs: u64,
    dir_syncs: u64,
}

struct State {
    inodes: HashMap<u64, Inode>,
    next_ino: u64,
    /// The power is off: every operation fails until `power-on`.
    off: bool,
    trigger: Option<Trigger>,
    stats: Stats,
}

impl State {
    fn new() -> Self {
        let root = Inode {
            node: Node::Dir { entries: BTreeMap::new(), durable: BTreeMap::new() },
            perm: 0o755,
            uid: 0,
            gid: 0,
            mtime: SystemTime::now(),
            name: OsString::from("/"),
        };
        Self {
            inodes: HashMap::from([(INodeNo::ROOT.0, root)]),
            next_ino: INodeNo::ROOT.0 + 1,
            off: false,
            trigger: None,
            stats: Stats::default(),
        }
    }

    fn attr(&self, ino: u64) -> Result<FileAttr, Errno> {
        let inode = self.inodes.get(&ino).ok_or(Errno::ENOENT)?;
        let (kind, size, nlink) = match &inode.node {
            Node::File { data, .. } => (FileType::RegularFile, data.len() as u64, 1),
            Node::Dir { .. } => (FileType::Directory, 0, 2),
        };
        Ok(FileAttr {
            ino: INodeNo(ino),
            size,
            blocks: size.div_ceil(512),
            atime: inode.mtime,
            mtime: inode.mtime,
            ctime: inode.mtime,
            crtime: inode.mtime,
            kind,
            perm: inode.perm,
            nlink,
            uid: inode.uid,
            gid: inode.gid,
            rdev: 0,
            flags: 0,
            blksize: PAGE as u32,
        })
    }

    fn entries(&mut self, dir: u64) -> Result<&mut BTreeMap<OsString, u64>, Errno> {
        match &mut self.inodes.get_mut(&dir).ok_or(Errno::ENOENT)?.node {
            Node::Dir { entries, .. } => Ok(entries),
            Node::File { .. } => Err(Errno::ENOTDIR),
        }
    }

    fn lookup(&mut self, dir: u64, name: &OsStr) -> Result<u64, Errno> {
        self.entries(dir)?.get(name).copied().ok_or(Errno::ENOENT)
    }

    /// A file's contents and dirty pages; `write` says whether they are about to change (which
    /// sets its modification time).
    fn file(&mut self, ino: u64, write: bool) -> Result<(&mut Vec<u8>, &mut BTreeSet<usize>), Errno> {
        let inode = self.inodes.get_mut(&ino).ok_or(Errno::ENOENT)?;
        if write {
            inode.mtime = SystemTime::now();
        }
        match &mut inode.node {
            Node::File { data, dirty, .. } => Ok((data, dirty)),
            Node::Dir { .. } => Err(Errno::EISDIR),
        }
    }

    /// Adds a new file or directory named `name` to `dir`.
    fn add(&mut self, req: &Request, dir: u64, name: &OsStr, mode: u32, node: Node) -> Result<FileAttr, Errno> {
        if self.entries(dir)?.contains_key(name) {
            return Err(Errno::EEXIST);
        }
        let ino = self.next_ino;
        self.next_ino += 1;
        let inode = Inode {
            node,
            perm: (mode & 0o7777) as u16,
            uid: req.uid(),
            gid: req.gid(),
            mtime: SystemTime::now(),
            name: name.to_owned(),
        };
        self.inodes.insert(ino, inode);
        self.entries(dir)?.insert(name.to_owned(), ino);
        self.attr(ino)
    }

    /// Sets a file's size, as `ftruncate` would.
    fn resize(&mut self, ino: u64, size: usize) -> Result<(), Errno> {
        let (data, dirty) = self.file(ino, true)?;
        // Every page from the shorter end on differs from what a sync would have kept.
        let from = data.len().min(size) / PAGE;
        dirty.extend(from..=data.len().max(size) / PAGE);
        data.resize(size, 0);
        Ok(())
    }

    /// `fsync` and `fdatasync` of a file, or of a directory.
    fn sync(&mut self, ino: u64) -> Result<(), Errno> {
        match &mut self.inodes.get_mut(&ino).ok_or(Errno::ENOENT)?.node {
            Node::File { data, durable, dirty } => {
                durable.resize(data.len(), 0);
                for page in std::mem::take(dirty) {
                    let range = page * PAGE..((page + 1) * PAGE).min(data.len());
                    if range.start < range.end {
                        durable[range.clone()].copy_from_slice(&data[range]);
                    }
                }
                self.stats.syncs += 1;
            }
            Node::Dir { entries, durable } => {
                durable.clone_from(entries);
                self.stats.dir_syncs += 1;
            }
        }
        Ok(())
    }

    /// The disk after the power comes back: what was durable, under the durable names.
    fn power_on(&mut self) -> (usize, usize) {
        let mut reachable = BTreeSet::from([INodeNo::ROOT.0]);
        let mut dirs = vec![INodeNo::ROOT.0];
        while let Some(dir) = dirs.pop() {
            if let Some(Inode { node: Node::Dir { durable, .. }, .. }) = self.inodes.get(&dir) {
                for &ino in durable.values() {
                    if reachable.insert(ino) {
                        dirs.push(ino);
                    }
                }
            }
        }
        self.inodes.retain(|ino, _| reachable.contains(ino));
        let (mut files, mut bytes) = (0, 0);
        for inode in self.inodes.values_mut() {
            match &mut inode.node {
                Node::File { data, durable, dirty } => {
                    data.clone_from(durable);
                    dirty.clear();
                    files += 1;
                    bytes += data.len();
                }
                Node::Dir { entries, durable } => entries.clone_from(durable),
            }
        }
        self.off = false;
        self.trigger = None;
        (files, bytes)
    }
}

/// The file system: the state, shared with the command loop.
struct LossyFs(Arc<Mutex<State>>);

impl LossyFs {
    /// The state while the power is on.
    fn on(&self) -> Result<MutexGuard<'_, State>, Errno> {
        let state = self.0.lock().unwrap();
        if state.off {
            Err(Errno::EIO)
        } else {
            Ok(state)
        }
    }
}

fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    // The test reads these; if it is gone there is no one left to tell.
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

macro_rules! answer {
    ($reply:ident, $result:expr, |$ok:pat_param| $body:expr) => {
        match $result {
            Ok($ok) => $body,
            Err(e) => $reply.error(e),
        }
    };
}

impl Filesystem for LossyFs {
    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let result = self.on().and_then(|mut s| {
            let ino = s.lookup(parent.0, name)?;
            s.attr(ino)
        });
        answer!(reply, result, |attr| reply.entry(&TTL, &attr, Generation(0)));
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        answer!(reply, self.on().and_then(|s| s.attr(ino.0)), |attr| reply.attr(&TTL, &attr));
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let result = self.on().and_then(|mut s| {
            if let Some(size) = size {
                s.resize(ino.0, size as usize)?;
            }
            let inode = s.inodes.get_mut(&ino.0).ok_or(Errno::ENOENT)?;
            if let Some(mode) = mode {
                inode.perm = (mode & 0o7777) as u16;
            }
            inode.uid = uid.unwrap_or(inode.uid);
            inode.gid = gid.unwrap_or(inode.gid);
            match mtime {
                Some(TimeOrNow::SpecificTime(t)) => inode.mtime = t,
                Some(TimeOrNow::Now) => inode.mtime = SystemTime::now(),
                None => {}
            }
            s.attr(ino.0)
        });
        answer!(reply, result, |attr| reply.attr(&TTL, &attr));
    }

    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        _rdev: u32,
        reply: ReplyEntry,
    ) {
        let result = self.on().and_then(|mut s| {
            if mode & libc::S_IFMT != libc::S_IFREG {
                return Err(Errno::EPERM);
            }
            let file = Node::empty_file();
            s.add(req, parent.0, name, mode & !umask, file)
        });
        answer!(reply, result, |attr| reply.entry(&TTL, &attr, Generation(0)));
    }

    fn mkdir(&self, req: &Request, parent: INodeNo, name: &OsStr, mode: u32, umask: u32, reply: ReplyEntry) {
        let result = self.on().and_then(|mut s| {
            let dir = Node::Dir { entries: BTreeMap::new(), durable: BTreeMap::new() };
            s.add(req, parent.0, name, mode & !umask, dir)
        });
        answer!(reply, result, |attr| reply.entry(&TTL, &attr, Generation(0)));
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let result = self.on().and_then(|mut s| {
            let ino = s.lookup(parent.0, name)?;
            if matches!(s.inodes[&ino].node, Node::Dir { .. }) {
                return Err(Errno::EISDIR);
            }
            // The inode stays: open files still use it, and a durable name may still lead to it.
            s.entries(parent.0)?.remove(name);
            Ok(())
        });
        answer!(reply, result, |()| reply.ok());
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let result = self.on().and_then(|mut s| {
            let ino = s.lookup(parent.0, name)?;
            if !s.entries(ino)?.is_empty() {
                return Err(Errno::ENOTEMPTY);
            }
            s.entries(parent.0)?.remove(name);
            Ok(())
        });
        answer!(reply, result, |()| reply.ok());
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        let result = self.on().and_then(|mut s| {
            if flags.contains(RenameFlags::RENAME_EXCHANGE) {
                return Err(Errno::EINVAL);
            }
            let ino = s.lookup(parent.0, name)?;
            if let Ok(replaced) = s.lookup(newparent.0, newname) {
                if flags.contains(RenameFlags::RENAME_NOREPLACE) {
                    return Err(Errno::EEXIST);
                }
                if let Node::Dir { entries, .. } = &s.inodes[&replaced].node {
                    if !entries.is_empty() {
                        return Err(Errno::ENOTEMPTY);
                    }
                }
            }
            s.entries(parent.0)?.remove(name);
            s.entries(newparent.0)?.insert(newname.to_owned(), ino);
            if let Some(inode) = s.inodes.get_mut(&ino) {
                inode.name = newname.to_owned();
            }
            Ok(())
        });
        answer!(reply, result, |()| reply.ok());
    }

    fn open(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        // Direct I/O: every read and write comes here, none is answered from the page cache,
        // which would still hold what a power cut took away.
        answer!(reply, self.on().and_then(|s| s.attr(ino.0)), |_| reply
            .opened(FileHandle(ino.0), FopenFlags::FOPEN_DIRECT_IO));
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<fuser::LockOwner>,
        reply: ReplyData,
    ) {
        let mut state = match self.on() {
            Ok(state) => state,
            Err(e) => return reply.error(e),
        };
        match state.file(ino.0, false) {
            Ok((data, _)) => {
                let start = (offset as usize).min(data.len());
                let end = (start + size as usize).min(data.len());
                reply.data(&data[start..end]);
            }
            Err(e) => reply.error(e),
        }
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        bytes: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<fuser::LockOwner>,
        reply: ReplyWrite,
    ) {
        let result = self.on().and_then(|mut guard| {
            let s = &mut *guard;
            let name = &s.inodes.get(&ino.0).ok_or(Errno::ENOENT)?.name;
            if let Some(trigger) = s.trigger.as_mut().filter(|t| t.name == *name) {
                trigger.writes_left -= 1;
                if trigger.writes_left == 0 {
                    say(&format!("cut {}", trigger.name.to_string_lossy()));
                    s.off = true;
                    return Err(Errno::EIO);
                }
            }
            let (data, dirty) = s.file(ino.0, true)?;
            let (start, end) = (offset as usize, offset as usize + bytes.len());
            if data.len() < end {
                dirty.extend(data.len() / PAGE..=end / PAGE);
                data.resize(end, 0);
            }
            data[start..end].copy_from_slice(bytes);
            dirty.extend(start / PAGE..=end / PAGE);
            s.stats.writes += 1;
            Ok(bytes.len() as u32)
        });
        answer!(reply, result, |n| reply.written(n));
    }

    fn flush(&self, _req: &Request, _ino: INodeNo, _fh: FileHandle, _owner: fuser::LockOwner, reply: ReplyEmpty) {
        reply.ok();
    }

    fn fsync(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, _datasync: bool, reply: ReplyEmpty) {
        answer!(reply, self.on().and_then(|mut s| s.sync(ino.0)), |()| reply.ok());
    }

    fn readdir(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, offset: u64, mut reply: ReplyDirectory) {
        let result = self.on().and_then(|mut s| {
            let entries: Vec<(OsString, u64)> = s.entries(ino.0)?.iter().map(|(n, i)| (n.clone(), *i)).collect();
            let mut all = vec![(OsString::from("."), ino.0, FileType::Directory)];
            all.push((OsString::from(".."), ino.0, FileType::Directory));
            for (name, child) in entries {
                let kind = match s.inodes.get(&child).map(|i| &i.node) {
                    Some(Node::Dir { .. }) => FileType::Directory,
                    _ => FileType::RegularFile,
                };
                all.push((name, child, kind));
            }
            Ok(all)
        });
        answer!(reply, result, |all| {
            for (i, (name, child, kind)) in all.into_iter().enumerate().skip(offset as usize) {
                if reply.add(INodeNo(child), i as u64 + 1, kind, name) {
                    break;
                }
            }
            reply.ok()
        });
    }

    fn fsyncdir(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, _datasync: bool, reply: ReplyEmpty) {
        answer!(reply, self.on().and_then(|mut s| s.sync(ino.0)), |()| reply.ok());
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        // A roomy disk: 64 GiB, all free.
        let blocks = (64u64 << 30) / PAGE as u64;
        reply.statfs(blocks, blocks, blocks, 1 << 20, 1 << 20, PAGE as u32, 255, PAGE as u32);
    }

    fn access(&self, _req: &Request, ino: INodeNo, _mask: fuser::AccessFlags, reply: ReplyEmpty) {
        answer!(reply, self.on().and_then(|s| s.attr(ino.0)), |_| reply.ok());
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let result = self.on().and_then(|mut s| match s.lookup(parent.0, name) {
            Ok(_) if flags & libc::O_EXCL != 0 => Err(Errno::EEXIST),
            Ok(ino) => {
                if flags & libc::O_TRUNC != 0 {
                    s.resize(ino, 0)?;
                }
                s.attr(ino)
            }
            Err(_) => {
                let file = Node::empty_file();
                s.add(req, parent.0, name, mode & !umask, file)
            }
        });
        answer!(reply, result, |attr| reply.created(
            &TTL,
            &attr,
            Generation(0),
            FileHandle(attr.ino.0),
            FopenFlags::FOPEN_DIRECT_IO
        ));
    }

    fn fallocate(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        let result = self.on().and_then(|mut s| match mode {
            0 => {
                let end = (offset + length) as usize;
                if s.file(ino.0, false)?.0.len() < end {
                    s.resize(ino.0, end)?;
                }
                Ok(())
            }
            libc::FALLOC_FL_KEEP_SIZE => Ok(()),
            _ => Err(Errno::EOPNOTSUPP),
        });
        answer!(reply, result, |()| reply.ok());
    }
}

fn main() {
    let mountpoint = match std::env::args_os().nth(1) {
        Some(path) => path,
        None => {
            eprintln!("usage: sio-push-lossyfs MOUNTPOINT (then commands on stdin; see the source)");
            std::process::exit(2);
        }
    };
    let state = Arc::new(Mutex::new(State::new()));
    let mut config = Config::default();
    config.mount_options = vec![MountOption::FSName("lossyfs".into()), MountOption::RW];
    let session = match fuser::spawn_mount(LossyFs(state.clone()), &mountpoint, &config) {
        Ok(session) => session,
        Err(e) => {
            eprintln!("sio-push-lossyfs: cannot mount on {}: {e}", mountpoint.to_string_lossy());
            std::process::exit(1);
        }
    };
    say("mounted");
    for line in std::io::stdin().lock().lines() {
        let Ok(line) = line else { break };
        let words: Vec<&str> = line.split_whitespace().collect();
        let mut s = state.lock().unwrap();
        match words.as_slice() {
            ["cut"] => {
                s.off = true;
                say("cut");
            }
            ["cut-at-write", name, n] => match n.parse::<u64>() {
                Ok(n) if n > 0 => {
                    s.trigger = Some(Trigger { name: OsString::from(name), writes_left: n });
                    say("armed");
                }
                _ => say(&format!("error: not a count: {n}")),
            },
            ["power-on"] => {
                let (files, bytes) = s.power_on();
                say(&format!("on {files} {bytes}"));
            }
            ["stats"] => {
                let Stats { writes, syncs, dir_syncs } = s.stats;
                say(&format!("stats writes={writes} syncs={syncs} dir-syncs={dir_syncs}"));
            }
            _ => say(&format!("error: unknown command: {line}")),
        }
    }
    if let Err(e) = session.umount_and_join() {
        eprintln!("sio-push-lossyfs: unmount: {e}");
        std::process::exit(1);
    }
}
