//! Small MLPs on candle `Var`s, with orthogonal initialisation, global-norm gradient clipping
//! and the two optimisers the learners use (RMSprop and Adam, PyTorch's update rules), applied
//! on the host.

use candle_core::{Device, Tensor, Var};

#[cfg(any(test, feature = "train"))]
use super::env::normal;
use super::TmoError;
#[cfg(any(test, feature = "train"))]
use crate::rng::PolicyRng;

/// The nonlinearity between layers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Activation {
    /// Stable-Baselines3's actor-critic default.
    Tanh,
    /// Stable-Baselines3's DQN default.
    Relu,
}

/// A multilayer perceptron: the activation between layers, linear output.
#[derive(Debug)]
pub(crate) struct Mlp {
    /// (weight `[out, in]`, bias `[out]`) per layer.
    pub layers: Vec<(Var, Var)>,
    pub activation: Activation,
}

/// `rows × cols` semi-orthogonal matrix scaled by `gain` (as `torch.nn.init.orthogonal_`):
/// Gram–Schmidt on the columns of a standard normal draw of the taller orientation.
#[cfg(any(test, feature = "train"))]
fn orthogonal(rows: usize, cols: usize, gain: f64, rng: &mut PolicyRng) -> Vec<f32> {
    let (n, m) = (rows.max(cols), rows.min(cols));
    // Columns of an n × m matrix.
    let mut q: Vec<Vec<f64>> = (0..m)
        .map(|_| (0..n).map(|_| normal(rng)).collect())
        .collect();
    for j in 0..m {
        for i in 0..j {
            let (done, rest) = q.split_at_mut(j);
            let (qi, qj) = (&done[i], &mut rest[0]);
            let dot: f64 = qi.iter().zip(qj.iter()).map(|(a, b)| a * b).sum();
            for (x, y) in qj.iter_mut().zip(qi) {
                *x -= dot * y;
            }
        }
        let norm = q[j].iter().map(|x| x * x).sum::<f64>().sqrt().max(1e-12);
        q[j].iter_mut().for_each(|x| *x /= norm);
    }
    let mut out = vec![0f32; rows * cols];
    for r in 0..rows {
        for c in 0..cols {
            // Tall: (r, c) = column c, entry r. Wide: transpose.
            let v = if rows >= cols { q[c][r] } else { q[r][c] };
            out[r * cols + c] = (gain * v) as f32;
        }
    }
    out
}

impl Mlp {
    /// Layers of `sizes[0] → sizes[1] → ... → sizes[last]`, orthogonal weights (gain
    /// `hidden_gain`, last layer `out_gain`), zero biases.
    #[cfg(any(test, feature = "train"))]
    pub fn new(
        sizes: &[usize],
        hidden_gain: f64,
        out_gain: f64,
        rng: &mut PolicyRng,
    ) -> Result<Self, TmoError> {
        let mut layers = Vec::new();
        for (i, w) in sizes.windows(2).enumerate() {
            let gain = if i + 2 == sizes.len() {
                out_gain
            } else {
                hidden_gain
            };
            let wt = Tensor::from_vec(
                orthogonal(w[1], w[0], gain, rng),
                (w[1], w[0]),
                &Device::Cpu,
            )?;
            let bt = Tensor::zeros(w[1], candle_core::DType::F32, &Device::Cpu)?;
            layers.push((Var::from_tensor(&wt)?, Var::from_tensor(&bt)?));
        }
        Ok(Mlp {
            layers,
            activation: Activation::Tanh,
        })
    }

    /// Layers with PyTorch's default `nn.Linear` initialisation (weights and biases uniform in
    /// ±1/√fan_in), as SB3's DQN Q-network gets.
    #[cfg(any(test, feature = "train"))]
    pub fn torch_default(
        sizes: &[usize],
        activation: Activation,
        rng: &mut PolicyRng,
    ) -> Result<Self, TmoError> {
        use rand::Rng;
        let mut layers = Vec::new();
        for w in sizes.windows(2) {
            let bound = 1.0 / (w[0] as f64).sqrt();
            let mut draw = |n: usize| -> Vec<f32> {
                (0..n)
                    .map(|_| (bound * (2.0 * rng.random::<f64>() - 1.0)) as f32)
                    .collect()
            };
            let wt = Tensor::from_vec(draw(w[1] * w[0]), (w[1], w[0]), &Device::Cpu)?;
            let bt = Tensor::from_vec(draw(w[1]), w[1], &Device::Cpu)?;
            layers.push((Var::from_tensor(&wt)?, Var::from_tensor(&bt)?));
        }
        Ok(Mlp { layers, activation })
    }

    /// From weight and bias tensors (shapes checked by the caller).
    pub fn from_tensors(
        t: Vec<(Tensor, Tensor)>,
        activation: Activation,
    ) -> Result<Self, TmoError> {
        let layers = t
            .into_iter()
            .map(|(w, b)| Ok((Var::from_tensor(&w)?, Var::from_tensor(&b)?)))
            .collect::<Result<_, TmoError>>()?;
        Ok(Mlp { layers, activation })
    }

    /// An independent copy of the weights (a DQN target network).
    #[cfg(feature = "train")]
    pub fn detached_copy(&self) -> Result<Self, TmoError> {
        let t = self
            .layers
            .iter()
            .map(|(w, b)| (w.as_tensor().copy(), b.as_tensor().copy()))
            .map(|(w, b)| Ok((w?, b?)))
            .collect::<Result<Vec<_>, TmoError>>()?;
        Self::from_tensors(t, self.activation)
    }

    /// Overwrites these weights with `other`'s (same shapes).
    #[cfg(feature = "train")]
    pub fn copy_from(&self, other: &Mlp) -> Result<(), TmoError> {
        for ((w, b), (ow, ob)) in self.layers.iter().zip(&other.layers) {
            w.set(ow.as_tensor())?;
            b.set(ob.as_tensor())?;
        }
        Ok(())
    }

    /// Output for a batch `x` of shape `[n, in]`.
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let mut h = x.clone();
        for (i, (w, b)) in self.layers.iter().enumerate() {
            h = h.matmul(&w.t()?)?.broadcast_add(b)?;
            if i + 1 < self.layers.len() {
                h = match self.activation {
                    Activation::Tanh => h.tanh()?,
                    Activation::Relu => h.relu()?,
                };
            }
        }
        Ok(h)
    }

    /// Output for one input, on the host.
    pub fn forward1(&self, x: &[f32]) -> candle_core::Result<Vec<f32>> {
        let xt = Tensor::from_slice(x, (1, x.len()), &Device::Cpu)?;
        self.forward(&xt)?.flatten_all()?.to_vec1::<f32>()
    }

    #[cfg(feature = "train")]
    pub fn vars(&self) -> Vec<Var> {
        self.layers
            .iter()
            .flat_map(|(w, b)| [w.clone(), b.clone()])
            .collect()
    }
}

/// The optimiser rule.
#[derive(Debug, Clone, Copy)]
#[cfg(feature = "train")]
pub(crate) enum Rule {
    /// torch.optim.RMSprop (not centred, no momentum).
    RmsProp { lr: f64, alpha: f64, eps: f64 },
    /// torch.optim.Adam.
    Adam {
        lr: f64,
        beta1: f64,
        beta2: f64,
        eps: f64,
    },
}

/// An optimiser over a fixed list of variables, with global-norm gradient clipping.
#[cfg(feature = "train")]
pub(crate) struct Optimizer {
    rule: Rule,
    clip: f64,
    vars: Vec<Var>,
    m: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
    t: i32,
}

#[cfg(feature = "train")]
impl Optimizer {
    pub fn new(rule: Rule, clip: f64, vars: Vec<Var>) -> Self {
        let zeros: Vec<Vec<f32>> = vars.iter().map(|v| vec![0.0; v.elem_count()]).collect();
        Optimizer {
            rule,
            clip,
            vars,
            m: zeros.clone(),
            v: zeros,
            t: 0,
        }
    }

    /// One step down the gradient of `loss`.
    pub fn backward_step(&mut self, loss: &Tensor) -> Result<(), TmoError> {
        let grads = loss.backward()?;
        let mut g: Vec<Vec<f32>> = Vec::with_capacity(self.vars.len());
        for var in &self.vars {
            g.push(match grads.get(var.as_tensor()) {
                Some(t) => t.flatten_all()?.to_vec1::<f32>()?,
                None => vec![0.0; var.elem_count()],
            });
        }
        let norm = g
            .iter()
            .flatten()
            .map(|&x| f64::from(x) * f64::from(x))
            .sum::<f64>()
            .sqrt();
        let scale = if norm.is_finite() && norm > self.clip {
            self.clip / (norm + 1e-6)
        } else {
            1.0
        };
        if !norm.is_finite() {
            return Err(TmoError::Invalid("non-finite gradient".into()));
        }
        self.t += 1;
        for (i, var) in self.vars.iter().enumerate() {
            let mut p = var.as_tensor().flatten_all()?.to_vec1::<f32>()?;
            let (m, v) = (&mut self.m[i], &mut self.v[i]);
            match self.rule {
                Rule::RmsProp { lr, alpha, eps } => {
                    for k in 0..p.len() {
                        let gk = f64::from(g[i][k]) * scale;
                        let vk = alpha * f64::from(v[k]) + (1.0 - alpha) * gk * gk;
                        v[k] = vk as f32;
                        p[k] -= (lr * gk / (vk.sqrt() + eps)) as f32;
                    }
                }
                Rule::Adam {
                    lr,
                    beta1,
                    beta2,
                    eps,
                } => {
                    let c1 = 1.0 - beta1.powi(self.t);
                    let c2 = 1.0 - beta2.powi(self.t);
                    for k in 0..p.len() {
                        let gk = f64::from(g[i][k]) * scale;
                        let mk = beta1 * f64::from(m[k]) + (1.0 - beta1) * gk;
                        let vk = beta2 * f64::from(v[k]) + (1.0 - beta2) * gk * gk;
                        m[k] = mk as f32;
                        v[k] = vk as f32;
                        p[k] -= (lr * (mk / c1) / ((vk / c2).sqrt() + eps)) as f32;
                    }
                }
            }
            var.set(&Tensor::from_vec(p, var.shape(), &Device::Cpu)?)?;
        }
        Ok(())
    }
}

#[cfg(all(test, feature = "train"))]
mod tests {
    use super::*;
    use crate::rng::seeded;

    #[test]
    fn orthogonal_rows_or_columns() {
        let mut rng = seeded(3);
        for (r, c) in [(4, 9), (9, 4), (5, 5)] {
            let w = orthogonal(r, c, 2.0, &mut rng);
            // The shorter side's vectors are orthogonal with norm `gain`.
            let (n, m) = (r.max(c), r.min(c));
            let get = |i: usize, k: usize| if r >= c { w[k * c + i] } else { w[i * c + k] };
            for i in 0..m {
                for j in 0..m {
                    let dot: f32 = (0..n).map(|k| get(i, k) * get(j, k)).sum();
                    let want = if i == j { 4.0 } else { 0.0 };
                    assert!((dot - want).abs() < 1e-4, "{r}x{c} {i},{j}: {dot}");
                }
            }
        }
    }

    #[test]
    fn adam_and_rmsprop_fit_a_line() {
        for rule in [
            Rule::Adam {
                lr: 0.05,
                beta1: 0.9,
                beta2: 0.999,
                eps: 1e-8,
            },
            Rule::RmsProp {
                lr: 0.01,
                alpha: 0.99,
                eps: 1e-5,
            },
        ] {
            let mut rng = seeded(1);
            let net = Mlp::new(&[1, 8, 1], 1.0, 1.0, &mut rng).unwrap();
            let mut opt = Optimizer::new(rule, 10.0, net.vars());
            let x = Tensor::new(&[[-1f32], [0.0], [0.5], [1.0]], &Device::Cpu).unwrap();
            let y = Tensor::new(&[[-0.5f32], [0.0], [0.25], [0.5]], &Device::Cpu).unwrap();
            let loss = |n: &Mlp| {
                (n.forward(&x).unwrap() - &y)
                    .unwrap()
                    .sqr()
                    .unwrap()
                    .mean_all()
                    .unwrap()
            };
            let first = loss(&net).to_scalar::<f32>().unwrap();
            for _ in 0..300 {
                opt.backward_step(&loss(&net)).unwrap();
            }
            let last = loss(&net).to_scalar::<f32>().unwrap();
            assert!(
                last < first * 0.05 && last < 1e-3,
                "{rule:?}: {first} -> {last}"
            );
        }
    }
}
