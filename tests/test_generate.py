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
