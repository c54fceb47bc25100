"""Generation: the key/value cache gives the tokens that recomputing the prefix gives; greedy is
the argmax; sampling (chapter 5's temperature and top-k) draws from softmax(logits / T) over the
k largest logits, the same tokens for the same seed."""
import numpy as np
import pytest

from npgpt import params as P
from npgpt.config import GPT2Config
from npgpt.generate import generate, generate_greedy, lm_forward_cached, next_token
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
    assert all(part.dtype == np.float32 for part in parts) and cache[1][0].dtype == np.float32   # no float64 on the way


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


def test_text_stream_joins_split_characters(shared_data):
    """--stream's decoder: token by token, the pieces add up to the decoded text, emoji and CJK
    whose bytes span several tokens included (those tokens give "" until the character is whole)."""
    from npgpt.generate import TextStream
    from npgpt.tokenizer import encode, get_tokenizer

    tok = get_tokenizer(shared_data / "gpt2_bpe")
    text = "Smile 😀, ça va? 你好 — ok"
    ids = encode(tok, text)
    stream = TextStream(tok)
    pieces = [stream.add(i) for i in ids]
    assert "".join(pieces) + stream.end() == text
    assert "" in pieces                                   # some token ended inside a character
    cut = TextStream(tok)                                 # stopped inside the emoji
    emoji = encode(tok, "😀")
    assert len(emoji) > 1 and "".join(cut.add(i) for i in emoji[:-1]) == "" and cut.end() == "\ufffd"


def test_cli_prints_the_greedy_continuation_streamed_or_not(shared_data, tmp_path):
    """`python -m npgpt.generate` on a small random model with GPT-2's vocabulary: it prints the
    prompt and generate_greedy's tokens decoded, with --stream the same text; a literal
    "<|endoftext|>" in the prompt is plain text, as everywhere else."""
    import os
    import subprocess
    import sys

    from npgpt.tokenizer import decode, encode, get_tokenizer

    cfg = GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=50257, n_ctx=64)
    p = P.init_params(cfg, seed=3)
    rng = np.random.default_rng(4)
    p["wte"] = p["wte"] + rng.standard_normal(p["wte"].shape).astype(np.float32)   # varied tokens
    P.save_params(tmp_path / "small.h5", p, cfg)
    bpe = shared_data / "gpt2_bpe"
    tok = get_tokenizer(bpe)
    prompt = "Hi <|endoftext|> there, ça va? 😀"
    want = decode(tok, generate_greedy(p, cfg, np.array([encode(tok, prompt)]), 20)[0])
    assert want.startswith(prompt) and len(want) > len(prompt)
    env = dict(os.environ, PYTHONIOENCODING="utf-8")
    for extra in ([], ["--stream"]):
        r = subprocess.run([sys.executable, "-m", "npgpt.generate", prompt, "--weights", str(tmp_path / "small.h5"),
                            "--bpe-dir", str(bpe), "--max-new-tokens", "20", *extra],
                           capture_output=True, text=True, encoding="utf-8", env=env, cwd=tmp_path, timeout=300)
        assert r.returncode == 0, r.stderr
        assert r.stdout == want + "\n", extra


def moved_params(seed):
    """Random parameters moved off the init, so that the next-token distribution is not flat."""
    p = P.init_params(CFG, seed=seed)
    rng = np.random.default_rng(seed + 1)
    for k in p:
        p[k] = p[k] + rng.standard_normal(p[k].shape).astype(np.float32) * 0.3
    return p


def test_greedy_is_the_argmax_of_the_full_forward():
    p = moved_params(7)
    ids = np.array([[3, 14, 15, 92], [2, 7, 1, 8]])
    want = ids
    for _ in range(10):                      # the textbook loop: the whole sequence, the last position's argmax
        want = np.concatenate([want, np.argmax(forward_lm(p, CFG, want)[:, -1], axis=-1)[:, None]], axis=1)
    np.testing.assert_array_equal(generate(p, CFG, ids, 10), want)
    np.testing.assert_array_equal(generate_greedy(p, CFG, ids, 10), want)


@pytest.mark.parametrize("temperature", [0.0, 0.3, 1.0, 5.0])
def test_top_k_1_is_greedy_at_any_temperature(temperature):
    p = moved_params(7)
    ids = np.array([[3, 14, 15, 92]])
    for seed in (0, 1):
        np.testing.assert_array_equal(generate(p, CFG, ids, 12, temperature=temperature, top_k=1, seed=seed),
                                      generate_greedy(p, CFG, ids, 12))


def test_a_temperature_near_zero_is_greedy_not_nan():
    """logits / 1e-310 overflows; the sampled step must still be the argmax (a limit, not NaN)."""
    p = moved_params(7)
    ids = np.array([[3, 14, 15, 92]])
    np.testing.assert_array_equal(generate(p, CFG, ids, 8, temperature=1e-310, seed=0), generate_greedy(p, CFG, ids, 8))


def test_the_same_seed_gives_the_same_tokens_another_seed_others():
    p = moved_params(7)
    ids = np.array([[3, 14, 15, 92]])
    draw = lambda seed, cache=True: generate(p, CFG, ids, 20, temperature=1.0, top_k=20, seed=seed, use_cache=cache)
    np.testing.assert_array_equal(draw(5), draw(5))
    np.testing.assert_array_equal(draw(5), draw(5, cache=False))      # the cache changes no draw
    assert not np.array_equal(draw(5), draw(6))
    assert not np.array_equal(draw(5), generate_greedy(p, CFG, ids, 20))


@pytest.mark.parametrize("temperature, top_k", [(1.0, None), (0.7, 4), (2.0, 3)])
def test_sampled_tokens_follow_softmax_of_the_top_k_logits_over_t(temperature, top_k):
    """Many draws from fixed logits: a token outside the k largest never comes; the others come as
    often as softmax(logits / T) over the top k says (Pearson's chi-square, a fixed seed)."""
    logits = np.array([2.0, -1.0, 0.5, 3.0, 1.0, -0.5, 0.0, 1.5])            # [V]
    V, n = len(logits), 40_000
    keep = np.argsort(-logits)[:top_k or V]
    expected = np.zeros(V)
    z = logits[keep] / temperature
    expected[keep] = np.exp(z - z.max()) / np.exp(z - z.max()).sum() * n    # [V]
    drawn = next_token(np.tile(logits, (n, 1)), temperature, top_k, np.random.default_rng(1))   # [n,1]
    counts = np.bincount(drawn[:, 0], minlength=V)                          # [V]
    assert counts[expected == 0].sum() == 0                                 # never outside the top k
    chi2 = (((counts - expected) ** 2)[keep] / expected[keep]).sum()
    assert chi2 < 25.0, (counts, expected.round())    # df <= 7: P(chi2 > 24.3) = 0.001
    assert np.abs(counts - expected).max() < 0.02 * n


def test_bad_sampling_settings_are_named():
    from npgpt.errors import NpgptError
    p, ids = P.init_params(CFG, seed=5), np.array([[1, 2]])
    with pytest.raises(NpgptError, match="temperature"):
        generate(p, CFG, ids, 2, temperature=-1.0)
    with pytest.raises(NpgptError, match="top_k"):
        generate(p, CFG, ids, 2, temperature=1.0, top_k=0)


def test_cli_samples_with_tiny_and_a_seed(shared_data, tmp_path):
    """`python -m npgpt.generate --tiny --temperature 1.0 --top-k 5 --seed 1 "Hello"`: no weights
    needed; the same seed prints the same text, another seed other text; bad values are named."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, PYTHONIOENCODING="utf-8")
    env.pop("NPGPT_DEBUG", None)
    run = lambda *args: subprocess.run([sys.executable, "-m", "npgpt.generate", *args, "--bpe-dir",
                                        str(shared_data / "gpt2_bpe")], capture_output=True, text=True,
                                       encoding="utf-8", env=env, cwd=tmp_path, timeout=300)
    first = run("--tiny", "--temperature", "1.0", "--top-k", "5", "--seed", "1", "Hello")
    assert first.returncode == 0, first.stderr
    assert first.stdout.startswith("Hello") and len(first.stdout.strip()) > len("Hello")
    assert run("--tiny", "--temperature", "1.0", "--top-k", "5", "--seed", "1", "Hello").stdout == first.stdout
    assert run("--tiny", "--temperature", "1.0", "--top-k", "5", "--seed", "2", "Hello").stdout != first.stdout
    for args, message in ((["--temperature", "-0.5"], "--temperature must be"), (["--top-k", "0"], "--top-k must be"),
                          (["--weights", "w.h5"], "--tiny and --weights exclude each other")):
        r = run("--tiny", *args, "Hello")
        assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr, r.stderr
