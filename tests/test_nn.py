"""flashkda_jax.nn.KimiDeltaAttention: ragged batches, decode cache, transformations, errors."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flashkda_jax import available_implementations
from flashkda_jax.nn import DECODE_STEP_MAX_TOKENS, KimiDeltaAttention, short_conv

HIDDEN = 24
# implementation=None: the compiled kernel where this install has one (else the pure-JAX program);
# test_default_implementation_matches_xla ties the two together.
SMALL = dict(num_heads=2, head_dim=8, num_v_heads=4, expand_v=0.5, implementation=None)


def _layer(**kw):
    cfg = dict(SMALL)
    cfg.update(kw)
    return KimiDeltaAttention(**cfg)


def _x(seed, B, T, dtype=jnp.float32):
    return jax.random.normal(jax.random.PRNGKey(seed), (B, T, HIDDEN), jnp.float32).astype(dtype)


def _zero_cache(layer, x1):
    """The layer's all-zero decode cache for x1's batch (shapes from an abstract init: nothing runs)."""
    shapes = jax.eval_shape(functools.partial(layer.init, decode=True), jax.random.PRNGKey(0), x1)
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes["cache"])


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def _pack(seqs, rows, T):
    """Packs sequences ([L, hidden] arrays) into rows with segment ids.

    rows: per row, a list of (seq index, segment id) or ("pad", n); returns x [B, T, hidden], seg [B, T]
    and the (row, start) of each sequence.
    """
    B = len(rows)
    x = np.zeros((B, T, HIDDEN), np.float32)
    seg = np.zeros((B, T), np.int32)
    where = {}
    for b, items in enumerate(rows):
        t = 0
        for item in items:
            if item[0] == "pad":
                # padding carries garbage on purpose: it must not leak
                x[b, t: t + item[1]] = 7.0
                t += item[1]
                continue
            i, sid = item
            L = seqs[i].shape[0]
            x[b, t: t + L] = seqs[i]
            seg[b, t: t + L] = sid
            where[i] = (b, t)
            t += L
        assert t <= T
        x[b, t:] = -3.0
    return jnp.asarray(x), jnp.asarray(seg), where


LENS = [9, 1, 14, 5]
ROWS = [
    [(0, 1), (1, 2), ("pad", 2), (2, 2)],   # ids 1|2 back to back; id 2 again after padding: a new sequence
    [("pad", 3), (3, 5)],                   # left padding, then right padding to the end of the row
]
T_PACKED = 26


def test_param_names_and_shapes():
    layer = _layer(conv_bias=True)
    p = nn.unbox(layer.lazy_init(jax.random.PRNGKey(0), _x(0, 1, 5))["params"])
    shapes = jax.tree.map(lambda a: a.shape, p)
    H, K, HV, Vd = 2, 8, 4, 4
    assert shapes == {
        "q_proj": {"kernel": (HIDDEN, H * K)}, "k_proj": {"kernel": (HIDDEN, H * K)},
        "v_proj": {"kernel": (HIDDEN, HV * Vd)},
        "q_conv1d": {"kernel": (4, H * K), "bias": (H * K,)}, "k_conv1d": {"kernel": (4, H * K), "bias": (H * K,)},
        "v_conv1d": {"kernel": (4, HV * Vd), "bias": (HV * Vd,)},
        "f_proj": {"0": {"kernel": (HIDDEN, Vd)}, "1": {"kernel": (Vd, HV * K)}},
        "b_proj": {"kernel": (HIDDEN, HV)}, "A_log": (HV,), "dt_bias": (HV * K,),
        "g_proj": {"0": {"kernel": (HIDDEN, Vd)}, "1": {"kernel": (Vd, HV * Vd), "bias": (HV * Vd,)}},
        "o_norm": {"scale": (Vd,)}, "o_proj": {"kernel": (HV * Vd, HIDDEN)},
    }
    assert p["A_log"].dtype == jnp.float32 and p["dt_bias"].dtype == jnp.float32
    a = np.exp(np.asarray(p["A_log"]))
    assert np.all((a >= 1) & (a <= 16))
    dt = np.log1p(np.exp(np.asarray(p["dt_bias"])))   # softplus(dt_bias) = dt in [1e-3, 0.1]
    assert np.all((dt >= 1e-3 - 1e-6) & (dt <= 0.1 + 1e-6))
    pb = nn.unbox(_layer(gate="bounded", lower_bound=-5.0).lazy_init(jax.random.PRNGKey(0), _x(0, 1, 5))["params"])
    assert np.all(np.asarray(pb["A_log"]) == 0)


def test_logical_partitioning_of_params_and_cache():
    """Every parameter and cache entry carries logical axis names: heads on every flattened-heads dim,
    embed on the model width, batch on the cache rows."""
    v = _layer(conv_bias=True).lazy_init(jax.random.PRNGKey(0), _x(0, 2, 5), decode=True)
    specs = nn.get_partition_spec(v)
    P = jax.sharding.PartitionSpec
    hd, em = "heads", "embed"
    assert specs["params"] == {
        "q_proj": {"kernel": P(em, hd)}, "k_proj": {"kernel": P(em, hd)}, "v_proj": {"kernel": P(em, hd)},
        "q_conv1d": {"kernel": P(None, hd), "bias": P(hd)}, "k_conv1d": {"kernel": P(None, hd), "bias": P(hd)},
        "v_conv1d": {"kernel": P(None, hd), "bias": P(hd)},
        "f_proj": {"0": {"kernel": P(em, None)}, "1": {"kernel": P(None, hd)}},
        "b_proj": {"kernel": P(em, hd)}, "A_log": P(hd), "dt_bias": P(hd),
        "g_proj": {"0": {"kernel": P(em, None)}, "1": {"kernel": P(None, hd), "bias": P(hd)}},
        "o_norm": {"scale": P(None)}, "o_proj": {"kernel": P(hd, em)},
    }
    assert specs["cache"]["recurrent_state"] == P("batch", hd, None, None)
    assert all(specs["cache"][f"conv_state_{n}"] == P("batch", None, hd) for n in "qkv")
    # Rules map them onto a mesh; boxed and unboxed params give the same outputs.
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("data", "model"))
    shardings = nn.logical_to_mesh_sharding(specs, mesh, [("heads", "model"), ("batch", "data"), ("embed", None)])
    assert shardings["params"]["o_proj"]["kernel"].spec == P("model", None)
    x = _x(1, 2, 7)
    layer = _layer(conv_bias=True)
    boxed = layer.lazy_init(jax.random.PRNGKey(0), x)
    np.testing.assert_array_equal(layer.apply(boxed, x), layer.apply(nn.unbox(boxed), x))


def test_packed_rows_equal_one_by_one():
    """Outputs, input gradients and parameter gradients of packed rows == each sequence run alone."""
    seqs = [np.asarray(_x(100 + i, 1, L)[0]) for i, L in enumerate(LENS)]
    x, seg, where = _pack(seqs, ROWS, T_PACKED)
    layer = _layer()
    params = layer.lazy_init(jax.random.PRNGKey(0), x, seg)
    w = jax.random.normal(jax.random.PRNGKey(5), x.shape)

    def loss(p, x, seg, w):
        y = layer.apply(p, x, seg)
        return jnp.sum(y * w), y

    vg = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))
    (_, y), (gp, gx) = vg(params, x, seg, w)
    assert np.all(np.isfinite(np.asarray(y)))
    total = jax.tree.map(jnp.zeros_like, params)
    covered = np.zeros(seg.shape, bool)
    for i, s in enumerate(seqs):
        b, t = where[i]
        L = s.shape[0]
        (_, yi), (gi, gxi) = vg(params, jnp.asarray(s)[None], None, w[b: b + 1, t: t + L])
        assert _rel(y[b, t: t + L], yi[0]) < 1e-5, i
        assert _rel(gx[b, t: t + L], gxi[0]) < 1e-4, i
        total = jax.tree.map(jnp.add, total, gi)
        covered[b, t: t + L] = True
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(gp), jax.tree.leaves(total)):
        assert _rel(a, b) < 1e-4, jax.tree_util.keystr(path)
    # padding: zero output, zero input gradient
    assert np.all(np.asarray(y)[~covered] == 0)
    assert np.all(np.asarray(gx)[~covered] == 0)


def test_short_conv_never_mixes_sequences():
    W, D = 4, 3
    x = jax.random.normal(jax.random.PRNGKey(0), (1, 10, D))
    kern = jax.random.normal(jax.random.PRNGKey(1), (W, D))
    seg = jnp.asarray([[1, 1, 1, 2, 2, 0, 2, 2, 2, 2]], jnp.int32)
    from flashkda_jax.segments import slots_from_segment_ids
    y = short_conv(x, kern, None, slots_from_segment_ids(seg))
    for a, b in ((0, 3), (3, 5), (6, 10)):
        ref = short_conv(x[:, a:b], kern, None, None)
        np.testing.assert_allclose(y[:, a:b], ref, rtol=1e-6, atol=1e-6)
    assert float(jnp.abs(y[0, 5]).max()) == 0.0


def _decode_run(layer, params, x, seg, splits):
    """Runs x through the decode cache in pieces [splits] -> concatenated outputs."""
    B = x.shape[0]
    cache = _zero_cache(layer, x[:, :1])
    step = jax.jit(lambda c, xi, si: layer.apply({"params": params["params"], "cache": c}, xi, si,
                                                 decode=True, mutable=["cache"]))
    outs, t = [], 0
    for n in splits:
        y, upd = step(cache, x[:, t: t + n], None if seg is None else seg[:, t: t + n])
        cache = upd["cache"]
        outs.append(y)
        t += n
    assert t == x.shape[1]
    return jnp.concatenate(outs, axis=1), nn.unbox(cache)


@pytest.mark.parametrize("gate", ["softplus", "bounded"])
def test_decode_equals_full_pass(gate):
    kw = dict(gate=gate, lower_bound=-5.0) if gate == "bounded" else {}
    layer = _layer(**kw)
    B, T = 2, 13
    x = _x(3, B, T)
    params = layer.lazy_init(jax.random.PRNGKey(0), x)
    full = layer.apply(params, x)
    # prefill 7 tokens, then one at a time (also a prefill split in two)
    y, cache = _decode_run(layer, params, x, None, [7] + [1] * 6)
    assert _rel(y, full) < 1e-5
    # A prefill longer than DECODE_STEP_MAX_TOKENS takes the chunked kernel, the steps the fused decode op.
    long_prefill = DECODE_STEP_MAX_TOKENS + 2
    y2, _ = _decode_run(layer, params, x, None, [long_prefill] + [1] * (T - long_prefill))
    assert _rel(y2, full) < 1e-5
    assert cache["recurrent_state"].shape == (B, 4, 8, 4)
    assert cache["conv_state_q"].shape == (B, 3, 16)


def test_decode_with_padded_prompts():
    """Left- and right-padded prompts of different lengths, then decoding: each row == its own sequence."""
    layer = _layer()
    T = 10
    x = _x(4, 2, T)
    params = layer.lazy_init(jax.random.PRNGKey(0), x)
    seg = jnp.asarray([[0, 0, 0, 1, 1, 1, 1, 1, 1, 1],        # left padding, prompt of 7 (prefill 6 + 1)
                       [1, 1, 1, 1, 0, 0, 0, 0, 0, 0]], jnp.int32)  # right padding, prompt of 4
    pre = 6
    cache = _zero_cache(layer, x[:, :1])
    apply = jax.jit(lambda c, xi, si: layer.apply({"params": params["params"], "cache": c}, xi, si,
                                                  decode=True, mutable=["cache"]))
    y_pre, upd = apply(cache, x[:, :pre], seg[:, :pre])
    y_rest, _ = apply(upd["cache"], x[:, pre:], seg[:, pre:])
    y = jnp.concatenate([y_pre, y_rest], 1)
    for b in range(2):
        m = np.asarray(seg[b]) != 0
        ref = layer.apply(params, x[b: b + 1, m])[0]
        assert _rel(y[b, m], ref) < 1e-5, b
        assert np.all(np.asarray(y[b, ~m]) == 0)


def test_jit_grad_remat_and_bf16():
    layer = _layer()
    x = _x(1, 2, 11)
    seg = jnp.asarray([[1] * 6 + [2] * 5, [3] * 9 + [0, 0]], jnp.int32)
    params = layer.lazy_init(jax.random.PRNGKey(0), x, seg)

    def loss(p, mod):
        return jnp.mean(mod.apply(p, x, seg) ** 2)

    g_plain = jax.jit(jax.grad(functools.partial(loss, mod=layer)))(params)
    RematKDA = nn.remat(KimiDeltaAttention)
    cfg = dict(SMALL)
    g_remat = jax.jit(jax.grad(functools.partial(loss, mod=RematKDA(**cfg))))(params)
    for a, b in zip(jax.tree.leaves(g_plain), jax.tree.leaves(g_remat)):
        assert _rel(a, b) < 1e-6
    assert all(np.all(np.isfinite(np.asarray(a))) for a in jax.tree.leaves(g_plain))

    # bf16 computation with fp32 params, and bf16 params
    yb = _layer(dtype=jnp.bfloat16).apply(params, x, seg)
    assert yb.dtype == jnp.bfloat16
    assert _rel(yb, layer.apply(params, x, seg)) < 3e-2
    pb = nn.unbox(jax.eval_shape(_layer(param_dtype=jnp.bfloat16).init, jax.random.PRNGKey(0),
                                 x.astype(jnp.bfloat16)))
    assert pb["params"]["q_proj"]["kernel"].dtype == jnp.bfloat16
    assert pb["params"]["A_log"].dtype == jnp.float32


def test_checkpoint_slices_same_gradients():
    """The layer's checkpoint_slices (the op's sequence slices, recomputed in the backward) changes no gradient:
    packed rows whose sequences cross the 64-token slice boundaries."""
    x = _x(2, 2, 150)
    seg = jnp.asarray(np.where(np.arange(150) < 70, 1, np.where(np.arange(150) < 140, 2, 0))[None].repeat(2, 0),
                      jnp.int32)
    layer = _layer()
    params = layer.lazy_init(jax.random.PRNGKey(0), x, seg)

    def grads(mod):
        return jax.jit(jax.grad(lambda p: jnp.mean(mod.apply(p, x, seg) ** 2)))(params)

    for a, b in zip(jax.tree.leaves(grads(layer)), jax.tree.leaves(grads(_layer(checkpoint_slices=3)))):
        assert _rel(b, a) < 1e-5


@pytest.mark.skipif(available_implementations() == ("xla",), reason="no kernel built: None means xla here")
def test_default_implementation_matches_xla():
    """implementation=None (the kernels where built) gives the xla program's outputs and gradients."""
    x = _x(2, 2, 21)
    seg = jnp.asarray([[1] * 8 + [2] * 13, [1] * 17 + [0] * 4], jnp.int32)
    ref_layer = _layer(implementation="xla")
    layer = _layer(implementation=None)
    params = ref_layer.lazy_init(jax.random.PRNGKey(0), x, seg)
    f = lambda mod: jax.jit(jax.value_and_grad(lambda p: jnp.sum(jnp.sin(mod.apply(p, x, seg)))))(params)
    (l0, g0), (l1, g1) = f(ref_layer), f(layer)
    assert abs(float(l0) - float(l1)) <= 1e-4 * max(1.0, abs(float(l0)))
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g0)):
        assert _rel(a, b) < 1e-4


@pytest.mark.parametrize("kw, match", [
    (dict(num_heads=3, num_v_heads=4), "multiple of num_heads"),
    (dict(gate="bounded"), "needs lower_bound"),
    (dict(gate="bounded", lower_bound=1.0), "must be negative"),
    (dict(lower_bound=-5.0), "only used by gate='bounded'"),
    (dict(gate="relu"), "gate must be one of"),
    (dict(expand_v=0.3), "must be a positive integer"),
    (dict(implementation="tpu"), "implementation must be"),
    (dict(hidden_size=99), "hidden_size=99"),
])
def test_bad_configs_raise(kw, match):
    with pytest.raises(ValueError, match=match):
        _layer(**kw).lazy_init(jax.random.PRNGKey(0), _x(0, 1, 4))


def test_bad_inputs_raise():
    layer = _layer()
    x = _x(0, 2, 5)
    params = layer.lazy_init(jax.random.PRNGKey(0), x)
    with pytest.raises(ValueError, match="segment_ids must be int32"):
        layer.apply(params, x, jnp.ones((2, 5), jnp.float32))
    with pytest.raises(ValueError, match=r"segment_ids must be \[B, T\]"):
        layer.apply(params, x, jnp.ones((2, 4), jnp.int32))
    with pytest.raises(ValueError, match=r"x must be \[B, T, hidden\]"):
        layer.apply(params, x[0])
    with pytest.raises(ValueError, match="reads the 'cache' collection"):
        layer.apply(params, x, decode=True, mutable=["cache"])
    cache = _zero_cache(layer, x[:1, :1])
    with pytest.raises(ValueError, match="cache holds 1 rows"):
        layer.apply({"params": params["params"], "cache": cache}, x, decode=True, mutable=["cache"])


def test_available_implementations_listed():
    assert "xla" in available_implementations()
