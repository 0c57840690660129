"""Bad input raises a clear Python error at trace time."""

import jax
import jax.numpy as jnp
import pytest

import flashkda_jax as F
from kda_testing import make_problem


def base():
    return make_problem(0, B=2, T=8, H=2, HV=4, K=8, V=8)[0]


def call(**over):
    q, k, v, g, beta = base()
    args = dict(q=q, k=k, v=v, g=g, beta=beta)
    kw = {n: over.pop(n) for n in list(over) if n not in args}
    args.update(over)
    return jax.eval_shape(lambda: F.kda(args["q"], args["k"], args["v"], args["g"], args["beta"], **kw))


CASES = [
    (dict(q=jnp.zeros((2, 8, 2))), "q must be"),
    (dict(k=jnp.zeros((2, 8, 2, 4))), "k must have"),
    (dict(v=jnp.zeros((2, 8, 3, 8))), "multiple of the q/k heads"),
    (dict(v=jnp.zeros((2, 9, 4, 8))), "v must be"),
    (dict(g=jnp.zeros((2, 8, 2, 8))), "g must be"),
    (dict(beta=jnp.zeros((2, 8, 2))), "beta must be"),
    (dict(q=jnp.zeros((2, 8, 2, 8), jnp.int32)), "bf16, fp16, fp32"),
    (dict(gate="relu"), "gate must be one of"),
    (dict(gate="softplus"), "needs A_log"),
    (dict(gate="bounded"), "needs lower_bound"),
    (dict(gate="bounded", lower_bound=0.5), "must be negative"),
    (dict(gate="bounded", lower_bound=-5.0, A_log=jnp.zeros((3,))), "A_log must be"),
    (dict(gate="bounded", lower_bound=-5.0, dt_bias=jnp.zeros((4, 7))), "dt_bias must be"),
    (dict(A_log=jnp.zeros((4,))), "only used by"),
    (dict(lower_bound=-5.0), "only used by"),
    (dict(allow_neg_eigval=True), "needs beta_sigmoid"),
    (dict(state_layout="kk"), "state_layout"),
    (dict(segment_ids=jnp.zeros((2, 7), jnp.int32)), "segment_ids must be"),
    (dict(segment_ids=jnp.zeros((2, 8), jnp.float32)), "segment_ids must be int32"),
    (dict(segment_ids=jnp.ones((2, 8), jnp.int32), return_final_state=True), "need max_segments"),
    (dict(segment_ids=jnp.ones((2, 8), jnp.int32), max_segments=0, return_final_state=True), "positive"),
    (dict(segment_ids=jnp.ones((2, 8), jnp.int32), max_segments=True, return_final_state=True), "positive"),
    (dict(max_segments=2), "needs segment_ids"),
    (dict(cu_seqlens=jnp.array([0, 8], jnp.int32)), "B == 1"),
    (dict(cu_seqlens=jnp.array([0, 8], jnp.int32), segment_ids=jnp.ones((2, 8), jnp.int32)), "not both"),
    (dict(initial_state=jnp.zeros((2, 4, 8, 7))), "initial_state must be"),
    (dict(implementation="tpu"), "implementation must be"),
]


@pytest.mark.parametrize("over,msg", CASES, ids=[c[1] for c in CASES])
def test_bad_input_raises(over, msg):
    with pytest.raises((ValueError, TypeError), match=msg):
        call(**over)


def test_cuda_on_a_machine_without_it_raises():
    if "cuda" in F.available_implementations():
        pytest.skip("this machine runs CUDA")
    with pytest.raises(ValueError, match="implementation='cuda'"):
        call(implementation="cuda")
