"""One training run, described once: `RunConfig`, a field per `python -m npgpt.train` flag.

    config = RunConfig(model="tiny", data="examples/support_tickets.csv", trainable_blocks="all", lr=1e-3)

The command line builds its parser from these fields (flag, default, help), `npgpt.fit` and
`npgpt.GPT2Classifier` take them as keywords, and `npgpt.train.train_run` runs one. A RunConfig is
checked and normalised when it is made (`--pooling last-token` and `pooling="last_token"` are the
same; `lr=None` becomes the default for the run's kind), so a RunConfig is always a valid run; an
error names the flag that fixes it. It is saved as JSON in the run folder (`run.json`), in every
checkpoint and in the classifier file (meta `run_config`), and read back by `--resume`.

`RunOptions` holds what may differ each time a run is started or resumed (threads, progress bars,
plots, the cache folder, ...): not part of what the run is, not saved.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from .config import PRESETS, preset
from .errors import NpgptError

SIZES = tuple(PRESETS)                      # 124M, 355M, 774M, 1558M
POOLING_CHOICES = ("last-token", "last-position", "first-token", "mean")
LORA_TARGETS = ("attn", "mlp", "head")
RUN_FILE = "run.json"                       # the run's RunConfig, in its folder
MEMORY = "<memory>"                         # data given from Python (npgpt.fit): the run folder's CSVs hold it


class ConfigError(NpgptError):
    """A run setting that cannot be: names the flag (and keyword) that fixes it."""

    def __init__(self, name: str, message: str):
        self.field = name
        super().__init__(f"{flag_of(name)} {message}")


def flag_of(name: str) -> str:
    """The command-line flag of a field: its `flag` metadata, else --name-with-dashes."""
    fields = {f.name: f for f in dataclasses.fields(RunConfig)} | {f.name: f for f in dataclasses.fields(RunOptions)}
    f = fields.get(name)
    return (f.metadata.get("flag") if f is not None else None) or "--" + name.replace("_", "-")


def option(default, help: str, group: str, **cli):
    """A field with its default, its one-line help and how the command line spells it:
    flag (default --name), metavar, choices, negate (a True default turned off by the flag)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=dict(help=help, group=group, **cli))
    return field(default=default, metadata=dict(help=help, group=group, **cli))


@dataclass
class RunConfig:
    """What a training run is. Defaults are the reference's (chapter 6 of "Build a Large Language
    Model (From Scratch)"), except pooling at the last real token."""
    # the model
    model: str = option("124M", "GPT-2 size: 124M, 355M, 774M or 1558M, or tiny (a small random model, "
                                "2 layers, 64 dims: the pipeline in seconds)", "model", flag="--model-size")
    weights: str | None = option(None, "converted weights (default: ./weights/gpt2-<size>.h5 if there, else "
                                        "~/.cache/npgpt/weights/gpt2-<size>.h5 or $NPGPT_WEIGHTS_DIR's)", "model")
    random_init: bool = option(False, "random weights with the chosen size's shapes (for timing without "
                                      "downloads)", "model")
    trainable_blocks: int | str = option(1, "train the head, ln_f and the last K blocks; 'all' trains "
                                            "everything, 'head' the head alone", "model", metavar="K|all|head")
    # the data
    data: str | None = option(None, "your labelled texts (.csv, .tsv with a header row; .jsonl; .parquet), or the "
                                    "SMSSpamCollection file or UCI zip (default: SMS data, reused or downloaded "
                                    "into --data-dir)", "data")
    text_column: str = option("text", "column of --data holding the texts", "data")
    label_column: str = option("label", "column of --data holding the labels", "data")
    labels: list | None = option(None, "the classes in this order (default: the training labels sorted)",
                                 "data", metavar="A,B,C")
    validation: str | None = option(None, "validation texts (default: split off --data)", "data", metavar="FILE")
    test: str | None = option(None, "test texts (default: split off --data)", "data", metavar="FILE")
    split: tuple = option((0.7, 0.1), "fractions of --data for train and validation, the rest test, stratified "
                                      "by label (rescaled when --validation or --test is given)", "data",
                          metavar="TRAIN,VAL")
    balance: str | None = option(None, "undersample every class to the smallest (default: none for your data, "
                                       "undersample for the SMS data, as in the reference)", "data",
                                 choices=("none", "undersample"))
    data_dir: str | None = option(None, "where the SMS data and its train/validation/test CSVs live (default: ./data "
                                        "if it holds them, else ~/.cache/npgpt/data or $NPGPT_DATA_DIR)", "data")
    skip_bad_lines: bool = option(False, "skip malformed dataset lines and report them", "data")
    parse: str = option("pandas", "SMS file only: read it as the reference does (pandas' quoting, 5572 messages, "
                                  "its exact splits) or strictly one message a line (5574)", "data",
                        choices=("pandas", "strict"))
    bpe_dir: str | None = option(None, "folder with GPT-2's encoder.json and vocab.bpe (default: $NPGPT_BPE_DIR, "
                                       "else the folder of --weights or its <size>/ subfolder, ./weights, "
                                       "~/.cache/npgpt/weights, else tiktoken's "
                                       "cache or download)", "data")
    max_length: int | str = option("longest", "pad to the longest training example (reference: 120), per batch, "
                                              "or to N tokens", "data", metavar="longest|batch|N")
    pooling: str = option("last_token", "read the logits at the last real token, at the last position (the "
                                        "reference), at the first token, or average ln_f's output over the real "
                                        "tokens (mean)", "data", choices=POOLING_CHOICES)
    # training
    epochs: int = option(5, "passes over the training set; with --resume, a larger number trains a run longer",
                         "training")
    batch_size: int = option(8, "messages per optimizer step", "training")
    lr: float | None = option(None, "AdamW learning rate (default 5e-5; 8e-4 with --lora)", "training")
    weight_decay: float = option(0.1, "AdamW weight decay", "training")
    decay_1d: bool = option(True, "exempt 1-D arrays (biases, gains) from weight decay", "training",
                            flag="--no-decay-1d", negate=True)
    eval_freq: int = option(50, "evaluate every N steps", "training")
    eval_iter: int = option(5, "batches per periodic evaluation", "training")
    seed: int = option(123, "seed of the head's initialisation and the batch order", "training")
    cache: bool = option(True, "recompute the frozen blocks at every step", "training", flag="--no-cache",
                         negate=True)
    dense: bool = option(False, "compute every position of every block (the textbook forward; slower, same "
                                "numbers)", "training")
    # the schedule, clipping, class weights, the epoch kept (appendix D; practitioners' runs)
    lr_schedule: str = option("constant", "after warmup, keep --lr, or decay it linearly or along a half cosine to "
                                          "--min-lr at the end of the run", "schedule",
                              choices=("constant", "linear", "cosine"))
    warmup: float = option(0, "linear warmup from --initial-lr to --lr over the first STEPS optimizer steps, or "
                              "over this FRACTION (below 1) of all of them", "schedule", metavar="STEPS|FRACTION")
    initial_lr: float = option(0.0, "the learning rate warmup starts from", "schedule", metavar="LR")
    min_lr: float = option(0.0, "the learning rate a linear or cosine schedule ends at", "schedule", metavar="LR")
    clip_grad_norm: float | None = option(None, "scale the gradients down when their global L2 norm exceeds MAX "
                                                "(as torch.nn.utils.clip_grad_norm_)", "schedule", metavar="MAX")
    class_weight: str | dict | None = option(None, "weighted cross-entropy: balanced (n / (classes x count), as "
                                                   "scikit-learn), or NAME=W,NAME=W for each class (default: none, "
                                                   "every class weighs the same)", "schedule",
                                             metavar="none|balanced|NAME=W,...")
    keep: str = option("last", "the parameters saved: of the last step, or of the best validation (the whole "
                               "validation split, after every epoch or --validate-every eval)", "schedule",
                       choices=("last", "best"))
    best_metric: str = option("loss", "what --keep best and --patience compare on the validation split: the "
                                      "loss the run minimises, accuracy, or macro F1", "schedule",
                              choices=("loss", "accuracy", "macro_f1"))
    validate_every: str = option("epoch", "when the whole validation split is scored for --keep best and "
                                          "--patience: after each epoch, or at each --eval-freq evaluation",
                                 "schedule", choices=("epoch", "eval"))
    patience: int | None = option(None, "stop after N validations without improvement (early stopping)",
                                  "schedule", metavar="N")
    # LoRA and the book's bonus experiments
    lora: int | None = option(None, "LoRA of rank R on every linear layer (appendix E); only the LoRA pairs train",
                              "lora", metavar="R")
    lora_alpha: float | None = option(None, "LoRA alpha (default: R)", "lora", metavar="A")
    lora_targets: tuple = option(LORA_TARGETS, "comma-separated layers that get LoRA pairs: attn, mlp, head",
                                 "lora", metavar="LIST")
    lora_train_head: bool = option(False, "train the classifier head's own weights fully (then it gets no LoRA "
                                          "pair)", "lora")
    accumulate: int = option(1, "one optimizer step per N batches, with their mean gradient", "lora", metavar="N")
    causal_mask: bool = option(True, "attention without the causal mask (every token sees every token, padding "
                                     "included)", "lora", flag="--no-causal-mask", negate=True)
    # output
    save: str = option("full", "classifier.h5 with every array (full), or only the arrays that trained plus "
                               "the sha256 and path of the base weights, which must then be there to load it",
                       "output", choices=("full", "trained"))

    def __post_init__(self):
        _normalise(self)
        _check(self)

    # ------------------------------------------------------------------ derived

    @property
    def tiny(self) -> bool:
        return self.model == "tiny"

    @property
    def is_table(self) -> bool:
        """Whether the data is the user's own table (else the SMS Spam Collection)."""
        from .tabular import is_table
        return self.data == MEMORY or (self.data is not None and is_table(self.data))

    @property
    def trainable(self):
        """The model's trainable set: an int K, 'all', 'head', or 'lora'."""
        return "lora" if self.lora else self.trainable_blocks

    @property
    def lora_spec(self):
        """The `npgpt.lora.LoraSpec` of a LoRA run, else None."""
        if not self.lora:
            return None
        from .lora import LoraSpec
        return LoraSpec(rank=self.lora, alpha=self.lora_alpha, targets=tuple(self.lora_targets),
                        train_head=self.lora_train_head)

    def architecture(self):
        """The GPT2Config the model size names (weights given with --weights may differ)."""
        return preset(self.model)

    # ------------------------------------------------------------------ saving

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["split"], d["lora_targets"] = list(self.split), list(self.lora_targets)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "RunConfig":
        """A RunConfig from `to_dict`'s output (a run folder's run.json, a checkpoint)."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise NpgptError(f"unknown run settings {', '.join(unknown)} (written by a newer npgpt?)")
        return cls(**d)

    def replace(self, **changes) -> "RunConfig":
        return dataclasses.replace(self, **changes)


@dataclass
class RunOptions:
    """How this start (or resume) of a run goes: not part of what the run is."""
    out: str | None = option(None, "run folder (default: runs/<data>-<size>-<time>, with -2, -3, ... if that "
                                   "exists)", "output")
    threads: int | None = option(None, "threads for Numba and BLAS (default: all cores)", "training")
    download: bool = option(False, "download and convert the weights if missing", "model")
    cache_dir: str | None = option(None, "disk cache of frozen-prefix activations (default: $NPGPT_CACHE_DIR or "
                                         "~/.cache/npgpt/prefix)", "training")
    cache_disk: bool = option(True, "do not read or write the disk cache (the prefix is still computed once per "
                                    "run)", "training", flag="--no-cache-disk", negate=True)
    cache_memory: str | None = option(None, "frozen-prefix bytes held in memory, e.g. 512M or 2G; a larger prefix "
                                            "stays on disk and is streamed (default: half of the free memory)",
                                      "training", metavar="SIZE")
    cache_max: str | None = option(None, "size cap of the disk cache, e.g. 20G: after a new entry, the entries used "
                                         "longest ago are removed until the rest fit (default: a tenth of its "
                                         "disk)", "training", metavar="SIZE")
    scheduler: str | None = option(None, "compute the frozen prefix on the Dask cluster at this address, e.g. "
                                         "tcp://HOST:8786 (needs pip install -e \".[dask]\"; docs/distributed.md)",
                                   "training", metavar="ADDRESS")
    workers: int | None = option(None, "compute the frozen prefix on a Dask cluster of N local worker processes",
                                 "training", metavar="N")
    shard_tokens: int = option(200_000, "tokens per shard of the frozen prefix with --scheduler or --workers",
                               "training", metavar="N")
    plots: bool = option(True, "do not write PNG plots", "output", flag="--no-plots", negate=True)
    progress: bool = option(True, "the final lines only: no progress bars, no per-step, per-epoch or setup lines",
                            "output", flag="--quiet", negate=True)

    def __post_init__(self):
        if self.threads is not None and (not _is_int(self.threads) or self.threads < 1):
            raise ConfigError("threads", "must be at least 1")
        for name in ("workers", "shard_tokens"):
            value = getattr(self, name)
            if value is not None and (not _is_int(value) or value < 1):
                raise ConfigError(name, "must be at least 1")
        if self.scheduler and self.workers:
            raise ConfigError("workers", "give --scheduler (a cluster running) or --workers (one started here), not both")
        from .prefix_cache import parse_size
        for name in ("cache_memory", "cache_max"):
            value = getattr(self, name)
            try:
                value is None or parse_size(value)
            except (ValueError, IndexError):
                raise ConfigError(name, f"must be a size such as 512M or 2G, got {value!r}") from None

    @property
    def cache_memory_bytes(self):
        from .prefix_cache import parse_size
        return None if self.cache_memory is None else parse_size(self.cache_memory)

    @property
    def cache_max_bytes(self):
        from .prefix_cache import parse_size
        return None if self.cache_max is None else parse_size(self.cache_max)


# ----------------------------------------------------------------------------- checks

def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _listed(value, name):
    """'a,b,c' or a sequence -> a tuple of stripped strings."""
    if isinstance(value, str):
        value = value.split(",")
    try:
        return tuple(str(v).strip() for v in value)
    except TypeError:
        raise ConfigError(name, f"must be a comma-separated list, got {value!r}") from None


def _normalise(c: RunConfig) -> None:
    """Spellings the command line and Python both accept, made one."""
    c.pooling = str(c.pooling).replace("-", "_")
    if isinstance(c.trainable_blocks, str) and c.trainable_blocks not in ("all", "head"):
        try:
            c.trainable_blocks = int(c.trainable_blocks)
        except ValueError:
            raise ConfigError("trainable_blocks", f"must be a number, 'all' or 'head', got {c.trainable_blocks!r}") \
                from None
    if isinstance(c.max_length, str) and c.max_length not in ("longest", "batch"):
        try:
            c.max_length = int(c.max_length)
        except ValueError:
            raise ConfigError("max_length", f"must be 'longest', 'batch' or a number of tokens, got {c.max_length!r}") \
                from None
    if c.labels is not None:
        c.labels = list(_listed(c.labels, "labels"))
    c.lora_targets = _listed(c.lora_targets, "lora_targets")
    from .tabular import parse_split
    try:
        c.split = parse_split(c.split)
    except NpgptError as e:
        raise ConfigError("split", str(e).removeprefix("--split ")) from None
    if c.lr is None:
        c.lr = 8e-4 if c.lora else 5e-5
    if c.lora and c.lora_alpha is None:
        c.lora_alpha = float(c.lora)
    if c.balance is None:
        c.balance = "none" if c.is_table else "undersample"
    c.class_weight = _class_weight(c.class_weight)
    if isinstance(c.warmup, float) and c.warmup.is_integer() and c.warmup >= 1:
        c.warmup = int(c.warmup)


def _class_weight(value):
    """None, "balanced", or {class name: weight} from 'none', 'balanced', 'a=2,b=1' or a dict."""
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "none")):
        return None
    if isinstance(value, str) and value.strip().lower() == "balanced":
        return "balanced"
    if isinstance(value, str):
        pairs = [item.split("=", 1) for item in value.split(",")]
        if any(len(p) != 2 or not p[0].strip() for p in pairs):
            raise ConfigError("class_weight", f"takes none, balanced or NAME=W,NAME=W; got {value!r}")
        value = {name.strip(): w for name, w in pairs}
    if not isinstance(value, dict) or not value:
        raise ConfigError("class_weight", f"takes none, balanced or NAME=W,NAME=W; got {value!r}")
    out = {}
    for name, w in value.items():
        try:
            w = float(w)
        except (TypeError, ValueError):
            w = float("nan")
        if not math.isfinite(w) or w <= 0:
            raise ConfigError("class_weight", f"{name}={value[name]}: a weight must be a positive number")
        out[str(name).strip()] = w
    return out


def _at_least(c, name, low=1):
    v = getattr(c, name)
    if not _is_int(v) or v < low:
        raise ConfigError(name, f"must be at least {low}" + ("" if _is_int(v) else f", got {v!r}"))


def _check(c: RunConfig) -> None:
    """Every rule a run's settings must keep, in one place; the first broken one raises."""
    for name in ("epochs", "batch_size", "eval_freq", "eval_iter", "accumulate"):
        _at_least(c, name)
    if not _is_int(c.seed) or c.seed < 0:
        raise ConfigError("seed", f"must be a whole number >= 0, got {c.seed!r}")
    for name in ("lr", "weight_decay"):
        v = getattr(c, name)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise ConfigError(name, f"must be a finite number, got {v}")
    if c.lr <= 0:
        raise ConfigError("lr", "must be positive")
    if c.weight_decay < 0:
        raise ConfigError("weight_decay", "must be non-negative")
    if c.model not in SIZES and c.model != "tiny":
        raise ConfigError("model", f"must be one of {', '.join(SIZES)} (or --tiny for a small random model), "
                                   f"got {c.model!r}")
    _check_choices(c)
    _check_schedule(c)
    _check_lora(c)
    _check_shapes(c)
    _check_data(c)
    if c.tiny and c.random_init:
        raise ConfigError("random_init", "and --tiny exclude each other")
    if c.save == "trained" and (c.tiny or c.random_init):
        raise ConfigError("save", "trained needs pretrained base weights (--weights); a --tiny or --random-init "
                                  "model has none: use --save full")


def _check_choices(c: RunConfig) -> None:
    for f in dataclasses.fields(c):
        choices, value = f.metadata.get("choices"), getattr(c, f.name)
        shown = value.replace("_", "-") if f.name == "pooling" and isinstance(value, str) else value
        if choices and value is not None and shown not in choices:
            raise ConfigError(f.name, f"must be one of {', '.join(choices)}, got {shown!r}")


def _finite(c, name, low=0.0):
    v = getattr(c, name)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < low:
        raise ConfigError(name, f"must be a finite number >= {low:g}, got {v!r}")


def _check_schedule(c: RunConfig) -> None:
    """The schedule, clipping and selection settings: values, and the settings they need."""
    _finite(c, "warmup")
    if c.warmup >= 1 and not float(c.warmup).is_integer():
        raise ConfigError("warmup", f"is a number of steps (a whole number) or a fraction below 1, got {c.warmup}")
    for name in ("initial_lr", "min_lr"):
        _finite(c, name)
    if c.initial_lr > c.lr or c.min_lr > c.lr:
        raise ConfigError("initial_lr" if c.initial_lr > c.lr else "min_lr", f"must not exceed --lr ({c.lr:g})")
    if c.initial_lr and not c.warmup:
        raise ConfigError("initial_lr", "needs --warmup (the steps over which the learning rate rises from it)")
    if c.min_lr and c.lr_schedule == "constant":
        raise ConfigError("min_lr", "needs --lr-schedule linear or cosine")
    if c.clip_grad_norm is not None:
        _finite(c, "clip_grad_norm")
        if c.clip_grad_norm <= 0:
            raise ConfigError("clip_grad_norm", "must be positive")
    if c.patience is not None and (not _is_int(c.patience) or c.patience < 1):
        raise ConfigError("patience", f"must be at least 1, got {c.patience!r}")
    if c.validate_every == "eval" and c.keep == "last" and c.patience is None:
        raise ConfigError("validate_every", "eval needs --keep best or --patience N (which read the validations)")


def _check_lora(c: RunConfig) -> None:
    if c.lora is None:
        if c.lora_alpha is not None or c.lora_train_head:
            raise ConfigError("lora_alpha" if c.lora_alpha is not None else "lora_train_head", "needs --lora R")
        return
    if not _is_int(c.lora) or c.lora < 1:
        raise ConfigError("lora", "must be a rank of at least 1")
    if not c.lora_alpha > 0:
        raise ConfigError("lora_alpha", "must be positive")
    bad = [t for t in c.lora_targets if t not in LORA_TARGETS]
    if bad:
        raise ConfigError("lora_targets", f"takes attn, mlp, head; got {','.join(bad)}")
    if c.trainable_blocks != 1:
        raise ConfigError("lora", "and --trainable-blocks exclude each other (LoRA trains its pairs only)")


def _check_shapes(c: RunConfig) -> None:
    """Lengths and block counts within the chosen size (weights given by file are checked again
    once they are read)."""
    arch = c.architecture()
    what = "--tiny's context length" if c.tiny else "the context length"
    if _is_int(c.max_length) and not 1 <= c.max_length <= arch.n_ctx:
        raise ConfigError("max_length", f"must be between 1 and {arch.n_ctx} ({what}), got {c.max_length}")
    k = c.trainable_blocks
    if k not in ("all", "head"):
        if not _is_int(k) or k < 0:
            raise ConfigError("trainable_blocks", f"must be a number >= 0, 'all' or 'head', got {k!r}")
        if k > arch.n_layer:
            raise ConfigError("trainable_blocks", f"{k}: the model has only {arch.n_layer} blocks "
                                                  f"({'--tiny' if c.tiny else c.model}); use at most "
                                                  f"{arch.n_layer} or 'all'")


def _check_data(c: RunConfig) -> None:
    if not c.is_table and (c.validation or c.test or c.labels):
        raise ConfigError("validation" if c.validation else "test" if c.test else "labels",
                          "needs --data FILE.csv|.tsv|.jsonl|.parquet")


def from_old_info(info: dict) -> RunConfig:
    """The RunConfig of a run started before there was one (its checkpoint kept a `run_info` dict)."""
    lora = info.get("lora") or {}
    trainable = info.get("trainable", 1)
    return RunConfig(
        model=info.get("model_size", "124M") if not info.get("tiny") else "tiny",
        weights=None if info.get("tiny") else info.get("weights"), random_init=info.get("random_init", False),
        trainable_blocks=1 if trainable == "lora" else trainable, data=info.get("data"),
        text_column=info.get("text_column") or "text", label_column=info.get("label_column") or "label",
        labels=info.get("labels") if info.get("table") else None, validation=info.get("validation"), test=info.get("test"),
        split=info.get("split", "0.7,0.1"), balance=info.get("balance"), data_dir=info.get("data_dir", "data"),
        skip_bad_lines=info.get("skip_bad_lines", False), parse=info.get("parse", "pandas"),
        bpe_dir=info.get("bpe_dir"), max_length=info.get("padding", "longest"), pooling=info["pooling"],
        epochs=info["epochs"], batch_size=info["batch_size"], lr=info["lr"], weight_decay=info["weight_decay"],
        decay_1d=info.get("decay_1d", True), eval_freq=info["eval_freq"], eval_iter=info["eval_iter"],
        seed=info["seed"], cache=info.get("cache", True), dense=info.get("dense", False),
        lora=lora.get("rank"), lora_alpha=lora.get("alpha"), lora_targets=lora.get("targets", LORA_TARGETS),
        lora_train_head=lora.get("train_head", False), accumulate=info.get("accumulate", 1),
        causal_mask=info.get("causal", True), save=info.get("save", "full"))
