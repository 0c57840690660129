"""Sharded-KDA checks on 8 CPU host devices, run in a subprocess by tests/test_sharding.py.

jax fixes the number of CPU devices when it first initialises a backend, and the rest of the test suite
does that with one device, so these checks run in a fresh interpreter:

    python tests/sharding_worker.py [--impl xla|cpu] [--cases batch,heads,...]

It prints one JSON line per case: {"case", "ok", "errors": {...}, "collectives": [...], "msg"}.
"""

from __future__ import annotations

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

import argparse
import functools  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import sys  # noqa: E402
import traceback  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

jax.config.update("jax_enable_x64", False)

import flashkda_jax as F  # noqa: E402
from kda_testing import random_state, rel_err  # noqa: E402


# ----------------------------------------------------------------------------------------------------
# Problems.
# ----------------------------------------------------------------------------------------------------

T_GLOBAL = 64  # distinct from every other dimension below, so gathered sequences show up in the HLO


def problem(seed, B, T, H, HV, K=16, V=8, S=None):
    ks = jax.random.split(jax.random.PRNGKey(seed), 12)
    q = jax.random.normal(ks[0], (B, T, H, K))
    k = jax.random.normal(ks[1], (B, T, H, K))
    v = jax.random.normal(ks[2], (B, T, HV, V))
    g = jax.random.normal(ks[3], (B, T, HV, K))
    beta = jax.random.normal(ks[4], (B, T, HV))
    A = jax.random.normal(ks[5], (HV,)) * 0.5
    dt = jax.random.normal(ks[6], (HV, K)) * 0.5
    wo = jax.random.normal(ks[7], (B, T, HV, V))
    return dict(q=q, k=k, v=v, g=g, beta=beta, A=A, dt=dt, wo=wo, ks=ks)


def segments_crossing(B, T, n):
    """Segment ids whose sequences cross the boundaries of n equal slices of T, with padding, a
    sequence spanning several slices, one starting exactly at a boundary, length-1 sequences."""
    L = T // n
    rows = []
    for b in range(B):
        ids = np.zeros(T, np.int32)
        cuts = sorted({0, L // 2, L + 3, 3 * L, 3 * L + 1, 4 * L, 5 * L - 2, T - 1 - b, T})
        nid = 1
        for s, e in zip(cuts[:-1], cuts[1:]):
            ids[s:e] = nid
            nid += 1
        ids[2 * L + 2: 2 * L + 5] = 0          # padding inside a long sequence splits it
        ids[6 * L - 1: 6 * L + 1] = 0          # padding across a boundary
        rows.append(ids)
    return jnp.asarray(np.stack(rows))


def make_loss(kw, cp_axis=None, impl="xla"):
    def loss(q, k, v, g, beta, A, dt, h0, seg, wo, wf):
        o, fin = F.kda(q, k, v, g, beta, gate="softplus", A_log=A, dt_bias=dt, initial_state=h0,
                       segment_ids=seg, return_final_state=True, implementation=impl,
                       context_parallel_axis=cp_axis, **kw)
        val = jnp.sum(o.astype(jnp.float32) * wo) + jnp.sum(fin * wf)
        return val, (o, fin)

    return jax.jit(jax.value_and_grad(loss, argnums=tuple(range(8)), has_aux=True))


_COLL = re.compile(r"\b(all-gather|all-to-all|collective-permute|all-reduce|reduce-scatter)(?:-start)?\(")
_SHAPE = re.compile(r"\b(\w+)\[([\d,]*)\]")


def collectives(hlo_text):
    """[(op, dtype, dims)] for every collective of the compiled HLO (one entry per tuple element)."""
    out = []
    for line in hlo_text.splitlines():
        m = _COLL.search(line)
        if not m or "=" not in line[: m.start()]:
            continue
        lhs = line[line.index("=") + 1: m.start()]
        for dt, dims in _SHAPE.findall(lhs):
            out.append((m.group(1), dt, tuple(int(d) for d in dims.split(",") if d)))
    return out


def run_case(name, mesh, specs, dims, cp_axis=None, impl="xla", kw=None, K=16, V=8, dtype=jnp.float32):
    kw = dict(kw or {})
    B, T, H, HV = dims
    p = problem(sum(map(ord, name)), B, T, H, HV, K=K, V=V)
    for n in ("q", "k", "v", "g", "beta"):  # 2-byte inputs take the tensor-core paths of context parallelism
        p[n] = p[n].astype(dtype)
    S = 6
    seg = segments_crossing(B, T, 8)
    h0 = random_state(3, (B, S, HV, K, V))
    wf = random_state(4, (B, S, HV, K, V))
    args = (p["q"], p["k"], p["v"], p["g"], p["beta"], p["A"], p["dt"], h0, seg, p["wo"], wf)
    kw.setdefault("max_segments", S)
    # the reference: unsharded and unsliced (checkpoint_slices must not change the result either)
    ref_fn = make_loss({k: v for k, v in kw.items() if k != "checkpoint_slices"}, None, impl)
    (val_r, (o_r, fin_r)), gr = ref_fn(*args)

    put = lambda x, s: jax.device_put(x, NamedSharding(mesh, s))
    sargs = tuple(put(x, s) for x, s in zip(args, specs))
    fn = make_loss(kw, cp_axis, impl)
    with jax.set_mesh(mesh):
        (val, (o, fin)), gs = fn(*sargs)
        hlo = fn.lower(*sargs).compile().as_text()
    errors = {"o": rel_err(o, o_r), "final_state": rel_err(fin, fin_r)}
    for nm, a, b in zip(("dq", "dk", "dv", "dg", "dbeta", "dA_log", "ddt_bias", "dh0"), gs, gr):
        errors[nm] = rel_err(a, b)
    colls = collectives(hlo)
    return dict(errors=errors, collectives=colls, o_sharding=str(o.sharding.spec), T=T, ffi_calls=ffi_calls(hlo))


def ffi_calls(hlo_text):
    """{op: number of its FFI custom calls in the compiled (per-device) program}."""
    return {op: len(re.findall(rf'custom_call_target="flashkda_{op}"', hlo_text)) for op in ("fwd", "bwd")}


def run_layer_case(devs, impl="xla", shape=(2, 2, 2), head_dim=16, expand_v=0.5):
    """The Flax layer on a (data, model, cp) mesh: params placed by their logical axis names (heads on
    "model"), x and segment ids sharded over batch and sequence, context parallelism on "cp"."""
    import flax.linen as nn
    from flashkda_jax.nn import KimiDeltaAttention

    mesh = Mesh(np.asarray(devs)[: int(np.prod(shape))].reshape(shape), ("data", "model", "cp"))
    rules = [("batch", "data"), ("heads", "model"), ("embed", None)]
    B, T, hidden = 2, T_GLOBAL, 24
    cfg = dict(num_heads=2, head_dim=head_dim, num_v_heads=4, expand_v=expand_v, gate="softplus", implementation=impl)
    ks = jax.random.split(jax.random.PRNGKey(7), 3)
    x = jax.random.normal(ks[0], (B, T, hidden))
    wy = jax.random.normal(ks[1], (B, T, hidden))
    seg = segments_crossing(B, T, 8)
    variables = KimiDeltaAttention(**cfg).init(ks[2], x, seg)

    def make(layer):
        def loss(params, x):
            return jnp.sum(layer.apply(params, x, seg) * wy)
        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))

    val_r, (gp_r, gx_r) = make(KimiDeltaAttention(**cfg))(nn.unbox(variables), x)
    shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(variables), mesh, rules)
    params = jax.device_put(nn.unbox(variables), shardings)
    xs = jax.device_put(x, NamedSharding(mesh, P("data", "cp")))
    fn = make(KimiDeltaAttention(**cfg, context_parallel_axis="cp"))
    with jax.set_mesh(mesh):
        val, (gp, gx) = fn(params, xs)
        hlo = fn.lower(params, xs).compile().as_text()
    errors = {"loss": rel_err(val, val_r), "dx": rel_err(gx, gx_r)}
    for path, a in jax.tree_util.tree_leaves_with_path(gp):
        b = functools.reduce(lambda n, k: n[k.key], path, gp_r)
        errors["d" + "/".join(k.key for k in path)] = rel_err(a, b)
    heads_sharded = str(params["params"]["q_proj"]["kernel"].sharding.spec)
    return dict(errors=errors, collectives=collectives(hlo), o_sharding=heads_sharded, T=T)


def run_shard_map_case(devs, impl="xla", K=16, V=8):
    """kda and its gradients inside shard_map (every mesh axis manual): each device runs its own rows;
    the replicated gate parameters' gradients are summed over devices by the transpose."""
    mesh = Mesh(np.asarray(devs), ("dp",))
    B, T, H, HV = 8, T_GLOBAL, 2, 4
    p = problem(11, B, T, H, HV, K=K, V=V)
    seg = segments_crossing(B, T, 8)
    args = (p["q"], p["k"], p["v"], p["g"], p["beta"], p["A"], p["dt"], seg, p["wo"])

    def loss(q, k, v, g, beta, A, dt, seg, wo):
        o, _ = F.kda(q, k, v, g, beta, gate="softplus", A_log=A, dt_bias=dt, segment_ids=seg,
                     implementation=impl)
        return jnp.sum(o * wo)

    grad = jax.value_and_grad(loss, argnums=tuple(range(7)))

    def per_device(*a):
        val, gs = grad(*a)
        return jax.lax.psum(val, "dp"), gs

    rows, rep = P("dp"), P()
    fn = jax.jit(jax.shard_map(per_device, mesh=mesh, in_specs=(rows,) * 5 + (rep, rep, rows, rows),
                               out_specs=(rep, (rows,) * 5 + (rep, rep))))
    val, gs = fn(*args)
    val_r, gr = jax.jit(grad)(*args)
    errors = {"loss": rel_err(val, val_r)}
    for nm, a, b in zip(("dq", "dk", "dv", "dg", "dbeta", "dA_log", "ddt_bias"), gs, gr):
        errors[nm] = rel_err(a, b)
    return dict(errors=errors, collectives=collectives(fn.lower(*args).compile().as_text()), o_sharding="", T=T)


def run_decode_case(devs, impl="cpu", shape=(2, 4), K=16, V=8):
    """kda_decode under jit on a (dp, tp) mesh: dense states split by rows and heads, a state pool split by
    heads only; each must equal the unsharded call with no collective at all."""
    mesh = Mesh(np.asarray(devs)[: int(np.prod(shape))].reshape(shape), ("dp", "tp"))
    B, H, HV, Pn = 8, 4, 8, 12
    p = problem(5, B, 2, H, HV, K=K, V=V)
    xs = (p["q"], p["k"], p["v"], p["g"], p["beta"])
    kw = dict(gate="softplus", A_log=p["A"], dt_bias=p["dt"], qk_l2norm=True, beta_sigmoid=True, implementation=impl)
    errors, colls = {}, []
    for mode in ("dense", "pool"):
        n = B if mode == "dense" else Pn
        state = random_state(6, (n, HV, K, V))
        idx = jnp.asarray([3, 0, -1, 11, 7, 5, 2, 9], jnp.int32) if mode == "pool" else None
        fn = jax.jit(lambda *a, idx=idx: F.kda_decode(*a, state_indices=idx, **kw))
        o_r, s_r = fn(*xs, state)
        rows = "dp" if mode == "dense" else None
        put = lambda x, *spec: jax.device_put(x, NamedSharding(mesh, P(*spec)))
        sx = tuple(put(x, rows, None, "tp") for x in xs)
        ss = put(state, rows, "tp")
        with jax.set_mesh(mesh):
            o, s_new = fn(*sx, ss)
            colls += collectives(fn.lower(*sx, ss).compile().as_text())
        errors[f"{mode}_o"] = rel_err(o, o_r)
        errors[f"{mode}_state"] = rel_err(s_new, s_r)
        errors[f"{mode}_state_sharded"] = 0.0 if "'tp'" in str(s_new.sharding.spec) else 1.0
    return dict(errors=errors, collectives=colls, o_sharding="", T=2)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--impl", default="xla")
    ap.add_argument("--cases", default="batch,heads,batch_heads,context,data_context")
    a = ap.parse_args()
    devs = np.array(jax.devices())
    assert devs.size == 8, devs
    T = T_GLOBAL
    R = P()
    cases = {
        # name: (mesh axes, mesh shape, specs of (q,k,v,g,beta,A,dt,h0,seg,wo,wf), dims (B,T,H,HV), cp axis)
        "batch": ((("dp",), (8,)), [P("dp")] * 5 + [R, R, P("dp"), P("dp"), P("dp"), P("dp")], (8, T, 2, 4), None),
        "heads": ((("tp",), (4,)), [P(None, None, "tp")] * 5 + [P("tp"), P("tp"), P(None, None, "tp"), R,
                                                                P(None, None, "tp"), P(None, None, "tp")],
                  (2, T, 4, 8), None),
        "batch_heads": ((("dp", "tp"), (2, 4)), [P("dp", None, "tp")] * 5 + [P("tp"), P("tp"), P("dp", None, "tp"),
                                                                            P("dp"), P("dp", None, "tp"),
                                                                            P("dp", None, "tp")],
                        (2, T, 4, 8), None),
        # batch_heads with kda(checkpoint_slices=3): the slice loop partitions like the op (no communication)
        "batch_heads_sliced": ((("dp", "tp"), (2, 4)), [P("dp", None, "tp")] * 5 + [P("tp"), P("tp"),
                                                                                   P("dp", None, "tp"), P("dp"),
                                                                                   P("dp", None, "tp"),
                                                                                   P("dp", None, "tp")],
                               (2, 3 * T, 4, 8), None),
        "context": ((("cp",), (8,)), [R] * 11, (2, T, 2, 4), "cp"),
        "context_bf16": ((("cp",), (8,)), [R] * 11, (2, T, 2, 4), "cp"),
        "context_tworuns": ((("cp",), (8,)), [R] * 11, (2, T, 2, 4), "cp"),  # runs 1-2 as two forwards
        "data_context": ((("dp", "cp"), (2, 4)), [P("dp", "cp")] * 5 + [R, R, P("dp"), P("dp", "cp"),
                                                                       P("dp", "cp"), P("dp")],
                         (2, T, 2, 4), "cp"),
    }
    for name in a.cases.split(","):
        try:
            if name == "layer":
                res = run_layer_case(devs, impl=a.impl)
            elif name == "shard_map":
                res = run_shard_map_case(devs, impl=a.impl)
            elif name == "decode":
                res = run_decode_case(devs)
            else:
                (axes, shape), specs, dims, cp = cases[name]
                mesh = Mesh(devs[: int(np.prod(shape))].reshape(shape), axes)
                from flashkda_jax import sharding as fs
                fs.MERGED_MAP_RUN = name != "context_tworuns"
                try:
                    res = run_case(name, mesh, specs, dims, cp_axis=cp, impl=a.impl,
                                   kw={"checkpoint_slices": 3} if name.endswith("_sliced") else None,
                                   dtype=jnp.bfloat16 if name.endswith("_bf16") else jnp.float32)
                finally:
                    fs.MERGED_MAP_RUN = True
            res.update(case=name, ok=True, impl=a.impl)
        except Exception as e:  # reported to the parent test
            res = dict(case=name, ok=False, msg="".join(traceback.format_exception(e))[-4000:])
        print("RESULT " + json.dumps(res), flush=True)


if __name__ == "__main__":
    main()
