"""flashkda_jax.convert: fla state dict <-> Flax params (names, shapes, round trip), and the converted
layer against a NumPy float64 re-statement of fla's KimiDeltaAttention forward in PyTorch conventions."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flashkda_jax import convert
from flashkda_jax.convert import _expected_fla_shapes
from flashkda_jax.nn import KimiDeltaAttention

CFGS = [
    dict(hidden_size=20, num_heads=2, head_dim=8, num_v_heads=4, expand_v=0.5, use_short_conv=True,
         conv_size=4, conv_bias=False),
    dict(hidden_size=12, num_heads=3, head_dim=4, num_v_heads=3, expand_v=2.0, use_short_conv=True,
         conv_size=3, conv_bias=True),
    dict(hidden_size=16, num_heads=1, head_dim=8, num_v_heads=2, expand_v=1.0, use_short_conv=False,
         conv_size=4, conv_bias=False),
]


def fake_state_dict(cfg, seed=0, prefix=""):
    rng = np.random.default_rng(seed)
    shapes = _expected_fla_shapes(cfg)
    names = convert.fla_names(cfg)
    sd = {}
    for n in names:
        a = rng.standard_normal(shapes[n]).astype(np.float32) * 0.3
        if n == "A_log":
            a = np.log(rng.uniform(1, 16, shapes[n])).astype(np.float32)
        sd[prefix + n] = a
    return sd


@pytest.mark.parametrize("cfg", CFGS)
def test_names_shapes_round_trip(cfg):
    sd = fake_state_dict(cfg)
    assert convert.infer_config(sd) == cfg
    variables = convert.from_fla(sd)
    layer = KimiDeltaAttention(**cfg, implementation="xla")
    want = nn.unbox(jax.eval_shape(layer.init, jax.random.PRNGKey(0), jnp.zeros((1, 3, cfg["hidden_size"]))))
    got = jax.tree.map(lambda a: (a.shape, jnp.dtype(a.dtype)), variables)
    assert got == jax.tree.map(lambda a: (a.shape, jnp.dtype(a.dtype)), want)
    back = convert.to_fla(variables)
    assert set(back) == set(sd)
    for n in sd:
        assert back[n].shape == sd[n].shape, n
        np.testing.assert_array_equal(back[n], sd[n])
    # bare params tree, prefix, dtype
    back2 = convert.to_fla(variables["params"], prefix="model.layers.1.attn.", dtype=np.float16)
    assert set(back2) == {"model.layers.1.attn." + n for n in sd}
    assert all(v.dtype == (np.float32 if k.endswith(("A_log", "dt_bias")) else np.float16) for k, v in back2.items())


def test_prefix_and_strictness():
    cfg = CFGS[0]
    sd = fake_state_dict(cfg, prefix="model.layers.0.attn.")
    sd.update(fake_state_dict(CFGS[1], prefix="model.layers.1.attn."))
    sd["model.embeddings.weight"] = np.zeros((5, 20), np.float32)
    v0 = convert.from_fla(sd, prefix="model.layers.0.attn.")
    assert convert.infer_config(sd, prefix="model.layers.1.attn.") == CFGS[1]
    np.testing.assert_array_equal(v0["params"]["q_proj"]["kernel"], sd["model.layers.0.attn.q_proj.weight"].T)
    with pytest.raises(ValueError, match="pass prefix="):
        convert.from_fla(sd)
    one = fake_state_dict(cfg)
    with pytest.raises(ValueError, match="unexpected names"):
        convert.from_fla({**one, "extra.weight": np.zeros(3)})
    convert.from_fla({**one, "extra.weight": np.zeros(3)}, strict=False)
    bad = dict(one)
    del bad["g_proj.1.bias"]
    with pytest.raises(ValueError, match="missing"):
        convert.from_fla(bad)
    bad = dict(one)
    bad["f_proj.1.weight"] = np.zeros((5, 4), np.float32)
    with pytest.raises(ValueError, match="f_proj.1.weight has shape"):
        convert.from_fla(bad)
    legacy = dict(one)
    legacy["b_proj.weight"] = np.zeros((2, 20), np.float32)  # per q/k head: pre-GVA layout
    with pytest.raises(ValueError, match="older fla"):
        convert.from_fla(legacy)
    with pytest.raises(ValueError, match="not KimiDeltaAttention params"):
        convert.to_fla({"params": {"foo": np.zeros(2)}})


def test_torch_like_values_and_bf16():
    class FakeTensor:  # what convert needs from a torch tensor: .detach().cpu().numpy()
        def __init__(self, a):
            self.a = a

        def detach(self):
            return self

        def cpu(self):
            return self

        def float(self):
            return self

        def numpy(self):
            return self.a

    sd = {k: FakeTensor(v) for k, v in fake_state_dict(CFGS[0]).items()}
    v = convert.from_fla(sd, dtype=jnp.bfloat16)
    assert v["params"]["q_proj"]["kernel"].dtype == jnp.bfloat16
    assert v["params"]["A_log"].dtype == np.float32


# --- fla's forward, restated in NumPy float64 with PyTorch weight conventions ---------------------------

def _silu(x):
    return x / (1 + np.exp(-x))


def _sigmoid(x):
    return 1 / (1 + np.exp(-x))


def fla_forward_numpy(sd, cfg, x, gate="softplus", lower_bound=None, eps=1e-5):
    sd = {k: np.asarray(v, np.float64) for k, v in sd.items()}
    H, K, HV = cfg["num_heads"], cfg["head_dim"], cfg["num_v_heads"]
    Vd = int(K * cfg["expand_v"])
    B, T, _ = x.shape
    lin = lambda name, h: h @ sd[name + ".weight"].T + (sd[name + ".bias"] if name + ".bias" in sd else 0)

    def conv(name, h):  # nn.Conv1d(groups=D, padding=W-1) truncated to the first T outputs, then SiLU
        w = sd[name + ".weight"][:, 0, :]            # [D, W]
        W = w.shape[1]
        hp = np.concatenate([np.zeros((B, W - 1, h.shape[-1])), h], axis=1)
        y = sum(hp[:, i: i + T] * w[:, i] for i in range(W))
        if name + ".bias" in sd:
            y = y + sd[name + ".bias"]
        return _silu(y)

    q, k, v = lin("q_proj", x), lin("k_proj", x), lin("v_proj", x)
    if cfg["use_short_conv"]:
        q, k, v = conv("q_conv1d", q), conv("k_conv1d", k), conv("v_conv1d", v)
    else:
        q, k, v = _silu(q), _silu(k), _silu(v)
    f = lin("f_proj.1", lin("f_proj.0", x)).reshape(B, T, HV, K)
    beta = _sigmoid(lin("b_proj", x))
    q, k = q.reshape(B, T, H, K), k.reshape(B, T, H, K)
    v = v.reshape(B, T, HV, Vd)
    l2 = lambda a: a / np.sqrt((a * a).sum(-1, keepdims=True) + 1e-6)
    q, k = l2(q), l2(k)
    A = np.exp(sd["A_log"])[:, None]
    fb = f + sd["dt_bias"].reshape(HV, K)
    g = -A * np.log1p(np.exp(fb)) if gate == "softplus" else lower_bound * _sigmoid(A * fb)
    o = np.zeros((B, T, HV, Vd))
    for b in range(B):
        for h in range(HV):
            S = np.zeros((K, Vd))
            hq = h // (HV // H)
            for t in range(T):
                S = np.exp(g[b, t, h])[:, None] * S
                kt = k[b, t, hq]
                S = S + beta[b, t, h] * np.outer(kt, v[b, t, h] - S.T @ kt)
                o[b, t, h] = S.T @ (q[b, t, hq] * K ** -0.5)
    gate_o = lin("g_proj.1", lin("g_proj.0", x)).reshape(B, T, HV, Vd)
    o = o / np.sqrt((o * o).mean(-1, keepdims=True) + eps) * sd["o_norm.weight"] * _sigmoid(gate_o)
    return lin("o_proj", o.reshape(B, T, HV * Vd))


@pytest.mark.parametrize("cfg, gate", [(CFGS[0], "softplus"), (CFGS[1], "bounded"), (CFGS[2], "softplus")])
def test_converted_layer_matches_fla_math(cfg, gate):
    sd = fake_state_dict(cfg, seed=3)
    if gate == "bounded":
        sd["A_log"] = np.zeros_like(sd["A_log"])
    x = np.random.default_rng(1).standard_normal((2, 7, cfg["hidden_size"]))
    lb = -5.0 if gate == "bounded" else None
    ref = fla_forward_numpy(sd, cfg, x, gate=gate, lower_bound=lb)
    layer = KimiDeltaAttention(**cfg, gate=gate, lower_bound=lb)
    y = np.asarray(layer.apply(convert.from_fla(sd), jnp.asarray(x, jnp.float32)), np.float64)
    err = np.linalg.norm(y - ref) / np.linalg.norm(ref)
    assert err < 1e-4, err
