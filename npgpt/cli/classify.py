"""`python -m npgpt.classify`: label texts with a classifier trained by `python -m npgpt.train`.

    python -m npgpt.classify --model runs/<name>/classifier.h5 "You are a winner ..." "See you at 6?"
    spam  0.973  You are a winner ...
    ham   0.991  See you at 6?

The texts come as arguments, from a file (one per line) or from stdin; each is labelled by
`npgpt.classify.Classifier` (the library: tokenizing, cutting and padding as training did).
"""
from __future__ import annotations

import json
import os
import stat
import sys

import numpy as np

from ..classify import DEFAULT_BATCH_SIZE, check_texts, load_classifier
from ..errors import DataError, printable
from ..predictions import read_lines
from . import make_parser, shorten


def truncation_note(names: list, limit: int, fix: str = "") -> str:
    """One stderr line naming the texts that were cut to `limit` tokens (and `fix`, how to avoid it)."""
    shown = ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")
    many = len(names) > 1
    return (f"note: {len(names)} text{'s' if many else ''} ({shown}) {'have' if many else 'has'} more "
            f"than {limit} tokens; only the first {limit} tokens were used" + (f"; {fix}" if fix else ""))


def build_parser():
    p = make_parser("python -m npgpt.classify",
                    "Label texts (with the classes the model was trained on: ham/spam, or your own) "
                    "with a classifier trained by python -m npgpt.train. Each line printed is: the label, "
                    "the probability the model gives that label, the text.")
    p.add_argument("texts", nargs="*", metavar="TEXT",
                   help="texts to classify; none, or '-', reads stdin, one text per line")
    p.add_argument("--model", required=True, help="the classifier, runs/<name>/classifier.h5")
    p.add_argument("--file", default=None, help="read the texts from this file, one per line ('-': stdin)")
    p.add_argument("--skip-empty", action="store_true", help="skip blank lines of --file or stdin")
    p.add_argument("--json", action="store_true",
                   help="print a JSON list (each text's label and every class's probability by name)")
    p.add_argument("--top", type=int, default=1, metavar="K",
                   help="show the K most probable classes of each text (default 1)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--bpe-dir", default=None,
                   help="folder with GPT-2's encoder.json and vocab.bpe (default: the ones stored in the model "
                        "file; older files: $NPGPT_BPE_DIR, the training run's folder, weights/, tiktoken)")
    p.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE, help="texts per forward pass")
    p.add_argument("--width", type=int, default=60, help="characters of each text shown")
    return p


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        parser.error("--batch-size must be at least 1")
    if args.width < 4:
        parser.error("--width must be at least 4")
    if args.top < 1:
        parser.error("--top must be at least 1")
    if args.texts and args.file is not None:
        parser.error("give texts as arguments or with --file, not both")
    if "-" in args.texts and len(args.texts) > 1:
        parser.error("'-' (read stdin) cannot be combined with other texts")
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(errors="backslashreplace")   # any text prints, whatever the terminal

    # the texts first: a bad input fails before the model is read
    notes = []
    if args.file is not None and args.file != "-":
        try:
            with open(args.file, "rb") as fh:
                raw = fh.read()
        except FileNotFoundError:
            raise DataError(f"{args.file}: no such file") from None
        texts, lines = read_lines(raw, args.file, args.skip_empty, notes)
        names = [f"line {n}" for n in lines]
    elif args.file == "-" or not args.texts or args.texts == ["-"]:
        if sys.stdin.isatty():
            print("reading texts from stdin, one per line (end with Ctrl-D)", file=sys.stderr)
        from_file = stat.S_ISREG(os.fstat(sys.stdin.fileno()).st_mode)      # `< file`, not a pipe
        texts, lines = read_lines(sys.stdin.buffer.read(), "<stdin>", args.skip_empty, notes if from_file else None)
        names = [f"line {n}" for n in lines]
    else:
        texts = check_texts(args.texts)
        names = [f"text {i + 1}" for i in range(len(texts))]

    for note in notes:
        print(printable(note), file=sys.stderr)
    clf = load_classifier(args.model, args.bpe_dir, args.batch_size)
    P = clf.predict_proba(texts, progress=not args.quiet and len(texts) >= 100)   # [N,K]
    if clf.truncated:
        print(truncation_note([names[i] for i in clf.truncated], clf.limit, clf.limit_fix), file=sys.stderr)
    try:
        print_results(texts, clf.labels, P, set(clf.truncated), args.json, args.width, args.top)
    except BrokenPipeError:           # the reader stopped early (`... | head`): not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0


def print_results(texts, labels, P, cut: set, as_json: bool, width: int, top: int = 1):
    """One line per text (label, its probability, the text shortened; with top K > 1 the K most
    probable labels, each with its probability), or a JSON list."""
    top = min(top, len(labels))
    order = np.argsort(-P, axis=1, kind="stable")[:, :top]                      # [N,top]
    k = order[:, 0]                                                             # [N]
    if as_json:
        out = [{"text": text, "label": labels[k[i]], "probability": float(P[i, k[i]]),
                "probabilities": {name: float(P[i, j]) for j, name in enumerate(labels)},
                "truncated": i in cut}
               for i, text in enumerate(texts)]
        if top > 1:
            for i, item in enumerate(out):
                item["top"] = [{"label": labels[j], "probability": float(P[i, j])} for j in order[i]]
        print(json.dumps(out, indent=1))
    else:
        shown = [printable(s) for s in labels]          # a label from a file may hold escape sequences
        w = max(len(s) for s in shown)
        for i, text in enumerate(texts):
            best = "  ".join(f"{shown[j]:<{w}}  {P[i, j]:.3f}" for j in order[i])
            print(f"{best}  {shorten(text, width)}")
    sys.stdout.flush()
