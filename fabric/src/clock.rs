//! Wall-clock time as the fabric writes it: seconds for token expiry, milliseconds for
//! expiry checks on the data path, RFC 3339 for Kubernetes conditions. A clock before
//! 1970 reads as the epoch; nothing here panics.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Time since the Unix epoch (zero for a clock set before it).
pub fn since_epoch() -> Duration {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
}

/// Seconds since the Unix epoch.
pub fn unix_secs() -> u64 {
    since_epoch().as_secs()
}

/// Milliseconds since the Unix epoch.
pub fn unix_millis() -> i64 {
    i64::try_from(since_epoch().as_millis()).unwrap_or(i64::MAX)
}

/// Now as RFC 3339 UTC, whole seconds, as Kubernetes writes `lastTransitionTime`.
pub fn now_rfc3339() -> String {
    rfc3339(i64::try_from(unix_secs()).unwrap_or(i64::MAX))
}

/// `secs` since the Unix epoch as RFC 3339 UTC, whole seconds.
pub fn rfc3339(secs: i64) -> String {
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // Civil date from days since 1970-01-01 (H. Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// The longest time a seconds flag (`--drain-timeout`) may name: a day.
pub const MAX_FLAG_SECS: f64 = 86_400.0;

/// A flag value in seconds: a finite number from 0 to `MAX_FLAG_SECS`, so that turning
/// it into a `Duration` cannot panic (`inf`, `NaN` and overflowing values could).
pub fn parse_flag_secs(s: &str) -> Result<f64, String> {
    let v: f64 = s
        .trim()
        .parse()
        .map_err(|_| format!("{s:?} is not a number of seconds"))?;
    if v.is_finite() && (0.0..=MAX_FLAG_SECS).contains(&v) {
        Ok(v)
    } else {
        Err(format!(
            "{s:?} is out of range: a number of seconds from 0 to {MAX_FLAG_SECS}"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_dates() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_798_761_599), "2026-12-31T23:59:59Z");
        assert!(now_rfc3339().ends_with('Z'));
    }

    #[test]
    fn flag_seconds_are_finite_and_bounded() {
        assert_eq!(super::parse_flag_secs("2.5"), Ok(2.5));
        assert_eq!(super::parse_flag_secs("0"), Ok(0.0));
        for bad in ["inf", "-inf", "NaN", "-1", "1e30", "86401", "ten", ""] {
            assert!(super::parse_flag_secs(bad).is_err(), "{bad} accepted");
        }
    }
}
