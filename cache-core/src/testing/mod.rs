//! Test support shared by the adapter crates (feature `test-util`): a scriptable cache type, a
//! blocking mock upstream, and the runtime conformance suite.
//!
//! Not a stable API: it may change in any release.

pub mod conformance;
mod mock;
mod server;

pub use mock::{MockError, MockRequest, MockType};
pub use server::MockServer;
