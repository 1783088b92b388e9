//! `GET /v1/agent/cache`: what the cache holds and how it is doing, as one JSON document the
//! web view (`/ui/`) polls and scripts can read too.
//!
//! One answer carries the upstream (kind, endpoints, reachable, last contact, outage), a row
//! per cache type (entries, counters, rates per second, hit ratio, entries in backoff, watches),
//! the open watch streams, a history of one sample per second for the last five minutes (kept
//! by a sampler task, so a page opened now still draws the past), and **one page** of one
//! type's entries. The work per request is bounded: at most [`MAX_PAGE`] entries are returned,
//! and the engine finds them in one pass over the type's table with a heap of `offset + limit`.
//!
//! Query parameters (all optional):
//!
//! | parameter | default | what |
//! |---|---|---|
//! | `type` | `kv` | whose entries to list: `kv`, `kv_list`, `upstream_stats` |
//! | `prefix` | empty | only keys starting with it |
//! | `sort` | `key` | `key`, `index`, `age`, `ttl` |
//! | `order` | `asc` | `asc` or `desc` |
//! | `offset` | 0 | entries to skip |
//! | `limit` | 100 | page size, capped at [`MAX_PAGE`] |

use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::extract::{RawQuery, State};
use cache_core::{EntryInfo, EntryPage, EntryQuery, EntrySort, Metrics};
use serde::Serialize;
use serde_json::{Value, json};
use tokio::sync::Semaphore;
use tokio::time::Instant;

use super::error::ApiError;
use super::history::{Counts, SAMPLE_EVERY, Sample};
use super::params::{self, Params};
use super::response::JsonLine;
use super::state::AgentState;
use crate::duration::GoDuration;
use crate::types::short_type_name;

/// The largest page of entries one request may ask for.
pub const MAX_PAGE: usize = 500;
/// The page size when `limit` is absent.
pub const DEFAULT_PAGE: usize = 100;
/// Listings that may scan a table at once (across the process); more wait their turn, so
/// many open pages over a large cache cannot take every core.
const CONCURRENT_LISTINGS: usize = 2;
static LISTINGS: Semaphore = Semaphore::const_new(CONCURRENT_LISTINGS);
/// Rates per second are measured over (about) this window.
const RATE_WINDOW: Duration = Duration::from_secs(5);
/// The recent hit ratio is measured over (about) this window.
const RATIO_WINDOW: Duration = Duration::from_secs(60);

/// The sample to measure a window ending now from: the newest one at least `window` old, or
/// the oldest there is.
fn base_sample(samples: &[Sample], now: Instant, window: Duration) -> Option<&Sample> {
    samples
        .iter()
        .rev()
        .find(|s| now.saturating_duration_since(s.at) >= window)
        .or_else(|| samples.first())
}

fn per_second(delta: u64, elapsed: Duration) -> f64 {
    if elapsed < Duration::from_millis(200) {
        return 0.0;
    }
    round2(delta as f64 / elapsed.as_secs_f64())
}

fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

fn ratio(hits: u64, misses: u64) -> Option<f64> {
    let gets = hits + misses;
    (gets > 0).then(|| (hits as f64 / gets as f64 * 10_000.0).round() / 10_000.0)
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// One type's row.
#[derive(Debug, Serialize)]
struct TypeRow {
    name: String,
    entries: u64,
    watches: u64,
    /// Entries whose last fetch failed (in backoff).
    failing: u64,
    hits: u64,
    misses: u64,
    fetches: u64,
    errors: u64,
    /// Over the agent's life; `null` before the first get.
    hit_ratio: Option<f64>,
    /// Over the last minute; `null` when there were no gets.
    hit_ratio_recent: Option<f64>,
    per_second: Rates,
}

#[derive(Debug, Serialize)]
struct Rates {
    hits: f64,
    misses: f64,
    fetches: f64,
    errors: f64,
}

impl Rates {
    fn of(delta: Counts, elapsed: Duration) -> Self {
        Self {
            hits: per_second(delta.hits, elapsed),
            misses: per_second(delta.misses, elapsed),
            fetches: per_second(delta.fetches, elapsed),
            errors: per_second(delta.errors, elapsed),
        }
    }
}

fn type_rows(metrics: &Metrics, samples: &[Sample], now: Instant) -> Vec<TypeRow> {
    let rate_base = base_sample(samples, now, RATE_WINDOW);
    let ratio_base = base_sample(samples, now, RATIO_WINDOW);
    metrics
        .types
        .iter()
        .map(|t| {
            let live = Counts::of(t);
            let (rates, recent) = match (rate_base, ratio_base) {
                (Some(rate_base), Some(ratio_base)) => {
                    let rate_delta = live.since(rate_base.counts(&t.name));
                    let ratio_delta = live.since(ratio_base.counts(&t.name));
                    (
                        Rates::of(rate_delta, now.saturating_duration_since(rate_base.at)),
                        ratio(ratio_delta.hits, ratio_delta.misses),
                    )
                }
                _ => (Rates::of(Counts::default(), Duration::ZERO), None),
            };
            TypeRow {
                name: short_type_name(&t.name).to_owned(),
                entries: t.entries,
                watches: t.watches,
                failing: t.failing,
                hits: live.hits,
                misses: live.misses,
                fetches: live.fetches,
                errors: live.errors,
                hit_ratio: ratio(live.hits, live.misses),
                hit_ratio_recent: recent,
                per_second: rates,
            }
        })
        .collect()
}

/// The history as per-second series (oldest first), summed over every type.
fn history_json(samples: &[Sample]) -> Value {
    let mut hits = Vec::with_capacity(samples.len());
    let mut fetches = Vec::with_capacity(samples.len());
    let mut errors = Vec::with_capacity(samples.len());
    let mut misses = Vec::with_capacity(samples.len());
    for pair in samples.windows(2) {
        let elapsed = pair[1].at.saturating_duration_since(pair[0].at);
        let delta = pair[1].total().since(pair[0].total());
        hits.push(per_second(delta.hits, elapsed));
        misses.push(per_second(delta.misses, elapsed));
        fetches.push(per_second(delta.fetches, elapsed));
        errors.push(per_second(delta.errors, elapsed));
    }
    json!({
        "interval_ms": millis(SAMPLE_EVERY),
        "hits": hits,
        "misses": misses,
        "fetches": fetches,
        "errors": errors,
    })
}

/// The upstream: kind, endpoints, contact (from the agent's contact tracker) and the fault
/// settings in force. Durations are milliseconds.
fn upstream_json(state: &AgentState) -> Value {
    let faults = state.faults().get();
    let contact = state.contact();
    let (kind, endpoints, current) = match state.etcd() {
        Some(etcd) => (
            "etcd",
            etcd.endpoints().to_vec(),
            Some(etcd.current_endpoint().to_owned()),
        ),
        None => ("embedded", vec!["in-process".to_owned()], None),
    };
    json!({
        "kind": kind,
        "endpoints": endpoints,
        "current_endpoint": current,
        "reachable": contact.reachable,
        "last_contact_ms": contact.since_last_contact.map(millis),
        "down_for_ms": contact.down_for.map(millis),
        "last_error": contact.last_error,
        "last_outage_ms": contact.last_outage.map(millis),
        "outages": contact.outages,
        // The upstream's own counters (index, keys, blocking reads open), read locally.
        "counters": state.upstream_counters(),
        "faults": {
            "fail": faults.fail,
            "fail_rate": faults.fail_rate,
            "latency": GoDuration(faults.latency).to_string(),
        },
    })
}

/// How entries are sorted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Sort {
    Key,
    Index,
    Age,
    Ttl,
}

impl Sort {
    fn parse(text: &str) -> Result<Self, ApiError> {
        Ok(match text {
            "key" => Self::Key,
            "index" => Self::Index,
            "age" => Self::Age,
            "ttl" => Self::Ttl,
            other => {
                return Err(ApiError::bad_request(format!(
                    "invalid sort {other:?}: use key, index, age or ttl"
                )));
            }
        })
    }

    fn engine(self) -> EntrySort {
        match self {
            Self::Key => EntrySort::Key,
            Self::Index => EntrySort::Index,
            Self::Age => EntrySort::Age,
            Self::Ttl => EntrySort::TtlLeft,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Self::Key => "key",
            Self::Index => "index",
            Self::Age => "age",
            Self::Ttl => "ttl",
        }
    }
}

/// The cache types whose entries can be listed, by their short names.
const TYPES: [&str; 3] = ["kv", "kv_list", "upstream_stats"];

/// One page of entries asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
struct PageQuery {
    type_name: &'static str,
    prefix: String,
    sort: Sort,
    descending: bool,
    offset: usize,
    limit: usize,
}

impl PageQuery {
    fn parse(params: &Params<'_>) -> Result<Self, ApiError> {
        let type_name = match params.get("type") {
            None | Some("") => TYPES[0],
            Some(name) => TYPES.iter().copied().find(|t| *t == name).ok_or_else(|| {
                ApiError::bad_request(format!(
                    "unknown type {name:?}: use one of {}",
                    TYPES.join(", ")
                ))
            })?,
        };
        let prefix = params.get("prefix").unwrap_or("").to_owned();
        params::validate_prefix(&prefix)?;
        let sort = Sort::parse(params.get("sort").unwrap_or("key"))?;
        let descending = match params.get("order").unwrap_or("asc") {
            "asc" => false,
            "desc" => true,
            other => {
                return Err(ApiError::bad_request(format!(
                    "invalid order {other:?}: use asc or desc"
                )));
            }
        };
        let count = |name: &str| -> Result<Option<usize>, ApiError> {
            params
                .u64(name)?
                .map(|n| {
                    usize::try_from(n)
                        .map_err(|_| ApiError::bad_request(format!("{name} is too large")))
                })
                .transpose()
        };
        let offset = count("offset")?.unwrap_or(0);
        let limit = count("limit")?.unwrap_or(DEFAULT_PAGE).min(MAX_PAGE);
        Ok(Self {
            type_name,
            prefix,
            sort,
            descending,
            offset,
            limit,
        })
    }
}

/// One entry as the view shows it; durations in milliseconds.
#[derive(Debug, Serialize)]
struct EntryRow<'a> {
    key: &'a str,
    datacenter: &'a str,
    index: u64,
    has_value: bool,
    age_ms: Option<u64>,
    /// The last fetch's error, while the entry is failing.
    error: Option<&'a str>,
    failing_for_ms: Option<u64>,
    watchers: usize,
    in_backoff: bool,
    fetching: bool,
    ttl_left_ms: Option<u64>,
}

impl<'a> EntryRow<'a> {
    fn of(e: &'a EntryInfo) -> Self {
        Self {
            key: &e.key,
            datacenter: &e.datacenter,
            index: e.index,
            has_value: e.has_value,
            age_ms: e.age.map(millis),
            error: e.error.as_deref(),
            failing_for_ms: e.failing_for.map(millis),
            watchers: e.watchers,
            in_backoff: e.in_backoff,
            fetching: e.fetching,
            ttl_left_ms: e.ttl_left.map(millis),
        }
    }
}

/// One page of one type's entries: one pass over the type's table (see the module docs).
///
/// The engine keeps the first `offset + limit` entries of the order while it scans, so a page
/// deep in a large table costs more than the first. A page in the second half of an unfiltered
/// listing is therefore read from the other end (the reverse order, a small offset) and turned
/// around; should the table change size between the count and the scan, it is read forwards.
fn list_entries(state: &AgentState, query: &PageQuery) -> EntryPage {
    let inner = &state.inner;
    let list = |q: &EntryQuery| match query.type_name {
        "kv_list" => inner.list.entries(q),
        "upstream_stats" => inner.stats.entries(q),
        _ => inner.kv.entries(q),
    };
    let sort = query.sort.engine();
    if query.prefix.is_empty() {
        let held = type_entries(state, query.type_name);
        if query.offset > held / 2 && query.offset < held {
            // Forward positions [offset, offset + limit) are reverse positions
            // (held - offset - limit, held - offset].
            let end = held - query.offset;
            let start = end.saturating_sub(query.limit);
            let reverse = EntryQuery::new()
                .sort(sort, !query.descending)
                .page(start, end - start);
            let mut page = list(&reverse);
            if page.total == held {
                page.entries.reverse();
                return page;
            }
        }
    }
    list(
        &EntryQuery::new()
            .prefix(query.prefix.clone())
            .sort(sort, query.descending)
            .page(query.offset, query.limit),
    )
}

/// The entries a type holds now (its gauge), by its short name.
fn type_entries(state: &AgentState, short_name: &str) -> usize {
    state
        .cache()
        .metrics()
        .types
        .iter()
        .find(|t| short_type_name(&t.name) == short_name)
        .map_or(0, |t| usize::try_from(t.entries).unwrap_or(usize::MAX))
}

fn entries_json(query: &PageQuery, page: &EntryPage) -> Value {
    json!({
        "type": query.type_name,
        "prefix": query.prefix,
        "sort": query.sort.name(),
        "order": if query.descending { "desc" } else { "asc" },
        "offset": query.offset,
        "limit": query.limit,
        "total": page.total,
        "items": page.entries.iter().map(EntryRow::of).collect::<Vec<_>>(),
    })
}

/// `GET /v1/agent/cache`: see the module docs.
pub(super) async fn cache_view(
    State(state): State<AgentState>,
    RawQuery(query): RawQuery,
) -> Result<JsonLine<Value>, ApiError> {
    let params = Params::parse(query.as_deref());
    let page = PageQuery::parse(&params)?;
    let entries = {
        // The semaphore is never closed.
        let _permit = LISTINGS.acquire().await.ok();
        // The scan takes milliseconds for 100 000 entries: off the async workers.
        let (state, query) = (state.clone(), page.clone());
        tokio::task::spawn_blocking(move || list_entries(&state, &query))
            .await
            .map_err(|e| {
                ApiError::new(
                    axum::http::StatusCode::INTERNAL_SERVER_ERROR,
                    format!("listing entries failed: {e}"),
                )
            })?
    };
    let now = Instant::now();
    let metrics = state.cache().metrics();
    let samples = state.inner.history.snapshot();
    let types = type_rows(&metrics, &samples, now);
    let total = metrics.total();
    Ok(JsonLine(json!({
        "upstream": upstream_json(&state),
        "kv_cache": format!("{:?}", state.inner.kv_mode).to_lowercase(),
        "watches": total.watches,
        "sse_streams": state.inner.sse_streams.load(Ordering::Relaxed),
        "types": types,
        "history": history_json(&samples),
        "entries": entries_json(&page, &entries),
    })))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::history::{HISTORY_LEN, History};

    fn sample(at: Instant, hits: u64, misses: u64) -> Sample {
        Sample {
            at,
            types: vec![(
                "kv".to_owned(),
                Counts {
                    hits,
                    misses,
                    fetches: misses,
                    errors: 0,
                },
            )],
        }
    }

    #[test]
    fn rates_come_from_the_newest_sample_at_least_a_window_old() {
        let t0 = Instant::now();
        let samples: Vec<Sample> = (0..10u64)
            .map(|i| sample(t0 + Duration::from_secs(i), i * 10, i))
            .collect();
        let now = t0 + Duration::from_secs(10);
        let base = base_sample(&samples, now, RATE_WINDOW).unwrap();
        assert_eq!(base.at, t0 + Duration::from_secs(5));
        // Fewer samples than the window: the oldest.
        let base = base_sample(&samples[8..], now, RATE_WINDOW).unwrap();
        assert_eq!(base.at, t0 + Duration::from_secs(8));
        assert!(base_sample(&[], now, RATE_WINDOW).is_none());
    }

    #[test]
    fn history_is_per_second_deltas() {
        let t0 = Instant::now();
        let samples = vec![
            sample(t0, 0, 0),
            sample(t0 + Duration::from_secs(1), 30, 2),
            sample(t0 + Duration::from_secs(3), 30, 6),
        ];
        let history = history_json(&samples);
        assert_eq!(history["hits"], json!([30.0, 0.0]));
        assert_eq!(history["fetches"], json!([2.0, 2.0]));
    }

    #[test]
    fn the_ring_keeps_the_last_samples() {
        let history = History::new();
        let t0 = Instant::now();
        for i in 0..(HISTORY_LEN as u64 + 7) {
            history.record(sample(t0 + Duration::from_secs(i), i, 0));
        }
        let samples = history.snapshot();
        assert_eq!(samples.len(), HISTORY_LEN);
        assert_eq!(samples[0].counts("kv").hits, 7);
    }

    #[test]
    fn a_page_query_is_validated_and_capped() {
        let parse = |q: &str| PageQuery::parse(&Params::parse(Some(q)));
        let page = parse("").unwrap();
        assert_eq!(
            (page.type_name, page.limit, page.offset),
            ("kv", DEFAULT_PAGE, 0)
        );
        let page = parse("type=kv_list&sort=age&order=desc&offset=200&limit=100000").unwrap();
        assert_eq!(page.limit, MAX_PAGE);
        assert_eq!(page.sort, Sort::Age);
        assert!(page.descending);
        for bad in ["type=nope", "sort=size", "order=up", "limit=-1", "offset=x"] {
            let error = parse(bad).unwrap_err();
            assert_eq!(error.status, axum::http::StatusCode::BAD_REQUEST, "{bad}");
        }
    }

    #[test]
    fn hit_ratio_is_null_without_gets() {
        assert_eq!(ratio(0, 0), None);
        assert_eq!(ratio(3, 1), Some(0.75));
    }
}
