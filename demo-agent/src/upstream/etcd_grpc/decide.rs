//! The blocking read's decisions, without I/O: given the range answer, the history compared
//! with, or the watch's outcome, what to do next. The I/O loop in the parent module runs them;
//! the unit tests here cover every rule without an etcd binary.
//!
//! The rules (see the parent module's docs for why):
//! - a key's index is its `mod_revision`; an absent key's or a prefix's is the revision it
//!   was read at;
//! - a present key changed after `min_index` when `mod_revision > min_index`; an absent key
//!   or a prefix when its identity (keys and `mod_revision`s) at `min_index` differs from now
//!   (compacted history counts as changed: answer the current data, the index moves on);
//! - a store behind the caller (`revision < min_index`) answers at once with its lower index,
//!   and a different cluster answers index 1: both are an index reset for the cache;
//! - unchanged data is watched from the range's revision + 1, and answers at the end of the
//!   wait with its old index (so an idle key's index does not creep up).

use super::client::{EtcdError, revision};
use super::pb::{EventType, KeyValue};
use super::watch::Outcome;

/// What a read is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    /// One key.
    Key,
    /// Every key under a prefix.
    Prefix,
}

/// What a read answers: the keys found (at most one for a key) and the index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Answer {
    pub(crate) kvs: Vec<KeyValue>,
    pub(crate) index: u64,
}

/// The index of `kvs` read now, at `revision` (never 0).
pub(crate) fn index_of(kind: Kind, kvs: &[KeyValue], revision: u64) -> u64 {
    let index = match (kind, kvs.first()) {
        (Kind::Key, Some(kv)) => self::revision(kv.mod_revision),
        _ => revision,
    };
    index.max(1)
}

/// What to do after a range (or after comparing with history). The data stays with the
/// caller: only indexes are decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Step {
    /// Answer the data just read, with `index`.
    Answer { index: u64 },
    /// Range the target as it was at `min_index` and decide with [`after_history`].
    CompareHistory,
    /// Unchanged: watch from revision `from`; at the end of the wait answer the data with
    /// `unchanged_index`.
    Watch { from: u64, unchanged_index: u64 },
}

/// The first decision of a blocking read, on its range answer (`kvs` at `revision`).
/// `reset`: the target's `min_index` belongs to another cluster.
pub(crate) fn after_range(
    kind: Kind,
    min_index: u64,
    kvs: &[KeyValue],
    revision: u64,
    reset: bool,
) -> Step {
    if reset {
        return Step::Answer { index: 1 };
    }
    let now = index_of(kind, kvs, revision);
    if revision < min_index {
        // Restored from an older snapshot: the lower index is a reset.
        return Step::Answer { index: now };
    }
    let present = match kind {
        Kind::Key => kvs.first().map(|kv| self::revision(kv.mod_revision)),
        Kind::Prefix => None,
    };
    match present {
        Some(modified) if modified > min_index => Step::Answer { index: now },
        Some(modified) => Step::Watch {
            from: revision + 1,
            unchanged_index: modified.max(1),
        },
        None if revision == min_index => Step::Watch {
            from: revision + 1,
            unchanged_index: min_index.max(1),
        },
        None => Step::CompareHistory,
    }
}

/// The decision for an absent key or a prefix after ranging it at `min_index` (`then`; `None`
/// when that history is compacted), `now` being read at `revision`.
pub(crate) fn after_history(
    kind: Kind,
    min_index: u64,
    then: Option<&[KeyValue]>,
    now: &[KeyValue],
    revision: u64,
) -> Step {
    let identity = |kvs: &[KeyValue]| -> Vec<(Vec<u8>, i64)> {
        kvs.iter()
            .map(|kv| (kv.key.clone(), kv.mod_revision))
            .collect()
    };
    match then {
        Some(then) if identity(then) == identity(now) => Step::Watch {
            from: revision + 1,
            unchanged_index: min_index.max(1),
        },
        _ => Step::Answer {
            index: index_of(kind, now, revision),
        },
    }
}

/// What to do after the watch ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Next {
    /// Answer now.
    Answer(Answer),
    /// Range again and answer what it finds (a prefix changed).
    RangeAgain,
    /// Start over from the range (the watch's start was compacted, or etcd cancelled it).
    Restart,
    /// Another cluster: range again and answer with index 1.
    Reset,
    /// No member could carry the watch.
    Fail(EtcdError),
}

/// The decision on a watch's outcome.
pub(crate) fn after_watch(kind: Kind, outcome: Outcome) -> Next {
    match outcome {
        Outcome::Events(events) => match kind {
            Kind::Prefix => Next::RangeAgain,
            // A put ranges again too: the flags live in a companion key.
            Kind::Key => match events.last().map(|event| (event.r#type, event.kv.as_ref())) {
                Some((kind, Some(kv))) if kind == EventType::Delete as i32 => {
                    Next::Answer(Answer {
                        kvs: Vec::new(),
                        index: revision(kv.mod_revision).max(1),
                    })
                }
                _ => Next::RangeAgain,
            },
        },
        Outcome::Canceled { .. } => Next::Restart,
        Outcome::ClusterChanged => Next::Reset,
        Outcome::Failed(error) => Next::Fail(error),
    }
}

#[cfg(test)]
mod tests {
    use super::super::pb::Event;
    use super::*;

    fn kv(key: &str, mod_revision: i64) -> KeyValue {
        KeyValue {
            key: key.as_bytes().to_vec(),
            value: b"v".to_vec(),
            mod_revision,
            create_revision: mod_revision,
            version: 1,
            lease: 0,
        }
    }

    #[test]
    fn a_present_key_compares_its_mod_revision() {
        // Changed after min_index: at once, with the key's index.
        assert_eq!(
            after_range(Kind::Key, 4, &[kv("k", 5)], 9, false),
            Step::Answer { index: 5 }
        );
        // Unchanged: watch after the range's revision; the wait answers the key's index.
        assert_eq!(
            after_range(Kind::Key, 5, &[kv("k", 5)], 9, false),
            Step::Watch {
                from: 10,
                unchanged_index: 5
            }
        );
    }

    #[test]
    fn an_absent_key_or_a_prefix_asks_history() {
        assert_eq!(
            after_range(Kind::Key, 4, &[], 9, false),
            Step::CompareHistory
        );
        assert_eq!(
            after_range(Kind::Prefix, 4, &[kv("p/a", 2)], 9, false),
            Step::CompareHistory
        );
        // Read at exactly min_index: nothing can have changed.
        assert_eq!(
            after_range(Kind::Prefix, 9, &[], 9, false),
            Step::Watch {
                from: 10,
                unchanged_index: 9
            }
        );
        // Same keys at the same revisions: unchanged, answering min_index at the wait.
        assert_eq!(
            after_history(Kind::Prefix, 4, Some(&[kv("p/a", 2)]), &[kv("p/a", 2)], 9),
            Step::Watch {
                from: 10,
                unchanged_index: 4
            }
        );
        // A key rewritten, added or removed: changed, at the read's revision.
        for then in [
            &[kv("p/a", 1)][..],
            &[][..],
            &[kv("p/a", 2), kv("p/b", 3)][..],
        ] {
            assert_eq!(
                after_history(Kind::Prefix, 4, Some(then), &[kv("p/a", 2)], 9),
                Step::Answer { index: 9 }
            );
        }
        // An absent key that appeared and went again: same identity, unchanged.
        assert!(matches!(
            after_history(Kind::Key, 4, Some(&[]), &[], 9),
            Step::Watch { .. }
        ));
        // Compacted history: the current data, the index moves on.
        assert_eq!(
            after_history(Kind::Key, 4, None, &[], 9),
            Step::Answer { index: 9 }
        );
    }

    #[test]
    fn a_store_behind_or_another_cluster_is_a_reset() {
        // Revision below min_index: the lower index answers at once.
        assert_eq!(
            after_range(Kind::Key, 50, &[kv("k", 3)], 7, false),
            Step::Answer { index: 3 }
        );
        assert_eq!(
            after_range(Kind::Prefix, 50, &[kv("p/a", 3)], 7, false),
            Step::Answer { index: 7 }
        );
        // Another cluster, whatever its revision: index 1.
        assert_eq!(
            after_range(Kind::Key, 50, &[kv("k", 3)], 900, true),
            Step::Answer { index: 1 }
        );
        // Never 0.
        assert_eq!(index_of(Kind::Key, &[], 0), 1);
    }

    #[test]
    fn watch_outcomes() {
        let event = |kind: EventType, kv| Event {
            r#type: kind as i32,
            kv: Some(kv),
        };
        let put = event(EventType::Put, kv("k", 10));
        let delete = event(EventType::Delete, kv("k", 11));
        // A key deleted answers from the event; a put ranges again (for the flags).
        assert_eq!(
            after_watch(
                Kind::Key,
                Outcome::Events(vec![put.clone(), delete.clone()])
            ),
            Next::Answer(Answer {
                kvs: vec![],
                index: 11
            })
        );
        assert_eq!(
            after_watch(Kind::Key, Outcome::Events(vec![delete, put.clone()])),
            Next::RangeAgain
        );
        assert_eq!(
            after_watch(Kind::Prefix, Outcome::Events(vec![put])),
            Next::RangeAgain
        );
        let compacted = Outcome::Canceled {
            compact_revision: 8,
            reason: String::new(),
        };
        assert_eq!(after_watch(Kind::Key, compacted), Next::Restart);
        assert_eq!(
            after_watch(Kind::Prefix, Outcome::ClusterChanged),
            Next::Reset
        );
        let failed = EtcdError::Timeout {
            endpoint: "http://m".to_owned(),
            timeout: std::time::Duration::from_secs(1),
        };
        assert_eq!(
            after_watch(Kind::Key, Outcome::Failed(failed.clone())),
            Next::Fail(failed)
        );
    }
}
