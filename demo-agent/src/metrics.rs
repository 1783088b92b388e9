//! Prometheus metrics: the cache's counters per type, the upstream's counters, and the open
//! watch streams, collected at scrape time into an explicit registry (no global state, so
//! several agents can run in one process).

use std::sync::atomic::Ordering;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;

use crate::http::state::AgentState;
use crate::types::short_type_name;

/// Renders every metric in the Prometheus (OpenMetrics) text format.
pub fn render(state: &AgentState) -> String {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(AgentCollector {
        state: state.clone(),
    }));
    let mut text = String::new();
    // Writing into a `String` cannot fail.
    let _ = prometheus_client::encoding::text::encode(&mut text, &registry);
    text
}

struct AgentCollector {
    state: AgentState,
}

impl std::fmt::Debug for AgentCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentCollector").finish_non_exhaustive()
    }
}

type Labels<'a> = Vec<(&'static str, &'a str)>;

fn counter(
    encoder: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    rows: &[(Labels<'_>, u64)],
) -> Result<(), std::fmt::Error> {
    let mut metric =
        encoder.encode_descriptor(name, help, None, ConstCounter::new(0u64).metric_type())?;
    for (labels, value) in rows {
        ConstCounter::new(*value).encode(metric.encode_family(labels)?)?;
    }
    Ok(())
}

fn gauge(
    encoder: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    rows: &[(Labels<'_>, i64)],
) -> Result<(), std::fmt::Error> {
    let mut metric =
        encoder.encode_descriptor(name, help, None, ConstGauge::new(0i64).metric_type())?;
    for (labels, value) in rows {
        ConstGauge::new(*value).encode(metric.encode_family(labels)?)?;
    }
    Ok(())
}

fn float_gauge(
    encoder: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    value: Option<f64>,
) -> Result<(), std::fmt::Error> {
    let mut metric =
        encoder.encode_descriptor(name, help, None, ConstGauge::new(0f64).metric_type())?;
    if let Some(value) = value {
        let labels: Labels<'_> = Vec::new();
        ConstGauge::new(value).encode(metric.encode_family(&labels)?)?;
    }
    Ok(())
}

fn signed(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

impl Collector for AgentCollector {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let metrics = self.state.cache().metrics();
        let types: Vec<_> = metrics
            .types
            .iter()
            .map(|t| (short_type_name(&t.name), t))
            .collect();
        let per_type = |f: fn(&cache_core::TypeMetrics) -> u64| -> Vec<(Labels<'_>, u64)> {
            types
                .iter()
                .map(|(name, t)| (vec![("type", *name)], f(t)))
                .collect()
        };
        let e = &mut encoder;
        counter(
            e,
            "demo_agent_cache_hits",
            "Gets answered from a valid entry on the first look.",
            &per_type(|t| t.hits),
        )?;
        let mut misses = Vec::new();
        for (name, t) in &types {
            misses.push((vec![("type", *name), ("kind", "new")], t.misses_new));
            misses.push((
                vec![("type", *name), ("kind", "blocking")],
                t.misses_blocking,
            ));
        }
        counter(
            e,
            "demo_agent_cache_misses",
            "Gets that waited for a fetch: kind=new (no value yet) or blocking (newer index or revalidation).",
            &misses,
        )?;
        counter(
            e,
            "demo_agent_cache_bypasses",
            "Uncached reads passed straight to the type's fetch.",
            &per_type(|t| t.bypasses),
        )?;
        let mut fetches = Vec::new();
        for (name, t) in &types {
            fetches.push((
                vec![("type", *name), ("not_modified", "false")],
                t.fetch_success - t.fetch_not_modified.min(t.fetch_success),
            ));
            fetches.push((
                vec![("type", *name), ("not_modified", "true")],
                t.fetch_not_modified,
            ));
        }
        counter(
            e,
            "demo_agent_cache_fetches",
            "Completed upstream fetches without error.",
            &fetches,
        )?;
        let mut errors = Vec::new();
        for (name, t) in &types {
            errors.push((
                vec![("type", *name), ("fatal", "false")],
                t.fetch_errors - t.fetch_errors_fatal.min(t.fetch_errors),
            ));
            errors.push((
                vec![("type", *name), ("fatal", "true")],
                t.fetch_errors_fatal,
            ));
        }
        counter(
            e,
            "demo_agent_cache_fetch_errors",
            "Failed upstream fetches.",
            &errors,
        )?;
        counter(
            e,
            "demo_agent_cache_expirations",
            "Entries removed because their TTL ran out.",
            &per_type(|t| t.expirations),
        )?;
        counter(
            e,
            "demo_agent_cache_evictions",
            "Entries removed to respect --max-entries.",
            &per_type(|t| t.evictions_capacity),
        )?;
        let entries: Vec<_> = per_type(|t| t.entries)
            .into_iter()
            .map(|(l, v)| (l, signed(v)))
            .collect();
        gauge(e, "demo_agent_cache_entries", "Entries held.", &entries)?;
        let watches: Vec<_> = per_type(|t| t.watches)
            .into_iter()
            .map(|(l, v)| (l, signed(v)))
            .collect();
        gauge(e, "demo_agent_cache_watches", "Watches running.", &watches)?;
        let failing: Vec<_> = per_type(|t| t.failing)
            .into_iter()
            .map(|(l, v)| (l, signed(v)))
            .collect();
        gauge(
            e,
            "demo_agent_cache_failing",
            "Entries whose last fetch failed (backing off until the next attempt).",
            &failing,
        )?;

        let contact = self.state.contact();
        gauge(
            e,
            "demo_agent_upstream_reachable",
            "1 while the upstream answers; 0 once it has failed for 1s without an answer.",
            &[(vec![], i64::from(contact.reachable))],
        )?;
        float_gauge(
            e,
            "demo_agent_upstream_last_contact_seconds",
            "Seconds since the upstream last answered (absent before the first answer).",
            contact.since_last_contact.map(|d| d.as_secs_f64()),
        )?;
        float_gauge(
            e,
            "demo_agent_upstream_down_seconds",
            "Seconds the upstream has been failing without an answer (0 while it answers).",
            Some(contact.down_for.map_or(0.0, |d| d.as_secs_f64())),
        )?;
        counter(
            e,
            "demo_agent_upstream_outages",
            "Outages: the upstream failed for 1s or longer without an answer.",
            &[(vec![], contact.outages)],
        )?;

        let streams = self.state.inner.sse_streams.load(Ordering::Relaxed);
        gauge(
            e,
            "demo_agent_watch_streams",
            "Open /v1/watch event streams.",
            &[(vec![], signed(streams))],
        )?;

        if let Some(s) = self.state.upstream_counters() {
            counter(
                e,
                "demo_agent_upstream_reads",
                "Reads served by the upstream, by operation and whether they blocked on an index.",
                &[
                    (vec![("op", "get"), ("blocking", "false")], s.key_reads),
                    (
                        vec![("op", "get"), ("blocking", "true")],
                        s.key_reads_blocking,
                    ),
                    (vec![("op", "list"), ("blocking", "false")], s.list_reads),
                    (
                        vec![("op", "list"), ("blocking", "true")],
                        s.list_reads_blocking,
                    ),
                    (vec![("op", "stats"), ("blocking", "false")], s.stats_reads),
                ],
            )?;
            counter(
                e,
                "demo_agent_upstream_writes",
                "Writes applied by the upstream.",
                &[(vec![], s.writes)],
            )?;
            counter(
                e,
                "demo_agent_upstream_injected_failures",
                "Upstream operations failed by fault injection.",
                &[(vec![], s.injected_failures)],
            )?;
            gauge(
                e,
                "demo_agent_upstream_blocking_queries",
                "Blocking reads open at the upstream.",
                &[(vec![], signed(s.blocking_open))],
            )?;
            gauge(
                e,
                "demo_agent_upstream_index",
                "The upstream's current index.",
                &[(vec![], signed(s.index))],
            )?;
            gauge(
                e,
                "demo_agent_upstream_keys",
                "Keys stored upstream.",
                &[(vec![], signed(s.keys))],
            )?;
        }
        Ok(())
    }
}
