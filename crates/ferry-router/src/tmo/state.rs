//! A dialogue's state as the policies see it: the recent placements, the task of the turn to
//! place, and the remaining budgets. The environment and the live daemon build observations
//! the same way, through [`DialogueState`].

use super::{Action, CallPrices, ACTIONS, HISTORY, OBS_DIM, STEP_DIM};

/// What a placement policy sees before one turn.
#[derive(Debug, Clone, PartialEq)]
pub struct Observation {
    /// The last [`HISTORY`] per-turn states, oldest first, each `[previous action (-1 at the
    /// start, 0 local, 1 cloud), views the previous turn sent (0/1 each), task]`; -1 padding
    /// before the dialogue's first turn.
    pub history: [f32; OBS_DIM],
    /// Budgets left for the rest of the dialogue.
    pub remaining_latency_s: f64,
    pub remaining_usd: f64,
    /// Turns already taken in this dialogue.
    pub turn: usize,
    /// Task category of the turn to place.
    pub task: usize,
}

impl Observation {
    /// The network input: the history, and for the constrained variant the remaining budgets
    /// divided by `scale` (seconds, dollars).
    pub fn features(&self, with_budgets: Option<(f64, f64)>) -> Vec<f32> {
        let mut f = self.history.to_vec();
        if let Some((s, u)) = with_budgets {
            f.push((self.remaining_latency_s / s) as f32);
            f.push((self.remaining_usd / u) as f32);
        }
        f
    }

    /// The KNN key: history ⊕ the action's one-hot.
    pub fn knn_key(&self, a: Action) -> Vec<f64> {
        self.history
            .iter()
            .map(|&x| f64::from(x))
            .chain(a.one_hot().iter().map(|&x| f64::from(x)))
            .collect()
    }
}

/// Bookkeeping of one dialogue: turns taken (task and placement) and what they spent.
#[derive(Debug, Clone, PartialEq)]
pub struct DialogueState {
    latency_budget_s: f64,
    usd_budget: f64,
    turns: Vec<(usize, Action)>,
    spent_latency_s: f64,
    spent_usd: f64,
}

impl DialogueState {
    /// A new dialogue with these budgets.
    pub fn new(latency_budget_s: f64, usd_budget: f64) -> Self {
        DialogueState {
            latency_budget_s,
            usd_budget,
            turns: Vec::new(),
            spent_latency_s: 0.0,
            spent_usd: 0.0,
        }
    }

    /// The observation for placing the next turn, of task category `task`.
    pub fn observe(&self, task: usize) -> Observation {
        let t = self.turns.len();
        let mut history = [-1.0f32; OBS_DIM];
        for slot in 0..HISTORY {
            // Slot HISTORY-1 is the turn to place; earlier slots are earlier turns.
            let Some(i) = (t + slot + 1).checked_sub(HISTORY) else {
                continue;
            };
            let task_i = if i == t { task } else { self.turns[i].0 };
            let prev = i.checked_sub(1).map(|j| self.turns[j].1);
            let s = &mut history[slot * STEP_DIM..(slot + 1) * STEP_DIM];
            match prev {
                None => {
                    s[0] = -1.0;
                    s[1..STEP_DIM - 1].fill(0.0);
                }
                Some(a) => s[..STEP_DIM - 1].copy_from_slice(&a.one_hot()),
            }
            s[STEP_DIM - 1] = task_i as f32;
        }
        Observation {
            history,
            remaining_latency_s: self.latency_budget_s - self.spent_latency_s,
            remaining_usd: self.usd_budget - self.spent_usd,
            turn: t,
            task,
        }
    }

    /// Records a finished turn with its measured (or modelled) latency and price.
    pub fn record(&mut self, task: usize, action: Action, latency_s: f64, usd: f64) {
        self.turns.push((task, action));
        self.spent_latency_s += latency_s;
        self.spent_usd += usd;
    }

    /// Turns taken.
    pub fn turns(&self) -> usize {
        self.turns.len()
    }

    /// Seconds and dollars spent so far.
    pub fn spent(&self) -> (f64, f64) {
        (self.spent_latency_s, self.spent_usd)
    }

    /// The dialogue's budgets.
    pub fn budgets(&self) -> (f64, f64) {
        (self.latency_budget_s, self.usd_budget)
    }

    /// Whether either budget is overdrawn.
    pub fn over_budget(&self) -> (bool, bool) {
        (
            self.spent_latency_s > self.latency_budget_s,
            self.spent_usd > self.usd_budget,
        )
    }
}

/// Local calls kept in reserve by [`feasible`]: the rest of a dialogue of at most [`HISTORY`]
/// turns can always run locally.
pub const RESERVE_LOCAL_CALLS: usize = HISTORY - 1;

/// The hard budget mask of the constrained policies: an action is allowed when its call, at
/// `prices` (a profile's, or live estimates), leaves at least [`RESERVE_LOCAL_CALLS`] local
/// calls of both budgets. Local is always allowed: it is the fallback, and the cheapest call on
/// every profile.
pub fn feasible(obs: &Observation, prices: &CallPrices) -> [bool; ACTIONS] {
    let local = Action::LOCAL;
    let reserve_s = prices.latency_s(local) * RESERVE_LOCAL_CALLS as f64;
    let reserve_usd = prices.usd(local) * RESERVE_LOCAL_CALLS as f64;
    let mut ok = [false; ACTIONS];
    for a in Action::all() {
        ok[a.index()] = a.is_local()
            || (prices.latency_s(a) <= obs.remaining_latency_s - reserve_s
                && prices.usd(a) <= obs.remaining_usd - reserve_usd);
    }
    ok
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn observation_layout_and_padding() {
        let mut d = DialogueState::new(30.0, 0.05);
        let o = d.observe(2);
        assert_eq!(o.history.len(), 25);
        assert!(o.history[..20].iter().all(|&x| x == -1.0));
        assert_eq!(&o.history[20..], &[-1.0, 0.0, 0.0, 0.0, 2.0]);
        assert_eq!((o.turn, o.task), (0, 2));
        d.record(2, Action::cloud(0b101), 6.0, 0.01);
        d.record(1, Action::LOCAL, 0.01, 1e-8);
        let o = d.observe(3);
        assert!(o.history[..10].iter().all(|&x| x == -1.0));
        assert_eq!(&o.history[10..15], &[-1.0, 0.0, 0.0, 0.0, 2.0]);
        assert_eq!(&o.history[15..20], &[1.0, 1.0, 0.0, 1.0, 1.0]);
        assert_eq!(&o.history[20..], &[0.0, 0.0, 0.0, 0.0, 3.0]);
        assert!((o.remaining_latency_s - 23.99).abs() < 1e-12);
        assert!((o.remaining_usd - (0.04 - 1e-8)).abs() < 1e-15);
        assert_eq!(o.features(Some((10.0, 0.1))).len(), 27);
        assert!((o.features(Some((10.0, 0.1)))[25] - 2.399).abs() < 1e-6);
        // Long dialogues keep the last five turns.
        for _ in 0..6 {
            d.record(0, Action::cloud(0b111), 1.0, 0.0);
        }
        let o = d.observe(1);
        assert_eq!(&o.history[..5], &[1.0, 1.0, 1.0, 1.0, 0.0]);
        assert!(!o.history.contains(&-1.0));
    }

    #[test]
    fn mask_keeps_a_local_reserve() {
        let c = crate::tmo::CostModel::reference();
        let p = c.prices();
        let mut d = DialogueState::new(30.0, 0.05);
        assert!(feasible(&d.observe(0), &p).iter().all(|&x| x));
        for _ in 0..3 {
            d.record(
                0,
                Action::cloud(0b111),
                c.latency_s(Action::cloud(0b111)),
                0.01368,
            );
        }
        // $0.05 - 3 × 0.01368 = 0.00896: one view ($0.005) fits, two ($0.00945) do not.
        let m = feasible(&d.observe(0), &p);
        assert!(m[0] && m[1] && m[Action::cloud(0b001).index()]);
        assert!(!m[Action::cloud(0b011).index()] && !m[8]);
        let tight = DialogueState::new(0.0, 0.0);
        let m = feasible(&tight.observe(0), &p);
        assert_eq!(m.iter().filter(|&&x| x).count(), 1);
        assert!(m[0]);
    }
}
