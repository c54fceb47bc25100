"""Edges: values exactly at a threshold, texts longer than the pad length, attention scores far
above the rest, float32 sums over long rows, empty and half-written claim files, and the bounds
of the settings (a value at the limit is allowed, one past it is not)."""
import os
import subprocess
import sys
import types

import numpy as np
import pytest

from npgpt import config as C, infer, kernels, model, ops, prefix_cache, runs
from npgpt.dataset import make_datasets
from npgpt.errors import NpgptError
from npgpt.evaluate import evaluate_classifier, roc_auc
from npgpt.finetune import macro_f1
from npgpt.runconfig import ConfigError, RunConfig

# ----------------------------------------------------------------------------- evaluate's binary metrics


def fake_classifier(P, labels=("ham", "spam")):
    return types.SimpleNamespace(labels=list(labels), truncated=[], predict_proba=lambda texts, progress=False: P)


def by_hand(P, y, pos, threshold=None):
    """Precision, recall, F1, the counts and ROC AUC of class `pos`, by their definitions."""
    s = P[:, pos]
    pred_pos = s >= threshold if threshold is not None else np.argmax(P, axis=1) == pos
    true_pos = y == pos
    tp, fp = int(np.sum(pred_pos & true_pos)), int(np.sum(pred_pos & ~true_pos))
    fn, tn = int(np.sum(~pred_pos & true_pos)), int(np.sum(~pred_pos & ~true_pos))
    pairs = [(a > b) + 0.5 * (a == b) for a in s[true_pos] for b in s[~true_pos]]
    return {"tp": tp, "fp": fp, "fn": fn, "tn": tn, "precision": tp / (tp + fp), "recall": tp / (tp + fn),
            "f1": 2 * tp / (2 * tp + fp + fn), "roc_auc": float(np.mean(pairs))}


P2 = np.array([[0.9, 0.1], [0.75, 0.25], [0.75, 0.25], [0.4, 0.6], [0.2, 0.8], [0.6, 0.4], [0.3, 0.7],
               [0.75, 0.25]])
Y2 = np.array([0, 0, 1, 1, 1, 0, 0, 0])


@pytest.mark.parametrize("positive", [None, "spam", "ham"])
@pytest.mark.parametrize("at_tie", [False, True])
def test_binary_metrics_of_either_positive_class_and_at_the_threshold(positive, at_tie):
    """Two classes, the positive one the second label (default) or the first: its precision,
    recall, F1, counts and ROC AUC (tied scores count one half) by their definitions; a score
    exactly at --threshold is called positive. Ties in the scores: ham 0.75 three times (spam
    0.25), the threshold set there."""
    pos = 0 if positive == "ham" else 1
    threshold = (0.75 if pos == 0 else 0.25) if at_tie else None
    out = evaluate_classifier(fake_classifier(P2), ["t"] * len(Y2), Y2, positive=positive, threshold=threshold)
    want = by_hand(P2, Y2, pos, threshold)
    for k, v in want.items():
        assert out[k] == pytest.approx(v, rel=1e-12), k
    assert out["positive"] == ["ham", "spam"][pos]
    if threshold is not None:                        # the three texts scored exactly at it are positive
        at = np.flatnonzero(P2[:, pos] == threshold)
        assert len(at) == 3 and out["tp"] + out["fp"] >= 3


def test_roc_auc_of_all_tied_scores_is_one_half():
    assert roc_auc(np.full(6, 0.3), np.array([1, 0, 1, 0, 0, 1], bool)) == 0.5


def test_macro_f1_is_scikit_learns():
    from sklearn.metrics import f1_score
    rng = np.random.default_rng(0)
    true, pred = rng.integers(0, 4, 50), rng.integers(0, 4, 50)
    pred[pred == 3] = 2                                              # class 3 never predicted
    assert macro_f1(true, pred, 5) == pytest.approx(
        f1_score(true, pred, labels=range(5), average="macro", zero_division=0), rel=1e-12)


# ----------------------------------------------------------------------------- texts longer than the pad length

CFG = C.GPT2Config(n_layer=2, n_head=2, n_embd=8, vocab_size=50257, n_ctx=32)


@pytest.mark.parametrize("pooling", ["last_position", "last_token"])
def test_packed_inference_of_texts_longer_than_the_pad_length(pooling):
    """A text of 13 tokens with pad length 6 (last_position: cut to 6, the head reads position 5;
    last_token: its own last token), among shorter ones: packed_logits gives each text what the
    textbook model gives it alone, padded as training pads it."""
    params = C.init_params(CFG, seed=3, num_classes=3)
    rng = np.random.default_rng(4)
    tokens = [rng.integers(0, 50000, n).tolist() for n in (13, 3, 6, 1, 9)]
    pad_to = 6 if pooling == "last_position" else None
    got = infer.packed_logits(params, CFG, tokens, pooling, pad_to=pad_to)
    for t, g in zip(tokens, got):
        ids = t[:6] + [50256] * (6 - min(len(t), 6)) if pad_to else t
        n = min(len(t), 6) if pad_to else len(t)
        want = model.forward_cls(params, CFG, np.array([ids]), np.array([n]), pooling)[0]
        assert np.abs(g - want).max() <= 1e-5


def test_validation_texts_longer_than_the_longest_training_text_are_cut(tok):
    """Padding "longest": the pad length is the longest training text's; validation and test
    texts are cut to it (their first tokens), as in the reference."""
    import pandas as pd
    frame = lambda texts: pd.DataFrame({"Label": [0] * len(texts), "Text": texts})
    long = "one two three four five six seven eight nine ten eleven twelve"
    train, val, test = make_datasets([frame(["a b c", "a b"]), frame([long, "a"]), frame(["x", long])], tok)
    assert train.pad_to == 3
    for d in (val, test):
        assert d.lengths.max() == 3
        i = int(np.argmax(d.lengths))
        assert list(d.tokens[i]) == tok.encode(long)[:3]


def test_a_text_holding_the_pad_tokens_text_is_plain_text(tok):
    """"<|endoftext|>" inside a training or classified text is five ordinary tokens, never the pad
    id 50256 (which would end the text for the model)."""
    import pandas as pd
    from npgpt.tokenizer import encode
    text = "win <|endoftext|> now"
    train = make_datasets([pd.DataFrame({"Label": [0], "Text": [text]})] * 3, tok)[0]
    assert list(train.tokens[0]) == encode(tok, text) and 50256 not in list(train.tokens[0])


# ----------------------------------------------------------------------------- kernels: large scores, long sums

def softmax64(a, axis=-1):
    a = a - a.max(axis=axis, keepdims=True)
    e = np.exp(a)
    return e / e.sum(axis=axis, keepdims=True)


def attention64(qkv, n_head, causal=True):
    """Attention in float64, max subtracted: the reference for every kernel below. qkv [B,T,3C]"""
    qkv = qkv.astype(np.float64)
    B, T, C3 = qkv.shape
    q, k, v = (ops.split_heads(a, n_head) for a in np.split(qkv, 3, axis=-1))    # [B,H,T,D]
    a = q @ k.transpose(0, 1, 3, 2) / np.sqrt(q.shape[-1])                     # [B,H,T,T]
    if causal:
        a = np.where(np.tril(np.ones((T, T), bool)), a, -np.inf)
    return ops.merge_heads(softmax64(a) @ v)                                   # [B,T,C]


def big_scores(B=2, T=40, C=16, seed=0):
    """qkv whose attention scores reach about 1e4: q and k large and aligned."""
    rng = np.random.default_rng(seed)
    qkv = rng.standard_normal((B, T, 3 * C)).astype(np.float32)
    qkv[..., :2 * C] *= 40
    return qkv


@pytest.mark.parametrize("causal", [True, False])
def test_attention_kernels_stay_finite_for_huge_scores(causal):
    """Scores far above exp's range (as cross-entropy does for huge logits): every kernel finite
    and equal to the float64 softmax with the maximum subtracted."""
    qkv, H = big_scores(), 2
    B, T, C3 = qkv.shape
    C = C3 // 3
    a = np.abs((qkv[..., :C] @ qkv[..., C:2 * C].transpose(0, 2, 1)) / np.sqrt(C // H))
    assert a.max() > 2000                                            # exp(2000) overflows float64
    want = attention64(qkv, H, causal)                               # [B,T,C]
    out, _ = kernels.attention_forward(qkv, H, causal)
    packed = kernels.attention_packed_forward(qkv.reshape(B * T, C3), np.array([0, T, 2 * T]), H, causal)
    got = {"attention_forward": out, "attention_packed_forward": packed.reshape(B, T, C)}
    if causal:
        path, pstarts = np.arange(B * T), np.array([0, T, 2 * T])
        tree = kernels.attention_tree_forward(qkv.reshape(B * T, C3), path, pstarts, np.zeros(B, np.int64), H)
        got["attention_tree_forward"] = tree.reshape(B, T, C)
        pos = np.array([T - 1, T // 2])
        query, _ = kernels.attention_query_forward(qkv[np.arange(B), pos, :C], qkv[..., C:], pos, H)
        full = attention64(qkv[:, :T // 2 + 1], H)                    # sequence 1 seen up to its pos
        got["attention_query_forward"] = query
        want_query = np.stack([want[0, T - 1], full[1, T // 2]])
    for name, g in got.items():
        w = want_query if name == "attention_query_forward" else want
        assert np.isfinite(g).all(), name
        assert np.abs(g - w).max() <= 1e-4 * np.abs(w).max(), name


def test_layernorm_kernel_sums_long_rows_as_float64_does():
    """4096 rows of 768 float32 values about 1000 apart from 0 with unit spread (large residual
    activations): the kernel's means and variances summed in float64 keep the output to float32
    rounding of the exact result; float32 sums would be off by about 1e-3."""
    rng = np.random.default_rng(0)
    x = (1000 + rng.standard_normal((4096, 768))).astype(np.float32)
    g = (1 + 0.1 * rng.standard_normal(768)).astype(np.float32)
    b = (0.1 * rng.standard_normal(768)).astype(np.float32)
    y, mean, rstd = kernels.layernorm_forward(x, g, b)
    want, saved = ops.layernorm_forward(x.astype(np.float64), g.astype(np.float64), b.astype(np.float64))
    assert y.dtype == np.float32
    assert np.abs(y - want).max() <= 2e-6
    assert np.abs(mean - x.astype(np.float64).mean(axis=1)).max() <= 1e-4


def test_one_query_attention_sums_many_keys_as_float64_does():
    """The last block's one-query kernel over 4096 keys whose values sit about 10 from 0: its
    float64 sums keep each output to float32 rounding of the exact weighted mean (float32 sums
    over that many terms would drift by several units in the last place)."""
    rng = np.random.default_rng(1)
    B, T, C, H = 2, 4096, 64, 2
    q = rng.standard_normal((B, C)).astype(np.float32)
    kv = rng.standard_normal((B, T, 2 * C)).astype(np.float32)
    kv[..., C:] += 10
    pos = np.array([T - 1, T - 1])
    out, _ = kernels.attention_query_forward(q, kv, pos, H)
    D = C // H
    want = np.empty((B, C))
    for h in range(H):
        k, v = kv[..., h * D:(h + 1) * D].astype(np.float64), kv[..., C + h * D:C + (h + 1) * D].astype(np.float64)
        a = softmax64(np.einsum("bd,btd->bt", q[:, h * D:(h + 1) * D].astype(np.float64), k) / np.sqrt(D))
        want[:, h * D:(h + 1) * D] = np.einsum("bt,btd->bd", a, v)
    ulp = np.spacing(np.float32(np.abs(want).max()))
    assert np.abs(out - want).max() <= 2 * ulp


# ----------------------------------------------------------------------------- claim files

def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


@pytest.mark.parametrize("content", ["", "  \n", "12a"])
def test_an_empty_or_half_written_claim_is_not_taken_over(tmp_path, content):
    """A claim file without a whole pid (being written, or unreadable) may belong to a live run:
    the folder is refused, naming the file to delete."""
    (tmp_path / runs.CLAIM).write_text(content)
    with pytest.raises(NpgptError, match=r"another training process .*delete"):
        runs.claim(str(tmp_path), "--out")
    assert (tmp_path / runs.CLAIM).read_text() == content


def test_a_live_claim_is_refused_and_a_dead_ones_taken_over(tmp_path):
    (tmp_path / runs.CLAIM).write_text(str(os.getppid()))
    with pytest.raises(NpgptError, match=f"pid {os.getppid()}"):
        runs.claim(str(tmp_path), "--resume")
    (tmp_path / runs.CLAIM).write_text(f"{dead_pid()}\n")
    runs.claim(str(tmp_path), "--resume")
    assert (tmp_path / runs.CLAIM).read_text() == str(os.getpid())
    runs.release(str(tmp_path))
    assert not (tmp_path / runs.CLAIM).exists()


# ----------------------------------------------------------------------------- limits

def test_an_array_exactly_at_the_memory_limit_stays_in_memory(tmp_path):
    """--cache-memory: a prefix of exactly that many bytes is held in memory, one byte more is
    memory-mapped from disk; the same numbers either way."""
    params = C.init_params(CFG, seed=1)
    seqs = [np.arange(5) + 100, np.arange(7) + 200]
    nbytes = 12 * CFG.n_embd * 4
    out = {}
    for limit in (nbytes, nbytes - 1):
        store = prefix_cache.PrefixCache(str(tmp_path / str(limit)), memory_limit=limit)
        flat, _ = store.activations(params, CFG, seqs, 1, "last_token")
        again, _ = store.activations(params, CFG, seqs, 1, "last_token")            # read from the entry
        out[limit] = (flat, again)
    for arr in out[nbytes]:
        assert not isinstance(arr, np.memmap)
    for arr in out[nbytes - 1]:
        assert isinstance(arr, np.memmap)
    assert np.array_equal(out[nbytes][0], out[nbytes - 1][1])


@pytest.mark.parametrize("field, at, past", [("max_length", 256, 257), ("trainable_blocks", 2, 3)])
def test_settings_at_their_limit_are_allowed_and_past_it_refused(field, at, past):
    """--tiny: a context of 256 tokens, 2 blocks."""
    assert getattr(RunConfig(model="tiny", **{field: at}), field) == at
    with pytest.raises(ConfigError):
        RunConfig(model="tiny", **{field: past})
