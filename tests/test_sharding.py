"""Sharded KDA under jax.jit (batch, heads, batch+heads, context parallel, data+context parallel).

The multi-device checks need 8 CPU host devices, which jax only gives to a process that asks before it
initialises its backend; the rest of the suite already initialised jax with one device, so they run in a
subprocess (tests/sharding_worker.py) once per session, and each case here asserts on its report.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flashkda_jax as F
from flashkda_jax import _ffi

HERE = os.path.dirname(os.path.abspath(__file__))
T_GLOBAL = 64
CASES = ("batch", "heads", "batch_heads", "batch_heads_sliced", "context", "context_bf16", "context_tworuns", "data_context", "layer",
         "shard_map", "decode")
TOL = 2e-5  # fp32; context parallelism reassociates the state sums
# bf16 inputs: context parallelism forms the outputs as o0 + (q^T P) X with each term rounded to bf16 and the
# carried state X as a bf16 operand (as the forward kernel's own output products take the state)
TOL_BF16 = 1e-2


@pytest.fixture(scope="module", params=["xla", "cpu"])
def reports(request):
    # Both implementations: the pure-JAX program and the C++ kernels (whose FFI calls the context-parallel
    # test counts). FLASHKDA_SHARDING_IMPL picks one.
    impl = request.param
    only = os.environ.get("FLASHKDA_SHARDING_IMPL")
    if only and only != impl:
        pytest.skip(f"FLASHKDA_SHARDING_IMPL={only}")
    if impl == "cpu" and not _ffi.has_extension():
        pytest.skip("flashkda_jax extension not built")
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)
    env["JAX_PLATFORMS"] = "cpu"
    proc = subprocess.run([sys.executable, os.path.join(HERE, "sharding_worker.py"), "--impl", impl,
                           "--cases", ",".join(CASES)],
                          capture_output=True, text=True, timeout=900, env=env, cwd=os.path.dirname(HERE))
    out = {}
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            r = json.loads(line[len("RESULT "):])
            out[r["case"]] = r
    if not out:
        pytest.fail(f"sharding worker produced no results (rc={proc.returncode}):\n{proc.stderr[-4000:]}")
    return out


def _get(reports, case):
    r = reports.get(case)
    assert r is not None, f"no report for {case}"
    assert r["ok"], r.get("msg")
    return r


@pytest.mark.parametrize("case", CASES)
def test_same_outputs_and_gradients_as_unsharded(reports, case):
    r = _get(reports, case)
    tol = TOL_BF16 if case.endswith("_bf16") else TOL
    bad = {k: v for k, v in r["errors"].items() if not v < tol}
    assert not bad, f"{case}: relative errors vs the unsharded call above {tol}: {bad}"


@pytest.mark.parametrize("case", ("batch", "heads", "batch_heads", "batch_heads_sliced"))
def test_batch_and_head_sharding_do_not_communicate(reports, case):
    r = _get(reports, case)
    for op, dt, dims in r["collectives"]:
        # Only the all-reduce of the loss and of the A_log / dt_bias gradients (summed over rows).
        assert op == "all-reduce", (case, op, dt, dims)
        assert r["T"] not in dims and len(dims) <= 2, (case, op, dt, dims)


@pytest.mark.parametrize("case", ("context", "context_bf16", "context_tworuns", "data_context"))
def test_context_parallel_moves_only_state_maps(reports, case):
    r = _get(reports, case)
    assert "'cp'" in r["o_sharding"], r["o_sharding"]
    for op, dt, dims in r["collectives"]:
        if not dt.startswith(("f", "bf")):
            continue  # segment ids / slots (int32) and their bookkeeping
        assert T_GLOBAL not in dims, (case, op, dt, dims)           # no gathered sequence of q/k/v/g
        if op in ("all-gather", "reduce-scatter"):
            assert len(dims) == 5 and dims[-2] == 16 and dims[-1] in (16, 8), (case, op, dims)  # [n,B,HV,K,K|V]


@pytest.mark.parametrize("case", ("context", "context_bf16", "context_tworuns", "data_context"))
def test_context_parallel_runs_one_forward_and_one_backward(reports, case):
    """Per device the context-parallel value_and_grad runs the zero-carry and the map run as one forward of
    V + K columns (the true outputs are their affine combination; two forwards where the kernel lacks those
    head dims: context_tworuns) and one full backward: the forward's record spares the backward rebuilding
    runs 1-2, and the incoming state's local gradient is a contraction of run 2's outputs with dO (C++
    kernels: their FFI calls are countable)."""
    r = _get(reports, case)
    if r["impl"] == "xla":
        assert r["ffi_calls"] == {"fwd": 0, "bwd": 0}, r["ffi_calls"]  # the pure-JAX program: nothing to count
        return
    want = 2 if case == "context_tworuns" else 1
    assert r["ffi_calls"] == {"fwd": want, "bwd": 1}, r["ffi_calls"]


def test_decode_partitions_without_communication(reports):
    """kda_decode (C++ kernel) with dense states split over rows and heads, and with a pool split over
    heads: same outputs and states as one device, the new state stays sharded, no collective at all."""
    r = _get(reports, "decode")
    bad = {k: v for k, v in r["errors"].items() if not v < TOL}
    assert not bad, bad
    assert r["collectives"] == [], r["collectives"]


def test_inside_shard_map(reports):
    """kda with its gradients inside shard_map over 8 devices (each its own rows) == the plain call."""
    r = _get(reports, "shard_map")
    bad = {k: v for k, v in r["errors"].items() if not v < TOL}
    assert not bad, bad


def test_flax_layer_shards_by_logical_axes_with_context_parallelism(reports):
    """KimiDeltaAttention with params placed by their logical names (heads -> "model") and x sharded over
    (batch, sequence) with context_parallel_axis: the sequence is never gathered."""
    r = _get(reports, "layer")
    assert r["o_sharding"] in ("P(None, 'model')", "PartitionSpec(None, 'model')"), r["o_sharding"]
    for op, dt, dims in r["collectives"]:
        if op == "all-gather" and dt.startswith(("f", "bf")):
            assert T_GLOBAL not in dims, (op, dt, dims)


# ----------------------------------------------------------------------------------------------------
# In-process (one device).
# ----------------------------------------------------------------------------------------------------

def _small(seed=0, B=2, T=12, H=2, HV=4, K=8, V=4):
    ks = jax.random.split(jax.random.PRNGKey(seed), 5)
    q = jax.random.normal(ks[0], (B, T, H, K))
    k = jax.random.normal(ks[1], (B, T, H, K))
    v = jax.random.normal(ks[2], (B, T, HV, V))
    g = -jnp.exp(jax.random.normal(ks[3], (B, T, HV, K)) - 1.0)
    beta = jax.nn.sigmoid(jax.random.normal(ks[4], (B, T, HV)))
    return q, k, v, g, beta


def test_vmap_and_grad_fold_into_batch():
    q, k, v, g, beta = _small()
    xs = [jnp.stack([x, 0.5 * x]) for x in (q, k, v, g, beta)]

    def f(q, k, v, g, beta):
        return jnp.sum(F.kda(q, k, v, g, beta, implementation="xla")[0] ** 2)

    vals, grads = jax.vmap(jax.value_and_grad(f, argnums=(0, 2)))(*xs)
    for i in range(2):
        val, gr = jax.value_and_grad(f, argnums=(0, 2))(*[x[i] for x in xs])
        np.testing.assert_allclose(vals[i], val, rtol=1e-5)
        for a, b in zip(gr, grads):
            np.testing.assert_allclose(b[i], a, rtol=1e-4, atol=1e-6)


def test_context_parallel_axis_needs_a_mesh():
    q, k, v, g, beta = _small()
    with pytest.raises(ValueError, match="context_parallel_axis needs a mesh"):
        F.kda(q, k, v, g, beta, implementation="xla", context_parallel_axis="cp")


def test_context_parallel_axis_on_one_device_is_a_no_op():
    q, k, v, g, beta = _small()
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("cp",))
    o_ref, _ = F.kda(q, k, v, g, beta, implementation="xla")
    with jax.set_mesh(mesh):
        o, _ = jax.jit(lambda *a: F.kda(*a, implementation="xla", context_parallel_axis="cp"))(q, k, v, g, beta)
        with pytest.raises(ValueError, match="not an axis of the mesh"):
            F.kda(q, k, v, g, beta, implementation="xla", context_parallel_axis="sp")
    np.testing.assert_allclose(o, o_ref, rtol=1e-6, atol=1e-6)



@pytest.mark.parametrize("impl", ["cpu", "xla"])
def test_ffi_and_xla_inside_shard_map_one_device(impl):
    """The FFI call's results carry no varying axes: inside shard_map they must still type-check, and the
    replicated A_log / dt_bias get their gradients (the multi-device version runs in the worker)."""
    if impl not in F.available_implementations():
        pytest.skip(f"{impl} not built")
    q, k, v, g, beta = _small()
    A = jnp.asarray([0.3, -0.2, 0.1, 0.4])
    dt = jnp.linspace(-0.5, 0.5, 4 * 8).reshape(4, 8)
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("dp",))
    P = jax.sharding.PartitionSpec

    def loss(q, g, A, dt):
        return jnp.sum(F.kda(q, k, v, g, beta, gate="softplus", A_log=A, dt_bias=dt, implementation=impl)[0] ** 2)

    grad = jax.value_and_grad(loss, argnums=(0, 1, 2, 3))

    def per_device(*a):
        val, gs = grad(*a)
        return jax.lax.psum(val, "dp"), gs

    sm = jax.shard_map(per_device, mesh=mesh, in_specs=(P("dp"), P("dp"), P(), P()),
                       out_specs=(P(), (P("dp"), P("dp"), P(), P())))
    val, gs = jax.jit(sm)(q, g, A, dt)
    val_r, gr = grad(q, g, A, dt)
    np.testing.assert_allclose(val, val_r, rtol=1e-5)
    for a, b in zip(gs, gr):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_saving_opts(monkeypatch):
    """The differentiated forward saves its residuals for the backward only where both CUDA kernels run with the
    default bf16 chunk states, outside context parallelism, not for float32 inputs (their forward saves nothing), and
    FLASHKDA_SAVE_RESIDUALS is not 0."""
    from flashkda_jax import _capabilities as caps
    from flashkda_jax import _inputs as I
    from flashkda_jax import sharding as sh

    monkeypatch.setattr(caps, "CUDA_BWD_READY", True)
    for var in ("FLASHKDA_SAVE_RESIDUALS", "FLASHKDA_BWD_RECUR", "FLASHKDA_BWD_GRAD1"):
        monkeypatch.delenv(var, raising=False)
    opts = I.KdaOptions(scale=0.1)
    args = lambda K, V, dt=jnp.bfloat16: (jnp.zeros((1, 64, 2, K), dt), None, jnp.zeros((1, 64, 2, V), dt))
    saves = lambda a, o, impl: sh._saving_opts(a, o, impl).save_residuals
    assert saves(args(128, 128), opts, "cuda") and saves(args(64, 64), opts, "cuda")
    assert saves(args(128, 128, jnp.float16), opts, "cuda")
    assert not saves(args(128, 128, jnp.float32), opts, "cuda")  # the float32 forward (cutlass/kda_fwd_f32.cu)
    assert not saves(args(128, 128), opts, "cpu") and not saves(args(128, 128), opts, "xla")
    assert not saves(args(256, 256), opts, "cuda")              # no CUDA backward for K = 256
    assert not saves(args(128, 128), I.KdaOptions(scale=0.1, cp_record=8), "cuda")  # context parallelism
    monkeypatch.setenv("FLASHKDA_BWD_RECUR", "v1")             # f32 chunk states
    assert not saves(args(128, 128), opts, "cuda")
    monkeypatch.delenv("FLASHKDA_BWD_RECUR")
    monkeypatch.setenv("FLASHKDA_SAVE_RESIDUALS", "0")
    assert not saves(args(128, 128), opts, "cuda")
    monkeypatch.setattr(caps, "CUDA_BWD_READY", False)
    monkeypatch.delenv("FLASHKDA_SAVE_RESIDUALS")
    assert not saves(args(128, 128), opts, "cuda")
