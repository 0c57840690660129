"""A few calls per case for `ncu` kernel timings (the first call compiles; ncu sees every launch):

    ncu --clock-control none --metrics gpu__time_duration.sum --print-summary per-kernel \
        python3 benchmarks/prof.py [--grad] [--gate softplus] b1-t8k-h16 ...
"""
import argparse
import sys

sys.path.insert(0, __file__.rsplit("/", 1)[0])
import jax

import bench_gpu as bg

ap = argparse.ArgumentParser()
ap.add_argument("cases", nargs="+")
ap.add_argument("--grad", action="store_true", help="fwd+bwd through jax.grad")
ap.add_argument("--gate", choices=["bounded", "softplus"], default="bounded")
ap.add_argument("--calls", type=int, default=2)
ap.add_argument("--slices", type=int, default=None, help="kda(checkpoint_slices=N)")
a = ap.parse_args()
for name in a.cases:
    B, T, H, lens = bg.CASES[name]
    args, extra = bg.make_inputs(B, T, H, lens)
    fargs = args + (extra["A_log"], extra["dt_bias"], extra["h0"], extra["cu"])
    f = bg.jax_fn("cuda", lens is not None, a.gate, a.grad, a.slices)
    for _ in range(a.calls):
        jax.block_until_ready(f(*fargs))
    print("done", name, flush=True)
