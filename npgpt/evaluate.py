"""`python -m npgpt.evaluate`: how well a trained classifier does on labelled texts.

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

if __name__ == "__main__":      # `python -m npgpt.evaluate`: the runtime settings before NumPy loads
    from npgpt import tune_runtime
    tune_runtime()

import json
import sys

import numpy as np

from .cli import make_parser, run
from .errors import DataError


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


def evaluate_classifier(clf, texts, labels, positive=None, threshold=None, errors=0, progress=False,
                        lines=None) -> dict:
    """Metrics of `clf` (a `npgpt.classify.Classifier`) on texts with their true labels.

    labels: class ids or class names. Returns a dict with n, accuracy, labels, per_class (name ->
    precision, recall, f1, support), macro, weighted, confusion (rows true, columns predicted),
    loss, truncated (texts cut to the model's length limit) and errors (the `errors` most
    confident mistakes: text, true, predicted, probability, index and line). For two classes
    also positive, precision/recall/f1 and tp/fp/fn/tn of the positive class (default the second
    label), roc_auc, and threshold (None: argmax)."""
    texts = list(texts)
    y = _label_ids(labels, clf.labels)                                        # [N]
    if len(y) != len(texts):
        raise DataError(f"{len(texts)} texts but {len(y)} labels")
    K = len(clf.labels)
    if threshold is not None and (K != 2 or not 0 <= threshold <= 1):
        raise DataError("--threshold needs a two-class model and a probability in 0..1")
    P = clf.predict_proba(texts, progress=progress)                           # [N,K]
    pred = np.argmax(P, axis=1)                                               # [N]
    out = {"n": len(y)}
    if K == 2:
        positive = clf.labels[1] if positive is None else positive
        if positive not in clf.labels:
            raise DataError(f"positive class {positive!r} is not one of the model's labels {clf.labels}")
        pos = clf.labels.index(positive)
        if threshold is not None:
            pred = np.where(P[:, pos] >= threshold, pos, 1 - pos)             # [N]
    M = confusion_matrix(y, pred, K)                                          # [K,K]
    out["accuracy"] = float(np.trace(M) / max(len(y), 1))
    out["labels"] = list(clf.labels)
    out["per_class"], out["macro"], out["weighted"] = per_class_metrics(M, clf.labels)
    out["confusion"] = M.tolist()
    if K == 2:
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


def _label_ids(labels, names) -> np.ndarray:
    ids = []
    for i, lab in enumerate(labels):
        if isinstance(lab, str):
            if lab not in names:
                raise DataError(f"label {i + 1} ({lab!r}) is not one of {names}")
            ids.append(names.index(lab))
        else:
            if int(lab) != lab or not 0 <= int(lab) < len(names):
                raise DataError(f"label {i + 1} ({lab!r}) is not a class id in 0..{len(names) - 1}")
            ids.append(int(lab))
    return np.array(ids, dtype=np.int64)


def format_report(result: dict, width=70) -> str:
    """The metrics as aligned lines: accuracy, per-class table, averages, confusion, mistakes."""
    from .classify import shorten

    names = result["labels"]
    w = max(9, max(len(s) for s in names) + 2)
    lines = [f"accuracy   {result['accuracy'] * 100:6.2f}%   loss {result['loss']:.4f} (mean cross-entropy)"]
    if "roc_auc" in result:
        pos = result["positive"]
        rule = f"p({pos}) >= {result['threshold']}" if result["threshold"] is not None else "the larger probability"
        lines.append(f"positive class {pos} ({rule}): precision {result['precision'] * 100:.2f}%, "
                     f"recall {result['recall'] * 100:.2f}%, F1 {result['f1'] * 100:.2f}%, "
                     f"ROC AUC {result['roc_auc']:.4f}")
    lines.append(f"{'':<{w}}{'precision':>10}{'recall':>10}{'F1':>10}{'support':>10}")
    for name, m in result["per_class"].items():
        lines.append(f"{name:<{w}}{m['precision'] * 100:9.2f}%{m['recall'] * 100:9.2f}%{m['f1'] * 100:9.2f}%"
                     f"{m['support']:>10}")
    for avg in ("macro", "weighted"):
        m = result[avg]
        lines.append(f"{avg + ' avg':<{w}}{m['precision'] * 100:9.2f}%{m['recall'] * 100:9.2f}%"
                     f"{m['f1'] * 100:9.2f}%{result['n']:>10}")
    lines.append("confusion matrix (rows: true label, columns: predicted)")
    lines.append(" " * (w + 2) + "".join(f"{s:>{w}}" for s in names))
    for name, row in zip(names, result["confusion"]):
        lines.append(f"  {name:<{w}}" + "".join(f"{c:>{w}}" for c in row))
    if result.get("errors"):
        lines.append(f"the {len(result['errors'])} most confident mistakes:")
        for e in result["errors"]:
            where = f"line {e['line']}" if e["line"] is not None else f"text {e['index'] + 1}"
            lines.append(f"  {where}: {e['true']} called {e['predicted']} ({e['probability']:.3f})  "
                         f"{shorten(e['text'], width)}")
    return "\n".join(lines)


def build_parser():
    p = make_parser("python -m npgpt.evaluate",
                    "Accuracy, per-class precision/recall/F1, the confusion matrix (and ROC AUC for two "
                    "classes) of a trained classifier on a whole file of labelled texts, or on the run's test split.")
    p.add_argument("--model", required=True, help="the classifier, runs/<name>/classifier.h5")
    p.add_argument("--data", default=None,
                   help="labelled texts to score as they are (.csv/.tsv/.jsonl/.parquet, or an SMSSpamCollection "
                        "file); default: the run's --split")
    p.add_argument("--text-column", default=None, help="text column of --data (default: the model's)")
    p.add_argument("--label-column", default=None, help="label column of --data (default: the model's)")
    p.add_argument("--split", default="test", choices=["train", "validation", "test"],
                   help="without --data: which of the run's splits to score")
    p.add_argument("--data-dir", default="data",
                   help="without --data, for runs that kept no split CSVs: where train/validation/test.csv live")
    p.add_argument("--parse", default="pandas", choices=["pandas", "strict"],
                   help="how an SMSSpamCollection file is read (as in python -m npgpt.train)")
    p.add_argument("--skip-bad-lines", action="store_true", help="skip malformed rows of --data and report them")
    p.add_argument("--errors", type=int, default=0, metavar="N", help="show the N most confident mistakes")
    p.add_argument("--threshold", type=float, default=None, metavar="T",
                   help="two classes: predict the positive (second) class when its probability is >= T")
    p.add_argument("--bpe-dir", default=None,
                   help="folder with GPT-2's encoder.json and vocab.bpe (default: the ones stored in the model "
                        "file; older files: $NPGPT_BPE_DIR, the training run's folder, weights/, tiktoken)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="texts per forward pass (default: the training batch size)")
    p.add_argument("--json", action="store_true", help="print every metric as one JSON object")
    p.add_argument("--out", default=None, metavar="FILE", help="also write the JSON object to FILE")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def load_labelled(args, clf):
    """(texts, labels, lines, description) of what main scores."""
    import os
    from .data import SPLITS, prepare_splits, read_sms_spam
    from .tabular import is_table, read_table

    train_args = clf.meta.get("train_args") or {}
    if args.data is not None:
        if is_table(args.data):
            text_col = args.text_column or clf.meta.get("text_column") or train_args.get("text_column") or "text"
            label_col = args.label_column or clf.meta.get("label_column") or train_args.get("label_column") or "label"
            df = read_table(args.data, text_col, label_col, skip_bad_lines=args.skip_bad_lines)
        else:
            df = read_sms_spam(args.data, skip_bad_lines=args.skip_bad_lines, parse=args.parse)
        if df.attrs.get("warning"):
            print(df.attrs["warning"], file=sys.stderr)
        return df["Text"].tolist(), df["Label"].tolist(), df["Line"].to_numpy(), f"{args.data} (whole file)"
    run_csv = os.path.join(os.path.dirname(os.path.abspath(clf.path)), f"{args.split}.csv")
    if os.path.isfile(run_csv):
        import pandas as pd
        df = pd.read_csv(run_csv, keep_default_na=False, dtype={"Text": str}, encoding="utf-8")
        labels = df["Name"].astype(str).tolist() if "Name" in df.columns else df["Label"].to_numpy()
        lines = df["Line"].to_numpy() if "Line" in df.columns else None
        return df["Text"].tolist(), labels, lines, f"{args.split} split"
    splits = prepare_splits(None, args.data_dir, progress=not args.quiet, parse=args.parse)
    df = splits[SPLITS.index(args.split)]
    return df["Text"].tolist(), df["Label"].to_numpy(), df["Line"].to_numpy(), f"{args.split} split"


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.batch_size is not None and args.batch_size < 1:
        parser.error("--batch-size must be at least 1")
    if args.errors < 0:
        parser.error("--errors must be at least 0")
    if args.threshold is not None and not 0 <= args.threshold <= 1:
        parser.error("--threshold must be a probability in 0..1")
    from .classify import load_classifier

    clf = load_classifier(args.model, args.bpe_dir)
    if args.threshold is not None and len(clf.labels) != 2:
        parser.error(f"--threshold needs a two-class model; {args.model} has {len(clf.labels)} classes")
    # training's batch size by default: a model trained with last-position pooling and per-batch
    # padding then sees exactly the batches training evaluated on
    clf.batch_size = args.batch_size or int((clf.meta.get("train_args") or {}).get("batch_size") or clf.batch_size)
    texts, labels, lines, what = load_labelled(args, clf)
    result = evaluate_classifier(clf, texts, labels, threshold=args.threshold, errors=args.errors,
                                 progress=not args.quiet, lines=lines)
    result.update(model=clf.path, data=args.data, split=None if args.data else args.split,
                  pooling=clf.pooling, max_length=clf.max_length)
    if args.out:
        from .finetune import _write_json
        _write_json(args.out, result)
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        cut = f", {result['truncated']} cut to {clf.limit} tokens" if result["truncated"] else ""
        print(f"{clf.path}: pooling {clf.pooling}, texts cut to {clf.limit} tokens")
        print(f"{what}: {result['n']} messages{cut}")
        print(format_report(result))
    return 0


if __name__ == "__main__":
    run(main)
