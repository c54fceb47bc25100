"""Every row of the book's bonus-experiment table (ch06/02_bonus_additional-experiments) as an
npgpt command line, run one after the other, printed as one table next to the book's figures.

    python benchmarks/experiments.py --tiny                  # the tiny random model: minutes
    python benchmarks/experiments.py --tiny --rows 1,11,17   # some rows only
    python benchmarks/experiments.py --size 124M             # pretrained weights/gpt2-124M.h5

The book's figures (train/validation/test accuracy, %) are for OpenAI's pretrained 124M weights
(other sizes where the row says so), 5 epochs, on an A100; copied from the table in
rasbt/LLMs-from-scratch, ch06/02_bonus_additional-experiments/README.md. With --tiny (or
--random-init) the weights here are random, so the accuracies differ from the book's; the table
says so. With --tiny every size row runs the same tiny model, and row 13 pads to the tiny
model's context (256) instead of 1024.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import common  # noqa: F401  (puts the repository on sys.path)
from common import REPO, default_data_dir

LP = ["--pooling", "last-position"]          # the book's baseline reads the last position
# row, what changes from row 1, npgpt arguments, the book's train / val / test %
ROWS = [
    (1, "baseline: last position, last block, padded to 120", LP, (96.63, 99.33, 95.00)),
    (2, "first token's output", ["--pooling", "first-token"], (78.46, 80.54, 75.00)),
    (3, "last layer only (the head)", LP + ["--trainable-blocks", "head"], (78.65, 79.87, 72.00)),
    (4, "last two blocks", LP + ["--trainable-blocks", "2"], (98.85, 98.66, 98.33)),
    (5, "all layers", LP + ["--trainable-blocks", "all"], (99.62, 96.64, 96.67)),
    (6, "355M", LP + ["--model-size", "355M"], (87.50, 91.28, 84.67)),
    (7, "774M", LP + ["--model-size", "774M"], (99.52, 98.66, 96.67)),
    (8, "1558M", LP + ["--model-size", "1558M"], (99.81, 99.81, 98.33)),
    (9, "1558M, all layers", LP + ["--model-size", "1558M", "--trainable-blocks", "all"], (100.00, 98.66, 98.67)),
    (10, "random weights, all layers", LP + ["--random-init", "--trainable-blocks", "all"], (100.00, 96.64, 93.67)),
    (11, "LoRA (rank 16)", LP + ["--lora", "16"], (100.00, 97.32, 96.67)),
    (12, "1558M, LoRA", LP + ["--model-size", "1558M", "--lora", "16"], (100.00, 98.66, 98.33)),
    (13, "padded to the context length (1024)", LP + ["--max-length", "1024"], (83.08, 87.92, 78.33)),
    (14, "no padding, batch 1", LP + ["--max-length", "batch", "--batch-size", "1"], (100.00, 98.66, 98.00)),
    (15, "no padding, batch 1, 8 batches accumulated",
     LP + ["--max-length", "batch", "--batch-size", "1", "--accumulate", "8"], (99.33, 98.66, 98.33)),
    (16, "last non-padding token", ["--pooling", "last-token"], (99.42, 98.66, 98.33)),
    (17, "no causal mask", LP + ["--no-causal-mask"], (99.23, 98.66, 95.33)),
    (18, "ignore_index 50256 (a no-op here, see README)", LP, (96.63, 99.33, 95.00)),
    (19, "mean of the real tokens' outputs", ["--pooling", "mean"], (97.79, 99.33, 96.33)),
]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--tiny", action="store_true", help="the tiny random model (every size row alike)")
    g.add_argument("--size", default=None, help="base size for rows that name none (e.g. 124M)")
    p.add_argument("--random-init", action="store_true", help="random weights of the real shapes")
    p.add_argument("--rows", default=None, help="comma-separated row numbers (default: all)")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--shared-data", default=str(default_data_dir()), help="SMS data and GPT-2 BPE files")
    p.add_argument("--data-dir", default=os.path.join(tempfile.gettempdir(), "npgpt-experiments-data"))
    p.add_argument("--out", default=None, help="folder for the runs (default: a temporary one)")
    p.add_argument("--json", default=None, help="also write the table as JSON here")
    return p.parse_args(argv)


def command(args, extra):
    extra = list(extra)
    if args.tiny:
        for flag in ("--model-size",):
            if flag in extra:
                i = extra.index(flag)
                del extra[i:i + 2]
        extra = [a for a in extra if a != "--random-init"]
        if "1024" in extra:
            extra[extra.index("1024")] = "256"
        extra.append("--tiny")
    else:
        if args.size and "--model-size" not in extra:
            extra += ["--model-size", args.size]
        if args.random_init and "--random-init" not in extra:
            extra.append("--random-init")
    return extra + ["--epochs", str(args.epochs)]


def run_row(args, row, extra, out_dir):
    run_dir = os.path.join(out_dir, f"row{row:02d}")
    cmd = [sys.executable, "-m", "npgpt.train", *extra, "--quiet", "--no-plots", "--out", run_dir,
           "--data", os.path.join(args.shared_data, "sms_spam_collection", "SMSSpamCollection"),
           "--data-dir", args.data_dir, "--bpe-dir", os.path.join(args.shared_data, "gpt2_bpe")]
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    t0 = time.time()
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    secs = time.time() - t0
    if r.returncode != 0:
        return {"error": (r.stderr.strip().splitlines() or ["?"])[-1], "seconds": secs}
    with open(os.path.join(run_dir, "metrics.json")) as fh:
        final = json.load(fh)["metrics"]["final"]
    return {"train": 100 * final["train_accuracy"], "val": 100 * final["validation_accuracy"],
            "test": 100 * final["test_accuracy"], "seconds": secs}


def main(argv=None):
    args = parse_args(argv)
    if not args.tiny and not args.size:
        args.tiny = True
    wanted = {int(r) for r in args.rows.split(",")} if args.rows else None
    out_dir = args.out or tempfile.mkdtemp(prefix="npgpt-experiments-")
    results = []
    print("| row | change | npgpt command | npgpt train / val / test % | time | book train / val / test % |")
    print("|---|---|---|---|---|---|")
    for row, what, extra, book in ROWS:
        if wanted and row not in wanted:
            continue
        cmd = command(args, extra)
        res = run_row(args, row, cmd, out_dir)
        shown = " ".join(a for a in cmd if a not in ("--epochs", str(args.epochs)))
        got = (f"error: {res['error']}" if "error" in res else
               f"{res['train']:.2f} / {res['val']:.2f} / {res['test']:.2f}")
        print(f"| {row} | {what} | `{shown}` | {got} | {res['seconds']:.0f} s | "
              f"{book[0]:.2f} / {book[1]:.2f} / {book[2]:.2f} |", flush=True)
        results.append({"row": row, "change": what, "args": cmd, **res, "book": book})
    kind = "tiny random model" if args.tiny else (f"{args.size}" + (" random weights" if args.random_init else ""))
    print(f"\nnpgpt: {kind}, {args.epochs} epochs, on this CPU (time: the whole run incl. evaluation). "
          "Book: pretrained OpenAI weights, 5 epochs, A100 (ch06/02_bonus_additional-experiments). "
          + ("With random weights the accuracies differ from the book's." if args.tiny or args.random_init else ""))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
