//! Go's `time.ParseDuration` syntax, so kube2iam flag values keep working: `15m`, `1h30m`,
//! `500ms`, `1.5h`, `300us`, `0`.

use std::time::Duration;
use thiserror::Error;

/// A flag value that is not a Go duration.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum DurationError {
    #[error("invalid duration {0:?}: use Go syntax such as 500ms, 15m, 1h30m")]
    Syntax(String),
    #[error("invalid duration {0:?}: must not be negative")]
    Negative(String),
}

/// Parses a non-negative Go duration.
pub fn parse_go_duration(s: &str) -> Result<Duration, DurationError> {
    let bad = || DurationError::Syntax(s.to_owned());
    let t = s.trim();
    let t = t.strip_prefix('+').unwrap_or(t);
    if t.starts_with('-') {
        return Err(DurationError::Negative(s.to_owned()));
    }
    if t == "0" {
        return Ok(Duration::ZERO);
    }
    if t.is_empty() {
        return Err(bad());
    }
    let mut total_ns: u128 = 0;
    let mut rest = t;
    while !rest.is_empty() {
        let num_end = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(bad)?;
        let (num, tail) = rest.split_at(num_end);
        if num.is_empty() || num == "." || num.matches('.').count() > 1 {
            return Err(bad());
        }
        let unit_end = tail
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(tail.len());
        let (unit, tail) = tail.split_at(unit_end);
        let unit_ns: u128 = match unit {
            "ns" => 1,
            "us" | "µs" | "μs" => 1_000,
            "ms" => 1_000_000,
            "s" => 1_000_000_000,
            "m" => 60 * 1_000_000_000,
            "h" => 3_600 * 1_000_000_000,
            _ => return Err(bad()),
        };
        let (int, frac) = num.split_once('.').unwrap_or((num, ""));
        let int: u128 = if int.is_empty() {
            0
        } else {
            int.parse().map_err(|_| bad())?
        };
        let mut frac_ns: u128 = 0;
        let mut scale = unit_ns;
        for d in frac.bytes().take(18) {
            scale /= 10;
            frac_ns += u128::from(d - b'0') * scale;
        }
        total_ns = total_ns
            .checked_add(int.checked_mul(unit_ns).ok_or_else(bad)? + frac_ns)
            .ok_or_else(bad)?;
        rest = tail;
    }
    let secs = u64::try_from(total_ns / 1_000_000_000).map_err(|_| bad())?;
    Ok(Duration::new(secs, (total_ns % 1_000_000_000) as u32))
}

/// Formats a duration the way Go prints it (`1h30m0s`, `500ms`), for help and logs.
pub fn format_go_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if d.is_zero() {
        return "0s".into();
    }
    if d < Duration::from_secs(1) {
        return format!("{ms}ms");
    }
    let secs = d.as_secs();
    let (h, m, s) = (secs / 3600, (secs % 3600) / 60, secs % 60);
    let frac = d.subsec_millis();
    let s = if frac > 0 {
        format!("{s}.{frac:03}").trim_end_matches('0').to_owned()
    } else {
        s.to_string()
    };
    match (h, m) {
        (0, 0) => format!("{s}s"),
        (0, m) => format!("{m}m{s}s"),
        (h, m) => format!("{h}h{m}m{s}s"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_duration_table() {
        let ok = [
            ("0", Duration::ZERO),
            ("15m", Duration::from_secs(900)),
            ("1h30m", Duration::from_secs(5400)),
            ("500ms", Duration::from_millis(500)),
            ("2s", Duration::from_secs(2)),
            ("1.5h", Duration::from_secs(5400)),
            (".5s", Duration::from_millis(500)),
            ("300us", Duration::from_micros(300)),
            ("300µs", Duration::from_micros(300)),
            ("10ns", Duration::from_nanos(10)),
            ("1h1m1s1ms", Duration::from_millis(3_661_001)),
            ("+30s", Duration::from_secs(30)),
        ];
        for (s, d) in ok {
            assert_eq!(parse_go_duration(s), Ok(d), "{s}");
        }
        for s in ["", "15", "1x", "m", "-1s", "1..5s", "1h 30m", ".s", "1d"] {
            assert!(parse_go_duration(s).is_err(), "{s} should fail");
        }
    }

    #[test]
    fn formatting_round_trips_common_values() {
        for s in ["15m0s", "1h30m0s", "500ms", "2s", "30m0s"] {
            assert_eq!(format_go_duration(parse_go_duration(s).unwrap()), s);
        }
    }
}
