"""Greedy generation: the key/value cache gives the tokens that recomputing the prefix gives."""
import numpy as np

from npgpt import params as P
from npgpt.config import GPT2Config
from npgpt.generate import generate_greedy, lm_forward_cached
from npgpt.model import forward_lm

CFG = GPT2Config(n_layer=2, n_head=4, n_embd=32, vocab_size=101, n_ctx=64)


def test_cached_logits_equal_full_forward():
    p = P.init_params(CFG, seed=5)
    ids = np.random.default_rng(0).integers(0, 101, (2, 9))
    full = forward_lm(p, CFG, ids)                               # [B,T,V]
    cache = []
    parts = [lm_forward_cached(p, CFG, ids[:, :4], cache)]       # a prompt, then one token at a time
    for t in range(4, 9):
        parts.append(lm_forward_cached(p, CFG, ids[:, t:t + 1], cache))
    np.testing.assert_allclose(np.concatenate(parts, axis=1), full, rtol=1e-4, atol=1e-5)
    assert cache[0][0].shape == (2, 4, 9, 8)


def test_greedy_cache_matches_recompute():
    p = P.init_params(CFG, seed=7)
    rng = np.random.default_rng(1)
    for k in p:   # move off the init so the continuation varies and the argmax is no near-tie
        p[k] = p[k] + rng.standard_normal(p[k].shape).astype(np.float32) * 0.3
    ids = np.array([[3, 14, 15, 92]])
    a = generate_greedy(p, CFG, ids, 12, use_cache=True)
    b = generate_greedy(p, CFG, ids, 12, use_cache=False)
    assert a.shape == (1, 16)
    np.testing.assert_array_equal(a, b)
    assert len(set(a[0, 4:].tolist())) > 1     # not a degenerate constant continuation
