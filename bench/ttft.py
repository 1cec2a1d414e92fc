#!/usr/bin/env python3
"""Time to first token of a running ferryd (or any OpenAI-compatible server), as a client sees it.

Streams the same chat request N times per model and reports the time from sending the request to
the first chunk that carries content: the first request, p50, min and max, in milliseconds.
Standard library only. Used for the README's "Time to first token and memory" figures:

    ./target/release/ferryd --config configs/edge.toml --state-dir /tmp/ttft-state &
    python3 bench/ttft.py smollm2-135m-instruct auto gemma3-270m-it
"""
import argparse
import http.client
import json
import statistics
import sys
import time
import urllib.parse


def first_token_ms(url, model, question, max_tokens, token):
    u = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(u.hostname, u.port or 80, timeout=120)
    body = json.dumps({
        "model": model,
        "stream": True,
        "max_tokens": max_tokens,
        "messages": [{"role": "user", "content": question}],
    })
    headers = {"content-type": "application/json"}
    if token:
        headers["authorization"] = f"Bearer {token}"
    t0 = time.perf_counter()
    conn.request("POST", "/v1/chat/completions", body, headers)
    resp = conn.getresponse()
    if resp.status != 200:
        raise SystemExit(f"{model}: HTTP {resp.status}: {resp.read()[:300]!r}")
    first = None
    for raw in resp:
        line = raw.decode().strip()
        if not line.startswith("data:") or line == "data: [DONE]":
            continue
        choices = json.loads(line[5:]).get("choices") or [{}]
        if first is None and choices[0].get("delta", {}).get("content"):
            first = (time.perf_counter() - t0) * 1000
    conn.close()
    if first is None:
        raise SystemExit(f"{model}: the stream carried no content")
    return first


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="+")
    ap.add_argument("--url", default="http://127.0.0.1:8080")
    ap.add_argument("--requests", type=int, default=21)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--question", default="What is the capital of Germany?")
    ap.add_argument("--token", default=None, help="bearer token, when ferryd has auth.tokens_file")
    args = ap.parse_args()
    print(f"{'model':<28} {'first ms':>9} {'p50 ms':>8} {'min ms':>8} {'max ms':>8}")
    for model in args.models:
        xs = [first_token_ms(args.url, model, args.question, args.max_tokens, args.token)
              for _ in range(args.requests)]
        print(f"{model:<28} {xs[0]:>9.0f} {statistics.median(xs):>8.0f} {min(xs):>8.0f} {max(xs):>8.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
