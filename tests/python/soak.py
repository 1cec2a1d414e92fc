#!/usr/bin/env python3
"""Soak ferryd and ferry-cloud with faults, as a client the project did not write.

It starts the real binaries with the sample configs (configs/edge.toml, configs/cloud.toml), then
drives them through gRPC stubs that grpcio-tools generates from proto/ at run time (the same way
tests/python/grpc_client.py does), so nothing of ferry's own Rust client is in the loop:

  1. `--streams` concurrent clients, each sending one Generate at a time for `--duration-s`
     seconds: a mix of requests naming the local model, naming the cloud model (offloaded), and
     `auto` (routed; these ask for and send Feedback), some carrying a PNG image. A request has a
     deadline (`--deadline-s`, sent as grpc-timeout); an attempt refused before its first token
     (RESOURCE_EXHAUSTED, UNAVAILABLE) is retried with jittered exponential backoff while that
     deadline allows, as a well-behaved gRPC client does;
  2. meanwhile ferry-cloud is SIGKILLed `--cloud-kills` times at random moments and restarted;
  3. at the end, with the traffic stopped: nothing may be left running or queued (ferryd's Status
     and every cloud endpoint's in-flight count), the routers' state is snapshotted once saved,
     ferryd is `kill -9`ed and restarted, and its routers must come back exactly as they were;
     one more request must then complete.

Every request is checked for a defined end: a stream that closes OK holds exactly one completion
and nothing after it; a stream that fails after its first token carries ferryd's accounting
(`x-ferry-delivered-deltas` / `x-ferry-delivered-bytes`), which must match what arrived. A
completion's token count must bound its deltas and respect max_tokens, and greedy answers to the
same (model, prompt, image, max_tokens) must open with the same first delta (a stream given
another's text would not). Only the opening is compared: with continuous batching a greedy answer
may part from the same prompt's answer in another batch after its first token, where a decode
row's rounding in the many-row product flips a near-tie (as in vLLM and llama.cpp's server); the
first token comes from the prompt's own rows, rounded the same way in any batch. ferryd's RSS
and open file descriptors are sampled every 2 s; the second quarter of the run is compared with the
last one.

It prints one table and exits 0 when every check held and at least `--min-complete` of the
requests completed; 1 when a check failed; 2 on a setup problem (binaries, ports, stubs).

    .venv/bin/python tests/python/soak.py                   # 100 streams, 10 min, 10 cloud kills
    .venv/bin/python tests/python/soak.py --streams 16 --duration-s 120 --cloud-kills 3 --free-ports
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import tomllib
import urllib.error
import urllib.request
import zlib
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from grpc_client import Failure, load_stubs  # noqa: E402  (same directory)

PREFIX = "ferry soak"
EXIT_CHECK, EXIT_SETUP = 1, 2
REPO = Path(__file__).resolve().parents[2]

# Short questions with short answers, so the 2-core test box gets through many of them.
PROMPTS = [
    "What is the capital of France?",
    "Name a primary colour.",
    "What is 2 plus 3?",
    "Is water wet? Answer yes or no.",
    "Say hello in Spanish.",
    "What animal says moo?",
    "Name a planet of the solar system.",
    "What is the opposite of hot?",
]
# Refusals that happen before any token and that a client may retry after a pause.
RETRYABLE = {"RESOURCE_EXHAUSTED", "UNAVAILABLE"}


def setup_error(message: str) -> Failure:
    return Failure(EXIT_SETUP, message)


def png_bytes(width: int, height: int, seed: int) -> bytes:
    """A small valid RGB PNG (zlib-compressed scanlines), so requests carry a real image."""
    rng = random.Random(seed)
    rows = b"".join(
        b"\x00" + bytes(rng.randrange(256) for _ in range(width * 3)) for _ in range(height)
    )

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_ok(addr: str, path: str, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(f"http://{addr}{path}", timeout=timeout) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError):
        return False


class Daemon:
    """One binary run as a child process with its log in the work directory."""

    def __init__(self, name: str, argv: list[str], http_addr: str, work: Path):
        self.name, self.argv, self.http_addr, self.work = name, argv, http_addr, work
        self.proc: subprocess.Popen | None = None
        self.starts = 0
        self.expected_exit = False

    def start(self) -> None:
        self.starts += 1
        log = open(self.work / f"{self.name}-{self.starts}.log", "wb")
        self.expected_exit = False
        env = dict(os.environ)
        # One model directory for both daemons when the caller moved ferryd's (scripts/test).
        if "FERRY_MODEL_DIR" in env:
            env.setdefault("FERRY_CLOUD_MODEL_DIR", env["FERRY_MODEL_DIR"])
        self.proc = subprocess.Popen(self.argv, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        log.close()

    async def wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise setup_error(f"{self.name} exited with {self.proc.returncode} while starting; see {self.log()}")
            if await asyncio.to_thread(http_ok, self.http_addr, "/readyz"):
                return
            await asyncio.sleep(0.2)
        raise setup_error(f"{self.name} not ready within {timeout_s:g} s; see {self.log()}")

    def log(self) -> Path:
        return self.work / f"{self.name}-{self.starts}.log"

    def kill9(self) -> None:
        self.expected_exit = True
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def terminate(self, grace_s: float = 30.0) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self.expected_exit = True
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            return None

    def died_unexpectedly(self) -> int | None:
        if self.proc is not None and not self.expected_exit and self.proc.poll() is not None:
            return self.proc.returncode
        return None


@dataclass
class Outcome:
    kind: str  # local / cloud / auto
    result: str  # completed, or a gRPC status name, or a contract failure
    attempts: int
    latency_s: float
    fell_back: bool = False
    problems: list[str] = field(default_factory=list)
    request_id: str = ""


@dataclass
class Tally:
    outcomes: list[Outcome] = field(default_factory=list)
    refusals: dict[str, int] = field(default_factory=dict)  # attempts refused before a token
    refusal_examples: dict[str, str] = field(default_factory=dict)
    fallback_reasons: dict[str, int] = field(default_factory=dict)
    references: dict[tuple, tuple[str, int, str]] = field(default_factory=dict)
    feedback_errors: int = 0
    last_activity_unix_ms: int = 0


def proc_sample(pid: int) -> tuple[int, int] | None:
    """(RSS in KiB, open file descriptors) of a process, from /proc."""
    try:
        rss = next(
            int(line.split()[1])
            for line in Path(f"/proc/{pid}/status").read_text().splitlines()
            if line.startswith("VmRSS:")
        )
        fds = len(os.listdir(f"/proc/{pid}/fd"))
        return rss, fds
    except (OSError, StopIteration, ValueError):
        return None


class Soak:
    def __init__(self, args, pb2, pb2_grpc):
        self.args, self.pb2, self.pb2_grpc = args, pb2, pb2_grpc
        self.rng = random.Random(args.seed)
        self.tally = Tally()
        self.images = [png_bytes(32, 32, i) for i in range(4)]
        self.work = Path(args.work_dir)
        self.samples: list[tuple[float, int, int]] = []  # (seconds into the run, RSS KiB, fds)
        self.cloud_kills_done = 0
        self.notes: list[str] = []
        self.failures: list[str] = []
        self.stop_traffic = asyncio.Event()
        self.configure()

    # ---- processes -------------------------------------------------------------------------

    def configure(self) -> None:
        a = self.args
        bin_dir = Path(a.bin_dir) if a.bin_dir else None
        if bin_dir is None:
            for cand in (REPO / "target/release", REPO / "target/debug"):
                if (cand / "ferryd").is_file() and (cand / "ferry-cloud").is_file():
                    bin_dir = cand
                    break
        if bin_dir is None or not (bin_dir / "ferryd").is_file() or not (bin_dir / "ferry-cloud").is_file():
            raise setup_error("ferryd and ferry-cloud not found in target/release or target/debug: "
                              "build them first (cargo build --release --bins), or pass --bin-dir")
        self.bin_dir = bin_dir
        edge_cfg = tomllib.loads(Path(a.edge_config).read_text())
        cloud_cfg = tomllib.loads(Path(a.cloud_config).read_text())
        self.save_interval_s = edge_cfg.get("router", {}).get("save_interval_ms", 1000) / 1000
        state_dir = self.work / "state"
        state_dir.mkdir(parents=True, exist_ok=True)
        edge = [str(bin_dir / "ferryd"), "--config", str(Path(a.edge_config).resolve()),
                "--state-dir", str(state_dir)]
        cloud = [str(bin_dir / "ferry-cloud"), "--config", str(Path(a.cloud_config).resolve())]
        if a.free_ports:
            grpc_addr, http_addr = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
            cloud_addr, cloud_http = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
            edge += ["--grpc-addr", grpc_addr, "--http-addr", http_addr, "--cloud-endpoints", f"http://{cloud_addr}"]
            cloud += ["--listen", cloud_addr, "--http-addr", cloud_http]
        else:
            grpc_addr = edge_cfg["server"]["grpc_addr"]
            http_addr = edge_cfg["server"]["http_addr"]
            cloud_http = cloud_cfg["server"]["http_addr"]
            endpoints = edge_cfg.get("cloud", {}).get("endpoints", [])
            if not endpoints:
                raise setup_error(f"{a.edge_config} lists no cloud endpoint: nothing to offload to")
        if not edge_cfg.get("server", {}).get("http_enabled", False) or not cloud_cfg.get("server", {}).get("http_enabled", False):
            raise setup_error("the soak waits on /readyz: both configs need server.http_enabled = true")
        self.grpc_addr = grpc_addr
        self.ferryd = Daemon("ferryd", edge, http_addr, self.work)
        self.cloud = Daemon("ferry-cloud", cloud, cloud_http, self.work)

    async def start_all(self) -> None:
        self.cloud.start()
        await self.cloud.wait_ready(self.args.start_timeout_s)
        self.ferryd.start()
        await self.ferryd.wait_ready(self.args.start_timeout_s)

    # ---- gRPC ------------------------------------------------------------------------------

    async def connect(self):
        import grpc

        self.channel = grpc.aio.insecure_channel(self.grpc_addr)
        self.stub = self.pb2_grpc.InferenceStub(self.channel)

    async def pick_models(self) -> None:
        """The local default and the cloud model, once ferryd lists the cloud zoo."""
        pb2 = self.pb2
        deadline = time.monotonic() + 60
        while True:
            listed = (await self.stub.ListModels(pb2.ListModelsRequest(), timeout=10)).models
            local = [m.id for m in listed if m.tier == pb2.TIER_LOCAL and m.loaded]
            cloud = [m.id for m in listed if m.tier == pb2.TIER_CLOUD]
            if self.args.cloud_model in cloud and local:
                break
            if time.monotonic() > deadline:
                raise setup_error(f"ferryd does not list cloud model {self.args.cloud_model!r} "
                                  f"(cloud: {cloud}, local: {local}) within 60 s")
            await asyncio.sleep(0.5)
        default = [m.id for m in listed if m.tier == pb2.TIER_LOCAL and m.is_default]
        self.local_model = self.args.local_model or (default[0] if default else local[0])

    def request(self, kind: str, wid: int, n: int, prompt: int, image: int | None):
        pb2 = self.pb2
        parts = [pb2.ContentPart(text=PROMPTS[prompt])]
        if image is not None:
            parts.append(pb2.ContentPart(image=pb2.Image(data=self.images[image], mime_type="image/png")))
        model = {"local": self.local_model, "cloud": self.args.cloud_model, "auto": "auto"}[kind]
        return pb2.GenerateRequest(
            model=model,
            messages=[pb2.Message(role=pb2.ROLE_USER, parts=parts)],
            max_tokens=self.args.max_tokens,
            temperature=0.0,
            seed=1,
            request_id=f"soak-{wid}-{n}",
            expect_feedback=(kind == "auto"),
        )

    async def one_request(self, kind: str, wid: int, n: int, rng: random.Random) -> Outcome:
        import grpc

        prompt = rng.randrange(len(PROMPTS))
        image = rng.randrange(len(self.images)) if rng.random() < self.args.image_share else None
        req = self.request(kind, wid, n, prompt, image)
        started = time.monotonic()
        deadline = started + self.args.deadline_s
        backoff = 0.5
        attempts = 0
        while True:
            attempts += 1
            remaining = deadline - time.monotonic()
            deltas, text, completions, after, problems = 0, [], [], 0, []
            try:
                call = self.stub.Generate(req, timeout=max(remaining, 0.001))
                async for ev in call:
                    which = ev.WhichOneof("event")
                    if completions:
                        after += 1
                    if which == "delta":
                        deltas += 1
                        text.append(ev.delta.text)
                    elif which == "completion":
                        completions.append(ev.completion)
                    else:
                        problems.append(f"event with no kind ({which!r})")
            except grpc.aio.AioRpcError as e:
                code = e.code().name
                if deltas == 0 and code in RETRYABLE:
                    self.tally.refusals[code] = self.tally.refusals.get(code, 0) + 1
                    self.tally.refusal_examples.setdefault(code, (e.details() or "")[:160])
                    wait = min(backoff, 8.0) * rng.uniform(0.5, 1.5)
                    backoff *= 2
                    if time.monotonic() + wait < deadline - 1.0 and not self.stop_traffic.is_set():
                        await asyncio.sleep(wait)
                        continue
                    return Outcome(kind, f"gave up ({code})", attempts, time.monotonic() - started)
                if deltas > 0:
                    # After the first token ferryd must say what it delivered.
                    md = {k: v for k, v in (e.trailing_metadata() or ())}
                    got = (md.get("x-ferry-delivered-deltas"), md.get("x-ferry-delivered-bytes"))
                    want = (str(deltas), str(len("".join(text).encode())))
                    if got != want:
                        problems.append(f"{code} after {deltas} deltas: accounting {got} != received {want}")
                return Outcome(kind, code, attempts, time.monotonic() - started, problems=problems)
            elapsed = time.monotonic() - started
            if len(completions) != 1:
                problems.append(f"stream closed OK with {len(completions)} completions")
                return Outcome(kind, "no defined end", attempts, elapsed, problems=problems)
            if after:
                problems.append(f"{after} event(s) after the completion")
            c = completions[0]
            tokens = c.usage.completion_tokens
            if deltas > tokens:
                problems.append(f"{deltas} deltas for {tokens} completion tokens")
            if tokens > self.args.max_tokens:
                problems.append(f"{tokens} tokens above max_tokens {self.args.max_tokens}")
            if c.finish_reason == self.pb2.FINISH_REASON_LENGTH and tokens != self.args.max_tokens:
                problems.append(f"finish LENGTH at {tokens} of {self.args.max_tokens} tokens")
            key = (c.model, prompt, image is not None, self.args.max_tokens)
            joined = "".join(text)
            first = text[0] if text else ""
            ref = self.tally.references.setdefault(key, (joined, tokens, first))
            if first != ref[2]:
                problems.append(f"greedy answer of {c.model} to prompt {prompt} opens differently: "
                                f"{joined!r} ({tokens} tokens) vs {ref[0]!r} ({ref[1]} tokens)")
            fell_back = c.placement.fallback
            if fell_back:
                # "<why this tier>; <why it fell back>": keep the second part, numbers folded.
                parts = c.placement.reason.split("; ")
                reason = re.sub(r"\d+", "N", "; ".join(parts[1:]) or parts[0])[:160]
                self.tally.fallback_reasons[reason] = self.tally.fallback_reasons.get(reason, 0) + 1
            if kind == "auto":
                try:
                    await self.stub.Feedback(
                        self.pb2.FeedbackRequest(request_id=c.request_id, satisfied=rng.random() < 0.7),
                        timeout=10,
                    )
                except grpc.aio.AioRpcError:
                    self.tally.feedback_errors += 1
            self.tally.last_activity_unix_ms = int(time.time() * 1000)
            return Outcome(kind, "completed", attempts, elapsed, fell_back, problems)

    async def worker(self, wid: int) -> None:
        rng = random.Random(self.args.seed * 1_000_003 + wid)
        weights = self.args.mix
        n = 0
        # Stagger the start so the first wave is not one burst.
        await asyncio.sleep(rng.uniform(0, 2.0))
        while not self.stop_traffic.is_set():
            kind = rng.choices(["local", "cloud", "auto"], weights=weights)[0]
            out = await self.one_request(kind, wid, n, rng)
            out.request_id = f"soak-{wid}-{n}"
            self.tally.outcomes.append(out)
            n += 1

    # ---- faults and sampling ---------------------------------------------------------------

    async def chaos(self, t0: float) -> None:
        k, dur = self.args.cloud_kills, self.args.duration_s
        if k == 0:
            return
        # Evenly spread over 10-85 % of the run, jittered, so every kill lands under load.
        slots = [dur * (0.10 + 0.75 * (i + self.rng.uniform(0.2, 0.8)) / k) for i in range(k)]
        for at in slots:
            await asyncio.sleep(max(0.0, t0 + at - time.monotonic()))
            if self.stop_traffic.is_set():
                break
            self.cloud.kill9()
            self.cloud_kills_done += 1
            await asyncio.sleep(self.rng.uniform(1.0, 4.0))  # down for a moment
            self.cloud.start()
            try:
                await self.cloud.wait_ready(self.args.start_timeout_s)
            except Failure as f:
                self.failures.append(f"ferry-cloud did not come back after kill {self.cloud_kills_done}: {f}")
                return

    async def sampler(self, t0: float) -> None:
        while not self.stop_traffic.is_set():
            code = self.ferryd.died_unexpectedly()
            if code is not None:
                self.failures.append(f"ferryd died during the soak (exit {code}); see {self.ferryd.log()}")
                self.stop_traffic.set()
                return
            s = proc_sample(self.ferryd.proc.pid)
            if s:
                self.samples.append((time.monotonic() - t0, *s))
            try:
                await asyncio.wait_for(self.stop_traffic.wait(), timeout=2.0)
            except asyncio.TimeoutError:
                pass

    def leak_check(self) -> dict:
        dur = self.args.duration_s
        q2 = [s for s in self.samples if 0.25 * dur <= s[0] < 0.5 * dur]
        q4 = [s for s in self.samples if s[0] >= 0.75 * dur]
        if not q2 or not q4:
            return {"checked": False}
        rss2, rss4 = statistics.median(s[1] for s in q2), statistics.median(s[1] for s in q4)
        fd2, fd4 = max(s[2] for s in q2), max(s[2] for s in q4)
        rss_ok = rss4 - rss2 <= max(0.10 * rss2, 32 * 1024)
        fd_ok = fd4 - fd2 <= 16
        if not rss_ok:
            self.failures.append(f"ferryd RSS grew from {rss2 / 1024:.0f} MiB (2nd quarter) to {rss4 / 1024:.0f} MiB (last)")
        if not fd_ok:
            self.failures.append(f"ferryd open fds grew from {fd2} (2nd quarter) to {fd4} (last)")
        return {"checked": True, "rss_q2_mib": rss2 / 1024, "rss_q4_mib": rss4 / 1024, "fds_q2": fd2, "fds_q4": fd4}

    # ---- the end: drained, then kill -9 ----------------------------------------------------

    async def status(self):
        return await self.stub.Status(self.pb2.StatusRequest(), timeout=10)

    def routers(self, st) -> list[dict]:
        from google.protobuf.json_format import MessageToDict

        out = []
        for r in st.routers:
            d = MessageToDict(r, preserving_proto_field_name=True)
            d.pop("saved_unix_ms", None)
            out.append(d)
        return sorted(out, key=lambda d: d.get("tier", ""))

    async def drained(self) -> dict:
        st = await self.status()
        in_flight = {"running": st.running, "queued": st.queued,
                     "cloud_in_flight": sum(e.in_flight for e in st.cloud_endpoints)}
        if any(in_flight.values()):
            self.failures.append(f"left in flight after the traffic stopped: {in_flight}")
        return in_flight

    async def kill_ferryd_and_compare(self) -> dict:
        # Every change happened before the traffic stopped; the saver writes within one interval.
        await asyncio.sleep(2 * self.save_interval_s + 0.5)
        before = self.routers(await self.status())
        await asyncio.sleep(self.save_interval_s + 0.5)
        again = self.routers(await self.status())
        if again != before:
            self.failures.append("router state still changing with no traffic")
        self.ferryd.kill9()
        self.ferryd.start()
        await self.ferryd.wait_ready(self.args.start_timeout_s)
        await self.channel.close()
        await self.connect()
        await self.pick_models()
        after = self.routers(await self.status())
        intact = after == before
        if not intact:
            self.failures.append("router state after kill -9 and restart differs: "
                                 f"before {json.dumps(before)[:600]} after {json.dumps(after)[:600]}")
        out = await self.one_request("auto", 10_000, 0, random.Random(1))
        if out.result != "completed":
            self.failures.append(f"a request after the restart ended {out.result}")
        judged = sum(int(r.get("feedback", 0)) for r in before)
        return {"state_intact": intact, "routers": len(before), "feedback_judged": judged,
                "after_restart": out.result}

    # ---- the run ---------------------------------------------------------------------------

    async def run(self) -> dict:
        await self.start_all()
        await self.connect()
        await self.pick_models()
        t0 = time.monotonic()
        workers = [asyncio.create_task(self.worker(i)) for i in range(self.args.streams)]
        chaos = asyncio.create_task(self.chaos(t0))
        sampler = asyncio.create_task(self.sampler(t0))
        try:
            await asyncio.wait_for(self.stop_traffic.wait(), timeout=self.args.duration_s)
        except asyncio.TimeoutError:
            pass
        self.stop_traffic.set()
        # Requests in flight finish (or hit their deadline); no new ones start.
        await asyncio.gather(*workers)
        await chaos
        await sampler
        wall_s = time.monotonic() - t0
        if self.cloud.proc.poll() is not None:
            self.cloud.start()
            await self.cloud.wait_ready(self.args.start_timeout_s)
        report = {"wall_s": wall_s, "leak": self.leak_check()}
        if self.ferryd.died_unexpectedly() is None:
            report["in_flight"] = await self.drained()
            if self.args.kill_ferryd:
                report["restart"] = await self.kill_ferryd_and_compare()
        await self.channel.close()
        code = self.ferryd.terminate()
        if code not in (0, None):
            self.failures.append(f"ferryd exited {code} on SIGTERM; see {self.ferryd.log()}")
        self.cloud.terminate()
        return report

    def summary(self, report: dict) -> dict:
        outs = self.tally.outcomes
        completed = [o for o in outs if o.result == "completed"]
        by_result: dict[str, int] = {}
        for o in outs:
            by_result[o.result] = by_result.get(o.result, 0) + 1
        problems = [f"{o.request_id} ({o.kind}): {p}" for o in outs for p in o.problems]
        undefined = sum(1 for o in outs if o.result == "no defined end")
        lat = sorted(o.latency_s for o in completed)

        def pct(q):
            return lat[min(len(lat) - 1, int(q * len(lat)))] if lat else float("nan")

        share = len(completed) / len(outs) if outs else 0.0
        if share < self.args.min_complete:
            self.failures.append(f"{share:.1%} of requests completed, under {self.args.min_complete:.0%}")
        if undefined:
            self.failures.append(f"{undefined} streams closed without a completion or a status")
        if problems:
            self.failures.append(f"{len(problems)} contract problems, e.g. {problems[:3]}")
        if self.cloud_kills_done < self.args.cloud_kills:
            self.failures.append(f"only {self.cloud_kills_done} of {self.args.cloud_kills} cloud kills happened")
        peak = max((s[1] for s in self.samples), default=0)
        return {
            "streams": self.args.streams,
            "duration_s": self.args.duration_s,
            "requests": len(outs),
            "by_kind": {k: sum(1 for o in outs if o.kind == k) for k in ("local", "cloud", "auto")},
            "completed": len(completed),
            "completed_share": share,
            "fell_back": sum(1 for o in completed if o.fell_back),
            "fallback_reasons": self.tally.fallback_reasons,
            "outcomes": by_result,
            "attempts_refused": self.tally.refusals,
            "refusal_examples": self.tally.refusal_examples,
            "retried_requests": sum(1 for o in outs if o.attempts > 1),
            "deadline_exceeded": by_result.get("DEADLINE_EXCEEDED", 0),
            "undefined": undefined,
            "contract_problems": problems[:20],
            "feedback_errors": self.tally.feedback_errors,
            "latency_p50_s": pct(0.5),
            "latency_p99_s": pct(0.99),
            "peak_rss_mib": peak / 1024,
            "cloud_kills": self.cloud_kills_done,
            "binaries": str(self.bin_dir),
            **report,
            "failures": self.failures,
        }


def print_table(s: dict) -> None:
    refused = ", ".join(f"{k} {v}" for k, v in sorted(s["attempts_refused"].items())) or "none"
    ends = ", ".join(f"{k} {v}" for k, v in sorted(s["outcomes"].items()) if k != "completed") or "none"
    rows = [
        ("streams × duration", f"{s['streams']} × {s['duration_s']:g} s (ran {s['wall_s']:.0f} s)"),
        ("requests (local / cloud / auto)", f"{s['requests']} ({s['by_kind']['local']} / {s['by_kind']['cloud']} / {s['by_kind']['auto']})"),
        ("completed", f"{s['completed']} ({s['completed_share']:.1%})"),
        ("  of which fell back to local", str(s["fell_back"])),
        ("other ends", ends),
        ("attempts refused before a token (retried)", refused),
        ("deadline exceeded", str(s["deadline_exceeded"])),
        ("no defined end", str(s["undefined"])),
        ("contract problems", str(len(s["contract_problems"]))),
        ("latency p50 / p99 (retries included)", f"{s['latency_p50_s']:.1f} s / {s['latency_p99_s']:.1f} s"),
        ("ferry-cloud SIGKILLs", str(s["cloud_kills"])),
        ("peak ferryd RSS", f"{s['peak_rss_mib']:.0f} MiB"),
    ]
    leak = s.get("leak", {})
    if leak.get("checked"):
        rows.append(("ferryd RSS, 2nd quarter → last", f"{leak['rss_q2_mib']:.0f} → {leak['rss_q4_mib']:.0f} MiB"))
        rows.append(("ferryd open fds, 2nd quarter → last", f"{leak['fds_q2']} → {leak['fds_q4']}"))
    if "in_flight" in s:
        rows.append(("left in flight at the end", ", ".join(f"{k} {v}" for k, v in s["in_flight"].items())))
    if "restart" in s:
        r = s["restart"]
        rows.append(("ferryd kill -9: router state", f"{'intact' if r['state_intact'] else 'CHANGED'} "
                     f"({r['routers']} routers, {r['feedback_judged']} judged answers); next request {r['after_restart']}"))
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    for reason, n in sorted(s["fallback_reasons"].items(), key=lambda kv: -kv[1])[:5]:
        print(f"  fallback ×{n}: {reason}")
    for code, text in sorted(s["refusal_examples"].items()):
        print(f"  e.g. {code}: {text}")


def parse_mix(text: str) -> list[float]:
    parts = dict(p.split(":") for p in text.split(","))
    try:
        w = [float(parts.get(k, 0)) for k in ("local", "cloud", "auto")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad --mix {text!r}: want local:W,cloud:W,auto:W")
    if sum(w) <= 0 or min(w) < 0:
        raise argparse.ArgumentTypeError(f"bad --mix {text!r}: weights must be >= 0 and not all 0")
    return w


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--streams", type=int, default=100, help="concurrent clients (default %(default)s)")
    p.add_argument("--duration-s", type=float, default=600, help="seconds of traffic (default %(default)s)")
    p.add_argument("--cloud-kills", type=int, default=10, help="SIGKILLs of ferry-cloud during the run (default %(default)s)")
    p.add_argument("--no-ferryd-kill", dest="kill_ferryd", action="store_false", help="skip the final kill -9 of ferryd")
    p.add_argument("--mix", type=parse_mix, default=parse_mix("local:1,cloud:2,auto:1"),
                   help="request kinds' weights (default local:1,cloud:2,auto:1: half offloaded)")
    p.add_argument("--image-share", type=float, default=0.25, help="share of requests carrying a PNG (default %(default)s)")
    p.add_argument("--max-tokens", type=int, default=16, help="max_tokens per request (default %(default)s)")
    p.add_argument("--deadline-s", type=float, default=120, help="deadline per request, retries included (default %(default)s)")
    p.add_argument("--min-complete", type=float, default=0.95, help="least share of requests that must complete (default %(default)s)")
    p.add_argument("--edge-config", default=str(REPO / "configs/edge.toml"))
    p.add_argument("--cloud-config", default=str(REPO / "configs/cloud.toml"))
    p.add_argument("--cloud-model", default="smollm2-135m-instruct-cloud", help="cloud model to offload to (default %(default)s)")
    p.add_argument("--local-model", default="", help="local model to name (default: ferryd's default)")
    p.add_argument("--bin-dir", default="", help="where ferryd and ferry-cloud are (default target/release, else target/debug)")
    p.add_argument("--free-ports", action="store_true", help="listen on free loopback ports instead of the configs' addresses")
    p.add_argument("--start-timeout-s", type=float, default=300, help="wait for /readyz at most this long (default %(default)s)")
    p.add_argument("--work-dir", default="", help="state and logs (default: a new temporary directory, kept)")
    p.add_argument("--json", default="", help="also write the summary here")
    p.add_argument("--seed", type=int, default=1)
    args = p.parse_args(argv)
    if args.streams < 1 or args.duration_s <= 0 or args.cloud_kills < 0:
        p.error("--streams must be >= 1, --duration-s > 0, --cloud-kills >= 0")
    if not args.work_dir:
        args.work_dir = tempfile.mkdtemp(prefix="ferry-soak-")

    with tempfile.TemporaryDirectory(prefix="ferry-stubs-") as stubs:
        soak = None
        try:
            pb2, pb2_grpc = load_stubs(stubs)
            soak = Soak(args, pb2, pb2_grpc)
            report = asyncio.run(soak.run())
        except Failure as f:
            print(f"{PREFIX}: FAILED: {f}", file=sys.stderr)
            return f.code
        finally:
            if soak is not None:
                for d in (soak.ferryd, soak.cloud):
                    if d.proc is not None and d.proc.poll() is None:
                        d.proc.kill()
        s = soak.summary(report)
    print_table(s)
    print(f"logs and state: {args.work_dir}")
    if args.json:
        Path(args.json).write_text(json.dumps(s, indent=2))
    if s["failures"]:
        for f in s["failures"]:
            print(f"{PREFIX}: FAILED: {f}", file=sys.stderr)
        return EXIT_CHECK
    print(f"{PREFIX}: OK ({s['completed']} of {s['requests']} requests completed)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
