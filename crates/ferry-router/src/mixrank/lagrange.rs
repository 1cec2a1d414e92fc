//! The Lagrangian threshold rule: serve `argmin_m c_m − λ·p_m(x)`, with the price of
//! satisfaction `λ` (in the cost unit) set so that the expected satisfaction over a reference
//! set of recent requests meets a target.
//!
//! For one request, as `λ` rises from 0 the chosen model walks up the lower convex hull of its
//! points `(p_m(x), c_m)`: from the cheapest model to ever more satisfying and costlier ones,
//! switching at the hull's slopes. Collecting every reference request's switch points and
//! sorting them gives the expected satisfaction and cost as exact step functions of `λ`; the
//! target falls inside one step, and serving the switch with the probability that lands the
//! expectation on the target is the cheapest policy of this family that meets it. With
//! predictions that do not depend on the request this is exactly the cheapest fixed mix of two
//! models (the linear program's solution); with informative ones, the requests whose
//! satisfaction gains most per unit of cost move up first.

/// One switch of one request: at `lambda` its choice moves to a model `dp` more likely to
/// satisfy and `dc` more costly.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Switch {
    lambda: f64,
    dp: f64,
    dc: f64,
}

/// The cheapest model for `lambda = 0`: lowest cost, ties to the more satisfying, then the
/// lower index.
fn start(p: &[f64], cost: &[f64]) -> usize {
    let mut best = 0;
    for m in 1..p.len() {
        if cost[m] < cost[best] || (cost[m] == cost[best] && p[m] > p[best]) {
            best = m;
        }
    }
    best
}

/// Walks the lower convex hull of `(p_m, c_m)` from the cheapest model, calling `visit` with
/// each switch and the model it switches to.
fn walk(p: &[f64], cost: &[f64], mut visit: impl FnMut(Switch, usize) -> bool) -> usize {
    let mut cur = start(p, cost);
    let mut lambda = 0.0f64;
    loop {
        let mut next: Option<(f64, usize)> = None;
        for m in 0..p.len() {
            let dp = p[m] - p[cur];
            if dp <= 1e-12 {
                continue;
            }
            let slope = ((cost[m] - cost[cur]) / dp).max(lambda);
            // Equal slopes: jump straight to the most satisfying model on that line.
            let better = match next {
                None => true,
                Some((s, n)) => slope < s || (slope == s && p[m] > p[n]),
            };
            if better {
                next = Some((slope, m));
            }
        }
        let Some((slope, m)) = next else {
            return cur;
        };
        let sw = Switch {
            lambda: slope,
            dp: p[m] - p[cur],
            dc: cost[m] - cost[cur],
        };
        if !visit(sw, m) {
            return cur;
        }
        lambda = slope;
        cur = m;
    }
}

/// Where the threshold stands for one target.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Threshold {
    /// The price of satisfaction at which the target is crossed (`f64::INFINITY` when the
    /// target is out of reach and every request gets its most satisfying model).
    pub lambda: f64,
    /// Probability of taking the switches at exactly `lambda` (0 when the target needs none).
    pub upper_prob: f64,
    /// Expected satisfaction of the reference requests under this threshold.
    pub satisfaction: f64,
    /// Expected cost per reference request under this threshold.
    pub cost: f64,
    /// Whether the target is reachable at all.
    pub reachable: bool,
    /// The lowest price at which any reference request switches (`f64::INFINITY` if none):
    /// the scale of prices when the cheapest choices already meet the target.
    pub first_switch: f64,
}

/// The threshold that meets `target` in expectation over the reference requests, whose
/// per-model predicted satisfaction is `preds[r]` (each the zoo's length), at per-model costs
/// `cost`.
pub fn threshold(preds: &[Vec<f64>], cost: &[f64], target: f64) -> Threshold {
    let n = preds.len().max(1) as f64;
    let mut sat = 0.0;
    let mut spent = 0.0;
    let mut switches = Vec::with_capacity(preds.len() * 2);
    for p in preds {
        let mut cur = start(p, cost);
        sat += p[cur];
        spent += cost[cur];
        walk(p, cost, |sw, m| {
            switches.push(Switch {
                lambda: sw.lambda,
                dp: p[m] - p[cur],
                dc: sw.dc,
            });
            cur = m;
            true
        });
    }
    sat /= n;
    spent /= n;
    switches.sort_by(|a, b| a.lambda.total_cmp(&b.lambda));
    let first_switch = switches.first().map_or(f64::INFINITY, |s| s.lambda);
    if sat >= target || preds.is_empty() {
        return Threshold {
            lambda: 0.0,
            upper_prob: 0.0,
            satisfaction: sat,
            cost: spent,
            reachable: true,
            first_switch,
        };
    }
    let mut i = 0;
    while i < switches.len() {
        // All switches at one price move together; the target may fall inside the group.
        let lambda = switches[i].lambda;
        let (mut dp, mut dc) = (0.0, 0.0);
        while i < switches.len() && switches[i].lambda == lambda {
            dp += switches[i].dp / n;
            dc += switches[i].dc / n;
            i += 1;
        }
        if sat + dp >= target - 1e-12 {
            let w = if dp > 0.0 {
                ((target - sat) / dp).clamp(0.0, 1.0)
            } else {
                1.0
            };
            return Threshold {
                lambda,
                upper_prob: w,
                satisfaction: sat + w * dp,
                cost: spent + w * dc,
                reachable: true,
                first_switch,
            };
        }
        sat += dp;
        spent += dc;
    }
    Threshold {
        lambda: f64::INFINITY,
        upper_prob: 1.0,
        satisfaction: sat,
        cost: spent,
        reachable: false,
        first_switch,
    }
}

/// The model one request with predictions `p` gets under `th`; `take_upper` says whether the
/// switches at exactly `th.lambda` are taken (draw it with probability `th.upper_prob`).
pub fn choose(p: &[f64], cost: &[f64], th: &Threshold, take_upper: bool) -> usize {
    choose_with(p, cost, th.lambda, take_upper)
}

/// The model at price `lambda`, taking the switches at exactly that price when `take_upper`.
pub fn choose_with(p: &[f64], cost: &[f64], lambda: f64, take_upper: bool) -> usize {
    walk(p, cost, |sw, _| {
        sw.lambda < lambda || (sw.lambda == lambda && take_upper)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn constant_predictions_give_the_cheapest_two_model_mix() {
        // Rates 0.5, 0.7, 0.9 at costs 1, 5, 20; alpha 0.6: half of model 0 and half of model 1
        // (the same answer as baselines::cheapest_mix).
        let preds = vec![vec![0.5, 0.7, 0.9]; 4];
        let c = [1.0, 5.0, 20.0];
        let th = threshold(&preds, &c, 0.6);
        assert!(th.reachable);
        assert!((th.lambda - 20.0).abs() < 1e-9, "{th:?}");
        assert!((th.upper_prob - 0.5).abs() < 1e-9);
        assert!((th.cost - 3.0).abs() < 1e-9 && (th.satisfaction - 0.6).abs() < 1e-12);
        assert_eq!(choose(&preds[0], &c, &th, false), 0);
        assert_eq!(choose(&preds[0], &c, &th, true), 1);
        // Above 0.7 the mix is models 1 and 2.
        let th = threshold(&preds, &c, 0.8);
        assert_eq!(choose(&preds[0], &c, &th, false), 1);
        assert_eq!(choose(&preds[0], &c, &th, true), 2);
        // Out of reach: the most satisfying model.
        let th = threshold(&preds, &c, 0.95);
        assert!(!th.reachable);
        assert_eq!(choose(&preds[0], &c, &th, true), 2);
        // Below the cheapest model's rate: the cheapest model.
        let th = threshold(&preds, &c, 0.3);
        assert_eq!((th.lambda, th.upper_prob), (0.0, 0.0));
        assert_eq!(choose(&preds[0], &c, &th, false), 0);
    }

    #[test]
    fn dominated_models_are_skipped() {
        // Model 1 costs more than model 2 and satisfies less: never on the hull.
        let p = vec![0.5, 0.6, 0.9];
        let c = [1.0, 30.0, 20.0];
        let mut seen = Vec::new();
        walk(&p, &c, |_, m| {
            seen.push(m);
            true
        });
        assert_eq!(seen, vec![2]);
    }

    #[test]
    fn informative_predictions_move_the_biggest_gains_first() {
        // Two requests: on the first the expensive model gains 0.4, on the second 0.05.
        let preds = vec![vec![0.5, 0.9], vec![0.9, 0.95]];
        let c = [1.0, 10.0];
        let th = threshold(&preds, &c, 0.9);
        assert_eq!(th.upper_prob, 1.0);
        assert_eq!(choose(&preds[0], &c, &th, true), 1);
        assert_eq!(choose(&preds[1], &c, &th, true), 0);
        // Meeting 0.9 costs one expensive call per two requests, not a 0.9/0.1 random mix.
        assert!((th.cost - 5.5).abs() < 1e-9, "{th:?}");
    }

    proptest! {
        /// The threshold's expected satisfaction lands on any reachable target, its
        /// probability is in [0, 1], and choosing by it never serves a dominated model.
        #[test]
        fn threshold_meets_reachable_targets(
            rows in proptest::collection::vec(proptest::collection::vec(0.0f64..1.0, 3), 1..20),
            costs in proptest::collection::vec(0.01f64..100.0, 3),
            target in 0.0f64..1.0,
        ) {
            let th = threshold(&rows, &costs, target);
            prop_assert!((0.0..=1.0).contains(&th.upper_prob));
            let best: f64 = rows.iter().map(|p| p.iter().cloned().fold(0.0, f64::max)).sum::<f64>() / rows.len() as f64;
            if th.reachable {
                prop_assert!(th.satisfaction + 1e-9 >= target.min(best));
                // The exact expectation of the randomised choice equals the reported one.
                let n = rows.len() as f64;
                let (mut s, mut c) = (0.0, 0.0);
                for p in &rows {
                    let lo = choose(p, &costs, &th, false);
                    let hi = choose(p, &costs, &th, true);
                    s += ((1.0 - th.upper_prob) * p[lo] + th.upper_prob * p[hi]) / n;
                    c += ((1.0 - th.upper_prob) * costs[lo] + th.upper_prob * costs[hi]) / n;
                }
                prop_assert!((s - th.satisfaction).abs() < 1e-9, "{s} vs {th:?}");
                prop_assert!((c - th.cost).abs() < 1e-6 * (1.0 + c), "{c} vs {th:?}");
            } else {
                prop_assert!(target > best - 1e-9);
            }
            for p in &rows {
                let m = choose(p, &costs, &th, true);
                for k in 0..3 {
                    prop_assert!(!(costs[k] < costs[m] && p[k] > p[m]), "served a dominated model");
                }
            }
        }
    }
}
