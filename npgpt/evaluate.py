"""`python -m npgpt.evaluate`: how well a trained classifier does on a split of the SMS data.

    python -m npgpt.evaluate --model runs/<name>/classifier.h5 [--split test] [--data-dir data]

The split is rebuilt exactly as training built it (`npgpt.data.prepare_splits`: the CSVs in
--data-dir, or a fresh split of --data), and every message is tokenized, cut and padded the way
training did (`npgpt.classify.Classifier`). With spam as the positive class and the confusion
matrix M[true, predicted]:

    TP = M[spam, spam]   FP = M[ham, spam]   FN = M[spam, ham]   TN = M[ham, ham]
    accuracy  = (TP + TN) / N
    precision = TP / (TP + FP)        of the messages called spam, the share that is spam
    recall    = TP / (TP + FN)        of the spam, the share caught
    F1        = 2 P R / (P + R) = 2 TP / (2 TP + FP + FN)
    loss      = mean over messages of -log p(true label)

A ratio whose denominator is 0 (no message predicted spam, say) is reported as 0.
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


def evaluate_classifier(clf, texts, labels, positive: str = "spam") -> dict:
    """Metrics of `clf` (a `npgpt.classify.Classifier`) on texts with their true labels.

    labels: class ids (0 ham, 1 spam) or class names. Returns a dict with n, accuracy, precision,
    recall, f1, tp/fp/fn/tn, loss, confusion (M as nested lists, rows true, columns predicted),
    labels, positive, and truncated (how many texts were cut to the model's length limit)."""
    texts = list(texts)
    y = _label_ids(labels, clf.labels)                                        # [N]
    if len(y) != len(texts):
        raise DataError(f"{len(texts)} texts but {len(y)} labels")
    if positive not in clf.labels:
        raise DataError(f"positive class {positive!r} is not one of the model's labels {clf.labels}")
    P = clf.predict_proba(texts)                                              # [N,K]
    pred = np.argmax(P, axis=1)                                               # [N]
    M = confusion_matrix(y, pred, len(clf.labels))                            # [K,K]
    out = metrics_from_confusion(M, clf.labels.index(positive))
    p_true = np.maximum(P[np.arange(len(y)), y], np.finfo(np.float64).tiny)   # [N]
    out.update(loss=float(-np.log(p_true).mean()) if len(y) else 0.0, confusion=M.tolist(),
               labels=list(clf.labels), positive=positive, truncated=len(clf.truncated))
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


def format_report(result: dict) -> str:
    """The metrics as a few aligned lines, the confusion matrix last."""
    pos = result["positive"]
    lines = [f"accuracy   {result['accuracy'] * 100:6.2f}%",
             f"precision  {result['precision'] * 100:6.2f}%  (of the messages called {pos}, the share that is {pos})",
             f"recall     {result['recall'] * 100:6.2f}%  (of the {pos} messages, the share found)",
             f"F1         {result['f1'] * 100:6.2f}%",
             f"loss       {result['loss']:.4f}  (mean cross-entropy)",
             "confusion matrix (rows: true label, columns: predicted)"]
    names = result["labels"]
    w = max(6, max(len(s) for s in names) + 2)
    lines.append(" " * (w + 2) + "".join(f"{s:>{w}}" for s in names))
    for name, row in zip(names, result["confusion"]):
        lines.append(f"  {name:<{w}}" + "".join(f"{c:>{w}}" for c in row))
    return "\n".join(lines)


def build_parser():
    p = make_parser("python -m npgpt.evaluate",
                    "Accuracy, precision, recall, F1 (spam positive) and the confusion matrix of a "
                    "trained classifier on a split of the SMS Spam Collection.")
    p.add_argument("--model", required=True, help="the classifier, runs/<name>/classifier.h5")
    p.add_argument("--data", default=None,
                   help="SMSSpamCollection file or UCI zip to split afresh (default: reuse the CSVs in --data-dir)")
    p.add_argument("--data-dir", default="data", help="where train/validation/test.csv live (or are written)")
    p.add_argument("--split", default="test", choices=["train", "validation", "test"],
                   help="which split of the data to score")
    p.add_argument("--skip-bad-lines", action="store_true", help="skip malformed dataset lines and report them")
    p.add_argument("--bpe-dir", default=None,
                   help="folder with GPT-2's encoder.json and vocab.bpe (default: the ones stored in the model "
                        "file; older files: $NPGPT_BPE_DIR, the training run's folder, weights/, tiktoken)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="messages per forward pass (default: the training batch size)")
    p.add_argument("--json", action="store_true", help="print the metrics as JSON")
    p.add_argument("--quiet", action="store_true", help="no download progress bar")
    return p


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.batch_size is not None and args.batch_size < 1:
        parser.error("--batch-size must be at least 1")
    from .classify import load_classifier
    from .data import SPLITS, prepare_splits

    clf = load_classifier(args.model, args.bpe_dir)
    # training's batch size by default: a model trained with last-position pooling and per-batch
    # padding then sees exactly the batches training evaluated on
    clf.batch_size = args.batch_size or int((clf.meta.get("train_args") or {}).get("batch_size") or clf.batch_size)
    splits = prepare_splits(args.data, args.data_dir, skip_bad_lines=args.skip_bad_lines,
                            progress=not args.quiet)
    if splits[0].attrs.get("warning"):
        print(splits[0].attrs["warning"], file=sys.stderr)
    df = splits[SPLITS.index(args.split)]
    result = evaluate_classifier(clf, df["Text"].tolist(), df["Label"].to_numpy())
    result.update(model=clf.path, split=args.split, pooling=clf.pooling, max_length=clf.max_length)
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        cut = f", {result['truncated']} cut to {clf.limit} tokens" if result["truncated"] else ""
        print(f"{clf.path}: pooling {clf.pooling}, texts cut to {clf.limit} tokens")
        print(f"{args.split} split: {result['n']} messages{cut}")
        print(format_report(result))
    return 0


if __name__ == "__main__":
    run(main)
