"""Finite-difference checks of every backward in npgpt.ops (the textbook) and of the operations
only the fast paths add (npgpt.fastops), float64.

Each forward output y gets a random upstream gradient G (never all ones); the scalar checked is
f = sum(G * y), so df/dinput is exactly what backward returns for dout = G.
Tolerance: relative error (tests/helpers.rel_err) <= 1e-6.
"""
import numpy as np
import pytest

from npgpt import fastops, ops
from helpers import numerical_grad, rel_err

TOL = 1e-6
rng = np.random.default_rng(1234)


def randn(*shape, scale=1.0):
    return rng.standard_normal(shape) * scale


def test_embedding():
    V, n_ctx, C, B, T = 7, 9, 5, 2, 4
    wte, wpe = randn(V, C), randn(n_ctx, C)
    ids = np.array([[1, 3, 3, 0], [6, 1, 2, 1]])          # repeated ids must add up
    G = randn(B, T, C)
    x, saved = ops.embedding_forward(ids, wte, wpe)
    np.testing.assert_array_equal(x, wte[ids] + wpe[:T])
    dwte, dwpe = ops.embedding_backward(G, saved)
    f = lambda: (G * ops.embedding_forward(ids, wte, wpe)[0]).sum()
    assert rel_err(dwte, numerical_grad(f, wte)) <= TOL
    assert rel_err(dwpe, numerical_grad(f, wpe)) <= TOL
    assert np.all(dwpe[T:] == 0) and np.all(dwte[[4, 5]] == 0)


@pytest.mark.parametrize("shape", [(3, 6), (2, 3, 5)])
def test_layernorm(shape):
    C = shape[-1]
    # small variance around an offset: a wrong eps (or eps in the wrong place) shows up here
    x = 0.3 + randn(*shape, scale=1e-2)
    g, b = 1 + randn(C, scale=0.1), randn(C, scale=0.1)
    G = randn(*shape)
    y, saved = ops.layernorm_forward(x, g, b)
    mean = x.mean(-1, keepdims=True)
    np.testing.assert_allclose(y, (x - mean) / np.sqrt(x.var(-1, keepdims=True) + 1e-5) * g + b, rtol=1e-10, atol=1e-12)
    dx, dg, db = ops.layernorm_backward(G, saved)
    f = lambda: (G * ops.layernorm_forward(x, g, b)[0]).sum()
    assert rel_err(dx, numerical_grad(f, x, h=1e-7)) <= TOL
    assert rel_err(dg, numerical_grad(f, g)) <= TOL
    assert rel_err(db, numerical_grad(f, b)) <= TOL


def test_linear():
    x, w, b = randn(2, 3, 4), randn(4, 5), randn(5)
    G = randn(2, 3, 5)
    y, saved = ops.linear_forward(x, w, b)
    dx, dw, db = ops.linear_backward(G, saved)
    f = lambda: (G * ops.linear_forward(x, w, b)[0]).sum()
    assert rel_err(dx, numerical_grad(f, x)) <= TOL
    assert rel_err(dw, numerical_grad(f, w)) <= TOL
    assert rel_err(db, numerical_grad(f, b)) <= TOL
    # frozen weights: no dw computed
    dx2, dw2, db2 = ops.linear_backward(G, saved, need_dw=False)
    assert dw2 is None and db2 is None and np.array_equal(dx, dx2)



def test_layernorm_linear_param_grads():
    """The one-product parameter gradients of y = LN(x) w + c equal finite differences and the
    two-product chain (linear_backward, then layernorm_backward), float64."""
    N, Cin, Cout = 7, 5, 6
    x = 0.3 + randn(N, Cin)
    g, b = 1 + randn(Cin, scale=0.1), randn(Cin, scale=0.1)
    w, c = randn(Cin, Cout), randn(Cout)
    G = randn(N, Cout)
    h, ln = ops.layernorm_forward(x, g, b)
    _, lin = ops.linear_forward(h, w, c)
    dh, dw_ref, dc_ref = ops.linear_backward(G, lin)
    _, dg_ref, db_ref = ops.layernorm_backward(dh, ln)
    x2, mean, rstd, _ = ln
    xhat = (x2 - mean[:, None]) * rstd[:, None]
    dc = G.sum(axis=0)
    dw, dg, db = fastops.layernorm_linear_param_grads(xhat.T @ G, dc, w, g, b)
    for got, ref in ((dw, dw_ref), (dc, dc_ref), (dg, dg_ref), (db, db_ref)):
        assert rel_err(got, ref) <= 1e-12
    f = lambda: (G * ops.linear_forward(ops.layernorm_forward(x, g, b)[0], w, c)[0]).sum()
    for got, arr in ((dw, w), (dg, g), (db, b)):
        assert rel_err(got, numerical_grad(f, arr)) <= TOL

def test_gelu():
    x = randn(4, 7, scale=2.0)
    G = randn(4, 7)
    y, saved = ops.gelu_forward(x)
    np.testing.assert_allclose(y, 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3))), rtol=1e-14)
    dx = ops.gelu_backward(G, saved)
    f = lambda: (G * ops.gelu_forward(x)[0]).sum()
    assert rel_err(dx, numerical_grad(f, x)) <= TOL


@pytest.mark.parametrize("B,T,H,D", [(2, 5, 2, 3), (1, 1, 3, 4), (3, 7, 3, 5)])
def test_attention(B, T, H, D):
    qkv = randn(B, T, 3 * H * D)
    G = randn(B, T, H * D)
    out, saved = ops.attention_forward(qkv, H)
    dqkv = ops.attention_backward(G, saved)
    f = lambda: (G * ops.attention_forward(qkv, H)[0]).sum()
    assert rel_err(dqkv, numerical_grad(f, qkv)) <= TOL


def test_attention_query():
    B, T, H, D = 3, 6, 2, 4
    C = H * D
    q, kv = randn(B, C), randn(B, T, 2 * C)
    pos = np.array([5, 0, 3])
    G = randn(B, C)
    out, saved = fastops.attention_query_forward(q, kv, pos, H)
    dq, dkv = fastops.attention_query_backward(G, saved)
    f = lambda: (G * fastops.attention_query_forward(q, kv, pos, H)[0]).sum()
    assert rel_err(dq, numerical_grad(f, q)) <= TOL
    assert rel_err(dkv, numerical_grad(f, kv)) <= TOL
    # it is the full causal attention read at one row per sequence
    qkv = np.concatenate([np.zeros((B, T, C)), kv], axis=-1)
    qkv[np.arange(B), pos, :C] = q
    full, _ = ops.attention_forward(qkv, H)
    np.testing.assert_allclose(out, full[np.arange(B), pos], rtol=1e-12, atol=1e-14)


def test_attention_rows():
    """The seen rows of a batch, packed: gradients by finite differences, and equal to the full
    causal attention on the padded batch read at those rows (whatever the padding holds)."""
    B, T, H, D = 3, 5, 2, 3
    C = H * D
    pos = np.array([4, 0, 2])
    idx = np.flatnonzero(np.arange(T)[None, :] <= pos[:, None])          # [N] b*T + t
    qkv = randn(len(idx), 3 * C)
    G = randn(len(idx), C)
    out, saved = fastops.attention_rows_forward(qkv, idx, B, T, H)
    dqkv = fastops.attention_rows_backward(G, saved)
    f = lambda: (G * fastops.attention_rows_forward(qkv, idx, B, T, H)[0]).sum()
    assert rel_err(dqkv, numerical_grad(f, qkv)) <= TOL
    grid = randn(B * T, 3 * C)                                           # padding: any values
    grid[idx] = qkv
    full, fsaved = ops.attention_forward(grid.reshape(B, T, 3 * C), H)
    np.testing.assert_allclose(out, full.reshape(B * T, C)[idx], rtol=1e-12, atol=1e-14)
    dgrid = np.zeros((B * T, C))
    dgrid[idx] = G
    dfull = ops.attention_backward(dgrid.reshape(B, T, C), fsaved).reshape(B * T, 3 * C)
    np.testing.assert_allclose(dqkv, dfull[idx], rtol=1e-12, atol=1e-14)


def test_cross_entropy():
    logits = randn(5, 3, scale=3.0)
    targets = np.array([0, 2, 1, 1, 0])
    loss, saved = ops.cross_entropy_forward(logits, targets)
    p = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    assert abs(loss - (-np.log(p[np.arange(5), targets]).mean())) < 1e-12
    G = float(randn(1)[0]) * 3                             # a random upstream gradient, not 1
    dlogits = ops.cross_entropy_backward(G, saved)
    f = lambda: G * ops.cross_entropy_forward(logits, targets)[0]
    assert rel_err(dlogits, numerical_grad(f, logits)) <= TOL
    # stable for huge logits
    big, _ = ops.cross_entropy_forward(np.array([[1000.0, 0.0], [0.0, -1000.0]]), np.array([0, 1]))
    assert np.isfinite(big) and abs(big - 500.0) < 1e-9


def test_softmax_rows_are_probabilities_and_stable():
    z = np.array([[1000.0, 0.0, -1000.0], [1.0, 2.0, 3.0]])
    p = ops.softmax(z)
    assert np.allclose(p.sum(axis=1), 1) and np.isfinite(p).all()
    np.testing.assert_allclose(p[1], np.exp([1.0, 2.0, 3.0]) / np.exp([1.0, 2.0, 3.0]).sum(), rtol=1e-14)
