"""The whole model: end-to-end finite differences, the fast paths against the dense path,
trainable sets, padding invariance, prefix caching, AdamW, HDF5 round trip.

Gradient tolerance: relative error (max|a-b| / max|a|,|b| per array) <= 1e-6, float64.
Fast paths against the dense path: float64 agreement to 1e-12 relative, float32 to 1e-5.
"""
import numpy as np
import pytest

from npgpt import model, params as P
from npgpt.config import GPT2Config, preset
from npgpt.errors import NpgptError, FormatError
from npgpt.optim import AdamW
from gradcheck import numerical_grad, rel_error

TOL_GRAD = 1e-6
CFG = GPT2Config(n_layer=2, n_head=2, n_embd=8, vocab_size=11, n_ctx=16)
TRAINABLE_SETS = ["head", 0, 1, 2, "all"]


def tiny_params(dtype=np.float64, seed=1):
    p = P.init_params(CFG, seed=seed, num_classes=2, dtype=dtype)
    rng = np.random.default_rng(seed + 100)
    for k in p:   # move away from the symmetric init so every path carries signal
        p[k] = (p[k] + rng.standard_normal(p[k].shape) * 0.1).astype(dtype)
    return p


def batch(seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, CFG.vocab_size - 1, (3, 6))
    lengths = np.array([6, 3, 1])
    labels = np.array([0, 1, 1])
    return ids, lengths, labels


@pytest.mark.parametrize("dense", [False, True])
@pytest.mark.parametrize("pooling", ["last_token", "last_position"])
@pytest.mark.parametrize("trainable", TRAINABLE_SETS)
def test_end_to_end_gradients(trainable, pooling, dense):
    p = tiny_params()
    ids, lengths, labels = batch()
    args = dict(trainable=trainable, lengths=lengths, pooling=pooling, dense=dense)
    loss, grads, logits = model.loss_and_grads(p, CFG, ids, labels, **args)
    assert sorted(grads) == sorted(model.trainable_names(CFG, trainable))
    f = lambda: model.loss_and_grads(p, CFG, ids, labels, **args)[0]
    for name, g in grads.items():
        err = rel_error(g, numerical_grad(f, p[name], h=1e-5))
        assert err <= TOL_GRAD, (name, err)


def test_forward_lm_shapes_and_causality():
    p = tiny_params()
    ids, _, _ = batch()
    logits = model.forward_lm(p, CFG, ids)
    assert logits.shape == (3, 6, CFG.vocab_size)
    ids2 = ids.copy()
    ids2[:, 4] = (ids2[:, 4] + 1) % 10          # a later token never changes earlier logits
    logits2 = model.forward_lm(p, CFG, ids2)
    np.testing.assert_array_equal(logits[:, :4], logits2[:, :4])
    assert np.abs(logits[:, 4:] - logits2[:, 4:]).max() > 1e-6


@pytest.mark.parametrize("dtype,rtol", [(np.float64, 1e-12), (np.float32, 1e-5)])
@pytest.mark.parametrize("trainable", [1, 2, "head"])
def test_pooled_and_cached_paths_equal_dense(dtype, rtol, trainable):
    p = tiny_params(dtype)
    ids, lengths, labels = batch()
    ref_loss, ref_g, ref_logits = model.loss_and_grads(p, CFG, ids, labels, trainable, lengths, dense=True)
    first = model.first_trainable_block(CFG, trainable)
    x_start = model.forward_prefix(p, CFG, ids, first)
    for kw in (dict(), dict(x_start=x_start)):
        loss, g, logits = model.loss_and_grads(p, CFG, None if kw else ids, labels, trainable, lengths, **kw)
        assert abs(loss - ref_loss) <= rtol * abs(ref_loss)
        assert rel_error(logits, ref_logits) <= rtol
        for name in ref_g:
            assert rel_error(g[name], ref_g[name]) <= rtol, name


@pytest.mark.parametrize("pooling", ["last_token", "first_token", "mean", "last_position"])
@pytest.mark.parametrize("trainable", [2, "all"])
def test_seen_rows_equal_dense(trainable, pooling):
    """Every block on the seen rows alone (positions 0..pos[b] packed, `dense=False`) against every
    position of the padded batch (`dense=True`): loss, logits and every gradient, float64."""
    p = tiny_params()
    ids, lengths, labels = batch()
    ref = model.loss_and_grads(p, CFG, ids, labels, trainable, lengths, pooling=pooling, dense=True)
    got = model.loss_and_grads(p, CFG, ids, labels, trainable, lengths, pooling=pooling)
    assert abs(got[0] - ref[0]) <= 1e-12 * abs(ref[0])
    assert rel_error(got[2], ref[2]) <= 1e-12
    assert set(got[1]) == set(ref[1])
    for name in ref[1]:
        assert rel_error(got[1][name], ref[1][name]) <= 1e-12, name


def test_unpadded_cache_equals_padded_batch():
    """The prefix of each example at its true length, re-padded with zeros, gives the same logits."""
    p = tiny_params(np.float32)
    ids, lengths, labels = batch()
    ids = ids.copy()
    for b, n in enumerate(lengths):
        ids[b, n:] = model.PAD_ID % CFG.vocab_size
    ref = model.forward_cls(p, CFG, ids, lengths, dense=True)
    x = np.zeros((3, 6, CFG.n_embd), np.float32)
    for b, n in enumerate(lengths):
        x[b, :n] = model.forward_prefix(p, CFG, ids[b:b + 1, :n], 1)[0]
    got = model.forward_cls(p, CFG, lengths=lengths, x_start=x, start=1)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype,tol", [(np.float64, 1e-12), (np.float32, 1e-5)])
def test_packed_prefix_equals_each_sequence_alone(dtype, tol):
    p = tiny_params(dtype)
    rng = np.random.default_rng(4)
    seqs = [rng.integers(0, CFG.vocab_size, n) for n in (6, 1, 4, 2)]
    packed = model.forward_prefix_packed(p, CFG, seqs, CFG.n_layer)
    assert [x.shape for x in packed] == [(len(s), CFG.n_embd) for s in seqs]
    for s, x in zip(seqs, packed):
        assert rel_error(x, model.forward_prefix(p, CFG, s[None], CFG.n_layer)[0]) <= tol
    with pytest.raises(NpgptError):
        model.forward_prefix_packed(p, CFG, [np.array([CFG.vocab_size])], 1)
    with pytest.raises(ValueError, match="forward only"):    # nothing is kept for a backward
        model.block_forward(p, 0, np.zeros((3, CFG.n_embd), dtype), CFG.n_head, starts=[0, 3])


def test_padding_invariance_last_token():
    cfg = GPT2Config(n_layer=2, n_head=2, n_embd=8, vocab_size=50257, n_ctx=16)
    p = P.init_params(cfg, seed=3, num_classes=2)
    rng = np.random.default_rng(0)
    seqs = [rng.integers(0, 50000, n) for n in (5, 2, 7)]
    alone = np.concatenate([model.forward_cls(p, cfg, s[None]) for s in seqs])
    for T in (7, 9, 16):
        ids = np.full((3, T), model.PAD_ID)
        for b, s in enumerate(seqs):
            ids[b, :len(s)] = s
        for dense in (False, True):
            got = model.forward_cls(p, cfg, ids, dense=dense)        # lengths derived from pad id
            np.testing.assert_allclose(got, alone, rtol=1e-5, atol=1e-6)
    # last-position pooling does see the padding
    ids = np.full((1, 9), model.PAD_ID)
    ids[0, :5] = seqs[0]
    assert np.abs(model.forward_cls(p, cfg, ids, pooling="last_position") - alone[:1]).max() > 1e-6


def test_bad_arguments():
    p = tiny_params()
    ids, lengths, labels = batch()
    with pytest.raises(NpgptError):
        model.loss_and_grads(p, CFG, ids, labels, trainable=3)
    with pytest.raises(NpgptError):
        model.loss_and_grads(p, CFG, ids, labels, pooling="max")
    with pytest.raises(NpgptError):
        model.forward_cls(p, CFG, ids, lengths=np.array([7, 1, 1]))
    with pytest.raises(NpgptError):
        model.forward_lm(p, CFG, np.full((1, 3), CFG.vocab_size))


def test_adamw_formula():
    """Two steps by hand against the formulas in npgpt.optim (float64)."""
    rng = np.random.default_rng(0)
    p0 = rng.standard_normal((3, 2))
    b0 = rng.standard_normal(2)
    params = {"w": p0.copy(), "b": b0.copy()}
    g1, g2 = rng.standard_normal((3, 2)), rng.standard_normal((3, 2))
    h1, h2 = rng.standard_normal(2), rng.standard_normal(2)      # random: a sign change included
    h2[0] = -np.sign(h1[0]) * 3 * abs(h1[0])
    opt = AdamW(lr=0.1, weight_decay=0.5, decay_1d=False)
    opt.step(params, {"w": g1, "b": h1})
    opt.step(params, {"w": g2, "b": h2})

    def adamw(p, grads, wd):
        m, v = 0, 0
        for t, g in enumerate(grads, start=1):
            p = p * (1 - 0.1 * wd)
            m = 0.9 * m + 0.1 * g
            v = 0.999 * v + 0.001 * g * g
            p = p - 0.1 * (m / (1 - 0.9 ** t)) / (np.sqrt(v / (1 - 0.999 ** t)) + 1e-8)
        return p

    np.testing.assert_allclose(params["w"], adamw(p0, (g1, g2), 0.5), rtol=1e-12)
    # the 1-D array is exempt from decay (decay_1d=False)
    np.testing.assert_allclose(params["b"], adamw(b0, (h1, h2), 0.0), rtol=1e-12)
    assert opt.t == 2 and set(opt.m) == {"w", "b"}


def test_adamw_state_dict_round_trip():
    """state_dict / load_state_dict keep t, m and v apart and exact: the restored optimizer's next
    step is the one the original takes."""
    rng = np.random.default_rng(3)
    params = {"w": rng.standard_normal((3, 2)), "b": rng.standard_normal(2)}
    opt = AdamW(lr=0.1, weight_decay=0.5)
    for _ in range(3):
        opt.step(params, {k: rng.standard_normal(a.shape) for k, a in params.items()})
    state = opt.state_dict()
    assert state["t"] == 3 and set(state["arrays"]) == {"m/w", "m/b", "v/w", "v/b"}
    again = AdamW(lr=0.1, weight_decay=0.5)
    again.load_state_dict(state)
    assert again.t == 3 and set(again.m) == set(again.v) == {"w", "b"}
    for k in params:
        assert np.array_equal(again.m[k], opt.m[k]) and np.array_equal(again.v[k], opt.v[k])
        assert not np.array_equal(opt.m[k], opt.v[k])
    copy = {k: a.copy() for k, a in params.items()}
    g = {k: rng.standard_normal(a.shape) for k, a in params.items()}
    opt.step(params, g)
    again.step(copy, g)
    for k in params:
        assert np.array_equal(copy[k], params[k])


def test_training_reduces_loss():
    p = tiny_params(np.float32)
    ids, lengths, labels = batch()
    opt = AdamW(lr=1e-2, weight_decay=0.0)
    first = model.loss_and_grads(p, CFG, ids, labels, 1, lengths)[0]
    for _ in range(30):
        loss, g, _ = model.loss_and_grads(p, CFG, ids, labels, 1, lengths)
        opt.step(p, g)
    assert loss < 0.5 * first


def test_hdf5_roundtrip_and_validation(tmp_path):
    p = P.init_params(CFG, seed=0, num_classes=2)
    f = tmp_path / "m.h5"
    P.save_params(f, p, CFG, meta={"labels": ["ham", "spam"]})
    q, cfg, meta = P.load_params(f)
    assert cfg == CFG and meta == {"labels": ["ham", "spam"]}
    assert all(np.array_equal(p[k], q[k]) for k in p) and set(p) == set(q)
    import h5py
    with h5py.File(f, "a") as h:
        del h["h1/mlp/c_fc/b"]
    with pytest.raises(FormatError, match="h1/mlp/c_fc/b"):
        P.load_params(f)
    with pytest.raises(FormatError, match="does not match"):
        P.load_params(tmp_path / "x.h5") if False else P.load_params(f, config=preset("124M"))


def test_presets():
    assert (preset("124M").n_layer, preset("355M").n_head, preset("774M").n_embd, preset("1558M").n_layer) == (12, 16, 1280, 48)
    shapes = P.param_shapes(preset("124M"))
    assert sum(int(np.prod(s)) for s in shapes.values()) == 124_439_808
    with pytest.raises(NpgptError):
        preset("7B")


def test_hdf5_non_finite_value_is_a_format_error(tmp_path):
    import h5py
    p = P.init_params(CFG, seed=0, num_classes=2)
    P.save_params(tmp_path / "m.h5", p, CFG)
    with h5py.File(tmp_path / "m.h5", "r+") as f:
        f["h0/mlp/c_fc/w"][1, 2] = np.nan
    with pytest.raises(FormatError, match="h0/mlp/c_fc/w.*non-finite"):
        P.load_params(tmp_path / "m.h5")
