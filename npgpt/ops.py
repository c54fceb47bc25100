"""The operations of GPT-2, each a forward/backward pair in plain NumPy: the math, stated once.

Every forward returns `(out, saved)`: `saved` is what its backward needs, nothing more, as a named
tuple. Every backward takes the upstream gradient and that `saved`, and returns the gradients of
the forward's inputs. Each docstring gives the derivative its backward implements; each backward
is checked against finite differences in float64 (tests/test_ops_grad.py).

Shapes: B batch, T time (positions), C channels, H heads, D = C/H head size, V vocabulary,
K classes, N rows (B*T flattened).

This module is the textbook: nothing here is compiled or clever. `npgpt.fastops` computes the same
numbers with Numba kernels where NumPy is slow (layer norm, GELU, the attention core), and adds
the operations only the fast paths need.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np


# ----------------------------------------------------------------------------- embedding

class EmbeddingSaved(NamedTuple):
    ids: np.ndarray            # [B,T] the token ids
    wte_shape: tuple           # (V, C)
    wpe_shape: tuple           # (n_ctx, C)


def embedding_forward(ids, wte, wpe):
    """x[b,t] = wte[ids[b,t]] + wpe[t].

    ids [B,T] ints, wte [V,C], wpe [n_ctx,C] -> x [B,T,C]"""
    B, T = ids.shape
    x = wte[ids] + wpe[:T]                                   # [B,T,C]
    return x, EmbeddingSaved(ids, wte.shape, wpe.shape)


def embedding_backward(dx, saved: EmbeddingSaved):
    """dwte[v] = sum of dx[b,t] over every (b,t) with ids[b,t] == v; dwpe[t] = sum_b dx[b,t].

    dx [B,T,C] -> dwte [V,C], dwpe [n_ctx,C]"""
    B, T, C = dx.shape
    dwte = np.zeros(saved.wte_shape, dx.dtype)               # [V,C]
    np.add.at(dwte, saved.ids.reshape(-1), dx.reshape(-1, C))  # scatter-add rows; repeated ids add up
    dwpe = np.zeros(saved.wpe_shape, dx.dtype)               # [n_ctx,C]
    dwpe[:T] = dx.sum(axis=0)                                # [T,C]
    return dwte, dwpe


# ----------------------------------------------------------------------------- layer norm

class LayerNormSaved(NamedTuple):
    x: np.ndarray              # [N,C] the input, rows flattened
    mean: np.ndarray           # [N]
    rstd: np.ndarray           # [N] 1 / sqrt(var + eps)
    g: np.ndarray              # [C] the gain


def layernorm_forward(x, g, b, eps=1e-5):
    """y = (x - mean) / sqrt(var + eps) * g + b over the last axis (biased variance).

    x [...,C], g [C], b [C] -> y [...,C]"""
    x2 = x.reshape(-1, x.shape[-1])                          # [N,C]
    mean = x2.mean(axis=-1)                                  # [N]
    xc = x2 - mean[:, None]                                  # [N,C]
    var = (xc * xc).mean(axis=-1)                            # [N]
    rstd = (1.0 / np.sqrt(var + eps)).astype(x.dtype)        # [N]
    y = xc * rstd[:, None] * g + b                           # [N,C]
    return y.reshape(x.shape), LayerNormSaved(x2, mean, rstd, g)


def layernorm_backward(dy, saved: LayerNormSaved):
    """Through xhat = (x - mean) * rstd and y = xhat * g + b, row by row:

        dg = sum_rows(dy * xhat),  db = sum_rows(dy),  dxhat = dy * g
        dx = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat))

    The two means come from mean and rstd depending on every element of the row: the first from
    x - mean (every x_i moves the mean), the second from rstd (every x_i moves the variance).

    dy [...,C] -> dx [...,C], dg [C], db [C]"""
    x, mean, rstd, g = saved
    dy2 = dy.reshape(-1, dy.shape[-1])                       # [N,C]
    xhat = (x - mean[:, None]) * rstd[:, None]               # [N,C]
    dxhat = dy2 * g                                          # [N,C]
    dx = rstd[:, None] * (dxhat
                          - dxhat.mean(axis=-1, keepdims=True)
                          - xhat * (dxhat * xhat).mean(axis=-1, keepdims=True))   # [N,C]
    dg = (dy2 * xhat).sum(axis=0)                            # [C]
    db = dy2.sum(axis=0)                                     # [C]
    return dx.reshape(dy.shape), dg, db


# ----------------------------------------------------------------------------- linear

class LinearSaved(NamedTuple):
    x: np.ndarray              # [N,Cin] the input, rows flattened
    w: np.ndarray              # [Cin,Cout]


def linear_forward(x, w, b):
    """y = x @ w + b (OpenAI's orientation: w is [in, out]).

    The rows are flattened to one [N,Cin] matrix first: one large matrix product is much faster
    than the loop of one product per leading index that `[B,T,Cin] @ [Cin,Cout]` would run.

    x [...,Cin], w [Cin,Cout], b [Cout] -> y [...,Cout]"""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])                          # [N,Cin]
    y = x2 @ w                                               # [N,Cout]
    y += b                                                   # in place: no second [N,Cout] array
    return y.reshape(*lead, w.shape[1]), LinearSaved(x2, w)


def linear_backward(dy, saved: LinearSaved, need_dx=True, need_dw=True):
    """dx = dy @ w^T, dw = x^T @ dy (summed over rows), db = sum_rows(dy).

    dy [...,Cout] -> dx [...,Cin] | None, dw [Cin,Cout] | None, db [Cout] | None"""
    x2, w = saved
    lead = dy.shape[:-1]
    dy2 = dy.reshape(-1, dy.shape[-1])                       # [N,Cout]
    dx = dw = db = None
    if need_dx:
        dx = (dy2 @ w.T).reshape(*lead, w.shape[0])          # [...,Cin]
    if need_dw:
        dw = x2.T @ dy2                                      # [Cin,Cout]
        db = dy2.sum(axis=0)                                 # [Cout]
    return dx, dw, db


class LoraLinearSaved(NamedTuple):
    x: np.ndarray              # [N,Cin] the input, rows flattened
    w: np.ndarray              # [Cin,Cout] the frozen weight
    A: np.ndarray              # [Cin,r]
    B: np.ndarray              # [r,Cout]
    scale: float               # alpha / r
    xa: np.ndarray             # [N,r] x A


def lora_linear_forward(x, w, b, A, B, scale):
    """y = x @ w + b + scale * (x @ A) @ B   (LoRA: w, b frozen, a low-rank update A B trains;
    scale = alpha / r).

    x [...,Cin], w [Cin,Cout], b [Cout], A [Cin,r], B [r,Cout] -> y [...,Cout]"""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])                          # [N,Cin]
    xa = x2 @ A                                              # [N,r]
    y = x2 @ w                                               # [N,Cout]
    y += b
    y += (xa * xa.dtype.type(scale)) @ B                     # [N,Cout] the low-rank update
    return y.reshape(*lead, w.shape[1]), LoraLinearSaved(x2, w, A, B, scale, xa)


def lora_linear_backward(dy, saved: LoraLinearSaved, need_dx=True):
    """With g = scale * dy:  dB = (x A)^T g,  dA = x^T (g B^T),  dx = dy w^T + (g B^T) A^T.
    No gradient for the frozen w and b.

    The scale multiplies the small products (no [N,Cout] copy of dy): g B^T = scale (dy B^T).

    dy [...,Cout] -> dx [...,Cin] | None, dA [Cin,r], dB [r,Cout]"""
    x2, w, A, B, scale, xa = saved
    lead = dy.shape[:-1]
    dy2 = dy.reshape(-1, dy.shape[-1])                       # [N,Cout]
    s = dy2.dtype.type(scale)
    dB = xa.T @ dy2                                          # [r,Cout]
    dB *= s
    gb = dy2 @ B.T                                           # [N,r] = g B^T
    gb *= s
    dA = x2.T @ gb                                           # [Cin,r]
    dx = None
    if need_dx:
        dx = dy2 @ w.T                                       # [N,Cin] through the frozen w
        dx += gb @ A.T                                       # and through the update
        dx = dx.reshape(*lead, w.shape[0])                   # [...,Cin]
    return dx, dA, dB


# ----------------------------------------------------------------------------- GELU

GELU_K = np.sqrt(2.0 / np.pi)
GELU_A = 0.044715


def gelu_forward(x):
    """y = 0.5 x (1 + tanh(u)), u = sqrt(2/pi) (x + 0.044715 x^3)   (GPT-2's tanh form).

    Saved: x itself (the backward recomputes tanh: cheaper than keeping an array of them).
    x [...] -> y [...]"""
    k, a = x.dtype.type(GELU_K), x.dtype.type(GELU_A)
    t = np.tanh(k * (x + a * x * x * x))                     # [...]
    return 0.5 * x * (1 + t), x


def gelu_backward(dy, x):
    """dy/dx = 0.5 (1 + t) + 0.5 x (1 - t^2) du/dx, t = tanh(u), du/dx = sqrt(2/pi) (1 + 3 * 0.044715 x^2)
    (the product rule on 0.5 x (1 + t), and tanh' = 1 - tanh^2).

    dy [...], x [...] -> dx [...]"""
    k, a = x.dtype.type(GELU_K), x.dtype.type(GELU_A)
    t = np.tanh(k * (x + a * x * x * x))                     # [...]
    dudx = k * (1 + 3 * a * x * x)                           # [...]
    return dy * (0.5 * (1 + t) + 0.5 * x * (1 - t * t) * dudx)


# ----------------------------------------------------------------------------- attention

class AttentionSaved(NamedTuple):
    qkv: np.ndarray            # [B,T,3C] the input
    att: np.ndarray            # [B,H,T,T] the softmax probabilities (zero above the diagonal when causal)
    n_head: int
    causal: bool


def split_heads(x, n_head):
    """[B,T,C] -> [B,H,T,D]"""
    B, T, C = x.shape
    return x.reshape(B, T, n_head, C // n_head).transpose(0, 2, 1, 3)


def merge_heads(x):
    """[B,H,T,D] -> [B,T,C]"""
    B, H, T, D = x.shape
    return x.transpose(0, 2, 1, 3).reshape(B, T, H * D)


def check_positions(pos, B, T) -> np.ndarray:
    """pos as an int64 array [B] with every entry in 0..T-1: the one position per sequence that
    a pooled head reads, and the last key its query sees. ValueError otherwise."""
    pos = np.ascontiguousarray(pos, dtype=np.int64)
    if pos.shape != (B,):
        raise ValueError(f"positions have shape {pos.shape}, expected ({B},)")
    if B and (pos.min() < 0 or pos.max() >= T):
        raise ValueError(f"positions must lie in 0..{T - 1}, got {pos.min()}..{pos.max()}")
    return pos


def attention_forward(qkv, n_head, causal=True):
    """Multi-head self-attention core: q, k, v = split(qkv, 3) (in that order); per head

        a = q k^T / sqrt(D)      the attention scores
        a = a + mask             -inf above the diagonal (a query sees its own and earlier keys)
        att = softmax(a)         row by row
        out = att v

    causal=False: no mask, every query sees every key (padding included).

    qkv [B,T,3C] -> out [B,T,C]"""
    B, T, C3 = qkv.shape
    C = C3 // 3
    q, k, v = (split_heads(a, n_head) for a in np.split(qkv, 3, axis=-1))   # [B,H,T,D] each
    scale = 1.0 / np.sqrt(C // n_head)
    a = (q @ k.transpose(0, 1, 3, 2)) * scale                # [B,H,T,T]
    if causal:
        future = np.triu(np.ones((T, T), dtype=bool), k=1)   # [T,T] True above the diagonal
        a = np.where(future, -np.inf, a)
    a = a - a.max(axis=-1, keepdims=True)                    # softmax is shift-invariant: no overflow
    e = np.exp(a)
    att = (e / e.sum(axis=-1, keepdims=True)).astype(qkv.dtype)   # [B,H,T,T]
    out = merge_heads(att @ v)                               # [B,T,C]
    return out, AttentionSaved(qkv, att, n_head, causal)


def attention_backward(dout, saved: AttentionSaved):
    """Back through out = att v, att = softmax(a), a = q k^T / sqrt(D):

        datt = dout v^T,   dv = att^T dout
        da = att * (datt - sum_row(datt * att))          (softmax, row by row)
        dq = da k / sqrt(D),   dk = da^T q / sqrt(D)

    The mask needs no case of its own: masked entries of att are 0, so their da is 0 too.

    dout [B,T,C] -> dqkv [B,T,3C]"""
    qkv, att, n_head, _ = saved
    C = qkv.shape[2] // 3
    q, k, v = (split_heads(a, n_head) for a in np.split(qkv, 3, axis=-1))   # [B,H,T,D]
    scale = 1.0 / np.sqrt(C // n_head)
    do = split_heads(dout, n_head)                           # [B,H,T,D]
    datt = do @ v.transpose(0, 1, 3, 2)                      # [B,H,T,T]
    dv = att.transpose(0, 1, 3, 2) @ do                      # [B,H,T,D]
    da = att * (datt - (datt * att).sum(axis=-1, keepdims=True))   # [B,H,T,T]
    dq = (da @ k) * scale                                    # [B,H,T,D]
    dk = (da.transpose(0, 1, 3, 2) @ q) * scale              # [B,H,T,D]
    dqkv = np.concatenate([merge_heads(dq), merge_heads(dk), merge_heads(dv)], axis=-1)   # [B,T,3C]
    return dqkv.astype(qkv.dtype)


# ----------------------------------------------------------------------------- loss

class CrossEntropySaved(NamedTuple):
    probs: np.ndarray          # [B,K] softmax(logits)
    targets: np.ndarray        # [B] class ids
    share: np.ndarray | None   # [B] each row's weight over the batch's total (None: 1/B each)


def cross_entropy_forward(logits, targets, class_weights=None):
    """Mean cross-entropy of softmax(logits) against integer targets:
    loss = mean_b -log softmax(z_b)[y_b], computed as z - max z - log sum exp(z - max z).
    Subtracting the row's max changes no probability (softmax is shift-invariant) and keeps exp
    from overflowing; it needs no backward of its own for that reason: the max cancels out of
    the result, so the loss does not depend on it.

    class_weights [K]: the weighted mean, as torch.nn.functional.cross_entropy(weight=) defines it,
    loss = sum_b w[y_b] (-log p_b[y_b]) / sum_b w[y_b]: each row counts by its class's weight,
    and the weights of the batch's rows are normalised to sum to 1 (so a batch of one class has the
    plain mean whatever its weight).

    logits [B,K], targets [B] -> loss (a float)"""
    z = logits - logits.max(axis=-1, keepdims=True)          # [B,K]
    logsumexp = np.log(np.exp(z).sum(axis=-1, keepdims=True))   # [B,1]
    logp = z - logsumexp                                     # [B,K] log-probabilities
    B = logits.shape[0]
    nll = -logp[np.arange(B), targets]                       # [B]
    if class_weights is None:
        return float(nll.mean()), CrossEntropySaved(np.exp(logp), targets, None)
    w = np.asarray(class_weights, np.float64)[targets]       # [B] each row's class weight
    share = w / w.sum()                                      # [B], sums to 1
    return float((share * nll).sum()), CrossEntropySaved(np.exp(logp), targets, share)


def cross_entropy_backward(dloss, saved: CrossEntropySaved):
    """dlogits = (softmax(logits) - onehot(targets)) * share * dloss, where share is 1/B for the
    plain mean and w[y_b] / sum_c w[y_c] with class weights: the loss is sum_b share_b l_b with
    l_b = -log p_b[y_b], the shares are constants (they depend on the targets alone), and
    dl_b/dz_b = p_b - onehot(y_b), as for the plain mean.

    -> dlogits [B,K]"""
    probs, targets, share = saved
    B = probs.shape[0]
    dlogits = probs.copy()                                   # [B,K]
    dlogits[np.arange(B), targets] -= 1
    if share is None:
        return dlogits * probs.dtype.type(dloss / B)
    return dlogits * (share * dloss).astype(probs.dtype)[:, None]


def softmax(z) -> np.ndarray:
    """Row-wise softmax in float64: exp(z - max z) / sum(exp(z - max z)). z [N,K] -> [N,K]"""
    z = np.asarray(z, dtype=np.float64)
    e = np.exp(z - z.max(axis=1, keepdims=True))             # [N,K]
    return e / e.sum(axis=1, keepdims=True)
