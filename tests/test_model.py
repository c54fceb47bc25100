"""The textbook GPT-2 (npgpt.model, plain NumPy): end-to-end finite differences for every
trainable set and pooling, the language model's causality, padding, training that learns.
(The training path's equality with it: tests/test_fastmodel.py; against PyTorch: test_vs_torch.py.)

Gradient tolerance: relative error (max|a-b| / max|a|,|b| per array) <= 1e-6, float64.
"""
import numpy as np
import pytest

from npgpt import config as C, model, ops
from npgpt.optim import AdamW
from helpers import SMALL, SMALL_GPT2, numerical_grad, rel_err

TOL_GRAD = 1e-6
TRAINABLE_SETS = ["head", 0, 1, 2, "all"]


def small_params(dtype=np.float64, seed=1):
    p = C.init_params(SMALL, seed=seed, num_classes=2, dtype=dtype)
    rng = np.random.default_rng(seed + 100)
    for k in p:   # move away from the symmetric init so every path carries signal
        p[k] = (p[k] + rng.standard_normal(p[k].shape) * 0.1).astype(dtype)
    return p


def batch(seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, SMALL.vocab_size - 1, (3, 6))
    lengths = np.array([6, 3, 1])
    labels = np.array([0, 1, 1])
    return ids, lengths, labels


@pytest.mark.parametrize("pooling", model.POOLINGS)
@pytest.mark.parametrize("trainable", TRAINABLE_SETS)
def test_end_to_end_gradients(trainable, pooling):
    p = small_params()
    ids, lengths, labels = batch()
    args = dict(trainable=trainable, lengths=lengths, pooling=pooling)
    loss, grads, logits = model.loss_and_grads(p, SMALL, ids, labels, **args)
    assert sorted(grads) == sorted(model.trainable_names(SMALL, trainable))
    f = lambda: model.loss_and_grads(p, SMALL, ids, labels, **args)[0]
    for name, g in grads.items():
        err = rel_err(g, numerical_grad(f, p[name], h=1e-5))
        assert err <= TOL_GRAD, (name, err)


def test_without_the_causal_mask_gradients_and_padding():
    """causal=False: gradients by finite differences, and the padding now changes the logits."""
    p = small_params()
    ids, lengths, labels = batch()
    args = dict(trainable=2, lengths=lengths, pooling="last_token", causal=False)
    _, grads, _ = model.loss_and_grads(p, SMALL, ids, labels, **args)
    f = lambda: model.loss_and_grads(p, SMALL, ids, labels, **args)[0]
    for name in ("h0/attn/c_attn/w", "h1/ln_1/g", "cls/w"):
        assert rel_err(grads[name], numerical_grad(f, p[name], h=1e-5)) <= TOL_GRAD, name
    a = model.forward_cls(p, SMALL, ids[1:2], [3], causal=False)
    b = model.forward_cls(p, SMALL, ids[1:2, :3], [3], causal=False)
    assert np.abs(a - b).max() > 1e-6
    a, b = model.forward_cls(p, SMALL, ids[1:2], [3]), model.forward_cls(p, SMALL, ids[1:2, :3], [3])
    assert rel_err(a, b) <= 1e-12


def test_pooling_is_a_weighted_sum_over_positions():
    """last_token reads position length-1, first_token 0, last_position T-1, mean the mean of
    ln_f's outputs over the real tokens: the same vectors computed by hand."""
    p = small_params()
    ids, lengths, _ = batch()
    x = model.forward_prefix(p, SMALL, ids, SMALL.n_layer)                                 # [B,T,C]
    h, _ = ops.layernorm_forward(x, p["ln_f/g"], p["ln_f/b"])
    rows = np.arange(3)
    pooled = {"last_token": h[rows, lengths - 1], "first_token": h[:, 0], "last_position": h[:, -1],
              "mean": np.stack([h[b, :n].mean(axis=0) for b, n in enumerate(lengths)])}
    for pooling, vec in pooled.items():
        want = vec @ p["cls/w"] + p["cls/b"]
        assert rel_err(model.forward_cls(p, SMALL, ids, lengths, pooling=pooling), want) <= 1e-12, pooling


def test_forward_lm_shapes_and_causality():
    p = small_params()
    ids, _, _ = batch()
    logits = model.forward_lm(p, SMALL, ids)
    assert logits.shape == (3, 6, SMALL.vocab_size)
    ids2 = ids.copy()
    ids2[:, 4] = (ids2[:, 4] + 1) % 10          # a later token never changes earlier logits
    logits2 = model.forward_lm(p, SMALL, ids2)
    np.testing.assert_array_equal(logits[:, :4], logits2[:, :4])
    assert np.abs(logits[:, 4:] - logits2[:, 4:]).max() > 1e-6


def test_padding_invariance_last_token():
    """Right-padding changes nothing with last-token pooling and the causal mask; the lengths may
    be derived from the pad id; last-position pooling does read the padding."""
    p = C.init_params(SMALL_GPT2, seed=3, num_classes=2)
    rng = np.random.default_rng(0)
    seqs = [rng.integers(0, 50000, n) for n in (5, 2, 7)]
    alone = np.concatenate([model.forward_cls(p, SMALL_GPT2, s[None]) for s in seqs])
    for T in (7, 9, 16):
        ids = np.full((3, T), model.PAD_ID)
        for b, s in enumerate(seqs):
            ids[b, :len(s)] = s
        np.testing.assert_allclose(model.forward_cls(p, SMALL_GPT2, ids), alone, rtol=1e-5, atol=1e-6)
    ids = np.full((1, 9), model.PAD_ID)
    ids[0, :5] = seqs[0]
    assert np.abs(model.forward_cls(p, SMALL_GPT2, ids, pooling="last_position") - alone[:1]).max() > 1e-6


def test_padding_policy():
    """What may be done to a batch without changing a result (npgpt.model.Padding)."""
    P = model.Padding
    assert not P("last_token").reads_padding and P("last_token").grouping_free
    assert P("last_position").reads_padding and not P("last_position").grouping_free
    assert P("last_position", pad_to=120).grouping_free and P("last_position", pad_to=120).length(7) == 120
    assert P("mean", causal=False).reads_padding and not P("mean", causal=False).grouping_free
    assert P("first_token").length(7) == 7
    with pytest.raises(ValueError):
        P("last_position").length(7)


def test_training_reduces_loss():
    p = small_params(np.float32)
    ids, lengths, labels = batch()
    opt = AdamW(lr=1e-2, weight_decay=0.0)
    first = model.loss_and_grads(p, SMALL, ids, labels, 1, lengths)[0]
    for _ in range(30):
        loss, g, _ = model.loss_and_grads(p, SMALL, ids, labels, 1, lengths)
        opt.step(p, g)
    assert loss < 0.5 * first
