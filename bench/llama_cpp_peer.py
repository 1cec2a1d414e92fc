#!/usr/bin/env python3
"""Measures llama.cpp (through llama-cpp-python) on a GGUF model: the peer that ferry's own
numbers are compared with.

    .venv-bench/bin/python bench/llama_cpp_peer.py --model PATH.gguf \
        --prompt-tokens 64 --gen-tokens 128 --threads 2 --repeats 3 --json

(scripts/setup-bench-peer builds .venv-bench.) For each repeat it

  * prefill: clears the context and evaluates a prompt of exactly --prompt-tokens tokens (a fixed
    English text, repeated and truncated, BOS included when the model adds one) in one
    `Llama.eval` call, timed;
  * decode: then runs --gen-tokens steps of greedy sampling (`Llama.sample(temp=0)`) and
    `Llama.eval([token])`, ignoring end-of-sequence, timed as a whole. That is exactly M sampled
    tokens and M single-token forward passes, the same work as llama-bench's `tg M`.

One untimed warm-up pass comes first (page-in of the mmapped weights, thread-pool start). The
reported rates are medians over the repeats. Both thread counts (generation and batch) are set to
--threads: llama-cpp-python defaults n_threads_batch, which prefill uses, to all CPUs.

Output with --json is one JSON object:
  {"engine": "llama.cpp", "version", "model", "threads", "prompt_tokens", "gen_tokens",
   "prefill_tok_s", "decode_tok_s", "load_s", ...extra diagnostic keys}
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

# A fixed, plain English text; repeated until it yields enough tokens.
PROMPT_TEXT = (
    "The harbour town woke slowly. Fishing boats returned with the tide, gulls circled the "
    "market, and the baker opened his shutters to the smell of bread. Children ran along the "
    "sea wall on their way to school, while the ferry sounded its horn and left for the islands "
    "across the bay. By noon the square was full of traders, travellers and old friends "
    "exchanging news about the weather, the catch and the price of coal. "
)


def build_prompt(llm, n_tokens: int) -> list[int]:
    text = PROMPT_TEXT
    while True:
        tokens = llm.tokenize(text.encode("utf-8"), add_bos=True, special=False)
        if len(tokens) >= n_tokens:
            return list(tokens[:n_tokens])
        text += PROMPT_TEXT


def synchronize(llm, llama_cpp) -> None:
    # llama_decode may return before the backend is done; CPU is synchronous today, but be exact.
    fn = getattr(llama_cpp, "llama_synchronize", None)
    if fn is not None:
        fn(llm._ctx.ctx)


def import_llama_cpp():
    """The llama_cpp module, or None after saying how to install it."""
    try:
        import llama_cpp
    except ImportError as e:
        print(f"error: cannot import llama_cpp ({e}); run scripts/setup-bench-peer and use .venv-bench/bin/python",
              file=sys.stderr)
        return None
    return llama_cpp


def open_model(llama_cpp, path: str, n_ctx: int, n_batch: int, threads: int):
    """Loads a GGUF on the CPU with `threads` for generation and for batches (llama-cpp-python
    defaults n_threads_batch, which prefill uses, to all CPUs); returns it and the seconds taken."""
    t0 = time.perf_counter()
    llm = llama_cpp.Llama(
        model_path=path,
        n_ctx=n_ctx,
        n_batch=n_batch,
        n_threads=threads,
        n_threads_batch=threads,
        n_gpu_layers=0,
        verbose=False,
    )
    return llm, time.perf_counter() - t0


def perf_reset(llm, llama_cpp) -> None:
    fn = getattr(llama_cpp, "llama_perf_context_reset", None)
    if fn is not None:
        fn(llm._ctx.ctx)


def perf_decode_tok_s(llm, llama_cpp):
    """llama.cpp's own count of single-token evals since the last reset: decode speed without
    the Python sampling loop around it. None where the binding lacks it."""
    fn = getattr(llama_cpp, "llama_perf_context", None)
    if fn is None:
        return None
    data = fn(llm._ctx.ctx)
    if data.n_eval <= 0 or data.t_eval_ms <= 0:
        return None
    return data.n_eval / (data.t_eval_ms / 1000.0)


def run_once(llm, llama_cpp, prompt: list[int], gen_tokens: int) -> tuple[float, float, list[int]]:
    perf_reset(llm, llama_cpp)
    llm.reset()  # n_tokens = 0; the next eval() drops every KV-cache cell from position 0 on
    t0 = time.perf_counter()
    llm.eval(prompt)
    synchronize(llm, llama_cpp)
    t1 = time.perf_counter()
    generated = []
    for _ in range(gen_tokens):
        # temp=0 -> greedy sampler (after a no-op repetition-penalty stage at repeat_penalty=1);
        # EOS is never checked, so the loop always runs gen_tokens steps.
        tok = llm.sample(temp=0.0, repeat_penalty=1.0)
        generated.append(int(tok))
        llm.eval([tok])
    synchronize(llm, llama_cpp)
    t2 = time.perf_counter()
    if len(generated) != gen_tokens or llm.n_tokens != len(prompt) + gen_tokens:
        raise RuntimeError(
            f"expected {gen_tokens} generated tokens and {len(prompt) + gen_tokens} in context, "
            f"got {len(generated)} and {llm.n_tokens}"
        )
    return t1 - t0, t2 - t1, generated


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="llama.cpp prefill/decode throughput on a GGUF model")
    p.add_argument("--model", required=True, help="path to a .gguf file")
    p.add_argument("--prompt-tokens", type=int, default=64, help="prompt length N (default %(default)s)")
    p.add_argument("--gen-tokens", type=int, default=128, help="generated tokens M (default %(default)s)")
    p.add_argument("--threads", type=int, default=2, help="CPU threads, for generation and batches (default %(default)s)")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats; medians are reported (default %(default)s)")
    p.add_argument("--warmup", type=int, default=1, help="untimed warm-up passes (default %(default)s)")
    p.add_argument("--n-ctx", type=int, default=0, help="context size (default: prompt + gen tokens)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    args = p.parse_args(argv)

    for name in ("prompt_tokens", "gen_tokens", "threads", "repeats"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if not os.path.isfile(args.model):
        p.error(f"model file not found: {args.model}")

    llama_cpp = import_llama_cpp()
    if llama_cpp is None:
        return 2

    n_ctx = args.n_ctx or (args.prompt_tokens + args.gen_tokens)
    # n_batch: the whole prompt in one llama_decode call.
    llm, load_s = open_model(llama_cpp, args.model, n_ctx, max(512, args.prompt_tokens), args.threads)
    if llm.n_ctx() < args.prompt_tokens + args.gen_tokens:
        print(f"error: n_ctx {llm.n_ctx()} < prompt + gen tokens", file=sys.stderr)
        return 2

    prompt = build_prompt(llm, args.prompt_tokens)

    for _ in range(args.warmup):
        run_once(llm, llama_cpp, prompt, min(args.gen_tokens, 16))

    load_before = os.getloadavg()[0]
    prefill_rates, decode_rates, internal_decode_rates, outputs = [], [], [], []
    for _ in range(args.repeats):
        prefill_s, decode_s, generated = run_once(llm, llama_cpp, prompt, args.gen_tokens)
        prefill_rates.append(args.prompt_tokens / prefill_s)
        decode_rates.append(args.gen_tokens / decode_s)
        internal_decode_rates.append(perf_decode_tok_s(llm, llama_cpp))
        outputs.append(generated)
    load_after = os.getloadavg()[0]

    system_info = llama_cpp.llama_print_system_info()
    if isinstance(system_info, bytes):
        system_info = system_info.decode("utf-8", "replace")
    result = {
        "engine": "llama.cpp",
        "version": f"llama-cpp-python {llama_cpp.__version__}",
        "model": os.path.basename(args.model),
        "threads": args.threads,
        "prompt_tokens": args.prompt_tokens,
        "gen_tokens": args.gen_tokens,
        "prefill_tok_s": round(statistics.median(prefill_rates), 2),
        "decode_tok_s": round(statistics.median(decode_rates), 2),
        "load_s": round(load_s, 3),
        # diagnostics
        "repeats": args.repeats,
        "prefill_tok_s_runs": [round(r, 2) for r in prefill_rates],
        "decode_tok_s_runs": [round(r, 2) for r in decode_rates],
        "decode_tok_s_llama_perf": (
            round(statistics.median(internal_decode_rates), 2) if None not in internal_decode_rates else None
        ),
        "n_ctx": llm.n_ctx(),
        "greedy_deterministic": all(o == outputs[0] for o in outputs),
        "model_path": os.path.abspath(args.model),
        "system_info": system_info.strip(),
        # 1-minute load average before and after the timed runs (after includes this process).
        # Other work on the machine (a compiler, a daemon) skews the numbers badly: llama.cpp's
        # OpenMP threads spin-wait and lose whole time slices when the cores are oversubscribed.
        "loadavg_1m": [round(load_before, 2), round(load_after, 2)],
        "cpu_count": os.cpu_count(),
    }
    if args.json:
        print(json.dumps(result))
    else:
        text = llm.detokenize(outputs[0]).decode("utf-8", "replace")
        print(
            f"llama.cpp ({result['version']}) {result['model']} threads={args.threads}: "
            f"prefill {result['prefill_tok_s']:.1f} tok/s ({args.prompt_tokens} tok), "
            f"decode {result['decode_tok_s']:.1f} tok/s ({args.gen_tokens} tok), "
            f"load {load_s:.2f} s, median of {args.repeats}"
        )
        if load_before > 0.5:
            print(f"  warning: 1-min load average was {load_before:.2f} before the runs; other work may skew this")
        print(f"  greedy continuation: {text[:120]!r}{'...' if len(text) > 120 else ''}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
