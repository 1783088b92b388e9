//! The authoritative store the agent caches: the [`Upstream`] trait, the embedded
//! implementation [`MemoryUpstream`], and [`EtcdUpstream`] for a real etcd cluster.
//!
//! The agent reads the upstream only through its cache types (see [`crate::types`]), the
//! path a real server would take; writes go straight through.
//!
//! Index rules every implementation follows (the embedded store's; [`EtcdUpstream`] uses etcd
//! revisions and differs where its docs say: an absent key's index is the revision it was
//! seen absent at, and a prefix's index is the revision of the read):
//! - An index is never 0: an upstream that has seen no write answers 1.
//! - A key's index is the index of its last write (put or delete). A key that was never
//!   written answers the upstream's first index, 1. So a client that read "absent at N" can
//!   block with `min_index = N` until the key appears.
//! - A prefix's index is the largest index of any write under it (or 1).
//! - Blocking reads (`min_index > 0`) answer once the index is above `min_index`, or when
//!   `wait` has passed (with the unchanged data), whichever comes first.
//! - A blocking read whose `min_index` is above the store's current index (the caller saw a
//!   store that was since restored or replaced) answers at once with the lower index, so the
//!   caller resets (Consul's rule: an index that went backwards starts over).
//! - A recursive delete is one write: every key under the prefix gets the same index.

mod api;
mod contact;
mod etcd_grpc;
mod faults;
mod memory;

pub use api::{
    Entry, KeyRead, ListRead, MAX_WAIT, Query, RESERVED_PREFIX, ReadMode, Upstream, UpstreamError,
    UpstreamStats, flags_key,
};
pub(crate) use contact::accepting;
pub use contact::{
    ContactState, ContactTracker, LOST_AFTER, PROBE_INTERVAL, PROBE_TIMEOUT, accepted, rfc3339,
    with_accepted,
};
pub use etcd_grpc::{Credentials, EtcdSettings, EtcdTraffic, EtcdUpstream, TlsFiles};
pub use faults::{FaultSettings, Faults};
pub use memory::MemoryUpstream;
