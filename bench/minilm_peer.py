#!/usr/bin/env python3
"""Measures the sentence encoder as the reference stack runs it: the same all-MiniLM-L6-v2 files
through Hugging Face transformers on PyTorch (CPU), mean pooling over the attention mask and L2
normalisation, which is what sentence-transformers does for this model. The peer that
`ferry bench router` compares ferry's encoder with, in the same run.

    .cache/torch/venv/bin/python bench/minilm_peer.py --model-dir models/cache/all-minilm-l6-v2 \
        --texts questions.json --threads 2

(scripts/setup-encoder-peer makes .cache/torch/venv.) `--texts` is a JSON object of named lists of
questions, e.g. {"one": [...], "stream": [...]}. Each list is embedded one question at a time
(batch 1, as a router sees requests), each call timed; one untimed warm-up call comes first.

Output is one JSON object on the last line:
  {"engine": "transformers X / torch Y", "threads", "sets": {name: {"p50_ms", "p99_ms", "n"}},
   "embeddings": [[...], ...]}   # the first --keep vectors of the first list, for an agreement check
"""

from __future__ import annotations

import argparse
import json
import time


def percentile(sorted_ms: list[float], q: float) -> float:
    if not sorted_ms:
        return float("nan")
    return sorted_ms[round((len(sorted_ms) - 1) * q)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-dir", required=True)
    ap.add_argument("--texts", required=True, help="JSON file: {name: [question, ...]}")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--keep", type=int, default=8, help="embeddings returned for the check")
    args = ap.parse_args()

    import torch
    import transformers
    from transformers import AutoModel, AutoTokenizer

    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(args.model_dir, local_files_only=True)
    model = AutoModel.from_pretrained(args.model_dir, local_files_only=True).eval()
    load_s = time.perf_counter() - t0

    def embed(text: str) -> "torch.Tensor":
        enc = tok([text], return_tensors="pt", truncation=True, max_length=512)
        out = model(**enc).last_hidden_state
        mask = enc["attention_mask"].unsqueeze(-1).to(out.dtype)
        pooled = (out * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
        return torch.nn.functional.normalize(pooled, p=2, dim=1)[0]

    with open(args.texts, encoding="utf-8") as f:
        sets: dict[str, list[str]] = json.load(f)
    first = next(iter(sets.values()), [])
    if first:
        embed(first[0])  # warm-up: thread pool start, first-touch of the weights
    report = {}
    kept: list[list[float]] = []
    for i, (name, texts) in enumerate(sets.items()):
        ms = []
        for j, text in enumerate(texts):
            t = time.perf_counter()
            v = embed(text)
            ms.append((time.perf_counter() - t) * 1e3)
            if i == 0 and j < args.keep:
                kept.append([float(x) for x in v])
        ms.sort()
        report[name] = {"p50_ms": percentile(ms, 0.5), "p99_ms": percentile(ms, 0.99), "n": len(ms)}
    print(
        json.dumps(
            {
                "engine": f"transformers {transformers.__version__} / torch {torch.__version__}",
                "threads": args.threads,
                "load_s": load_s,
                "sets": report,
                "embeddings": kept,
            }
        )
    )


if __name__ == "__main__":
    main()
