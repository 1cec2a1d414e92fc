//! The `grpc-timeout` header, parsed once for every ferry server: `<digits><unit>` with at most
//! 8 digits (the gRPC spec's `TimeoutValue`) and a unit of `H M S m u n`.

use std::time::Duration;

/// Parses a `grpc-timeout` value; `None` for anything the spec does not allow (including
/// non-ASCII text, more than 8 digits, or a duration that overflows).
pub fn parse_grpc_timeout(value: &str) -> Option<Duration> {
    let bytes = value.as_bytes();
    if !(2..=9).contains(&bytes.len()) {
        return None;
    }
    let (digits, unit) = bytes.split_at(bytes.len() - 1);
    if !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    // ASCII digits only, so this is valid UTF-8 and fits in a u64 (at most 8 digits).
    let n: u64 = std::str::from_utf8(digits).ok()?.parse().ok()?;
    Some(match unit[0] {
        b'H' => Duration::from_secs(n.checked_mul(3600)?),
        b'M' => Duration::from_secs(n.checked_mul(60)?),
        b'S' => Duration::from_secs(n),
        b'm' => Duration::from_millis(n),
        b'u' => Duration::from_micros(n),
        b'n' => Duration::from_nanos(n),
        _ => return None,
    })
}

/// How long before a request's deadline a ferry server gives up on it itself: a tenth of the
/// budget, at most 1 s. The client's timer started before the request crossed the network (and,
/// on a saturated box, before the server's runtime got to it), so a server that waits until the
/// deadline loses the race and the client sees only its own bare DEADLINE_EXCEEDED; stopping
/// this much earlier lets the server's status — why, and what was delivered — reach the client
/// first. (The soak saw 250 ms lose that race 10 times in 782 requests with 100 streams on two
/// cores.)
pub fn margin(budget: Duration) -> Duration {
    (budget / 10).min(Duration::from_secs(1))
}

/// When a request that arrived at `arrived` with `budget` stops being worked on (see [`margin`]);
/// for std's or tokio's `Instant` (ferryd's deadlines run on tokio's, so tests can pause time).
pub fn give_up_at<I>(arrived: I, budget: Duration) -> I
where
    I: std::ops::Add<Duration, Output = I> + std::ops::Sub<Duration, Output = I>,
{
    arrived + budget - margin(budget)
}

/// The request's `grpc-timeout` as a duration, if it sent a valid one.
pub fn grpc_timeout(meta: &tonic::metadata::MetadataMap) -> Option<Duration> {
    parse_grpc_timeout(meta.get("grpc-timeout")?.to_str().ok()?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn the_margin_is_a_tenth_of_the_budget_up_to_250_ms() {
        assert_eq!(
            margin(Duration::from_millis(500)),
            Duration::from_millis(50)
        );
        assert_eq!(margin(Duration::from_secs(5)), Duration::from_millis(500));
        assert_eq!(margin(Duration::from_secs(120)), Duration::from_secs(1));
        assert_eq!(margin(Duration::ZERO), Duration::ZERO);
        let t = std::time::Instant::now();
        assert_eq!(
            give_up_at(t, Duration::from_secs(1)),
            t + Duration::from_millis(900)
        );
    }

    #[test]
    fn parses_the_spec_and_refuses_the_rest() {
        for (v, d) in [
            ("250m", Duration::from_millis(250)),
            ("3S", Duration::from_secs(3)),
            ("1H", Duration::from_secs(3600)),
            ("1M", Duration::from_secs(60)),
            ("7u", Duration::from_micros(7)),
            ("99999999n", Duration::from_nanos(99_999_999)),
        ] {
            assert_eq!(parse_grpc_timeout(v), Some(d), "{v}");
        }
        for bad in [
            "",
            "m",
            "5x",
            "1234567890m",
            "-1S",
            "+1S",
            "1.5S",
            "1é",
            "é",
            "１S",
        ] {
            assert_eq!(parse_grpc_timeout(bad), None, "{bad:?}");
        }
        let mut m = tonic::metadata::MetadataMap::new();
        assert_eq!(grpc_timeout(&m), None);
        m.insert("grpc-timeout", "150m".parse().unwrap());
        assert_eq!(grpc_timeout(&m), Some(Duration::from_millis(150)));
    }

    proptest! {
        #[test]
        fn any_text_parses_or_is_refused_without_a_panic(s in "\\PC{0,12}") {
            if let Some(d) = parse_grpc_timeout(&s) {
                prop_assert!(d <= Duration::from_secs(99_999_999 * 3600));
            }
        }
    }
}
