"""Train a small byte-level KDA language model on the Python standard library's source files.

Each file is one sequence; files are packed into fixed-size rows with segment ids (padding id 0), so
every row is a ragged batch of whole or partial files that never see each other. The training step is a
single ``jax.jit``-compiled function (forward, loss, gradient, AdamW update). Checkpoints (params,
optimiser state, step, loss history) go to ``--ckpt-dir`` and a rerun resumes from the latest one; the
loss curve is drawn to ``<ckpt-dir>/loss.png``.

    python examples/train_lm.py                       # CPU-sized defaults: loss falls within ~2 minutes
    python examples/train_lm.py --steps 400           # resume and train further
    python examples/generate.py --prompt "def "       # sample from the checkpoint (decode cache)
    # GPU-sized run:
    python examples/train_lm.py --ckpt-dir checkpoints/kda_lm_gpu --seq-len 1024 --batch 32 --d-model 512 \\
        --n-layers 6 --num-heads 4 --head-dim 128 --dtype bfloat16 --steps 5000 --data-mb 64
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import serialization, traverse_util

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from kda_lm import KDALM, LMConfig, lm_batch, load_corpus, pack  # noqa: E402

CKPT_FILE = "checkpoint.msgpack"
CONFIG_FILE = "config.json"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--steps", type=int, default=600, help="train until this global step (resumed runs continue)")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per row")
    p.add_argument("--batch", type=int, default=8, help="rows per step")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup", type=int, default=30)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--n-layers", type=int, default=2)
    p.add_argument("--num-heads", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=32)
    p.add_argument("--num-v-heads", type=int, default=None)
    p.add_argument("--gate", choices=["softplus", "bounded"], default="softplus")
    p.add_argument("--lower-bound", type=float, default=None, help="bounded gate's lower bound (e.g. -5)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="computation dtype")
    p.add_argument("--implementation", choices=["auto", "cuda", "cpu", "xla"], default="auto",
                   help="flashkda_jax.kda implementation (auto: the kernels where built, else pure JAX)")
    p.add_argument("--remat", action="store_true", help="rematerialise each block in the backward pass")
    p.add_argument("--data-mb", type=float, default=4.0, help="megabytes of stdlib source to read")
    p.add_argument("--eval-rows", type=int, default=64, help="held-out rows for the eval loss")
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--log-every", type=int, default=25)
    p.add_argument("--save-every", type=int, default=100)
    p.add_argument("--ckpt-dir", default="checkpoints/kda_lm")
    p.add_argument("--fresh", action="store_true", help="ignore an existing checkpoint and start over")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true", help="no tqdm bar (plain log lines)")
    return p.parse_args(argv)


def model_config(args) -> LMConfig:
    if args.gate == "bounded" and args.lower_bound is None:
        args.lower_bound = -5.0
    return LMConfig(d_model=args.d_model, n_layers=args.n_layers, num_heads=args.num_heads, head_dim=args.head_dim,
                    num_v_heads=args.num_v_heads, gate=args.gate,
                    lower_bound=args.lower_bound if args.gate == "bounded" else None, dtype=args.dtype,
                    implementation=None if args.implementation == "auto" else args.implementation,
                    remat=args.remat)


def make_optimizer(args, params):
    sched = optax.warmup_cosine_decay_schedule(0.0, args.lr, max(args.warmup, 1), max(args.steps, args.warmup + 1),
                                               end_value=args.lr * 0.1)
    # No weight decay on gate parameters, norms, biases and the embedding.
    flat = traverse_util.flatten_dict(params)
    mask = traverse_util.unflatten_dict({k: (k[-1] == "kernel") for k in flat})
    return optax.chain(optax.clip_by_global_norm(1.0),
                       optax.adamw(sched, b1=0.9, b2=0.95, weight_decay=args.weight_decay, mask=mask))


def save_checkpoint(ckpt_dir, state, history, cfg):
    os.makedirs(ckpt_dir, exist_ok=True)
    blob = serialization.to_bytes(jax.device_get(state))
    tmp = os.path.join(ckpt_dir, CKPT_FILE + ".tmp")
    with open(tmp, "wb") as f:
        f.write(blob)
    os.replace(tmp, os.path.join(ckpt_dir, CKPT_FILE))
    with open(os.path.join(ckpt_dir, CONFIG_FILE), "w") as f:
        f.write(cfg.to_json())
    with open(os.path.join(ckpt_dir, "history.json"), "w") as f:
        json.dump(history, f)


def load_checkpoint(ckpt_dir, template):
    with open(os.path.join(ckpt_dir, CKPT_FILE), "rb") as f:
        state = serialization.from_bytes(template, f.read())
    hist_path = os.path.join(ckpt_dir, "history.json")
    history = {"train": [], "eval": []}
    if os.path.exists(hist_path):
        with open(hist_path) as f:
            history = json.load(f)
    return state, history


def plot(history, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    if history["train"]:
        s, l = np.asarray(history["train"]).T
        ax.plot(s, l, lw=0.6, alpha=0.4, color="C0", label="train (per step)")
        k = max(1, min(25, len(l) // 10))
        if len(l) >= k:
            sm = np.convolve(l, np.ones(k) / k, mode="valid")
            ax.plot(s[k - 1:], sm, color="C0", label=f"train ({k}-step mean)")
    if history["eval"]:
        s, l = np.asarray(history["eval"]).T
        ax.plot(s, l, "o-", color="C3", label="held-out")
    ax.axhline(math.log(256), ls=":", color="gray", label="uniform over bytes")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats / byte)")
    ax.set_title("KDA byte-level LM on the Python standard library")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    args = parse_args(argv)
    cfg = model_config(args)
    os.makedirs(args.ckpt_dir, exist_ok=True)
    cfg_path = os.path.join(args.ckpt_dir, CONFIG_FILE)
    resume = os.path.exists(os.path.join(args.ckpt_dir, CKPT_FILE)) and not args.fresh
    if resume:
        with open(cfg_path) as f:
            saved = LMConfig.from_json(f.read())
        # the implementation and remat may change between runs; the architecture may not
        arch = lambda c: {k: v for k, v in json.loads(c.to_json()).items() if k not in ("implementation", "remat", "dtype")}
        if arch(saved) != arch(cfg):
            sys.exit(f"{args.ckpt_dir} holds a checkpoint of a different model:\n{saved}\nvs the flags' {cfg}\n"
                     "(pass the same model flags, another --ckpt-dir, or --fresh)")

    # Data: pack the corpus once; rows of seq_len + 1 tokens give inputs and next-byte targets.
    t0 = time.time()
    docs = load_corpus(int(args.data_mb * 2 ** 20))
    tokens, segs = pack(docs, args.seq_len + 1)
    n_eval = min(args.eval_rows, len(tokens) // 10)
    # held-out rows spread evenly over the corpus (the files are sorted by path)
    eval_idx = np.unique(np.linspace(0, len(tokens) - 1, n_eval).astype(np.int64))
    is_eval = np.zeros(len(tokens), bool)
    is_eval[eval_idx] = True
    train_tok, train_seg = tokens[~is_eval], segs[~is_eval]
    eval_batch = lm_batch(tokens[is_eval], segs[is_eval])
    print(f"data: {len(docs)} files, {sum(map(len, docs)) / 2 ** 20:.1f} MiB -> {len(tokens)} rows of "
          f"{args.seq_len} tokens ({(segs != 0).mean() * 100:.1f}% non-padding), {n_eval} held out "
          f"[{time.time() - t0:.1f}s]")

    model = KDALM(cfg)
    rng = jax.random.PRNGKey(args.seed)
    inp0, seg0, _, _ = lm_batch(train_tok[:1], train_seg[:1])
    # Plain arrays (init boxes every param with its logical axis names; a sharded run would use them).
    params = nn.unbox(model.init(rng, jnp.asarray(inp0), jnp.asarray(seg0))["params"])
    tx = make_optimizer(args, params)
    state = {"params": params, "opt_state": tx.init(params), "step": 0}
    history = {"train": [], "eval": []}
    if resume:
        state, history = load_checkpoint(args.ckpt_dir, state)
        print(f"resumed from {args.ckpt_dir} at step {int(state['step'])}")
    n_params = sum(x.size for x in jax.tree.leaves(state["params"]))
    print(f"model: {n_params / 1e6:.2f}M params, {cfg}; backend {jax.default_backend()}")

    def loss_fn(params, inp, seg, tgt, mask):
        logits = model.apply({"params": params}, inp, seg)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, tgt)
        return jnp.sum(ce * mask) / jnp.maximum(jnp.sum(mask), 1.0)

    @jax.jit
    def train_step(state, inp, seg, tgt, mask):
        loss, grads = jax.value_and_grad(loss_fn)(state["params"], inp, seg, tgt, mask)
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        return {"params": params, "opt_state": opt_state, "step": state["step"] + 1}, loss

    eval_loss = jax.jit(loss_fn)

    def batch_for(step):
        # deterministic per step, so a resumed run sees the same data as an uninterrupted one
        idx = np.random.default_rng([args.seed, step]).integers(0, len(train_tok), args.batch)
        return tuple(jnp.asarray(a) for a in lm_batch(train_tok[idx], train_seg[idx]))

    start = int(state["step"])
    if start >= args.steps:
        print(f"checkpoint is already at step {start} >= --steps {args.steps}; nothing to do")
        plot(history, os.path.join(args.ckpt_dir, "loss.png"))
        return
    try:
        from tqdm import tqdm
        bar = tqdm(total=args.steps, initial=start, disable=args.no_progress, dynamic_ncols=True, desc="train")
        log = bar.write
    except ImportError:  # pragma: no cover
        bar, log = None, print
    t_start, first = time.time(), None
    for step in range(start, args.steps):
        state, loss = train_step(state, *batch_for(step))
        loss = float(loss)
        if first is None:
            first = time.time() - t_start
            log(f"step {step + 1}: first step (incl. compilation) took {first:.1f}s")
        if not math.isfinite(loss):
            raise FloatingPointError(f"loss became {loss} at step {step + 1}")
        history["train"].append((step + 1, loss))
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}")
        s = step + 1
        if s % args.log_every == 0 or s == args.steps:
            recent = [l for _, l in history["train"][-args.log_every:]]
            log(f"step {s:6d}  loss {np.mean(recent):.4f}  ({(time.time() - t_start) / (s - start):.2f}s/step)")
        if s % args.eval_every == 0 or s == args.steps:
            el = float(eval_loss(state["params"], *(jnp.asarray(a) for a in eval_batch)))
            history["eval"].append((s, el))
            log(f"step {s:6d}  held-out loss {el:.4f}")
        if s % args.save_every == 0 or s == args.steps:
            save_checkpoint(args.ckpt_dir, state, history, cfg)
            plot(history, os.path.join(args.ckpt_dir, "loss.png"))
    if bar is not None:
        bar.close()
    tr = history["train"]
    k = min(10, len(tr))
    print(f"done: step {int(state['step'])}, loss {np.mean([l for _, l in tr[:k]]):.3f} (first {k} steps) -> "
          f"{np.mean([l for _, l in tr[-k:]]):.3f} (last {k}); {time.time() - t_start:.0f}s; "
          f"checkpoint and loss.png in {args.ckpt_dir}/")


if __name__ == "__main__":
    main()
