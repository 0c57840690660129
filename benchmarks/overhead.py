"""What the jitted forward costs over the kernels it launches (issue 3: at most 3%, or 10 us).

    python3 benchmarks/overhead.py [--calls N] [--gate bounded|softplus] [case ...]

Per case (bench_gpu.py's shapes and inputs), N back-to-back calls of the jitted forward are traced with
jax.profiler (CUPTI device activity, written as a perfetto JSON trace); per call it prints the wall time of the
N calls (perf_counter, as bench_gpu.py times them), the device span (first activity start to last end), the
device busy time (union of kernel / memcpy / memset intervals) and the sum of kernel durations, and the
overhead: wall time over the sum of kernel durations.
"""
from __future__ import annotations

import argparse
import glob
import gzip
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import jax  # noqa: E402

import bench_gpu as bg  # noqa: E402


def device_events(trace: dict) -> tuple[list[dict], dict]:
    """(complete ("X") events of the device processes, {pid: process name}); device processes are those whose
    perfetto process name holds "GPU" or "/device:"."""
    names = {e["pid"]: e.get("args", {}).get("name", "") for e in trace.get("traceEvents", [])
             if e.get("ph") == "M" and e.get("name") == "process_name"}
    dev = {pid for pid, n in names.items() if "GPU" in n or "/device:" in n}
    return [e for e in trace["traceEvents"] if e.get("ph") == "X" and e.get("pid") in dev and "dur" in e], names


def union_length(intervals: list[tuple[float, float]]) -> float:
    total, end = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if b <= end:
            continue
        total += b - max(a, end)
        end = b
    return total


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("cases", nargs="*", default=["b8-t4k-h16", "b1-t8k-h64", "varlen-8k-h64"])
    ap.add_argument("--calls", type=int, default=20)
    ap.add_argument("--gate", choices=["bounded", "softplus"], default="bounded")
    a = ap.parse_args()
    for name in a.cases:
        B, T, H, lens = bg.CASES[name]
        args, extra = bg.make_inputs(B, T, H, lens)
        fargs = args + (extra["A_log"], extra["dt_bias"], extra["h0"], extra["cu"])
        f = bg.jax_fn("cuda", lens is not None, a.gate, False, None)
        for _ in range(5):
            jax.block_until_ready(f(*fargs))
        logdir = tempfile.mkdtemp(prefix="flashkda_trace_")
        with jax.profiler.trace(logdir, create_perfetto_trace=True):
            t0 = time.perf_counter()
            for _ in range(a.calls):
                out = f(*fargs)
            jax.block_until_ready(out)
            wall = (time.perf_counter() - t0) / a.calls * 1e6
        paths = glob.glob(os.path.join(logdir, "**", "perfetto_trace.json.gz"), recursive=True)
        if not paths:
            print(f"{name}: no perfetto trace under {logdir}")
            continue
        with gzip.open(paths[0], "rt") as fh:
            trace = json.load(fh)
        ev, names = device_events(trace)
        if not ev:
            print(f"{name}: no device events; processes: {sorted(set(names.values()))[:12]}")
            continue
        iv = [(e["ts"], e["ts"] + e["dur"]) for e in ev]
        span = (max(b for _, b in iv) - min(a for a, _ in iv)) / a.calls
        busy = union_length(iv) / a.calls
        kern = sum(e["dur"] for e in ev if "memcpy" not in e["name"].lower() and "memset" not in e["name"].lower())
        kern /= a.calls
        print(f"{name}: per call wall {wall:.1f} us, device span {span:.1f}, busy {busy:.1f}, kernels {kern:.1f} "
              f"({len(ev) // a.calls} device activities); wall over kernels {100 * (wall / kern - 1):+.1f}%, "
              f"span over busy {span - busy:.1f} us", flush=True)


if __name__ == "__main__":
    main()
