//! Request deadlines from the client's `grpc-timeout`, bounded by server settings.

use std::time::{Duration, Instant};

use tonic::metadata::MetadataMap;

use crate::config::ServerSettings;

/// When the server must have answered. The client's `grpc-timeout` (capped at
/// `max_timeout_ms`) or `default_timeout_ms`, minus a small margin so our own
/// `DEADLINE_EXCEEDED` reaches the client before its timer (or tonic's, which only says
/// CANCELLED) fires.
pub fn deadline(metadata: &MetadataMap, settings: &ServerSettings) -> Instant {
    deadline_within(
        metadata,
        settings.default_timeout_ms,
        settings.max_timeout_ms,
    )
}

/// The deadline rule with explicit bounds (the gateway's are per route): the client's
/// `grpc-timeout` capped at `max_ms`, or `default_ms` without one, minus min(10 %, 20 ms).
pub fn deadline_within(metadata: &MetadataMap, default_ms: u64, max_ms: u64) -> Instant {
    let max = Duration::from_millis(max_ms);
    let timeout = metadata
        .get("grpc-timeout")
        .and_then(|v| v.to_str().ok())
        .and_then(parse_grpc_timeout)
        .map(|t| t.min(max))
        .unwrap_or(Duration::from_millis(default_ms));
    let margin = (timeout / 10).min(Duration::from_millis(20));
    Instant::now() + timeout - margin
}

/// Parses a `grpc-timeout` value: up to 8 digits and a unit (`H M S m u n`).
pub fn parse_grpc_timeout(s: &str) -> Option<Duration> {
    if s.len() < 2 || s.len() > 9 {
        return None;
    }
    let (digits, unit) = s.split_at(s.len() - 1);
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_unit_and_rejects_junk() {
        assert_eq!(parse_grpc_timeout("150m"), Some(Duration::from_millis(150)));
        assert_eq!(parse_grpc_timeout("2S"), Some(Duration::from_secs(2)));
        assert_eq!(parse_grpc_timeout("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_grpc_timeout("10u"), Some(Duration::from_micros(10)));
        assert_eq!(parse_grpc_timeout("m"), None);
        assert_eq!(parse_grpc_timeout("123456789S"), None, "over 8 digits");
        assert_eq!(parse_grpc_timeout("5x"), None);
    }

    #[test]
    fn client_deadline_is_capped_and_default_applies() {
        let s = ServerSettings {
            default_timeout_ms: 1000,
            max_timeout_ms: 2000,
            ..Default::default()
        };
        let mut md = MetadataMap::new();
        let d = deadline(&md, &s) - Instant::now();
        assert!(
            d > Duration::from_millis(880) && d <= Duration::from_millis(1000),
            "{d:?}"
        );
        md.insert("grpc-timeout", "60S".parse().unwrap());
        let d = deadline(&md, &s) - Instant::now();
        assert!(
            d > Duration::from_millis(1960) && d <= Duration::from_millis(2000),
            "{d:?}"
        );
    }
}
