"""Shared first tokens computed once (npgpt.prefix_tree): the layout, and the frozen prefix it
computes against each sequence alone (float64 to 1e-12, float32 to 1e-5) and across depths."""
import numpy as np
import pytest

from npgpt import fastmodel, model, params as P, prefix_tree
from npgpt.config import GPT2Config
from npgpt.prefix_cache import PrefixCache

CFG = GPT2Config(n_layer=3, n_head=2, n_embd=8, vocab_size=11, n_ctx=16)


def params(dtype, seed=1):
    p = P.init_params(CFG, seed=seed, num_classes=2, dtype=dtype)
    rng = np.random.default_rng(seed + 100)
    return {k: (v + rng.standard_normal(v.shape) * 0.1).astype(dtype) for k, v in p.items()}


def alike_sequences(seed=0, n=40):
    """Distinct sequences over 3 token ids, so many begin alike (and some are prefixes of others)."""
    rng = np.random.default_rng(seed)
    seen = {}
    while len(seen) < n:
        s = tuple(int(t) for t in rng.integers(0, 3, rng.integers(1, 9)))
        seen.setdefault(s, np.array(s))
    return list(seen.values())


def test_layout_computes_each_distinct_prefix_once():
    seqs = alike_sequences()
    order = prefix_tree.lexicographic(seqs)
    ordered = [seqs[j] for j in order]
    assert [tuple(s) for s in ordered] == sorted(tuple(s) for s in seqs)
    lay = prefix_tree.layout(ordered)
    prefixes = {tuple(s[:k]) for s in seqs for k in range(1, len(s) + 1)}
    assert len(lay.ids) == len(prefixes) < sum(map(len, seqs))    # one row per distinct prefix
    owners = np.zeros(len(lay.ids), int)
    for m, s in enumerate(ordered):
        rows = lay.rows_of(m)
        np.testing.assert_array_equal(lay.ids[rows], s)            # its tokens, position by position
        np.testing.assert_array_equal(lay.pos[rows], np.arange(len(s)))
        owned = rows[lay.first_new[m]:]
        assert np.all(lay.seq[owned] == m)
        owners[owned] += 1
        if m:
            k = prefix_tree.common_prefix(ordered[m - 1], s)
            assert lay.first_new[m] == min(k, len(s) - 1)
    assert np.all(owners == 1)                                     # every row computed once


def test_common_prefix_and_shared_lengths():
    a, b, c = np.array([1, 2, 3]), np.array([1, 2, 4, 5]), np.array([1, 2])
    assert prefix_tree.common_prefix(a, b) == 2 and prefix_tree.common_prefix(a, c) == 2
    assert prefix_tree.common_prefix(c, np.array([3])) == 0
    # a sequence that is all prefix of the one before still computes its last row
    np.testing.assert_array_equal(prefix_tree.shared_lengths([a, b, c]), [0, 2, 1])


@pytest.mark.parametrize("max_tokens", [1, 12, 10_000])
@pytest.mark.parametrize("dtype,tol", [(np.float64, 1e-12), (np.float32, 1e-5)])
def test_shared_prefix_equals_each_sequence_alone(dtype, tol, max_tokens):
    p = params(dtype)
    seqs = alike_sequences(seed=3, n=25)
    flat, off = PrefixCache(use_disk=False, max_tokens=max_tokens).activations(p, CFG, seqs, 3, "t")
    for j, s in enumerate(seqs):
        ref = model.forward_prefix(p, CFG, s[None], 3)[0]
        got = flat[off[j]:off[j + 1]]
        assert np.abs(got - ref).max() <= tol * np.abs(ref).max(), j


def test_from_a_cached_depth_the_same_bits(tmp_path):
    p = params(np.float32)
    seqs = alike_sequences(seed=5, n=30)
    cache = PrefixCache(tmp_path / "a", max_tokens=16, log=lambda s: None)
    cache.activations(p, CFG, seqs, 1, "t")                         # depth 1 on disk
    via, _ = cache.activations(p, CFG, seqs, 3, "t")                # blocks 1..2 from it
    direct, _ = PrefixCache(tmp_path / "b", max_tokens=16, log=lambda s: None).activations(p, CFG, seqs, 3, "t")
    np.testing.assert_array_equal(np.asarray(via), np.asarray(direct))


def test_tree_rows_are_forward_only():
    p = params(np.float64)
    lay = prefix_tree.layout([np.array([1, 2]), np.array([1, 3])])
    tree = fastmodel.SharedPrefix(*lay.tree, CFG.n_head)
    x, saved = fastmodel.block_forward(p, 0, np.zeros((3, CFG.n_embd)), tree)
    with pytest.raises(NotImplementedError, match="forward only"):
        fastmodel.block_backward(x, saved, 0, {}, tree)
