//! A BERT-family encoder's forward pass on plain buffers with int8 linear layers: every
//! weight matrix quantised to Q8_0 at load and multiplied by ferry's kernels
//! ([`crate::kernels`], activations rounded to int8 per 32-value block), one text at a time
//! (no padding). The f32 path through candle spends a 54-token question's ~19 ms almost all in
//! f32 matrix products on this kind of 2-core CPU; `vpdpbusd` does four times the
//! multiply-adds per instruction, and a text alone needs no padding or mask.
//!
//! The embeddings table, norms and biases stay f32; attention (softmax over all tokens, no
//! mask) and GELU (the exact, erf form) are the CPU passes' own ([`crate::model::cpu_ops`]).

use std::collections::HashMap;

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};
use candle_transformers::models::bert::{Config, HiddenAct};

use crate::candle_err;
use crate::kernels::{par_items, with_avx512, QLinear};
use crate::model::cpu_ops::{
    attend_row, full_attention_head, gelu_erf, gelu_tanh, layer_norm_in_place, ACTIVATION_MACS,
    ATTENTION_BLOCK, ATTENTION_QUERIES,
};
use ferry_core::{Error, Result};

/// A linear layer: int8 weight, f32 bias.
struct Linear {
    weight: QLinear,
    bias: Vec<f32>,
}

impl Linear {
    /// `out = x·Wᵀ` for `m` rows of `x`, without the bias: each caller adds it in a pass it
    /// makes anyway (the attention's gather, GELU, the residual).
    fn product(&self, x: &[f32], m: usize, out: &mut Vec<f32>) -> Result<()> {
        out.clear();
        out.resize(m * self.bias.len(), 0.0);
        self.weight.matmul_f32(x, m, out).map_err(candle_err)
    }
}

/// `x += y + bias`, row by row.
fn add_residual(x: &mut [f32], y: &[f32], bias: &[f32]) {
    for (xr, yr) in x
        .chunks_exact_mut(bias.len())
        .zip(y.chunks_exact(bias.len()))
    {
        for ((v, a), b) in xr.iter_mut().zip(yr).zip(bias) {
            *v += a + b;
        }
    }
}

/// The feed-forward activation of `row + bias`, in place.
#[inline(always)]
fn activate(act: HiddenAct, row: &mut [f32], bias: &[f32]) {
    let biased = row.iter_mut().zip(bias);
    match act {
        HiddenAct::Gelu => biased.for_each(|(v, b)| *v = gelu_erf(*v + b)),
        HiddenAct::GeluApproximate => biased.for_each(|(v, b)| *v = gelu_tanh(*v + b)),
        HiddenAct::Relu => biased.for_each(|(v, b)| *v = (*v + b).max(0.0)),
    }
}

/// Buffers one pass reuses from layer to layer.
#[derive(Default)]
struct Scratch {
    qkv: Vec<f32>,
    ctx: Vec<f32>,
    attn: Vec<f32>,
    up: Vec<f32>,
    down: Vec<f32>,
}

struct Norm {
    weight: Vec<f32>,
    bias: Vec<f32>,
}

struct Layer {
    /// Query, key and value stacked: one product gives each token's `[q | k | v]`.
    qkv: Linear,
    attn_out: Linear,
    attn_norm: Norm,
    up: Linear,
    down: Linear,
    out_norm: Norm,
}

/// The encoder, ready to embed one tokenised text at a time.
pub(super) struct QuantizedBert {
    /// Word embeddings, `vocab × hidden`.
    words: Vec<f32>,
    /// Position embeddings, `max_positions × hidden`.
    positions: Vec<f32>,
    /// Token type 0's embedding (a single text has no second segment).
    token_type: Vec<f32>,
    embed_norm: Norm,
    layers: Vec<Layer>,
    hidden: usize,
    heads: usize,
    eps: f32,
    act: HiddenAct,
}

/// Tensors by name, found with or without the `bert.` prefix some checkpoints carry.
struct Weights(HashMap<String, Tensor>);

impl Weights {
    fn get(&self, name: &str) -> Result<&Tensor> {
        self.0
            .get(name)
            .or_else(|| self.0.get(&format!("bert.{name}")))
            .ok_or_else(|| Error::Engine(format!("encoder weights lack {name}")))
    }

    fn vector(&self, name: &str) -> Result<Vec<f32>> {
        self.get(name)?
            .to_dtype(DType::F32)
            .and_then(|t| t.flatten_all())
            .and_then(|t| t.to_vec1::<f32>())
            .map_err(candle_err)
    }

    fn norm(&self, prefix: &str) -> Result<Norm> {
        Ok(Norm {
            weight: self.vector(&format!("{prefix}.weight"))?,
            bias: self.vector(&format!("{prefix}.bias"))?,
        })
    }

    /// The `(out, in)` weights of `prefixes` stacked by rows and quantised to Q8_0, with their
    /// biases.
    fn linear(&self, prefixes: &[String]) -> Result<Linear> {
        let mut weights = Vec::with_capacity(prefixes.len());
        let mut bias = Vec::new();
        for p in prefixes {
            weights.push(
                self.get(&format!("{p}.weight"))?
                    .to_dtype(DType::F32)
                    .map_err(candle_err)?,
            );
            bias.extend(self.vector(&format!("{p}.bias"))?);
        }
        let stacked = Tensor::cat(&weights, 0).map_err(candle_err)?;
        let (rows, cols) = stacked.dims2().map_err(candle_err)?;
        if rows != bias.len() || !cols.is_multiple_of(crate::kernels::BLOCK) {
            return Err(Error::Engine(format!(
                "encoder layer {} is {rows}x{cols} with {} biases; int8 weights need rows of a multiple of {} values",
                prefixes.join("+"),
                bias.len(),
                crate::kernels::BLOCK
            )));
        }
        let q = QTensor::quantize(&stacked, GgmlDType::Q8_0).map_err(candle_err)?;
        Ok(Linear {
            weight: QLinear::from_qtensor(q).map_err(candle_err)?,
            bias,
        })
    }
}

impl QuantizedBert {
    /// Reads a BERT checkpoint's tensors (any float type) and quantises its linear layers.
    pub(super) fn load(tensors: HashMap<String, Tensor>, config: &Config) -> Result<Self> {
        let w = Weights(tensors);
        let hidden = config.hidden_size;
        let heads = config.num_attention_heads;
        if heads == 0 || !hidden.is_multiple_of(heads) {
            return Err(Error::Engine(format!(
                "encoder hidden size {hidden} does not split into {heads} heads"
            )));
        }
        let mut layers = Vec::with_capacity(config.num_hidden_layers);
        for l in 0..config.num_hidden_layers {
            let p = format!("encoder.layer.{l}");
            let attn = format!("{p}.attention");
            layers.push(Layer {
                qkv: w.linear(&[
                    format!("{attn}.self.query"),
                    format!("{attn}.self.key"),
                    format!("{attn}.self.value"),
                ])?,
                attn_out: w.linear(&[format!("{attn}.output.dense")])?,
                attn_norm: w.norm(&format!("{attn}.output.LayerNorm"))?,
                up: w.linear(&[format!("{p}.intermediate.dense")])?,
                down: w.linear(&[format!("{p}.output.dense")])?,
                out_norm: w.norm(&format!("{p}.output.LayerNorm"))?,
            });
        }
        let token_types = w.vector("embeddings.token_type_embeddings.weight")?;
        Ok(QuantizedBert {
            words: w.vector("embeddings.word_embeddings.weight")?,
            positions: w.vector("embeddings.position_embeddings.weight")?,
            token_type: token_types.get(..hidden).unwrap_or_default().to_vec(),
            embed_norm: w.norm("embeddings.LayerNorm")?,
            layers,
            hidden,
            heads,
            eps: config.layer_norm_eps as f32,
            act: config.hidden_act,
        })
    }

    /// The mean of the last layer's token vectors for one tokenised text (not normalised).
    pub(super) fn mean_pooled(&self, ids: &[u32]) -> Result<Vec<f32>> {
        let h = self.hidden;
        let n = ids.len();
        if n == 0 {
            return Err(Error::Engine("the encoder got no tokens".into()));
        }
        if n * h > self.positions.len() {
            return Err(Error::Engine(format!(
                "{n} tokens exceed the encoder's {} positions",
                self.positions.len() / h
            )));
        }
        let vocab = self.words.len() / h;
        let mut x = vec![0f32; n * h];
        for (i, (&id, row)) in ids.iter().zip(x.chunks_exact_mut(h)).enumerate() {
            let id = id as usize;
            if id >= vocab {
                return Err(Error::Engine(format!(
                    "token {id} is outside the encoder's vocabulary of {vocab}"
                )));
            }
            let word = &self.words[id * h..][..h];
            let pos = &self.positions[i * h..][..h];
            for (((o, &a), &b), &c) in row.iter_mut().zip(word).zip(pos).zip(&self.token_type) {
                *o = a + b + c;
            }
        }
        layer_norm_in_place(
            &mut x,
            &self.embed_norm.weight,
            &self.embed_norm.bias,
            self.eps,
        );
        let mut scratch = Scratch::default();
        for layer in &self.layers {
            self.layer(layer, &mut x, n, &mut scratch)?;
        }
        let mut mean = vec![0f32; h];
        for row in x.chunks_exact(h) {
            for (m, v) in mean.iter_mut().zip(row) {
                *m += v;
            }
        }
        for m in &mut mean {
            *m /= n as f32;
        }
        Ok(mean)
    }

    fn layer(&self, layer: &Layer, x: &mut [f32], n: usize, s: &mut Scratch) -> Result<()> {
        let (h, heads) = (self.hidden, self.heads);
        let hd = h / heads;
        layer.qkv.product(x, n, &mut s.qkv)?;
        let scale = 1.0 / (hd as f32).sqrt();
        if hd.is_multiple_of(ATTENTION_BLOCK) {
            attention_by_heads(&s.qkv, &layer.qkv.bias, n, h, heads, scale, &mut s.ctx);
        } else {
            for row in s.qkv.chunks_exact_mut(3 * h) {
                row.iter_mut()
                    .zip(&layer.qkv.bias)
                    .for_each(|(v, b)| *v += b);
            }
            s.ctx.clear();
            s.ctx.resize(n * h, 0.0);
            let qkv = &s.qkv;
            // One item per (token, head); every token attends to every token.
            par_items(&mut s.ctx, n * heads, hd, n * n * h * 2, |item, out| {
                let (i, head) = (item / heads, item % heads);
                let q = &qkv[i * 3 * h + head * hd..][..hd];
                let keys = &qkv[h + head * hd..];
                let values = &qkv[2 * h + head * hd..];
                attend_row(q, keys, values, 3 * h, scale, n, out);
            });
        }
        layer.attn_out.product(&s.ctx, n, &mut s.attn)?;
        add_residual(x, &s.attn, &layer.attn_out.bias);
        layer_norm_in_place(x, &layer.attn_norm.weight, &layer.attn_norm.bias, self.eps);
        layer.up.product(x, n, &mut s.up)?;
        let bias = &layer.up.bias;
        let act = self.act;
        // Over the pool too: alone, the exponentials of a 64-token text's activations are a
        // tenth of the pass, with the other core waiting.
        par_items(
            &mut s.up,
            n,
            bias.len(),
            n * bias.len() * ACTIVATION_MACS,
            |_, row| {
                with_avx512(
                    row,
                    |row| activate(act, row, bias),
                    |row| activate(act, row, bias),
                )
            },
        );
        layer.down.product(&s.up, n, &mut s.down)?;
        add_residual(x, &s.down, &layer.down.bias);
        layer_norm_in_place(x, &layer.out_norm.weight, &layer.out_norm.bias, self.eps);
        Ok(())
    }
}

/// Every token's attention over every token, one head per work item: each head's queries,
/// keys (transposed, zero-padded) and values are gathered from the `[q | k | v]` rows, and the
/// heads' outputs put back in token order.
fn attention_by_heads(
    qkv: &[f32],
    bias: &[f32],
    n: usize,
    h: usize,
    heads: usize,
    scale: f32,
    ctx: &mut Vec<f32>,
) {
    let hd = h / heads;
    let np = n.div_ceil(ATTENTION_BLOCK) * ATTENTION_BLOCK;
    let mut by_head = vec![0f32; heads * n * hd];
    par_items(&mut by_head, heads, n * hd, n * n * h * 2, |head, out| {
        // Queries in whole blocks of `ATTENTION_QUERIES` rows, the last ones zero; the biases go
        // on here.
        let mut q = vec![0f32; n.div_ceil(ATTENTION_QUERIES) * ATTENTION_QUERIES * hd];
        let (mut kt, mut v) = (vec![0f32; hd * np], vec![0f32; n * hd]);
        let [bq, bk, bv] = [0, h, 2 * h].map(|at| &bias[at + head * hd..][..hd]);
        for i in 0..n {
            let row = &qkv[i * 3 * h..][..3 * h];
            let biased = |at: usize, b: &[f32], dst: &mut [f32]| {
                for ((d, &x), &b) in dst.iter_mut().zip(&row[at + head * hd..][..hd]).zip(b) {
                    *d = x + b;
                }
            };
            biased(0, bq, &mut q[i * hd..][..hd]);
            biased(2 * h, bv, &mut v[i * hd..][..hd]);
            for (d, (&k, &b)) in row[h + head * hd..][..hd].iter().zip(bk).enumerate() {
                kt[d * np + i] = k + b;
            }
        }
        let head = |out: &mut [f32]| full_attention_head(&q, &kt, &v, n, hd, scale, out);
        with_avx512(out, head, head);
    });
    ctx.clear();
    ctx.resize(n * h, 0.0);
    for (head, block) in by_head.chunks_exact(n * hd).enumerate() {
        for (i, row) in block.chunks_exact(hd).enumerate() {
            ctx[i * h + head * hd..][..hd].copy_from_slice(row);
        }
    }
}

/// Loads a safetensors checkpoint's tensors for [`QuantizedBert::load`].
pub(super) fn read_tensors(path: &std::path::Path) -> Result<HashMap<String, Tensor>> {
    candle_core::safetensors::load(path, &Device::Cpu).map_err(candle_err)
}
