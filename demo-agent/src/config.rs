//! The agent's configuration: command-line flags (each also readable from a `DEMO_AGENT_*`
//! environment variable), parsed with clap.

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, ValueEnum};

use crate::duration::parse_duration;
use crate::upstream::MAX_WAIT;

/// A Consul-style caching agent over HTTP, in front of an embedded upstream store or an etcd
/// cluster.
///
/// Reads with `?cached` are served by the agent's cache (blocking queries, single-flight,
/// background refresh); everything else goes straight to the upstream.
#[derive(Debug, Clone, Parser)]
#[command(name = "demo-agent", version, about, long_about = None)]
#[non_exhaustive]
pub struct Config {
    /// Address to listen on (port 0 picks a free port; the chosen address is printed as
    /// `listening on ADDR`).
    #[arg(long, env = "DEMO_AGENT_LISTEN", default_value = "127.0.0.1:8500")]
    pub listen: SocketAddr,

    /// Which upstream store the agent caches.
    #[arg(long, env = "DEMO_AGENT_UPSTREAM", value_enum, default_value_t = UpstreamKind::Embedded)]
    pub upstream: UpstreamKind,

    /// Client URLs of the etcd cluster's members, comma-separated (with `--upstream etcd`).
    /// The agent uses the first until it fails, then fails over to the next.
    #[arg(
        long,
        env = "DEMO_AGENT_ETCD_ENDPOINTS",
        value_delimiter = ',',
        default_value = "http://127.0.0.1:2379"
    )]
    pub etcd_endpoints: Vec<String>,

    /// Timeout of one etcd call on one member before the next member is tried; also how long
    /// the watch stream may stay silent (a frozen member) before it moves to the next member.
    #[arg(long, env = "DEMO_AGENT_ETCD_TIMEOUT", value_parser = parse_etcd_timeout, default_value = "5s")]
    pub etcd_timeout: Duration,

    /// PEM file of the CA that signed the etcd members' certificates: TLS on (rustls), and the
    /// endpoints are `https://`.
    #[arg(long, env = "DEMO_AGENT_ETCD_CACERT")]
    pub etcd_cacert: Option<PathBuf>,

    /// PEM client certificate for etcd (mutual TLS, with `--etcd-key` and `--etcd-cacert`).
    #[arg(long, env = "DEMO_AGENT_ETCD_CERT", requires_all = ["etcd_key", "etcd_cacert"])]
    pub etcd_cert: Option<PathBuf>,

    /// PEM private key of `--etcd-cert`.
    #[arg(long, env = "DEMO_AGENT_ETCD_KEY", requires = "etcd_cert")]
    pub etcd_key: Option<PathBuf>,

    /// etcd user (authentication on). Its password is read from `--etcd-password-file`, else
    /// from the `DEMO_AGENT_ETCD_PASSWORD` environment variable; never from the command line.
    #[arg(long, env = "DEMO_AGENT_ETCD_USER")]
    pub etcd_user: Option<String>,

    /// File holding the etcd user's password (one line; a trailing newline is ignored).
    #[arg(long, env = "DEMO_AGENT_ETCD_PASSWORD_FILE", requires = "etcd_user")]
    pub etcd_password_file: Option<PathBuf>,

    /// Simulated latency added to every upstream operation (Go-style duration: 5ms, 1s).
    #[arg(long, env = "DEMO_AGENT_UPSTREAM_LATENCY", value_parser = parse_duration, default_value = "0s")]
    pub upstream_latency: Duration,

    /// Probability in [0, 1] that an upstream operation fails (fault injection).
    #[arg(long, env = "DEMO_AGENT_UPSTREAM_FAIL_RATE", value_parser = parse_rate, default_value_t = 0.0)]
    pub upstream_fail_rate: f64,

    /// How KV reads with `?cached` are kept fresh: `refresh` keeps a background blocking query
    /// per cached key (Consul's background-refresh caching; Cache-Control max-age and
    /// must-revalidate are ignored), `simple` stores what was fetched until a request's
    /// Cache-Control asks for a fresher value (Consul's simple caching).
    #[arg(long, env = "DEMO_AGENT_KV_CACHE", value_enum, default_value_t = KvCacheMode::Refresh)]
    pub kv_cache: KvCacheMode,

    /// Upstream blocking timeout of each cached fetch (at most 10m).
    #[arg(long, env = "DEMO_AGENT_QUERY_TIMEOUT", value_parser = parse_query_timeout, default_value = "10m")]
    pub query_timeout: Duration,

    /// Pause between background refreshes of the (polling) upstream stats type.
    #[arg(long, env = "DEMO_AGENT_STATS_REFRESH", value_parser = parse_duration, default_value = "2s")]
    pub stats_refresh: Duration,

    /// Bound on the number of cache entries (least recently read evicted first).
    #[arg(long, env = "DEMO_AGENT_MAX_ENTRIES")]
    pub max_entries: Option<usize>,

    /// Per-entry fetch rate limit in fetches per second (default: unlimited).
    #[arg(long, env = "DEMO_AGENT_RATE_LIMIT")]
    pub rate_limit: Option<f64>,

    /// Burst size of the per-entry fetch rate limit.
    #[arg(long, env = "DEMO_AGENT_RATE_BURST", default_value_t = 2)]
    pub rate_burst: u32,

    /// Do not print the quick start after `listening on ADDR`.
    #[arg(long, env = "DEMO_AGENT_QUIET")]
    pub quiet: bool,

    /// `/v1/agent/ready` answers 503 once the upstream has failed (no answer) for longer
    /// than this; 200 again as soon as it answers.
    #[arg(long, env = "DEMO_AGENT_READY_GRACE", value_parser = parse_duration, default_value = "5s")]
    pub ready_grace: Duration,

    /// Log line format on stderr: `text` (colour only on a terminal) or `json` (one object
    /// per line). `RUST_LOG` sets the level (default `info`).
    #[arg(long, env = "DEMO_AGENT_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    /// Adds `GET /v1/agent/debug/panic`, a handler that panics (to show panic containment).
    #[arg(long, hide = true)]
    pub debug_routes: bool,
}

/// Why the agent did not start (see `Agent::start`).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StartError {
    /// The listen address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// A flag combination is invalid.
    #[error("invalid configuration: {0}")]
    Config(String),
}

/// The kind of upstream store.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
#[non_exhaustive]
pub enum UpstreamKind {
    /// An in-process store with blocking queries and fault injection.
    Embedded,
    /// An etcd cluster (v3 gRPC API) at `--etcd-endpoints`; blocking reads are etcd
    /// watches (all on one stream), the index is etcd's revision.
    Etcd,
}

/// The format of log lines.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines; ANSI colours only when stderr is a terminal.
    Text,
    /// One JSON object per line.
    Json,
}

impl fmt::Display for UpstreamKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Embedded => "embedded",
            Self::Etcd => "etcd",
        })
    }
}

impl fmt::Display for KvCacheMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Refresh => "refresh",
            Self::Simple => "simple",
        })
    }
}

impl fmt::Display for LogFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Text => "text",
            Self::Json => "json",
        })
    }
}

/// How cached KV reads are kept fresh.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum KvCacheMode {
    /// A background blocking query per cached key keeps it current.
    Refresh,
    /// Values are stored as fetched; `Cache-Control` decides when to fetch again.
    Simple,
}

impl Default for Config {
    /// The defaults of every flag.
    fn default() -> Self {
        Self::parse_from(["demo-agent"])
    }
}

impl Config {
    /// The defaults, listening on `127.0.0.1:0` (a free port): what tests start.
    pub fn for_tests() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            quiet: true,
            ..Self::default()
        }
    }
}

/// Parses a fail rate (`0.2`), which must lie in `[0, 1]`.
///
/// # Errors
///
/// A message naming the problem.
pub fn parse_rate(s: &str) -> Result<f64, String> {
    let rate: f64 = s.parse().map_err(|_| format!("{s:?} is not a number"))?;
    if !(0.0..=1.0).contains(&rate) {
        return Err(format!("{rate} is not in [0, 1]"));
    }
    Ok(rate)
}

fn parse_etcd_timeout(s: &str) -> Result<Duration, String> {
    let timeout = parse_duration(s).map_err(|e| e.to_string())?;
    if timeout.is_zero() || timeout > Duration::from_secs(60) {
        return Err("must be above 0 and at most 1m".to_owned());
    }
    Ok(timeout)
}

fn parse_query_timeout(s: &str) -> Result<Duration, String> {
    let timeout = parse_duration(s).map_err(|e| e.to_string())?;
    if timeout.is_zero() || timeout > MAX_WAIT {
        return Err("must be above 0 and at most 10m".to_owned());
    }
    Ok(timeout)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults() {
        let c = Config::default();
        assert_eq!(c.listen, "127.0.0.1:8500".parse().unwrap());
        assert_eq!(c.kv_cache, KvCacheMode::Refresh);
        assert_eq!(c.query_timeout, Duration::from_secs(600));
        assert_eq!(c.upstream_latency, Duration::ZERO);
        assert_eq!(c.ready_grace, Duration::from_secs(5));
        assert_eq!(c.log_format, LogFormat::Text);
        let c =
            Config::try_parse_from(["demo-agent", "--ready-grace", "1s", "--log-format", "json"])
                .unwrap();
        assert_eq!(c.ready_grace, Duration::from_secs(1));
        assert_eq!(c.log_format, LogFormat::Json);
        assert_eq!(
            [
                UpstreamKind::Etcd.to_string(),
                KvCacheMode::Simple.to_string()
            ],
            ["etcd", "simple"]
        );
    }

    #[test]
    fn parses_flags() {
        let c = Config::try_parse_from([
            "demo-agent",
            "--listen",
            "127.0.0.1:0",
            "--upstream-latency",
            "5ms",
            "--upstream-fail-rate",
            "0.2",
            "--kv-cache",
            "simple",
        ])
        .unwrap();
        assert_eq!(c.upstream_latency, Duration::from_millis(5));
        assert_eq!(c.upstream_fail_rate, 0.2);
        assert_eq!(c.kv_cache, KvCacheMode::Simple);
        assert!(Config::try_parse_from(["demo-agent", "--upstream-fail-rate", "2"]).is_err());
        assert!(Config::try_parse_from(["demo-agent", "--query-timeout", "11m"]).is_err());
        assert!(Config::try_parse_from(["demo-agent", "--upstream-latency", "5"]).is_err());
    }

    #[test]
    fn parses_etcd_flags() {
        let c = Config::default();
        assert_eq!(c.upstream, UpstreamKind::Embedded);
        assert_eq!(c.etcd_endpoints, ["http://127.0.0.1:2379"]);
        assert_eq!(c.etcd_timeout, Duration::from_secs(5));
        let c = Config::try_parse_from([
            "demo-agent",
            "--upstream",
            "etcd",
            "--etcd-endpoints",
            "http://127.0.0.1:2379,http://127.0.0.1:22379",
            "--etcd-endpoints",
            "http://127.0.0.1:32379",
            "--etcd-timeout",
            "2s",
        ])
        .unwrap();
        assert_eq!(c.upstream, UpstreamKind::Etcd);
        assert_eq!(
            c.etcd_endpoints,
            [
                "http://127.0.0.1:2379",
                "http://127.0.0.1:22379",
                "http://127.0.0.1:32379"
            ]
        );
        assert_eq!(c.etcd_timeout, Duration::from_secs(2));
        assert!(Config::try_parse_from(["demo-agent", "--etcd-timeout", "0s"]).is_err());
        assert!(Config::try_parse_from(["demo-agent", "--upstream", "consul"]).is_err());
    }
}
