//! Test support shared by the adapter crates (feature `test-util`): a scriptable cache type, a
//! blocking mock upstream, the runtime conformance suite, and a watchdog for tests that could
//! hang.
//!
//! Not a stable API: it may change in any release.

pub mod conformance;
mod mock;
mod server;
mod watchdog;

pub use mock::{MockError, MockRequest, MockType};
pub use server::MockServer;
pub use watchdog::Watchdog;
