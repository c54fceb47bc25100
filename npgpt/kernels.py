"""Numba kernels: the loops NumPy runs badly, compiled, for the operations of `npgpt.ops` and
`npgpt.fastops`.

Each kernel computes the numbers of a NumPy function that states its math (named in its
docstring: `ops.layernorm_forward`, `fastops.attention_query_forward_np`, ...); the tests compare
every kernel with that function. Nothing calls these directly but `npgpt.fastops`, which chooses
between a kernel and its NumPy statement (NPGPT_NUMBA=0: always NumPy).

    layernorm_forward(x, g, b, eps) -> y, mean, rstd          layernorm_backward(dy, x, mean, rstd, g) -> dx, dg, db
    gelu_forward(x) -> y                                      gelu_backward(dy, x) -> dx            (float32)
    attention_forward(qkv, n_head, causal) -> out, att        attention_backward(dout, qkv, att, n_head, causal) -> dqkv
    attention_packed_forward(qkv, starts, n_head, causal)     attention_tree_forward(qkv, path, pstarts, first_new, n_head)
    attention_query_forward(q, kv, pos, n_head) -> out, att   attention_query_backward(dout, q, kv, att, pos, n_head) -> dq, dkv
    adamw_update(p, g, m, v, t, lr, beta1, beta2, eps, wd)    (in place)
    ln_linear_grads(M, dc, w, g, b) -> dw, dg, db             all_finite(x) -> bool

Parallel over rows (LayerNorm), elements (GELU, AdamW) or (sequence, head) pairs (attention).

Dtypes: float32 by default, float64 works too; outputs take the inputs' dtype. LayerNorm's kernels
accumulate means and variances in float64 whatever the input dtype (a variance is a difference of
nearly equal sums). The attention kernels compute in the input dtype: in float32 the compiler
works on 16 values per vector instead of 8, and their sums are short. GELU's kernels are float32
only (their tanh is a float32 approximation). The kernels read contiguous arrays; the wrappers
copy non-contiguous views (such as slices of qkv) first, and check every shape (compiled loops do
not check bounds).

Compilation: each kernel is compiled on its first call for each dtype and cached on disk
(`cache=True`), next to this file in `__pycache__`, or, when the package directory is read-only,
in Numba's user-wide cache (`~/.cache/numba`, or `NUMBA_CACHE_DIR` when that is set).
(Numba's default thread pool is not meant to be entered from several Python threads at once:
call the kernels from one thread.)

Shapes: N rows, C channels, B batch, T time, H heads, D = C/H head size.
"""
from __future__ import annotations

import os

import numpy as np
from numba import njit, prange

from . import runtime

# Before Numba starts its thread pool (the first parallel kernel), and whenever NumPy was imported:
# the two thread pools sleep when idle instead of spinning on the cores the other one needs.
runtime.prepare()

from .ops import GELU_A, GELU_K, check_positions


# ----------------------------------------------------------------------------- Numba helpers
# Every fast-math flag except nnan and ninf: a NaN or inf in the inputs must come out as NaN/inf,
# so that a diverging training run is noticed. (The kernels never form -inf themselves: they loop
# only over the keys a query may see instead of masking with -inf.)
_FASTMATH = {"reassoc", "contract", "arcp", "nsz", "afn"}
_JIT = dict(parallel=True, fastmath=_FASTMATH, cache=True)


def _float_dtype(*arrays):
    """The dtype the outputs take: that of the inputs (float32 stays float32), ints become float64."""
    return np.result_type(*arrays, np.float32)


def _c(a, dtype):
    """a as a C-contiguous array of dtype (no copy when it already is one)."""
    return np.ascontiguousarray(a, dtype=dtype)


def _check_shapes(name, **shapes):
    """The compiled loops do not check bounds: compare every array's shape with the expected one
    (given as `argname=(array, expected_shape)`) before calling them."""
    for arg, (a, want) in shapes.items():
        if a.shape != tuple(want):
            raise ValueError(f"{name}: {arg} has shape {a.shape}, expected {tuple(want)}")


def contiguous_float(*arrays) -> bool:
    """Whether every array is C-contiguous and of the first one's float dtype (what the flat
    kernels read)."""
    first = arrays[0]
    return first.dtype.kind == "f" and all(a.flags.c_contiguous and a.dtype == first.dtype for a in arrays)


def _head_dim(name, C, n_head):
    if n_head < 1 or C % n_head:
        raise ValueError(f"{name}: {C} channels do not split into {n_head} heads")
    return C // n_head


# ----------------------------------------------------------------------------- LayerNorm (Numba)

@njit(**_JIT)
def _layernorm_forward_kernel(x, g, b, eps, y, mean, rstd):
    N, C = x.shape
    for n in prange(N):                                      # rows are independent
        s = 0.0                                              # float64 accumulators
        for c in range(C):
            s += x[n, c]
        m = s / C
        v = 0.0
        for c in range(C):
            d = x[n, c] - m
            v += d * d
        r = 1.0 / np.sqrt(v / C + eps)
        for c in range(C):
            y[n, c] = (x[n, c] - m) * r * g[c] + b[c]
        mean[n] = m
        rstd[n] = r


def layernorm_forward(x, g, b, eps=1e-5):
    """ops.layernorm_forward's numbers. x [N,C], g [C], b [C] -> y [N,C], mean [N], rstd [N]"""
    dt = _float_dtype(x, g, b)
    x, g, b = _c(x, dt), _c(g, dt), _c(b, dt)
    N, C = x.shape
    _check_shapes("layernorm_forward", g=(g, (C,)), b=(b, (C,)))
    y = np.empty((N, C), dt)                                 # [N,C]
    mean = np.empty(N, dt)                                   # [N]
    rstd = np.empty(N, dt)                                   # [N]
    _layernorm_forward_kernel(x, g, b, float(eps), y, mean, rstd)
    return y, mean, rstd


# dg and db sum over rows, so threads working on different rows must not add into the same
# vector. Each block of _LN_ROWS rows gets its own partial sums; the few partials are summed after.
# The block size is fixed, so the result does not depend on the number of threads. (This fused
# kernel measured faster than computing dx alone in parallel and dg, db with NumPy sums or BLAS
# products over the rows, at N = 8*120, C = 768.)
_LN_ROWS = 32


@njit(**_JIT)
def _layernorm_backward_kernel(dy, x, mean, rstd, g, rows, dx, dg_part, db_part):
    N, C = x.shape
    for k in prange(dg_part.shape[0]):                       # blocks of rows
        for n in range(k * rows, min(N, (k + 1) * rows)):
            m = np.float64(mean[n])
            r = np.float64(rstd[n])
            s1 = 0.0                                         # sum(dxhat)
            s2 = 0.0                                         # sum(dxhat * xhat)
            for c in range(C):
                xh = (x[n, c] - m) * r
                dxh = dy[n, c] * g[c]
                s1 += dxh
                s2 += dxh * xh
                dg_part[k, c] += dy[n, c] * xh
                db_part[k, c] += dy[n, c]
            s1 /= C
            s2 /= C
            for c in range(C):
                xh = (x[n, c] - m) * r
                dx[n, c] = r * (dy[n, c] * g[c] - s1 - xh * s2)


def layernorm_backward(dy, x, mean, rstd, g):
    """ops.layernorm_backward's numbers.

    dy [N,C], x [N,C], mean [N], rstd [N], g [C] -> dx [N,C], dg [C], db [C]"""
    dt = _float_dtype(dy, x, mean, rstd, g)
    dy, x, mean, rstd, g = (_c(a, dt) for a in (dy, x, mean, rstd, g))
    N, C = x.shape
    _check_shapes("layernorm_backward", dy=(dy, (N, C)), mean=(mean, (N,)), rstd=(rstd, (N,)),
                  g=(g, (C,)))
    blocks = max(1, -(-N // _LN_ROWS))
    dx = np.empty((N, C), dt)                                # [N,C]
    dg_part = np.zeros((blocks, C))                          # [blocks,C] float64
    db_part = np.zeros((blocks, C))                          # [blocks,C] float64
    _layernorm_backward_kernel(dy, x, mean, rstd, g, _LN_ROWS, dx, dg_part, db_part)
    return dx, dg_part.sum(axis=0).astype(dt), db_part.sum(axis=0).astype(dt)


# ----------------------------------------------------------------------------- attention (Numba)
# One (batch, head) pair per iteration of the parallel loop. The pair's q, k, v are first copied
# out of qkv into contiguous [T,D] arrays: the compiler vectorises a loop along a contiguous row
# of a 2-D array, but not the same loop over a slice of the 3-D qkv. Then three kinds of causal
# (triangular) matrix product, each with its innermost loop along contiguous memory. Only the
# entries a query may see (keys 0..t) are computed: no -inf mask, no wasted upper triangle.
#
# Arithmetic stays in the input dtype: in float32, 16 lanes of a 512-bit vector instead of 8.
# The sums are short (D = 64 products in a dot, at most T terms in a softmax normaliser), so the
# float32 rounding stays near 1e-7 relative, far below what the tests allow (1e-5).
# Accumulators start from `x.dtype.type(0)`, a constant of the input dtype: starting from a
# float64 literal, or from a value read from an array, stops the compiler from vectorising the sum.

@njit(fastmath=_FASTMATH, cache=True)
def _head(x, b, start, D):
    """x[b, :, start:start+D] as a contiguous copy [T,D]."""
    T = x.shape[1]
    out = np.empty((T, D), x.dtype)                          # [T,D]
    for t in range(T):
        for d in range(D):
            out[t, d] = x[b, t, start + d]
    return out


@njit(fastmath=_FASTMATH, cache=True)
def _causal_dots(x, y, scale, r, causal=True):
    """r[i,j] = scale * (x[i] . y[j]) for j <= i; r above the diagonal is left as it was
    (causal=False: for every j). x [T,D], y [T,D], r [T,T]"""
    T, D = x.shape
    zero = x.dtype.type(0)
    for i in range(T):
        for j in range(i + 1 if causal else T):
            acc = zero
            for d in range(D):                               # a dot product along two rows
                acc += x[i, d] * y[j, d]
            r[i, j] = acc * scale


@njit(fastmath=_FASTMATH, cache=True)
def _lower_matmul(L, y, causal=True):
    """r = L y for lower-triangular L: r[i] = sum_{j<=i} L[i,j] y[j] (causal=False: a full L).
    L [T,T], y [T,D] -> r [T,D]"""
    T, D = y.shape
    r = np.zeros((T, D), y.dtype)                            # [T,D]
    for i in range(T):
        for j in range(i + 1 if causal else T):
            a = L[i, j]
            for d in range(D):                               # along rows of r and y
                r[i, d] += a * y[j, d]
    return r


@njit(fastmath=_FASTMATH, cache=True)
def _lower_t_matmul(L, y, causal=True):
    """r = L^T y for lower-triangular L: r[j] = sum_{i>=j} L[i,j] y[i] (causal=False: a full L).
    L [T,T], y [T,D] -> r [T,D]"""
    T, D = y.shape
    r = np.zeros((T, D), y.dtype)                            # [T,D]
    for i in range(T):
        for j in range(i + 1 if causal else T):
            a = L[i, j]
            for d in range(D):                               # along rows of r and y
                r[j, d] += a * y[i, d]
    return r


@njit(fastmath=_FASTMATH, cache=True)
def _causal_softmax_rows(p, causal=True):
    """Row t of p [T,T] becomes softmax(p[t, 0..t]), and zero past t, in place
    (causal=False: softmax over the whole row)."""
    T = p.shape[0]
    zero, one = p.dtype.type(0), p.dtype.type(1)
    for t in range(T):
        n = t + 1 if causal else T                           # keys 0..n-1 are visible
        mx = p[t, 0]
        for s in range(1, n):
            mx = max(mx, p[t, s])
        z = zero
        for s in range(n):
            e = np.exp(p[t, s] - mx)
            p[t, s] = e
            z += e
        rz = one / z
        for s in range(n):
            p[t, s] *= rz
        for s in range(n, T):
            p[t, s] = zero


@njit(fastmath=_FASTMATH, cache=True)
def _head_attention(x, b, h, C, D, scale, p, causal=True):
    """One head's causal attention over sequence b of x [B,T,3C]: copies its q, k, v out of x,
    fills p [T,T] with the probabilities (scores q k^T / sqrt(D), keys 0..t, then softmax) and
    returns att v [T,D]. causal=False: every key, no mask."""
    q = _head(x, b, h * D, D)                                # [T,D]
    k = _head(x, b, C + h * D, D)                            # [T,D]
    v = _head(x, b, 2 * C + h * D, D)                        # [T,D]
    _causal_dots(q, k, scale, p, causal)
    _causal_softmax_rows(p, causal)
    return _lower_matmul(p, v, causal)                       # [T,D]


@njit(**_JIT)
def _attention_forward_kernel(qkv, n_head, causal, out, att):
    B, T, C3 = qkv.shape
    C = C3 // 3
    D = C // n_head
    scale = qkv.dtype.type(1.0 / np.sqrt(D))
    for bh in prange(B * n_head):                            # (batch, head) pairs are independent
        b = bh // n_head
        h = bh % n_head
        o = _head_attention(qkv, b, h, C, D, scale, att[b, h], causal)  # [T,D]; att[b,h] filled in place
        for t in range(T):
            for d in range(D):
                out[b, t, h * D + d] = o[t, d]


def attention_forward(qkv, n_head, causal=True):
    """ops.attention_forward's numbers. qkv [B,T,3C] -> out [B,T,C], att [B,H,T,T]"""
    dt = _float_dtype(qkv)
    qkv = _c(qkv, dt)
    B, T, C3 = qkv.shape
    _head_dim("attention_forward", C3 // 3, n_head)
    _check_shapes("attention_forward", qkv=(qkv, (B, T, C3 // 3 * 3)))
    out = np.empty((B, T, C3 // 3), dt)                      # [B,T,C]
    att = np.empty((B, n_head, T, T), dt)                    # [B,H,T,T]
    _attention_forward_kernel(qkv, n_head, bool(causal), out, att)
    return out, att


@njit(**_JIT)
def _attention_packed_forward_kernel(qkv, starts, n_head, causal, out):
    N, C3 = qkv.shape
    C = C3 // 3
    D = C // n_head
    S = starts.shape[0] - 1
    scale = qkv.dtype.type(1.0 / np.sqrt(D))
    for sh in prange(S * n_head):                            # (sequence, head) pairs are independent
        s = sh // n_head
        h = sh % n_head
        seq = qkv[starts[s]:starts[s + 1]][None]             # [1,T,3C], a view
        T = seq.shape[1]
        p = np.empty((T, T), qkv.dtype)                      # [T,T] scratch: not kept
        o = _head_attention(seq, 0, h, C, D, scale, p, causal)  # [T,D]
        for t in range(T):
            for d in range(D):
                out[starts[s] + t, h * D + d] = o[t, d]


def attention_packed_forward(qkv, starts, n_head, causal=True):
    """fastops.attention_packed_forward_np's numbers. qkv [N,3C], starts [S+1] -> out [N,C]"""
    dt = _float_dtype(qkv)
    qkv = _c(qkv, dt)
    N, C3 = qkv.shape
    _head_dim("attention_packed_forward", C3 // 3, n_head)
    starts = np.ascontiguousarray(starts, dtype=np.int64)
    if starts.ndim != 1 or len(starts) < 2 or starts[0] != 0 or starts[-1] != N or np.any(np.diff(starts) < 1):
        raise ValueError(f"attention_packed_forward: starts must rise from 0 to {N} (rows), got {starts}")
    out = np.empty((N, C3 // 3), dt)                         # [N,C]
    _attention_packed_forward_kernel(qkv, starts, n_head, bool(causal), out)
    return out


@njit(fastmath=_FASTMATH, cache=True)
def _head_rows(x, rows, start, D):
    """x[rows, start:start+D] as a contiguous copy [T,D] (rows [T] of a packed x [N,3C])."""
    T = rows.shape[0]
    out = np.empty((T, D), x.dtype)                          # [T,D]
    for t in range(T):
        r = rows[t]
        for d in range(D):
            out[t, d] = x[r, start + d]
    return out


@njit(**_JIT)
def _attention_tree_forward_kernel(qkv, path, pstarts, first_new, n_head, out):
    N, C3 = qkv.shape
    C = C3 // 3
    D = C // n_head
    S = pstarts.shape[0] - 1
    scale = qkv.dtype.type(1.0 / np.sqrt(D))
    for sh in prange(S * n_head):                            # (sequence, head) pairs write disjoint rows
        s = sh // n_head
        h = sh % n_head
        rows = path[pstarts[s]:pstarts[s + 1]]               # [T] the sequence's rows, shared ones first
        T = rows.shape[0]
        q = _head_rows(qkv, rows, h * D, D)                  # [T,D]
        k = _head_rows(qkv, rows, C + h * D, D)              # [T,D]
        v = _head_rows(qkv, rows, 2 * C + h * D, D)          # [T,D]
        p = np.empty((T, T), qkv.dtype)                      # [T,T] scratch
        _causal_dots(q, k, scale, p, True)
        _causal_softmax_rows(p, True)
        o = _lower_matmul(p, v, True)                        # [T,D]
        for t in range(first_new[s], T):                     # the rows this sequence owns
            for d in range(D):
                out[rows[t], h * D + d] = o[t, d]


def attention_tree_forward(qkv, path, pstarts, first_new, n_head):
    """fastops.attention_tree_forward_np's numbers. qkv [N,3C], path [P], pstarts [S+1], first_new [S]
    -> out [N,C]. Every row must be new to exactly one sequence (it is then written once)."""
    dt = _float_dtype(qkv)
    qkv = _c(qkv, dt)
    N, C3 = qkv.shape
    _head_dim("attention_tree_forward", C3 // 3, n_head)
    path = np.ascontiguousarray(path, dtype=np.int64)
    pstarts = np.ascontiguousarray(pstarts, dtype=np.int64)
    first_new = np.ascontiguousarray(first_new, dtype=np.int64)
    S = len(pstarts) - 1
    lengths = np.diff(pstarts)
    if (S < 1 or pstarts[0] != 0 or pstarts[-1] != len(path) or np.any(lengths < 1)
            or first_new.shape != (S,) or np.any(first_new < 0) or np.any(first_new >= lengths)
            or (len(path) and (path.min() < 0 or path.max() >= N))):
        raise ValueError("attention_tree_forward: path, pstarts and first_new do not describe sequences of rows")
    owned = np.concatenate([path[a + f:b] for a, b, f in zip(pstarts[:-1], pstarts[1:], first_new)])
    if len(owned) != N or np.any(np.bincount(owned, minlength=N) != 1):
        raise ValueError("attention_tree_forward: every row must be new to exactly one sequence")
    out = np.empty((N, C3 // 3), dt)                         # [N,C]
    _attention_tree_forward_kernel(qkv, path, pstarts, first_new, n_head, out)
    return out


@njit(**_JIT)
def _attention_backward_kernel(dout, qkv, att, n_head, causal, dqkv):
    B, T, C3 = qkv.shape
    C = C3 // 3
    D = C // n_head
    scale = qkv.dtype.type(1.0 / np.sqrt(D))
    one = qkv.dtype.type(1)
    for bh in prange(B * n_head):                            # each pair writes its own columns
        b = bh // n_head
        h = bh % n_head
        q = _head(qkv, b, h * D, D)                          # [T,D]
        k = _head(qkv, b, C + h * D, D)                      # [T,D]
        v = _head(qkv, b, 2 * C + h * D, D)                  # [T,D]
        do = _head(dout, b, h * D, D)                        # [T,D]
        p = att[b, h]                                        # [T,T]
        ds = np.empty((T, T), qkv.dtype)                     # [T,T]
        _causal_dots(do, v, one, ds, causal)                 # datt = do v^T, keys 0..t
        for t in range(T):                                   # softmax backward, row by row,
            n = t + 1 if causal else T                       # with the 1/sqrt(D) folded in
            w = qkv.dtype.type(0)
            for s in range(n):
                w += ds[t, s] * p[t, s]
            for s in range(n):
                ds[t, s] = p[t, s] * (ds[t, s] - w) * scale
        dq = _lower_matmul(ds, k, causal)                    # [T,D] dscores k
        dk = _lower_t_matmul(ds, q, causal)                  # [T,D] dscores^T q
        dv = _lower_t_matmul(p, do, causal)                  # [T,D] att^T dout
        for t in range(T):
            for d in range(D):
                dqkv[b, t, h * D + d] = dq[t, d]
                dqkv[b, t, C + h * D + d] = dk[t, d]
                dqkv[b, t, 2 * C + h * D + d] = dv[t, d]


def attention_backward(dout, qkv, att, n_head, causal=True):
    """ops.attention_backward's numbers.

    dout [B,T,C], qkv [B,T,3C], att [B,H,T,T] -> dqkv [B,T,3C]"""
    dt = _float_dtype(dout, qkv, att)
    dout, qkv, att = _c(dout, dt), _c(qkv, dt), _c(att, dt)
    B, T, C3 = qkv.shape
    _head_dim("attention_backward", C3 // 3, n_head)
    _check_shapes("attention_backward", qkv=(qkv, (B, T, C3 // 3 * 3)),
                  dout=(dout, (B, T, C3 // 3)), att=(att, (B, n_head, T, T)))
    dqkv = np.empty(qkv.shape, dt)                           # [B,T,3C]
    _attention_backward_kernel(dout, qkv, att, n_head, bool(causal), dqkv)
    return dqkv


@njit(**_JIT)
def _attention_query_forward_kernel(q, kv, pos, n_head, out, att):
    B, T, C2 = kv.shape
    C = C2 // 2
    D = C // n_head
    scale = 1.0 / np.sqrt(D)
    for bh in prange(B * n_head):
        b = bh // n_head
        h = bh % n_head
        P = pos[b]                                           # keys 0..P are visible
        ko = h * D                                           # k of head h: kv[b, :, ko:ko+D]
        vo = C + h * D                                       # v of head h: kv[b, :, vo:vo+D]
        p = np.zeros(P + 1)                                  # [P+1] scores, float64
        for s in range(P + 1):
            for d in range(D):
                p[s] += q[b, ko + d] * kv[b, s, ko + d]
        mx = p[0]
        for s in range(1, P + 1):
            mx = max(mx, p[s])
        z = 0.0
        for s in range(P + 1):
            p[s] = np.exp((p[s] - mx) * scale)
            z += p[s]
        o = np.zeros(D)                                      # [D] att v
        for s in range(P + 1):
            p[s] /= z
            att[b, h, s] = p[s]
            for d in range(D):
                o[d] += p[s] * kv[b, s, vo + d]
        for s in range(P + 1, T):
            att[b, h, s] = 0.0
        for d in range(D):
            out[b, h * D + d] = o[d]


def attention_query_forward(q, kv, pos, n_head):
    """fastops.attention_query_forward_np's numbers.

    q [B,C], kv [B,T,2C], pos [B] -> out [B,C], att [B,H,T] (zero past pos)"""
    dt = _float_dtype(q, kv)
    q, kv = _c(q, dt), _c(kv, dt)
    B, T, C2 = kv.shape
    _head_dim("attention_query_forward", C2 // 2, n_head)
    _check_shapes("attention_query_forward", kv=(kv, (B, T, C2 // 2 * 2)), q=(q, (B, C2 // 2)))
    pos = check_positions(pos, B, T)
    out = np.empty((B, C2 // 2), dt)                         # [B,C]
    att = np.empty((B, n_head, T), dt)                       # [B,H,T]
    _attention_query_forward_kernel(q, kv, pos, n_head, out, att)
    return out, att


@njit(**_JIT)
def _attention_query_backward_kernel(dout, q, kv, att, pos, n_head, dq, dkv):
    B, T, C2 = kv.shape
    C = C2 // 2
    D = C // n_head
    scale = 1.0 / np.sqrt(D)
    for bh in prange(B * n_head):
        b = bh // n_head
        h = bh % n_head
        P = pos[b]
        ko = h * D                                           # k of head h: kv[b, :, ko:ko+D]
        vo = C + h * D                                       # v of head h: kv[b, :, vo:vo+D]
        ds = np.zeros(P + 1)                                 # [P+1] datt = dout . v[s]
        for s in range(P + 1):
            for d in range(D):
                ds[s] += dout[b, ko + d] * kv[b, s, vo + d]
        w = 0.0                                              # sum_s datt[s] att[s]
        for s in range(P + 1):
            w += ds[s] * att[b, h, s]
        for s in range(P + 1):                               # softmax backward, 1/sqrt(D) folded in
            ds[s] = att[b, h, s] * (ds[s] - w) * scale
        g = np.zeros(D)                                      # [D] dq = dscores k
        for s in range(P + 1):
            for d in range(D):
                g[d] += ds[s] * kv[b, s, ko + d]
        for d in range(D):
            dq[b, ko + d] = g[d]
        for s in range(P + 1):                               # rows past P stay zero
            for d in range(D):
                dkv[b, s, ko + d] = ds[s] * q[b, ko + d]                # dk = dscores q
                dkv[b, s, vo + d] = att[b, h, s] * dout[b, ko + d]      # dv = att dout


def attention_query_backward(dout, q, kv, att, pos, n_head):
    """fastops.attention_query_backward_np's numbers.

    dout [B,C], q [B,C], kv [B,T,2C], att [B,H,T], pos [B] -> dq [B,C], dkv [B,T,2C]"""
    dt = _float_dtype(dout, q, kv, att)
    dout, q, kv, att = _c(dout, dt), _c(q, dt), _c(kv, dt), _c(att, dt)
    B, T, C2 = kv.shape
    _head_dim("attention_query_backward", C2 // 2, n_head)
    _check_shapes("attention_query_backward", kv=(kv, (B, T, C2 // 2 * 2)), q=(q, (B, C2 // 2)),
                  dout=(dout, (B, C2 // 2)), att=(att, (B, n_head, T)))
    pos = check_positions(pos, B, T)
    dq = np.empty((B, C2 // 2), dt)                          # [B,C]
    dkv = np.zeros((B, T, C2), dt)                           # [B,T,2C]
    _attention_query_backward_kernel(dout, q, kv, att, pos, n_head, dq, dkv)
    return dq, dkv


# ----------------------------------------------------------------------------- GELU (Numba)
# GELU is one tanh per element over the MLP's [B,T,4C] activations, the largest arrays in a block.
# A call to the C library's tanh runs one value at a time (about 17 ns each, measured: 50 ms for
# 8 x 120 x 3072 values on one core). The rational function below uses only multiplications,
# additions and one division, so the compiler runs it on 16 float32 values at a time (1.4 ms).

@njit(fastmath=_FASTMATH, cache=True, inline="always")
def _tanh_f32(u):
    """tanh(u) for float32 u as a ratio of two polynomials (the approximation the Eigen library
    uses for float32; at most 3e-7 from tanh). Beyond |u| = 7.9, tanh(u) rounds to +-1 in
    float32, and is set to exactly +-1 there, so that 1 + tanh(u) is 0 far out, as with np.tanh."""
    lim = np.float32(7.90531110763549805)
    if u >= lim:
        return np.float32(1)
    if u <= -lim:
        return np.float32(-1)
    u2 = u * u
    p = np.float32(-2.76076847742355e-16)
    p = p * u2 + np.float32(2.00018790482477e-13)
    p = p * u2 + np.float32(-8.60467152213735e-11)
    p = p * u2 + np.float32(5.12229709037114e-08)
    p = p * u2 + np.float32(1.48572235717979e-05)
    p = p * u2 + np.float32(6.37261928875436e-04)
    p = p * u2 + np.float32(4.89352455891786e-03)
    q = np.float32(1.19825839466702e-06)
    q = q * u2 + np.float32(1.18534705686654e-04)
    q = q * u2 + np.float32(2.26843463243900e-03)
    q = q * u2 + np.float32(4.89352518554385e-03)
    return u * p / q


@njit(**_JIT)
def _gelu_forward_kernel(x, y):
    k, a = np.float32(GELU_K), np.float32(GELU_A)
    half, one = np.float32(0.5), np.float32(1)
    for i in prange(x.shape[0]):                             # x, y flat [N]
        v = x[i]
        y[i] = half * v * (one + _tanh_f32(k * (v + a * v * v * v)))


@njit(**_JIT)
def _gelu_backward_kernel(dy, x, dx):
    k, a = np.float32(GELU_K), np.float32(GELU_A)
    half, one, three = np.float32(0.5), np.float32(1), np.float32(3)
    for i in prange(x.shape[0]):                             # flat [N]
        v = x[i]
        t = _tanh_f32(k * (v + a * v * v * v))
        dx[i] = dy[i] * (half * (one + t) + half * v * (one - t * t) * k * (one + three * a * v * v))


def gelu_forward(x):
    """ops.gelu_forward's output, for float32 x (the rational tanh is accurate to float32 only).
    x [...] -> y [...]"""
    x = _c(x, np.float32)
    y = np.empty_like(x)                                     # [...]
    _gelu_forward_kernel(x.reshape(-1), y.reshape(-1))
    return y


def gelu_backward(dy, x):
    """ops.gelu_backward's numbers, for float32. dy [...], x [...] -> dx [...]"""
    dy, x = _c(dy, np.float32), _c(x, np.float32)
    _check_shapes("gelu_backward", dy=(dy, x.shape))
    dx = np.empty_like(x)                                    # [...]
    _gelu_backward_kernel(dy.reshape(-1), x.reshape(-1), dx.reshape(-1))
    return dx


# ----------------------------------------------------------------------------- AdamW (Numba)
# The NumPy twin makes about a dozen passes over arrays of 7 million values (the last block's
# weights) and their temporaries; this kernel makes one, reading p, g, m, v and writing p, m, v.

@njit(**_JIT)
def _adamw_kernel(p, g, m, v, decay, c1, b2, c2, step_size, bias2_sqrt, eps):
    for i in prange(p.shape[0]):                             # flat [N]
        gi = g[i]
        mi = m[i] + c1 * (gi - m[i])                         # c1 = 1 - beta1
        vi = v[i] * b2 + c2 * (gi * gi)                      # c2 = 1 - beta2
        m[i] = mi
        v[i] = vi
        p[i] = p[i] * decay - step_size * (mi / (np.sqrt(vi) / bias2_sqrt + eps))


def adamw_update(p, g, m, v, t, lr, beta1, beta2, eps, weight_decay):
    """optim.adamw_update's numbers (p, m, v updated in place), for C-contiguous float arrays of
    one dtype (`contiguous_float` says whether they are)."""
    _check_shapes("adamw_update", g=(g, p.shape), m=(m, p.shape), v=(v, p.shape))
    if not contiguous_float(p, g, m, v):
        raise ValueError("adamw_update: p, g, m, v must be C-contiguous float arrays of one dtype")
    dt = p.dtype.type
    _adamw_kernel(p.reshape(-1), g.reshape(-1), m.reshape(-1), v.reshape(-1),
                  dt(1 - lr * weight_decay), dt(1 - beta1), dt(beta2), dt(1 - beta2),
                  dt(lr / (1 - beta1 ** t)), dt(np.sqrt(1 - beta2 ** t)), dt(eps))


# ----------------------------------------------------------------------------- LayerNorm-then-linear gradients (Numba)
# The NumPy twin passes over the [Cin,Cout] arrays five times (two sums, a scaling, an outer
# product as a temporary, its addition); the kernel reads w and M once and writes M once.

@njit(**_JIT)
def _ln_linear_grads_kernel(M, dc, w, g, b, dg, db):
    n_in, n_out = M.shape
    zero = M.dtype.type(0)
    for i in prange(n_in):                                   # rows of M are independent
        sg = zero
        sb = zero
        gi = g[i]
        bi = b[i]
        for j in range(n_out):                               # along contiguous rows of M, w, dc
            mij = M[i, j]
            sg += w[i, j] * mij                              # dg[i] = sum_j w M
            sb += w[i, j] * dc[j]                            # db[i] = (w dc)[i]
            M[i, j] = gi * mij + bi * dc[j]                  # dw = g M + b dc
        dg[i] = sg
        db[i] = sb


def ln_linear_grads(M, dc, w, g, b):
    """fastops.layernorm_linear_param_grads_np's numbers (M overwritten by dw), for C-contiguous
    float arrays of one dtype."""
    n_in, n_out = M.shape
    _check_shapes("ln_linear_grads", dc=(dc, (n_out,)), w=(w, (n_in, n_out)), g=(g, (n_in,)), b=(b, (n_in,)))
    if not contiguous_float(M, dc, w, g, b):
        raise ValueError("ln_linear_grads: M, dc, w, g, b must be C-contiguous float arrays of one dtype")
    dg = np.empty(n_in, M.dtype)                             # [Cin]
    db = np.empty(n_in, M.dtype)                             # [Cin]
    _ln_linear_grads_kernel(M, dc, w, g, b, dg, db)
    return M, dg, db


# ----------------------------------------------------------------------------- finite check
# Every step checks that no gradient is NaN or inf before AdamW uses it. `np.isfinite(g).all()`
# writes a boolean array as large as g and reads it back; the kernel reads g once. A float is
# NaN or inf exactly when all its exponent bits are set, so the check is an integer max over the
# exponent fields: integer max is associative, so the loop vectorises without any fast-math flag
# (with them, the compiler may assume there is no NaN and drop a float check altogether).

@njit(parallel=True, cache=True)
def _max_exponent_kernel(bits, mask):
    e = bits.dtype.type(0)
    for i in prange(bits.shape[0]):                          # flat [N]
        e = max(e, bits[i] & mask)
    return e


_EXPONENT_BITS = {np.dtype(np.float32): (np.uint32, 0x7F800000),
                  np.dtype(np.float64): (np.uint64, 0x7FF0000000000000)}


def all_finite(x):
    """np.isfinite(x).all(), for a C-contiguous float32 or float64 array: the largest exponent
    field among x's elements is below the all-ones pattern of NaN and inf."""
    x = np.asarray(x)
    if x.dtype not in _EXPONENT_BITS or not x.flags.c_contiguous:
        raise ValueError("all_finite: x must be a C-contiguous float32 or float64 array")
    if x.size == 0:
        return True
    uint, mask = _EXPONENT_BITS[x.dtype]
    return bool(_max_exponent_kernel(x.reshape(-1).view(uint), uint(mask)) != mask)


# ----------------------------------------------------------------------------- compiled in one process, loaded in every run
# Numba's freshly compiled parallel code and the same kernels loaded from its disk cache can round
# float32 differently (measured: the shared-prefix attention, 1 ulp on some outputs; Numba's issue
# 10617 reports fresh and cached parallel code optimised differently). A run whose process
# compiled the kernels and its resume, which loads them, would then not be bit-exact. So a run
# has them compiled in a child process first (`npgpt.fastops.load_compiled_kernels`): every run
# then loads the same machine code from the cache.

def warm_up() -> None:
    """Call every kernel once on small float32 inputs, with the argument types the runs use:
    compiles, and saves to Numba's cache, whatever it does not hold yet."""
    rng = np.random.default_rng(0)
    f = lambda *shape: rng.standard_normal(shape).astype(np.float32)
    B, T, C, H = 2, 3, 8, 2
    y, mean, rstd = layernorm_forward(f(4, C), f(C), f(C))
    layernorm_backward(f(4, C), f(4, C), mean, rstd, f(C))
    gelu_backward(f(5), gelu_forward(f(5)))
    qkv = f(B, T, 3 * C)
    out, att = attention_forward(qkv, H)
    attention_backward(f(B, T, C), qkv, att, H)
    attention_packed_forward(f(5, 3 * C), np.array([0, 2, 5]), H)
    attention_tree_forward(f(4, 3 * C), np.array([0, 1, 0, 2, 3]), np.array([0, 2, 5]), np.array([0, 1]), H)
    pos = np.array([2, 1])
    q, kv = f(B, C), f(B, T, 2 * C)
    out, att = attention_query_forward(q, kv, pos, H)
    attention_query_backward(f(B, C), q, kv, att, pos, H)
    adamw_update(f(6), f(6), f(6), np.abs(f(6)), 1, 1e-3, 0.9, 0.999, 1e-8, 0.1)
    ln_linear_grads(f(C, 3), f(3), f(C, 3), f(C), f(C))
    all_finite(f(6))


def cache_state() -> str:
    """What Numba's disk cache holds of these kernels for this source and this CPU, read from its
    index files: "loaded" (this process already compiled or loaded them), "warm" (every kernel has
    a float32 entry), "cold", or "unwritable" (no cache can be saved where Numba keeps it).
    "unknown" when Numba's cache cannot be read this way."""
    from numba.core.registry import CPUDispatcher
    kernels = [v for k, v in globals().items() if isinstance(v, CPUDispatcher) and k.endswith("_kernel")]
    if any(k.overloads for k in kernels):
        return "loaded"
    try:
        for k in kernels:
            cache, codegen = k._cache, k.targetctx.codegen()
            path = cache.cache_path
            while not os.path.exists(path):
                path = os.path.dirname(path)
            if not os.access(path, os.W_OK):
                return "unwritable"
            want = cache._index_key(None, codegen)
            index = cache._cache_file._load_index()
            if not any(key[1:] == want[1:] and ("float32" in str(key[0]) or "uint32" in str(key[0]))
                       for key in index):
                return "cold"
    except Exception:                    # another Numba's layout: say so rather than guess
        return "unknown"
    return "warm"
