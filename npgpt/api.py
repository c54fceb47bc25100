"""The Python API: fine-tune a classifier on texts and labels in memory, load it back.

    import npgpt
    clf = npgpt.fit(texts, labels, model="124M", epochs=5)       # or validation=(texts, labels), out="runs/x"
    clf.predict(["..."])            # label names
    clf.predict_proba(["..."])      # [n, num_classes]
    clf.save("my.h5"); clf = npgpt.load_classifier("my.h5")

`fit` makes the RunConfig the command line would make from the same flags (`trainable_blocks=2`
is `--trainable-blocks 2`, `pooling="last-position"` is `--pooling last-position`) and calls the
same `npgpt.train.train_run` with the data as it is: the same data and seed give the same
parameters, bit for bit. The run folder still records the splits used (train.csv, ...).
"""
from __future__ import annotations

import dataclasses

from .classify import Classifier, load_classifier
from .errors import NpgptError
from .runconfig import MEMORY, RunConfig, RunOptions

__all__ = ["fit", "load_classifier", "Classifier"]

CONFIG_FIELDS = {f.name for f in dataclasses.fields(RunConfig)}
OPTION_FIELDS = {f.name for f in dataclasses.fields(RunOptions)}
# the flags that turn a setting off, as keywords: no_plots=True is plots=False, quiet=True progress=False
NEGATED = {(f.metadata["flag"][2:].replace("-", "_")): f.name
           for cls in (RunConfig, RunOptions) for f in dataclasses.fields(cls) if f.metadata.get("negate")}


def fit(texts, labels=None, *, text_column="text", label_column="label", validation=None, test=None,
        model="124M", out=None, verbose=False, **settings) -> Classifier:
    """Fine-tune GPT-2 on texts with labels; return the trained Classifier.

    texts: a list of strings with `labels` a list of the same length (strings or integers), or a
    pandas DataFrame holding both, named by text_column and label_column.
    validation / test: (texts, labels) or DataFrames; what is not given is split off the training
    data (stratified, `split=(0.7, 0.1)`). model: "124M", "355M", "774M", "1558M" (pretrained
    weights, see `weights=` and `download=True`) or "tiny" (a small random model).
    out: the run folder (default: a new folder under runs/). verbose: print the run's progress
    (otherwise fit prints nothing). Any other keyword is a field of `npgpt.runconfig.RunConfig`
    or `RunOptions`, a flag of `python -m npgpt.train`: epochs=5, batch_size=8, lr=5e-5,
    trainable_blocks="all", pooling="last-position", balance="undersample", labels_order=["b", "a"]
    (--labels), seed=123, random_init=True, threads=2, ...
    Raises npgpt's errors (npgpt.errors.NpgptError) for unusable data or settings."""
    from .train import train_run
    if "quiet" in settings:
        verbose = not settings.pop("quiet")
    for flag in set(settings) & set(NEGATED):
        settings[NEGATED[flag]] = not settings.pop(flag)
    if "labels_order" in settings:
        settings["labels"] = settings.pop("labels_order")
    unknown = sorted(set(settings) - CONFIG_FIELDS - OPTION_FIELDS - {"data", "validation", "test"})
    if unknown:
        raise TypeError(f"fit() got an unexpected keyword argument {unknown[0]!r}")
    if labels is None and not hasattr(texts, "columns"):
        raise NpgptError("fit needs labels: fit(texts, labels) or fit(dataframe, text_column=..., label_column=...)")
    data = texts if labels is None else (texts, labels)
    config = {k: v for k, v in settings.items() if k in CONFIG_FIELDS}
    options = {k: v for k, v in settings.items() if k in OPTION_FIELDS}
    run = RunConfig(model=model, data=MEMORY, validation=MEMORY if validation is not None else None,
                    test=MEMORY if test is not None else None,
                    text_column=text_column if labels is None else "text",
                    label_column=label_column if labels is None else "label", **config)
    options = RunOptions(out=out, **{"progress": verbose, **options})
    result = train_run(run, options, data=data, validation=validation, test=test,
                       log=print if verbose else _silent)
    return result.classifier


def _silent(message: str) -> None:
    pass
