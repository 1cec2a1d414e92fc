//! Satisfaction predictors: `ŝ_m(x)`, the probability that model m satisfies the request with
//! features x.
//!
//! [`MlpPredictor`] is the MESS+ head: Linear–LayerNorm–ReLU–Dropout–Linear with one logit per
//! model over a frozen sentence embedding, trained online by SGD on binary cross-entropy (lr
//! 0.06, momentum 0.9, weight decay 0.01, gradient-norm clip 1.0: the reference settings), one
//! step per call. Weights and dropout masks come from a seeded generator, so training is
//! repeatable.

use candle_core::{DType, Device, Tensor, Var, D};
use rand::Rng;
use serde::{Deserialize, Serialize};

use crate::rng::{seeded, PolicyRng, RngSnapshot};
use crate::RouterError;

/// Predicts per-model satisfaction probabilities and learns from labelled samples.
pub trait Predictor {
    /// Number of models (outputs).
    fn outputs(&self) -> usize;
    /// Probabilities in [0, 1], one per model.
    fn predict(&mut self, x: &[f32]) -> Vec<f64>;
    /// One training step on a sample; `labels[m]` is `None` for models without a label (their
    /// logits get no loss).
    fn train(&mut self, x: &[f32], labels: &[Option<bool>]);
}

/// Constant probabilities (a prior, or a known-rates oracle in tests).
#[derive(Debug, Clone)]
pub struct Fixed(pub Vec<f64>);

impl Predictor for Fixed {
    fn outputs(&self) -> usize {
        self.0.len()
    }
    fn predict(&mut self, _x: &[f32]) -> Vec<f64> {
        self.0.clone()
    }
    fn train(&mut self, _x: &[f32], _labels: &[Option<bool>]) {}
}

/// Optimiser settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SgdConfig {
    pub lr: f64,
    pub momentum: f64,
    pub weight_decay: f64,
    pub clip_norm: f64,
    pub dropout: f64,
}

impl Default for SgdConfig {
    /// The MESS+ reference settings.
    fn default() -> Self {
        SgdConfig {
            lr: 0.06,
            momentum: 0.9,
            weight_decay: 0.01,
            clip_norm: 1.0,
            dropout: 0.1,
        }
    }
}

/// The MESS+ satisfaction head on CPU.
pub struct MlpPredictor {
    params: Vec<Var>,
    momentum: Vec<Option<Tensor>>,
    inputs: usize,
    outputs: usize,
    hidden: usize,
    sgd: SgdConfig,
    rng: PolicyRng,
    steps: u64,
}

/// An [`MlpPredictor`]'s weights, optimiser momentum, dropout generator and step count: enough
/// to continue training exactly where it stopped.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MlpSnapshot {
    pub inputs: usize,
    pub hidden: usize,
    pub outputs: usize,
    /// Row-major parameter tensors in a fixed order: W1, b1, LayerNorm γ, β, W2, b2.
    pub params: Vec<F32s>,
    /// SGD momentum buffers, `None` before the first step.
    pub momentum: Vec<Option<F32s>>,
    pub rng: RngSnapshot,
    pub steps: u64,
}

/// A vector of f32 stored as base64 of its little-endian bytes: exact, and about a third of the
/// size of decimal JSON, which matters for a state file rewritten every second on flash storage.
#[derive(Debug, Clone, PartialEq)]
pub struct F32s(pub Vec<f32>);

impl Serialize for F32s {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use base64::Engine;
        let bytes: Vec<u8> = self.0.iter().flat_map(|x| x.to_le_bytes()).collect();
        s.serialize_str(&base64::engine::general_purpose::STANDARD.encode(bytes))
    }
}

impl<'de> Deserialize<'de> for F32s {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use base64::Engine;
        let text = String::deserialize(d)?;
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(text.as_bytes())
            .map_err(serde::de::Error::custom)?;
        if bytes.len() % 4 != 0 {
            return Err(serde::de::Error::custom(
                "f32 data is not a multiple of 4 bytes",
            ));
        }
        Ok(F32s(
            bytes
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
        ))
    }
}

fn uniform(rng: &mut PolicyRng, n: usize, bound: f64) -> Vec<f32> {
    (0..n)
        .map(|_| ((rng.random::<f64>() * 2.0 - 1.0) * bound) as f32)
        .collect()
}

fn err(e: candle_core::Error) -> RouterError {
    RouterError::Predictor(e.to_string())
}

impl MlpPredictor {
    /// A head for `inputs`-dimensional features, `hidden` units, `outputs` models.
    pub fn new(
        inputs: usize,
        hidden: usize,
        outputs: usize,
        sgd: SgdConfig,
        seed: u64,
    ) -> Result<Self, RouterError> {
        let mut rng = seeded(seed);
        let dev = Device::Cpu;
        // PyTorch's nn.Linear default: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weights and biases.
        let b1 = 1.0 / (inputs as f64).sqrt();
        let b2 = 1.0 / (hidden as f64).sqrt();
        let mk =
            |v: Vec<f32>, shape: &[usize]| Var::from_tensor(&Tensor::from_vec(v, shape, &dev)?);
        let params = vec![
            mk(uniform(&mut rng, hidden * inputs, b1), &[hidden, inputs]).map_err(err)?,
            mk(uniform(&mut rng, hidden, b1), &[hidden]).map_err(err)?,
            mk(vec![1.0; hidden], &[hidden]).map_err(err)?,
            mk(vec![0.0; hidden], &[hidden]).map_err(err)?,
            mk(uniform(&mut rng, outputs * hidden, b2), &[outputs, hidden]).map_err(err)?,
            mk(uniform(&mut rng, outputs, b2), &[outputs]).map_err(err)?,
        ];
        Ok(MlpPredictor {
            momentum: vec![None; params.len()],
            params,
            inputs,
            outputs,
            hidden,
            sgd,
            rng,
            steps: 0,
        })
    }

    /// Training steps taken.
    pub fn steps(&self) -> u64 {
        self.steps
    }

    /// Logits for a batch `x` of shape (n, inputs); `dropout` enables the training mask.
    fn logits(&mut self, x: &Tensor, dropout: bool) -> candle_core::Result<Tensor> {
        let p = &self.params;
        let h = x.matmul(&p[0].t()?)?.broadcast_add(&p[1])?;
        // LayerNorm over the hidden dimension, eps 1e-5 (PyTorch's default).
        let mean = h.mean_keepdim(D::Minus1)?;
        let centered = h.broadcast_sub(&mean)?;
        let var = centered.sqr()?.mean_keepdim(D::Minus1)?;
        let h = centered.broadcast_div(&(var + 1e-5)?.sqrt()?)?;
        let h = h.broadcast_mul(&p[2])?.broadcast_add(&p[3])?.relu()?;
        let h = if dropout && self.sgd.dropout > 0.0 {
            let keep = 1.0 - self.sgd.dropout;
            let n = h.elem_count();
            let mask: Vec<f32> = (0..n)
                .map(|_| {
                    if self.rng.random::<f64>() < keep {
                        (1.0 / keep) as f32
                    } else {
                        0.0
                    }
                })
                .collect();
            let mask = Tensor::from_vec(mask, h.shape(), h.device())?;
            (h * mask)?
        } else {
            h
        };
        h.matmul(&p[4].t()?)?.broadcast_add(&p[5])
    }

    fn step(&mut self, x: &[f32], labels: &[Option<bool>]) -> candle_core::Result<()> {
        let dev = Device::Cpu;
        let xt = Tensor::from_slice(x, (1, self.inputs), &dev)?;
        let target: Vec<f32> = labels
            .iter()
            .map(|l| if *l == Some(true) { 1.0 } else { 0.0 })
            .collect();
        let weight: Vec<f32> = labels
            .iter()
            .map(|l| if l.is_some() { 1.0 } else { 0.0 })
            .collect();
        let labelled: f32 = weight.iter().sum();
        if labelled == 0.0 {
            return Ok(());
        }
        let target = Tensor::from_vec(target, (1, self.outputs), &dev)?;
        let weight = Tensor::from_vec(weight, (1, self.outputs), &dev)?;
        let logits = self.logits(&xt, true)?;
        // Numerically stable BCE with logits: max(z,0) - z*y + log(1 + exp(-|z|)).
        let loss = (logits.relu()? - (&logits * &target)?
            + (logits.abs()?.neg()?.exp()? + 1.0)?.log()?)?;
        let loss = ((loss * &weight)?.sum_all()? / f64::from(labelled))?;
        let grads = loss.backward()?;
        let mut g: Vec<Tensor> = Vec::with_capacity(self.params.len());
        for p in &self.params {
            g.push(match grads.get(p.as_tensor()) {
                Some(t) => t.clone(),
                None => p.as_tensor().zeros_like()?,
            });
        }
        // Clip the total gradient norm, as torch.nn.utils.clip_grad_norm_.
        let norm_sq: f64 = g
            .iter()
            .map(|t| {
                t.sqr()
                    .and_then(|s| s.sum_all())
                    .and_then(|s| s.to_dtype(DType::F64))
                    .and_then(|s| s.to_scalar::<f64>())
            })
            .sum::<candle_core::Result<f64>>()?;
        let norm = norm_sq.sqrt();
        let scale = if norm > self.sgd.clip_norm {
            self.sgd.clip_norm / (norm + 1e-6)
        } else {
            1.0
        };
        for (i, p) in self.params.iter().enumerate() {
            // torch.optim.SGD: d = g + wd*w; buf = mu*buf + d (buf = d at first); w -= lr*buf.
            // Everything here is detached from the autograd graph: a momentum buffer built from
            // tracked tensors would keep every earlier step's graph alive (memory grew without
            // bound: 24 GB over a 14k-request MMLU sweep, and in a long-running ferryd).
            let w = p.as_tensor().detach();
            let d = ((g[i].detach() * scale)? + (&w * self.sgd.weight_decay)?)?;
            let buf = match &self.momentum[i] {
                Some(b) => ((b * self.sgd.momentum)? + d)?,
                None => d,
            }
            .detach();
            p.set(&(&w - (&buf * self.sgd.lr)?)?)?;
            self.momentum[i] = Some(buf);
        }
        self.steps += 1;
        Ok(())
    }

    /// Hidden width.
    pub fn hidden(&self) -> usize {
        self.hidden
    }

    /// Input width.
    pub fn inputs(&self) -> usize {
        self.inputs
    }

    /// Everything needed to continue training later.
    pub fn snapshot(&self) -> Result<MlpSnapshot, RouterError> {
        let flat = |t: &Tensor| {
            t.flatten_all()
                .and_then(|t| t.to_vec1::<f32>())
                .map(F32s)
                .map_err(err)
        };
        Ok(MlpSnapshot {
            inputs: self.inputs,
            hidden: self.hidden,
            outputs: self.outputs,
            params: self
                .params
                .iter()
                .map(|p| flat(p.as_tensor()))
                .collect::<Result<_, _>>()?,
            momentum: self
                .momentum
                .iter()
                .map(|m| m.as_ref().map(flat).transpose())
                .collect::<Result<_, _>>()?,
            rng: RngSnapshot::capture(&self.rng),
            steps: self.steps,
        })
    }

    /// Continues from a snapshot of a head with the same shape.
    pub fn restore(&mut self, s: &MlpSnapshot) -> Result<(), RouterError> {
        if (s.inputs, s.hidden, s.outputs) != (self.inputs, self.hidden, self.outputs) {
            return Err(RouterError::State(format!(
                "predictor shape {}x{}x{} does not match {}x{}x{}",
                s.inputs, s.hidden, s.outputs, self.inputs, self.hidden, self.outputs
            )));
        }
        if s.params.len() != self.params.len() || s.momentum.len() != self.params.len() {
            return Err(RouterError::State("predictor tensor count differs".into()));
        }
        let mut params = Vec::with_capacity(self.params.len());
        let mut momentum = Vec::with_capacity(self.params.len());
        for (i, p) in self.params.iter().enumerate() {
            let shape = p.as_tensor().shape().clone();
            let n = shape.elem_count();
            let tensor = |v: &F32s| -> Result<Tensor, RouterError> {
                let v = &v.0;
                if v.len() != n || !v.iter().all(|x| x.is_finite()) {
                    return Err(RouterError::State(format!(
                        "predictor tensor {i}: {} values (need {n} finite)",
                        v.len()
                    )));
                }
                Tensor::from_vec(v.clone(), shape.clone(), &Device::Cpu).map_err(err)
            };
            params.push(tensor(&s.params[i])?);
            momentum.push(s.momentum[i].as_ref().map(tensor).transpose()?);
        }
        let rng = s.rng.restore()?;
        for (p, t) in self.params.iter().zip(&params) {
            p.set(t).map_err(err)?;
        }
        self.momentum = momentum;
        self.rng = rng;
        self.steps = s.steps;
        Ok(())
    }
}

impl Predictor for MlpPredictor {
    fn outputs(&self) -> usize {
        self.outputs
    }

    fn predict(&mut self, x: &[f32]) -> Vec<f64> {
        let run = |s: &mut Self| -> candle_core::Result<Vec<f64>> {
            let xt = Tensor::from_slice(x, (1, s.inputs), &Device::Cpu)?;
            let logits = s.logits(&xt, false)?.flatten_all()?.to_vec1::<f32>()?;
            Ok(logits
                .iter()
                .map(|&z| 1.0 / (1.0 + (-f64::from(z)).exp()))
                .collect())
        };
        // A failing forward pass on valid shapes is a bug; fall back to "unknown" (0.5).
        run(self).unwrap_or_else(|_| vec![0.5; self.outputs])
    }

    fn train(&mut self, x: &[f32], labels: &[Option<bool>]) {
        if let Err(e) = self.step(x, labels) {
            debug_assert!(false, "predictor step failed: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn learns_a_separable_pattern_and_is_repeatable() {
        let run = || {
            let mut p = MlpPredictor::new(4, 8, 2, SgdConfig::default(), 7).unwrap();
            // Model 0 satisfies requests with x[0] > 0; model 1 satisfies all.
            let data: Vec<([f32; 4], [Option<bool>; 2])> = (0..200)
                .map(|i| {
                    let s = if i % 2 == 0 { 1.0 } else { -1.0 };
                    ([s, 0.5, -0.25 * s, 1.0], [Some(s > 0.0), Some(true)])
                })
                .collect();
            for (x, y) in &data {
                p.train(x, y);
            }
            (
                p.predict(&[1.0, 0.5, -0.25, 1.0]),
                p.predict(&[-1.0, 0.5, 0.25, 1.0]),
            )
        };
        let (pos, neg) = run();
        assert!(pos[0] > 0.8 && neg[0] < 0.2, "{pos:?} {neg:?}");
        assert!(pos[1] > 0.8 && neg[1] > 0.8);
        assert!(pos.iter().chain(&neg).all(|p| (0.0..=1.0).contains(p)));
        assert_eq!(run(), (pos, neg), "seeded training is repeatable");
    }

    #[test]
    fn snapshot_round_trip_continues_training_identically() {
        let sample = |i: usize| {
            let s = if i.is_multiple_of(3) { 1.0 } else { -1.0 };
            (
                [s, 0.5, 0.1 * i as f32, 1.0],
                [Some(s > 0.0), Some(i.is_multiple_of(2))],
            )
        };
        let mut a = MlpPredictor::new(4, 8, 2, SgdConfig::default(), 3).unwrap();
        for i in 0..20 {
            let (x, y) = sample(i);
            a.train(&x, &y);
        }
        let json = serde_json::to_string(&a.snapshot().unwrap()).unwrap();
        let mut b = MlpPredictor::new(4, 8, 2, SgdConfig::default(), 99).unwrap();
        b.restore(&serde_json::from_str(&json).unwrap()).unwrap();
        for i in 20..40 {
            let (x, y) = sample(i);
            a.train(&x, &y);
            b.train(&x, &y);
        }
        assert_eq!(
            a.predict(&[1.0, 0.5, 0.3, 1.0]),
            b.predict(&[1.0, 0.5, 0.3, 1.0])
        );
        assert_eq!(a.steps(), b.steps());
    }

    #[test]
    fn mismatched_snapshot_is_refused() {
        let a = MlpPredictor::new(4, 8, 2, SgdConfig::default(), 3).unwrap();
        let mut b = MlpPredictor::new(4, 8, 3, SgdConfig::default(), 3).unwrap();
        let snap = a.snapshot().unwrap();
        assert!(b.restore(&snap).is_err());
        let mut c = MlpPredictor::new(4, 8, 2, SgdConfig::default(), 3).unwrap();
        let mut bad = snap.clone();
        bad.params[0].0.pop();
        assert!(c.restore(&bad).is_err());
        let mut bad = snap;
        bad.params[1].0[0] = f32::NAN;
        assert!(c.restore(&bad).is_err());
    }

    #[test]
    fn unlabelled_outputs_get_no_gradient() {
        let mut p = MlpPredictor::new(
            3,
            4,
            2,
            SgdConfig {
                dropout: 0.0,
                weight_decay: 0.0,
                ..SgdConfig::default()
            },
            1,
        )
        .unwrap();
        let before = p.params[5].as_tensor().to_vec1::<f32>().unwrap();
        p.train(&[1.0, 2.0, 3.0], &[Some(true), None]);
        let after = p.params[5].as_tensor().to_vec1::<f32>().unwrap();
        assert_ne!(before[0], after[0]);
        assert_eq!(before[1], after[1]);
    }
}
