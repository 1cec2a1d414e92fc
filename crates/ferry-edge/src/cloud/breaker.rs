//! The circuit breaker of one endpoint (linkerd2-proxy's failure accrual, simplified):
//! consecutive failures before the first token open it, one trial after `open_ms` decides
//! whether it closes. Pure: time is passed in, as `tokio::time::Instant` so callers can pause it.

use std::time::Duration;

use tokio::time::Instant;

/// State of an endpoint's circuit breaker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CircuitState {
    /// Requests flow.
    Closed,
    /// Requests are refused until `open_ms` passed.
    Open,
    /// One trial request is in flight; its outcome closes or reopens the circuit.
    HalfOpen,
}

impl CircuitState {
    /// Lower-case name for status and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            CircuitState::Closed => "closed",
            CircuitState::Open => "open",
            CircuitState::HalfOpen => "half_open",
        }
    }

    /// Gauge value: 0 closed, 1 half-open, 2 open.
    pub fn gauge(self) -> f64 {
        match self {
            CircuitState::Closed => 0.0,
            CircuitState::HalfOpen => 1.0,
            CircuitState::Open => 2.0,
        }
    }
}

/// A circuit breaker over consecutive failures; pure (time is passed in) so it can be tested.
#[derive(Debug, Clone)]
pub struct Breaker {
    state: CircuitState,
    consecutive_failures: u32,
    opened_at: Option<Instant>,
    threshold: u32,
    pub(super) open_for: Duration,
    /// Times the circuit opened, for status.
    pub opened_total: u64,
}

impl Breaker {
    /// A closed breaker that opens after `threshold` consecutive failures for `open_for`.
    pub fn new(threshold: u32, open_for: Duration) -> Self {
        Breaker {
            state: CircuitState::Closed,
            consecutive_failures: 0,
            opened_at: None,
            threshold: threshold.max(1),
            open_for,
            opened_total: 0,
        }
    }

    /// The state as of `now` (an open circuit whose time is up reads as half-open-ready).
    pub fn state(&self) -> CircuitState {
        self.state
    }

    /// Whether a request could go through at `now`, without reserving it.
    pub fn would_allow(&self, now: Instant) -> bool {
        match self.state {
            CircuitState::Closed => true,
            CircuitState::HalfOpen => false,
            CircuitState::Open => self
                .opened_at
                .is_some_and(|t| now.duration_since(t) >= self.open_for),
        }
    }

    /// Lets a request through at `now` if the circuit allows it; an open circuit whose time is
    /// up lets exactly one trial through and becomes half-open.
    pub fn allow(&mut self, now: Instant) -> bool {
        match self.state {
            CircuitState::Closed => true,
            CircuitState::HalfOpen => false,
            CircuitState::Open if self.would_allow(now) => {
                self.state = CircuitState::HalfOpen;
                true
            }
            CircuitState::Open => false,
        }
    }

    /// A request succeeded (its first token arrived): the circuit closes.
    pub fn success(&mut self) {
        self.state = CircuitState::Closed;
        self.consecutive_failures = 0;
        self.opened_at = None;
    }

    /// A request failed before its first token at `now`.
    pub fn failure(&mut self, now: Instant) {
        match self.state {
            CircuitState::HalfOpen => self.open(now),
            CircuitState::Closed => {
                self.consecutive_failures += 1;
                if self.consecutive_failures >= self.threshold {
                    self.open(now);
                }
            }
            // A request let through before the circuit opened failed late: nothing new.
            CircuitState::Open => {}
        }
    }

    /// A trial request ended without telling anything (cancelled by its app): let the next one try.
    pub fn release_trial(&mut self, now: Instant) {
        if self.state == CircuitState::HalfOpen {
            self.state = CircuitState::Open;
            // Already waited: the next request may try at once.
            self.opened_at = now.checked_sub(self.open_for).or(Some(now));
        }
    }

    fn open(&mut self, now: Instant) {
        self.state = CircuitState::Open;
        self.opened_at = Some(now);
        self.consecutive_failures = 0;
        self.opened_total += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn breaker_opens_after_threshold_and_closes_after_a_good_trial() {
        let t0 = Instant::now();
        let mut b = Breaker::new(3, Duration::from_millis(100));
        for _ in 0..2 {
            assert!(b.allow(t0));
            b.failure(t0);
            assert_eq!(b.state(), CircuitState::Closed);
        }
        b.failure(t0);
        assert_eq!(b.state(), CircuitState::Open);
        assert!(!b.allow(t0 + Duration::from_millis(50)));
        // Time is up: exactly one trial.
        let t1 = t0 + Duration::from_millis(100);
        assert!(b.allow(t1));
        assert_eq!(b.state(), CircuitState::HalfOpen);
        assert!(!b.allow(t1));
        b.success();
        assert_eq!(b.state(), CircuitState::Closed);
        assert!(b.allow(t1));
        assert_eq!(b.opened_total, 1);
    }

    #[test]
    fn a_failed_trial_reopens_and_a_success_resets_the_count() {
        let t0 = Instant::now();
        let mut b = Breaker::new(2, Duration::from_millis(10));
        b.failure(t0);
        b.success();
        b.failure(t0);
        assert_eq!(b.state(), CircuitState::Closed, "the count restarted");
        b.failure(t0);
        assert_eq!(b.state(), CircuitState::Open);
        let t1 = t0 + Duration::from_millis(10);
        assert!(b.allow(t1));
        b.failure(t1);
        assert_eq!(b.state(), CircuitState::Open);
        assert!(!b.allow(t1 + Duration::from_millis(5)));
        assert_eq!(b.opened_total, 2);
    }

    #[test]
    fn an_abandoned_trial_lets_the_next_request_try() {
        let t0 = Instant::now();
        let mut b = Breaker::new(1, Duration::from_millis(10));
        b.failure(t0);
        let t1 = t0 + Duration::from_millis(10);
        assert!(b.allow(t1));
        b.release_trial(t1);
        assert_eq!(b.state(), CircuitState::Open);
        assert!(b.allow(t1));
    }

    proptest! {
        /// Whatever happens, an open circuit never lets a request through before its time, and
        /// a half-open one lets through nothing until its trial ends.
        #[test]
        fn breaker_never_lets_through_while_open(ops in proptest::collection::vec((0u8..4, 0u64..30), 1..200)) {
            let t0 = Instant::now();
            let mut b = Breaker::new(3, Duration::from_millis(20));
            let mut now = t0;
            let mut opened_at = None;
            for (op, dt) in ops {
                now += Duration::from_millis(dt);
                let before = b.state();
                match op {
                    0 => {
                        let allowed = b.allow(now);
                        match before {
                            CircuitState::HalfOpen => prop_assert!(!allowed),
                            CircuitState::Open => {
                                let waited = now.duration_since(opened_at.unwrap()) >= Duration::from_millis(20);
                                prop_assert_eq!(allowed, waited);
                            }
                            CircuitState::Closed => prop_assert!(allowed),
                        }
                    }
                    1 => b.failure(now),
                    2 => b.success(),
                    _ => b.release_trial(now),
                }
                if b.state() == CircuitState::Open && before != CircuitState::Open {
                    opened_at = Some(if op == 3 { now - Duration::from_millis(20) } else { now });
                }
            }
        }
    }
}
