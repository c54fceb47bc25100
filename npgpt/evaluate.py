"""How well a trained classifier does on labelled texts (`python -m npgpt.evaluate` is its command line).

    python -m npgpt.evaluate --model runs/<name>/classifier.h5 --data FILE [--errors 5] [--json]
    python -m npgpt.evaluate --model runs/<name>/classifier.h5 [--split test]

With --data, the whole file is scored as it is: no balancing, no splitting, nothing written
(except the --out file). A table (.csv/.tsv/.jsonl/.parquet) is read with the text and label
columns the model was trained with (or --text-column/--label-column); the SMSSpamCollection file
as training read it. Without --data, the run's own split (`--split`, default test) is scored: the
CSV the run wrote beside the model, else (older SMS runs) the split in --data-dir. Texts are
tokenized, cut and padded the way training did (`npgpt.classify.Classifier`).

With the confusion matrix M[true, predicted] and, for each class c,
    TP = M[c, c]   FP = column c minus TP   FN = row c minus TP   support = row c
    precision = TP / (TP + FP)        of the texts called c, the share that is c
    recall    = TP / (TP + FN)        of the texts of class c, the share found
    F1        = 2 P R / (P + R) = 2 TP / (2 TP + FP + FN)
    macro     = the plain mean over classes; weighted = the mean weighted by support
    accuracy  = trace(M) / N;  loss = mean over texts of -log p(true label)
For two classes the positive class is the second label (spam for the SMS model): its precision,
recall and F1 are reported on their own, with ROC AUC (the probability that a random positive
text scores above a random negative one, ties counting one half), and --threshold T predicts the
positive class when its probability is >= T instead of taking the larger probability.
A ratio whose denominator is 0 (no text predicted c, say) is reported as 0.
"""
from __future__ import annotations

if __name__ == "__main__":      # `python -m npgpt.evaluate`: the command line, npgpt.cli.evaluate
    from npgpt.cli import hand_over
    hand_over("evaluate")

import numpy as np

from .errors import DataError, quote


def confusion_matrix(true, pred, num_classes: int) -> np.ndarray:
    """M [K,K] int64 with M[i, j] = number of examples of class i predicted as class j."""
    true, pred = np.asarray(true, dtype=np.int64), np.asarray(pred, dtype=np.int64)   # [N], [N]
    M = np.zeros((num_classes, num_classes), np.int64)                                 # [K,K]
    np.add.at(M, (true, pred), 1)
    return M


def metrics_from_confusion(M, positive: int = 1) -> dict:
    """Accuracy, precision, recall and F1 of class `positive` against the rest, from M [K,K]."""
    M = np.asarray(M, dtype=np.int64)
    tp = int(M[positive, positive])
    fp = int(M[:, positive].sum()) - tp
    fn = int(M[positive, :].sum()) - tp
    n = int(M.sum())
    tn = n - tp - fp - fn
    ratio = lambda a, b: a / b if b else 0.0
    return {"n": n, "accuracy": ratio(int(np.trace(M)), n),
            "precision": ratio(tp, tp + fp), "recall": ratio(tp, tp + fn),
            "f1": ratio(2 * tp, 2 * tp + fp + fn), "tp": tp, "fp": fp, "fn": fn, "tn": tn}


def per_class_metrics(M, names) -> tuple:
    """Precision, recall, F1 and support of every class from M [K,K], with their macro and
    support-weighted means -> (per_class {name: {...}}, macro {...}, weighted {...})."""
    M = np.asarray(M, dtype=np.int64)
    ratio = lambda a, b: a / b if b else 0.0
    per_class = {}
    for c, name in enumerate(names):
        tp, predicted, support = int(M[c, c]), int(M[:, c].sum()), int(M[c, :].sum())
        p, r = ratio(tp, predicted), ratio(tp, support)
        per_class[name] = {"precision": p, "recall": r,
                           "f1": ratio(2 * tp, predicted + support), "support": support}
    keys = ("precision", "recall", "f1")
    support = np.array([v["support"] for v in per_class.values()], dtype=np.float64)   # [K]
    macro = {k: float(np.mean([v[k] for v in per_class.values()])) for k in keys}
    weighted = {k: float(np.dot([v[k] for v in per_class.values()], support) / support.sum())
                if support.sum() else 0.0 for k in keys}
    return per_class, macro, weighted


def roc_auc(scores, positive) -> float:
    """Area under the ROC curve of `scores` [N] for the boolean labels `positive` [N]: the
    Mann-Whitney U statistic over n_pos * n_neg, tied scores getting their mean rank. NaN when
    one of the two classes is absent."""
    scores = np.asarray(scores, dtype=np.float64)
    positive = np.asarray(positive, dtype=bool)
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(scores, kind="stable")
    ranks = np.empty(len(scores), np.float64)
    ranks[order] = np.arange(1, len(scores) + 1)
    _, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    sums = np.bincount(inverse, weights=ranks)                  # mean rank of each tied group
    ranks = (sums / counts)[inverse]
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def predicted_ids(P, names, positive=None, threshold=None):
    """The class each text is predicted as [N], and the positive class (None for more than two):
    the most probable class, or for two classes with a threshold T the positive class (default the
    second label) exactly when its probability is >= T."""
    P = np.asarray(P)                                                         # [N,K]
    pred = np.argmax(P, axis=1)                                               # [N]
    if len(names) != 2:
        return pred, None
    positive = names[1] if positive is None else positive
    if positive not in names:
        raise DataError(f"positive class {quote(positive)} is not one of the model's labels {names}")
    pos = names.index(positive)
    if threshold is not None:
        pred = np.where(P[:, pos] >= threshold, pos, 1 - pos)                 # [N]
    return pred, positive


def evaluate_classifier(clf, texts, labels, positive=None, threshold=None, errors=0, progress=False,
                        lines=None, probabilities=None) -> dict:
    """Metrics of `clf` (a `npgpt.classify.Classifier`) on texts with their true labels.

    labels: class ids or class names. Returns a dict with n, accuracy, labels, per_class (name ->
    precision, recall, f1, support), macro, weighted, confusion (rows true, columns predicted),
    loss, truncated (texts cut to the model's length limit) and errors (the `errors` most
    confident mistakes: text, true, predicted, probability, index and line). For two classes
    also positive, precision/recall/f1 and tp/fp/fn/tn of the positive class (default the second
    label), roc_auc, and threshold (None: argmax). probabilities: clf's P [N,K] of these texts
    when already computed (classify's prediction frame), so that they are not computed twice."""
    texts = list(texts)
    y = _label_ids(labels, clf.labels, lines)                                 # [N]
    if len(y) != len(texts):
        raise DataError(f"{len(texts)} texts but {len(y)} labels")
    K = len(clf.labels)
    if threshold is not None and (K != 2 or not 0 <= threshold <= 1):
        raise DataError("--threshold needs a two-class model and a probability in 0..1")
    P = clf.predict_proba(texts, progress=progress) if probabilities is None else np.asarray(probabilities)  # [N,K]
    pred, positive = predicted_ids(P, clf.labels, positive, threshold)      # [N]
    out = {"n": len(y)}
    M = confusion_matrix(y, pred, K)                                          # [K,K]
    out["accuracy"] = float(np.trace(M) / max(len(y), 1))
    out["labels"] = list(clf.labels)
    out["per_class"], out["macro"], out["weighted"] = per_class_metrics(M, clf.labels)
    out["confusion"] = M.tolist()
    if K == 2:
        pos = clf.labels.index(positive)
        out.update(metrics_from_confusion(M, pos), positive=positive, threshold=threshold,
                   roc_auc=roc_auc(P[:, pos], y == pos))
    p_true = np.maximum(P[np.arange(len(y)), y], np.finfo(np.float64).tiny)   # [N]
    out.update(loss=float(-np.log(p_true).mean()) if len(y) else 0.0, truncated=len(clf.truncated))
    wrong = np.flatnonzero(pred != y)
    wrong = wrong[np.argsort(-P[wrong, pred[wrong]], kind="stable")][:errors]   # most confident first
    out["errors"] = [{"index": int(i), "line": int(lines[i]) if lines is not None else None,
                      "text": texts[i], "true": clf.labels[y[i]], "predicted": clf.labels[pred[i]],
                      "probability": float(P[i, pred[i]])} for i in wrong]
    return out


def labelled_frame(frame, labels, names, threshold=None, lines=None):
    """A prediction frame (`npgpt.predictions.prediction_frame`) of labelled texts, for
    `evaluate --predictions`: column "true" (each text's label, a name) before "label", and with a
    threshold "label" as evaluate predicts (`predicted_ids`). -> a new frame"""
    P = frame[["p_" + name for name in names]].to_numpy()                     # [N,K]
    out = frame.copy()
    out["label"] = [names[k] for k in predicted_ids(P, names, threshold=threshold)[0]]
    out.insert(0, "true", [names[k] for k in _label_ids(labels, names, lines)])
    return out


def _label_ids(labels, names, lines=None) -> np.ndarray:
    """Class ids of labels (names or ids); a DataError names a label that is not a class by its
    line (`lines`, as the file shows it) or else its place, counted from 1."""
    ids = []
    for i, lab in enumerate(labels):
        where = f"line {lines[i]}: label" if lines is not None else f"label {i + 1}"
        if isinstance(lab, str):
            if lab not in names:
                raise DataError(f"{where} ({quote(lab)}) is not one of {quote(names)}")
            ids.append(names.index(lab))
        else:
            if int(lab) != lab or not 0 <= int(lab) < len(names):
                raise DataError(f"{where} ({quote(lab)}) is not a class id in 0..{len(names) - 1}")
            ids.append(int(lab))
    return np.array(ids, dtype=np.int64)
