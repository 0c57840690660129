"""kda(..., checkpoint_slices=n): the sequence-sliced, recomputing op (flashkda_jax.slicing) gives the unsliced
op's outputs, final states and gradients in every state mode; its compiled fwd+bwd holds no full-size
intermediate beyond the unsliced one's."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flashkda_jax as F
from flashkda_jax import slicing
from kda_testing import chunk_crossing_segments, cuda_kernels_present, make_problem, random_state, rel_err

# The CUDA kernels where they run (their fp32 inputs go through bf16 operands), else the C++ CPU kernels; and the
# pure-JAX program (full-precision matmuls).
IMPLS = (["cuda"] if cuda_kernels_present() else ["cpu"]) + ["xla"]
# Sliced vs unsliced (the gate-parameter gradients add their per-slice sums in another order); cuda: no worse
# against the f32 program (below).
EXACT = {"cpu": 1e-5, "xla": 1e-4}


K_TEST = 64 if IMPLS[0] == "cuda" else 16  # the CUDA kernels take K = V in {64, 128}


def _case(mode, states, B=2, T=300, H=2, K=K_TEST, seed=0, dtype=jnp.float32):
    (q, k, v, g, beta), kw = make_problem(seed, B=B, T=T, H=H, K=K, V=K, dtype=dtype, gate="bounded")
    kw.update(qk_l2norm=True, beta_sigmoid=True)
    init = None
    if mode == "segments":
        seg = chunk_crossing_segments(B, T, seed)
        seg[0, :5] = 0  # padding at a row start, and a sequence across every slice boundary of row 1
        seg[1] = np.where(np.arange(T) < T - 3, 7, 0)
        kw["segment_ids"] = jnp.asarray(seg)
        if states:
            kw["max_segments"] = 3  # fewer than the sequences: some have no state slot
            init = random_state(seed, (B, 3, H, K, K))
    elif mode == "cu_seqlens":
        q, k, v, g, beta = (x[:1] for x in (q, k, v, g, beta))
        kw["cu_seqlens"] = jnp.asarray([0, 1, 70, 64 * 3 + 1, 64 * 3 + 1, T - 2], jnp.int32)  # empty one, padded end
        if states:
            init = random_state(seed, (5, H, K, K))
    elif states:
        init = random_state(seed, (B, H, K, K))
    if states:
        kw["return_final_state"] = True
    return (q, k, v, g, beta), init, kw


def _value_and_grads(inputs, init, kw, impl, n):
    def loss(q, k, v, g, beta, A_log, dt_bias, h0):
        o, fin = F.kda(q, k, v, g, beta, **dict(kw, A_log=A_log, dt_bias=dt_bias), initial_state=h0,
                       implementation=impl, checkpoint_slices=n)
        w = jnp.cos(jnp.arange(o.size, dtype=jnp.float32).reshape(o.shape) * 0.37)
        out = jnp.sum(o.astype(jnp.float32) * w)
        if fin is not None:
            out = out + jnp.sum(fin * jnp.sin(jnp.arange(fin.size, dtype=jnp.float32).reshape(fin.shape) * 0.11))
        return out, (o, fin)

    argnums = tuple(range(8 if init is not None else 7))
    f = jax.jit(jax.value_and_grad(loss, argnums=argnums, has_aux=True))
    with jax.default_matmul_precision("highest"):
        (_, (o, fin)), grads = f(*inputs, kw["A_log"], kw["dt_bias"], init)
    return [o] + ([fin] if fin is not None else []) + list(grads)


def _check(got, ref, impl, inputs, init, kw, label):
    """got (sliced) == ref (unsliced) to EXACT[impl]; for cuda, got is no further from the f32 program than ref."""
    assert len(got) == len(ref)
    if impl in EXACT:
        for i, (a, b) in enumerate(zip(got, ref)):
            assert rel_err(a, b) < EXACT[impl], (label, i, rel_err(a, b))
        return
    exact = _value_and_grads(inputs, init, kw, "xla", None)
    for i, (a, b, c) in enumerate(zip(got, ref, exact)):
        e_sliced, e_plain = rel_err(a, c), rel_err(b, c)
        assert e_sliced <= 1.5 * e_plain + 1e-4 and e_sliced < 2e-2, (label, i, e_sliced, e_plain)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("mode", ["dense", "segments", "cu_seqlens"])
@pytest.mark.parametrize("states", [True, False])
def test_sliced_equals_unsliced(impl, mode, states):
    inputs, init, kw = _case(mode, states)
    ref = _value_and_grads(inputs, init, kw, impl, None)
    for n in (2, 4):  # 300 tokens: 3 x 128 + 44 and 4 x 64 + 44 (a tail slice shorter than the others)
        _check(_value_and_grads(inputs, init, kw, impl, n), ref, impl, inputs, init, kw, n)


@pytest.mark.parametrize("n", [1, 3, 64])
def test_slice_counts(n):
    """One slice is the plain op; more slices than chunks leave one chunk per slice."""
    inputs, init, kw = _case("dense", True, B=1, T=200)
    impl = IMPLS[0]
    ref = _value_and_grads(inputs, init, kw, impl, None)
    _check(_value_and_grads(inputs, init, kw, impl, n), ref, impl, inputs, init, kw, n)


def test_slice_length():
    assert slicing.slice_length(32768, 8) == 4096
    assert slicing.slice_length(300, 2) == 192  # whole chunks: ceil(5 / 2) = 3 chunks
    assert slicing.slice_length(300, 64) == 64


def test_bf16_and_vmap():
    impl = IMPLS[0]
    inputs, init, kw = _case("segments", True, dtype=jnp.bfloat16)
    ref = _value_and_grads(inputs, init, kw, impl, None)
    got = _value_and_grads(inputs, init, kw, impl, 3)
    for a, b in zip(got, ref):
        assert rel_err(a, b) < 2e-2

    def f(q, k, v, g, beta, n):
        return F.kda(q, k, v, g, beta, gate="bounded", lower_bound=-5.0, A_log=kw["A_log"],
                     dt_bias=kw["dt_bias"], implementation=impl, checkpoint_slices=n)[0]

    x = [jnp.stack([a, a * 0.5]) for a in inputs]
    want = jax.vmap(lambda *a: f(*a, None))(*x)
    have = jax.vmap(lambda *a: f(*a, 2))(*x)
    assert rel_err(have, want) < 1e-2


def test_errors():
    (q, k, v, g, beta), _, kw = _case("dense", False)
    for bad in (0, -1, 1.5, True, "2"):
        with pytest.raises(ValueError, match="checkpoint_slices"):
            F.kda(q, k, v, g, beta, **kw, checkpoint_slices=bad)
    with pytest.raises(ValueError, match="context_parallel_axis"):
        F.kda(q, k, v, g, beta, **kw, checkpoint_slices=2, context_parallel_axis="cp")


def test_temporaries_do_not_grow():
    """The compiled fwd+bwd's temporaries stay within the unsliced program's (f32 inputs; on CPU the kernels need
    no workspace, on the GPU the sliced one's shrinks): slices are copied in and out of full-size buffers in place."""
    impl = IMPLS[0]
    inputs, init, kw = _case("dense", True, B=1, T=4096, H=2)

    def temp_bytes(n):
        def loss(q, k, v, g, beta, h0):
            o, fin = F.kda(q, k, v, g, beta, **kw, initial_state=h0, implementation=impl, checkpoint_slices=n)
            return jnp.sum(o) + jnp.sum(fin)

        f = jax.jit(jax.grad(loss, argnums=tuple(range(6))))
        return f.lower(*inputs, init).compile().memory_analysis().temp_size_in_bytes

    tok = inputs[0].size * 4  # one f32 [B, T, H, K]
    t8 = temp_bytes(8)
    assert t8 < temp_bytes(None) + tok // 2  # slice-sized extras only (a full-size copy would be + tok)
    assert temp_bytes(16) <= t8
