//! Consul's conventions on the wire: how its HTTP API reads query parameters, the JSON shape
//! of a KV entry, and the headers every read carries.
//!
//! - A boolean parameter (`recurse`, `keys`, `raw`, `cached`, `stale`, `consistent`,
//!   `pretty`) is on when present, whatever its value (`?keys=True`, `?recurse=false`), as
//!   Consul reads them.
//! - `dc`, `ns`, `partition` are accepted when they name this agent (datacenter
//!   [`DATACENTER`], the `default` namespace and partition), `token` is accepted and unused
//!   (the agent has no ACLs). Every other parameter a route does not take is a 400 naming it:
//!   none that changes what a request does is ignored. Sessions and locks (`acquire`,
//!   `release`) are refused that way too.

use std::time::Duration;

use axum::http::{HeaderMap, HeaderName, HeaderValue};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use serde::Serialize;

use super::error::ApiError;
use super::params::Params;
use super::response::{X_CONSUL_INDEX, number_value};
use crate::upstream::{Entry, ReadMode};

/// The datacenter this agent answers for (Consul's default name).
pub const DATACENTER: &str = "dc1";

/// Parameters every Consul route accepts.
const COMMON: &[&str] = &["dc", "ns", "partition", "token", "pretty"];

/// Parameters the agent knows but refuses, with the reason.
const REFUSED: &[(&str, &str)] = &[
    (
        "acquire",
        "sessions and locks are not supported by this agent (no /v1/session)",
    ),
    (
        "release",
        "sessions and locks are not supported by this agent (no /v1/session)",
    ),
    (
        "filter",
        "filter expressions are not supported on /v1/kv (Consul does not filter KV either)",
    ),
    ("near", "?near does not apply to /v1/kv"),
    ("node-meta", "?node-meta does not apply to /v1/kv"),
    ("peer", "cluster peering is not supported by this agent"),
];

/// The query of a Consul request, checked against the parameters its route takes.
#[derive(Debug, Clone)]
pub struct ConsulQuery<'a> {
    params: Params<'a>,
}

impl<'a> ConsulQuery<'a> {
    /// Parses `raw` and checks that every parameter is one of `allowed` or common to every route
    /// (`dc`, `ns`, `partition`, `token`, `pretty`), and
    /// that `dc`, `ns` and `partition` name this agent.
    ///
    /// # Errors
    ///
    /// A 400 naming the first parameter that is unknown, refused, or names another
    /// datacenter, namespace or partition.
    pub fn parse(raw: Option<&'a str>, allowed: &[&str]) -> Result<Self, ApiError> {
        let params = Params::parse(raw);
        // A repeated name is checked again, with the same outcome: the first bad one is named.
        for name in params.names() {
            if allowed.contains(&name) || COMMON.contains(&name) {
                continue;
            }
            if let Some((_, why)) = REFUSED.iter().find(|(refused, _)| *refused == name) {
                return Err(ApiError::bad_request(format!(
                    "unsupported query parameter {name:?}: {why}"
                )));
            }
            return Err(ApiError::bad_request(format!(
                "unknown query parameter {name:?} (this route takes: {})",
                allowed
                    .iter()
                    .chain(COMMON)
                    .copied()
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        }
        let query = Self { params };
        query.check_scope("dc", &[DATACENTER], "datacenter")?;
        query.check_scope("ns", &["default"], "namespace")?;
        query.check_scope("partition", &["default"], "admin partition")?;
        Ok(query)
    }

    fn check_scope(&self, name: &str, ours: &[&str], what: &str) -> Result<(), ApiError> {
        match self.params.get(name) {
            Some(value) if !value.is_empty() && !ours.contains(&value) => {
                Err(ApiError::bad_request(format!(
                    "invalid {name} {value:?}: this agent serves only the {what} {:?}",
                    ours[0]
                )))
            }
            _ => Ok(()),
        }
    }

    /// Whether the boolean parameter `name` is present (its value does not matter).
    pub fn flag(&self, name: &str) -> bool {
        self.params.get(name).is_some()
    }

    /// The last value of `name`.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.params.get(name)
    }

    /// The underlying parameters.
    pub fn params(&self) -> &Params<'a> {
        &self.params
    }

    /// The read mode: `?stale`, `?consistent`, or the default.
    ///
    /// # Errors
    ///
    /// A 400 for both at once, or for `?consistent` with `?cached` (Consul's rules).
    pub fn read_mode(&self) -> Result<ReadMode, ApiError> {
        match (self.flag("stale"), self.flag("consistent")) {
            (true, true) => Err(ApiError::bad_request(
                "cannot specify ?stale with ?consistent, conflicting semantics",
            )),
            (_, true) if self.flag("cached") => Err(ApiError::bad_request(
                "cannot specify ?cached with ?consistent, conflicting semantics",
            )),
            (true, false) => Ok(ReadMode::Stale),
            (false, true) => Ok(ReadMode::Consistent),
            (false, false) => Ok(ReadMode::Default),
        }
    }

    /// Whether the response is to be indented (`?pretty`).
    pub fn pretty(&self) -> bool {
        self.flag("pretty")
    }
}

/// A KV entry as Consul's HTTP API writes it (its `DirEntry`, in its field order). Sessions
/// are refused, so an [`Entry`] has no lock index (0) and no session (left out).
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct DirEntry<'a> {
    /// How often a session acquired the key's lock.
    pub lock_index: u64,
    /// The key.
    pub key: &'a str,
    /// The writer's flags.
    pub flags: u64,
    /// The value in base64; `null` for an empty value (as Consul stores it).
    pub value: Option<Base64<'a>>,
    /// The session holding the lock; left out when none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub session: Option<&'a str>,
    /// The index the key was created at.
    pub create_index: u64,
    /// The index of the key's last write.
    pub modify_index: u64,
}

impl<'a> From<&'a Entry> for DirEntry<'a> {
    fn from(entry: &'a Entry) -> Self {
        Self {
            lock_index: 0,
            key: &entry.key,
            flags: entry.flags,
            value: (!entry.value.is_empty()).then_some(Base64(&entry.value)),
            session: None,
            create_index: entry.create_index,
            modify_index: entry.modify_index,
        }
    }
}

/// Writes `entries` as a JSON array of [`DirEntry`] into `out`, byte for byte as
/// `serde_json::to_writer` writes `[DirEntry]` (compact), without building the entries or
/// their base64 strings first.
pub fn write_dir_entries<'a>(out: &mut Vec<u8>, entries: impl IntoIterator<Item = &'a Entry>) {
    out.push(b'[');
    for (n, entry) in entries.into_iter().enumerate() {
        if n > 0 {
            out.push(b',');
        }
        write_dir_entry(out, &DirEntry::from(entry));
    }
    out.push(b']');
}

/// One entry of [`write_dir_entries`].
fn write_dir_entry(out: &mut Vec<u8>, entry: &DirEntry<'_>) {
    out.extend_from_slice(b"{\"LockIndex\":");
    write_number(out, entry.lock_index);
    out.extend_from_slice(b",\"Key\":");
    write_string(out, entry.key);
    out.extend_from_slice(b",\"Flags\":");
    write_number(out, entry.flags);
    out.extend_from_slice(b",\"Value\":");
    match entry.value {
        None => out.extend_from_slice(b"null"),
        Some(Base64(value)) => write_base64(out, value),
    }
    if let Some(session) = entry.session {
        out.extend_from_slice(b",\"Session\":");
        write_string(out, session);
    }
    out.extend_from_slice(b",\"CreateIndex\":");
    write_number(out, entry.create_index);
    out.extend_from_slice(b",\"ModifyIndex\":");
    write_number(out, entry.modify_index);
    out.push(b'}');
}

/// A JSON number, as serde_json writes it.
fn write_number(out: &mut Vec<u8>, n: u64) {
    let mut digits = [0u8; 20];
    let mut at = digits.len();
    let mut rest = n;
    loop {
        at -= 1;
        digits[at] = b'0' + (rest % 10) as u8;
        rest /= 10;
        if rest == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[at..]);
}

/// A JSON string, escaped as serde_json escapes it.
fn write_string(out: &mut Vec<u8>, text: &str) {
    // Writing into a `Vec` cannot fail, and a `str` always serializes.
    let _ = serde_json::to_writer(&mut *out, text);
}

/// `bytes` in base64 (standard, padded) as a JSON string.
fn write_base64(out: &mut Vec<u8>, bytes: &[u8]) {
    let start = out.len();
    out.push(b'"');
    let encoded = base64::encoded_len(bytes.len(), true).and_then(|len| {
        out.resize(start + 1 + len, 0);
        out.get_mut(start + 1..)
            .and_then(|tail| BASE64.encode_slice(bytes, tail).ok())
    });
    if encoded.is_some() {
        out.push(b'"');
    } else {
        // Only for a value too large to encode into memory at once.
        out.truncate(start);
        let _ = serde_json::to_writer(&mut *out, &Base64(bytes));
    }
}

/// Bytes that serialize as a base64 string (standard alphabet, padded), written straight
/// into the output without an intermediate `String`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Base64<'a>(pub &'a [u8]);

impl Serialize for Base64<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(&base64::display::Base64Display::new(self.0, &BASE64))
    }
}

/// The keys of `entries` as `?keys&separator=` lists them: every key under `prefix`, cut
/// after the first `separator` that follows the prefix, without repeats (Consul's rule).
pub fn list_keys<'a>(
    entries: impl IntoIterator<Item = &'a Entry>,
    prefix: &str,
    separator: Option<&str>,
) -> Vec<String> {
    let mut keys: Vec<String> = Vec::new();
    for entry in entries {
        let key = entry.key.as_str();
        let cut = match separator.filter(|s| !s.is_empty()) {
            Some(sep) => key
                .get(prefix.len()..)
                .and_then(|after| after.find(sep))
                .map_or(key, |at| &key[..prefix.len() + at + sep.len()]),
            None => key,
        };
        if keys.last().map(String::as_str) != Some(cut) {
            keys.push(cut.to_owned());
        }
    }
    keys
}

/// Sets the headers Consul sends with every read: `X-Consul-Index` (never 0),
/// `X-Consul-KnownLeader`, `X-Consul-LastContact` and `X-Consul-Effective-Consistency`.
///
/// The agent answers only after its upstream did (or from its cache), so it reports a known
/// leader and a last contact of 0 ms, as a Consul server reading its own state does.
pub fn set_read_headers(headers: &mut HeaderMap, index: u64, mode: ReadMode) {
    static KNOWN_LEADER: HeaderName = HeaderName::from_static("x-consul-knownleader");
    static LAST_CONTACT: HeaderName = HeaderName::from_static("x-consul-lastcontact");
    static CONSISTENCY: HeaderName = HeaderName::from_static("x-consul-effective-consistency");
    headers.reserve(4);
    headers.insert(X_CONSUL_INDEX.clone(), number_value(index.max(1)));
    headers.insert(KNOWN_LEADER.clone(), HeaderValue::from_static("true"));
    headers.insert(LAST_CONTACT.clone(), HeaderValue::from_static("0"));
    headers.insert(
        CONSISTENCY.clone(),
        HeaderValue::from_static(mode.consul_name()),
    );
}

/// Consul's blocking wait: `?wait=` (default 5 min, at most 10 min; 0 means the default),
/// plus a random jitter of up to wait/16, as Consul's servers add (so that many clients do
/// not come back at once).
pub fn jittered_wait(wait: Duration) -> Duration {
    let wait = if wait.is_zero() {
        super::params::DEFAULT_WAIT
    } else {
        wait.min(super::params::MAX_BLOCKING_WAIT)
    };
    let jitter_max = u64::try_from((wait / 16).as_millis()).unwrap_or(u64::MAX);
    wait + Duration::from_millis(fastrand::u64(0..=jitter_max))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(key: &str) -> Entry {
        Entry {
            key: key.to_owned(),
            ..Entry::default()
        }
    }

    /// The key `k` with value `bar`, flags 42, created at 3 and modified at 5.
    fn sample_entry() -> Entry {
        Entry {
            value: b"bar".to_vec(),
            flags: 42,
            create_index: 3,
            modify_index: 5,
            ..entry("k")
        }
    }

    #[test]
    fn keys_with_a_separator() {
        let entries: Vec<Entry> = ["app/a", "app/b/c", "app/b/d", "app/e/", "apple", "b"]
            .into_iter()
            .map(entry)
            .collect();
        assert_eq!(
            list_keys(&entries[..4], "app/", Some("/")),
            ["app/a", "app/b/", "app/e/"]
        );
        assert_eq!(list_keys(&entries, "", Some("/")), ["app/", "apple", "b"]);
        assert_eq!(list_keys(&entries[..2], "app/", None), ["app/a", "app/b/c"]);
    }

    #[test]
    fn entries_in_consul_shape() {
        let e = sample_entry();
        assert_eq!(
            serde_json::to_string(&DirEntry::from(&e)).unwrap(),
            r#"{"LockIndex":0,"Key":"k","Flags":42,"Value":"YmFy","CreateIndex":3,"ModifyIndex":5}"#
        );
        let empty = entry("k");
        assert!(DirEntry::from(&empty).value.is_none());
    }

    #[test]
    fn written_entries_match_serde() {
        let entries = [
            sample_entry(),
            Entry {
                key: "quote\"back\\slash/\u{1}\ttab/é/€".to_owned(),
                value: (0..=255).collect(),
                flags: u64::MAX,
                create_index: 1,
                modify_index: 10_000_000_000,
            },
            entry(""),
            Entry {
                value: vec![0],
                ..entry("a/b/")
            },
            Entry {
                value: vec![1, 2],
                ..entry("x")
            },
        ];
        for n in 0..=entries.len() {
            let mut written = Vec::new();
            write_dir_entries(&mut written, &entries[..n]);
            let dir: Vec<DirEntry<'_>> = entries[..n].iter().map(DirEntry::from).collect();
            assert_eq!(
                String::from_utf8(written).unwrap(),
                serde_json::to_string(&dir).unwrap()
            );
        }
        // The fields an `Entry` never has (sessions are refused) are written as serde would.
        let locked = DirEntry {
            lock_index: 7,
            session: Some("sess\"ion"),
            ..DirEntry::from(&entries[0])
        };
        let mut written = Vec::new();
        write_dir_entry(&mut written, &locked);
        assert_eq!(
            String::from_utf8(written).unwrap(),
            serde_json::to_string(&locked).unwrap()
        );
    }

    #[test]
    fn flags_are_present_whatever_their_value() {
        let q = ConsulQuery::parse(
            Some("recurse=false&keys=True&raw"),
            &["recurse", "keys", "raw"],
        )
        .unwrap();
        assert!(q.flag("recurse") && q.flag("keys") && q.flag("raw"));
        assert!(!q.flag("cached"));
    }

    #[test]
    fn unknown_and_refused_parameters_are_named() {
        for (query, needle) in [
            ("acquire=abc", "\"acquire\""),
            ("release=abc", "\"release\""),
            ("bogus=1", "\"bogus\""),
            ("dc=dc2", "dc2"),
            ("ns=team", "namespace"),
        ] {
            let e = ConsulQuery::parse(Some(query), &["recurse"]).unwrap_err();
            assert_eq!(e.status, 400);
            assert!(e.message.contains(needle), "{query}: {}", e.message);
        }
        assert!(ConsulQuery::parse(Some("dc=dc1&ns=default&token=x"), &[]).is_ok());
    }

    #[test]
    fn read_modes() {
        let mode = |q| ConsulQuery::parse(Some(q), &["stale", "consistent", "cached"])?.read_mode();
        assert_eq!(mode("stale").unwrap(), ReadMode::Stale);
        assert_eq!(mode("consistent=false").unwrap(), ReadMode::Consistent);
        assert_eq!(mode("").unwrap(), ReadMode::Default);
        assert!(mode("stale&consistent").is_err());
        assert!(mode("cached&consistent").is_err());
    }

    #[test]
    fn wait_defaults_caps_and_jitter() {
        for _ in 0..100 {
            let w = jittered_wait(Duration::from_secs(16));
            assert!(
                w >= Duration::from_secs(16) && w <= Duration::from_secs(17),
                "{w:?}"
            );
            let w = jittered_wait(Duration::ZERO);
            assert!(w >= Duration::from_secs(300), "{w:?}");
            let w = jittered_wait(Duration::from_secs(3600));
            assert!(w <= Duration::from_millis(637_500), "{w:?}");
        }
    }
}
