"""Packed inference (npgpt.infer): the same probabilities as forward_cls on each text, whatever the
order, the repeats and the packing; and through the classifier that `classify` and `evaluate` use."""
import numpy as np
import pytest

from npgpt import infer, model, params as P
from npgpt.ops import softmax
from npgpt.config import GPT2Config


def _setup(seed=0, n=50, max_len=30, n_layer=3, K=3):
    cfg = GPT2Config(n_layer=n_layer, n_head=4, n_embd=64)
    params = P.init_params(cfg, seed=seed, num_classes=K)
    rng = np.random.default_rng(seed)
    tokens = [list(rng.integers(0, 50257, size=int(rng.integers(1, max_len)))) for _ in range(n)]
    for j in range(8, 16):                                          # texts that begin like others
        tokens.append(tokens[j][:1 + len(tokens[j]) // 2] + list(rng.integers(0, 50257, size=3)))
    tokens.append(tokens[20] + tokens[21][:2])                      # one text all prefix of another
    tokens += [tokens[3], tokens[0], tokens[3]]                     # repeats
    return cfg, params, tokens


def _one_by_one(params, cfg, tokens, pooling="last_token", pad_to=None):
    out = []
    for t in tokens:
        ids = np.array(t, dtype=np.int64)[None]
        if pad_to is not None:
            ids = np.full((1, pad_to), model.PAD_ID, np.int64)
            ids[0, :len(t)] = t[:pad_to]
        out.append(model.forward_cls(params, cfg, ids, lengths=np.array([min(len(t), pad_to or len(t))]),
                                     pooling=pooling)[0])
    return np.array(out)


@pytest.mark.parametrize("max_tokens", [1, 64, 2048])
def test_same_probabilities_as_forward_cls(max_tokens):
    cfg, params, tokens = _setup()
    got = infer.packed_logits(params, cfg, tokens, max_tokens=max_tokens)
    ref = _one_by_one(params, cfg, tokens)
    np.testing.assert_allclose(softmax(got), softmax(ref), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5)
    assert np.array_equal(got[-3], got[3]) and np.array_equal(got[-2], got[0])


def test_last_position_pooling_pads_as_training():
    cfg, params, tokens = _setup(seed=1, max_len=20)
    got = infer.packed_logits(params, cfg, tokens, pooling="last_position", pad_to=24)
    ref = _one_by_one(params, cfg, tokens, "last_position", 24)
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError):
        infer.packed_logits(params, cfg, tokens, pooling="last_position")


def test_progress_counts_every_distinct_token():
    cfg, params, tokens = _setup(seed=2, n=20)
    done = []
    infer.packed_logits(params, cfg, tokens, progress=done.append, max_tokens=50)
    assert sum(done) == sum(len(t) for t in {tuple(t) for t in tokens}) and len(done) > 1


def test_classifier_uses_it(tmp_path, shared_data):
    """Classifier.predict_proba (classify --file, evaluate) equals forward_cls text by text."""
    from npgpt.classify import load_classifier
    from npgpt.tokenizer import encode, get_tokenizer

    cfg, params, _ = _setup(seed=3, K=2, n_layer=2)
    path = tmp_path / "clf.h5"
    P.save_params(path, params, cfg, {"kind": "npgpt-classifier", "labels": ["ham", "spam"],
                                      "pooling": "last_token", "max_length": 120, "context_length": cfg.n_ctx,
                                      "pad_id": 50256, "tokenizer": "gpt2"})
    clf = load_classifier(str(path), bpe_dir=str(shared_data / "gpt2_bpe"))
    texts = ["Free entry to win a prize", "see you at 8?", "ok", "Free entry to win a prize",
             "Call now " * 20]
    got = clf.predict_proba(texts)
    tok = get_tokenizer(shared_data / "gpt2_bpe")
    ref = softmax(_one_by_one(params, cfg, [encode(tok, t)[:120] for t in texts]))
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)
