//! A Consul-style caching agent over HTTP, built on `cache-core` and `cache-tokio`, in front
//! of an embedded upstream key-value store that answers blocking queries.
//!
//! - [`Agent::start`] binds, builds and serves an agent in the current tokio runtime and
//!   returns a [`RunningAgent`] (its address and a shutdown handle); the `demo-agent` binary
//!   is a thin `main` around it.
//! - [`app`] (also [`http::app`]) is the router with every route and layer, for embedding.
//! - [`upstream`]: the [`upstream::Upstream`] trait and the embedded
//!   [`upstream::MemoryUpstream`] (blocking reads, fault injection).
//! - [`types`]: the cache types the agent registers (two blocking, one polling).
//!
//! # Examples
//!
//! ```no_run
//! use demo_agent::{Agent, Config};
//!
//! # #[tokio::main]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let agent = Agent::start(Config::for_tests()).await?;
//! println!("listening on {}", agent.addr());
//! agent.shutdown().await?;
//! # Ok(())
//! # }
//! ```

pub mod agent;
pub mod config;
pub mod duration;
pub mod http;
pub mod metrics;
pub mod types;
pub mod upstream;

pub use agent::{Agent, AgentState, RunningAgent, ShutdownHandle, StartError};
pub use config::{Config, KvCacheMode, LogFormat, UpstreamKind};
pub use http::app;
