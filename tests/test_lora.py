"""LoRA: the linear pair against finite differences, the whole model with LoRA everywhere
against finite differences and against an independent PyTorch LoRA (tests/reference_torch_lora.py),
appendix E's parameter count, merging, and the classifier file."""
import numpy as np
import pytest
import torch

import reference_torch_lora as tref
from helpers import SMALL_GPT2 as TINY, numerical_grad, rel_err
from npgpt import fastmodel, fastops, lora, model, ops, optim, params as P
from npgpt.cli import lora as lora_cli
from npgpt.config import GPT2Config, preset


def lora_model(cfg, seed=0, dtype=np.float64, b_scale=0.3, **kw):
    """Random weights plus LoRA pairs; B made non-zero so that every gradient is non-trivial."""
    p = P.init_params(cfg, seed=seed, num_classes=2, dtype=dtype)
    spec = lora.add_lora(p, cfg, rank=3, alpha=5, seed=seed + 1, **kw)
    rng = np.random.default_rng(seed + 2)
    for k in p:
        if k.endswith("lora_B") and b_scale:
            p[k] = (rng.standard_normal(p[k].shape) * b_scale).astype(dtype)
    return p, spec


def batch(cfg, seed=0, B=3, T=6):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, cfg.vocab_size - 1, (B, T))
    lengths = np.array([T, 3, 4][:B])
    for b, n in enumerate(lengths):
        ids[b, n:] = model.PAD_ID
    return ids, lengths, rng.integers(0, 2, B)


# ----------------------------------------------------------------------------- the linear pair

def test_lora_linear_gradients_match_finite_differences():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, 5))
    w, b = rng.standard_normal((5, 4)), rng.standard_normal(4)
    A, B = rng.standard_normal((5, 2)), rng.standard_normal((2, 4))
    dy = rng.standard_normal((2, 3, 4))                      # a random upstream gradient
    scale = 1.7
    f = lambda: float((ops.lora_linear_forward(x, w, b, A, B, scale)[0] * dy).sum())
    y, saved = ops.lora_linear_forward(x, w, b, A, B, scale)
    np.testing.assert_allclose(y, x @ w + b + scale * (x @ A) @ B, rtol=1e-12)
    dx, dA, dB = ops.lora_linear_backward(dy, saved)
    for got, arr in ((dx, x), (dA, A), (dB, B)):
        assert rel_err(got, numerical_grad(f, arr)) < 1e-8
    assert ops.lora_linear_backward(dy, saved, need_dx=False)[0] is None


def test_init_like_kaiming_uniform():
    cfg = preset("124M")
    p = {"wte": np.zeros((1, 1), np.float32), "cls/b": np.zeros(2, np.float32)}
    spec = lora.add_lora(p, cfg, rank=16, seed=0)
    assert spec.alpha == 16 and spec.scale == 1.0
    A = p["h0/mlp/c_proj/lora_A"]
    assert A.shape == (3072, 16) and p["h0/mlp/c_proj/lora_B"].shape == (16, 768)
    assert np.abs(A).max() <= 0.25 and np.abs(A).max() > 0.24     # U(-1/sqrt(16), 1/sqrt(16))
    assert all(not p[k].any() for k in p if k.endswith("lora_B"))
    t = torch.empty(3072, 16)
    torch.nn.init.kaiming_uniform_(t, a=5 ** 0.5)                # torch's bound for the same shape
    assert abs(float(t.abs().max()) - 0.25) < 1e-3


def test_appendix_e_parameter_count():
    assert lora.count(preset("124M"), lora.LoraSpec(16, 16)) == 2_666_528
    names = lora.trainable_names(preset("124M"), lora.LoraSpec(16, 16))
    assert "h11/attn/c_attn/v/lora_B" in names and "cls/lora_A" in names and len(names) == 12 * 12 + 2


# ----------------------------------------------------------------------------- the whole model

IMPLS = {"textbook": model.loss_and_grads, "fast": fastmodel.loss_and_grads,
         "fast dense": lambda *a, **k: fastmodel.loss_and_grads(*a, dense=True, **k)}


@pytest.mark.parametrize("pooling,impl", [("last_token", "textbook"), ("last_token", "fast"),
                                          ("last_token", "fast dense"), ("last_position", "fast"),
                                          ("mean", "fast"), ("mean", "textbook")])
def test_model_lora_gradients_match_finite_differences(pooling, impl):
    p, spec = lora_model(TINY)
    ids, lengths, labels = batch(TINY)
    run = lambda: IMPLS[impl](p, TINY, ids, labels, trainable="lora", lengths=lengths, pooling=pooling, lora=spec)
    loss, grads, _ = run()
    assert set(grads) == set(lora.trainable_names(TINY, spec))  # no w, b or g gradient
    f = lambda: run()[0]
    rng = np.random.default_rng(1)
    for name in grads:
        idx = rng.choice(p[name].size, size=min(6, p[name].size), replace=False)
        num = numerical_grad(f, p[name], indices=idx).reshape(-1)[idx]
        got = grads[name].reshape(-1)[idx]
        assert rel_err(got, num) < 1e-6, name


@pytest.mark.parametrize("pooling", ["last_token", "first_token", "mean", "last_position"])
def test_packed_lora_training_equals_the_textbook(pooling):
    """LoRA training on the seen rows alone (the default: positions 0..pos[b] packed, the last
    block at the pooled rows) gives the textbook's loss, logits and LoRA gradients (float64),
    from the ids and from cached embeddings padded with zeros."""
    p, spec = lora_model(TINY)
    ids, lengths, labels = batch(TINY, B=3, T=7)
    lengths[0] = 5                          # every row padded: the seen rows end before T
    ids[0, 5:] = model.PAD_ID
    kw = dict(trainable="lora", lengths=lengths, pooling=pooling, lora=spec)
    ref = model.loss_and_grads(p, TINY, ids, labels, **kw)
    x0 = fastmodel.forward_prefix(p, TINY, ids, 0)
    if pooling != "last_position":          # the padding's embeddings are never read
        x0[np.arange(7)[None, :] >= lengths[:, None]] = 0.0
    for got in (fastmodel.loss_and_grads(p, TINY, ids, labels, **kw),
                fastmodel.loss_and_grads(p, TINY, None, labels, x_start=x0, **kw)):
        assert abs(got[0] - ref[0]) <= 1e-12 * abs(ref[0])
        assert rel_err(got[2], ref[2]) <= 1e-12
        assert set(got[1]) == set(ref[1]) == set(lora.trainable_names(TINY, spec))
        for name in ref[1]:
            assert rel_err(got[1][name], ref[1][name]) <= 1e-12, name


@pytest.mark.parametrize("targets,train_head", [(("attn",), False), (("mlp", "head"), False),
                                                (("attn", "mlp"), True), (("head",), False)])
def test_lora_targets_and_train_head(targets, train_head):
    p, spec = lora_model(TINY, targets=targets, train_head=train_head)
    ids, lengths, labels = batch(TINY)
    run = lambda: model.loss_and_grads(p, TINY, ids, labels, trainable="lora", lengths=lengths, lora=spec)
    grads = run()[1]
    want = set(lora.trainable_names(TINY, spec))
    assert set(grads) == want
    assert ("cls/w" in want) == train_head and ("cls/lora_A" in want) == ("head" in targets and not train_head)
    f = lambda: run()[0]
    for name in grads:
        idx = np.arange(min(4, p[name].size))
        assert rel_err(grads[name].reshape(-1)[idx], numerical_grad(f, p[name], indices=idx).reshape(-1)[idx]) < 1e-6


def test_lora_arrays_need_the_spec():
    p, spec = lora_model(TINY)
    ids, lengths, labels = batch(TINY)
    with pytest.raises(Exception, match="LoRA"):
        model.forward_cls(p, TINY, ids, lengths)


def test_zero_b_leaves_the_model_unchanged():
    p = P.init_params(TINY, seed=0, num_classes=2)
    ids, lengths, _ = batch(TINY)
    before = model.forward_cls(p, TINY, ids, lengths)
    spec = lora.add_lora(p, TINY, rank=4, seed=0)
    np.testing.assert_allclose(model.forward_cls(p, TINY, ids, lengths, lora=spec), before, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- merge and files

def test_merge_gives_the_same_logits():
    p, spec = lora_model(TINY, dtype=np.float32)
    ids, lengths, _ = batch(TINY)
    want = model.forward_cls(p, TINY, ids, lengths, lora=spec)
    merged = lora.merge(p, TINY, spec)
    assert not any(lora.is_lora_name(k) for k in merged)
    got = model.forward_cls(merged, TINY, ids, lengths)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    assert np.abs(want - model.forward_cls(p, TINY, ids, lengths, lora=lora.LoraSpec(3, 1))).max() > 1e-3


def test_file_round_trip_and_merge_cli(tmp_path, shared_data):
    from npgpt.classify import load_classifier
    p, spec = lora_model(TINY, dtype=np.float32)
    meta = {"kind": "npgpt-classifier", "labels": ["ham", "spam"], "pooling": "last_token",
            "max_length": None, "lora": spec.to_dict()}
    path = tmp_path / "classifier.h5"
    P.save_params(path, p, TINY, meta)
    q, cfg, meta2 = P.load_params(path)
    assert lora.spec_of(meta2) == spec and set(q) == set(p)
    bpe = str(shared_data / "gpt2_bpe")
    assert lora_cli.main(["merge", str(path), "--out", str(tmp_path / "merged.h5"), "--bpe-dir", bpe, "--quiet"]) == 0
    texts = ["WINNER!! Claim your free prize now", "see you at 8?", "ok"]
    a = load_classifier(path, bpe_dir=bpe).predict_proba(texts)
    b = load_classifier(tmp_path / "merged.h5", bpe_dir=bpe).predict_proba(texts)
    np.testing.assert_allclose(a, b, atol=1e-5)
    assert np.abs(a - 0.5).max() > 1e-3      # the LoRA pairs do change the probabilities
    with pytest.raises(Exception, match="LoRA"):
        lora_cli.main(["merge", str(tmp_path / "merged.h5"), "--out", str(tmp_path / "again.h5")])


@pytest.mark.parametrize("pooling", ["last_token", "first_token"])
def test_classifier_with_lora_matches_forward_cls(tmp_path, shared_data, pooling):
    """A LoRA classifier file scores texts as the model with its pairs does: last_token through
    packed inference on the merged weights (to float32 rounding), first_token batched."""
    from npgpt import infer
    from npgpt.classify import load_classifier
    p, spec = lora_model(TINY, dtype=np.float32)
    meta = {"kind": "npgpt-classifier", "labels": ["ham", "spam"], "pooling": pooling,
            "max_length": None, "lora": spec.to_dict()}
    P.save_params(tmp_path / "c.h5", p, TINY, meta)
    clf = load_classifier(tmp_path / "c.h5", bpe_dir=str(shared_data / "gpt2_bpe"))
    texts = ["WINNER!! Claim your free prize now", "see you at 8?", "ok", "see you at 8?"]
    tokens, _ = clf.encode(texts)
    want = np.concatenate([model.forward_cls(p, TINY, np.array([t]), pooling=pooling, lora=spec) for t in tokens])
    calls = []
    real = infer.packed_logits
    infer.packed_logits = lambda *a, **k: calls.append(1) or real(*a, **k)
    try:
        got = clf.logits_of_tokens(tokens)
    finally:
        infer.packed_logits = real
    assert bool(calls) == (pooling == "last_token")
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    assert np.abs(want[0] - model.forward_cls(lora.merge(p, TINY, spec), TINY, np.array([tokens[0]]),
                                           pooling=pooling)[0]).max() < 1e-4
    assert not any(lora.is_lora_name(k) for k in clf.merged_params()) and clf.merged_params() is clf.merged_params()


# ----------------------------------------------------------------------------- against PyTorch

def _compare(cfg, B, T, lengths, seed, logits_tol, grad_tol):
    p, spec = lora_model(cfg, seed=seed, dtype=np.float32, b_scale=0.05)
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, cfg.vocab_size - 1, (B, T))
    for b, n in enumerate(lengths):
        ids[b, n:] = model.PAD_ID
    labels = rng.integers(0, 2, B)
    tm = tref.build(p, cfg, rank=3, alpha=5)
    t_loss, t_grads, t_logits = tref.loss_and_grads(tm, ids, labels, lengths)
    loss, grads, logits = fastmodel.loss_and_grads(p, cfg, ids, labels, trainable="lora", lengths=lengths, lora=spec)
    assert np.abs(logits - t_logits).max() <= logits_tol
    assert abs(loss - t_loss) <= logits_tol
    assert set(grads) == set(t_grads)
    bad = {n: rel_err(grads[n], t_grads[n]) for n in grads if not rel_err(grads[n], t_grads[n]) <= grad_tol}
    assert not bad, bad


def test_tiny_matches_torch():
    _compare(GPT2Config(n_layer=2, n_head=4, n_embd=64, vocab_size=50257, n_ctx=64), 4, 10, [10, 3, 7, 1],
             seed=0, logits_tol=1e-5, grad_tol=1e-4)


def test_124M_shapes_match_torch():
    _compare(preset("124M"), 2, 6, [6, 4], seed=1, logits_tol=1e-4, grad_tol=1e-3)


def test_ten_adamw_steps_match_torch():
    """Appendix E's optimizer (AdamW lr 8e-4, weight decay 0.1) for 10 steps from a fresh LoRA
    (B = 0): npgpt on its gradients, torch on autograd's; every LoRA array ends up equal."""
    cfg = GPT2Config(n_layer=2, n_head=4, n_embd=64, vocab_size=50257, n_ctx=64)
    p = P.init_params(cfg, seed=3, num_classes=2)
    spec = lora.add_lora(p, cfg, rank=4, alpha=8, seed=4)
    tm = tref.build(p, cfg, rank=4, alpha=8)
    tp = tref.lora_params(tm)
    t_opt = torch.optim.AdamW(list(tp.values()), lr=8e-4, weight_decay=0.1)
    opt = optim.AdamW(lr=8e-4, weight_decay=0.1, update=fastops.adamw_update)     # as training runs it
    start = {k: v.copy() for k, v in p.items()}
    for step in range(10):
        rng = np.random.default_rng(100 + step)
        lengths = rng.integers(1, 9, 4)
        ids = rng.integers(0, 50000, (4, 8))
        labels = rng.integers(0, 2, 4)
        _, grads, _ = fastmodel.loss_and_grads(p, cfg, ids, labels, trainable="lora", lengths=lengths, lora=spec)
        opt.step(p, grads)
        tref.loss_and_grads(tm, ids, labels, lengths)
        t_opt.step()
    for n, t in tp.items():
        got, want = p[n], t.detach().numpy()
        assert np.abs(got - want).max() <= 2e-6, n
    assert np.abs(p["h1/mlp/c_fc/lora_B"] - start["h1/mlp/c_fc/lora_B"]).max() > 1e-3   # it did train
    for n in p:
        if not lora.is_lora_name(n):
            np.testing.assert_array_equal(p[n], start[n], err_msg=n)


def test_lora_training_run_end_to_end(tmp_path, shared_data):
    """`python -m npgpt.train --lora R` on a user's CSV: LoRA in every block means only the
    embeddings are cached (depth 0); the run trains, saves rank and alpha with the classifier, and
    the saved file scores the test split as training measured it."""
    import json
    from npgpt.cli import train
    from npgpt.classify import load_classifier
    import pandas as pd
    from pathlib import Path
    repo = Path(__file__).resolve().parent.parent
    out, bpe = tmp_path / "run", str(shared_data / "gpt2_bpe")
    assert train.main(["--tiny", "--lora", "4", "--epochs", "1", "--data", str(repo / "examples" / "support_tickets.csv"),
                       "--bpe-dir", bpe, "--out", str(out), "--quiet", "--no-plots"]) == 0
    clf = load_classifier(out / "classifier.h5")
    assert lora.spec_of(clf.meta).rank == 4
    test = pd.read_csv(out / "test.csv", keep_default_na=False, dtype={"Text": str, "Name": str})
    pred = clf.predict(list(test["Text"]))
    acc = float(np.mean(np.array(pred, dtype=object) == test["Name"].to_numpy(object)))
    final = json.loads((out / "metrics.json").read_text())["metrics"]["final"]
    assert acc == pytest.approx(final["test_accuracy"], abs=1e-9)
