//! The writer's current round: changes its jobs made that sled has not been given yet.
//!
//! Every `Tree::apply_batch` of sled 0.34 seals its in-memory log buffer and hands two writes to
//! its I/O thread pool, waking every idle thread of it: a dozen thread wakeups and two
//! `sync_file_range` calls for each batch, whatever its size. So jobs do not write to sled. They
//! add their changes to the round and read through it (a job sees every earlier job's changes).
//! The writer logs the whole round as one record of the write-ahead log, which makes it atomic,
//! and only then gives it to sled, key by key.

use std::collections::BTreeMap;
use std::iter::Peekable;

use sled::{IVec, Tree};

use super::StoreError;

fn io(e: sled::Error) -> StoreError {
    StoreError::Io(e.to_string())
}

/// A job's atomic set of changes, applied with `Round::apply`.
#[derive(Default)]
pub struct Changes(Vec<(Vec<u8>, Option<Vec<u8>>)>);

impl Changes {
    /// Sets `key` to `value`.
    pub fn insert(&mut self, key: impl AsRef<[u8]>, value: impl AsRef<[u8]>) {
        self.0.push((key.as_ref().to_vec(), Some(value.as_ref().to_vec())));
    }

    /// Removes `key`.
    pub fn remove(&mut self, key: impl AsRef<[u8]>) {
        self.0.push((key.as_ref().to_vec(), None));
    }
}

/// The last change of each key in this round: a value, or `None` for a removal.
#[derive(Default)]
pub struct Round(BTreeMap<Vec<u8>, Option<Vec<u8>>>);

impl Round {
    /// Adds a job's changes.
    pub fn apply(&mut self, changes: Changes) {
        self.0.extend(changes.0);
    }

    /// True when the round changes nothing.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Takes the round's changes, in key order, leaving it empty.
    pub fn take(&mut self) -> BTreeMap<Vec<u8>, Option<Vec<u8>>> {
        std::mem::take(&mut self.0)
    }
}

/// Items of a prefix scan.
pub type Scan<'a> = Box<dyn Iterator<Item = Result<(IVec, IVec), StoreError>> + 'a>;

/// Reads the store's state: sled's tree, or the tree with the writer's round over it.
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

impl Round {
    /// The value of `key` in `tree` once this round is applied.
    pub fn get_over(&self, tree: &Tree, key: &[u8]) -> Result<Option<IVec>, StoreError> {
        match self.0.get(key) {
            Some(change) => Ok(change.as_deref().map(IVec::from)),
            None => View::get(tree, key),
        }
    }

    /// A prefix scan of `tree` once this round is applied.
    pub fn scan_over<'a>(&'a self, tree: &'a Tree, prefix: &[u8]) -> Scan<'a> {
        let changes = self.0.range::<[u8], _>((std::ops::Bound::Included(prefix), std::ops::Bound::Unbounded));
        let prefix = prefix.to_vec();
        Box::new(Merge {
            tree: View::scan(tree, &prefix).peekable(),
            changes: changes.take_while(move |(k, _)| k.starts_with(&prefix)).peekable(),
        })
    }
}

/// Merges two key-ordered streams; on equal keys the round's change wins, and removals hide
/// the tree's item.
struct Merge<'a, C: Iterator<Item = (&'a Vec<u8>, &'a Option<Vec<u8>>)>> {
    tree: Peekable<Scan<'a>>,
    changes: Peekable<C>,
}

impl<'a, C: Iterator<Item = (&'a Vec<u8>, &'a Option<Vec<u8>>)>> Iterator for Merge<'a, C> {
    type Item = Result<(IVec, IVec), StoreError>;

    fn next(&mut self) -> Option<Self::Item> {
        use std::cmp::Ordering;
        loop {
            let order = match (self.tree.peek(), self.changes.peek()) {
                (None, None) => return None,
                (Some(Err(_)), _) | (Some(_), None) => Ordering::Less,
                (None, Some(_)) => Ordering::Greater,
                (Some(Ok((tree_key, _))), Some((change_key, _))) => tree_key.as_ref().cmp(change_key.as_slice()),
            };
            match order {
                Ordering::Less => return self.tree.next(),
                // The change overrides the tree's item.
                Ordering::Equal => drop(self.tree.next()),
                Ordering::Greater => {}
            }
            let (key, change) = self.changes.next().expect("peeked");
            if let Some(value) = change {
                return Some(Ok((IVec::from(key.as_slice()), IVec::from(value.as_slice()))));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_see_the_round_over_the_tree() {
        let db = sled::Config::new().temporary(true).open().unwrap();
        for k in ["a/1", "a/2", "a/4", "b/1"] {
            db.insert(k, k).unwrap();
        }
        let mut round = Round::default();
        let mut job = Changes::default();
        job.insert("a/3", "new");
        job.remove("a/2");
        job.insert("a/4", "changed");
        job.insert("a/5", "new");
        job.insert("a/6", "gone again");
        job.remove("a/6");
        job.remove("a/7"); // not there at all
        round.apply(job);
        let items: Vec<(String, String)> = round
            .scan_over(&db, b"a/")
            .map(|item| {
                let (k, v) = item.unwrap();
                (String::from_utf8(k.to_vec()).unwrap(), String::from_utf8(v.to_vec()).unwrap())
            })
            .collect();
        let expected = [("a/1", "a/1"), ("a/3", "new"), ("a/4", "changed"), ("a/5", "new")];
        assert_eq!(items, expected.map(|(k, v)| (k.to_string(), v.to_string())));
        assert_eq!(round.get_over(&db, b"a/2").unwrap(), None);
        assert_eq!(round.get_over(&db, b"a/4").unwrap().as_deref(), Some(&b"changed"[..]));
        assert_eq!(round.get_over(&db, b"b/1").unwrap().as_deref(), Some(&b"b/1"[..]));
        assert_eq!(round.scan_over(&db, b"b/").count(), 1);
        assert_eq!(round.scan_over(&db, b"c/").count(), 0);
    }
}
