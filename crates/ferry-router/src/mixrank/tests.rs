//! Tests of the mixrank policy on simulated IRT streams: the SLA is met, the mix is the cheap one, ranking pays when difficulty carries signal, and state round-trips.

use super::*;
use crate::baselines::cheapest_mix;
use proptest::prelude::*;
use rand::rngs::StdRng;
use rand::Rng;
use rand::SeedableRng;

/// A simulated stream: per request a difficulty, per model an ability; labels from the IRT
/// model, costs fixed per model. Returns (satisfaction, cost per request, calls per model).
struct Sim {
    abilities: Vec<f64>,
    costs: Vec<f64>,
    /// Spread of the request difficulties.
    spread: f64,
    /// Whether the features reveal the difficulty (a 2-d embedding around its angle).
    reveal: bool,
}

struct Outcome {
    satisfaction: f64,
    cost: f64,
    calls: Vec<u64>,
    random_alpha_cost: f64,
}

impl Sim {
    /// Three models of rising ability and cost, the difficulty revealed by the features.
    fn three_models() -> Self {
        Sim {
            abilities: vec![0.0, 1.0, 2.0],
            costs: vec![1.0, 4.0, 20.0],
            spread: 1.0,
            reveal: true,
        }
    }

    /// Rates about 0.45 / 0.7 / 0.8 at costs 1 / 5 / 25, every request alike: at α 0.6 the mix
    /// is models 0 and 1, and model 2 is dominated.
    fn no_signal() -> Self {
        Sim {
            abilities: vec![-0.2, 0.85, 1.4],
            costs: vec![1.0, 5.0, 25.0],
            spread: 0.0,
            reveal: false,
        }
    }

    fn rates(&self, rng: &mut StdRng, n: usize) -> Vec<f64> {
        // Monte-Carlo rates for the random-α baseline.
        let mut acc = vec![0.0; self.abilities.len()];
        for _ in 0..n {
            let b = self.spread * (rng.random::<f64>() * 2.0 - 1.0);
            for (m, a) in self.abilities.iter().enumerate() {
                acc[m] += irt::sigmoid(a - b) / n as f64;
            }
        }
        acc
    }

    fn run(&self, policy: &mut MixRank, n: usize, seed: u64) -> Outcome {
        let mut rng = StdRng::seed_from_u64(seed);
        let k = self.abilities.len();
        let (mut sat, mut cost) = (0.0, 0.0);
        let mut calls = vec![0u64; k];
        for _ in 0..n {
            let u = rng.random::<f64>() * 2.0 - 1.0;
            let b = self.spread * u;
            let angle = u * 1.2;
            let x = if self.reveal {
                vec![angle.cos() as f32, angle.sin() as f32]
            } else {
                vec![1.0, 0.0]
            };
            let d = policy.decide(&x);
            let m = d.served(k);
            let s = rng.random::<f64>() < irt::sigmoid(self.abilities[m] - b);
            let mut costs = vec![None; k];
            costs[m] = Some(self.costs[m]);
            let mut labels = vec![None; k];
            labels[m] = Some(s);
            // A shadow runs too: charged, labelled, not served.
            for o in d.also_runs(k) {
                costs[o] = Some(self.costs[o]);
                labels[o] = Some(rng.random::<f64>() < irt::sigmoid(self.abilities[o] - b));
                cost += self.costs[o];
            }
            policy.observe(
                &x,
                d,
                &Observation {
                    costs,
                    satisfied: labels,
                    feedback: true,
                },
            );
            sat += f64::from(u8::from(s));
            cost += self.costs[m];
            calls[m] += 1;
        }
        let rates = self.rates(&mut rng, 20_000);
        let mix = cheapest_mix(&rates, &self.costs, policy.config().alpha).unwrap();
        Outcome {
            satisfaction: sat / n as f64,
            cost: cost / n as f64,
            calls,
            random_alpha_cost: mix.iter().zip(&self.costs).map(|(p, c)| p * c).sum(),
        }
    }
}

/// A request without features, task or length, that can get feedback.
fn featureless(label_unserved: bool) -> RouteRequest<'static> {
    RouteRequest {
        features: &[],
        task: None,
        feedback_expected: true,
        label_unserved,
        text_chars: None,
    }
}

/// Books `(model, satisfied, answers)` of labelled history at `costs` on a featureless policy
/// (`served`: whether the labels move the SLA debt).
fn seed_history(p: &mut MixRank, costs: &[f64], history: &[(usize, usize, usize)], served: bool) {
    for &(m, good, n) in history {
        for i in 0..n {
            p.record_cost(m, costs[m]);
            p.record_label(&blank_ticket(m), i < good, served);
        }
    }
}

/// A featureless ticket for `model`.
fn blank_ticket(model: usize) -> Ticket {
    Ticket {
        model,
        x: Vec::new(),
        task: None,
        difficulty: [0.0, 0.0],
        length: 0.0,
    }
}

#[test]
fn without_signal_it_meets_alpha_near_the_cheapest_mix() {
    // Rates about 0.45 / 0.7 / 0.8 at costs 1 / 5 / 25, alpha 0.6: the mix is models 0 and 1.
    // The price of learning the rates (the dominated model's tries, the margin) is a fixed
    // sum, a few percent of 10,000 requests.
    let sim = Sim::no_signal();
    for seed in 0..3 {
        let mut p = MixRank::new(MixRankConfig::new(0.6, seed), 3, 2, None).unwrap();
        let o = sim.run(&mut p, 10_000, seed);
        assert!(
            o.satisfaction >= 0.6 - 0.005,
            "seed {seed}: {}",
            o.satisfaction
        );
        assert!(
            o.cost <= o.random_alpha_cost * 1.10,
            "seed {seed}: {} vs random-alpha {}",
            o.cost,
            o.random_alpha_cost
        );
        assert!(o.calls[2] < 150, "the dominated model served {:?}", o.calls);
    }
}

#[test]
fn known_rates_are_used_as_given_and_never_explored() {
    // The stream of the test above with each model's rate told: the dominated model serves
    // only its cost probe, nothing is explored or shadowed, and the reported rates are the
    // given ones.
    let sim = Sim::no_signal();
    let rates = sim.rates(&mut StdRng::seed_from_u64(1), 20_000);
    let mut p = MixRank::new(MixRankConfig::new(0.6, 3), 3, 2, None)
        .unwrap()
        .with_known_rates(rates.clone())
        .unwrap();
    let o = sim.run(&mut p, 5_000, 3);
    assert!(o.satisfaction >= 0.6 - 0.005, "{}", o.satisfaction);
    assert_eq!(o.calls[2], 1, "the dominated model served {:?}", o.calls);
    assert_eq!(p.explored(), 0);
    for (e, r) in p.estimates().iter().zip(&rates) {
        assert!((e.rate - r).abs() < 1e-6, "{e:?} vs {r}");
    }
    // One rate in [0, 1] per model.
    let new = || MixRank::new(MixRankConfig::new(0.6, 3), 3, 0, None).unwrap();
    assert!(new().with_known_rates(vec![0.5, 0.6]).is_err());
    assert!(new().with_known_rates(vec![0.5, 0.6, 1.5]).is_err());
    assert!(new().with_known_rates(vec![0.5, 0.6, f64::NAN]).is_err());
    assert!(new().with_known_rates(vec![0.0, 0.6, 1.0]).is_ok());
}

#[test]
fn a_few_early_misses_do_not_hand_a_high_target_to_the_costly_model() {
    // Costs 5 / 25, alpha 0.96 (SciQ's 8B and 70B on the MESS+ Llama data: 97.0 and 97.1 %).
    // The costly model has answered 25 of 25, the cheap one two of its first three. A uniform
    // prior reads the cheap one as 60 % and gives a rate of 96 % or more about 1 % of its
    // mass: too little to pay for its labels, so the costly model serves on and the cheap one
    // is not asked again (on that stream, for hundreds of requests). Centred on the zoo's rate
    // the same answers read as 79 %, a good rate is likely enough to be worth learning, and
    // the cheap model runs beside the costly one, and serves once its rate is known.
    let mut p = MixRank::new(MixRankConfig::new(0.96, 7), 2, 0, None).unwrap();
    let costs = [5.0, 25.0];
    seed_history(&mut p, &costs, &[(0, 2, 3), (1, 25, 25)], false);
    p.t = 30;
    for _ in 0..100 {
        let r = p.route(&featureless(true));
        p.record_cost(r.model, costs[r.model]);
        p.record_feedback(&r.ticket, true);
        if let Some(m) = r.shadow {
            let mut t = r.ticket.clone();
            t.model = m;
            p.record_label(&t, true, false);
        }
    }
    let cheap = p.estimates()[0].clone();
    assert!(cheap.labels >= 20 && cheap.served >= 16, "{cheap:?}");
}

#[test]
fn with_signal_it_beats_the_cheapest_mix() {
    // Difficulty spread over ±3 logits and revealed by the embedding's angle: the neighbours
    // learn it, and the expensive model goes to the requests it rescues.
    let sim = Sim {
        abilities: vec![0.0, 2.0],
        costs: vec![1.0, 10.0],
        spread: 3.0,
        reveal: true,
    };
    // One stream's cost swings by ±5 % with its coins (0.89–1.02× random-α over seeds 1–20,
    // mean 0.94×), so the claim is on the mean of eight.
    // Each stream meets α, ranked and with the mix controller alone (a coin inside the mix);
    // the saving between them is the ranking's.
    let ratio_of = |p: &mut MixRank, seed: u64, what: &str| {
        let o = sim.run(p, 4000, seed);
        assert!(
            o.satisfaction >= 0.75 - 0.005,
            "{what}, seed {seed}: {}",
            o.satisfaction
        );
        o.cost / o.random_alpha_cost / 8.0
    };
    let (mut ratio, mut unranked) = (0.0, 0.0);
    for seed in 1..=8 {
        let mut p = MixRank::new(MixRankConfig::new(0.75, seed), 2, 2, None).unwrap();
        ratio += ratio_of(&mut p, seed, "ranked");
        let w = p.difficulty_weights();
        assert!(w[1] > 0.3, "seed {seed}: {w:?}");
        let cfg = MixRankConfig {
            rank: false,
            ..MixRankConfig::new(0.75, seed)
        };
        let mut q = MixRank::new(cfg, 2, 2, None).unwrap();
        unranked += ratio_of(&mut q, seed, "unranked");
    }
    assert!(ratio < 0.97, "{ratio} x random-alpha");
    assert!(
        unranked > ratio + 0.03,
        "ranked {ratio} against unranked {unranked} x random-alpha"
    );
}

/// Two kinds of question the embedding tells apart: on one the weak model satisfies 30 % and
/// the strong one 90 %, on the other both satisfy 50 %. Both kinds are about equally hard on
/// average, so a difficulty shared by the models ranks nothing; each model's own answers
/// among the neighbours show where the strong one helps.
#[test]
fn a_neighbourhood_one_model_fails_goes_to_the_other() {
    let (costs, alpha) = ([1.0, 10.0], 0.55);
    let p_sat = |kind: usize, m: usize| [[0.3, 0.9], [0.5, 0.5]][kind][m];
    // Rates 0.4 and 0.7: the cheapest fixed mix sends half the requests to the strong model;
    // sending only the first kind needs a quarter.
    let random_alpha_cost = costs[0] + 0.5 * (costs[1] - costs[0]);
    let mut ratio = 0.0;
    for seed in 1..=4 {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut p = MixRank::new(MixRankConfig::new(alpha, seed), 2, 2, None).unwrap();
        let n = 3000;
        let (mut sat, mut cost, mut first_kind_up) = (0.0, 0.0, 0u32);
        for _ in 0..n {
            let kind = usize::from(rng.random::<bool>());
            let angle = if kind == 0 { 0.1 } else { 1.4 } + 0.2 * rng.random::<f64>();
            let x = vec![angle.cos() as f32, angle.sin() as f32];
            let d = p.decide(&x);
            let m = d.served(2);
            let s = rng.random::<f64>() < p_sat(kind, m);
            let mut c = vec![None; 2];
            c[m] = Some(costs[m]);
            let mut labels = vec![None; 2];
            labels[m] = Some(s);
            for o in d.also_runs(2) {
                c[o] = Some(costs[o]);
                labels[o] = Some(rng.random::<f64>() < p_sat(kind, o));
                cost += costs[o];
            }
            p.observe(
                &x,
                d,
                &Observation {
                    costs: c,
                    satisfied: labels,
                    feedback: true,
                },
            );
            sat += f64::from(u8::from(s));
            cost += costs[m];
            first_kind_up += u32::from(m == 1 && kind == 0);
        }
        let sat = sat / f64::from(n);
        assert!(sat >= alpha - 0.005, "seed {seed}: {sat}");
        ratio += cost / f64::from(n) / random_alpha_cost / 4.0;
        assert!(first_kind_up > 400, "seed {seed}: {first_kind_up}");
    }
    assert!(ratio < 0.8, "{ratio} x random-alpha");
}

#[test]
fn the_same_numbers_hold_in_any_cost_unit() {
    let run = |scale: f64| {
        let sim = Sim {
            abilities: vec![-0.5, 0.5, 1.0, 2.0],
            costs: vec![1.0 * scale, 3.0 * scale, 8.0 * scale, 40.0 * scale],
            spread: 1.0,
            reveal: true,
        };
        let mut p = MixRank::new(MixRankConfig::new(0.7, 4), 4, 2, None).unwrap();
        let o = sim.run(&mut p, 1500, 4);
        (o.satisfaction, o.calls)
    };
    assert_eq!(run(1.0), run(1e-6), "joules vs dollars");
}

/// α 0.7, seed 9, a small neighbour memory (state stays small).
fn small_config() -> MixRankConfig {
    let mut cfg = MixRankConfig::new(0.7, 9);
    cfg.memory = 64;
    cfg
}

/// The three-model stream, and a small-memory policy that has served its first 300 requests.
fn warmed_policy() -> (Sim, MixRankConfig, MixRank) {
    let sim = Sim::three_models();
    let cfg = small_config();
    let mut p = MixRank::new(cfg.clone(), 3, 2, None).unwrap();
    sim.run(&mut p, 300, 1);
    (sim, cfg, p)
}

#[test]
fn snapshot_restores_the_run_exactly() {
    let (sim, cfg, mut a) = warmed_policy();
    let json = serde_json::to_string(&a.snapshot()).unwrap();
    let mut b = MixRank::new(MixRankConfig { seed: 1234, ..cfg }, 3, 2, None).unwrap();
    b.restore(&serde_json::from_str(&json).unwrap()).unwrap();
    let (oa, ob) = (sim.run(&mut a, 300, 2), sim.run(&mut b, 300, 2));
    assert_eq!((oa.calls, oa.satisfaction), (ob.calls, ob.satisfaction));
    assert_eq!(a.snapshot(), b.snapshot());
    // Another zoo or corrupt numbers are refused.
    let mut other = MixRank::new(MixRankConfig::new(0.7, 1), 2, 2, None).unwrap();
    assert!(other.restore(&a.snapshot()).is_err());
    let mut bad = a.snapshot();
    bad.abilities.global[0].var = -1.0;
    assert!(b.restore(&bad).is_err());
    let mut bad = a.snapshot();
    bad.debt = f64::NAN;
    assert!(b.restore(&bad).is_err());
    let mut bad = a.snapshot();
    bad.rate_counts.global[1].satisfied = f64::INFINITY;
    assert!(b.restore(&bad).is_err());
}

#[test]
fn state_with_the_lifts_beside_the_reference_requests_restores_exactly() {
    // For a while state held the reference requests' lifts in a list of their own.
    let (sim, cfg, mut a) = warmed_policy();
    let mut old = serde_json::to_value(a.snapshot()).unwrap();
    let obj = old.as_object_mut().unwrap();
    let mut beside = Vec::new();
    for r in obj["reference"].as_array_mut().unwrap() {
        let lifts = r.as_object_mut().unwrap().remove("lifts").unwrap();
        assert_eq!(lifts.as_array().unwrap().len(), 3);
        beside.push(lifts);
    }
    obj.insert("reference_lifts".into(), serde_json::Value::Array(beside));
    let mut b = MixRank::new(cfg, 3, 2, None).unwrap();
    b.restore(&serde_json::from_value(old).unwrap()).unwrap();
    assert_eq!(a.snapshot(), b.snapshot());
    let (oa, ob) = (sim.run(&mut a, 300, 2), sim.run(&mut b, 300, 2));
    assert_eq!((oa.calls, oa.satisfaction), (ob.calls, ob.satisfaction));
}

#[test]
fn state_saved_with_logit_rates_restores_with_counts() {
    // Before the rates were counts, state held them as logit beliefs under "rates".
    let sim = Sim::three_models();
    let mut a = MixRank::new(MixRankConfig::new(0.7, 9), 3, 2, None).unwrap();
    sim.run(&mut a, 300, 1);
    let mut old = serde_json::to_value(a.snapshot()).unwrap();
    let obj = old.as_object_mut().unwrap();
    obj.remove("rate_counts");
    let mut levels = super::irt::Levels::new(3, 1.5);
    for m in 0..3 {
        for i in 0..40 {
            levels.observe(m, None, 0.0, i % (m + 2) != 0);
        }
    }
    obj.insert("rates".into(), serde_json::to_value(&levels).unwrap());
    let mut b = MixRank::new(MixRankConfig::new(0.7, 9), 3, 2, None).unwrap();
    b.restore(&serde_json::from_value(old).unwrap()).unwrap();
    let est = b.estimates();
    // Model 2 answered 3 of 4 on the old beliefs, model 0 one of 2.
    assert!(est[2].rate > est[0].rate + 0.1, "{est:?}");
    assert!(b.snapshot().rates.is_none() && !b.snapshot().rate_counts.global.is_empty());
}

#[test]
fn no_exploration_without_feedback() {
    let mut p = MixRank::new(MixRankConfig::new(0.9, 1), 3, 0, None).unwrap();
    for m in 0..3 {
        p.record_cost(m, [1.0, 5.0, 25.0][m]);
    }
    for _ in 0..200 {
        let r = p.route(&RouteRequest {
            features: &[],
            task: None,
            feedback_expected: false,
            label_unserved: false,
            text_chars: None,
        });
        assert!(!r.explored && !r.probe);
    }
    assert_eq!(p.explored(), 0);
}

#[test]
fn a_cheap_model_written_off_too_early_is_learned_beside_the_costly_one() {
    // Costs 1 / 4 / 20, alpha 0.85. The top model is known (57 of 60), the cheap one is known
    // to be poor (10 of 40), the middle one lost its first 4 answers: as it stands it is
    // off the mix (the cheap and the top model cost less for the same satisfaction), but its
    // rate could still be anywhere, and a good one would take the top model's place at a fifth
    // of its price. While the top model serves, the middle one runs beside it to learn its
    // rate, only where an unserved answer can be labelled.
    let mut p = MixRank::new(MixRankConfig::new(0.85, 3), 3, 0, None).unwrap();
    let costs = [1.0, 4.0, 20.0];
    seed_history(&mut p, &costs, &[(0, 10, 40), (1, 0, 4), (2, 57, 60)], true);
    p.t = 300;
    let mut shadows = 0;
    for i in 0..50 {
        let r = p.route(&featureless(i % 2 == 0));
        if let Some(m) = r.shadow {
            assert_eq!((m, r.model, i % 2), (1, 2, 0), "{r:?}");
            shadows += 1;
        }
    }
    assert!(shadows >= 10, "{shadows} shadows of 25 possible");
    // Once it has answered as often as the others and is known to be poor, it stops.
    for i in 0..60 {
        let debt = p.debt();
        p.record_label(&blank_ticket(1), i % 3 == 0, false);
        assert_eq!(p.debt(), debt, "a shadow's label moved the SLA debt");
    }
    for _ in 0..50 {
        let r = p.route(&featureless(true));
        assert_eq!(r.shadow, None, "{r:?}");
    }
}

#[test]
fn tasks_get_their_own_rates() {
    // Model 0 is good at task "a" (0.95) and bad at "b" (0.3); model 1 does 0.9 on both. At
    // alpha 0.8 the cheapest policy sends every "a" and 41.7 % of the "b" requests to model 0
    // (0.5·0.95 + 0.5·(0.417·0.3 + 0.583·0.9) = 0.8), which needs the per-task rates: the
    // pooled rate of model 0 (0.625) would say nothing about which task to keep.
    let mut p = MixRank::new(MixRankConfig::new(0.8, 2), 2, 0, None).unwrap();
    let mut rng = StdRng::seed_from_u64(2);
    let (mut a_cheap, mut b_cheap, mut sat) = (0, 0, 0);
    for i in 0..6000 {
        let task = if i % 2 == 0 { "a" } else { "b" };
        let r = p.route(&RouteRequest {
            features: &[],
            task: Some(task),
            feedback_expected: true,
            label_unserved: true,
            text_chars: None,
        });
        let rate = match (r.model, task) {
            (0, "a") => 0.95,
            (0, _) => 0.3,
            _ => 0.9,
        };
        let s = rng.random::<f64>() < rate;
        p.record_cost(r.model, [1.0, 10.0][r.model]);
        p.record_feedback(&r.ticket, s);
        if i >= 2000 {
            a_cheap += usize::from(task == "a" && r.model == 0);
            b_cheap += usize::from(task == "b" && r.model == 0);
            sat += usize::from(s);
        }
    }
    assert!(
        a_cheap > 1900,
        "task a served by the cheap model {a_cheap} of 2000 times"
    );
    assert!((650..1050).contains(&b_cheap), "task b: {b_cheap} of 2000");
    assert!(sat as f64 / 4000.0 >= 0.79, "{sat}");
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    /// Whatever the zoo and the labels: decisions index the zoo, predictions and intervals are
    /// probabilities, the debt stays finite above its floor, and the snapshot restores.
    #[test]
    fn invariants_hold_on_arbitrary_streams(
        costs in proptest::collection::vec(1e-9f64..1e3, 1..6),
        alpha in 0.0f64..1.0,
        labels in proptest::collection::vec(any::<bool>(), 1..150),
        xs in proptest::collection::vec(-1.0f32..1.0, 300),
        seed in 0u64..1000,
    ) {
        let k = costs.len();
        let mut cfg = MixRankConfig::new(alpha, seed);
        cfg.memory = 16;
        cfg.reference = 8;
        let mut p = MixRank::new(cfg.clone(), k, 2, None).unwrap();
        for (i, &s) in labels.iter().enumerate() {
            let x = [xs[2 * i % 300], xs[(2 * i + 1) % 300]];
            let r = p.route(&RouteRequest { features: &x, task: Some(if i % 3 == 0 { "t" } else { "u" }), feedback_expected: i % 4 != 0, label_unserved: i % 8 == 1, text_chars: Some(1 + i * 37 % 500) });
            prop_assert!(r.model < k);
            prop_assert!(r.predicted.iter().all(|q| (0.0..=1.0).contains(q)));
            p.record_cost(r.model, costs[r.model]);
            p.record_feedback(&r.ticket, s);
            prop_assert!(p.debt().is_finite() && p.debt() >= -cfg.max_surplus_requests);
            if let Some(m) = r.shadow {
                // Only where an unserved answer can be labelled, only a model already costed
                // and cheaper than the served one; its label leaves the debt alone.
                prop_assert!(i % 8 == 1 && m != r.model && m < k);
                prop_assert!(costs[m] < costs[r.model]);
                let debt = p.debt();
                let mut t = r.ticket.clone();
                t.model = m;
                p.record_cost(m, costs[m]);
                p.record_label(&t, !s, false);
                prop_assert_eq!(p.debt(), debt);
            }
        }
        for e in p.estimates() {
            prop_assert!(0.0 <= e.rate_low && e.rate_low <= e.rate + 1e-9 && e.rate <= e.rate_high + 1e-9 && e.rate_high <= 1.0);
        }
        let mut q = MixRank::new(cfg, k, 2, None).unwrap();
        prop_assert!(q.restore(&p.snapshot()).is_ok());
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]
    /// A corrupted state file is restored or refused, never a panic, and a policy restored
    /// from it keeps deciding within the zoo.
    #[test]
    fn corrupted_state_restores_or_is_refused_never_a_panic(
        edits in proptest::collection::vec(
            (any::<usize>(), proptest::sample::select(b"0123456789-.e,:[]{}\"tfn ".to_vec())),
            1..6,
        ),
    ) {
        let sim = Sim::three_models();
        let cfg = small_config();
        let mut a = MixRank::new(cfg.clone(), 3, 2, None).unwrap();
        sim.run(&mut a, 150, 1);
        let mut bytes = serde_json::to_vec(&a.snapshot()).unwrap();
        let n = bytes.len();
        for (at, b) in edits {
            bytes[at % n] = b;
        }
        if let Ok(snap) = serde_json::from_slice::<MixRankSnapshot>(&bytes) {
            let mut b = MixRank::new(cfg, 3, 2, None).unwrap();
            if b.restore(&snap).is_ok() {
                sim.run(&mut b, 50, 2);
                for e in b.estimates() {
                    prop_assert!((0.0..=1.0).contains(&e.rate));
                }
            }
        }
    }
}

/// A stream whose only signal is the question's length: a long question defeats the cheap
/// model (σ(1 − 2u), `u` the log length on [−1, 1]) and not the costly one (σ(2.5)). Returns
/// (satisfaction, cost per request, random-α's cost per request).
fn length_stream(p: &mut MixRank, with_length: bool, n: usize, seed: u64) -> (f64, f64, f64) {
    let mut rng = StdRng::seed_from_u64(seed);
    let costs = [1.0, 10.0];
    let (mut sat, mut cost) = (0.0, 0.0);
    let mut small_rate = 0.0;
    for _ in 0..n {
        let u = rng.random::<f64>() * 2.0 - 1.0;
        let chars = (20.0 * 100f64.powf((u + 1.0) / 2.0)).round() as usize;
        let rates = [irt::sigmoid(1.0 - 2.0 * u), irt::sigmoid(2.5)];
        small_rate += rates[0] / n as f64;
        let r = p.route(&RouteRequest {
            features: &[],
            task: None,
            feedback_expected: true,
            label_unserved: true,
            text_chars: with_length.then_some(chars),
        });
        let s = rng.random::<f64>() < rates[r.model];
        p.record_cost(r.model, costs[r.model]);
        p.record_feedback(&r.ticket, s);
        sat += f64::from(u8::from(s)) / n as f64;
        cost += costs[r.model] / n as f64;
    }
    let alpha = p.config().alpha;
    let w = (alpha - small_rate) / (irt::sigmoid(2.5) - small_rate);
    (sat, cost, costs[0] + w * (costs[1] - costs[0]))
}

#[test]
fn a_length_that_predicts_failure_sends_the_long_questions_up() {
    let mut p = MixRank::new(MixRankConfig::new(0.8, 3), 2, 0, None).unwrap();
    let (sat, cost, random_alpha) = length_stream(&mut p, true, 4000, 3);
    assert!(sat >= 0.8 - 0.005, "{sat}");
    assert!(
        cost < 0.85 * random_alpha,
        "{cost} vs random-alpha {random_alpha}"
    );
    // The cheap model's slope is learned negative (longer, worse), the costly one's near 0.
    let slopes = p.snapshot().slopes;
    assert!(slopes[0].mean < -1.0, "{slopes:?}");
    assert!(slopes[1].mean.abs() < 0.5, "{slopes:?}");
    // The same stream without the lengths is the plain mix.
    let mut blind = MixRank::new(MixRankConfig::new(0.8, 3), 2, 0, None).unwrap();
    let (sat, cost, random_alpha) = length_stream(&mut blind, false, 4000, 3);
    assert!(sat >= 0.8 - 0.005, "{sat}");
    assert!(
        cost > 0.95 * random_alpha,
        "{cost} vs random-alpha {random_alpha}"
    );
}

#[test]
fn state_saved_before_lengths_restores_at_the_prior() {
    let sim = Sim::three_models();
    let mut a = MixRank::new(small_config(), 3, 2, None).unwrap();
    sim.run(&mut a, 200, 1);
    let mut old = serde_json::to_value(a.snapshot()).unwrap();
    let obj = old.as_object_mut().unwrap();
    obj.remove("slopes");
    obj.remove("lengths");
    for r in obj["reference"].as_array_mut().unwrap() {
        r.as_object_mut().unwrap().remove("length");
    }
    let mut b = MixRank::new(small_config(), 3, 2, None).unwrap();
    b.restore(&serde_json::from_value(old).unwrap()).unwrap();
    let s = b.snapshot();
    assert_eq!(s.slopes.len(), 3);
    assert!(s
        .slopes
        .iter()
        .all(|v| v.mean == 0.0 && (v.sd() - 0.5).abs() < 1e-12));
    assert_eq!(s.lengths, LogLengths::default());
    // Slopes for another zoo size are refused.
    let mut bad = a.snapshot();
    bad.slopes.pop();
    assert!(b.restore(&bad).is_err());
}
