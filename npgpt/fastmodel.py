"""GPT-2 for training and inference: the numbers of `npgpt.model`, computed only where the loss
reads them, with the Numba kernels of `npgpt.fastops`.

Same functions and arguments as the textbook (`forward_cls`, `loss_and_grads`, `forward_prefix`),
plus `dense`; tests/test_fastmodel.py checks every path against `npgpt.model`. What makes it fast
without changing a number:

- Seen rows only. With causal attention the pooled output of sequence b depends on positions
  0..pos[b] alone, so the blocks run on those rows only, packed one sequence after another
  (`SeenRows`): padding is never computed, and each matmul runs over the batch's real tokens.
- The pooled last block. The classifier reads one position per sequence, so in the last block
  only the keys and values need every seen position: the query, attention output, MLP, ln_f and
  head run at that position alone (`block_forward_pooled`).
- As the first trainable block, that block's ln_1 and c_attn gradients come from one product
  (`fastops.layernorm_linear_param_grads`).
- The frozen prefix: the blocks below the first trainable one are a fixed function of the tokens;
  training computes them once per example (`npgpt.prefix`) and passes them back as `x_start`.

`dense=True` computes every position of every block (the textbook's work, by the kernels), as
does attention without the causal mask (every position then sees the padding).

One block, `block_forward`, serves every layout: the attention is an object that knows its rows
(`Dense` for a [B,T,C] batch, `SeenRows`, `Packed` sequences, `SharedPrefix` rows), so the block
itself never branches on it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from . import fastops, model, ops
from .errors import NpgptError
from .model import BlockSaved, linear_backward, linear_forward, qkv_backward, qkv_forward


# ----------------------------------------------------------------------------- attention, by layout

@dataclass(frozen=True)
class Dense:
    """Every position of a [B,T] batch: x is [B,T,C]."""
    n_head: int
    causal: bool = True

    def forward(self, qkv):
        return fastops.attention_forward(qkv, self.n_head, causal=self.causal)              # [B,T,C]

    def backward(self, dout, saved):
        return fastops.attention_backward(dout, saved)                                      # [B,T,3C]


def seen_rows(B, T, pos):
    """The rows of a flattened [B*T] batch that the pooled outputs depend on: positions 0..pos[b] of
    each sequence (causal attention: later positions, padding among them, are never read).
    -> idx [N] (sorted row numbers b*T + t), qrow [B] (where each pooled row sits within idx)"""
    seen = np.arange(T)[None, :] <= np.asarray(pos)[:, None]                               # [B,T]
    idx = np.flatnonzero(seen)                                                             # [N]
    qrow = np.cumsum(np.asarray(pos) + 1) - 1                                              # [B]
    return idx, qrow


@dataclass(frozen=True)
class SeenRows:
    """Positions 0..pos[b] of each sequence of a [B,T] batch, packed one sequence after another:
    x is [N,C] (the rows idx of the batch cut to T = max(pos)+1). Causal attention only."""
    idx: np.ndarray            # [N] row numbers b*T + t
    B: int
    T: int
    n_head: int

    @classmethod
    def of(cls, pos, n_head):
        T = int(np.max(pos)) + 1
        return cls(seen_rows(len(pos), T, pos)[0], len(pos), T, n_head)

    def gather(self, x):
        """x [B,T',C] (T' >= T) -> its seen rows [N,C]"""
        return x[:, :self.T].reshape(self.B * self.T, x.shape[2])[self.idx]

    def grid(self, x):
        """The seen rows back on the [B,T,C] grid, zero elsewhere. x [N,C] -> [B,T,C]"""
        g = np.zeros((self.B * self.T, x.shape[1]), x.dtype)
        g[self.idx] = x
        return g.reshape(self.B, self.T, x.shape[1])

    def unpack(self, dx, shape):
        """A gradient of the seen rows as one of the whole batch x [B,T',C] (zero elsewhere)."""
        out = np.zeros(shape, dx.dtype)                                                    # [B,T',C]
        out[:, :self.T] = self.grid(dx)
        return out

    def forward(self, qkv):
        return fastops.attention_rows_forward(qkv, self.idx, self.B, self.T, self.n_head)  # [N,C]

    def backward(self, dout, saved):
        return fastops.attention_rows_backward(dout, saved)                                # [N,3C]


@dataclass(frozen=True)
class Packed:
    """Whole sequences packed along the rows, each attending to itself: x is [N,C], sequence s is
    rows starts[s]..starts[s+1]-1. Forward only (the frozen prefix)."""
    starts: np.ndarray         # [S+1]
    n_head: int
    causal: bool = True

    def forward(self, qkv):
        return fastops.attention_packed_forward(qkv, self.starts, self.n_head, causal=self.causal), None

    def backward(self, dout, saved):
        raise NotImplementedError("packed sequences are forward only")


@dataclass(frozen=True)
class SharedPrefix:
    """Sequences that share their first tokens, each shared row once (`npgpt.prefix_tree`'s
    layout: path, pstarts, first_new): x is [N,C], the new rows. Forward only, causal."""
    path: np.ndarray
    pstarts: np.ndarray
    first_new: np.ndarray
    n_head: int

    def forward(self, qkv):
        return fastops.attention_tree_forward(qkv, self.path, self.pstarts, self.first_new, self.n_head), None

    def backward(self, dout, saved):
        raise NotImplementedError("shared-prefix rows are forward only")


# ----------------------------------------------------------------------------- one block

def block_forward(params, i, x, attention, lora=None):
    """Block i on rows x laid out as `attention` says ([B,T,C] for Dense, [N,C] otherwise): the
    textbook's `model.block_forward`, with the kernels. -> x, BlockSaved"""
    p = lambda n: params[f"h{i}/{n}"]
    h1, ln_1 = fastops.layernorm_forward(x, p("ln_1/g"), p("ln_1/b"))                       # [...,C]
    qkv, c_attn = qkv_forward(params, i, h1, lora)                                          # [...,3C]
    a, attn = attention.forward(qkv)                                                        # [...,C]
    o, c_proj = linear_forward(params, f"h{i}/attn/c_proj", a, lora)                        # [...,C]
    x1 = x + o                                                                              # [...,C]
    h2, ln_2 = fastops.layernorm_forward(x1, p("ln_2/g"), p("ln_2/b"))                      # [...,C]
    f, c_fc = linear_forward(params, f"h{i}/mlp/c_fc", h2, lora)                            # [...,4C]
    gl, gelu = fastops.gelu_forward(f)                                                      # [...,4C]
    m, mlp_c_proj = linear_forward(params, f"h{i}/mlp/c_proj", gl, lora)                    # [...,C]
    return x1 + m, BlockSaved(ln_1, c_attn, attn, c_proj, ln_2, c_fc, gelu, mlp_c_proj)     # [...,C]



def block_infer(params, i, x, attention, lora=None):
    """`block_forward` where no backward follows (the frozen prefix, evaluation, inference): the
    same operations and numbers, but what the backward would read is dropped as soon as the next
    step has it, so a block holds a few activations at a time instead of all of them.
    -> x (the block's output)"""
    p = lambda n: params[f"h{i}/{n}"]
    h = fastops.layernorm_forward(x, p("ln_1/g"), p("ln_1/b"))[0]                           # [...,C]
    h = qkv_forward(params, i, h, lora)[0]                                                  # [...,3C]
    h = attention.forward(h)[0]                                                             # [...,C]
    x1 = x + linear_forward(params, f"h{i}/attn/c_proj", h, lora)[0]                        # [...,C]
    h = fastops.layernorm_forward(x1, p("ln_2/g"), p("ln_2/b"))[0]                          # [...,C]
    h = linear_forward(params, f"h{i}/mlp/c_fc", h, lora)[0]                                # [...,4C]
    h = fastops.gelu_forward(h)[0]                                                          # [...,4C]
    return x1 + linear_forward(params, f"h{i}/mlp/c_proj", h, lora)[0]                      # [...,C]

def block_backward(dx2, saved: BlockSaved, i, grads, attention, need_dx=True, full=True):
    """Backward of `block_forward`: the textbook's `model.block_backward`, with the kernels."""
    dgl = linear_backward(dx2, saved.mlp_c_proj, grads, full=full)                          # [...,4C]
    df = fastops.gelu_backward(dgl, saved.gelu)                                             # [...,4C]
    dh2 = linear_backward(df, saved.c_fc, grads, full=full)                                 # [...,C]
    dx1_ln, dg, db = fastops.layernorm_backward(dh2, saved.ln_2)                            # [...,C]
    if full:
        grads[f"h{i}/ln_2/g"], grads[f"h{i}/ln_2/b"] = dg, db
    dx1 = dx2 + dx1_ln                                                                      # [...,C]
    da = linear_backward(dx1, saved.c_proj, grads, full=full)                               # [...,C]
    dqkv = attention.backward(da, saved.attn)                                               # [...,3C]
    dh1, dw, db = qkv_backward(dqkv, saved.c_attn, i, grads, need_dx=need_dx or full, full=full)  # [...,C]
    if full:
        grads[f"h{i}/attn/c_attn/w"], grads[f"h{i}/attn/c_attn/b"] = dw, db
    if not need_dx and not full:
        return None
    dx_ln, dg, db = fastops.layernorm_backward(dh1, saved.ln_1)                             # [...,C]
    if full:
        grads[f"h{i}/ln_1/g"], grads[f"h{i}/ln_1/b"] = dg, db
    return dx1 + dx_ln if need_dx else None                                                 # [...,C]


# ----------------------------------------------------------------------------- the pooled last block

class PooledBlockSaved(NamedTuple):
    shape: tuple               # (B, T, C, packed)
    pos: np.ndarray            # [B] the pooled positions
    idx: np.ndarray            # [N] the seen rows (b*T + t)
    qrow: np.ndarray           # [B] each pooled row's place among them
    ln_1: ops.LayerNormSaved   # over the seen rows
    c_attn_kv: model.QkvSaved  # keys and values, at the seen rows
    c_attn_q: model.QkvSaved   # the query, at the pooled rows
    attn: fastops.QueryAttentionSaved
    c_proj: model.LinearSaved
    ln_2: ops.LayerNormSaved
    c_fc: model.LinearSaved
    gelu: np.ndarray
    mlp_c_proj: model.LinearSaved
    c_attn_w: np.ndarray       # [C,3C] (for the one-product gradients of the first trainable block)
    ln_1_b: np.ndarray         # [C]


def block_forward_pooled(params, i, x, pos, n_head, lora=None, packed=False):
    """Block i computed only where the classifier reads: keys and values at the positions a pooled
    query can see (0..pos[b], no padding after it), the rest (query, attention output, MLP) at
    position pos[b] of each sequence only. Causal attention only.

    x [B,T,C], pos [B] -> y [B,C] (equal to block_forward(x)[b, pos[b]]), PooledBlockSaved.
    packed=True: x is [N,C] instead, the rows `seen_rows(B, max(pos)+1, pos)` alone (positions
    0..pos[b] of each sequence, one sequence after another), and the backward returns theirs."""
    p = lambda n: params[f"h{i}/{n}"]
    B, C = len(pos), x.shape[-1]
    T = int(np.max(pos)) + 1 if packed else x.shape[1]
    idx, qrow = seen_rows(B, T, pos)                                                        # [N], [B]
    xs = x if packed else x.reshape(B * T, C)[idx]                                          # [N,C]
    h1, ln_1 = fastops.layernorm_forward(xs, p("ln_1/g"), p("ln_1/b"))                      # [N,C]
    kv_seen, c_attn_kv = qkv_forward(params, i, h1, lora, parts="kv")                       # [N,2C]
    kv = np.zeros((B * T, 2 * C), kv_seen.dtype)                                            # [B*T,2C]
    kv[idx] = kv_seen                                        # back in place; unseen rows stay 0
    kv = kv.reshape(B, T, 2 * C)                                                            # [B,T,2C]
    q, c_attn_q = qkv_forward(params, i, h1[qrow], lora, parts="q")                         # [B,C]
    a, attn = fastops.attention_query_forward(q, kv, pos, n_head)                           # [B,C]
    o, c_proj = linear_forward(params, f"h{i}/attn/c_proj", a, lora)                        # [B,C]
    x1 = xs[qrow] + o                                                                       # [B,C] (= x[b, pos[b]] + o)
    h2, ln_2 = fastops.layernorm_forward(x1, p("ln_2/g"), p("ln_2/b"))                      # [B,C]
    f, c_fc = linear_forward(params, f"h{i}/mlp/c_fc", h2, lora)                            # [B,4C]
    gl, gelu = fastops.gelu_forward(f)                                                      # [B,4C]
    m, mlp_c_proj = linear_forward(params, f"h{i}/mlp/c_proj", gl, lora)                    # [B,C]
    saved = PooledBlockSaved((B, T, C, packed), pos, idx, qrow, ln_1, c_attn_kv, c_attn_q, attn, c_proj,
                             ln_2, c_fc, gelu, mlp_c_proj, p("attn/c_attn/w"), p("ln_1/b"))
    return x1 + m, saved                                                                    # [B,C]


def block_backward_pooled(dx2, saved: PooledBlockSaved, i, grads, need_dx=True, full=True):
    """Backward of `block_forward_pooled`: dx2 [B,C] at the pooled rows -> dx [B,T,C]
    (packed: dx [N,C] of the seen rows).

    c_attn's gradient is the query part (from pooled rows) next to the key/value part (the seen
    rows); the residual carries dx1 to x only at the pooled rows; unseen rows get zero gradient.
    full=False (LoRA training): only the LoRA pairs get gradients.
    As the first trainable block (need_dx=False, full), ln_1 and c_attn's gradients come from one
    product (`fastops.layernorm_linear_param_grads`): no gradient for ln_1's output is formed."""
    B, T, C, packed = saved.shape
    qrow = saved.qrow
    dgl = linear_backward(dx2, saved.mlp_c_proj, grads, full=full)                          # [B,4C]
    df = fastops.gelu_backward(dgl, saved.gelu)                                             # [B,4C]
    dh2 = linear_backward(df, saved.c_fc, grads, full=full)                                 # [B,C]
    dx1_ln, dg, db = fastops.layernorm_backward(dh2, saved.ln_2)                            # [B,C]
    if full:
        grads[f"h{i}/ln_2/g"], grads[f"h{i}/ln_2/b"] = dg, db
    dx1 = dx2 + dx1_ln                                                                      # [B,C]
    da = linear_backward(dx1, saved.c_proj, grads, full=full)                               # [B,C]
    dq, dkv = fastops.attention_query_backward(da, saved.attn)                              # [B,C], [B,T,2C]
    dkv_seen = dkv.reshape(B * T, 2 * C)[saved.idx]                                         # [N,2C]
    if full and not need_dx and not saved.c_attn_q.lora and not saved.c_attn_kv.lora:
        _attn_ln_param_grads(dq, dkv_seen, saved, i, grads)
        return None
    dh1_q, dwq, dbq = qkv_backward(dq, saved.c_attn_q, i, grads, full=full)                 # [B,C]
    dh1, dwkv, dbkv = qkv_backward(dkv_seen, saved.c_attn_kv, i, grads, need_dx=need_dx or full, full=full)  # [N,C]
    if full:
        grads[f"h{i}/attn/c_attn/w"] = np.concatenate([dwq, dwkv], axis=1)                  # [C,3C]
        grads[f"h{i}/attn/c_attn/b"] = np.concatenate([dbq, dbkv])                          # [3C]
    if not need_dx and not full:
        return None
    dh1[qrow] += dh1_q                                                                      # [N,C]
    dx_seen, dg, db = fastops.layernorm_backward(dh1, saved.ln_1)                           # [N,C]
    if full:
        grads[f"h{i}/ln_1/g"], grads[f"h{i}/ln_1/b"] = dg, db
    if not need_dx:
        return None
    dx_seen[qrow] += dx1                                                                    # residual
    if packed:
        return dx_seen                                                                      # [N,C]
    dx = np.zeros((B * T, C), dx_seen.dtype)                                                # [B*T,C]
    dx[saved.idx] = dx_seen
    return dx.reshape(B, T, C)                                                              # [B,T,C]


def _attn_ln_param_grads(dq, dkv_seen, saved: PooledBlockSaved, i, grads):
    """c_attn's and ln_1's gradients of the pooled block when its input needs none:
    M = xhat^T [dq | dkv], the query columns over the pooled rows, key and value over the seen ones.
    dq [B,C], dkv_seen [N,2C] -> grads h{i}/attn/c_attn/w, /b, h{i}/ln_1/g, /b"""
    x, mean, rstd, g = saved.ln_1                                                           # [N,C], [N], [N], [C]
    C = x.shape[1]
    xhat = (x - mean[:, None]) * rstd[:, None]                                              # [N,C]
    M = np.empty((C, 3 * C), np.result_type(xhat, dq))                                      # [C,3C]
    np.matmul(xhat[saved.qrow].T, dq, out=M[:, :C])                                         # [C,C]
    np.matmul(xhat.T, dkv_seen, out=M[:, C:])                                               # [C,2C]
    dc = np.concatenate([dq.sum(axis=0), dkv_seen.sum(axis=0)])                             # [3C]
    dw, dg, db = fastops.layernorm_linear_param_grads(M, dc, saved.c_attn_w, g, saved.ln_1_b)
    grads[f"h{i}/attn/c_attn/w"], grads[f"h{i}/attn/c_attn/b"] = dw, dc
    grads[f"h{i}/ln_1/g"], grads[f"h{i}/ln_1/b"] = dg, db


# ----------------------------------------------------------------------------- the frozen prefix

def forward_prefix(params, config, ids, stop: int, lora=None, causal=True):
    """`model.forward_prefix`, with the kernels: the activations entering block `stop`.
    ids [B,T] -> x [B,T,C]"""
    ids = model.check_ids(ids, config)
    x, _ = ops.embedding_forward(ids, params["wte"], params["wpe"])                         # [B,T,C]
    attention = Dense(config.n_head, causal)
    for i in range(stop):
        x = block_infer(params, i, x, attention, lora=lora)                                # [B,T,C]
    return x


def forward_prefix_packed(params, config, seqs, stop: int, lora=None, causal=True):
    """`forward_prefix` for sequences of different lengths without padding: their tokens are packed
    along one axis, so each matmul runs over all of them at once, and attention keeps each sequence
    to itself. seqs: list of 1-D token arrays [T_s] -> list of [T_s,C] arrays (views of one array)"""
    lengths = np.array([len(s) for s in seqs])
    if len(seqs) == 0 or lengths.min() < 1 or lengths.max() > config.n_ctx:
        raise NpgptError(f"packed sequences need lengths in 1..{config.n_ctx}")
    ids = np.concatenate(seqs)                                                             # [N]
    if ids.dtype.kind not in "iu" or ids.min() < 0 or ids.max() >= config.vocab_size:
        raise NpgptError(f"token ids must be integers in 0..{config.vocab_size - 1}")
    starts = np.concatenate([[0], np.cumsum(lengths)])                                     # [S+1]
    pos = np.arange(len(ids)) - np.repeat(starts[:-1], lengths)                            # [N] position in its sequence
    x = params["wte"][ids] + params["wpe"][pos]                                            # [N,C]
    attention = Packed(starts, config.n_head, causal)
    for i in range(stop):
        x = block_infer(params, i, x, attention, lora=lora)                                # [N,C]
    return np.split(x, starts[1:-1])


# ----------------------------------------------------------------------------- the classifier

class ClsSaved(NamedTuple):
    """What `loss_and_grads`'s backward needs of `_cls_forward`."""
    blocks: dict               # i -> BlockSaved or PooledBlockSaved, for the blocks that train
    attention: object          # Dense or SeenRows: how blocks start..L-1 saw the batch
    rows: object               # SeenRows when the batch ran packed, else None
    shape: tuple               # [B,T,C] of the batch as given
    pooled_last: bool          # whether the last block ran pooled
    pool_shape: tuple | None   # [B,T,C] when the pooled rows were read from a full grid
    mean: np.ndarray | None    # [B,T] mean pooling's weights
    ln_f: ops.LayerNormSaved
    cls: model.LinearSaved


def _cls_forward(params, config, x, start, pos, keep_from, dense, lora=None, causal=True,
                 pooling="last_token"):
    """Blocks start..L-1 on x [B,T,C], then ln_f and the head at pos (or, for mean pooling, the
    mean of ln_f's output over positions 0..pos[b]). Keeps what the backward needs of blocks
    >= keep_from. -> logits [B,K], ClsSaved"""
    L, B = config.n_layer, x.shape[0]
    shape = x.shape
    rows = SeenRows.of(pos, config.n_head) if not dense and causal and start < L else None
    attention = rows or Dense(config.n_head, causal)
    pooled_last = rows is not None and pooling != "mean"
    if rows is not None:
        x = rows.gather(x)                                                                 # [N,C]
    blocks = {}
    for i in range(start, L):
        if i == L - 1 and pooled_last:
            x, s = block_forward_pooled(params, i, x, pos, config.n_head, lora=lora, packed=True)  # [B,C]
        elif i < keep_from:                  # no backward reaches it: nothing kept
            x, s = block_infer(params, i, x, attention, lora=lora), None                  # [N,C] / [B,T,C]
        else:
            x, s = block_forward(params, i, x, attention, lora=lora)                      # [N,C] / [B,T,C]
        if i >= keep_from:
            blocks[i] = s
    if rows is not None and pooling == "mean":
        x = rows.grid(x)                                                                   # [B,T,C]
    weights = pool_shape = None
    if pooling == "mean":                    # ln_f at every position, then the mean of the real ones
        h_all, ln_f = fastops.layernorm_forward(x, params["ln_f/g"], params["ln_f/b"])    # [B,T,C]
        weights = model.mean_weights(pos, x.shape[1], h_all.dtype)                         # [B,T]
        h = np.einsum("bt,btc->bc", weights, h_all)                                        # [B,C]
    else:
        if x.ndim == 3:                      # dense, or no block ran: read the pooled rows now
            pool_shape = x.shape
            x = x[np.arange(B), pos]                                                       # [B,C]
        h, ln_f = fastops.layernorm_forward(x, params["ln_f/g"], params["ln_f/b"])        # [B,C]
    logits, cls = linear_forward(params, "cls", h, lora)                                   # [B,K]
    return logits, ClsSaved(blocks, attention, rows, shape, pooled_last, pool_shape, weights, ln_f, cls)


def forward_cls(params, config, ids=None, lengths=None, pooling="last_token",
                dense=False, x_start=None, start=0, lora=None, causal=True):
    """`model.forward_cls`: class logits [B,K]. dense=True computes every position."""
    model.check_lora(params, lora)
    if x_start is None:
        x_start = forward_prefix(params, config, ids, start, lora=lora, causal=causal)
    pos = model.pooled_positions(ids if ids is not None else x_start[..., 0], lengths, pooling)
    logits, _ = _cls_forward(params, config, x_start, start, pos, keep_from=config.n_layer + 1,
                             dense=dense, lora=lora, causal=causal, pooling=pooling)
    return logits


def _head_backward(dlogits, saved: ClsSaved, grads, pos, head_only, full, train_head):
    """Back through the classifier, the pooling and ln_f -> the gradient of the last block's
    output, laid out as that block produced it (None when only the head trains)."""
    dh = linear_backward(dlogits, saved.cls, grads, need_dx=not head_only, full=train_head)  # [B,C]
    if head_only:
        return None
    if saved.mean is not None:
        dh = saved.mean[:, :, None] * dh[:, None, :]                                       # [B,T,C]
    dx, dg, db = fastops.layernorm_backward(dh, saved.ln_f)                                # [B,C] / [B,T,C]
    if full:
        grads["ln_f/g"], grads["ln_f/b"] = dg, db
    if saved.pool_shape is not None:         # scatter the pooled rows back into [B,T,C]
        d = np.zeros(saved.pool_shape, dx.dtype)
        d[np.arange(len(pos)), pos] = dx
        dx = d
    if saved.rows is not None and saved.mean is not None:   # the grid's seen rows
        dx = dx.reshape(-1, dx.shape[-1])[saved.rows.idx]                                  # [N,C]
    return dx


def loss_and_grads(params, config, ids, labels, trainable=1, lengths=None,
                   pooling="last_token", dense=False, x_start=None, lora=None, causal=True, class_weights=None):
    """`model.loss_and_grads`: (loss, grads {name: array}, logits [B,K]), the same numbers.
    dense=True computes every position (the textbook's work, by the kernels)."""
    L = config.n_layer
    model.check_lora(params, lora)
    first = model.first_trainable_block(config, trainable, lora)
    full = trainable != "lora"
    labels = np.asarray(labels)
    if x_start is None:
        ids = model.check_ids(ids, config)
        if trainable == "all":
            x_start, emb = ops.embedding_forward(ids, params["wte"], params["wpe"])         # [B,T,C]
        else:
            x_start = forward_prefix(params, config, ids, first, lora=lora, causal=causal)  # [B,T,C]
    elif trainable == "all":
        raise NpgptError("x_start cannot be used when the embeddings train")
    pos = model.pooled_positions(ids if ids is not None else x_start[..., 0], lengths, pooling)
    if labels.shape != (x_start.shape[0],):
        raise NpgptError(f"labels must have shape ({x_start.shape[0]},), got {labels.shape}")

    logits, saved = _cls_forward(params, config, x_start, first, pos, keep_from=first, dense=dense,
                                 lora=lora, causal=causal, pooling=pooling)
    loss, ce = ops.cross_entropy_forward(logits, labels, class_weights)

    grads = {}
    head_only = trainable == "head" or (trainable == "lora" and first == L)
    dx = _head_backward(ops.cross_entropy_backward(1.0, ce), saved, grads, pos, head_only, full,
                        train_head=full or lora.train_head)
    if head_only:
        return loss, grads, logits
    for i in reversed(range(first, L)):
        need_dx = i > first or trainable == "all"
        if i == L - 1 and saved.pooled_last:
            dx = block_backward_pooled(dx, saved.blocks.pop(i), i, grads, need_dx=need_dx, full=full)
        else:
            dx = block_backward(dx, saved.blocks.pop(i), i, grads, saved.attention, need_dx=need_dx, full=full)
    if trainable == "all":
        if saved.rows is not None:           # the seen rows back in [B,T,C]; the rest is 0
            dx = saved.rows.unpack(dx, saved.shape)
        grads["wte"], grads["wpe"] = ops.embedding_backward(dx, emb)
    return loss, grads, logits
