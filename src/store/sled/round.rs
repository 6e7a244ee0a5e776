//! Changes made since the last checkpoint, which sled has not been given yet.
//!
//! sled is slow to write to: every `Tree::apply_batch` of sled 0.34 seals its log buffer and
//! wakes its whole I/O thread pool twice, and even a single `insert` copies and relinks a tree
//! node. So the writer's jobs do not write to sled. Each job's changes are logged in the
//! write-ahead log (which makes them durable) and kept here, where the writer's reads see them
//! over sled's tree. sled gets what is left only at a checkpoint. Most queue entries never get
//! there: a message queued and acked between two checkpoints cancels out, and so does one acked
//! while a checkpoint is under way, which gives sled new keys' values last.

use std::collections::BTreeMap;
use std::iter::Peekable;

use sled::{IVec, Tree};

use super::io;
use crate::store::StoreError;

/// One change of a key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    /// Set the key to this value.
    Put(Vec<u8>),
    /// Set a key that is new: no value of it exists yet, in sled or here.
    PutNew(Vec<u8>),
    /// Remove the key.
    Remove,
}

/// A job's atomic set of changes, applied in order.
#[derive(Default)]
pub struct Changes(pub(super) Vec<(Vec<u8>, Op)>);

impl Changes {
    /// Sets `key` to `value`.
    pub fn insert(&mut self, key: impl AsRef<[u8]>, value: impl AsRef<[u8]>) {
        self.0.push((key.as_ref().to_vec(), Op::Put(value.as_ref().to_vec())));
    }

    /// Sets a key that never had a value (a new message's queue entry), so that removing it
    /// before the next checkpoint leaves nothing for sled to do.
    pub fn insert_new(&mut self, key: impl AsRef<[u8]>, value: impl AsRef<[u8]>) {
        self.0.push((key.as_ref().to_vec(), Op::PutNew(value.as_ref().to_vec())));
    }

    /// Removes `key`.
    pub fn remove(&mut self, key: impl AsRef<[u8]>) {
        self.0.push((key.as_ref().to_vec(), Op::Remove));
    }
}

/// The latest change of a key since the last checkpoint.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Change {
    /// Its value; `fresh` when sled has no value of it.
    Put {
        value: Vec<u8>,
        fresh: bool,
    },
    Remove,
}

impl Change {
    /// A value of a key sled has never had.
    fn is_new(&self) -> bool {
        matches!(self, Change::Put { fresh: true, .. })
    }
}

/// Keys changed, each with its latest change: the changes since the last checkpoint, or those
/// of the current round.
#[derive(Default)]
pub struct Pending(BTreeMap<Vec<u8>, Change>);

impl Pending {
    /// Adds a job's changes.
    #[cfg(test)]
    pub fn apply(&mut self, changes: Changes) {
        for (key, op) in changes.0 {
            self.apply_one(key, op);
        }
    }

    /// A copy of `layers` as one, each later layer over the earlier ones: what a reader of the
    /// tree must see over it.
    pub fn stacked(layers: &[&Pending]) -> Pending {
        let mut out = BTreeMap::new();
        for layer in layers {
            out.extend(layer.0.iter().map(|(k, c)| (k.clone(), c.clone())));
        }
        Pending(out)
    }

    /// Adds one change of a job's.
    pub fn apply_one(&mut self, key: Vec<u8>, op: Op) {
        let change = match op {
            Op::Put(value) => Change::Put { value, fresh: false },
            Op::PutNew(value) => Change::Put { value, fresh: true },
            Op::Remove => Change::Remove,
        };
        self.set(key, change);
    }

    /// Adds the changes of a later round. A removal of a key that `frozen` (the changes a
    /// checkpoint is giving sled) still holds as new takes it out of there instead: sled never
    /// sees either. That is a message delivered live and acked while a checkpoint was under way.
    pub fn absorb(&mut self, later: Pending, frozen: &mut Pending) {
        for (key, change) in later.0 {
            if change == Change::Remove && !frozen.is_empty() && !self.0.contains_key(&key) && frozen.take_new(&key) {
                continue;
            }
            self.set(key, change);
        }
    }

    /// Forgets `key` if it is changed here to a value sled has never had; `true` if it was.
    fn take_new(&mut self, key: &[u8]) -> bool {
        let new = self.0.get(key).is_some_and(Change::is_new);
        if new {
            self.0.remove(key);
        }
        new
    }

    fn set(&mut self, key: Vec<u8>, change: Change) {
        use std::collections::btree_map::Entry;
        match (self.0.entry(key), change) {
            (Entry::Vacant(e), change) => drop(e.insert(change)),
            (Entry::Occupied(mut e), Change::Put { value, .. }) => {
                let fresh = e.get().is_new();
                e.insert(Change::Put { value, fresh });
            }
            (Entry::Occupied(mut e), Change::Remove) => {
                if e.get().is_new() {
                    e.remove(); // sled never saw it: nothing to undo there
                } else {
                    e.insert(Change::Remove);
                }
            }
        }
    }

    /// Keys changed.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// No key is changed here.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Gives sled up to `n` changes, in key order, and forgets them; see [`Pending::drain_into`].
    /// A change sled refused stays here.
    pub fn drain_some_into(&mut self, tree: &Tree, n: usize) -> Result<(), StoreError> {
        for _ in 0..n {
            let Some((key, change)) = self.0.pop_first() else { break };
            self.give_or_keep(tree, key, change)?;
        }
        Ok(())
    }

    /// Like [`Pending::drain_some_into`], for the keys from `from` on, but leaves the values of
    /// new keys here (a live message's queue entry, which its ack may soon take out again; see
    /// [`Pending::absorb`]). Returns the key to go on from, `None` once past the last.
    pub fn drain_some_old_into(&mut self, tree: &Tree, n: usize, from: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        use std::ops::Bound::{Included, Unbounded};
        let old: Vec<Vec<u8>> = self
            .0
            .range::<[u8], _>((Included(from), Unbounded))
            .filter(|(_, change)| !change.is_new())
            .take(n)
            .map(|(key, _)| key.clone())
            .collect();
        let next = (old.len() == n).then(|| old.last().cloned()).flatten();
        for key in old {
            let change = self.0.remove(&key).expect("a key just found");
            self.give_or_keep(tree, key, change)?;
        }
        Ok(next)
    }

    /// Gives sled one change taken out of here; puts it back if sled refused it.
    fn give_or_keep(&mut self, tree: &Tree, key: Vec<u8>, change: Change) -> Result<(), StoreError> {
        let given = match &change {
            Change::Put { value, .. } => tree.insert(key.as_slice(), value.as_slice()).map(drop),
            Change::Remove => tree.remove(key.as_slice()).map(drop),
        };
        given.map_err(|e| {
            self.0.insert(key, change);
            io(e)
        })
    }

    /// Gives every change to sled, key by key, and forgets them. Call only once the write-ahead
    /// log holds them durably; they are durable in sled after its next flush.
    pub fn drain_into(&mut self, tree: &Tree) -> Result<(), StoreError> {
        self.drain_some_into(tree, usize::MAX)
    }

    /// The value of `key` as changed here: `None` when it is not changed here.
    pub fn lookup(&self, key: &[u8]) -> Option<Option<IVec>> {
        self.0.get(key).map(|change| match change {
            Change::Put { value, .. } => Some(IVec::from(value.as_slice())),
            Change::Remove => None,
        })
    }

    /// A prefix scan of `base` (which holds only keys with `prefix`) with these changes over it.
    /// Without changes under `prefix`, that is `base` itself: most scans (a room's members, a
    /// queue nothing was added to since the checkpoint) pass through three of these layers.
    pub fn scan_over<'a>(&'a self, base: Scan<'a>, prefix: &[u8]) -> Scan<'a> {
        let changes = self.0.range::<[u8], _>((std::ops::Bound::Included(prefix), std::ops::Bound::Unbounded));
        if !changes.clone().next().is_some_and(|(k, _)| k.starts_with(prefix)) {
            return base;
        }
        let prefix = prefix.to_vec();
        Box::new(Merge {
            base: base.peekable(),
            changes: changes.take_while(move |(k, _)| k.starts_with(&prefix)).peekable(),
        })
    }
}

/// Items of a prefix scan.
pub type Scan<'a> = Box<dyn Iterator<Item = Result<(IVec, IVec), StoreError>> + 'a>;

/// Reads the store's state: sled's tree, or the tree with the writer's pending changes over it.
pub trait View {
    /// The value of `key`.
    fn get(&self, key: &[u8]) -> Result<Option<IVec>, StoreError>;
    /// Every item whose key starts with `prefix`, in key order.
    fn scan(&self, prefix: &[u8]) -> Scan<'_>;
}

impl View for Tree {
    fn get(&self, key: &[u8]) -> Result<Option<IVec>, StoreError> {
        Tree::get(self, key).map_err(io)
    }

    fn scan(&self, prefix: &[u8]) -> Scan<'_> {
        Box::new(self.scan_prefix(prefix).map(|item| item.map_err(io)))
    }
}

/// Merges two key-ordered streams; on equal keys the change wins, and removals hide the base's
/// item.
struct Merge<'a, C: Iterator<Item = (&'a Vec<u8>, &'a Change)>> {
    base: Peekable<Scan<'a>>,
    changes: Peekable<C>,
}

impl<'a, C: Iterator<Item = (&'a Vec<u8>, &'a Change)>> Iterator for Merge<'a, C> {
    type Item = Result<(IVec, IVec), StoreError>;

    fn next(&mut self) -> Option<Self::Item> {
        use std::cmp::Ordering;
        loop {
            let order = match (self.base.peek(), self.changes.peek()) {
                (None, None) => return None,
                (Some(Err(_)), _) | (Some(_), None) => Ordering::Less,
                (None, Some(_)) => Ordering::Greater,
                (Some(Ok((base_key, _))), Some((change_key, _))) => base_key.as_ref().cmp(change_key.as_slice()),
            };
            match order {
                Ordering::Less => return self.base.next(),
                // The change overrides the base's item.
                Ordering::Equal => drop(self.base.next()),
                Ordering::Greater => {}
            }
            let (key, change) = self.changes.next().expect("peeked");
            if let Change::Put { value, .. } = change {
                return Some(Ok((IVec::from(key.as_slice()), IVec::from(value.as_slice()))));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(v: Option<IVec>) -> Option<String> {
        v.map(|v| String::from_utf8(v.to_vec()).unwrap())
    }

    #[test]
    fn reads_see_pending_changes_over_the_tree() {
        let db = sled::Config::new().temporary(true).open().unwrap();
        for k in ["a/1", "a/2", "a/4", "b/1"] {
            db.insert(k, k).unwrap();
        }
        let mut pending = Pending::default();
        let mut job = Changes::default();
        job.insert_new("a/3", "new");
        job.remove("a/2");
        job.insert("a/4", "changed");
        job.insert_new("a/5", "new");
        job.insert_new("a/6", "gone again");
        job.remove("a/6");
        job.remove("a/7"); // not there at all
        pending.apply(job);
        let scan = |prefix: &[u8]| pending.scan_over(View::scan(&*db, prefix), prefix);
        let get = |key: &[u8]| pending.lookup(key).unwrap_or_else(|| db.get(key).unwrap());
        let items: Vec<(String, String)> = scan(b"a/")
            .map(|item| {
                let (k, v) = item.unwrap();
                (String::from_utf8(k.to_vec()).unwrap(), String::from_utf8(v.to_vec()).unwrap())
            })
            .collect();
        let expected = [("a/1", "a/1"), ("a/3", "new"), ("a/4", "changed"), ("a/5", "new")];
        assert_eq!(items, expected.map(|(k, v)| (k.to_string(), v.to_string())));
        assert_eq!(get(b"a/2"), None);
        assert_eq!(text(get(b"a/4")).as_deref(), Some("changed"));
        assert_eq!(text(get(b"b/1")).as_deref(), Some("b/1"));
        assert_eq!(scan(b"b/").count(), 1);
        assert_eq!(scan(b"c/").count(), 0);
    }

    #[test]
    fn a_new_key_removed_before_the_checkpoint_leaves_nothing_and_others_reach_sled() {
        let db = sled::Config::new().temporary(true).open().unwrap();
        db.insert("old", "1").unwrap();
        let mut pending = Pending::default();
        let mut job = Changes::default();
        job.insert_new("q/1", "m1");
        job.insert_new("q/2", "m2");
        job.insert("state", "len=2");
        job.insert("old", "2");
        pending.apply(job);
        // The ack comes in a later round.
        let mut ack = Changes::default();
        ack.remove("q/1");
        ack.insert("state", "len=1");
        ack.remove("old");
        let mut round = Pending::default();
        round.apply(ack);
        pending.absorb(round, &mut Pending::default());
        assert_eq!(pending.len(), 3, "q/1 cancelled out; q/2, state and the removal of old are left");
        pending.drain_into(&db).unwrap();
        assert_eq!(pending.len(), 0);
        let all: Vec<(String, String)> = db
            .iter()
            .map(|kv| {
                let (k, v) = kv.unwrap();
                (String::from_utf8(k.to_vec()).unwrap(), String::from_utf8(v.to_vec()).unwrap())
            })
            .collect();
        assert_eq!(all, [("q/2".to_string(), "m2".to_string()), ("state".to_string(), "len=1".to_string())]);
    }

    fn keys_in(db: &sled::Tree) -> Vec<String> {
        db.iter().map(|kv| String::from_utf8(kv.unwrap().0.to_vec()).unwrap()).collect()
    }

    #[test]
    fn a_checkpoint_gives_sled_new_keys_last_and_their_removal_cancels_them() {
        let db = sled::Config::new().temporary(true).open().unwrap();
        db.insert("q/0", "old").unwrap();
        let mut frozen = Pending::default();
        let mut job = Changes::default();
        for i in 1..=5 {
            job.insert_new(format!("q/{i}"), "m");
        }
        job.insert("a", "1");
        job.remove("q/0");
        job.insert("z", "1");
        frozen.apply(job);
        // The old changes first, two at a time, the new keys' values left for later.
        let next = frozen.drain_some_old_into(&db, 2, b"").unwrap();
        assert_eq!(next.as_deref(), Some(&b"q/0"[..]));
        assert_eq!(keys_in(&db), ["a"], "q/0 removed");
        assert_eq!(frozen.drain_some_old_into(&db, 2, &next.unwrap()).unwrap(), None, "past the last");
        assert_eq!(keys_in(&db), ["a", "z"]);
        assert_eq!(frozen.len(), 5);
        // Acks of q/1 and q/3 arrive, and a removal of a key sled has: only that one is kept.
        let mut pending = Pending::default();
        let mut acks = Changes::default();
        acks.remove("q/1");
        acks.remove("q/3");
        acks.remove("a");
        let mut round = Pending::default();
        round.apply(acks);
        pending.absorb(round, &mut frozen);
        assert_eq!(frozen.len(), 3, "q/2, q/4 and q/5 are left");
        assert_eq!(pending.len(), 1, "the removal of a");
        assert!(frozen.lookup(b"q/1").is_none() && pending.lookup(b"q/1").is_none());
        frozen.drain_into(&db).unwrap();
        pending.drain_into(&db).unwrap();
        assert_eq!(keys_in(&db), ["q/2", "q/4", "q/5", "z"]);
    }
}
