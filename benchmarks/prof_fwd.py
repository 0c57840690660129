"""One forward call per case, for `ncu` kernel timings: python benchmarks/prof_fwd.py b1-t8k-h16 ..."""
import sys

sys.path.insert(0, __file__.rsplit("/", 1)[0])
import jax

import bench_gpu as bg
from flashkda_jax import _capabilities as _caps

_caps.CUDA_FWD_READY = True
for name in sys.argv[1:]:
    B, T, H, lens = bg.CASES[name]
    args, extra = bg.make_inputs(B, T, H, lens)
    fargs = args + (extra["A_log"], extra["dt_bias"], extra["h0"], extra["cu"])
    f = bg.jax_fn("cuda", lens is not None)
    for _ in range(2):
        jax.block_until_ready(f(*fargs))
    print("done", name, flush=True)
