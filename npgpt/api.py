"""The Python API: fine-tune a classifier on texts and labels in memory, load it back.

    import npgpt
    clf = npgpt.fit(texts, labels, model="124M", epochs=5)       # or validation=(texts, labels), out="runs/x"
    clf.predict(["..."])            # label names
    clf.predict_proba(["..."])      # [n, num_classes]
    clf.save("my.h5"); clf = npgpt.load_classifier("my.h5")

`fit` is `python -m npgpt.train` called from Python: the texts and labels are written as CSVs into
the run folder and every keyword is the CLI flag of the same name (`trainable_blocks=2` is
`--trainable-blocks 2`, `no_plots=True` is `--no-plots`), so the API and the command line train
the same model from the same data and seed.
"""
from __future__ import annotations

import csv
import os

from .classify import Classifier, load_classifier
from .errors import DataError

__all__ = ["fit", "load_classifier", "Classifier"]


def fit(texts, labels=None, *, text_column="text", label_column="label", validation=None, test=None,
        model="124M", out=None, quiet=True, **options) -> Classifier:
    """Fine-tune GPT-2 on texts with labels; return the trained Classifier.

    texts: a list of strings with `labels` a list of the same length (strings or integers), or a
    pandas DataFrame holding both, named by text_column and label_column.
    validation / test: (texts, labels) or DataFrames; what is not given is split off the training
    data (stratified, `split=(0.7, 0.1)`). model: "124M", "355M", "774M", "1558M" (pretrained
    weights, see `weights=` and `download=True`) or "tiny" (a small random model).
    out: the run folder (default: a new folder under runs/). Any other keyword is a flag of
    `python -m npgpt.train`: epochs=5, batch_size=8, lr=5e-5, trainable_blocks="all",
    pooling="last-position", balance="undersample", labels_order=["b", "a"] (--labels), seed=123,
    random_init=True, ...
    """
    from . import train

    run_dir = out or os.path.join("runs", f"fit-{model}-{_stamp()}")
    os.makedirs(run_dir, exist_ok=True)
    inputs = os.path.join(run_dir, "inputs")
    os.makedirs(inputs, exist_ok=True)
    argv = ["--data", _write_table(os.path.join(inputs, "data.csv"), texts, labels, text_column, label_column),
            "--out", run_dir]
    for name, given in (("validation", validation), ("test", test)):
        if given is not None:
            if isinstance(given, tuple):
                path = _write_table(os.path.join(inputs, f"{name}.csv"), *given, "text", "label")
            else:
                path = _write_table(os.path.join(inputs, f"{name}.csv"), given, None, text_column, label_column)
            argv += [f"--{name}", path]
    argv += ["--text-column", "text", "--label-column", "label"]
    if model == "tiny":
        argv.append("--tiny")
    else:
        argv += ["--model-size", str(model)]
    if "labels_order" in options:
        argv += ["--labels", ",".join(map(str, options.pop("labels_order")))]
    if "split" in options and not isinstance(options["split"], str):
        options["split"] = ",".join(map(str, options["split"]))
    if quiet:
        options.setdefault("quiet", True)
    for key, value in options.items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            argv.append(flag)
        elif value is False or value is None:
            continue
        else:
            argv += [flag, str(value)]
    code = train.main(argv)
    if code:
        raise DataError(f"training stopped (exit code {code}); the run folder is {run_dir}")
    return load_classifier(os.path.join(run_dir, "classifier.h5"), options.get("bpe_dir"))


def _write_table(path, texts, labels, text_column, label_column) -> str:
    """texts and labels (lists, or a DataFrame with the two columns) -> a CSV with text,label."""
    if labels is None and hasattr(texts, "columns"):
        df = texts
        for col in (text_column, label_column):
            if col not in df.columns:
                raise DataError(f"the DataFrame has no column {col!r} (its columns: "
                                f"{', '.join(map(str, df.columns))}); pass text_column= and label_column=")
        texts, labels = df[text_column].tolist(), df[label_column].tolist()
    if labels is None:
        raise DataError("fit needs labels: fit(texts, labels) or fit(dataframe, text_column=..., label_column=...)")
    texts, labels = list(texts), list(labels)
    if len(texts) != len(labels):
        raise DataError(f"{len(texts)} texts but {len(labels)} labels")
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["text", "label"])
        w.writerows(zip(texts, labels))
    return path


def _stamp() -> str:
    import time
    return time.strftime("%Y%m%d-%H%M%S") + f"-{os.getpid()}"
