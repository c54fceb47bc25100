"""Text generation with a key/value cache: greedy (the check that pretrained weights loaded
right), or sampled with a temperature and top-k as chapter 5 of the book defines them.

    python -m npgpt.generate "Every effort moves you" --max-new-tokens 15
    python -m npgpt.generate "Every effort moves you" --temperature 1.4 --top-k 25 --seed 123

With OpenAI's 124M weights the first prints
"Every effort moves you forward.\\n\\nThe first step is to understand the importance of your work".

With the cache, each new token runs the model at one position: the keys and values of earlier
positions are kept per block, so attention of the new query reads them instead of recomputing
the prefix.

The next token, from the last position's logits z [V] (`next_token`):
    top-k        keep the k largest logits, set the others to -inf (ties with the k-th are kept)
    temperature  T = 0: the argmax (greedy); T > 0: draw from softmax(z / T), with a seeded
                 generator. T < 1 sharpens the distribution towards the argmax, T > 1 flattens it.
"""
from __future__ import annotations

if __name__ == "__main__":      # `python -m npgpt.generate`: the command line, npgpt.cli.generate
    from npgpt.cli import hand_over
    hand_over("generate")

import numpy as np

from . import fastops
from .config import GPT2Config
from .errors import NpgptError


def _attend(q, k, v, start):
    """Queries at positions start..start+t-1 against keys 0..start+t-1, causal.

    q [B,H,t,D], k [B,H,S,D], v [B,H,S,D] (S = start + t) -> [B,H,t,D]"""
    t, S, D = q.shape[2], k.shape[2], q.shape[3]
    scores = (q @ k.transpose(0, 1, 3, 2)) / q.dtype.type(np.sqrt(D))      # [B,H,t,S] in q's dtype
    future = np.arange(S)[None, :] > (start + np.arange(t))[:, None]       # [t,S]
    scores = np.where(future, -np.inf, scores)
    scores = scores - scores.max(axis=-1, keepdims=True)
    e = np.exp(scores)
    return (e / e.sum(axis=-1, keepdims=True)) @ v                          # [B,H,t,D]


def lm_forward_cached(params, config: GPT2Config, ids, cache: list):
    """LM logits for new tokens ids [B,t] that follow the positions already in `cache`.

    cache: one (k, v) pair per block, each [B,H,S,D] (an empty list to start); extended in place.
    -> logits [B,t,V]"""
    B, t = ids.shape
    H, C = config.n_head, config.n_embd
    start = cache[0][0].shape[2] if cache else 0
    if start + t > config.n_ctx:
        raise NpgptError(f"sequence would exceed the context length {config.n_ctx}")
    x = params["wte"][ids] + params["wpe"][start:start + t]                 # [B,t,C]
    for i in range(config.n_layer):
        p = lambda n: params[f"h{i}/{n}"]
        h, _ = fastops.layernorm_forward(x, p("ln_1/g"), p("ln_1/b"))            # [B,t,C]
        qkv = h @ p("attn/c_attn/w") + p("attn/c_attn/b")                   # [B,t,3C]
        q, k, v = (a.reshape(B, t, H, C // H).transpose(0, 2, 1, 3)
                   for a in np.split(qkv, 3, axis=-1))                      # [B,H,t,D] each
        if len(cache) > i:
            k = np.concatenate([cache[i][0], k], axis=2)                    # [B,H,S,D]
            v = np.concatenate([cache[i][1], v], axis=2)
            cache[i] = (k, v)
        else:
            cache.append((k, v))
        a = _attend(q, k, v, start).transpose(0, 2, 1, 3).reshape(B, t, C)  # [B,t,C]
        x = x + a @ p("attn/c_proj/w") + p("attn/c_proj/b")                 # [B,t,C]
        h, _ = fastops.layernorm_forward(x, p("ln_2/g"), p("ln_2/b"))            # [B,t,C]
        f, _ = fastops.gelu_forward(h @ p("mlp/c_fc/w") + p("mlp/c_fc/b"))      # [B,t,4C]
        x = x + f @ p("mlp/c_proj/w") + p("mlp/c_proj/b")                   # [B,t,C]
    h, _ = fastops.layernorm_forward(x, params["ln_f/g"], params["ln_f/b"])      # [B,t,C]
    return h @ params["wte"].T                                              # [B,t,V]


def next_token(logits, temperature: float = 0.0, top_k: int | None = None, rng=None) -> np.ndarray:
    """The next token of each row of logits [B,V] -> [B,1] int64: the book's `generate` step.

    top_k: only the k largest logits of a row stay candidates (the rest become -inf).
    temperature 0: the largest logit (greedy); above 0: a draw from softmax(logits / temperature)
    with `rng` (a numpy Generator; a fresh unseeded one if None)."""
    from .ops import softmax

    logits = np.asarray(logits, dtype=np.float64)                           # [B,V]
    if top_k is not None:
        k = min(int(top_k), logits.shape[1])
        kth = np.partition(logits, -k, axis=1)[:, -k][:, None]              # [B,1] the k-th largest
        logits = np.where(logits < kth, -np.inf, logits)                    # [B,V]
    if temperature == 0:
        return np.argmax(logits, axis=1)[:, None]                           # [B,1]
    # the largest logit subtracted first: a tiny temperature then sends the others to -inf, not
    # every logit to +-inf (inf - inf would be NaN); softmax is unchanged by the shift
    with np.errstate(over="ignore"):                                        # (-large / tiny T -> -inf: meant)
        probs = softmax((logits - logits.max(axis=1, keepdims=True)) / temperature)   # [B,V], 0 outside the top k
    rng = np.random.default_rng() if rng is None else rng
    return np.array([[rng.choice(probs.shape[1], p=row)] for row in probs], dtype=np.int64)   # [B,1]


def generate(params, config: GPT2Config, ids, max_new_tokens: int, temperature: float = 0.0,
             top_k: int | None = None, seed: int | None = None, use_cache=True, progress=None):
    """Append max_new_tokens tokens to ids [B,T] -> [B,T+max_new_tokens], each chosen by
    `next_token` (greedy by default; sampled with temperature > 0, from a generator seeded with
    `seed`: the same seed gives the same tokens).

    use_cache=False recomputes the whole prefix for every token (the slow reference)."""
    from .model import forward_lm

    if not temperature >= 0 or not np.isfinite(temperature):
        raise NpgptError(f"temperature must be a finite number >= 0, got {temperature}")
    if top_k is not None and top_k < 1:
        raise NpgptError(f"top_k must be at least 1, got {top_k}")
    rng = np.random.default_rng(seed)
    ids = np.asarray(ids, dtype=np.int64)
    if ids.shape[1] + max_new_tokens > config.n_ctx:
        raise NpgptError(f"prompt ({ids.shape[1]} tokens) + {max_new_tokens} new tokens exceed "
                         f"the context length {config.n_ctx}")
    cache: list = []
    new = ids
    for _ in range(max_new_tokens):
        if use_cache:
            logits = lm_forward_cached(params, config, new, cache)          # [B,t,V]
        else:
            logits = forward_lm(params, config, ids)                        # [B,T,V]
        new = next_token(logits[:, -1], temperature, top_k, rng)            # [B,1]
        ids = np.concatenate([ids, new], axis=1)
        if progress:
            progress(new)
    return ids


def generate_greedy(params, config: GPT2Config, ids, max_new_tokens: int, use_cache=True, progress=None):
    """Append max_new_tokens greedy (argmax) tokens to ids [B,T] -> [B,T+max_new_tokens]."""
    return generate(params, config, ids, max_new_tokens, use_cache=use_cache, progress=progress)


class TextStream:
    """Token ids in, text out, one token at a time. A GPT-2 token is a run of bytes that may end
    inside a UTF-8 character (an emoji is often 2-3 tokens): its bytes wait until the character
    is whole, so the pieces joined are `tok.decode(ids)`, never a "\ufffd" per half character."""

    def __init__(self, tok):
        import codecs
        self.tok = tok
        self.utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def add(self, token_id: int) -> str:
        """The text this token completes ("" while a character is still incomplete)."""
        return self.utf8.decode(self.tok.decode_single_token_bytes(token_id))

    def end(self) -> str:
        """What is left: a character cut off by the last token, as "\ufffd"."""
        return self.utf8.decode(b"", final=True)
