"""`python -m npgpt.evaluate`: accuracy, per-class precision/recall/F1 and the confusion matrix of
a trained classifier on a labelled file, or on the run's own split (npgpt.evaluate computes them).

    python -m npgpt.evaluate --model runs/<name>/classifier.h5 --data FILE [--errors 5] [--json]
    python -m npgpt.evaluate --model runs/<name>/classifier.h5 [--split test]

--out FILE writes the metrics as JSON; --predictions FILE one row per text (npgpt.predictions).
"""
from __future__ import annotations

import json
import sys

import numpy as np

from ..errors import printable
from ..evaluate import evaluate_classifier, labelled_frame
from ..predictions import check_out_path, prediction_frame, text_series, write_predictions
from . import make_parser, shorten


def format_report(result: dict, width=70) -> str:
    """The metrics as aligned lines: accuracy, per-class table, averages, confusion, mistakes.
    Class names are shown through `printable` (a label from a file may hold escape sequences)."""
    names = [printable(s) for s in result["labels"]]
    w = max(9, max(len(s) for s in names) + 2)
    lines = [f"accuracy   {result['accuracy'] * 100:6.2f}%   loss {result['loss']:.4f} (mean cross-entropy)"]
    if "roc_auc" in result:
        pos = printable(result["positive"])
        rule = f"p({pos}) >= {result['threshold']}" if result["threshold"] is not None else "the larger probability"
        lines.append(f"positive class {pos} ({rule}): precision {result['precision'] * 100:.2f}%, "
                     f"recall {result['recall'] * 100:.2f}%, F1 {result['f1'] * 100:.2f}%, "
                     f"ROC AUC {result['roc_auc']:.4f}")
    rows = [(name, m, m["support"]) for name, m in zip(names, result["per_class"].values())]
    rows += [(f"{avg} avg", result[avg], result["n"]) for avg in ("macro", "weighted")]
    first = max(len(name) for name, _, _ in rows) + 2          # the row names' column, "weighted avg" included
    lines.append(f"{'':<{first}}{'precision':>10}{'recall':>10}{'F1':>10}{'support':>10}")
    for name, m, support in rows:
        lines.append(f"{name:<{first}}{m['precision'] * 100:9.2f}%{m['recall'] * 100:9.2f}%{m['f1'] * 100:9.2f}%"
                     f"{support:>10}")
    lines.append("confusion matrix (rows: true label, columns: predicted)")
    lines.append(" " * (w + 2) + "".join(f"{s:>{w}}" for s in names))
    for name, row in zip(names, result["confusion"]):
        lines.append(f"  {name:<{w}}" + "".join(f"{c:>{w}}" for c in row))
    if result.get("errors"):
        lines.append(f"the {len(result['errors'])} most confident mistakes:")
        for e in result["errors"]:
            where = f"line {e['line']}" if e["line"] is not None else f"text {e['index'] + 1}"
            lines.append(f"  {where}: {printable(e['true'])} called {printable(e['predicted'])} "
                         f"({e['probability']:.3f})  "
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
    p.add_argument("--data-dir", default=None,
                   help="without --data, for runs that kept no split CSVs: where train/validation/test.csv live "
                        "(default: ./data if it holds them, else ~/.cache/npgpt/data or $NPGPT_DATA_DIR)")
    p.add_argument("--parse", default="pandas", choices=["pandas", "strict"],
                   help="how an SMSSpamCollection file is read (as in python -m npgpt.train)")
    p.add_argument("--skip-bad-lines", action="store_true", help="skip malformed rows of --data and report them")
    p.add_argument("--errors", type=int, default=0, metavar="N", help="show the N most confident mistakes")
    p.add_argument("--threshold", type=float, default=None, metavar="T",
                   help="two classes: predict the positive (second) class when its probability is >= T")
    p.add_argument("--bpe-dir", default=None,
                   help="folder with GPT-2's encoder.json and vocab.bpe (default: the ones stored in the model "
                        "file; older files: $NPGPT_BPE_DIR, the training run's folder, ./weights, ~/.cache/npgpt/weights, tiktoken)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="texts per forward pass (default: the training batch size)")
    p.add_argument("--json", action="store_true", help="print every metric as one JSON object")
    p.add_argument("--out", default=None, metavar="FILE", help="also write the JSON object to FILE")
    p.add_argument("--predictions", default=None, metavar="FILE",
                   help="also write one row per scored text to FILE (.csv, .jsonl or .parquet, as classify --out "
                        "writes): its row id (the line of --data, or of the file the run's split came from; "
                        ".parquet: the row number), true label, predicted label (--threshold applied), and "
                        "p_<class> for every class")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def load_labelled(args, clf):
    """(texts, labels, lines, description) of what main scores."""
    import os
    from ..classify import training_setting
    from ..data import SPLITS, prepare_splits, read_sms_spam
    from ..tabular import is_table, label_ids, read_table

    if args.data is not None:
        if is_table(args.data):
            df = read_table(args.data, args.text_column or clf.text_column, args.label_column or clf.label_column,
                            skip_bad_lines=args.skip_bad_lines)
            label_ids(df, list(clf.labels), args.data)    # a label the model does not know: file and line
        else:
            df = read_sms_spam(args.data, skip_bad_lines=args.skip_bad_lines, parse=args.parse)
        if df.attrs.get("warning"):
            print(printable(df.attrs["warning"]), file=sys.stderr)
        return df["Text"].tolist(), df["Label"].tolist(), df["Line"].to_numpy(), f"{args.data} (whole file)"
    run_csv = os.path.join(os.path.dirname(os.path.abspath(clf.path)), f"{args.split}.csv")
    if os.path.isfile(run_csv):
        import pandas as pd
        df = pd.read_csv(run_csv, keep_default_na=False, dtype={"Text": str}, encoding="utf-8")
        labels = df["Name"].astype(str).tolist() if "Name" in df.columns else df["Label"].to_numpy()
        lines = df["Line"].to_numpy() if "Line" in df.columns else None
        return df["Text"].tolist(), labels, lines, f"{args.split} split"
    from ..userpaths import data_dir
    splits = prepare_splits(None, args.data_dir or data_dir(), progress=not args.quiet, parse=args.parse,
                            balance=training_setting(clf.meta, "balance") or "undersample")
    df = splits[SPLITS.index(args.split)]
    return df["Text"].tolist(), df["Label"].to_numpy(), df["Line"].to_numpy(), f"{args.split} split"


def row_ids(args, clf, lines, n):
    """(the row id of each scored text, the ids' name): the line of the file it came from (the
    row number of a .parquet file), or its position when the run's split kept no lines."""
    from ..classify import training_setting
    if lines is None:
        return range(1, n + 1), "position"
    source = str(args.data or training_setting(clf.meta, "data") or "")
    return lines, "row" if source.lower().endswith(".parquet") else "line"


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.batch_size is not None and args.batch_size < 1:
        parser.error("--batch-size must be at least 1")
    if args.errors < 0:
        parser.error("--errors must be at least 0")
    if args.threshold is not None and not 0 <= args.threshold <= 1:
        parser.error("--threshold must be a probability in 0..1")
    if args.predictions is not None:
        check_out_path(args.predictions, "--predictions")
    from ..classify import load_classifier, training_setting

    clf = load_classifier(args.model, args.bpe_dir)
    if args.threshold is not None and len(clf.labels) != 2:
        parser.error(f"--threshold needs a two-class model; {args.model} has {len(clf.labels)} classes")
    # training's batch size by default: a model trained with last-position pooling and per-batch
    # padding then sees exactly the batches training evaluated on
    clf.batch_size = args.batch_size or int(training_setting(clf.meta, "batch_size") or clf.batch_size)
    texts, labels, lines, what = load_labelled(args, clf)
    frame = prediction_frame(clf, text_series(texts, *row_ids(args, clf, lines, len(texts))),
                             progress=not args.quiet)
    result = evaluate_classifier(clf, texts, labels, threshold=args.threshold, errors=args.errors, lines=lines,
                                 probabilities=frame[["p_" + name for name in clf.labels]].to_numpy(np.float32))
    if args.predictions:
        write_predictions(labelled_frame(frame, labels, clf.labels, args.threshold, lines), args.predictions,
                          "--predictions")
    result.update(model=clf.path, data=args.data, split=None if args.data else args.split,
                  pooling=clf.pooling, max_length=clf.max_length)
    if args.out:
        from ..fileio import write_json
        write_json(args.out, result)
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        cut = f", {result['truncated']} cut to {clf.limit} tokens" if result["truncated"] else ""
        cut += f" ({clf.limit_fix})" if cut and clf.limit_fix else ""
        print(f"{printable(clf.path)}: pooling {clf.pooling}, texts cut to {clf.limit} tokens")
        print(f"{printable(what)}: {result['n']} messages{cut}")
        print(format_report(result))
    return 0
