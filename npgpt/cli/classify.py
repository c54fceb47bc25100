"""`python -m npgpt.classify`: label texts with a classifier trained by `python -m npgpt.train`.

    python -m npgpt.classify --model runs/<name>/classifier.h5 "You are a winner ..." "See you at 6?"
    spam  0.973  You are a winner ...
    ham   0.991  See you at 6?

`--explain` shows how much each token pushed the logit of the label (`npgpt.explain`; coloured
tokens on a terminal, a two-column list elsewhere, an "explanation" per text with --json).

The texts come as arguments, from a file (a table, or one text per line) or from stdin; each is
labelled by `npgpt.classify.Classifier` (the library: tokenizing, cutting and padding as training
did). --out FILE writes one row per text, by its row id (npgpt.predictions).
"""
from __future__ import annotations

import json
import os
import stat
import sys

import numpy as np

from ..classify import DEFAULT_BATCH_SIZE, check_texts, load_classifier
from ..errors import printable
from ..explain import label_index
from ..predictions import check_out_path, prediction_frame, read_lines, read_texts, text_series, write_predictions
from ..tabular import is_table
from . import explain_view, expect_file, make_parser, shorten


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
                    "the probability the model gives that label, the text; --out FILE writes a table instead.")
    p.add_argument("texts", nargs="*", metavar="TEXT",
                   help="texts to classify; none, or '-', reads stdin, one text per line")
    p.add_argument("--model", required=True, help="the classifier, runs/<name>/classifier.h5")
    p.add_argument("--file", default=None,
                   help="read the texts from this file: a table (.csv/.tsv/.jsonl/.parquet, a header row, read as "
                        "train --data reads it: the header is never a text, a quoted field may span lines) or "
                        "any other file, one text per line ('-': stdin)")
    p.add_argument("--text-column", default=None,
                   help="column of a --file table holding the texts (default: the model's training column, "
                        "'text' unless train was given --text-column)")
    p.add_argument("--id-column", default=None,
                   help="column of a --file table naming each row, the row id of --out (default: the line of "
                        "the file where the row starts, as error messages count lines; .parquet: the row number)")
    p.add_argument("--out", default=None, metavar="FILE",
                   help="write one row per text to FILE (.csv, .jsonl or .parquet, by extension; replaced if it "
                        "exists): its row id (a table's line or --id-column, a text file's line, an argument's "
                        "position), label, and p_<class> for every class; the terminal gets one summary line "
                        "(and --json's list, if asked)")
    p.add_argument("--skip-empty", "--skip-bad-lines", dest="skip_empty", action="store_true",
                   help="skip blank lines of --file or stdin, and bad rows of a table (reported on stderr)")
    p.add_argument("--json", action="store_true",
                   help="print a JSON list (each text's label and every class's probability by name)")
    p.add_argument("--top", type=int, default=1, metavar="K",
                   help="show the K most probable classes of each text (default 1)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--bpe-dir", default=None,
                   help="folder with GPT-2's encoder.json and vocab.bpe (default: the ones stored in the model "
                        "file; older files: $NPGPT_BPE_DIR, the training run's folder, ./weights, ~/.cache/npgpt/weights, tiktoken)")
    p.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE, help="texts per forward pass")
    p.add_argument("--width", type=int, default=60, help="characters of each text shown")
    p.add_argument("--explain", action="store_true",
                   help="show how much each token pushed the logit of the label (gradient x input at the "
                        "embeddings): the tokens coloured on a terminal, else a two-column list (token, score)")
    p.add_argument("--label", default=None, metavar="NAME",
                   help="with --explain: the label to explain (default: each text's predicted one)")
    p.add_argument("--scheduler", default=None, metavar="ADDRESS",
                   help="classify on the Dask cluster at ADDRESS (tcp://HOST:8786): --file is a pattern of tables "
                        "('texts/*.parquet'), --out a folder getting one .parquet per file; files already there "
                        "are skipped (pip install -e \".[dask]\"; docs/distributed.md)")
    p.add_argument("--workers", type=int, default=None, metavar="N",
                   help="as --scheduler, on a Dask cluster of N worker processes started here")
    p.add_argument("--partition-rows", type=int, default=None, metavar="N",
                   help="with --scheduler or --workers: cut each file in pieces of N rows (default: one piece "
                        "per file), each written to --out as <name>-00000.parquet, <name>-00001.parquet, ...")
    return p


def check_args(parser, args) -> None:
    """Usage errors (exit 2) that argparse cannot see alone."""
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
    if args.label is not None and not args.explain:
        parser.error("--label needs --explain")
    table = args.file not in (None, "-") and is_table(args.file)
    for flag, value in (("--text-column", args.text_column), ("--id-column", args.id_column)):
        if value is not None and not table:
            parser.error(f"{flag} needs --file with a table (.csv, .tsv, .jsonl, .parquet)")
    if args.scheduler or args.workers is not None:
        check_cluster_args(parser, args)
        return
    if args.partition_rows is not None:
        parser.error("--partition-rows cuts files for a cluster: give it with --scheduler or --workers")
    if args.out is not None:
        check_out_path(args.out)
        if args.file not in (None, "-") and os.path.realpath(args.out) == os.path.realpath(args.file):
            parser.error(f"--out {args.out} is the --file being read; write the predictions to another file")


def check_cluster_args(parser, args) -> None:
    """--scheduler / --workers: a --file pattern of tables and an --out folder, nothing printed per text."""
    if args.scheduler and args.workers is not None:
        parser.error("give --scheduler (a cluster running) or --workers (one started here), not both")
    if args.workers is not None and args.workers < 1:
        parser.error("--workers must be at least 1")
    if args.file in (None, "-") or args.out is None:
        parser.error("--scheduler and --workers need --file PATTERN (tables) and --out FOLDER")
    if os.path.splitext(args.out)[1].lower() in (".csv", ".jsonl", ".parquet") or os.path.isfile(args.out):
        parser.error(f"--out {args.out}: with --scheduler or --workers, --out is a folder (one .parquet per file)")
    if args.json or args.top != 1:
        parser.error("--json and --top print per text: not with --scheduler or --workers (read --out's files)")
    if args.partition_rows is not None and args.partition_rows < 1:
        parser.error("--partition-rows must be at least 1")


def classify_on_cluster(args) -> int:
    """--file PATTERN --out FOLDER on a Dask cluster (npgpt.corpus, npgpt.distributed)."""
    from ..classify import load_classifier
    from ..corpus import classify_files, expand_files, model_ref
    from ..distributed import cluster, require_dask
    require_dask()
    files = expand_files(args.file)
    expect_file(args.model, "--model")
    clf = load_classifier(args.model, args.bpe_dir, args.batch_size)
    log = lambda msg: print(printable(msg), file=sys.stderr)
    with cluster(args.scheduler, args.workers, log) as client:
        done = classify_files(client, files, model_ref(args.model, args.bpe_dir, args.batch_size), args.out,
                              args.text_column or clf.text_column, args.id_column, clf.labels,
                              progress=not args.quiet, log=log, partition_rows=args.partition_rows)
    unit = "files" if args.partition_rows is None else "partitions"
    log(f"wrote predictions for {done['texts']} texts in {done['written']} {unit} to {args.out} "
        f"({done['skipped']} {unit} already there)")
    if done["cut"]:
        log(f"note: {done['cut']} texts have more than {clf.limit} tokens; only the first {clf.limit} were used"
            + (f"; {clf.limit_fix}" if clf.limit_fix else ""))
    return 0


def read_input(args, clf):
    """The texts to classify as a Series indexed by their row ids (npgpt.predictions), and the
    name of each in a note ("line 3", "text 2")."""
    if args.file is not None and args.file != "-":
        if is_table(args.file):
            texts = read_texts(args.file, args.text_column or clf.text_column, args.id_column, args.skip_empty)
        else:
            texts = read_texts(args.file, skip_bad_lines=args.skip_empty)
        names = [f"{texts.index.name} {i}" for i in texts.index]
    elif args.file == "-" or not args.texts or args.texts == ["-"]:
        if sys.stdin.isatty():
            print("reading texts from stdin, one per line (end with Ctrl-D)", file=sys.stderr)
        from_file = stat.S_ISREG(os.fstat(sys.stdin.fileno()).st_mode)      # `< file`, not a pipe
        notes = []
        lines = read_lines(sys.stdin.buffer.read(), "<stdin>", args.skip_empty, notes if from_file else None)
        texts = text_series(*lines, "line")
        texts.attrs["notes"] = notes
        names = [f"line {n}" for n in texts.index]
    else:
        texts = text_series(check_texts(args.texts), range(1, len(args.texts) + 1), "position")
        names = [f"text {i}" for i in texts.index]
    for note in texts.attrs.get("notes", []):
        print(printable(note), file=sys.stderr)
    return texts, names


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    check_args(parser, args)
    if args.scheduler or args.workers is not None:
        return classify_on_cluster(args)
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(errors="backslashreplace")   # any text prints, whatever the terminal

    # a text file's or the arguments' texts first: a bad input fails before the model is read; a
    # table's text column defaults to the model's, so a table is read after the model
    if args.file is not None and args.file != "-":
        expect_file(args.file, "--file")
    table = args.file not in (None, "-") and is_table(args.file)
    texts, names = (None, None) if table else read_input(args, None)
    clf = load_classifier(args.model, args.bpe_dir, args.batch_size)
    label_index(clf.labels, args.label, "--label")
    if table:
        texts, names = read_input(args, clf)
    frame = prediction_frame(clf, texts, progress=not args.quiet and len(texts) >= 100)
    if clf.truncated:
        print(truncation_note([names[i] for i in clf.truncated], clf.limit, clf.limit_fix), file=sys.stderr)
    if args.out is not None:
        write_predictions(frame, args.out)
        print(f"wrote {len(frame)} prediction{'s' if len(frame) != 1 else ''} to {printable(args.out)} (columns: "
              f"{printable(', '.join([str(texts.index.name)] + list(frame.columns)))})", file=sys.stderr)
        if not args.json:
            return 0
    P = frame[["p_" + name for name in clf.labels]].to_numpy()                 # [N,K]
    explanations = [clf.explain(text, args.label) for text in texts] if args.explain else None
    try:
        if explanations and not args.json:
            explain_view.show(names, explanations, clf.labels, P, sys.stdout, explain_view.use_colour(sys.stdout))
        else:
            print_results(texts.tolist(), clf.labels, P, set(clf.truncated), args.json, args.width, args.top,
                          explanations)
    except BrokenPipeError:           # the reader stopped early (`... | head`): not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0


def print_results(texts, labels, P, cut: set, as_json: bool, width: int, top: int = 1, explanations=None):
    """One line per text (label, its probability, the text shortened; with top K > 1 the K most
    probable labels, each with its probability), or a JSON list (with each text's "explanation",
    `Explanation.to_dict`, when explanations are given)."""
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
        for item, exp in zip(out, explanations or []):
            item["explanation"] = exp.to_dict()
        print(json.dumps(out, indent=1))
    else:
        shown = [printable(s) for s in labels]          # a label from a file may hold escape sequences
        w = max(len(s) for s in shown)
        for i, text in enumerate(texts):
            best = "  ".join(f"{shown[j]:<{w}}  {P[i, j]:.3f}" for j in order[i])
            print(f"{best}  {shorten(text, width)}")
    sys.stdout.flush()
