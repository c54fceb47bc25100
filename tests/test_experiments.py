"""The bonus experiments' mechanics: attention without the causal mask (kernels, twins, backward),
first-token and mean pooling, and gradient accumulation (the same gradients as one larger batch)."""
import numpy as np
import pytest

from helpers import SMALL_GPT2 as TINY, numerical_grad, rel_err
from npgpt import finetune, kernels as K, model, ops, params as P


def attention_np(qkv, H, causal=True):
    out, saved = ops.attention_forward(qkv, H, causal)
    return out, saved.att


def attention_backward_np(dout, qkv, att, H, causal=True):
    return ops.attention_backward(dout, ops.AttentionSaved(qkv, att, H, causal))


# ----------------------------------------------------------------------------- no causal mask

@pytest.mark.parametrize("dtype,tol", [(np.float32, 1e-5), (np.float64, 1e-12)])
@pytest.mark.parametrize("B,T,H,D", [(1, 1, 1, 4), (3, 7, 3, 5), (2, 20, 4, 16)])
def test_non_causal_kernels_match_numpy_twins(B, T, H, D, dtype, tol):
    rng = np.random.default_rng(T)
    qkv = rng.standard_normal((B, T, 3 * H * D)).astype(dtype)
    dout = rng.standard_normal((B, T, H * D)).astype(dtype)
    out_np, att_np = attention_np(qkv, H, causal=False)
    out_nb, att_nb = K.attention_forward(qkv, H, causal=False)
    assert rel_err(out_nb, out_np) < tol and rel_err(att_nb, att_np) < tol
    if T > 1:
        assert (att_np[:, :, 0, 1:] > 0).all()          # the first query sees later keys
    d_np = attention_backward_np(dout, qkv, att_np, H, causal=False)
    d_nb = K.attention_backward(dout, qkv, att_nb, H, causal=False)
    assert rel_err(d_nb, d_np) < 10 * tol
    starts = np.array([0, T]) if B == 1 else None
    if starts is not None:
        packed = K.attention_packed_forward(qkv[0], starts, H, causal=False)
        assert rel_err(packed, out_np[0]) < tol


@pytest.mark.parametrize("backward", ["np", "numba"])
def test_non_causal_backward_matches_finite_differences(backward):
    rng = np.random.default_rng(0)
    B, T, H, D = 2, 5, 2, 3
    qkv = rng.standard_normal((B, T, 3 * H * D))
    dout = rng.standard_normal((B, T, H * D))           # a random upstream gradient
    f = lambda: float((attention_np(qkv, H, causal=False)[0] * dout).sum())
    _, att = attention_np(qkv, H, causal=False)
    bw = attention_backward_np if backward == "np" else K.attention_backward
    got = bw(dout, qkv, att, H, causal=False)
    assert rel_err(got, numerical_grad(f, qkv)) < 1e-7
    # and the masked version differs: the flag does something
    assert rel_err(K.attention_forward(qkv, H)[0], K.attention_forward(qkv, H, causal=False)[0]) > 1e-3


def test_non_causal_model_gradients_and_padding():
    p = P.init_params(TINY, seed=0, num_classes=2, dtype=np.float64)
    rng = np.random.default_rng(1)
    ids = rng.integers(0, 50000, (2, 6))
    ids[1, 4:] = model.PAD_ID
    labels = np.array([0, 1])
    for pooling in ("last_token", "last_position"):
        run = lambda: model.loss_and_grads(p, TINY, ids, labels, trainable=2, pooling=pooling,
                                           lengths=np.array([6, 4]), causal=False)
        _, grads, _ = run()
        f = lambda: run()[0]
        for name in ("h0/attn/c_attn/w", "h1/attn/c_attn/w", "h0/mlp/c_fc/b"):
            idx = rng.choice(p[name].size, 8, replace=False)
            assert rel_err(grads[name].reshape(-1)[idx],
                             numerical_grad(f, p[name], indices=idx).reshape(-1)[idx]) < 1e-6
    # without the mask the padding is seen: shorter padding changes the logits of the last token
    a = model.forward_cls(p, TINY, ids, np.array([6, 4]), causal=False)[1]
    b = model.forward_cls(p, TINY, ids[:, :5], np.array([5, 4]), causal=False)[1]
    assert np.abs(a - b).max() > 1e-6
    c = model.forward_cls(p, TINY, ids, np.array([6, 4]))[1]
    d = model.forward_cls(p, TINY, ids[:, :5], np.array([5, 4]))[1]
    np.testing.assert_allclose(c, d, rtol=1e-12)         # with the mask it is not


# ----------------------------------------------------------------------------- poolings

@pytest.mark.parametrize("pooling", ["first_token", "mean"])
def test_new_poolings_gradients_and_definition(pooling):
    p = P.init_params(TINY, seed=2, num_classes=2, dtype=np.float64)
    rng = np.random.default_rng(3)
    ids = rng.integers(0, 50000, (3, 6))
    lengths = np.array([6, 2, 4])
    labels = np.array([0, 1, 1])
    run = lambda: model.loss_and_grads(p, TINY, ids, labels, trainable=1, pooling=pooling, lengths=lengths)
    _, grads, logits = run()
    f = lambda: run()[0]
    for name in ("cls/w", "ln_f/g", "h1/attn/c_attn/w", "h1/mlp/c_proj/w"):
        idx = rng.choice(p[name].size, min(8, p[name].size), replace=False)
        assert rel_err(grads[name].reshape(-1)[idx],
                         numerical_grad(f, p[name], indices=idx).reshape(-1)[idx]) < 1e-6
    # the definition, from the hidden states of the LM path
    x = model.forward_prefix(p, TINY, ids, TINY.n_layer)                        # [B,T,C]
    mu = x.mean(-1, keepdims=True)
    h = (x - mu) / np.sqrt(x.var(-1, keepdims=True) + 1e-5) * p["ln_f/g"] + p["ln_f/b"]
    if pooling == "first_token":
        want = h[:, 0] @ p["cls/w"] + p["cls/b"]
    else:   # the mean of ln_f's output over the real tokens 0..length-1, then the head
        want = np.stack([h[b, :n].mean(0) for b, n in enumerate(lengths)]) @ p["cls/w"] + p["cls/b"]
    np.testing.assert_allclose(logits, want, rtol=1e-10)


# ----------------------------------------------------------------------------- accumulation

def test_accumulated_gradients_equal_one_larger_batch():
    """The mean of N batches' gradients (each the gradient of a mean loss over B examples) is the
    gradient of one batch of N*B examples; last-token pooling makes padding irrelevant."""
    p = P.init_params(TINY, seed=4, num_classes=2, dtype=np.float64)
    rng = np.random.default_rng(5)
    N, B, T = 3, 2, 7
    ids = rng.integers(0, 50000, (N * B, T))
    lengths = rng.integers(1, T + 1, N * B)
    labels = rng.integers(0, 2, N * B)
    _, big, _ = model.loss_and_grads(p, TINY, ids, labels, trainable="all", lengths=lengths)
    acc = None
    for k in range(N):
        rows = slice(k * B, (k + 1) * B)
        T_k = int(lengths[rows].max())                   # each small batch padded only to its own longest
        _, g, _ = model.loss_and_grads(p, TINY, ids[rows, :T_k], labels[rows], trainable="all",
                                       lengths=lengths[rows])
        acc = finetune.accumulate_grads(acc, g)
    assert set(acc) == set(big)
    for name in big:
        np.testing.assert_allclose(acc[name] / N, big[name], rtol=1e-9, atol=1e-14, err_msg=name)
