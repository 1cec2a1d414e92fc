//! Splitting measured energy among concurrent requests.
//!
//! The meter closes a measurement interval at every sampler tick and at every request start and
//! end, so within one interval the set of running requests never changes. Each interval's joules
//! then go in equal parts to the requests running in it — which is exactly each request's share of
//! the busy time in that interval — or, when none ran, to `idle`. Splitting by busy time rather
//! than by tokens keeps prefill (many tokens, one forward pass) and decode (one token per pass)
//! on the same footing and needs no knowledge of the engine. Queue time is not busy time: a
//! request is registered only once it holds an execution slot.
//!
//! Invariants (property-tested): every request's joules are ≥ 0, `attributed + idle = measured`
//! over any sequence of operations (up to float rounding), and requests that run over the same
//! intervals get the same joules.

use std::collections::BTreeMap;

/// Running totals of one meter.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize)]
pub struct Totals {
    /// All energy measured since the meter started.
    pub measured_joules: f64,
    /// Energy given to requests (finished or running).
    pub attributed_joules: f64,
    /// Energy of intervals with no request running.
    pub idle_joules: f64,
    /// Negative increments from a source (a counter reset) that were ignored.
    pub ignored_negative_joules: f64,
}

/// Per-request energy accounts.
#[derive(Debug, Default)]
pub struct Ledger {
    active: BTreeMap<u64, f64>,
    next_id: u64,
    totals: Totals,
}

impl Ledger {
    pub fn new() -> Self {
        Self::default()
    }

    /// Books the energy of the interval that just closed.
    pub fn record(&mut self, delta_joules: f64) {
        if !delta_joules.is_finite() {
            return;
        }
        if delta_joules < 0.0 {
            self.totals.ignored_negative_joules -= delta_joules;
            return;
        }
        self.totals.measured_joules += delta_joules;
        if self.active.is_empty() {
            self.totals.idle_joules += delta_joules;
            return;
        }
        let share = delta_joules / self.active.len() as f64;
        for j in self.active.values_mut() {
            *j += share;
        }
        self.totals.attributed_joules += delta_joules;
    }

    /// Books a signed correction of the joules booked since the last exact reading of an
    /// interpolating source (its ticks overshot or undershot the counter). Since every request
    /// start and end is an exact reading, the requests running now are exactly those that ran
    /// through all of those intervals, so a positive correction goes to them like any interval,
    /// and a negative one is taken back from them in equal parts (from idle when none runs).
    /// Nothing goes below zero: what cannot be taken back is counted as ignored.
    pub fn correct(&mut self, delta_joules: f64) {
        if !delta_joules.is_finite() {
            return;
        }
        if delta_joules >= 0.0 {
            self.record(delta_joules);
            return;
        }
        let mut owed = -delta_joules;
        if !self.active.is_empty() {
            let share = owed / self.active.len() as f64;
            let mut taken = 0.0;
            for j in self.active.values_mut() {
                let t = share.min(*j);
                *j -= t;
                taken += t;
            }
            self.totals.attributed_joules -= taken;
            self.totals.measured_joules -= taken;
            owed -= taken;
        }
        let t = owed.min(self.totals.idle_joules);
        self.totals.idle_joules -= t;
        self.totals.measured_joules -= t;
        self.totals.ignored_negative_joules += owed - t;
    }

    /// Opens an account for a request that starts running now.
    pub fn begin(&mut self) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        self.active.insert(id, 0.0);
        id
    }

    /// Closes a request's account and returns its joules (0 for an unknown id).
    pub fn end(&mut self, id: u64) -> f64 {
        self.active.remove(&id).unwrap_or(0.0)
    }

    /// Requests currently running.
    pub fn running(&self) -> usize {
        self.active.len()
    }

    /// Joules attributed so far to a running request.
    pub fn so_far(&self, id: u64) -> Option<f64> {
        self.active.get(&id).copied()
    }

    pub fn totals(&self) -> Totals {
        self.totals
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn idle_and_shared_intervals() {
        let mut l = Ledger::new();
        l.record(5.0);
        let a = l.begin();
        l.record(2.0);
        let b = l.begin();
        l.record(4.0);
        assert_eq!(l.end(a), 4.0);
        l.record(1.0);
        assert_eq!(l.end(b), 3.0);
        let t = l.totals();
        assert_eq!(
            (t.measured_joules, t.idle_joules, t.attributed_joules),
            (12.0, 5.0, 7.0)
        );
        assert_eq!(l.end(a), 0.0, "an account closes once");
    }

    #[test]
    fn corrections_go_to_the_requests_running() {
        let mut l = Ledger::new();
        l.record(10.0);
        let a = l.begin();
        let b = l.begin();
        l.record(6.0);
        // The ticks overshot by 2 J: taken back from both.
        l.correct(-2.0);
        assert_eq!(l.so_far(a), Some(2.0));
        l.correct(1.0);
        assert_eq!(l.end(a), 2.5);
        assert_eq!(l.end(b), 2.5);
        l.correct(-3.0);
        let t = l.totals();
        assert_eq!(
            (t.measured_joules, t.idle_joules, t.attributed_joules),
            (12.0, 7.0, 5.0)
        );
        // More than there is: the rest is ignored, nothing goes negative.
        l.correct(-100.0);
        let t = l.totals();
        assert_eq!((t.idle_joules, t.ignored_negative_joules), (0.0, 93.0));
    }

    #[derive(Debug, Clone)]
    enum Op {
        Correct(f64),
        Record(f64),
        Begin,
        End(usize),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (-20.0f64..20.0).prop_map(Op::Correct),
            (-1.0f64..50.0).prop_map(Op::Record),
            Just(Op::Begin),
            (0usize..8).prop_map(Op::End),
        ]
    }

    proptest! {
        #[test]
        fn conservation_and_non_negativity(ops in proptest::collection::vec(op(), 0..200)) {
            let mut l = Ledger::new();
            let mut open: Vec<u64> = Vec::new();
            let mut finished = 0.0;
            for o in ops {
                match o {
                    Op::Record(j) => l.record(j),
                    Op::Correct(j) => l.correct(j),
                    Op::Begin => open.push(l.begin()),
                    Op::End(i) if !open.is_empty() => {
                        let id = open.remove(i % open.len());
                        let j = l.end(id);
                        prop_assert!(j >= 0.0);
                        finished += j;
                    }
                    Op::End(_) => {}
                }
            }
            let running: f64 = open.iter().map(|id| l.so_far(*id).unwrap()).sum();
            let t = l.totals();
            prop_assert!(running >= 0.0);
            prop_assert!((finished + running - t.attributed_joules).abs() < 1e-6 * (1.0 + t.measured_joules));
            prop_assert!((t.attributed_joules + t.idle_joules - t.measured_joules).abs() < 1e-6 * (1.0 + t.measured_joules));
        }

        #[test]
        fn equal_concurrent_requests_get_equal_shares(deltas in proptest::collection::vec(0.0f64..10.0, 1..50)) {
            let mut l = Ledger::new();
            let a = l.begin();
            let b = l.begin();
            for d in deltas { l.record(d); }
            prop_assert_eq!(l.end(a), l.end(b));
        }
    }
}
