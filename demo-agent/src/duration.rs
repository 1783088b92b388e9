//! Go-style durations (`500ms`, `10s`, `5m`, `1m30s`, `1.5h`), as Consul's `?wait=` and the
//! agent's flags accept them.
//!
//! The grammar is Go's `time.ParseDuration` without a sign: one or more `<number><unit>`
//! pairs, where the number may have a fraction and the unit is one of `ns`, `us`, `µs`, `ms`,
//! `s`, `m`, `h`. A bare `0` is allowed. Anything else is an error naming the problem.

use std::fmt;
use std::time::Duration;

/// Why a duration did not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid duration {input:?}: {reason}")]
pub struct ParseDurationError {
    input: String,
    reason: &'static str,
}

/// Parses a Go-style duration such as `500ms`, `10s`, `5m` or `1m30s`.
///
/// # Errors
///
/// [`ParseDurationError`] for an empty string, a missing or unknown unit, a malformed number,
/// a negative sign, or a value that overflows.
///
/// # Examples
///
/// ```
/// use std::time::Duration;
/// use demo_agent::duration::parse_duration;
///
/// assert_eq!(parse_duration("1m30s").unwrap(), Duration::from_secs(90));
/// assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
/// assert!(parse_duration("10").is_err());
/// ```
pub fn parse_duration(input: &str) -> Result<Duration, ParseDurationError> {
    let error = |reason| ParseDurationError {
        input: input.to_owned(),
        reason,
    };
    let s = input.trim();
    if s.is_empty() {
        return Err(error("empty"));
    }
    if s.starts_with('-') {
        return Err(error("negative durations are not allowed"));
    }
    let s = s.strip_prefix('+').unwrap_or(s);
    if s == "0" {
        return Ok(Duration::ZERO);
    }
    let mut rest = s;
    let mut total_nanos: u128 = 0;
    while !rest.is_empty() {
        let number_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let (number, after) = rest.split_at(number_len);
        if number.is_empty() || number == "." || number.matches('.').count() > 1 {
            return Err(error("expected a number"));
        }
        let unit_len = after
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(after.len());
        let (unit, after) = after.split_at(unit_len);
        let unit_nanos: u128 = match unit {
            "ns" => 1,
            "us" | "µs" | "μs" => 1_000,
            "ms" => 1_000_000,
            "s" => 1_000_000_000,
            "m" => 60 * 1_000_000_000,
            "h" => 3_600 * 1_000_000_000,
            "" => return Err(error("missing unit (use ns, us, ms, s, m or h)")),
            _ => return Err(error("unknown unit (use ns, us, ms, s, m or h)")),
        };
        let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
        let whole: u128 = if whole.is_empty() {
            0
        } else {
            whole.parse().map_err(|_| error("number too large"))?
        };
        let mut nanos = whole
            .checked_mul(unit_nanos)
            .ok_or_else(|| error("number too large"))?;
        // The fraction's digits beyond nanosecond precision are dropped, as Go does.
        let mut scale = unit_nanos;
        for digit in fraction.bytes() {
            scale /= 10;
            if scale == 0 {
                break;
            }
            nanos += u128::from(digit - b'0') * scale;
        }
        total_nanos = total_nanos
            .checked_add(nanos)
            .ok_or_else(|| error("number too large"))?;
        rest = after;
    }
    let secs = u64::try_from(total_nanos / 1_000_000_000).map_err(|_| error("number too large"))?;
    // The remainder of a division by 10^9 always fits in u32.
    let subsec = (total_nanos % 1_000_000_000) as u32;
    Ok(Duration::new(secs, subsec))
}

/// Formats a duration the way Go prints one: `1m30s`, `500ms`, `0s`.
pub fn format_duration(duration: Duration) -> String {
    GoDuration(duration).to_string()
}

/// A [`Duration`] that displays in Go's style.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GoDuration(pub Duration);

impl fmt::Display for GoDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let d = self.0;
        if d.is_zero() {
            return f.write_str("0s");
        }
        if d < Duration::from_secs(1) {
            let nanos = d.subsec_nanos();
            return if nanos % 1_000_000 == 0 {
                write!(f, "{}ms", nanos / 1_000_000)
            } else if nanos % 1_000 == 0 {
                write!(f, "{}us", nanos / 1_000)
            } else {
                write!(f, "{nanos}ns")
            };
        }
        let secs = d.as_secs();
        let (hours, minutes, seconds) = (secs / 3600, (secs / 60) % 60, secs % 60);
        if hours > 0 {
            write!(f, "{hours}h")?;
        }
        if hours > 0 || minutes > 0 {
            write!(f, "{minutes}m")?;
        }
        let millis = d.subsec_millis();
        if millis == 0 {
            write!(f, "{seconds}s")
        } else {
            write!(f, "{seconds}.{millis:03}s")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(input: &str, expected: Option<Duration>) {
        assert_eq!(parse_duration(input).ok(), expected, "input {input:?}");
    }

    #[test]
    fn parses_go_durations() {
        check("0", Some(Duration::ZERO));
        check("0s", Some(Duration::ZERO));
        check("500ms", Some(Duration::from_millis(500)));
        check("10s", Some(Duration::from_secs(10)));
        check("5m", Some(Duration::from_secs(300)));
        check("1m30s", Some(Duration::from_secs(90)));
        check("1.5h", Some(Duration::from_secs(5400)));
        check("2h45m", Some(Duration::from_secs(9900)));
        check("1us", Some(Duration::from_micros(1)));
        check("1µs", Some(Duration::from_micros(1)));
        check("7ns", Some(Duration::from_nanos(7)));
        check(".5s", Some(Duration::from_millis(500)));
        check("+3s", Some(Duration::from_secs(3)));
    }

    #[test]
    fn rejects_malformed_durations() {
        for bad in [
            "", "10", "s", "1x", "-1s", "1..5s", "1.2.3s", "abc", "10 s", "1sm", "5m3",
        ] {
            check(bad, None);
        }
        check("99999999999999999999999h", None);
        check("18446744073709551616s", None);
    }

    #[test]
    fn errors_name_the_problem() {
        let e = parse_duration("10").unwrap_err().to_string();
        assert!(e.contains("missing unit"), "{e}");
        let e = parse_duration("3d").unwrap_err().to_string();
        assert!(e.contains("unknown unit"), "{e}");
    }

    #[test]
    fn formats_like_go() {
        assert_eq!(format_duration(Duration::ZERO), "0s");
        assert_eq!(format_duration(Duration::from_millis(5)), "5ms");
        assert_eq!(format_duration(Duration::from_secs(90)), "1m30s");
        assert_eq!(format_duration(Duration::from_secs(600)), "10m0s");
        assert_eq!(format_duration(Duration::from_secs(3600)), "1h0m0s");
        assert_eq!(format_duration(Duration::from_millis(1500)), "1.500s");
    }
}
