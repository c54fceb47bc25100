"""The textbook's operations, fast; and the operations only the fast paths need.

1. `npgpt.ops`'s pairs that NumPy runs slowly (layer norm, GELU, the attention core), computed by
   the Numba kernels of `npgpt.kernels`: the same calls, the same `(out, saved)` pairs, the same
   numbers to float32 rounding (tests/test_kernels.py compares each with `ops`). The others
   (linear, LoRA linear, embedding, cross-entropy) are one BLAS call or a gather already: the fast
   paths call `ops` for them.
2. What the fast paths add, each stated in NumPy here (`..._np`) and computed by a kernel:
   attention for one query per sequence (the pooled last block), for sequences packed along the
   rows (the frozen prefix), for sequences sharing their first tokens (`npgpt.prefix_tree`), for
   the seen rows of a batch; LayerNorm-then-linear gradients from one product; AdamW's update in
   one pass; the non-finite check of every step.

NPGPT_NUMBA=0 in the environment (read at import) makes every function here use NumPy: nothing
is compiled, and a debugger steps through plain code.
"""
from __future__ import annotations

import os
from typing import NamedTuple

import numpy as np

from . import ops
from .optim import adamw_update as adamw_update_np

USE_NUMBA = os.environ.get("NPGPT_NUMBA", "1").strip() != "0"

if USE_NUMBA:
    from . import kernels


# ----------------------------------------------------------------------------- ops by kernels

def layernorm_forward(x, g, b, eps=1e-5):
    """`ops.layernorm_forward`. x [...,C] -> y [...,C]"""
    if not USE_NUMBA:
        return ops.layernorm_forward(x, g, b, eps)
    x2 = x.reshape(-1, x.shape[-1])                                         # [N,C]
    y, mean, rstd = kernels.layernorm_forward(x2, g, b, eps)                # [N,C], [N], [N]
    return y.reshape(x.shape), ops.LayerNormSaved(x2, mean, rstd, g)


def layernorm_backward(dy, saved: ops.LayerNormSaved):
    """`ops.layernorm_backward`. dy [...,C] -> dx [...,C], dg [C], db [C]"""
    if not USE_NUMBA:
        return ops.layernorm_backward(dy, saved)
    dx, dg, db = kernels.layernorm_backward(dy.reshape(-1, dy.shape[-1]), *saved)
    return dx.reshape(dy.shape), dg, db


def gelu_forward(x):
    """`ops.gelu_forward` (the kernel for float32; float64, in the gradient checks, by NumPy)."""
    if not USE_NUMBA or x.dtype != np.float32:
        return ops.gelu_forward(x)
    return kernels.gelu_forward(x), x


def gelu_backward(dy, x):
    """`ops.gelu_backward`."""
    if not USE_NUMBA or dy.dtype != np.float32 or x.dtype != np.float32:
        return ops.gelu_backward(dy, x)
    return kernels.gelu_backward(dy, x)


def attention_forward(qkv, n_head, causal=True):
    """`ops.attention_forward`. qkv [B,T,3C] -> out [B,T,C]"""
    if not USE_NUMBA:
        return ops.attention_forward(qkv, n_head, causal)
    out, att = kernels.attention_forward(qkv, n_head, causal=causal)       # [B,T,C], [B,H,T,T]
    return out, ops.AttentionSaved(qkv, att, n_head, causal)


def attention_backward(dout, saved: ops.AttentionSaved):
    """`ops.attention_backward`. dout [B,T,C] -> dqkv [B,T,3C]"""
    if not USE_NUMBA:
        return ops.attention_backward(dout, saved)
    return kernels.attention_backward(dout, saved.qkv, saved.att, saved.n_head, causal=saved.causal)


# ----------------------------------------------------------------------------- one query per sequence

class QueryAttentionSaved(NamedTuple):
    q: np.ndarray              # [B,C] the one query of each sequence
    kv: np.ndarray             # [B,T,2C] keys then values
    att: np.ndarray            # [B,H,T] its probabilities (zero past pos)
    pos: np.ndarray            # [B] the query's position
    n_head: int


def attention_query_forward_np(q, kv, pos, n_head):
    """Attention for one query per sequence: the query at position pos[b] attends to keys
    0..pos[b] (the rows of `ops.attention_forward`'s output at those positions).
    This is what the classifier needs in the last block: it reads one position per sequence.

    q [B,C], kv [B,T,2C] (keys then values), pos [B] -> out [B,C], att [B,H,T] (zero past pos)"""
    B, T, C2 = kv.shape
    C = C2 // 2
    D = C // n_head
    pos = ops.check_positions(pos, B, T)
    qh = q.reshape(B, n_head, 1, D)                                         # [B,H,1,D]
    k, v = (ops.split_heads(a, n_head) for a in np.split(kv, 2, axis=-1))   # [B,H,T,D]
    a = (qh @ k.transpose(0, 1, 3, 2))[:, :, 0, :] / np.sqrt(D)             # [B,H,T]
    future = np.arange(T)[None, :] > pos[:, None]                           # [B,T]
    a = np.where(future[:, None, :], -np.inf, a)
    a = a - a.max(axis=-1, keepdims=True)
    e = np.exp(a)
    att = (e / e.sum(axis=-1, keepdims=True)).astype(q.dtype)               # [B,H,T]
    out = (att[:, :, None, :] @ v)[:, :, 0, :].reshape(B, C)                # [B,C]
    return out, att


def attention_query_backward_np(dout, q, kv, att, pos, n_head):
    """Backward of `attention_query_forward_np`: the formulas of `ops.attention_backward` for one
    query row.

    dout [B,C], q [B,C], kv [B,T,2C], att [B,H,T], pos [B] -> dq [B,C], dkv [B,T,2C]"""
    B, T, C2 = kv.shape
    C = C2 // 2
    D = C // n_head
    ops.check_positions(pos, B, T)
    scale = 1.0 / np.sqrt(D)
    qh = q.reshape(B, n_head, D)                                            # [B,H,D]
    do = dout.reshape(B, n_head, D)                                         # [B,H,D]
    k, v = (ops.split_heads(a, n_head) for a in np.split(kv, 2, axis=-1))   # [B,H,T,D]
    datt = np.einsum("bhd,bhtd->bht", do, v)                                # [B,H,T]
    dv = att[..., None] * do[:, :, None, :]                                 # [B,H,T,D]
    da = att * (datt - (datt * att).sum(axis=-1, keepdims=True))            # [B,H,T]
    dq = np.einsum("bht,bhtd->bhd", da, k) * scale                          # [B,H,D]
    dk = da[..., None] * qh[:, :, None, :] * scale                          # [B,H,T,D]
    dkv = np.concatenate([ops.merge_heads(dk), ops.merge_heads(dv)], axis=-1)   # [B,T,2C]
    return dq.reshape(B, C).astype(q.dtype), dkv.astype(q.dtype)


def attention_query_forward(q, kv, pos, n_head):
    """`attention_query_forward_np`, by its kernel. -> out [B,C], QueryAttentionSaved"""
    run = kernels.attention_query_forward if USE_NUMBA else attention_query_forward_np
    out, att = run(q, kv, pos, n_head)                                      # [B,C], [B,H,T]
    return out, QueryAttentionSaved(q, kv, att, pos, n_head)


def attention_query_backward(dout, saved: QueryAttentionSaved):
    """`attention_query_backward_np`, by its kernel. dout [B,C] -> dq [B,C], dkv [B,T,2C]"""
    run = kernels.attention_query_backward if USE_NUMBA else attention_query_backward_np
    return run(dout, *saved)


# ----------------------------------------------------------------------------- packed sequences

def attention_packed_forward_np(qkv, starts, n_head, causal=True):
    """`ops.attention_forward` for sequences of different lengths packed one after another along
    the rows (no padding): sequence s is rows starts[s]..starts[s+1]-1 and attends only to itself.
    Forward only (for frozen blocks): the probabilities are not kept.

    qkv [N,3C], starts [S+1] (0 = starts[0] < ... < starts[S] = N) -> out [N,C]"""
    out = np.empty((qkv.shape[0], qkv.shape[1] // 3), qkv.dtype)            # [N,C]
    for s, e in zip(starts[:-1], starts[1:]):
        out[s:e] = ops.attention_forward(qkv[None, s:e], n_head, causal)[0][0]   # [T_s,C]
    return out


def attention_packed_forward(qkv, starts, n_head, causal=True):
    """`attention_packed_forward_np`, by its kernel. qkv [N,3C] -> out [N,C]"""
    if USE_NUMBA:
        return kernels.attention_packed_forward(qkv, starts, n_head, causal=causal)
    return attention_packed_forward_np(qkv, starts, n_head, causal)


def attention_tree_forward_np(qkv, path, pstarts, first_new, n_head):
    """Causal `ops.attention_forward` for sequences that share their first tokens (a prefix tree,
    `npgpt.prefix_tree`): row path[pstarts[s] + t] of qkv holds position t of sequence s, and rows
    may be shared by several sequences (positions 0..first_new[s]-1 of s are rows another sequence
    computed). With causal attention a position depends only on the tokens up to it, so two
    sequences that begin alike have the same rows there. Only the rows new to each sequence
    (positions first_new[s]..) are written. Forward only.

    qkv [N,3C], path [P] (row of each position), pstarts [S+1], first_new [S] -> out [N,C]"""
    out = np.zeros((qkv.shape[0], qkv.shape[1] // 3), qkv.dtype)            # [N,C]
    for s in range(len(pstarts) - 1):
        rows = path[pstarts[s]:pstarts[s + 1]]                                 # [T_s]
        o = ops.attention_forward(qkv[rows][None], n_head, True)[0][0]         # [T_s,C]
        out[rows[first_new[s]:]] = o[first_new[s]:]
    return out


def attention_tree_forward(qkv, path, pstarts, first_new, n_head):
    """`attention_tree_forward_np`, by its kernel. qkv [N,3C] -> out [N,C]"""
    if USE_NUMBA:
        return kernels.attention_tree_forward(qkv, path, pstarts, first_new, n_head)
    return attention_tree_forward_np(qkv, path, pstarts, first_new, n_head)


# ----------------------------------------------------------------------------- the seen rows of a batch

class RowsAttentionSaved(NamedTuple):
    grid: np.ndarray           # [B,T,3C] qkv back on the batch's grid, zero at the other rows
    att: np.ndarray            # [B,H,T,T]
    n_head: int
    idx: np.ndarray            # [N] the rows (b*T + t)


def attention_rows_forward(qkv, idx, B, T, n_head):
    """The causal core for some rows of a [B,T] batch, packed: row r of qkv is position
    idx[r] % T of sequence idx[r] // T, and idx holds positions 0..p_b of each sequence b (a
    causal prefix). The rows go back on the [B,T] grid, the others left at zero; a causal query at
    t <= p_b reads keys 0..t only, so the zeros are never read, and the rows idx of
    `attention_forward` on the grid are exactly the result.

    qkv [N,3C], idx [N] (sorted b*T + t) -> out [N,C]"""
    grid = np.zeros((B * T, qkv.shape[1]), qkv.dtype)                       # [B*T,3C]
    grid[idx] = qkv
    grid = grid.reshape(B, T, -1)                                           # [B,T,3C]
    out, saved = attention_forward(grid, n_head, causal=True)               # [B,T,C]
    return out.reshape(B * T, -1)[idx], RowsAttentionSaved(grid, saved.att, n_head, idx)


def attention_rows_backward(dout, saved: RowsAttentionSaved):
    """Backward of `attention_rows_forward`: dout on the grid (zero at the other rows, whose outputs
    were not used), `attention_backward` there, and the rows idx of dqkv. The other rows' queries
    get zero upstream gradient, and their keys and values are seen by them alone, so nothing of
    the rows idx is lost.

    dout [N,C] -> dqkv [N,3C]"""
    grid, att, n_head, idx = saved
    B, T, _ = grid.shape
    dgrid = np.zeros((B * T, dout.shape[1]), dout.dtype)                    # [B*T,C]
    dgrid[idx] = dout
    dqkv = attention_backward(dgrid.reshape(B, T, -1), ops.AttentionSaved(grid, att, n_head, True))  # [B,T,3C]
    return dqkv.reshape(B * T, -1)[idx]


# ----------------------------------------------------------------------------- LayerNorm-then-linear gradients

def layernorm_linear_param_grads_np(M, dc, w, g, b):
    """The parameter gradients of y = LN(x) @ w + c when x itself needs no gradient (the first
    trainable block, whose input is the frozen prefix), from one product M instead of two.

    With xhat the normalised rows of x and h = xhat * g + b the LayerNorm output, the usual
    backward computes dw = h^T dy and dh = dy w^T (an [N,Cout] x [Cout,Cin] product) only to sum
    dg = sum_rows(xhat * dh), db = sum_rows(dh). Writing both through M = xhat^T dy:
        dw[i,j] = sum_n h[n,i] dy[n,j] = g[i] M[i,j] + b[i] dc[j]        (dc = sum_rows dy)
        dg[i]   = sum_n xhat[n,i] sum_j dy[n,j] w[i,j] = sum_j w[i,j] M[i,j]
        db[i]   = sum_n sum_j dy[n,j] w[i,j] = (w dc)[i]
    Each column block of M may come from its own rows (the pooled block's query columns see one
    row per sequence, its key and value columns every seen row): the sums over rows stay per column.

    M [Cin,Cout] = xhat^T dy (overwritten: it becomes dw), dc [Cout], w [Cin,Cout], g [Cin], b [Cin]
    -> dw [Cin,Cout] (M itself), dg [Cin], db [Cin]"""
    dg = np.einsum("ij,ij->i", w, M)                         # [Cin]  before M is overwritten
    db = w @ dc                                              # [Cin]
    M *= g[:, None]                                          # [Cin,Cout]
    M += b[:, None] * dc[None, :]                            # [Cin,Cout]
    return M, dg, db


def layernorm_linear_param_grads(M, dc, w, g, b):
    """`layernorm_linear_param_grads_np`, by its kernel (one pass over M and w)."""
    if USE_NUMBA and kernels.contiguous_float(M, dc, w, g, b):
        return kernels.ln_linear_grads(M, dc, w, g, b)
    return layernorm_linear_param_grads_np(M, dc, w, g, b)


# ----------------------------------------------------------------------------- the optimizer step

def adamw_update(p, g, m, v, t, lr, beta1, beta2, eps, weight_decay):
    """`optim.adamw_update`, by its kernel: one pass reading p, g, m, v and writing p, m, v,
    where NumPy makes about a dozen over 7 million values and their temporaries. Pass it to
    `optim.AdamW(update=...)`."""
    if USE_NUMBA and kernels.contiguous_float(p, g, m, v):
        return kernels.adamw_update(p, g, m, v, t, lr, beta1, beta2, eps, weight_decay)
    return adamw_update_np(p, g, m, v, t, lr, beta1, beta2, eps, weight_decay)


def all_finite(x) -> bool:
    """No NaN, +inf or -inf in x: the training loop's divergence check. The kernel reads x once,
    as an integer max over the exponent fields (a float is NaN or inf exactly when all its exponent
    bits are set), where `np.isfinite(x).all()` writes and reads back a boolean array as large."""
    x = np.asarray(x)
    if USE_NUMBA and x.dtype in (np.float32, np.float64) and x.flags.c_contiguous:
        return kernels.all_finite(x)
    return bool(np.isfinite(x).all())



# ----------------------------------------------------------------------------- compiled apart

def load_compiled_kernels(log=print) -> None:
    """Have this process run the kernels as loaded from Numba's disk cache, never as compiled in
    it: freshly compiled and cached parallel code can round differently (see the end of
    `npgpt.kernels`), and a run must give the same bits whether its process compiled the kernels
    or not (a resumed run, a second run). When the cache lacks them, they are compiled in a child
    process, which saves them; this process then loads them. Nothing to do without Numba, when
    the kernels are in use here already, or when no cache can be written (then every process
    compiles its own, and they agree)."""
    if not USE_NUMBA or kernels.cache_state() in ("loaded", "warm", "unwritable", "unknown"):
        return
    import subprocess
    import sys
    log("compiling kernels (first run only: later runs load them from Numba's cache)")
    package_parent = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (package_parent, os.environ.get("PYTHONPATH"))
                                                      if p))
    done = subprocess.run([sys.executable, "-c", "from npgpt import kernels; kernels.warm_up()"], env=env,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if done.returncode != 0 or kernels.cache_state() != "warm":
        why = (done.stderr.strip().splitlines() or ["no cache saved"])[-1]
        log(f"compiling the kernels apart did not work ({why}); compiling them in this process")

# ----------------------------------------------------------------------------- threads

def set_num_threads(n):
    """Run the Numba kernels and BLAS (NumPy's matmul) on n threads each.

    The model calls them one after the other, never at the same time, so both may use all cores.
    Numba's count is capped at the pool it started with (NUMBA_NUM_THREADS, by default the number
    of cores); BLAS is limited through threadpoolctl, and left alone when that is not installed."""
    n = int(n)
    if n < 1:
        raise ValueError(f"set_num_threads: n must be >= 1, got {n}")
    if USE_NUMBA:
        import numba
        numba.set_num_threads(min(n, numba.config.NUMBA_NUM_THREADS))
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return
    threadpool_limits(limits=n, user_api="blas")            # stays in force (not used as a `with`)
