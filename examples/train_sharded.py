"""A small sharded training run of a one-layer KDA language model: data + context parallel on 8 CPU
host devices (mesh dp=2 x cp=4), with the raw ``flashkda_jax.kda`` op or (``--layer``) the Flax
``KimiDeltaAttention`` layer, its params placed by their logical axis names.

    python examples/train_sharded.py                # 8 CPU host devices, dp=2, cp=4
    python examples/train_sharded.py --dp 4 --cp 2 --steps 50
    python examples/train_sharded.py --layer        # the Flax layer, context_parallel_axis="cp"

Batch rows are split over ``dp``; every row's sequence axis is split over ``cp`` (context parallelism:
each device handles T/cp tokens; only K×K / K×V state maps travel between devices). Rows pack several
sequences (segment ids), which cross the context-parallel boundaries. The loss must go down.
"""

from __future__ import annotations

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import flashkda_jax as F  # noqa: E402  (the installed package, with its compiled kernels)

VOCAB = 32


def init_params(key, d, H, K, V):
    ks = jax.random.split(key, 8)
    n = lambda k, shape, fan: jax.random.normal(k, shape) * fan ** -0.5
    return dict(emb=n(ks[0], (VOCAB, d), 1.0), wq=n(ks[1], (d, H * K), d), wk=n(ks[2], (d, H * K), d),
                wv=n(ks[3], (d, H * V), d), wg=n(ks[4], (d, H * K), d), wb=n(ks[5], (d, H), d),
                wo=n(ks[6], (H * V, d), H * V), A_log=jnp.zeros((H,)), dt_bias=jnp.zeros((H * K,)),
                head=n(ks[7], (d, VOCAB), d))


def model(p, tokens, seg, H, K, V, impl, cp_axis):
    B, T = tokens.shape
    x = p["emb"][tokens]
    q = (x @ p["wq"]).reshape(B, T, H, K)
    k = (x @ p["wk"]).reshape(B, T, H, K)
    v = (x @ p["wv"]).reshape(B, T, H, V)
    g = (x @ p["wg"]).reshape(B, T, H, K)
    beta = x @ p["wb"]
    o, _ = F.kda(q, k, v, g, beta, segment_ids=seg, qk_l2norm=True, beta_sigmoid=True, gate="softplus",
                 A_log=p["A_log"], dt_bias=p["dt_bias"], implementation=impl, context_parallel_axis=cp_axis)
    y = x + o.reshape(B, T, H * V) @ p["wo"]
    return y @ p["head"]


def layer_model(key, d, H, K, impl):
    """Embedding + the Flax KDA layer (residual) + head; the layer's params keep their logical names."""
    import flax.linen as nn
    from flashkda_jax.nn import KimiDeltaAttention

    layer = KimiDeltaAttention(num_heads=H, head_dim=K, gate="softplus", implementation=impl,
                               context_parallel_axis="cp")
    k1, k2, k3 = jax.random.split(key, 3)
    variables = layer.init(k1, jnp.zeros((1, 8, d)))

    def apply(p, tokens, seg):
        x = p["emb"][tokens]
        return (x + layer.apply(p["kda"], x, seg)) @ p["head"]

    params = dict(emb=jax.random.normal(k2, (VOCAB, d)), head=jax.random.normal(k3, (d, VOCAB)) * d ** -0.5,
                  kda=nn.unbox(variables))
    return apply, params, nn.get_partition_spec(variables)


def batch(rng, B, T):
    """Packed rows of 'repeat the first half' sequences: the second half is predictable only by
    remembering the first, across context-parallel boundaries."""
    toks = np.zeros((B, T), np.int32)
    seg = np.zeros((B, T), np.int32)
    for b in range(B):
        t, sid = 0, 1
        while t < T:
            n = int(rng.integers(8, 48)) // 2 * 2
            half = rng.integers(1, VOCAB, size=n // 2)
            s = np.concatenate([half, half])[: T - t]
            toks[b, t:t + len(s)] = s
            seg[b, t:t + len(s)] = sid
            t, sid = t + len(s), sid + 1
    return jnp.asarray(toks), jnp.asarray(seg)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dp", type=int, default=2)
    ap.add_argument("--cp", type=int, default=4)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--implementation", default=None, help="cpu / xla (default: best available)")
    ap.add_argument("--layer", action="store_true", help="use the Flax KimiDeltaAttention layer")
    a = ap.parse_args()
    impl = a.implementation or ("cpu" if "cpu" in F.available_implementations() else "xla")

    devs = np.array(jax.devices()[: a.dp * a.cp]).reshape(a.dp, a.cp)
    mesh = Mesh(devs, ("dp", "cp"))
    H, K, V, d = 2, 16, 16, 32
    if a.layer:
        import flax.linen as nn
        with jax.set_mesh(mesh):   # context_parallel_axis needs the mesh, also at init
            apply, params, specs = layer_model(jax.random.PRNGKey(0), d, H, K, impl)
        # Logical names -> mesh axes: rows over dp; heads and width replicated on this dp x cp mesh (a
        # "model" axis would take "heads" for tensor parallelism).
        rules = [("batch", "dp"), ("heads", None), ("embed", None)]
        replicated = NamedSharding(mesh, P())
        shardings = dict(emb=replicated, head=replicated,
                         kda=nn.logical_to_mesh_sharding(specs, mesh, rules))
        params = jax.device_put(params, shardings)
    else:
        params = init_params(jax.random.PRNGKey(0), d, H, K, V)
        params = jax.device_put(params, NamedSharding(mesh, P()))      # replicated parameters
        apply = lambda p, tokens, seg: model(p, tokens, seg, H, K, V, impl, "cp")
    data_sharding = NamedSharding(mesh, P("dp", "cp"))               # rows over dp, tokens over cp

    def loss_fn(p, tokens, seg):
        logits = apply(p, tokens, seg)
        tgt = jnp.roll(tokens, -1, axis=1)
        same = (jnp.roll(seg, -1, axis=1) == seg) & (seg > 0)
        same = same.at[:, -1].set(False)
        lp = jax.nn.log_softmax(logits.astype(jnp.float32))
        nll = -jnp.take_along_axis(lp, tgt[..., None], axis=-1)[..., 0]
        return jnp.sum(nll * same) / jnp.maximum(jnp.sum(same), 1)

    @jax.jit
    def step(p, m, vv, t, tokens, seg):
        loss, gr = jax.value_and_grad(loss_fn)(p, tokens, seg)
        b1, b2 = 0.9, 0.99
        m = jax.tree.map(lambda m, g: b1 * m + (1 - b1) * g, m, gr)
        vv = jax.tree.map(lambda v, g: b2 * v + (1 - b2) * g * g, vv, gr)
        p = jax.tree.map(lambda p, m, v: p - a.lr * (m / (1 - b1 ** t)) / (jnp.sqrt(v / (1 - b2 ** t)) + 1e-8),
                         p, m, vv)
        return p, m, vv, loss

    m = jax.tree.map(jnp.zeros_like, params)
    vv = jax.tree.map(jnp.zeros_like, params)
    rng = np.random.default_rng(0)
    print(f"mesh {dict(mesh.shape)}, {'Flax layer' if a.layer else 'kda op'}, implementation={impl}, B={a.batch}, T={a.seq} ({a.seq // a.cp} tokens per cp device)")
    first = None
    with jax.set_mesh(mesh):
        for i in range(1, a.steps + 1):
            tokens, seg = batch(rng, a.batch, a.seq)
            tokens, seg = jax.device_put((tokens, seg), data_sharding)
            t0 = time.perf_counter()
            params, m, vv, loss = step(params, m, vv, jnp.float32(i), tokens, seg)
            loss = float(loss)
            first = loss if first is None else first
            if i == 1 or i % 10 == 0 or i == a.steps:
                print(f"step {i:4d}  loss {loss:.4f}  ({(time.perf_counter() - t0) * 1e3:.0f} ms)")
    print(f"loss {first:.4f} -> {loss:.4f}")
    assert loss < first, "the loss did not go down"


if __name__ == "__main__":
    main()
