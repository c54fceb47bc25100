"""npgpt.classify and npgpt.evaluate as a library, on tiny classifiers trained for one epoch.

- A saved classifier predicts what the model itself computes: `Classifier` against
  `forward_cls` on the test split tokenized as training did, and evaluate's test accuracy equal
  to the accuracy training wrote to metrics.json.
- Last-token pooling: a text's probabilities do not depend on its batch (tolerance 1e-5).
- Last-position pooling: texts are padded to the training length, as `forward_cls` is given them.
- Length: last-token pooling reads a text up to the context (n_ctx), past the training length;
  last-position pooling cuts it to the training length and names the fix.
- Bad and unusual text: empty and whitespace-only texts are one-line DataErrors; emoji, CJK,
  Arabic, control characters work; a text far longer than the limit is cut, and says so.
- The metric formulas on a hand-made confusion matrix.
"""
import json
import os

import numpy as np
import pytest

from npgpt.classify import classify, load_classifier
from npgpt.cli import shorten
from npgpt.predictions import read_lines
from npgpt.data import prepare_splits
from npgpt.dataset import make_batch, make_datasets
from npgpt.ops import softmax
from npgpt.errors import DataError, FormatError
from npgpt.evaluate import confusion_matrix, evaluate_classifier, metrics_from_confusion
from npgpt.model import forward_cls
from npgpt.params import init_params, load_params, save_params
from npgpt.config import preset
from npgpt.tokenizer import encode

TOL = 1e-5      # float32 logits computed in differently shaped batches


def _train(shared_data, out, data_dir, *extra):
    from npgpt.cli.train import main
    code = main(["--tiny", "--epochs", "1", "--data", str(shared_data / "sms_spam_collection" / "SMSSpamCollection"),
                 "--data-dir", str(data_dir), "--bpe-dir", str(shared_data / "gpt2_bpe"),
                 "--out", str(out), "--quiet", "--no-plots", *extra])
    assert code == 0
    return out


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("data")


@pytest.fixture(scope="module")
def run_dir(shared_data, data_dir, tmp_path_factory):
    """A tiny classifier, last-token pooling, padded to the longest training message (120)."""
    return _train(shared_data, tmp_path_factory.mktemp("run") / "run", data_dir)


@pytest.fixture(scope="module")
def lp_run_dir(shared_data, data_dir, tmp_path_factory):
    """A tiny classifier, last-position pooling, padded to 40 tokens."""
    return _train(shared_data, tmp_path_factory.mktemp("run_lp") / "run", data_dir,
                  "--pooling", "last-position", "--max-length", "40")


@pytest.fixture(scope="module")
def clf(run_dir, bpe_dir):
    return load_classifier(run_dir / "classifier.h5", bpe_dir)


@pytest.fixture(scope="module")
def test_split(run_dir, data_dir):
    return prepare_splits(None, data_dir)[2]


# ----------------------------------------------------------------------------- same model, same numbers

def test_meta_is_read(clf):
    assert clf.labels == ["ham", "spam"]
    assert clf.pooling == "last_token"
    assert clf.max_length == 120 and clf.limit == clf.config.n_ctx == 256    # read up to the context
    assert clf.config == preset("tiny")


def test_saved_classifier_matches_forward_cls_on_test_split(clf, run_dir, data_dir, test_split):
    params, config, meta = load_params(run_dir / "classifier.h5")
    splits = prepare_splits(None, data_dir)
    test = make_datasets(splits, clf.tok, meta["max_length"], context_length=config.n_ctx)[2]
    assert test.pad_to == 120
    logits = []
    for start in range(0, len(test), 8):                       # training's batches: padded to 120
        ids, lengths = make_batch(test.tokens, np.arange(start, min(start + 8, len(test))), 120)
        logits.append(forward_cls(params, config, ids, lengths, "last_token"))
    expected = softmax(np.concatenate(logits))                 # [N,2]

    texts = test_split["Text"].tolist()
    P = clf.predict_proba(texts)
    assert P.shape == (len(texts), 2)
    np.testing.assert_allclose(P, expected, atol=TOL, rtol=0)
    labels, probs = clf.classify(texts)
    assert labels == [clf.labels[k] for k in expected.argmax(axis=1)]
    np.testing.assert_allclose(probs, expected.max(axis=1), atol=TOL, rtol=0)
    # a message longer than the context is cut (the test split has none, so one is made of
    # sixty test messages)
    assert clf.truncated == []
    long_text = " ".join(texts[:60])
    assert len(encode(clf.tok, long_text)) > clf.config.n_ctx
    clf.predict_proba([texts[0], long_text])
    assert clf.truncated == [1]


def test_last_token_model_reads_past_the_training_length(clf):
    """Trained on messages of at most 120 tokens, a last-token model reads a 200-token text whole:
    the probabilities of the textbook model on the full text, not on its first 120 tokens, so the
    words after token 120 decide."""
    text = "Sorry, I'll call later. " * 20 + "WINNER!! Claim your free £1000 prize now, call 09061701461"
    ids = encode(clf.tok, text)
    assert clf.max_length == 120 < len(ids) <= clf.config.n_ctx
    full = softmax(forward_cls(clf.params, clf.config, np.array([ids]), pooling="last_token"))[0]
    head = softmax(forward_cls(clf.params, clf.config, np.array([ids[:120]]), pooling="last_token"))[0]
    P = clf.predict_proba(["ok", text])
    assert clf.truncated == []
    np.testing.assert_allclose(P[1], full, atol=TOL, rtol=0)
    assert np.abs(full - head).max() > 1e-3                    # the words after token 120 count


def test_evaluate_accuracy_equals_training_metrics(clf, run_dir, test_split):
    final = json.loads((run_dir / "metrics.json").read_text())["metrics"]["final"]
    result = evaluate_classifier(clf, test_split["Text"], test_split["Label"].to_numpy())
    assert result["n"] == len(test_split) == 300
    assert result["accuracy"] == final["test_accuracy"]
    assert sum(map(sum, result["confusion"])) == 300
    # the training loss is a mean of batch means, this one a mean over messages
    assert result["loss"] == pytest.approx(final["test_loss"], abs=0.02)
    names = ["ham", "spam"]
    by_name = evaluate_classifier(clf, test_split["Text"], [names[k] for k in test_split["Label"]])
    assert by_name == result


def test_module_level_classify(clf, run_dir, bpe_dir):
    texts = ["WINNER!! Claim your free prize now", "ok see you at 6"]
    labels, probs = classify(texts, run_dir / "classifier.h5", bpe_dir=bpe_dir)
    ref_labels, ref_probs = clf.classify(texts)
    assert labels == ref_labels
    np.testing.assert_allclose(probs, ref_probs, atol=TOL, rtol=0)
    # each probability is the softmax of the model's own logits at the label it names
    tokens = [encode(clf.tok, t) for t in texts]
    ids, lengths = make_batch(tokens, np.arange(len(texts)))
    logits = forward_cls(clf.params, clf.config, ids, lengths, clf.pooling).astype(np.float64)
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    want = e / e.sum(axis=1, keepdims=True)
    k = [clf.labels.index(name) for name in labels]
    np.testing.assert_allclose(probs, want[np.arange(len(texts)), k], atol=TOL, rtol=0)
    assert list(np.argmax(want, axis=1)) == k


def test_progress_bar_is_not_drawn_when_not_on_a_terminal(clf, capfd, monkeypatch):
    """stderr is not a terminal here (pytest captures it): the bar over many texts is not drawn
    at all (npgpt.progress); NPGPT_PROGRESS=1 draws it."""
    texts = ["ok see you at 6", "WINNER!! Claim your free prize now"] * 60
    monkeypatch.delenv("NPGPT_PROGRESS", raising=False)
    clf.predict_proba(texts, progress=True)
    assert capfd.readouterr().err == ""
    monkeypatch.setenv("NPGPT_PROGRESS", "1")
    clf.predict_proba(texts, progress=True)
    assert "classifying" in capfd.readouterr().err


def test_single_string_is_one_text(clf):
    labels, probs = clf.classify("ok see you at 6")
    assert len(labels) == 1 and probs.shape == (1,)


# ----------------------------------------------------------------------------- padding

def test_last_token_results_do_not_depend_on_padding(clf):
    texts = ["hi", "Call 09061701461 now to claim your £900 prize, valid 12 hrs only " * 3,
             "ok", "Are you coming to dinner tonight or not?", "x"]
    together = clf.predict_proba(texts)                        # the short ones padded to the longest
    clf.batch_size = 1
    try:
        alone = clf.predict_proba(texts)                       # no padding at all
    finally:
        clf.batch_size = 8
    np.testing.assert_allclose(together, alone, atol=TOL, rtol=0)
    # and forward_cls itself, given 30 extra pads
    tokens, _ = clf.encode(texts)
    ids, lengths = make_batch(tokens, range(len(tokens)))
    ids_more, _ = make_batch(tokens, range(len(tokens)), pad_to=ids.shape[1] + 30)
    np.testing.assert_allclose(forward_cls(clf.params, clf.config, ids_more, lengths),
                               forward_cls(clf.params, clf.config, ids, lengths), atol=TOL, rtol=0)


def test_last_position_model_pads_to_training_length(lp_run_dir, bpe_dir):
    lp = load_classifier(lp_run_dir / "classifier.h5", bpe_dir)
    assert lp.pooling == "last_position" and lp.max_length == 40
    texts = ["hi", "Free entry in 2 a wkly comp to win FA Cup final tkts 21st May 2005. " * 4,
             "Sorry, I'll call later", "U dun say so early hor... U c already then say..."]
    P = lp.predict_proba(texts)
    assert lp.truncated == [1]                                 # about 100 tokens, cut to 40
    assert lp.limit == 40 and "train with --max-length N" in lp.limit_fix

    tokens = [encode(lp.tok, t)[:40] for t in texts]
    ids, _ = make_batch(tokens, range(len(texts)), pad_to=40)  # [4,40]
    expected = softmax(forward_cls(lp.params, lp.config, ids, pooling="last_position"))
    np.testing.assert_allclose(P, expected, atol=TOL, rtol=0)
    # the padding matters for this pooling: without it "hi" gets other logits
    unpadded = forward_cls(lp.params, lp.config, np.array([tokens[0]]), pooling="last_position")
    assert np.abs(softmax(unpadded)[0] - expected[0]).max() > 1e-4


def test_classify_and_evaluate_name_the_fix_for_a_cut_only_where_the_length_is_fixed(
        lp_run_dir, run_dir, bpe_dir, tmp_path, capsys):
    """A last-position model cuts texts to its training length (40): classify's note and
    evaluate's count say so and name --max-length; a last-token model reads the same texts whole."""
    from npgpt.cli.classify import main as classify_main
    from npgpt.cli.evaluate import main as evaluate_main
    long = "Free entry in 2 a wkly comp to win FA Cup final tkts 21st May 2005. " * 4     # about 100 tokens
    data = tmp_path / "d.csv"
    data.write_text(f"text,label\nhi,ham\n{long},spam\n")
    lp, last = str(lp_run_dir / "classifier.h5"), str(run_dir / "classifier.h5")
    assert classify_main(["--model", lp, "--bpe-dir", str(bpe_dir), "hi", long]) == 0
    err = capsys.readouterr().err
    assert "1 text (text 2) has more than 40 tokens" in err and "train with --max-length N for longer texts" in err
    assert evaluate_main(["--model", lp, "--bpe-dir", str(bpe_dir), "--data", str(data), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "2 messages, 1 cut to 40 tokens (the model reads the fixed length of its training (last_position" in out
    assert "train with --max-length N for longer texts)" in out
    assert classify_main(["--model", last, "--bpe-dir", str(bpe_dir), "hi", long]) == 0
    assert capsys.readouterr().err == ""
    assert evaluate_main(["--model", last, "--bpe-dir", str(bpe_dir), "--data", str(data), "--quiet"]) == 0
    assert "cut" not in capsys.readouterr().out.split("\n")[1]


def test_last_position_pads_short_texts_to_the_stored_length(lp_run_dir, bpe_dir):
    """Texts all shorter than the stored pad length (40): each is padded to 40, whatever batch it
    is in, and not to the longest text of its batch, nor left unpadded."""
    path = lp_run_dir / "classifier.h5"
    lp = load_classifier(path, bpe_dir)
    stored = load_params(path)[2]["max_length"]
    assert stored == lp.max_length == 40
    texts = ["hi", "Sorry, I'll call later", "U dun say so early hor... U c already then say...",
             "WINNER!! Claim your free prize now"]
    tokens = [encode(lp.tok, t) for t in texts]
    assert max(map(len, tokens)) < stored - 5
    ids, _ = make_batch(tokens, range(len(texts)), pad_to=stored)              # [4,40]
    expected = softmax(forward_cls(lp.params, lp.config, ids, pooling="last_position"))   # [4,2]
    k = expected.argmax(axis=1)

    labels, probs = classify(texts, path, bpe_dir=bpe_dir)                     # the whole file path
    assert labels == [lp.labels[i] for i in k]
    np.testing.assert_allclose(probs, expected[np.arange(len(texts)), k], atol=TOL, rtol=0)
    for batch_size in (1, 3, 8):
        lp.batch_size = batch_size
        np.testing.assert_allclose(lp.predict_proba(texts), expected, atol=TOL, rtol=0)
    lp.batch_size = 8
    for i, text in enumerate(texts):                                           # one text alone
        np.testing.assert_allclose(lp.predict_proba([text])[0], expected[i], atol=TOL, rtol=0)

    # the pad length matters: padded to the batch's longest text, or not at all, differs
    ids_batch, _ = make_batch(tokens, range(len(texts)))                       # [4,T<40]
    per_batch = softmax(forward_cls(lp.params, lp.config, ids_batch, pooling="last_position"))
    unpadded = softmax(forward_cls(lp.params, lp.config, np.array([tokens[0]]), pooling="last_position"))
    assert np.abs(per_batch - expected).max() > 1e-4
    assert np.abs(unpadded[0] - expected[0]).max() > 1e-4


def test_last_position_with_per_batch_padding_evaluates_as_training(shared_data, data_dir, tmp_path, bpe_dir):
    """No fixed pad length: each batch, in order, is padded to its longest message, as training's
    evaluation did, so evaluate's test accuracy is training's."""
    run_dir = _train(shared_data, tmp_path / "run", data_dir, "--pooling", "last-position", "--max-length", "batch")
    final = json.loads((run_dir / "metrics.json").read_text())["metrics"]["final"]
    bp = load_classifier(run_dir / "classifier.h5", bpe_dir)
    assert bp.max_length is None and bp.limit == bp.config.n_ctx
    assert [b.tolist() for b in bp.batches([[1, 2]] * 2 + [[1]] * 3)] == [[0, 1, 2, 3, 4]]  # not sorted
    test = prepare_splits(None, data_dir)[2]
    result = evaluate_classifier(bp, test["Text"], test["Label"].to_numpy())
    assert result["accuracy"] == final["test_accuracy"]


# ----------------------------------------------------------------------------- bad and unusual text

@pytest.mark.parametrize("texts, message", [
    (["ok", "", "fine"], "text 2 of 3 is empty"),
    (["   \n\t "], "text 1 of 1 is empty (only whitespace)"),
    (["ok", None], "text 2 of 2 is not a string"),
])
def test_empty_text_is_a_one_line_data_error(clf, texts, message):
    with pytest.raises(DataError) as e:
        clf.classify(texts)
    assert str(e.value).startswith(message)
    assert "\n" not in str(e.value)


def test_unusual_characters_work(clf):
    texts = ["😀🎉 free 🎁 for you", "你好，今晚见", "مرحبا كيف حالك", "Привет", "bell\x07 nul\x00 esc\x1b[31m",
             "<|endoftext|> is plain text here", "\u200b", "e\u0301"]
    labels, probs = clf.classify(texts)
    assert set(labels) <= {"ham", "spam"}
    # the probabilities are those of the chosen labels, in full predict_proba's rows
    P = clf.predict_proba(texts)
    np.testing.assert_allclose(P.sum(axis=1), 1, atol=1e-12)
    np.testing.assert_array_equal(probs, P[np.arange(len(texts)), [clf.labels.index(n) for n in labels]])
    assert np.isfinite(probs).all()
    assert clf.truncated == []


def test_very_long_text_is_cut_and_reported(clf):
    long = "hello " * 3400                                        # 20400 characters, 3400 tokens
    assert len(long) > 20000
    P_long = clf.predict_proba(["short one", long])
    assert clf.truncated == [1]
    ids = encode(clf.tok, long)
    head = clf.tok.decode(ids[:clf.limit])
    assert encode(clf.tok, head) == ids[:clf.limit]            # so `head` stands for the cut text
    P_head = clf.predict_proba([head])
    assert clf.truncated == []
    np.testing.assert_allclose(P_long[1], P_head[0], atol=TOL, rtol=0)


def test_not_a_classifier_file(tmp_path, bpe_dir):
    lm = tmp_path / "lm.h5"
    save_params(lm, init_params(preset("tiny")), preset("tiny"))
    with pytest.raises(FormatError, match="not a classifier file"):
        load_classifier(lm, bpe_dir)
    with pytest.raises(FormatError, match="no such file"):
        load_classifier(tmp_path / "missing.h5", bpe_dir)
    junk = tmp_path / "junk.h5"
    junk.write_text("not hdf5\n")
    with pytest.raises(FormatError, match="junk.h5"):
        load_classifier(junk, bpe_dir)


def test_read_lines_names_bad_lines():
    assert read_lines(b"a\r\nb\n", "f") == (["a", "b"], [1, 2])
    with pytest.raises(DataError, match=r"^f: line 2 is blank"):
        read_lines(b"a\n \nb\n", "f")
    assert read_lines(b"a\n \nb\n", "f", skip_empty=True) == (["a", "b"], [1, 3])
    with pytest.raises(DataError, match=r"^f: line 2 is not valid UTF-8"):
        read_lines(b"a\n\xff\n", "f")
    with pytest.raises(DataError, match="no texts"):
        read_lines(b"\n\n", "f", skip_empty=True)


def test_shorten_keeps_one_display_line():
    assert shorten("a\nb\t c", 60) == "a b c"
    assert shorten("esc\x1b[0m", 60) == "esc\\x1b[0m"
    assert shorten("x" * 100, 10) == "xxxxxxx..."


# ----------------------------------------------------------------------------- metric formulas

def test_metrics_on_a_hand_made_confusion_matrix():
    # 60 ham: 50 right, 10 called spam; 40 spam: 35 caught, 5 called ham
    true = [0] * 60 + [1] * 40
    pred = [0] * 50 + [1] * 10 + [1] * 35 + [0] * 5
    M = confusion_matrix(true, pred, 2)
    assert M.tolist() == [[50, 10], [5, 35]]
    m = metrics_from_confusion(M, positive=1)
    assert (m["tp"], m["fp"], m["fn"], m["tn"], m["n"]) == (35, 10, 5, 50, 100)
    assert m["accuracy"] == pytest.approx(85 / 100, abs=1e-12)
    assert m["precision"] == pytest.approx(35 / 45, abs=1e-12)
    assert m["recall"] == pytest.approx(35 / 40, abs=1e-12)
    P, R = 35 / 45, 35 / 40
    assert m["f1"] == pytest.approx(2 * P * R / (P + R), abs=1e-12)
    # ham as the positive class swaps the roles
    h = metrics_from_confusion(M, positive=0)
    assert (h["precision"], h["recall"]) == (pytest.approx(50 / 55), pytest.approx(50 / 60))


def test_metrics_with_no_spam_predicted_are_zero_not_nan():
    m = metrics_from_confusion([[7, 0], [3, 0]], positive=1)
    assert (m["precision"], m["recall"], m["f1"]) == (0.0, 0.0, 0.0)
    assert m["accuracy"] == pytest.approx(0.7)


def test_loading_a_classifier_loads_the_kernels_from_numba_s_cache(run_dir, bpe_dir, monkeypatch):
    """Every process that loads a classifier runs the kernels from Numba's cache (compiled apart
    when it is cold), as training does, so it gives the same bits as any other process
    (tests/test_distributed.py runs the cold case on a Dask worker)."""
    import npgpt.fastops as F
    calls = []
    monkeypatch.setattr(F, "load_compiled_kernels", lambda log=print: calls.append(log))
    load_classifier(os.path.join(run_dir, "classifier.h5"), bpe_dir)
    assert len(calls) == 1
