#!/usr/bin/env python3
"""The README tables of scripts/gpu-check, from the JSON files it wrote into one folder.

    python3 scripts/gpu-check-summary.py OUT   # prints Markdown; gpu-check saves it as OUT/summary.md

Reads bench.json (a list of `ferry bench --json` results), requests.json (`ferry bench requests
--json`) and sampler.json (`ferry bench energy --json`); a missing or broken file becomes a line
saying so, never a crash, so a partial run still reports what it measured.
"""
import json
import os
import sys


def load(folder, name):
    path = os.path.join(folder, name)
    try:
        with open(path) as f:
            return json.load(f), None
    except FileNotFoundError:
        return None, f"{name}: missing"
    except (OSError, ValueError) as e:
        return None, f"{name}: unreadable ({e})"


def fmt(x, digits=1):
    return "-" if x is None else f"{x:.{digits}f}"


def engine_table(runs):
    out = [
        "| model | device | prompt tokens | generated | prefill tok/s | decode tok/s | load s |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        f = r.get("ferry", {})
        out.append(
            f"| {r.get('model')} | {f.get('device', '?')} | {r.get('prompt_tokens')} | "
            f"{r.get('gen_tokens')} | {fmt(f.get('prefill_tok_s'))} | {fmt(f.get('decode_tok_s'))} | "
            f"{fmt(f.get('load_s'), 2)} |"
        )
    return out


def requests_table(r):
    out = [
        f"Model {r['model']} on {r['device']}, source {r['source']} ({', '.join(r.get('gpus', []))}), "
        f"meter at {r['sample_hz']:g} Hz. One NVML total-energy counter read: "
        f"{r['counter_read_ms']:.3f} ms; one power read: {r['power_read_us']:.1f} µs (median wall time).",
        "",
        "| mode | requests | max \\|error\\| % | median \\|error\\| % | meter J | counter J | total error % |",
        "|---|---|---|---|---|---|---|",
    ]
    for m in r["modes"]:
        out.append(
            f"| {m['mode']} | {m['requests']} | {m['max_abs_error_percent']:.3f} | "
            f"{m['median_abs_error_percent']:.3f} | {m['meter_joules']:.2f} | "
            f"{m['counter_joules']:.2f} | {m['total_error_percent']:+.3f} |"
        )
    cpu = r.get("sampler_cpu_percent_of_core")
    out += [
        "",
        f"Sampler thread over the {r['sampler_seconds']:.1f} s of requests: "
        + (f"{cpu:.4f} % of one core" if cpu is not None else "CPU time unreadable")
        + f"; {r['ticks']} ticks ({r['tick_us']:.1f} µs each), {r['exact_reads']} exact reads "
        f"({r['exact_read_ms']:.3f} ms each); calibration (counter J per power-integral J) "
        f"{fmt(r.get('calibration'), 4)}.",
    ]
    return out


def sampler_table(rows):
    out = [
        "| rate | source | process CPU, % of one core | µs per sample | idle process % |",
        "|---|---|---|---|---|",
    ]
    for s in rows:
        out.append(
            f"| {s['sample_hz']:g} Hz | {s['source']} | {s['cpu_percent_of_core']:.4f} | "
            f"{s['us_per_sample']:.1f} | {s['baseline_percent_of_core']:.4f} |"
        )
    return out


def summary(folder):
    lines = ["## Engine speed (`ferry bench`)", ""]
    bench, err = load(folder, "bench.json")
    lines += [err] if err else engine_table(bench)
    lines += ["", "## Per-request joules against NVML's counter (`ferry bench requests`)", ""]
    req, err = load(folder, "requests.json")
    lines += [err] if err else requests_table(req)
    lines += ["", "## Idle sampler cost (`ferry bench energy`)", ""]
    samp, err = load(folder, "sampler.json")
    lines += [err] if err else sampler_table(samp)
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: gpu-check-summary.py FOLDER")
    sys.stdout.write(summary(sys.argv[1]))
