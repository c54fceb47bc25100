"""npgpt.explain: each token's gradient x input for one class logit, by npgpt's own backward.

- d logit / d x (x = the embedding output) against central finite differences in float64, on a
  tiny model with a padded row, for every pooling, with and without the causal mask; and the
  scores, sum_c x[t,c] * d logit / d x[t,c], from those differences.
- `explain` on a Classifier against torch autograd on the reference model (tests/reference_torch.py)
  holding the same float32 weights, for every pooling (last_position padded to the training length).
- What explain reads is what inference reads: its logit is `logits_of_tokens`'s, for a LoRA model
  too (merged weights) and without the causal mask; a text past the limit is cut and counted;
  the token texts join back into the (cut) text; the default label is the predicted one.
- A label by name; an unknown label is one NpgptError line naming the model's labels.
- `python -m npgpt.classify --explain`: a two-column list off a terminal (and with NO_COLOR), the
  tokens coloured in place on one; --json adds each text's explanation; a bad --label is one line.
"""
import json
import re
import sys

import numpy as np
import pytest
import torch

import reference_torch as ref
from helpers import SMALL_GPT2, numerical_grad, one_error_line, rel_err, run_module, cli_env
from test_vs_torch import scaled_params
from npgpt import explain as ex
from npgpt import lora, model
from npgpt.classify import Classifier, load_classifier
from npgpt.cli import classify as classify_cli
from npgpt.cli import explain_view
from npgpt.config import preset
from npgpt.errors import NpgptError
from npgpt.tokenizer import decode, encode

FD_RTOL = 1e-7        # float64 central differences (h = 1e-6) against the backward: measured ~1e-9
TORCH_RTOL = 1e-4     # float32 npgpt against float32 torch, per text: max|diff| / max|score|
LOGIT_ATOL = 1e-5     # float32 logits of the same text by explain and by torch
LOGIT_RTOL = 2e-5     # ... by explain and by inference (another path, LoRA merged or not): measured 6e-6
TEXT = "Congratulations! You have won a free cruise to the Bahamas, call 0800 now"
ANSI = re.compile(r"\x1b\[[0-9;]*m")


def classifier(tok, pooling="last_token", max_length=None, causal=True, with_lora=False, seed=0):
    """A tiny Classifier with random weights scaled as test_vs_torch's (logits O(1))."""
    config = preset("tiny")
    params = scaled_params(config, seed)
    meta = {} if causal else {"causal_mask": False}
    if with_lora:
        spec = lora.add_lora(params, config, rank=2, alpha=4, seed=seed + 1)
        for k in params:
            if k.endswith("lora_B"):
                params[k] = np.random.default_rng(seed + 2).standard_normal(params[k].shape).astype(np.float32) * 0.3
        meta["lora"] = spec.to_dict()
    return Classifier(params=params, config=config, labels=["ham", "spam"], pooling=pooling,
                      max_length=max_length, tok=tok, meta=meta)


# ----------------------------------------------------------------------------- finite differences

@pytest.mark.parametrize("causal", [True, False], ids=["causal", "no-mask"])
@pytest.mark.parametrize("pooling", model.POOLINGS)
def test_input_gradient_and_scores_match_finite_differences(pooling, causal):
    config = SMALL_GPT2
    params = {k: v.astype(np.float64) for k, v in scaled_params(config, seed=3).items()}
    rng = np.random.default_rng(4)
    ids = rng.integers(0, 1000, size=(2, 6))
    lengths = np.array([6, 4])
    ids[1, 4:] = model.PAD_ID
    x, _ = model.ops.embedding_forward(ids, params["wte"], params["wpe"])          # [2,6,8] float64
    pos = model.pooled_positions(ids, lengths, pooling)
    label = 1

    logits, tape = ex.forward_with_tape(params, config, x, pos, pooling, causal)
    dlogits = np.zeros_like(logits)
    dlogits[:, label] = 1
    dx = ex.input_gradient(dlogits, tape)                                          # [2,6,8]
    f = lambda: float(model.forward_cls(params, config, x_start=x, lengths=lengths, pooling=pooling,
                                        causal=causal)[:, label].sum())            # rows independent
    num = numerical_grad(f, x)
    assert np.abs(num).max() > 1e-3                                                # something to compare
    assert rel_err(dx, num) < FD_RTOL

    got_logits, labels, scores = ex.gradient_x_input(params, config, ids, lengths, label, pooling, causal)
    assert np.array_equal(labels, [label, label])
    assert np.allclose(got_logits, logits, rtol=0, atol=1e-12)
    assert rel_err(scores, (x * num).sum(axis=-1)) < FD_RTOL


# ----------------------------------------------------------------------------- torch autograd

def torch_scores(clf, text, k):
    """gradient x input of logit k by torch autograd on the reference model, with the ids padded
    as the classifier's inference pads them -> (logit, scores of the real tokens)."""
    tm = ref.load_from_npgpt(clf.params, clf.config, torch.float32, trainable_names=())   # d/dx only
    ids = encode(clf.tok, text)
    n = len(ids)
    T = clf.max_length if clf.pooling == "last_position" else n
    padded = torch.tensor([ids + [ref.PAD_ID] * (T - n)])                          # [1,T]
    x = (tm.wte(padded) + tm.wpe(torch.arange(T))).detach().requires_grad_(True)   # [1,T,C]
    h = x
    for block in tm.h:
        h = block(h)
    h = tm.ln_f(h)[0]                                                               # [T,C]
    pooled = {"last_token": h[n - 1], "last_position": h[T - 1], "first_token": h[0],
              "mean": h[:n].mean(axis=0)}[clf.pooling]
    logit = tm.cls(pooled)[k]
    logit.backward()
    return float(logit.detach()), (x * x.grad).sum(-1)[0, :n].detach().numpy()


@pytest.mark.parametrize("pooling", model.POOLINGS)
def test_explain_matches_torch_autograd(tok, pooling):
    clf = classifier(tok, pooling, max_length=24)
    assert len(encode(tok, TEXT)) < 24                                             # last_position reads pads
    for label in ("ham", "spam"):
        got = clf.explain(TEXT, label)
        logit, scores = torch_scores(clf, TEXT, clf.labels.index(label))
        print(f"{pooling} {label}: rel err {rel_err(got.scores, scores):.2e}")
        assert abs(got.logit - logit) < LOGIT_ATOL
        assert np.abs(scores).max() > 1e-2
        assert rel_err(got.scores, scores) < TORCH_RTOL


# ----------------------------------------------------------------------------- what inference reads

@pytest.mark.parametrize("pooling, causal, with_lora", [
    ("last_token", True, True), ("mean", False, False), ("last_position", True, True), ("first_token", False, True)])
def test_explain_reads_the_text_as_inference_does(tok, pooling, causal, with_lora):
    clf = classifier(tok, pooling, max_length=12, causal=causal, with_lora=with_lora)
    tokens, cut = clf.encode([TEXT])
    logits = clf.logits_of_tokens(tokens)[0]                                       # [K]
    n_tokens = len(encode(tok, TEXT))
    reads_padding = pooling == "last_position" or not causal
    assert cut == ([0] if reads_padding else [])                                   # cut to 12 only then

    got = clf.explain(TEXT)
    assert got.label == clf.labels[int(np.argmax(logits))]                         # default: the predicted one
    assert abs(got.logit - logits[clf.labels.index(got.label)]) < LOGIT_RTOL * np.abs(logits).max()
    other = clf.explain(TEXT, label=clf.labels[1 - clf.labels.index(got.label)])
    assert other.label != got.label
    assert abs(other.logit - logits[clf.labels.index(other.label)]) < LOGIT_RTOL * np.abs(logits).max()
    assert len(got.tokens) == len(got.scores) == len(tokens[0])
    assert "".join(got.tokens) == decode(tok, tokens[0])
    assert got.truncated == (n_tokens - 12 if reads_padding else 0)


def test_a_character_split_over_tokens_goes_to_the_token_that_completes_it(tok):
    text = "ok 🎉 done"
    got = classifier(tok).explain(text)
    assert len(got.tokens) == len(encode(tok, text)) and "".join(got.tokens) == text
    assert "\ufffd" not in "".join(got.tokens)


def test_label_by_name_and_an_unknown_label(tok):
    clf = classifier(tok)
    d = clf.explain("see you at six", label="spam").to_dict()
    assert d["label"] == "spam" and [t["token"] for t in d["tokens"]] == ["see", " you", " at", " six"]
    assert json.loads(json.dumps(d)) == d and d["truncated"] == 0
    with pytest.raises(NpgptError) as e:
        clf.explain("see you", label="Spam")
    assert str(e.value) == "label 'Spam' is not one of the model's labels: 'ham', 'spam'"


# ----------------------------------------------------------------------------- the command line

@pytest.fixture(scope="module")
def model_file(tmp_path_factory, tok, bpe_dir):
    path = tmp_path_factory.mktemp("explain") / "classifier.h5"
    clf = classifier(tok)
    clf.bpe_dir = bpe_dir                  # the folder its tokenizer came from: save stores its files
    clf.save(path)
    return path


class Terminal:
    """A stdout that says it is a terminal."""
    def __init__(self):
        self.parts = []

    def write(self, s):
        self.parts.append(s)

    def flush(self):
        pass

    def isatty(self):
        return True


def test_cli_explain_off_a_terminal_is_a_two_column_list(model_file, bpe_dir, capsys, monkeypatch):
    monkeypatch.delenv("NO_COLOR", raising=False)
    clf = load_classifier(model_file, bpe_dir)
    assert classify_cli.main(["--model", str(model_file), "--bpe-dir", bpe_dir, "--explain", "--label", "spam",
                              TEXT, "see you"]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out
    lines = out.splitlines()
    for name, text in (("text 1", TEXT), ("text 2", "see you")):
        exp = clf.explain(text, "spam")
        p = clf.predict_proba([text])[0, 1]
        start = lines.index(f"{name}  spam  {p:.3f}  (logit {exp.logit:.3f})")
        rows = [line.rsplit(None, 1) for line in lines[start + 1:start + 1 + len(exp.tokens)]]
        assert [json.loads(t) for t, _ in rows] == exp.tokens
        assert np.allclose([float(s) for _, s in rows], exp.scores, rtol=0, atol=1e-6)
    assert len(lines) == 2 + len(encode(clf.tok, TEXT)) + 2


def test_cli_explain_on_a_terminal_colours_the_tokens(model_file, bpe_dir, monkeypatch):
    monkeypatch.delenv("NO_COLOR", raising=False)
    term = Terminal()
    monkeypatch.setattr(sys, "stdout", term)
    assert classify_cli.main(["--model", str(model_file), "--bpe-dir", bpe_dir, "--explain", TEXT]) == 0
    out = "".join(term.parts)
    assert ANSI.sub("", out).splitlines()[-1] == TEXT
    exp = load_classifier(model_file, bpe_dir).explain(TEXT)
    colours = [int(c) for c in re.findall(r"\x1b\[30;48;5;(\d+)m", out)]
    assert len(colours) == len(exp.tokens)
    top = int(np.argmax(np.abs(exp.scores)))
    assert colours[top] == (explain_view.TOWARDS if exp.scores[top] > 0 else explain_view.AWAY)[-1]
    assert all(c in (explain_view.TOWARDS if s >= 0 else explain_view.AWAY) for c, s in zip(colours, exp.scores))

    monkeypatch.setenv("NO_COLOR", "1")
    term.parts.clear()
    assert classify_cli.main(["--model", str(model_file), "--bpe-dir", bpe_dir, "--explain", TEXT]) == 0
    assert "\x1b" not in "".join(term.parts)


def test_colours_by_sign_and_by_fraction_of_the_largest_score():
    out = explain_view.coloured(["a", "b", "c", "d", "e", "\x1b"], [1.0, -0.5, 0.1, -1.0, 0.3, 0.0])
    T, A = explain_view.TOWARDS, explain_view.AWAY      # four shades: |score| / max in quarters
    want = [T[3], A[2], T[0], A[3], T[1], T[0]]
    assert [int(c) for c in re.findall(r"48;5;(\d+)m", out)] == want
    assert ANSI.sub("", out) == "abcde\\x1b"                                     # an escape is shown, not sent


def test_cli_explain_json_and_a_bad_label(model_file, bpe_dir, capsys, tmp_path_factory, tmp_path):
    assert classify_cli.main(["--model", str(model_file), "--bpe-dir", bpe_dir, "--explain", "--json", TEXT]) == 0
    item = json.loads(capsys.readouterr().out)[0]
    assert item["explanation"] == load_classifier(model_file, bpe_dir).explain(TEXT).to_dict()
    r = run_module("npgpt.classify", "--model", model_file, "--bpe-dir", bpe_dir, "--explain", "--label", "eggs",
                   "hi", env=cli_env(tmp_path_factory), cwd=tmp_path)
    assert one_error_line(r, 1) == "error: --label 'eggs' is not one of the model's labels: 'ham', 'spam'"
    r = run_module("npgpt.classify", "--model", model_file, "--label", "spam", "hi",
                   env=cli_env(tmp_path_factory), cwd=tmp_path)
    assert "--label needs --explain" in one_error_line(r, 2)
