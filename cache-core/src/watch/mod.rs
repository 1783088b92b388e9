//! Notify and watch: change notifications for many consumers (Consul's `Notify`; the rules are
//! in docs/contract.md#watch).
//!
//! A watch is not a task. It is a small record on its entry — a correlation id, a sink and the
//! index it last delivered — and the entry's one fetch chain (the same single-flight fetches
//! that gets join) offers every completed fetch to each record. So N watches of one entry
//! cause one upstream fetch stream, and an idle watch costs a few dozen bytes.
//!
//! A consumer that does not keep up only slows its own watch: when its sink is full the record
//! is marked pending and a short-lived task waits for room, then sends what the sink could not
//! take and, if the entry moved on meanwhile, the latest value. Nothing queues without bound.
//!
//! # Examples
//!
//! Two watches of different types on one channel, told apart by correlation id, with no
//! downcasting: [`map_sink`] wraps each type's events into the consumer's own enum.
//!
//! ```
//! use std::time::{Duration, Instant};
//! use cache_core::{Cache, RegisterOptions};
//! use cache_core::sim::SimRuntime;
//! use cache_core::testing::{MockError, MockRequest, MockServer};
//! use cache_core::watch::{UpdateEvent, map_sink};
//!
//! enum Update {
//!     Name(UpdateEvent<&'static str, String, MockError>),
//!     Count(UpdateEvent<&'static str, u64, MockError>),
//! }
//!
//! let sim = SimRuntime::new(1);
//! let cache = Cache::new(sim.handle());
//! let names = MockServer::new(sim.handle(), "ada".to_string(), 1);
//! let counts = MockServer::new(sim.handle(), 10u64, 1);
//! let name_type = cache.register(names.blocking_type(RegisterOptions::new()));
//! let count_type = cache.register(counts.blocking_type(RegisterOptions::new()));
//!
//! let (tx, rx) = async_channel::bounded(16);
//! let _a = name_type.notify(MockRequest::new("name"), "name", map_sink(tx.clone(), Update::Name)).unwrap();
//! let _b = count_type.notify(MockRequest::new("count"), "count", map_sink(tx, Update::Count)).unwrap();
//!
//! sim.block_on(async {
//!     let mut next = async || match rx.recv().await.unwrap() {
//!         Update::Name(e) => format!("{}={}", e.correlation_id, e.result.unwrap()),
//!         Update::Count(e) => format!("{}={}", e.correlation_id, e.result.unwrap()),
//!     };
//!     let mut first = vec![next().await, next().await];
//!     first.sort();
//!     assert_eq!(first, ["count=10", "name=ada"]);
//!     counts.set(11, 2);
//!     assert_eq!(next().await, "count=11");
//! });
//! ```

mod entry;
mod handle;
mod record;
mod sink;
mod stream;
mod sweep;

pub use crate::error::WatchError;
pub use handle::WatchHandle;
pub(crate) use record::start;
pub(crate) use sink::{CancelSignal, UntilSink};
pub use sink::{EventSink, MapSink, SinkClosed, TrySendError, UpdateEvent, map_sink};
pub use stream::WatchStream;
pub(crate) use stream::start_stream;
