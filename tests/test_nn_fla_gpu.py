"""fla's KimiDeltaAttention (PyTorch + Triton) vs flashkda_jax.nn.KimiDeltaAttention with converted weights.

Runs only where torch with CUDA and fla's layers (the flash-linear-attention package) import; skipped
cleanly elsewhere. Both sides compute in bf16; each is also compared with this layer in float32 on the
pure-JAX implementation, so a mismatch says which side drifted.
"""

import inspect
import os

import numpy as np
import pytest

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # share the GPU with torch

torch = pytest.importorskip("torch")
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU (fla's Triton kernels)", allow_module_level=True)
try:
    from fla.layers import KimiDeltaAttention as FlaKDA
except Exception as e:  # noqa: BLE001 - any import failure means "not available here"
    pytest.skip(f"fla.layers.KimiDeltaAttention is not importable: {e!r}", allow_module_level=True)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from flashkda_jax import convert  # noqa: E402
from flashkda_jax.nn import KimiDeltaAttention  # noqa: E402

_FLA_ARGS = set(inspect.signature(FlaKDA.__init__).parameters)

CASES = {
    "h4-k128": dict(hidden_size=512, num_heads=4, head_dim=128),
    "gva-h2-hv4-k64": dict(hidden_size=256, num_heads=2, num_v_heads=4, head_dim=64),
    "bounded-h2-k128": dict(hidden_size=256, num_heads=2, head_dim=128, lower_bound=-5.0),
}

BF16_TOL = 2e-2


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def _build(name):
    kw = dict(CASES[name])
    if "lower_bound" in kw and "lower_bound" not in _FLA_ARGS:
        pytest.skip("this fla version's KimiDeltaAttention has no lower_bound (bounded gate)")
    if kw.get("num_v_heads", kw["num_heads"]) != kw["num_heads"] and "num_v_heads" not in _FLA_ARGS:
        pytest.skip("this fla version's KimiDeltaAttention has no num_v_heads")
    torch.manual_seed(0)
    ref = FlaKDA(mode="chunk", layer_idx=0, **kw).to(device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():  # every parameter should matter: move the ones initialised to constants
        for pname, p in ref.named_parameters():
            if pname in ("o_norm.weight", "g_proj.1.bias") or pname.endswith("conv1d.bias"):
                p.add_(0.2 * torch.randn_like(p))
    sd = ref.state_dict()
    cfg = convert.infer_config(sd)
    gate = dict(gate="bounded", lower_bound=kw["lower_bound"]) if "lower_bound" in kw else {}
    return ref, sd, cfg, gate


def _ours(cfg, gate, variables, x_np, segment_ids=None):
    y16 = KimiDeltaAttention(**cfg, **gate, dtype=jnp.bfloat16).apply(
        variables, jnp.asarray(x_np, jnp.bfloat16), segment_ids)
    y32 = KimiDeltaAttention(**cfg, **gate, implementation="xla").apply(
        variables, jnp.asarray(x_np, jnp.float32), segment_ids)
    return np.asarray(y16.astype(jnp.float32)), np.asarray(y32)


@pytest.mark.parametrize("name", list(CASES))
def test_dense_batch_matches_fla(name):
    ref, sd, cfg, gate = _build(name)
    x = torch.randn(2, 200, cfg["hidden_size"], device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        y_ref = ref(x)[0].float().cpu().numpy()
    variables = convert.from_fla(sd)
    x_np = x.float().cpu().numpy()
    y16, y32 = _ours(cfg, gate, variables, x_np)
    e_ours, e_fla, e_cross = _rel(y16, y32), _rel(y_ref, y32), _rel(y16, y_ref)
    print(f"{name}: |ours_bf16 - f32| {e_ours:.2e}  |fla_bf16 - f32| {e_fla:.2e}  |ours - fla| {e_cross:.2e}")
    assert e_ours < BF16_TOL and e_fla < BF16_TOL and e_cross < BF16_TOL


@pytest.mark.parametrize("name", ["h4-k128", "gva-h2-hv4-k64"])
def test_varlen_matches_fla(name):
    """fla's cu_seqlens (B=1, packed) against this layer's segment ids."""
    ref, sd, cfg, gate = _build(name)
    lens = [37, 1, 162, 100]
    cu = np.concatenate([[0], np.cumsum(lens)])
    T = int(cu[-1])
    x = torch.randn(1, T, cfg["hidden_size"], device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        y_ref = ref(x, cu_seqlens=torch.tensor(cu, dtype=torch.long, device="cuda"))[0].float().cpu().numpy()
    seg = np.zeros((1, T), np.int32)
    for i in range(len(lens)):
        seg[0, cu[i]: cu[i + 1]] = i + 1
    y16, y32 = _ours(cfg, gate, convert.from_fla(sd), x.float().cpu().numpy(), jnp.asarray(seg))
    e_ours, e_fla, e_cross = _rel(y16, y32), _rel(y_ref, y32), _rel(y16, y_ref)
    print(f"{name} varlen: |ours_bf16 - f32| {e_ours:.2e}  |fla_bf16 - f32| {e_fla:.2e}  |ours - fla| {e_cross:.2e}")
    assert e_ours < BF16_TOL and e_fla < BF16_TOL and e_cross < BF16_TOL


def test_round_trip_loads_into_fla():
    ref, sd, cfg, gate = _build("gva-h2-hv4-k64")
    back = convert.to_fla(convert.from_fla(sd), dtype=np.float32)
    fresh = FlaKDA(mode="chunk", layer_idx=0, **CASES["gva-h2-hv4-k64"]).to(device="cuda", dtype=torch.bfloat16)
    fresh.load_state_dict({k: torch.from_numpy(v) for k, v in back.items()}, strict=True)
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, sd[k]), k
