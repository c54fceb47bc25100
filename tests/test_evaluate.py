"""npgpt.evaluate: metrics against values computed by hand, ROC AUC, --threshold, mistakes, and
the command line scoring a whole file and writing nothing but --out."""
import csv
import json
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import pytest

from npgpt.cli import evaluate, train
from npgpt.errors import DataError
from npgpt.evaluate import confusion_matrix, evaluate_classifier, labelled_frame, per_class_metrics, roc_auc


def test_per_class_metrics_by_hand():
    # rows true, columns predicted; classes a, b, c
    M = [[5, 2, 0],
         [1, 3, 1],
         [0, 0, 4]]
    per, macro, weighted = per_class_metrics(M, ["a", "b", "c"])
    # a: TP 5, predicted 6, support 7  -> P 5/6, R 5/7, F1 10/13
    # b: TP 3, predicted 5, support 5  -> P 3/5, R 3/5, F1 6/10
    # c: TP 4, predicted 5, support 4  -> P 4/5, R 1,   F1 8/9
    expect = {"a": (5 / 6, 5 / 7, 10 / 13, 7), "b": (3 / 5, 3 / 5, 6 / 10, 5), "c": (4 / 5, 1.0, 8 / 9, 4)}
    for name, (p, r, f, s) in expect.items():
        m = per[name]
        assert m["precision"] == pytest.approx(p) and m["recall"] == pytest.approx(r)
        assert m["f1"] == pytest.approx(f) and m["support"] == s
    assert macro["f1"] == pytest.approx((10 / 13 + 6 / 10 + 8 / 9) / 3)
    assert macro["precision"] == pytest.approx((5 / 6 + 3 / 5 + 4 / 5) / 3)
    assert weighted["recall"] == pytest.approx((7 * 5 / 7 + 5 * 3 / 5 + 4 * 1) / 16)   # = accuracy 12/16
    assert weighted["f1"] == pytest.approx((7 * 10 / 13 + 5 * 6 / 10 + 4 * 8 / 9) / 16)
    per, macro, _ = per_class_metrics([[0, 0], [3, 0]], ["x", "y"])
    assert per["y"]["precision"] == 0 and per["x"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}


def test_confusion_matrix_orientation():
    M = confusion_matrix([0, 0, 1, 2, 2, 2], [0, 1, 1, 2, 0, 2], 3)
    assert M.tolist() == [[1, 1, 0], [0, 1, 0], [1, 0, 2]]


def test_roc_auc_by_hand():
    # positives 0.9, 0.4; negatives 0.8, 0.4, 0.1: pairs won 0.9>all (3), 0.4>0.1 (1), 0.4=0.4 (1/2)
    assert roc_auc([0.9, 0.8, 0.4, 0.4, 0.1], [1, 0, 1, 0, 0]) == pytest.approx(4.5 / 6)
    assert roc_auc([0.1, 0.2, 0.3], [0, 0, 1]) == 1.0
    assert roc_auc([0.3, 0.2, 0.1], [0, 0, 1]) == 0.0
    assert np.isnan(roc_auc([0.1, 0.2], [1, 1]))
    rng = np.random.default_rng(0)
    s, y = rng.random(200), rng.random(200) < 0.3
    pairs = np.mean([(a > b) + 0.5 * (a == b) for a in s[y] for b in s[~y]])
    assert roc_auc(s, y) == pytest.approx(pairs)


@dataclass
class FixedClassifier:
    """Stands in for npgpt.classify.Classifier: returns given probabilities."""
    labels: list
    P: np.ndarray
    truncated: list = field(default_factory=list)

    def predict_proba(self, texts, progress=False):
        return self.P[:len(texts)]


def test_evaluate_classifier_two_classes_threshold_and_errors():
    P = np.array([[0.9, 0.1], [0.3, 0.7], [0.6, 0.4], [0.45, 0.55], [0.2, 0.8]])
    clf = FixedClassifier(["neg", "pos"], P)
    texts = ["t1", "t2", "t3", "t4", "t5"]
    y = ["neg", "neg", "pos", "pos", "pos"]
    r = evaluate_classifier(clf, texts, y, errors=5, lines=np.array([2, 3, 4, 5, 6]))
    # predicted neg, pos, neg, pos, pos -> M = [[1, 1], [1, 2]]
    assert r["confusion"] == [[1, 1], [1, 2]] and r["accuracy"] == pytest.approx(3 / 5)
    assert r["positive"] == "pos" and r["precision"] == pytest.approx(2 / 3) and r["recall"] == pytest.approx(2 / 3)
    assert r["roc_auc"] == pytest.approx(4 / 6)         # pos scores .4 .55 .8 vs neg .1 .7
    assert r["loss"] == pytest.approx(-np.mean(np.log([0.9, 0.3, 0.4, 0.55, 0.8])))
    assert [(e["text"], e["predicted"], e["line"]) for e in r["errors"]] == [("t2", "pos", 3), ("t3", "neg", 4)]
    assert r["errors"][0]["probability"] == pytest.approx(0.7)
    assert evaluate_classifier(clf, texts, y, errors=1)["errors"][0]["text"] == "t2"
    strict = evaluate_classifier(clf, texts, y, threshold=0.75)   # pos only when p(pos) >= 0.75
    assert strict["confusion"] == [[2, 0], [2, 1]] and strict["threshold"] == 0.75
    loose = evaluate_classifier(clf, texts, y, threshold=0.35)
    assert loose["confusion"] == [[1, 1], [0, 3]]
    assert loose["roc_auc"] == r["roc_auc"]             # the ranking does not depend on T


def test_predictions_table_follows_the_threshold_and_the_given_probabilities():
    """evaluate --predictions: "true" beside "label", "label" as the metrics count it (threshold
    included), and metrics from probabilities already computed equal those computed afresh."""
    P = np.array([[0.9, 0.1], [0.3, 0.7], [0.6, 0.4], [0.45, 0.55], [0.2, 0.8]])
    clf = FixedClassifier(["neg", "pos"], P)
    y = ["neg", "neg", "pos", "pos", "pos"]
    frame = pd.DataFrame(P, index=pd.Index([2, 3, 4, 5, 6], name="line"), columns=["p_neg", "p_pos"])
    frame.insert(0, "label", ["neg", "pos", "neg", "pos", "pos"])
    strict = labelled_frame(frame, y, clf.labels, threshold=0.75)
    assert list(strict.columns) == ["true", "label", "p_neg", "p_pos"] and strict.index.equals(frame.index)
    assert strict["true"].tolist() == y and strict["label"].tolist() == ["neg", "neg", "neg", "neg", "pos"]
    assert labelled_frame(frame, [0, 0, 1, 1, 1], clf.labels)["label"].tolist() == frame["label"].tolist()
    r = evaluate_classifier(clf, list("abcde"), y, threshold=0.75)
    given = evaluate_classifier(FixedClassifier(["neg", "pos"], P * 0), list("abcde"), y, threshold=0.75,
                                probabilities=P)
    assert given == r
    M = pd.crosstab(strict["true"], strict["label"]).reindex(index=clf.labels, columns=clf.labels, fill_value=0)
    assert M.to_numpy().tolist() == r["confusion"]


def test_evaluate_classifier_many_classes():
    P = np.eye(3)[[0, 1, 2, 2, 0, 1]] * 0.8 + 0.2 / 3   # predictions 0 1 2 2 0 1
    clf = FixedClassifier(["x", "y", "z"], P)
    r = evaluate_classifier(clf, list("abcdef"), [0, 1, 2, 1, 0, 0])
    M = confusion_matrix([0, 1, 2, 1, 0, 0], [0, 1, 2, 2, 0, 1], 3)
    assert r["confusion"] == M.tolist() == [[2, 1, 0], [0, 1, 1], [0, 0, 1]]
    assert set(r) >= {"accuracy", "labels", "per_class", "confusion", "macro", "weighted"}
    assert "roc_auc" not in r and r["labels"] == ["x", "y", "z"]
    assert r["per_class"]["x"]["support"] == 3 and r["per_class"]["z"]["precision"] == pytest.approx(0.5)
    with pytest.raises(DataError, match="threshold"):
        evaluate_classifier(clf, list("abcdef"), [0, 1, 2, 1, 0, 0], threshold=0.5)
    with pytest.raises(DataError, match="'w'"):
        evaluate_classifier(clf, ["a"], ["w"])
    with pytest.raises(DataError, match=r"^line 9: label \('w'\) is not one of"):    # the file's line, not a row index
        evaluate_classifier(clf, ["a", "b"], ["x", "w"], lines=np.array([4, 9]))


@pytest.mark.parametrize("labels", [["ham", "spam"], ["a", "a class with a long name"]])
def test_report_table_columns_line_up(labels):
    P = np.array([[0.9, 0.1], [0.3, 0.7], [0.6, 0.4]])
    r = evaluate_classifier(FixedClassifier(labels, P), ["t1", "t2", "t3"], [0, 1, 1])
    lines = evaluate.format_report(r).splitlines()
    top = next(i for i, line in enumerate(lines) if line.strip().startswith("precision"))
    table = lines[top:top + 5]                       # header, two classes, macro avg, weighted avg
    assert table[-1].startswith("weighted avg")
    assert len({len(line) for line in table}) == 1, "\n".join(table)   # every row ends at the same column
    assert len({line.index("%") for line in table[1:]}) == 1


def test_cli_scores_the_whole_file_and_writes_nothing_else(tmp_path, shared_data, capsys):
    bpe = str(shared_data / "gpt2_bpe")
    rows = [(f"{w} and the {k}", k) for k in ("cat", "dog", "owl") for w in ("see", "a", "my", "one", "big",
                                                                             "the", "old", "red", "new", "two")]
    data = tmp_path / "d.csv"
    with open(data, "w", newline="") as fh:
        csv.writer(fh).writerows([("text", "label")] + rows)
    run = tmp_path / "run"
    assert train.main(["--tiny", "--data", str(data), "--out", str(run), "--epochs", "1", "--quiet",
                       "--no-plots", "--bpe-dir", bpe]) == 0
    before = sorted(p.name for p in tmp_path.rglob("*"))
    capsys.readouterr()
    out = tmp_path / "result.json"
    assert evaluate.main(["--model", str(run / "classifier.h5"), "--data", str(data), "--json", "--quiet",
                          "--errors", "2", "--out", str(out)]) == 0
    r = json.loads(capsys.readouterr().out)
    assert sorted(p.name for p in tmp_path.rglob("*")) == sorted(before + ["result.json"])
    assert json.loads(out.read_text()) == r
    assert r["n"] == 30 and sum(map(sum, r["confusion"])) == 30      # every row, none balanced away
    assert r["labels"] == ["cat", "dog", "owl"] and set(r["per_class"]) == {"cat", "dog", "owl"}
    assert all(m["support"] == 10 for m in r["per_class"].values())
    assert len(r["errors"]) <= 2
    assert evaluate.main(["--model", str(run / "classifier.h5"), "--quiet"]) == 0   # the run's test split
    text = capsys.readouterr().out
    assert "test split" in text and "macro avg" in text and "confusion matrix" in text
