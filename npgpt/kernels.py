"""Hot loops: LayerNorm and the causal attention core.

Each kernel has a plain-NumPy twin (suffix `_np`) that states the math in a few vectorised lines;
the Numba versions (no suffix) compute the same numbers with loops compiled by Numba, parallel
over rows or over (batch, head). The tests compare every kernel with its twin.

Shapes: N rows, C channels, B batch, T time, H heads, D = C/H head size.
"""
from __future__ import annotations

import numpy as np


# ----------------------------------------------------------------------------- LayerNorm (NumPy)

def layernorm_forward_np(x, g, b, eps=1e-5):
    """y = (x - mean) * rstd * g + b, rstd = 1/sqrt(var + eps), biased variance, per row.

    x [N,C], g [C], b [C] -> y [N,C], mean [N], rstd [N]"""
    mean = x.mean(axis=-1)                                   # [N]
    xc = x - mean[:, None]                                   # [N,C]
    var = (xc * xc).mean(axis=-1)                            # [N]
    rstd = (1.0 / np.sqrt(var + eps)).astype(x.dtype)        # [N]
    y = xc * rstd[:, None] * g + b                           # [N,C]
    return y, mean, rstd


def layernorm_backward_np(dy, x, mean, rstd, g):
    """With xhat = (x - mean) * rstd and dxhat = dy * g:
    dx = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat)),
    dg = sum_rows(dy * xhat), db = sum_rows(dy).

    dy [N,C], x [N,C], mean [N], rstd [N], g [C] -> dx [N,C], dg [C], db [C]"""
    xhat = (x - mean[:, None]) * rstd[:, None]               # [N,C]
    dxhat = dy * g                                           # [N,C]
    dx = rstd[:, None] * (dxhat
                          - dxhat.mean(axis=-1, keepdims=True)
                          - xhat * (dxhat * xhat).mean(axis=-1, keepdims=True))   # [N,C]
    dg = (dy * xhat).sum(axis=0)                             # [C]
    db = dy.sum(axis=0)                                      # [C]
    return dx, dg, db


# ----------------------------------------------------------------------------- attention (NumPy)

def _split_heads(x, n_head):
    B, T, C = x.shape
    return x.reshape(B, T, n_head, C // n_head).transpose(0, 2, 1, 3)      # [B,H,T,D]


def _merge_heads(x):
    B, H, T, D = x.shape
    return x.transpose(0, 2, 1, 3).reshape(B, T, H * D)                    # [B,T,C]


def attention_forward_np(qkv, n_head):
    """Causal multi-head attention core.

    q, k, v = split(qkv, 3) (in that order); per head:
    att = softmax(q k^T / sqrt(D) + causal mask); out = att v.

    qkv [B,T,3C] -> out [B,T,C], att [B,H,T,T] (softmax probabilities, zero above the diagonal)"""
    B, T, C3 = qkv.shape
    C = C3 // 3
    q, k, v = (_split_heads(a, n_head) for a in np.split(qkv, 3, axis=-1))  # [B,H,T,D] each
    scale = 1.0 / np.sqrt(C // n_head)
    scores = (q @ k.transpose(0, 1, 3, 2)) * scale                          # [B,H,T,T]
    mask = np.triu(np.ones((T, T), dtype=bool), k=1)                        # [T,T] True above diagonal
    scores = np.where(mask, -np.inf, scores)
    scores = scores - scores.max(axis=-1, keepdims=True)
    e = np.exp(scores)
    att = (e / e.sum(axis=-1, keepdims=True)).astype(qkv.dtype)             # [B,H,T,T]
    out = _merge_heads(att @ v)                                             # [B,T,C]
    return out, att


def attention_backward_np(dout, qkv, att, n_head):
    """Backward of `attention_forward_np`, from the saved qkv and softmax probabilities att.

    datt = dout v^T; dv = att^T dout; dscores = att * (datt - sum(datt * att)) (softmax);
    dq = dscores k / sqrt(D); dk = dscores^T q / sqrt(D).

    dout [B,T,C], qkv [B,T,3C], att [B,H,T,T] -> dqkv [B,T,3C]"""
    B, T, C3 = qkv.shape
    C = C3 // 3
    q, k, v = (_split_heads(a, n_head) for a in np.split(qkv, 3, axis=-1))  # [B,H,T,D]
    scale = 1.0 / np.sqrt(C // n_head)
    do = _split_heads(dout, n_head)                                         # [B,H,T,D]
    datt = do @ v.transpose(0, 1, 3, 2)                                     # [B,H,T,T]
    dv = att.transpose(0, 1, 3, 2) @ do                                     # [B,H,T,D]
    dscores = att * (datt - (datt * att).sum(axis=-1, keepdims=True))       # [B,H,T,T]
    dq = (dscores @ k) * scale                                              # [B,H,T,D]
    dk = (dscores.transpose(0, 1, 3, 2) @ q) * scale                        # [B,H,T,D]
    return np.concatenate([_merge_heads(dq), _merge_heads(dk), _merge_heads(dv)], axis=-1)


def attention_query_forward_np(q, kv, pos, n_head):
    """Attention for one query per sequence: the query at position pos[b] attends to keys 0..pos[b].

    This is what the classifier needs in the last block: it reads one position per sequence.

    q [B,C], kv [B,T,2C] (keys then values), pos [B] -> out [B,C], att [B,H,T] (zero past pos)"""
    B, T, C2 = kv.shape
    C = C2 // 2
    D = C // n_head
    qh = q.reshape(B, n_head, 1, D)                                         # [B,H,1,D]
    k, v = (_split_heads(a, n_head) for a in np.split(kv, 2, axis=-1))      # [B,H,T,D]
    scores = (qh @ k.transpose(0, 1, 3, 2))[:, :, 0, :] / np.sqrt(D)        # [B,H,T]
    mask = np.arange(T)[None, :] > np.asarray(pos)[:, None]                 # [B,T]
    scores = np.where(mask[:, None, :], -np.inf, scores)
    scores = scores - scores.max(axis=-1, keepdims=True)
    e = np.exp(scores)
    att = (e / e.sum(axis=-1, keepdims=True)).astype(q.dtype)               # [B,H,T]
    out = (att[:, :, None, :] @ v)[:, :, 0, :].reshape(B, C)                # [B,C]
    return out, att


def attention_query_backward_np(dout, q, kv, att, pos, n_head):
    """Backward of `attention_query_forward_np` (same formulas as the full core, one query row).

    dout [B,C], q [B,C], kv [B,T,2C], att [B,H,T], pos [B] -> dq [B,C], dkv [B,T,2C]"""
    B, T, C2 = kv.shape
    C = C2 // 2
    D = C // n_head
    scale = 1.0 / np.sqrt(D)
    qh = q.reshape(B, n_head, D)                                            # [B,H,D]
    do = dout.reshape(B, n_head, D)                                         # [B,H,D]
    k, v = (_split_heads(a, n_head) for a in np.split(kv, 2, axis=-1))      # [B,H,T,D]
    datt = np.einsum("bhd,bhtd->bht", do, v)                                # [B,H,T]
    dv = att[..., None] * do[:, :, None, :]                                 # [B,H,T,D]
    dscores = att * (datt - (datt * att).sum(axis=-1, keepdims=True))       # [B,H,T]
    dq = np.einsum("bht,bhtd->bhd", dscores, k) * scale                     # [B,H,D]
    dk = dscores[..., None] * qh[:, :, None, :] * scale                     # [B,H,T,D]
    dkv = np.concatenate([_merge_heads(dk), _merge_heads(dv)], axis=-1)     # [B,T,2C]
    return dq.reshape(B, C).astype(q.dtype), dkv.astype(q.dtype)


# ----------------------------------------------------------------------------- dispatch
# Until the Numba kernels below are in place, the public names are the NumPy twins.
layernorm_forward = layernorm_forward_np
layernorm_backward = layernorm_backward_np
attention_forward = attention_forward_np
attention_backward = attention_backward_np
attention_query_forward = attention_query_forward_np
attention_query_backward = attention_query_backward_np
