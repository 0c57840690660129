"""Sample text from a checkpoint of train_lm.py, decoding through the layers' ``cache`` collection.

The prompt is prefilled in one call (conv windows and recurrent states go into the cache), then each new
byte costs one jitted call on a single token. ``--verify`` re-runs the whole sampled text in one ordinary
(cache-free) pass and checks that it gives the same next-byte distributions as the decode loop did.

    python examples/generate.py --prompt "import os" --max-new 300 --num-samples 2
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import serialization

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from kda_lm import KDALM, LMConfig  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--ckpt-dir", default="checkpoints/kda_lm")
    p.add_argument("--prompt", default="def ")
    p.add_argument("--max-new", type=int, default=200, help="bytes to generate")
    p.add_argument("--num-samples", type=int, default=1)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-k", type=int, default=40)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--implementation", choices=["checkpoint", "auto", "cuda", "cpu", "xla"], default="checkpoint",
                   help="kda implementation (checkpoint: as trained)")
    p.add_argument("--verify", action="store_true", help="check decode == full pass on the sampled text")
    return p.parse_args(argv)


def load(ckpt_dir, implementation="checkpoint"):
    cfg_path = os.path.join(ckpt_dir, "config.json")
    ckpt_path = os.path.join(ckpt_dir, "checkpoint.msgpack")
    if not os.path.exists(ckpt_path):
        sys.exit(f"no checkpoint in {ckpt_dir}/ (run examples/train_lm.py --ckpt-dir {ckpt_dir} first)")
    with open(cfg_path) as f:
        cfg = LMConfig.from_json(f.read())
    if implementation != "checkpoint":
        cfg = LMConfig(**{**cfg.__dict__, "implementation": None if implementation == "auto" else implementation})
    cfg = LMConfig(**{**cfg.__dict__, "remat": False})
    with open(ckpt_path, "rb") as f:
        state = serialization.msgpack_restore(f.read())
    params = jax.tree.map(jnp.asarray, state["params"])
    return KDALM(cfg), params, int(state["step"])


def sample(logits, key, temperature, top_k):
    if temperature <= 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / temperature
    if top_k and top_k < logits.shape[-1]:
        kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def main(argv=None):
    args = parse_args(argv)
    model, params, step = load(args.ckpt_dir, args.implementation)
    prompt = np.frombuffer(args.prompt.encode("utf-8"), np.uint8).astype(np.int32)
    if prompt.size == 0:
        sys.exit("--prompt must not be empty")
    B = args.num_samples
    tokens = jnp.asarray(np.tile(prompt[None], (B, 1)))

    # An all-zero cache for B rows (shapes from an abstract init: no compute).
    init = functools.partial(model.init, decode=True)
    shapes = jax.eval_shape(init, jax.random.PRNGKey(0), tokens[:, :1])["cache"]
    cache = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)

    @jax.jit
    def step_fn(cache, tok):
        logits, upd = model.apply({"params": params, "cache": cache}, tok, decode=True, mutable=["cache"])
        return logits[:, -1], upd["cache"]

    key = jax.random.PRNGKey(args.seed)
    t0 = time.time()
    logits, cache = step_fn(cache, tokens)            # prefill the whole prompt
    out, step_logits = [], [logits]
    for i in range(args.max_new):
        key, sub = jax.random.split(key)
        nxt = sample(logits, sub, args.temperature, args.top_k)
        out.append(nxt)
        if i + 1 < args.max_new:
            logits, cache = step_fn(cache, nxt[:, None])
            step_logits.append(logits)
    gen = np.asarray(jnp.stack(out, axis=1)) if out else np.zeros((B, 0), np.int32)
    dt = time.time() - t0
    print(f"# checkpoint {args.ckpt_dir} (step {step}); {args.max_new} bytes x {B} samples in {dt:.1f}s "
          f"(incl. compilation)")
    for b in range(B):
        text = bytes(prompt.astype(np.uint8).tolist() + gen[b].astype(np.uint8).tolist()).decode("utf-8", "replace")
        print(f"----- sample {b} -----\n{text}")

    if args.verify and args.max_new > 0:
        full = jnp.concatenate([tokens, jnp.asarray(gen, jnp.int32)], axis=1)
        ref = model.apply({"params": params}, full[:, :-1])       # one pass, no cache
        ref = ref[:, prompt.size - 1:]                             # logits that predicted each sampled byte
        dec = jnp.stack(step_logits, axis=1)
        err = float(jnp.max(jnp.abs(jax.nn.log_softmax(dec) - jax.nn.log_softmax(ref))))
        tol = 1e-3 if model.cfg.dtype == "float32" else 0.1   # bf16: rounding differs between the two paths
        print(f"# verify: max |log p(decode) - log p(full pass)| = {err:.2e} (tolerance {tol:g})")
        if not err < tol:
            sys.exit("decode and full pass disagree")


if __name__ == "__main__":
    main()
