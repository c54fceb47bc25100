"""What a training run needs before its folder exists: the data, the model, the token ids.

    job = load_data(run, options, log)      # a Job: everything loaded and checked, nothing written

The order is the order of likely mistakes: a user's table first (its classes decide the head),
then the model (a missing weights file needs no data to be reported), then the SMS data, the
tokenizer and the token ids; each error names the flag or file that fixes it.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass

import numpy as np

from .errors import NpgptError
from .runconfig import ConfigError, RunConfig
from .userpaths import data_dir, weights_file

SMS_LABELS = ["ham", "spam"]           # the SMS data's classes, ids 0 and 1


@dataclass
class Job:
    run: RunConfig               # with the class names resolved (run.labels, for a table)
    classes: list                # class names, by id
    params: dict                 # the model, with a fresh head (and LoRA pairs)
    config: object               # its GPT2Config
    model_name: str              # "124M", "tiny", or "custom (...)" for other weights
    splits: tuple                # (train, validation, test) DataFrames
    datasets: tuple              # (train, validation, test) TextDatasets
    n_params: int
    n_train: int
    class_weights: np.ndarray | None = None   # [K] the loss's weight of each class (None: all 1)


def weights_path(run: RunConfig) -> str:
    """--weights, else the size's file found from any folder (`npgpt.userpaths.weights_file`)."""
    return run.weights or weights_file(run.model)


def load_data(run: RunConfig, options, log, frames=(None, None, None), run_dir=None) -> Job:
    """Everything the run reads, loaded and checked. frames: in-memory (data, validation, test)
    for a run whose data is "<memory>"; run_dir: a run being resumed (its splits are read back)."""
    from .model import trainable_names
    splits = None
    if run.is_table and run_dir is None:
        splits, classes = _user_splits(run, frames)
        run = run.replace(labels=classes)
    classes = list(run.labels) if run.is_table else list(SMS_LABELS)
    params, config, model_name = load_model(run, len(classes), options, log)
    if run.trainable_blocks not in ("all", "head") and run.trainable_blocks > config.n_layer:
        raise ConfigError("trainable_blocks", f"{run.trainable_blocks}: the weights have only {config.n_layer} blocks")
    if splits is None:
        splits = _read_back(run_dir, classes) if run.is_table else _sms_splits(run, options.progress)
    if splits[0].attrs.get("warning"):
        log(splits[0].attrs["warning"])
    datasets = _datasets(run, splits, config, options.progress)
    names = trainable_names(config, run.trainable, num_classes=len(classes), lora=run.lora_spec)
    n_params = sum(a.size for a in params.values())
    job = Job(run, classes, params, config, model_name, splits, datasets, n_params,
              sum(params[n].size for n in names), class_weight_vector(run, classes, datasets[0].labels))
    if run.is_table:
        counts = np.bincount(datasets[0].labels, minlength=len(classes))
        log("classes: " + ", ".join(f"{s} ({c})" for s, c in zip(classes, counts)) + " in train")
    d = datasets
    log(f"data: {len(d[0])} train / {len(d[1])} validation / {len(d[2])} test messages, padding "
        f"{run.max_length} ({d[0].pad_to or 'per batch'}), mean length {np.mean(d[0].lengths):.1f} tokens")
    return job


def class_weight_vector(run: RunConfig, classes, train_labels):
    """The weight of each class in the loss, [K], from --class-weight: balanced is
    n / (K count_c) over the training split (scikit-learn's definition); NAME=W gives class NAME
    the weight W (classes not named: 1). None when every class weighs the same."""
    cw = run.class_weight
    if cw is None:
        return None
    K = len(classes)
    if cw == "balanced":
        counts = np.bincount(train_labels, minlength=K)
        return len(train_labels) / (K * counts.astype(np.float64))
    unknown = sorted(set(cw) - set(classes))
    if unknown:
        raise ConfigError("class_weight", f"{unknown[0]!r} is not a class of the data (the classes: "
                                          f"{', '.join(classes)})")
    return np.array([cw.get(name, 1.0) for name in classes], np.float64)


def model_summary(job: Job, run_dir) -> str:
    """The lines a run prints about its model (and its data's texts cut to the length limit)."""
    from .dataset import cut_summary
    run, spec = job.run, job.run.lora_spec
    line = (f"model: {job.model_name} ({job.n_params / 1e6:.1f}M parameters, {job.n_train / 1e6:.2f}M trainable: "
            f"{run.trainable}), pooling {run.pooling}, run folder {run_dir}")
    if job.class_weights is not None:
        line += "\nclass weights: " + ", ".join(f"{c} {w:.3g}" for c, w in zip(job.classes, job.class_weights))
    cut = cut_summary(job.datasets)
    if cut:
        line += "\n" + cut
    if spec is not None:
        line += (f"\nLoRA rank {spec.rank}, alpha {spec.alpha:g} on {', '.join(spec.targets) or 'no layer'}"
                 f"{' + the full head' if spec.train_head else ''}: {job.n_train:,} trainable parameters")
    return line


# ----------------------------------------------------------------------------- the data

def _user_splits(run: RunConfig, frames):
    """A user's table (a file, or in memory) split as the run says -> (splits, class names)."""
    from .runconfig import MEMORY
    from .tabular import prepare_user_splits
    data, validation, test = frames
    pick = lambda path, frame: frame if path == MEMORY else path
    if run.data == MEMORY and data is None:
        raise NpgptError("the run's data is in memory: pass it (npgpt.fit(texts, labels) or data=)")
    return prepare_user_splits(pick(run.data, data), pick(run.validation, validation),
                               pick(run.test, test), text_column=run.text_column,
                               label_column=run.label_column, labels=run.labels, split=run.split,
                               balance=run.balance, seed=run.seed, skip_bad_lines=run.skip_bad_lines)


def _read_back(run_dir, classes):
    from .tabular import read_user_splits
    return read_user_splits(run_dir, classes)


def _sms_splits(run: RunConfig, progress: bool):
    """The SMS data's three splits; a missing data file or a failed download names --data."""
    from .data import prepare_splits
    if run.data is not None and os.path.isdir(run.data):
        raise NpgptError(f"--data {run.data}: is a folder, expected the SMSSpamCollection file or "
                         "UCI's zip (for a folder of split CSVs, pass it as --data-dir)")
    folder = run.data_dir or data_dir()
    try:
        # the reference's split: seed 123 whatever --seed (which seeds the head and the batch order)
        return prepare_splits(run.data, folder, skip_bad_lines=run.skip_bad_lines, progress=progress,
                              parse=run.parse, balance=run.balance or "undersample")
    except NpgptError as e:
        if run.data is None and "--data" not in str(e):
            raise type(e)(f"{e} (offline? pass --data PATH to the SMSSpamCollection file or UCI's zip, "
                          f"or put train/validation/test.csv in --data-dir {folder})") from None
        raise


def _datasets(run: RunConfig, splits, config, progress):
    """Token ids of the three splits, padded as the run says; the batch size checked against them."""
    from .dataset import make_datasets
    tok = _tokenizer(run)
    datasets = make_datasets(splits, tok, run.max_length, context_length=config.n_ctx, progress=progress)
    if run.batch_size > len(datasets[0]):
        raise ConfigError("batch_size", f"{run.batch_size} is larger than the {len(datasets[0])} training messages")
    return datasets


def _tokenizer(run: RunConfig):
    """GPT-2's tokenizer; when none is found, the message names --bpe-dir."""
    from .tokenizer import get_tokenizer
    try:
        return get_tokenizer(run.bpe_dir, weights_dir=os.path.dirname(weights_path(run)) or ".")
    except NpgptError as e:
        if "--bpe-dir" in str(e):
            raise
        raise type(e)(f"--bpe-dir: {e}") from None


# ----------------------------------------------------------------------------- the model

def load_model(run: RunConfig, num_classes: int, options, log):
    """The pretrained (or random) GPT-2 with a fresh head of num_classes (and fresh LoRA pairs).
    The kernels are loaded from Numba's cache (`fastops.load_compiled_kernels`), as every process
    that runs the model does: a Dask worker's numbers are the trainer's.
    -> (params, GPT2Config, the model's name)"""
    from .config import PRESETS, add_classifier_head, init_params, preset
    from .fastops import load_compiled_kernels
    from .params import load_params
    load_compiled_kernels(log)
    config = preset(run.model)
    if run.tiny or run.random_init:
        if run.random_init:
            log(f"random {run.model}-shaped weights (no pretrained weights: accuracy will be low)")
        return _with_lora(init_params(config, seed=run.seed, num_classes=num_classes), config, run), config, run.model
    path = _weights_file(run, options, log)
    explicit = run.weights is not None
    # the default file must be the named size; a file given with --weights brings its own shapes
    params, file_config, _ = load_params(path, config=None if explicit else config)
    name = run.model
    if file_config != config:
        name = next((n for n, c in PRESETS.items() if c == file_config),
                    f"custom ({file_config.n_layer} layers, {file_config.n_embd} dims)")
        log(f"weights {path}: {name}, not {config}")
    params = add_classifier_head(params, num_classes, seed=run.seed)
    return _with_lora(params, file_config, run), file_config, name


def _weights_file(run: RunConfig, options, log) -> str:
    """The converted weights file, downloaded first when asked (--download, or yes at a prompt)."""
    path = weights_path(run)
    if os.path.isdir(path):
        raise NpgptError(f"--weights {path}: is a folder, expected a converted .h5 file; if it holds a "
                         f"downloaded checkpoint, run `python -m npgpt.weights convert {path}` and pass "
                         f"the .h5 file it prints")
    if not os.path.exists(path):
        if options.download or (sys.stdin.isatty() and _ask(f"No weights at {path}. Download GPT-2 "
                                                              f"{run.model} now? [y/N] ")):
            from .weights import download
            download(run.model, weights_dir=os.path.dirname(path) or ".", out=path, progress=options.progress,
                     log=log)
        if not os.path.exists(path):
            raise NpgptError(f"no weights at {path}: run `python -m npgpt.weights download {run.model}` "
                             f"(or pass --download, --weights PATH, or --tiny for a small random model)")
    return path


def _with_lora(params, config, run: RunConfig):
    """Add fresh LoRA pairs when the run uses LoRA."""
    spec = run.lora_spec
    if spec is not None:
        from .lora import add_lora
        add_lora(params, config, spec.rank, spec.alpha, seed=run.seed, targets=spec.targets,
                 train_head=spec.train_head)
    return params


def _ask(question) -> bool:
    try:
        return input(question).strip().lower() in ("y", "yes")
    except EOFError:
        return False
