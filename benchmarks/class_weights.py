"""The SMS data undersampled, class-weighted or plain: accuracy, macro F1 and spam recall on one test set.

    python benchmarks/class_weights.py                   # tiny and 124M-shaped (~15 min on 2 quiet cores)
    python benchmarks/class_weights.py --sizes tiny      # a minute

The SMS Spam Collection (pandas' read, 5572 messages: 4825 ham, 747 spam) is split once, stratified
by label, 70 / 10 / 20 (seed 123): train 3901 (523 spam), validation 557, test 1114 (149 spam). Three runs per
model size train on the training part and score the same test part (`npgpt.evaluate`):

  undersampled     `--balance undersample`: the training ham cut at random to the spam count
                   (523 + 523), as the reference does with the whole file
  class-weighted   every training message, `--class-weight balanced` (scikit-learn's
                   n / (classes x count): ham 0.58, spam 3.73)
  plain            every training message, every class weighing the same

Sizes: `tiny` (2 layers, 64 dims, random init, `--trainable-blocks all --lr 1e-3`) and `124M`
(GPT-2 124M's shapes with random weights, `--random-init`: the last block, ln_f and the head
train on random features). Every other setting is `python -m npgpt.train`'s default (5 epochs,
batch 8, seed 123, last-token pooling).
"""
from __future__ import annotations

import os
import sys
import tempfile
import time

from common import arg_parser, default_data_dir, machine_info, print_info, write_json

import pandas as pd  # noqa: E402  (after common: npgpt.tune_runtime() first)

VARIANTS = {"undersampled": dict(balance="undersample"),
            "class-weighted": dict(balance="none", class_weight="balanced"),
            "plain": dict(balance="none")}
SIZES = {"tiny": dict(model="tiny", trainable_blocks="all", lr=1e-3),
         "124M": dict(model="124M", random_init=True)}


def parse_args(argv=None):
    p = arg_parser(__doc__, __file__)
    p.add_argument("--sizes", default="tiny,124M", help="comma-separated: tiny, 124M")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    return p.parse_args(argv)


def write_splits(folder) -> dict:
    """train/validation/test CSVs (text, label) of the SMS data, stratified 70 / 10 / 20."""
    from npgpt.data import read_sms_spam
    from npgpt.tabular import stratified_split
    sms = read_sms_spam(default_data_dir() / "sms_spam_collection" / "SMSSpamCollection")
    parts = stratified_split(sms, [0.7, 0.1, 0.2], seed=123)
    paths = {}
    for name, part in zip(("train", "validation", "test"), parts):
        paths[name] = os.path.join(folder, f"{name}.csv")
        pd.DataFrame({"text": part["Text"], "label": part["Label"]}).to_csv(paths[name], index=False)
    return paths


def run_one(size, variant, paths, epochs, work) -> dict:
    from npgpt.evaluate import evaluate_classifier
    from npgpt.runconfig import RunConfig, RunOptions
    from npgpt.train import train_run
    bpe = default_data_dir() / "gpt2_bpe"
    run = RunConfig(data=paths["train"], validation=paths["validation"], test=paths["test"], epochs=epochs,
                    bpe_dir=str(bpe), **SIZES[size], **VARIANTS[variant])
    options = RunOptions(out=os.path.join(work, f"{size}-{variant}"), progress=False, plots=False,
                         cache_dir=os.path.join(work, "cache"))
    t0 = time.perf_counter()
    result = train_run(run, options, log=lambda s: None)
    seconds = time.perf_counter() - t0
    test = pd.read_csv(paths["test"], keep_default_na=False)
    e = evaluate_classifier(result.classifier, test["text"].tolist(), test["label"].tolist(), positive="spam")
    spam = e["per_class"]["spam"]
    trained = len(pd.read_csv(os.path.join(options.out, "train.csv")))
    return {"size": size, "variant": variant, "train_messages": trained,
            "accuracy": e["accuracy"], "macro_f1": e["macro"]["f1"], "spam_recall": spam["recall"],
            "spam_precision": spam["precision"], "ham_recall": e["per_class"]["ham"]["recall"],
            "class_weights": result.classifier.meta.get("class_weights"), "seconds": seconds}


def main(argv=None):
    args = parse_args(argv)
    command = "python benchmarks/class_weights.py " + " ".join(sys.argv[1:] if argv is None else argv)
    print(command)
    info = machine_info()
    print_info(info)
    rows = []
    with tempfile.TemporaryDirectory() as work:
        paths = write_splits(work)
        sizes = {k: pd.read_csv(p, keep_default_na=False) for k, p in paths.items()}
        print("splits: " + ", ".join(f"{k} {len(d)} ({(d['label'] == 'spam').sum()} spam)" for k, d in sizes.items()))
        print(f"{'model':5s} {'training data':30s} {'accuracy':>9s} {'macro F1':>9s} {'spam recall':>12s} "
              f"{'spam precision':>15s}", flush=True)
        for size in args.sizes.split(","):
            for variant in VARIANTS:
                r = run_one(size, variant, paths, args.epochs, work)
                rows.append(r)
                print(f"{size:5s} {variant + ' (' + str(r['train_messages']) + ')':30s} {r['accuracy'] * 100:8.2f}% {r['macro_f1'] * 100:8.2f}% "
                      f"{r['spam_recall'] * 100:11.2f}% {r['spam_precision'] * 100:14.2f}%", flush=True)
    if args.json:
        write_json(args.json, {"command": command, "machine": info, "rows": rows})


if __name__ == "__main__":
    main()
