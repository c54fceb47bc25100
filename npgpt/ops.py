"""The operations of GPT-2, each as a forward/backward pair.

Every forward returns `(out, saved)`: `saved` is what its backward needs, nothing more. Every
backward takes the upstream gradient and that `saved`, and returns the gradients of its inputs.
Docstrings give the derivative each backward implements. Shapes: B batch, T time, C channels,
V vocabulary, K classes, N = B*T rows.

The loops that NumPy does badly (LayerNorm, GELU, the attention core) live in `npgpt.kernels`; the
matmuls stay in BLAS.
"""
from __future__ import annotations

import numpy as np

from . import kernels

# ----------------------------------------------------------------------------- embedding

def embedding_forward(ids, wte, wpe):
    """x[b,t] = wte[ids[b,t]] + wpe[t].

    ids [B,T] ints, wte [V,C], wpe [n_ctx,C] -> x [B,T,C]"""
    B, T = ids.shape
    x = wte[ids] + wpe[:T]                                  # [B,T,C]
    return x, (ids, wte.shape, wpe.shape)


def embedding_backward(dx, saved, need_wte=True, need_wpe=True):
    """dwte[v] = sum of dx[b,t] over every (b,t) with ids[b,t] == v; dwpe[t] = sum_b dx[b,t].

    Saved: ids and the table shapes. dx [B,T,C] -> dwte [V,C] | None, dwpe [n_ctx,C] | None"""
    ids, wte_shape, wpe_shape = saved
    B, T, C = dx.shape
    dwte = dwpe = None
    if need_wte:
        dwte = np.zeros(wte_shape, dx.dtype)                # [V,C]
        np.add.at(dwte, ids.reshape(-1), dx.reshape(-1, C))  # scatter-add rows; repeated ids add up
    if need_wpe:
        dwpe = np.zeros(wpe_shape, dx.dtype)                # [n_ctx,C]
        dwpe[:T] = dx.sum(axis=0)                           # [T,C]
    return dwte, dwpe


# ----------------------------------------------------------------------------- layer norm

def layernorm_forward(x, g, b, eps=1e-5):
    """y = (x - mean) / sqrt(var + eps) * g + b over the last axis (biased variance).

    x [...,C], g [C], b [C] -> y [...,C]"""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])                           # [N,C]
    y, mean, rstd = kernels.layernorm_forward(x2, g, b, eps)  # [N,C], [N], [N]
    return y.reshape(shape), (x2, mean, rstd, g)


def layernorm_backward(dy, saved):
    """With xhat = (x - mean) * rstd: dx = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat)),
    dxhat = dy * g; dg = sum(dy * xhat); db = sum(dy) (sums over every row).

    Saved: x, mean, rstd, g. dy [...,C] -> dx [...,C], dg [C], db [C]"""
    x2, mean, rstd, g = saved
    shape = dy.shape
    dx, dg, db = kernels.layernorm_backward(dy.reshape(-1, shape[-1]), x2, mean, rstd, g)
    return dx.reshape(shape), dg, db


# ----------------------------------------------------------------------------- linear

def linear_forward(x, w, b):
    """y = x @ w + b (OpenAI's orientation: w is [in, out]).

    The rows are flattened to one [N,Cin] matrix first: a single large GEMM is much faster than
    NumPy's loop of one GEMM per leading index that `[B,T,Cin] @ [Cin,Cout]` would run.

    x [...,Cin], w [Cin,Cout], b [Cout] -> y [...,Cout]"""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])                         # [N,Cin]
    y = x2 @ w                                              # [N,Cout]
    y += b                                                  # in place: no second [N,Cout] array
    return y.reshape(*lead, w.shape[1]), (x2, w)


def linear_backward(dy, saved, need_dx=True, need_dw=True):
    """dx = dy @ w^T, dw = x^T @ dy (summed over rows), db = sum_rows(dy).

    Saved: x (as [N,Cin]), w. dy [...,Cout] -> dx [...,Cin] | None, dw [Cin,Cout] | None, db [Cout] | None"""
    x2, w = saved
    lead = dy.shape[:-1]
    dy2 = dy.reshape(-1, dy.shape[-1])                      # [N,Cout]
    dx = dw = db = None
    if need_dx:
        dx = (dy2 @ w.T).reshape(*lead, w.shape[0])         # [...,Cin]
    if need_dw:
        dw = x2.T @ dy2                                     # [Cin,Cout]
        db = dy2.sum(axis=0)                                # [Cout]
    return dx, dw, db


def layernorm_linear_param_grads(M, dc, w, g, b):
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
    return kernels.ln_linear_grads(M, dc, w, g, b)          # [Cin,Cout], [Cin], [Cin]


def lora_linear_forward(x, w, b, A, B, scale):
    """y = x @ w + b + scale * (x @ A) @ B   (LoRA: w, b frozen, a low-rank update A B trains;
    scale = alpha / r).

    x [...,Cin], w [Cin,Cout], b [Cout], A [Cin,r], B [r,Cout] -> y [...,Cout]"""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])                         # [N,Cin]
    xa = x2 @ A                                             # [N,r]
    y = x2 @ w                                              # [N,Cout]
    y += b
    y += (xa * xa.dtype.type(scale)) @ B                    # [N,Cout] the low-rank update
    return y.reshape(*lead, w.shape[1]), (x2, w, A, B, scale, xa)


def lora_linear_backward(dy, saved, need_dx=True):
    """With g = scale * dy:  dB = (x A)^T g,  dA = x^T (g B^T),  dx = dy w^T + (g B^T) A^T.
    No gradient for the frozen w and b.

    The scale multiplies the small products (no [N,Cout] copy of dy): g B^T = scale (dy B^T).

    Saved: x (as [N,Cin]), w, A, B, scale, x A [N,r].
    dy [...,Cout] -> dx [...,Cin] | None, dA [Cin,r], dB [r,Cout]"""
    x2, w, A, B, scale, xa = saved
    lead = dy.shape[:-1]
    dy2 = dy.reshape(-1, dy.shape[-1])                      # [N,Cout]
    s = dy2.dtype.type(scale)
    dB = xa.T @ dy2                                         # [r,Cout]
    dB *= s
    gb = dy2 @ B.T                                          # [N,r] = g B^T
    gb *= s
    dA = x2.T @ gb                                          # [Cin,r]
    dx = None
    if need_dx:
        dx = dy2 @ w.T                                      # [N,Cin] through the frozen w
        dx += gb @ A.T                                      # and through the update
        dx = dx.reshape(*lead, w.shape[0])                  # [...,Cin]
    return dx, dA, dB


# ----------------------------------------------------------------------------- GELU

def gelu_forward(x):
    """y = 0.5 x (1 + tanh(u)), u = sqrt(2/pi) (x + 0.044715 x^3)   (GPT-2's tanh form).

    x [...] -> y [...]"""
    y = kernels.gelu_forward(x)                             # [...]
    return y, x


def gelu_backward(dy, saved):
    """dy/dx = 0.5 (1 + t) + 0.5 x (1 - t^2) sqrt(2/pi) (1 + 3 * 0.044715 x^2), t = tanh(u).

    Saved: x (t is recomputed: one more tanh costs less than keeping an array of them).
    dy [...] -> dx [...]"""
    return kernels.gelu_backward(dy, saved)


# ----------------------------------------------------------------------------- attention

def attention_forward(qkv, n_head, causal=True):
    """Causal self-attention core: q, k, v = split(qkv); per head softmax(q k^T / sqrt(D), causal) v.
    causal=False: every query sees every key (no mask; padding is then seen too).

    qkv [B,T,3C] -> out [B,T,C]"""
    out, att = kernels.attention_forward(qkv, n_head, causal=causal)  # [B,T,C], [B,H,T,T]
    return out, (qkv, att, n_head, causal)


def attention_packed_forward(qkv, starts, n_head, causal=True):
    """The same core for sequences packed one after another along the rows, each attending only
    to itself (rows starts[s]..starts[s+1]-1). Forward only: for frozen blocks, nothing is saved.

    qkv [N,3C], starts [S+1] -> out [N,C]"""
    return kernels.attention_packed_forward(qkv, starts, n_head, causal=causal)  # [N,C]


def attention_tree_forward(qkv, path, pstarts, first_new, n_head):
    """The causal core for sequences sharing their first tokens, each shared row computed once
    (`npgpt.prefix_tree`): sequence s reads rows path[pstarts[s]:pstarts[s+1]] as its positions
    0..T_s-1 and owns those from first_new[s] on. With causal attention a position depends only
    on the tokens up to it, so two sequences that begin alike have the same rows there.
    Forward only: for frozen blocks, nothing is saved.

    qkv [N,3C], path [P], pstarts [S+1], first_new [S] -> out [N,C]"""
    return kernels.attention_tree_forward(qkv, path, pstarts, first_new, n_head)  # [N,C]


def attention_backward(dout, saved):
    """Through out = att v and att = softmax(s): datt = dout v^T, dv = att^T dout,
    ds = att * (datt - sum(datt * att)), dq = ds k / sqrt(D), dk = ds^T q / sqrt(D).

    The same formulas without the mask when causal=False (att then has no zeros above the diagonal).

    Saved: qkv and the softmax probabilities att. dout [B,T,C] -> dqkv [B,T,3C]"""
    qkv, att, n_head, causal = saved
    return kernels.attention_backward(dout, qkv, att, n_head, causal=causal)


def attention_rows_forward(qkv, idx, B, T, n_head):
    """The causal core for some rows of a [B,T] batch, packed: row r of qkv is position
    idx[r] % T of sequence idx[r] // T, and idx holds positions 0..p_b of each sequence b (a
    causal prefix). The rows go back on the [B,T] grid, the others left at zero; a causal query at
    t <= p_b reads keys 0..t only, so the zeros are never read, and the rows idx of
    `attention_forward` on the grid are exactly the result.

    qkv [N,3C], idx [N] (sorted b*T + t) -> out [N,C]"""
    grid = np.zeros((B * T, qkv.shape[1]), qkv.dtype)                       # [B*T,3C]
    grid[idx] = qkv
    out, att = kernels.attention_forward(grid.reshape(B, T, -1), n_head, causal=True)  # [B,T,C], [B,H,T,T]
    return out.reshape(B * T, -1)[idx], (grid.reshape(B, T, -1), att, n_head, idx)


def attention_rows_backward(dout, saved):
    """Backward of `attention_rows_forward`: dout on the grid (zero at the other rows, whose outputs
    were not used), `attention_backward` there, and the rows idx of dqkv. The other rows' queries
    get zero upstream gradient, and their keys and values are seen by them alone, so nothing of
    the rows idx is lost.

    Saved: the qkv grid, att, n_head, idx. dout [N,C] -> dqkv [N,3C]"""
    grid, att, n_head, idx = saved
    B, T, _ = grid.shape
    dgrid = np.zeros((B * T, dout.shape[1]), dout.dtype)                    # [B*T,C]
    dgrid[idx] = dout
    dqkv = kernels.attention_backward(dgrid.reshape(B, T, -1), grid, att, n_head, causal=True)  # [B,T,3C]
    return dqkv.reshape(B * T, -1)[idx]


def attention_query_forward(q, kv, pos, n_head):
    """The same core for one query per sequence, at position pos[b], attending keys 0..pos[b].

    q [B,C], kv [B,T,2C], pos [B] -> out [B,C]"""
    out, att = kernels.attention_query_forward(q, kv, pos, n_head)  # [B,C], [B,H,T]
    return out, (q, kv, att, pos, n_head)


def attention_query_backward(dout, saved):
    """Backward of `attention_query_forward` (the formulas of `attention_backward`, one query row).

    Saved: q, kv, att, pos. dout [B,C] -> dq [B,C], dkv [B,T,2C]"""
    q, kv, att, pos, n_head = saved
    return kernels.attention_query_backward(dout, q, kv, att, pos, n_head)


# ----------------------------------------------------------------------------- loss

def cross_entropy_forward(logits, targets):
    """Mean cross-entropy of softmax(logits) against integer targets, stable (max subtracted).

    logits [B,K], targets [B] -> loss (scalar)"""
    z = logits - logits.max(axis=-1, keepdims=True)         # [B,K]
    logsumexp = np.log(np.exp(z).sum(axis=-1, keepdims=True))  # [B,1]
    logp = z - logsumexp                                    # [B,K] log-probabilities
    B = logits.shape[0]
    loss = -logp[np.arange(B), targets].mean()
    return float(loss), (np.exp(logp), targets)


def cross_entropy_backward(dloss, saved):
    """dlogits = (softmax(logits) - onehot(targets)) / B * dloss.

    Saved: the probabilities and the targets. -> dlogits [B,K]"""
    probs, targets = saved
    B = probs.shape[0]
    dlogits = probs.copy()                                  # [B,K]
    dlogits[np.arange(B), targets] -= 1
    return dlogits * probs.dtype.type(dloss / B)


def accuracy(logits, targets) -> float:
    """Fraction of rows whose largest logit is the target."""
    return float((np.argmax(logits, axis=-1) == targets).mean())
