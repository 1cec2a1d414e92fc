"""The official `openai` Python SDK, unmodified, against ferryd's OpenAI-compatible HTTP API.

Checks the model list, a non-streaming and a streaming chat completion (same greedy text, usage,
the `ferry` routing extension), and that bad requests come back as the SDK's typed errors.
Exits non-zero on the first failed check; prints "python openai client: OK" at the end.
"""

import argparse
import sys

import openai


def check(cond, what):
    if not cond:
        print(f"FAILED: {what}", file=sys.stderr)
        sys.exit(1)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--base-url", required=True, help="e.g. http://127.0.0.1:8080/v1")
    ap.add_argument("--model", default="auto")
    args = ap.parse_args()

    client = openai.OpenAI(base_url=args.base_url, api_key="unused", max_retries=0, timeout=120)

    ids = [m.id for m in client.models.list().data]
    check("auto" in ids, f"models list has auto: {ids}")

    messages = [
        {"role": "system", "content": "Answer in one short sentence."},
        {"role": "user", "content": "What is the capital of France?"},
    ]
    r = client.chat.completions.create(
        model=args.model, messages=messages, max_tokens=12, temperature=0
    )
    text = r.choices[0].message.content
    check(r.object == "chat.completion", f"object {r.object}")
    check(bool(text), "non-streaming answer is empty")
    check(r.choices[0].finish_reason in ("stop", "length"), f"finish {r.choices[0].finish_reason}")
    check(r.usage.completion_tokens > 0 and r.usage.prompt_tokens > 0, f"usage {r.usage}")
    check(r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens, "total tokens")
    ferry = (r.model_extra or {}).get("ferry") or {}
    check(ferry.get("tier") == "local", f"ferry extension tier: {ferry}")
    check(ferry.get("model") == r.model, f"ferry extension model {ferry} vs {r.model}")
    check(isinstance(ferry.get("joules"), float), f"ferry extension joules: {ferry}")

    raw = client.chat.completions.with_raw_response.create(
        model=r.model, messages=messages, max_tokens=12, temperature=0
    )
    check(raw.headers.get("x-ferry-tier") == "local", f"headers {dict(raw.headers)}")
    check(raw.headers.get("x-ferry-model") == r.model, "x-ferry-model header")

    # Streaming the same greedy request on the model that served it gives the same text.
    chunks = list(
        client.chat.completions.create(
            model=r.model,
            messages=messages,
            max_tokens=12,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    check(streamed == text, f"streamed {streamed!r} != {text!r}")
    check(len(chunks) >= 3, f"only {len(chunks)} chunks")
    last = chunks[-1]
    check(last.usage is not None and last.usage.completion_tokens > 0, f"stream usage {last.usage}")
    check(last.choices and last.choices[0].finish_reason in ("stop", "length"), "stream finish")

    try:
        client.chat.completions.create(model=r.model, messages=messages, max_tokens=0)
        check(False, "max_tokens=0 was accepted")
    except openai.BadRequestError as e:
        check(e.status_code == 400, f"status {e.status_code}")
        check("max_tokens" in str(e), f"error names the field: {e}")
    try:
        client.chat.completions.create(model="no-such-model", messages=messages)
        check(False, "an unknown model was accepted")
    except openai.NotFoundError as e:
        check(e.status_code == 404, f"status {e.status_code}")

    print("python openai client: OK")


if __name__ == "__main__":
    main()
