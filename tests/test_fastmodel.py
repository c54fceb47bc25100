"""The training path (npgpt.fastmodel) equals the textbook (npgpt.model): loss, logits and every
gradient, for every trainable set, pooling, mask, LoRA setting and layout (the seen rows packed,
the pooled last block, every position with dense=True, a cached prefix given as x_start).

float64: 1e-12 relative (the same formulas; the kernels sum in another order); float32: 1e-5.
"""
import numpy as np
import pytest

from npgpt import config as C, fastmodel, lora, model, prefix_tree
from npgpt.errors import NpgptError
from helpers import SMALL, numerical_grad, rel_err

TRAINABLE_SETS = ["head", 0, 1, 2, "all"]
POOLINGS = list(model.POOLINGS)
TOL = {np.float64: 1e-12, np.float32: 1e-5}


def small_params(dtype=np.float64, seed=1, cfg=SMALL):
    p = C.init_params(cfg, seed=seed, num_classes=2, dtype=dtype)
    rng = np.random.default_rng(seed + 100)
    for k in p:   # away from the symmetric init so every path carries signal
        p[k] = (p[k] + rng.standard_normal(p[k].shape) * 0.1).astype(dtype)
    return p


def batch(seed=0, B=3, T=6, lengths=(6, 3, 1)):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, SMALL.vocab_size - 1, (B, T))
    return ids, np.array(lengths), np.array([0, 1, 1][:B])


def assert_same(got, want, tol):
    loss, grads, logits = got
    assert abs(loss - want[0]) <= tol * abs(want[0])
    assert rel_err(logits, want[2]) <= tol
    assert set(grads) == set(want[1])
    for name in want[1]:
        assert rel_err(grads[name], want[1][name]) <= tol, name


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("dense", [False, True])
@pytest.mark.parametrize("pooling", POOLINGS)
@pytest.mark.parametrize("trainable", TRAINABLE_SETS)
def test_loss_and_grads_equal_the_textbook(trainable, pooling, dense, causal):
    p = small_params()
    ids, lengths, labels = batch()
    kw = dict(trainable=trainable, lengths=lengths, pooling=pooling, causal=causal)
    want = model.loss_and_grads(p, SMALL, ids, labels, **kw)
    assert_same(fastmodel.loss_and_grads(p, SMALL, ids, labels, dense=dense, **kw), want, 1e-12)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("pooling", POOLINGS)
@pytest.mark.parametrize("trainable", [1, 2, "head"])
def test_from_the_cached_prefix(trainable, pooling, dtype):
    """x_start (the frozen blocks' output, computed once) gives the textbook's numbers."""
    p = small_params(dtype)
    ids, lengths, labels = batch()
    kw = dict(trainable=trainable, lengths=lengths, pooling=pooling)
    want = model.loss_and_grads(p, SMALL, ids, labels, **kw)
    first = model.first_trainable_block(SMALL, trainable)
    x_start = fastmodel.forward_prefix(p, SMALL, ids, first)
    assert rel_err(x_start, model.forward_prefix(p, SMALL, ids, first)) <= TOL[dtype]
    assert_same(fastmodel.loss_and_grads(p, SMALL, None, labels, x_start=x_start, **kw), want, TOL[dtype])
    logits = fastmodel.forward_cls(p, SMALL, lengths=lengths, pooling=pooling, x_start=x_start, start=first)
    assert rel_err(logits, want[2]) <= TOL[dtype]


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("pooling", POOLINGS)
@pytest.mark.parametrize("targets,train_head", [(("attn", "mlp", "head"), False), (("attn",), True),
                                                (("head",), False), (("mlp",), False)])
def test_lora_equals_the_textbook(targets, train_head, pooling, causal):
    p = small_params()
    spec = lora.add_lora(p, SMALL, rank=3, alpha=5.0, seed=2, targets=targets, train_head=train_head)
    for name in p:                                     # B = 0 at the start: give it values
        if name.endswith("lora_B"):
            p[name] = np.random.default_rng(3).standard_normal(p[name].shape) * 0.3
    ids, lengths, labels = batch()
    kw = dict(trainable="lora", lengths=lengths, pooling=pooling, causal=causal, lora=spec)
    want = model.loss_and_grads(p, SMALL, ids, labels, **kw)
    assert set(want[1]) == set(lora.trainable_names(SMALL, spec))
    for dense in (False, True):
        assert_same(fastmodel.loss_and_grads(p, SMALL, ids, labels, dense=dense, **kw), want, 1e-12)


@pytest.mark.parametrize("pooling", ["last_token", "mean"])
@pytest.mark.parametrize("trainable", [1, "all"])
def test_gradients_match_finite_differences(trainable, pooling):
    """The training path's gradients against finite differences directly (float64)."""
    p = small_params()
    ids, lengths, labels = batch()
    kw = dict(trainable=trainable, lengths=lengths, pooling=pooling)
    _, grads, _ = fastmodel.loss_and_grads(p, SMALL, ids, labels, **kw)
    f = lambda: fastmodel.loss_and_grads(p, SMALL, ids, labels, **kw)[0]
    for name, g in grads.items():
        assert rel_err(g, numerical_grad(f, p[name], h=1e-5)) <= 1e-6, name


def test_unpadded_prefix_equals_the_padded_batch():
    """The prefix of each example at its true length, re-padded with zeros, gives the logits of
    the padded batch (last-token pooling, causal attention: the pads are never read)."""
    p = small_params(np.float32)
    ids, lengths, _ = batch()
    ref = model.forward_cls(p, SMALL, ids, lengths)
    x = np.zeros((3, 6, SMALL.n_embd), np.float32)
    for b, n in enumerate(lengths):
        x[b, :n] = fastmodel.forward_prefix(p, SMALL, ids[b:b + 1, :n], 1)[0]
    got = fastmodel.forward_cls(p, SMALL, lengths=lengths, x_start=x, start=1)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_packed_prefix_equals_each_sequence_alone(dtype):
    p = small_params(dtype)
    rng = np.random.default_rng(4)
    seqs = [rng.integers(0, SMALL.vocab_size, n) for n in (6, 1, 4, 2)]
    packed = fastmodel.forward_prefix_packed(p, SMALL, seqs, SMALL.n_layer)
    assert [x.shape for x in packed] == [(len(s), SMALL.n_embd) for s in seqs]
    for s, x in zip(seqs, packed):
        assert rel_err(x, model.forward_prefix(p, SMALL, s[None], SMALL.n_layer)[0]) <= TOL[dtype]
    with pytest.raises(NpgptError):
        fastmodel.forward_prefix_packed(p, SMALL, [np.array([SMALL.vocab_size])], 1)
    x, saved = fastmodel.block_forward(p, 0, np.zeros((3, SMALL.n_embd), dtype),
                                       fastmodel.Packed(np.array([0, 3]), SMALL.n_head))
    with pytest.raises(NotImplementedError, match="forward only"):    # nothing is kept for a backward
        fastmodel.block_backward(x, saved, 0, {}, fastmodel.Packed(np.array([0, 3]), SMALL.n_head))



@pytest.mark.parametrize("layout", ["dense", "seen_rows", "packed", "shared_prefix"])
@pytest.mark.parametrize("with_lora", [False, True])
def test_block_infer_is_block_forward_bit_for_bit(layout, with_lora):
    """The forward that keeps nothing for a backward gives the same bits as the one that does."""
    p = small_params(np.float32)
    spec = lora.add_lora(p, SMALL, rank=3, alpha=5.0, seed=2) if with_lora else None
    if spec is not None:
        for name in lora.trainable_names(SMALL, spec):     # nonzero B: the updates count
            p[name] += np.random.default_rng(3).standard_normal(p[name].shape).astype(np.float32)
    rng = np.random.default_rng(6)
    if layout == "dense":
        x, attention = rng.standard_normal((3, 6, SMALL.n_embd)), fastmodel.Dense(SMALL.n_head, True)
    elif layout == "seen_rows":
        attention = fastmodel.SeenRows.of(np.array([5, 0, 2]), SMALL.n_head)
        x = rng.standard_normal((len(attention.idx), SMALL.n_embd))
    elif layout == "packed":
        x, attention = rng.standard_normal((9, SMALL.n_embd)), fastmodel.Packed(np.array([0, 4, 5, 9]), SMALL.n_head)
    else:
        seqs = [np.array([1, 2, 3, 4]), np.array([1, 2, 7]), np.array([5])]
        _, lay = prefix_tree.packed_layouts(seqs, 100)[0]
        attention = fastmodel.SharedPrefix(*lay.tree, SMALL.n_head)
        x = rng.standard_normal((len(lay.ids), SMALL.n_embd))
    x = x.astype(np.float32)
    want, _ = fastmodel.block_forward(p, 1, x, attention, lora=spec)
    got = fastmodel.block_infer(p, 1, x, attention, lora=spec)
    assert got.dtype == want.dtype and np.array_equal(got, want)

def test_pooled_block_is_the_full_block_at_the_pooled_rows():
    p = small_params()
    x = np.random.default_rng(5).standard_normal((3, 6, SMALL.n_embd))
    pos = np.array([5, 0, 2])
    full, _ = model.block_forward(p, 1, x, SMALL.n_head)
    pooled, _ = fastmodel.block_forward_pooled(p, 1, x, pos, SMALL.n_head)
    assert rel_err(pooled, full[np.arange(3), pos]) <= 1e-12


def test_bad_arguments_are_one_clear_error():
    p = small_params()
    ids, lengths, labels = batch()
    for impl in (model, fastmodel):
        with pytest.raises(NpgptError):
            impl.loss_and_grads(p, SMALL, ids, labels, trainable=3)
        with pytest.raises(NpgptError):
            impl.loss_and_grads(p, SMALL, ids, labels, pooling="max")
        with pytest.raises(NpgptError):
            impl.forward_cls(p, SMALL, ids, lengths=np.array([7, 1, 1]))
        with pytest.raises(NpgptError, match="labels must have shape"):
            impl.loss_and_grads(p, SMALL, ids, labels[:2])
        with pytest.raises(NpgptError, match="x_start"):
            impl.loss_and_grads(p, SMALL, None, labels, trainable="all", x_start=np.zeros((3, 6, 8)))
