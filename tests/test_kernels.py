"""The kernels: each Numba kernel against its NumPy twin, the twins' backward passes against finite
differences, the float32 tanh of the GELU kernel against np.tanh, AdamW against its formulas, the
causal softmax's shape, the NPGPT_NUMBA switch, the thread setting, and the on-disk compile cache
when the package directory is read-only."""
import ctypes
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numba
import numpy as np
import pytest

from npgpt import fastops as F, kernels as K, ops, optim

from helpers import REPO, numerical_grad, rel_err


# The NumPy statement each kernel is checked against (`ops`, `fastops`, `optim`), in the kernel's
# call form: raw arrays in, raw arrays out.

def layernorm_forward_np(x, g, b):
    y, s = ops.layernorm_forward(x, g, b)
    return y, s.mean, s.rstd


def layernorm_backward_np(dy, x, mean, rstd, g):
    return ops.layernorm_backward(dy, ops.LayerNormSaved(x, mean, rstd, g))


def attention_forward_np(qkv, n_head, causal=True):
    out, s = ops.attention_forward(qkv, n_head, causal)
    return out, s.att


def attention_backward_np(dout, qkv, att, n_head, causal=True):
    return ops.attention_backward(dout, ops.AttentionSaved(qkv, att, n_head, causal))


def gelu_forward_np(x):
    return ops.gelu_forward(x)[0]


gelu_backward_np = ops.gelu_backward
adamw_update_np = optim.adamw_update
attention_query_forward_np = F.attention_query_forward_np
attention_query_backward_np = F.attention_query_backward_np
attention_packed_forward_np = F.attention_packed_forward_np
attention_tree_forward_np = F.attention_tree_forward_np
ln_linear_grads_np = F.layernorm_linear_param_grads_np


def all_finite_np(x):
    return bool(np.isfinite(x).all())


IMPL = {"numba": {"layernorm_forward": K.layernorm_forward, "layernorm_backward": K.layernorm_backward,
                  "attention_forward": K.attention_forward, "attention_backward": K.attention_backward,
                  "attention_packed_forward": K.attention_packed_forward, "adamw_update": K.adamw_update,
                  "attention_query_forward": K.attention_query_forward,
                  "attention_query_backward": K.attention_query_backward},
        "np": {"layernorm_forward": layernorm_forward_np, "layernorm_backward": layernorm_backward_np,
               "attention_forward": attention_forward_np, "attention_backward": attention_backward_np,
               "attention_packed_forward": attention_packed_forward_np, "adamw_update": adamw_update_np,
               "attention_query_forward": attention_query_forward_np,
               "attention_query_backward": attention_query_backward_np}}


# Numba against NumPy: the same formulas, summed in a different order (and in float64 by Numba).
TOL = {np.float32: 1e-5, np.float64: 1e-12}
DTYPES = [np.float32, np.float64]
# (B, T, H, D) and query positions pos [B] (including 0 and T-1)
ATT_CASES = [
    ((1, 1, 1, 4), [0]),
    ((3, 7, 3, 5), [0, 6, 3]),
    ((2, 33, 4, 16), [32, 0]),
]


def ln_inputs(N, C, dtype, seed=0, spread=1e-2):
    """LayerNorm inputs: rows of standard deviation `spread` around a per-row offset of size ~1
    (with spread 1e-2 the variance is 1e-4, so that eps = 1e-5 matters)."""
    r = np.random.default_rng(seed)
    x = spread * r.standard_normal((N, C)) + r.standard_normal((N, 1))
    g = 1 + 0.1 * r.standard_normal(C)
    b = 0.1 * r.standard_normal(C)
    dy = r.standard_normal((N, C))
    return [a.astype(dtype) for a in (x, g, b, dy)]


def att_inputs(B, T, H, D, dtype, seed=0):
    r = np.random.default_rng(seed)
    qkv = 2 * r.standard_normal((B, T, 3 * H * D))          # wide scores: a peaked softmax
    dout = r.standard_normal((B, T, H * D))
    return qkv.astype(dtype), dout.astype(dtype)


def query_inputs(B, T, H, D, dtype, seed=0):
    r = np.random.default_rng(seed)
    C = H * D
    q = 2 * r.standard_normal((B, C))
    kv = 2 * r.standard_normal((B, T, 2 * C))
    dout = r.standard_normal((B, C))
    return q.astype(dtype), kv.astype(dtype), dout.astype(dtype)


# ----------------------------------------------------------------------------- Numba vs NumPy

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N,C", [(1, 5), (7, 13), (67, 768)])
@pytest.mark.parametrize("spread", [1.0, 1e-2])
def test_layernorm_numba_matches_numpy(dtype, N, C, spread):
    x, g, b, dy = ln_inputs(N, C, dtype, spread=spread)
    # x itself is rounded to the dtype's precision relative to its offset (~1); x - mean, of size
    # spread, then carries that rounding magnified by 1/spread, differently in the two versions
    # (NumPy's float32 mean against Numba's float64 one).
    tol = TOL[dtype] / spread
    got = K.layernorm_forward(x, g, b)
    want = layernorm_forward_np(x, g, b)
    for name, u, w in zip(("y", "mean", "rstd"), got, want):
        assert u.dtype == dtype and u.shape == w.shape, name
        assert rel_err(u, w) <= tol, name
    _, mean, rstd = want
    got = K.layernorm_backward(dy, x, mean, rstd, g)
    want = layernorm_backward_np(dy, x, mean, rstd, g)
    for name, u, w in zip(("dx", "dg", "db"), got, want):
        assert u.dtype == dtype and u.shape == w.shape, name
        assert rel_err(u, w) <= tol, name


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,pos", ATT_CASES)
def test_attention_numba_matches_numpy(dtype, shape, pos):
    B, T, H, D = shape
    qkv, dout = att_inputs(B, T, H, D, dtype)
    out, att = K.attention_forward(qkv, H)
    out_np, att_np = attention_forward_np(qkv, H)
    assert out.dtype == att.dtype == dtype
    assert out.shape == (B, T, H * D) and att.shape == (B, H, T, T)
    assert rel_err(out, out_np) <= TOL[dtype]
    assert rel_err(att, att_np) <= TOL[dtype]
    dqkv = K.attention_backward(dout, qkv, att_np, H)
    dqkv_np = attention_backward_np(dout, qkv, att_np, H)
    assert dqkv.dtype == dqkv_np.dtype == dtype and dqkv.shape == qkv.shape
    assert rel_err(dqkv, dqkv_np) <= TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,pos", ATT_CASES)
def test_attention_query_numba_matches_numpy(dtype, shape, pos):
    B, T, H, D = shape
    q, kv, dout = query_inputs(B, T, H, D, dtype)
    pos = np.array(pos)
    out, att = K.attention_query_forward(q, kv, pos, H)
    out_np, att_np = attention_query_forward_np(q, kv, pos, H)
    assert out.dtype == att.dtype == dtype
    assert out.shape == (B, H * D) and att.shape == (B, H, T)
    assert rel_err(out, out_np) <= TOL[dtype]
    assert rel_err(att, att_np) <= TOL[dtype]
    dq, dkv = K.attention_query_backward(dout, q, kv, att_np, pos, H)
    dq_np, dkv_np = attention_query_backward_np(dout, q, kv, att_np, pos, H)
    assert dq.dtype == dkv.dtype == dtype and dq.shape == q.shape and dkv.shape == kv.shape
    assert rel_err(dq, dq_np) <= TOL[dtype]
    assert rel_err(dkv, dkv_np) <= TOL[dtype]
    # nothing past pos: zero probabilities, zero key/value gradients, in both versions
    for b in range(B):
        for a, d in ((att, dkv), (att_np, dkv_np)):
            assert np.all(a[b, :, pos[b] + 1:] == 0)
            assert np.all(d[b, pos[b] + 1:] == 0)
            assert np.all(np.abs(d[b, :pos[b] + 1]).sum(axis=-1) > 0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lengths", [[1], [5], [3, 1, 7, 2], [1, 1, 1], [13, 40]])
def test_attention_packed_numba_matches_numpy_and_each_sequence_alone(dtype, lengths):
    H, D = 3, 5
    starts = np.concatenate([[0], np.cumsum(lengths)])
    rng = np.random.default_rng(len(lengths))
    qkv = rng.standard_normal((starts[-1], 3 * H * D)).astype(dtype)       # [N,3C]
    out = K.attention_packed_forward(qkv, starts, H)
    out_np = attention_packed_forward_np(qkv, starts, H)
    assert out.dtype == dtype and out.shape == (starts[-1], H * D)
    assert rel_err(out, out_np) <= TOL[dtype]
    for s, e in zip(starts[:-1], starts[1:]):               # no sequence sees another
        alone, _ = attention_forward_np(qkv[None, s:e], H)
        assert rel_err(out[s:e], alone[0]) <= TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
def test_attention_tree_numba_matches_numpy_and_each_sequence_alone(dtype):
    from npgpt import prefix_tree
    H, D = 3, 5
    seqs = [np.array(s) for s in ([1], [1, 2, 3], [1, 2, 4, 4, 5], [1, 2, 4, 6], [7, 7], [8] * 40, [8] * 41)]
    lay = prefix_tree.layout(seqs)
    assert len(lay.ids) == 1 + 2 + 3 + 1 + 2 + 41
    rng = np.random.default_rng(3)
    qkv = rng.standard_normal((len(lay.ids), 3 * H * D)).astype(dtype)     # [N,3C]
    out = K.attention_tree_forward(qkv, *lay.tree, H)
    out_np = attention_tree_forward_np(qkv, *lay.tree, H)
    assert out.dtype == dtype and out.shape == (len(lay.ids), H * D)
    assert rel_err(out, out_np) <= TOL[dtype]
    for m in range(len(seqs)):                                # each sequence as if alone
        rows = lay.rows_of(m)
        alone, _ = attention_forward_np(qkv[rows][None], H)
        assert rel_err(out[rows], alone[0]) <= TOL[dtype]


@pytest.mark.parametrize("case", ["owned twice", "owned by none", "first_new too large", "row out of range"])
def test_attention_tree_rejects_bad_layouts(case):
    path, pstarts, first_new = np.array([0, 1, 0, 2]), np.array([0, 2, 4]), np.array([0, 1])
    if case == "owned twice":
        first_new = np.array([0, 0])
    elif case == "owned by none":
        path = np.array([0, 1, 0, 1])
    elif case == "first_new too large":
        first_new = np.array([0, 2])
    else:
        path = np.array([0, 1, 0, 3])
    with pytest.raises(ValueError, match="attention_tree_forward"):
        K.attention_tree_forward(np.zeros((3, 9), np.float32), path, pstarts, first_new, 1)

@pytest.mark.parametrize("starts", [[0, 3, 3, 6], [1, 6], [0, 5], [0, 7]])
def test_attention_packed_rejects_bad_starts(starts):
    qkv = np.zeros((6, 9), np.float32)
    with pytest.raises(ValueError, match="starts"):
        K.attention_packed_forward(qkv, np.array(starts), 1)


def test_attention_query_is_a_row_of_full_attention():
    """Query attention at pos[b] equals row pos[b] of the full causal attention."""
    B, T, H, D = 3, 7, 3, 5
    C = H * D
    qkv, _ = att_inputs(B, T, H, D, np.float64, seed=3)
    pos = np.array([6, 0, 4])
    out_full, att_full = K.attention_forward(qkv, H)
    rows = np.arange(B)
    out, att = K.attention_query_forward(qkv[rows, pos, :C], qkv[:, :, C:], pos, H)
    assert rel_err(out, out_full[rows, pos]) <= 1e-12
    assert rel_err(att, att_full[rows, :, pos]) <= 1e-12


def test_non_contiguous_inputs():
    """Strided views (slices of a wider array, transposes) give the twins' results."""
    r = np.random.default_rng(5)
    N, C = 9, 12
    wide = r.standard_normal((N, 2 * C)).astype(np.float32)
    x = wide[:, ::2]                                         # [N,C] strided
    g = r.standard_normal(2 * C).astype(np.float32)[1::2]
    b = np.zeros(C, np.float32)
    dy = np.asfortranarray(r.standard_normal((N, C)).astype(np.float32))
    y, mean, rstd = K.layernorm_forward(x, g, b)
    for u, w in zip((y, mean, rstd), layernorm_forward_np(x, g, b)):
        assert rel_err(u, w) <= TOL[np.float32]
    for u, w in zip(K.layernorm_backward(dy, x, mean, rstd, g),
                    layernorm_backward_np(dy, x, mean, rstd, g)):
        assert rel_err(u, w) <= TOL[np.float32]

    B, T, H, D = 3, 7, 3, 5
    C = H * D
    big, dbig = att_inputs(B, T + 2, H, D, np.float32, seed=6)
    qkv = big[:, 1:T + 1]                                    # [B,T,3C] a slice along time
    dout = dbig[:, :T]
    out, att = K.attention_forward(qkv, H)
    out_np, att_np = attention_forward_np(qkv, H)
    assert rel_err(out, out_np) <= TOL[np.float32]
    assert rel_err(K.attention_backward(dout, qkv, att_np, H),
                   attention_backward_np(dout, qkv, att_np, H)) <= TOL[np.float32]
    q, kv, pos = qkv[:, 3, :C], qkv[:, :, C:], np.array([3, 3, 3])   # views of qkv
    do = dout[:, 3]
    out, att = K.attention_query_forward(q, kv, pos, H)
    out_np, att_np = attention_query_forward_np(q, kv, pos, H)
    assert rel_err(out, out_np) <= TOL[np.float32]
    for u, w in zip(K.attention_query_backward(do, q, kv, att_np, pos, H),
                    attention_query_backward_np(do, q, kv, att_np, pos, H)):
        assert rel_err(u, w) <= TOL[np.float32]


@pytest.mark.parametrize("forward", [K.attention_query_forward, attention_query_forward_np])
@pytest.mark.parametrize("pos", [[-1, 0], [0, 5], [0]])
def test_attention_query_rejects_bad_pos(forward, pos):
    q, kv, _ = query_inputs(2, 5, 1, 4, np.float64)
    with pytest.raises(ValueError, match="pos"):
        forward(q, kv, np.array(pos), 1)


def test_nan_propagates():
    """No nnan/ninf fast-math: a NaN in the input reaches the output (so a diverging run shows)."""
    x, g, b, _ = ln_inputs(3, 8, np.float32)
    x[1, 2] = np.nan
    y, _, _ = K.layernorm_forward(x, g, b)
    assert np.isnan(y[1]).all() and np.isfinite(y[[0, 2]]).all()
    qkv, _ = att_inputs(2, 5, 1, 4, np.float32)
    qkv[1, 0, 4] = np.nan                                    # a key at position 0, seen by every query
    out, att = K.attention_forward(qkv, 1)
    assert np.isnan(out[1]).all() and np.isfinite(out[0]).all()


@pytest.mark.parametrize("call", [
    lambda: K.layernorm_forward(np.zeros((3, 4)), np.ones(5), np.zeros(4)),
    lambda: K.layernorm_backward(np.zeros((3, 4)), np.zeros((3, 4)), np.zeros(2), np.ones(3), np.ones(4)),
    lambda: K.attention_forward(np.zeros((2, 3, 18)), 4),
    lambda: K.attention_backward(np.zeros((2, 3, 5)), np.zeros((2, 3, 18)), np.zeros((2, 2, 3, 3)), 2),
    lambda: K.attention_query_forward(np.zeros((2, 5)), np.zeros((2, 3, 12)), np.array([0, 1]), 2),
    lambda: K.attention_query_backward(np.zeros((2, 6)), np.zeros((2, 6)), np.zeros((2, 3, 12)),
                                             np.zeros((2, 2, 4)), np.array([0, 1]), 2),
])
def test_numba_wrappers_reject_mismatched_shapes(call):
    """The compiled loops do not check bounds, so the wrappers check shapes first."""
    with pytest.raises(ValueError):
        call()


@pytest.mark.parametrize("shape", [(5,), (3, 7, 33), (2, 4, 3072)])
def test_gelu_numba_matches_numpy(shape):
    r = np.random.default_rng(7)
    x = (3 * r.standard_normal(shape)).astype(np.float32)
    x.reshape(-1)[:4] = [-30.0, -9.0, 9.0, 30.0]             # the far tails: tanh is exactly -1 / +1
    dy = r.standard_normal(shape).astype(np.float32)
    y, y_np = K.gelu_forward(x), gelu_forward_np(x)
    assert y.dtype == np.float32 and y.shape == shape
    assert rel_err(y, y_np) <= TOL[np.float32]
    dx, dx_np = K.gelu_backward(dy, x), gelu_backward_np(dy, x)
    assert dx.dtype == np.float32 and dx.shape == shape
    assert rel_err(dx, dx_np) <= TOL[np.float32]
    assert np.all(y.reshape(-1)[:2] == 0) and np.all(dx.reshape(-1)[:2] == 0)   # as np.tanh gives
    assert np.array_equal(y.reshape(-1)[2:4], x.reshape(-1)[2:4])


def test_gelu_tanh_f32_accuracy():
    """The rational tanh of the GELU kernel: within 3e-7 of tanh everywhere, exactly +-1 beyond
    |u| = 7.9 (where float32 tanh rounds to +-1), odd, and NaN in gives NaN out."""
    u = np.linspace(-12, 12, 200_001).astype(np.float32)
    t = np.array([K._tanh_f32(np.float32(a)) for a in u[::40]], np.float32)
    want = np.tanh(u[::40].astype(np.float64))
    assert np.abs(t - want).max() <= 3e-7
    assert np.all(t[np.abs(u[::40]) >= 7.9053112] == np.sign(u[::40][np.abs(u[::40]) >= 7.9053112]))
    assert np.array_equal(t, -t[::-1])
    assert np.isnan(K._tanh_f32(np.float32(np.nan)))
    x = np.array([1.0, np.nan, -2.0], np.float32)
    assert np.isnan(K.gelu_forward(x)[1]) and np.isfinite(K.gelu_forward(x)[[0, 2]]).all()
    assert np.isnan(K.gelu_backward(np.ones(3, np.float32), x)[1])


def test_fastops_gelu_sends_other_dtypes_to_numpy():
    """float64 (the gradient checks) is computed by the textbook's NumPy, to the last bit."""
    x = 3 * np.random.default_rng(8).standard_normal((4, 9))
    dy = np.random.default_rng(9).standard_normal((4, 9))
    assert np.array_equal(F.gelu_forward(x)[0], gelu_forward_np(x))
    assert np.array_equal(F.gelu_backward(dy, x), gelu_backward_np(dy, x))


def adamw_state(shape, dtype, seed):
    r = np.random.default_rng(seed)
    p, g, m = (r.standard_normal(shape) for _ in range(3))
    v = r.random(shape)                                      # second moments are >= 0
    return [a.astype(dtype) for a in (p, g, m, v)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_adamw_numba_matches_numpy_and_formulas(dtype, weight_decay):
    shape, lr, b1, b2, eps = (37, 19), 1e-3, 0.9, 0.999, 1e-8
    a = adamw_state(shape, dtype, seed=10)
    b = [x.copy() for x in a]
    p0, g, m0, v0 = (x.astype(np.float64) for x in a)
    for t in (1, 2, 3):
        adamw_update_np(*a, t, lr, b1, b2, eps, weight_decay)
        K.adamw_update(*b, t, lr, b1, b2, eps, weight_decay)
        for name, u, w in zip("pgmv", a, b):
            assert u.dtype == w.dtype == dtype, name
            assert rel_err(u, w) <= TOL[dtype], name
        # the formulas, in float64, from the previous state
        m1 = b1 * m0 + (1 - b1) * g
        v1 = b2 * v0 + (1 - b2) * g * g
        p1 = p0 * (1 - lr * weight_decay) - lr / (1 - b1 ** t) * m1 / (np.sqrt(v1 / (1 - b2 ** t)) + eps)
        assert rel_err(b[0], p1) <= TOL[dtype] and rel_err(b[2], m1) <= TOL[dtype]
        assert rel_err(b[3], v1) <= TOL[dtype]
        assert not np.array_equal(b[0], p0)                  # it did move
        p0, m0, v0 = (x.astype(np.float64) for x in (b[0], b[2], b[3]))
    assert np.array_equal(a[1], b[1])                        # the gradient is read, not written



@pytest.mark.parametrize("dtype", DTYPES)
def test_ln_linear_grads_numba_matches_numpy(dtype):
    r = np.random.default_rng(7)
    Cin, Cout = 37, 53
    M, w = (r.standard_normal((Cin, Cout)).astype(dtype) for _ in range(2))
    dc = r.standard_normal(Cout).astype(dtype)
    g, b = (r.standard_normal(Cin).astype(dtype) for _ in range(2))
    ref = ln_linear_grads_np(M.copy(), dc, w, g, b)
    M2 = M.copy()
    got = K.ln_linear_grads(M2, dc, w, g, b)
    assert got[0] is M2                                      # dw is written over M
    for u, v in zip(got, ref):
        assert u.dtype == dtype and rel_err(u, v) <= TOL[dtype]
    M64, w64, dc64, g64, b64 = (a.astype(np.float64) for a in (M, w, dc, g, b))
    assert rel_err(ref[0], g64[:, None] * M64 + b64[:, None] * dc64[None, :]) <= TOL[dtype]
    assert rel_err(ref[1], (w64 * M64).sum(axis=1)) <= TOL[dtype]
    assert rel_err(ref[2], w64 @ dc64) <= TOL[dtype]

def test_fastops_adamw_updates_non_contiguous_arrays_in_place():
    """A strided view cannot be updated through a flat copy: fastops sends it to the NumPy update;
    the kernel itself refuses what it cannot read flat."""
    p, g, m, v = adamw_state((6, 10), np.float32, seed=11)
    base = p.copy()
    view = base[:, ::2]                                      # [6,5] strided, part of base
    want = [x[:, ::2].copy() for x in (p, g, m, v)]
    adamw_update_np(*want, 1, 1e-2, 0.9, 0.999, 1e-8, 0.1)
    gv, mv, vv = (np.ascontiguousarray(x[:, ::2]) for x in (g, m, v))
    F.adamw_update(view, gv, mv, vv, 1, 1e-2, 0.9, 0.999, 1e-8, 0.1)
    assert np.array_equal(base[:, ::2], want[0]) and np.array_equal(mv, want[2])
    assert np.array_equal(base[:, 1::2], p[:, 1::2])         # the other columns untouched
    with pytest.raises(ValueError, match="adamw_update"):
        K.adamw_update(p, g[:, :5], m, v, 1, 1e-2, 0.9, 0.999, 1e-8, 0.1)
    with pytest.raises(ValueError, match="adamw_update"):
        K.adamw_update(view, gv, mv, vv, 1, 1e-2, 0.9, 0.999, 1e-8, 0.1)


# ----------------------------------------------------------------------------- the causal softmax

@pytest.mark.parametrize("forward", [K.attention_forward, attention_forward_np])
@pytest.mark.parametrize("dtype", DTYPES)
def test_causal_att_rows_sum_to_one_and_zero_above_diagonal(forward, dtype):
    B, T, H, D = 3, 33, 3, 5
    qkv, _ = att_inputs(B, T, H, D, dtype, seed=1)
    _, att = forward(qkv, H)                                 # [B,H,T,T]
    tol = 1e-6 if dtype == np.float32 else 1e-13
    assert np.abs(att.astype(np.float64).sum(axis=-1) - 1).max() <= tol
    assert np.all(np.triu(att, k=1) == 0)
    assert np.all(att[..., np.tril(np.ones((T, T), bool))] > 0)  # every visible key has weight
    assert att[..., 0, 0].min() == 1                         # the first query sees only itself


# ----------------------------------------------------------------------------- finite differences

def numeric_grad(f, arrays, h=1e-6):
    """Central differences of the scalar f() with respect to every entry of each array (in place)."""
    return [numerical_grad(f, a, h=h) for a in arrays]


FD_TOL = 1e-6


def test_layernorm_backward_np_finite_differences():
    x, g, b, dy = ln_inputs(4, 6, np.float64, seed=2)        # var ~ 1e-4, against eps = 1e-5

    def loss():
        return float((dy * layernorm_forward_np(x, g, b)[0]).sum())

    _, mean, rstd = layernorm_forward_np(x, g, b)
    dx, dg, db = layernorm_backward_np(dy, x, mean, rstd, g)
    nx, ng, nb = numeric_grad(loss, [x, g, b], h=1e-7)
    assert rel_err(dx, nx) <= FD_TOL
    assert rel_err(dg, ng) <= FD_TOL
    assert rel_err(db, nb) <= FD_TOL


def test_attention_backward_np_finite_differences():
    B, T, H, D = 2, 4, 2, 3
    qkv, dout = att_inputs(B, T, H, D, np.float64, seed=3)
    qkv *= 0.5

    def loss():
        return float((dout * attention_forward_np(qkv, H)[0]).sum())

    _, att = attention_forward_np(qkv, H)
    dqkv = attention_backward_np(dout, qkv, att, H)
    (num,) = numeric_grad(loss, [qkv])
    assert rel_err(dqkv, num) <= FD_TOL


def test_attention_query_backward_np_finite_differences():
    B, T, H, D = 3, 5, 2, 3
    q, kv, dout = query_inputs(B, T, H, D, np.float64, seed=4)
    q *= 0.5
    kv *= 0.5
    pos = np.array([0, 4, 2])

    def loss():
        return float((dout * attention_query_forward_np(q, kv, pos, H)[0]).sum())

    _, att = attention_query_forward_np(q, kv, pos, H)
    dq, dkv = attention_query_backward_np(dout, q, kv, att, pos, H)
    nq, nkv = numeric_grad(loss, [q, kv])
    assert rel_err(dq, nq) <= FD_TOL
    assert rel_err(dkv, nkv) <= FD_TOL


def test_gelu_backward_np_finite_differences():
    x = 3 * np.random.default_rng(12).standard_normal((3, 8))
    dy = np.random.default_rng(13).standard_normal((3, 8))

    def loss():
        return float((dy * gelu_forward_np(x)).sum())

    (num,) = numeric_grad(loss, [x])
    assert rel_err(gelu_backward_np(dy, x), num) <= FD_TOL


# ----------------------------------------------------------------------------- switch and threads

def _run(code, env_extra, cwd, args=(), **kw):
    """python -c code args... in cwd (which `import npgpt` sees first), environment without our
    switches."""
    env = {k: v for k, v in os.environ.items() if k not in ("NPGPT_NUMBA", "NUMBA_CACHE_DIR")}
    env.update(env_extra)
    return subprocess.run([sys.executable, "-c", code, *args], env=env, cwd=cwd, capture_output=True,
                          text=True, timeout=600, **kw)


@pytest.mark.parametrize("flag,numba", [(None, True), ("1", True), ("0", False)])
def test_npgpt_numba_switch(flag, numba):
    """NPGPT_NUMBA=0 makes fastops compute everything in NumPy: nothing compiled, kernels not even
    imported; otherwise its operations run the kernels."""
    code = ("import json, sys, npgpt.fastops as F; "
            "print(json.dumps([F.USE_NUMBA, 'npgpt.kernels' in sys.modules, 'numba' in sys.modules]))")
    root = str(Path(K.__file__).resolve().parents[1])
    env = {"PYTHONPATH": root} if flag is None else {"PYTHONPATH": root, "NPGPT_NUMBA": flag}
    r = _run(code, env, cwd=root)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == [numba, numba, numba]


def test_set_num_threads():
    threadpoolctl = pytest.importorskip("threadpoolctl")
    before_numba = numba.get_num_threads()
    blas = threadpoolctl.threadpool_info()
    before_blas = [i["num_threads"] for i in blas if i["user_api"] == "blas"]
    try:
        F.set_num_threads(1)
        assert numba.get_num_threads() == 1
        assert all(i["num_threads"] == 1 for i in threadpoolctl.threadpool_info() if i["user_api"] == "blas")
        F.set_num_threads(numba.config.NUMBA_NUM_THREADS + 1)   # capped at Numba's pool
        assert numba.get_num_threads() == numba.config.NUMBA_NUM_THREADS
        with pytest.raises(ValueError):
            F.set_num_threads(0)
    finally:
        numba.set_num_threads(before_numba)
        if before_blas:
            threadpoolctl.threadpool_limits(limits=max(before_blas), user_api="blas")


# ----------------------------------------------------------------------------- read-only package

_READONLY_SCRIPT = r"""
import json, os, sys
import numpy as np
import npgpt.kernels as K
from npgpt import fastops as F, ops, optim

try:                                   # is the package directory really read-only for us?
    open(os.path.join(os.path.dirname(K.__file__), "probe"), "w").close()
    print(json.dumps({"file": K.__file__, "writable": True}))
    sys.exit(0)
except OSError:
    pass

def rel(a, b):
    return float(np.abs(a - b).max() / max(np.abs(a).max(), np.abs(b).max()))

r = np.random.default_rng(0)
B, T, H, D = 2, 5, 2, 4
C = H * D
x, dy = r.standard_normal((2, 7, C)).astype(np.float32)
g, b = np.ones(C, np.float32), np.zeros(C, np.float32)
qkv = r.standard_normal((B, T, 3 * C)).astype(np.float32)
do = r.standard_normal((B, T, C)).astype(np.float32)
pos = np.array([0, T - 1])
q, kv = np.ascontiguousarray(qkv[:, 1, :C]), np.ascontiguousarray(qkv[:, :, C:])
errs = []
x2, dy2 = x.reshape(-1, C), dy.reshape(-1, C)
y, m, s = K.layernorm_forward(x2, g, b)
y_np, saved = ops.layernorm_forward(x2, g, b)
errs.append(rel(y, y_np))
errs.append(rel(K.layernorm_backward(dy2, x2, m, s, g)[0], ops.layernorm_backward(dy2, saved)[0]))
o, a = K.attention_forward(qkv, H)
o_np, saved = ops.attention_forward(qkv, H)
errs.append(rel(o, o_np))
errs.append(rel(K.attention_backward(do, qkv, a, H), ops.attention_backward(do, saved)))
o, a = K.attention_query_forward(q, kv, pos, H)
errs.append(rel(o, F.attention_query_forward_np(q, kv, pos, H)[0]))
errs.append(rel(K.attention_query_backward(do[:, 0], q, kv, a, pos, H)[1],
                F.attention_query_backward_np(do[:, 0], q, kv, a, pos, H)[1]))
f = 3 * x
errs.append(rel(K.gelu_forward(f), ops.gelu_forward(f)[0]))
errs.append(rel(K.gelu_backward(dy, f), ops.gelu_backward(dy, f)))
state = [x.copy(), dy.copy(), x.copy(), np.abs(dy)]
want = [a.copy() for a in state]
K.adamw_update(*state, 1, 1e-3, 0.9, 0.999, 1e-8, 0.1)
optim.adamw_update(*want, 1, 1e-3, 0.9, 0.999, 1e-8, 0.1)
errs.append(rel(state[0], want[0]))
kernels = [K._layernorm_forward_kernel, K._layernorm_backward_kernel, K._gelu_forward_kernel,
           K._gelu_backward_kernel, K._attention_forward_kernel, K._attention_backward_kernel,
           K._attention_query_forward_kernel, K._attention_query_backward_kernel, K._adamw_kernel]
print(json.dumps({
    "file": K.__file__,
    "writable": False,
    "max_err": max(errs),
    "hits": sum(sum(k.stats.cache_hits.values()) for k in kernels),
    "misses": sum(sum(k.stats.cache_misses.values()) for k in kernels),
    "cache_paths": sorted({k.stats.cache_path for k in kernels}),
}))
"""


def _drop_write_override():
    """For root: drop CAP_DAC_OVERRIDE from the bounding set before exec, so that file modes bind
    (prctl(PR_CAPBSET_DROP, CAP_DAC_OVERRIDE))."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(24, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP) failed")


def _set_mode(root, dirs, files):
    os.chmod(root, dirs)
    for p in Path(root).rglob("*"):
        os.chmod(p, dirs if p.is_dir() else files)


def _files(d):
    return sorted(str(p.relative_to(d)) for p in Path(d).rglob("*") if p.is_file())


def test_kernels_cache_with_read_only_package(tmp_path):
    """Copy the package, make it read-only, and run every kernel in a fresh interpreter: with
    NUMBA_CACHE_DIR unset (Numba's user-wide cache, pointed into tmp through XDG_CACHE_HOME), twice
    to see the second run load from the cache, and with NUMBA_CACHE_DIR set."""
    site = tmp_path / "site"
    pkg = site / "npgpt"
    shutil.copytree(Path(K.__file__).parent, pkg, ignore=shutil.ignore_patterns("__pycache__"))
    before = _files(pkg)
    _set_mode(pkg, 0o555, 0o444)
    preexec = _drop_write_override if os.geteuid() == 0 else None
    env = {"PYTHONPATH": str(site), "XDG_CACHE_HOME": str(tmp_path / "xdg"),
           "PYTHONDONTWRITEBYTECODE": "1"}
    try:
        runs = []
        for extra in ({}, {}, {"NUMBA_CACHE_DIR": str(tmp_path / "nbcache")}):
            r = _run(_READONLY_SCRIPT, {**env, **extra}, cwd=tmp_path, preexec_fn=preexec)
            assert r.returncode == 0, r.stderr
            runs.append(json.loads(r.stdout.strip().splitlines()[-1]))
            assert runs[-1]["file"] == str(pkg / "kernels.py")   # the copy, not the repository
            if runs[-1]["writable"]:
                pytest.skip("cannot make a directory read-only for this user")
    finally:
        _set_mode(pkg, 0o755, 0o644)
    user_wide, again, provided = runs
    for run in runs:
        assert run["max_err"] <= 1e-5
    assert _files(pkg) == before                             # nothing was written into the package
    assert all(p.startswith(str(tmp_path / "xdg" / "numba")) for p in user_wide["cache_paths"])
    assert user_wide["misses"] == 9 and user_wide["hits"] == 0
    assert again["hits"] == 9 and again["misses"] == 0       # loaded, not compiled
    assert all(p.startswith(str(tmp_path / "nbcache")) for p in provided["cache_paths"])
    assert any(f.endswith(".nbi") for f in _files(tmp_path / "nbcache"))
    assert any(f.endswith(".nbi") for f in _files(tmp_path / "xdg" / "numba"))



# ----------------------------------------------------------------------------- against float64 formulas
# Each float32 kernel against the formula evaluated in float64, element by element:
# |got - want| <= atol + rtol |want|, with tolerances a few times what the kernels measured, on
# inputs where every term of the formula changes the result by more than the tolerance (the cubic
# term of GELU at |x| ~ 1..4, eps against a variance of 1e-4 in LayerNorm). A relative error over
# the whole array would hide a wrong constant behind the largest value.

SQRT_2_PI = np.sqrt(2.0 / np.pi)


def gelu64(x):
    return 0.5 * x * (1 + np.tanh(SQRT_2_PI * (x + 0.044715 * x ** 3)))


def dgelu64(x):
    t = np.tanh(SQRT_2_PI * (x + 0.044715 * x ** 3))
    return 0.5 * (1 + t) + 0.5 * x * (1 - t * t) * SQRT_2_PI * (1 + 3 * 0.044715 * x * x)


def layernorm64(x, g, b):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + 1e-5) * g + b, mean[:, 0], 1 / np.sqrt(var[:, 0] + 1e-5)


def assert_elementwise(got, want, atol, rtol, name=""):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape, name
    if got.size == 0:
        return
    excess = np.abs(got - want) - (atol + rtol * np.abs(want))
    i = np.unravel_index(np.argmax(excess), excess.shape)
    ok = bool(excess[i] <= 0)
    assert ok, f"{name}: at {i} got {got[i]!r}, want {want[i]!r} (|diff| {abs(got[i] - want[i]):.3g})"


def f64(*arrays):
    return [np.asarray(a, np.float64) for a in arrays]


def test_gelu_numba_matches_float64_formula():
    """The float32 kernel is within ~7e-7 (forward) and ~4.2e-6 |dy| (backward) of the formula;
    0.0447 for 0.044715 moves them by up to 8.7e-6 and 9.5e-6 |dy|."""
    r = np.random.default_rng(20)
    x = np.concatenate([np.linspace(-6, 6, 24001), 2 * r.standard_normal(4000)]).astype(np.float32)
    dy = r.choice([-1.0, 1.0], x.shape) * r.uniform(0.5, 2.0, x.shape)
    dy = dy.astype(np.float32)
    (x64, dy64) = f64(x, dy)
    assert_elementwise(K.gelu_forward(x), gelu64(x64), atol=1.5e-6, rtol=2.4e-7, name="y")
    err = np.abs(K.gelu_backward(dy, x) - dy64 * dgelu64(x64)) / np.abs(dy64)
    assert err.max() <= 6e-6, f"dx: {err.max():.3g} |dy| at x = {x[np.argmax(err)]}"
    # the NumPy twin, in float64, is the formula to round-off
    assert_elementwise(gelu_forward_np(x64), gelu64(x64), atol=1e-15, rtol=1e-14, name="y np")
    assert_elementwise(gelu_backward_np(dy64, x64), dy64 * dgelu64(x64), atol=1e-15, rtol=1e-14, name="dx np")


@pytest.mark.parametrize("impl", ["numba", "np"])
def test_layernorm_matches_float64_formula(impl):
    fwd = IMPL[impl]["layernorm_forward"]
    bwd = IMPL[impl]["layernorm_backward"]
    x, g, b, dy = ln_inputs(64, 768, np.float32, seed=21, spread=1e-2)
    x64, g64, b64, dy64 = f64(x, g, b, dy)
    y, mean, rstd = fwd(x, g, b)
    want_y, want_mean, want_rstd = layernorm64(x64, g64, b64)
    # the twin's float32 mean carries x's rounding (6e-8 of an offset ~1) into x - mean (~1e-2)
    atol = 2e-5 if impl == "numba" else 1e-4
    assert_elementwise(y, want_y, atol=atol, rtol=2e-6, name="y")
    assert_elementwise(mean, want_mean, atol=1e-7, rtol=1e-6, name="mean")
    assert_elementwise(rstd, want_rstd, atol=0, rtol=2e-6, name="rstd")
    dx, dg, db = bwd(dy, x, mean, rstd, g)
    want = layernorm_backward_np(dy64, x64, want_mean, want_rstd, g64)   # checked by finite differences
    for name, u, w in zip(("dx", "dg", "db"), (dx, dg, db), want):
        assert_elementwise(u, w, atol=2e-3 * np.abs(w).mean(), rtol=1e-5, name=name)


@pytest.mark.parametrize("impl", ["numba", "np"])
def test_attention_matches_float64(impl):
    B, T, H, D = 2, 33, 3, 16
    qkv, dout = att_inputs(B, T, H, D, np.float32, seed=22)
    qkv64, dout64 = f64(qkv, dout)
    out, att = IMPL[impl]["attention_forward"](qkv, H)
    want_out, want_att = attention_forward_np(qkv64, H)
    assert_elementwise(out, want_out, atol=1e-5, rtol=1e-5, name="out")
    assert_elementwise(att, want_att, atol=1e-6, rtol=1e-5, name="att")
    dqkv = IMPL[impl]["attention_backward"](dout, qkv, att, H)
    want = attention_backward_np(dout64, qkv64, want_att, H)
    assert_elementwise(dqkv, want, atol=2e-5, rtol=1e-4, name="dqkv")
    starts = np.array([0, 5, 6, 33])
    flat = np.ascontiguousarray(qkv[0])
    packed = IMPL[impl]["attention_packed_forward"](flat, starts, H)
    assert_elementwise(packed, attention_packed_forward_np(qkv64[0], starts, H), atol=1e-5, rtol=1e-5,
                       name="packed")
    pos = np.array([32, 7])
    q, kv = np.ascontiguousarray(qkv[np.arange(B), pos, :H * D]), np.ascontiguousarray(qkv[:, :, H * D:])
    o, a = IMPL[impl]["attention_query_forward"](q, kv, pos, H)
    assert_elementwise(o, want_out[np.arange(B), pos], atol=1e-5, rtol=1e-5, name="query out")
    assert_elementwise(a, want_att[np.arange(B), :, pos], atol=1e-6, rtol=1e-5, name="query att")
    dq, dkv = IMPL[impl]["attention_query_backward"](dout[:, 0], q, kv, a, pos, H)
    wq, wkv = attention_query_backward_np(dout64[:, 0], *f64(q, kv, want_att[np.arange(B), :, pos]), pos, H)
    assert_elementwise(dq, wq, atol=2e-5, rtol=1e-4, name="dq")
    assert_elementwise(dkv, wkv, atol=2e-5, rtol=1e-4, name="dkv")


@pytest.mark.parametrize("impl", ["numba", "np"])
def test_adamw_matches_float64_formula(impl):
    lr, b1, b2, eps, wd = 1e-3, 0.9, 0.999, 1e-8, 0.1
    p, g, m, v = adamw_state((4096,), np.float32, seed=23)
    p64, g64, m64, v64 = f64(p, g, m, v)
    for t in (1, 2, 7):
        IMPL[impl]["adamw_update"](p, g, m, v, t, lr, b1, b2, eps, wd)
        p64 = p64 * (1 - lr * wd)
        m64 = b1 * m64 + (1 - b1) * g64
        v64 = b2 * v64 + (1 - b2) * g64 ** 2
        p64 = p64 - lr * (m64 / (1 - b1 ** t)) / (np.sqrt(v64 / (1 - b2 ** t)) + eps)
        assert_elementwise(m, m64, atol=1e-7, rtol=1e-6, name=f"m, t={t}")
        assert_elementwise(v, v64, atol=1e-9, rtol=1e-6, name=f"v, t={t}")
        # the step is ~lr: its error, not p's rounding, must be small
        assert_elementwise(p, p64, atol=1e-3 * lr, rtol=1e-6, name=f"p, t={t}")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_all_finite_finds_one_non_finite_value_anywhere(dtype, bad):
    """The divergence check: one NaN or inf anywhere (first, middle, last element, and in a
    tail after any vector width) makes it False; the largest finite and the subnormal values
    do not."""
    rng = np.random.default_rng(12)
    x = rng.standard_normal(1003).astype(dtype)
    assert K.all_finite(x) and all_finite_np(x)
    extremes = x.copy()
    extremes[[0, 500, 1002]] = [np.finfo(dtype).max, -np.finfo(dtype).max, np.finfo(dtype).smallest_subnormal]
    assert K.all_finite(extremes) and all_finite_np(extremes)
    for k in (0, 1, 500, 1001, 1002):
        y = x.copy()
        y[k] = bad
        assert not K.all_finite(y), k
        assert not K.all_finite(y.reshape(17, 59)), k
        assert not all_finite_np(y), k


def test_all_finite_other_layouts_and_dtypes_go_to_numpy():
    x = np.ones((6, 8), np.float32)
    x[2, 7] = np.nan
    assert not F.all_finite(x[:, 1::2])                 # strided view: columns 1, 3, 5, 7
    assert F.all_finite(x[:, :4])
    assert not F.all_finite(np.array([1.0, np.inf], np.float16))
    assert F.all_finite(np.zeros(0, np.float32)) and K.all_finite(np.zeros(0, np.float32))
    with pytest.raises(ValueError, match="all_finite"):
        K.all_finite(x[:, 1::2])


# ----------------------------------------------------------------------------- compiled apart, loaded by every run

_RUNS_SCRIPT = r"""
import hashlib, json, sys
import numpy as np
import npgpt
from npgpt import kernels as K
from npgpt.config import preset, init_params
from npgpt.generate import generate_greedy
from numba.core.registry import CPUDispatcher

bpe_dir, out = sys.argv[1], sys.argv[2]
words = ["apple", "river", "hammer"]
rng = np.random.default_rng(0)
texts = [" ".join(rng.choice(["the", "a", "of", "to", "and", "is"], 1 + i % 5).tolist() + [words[i % 3]])
         for i in range(60)]
labels = [["fruit", "water", "tool"][i % 3] for i in range(60)]
digest = hashlib.sha256()
settings = [dict(), dict(trainable_blocks="all"), dict(lora=2), dict(pooling="mean", trainable_blocks=2),
            dict(causal_mask=False, max_length="batch"), dict(pooling="last-position"), dict(dense=True)]
for k, s in enumerate(settings):
    clf = npgpt.fit(texts, labels, model="tiny", epochs=1, batch_size=8, bpe_dir=bpe_dir, out=f"{out}/run{k}",
                    verbose=k == 0, **s)
    for name in sorted(clf.params):
        digest.update(np.ascontiguousarray(clf.params[name]).tobytes())
    digest.update(clf.predict_proba(texts[:7]).tobytes())
cfg = preset("tiny")
digest.update(generate_greedy(init_params(cfg, seed=1), cfg, np.array([[1, 2, 3]]), 4).tobytes())
kernels = [v for v in vars(K).values() if isinstance(v, CPUDispatcher)]
print(json.dumps({"digest": digest.hexdigest(),
                  "compiled_here": {k.__name__: str(list(k.stats.cache_misses)) for k in kernels
                                    if sum(k.stats.cache_misses.values())},
                  "loaded": sum(sum(k.stats.cache_hits.values()) for k in kernels)}))
"""


def test_runs_load_the_kernels_and_agree_bit_for_bit(tmp_path, bpe_dir):
    """With an empty Numba cache, the first run has the kernels compiled in a child process and
    loads them, as the second run does: neither process compiles a kernel itself (seven kinds of
    run, classification, generation), and the two give the same bits. (Compiled in the process
    that ran it, the shared-prefix attention rounded differently from its cached copy, so a
    first run and its resume disagreed.)"""
    env = {"NUMBA_CACHE_DIR": str(tmp_path / "numba"), "PYTHONPATH": str(REPO)}
    results = []
    for k in range(2):
        r = _run(_RUNS_SCRIPT, env, cwd=tmp_path, args=(bpe_dir, str(tmp_path / f"out{k}")))
        assert r.returncode == 0, r.stderr[-3000:]
        results.append(json.loads(r.stdout.strip().splitlines()[-1]))
        assert ("compiling kernels (first run only" in r.stdout) == (k == 0)
    first, second = results
    assert first["compiled_here"] == {} and second["compiled_here"] == {}
    assert first["loaded"] > 0 and second["loaded"] > 0
    assert first["digest"] == second["digest"]
