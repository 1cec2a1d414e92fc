//! Pieces the GGUF transformers ([`super::gemma3`], [`super::gguf_llama`]) share: the quantized
//! token embedding that only dequantizes the rows a request looks up, and RoPE angles computed
//! for the positions being fed rather than a table for the whole context.

use std::borrow::Cow;
use std::sync::Arc;

use candle_core::quantized::{ggml_file, GgmlDType, QTensor};
use candle_core::{Device, Result, Tensor};

use crate::kernels::{QLinear, QWeight};

/// The token embedding, also the output head's weight when the file ties them.
#[derive(Debug, Clone)]
pub(crate) enum Embedding {
    /// Quantized rows, dequantized on lookup (CPU).
    Rows(Arc<QTensor>),
    /// The rows of a tied output head that ferry's kernel holds (so the table is held once).
    HeadRows(Arc<QWeight>),
    /// Dequantized table (accelerators, where row slicing of quantized storage is not exposed).
    Dense(Tensor),
}

impl Embedding {
    /// Row lookup on the CPU, a dense table elsewhere.
    pub(crate) fn new(table: Arc<QTensor>, device: &Device) -> Result<Self> {
        Ok(if device.is_cpu() {
            Embedding::Rows(table)
        } else {
            Embedding::Dense(table.dequantize(device)?)
        })
    }

    /// The embedding of a file whose output head is the same table: shares the head's copy
    /// when ferry's kernel holds it.
    pub(crate) fn tied(head: &QLinear, table: Arc<QTensor>, device: &Device) -> Result<Self> {
        match head {
            QLinear::Kernel(w) if device.is_cpu() => Ok(Embedding::HeadRows(w.clone())),
            _ => Self::new(table, device),
        }
    }

    /// The embeddings of `ids`, `(1, ids.len(), hidden)`.
    pub(crate) fn lookup(&self, ids: &[u32], device: &Device) -> Result<Tensor> {
        match self {
            Embedding::Dense(t) => {
                let ids = Tensor::new(ids, device)?;
                t.index_select(&ids, 0)?.unsqueeze(0)
            }
            Embedding::Rows(qt) => {
                let (rows, dim) = qt.shape().dims2()?;
                let data = qt.data()?;
                let row_bytes = dim / qt.dtype().block_size() * qt.dtype().type_size();
                lookup_rows(qt.dtype(), rows, dim, ids, device, |id| {
                    Cow::Borrowed(&data[id * row_bytes..(id + 1) * row_bytes])
                })
            }
            Embedding::HeadRows(w) => {
                lookup_rows(w.ggml_dtype(), w.rows(), w.cols(), ids, device, |id| {
                    w.row(id)
                })
            }
        }
    }
}

/// Dequantizes rows `ids` of a `rows × dim` table of GGML blocks of `dtype`, `row(id)` giving
/// one row's blocks as the file stores them.
fn lookup_rows<'a>(
    dtype: GgmlDType,
    rows: usize,
    dim: usize,
    ids: &[u32],
    device: &Device,
    row: impl Fn(usize) -> Cow<'a, [u8]>,
) -> Result<Tensor> {
    let mut out = Vec::with_capacity(ids.len() * dim);
    for &id in ids {
        let id = id as usize;
        if id >= rows {
            candle_core::bail!("token id {id} is outside the {rows}-row embedding");
        }
        let row = ggml_file::qtensor_from_ggml(dtype, &row(id), vec![dim], &Device::Cpu)?;
        out.extend(row.dequantize(&Device::Cpu)?.to_vec1::<f32>()?);
    }
    Tensor::from_vec(out, (1, ids.len(), dim), device)
}

/// RoPE inverse frequencies `base^(-2i/dim)` for `i < dim/2`.
pub(crate) fn inv_freq(base: f64, dim: usize) -> Vec<f64> {
    (0..dim / 2)
        .map(|i| 1.0 / base.powf(2.0 * i as f64 / dim as f64))
        .collect()
}

/// `(cos, sin)`, each `(len, inv_freq.len())`, for positions `start..start + len` divided by
/// `scale` (linear RoPE scaling).
pub(crate) fn rope_angles(
    inv_freq: &[f64],
    scale: f64,
    start: usize,
    len: usize,
    device: &Device,
) -> Result<(Tensor, Tensor)> {
    let half = inv_freq.len();
    let (cos, sin) = super::cpu_ops::rope_tables(inv_freq, scale, start, len);
    Ok((
        Tensor::from_vec(cos, (len, half), device)?,
        Tensor::from_vec(sin, (len, half), device)?,
    ))
}

/// A GGUF model's output head and token embedding: `output.weight`, or the embedding itself
/// when the file ties them (`tied`), read through the model's `tensor` loader.
pub(crate) fn gguf_head_and_embedding(
    tied: bool,
    mut tensor: impl FnMut(&str) -> Result<QTensor>,
    device: &Device,
) -> Result<(QLinear, Embedding)> {
    let embed = tensor("token_embd.weight")?;
    let head = if tied {
        None
    } else {
        Some(tensor("output.weight")?)
    };
    head_and_embedding(embed, head, device)
}

/// The output head and the token embedding: the file's own `output.weight` when it has one,
/// else the embedding table tied to the head (held once, see [`Embedding::tied`]).
pub(crate) fn head_and_embedding(
    embed: QTensor,
    output: Option<QTensor>,
    device: &Device,
) -> Result<(QLinear, Embedding)> {
    let embed = Arc::new(embed);
    match output {
        Some(head) => Ok((QLinear::from_qtensor(head)?, Embedding::new(embed, device)?)),
        None => {
            let head = QLinear::from_arc(embed.clone())?;
            let embedding = Embedding::tied(&head, embed, device)?;
            Ok((head, embedding))
        }
    }
}

/// The causal mask of `t` queries at positions `pos..pos + t` over `len` keys starting at
/// absolute position `first`, with an optional sliding window; `(t, len)`, 0 or -inf.
pub(crate) fn causal_mask(
    t: usize,
    len: usize,
    pos: usize,
    first: usize,
    window: Option<usize>,
    device: &Device,
) -> Result<Tensor> {
    let mut mask = Vec::with_capacity(t * len);
    for i in 0..t {
        let qi = pos + i;
        for j in 0..len {
            let kj = first + j;
            let visible = kj <= qi && window.is_none_or(|w| qi - kj < w);
            mask.push(if visible { 0f32 } else { f32::NEG_INFINITY });
        }
    }
    Tensor::from_vec(mask, (t, len), device)
}

/// Causal grouped-query attention over a tensor key/value cache (candle's path): appends `k` and
/// `v` (`(b, kv_heads, t, head_dim)`, already rotated) to `kv`, attends `q`
/// (`(b, heads, t, head_dim)`, queries at positions `pos..`) with logit scale `scale`, keeps a
/// sliding-window layer's cache at `window - 1` keys, and returns `(b, t, heads·head_dim)`.
pub(crate) fn cached_attention(
    kv: &mut Option<(Tensor, Tensor)>,
    q: &Tensor,
    k: Tensor,
    v: Tensor,
    pos: usize,
    scale: f64,
    window: Option<usize>,
) -> Result<Tensor> {
    let (b, nh, t, hd) = q.dims4()?;
    let nkv = k.dim(1)?;
    let cached = kv.as_ref().map(|(k, _)| k.dim(2)).transpose()?.unwrap_or(0);
    let (k, v) = match kv.take() {
        Some((ck, cv)) => (Tensor::cat(&[&ck, &k], 2)?, Tensor::cat(&[&cv, &v], 2)?),
        None => (k, v),
    };
    let len = k.dim(2)?;
    // Absolute position of key 0; queries sit at pos..pos + t.
    let first = pos - cached;

    // Grouped-query attention without copying keys: the query heads that share a key head are
    // stacked along the sequence axis.
    let rep = nh / nkv;
    let q = q.reshape((b, nkv, rep * t, hd))?;
    let mut scores = (q.matmul(&k.t()?)? * scale)?;
    let needs_mask = t > 1 || window.is_some_and(|w| pos + t - first > w);
    if needs_mask {
        // Rows are (query head in the group, query position), as stacked above.
        let mask = causal_mask(t, len, pos, first, window, q.device())?
            .repeat((rep, 1))?
            .to_dtype(scores.dtype())?;
        scores = scores.broadcast_add(&mask)?;
    }
    let probs = candle_nn::ops::softmax_last_dim(&scores)?;
    let out = probs
        .matmul(&v)?
        .reshape((b, nh, t, hd))?
        .transpose(1, 2)?
        .reshape((b, t, nh * hd))?;

    // A sliding-window layer never looks further back than window - 1 keys.
    let (k, v) = match window {
        Some(w) if len > w - 1 => {
            let keep = w - 1;
            (
                k.narrow(2, len - keep, keep)?.contiguous()?,
                v.narrow(2, len - keep, keep)?.contiguous()?,
            )
        }
        _ => (k, v),
    };
    *kv = Some((k, v));
    Ok(out)
}

/// A model with two forward paths over one kind of cache: its own pass on plain CPU buffers,
/// which takes several sequences at once, and candle's, which takes one sequence (any device).
/// What a single-sequence `forward` and a batched one do with those two paths is the same for
/// every such model: [`forward_one`] and [`forward_many`].
pub(crate) trait TwoPaths {
    type Cache;
    /// What the CPU path keeps (norm weights, kernel-ready products).
    type Cpu;

    /// The CPU path, when this model runs on it.
    fn cpu_path(&self) -> Option<&Self::Cpu>;

    fn device(&self) -> &Device;

    /// candle's path: `tokens` at positions `pos..`, the logits of the last one, `(1, vocab)`.
    fn forward_candle(&self, cache: &mut Self::Cache, tokens: &[u32], pos: usize)
        -> Result<Tensor>;

    /// The CPU path over every sequence's rows at once (`all`: every sequence's tokens, in
    /// order); the logits of each sequence's last token.
    fn forward_rows(
        &self,
        cpu: &Self::Cpu,
        items: &mut [(&mut Self::Cache, &[u32], usize)],
        all: &[u32],
    ) -> Result<Vec<Vec<f32>>>;
}

/// One projection `(b, t, n·hd)` split into its `n` heads, `(b, n, t, hd)`, contiguous.
pub(crate) fn heads(y: Tensor, n: usize, hd: usize) -> Result<Tensor> {
    let (b, t, _) = y.dims3()?;
    y.reshape((b, t, n, hd))?.transpose(1, 2)?.contiguous()
}

/// The public `forward` and `forward_batch` of a [`TwoPaths`] model with cache type `$cache`,
/// written once for every such model (inside its `impl` block).
macro_rules! two_paths_api {
    ($cache:ty) => {
        /// Feeds `tokens` at positions `pos..` and returns the logits of the last one,
        /// `(1, vocab)`.
        pub fn forward(&self, cache: &mut $cache, tokens: &[u32], pos: usize) -> Result<Tensor> {
            super::parts::forward_one(self, cache, tokens, pos)
        }

        /// Feeds several sequences at once, each `(cache, tokens, first position)`, and returns
        /// the logits of each one's last token (`parts::forward_many`).
        pub fn forward_batch(
            &self,
            items: &mut [(&mut $cache, &[u32], usize)],
        ) -> Result<Vec<Vec<f32>>> {
            super::parts::forward_many(self, items)
        }
    };
}
pub(crate) use two_paths_api;

/// Feeds `tokens` at positions `pos..` and returns the logits of the last one, `(1, vocab)`.
pub(crate) fn forward_one<M: TwoPaths>(
    model: &M,
    cache: &mut M::Cache,
    tokens: &[u32],
    pos: usize,
) -> Result<Tensor> {
    if model.cpu_path().is_some() {
        let mut rows = forward_many(model, &mut [(cache, tokens, pos)])?;
        let logits = rows.pop().unwrap_or_default();
        let vocab = logits.len();
        return Tensor::from_vec(logits, (1, vocab), model.device());
    }
    model.forward_candle(cache, tokens, pos)
}

/// Feeds several sequences at once, each `(cache, tokens, first position)`, and returns the
/// logits of each one's last token. On the CPU path the products run once over every row; on
/// candle's path (which has no batch dimension for separate caches) the sequences run one
/// after another.
pub(crate) fn forward_many<M: TwoPaths>(
    model: &M,
    items: &mut [(&mut M::Cache, &[u32], usize)],
) -> Result<Vec<Vec<f32>>> {
    let Some(cpu) = model.cpu_path() else {
        return items
            .iter_mut()
            .map(|(cache, tokens, pos)| {
                model
                    .forward_candle(cache, tokens, *pos)?
                    .flatten_all()?
                    .to_vec1::<f32>()
            })
            .collect();
    };
    let all: Vec<u32> = items.iter().flat_map(|i| i.1.iter().copied()).collect();
    model.forward_rows(cpu, items, &all)
}
