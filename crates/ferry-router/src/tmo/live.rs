//! What calls really cost on this device and endpoint: running estimates per call kind, for the
//! live budget mask. A profile ([`CostModel`]) is a published average for some other device and
//! network; a live dialogue's budget is spent at the prices this box and this cloud actually
//! charge, so the mask must judge the next call by those.
//!
//! The estimate of a kind that has been measured is the dearest of its last [`WINDOW`] calls
//! plus their spread (dearest − cheapest): an upper estimate, because the mask guards a budget,
//! that widens by itself when calls grow erratic (a loaded box, a congested link). A kind never measured keeps its
//! profile figure, raised by what measured kinds of the same tier showed the profile to miss:
//! the worst extra seconds of a measured cloud kind (a slow network adds latency to every
//! call), and the worst price ratio (a dearer endpoint multiplies every price).

use std::collections::VecDeque;

use super::profiles::CALL_KINDS;
use super::{Action, CallPrices, CostModel};

/// Calls of one kind the estimate remembers.
pub const WINDOW: usize = 16;

/// Running per-kind estimates, seeded from a profile.
#[derive(Debug, Clone, PartialEq)]
pub struct LiveCosts {
    profile: CallPrices,
    recent: [VecDeque<(f64, f64)>; CALL_KINDS],
}

fn max_of(v: impl Iterator<Item = f64>) -> Option<f64> {
    v.fold(None, |m, x| Some(m.map_or(x, |m: f64| m.max(x))))
}

impl LiveCosts {
    /// Estimates that start at `costs`' profile figures.
    pub fn new(costs: &CostModel) -> Self {
        LiveCosts {
            profile: costs.prices(),
            recent: Default::default(),
        }
    }

    /// Books one finished call of `a` that took `latency_s` and cost `usd`. Values that are not
    /// finite and non-negative are ignored (a clock or a price hint that cannot be trusted).
    pub fn observe(&mut self, a: Action, latency_s: f64, usd: f64) {
        if !(latency_s.is_finite() && latency_s >= 0.0 && usd.is_finite() && usd >= 0.0) {
            return;
        }
        let q = &mut self.recent[CallPrices::kind(a)];
        if q.len() == WINDOW {
            q.pop_front();
        }
        q.push_back((latency_s, usd));
    }

    /// Calls of `a`'s kind in the window.
    pub fn measured(&self, a: Action) -> usize {
        self.recent[CallPrices::kind(a)].len()
    }

    /// The prices the mask should judge the next call by.
    pub fn prices(&self) -> CallPrices {
        let mut p = self.profile;
        let measured = |k: usize| -> Option<(f64, f64)> {
            let q = &self.recent[k];
            let upper = |v: &dyn Fn(&(f64, f64)) -> f64| -> Option<f64> {
                let hi = max_of(q.iter().map(v))?;
                let lo = -max_of(q.iter().map(|x| -v(x)))?;
                Some(hi + (hi - lo))
            };
            Some((upper(&|x| x.0)?, upper(&|x| x.1)?))
        };
        // Cloud kinds never measured borrow the worst miss of the measured ones.
        let (mut extra_s, mut ratio_usd) = (0.0f64, 1.0f64);
        for k in 1..CALL_KINDS {
            if let Some((s, u)) = measured(k) {
                extra_s = extra_s.max(s - self.profile.latency_s[k]);
                if self.profile.usd[k] > 0.0 {
                    ratio_usd = ratio_usd.max(u / self.profile.usd[k]);
                }
            }
        }
        for k in 0..CALL_KINDS {
            match measured(k) {
                Some((s, u)) => {
                    p.latency_s[k] = s;
                    p.usd[k] = u;
                }
                None if k > 0 => {
                    p.latency_s[k] += extra_s;
                    p.usd[k] *= ratio_usd;
                }
                None => {}
            }
        }
        p
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn unmeasured_kinds_keep_the_profile_until_a_slow_cloud_raises_them() {
        let c = CostModel::by_name("jetson-tx2", "wifi").unwrap();
        let mut live = LiveCosts::new(&c);
        assert_eq!(live.prices(), c.prices());
        // A text-only cloud call took 3 s where the profile says 0.5 s, and cost 3× its price.
        let text = Action::cloud(0);
        live.observe(text, 3.0, 3.0 * c.cost_usd(text));
        let p = live.prices();
        assert_eq!(p.latency_s(text), 3.0);
        let all = Action::cloud(0b111);
        assert!((p.latency_s(all) - (c.latency_s(all) + 2.5)).abs() < 1e-12);
        assert!((p.usd(all) - 3.0 * c.cost_usd(all)).abs() < 1e-12);
        // Local is its own tier: unchanged until measured; then the measurements alone, the
        // dearest plus the spread (0.4 + 0.2 s, 2e-6 + 1e-6 $).
        assert_eq!(p.latency_s(Action::LOCAL), c.local_s);
        live.observe(Action::LOCAL, 0.4, 2e-6);
        live.observe(Action::LOCAL, 0.2, 1e-6);
        let p = live.prices();
        assert!((p.latency_s(Action::LOCAL) - 0.6).abs() < 1e-12);
        assert!((p.usd(Action::LOCAL) - 3e-6).abs() < 1e-18);
        // Untrustworthy values are not booked.
        live.observe(Action::LOCAL, f64::NAN, 0.0);
        live.observe(Action::LOCAL, -1.0, 0.0);
        assert_eq!(live.measured(Action::LOCAL), 2);
    }

    #[test]
    fn a_faster_cloud_lowers_only_what_it_measured() {
        let c = CostModel::reference();
        let mut live = LiveCosts::new(&c);
        let one = Action::cloud(0b010);
        live.observe(one, 1.0, c.cost_usd(one) / 2.0);
        let p = live.prices();
        assert_eq!(p.latency_s(one), 1.0);
        // No negative extra and no discount for kinds never measured.
        assert_eq!(p.latency_s(Action::cloud(0)), c.latency_s(Action::cloud(0)));
        assert_eq!(
            p.usd(Action::cloud(0b111)),
            c.cost_usd(Action::cloud(0b111))
        );
    }

    proptest! {
        /// The estimate of a measured kind is the dearest call still in its window plus the
        /// window's spread, so it covers every one of them; kinds never measured stay at or
        /// above the profile.
        #[test]
        fn measured_kinds_are_judged_by_their_dearest_recent_call_and_spread(
            calls in prop::collection::vec((0usize..9, 0.0f64..60.0, 0.0f64..0.1), 1..80)
        ) {
            let c = CostModel::reference();
            let mut live = LiveCosts::new(&c);
            for &(a, s, u) in &calls {
                live.observe(Action::from_index(a).unwrap(), s, u);
            }
            let p = live.prices();
            for k in 0..CALL_KINDS {
                let of_kind: Vec<(f64, f64)> = calls
                    .iter()
                    .filter(|x| CallPrices::kind(Action::from_index(x.0).unwrap()) == k)
                    .map(|x| (x.1, x.2))
                    .collect();
                let window = &of_kind[of_kind.len().saturating_sub(WINDOW)..];
                if window.is_empty() {
                    prop_assert!(p.latency_s[k] >= c.prices().latency_s[k]);
                    prop_assert!(p.usd[k] >= c.prices().usd[k]);
                    continue;
                }
                prop_assert!(window.iter().all(|x| x.0 <= p.latency_s[k] && x.1 <= p.usd[k]));
                let hi = window.iter().map(|x| x.0).fold(f64::MIN, f64::max);
                let lo = window.iter().map(|x| x.0).fold(f64::MAX, f64::min);
                prop_assert!((p.latency_s[k] - (2.0 * hi - lo)).abs() < 1e-9);
            }
        }
    }
}
