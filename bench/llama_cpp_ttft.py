#!/usr/bin/env python3
"""Time to first token of llama.cpp (through llama-cpp-python) on a chat question: the peer of
`ferry bench ttft`.

    .venv-bench/bin/python bench/llama_cpp_ttft.py --model PATH.gguf \
        --question "What is the capital of France?" --requests 21 --threads 2 --json

Each request clears the context (`Llama.reset()`: no prompt prefix is reused from the request
before, as ferryd reuses none), then streams `create_chat_completion` with the GGUF's own chat
template and times the first chunk that carries content. The first request is the first after
loading the model (no warm-up), as ferryd's is the first after its start. In-process: no HTTP, no
routing, so the peer pays less than an app talking to ferryd does.

Output with --json is one JSON object:
  {"engine": "llama.cpp", "version", "model", "threads", "requests", "first_ms", "p50_ms",
   "min_ms", "max_ms", "load_s"}
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

from llama_cpp_peer import import_llama_cpp, open_model


def first_token_ms(llm, question: str, max_tokens: int) -> float:
    llm.reset()
    t0 = time.perf_counter()
    first = None
    for chunk in llm.create_chat_completion(
        messages=[{"role": "user", "content": question}],
        max_tokens=max_tokens,
        temperature=0.0,
        stream=True,
    ):
        delta = (chunk.get("choices") or [{}])[0].get("delta", {})
        if first is None and delta.get("content"):
            first = (time.perf_counter() - t0) * 1000.0
    if first is None:
        raise RuntimeError("the stream carried no content")
    return first


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="llama.cpp time to first token on a chat question")
    p.add_argument("--model", required=True, help="path to a .gguf file")
    p.add_argument("--question", default="What is the capital of France?")
    p.add_argument("--requests", type=int, default=21)
    p.add_argument("--max-tokens", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    args = p.parse_args(argv)
    if args.requests < 1 or args.threads < 1 or args.max_tokens < 1:
        p.error("--requests, --threads and --max-tokens must be >= 1")
    if not os.path.isfile(args.model):
        p.error(f"model file not found: {args.model}")
    llama_cpp = import_llama_cpp()
    if llama_cpp is None:
        return 2
    llm, load_s = open_model(llama_cpp, args.model, 512, 512, args.threads)
    ms = [first_token_ms(llm, args.question, args.max_tokens) for _ in range(args.requests)]
    out = {
        "engine": "llama.cpp",
        "version": getattr(llama_cpp, "__version__", None),
        "model": os.path.basename(args.model),
        "threads": args.threads,
        "requests": args.requests,
        "first_ms": ms[0],
        "p50_ms": statistics.median(ms),
        "min_ms": min(ms),
        "max_ms": max(ms),
        "load_s": load_s,
    }
    if args.json:
        print(json.dumps(out))
    else:
        print(f"llama.cpp {out['version']}: first {ms[0]:.1f} ms, p50 {out['p50_ms']:.1f} ms "
              f"(min {out['min_ms']:.1f}, max {out['max_ms']:.1f}) over {args.requests} requests")
    return 0


if __name__ == "__main__":
    sys.exit(main())
