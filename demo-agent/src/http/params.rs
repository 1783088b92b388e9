//! Request parsing: query parameters (`?index=`, `?wait=`, `?cached`, `?cas=`), the
//! `Cache-Control` request header, and the size limits. Every failure is a 400 naming the
//! problem.

use std::borrow::Cow;
use std::num::IntErrorKind;
use std::time::Duration;

use axum::http::HeaderMap;
use axum::http::header::CACHE_CONTROL;

use super::error::ApiError;
use crate::duration::parse_duration;

/// The longest key accepted, in bytes.
pub const MAX_KEY_BYTES: usize = 512;
/// The largest value (request body) accepted, in bytes: 512 KiB.
pub const MAX_VALUE_BYTES: usize = 512 * 1024;
/// The wait of a blocking read that names no `?wait=` (Consul's default).
pub const DEFAULT_WAIT: Duration = Duration::from_secs(300);
/// The longest `?wait=` honoured (Consul's cap; longer waits are cut to it, silently, as
/// Consul does). Consul's jitter may add up to a sixteenth on top.
pub const MAX_BLOCKING_WAIT: Duration = Duration::from_secs(600);
/// The most watches one `/v1/watch` stream may multiplex.
pub const MAX_WATCHES_PER_STREAM: usize = 64;

/// The decoded query parameters of a request, in order (names may repeat). Every name and
/// value that needed no decoding (the usual case) borrows from the raw query, so parsing
/// allocates only the list.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Params<'a>(Vec<(Cow<'a, str>, Cow<'a, str>)>);

impl<'a> Params<'a> {
    /// Decodes a raw query string (`None`: no query).
    pub fn parse(raw: Option<&'a str>) -> Self {
        Self(form_urlencoded::parse(raw.unwrap_or("").as_bytes()).collect())
    }

    /// The last value of `name`, if present.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .rev()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_ref())
    }

    /// Every parameter name, in order, repeats included.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.0.iter().map(|(name, _)| name.as_ref())
    }

    /// Every value of `name`, in order.
    pub fn all<'s>(&'s self, name: &'s str) -> impl Iterator<Item = &'s str> + 's {
        self.0
            .iter()
            .filter(move |(k, _)| k == name)
            .map(|(_, v)| v.as_ref())
    }

    /// A boolean switch such as `?cached`: present without a value (or `true`/`1`) is on,
    /// `false`/`0` is off, absent is off.
    ///
    /// # Errors
    ///
    /// A 400 for any other value.
    pub fn flag(&self, name: &str) -> Result<bool, ApiError> {
        match self.get(name) {
            None => Ok(false),
            Some("" | "true" | "1") => Ok(true),
            Some("false" | "0") => Ok(false),
            Some(other) => Err(ApiError::bad_request(format!(
                "invalid {name} {other:?}: use true or false (or the bare ?{name})"
            ))),
        }
    }

    /// An index-like number (`?index=`, `?cas=`).
    ///
    /// # Errors
    ///
    /// A 400 for a non-numeric, negative or overflowing value.
    pub fn u64(&self, name: &str) -> Result<Option<u64>, ApiError> {
        self.get(name).map(|v| parse_u64(name, v)).transpose()
    }

    /// The blocking part of a read: `?index=N` and `?wait=D`.
    ///
    /// # Errors
    ///
    /// A 400 for a bad index or wait.
    pub fn blocking(&self) -> Result<Blocking, ApiError> {
        blocking(self.get("index"), self.get("wait"))
    }
}

/// `?index=` and `?wait=` as given (absent: `None`).
fn blocking(index: Option<&str>, wait: Option<&str>) -> Result<Blocking, ApiError> {
    let min_index = index
        .map(|v| parse_u64("index", v))
        .transpose()?
        .unwrap_or(0);
    let wait = match wait {
        None => DEFAULT_WAIT,
        Some(raw) => {
            parse_duration(raw).map_err(|e| ApiError::bad_request(format!("invalid wait: {e}")))?
        }
    };
    Ok(Blocking {
        min_index,
        // Consul caps a blocking query's wait at 10 minutes, silently.
        wait: wait.min(MAX_BLOCKING_WAIT),
    })
}

fn parse_u64(name: &str, raw: &str) -> Result<u64, ApiError> {
    raw.parse::<u64>().map_err(|e| {
        let why = match e.kind() {
            IntErrorKind::Empty => "empty",
            IntErrorKind::PosOverflow => "overflows a 64-bit unsigned integer",
            _ => "not a non-negative integer",
        };
        ApiError::bad_request(format!("invalid {name} {raw:?}: {why}"))
    })
}

/// `?index=` and `?wait=` of a read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Blocking {
    /// Block until the index is above this; 0 = do not block.
    pub min_index: u64,
    /// The longest to block (capped at 10 minutes).
    pub wait: Duration,
}

impl Blocking {
    /// Whether the read blocks.
    pub fn is_blocking(&self) -> bool {
        self.min_index > 0
    }
}

/// The `Cache-Control` request directives the agent honours.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CacheControl {
    /// `max-age=<seconds>`: a cached value older than this is fetched again.
    pub max_age: Option<Duration>,
    /// `must-revalidate` (or `no-cache`): check with the upstream unless a blocking query on
    /// the entry is open (which means the value is current).
    pub must_revalidate: bool,
    /// `stale-if-error=<seconds>`: if the fetch fails, serve a value up to this old.
    pub stale_if_error: Option<Duration>,
}

impl CacheControl {
    /// Parses every `Cache-Control` header of a request. Unknown directives are ignored, as
    /// HTTP asks.
    ///
    /// # Errors
    ///
    /// A 400 naming the malformed directive.
    pub fn from_headers(headers: &HeaderMap) -> Result<Self, ApiError> {
        let mut cc = Self::default();
        for value in headers.get_all(CACHE_CONTROL) {
            let text = value.to_str().map_err(|_| {
                ApiError::bad_request("invalid Cache-Control: not visible ASCII text")
            })?;
            cc.parse_into(text)?;
        }
        Ok(cc)
    }

    /// Parses one header value such as `max-age=30, stale-if-error=60`.
    ///
    /// # Errors
    ///
    /// A 400 naming the malformed directive.
    pub fn parse(text: &str) -> Result<Self, ApiError> {
        let mut cc = Self::default();
        cc.parse_into(text)?;
        Ok(cc)
    }

    fn parse_into(&mut self, text: &str) -> Result<(), ApiError> {
        for directive in text.split(',').map(str::trim).filter(|d| !d.is_empty()) {
            let (name, value) = match directive.split_once('=') {
                Some((name, value)) => (name.trim(), Some(value.trim().trim_matches('"'))),
                None => (directive, None),
            };
            let bad = |why: &str| {
                ApiError::bad_request(format!(
                    "invalid Cache-Control directive {directive:?}: {why}"
                ))
            };
            let seconds = |value: Option<&str>| -> Result<Duration, ApiError> {
                let value = value.ok_or_else(|| bad("needs a number of seconds, e.g. =30"))?;
                let n: u64 = value
                    .parse()
                    .map_err(|_| bad("the value is not a non-negative integer of seconds"))?;
                // Over ~68 years is as good as forever; keep Instant arithmetic safe.
                Ok(Duration::from_secs(n.min(u64::from(u32::MAX))))
            };
            match name.to_ascii_lowercase().as_str() {
                "max-age" => self.max_age = Some(seconds(value)?),
                "stale-if-error" => self.stale_if_error = Some(seconds(value)?),
                "must-revalidate" | "no-cache" => {
                    if value.is_some() {
                        return Err(bad("takes no value"));
                    }
                    self.must_revalidate = true;
                }
                "" => return Err(bad("missing directive name")),
                _ => {}
            }
        }
        Ok(())
    }
}

/// Percent-decodes `text` (`%` and two hex digits is a byte; any other `%` stays as it is, as
/// the router decodes path parameters) and returns it if the bytes are UTF-8.
pub fn percent_decode_utf8(text: &str) -> Option<String> {
    if !text.contains('%') {
        return Some(text.to_owned());
    }
    fn hex(digit: u8) -> Option<u8> {
        match digit {
            b'0'..=b'9' => Some(digit - b'0'),
            b'a'..=b'f' => Some(digit - b'a' + 10),
            b'A'..=b'F' => Some(digit - b'A' + 10),
            _ => None,
        }
    }
    let bytes = text.as_bytes();
    let mut decoded = Vec::with_capacity(bytes.len());
    let mut at = 0;
    while let Some(&byte) = bytes.get(at) {
        if byte == b'%' {
            let high = bytes.get(at + 1).copied().and_then(hex);
            let low = bytes.get(at + 2).copied().and_then(hex);
            if let (Some(high), Some(low)) = (high, low) {
                decoded.push(high << 4 | low);
                at += 3;
                continue;
            }
        }
        decoded.push(byte);
        at += 1;
    }
    String::from_utf8(decoded).ok()
}

/// Checks a key: non-empty and at most [`MAX_KEY_BYTES`].
///
/// # Errors
///
/// A 400 naming the problem.
pub fn validate_key(key: &str) -> Result<(), ApiError> {
    if key.is_empty() {
        return Err(ApiError::bad_request("missing key: use /v1/kv/<key>"));
    }
    if key.len() > MAX_KEY_BYTES {
        return Err(ApiError::bad_request(format!(
            "key is {} bytes; the limit is {MAX_KEY_BYTES}",
            key.len()
        )));
    }
    Ok(())
}

/// Checks a prefix: at most [`MAX_KEY_BYTES`] (empty lists every key).
///
/// # Errors
///
/// A 400 naming the problem.
pub fn validate_prefix(prefix: &str) -> Result<(), ApiError> {
    if prefix.len() > MAX_KEY_BYTES {
        return Err(ApiError::bad_request(format!(
            "prefix is {} bytes; the limit is {MAX_KEY_BYTES}",
            prefix.len()
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cc(text: &str) -> Result<CacheControl, String> {
        CacheControl::parse(text).map_err(|e| e.message)
    }

    #[test]
    fn cache_control_directives() {
        assert_eq!(cc("").unwrap(), CacheControl::default());
        assert_eq!(
            cc("max-age=30, must-revalidate ,stale-if-error=\"60\"").unwrap(),
            CacheControl {
                max_age: Some(Duration::from_secs(30)),
                must_revalidate: true,
                stale_if_error: Some(Duration::from_secs(60)),
            }
        );
        assert_eq!(cc("MAX-AGE=0").unwrap().max_age, Some(Duration::ZERO));
        assert!(cc("no-cache").unwrap().must_revalidate);
        // Unknown directives are ignored.
        assert_eq!(
            cc("private, no-transform").unwrap(),
            CacheControl::default()
        );
    }

    #[test]
    fn malformed_cache_control() {
        for bad in [
            "max-age",
            "max-age=",
            "max-age=abc",
            "max-age=-1",
            "stale-if-error=1.5",
            "must-revalidate=1",
            "=5",
        ] {
            let e = cc(bad).unwrap_err();
            assert!(e.contains("Cache-Control"), "{bad}: {e}");
        }
    }

    #[test]
    fn index_and_wait() {
        let p = Params::parse(Some("index=5&wait=1m30s"));
        assert_eq!(
            p.blocking().unwrap(),
            Blocking {
                min_index: 5,
                wait: Duration::from_secs(90)
            }
        );
        let p = Params::parse(Some("index=5&wait=1h"));
        assert_eq!(p.blocking().unwrap().wait, MAX_BLOCKING_WAIT);
        let p = Params::parse(None);
        assert_eq!(p.blocking().unwrap().min_index, 0);
        for (query, needle) in [
            ("index=abc", "not a non-negative integer"),
            ("index=-1", "not a non-negative integer"),
            ("index=18446744073709551616", "overflows"),
            ("index=", "empty"),
            ("index=1&wait=10", "missing unit"),
            ("index=1&wait=soon", "invalid wait"),
        ] {
            let e = Params::parse(Some(query)).blocking().unwrap_err();
            assert_eq!(e.status, 400);
            assert!(e.message.contains(needle), "{query}: {}", e.message);
        }
    }

    #[test]
    fn borrowed_params_decode_like_owned_ones() {
        for query in [
            "",
            "cached",
            "a=1&b=%2F&a=2&c+d=e+f&&=x&%zz",
            "index=5&wait=1m30s",
            "index=x",
        ] {
            let owned: Vec<(String, String)> = form_urlencoded::parse(query.as_bytes())
                .into_owned()
                .collect();
            let last = |name: &str| {
                owned
                    .iter()
                    .rev()
                    .find(|(k, _)| k == name)
                    .map(|(_, v)| v.as_str())
            };
            let borrowed = Params::parse(Some(query));
            for name in [
                "a", "b", "c d", "", "%zz", "cached", "index", "wait", "none",
            ] {
                assert_eq!(last(name), borrowed.get(name), "{query}: {name}");
            }
            assert_eq!(
                blocking(last("index"), last("wait")),
                borrowed.blocking(),
                "{query}"
            );
        }
        assert_eq!(
            Params::parse(Some("a&b&a")).names().collect::<Vec<_>>(),
            ["a", "b", "a"]
        );
    }

    #[test]
    fn flags_and_repeats() {
        let p = Params::parse(Some("cached&key=a&key=b%2Fc&x=false"));
        assert!(p.flag("cached").unwrap());
        assert!(!p.flag("x").unwrap());
        assert!(!p.flag("absent").unwrap());
        assert_eq!(p.all("key").collect::<Vec<_>>(), ["a", "b/c"]);
        assert!(Params::parse(Some("cached=maybe")).flag("cached").is_err());
    }

    #[test]
    fn percent_decoding() {
        assert_eq!(percent_decode_utf8("a/b").as_deref(), Some("a/b"));
        assert_eq!(percent_decode_utf8("%41%2f%2F+").as_deref(), Some("A//+"));
        assert_eq!(percent_decode_utf8("%").as_deref(), Some("%"));
        assert_eq!(percent_decode_utf8("%4").as_deref(), Some("%4"));
        assert_eq!(percent_decode_utf8("%g1%").as_deref(), Some("%g1%"));
        assert_eq!(percent_decode_utf8("%E2%82%AC").as_deref(), Some("€"));
        assert_eq!(percent_decode_utf8("%E2%82"), None);
        assert_eq!(percent_decode_utf8("%C3%28"), None);
    }

    #[test]
    fn key_limits() {
        assert!(validate_key("a/b").is_ok());
        assert!(validate_key("").is_err());
        assert!(validate_key(&"k".repeat(MAX_KEY_BYTES)).is_ok());
        assert!(validate_key(&"k".repeat(MAX_KEY_BYTES + 1)).is_err());
    }
}
