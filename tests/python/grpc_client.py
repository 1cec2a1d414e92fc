#!/usr/bin/env python3
"""Standalone gRPC client for ferryd, written from proto/ferry/v1/inference.proto alone.

It stands in for a third-party app: it generates Python stubs from the .proto at run time
(grpc_tools.protoc, into a temporary directory), then

  1. calls ferry.v1.Inference/Generate with one user message, greedy decoding
     (temperature 0, max_tokens 24, seed 1), prints the streamed text deltas, and checks that the
     stream ends with exactly one `completion` event holding a request id, a model and at least
     one completion token, and that the deltas joined are non-empty;
  2. calls ListModels and checks that at least one model is listed.

Exit status: 0 on success (last line `python grpc client: OK (<n> tokens from <model>)`),
1 when the server answered but broke the contract, 2 when the server could not be reached or an
RPC failed, 3 when the stubs could not be generated or imported (setup problem).

Needs grpcio, grpcio-tools and protobuf: run scripts/setup-python, then
    .venv/bin/python tests/python/grpc_client.py --addr 127.0.0.1:50051
"""

from __future__ import annotations

import argparse
import importlib
import sys
import tempfile
from pathlib import Path

PREFIX = "python grpc client"
EXIT_CONTRACT, EXIT_RPC, EXIT_SETUP = 1, 2, 3

PROTO_ROOT = Path(__file__).resolve().parents[2] / "proto"
PROTO_FILE = "ferry/v1/inference.proto"  # relative to PROTO_ROOT; also its import path
PROMPT = "What is the capital of France?"


class Failure(Exception):
    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code = code


def fail(code: int, message: str) -> "Failure":
    return Failure(code, message)


def load_stubs(out_dir: str):
    """Generates inference_pb2 / inference_pb2_grpc into out_dir and imports them."""
    try:
        from grpc_tools import protoc
        import grpc_tools
    except ImportError as e:
        raise fail(EXIT_SETUP, f"cannot import grpc_tools ({e}); run scripts/setup-python and use .venv/bin/python")

    proto_path = PROTO_ROOT / PROTO_FILE
    if not proto_path.is_file():
        raise fail(EXIT_SETUP, f"proto file not found: {proto_path}")
    # google/protobuf/*.proto (well-known types) ship inside grpc_tools.
    wkt_include = Path(grpc_tools.__file__).resolve().parent / "_proto"

    args = [
        "grpc_tools.protoc",
        f"--proto_path={PROTO_ROOT}",
        f"--proto_path={wkt_include}",
        f"--python_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        PROTO_FILE,
    ]
    rc = protoc.main(args)
    if rc != 0:
        raise fail(EXIT_SETUP, f"protoc failed with status {rc} on {proto_path} (see its messages above)")

    # The generated modules import each other as `ferry.v1.inference_pb2`; put the output dir
    # first so the packages resolve (as namespace packages) to the generated files.
    sys.path.insert(0, out_dir)
    try:
        pb2 = importlib.import_module("ferry.v1.inference_pb2")
        pb2_grpc = importlib.import_module("ferry.v1.inference_pb2_grpc")
    except Exception as e:  # version-mismatch RuntimeErrors, ImportErrors, ...
        raise fail(EXIT_SETUP, f"cannot import the generated stubs: {type(e).__name__}: {e}")
    return pb2, pb2_grpc


def rpc_error(what: str, addr: str, err) -> Failure:
    import grpc

    if isinstance(err, grpc.RpcError) and hasattr(err, "code"):
        code = err.code()
        details = err.details() or ""
        if code == grpc.StatusCode.UNAVAILABLE:
            return fail(EXIT_RPC, f"{what}: server at {addr} unavailable: {details}")
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            return fail(EXIT_RPC, f"{what}: deadline exceeded talking to {addr}: {details}")
        return fail(EXIT_RPC, f"{what} failed with status {code.name}: {details}")
    return fail(EXIT_RPC, f"{what} failed: {err}")


def generate(pb2, stub, args) -> tuple[str, object]:
    import grpc

    request = pb2.GenerateRequest(
        model=args.model,
        messages=[
            pb2.Message(role=pb2.ROLE_USER, parts=[pb2.ContentPart(text=PROMPT)]),
        ],
        max_tokens=args.max_tokens,
        temperature=0.0,
        seed=1,
    )
    if args.request_id:
        request.request_id = args.request_id

    print(f"Generate -> {args.addr}: {PROMPT!r} (model={args.model!r}, greedy, max_tokens={args.max_tokens})")
    text_parts: list[str] = []
    completions = []
    events_after_completion = 0
    try:
        for response in stub.Generate(request, timeout=args.timeout):
            kind = response.WhichOneof("event")
            if completions:
                events_after_completion += 1
            if kind == "delta":
                text_parts.append(response.delta.text)
                sys.stdout.write(response.delta.text)
                sys.stdout.flush()
            elif kind == "completion":
                completions.append(response.completion)
            else:
                raise fail(EXIT_CONTRACT, f"Generate sent a response with no event set ({kind!r})")
    except grpc.RpcError as e:
        if text_parts:
            sys.stdout.write("\n")
        raise rpc_error("Generate", args.addr, e)
    sys.stdout.write("\n")

    text = "".join(text_parts)
    if not completions:
        raise fail(EXIT_CONTRACT, f"Generate stream closed OK without a completion event ({len(text_parts)} deltas)")
    if len(completions) > 1:
        raise fail(EXIT_CONTRACT, f"Generate sent {len(completions)} completion events, expected exactly one")
    if events_after_completion:
        raise fail(EXIT_CONTRACT, f"Generate sent {events_after_completion} event(s) after the completion")
    c = completions[0]

    fr = pb2.FinishReason.Name(c.finish_reason) if c.finish_reason in pb2.FinishReason.values() else c.finish_reason
    tier = pb2.Tier.Name(c.tier) if c.tier in pb2.Tier.values() else c.tier
    print(
        f"completion: request_id={c.request_id!r} model={c.model!r} tier={tier} finish={fr} "
        f"prompt_tokens={c.usage.prompt_tokens} completion_tokens={c.usage.completion_tokens} "
        f"ttft_ms={c.latency.time_to_first_token_ms:.1f} total_ms={c.latency.total_ms:.1f}"
    )

    problems = []
    if not c.request_id:
        problems.append("completion.request_id is empty")
    elif args.request_id and c.request_id != args.request_id:
        problems.append(f"completion.request_id {c.request_id!r} does not echo the request's {args.request_id!r}")
    if not c.model:
        problems.append("completion.model is empty")
    if not c.HasField("usage"):
        problems.append("completion.usage is not set")
    elif c.usage.completion_tokens < 1:
        problems.append(f"completion.usage.completion_tokens is {c.usage.completion_tokens}, expected >= 1")
    elif c.usage.completion_tokens > args.max_tokens:
        problems.append(f"completion.usage.completion_tokens is {c.usage.completion_tokens}, above max_tokens {args.max_tokens}")
    if not text:
        problems.append(f"the text deltas joined are empty ({len(text_parts)} deltas)")
    if problems:
        raise fail(EXIT_CONTRACT, "Generate: " + "; ".join(problems))
    return text, c


def list_models(pb2, stub, args):
    import grpc

    try:
        resp = stub.ListModels(pb2.ListModelsRequest(), timeout=args.timeout)
    except grpc.RpcError as e:
        raise rpc_error("ListModels", args.addr, e)
    if not resp.models:
        raise fail(EXIT_CONTRACT, "ListModels returned no models")
    for m in resp.models:
        tier = pb2.Tier.Name(m.tier) if m.tier in pb2.Tier.values() else m.tier
        flags = [f for f, on in (("loaded", m.loaded), ("default", m.is_default)) if on]
        print(f"model: {m.id} family={m.family or '-'} tier={tier} ctx={m.context_length} {' '.join(flags)}".rstrip())
    return resp.models


def run(args) -> tuple[int, str]:
    with tempfile.TemporaryDirectory(prefix="ferry-stubs-") as out_dir:
        pb2, pb2_grpc = load_stubs(out_dir)
        if args.stubs_only:
            return 0, "stubs generated and imported"

        import grpc

        channel = grpc.insecure_channel(args.addr)
        try:
            try:
                grpc.channel_ready_future(channel).result(timeout=args.connect_timeout)
            except grpc.FutureTimeoutError:
                raise fail(EXIT_RPC, f"cannot connect to ferryd at {args.addr} within {args.connect_timeout:g} s "
                                     "(is it running and listening there?)")
            stub = pb2_grpc.InferenceStub(channel)
            _, completion = generate(pb2, stub, args)
            models = list_models(pb2, stub, args)
            if completion.model not in {m.id for m in models}:
                print(f"warning: completion.model {completion.model!r} is not among the listed models", file=sys.stderr)
            return completion.usage.completion_tokens, completion.model
        finally:
            channel.close()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--addr", default="127.0.0.1:50051", help="host:port of ferryd (default %(default)s)")
    p.add_argument("--model", default="auto", help='model id, or "auto" to let ferryd choose (default %(default)s)')
    p.add_argument("--max-tokens", type=int, default=24, help="max_tokens for Generate (default %(default)s)")
    p.add_argument("--request-id", default="", help="client request id (default: let ferryd make one)")
    p.add_argument("--connect-timeout", type=float, default=10.0, help="seconds to wait for the connection (default %(default)s)")
    p.add_argument("--timeout", type=float, default=300.0, help="deadline in seconds for each RPC (default %(default)s)")
    p.add_argument("--stubs-only", action="store_true", help="only generate and import the stubs, then exit")
    args = p.parse_args(argv)

    try:
        n, model = run(args)
    except Failure as f:
        print(f"{PREFIX}: FAILED: {f}", file=sys.stderr)
        return f.code
    except KeyboardInterrupt:
        print(f"{PREFIX}: interrupted", file=sys.stderr)
        return 130
    if args.stubs_only:
        print(f"{PREFIX}: OK (stubs generated from {PROTO_ROOT / PROTO_FILE} and imported)")
    else:
        print(f"{PREFIX}: OK ({n} tokens from {model})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
