"""A small byte-level KDA language model and its data, shared by train_lm.py and generate.py.

Model: byte embedding (256 symbols) -> N x [RMSNorm -> KimiDeltaAttention -> residual,
RMSNorm -> SwiGLU MLP -> residual] -> RMSNorm -> tied output head (the embedding matrix).

Data: the Python standard library's own ``.py`` files, as bytes; each file is one sequence (segment),
packed into fixed-size rows with int32 segment ids (1, 2, ... per row; 0 = padding). A file longer than
the room left in a row continues, as a new segment, in the next row.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import sysconfig

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from flashkda_jax.nn import KimiDeltaAttention

VOCAB = 256


@dataclasses.dataclass(frozen=True)
class LMConfig:
    d_model: int = 128
    n_layers: int = 2
    num_heads: int = 2
    head_dim: int = 32
    num_v_heads: int | None = None
    mlp_ratio: float = 2.0
    gate: str = "softplus"
    lower_bound: float | None = None
    dtype: str = "float32"          # computation dtype; parameters are float32
    implementation: str | None = None
    remat: bool = False

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, s: str) -> "LMConfig":
        return cls(**json.loads(s))


class MLP(nn.Module):
    d_model: int
    hidden: int
    dtype: jnp.dtype

    @nn.compact
    def __call__(self, x):
        init = nn.initializers.normal(0.02)
        gu = nn.Dense(2 * self.hidden, use_bias=False, dtype=self.dtype, kernel_init=init, name="gate_up")(x)
        g, u = jnp.split(gu, 2, axis=-1)
        return nn.Dense(self.d_model, use_bias=False, dtype=self.dtype, kernel_init=init, name="down")(nn.silu(g) * u)


class Block(nn.Module):
    cfg: LMConfig

    @nn.compact
    def __call__(self, x, segment_ids, decode: bool = False):
        c = self.cfg
        dt = jnp.dtype(c.dtype)
        attn = KimiDeltaAttention(num_heads=c.num_heads, head_dim=c.head_dim, num_v_heads=c.num_v_heads,
                                  gate=c.gate, lower_bound=c.lower_bound, dtype=dt,
                                  kernel_init=nn.initializers.normal(0.02),
                                  implementation=c.implementation, name="attn")
        x = x + attn(nn.RMSNorm(dtype=dt, name="attn_norm")(x), segment_ids, decode=decode)
        x = x + MLP(c.d_model, int(c.mlp_ratio * c.d_model), dt, name="mlp")(nn.RMSNorm(dtype=dt, name="mlp_norm")(x))
        return x


class KDALM(nn.Module):
    cfg: LMConfig

    @nn.compact
    def __call__(self, tokens, segment_ids=None, decode: bool = False):
        """tokens int32 [B, T] -> logits float32 [B, T, 256]."""
        c = self.cfg
        dt = jnp.dtype(c.dtype)
        emb = nn.Embed(VOCAB, c.d_model, embedding_init=nn.initializers.normal(0.02), dtype=dt, name="embed")
        x = emb(tokens)
        block = nn.remat(Block, static_argnums=(3,)) if c.remat else Block
        for i in range(c.n_layers):
            x = block(c, name=f"block_{i}")(x, segment_ids, decode)
        x = nn.RMSNorm(dtype=dt, name="final_norm")(x)
        return emb.attend(x).astype(jnp.float32)


# ----------------------------------------------------------------------------------------------------
# Data.
# ----------------------------------------------------------------------------------------------------

def stdlib_files() -> list[str]:
    root = sysconfig.get_paths()["stdlib"]
    files = sorted(glob.glob(os.path.join(root, "**", "*.py"), recursive=True))
    return [f for f in files if "site-packages" not in f and "dist-packages" not in f]


def load_corpus(max_bytes: int) -> list[bytes]:
    """The standard library's .py files (sorted by path) as bytes, up to about max_bytes in total."""
    docs, total = [], 0
    for f in stdlib_files():
        try:
            with open(f, "rb") as fh:
                b = fh.read()
        except OSError:
            continue
        b = b.replace(b"\x00", b"")
        if not b:
            continue
        docs.append(b)
        total += len(b)
        if total >= max_bytes:
            break
    if not docs:
        raise RuntimeError("no .py files found in the standard library directory "
                           f"{sysconfig.get_paths()['stdlib']!r}")
    return docs


def pack(docs: list[bytes], row_len: int, min_piece: int = 16):
    """Packs documents into rows of row_len tokens -> (tokens uint8 [N, row_len], segment_ids int32 [N, row_len]).

    Rows are filled in order; when less than min_piece tokens are left in a row, the rest is padding (id 0).
    """
    toks, segs = [], []
    row = np.zeros(row_len, np.uint8)
    seg = np.zeros(row_len, np.int32)
    pos, sid = 0, 0

    def flush():
        nonlocal row, seg, pos, sid
        toks.append(row)
        segs.append(seg)
        row = np.zeros(row_len, np.uint8)
        seg = np.zeros(row_len, np.int32)
        pos, sid = 0, 0

    for d in docs:
        a = np.frombuffer(d, np.uint8)
        i = 0
        while i < len(a):
            room = row_len - pos
            if room < min_piece:
                flush()
                continue
            piece = a[i: i + room]
            sid += 1
            row[pos: pos + len(piece)] = piece
            seg[pos: pos + len(piece)] = sid
            pos += len(piece)
            i += len(piece)
            if pos == row_len:
                flush()
    if pos:
        flush()
    return np.stack(toks), np.stack(segs)


def lm_batch(tokens: np.ndarray, segs: np.ndarray):
    """Rows of length T+1 -> (inputs [B, T], segment_ids [B, T], targets [B, T], loss mask [B, T])."""
    inp, tgt = tokens[:, :-1], tokens[:, 1:]
    s_in, s_tgt = segs[:, :-1], segs[:, 1:]
    mask = (s_in != 0) & (s_in == s_tgt)
    return (inp.astype(np.int32), s_in.astype(np.int32), tgt.astype(np.int32), mask.astype(np.float32))
