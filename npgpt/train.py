"""`python -m npgpt.train`: fine-tune GPT-2 into an SMS spam classifier on the CPU.

Defaults reproduce the reference's setting (chapter 6 of "Build a Large Language Model (From
Scratch)"): GPT-2 124M, the last block, the final LayerNorm and a new 2-class head trainable,
AdamW lr 5e-5 weight decay 0.1, 5 epochs of batch 8, evaluation every 50 steps, seed 123; but
pooling at the last real token (the reference's last-position pooling is `--pooling last-position`).

Output, in the run folder (`runs/<name>/`):
    classifier.h5    the fine-tuned model: every parameter, the head, config, labels, settings
    metrics.json     every logged value and the final accuracies
    checkpoint.h5    where to resume from (`--resume runs/<name>`)
    loss.png, accuracy.png   when matplotlib is installed
"""
from __future__ import annotations

if __name__ == "__main__":      # `python -m npgpt.train`: the runtime settings before NumPy loads
    from npgpt import tune_runtime
    tune_runtime()

import json
import os
import shutil
import sys
import time

import numpy as np

from .cli import announce_compilation, make_parser, run
from .errors import NpgptError, TrainingError

DEFAULT_WEIGHTS_DIR = "weights"


def parse_trainable(value: str):
    if value in ("all", "head"):
        return value
    try:
        k = int(value)
    except ValueError:
        raise NpgptError(f"--trainable-blocks must be a number, 'all' or 'head', got {value!r}") from None
    if k < 0:
        raise NpgptError("--trainable-blocks must be at least 0")
    return k


def parse_padding(value: str):
    if value in ("longest", "batch"):
        return value
    try:
        return int(value)
    except ValueError:
        raise NpgptError(f"--max-length must be 'longest', 'batch' or a number of tokens, got {value!r}") from None


def build_parser():
    p = make_parser("python -m npgpt.train",
                    "Fine-tune GPT-2 into a text classifier on the CPU: on your labelled texts (--data FILE.csv), "
                    "or on the SMS Spam Collection (defaults: the reference's setting, last-real-token pooling).")
    g = p.add_argument_group("model")
    g.add_argument("--model-size", default="124M", help="GPT-2 size: 124M, 355M, 774M or 1558M (tiny: as --tiny)")
    g.add_argument("--weights", default=None, help="converted weights (default: weights/gpt2-<size>.h5)")
    g.add_argument("--download", action="store_true", help="download and convert the weights if missing")
    g.add_argument("--tiny", action="store_true",
                   help="a small randomly initialised model (2 layers, 64 dims): the pipeline in seconds")
    g.add_argument("--random-init", action="store_true",
                   help="random weights with the chosen size's shapes (for timing without downloads)")
    g.add_argument("--trainable-blocks", default="1", metavar="K|all|head",
                   help="train the head, ln_f and the last K blocks; 'all' trains everything, 'head' the head alone")
    g = p.add_argument_group("data")
    g.add_argument("--data", default=None,
                   help="your labelled texts (.csv, .tsv with a header row; .jsonl; .parquet), or the "
                        "SMSSpamCollection file or UCI zip (default: SMS data, reused or downloaded into --data-dir)")
    g.add_argument("--text-column", default="text", help="column of --data holding the texts")
    g.add_argument("--label-column", default="label", help="column of --data holding the labels")
    g.add_argument("--labels", default=None, metavar="A,B,C",
                   help="the classes in this order (default: the training labels sorted)")
    g.add_argument("--validation", default=None, metavar="FILE", help="validation texts (default: split off --data)")
    g.add_argument("--test", default=None, metavar="FILE", help="test texts (default: split off --data)")
    g.add_argument("--split", default="0.7,0.1", metavar="TRAIN,VAL",
                   help="fractions of --data for train and validation, the rest test, stratified by label "
                        "(rescaled when --validation or --test is given)")
    g.add_argument("--balance", default=None, choices=["none", "undersample"],
                   help="undersample every class to the smallest (default: none for your data; the SMS "
                        "data is always undersampled, as in the reference)")
    g.add_argument("--data-dir", default="data", help="where the data and the train/validation/test CSVs live")
    g.add_argument("--skip-bad-lines", action="store_true", help="skip malformed dataset lines and report them")
    g.add_argument("--parse", default="pandas", choices=["pandas", "strict"],
                   help="SMS file only: read it as the reference does (pandas' quoting, 5572 messages, its exact "
                        "splits) or strictly one message a line (5574)")
    g.add_argument("--bpe-dir", default=None,
                   help="folder with GPT-2's encoder.json and vocab.bpe (default: $NPGPT_BPE_DIR, else the "
                        "folder of --weights or its <size>/ subfolder, else tiktoken's cache or download)")
    g.add_argument("--max-length", default="longest", metavar="longest|batch|N",
                   help="pad to the longest training example (reference: 120), per batch, or to N tokens")
    g.add_argument("--pooling", default="last-token", choices=["last-token", "last-position", "first-token", "mean"],
                   help="read the logits at the last real token, at the last position (the reference), at "
                        "the first token, or average ln_f's output over the real tokens (mean)")
    g = p.add_argument_group("training")
    g.add_argument("--epochs", type=int, default=5,
                   help="passes over the training set; with --resume, a larger number trains a run longer")
    g.add_argument("--batch-size", type=int, default=8, help="messages per optimizer step")
    g.add_argument("--lr", type=float, default=None, help="AdamW learning rate (default 5e-5; 8e-4 with --lora)")
    g.add_argument("--weight-decay", type=float, default=0.1, help="AdamW weight decay")
    g.add_argument("--no-decay-1d", action="store_true", help="exempt 1-D arrays (biases, gains) from weight decay")
    g.add_argument("--eval-freq", type=int, default=50, help="evaluate every N steps")
    g.add_argument("--eval-iter", type=int, default=5, help="batches per periodic evaluation")
    g.add_argument("--seed", type=int, default=123, help="seed of the head's initialisation and the batch order")
    g.add_argument("--no-cache", action="store_true", help="recompute the frozen blocks at every step")
    g.add_argument("--cache-dir", default=None,
                   help="disk cache of frozen-prefix activations (default: $NPGPT_CACHE_DIR or ~/.cache/npgpt/prefix)")
    g.add_argument("--no-cache-disk", action="store_true",
                   help="do not read or write the disk cache (the prefix is still computed once per run)")
    g.add_argument("--cache-memory", default=None, metavar="SIZE",
                   help="frozen-prefix bytes held in memory, e.g. 512M or 2G; a larger prefix stays on disk "
                        "and is streamed (default: half of the free memory)")
    g.add_argument("--dense", action="store_true",
                   help="compute every position of every block (the textbook forward; slower, same numbers)")
    g.add_argument("--threads", type=int, default=None, help="threads for Numba and BLAS (default: all cores)")
    g = p.add_argument_group("LoRA and the book's bonus experiments")
    g.add_argument("--lora", type=int, default=None, metavar="R",
                   help="LoRA of rank R on every linear layer (appendix E); only the LoRA pairs train")
    g.add_argument("--lora-alpha", type=float, default=None, metavar="A", help="LoRA alpha (default: R)")
    g.add_argument("--lora-targets", default="attn,mlp,head", metavar="LIST",
                   help="comma-separated layers that get LoRA pairs: attn, mlp, head")
    g.add_argument("--lora-train-head", action="store_true",
                   help="train the classifier head's own weights fully (then it gets no LoRA pair)")
    g.add_argument("--accumulate", type=int, default=1, metavar="N",
                   help="one optimizer step per N batches, with their mean gradient")
    g.add_argument("--no-causal-mask", action="store_true",
                   help="attention without the causal mask (every token sees every token, padding included)")
    g = p.add_argument_group("output")
    g.add_argument("--out", default=None,
                   help="run folder (default: runs/spam-<size>-<time>, with -2, -3, ... if that exists)")
    g.add_argument("--resume", default=None, metavar="RUN_DIR",
                   help="continue an interrupted run with its own settings (with it give only --epochs, --threads, "
                        "--quiet, --no-plots, --download, --debug and the cache flags); --epochs N beyond the "
                        "run's extends it; a finished run says so and is left as it is")
    g.add_argument("--save", default="full", choices=["full", "trained"],
                   help="classifier.h5 with every array (full), or only the arrays that trained plus the "
                        "sha256 and path of the base weights, which must then be there to load it")
    g.add_argument("--no-plots", action="store_true", help="do not write PNG plots")
    g.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


# flags a run fixes when it starts; `--resume` accepts only RESUME_FLAGS besides the run folder
RESUME_FLAGS = {"--resume", "--epochs", "--threads", "--quiet", "--no-plots", "--debug", "--download",
                "--cache-dir", "--no-cache-disk", "--cache-memory"}
SIZES = ("124M", "355M", "774M", "1558M")


def given_flags(argv) -> set:
    """The option strings on the command line (`--lr=1e-3` counts as --lr)."""
    return {a.split("=", 1)[0] for a in argv if a.startswith("--")}


def check_args(args, parser):
    """Usage errors (exit 2) that need nothing but the command line."""
    import math
    for name in ("epochs", "batch_size", "eval_freq", "eval_iter"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.lr is None:
        args.lr = 8e-4 if args.lora else 5e-5
    if args.accumulate < 1:
        parser.error("--accumulate must be at least 1")
    if args.lora is not None:
        if args.lora < 1:
            parser.error("--lora must be a rank of at least 1")
        if args.lora_alpha is not None and args.lora_alpha <= 0:
            parser.error("--lora-alpha must be positive")
        bad = [t for t in args.lora_targets.split(",") if t not in ("attn", "mlp", "head")]
        if bad:
            parser.error(f"--lora-targets takes attn, mlp, head; got {','.join(bad)}")
        if args.trainable_blocks != "1":
            parser.error("--lora and --trainable-blocks exclude each other (LoRA trains its pairs only)")
    elif args.lora_alpha is not None or args.lora_train_head:
        parser.error("--lora-alpha and --lora-train-head need --lora R")
    for name in ("lr", "weight_decay"):
        if not math.isfinite(getattr(args, name)):
            parser.error(f"--{name.replace('_', '-')} must be a finite number, got {getattr(args, name)}")
    if args.lr <= 0:
        parser.error("--lr must be positive")
    if args.weight_decay < 0:
        parser.error("--weight-decay must be non-negative")
    if args.threads is not None and args.threads < 1:
        parser.error("--threads must be at least 1")
    if args.model_size == "tiny":         # the small random model has no weights to download
        args.tiny = True
    elif args.model_size not in SIZES:
        parser.error(f"--model-size must be one of {', '.join(SIZES)} (or --tiny for a small random model), "
                     f"got {args.model_size!r}")
    if args.max_length not in ("longest", "batch"):
        try:
            n = int(args.max_length)
        except ValueError:
            parser.error(f"--max-length must be 'longest', 'batch' or a number of tokens, got {args.max_length!r}")
        n_ctx = run_config(args).n_ctx
        if not 1 <= n <= n_ctx:
            what = "--tiny's context length" if args.tiny else "the context length"
            parser.error(f"--max-length must be between 1 and {n_ctx} ({what}), got {n}")
    try:
        k = parse_trainable(args.trainable_blocks)
    except NpgptError as e:
        parser.error(str(e))
    n_layer = run_config(args).n_layer
    if isinstance(k, int) and k > n_layer:
        parser.error(f"--trainable-blocks {k}: the model has only {n_layer} blocks "
                     f"({'--tiny' if args.tiny else args.model_size}); use at most {n_layer} or 'all'")
    if args.tiny and args.random_init:
        parser.error("--tiny and --random-init exclude each other")
    from .tabular import is_table, parse_split
    table = args.data is not None and is_table(args.data)
    if not table and (args.validation or args.test or args.labels):
        parser.error("--validation, --test and --labels need --data FILE.csv|.tsv|.jsonl|.parquet")
    if not table and args.balance == "none":
        parser.error("the SMS data is always undersampled (--balance none needs --data FILE.csv|...)")
    try:
        parse_split(args.split)
    except NpgptError as e:
        parser.error(str(e))
    if args.cache_memory is not None:
        from .prefix_cache import parse_size
        try:
            parse_size(args.cache_memory)
        except (ValueError, IndexError):
            parser.error(f"--cache-memory must be a size such as 512M or 2G, got {args.cache_memory!r}")

    if args.save == "trained" and (args.tiny or args.random_init):
        parser.error("--save trained needs pretrained base weights (--weights); a --tiny or --random-init "
                     "model has none: use --save full")


def _lora_info(args):
    if args.lora is None:
        return None
    from .lora import LoraSpec
    return LoraSpec(rank=args.lora, alpha=args.lora_alpha or float(args.lora),
                    targets=tuple(args.lora_targets.split(",")), train_head=args.lora_train_head).to_dict()


def run_config(args):
    from .config import preset
    return preset("tiny" if args.tiny else args.model_size)


def check_resume_flags(argv, parser, run_dir):
    """--resume continues a run with its own settings: a setting given again is refused by name."""
    fixed = sorted(given_flags(argv) - RESUME_FLAGS)
    if fixed:
        parser.error(f"{', '.join(fixed)}: fixed by the run in {run_dir} and cannot change on --resume "
                     f"(with --resume give only {', '.join(sorted(RESUME_FLAGS - {'--resume'}))})")


def has_run(path) -> bool:
    return any(os.path.exists(os.path.join(path, n)) for n in ("checkpoint.h5", "classifier.h5", "metrics.json"))


def choose_run_dir(args) -> str:
    """The run folder's name (not created yet): --out, else runs/spam-<size>-<time>."""
    if args.out:
        if os.path.exists(args.out) and not os.path.isdir(args.out):
            raise NpgptError(f"--out {args.out}: is a file, expected a folder for the run")
        if has_run(args.out):
            raise NpgptError(f"--out {args.out} already holds a run: pass --resume {args.out} to continue it, "
                             "or choose another --out")
        return args.out
    from .tabular import is_table
    size = "tiny" if args.tiny else args.model_size
    stem = os.path.splitext(os.path.basename(args.data))[0] if args.data and is_table(args.data) else "spam"
    return os.path.join("runs", f"{stem}-{size}-{time.strftime('%Y%m%d-%H%M%S')}")


def _not_a_folder(path) -> str:
    """'X is a file, not a folder' for the first part of path that is a file; "" if none is."""
    parts = os.path.normpath(path).split(os.sep)
    for i in range(1, len(parts) + 1):
        p = os.sep.join(parts[:i]) or os.sep
        if os.path.exists(p) and not os.path.isdir(p):
            return f"{p} is a file, not a folder"
    return ""


def create_run_dir(run_dir, explicit: bool) -> str:
    """Create the run folder, exclusively: a folder of that name made by another run meanwhile
    gets a suffix (-2, -3, ...) for a default name, and is an error for an --out that holds a run."""
    parent = os.path.dirname(run_dir) or "."
    try:
        os.makedirs(parent, exist_ok=True)
    except OSError as e:
        why = _not_a_folder(parent) or f"creating {parent}: {e.strerror or e}"
        raise TrainingError(f"cannot write to the run folder {run_dir} ({why})") from None
    if explicit:
        try:
            os.mkdir(run_dir)
        except FileExistsError:
            pass                            # made by the user, or by another run a moment ago
        except OSError as e:
            raise TrainingError(f"cannot write to the run folder {run_dir} ({e.strerror or e})") from None
        claim_run_dir(run_dir, "--out")
        if has_run(run_dir):                # a run that started, and finished, since choose_run_dir
            release_claims()
            raise NpgptError(f"--out {run_dir} already holds a run: pass --resume {run_dir} to continue it, "
                             "or choose another --out")
        return run_dir
    for n in range(1, 1000):
        name = run_dir if n == 1 else f"{run_dir}-{n}"
        try:
            os.mkdir(name)
        except FileExistsError:
            continue
        except OSError as e:
            raise TrainingError(f"cannot write to the run folder {name} ({e.strerror or e})") from None
        claim_run_dir(name, "run folder")
        return name
    raise TrainingError(f"cannot find a free run folder name next to {run_dir}")


RUN_CLAIM = ".npgpt-run"     # in a run folder while a training process works in it: that process's pid
_claimed: list = []          # the claim files this process made, removed when main returns


def claim_run_dir(run_dir, flag: str) -> None:
    """Make `run_dir` this process's alone: create its RUN_CLAIM file exclusively (O_EXCL), so two
    processes started at once with the same --out (or --resume) cannot both write into it.
    A claim left by a process that no longer runs (killed) is taken over; a live one is an error."""
    path = os.path.join(run_dir, RUN_CLAIM)
    for _ in range(3):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            pid = _claim_pid(path)
            if pid is None or _alive(pid):
                who = f"pid {pid}" if pid else "see its " + RUN_CLAIM
                raise NpgptError(f"{flag} {run_dir}: another training process ({who}) is using this run folder; "
                                 f"wait for it to finish, or choose another folder (if none is running, delete "
                                 f"{path})") from None
            try:                           # left by a process that was killed: take it over
                os.remove(path)
            except FileNotFoundError:
                pass
            continue
        except OSError as e:
            raise TrainingError(f"cannot write to the run folder {run_dir} ({e.strerror or e})") from None
        with os.fdopen(fd, "w") as fh:
            fh.write(str(os.getpid()))
        _claimed.append(path)
        return
    raise NpgptError(f"{flag} {run_dir}: cannot claim the run folder ({path} keeps changing)")


def _claim_pid(path):
    """The pid in a claim file; None while it is still empty (being written) or unreadable."""
    try:
        with open(path) as fh:
            text = fh.read().strip()
        return int(text) if text else None
    except (OSError, ValueError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:                         # exists, owned by someone else
        return True
    return True


def release_claims() -> None:
    while _claimed:
        try:
            os.remove(_claimed.pop())
        except OSError:
            pass


def remove_if_empty(run_dir) -> bool:
    """Remove a run folder this run created if it holds nothing but the split CSVs written at its
    start (they are worth keeping only with a checkpoint or a classifier) and this run's claim."""
    from .tabular import SPLIT_FILES
    try:
        if set(os.listdir(run_dir)) <= set(SPLIT_FILES.values()) | {RUN_CLAIM}:
            for name in os.listdir(run_dir):
                os.remove(os.path.join(run_dir, name))
        os.rmdir(run_dir)
        return True
    except OSError:
        return False


def check_output_dir(run_dir, need_bytes: int):
    """Fail before training if the run folder cannot be written or the disk is too full."""
    try:
        os.makedirs(run_dir, exist_ok=True)
        probe = os.path.join(run_dir, ".write-test")
        with open(probe, "wb") as fh:
            fh.write(b"0" * 4096)
            fh.flush()
            os.fsync(fh.fileno())
        os.remove(probe)
    except OSError as e:
        raise TrainingError(f"cannot write to the run folder {run_dir} ({e.strerror or e})") from None
    free = shutil.disk_usage(run_dir).free
    if free < need_bytes:
        raise TrainingError(f"only {free / 2**20:.0f} MiB free in {run_dir}; the run needs about "
                            f"{need_bytes / 2**20:.0f} MiB (classifier + checkpoint)")


def load_base_model(info: dict, log):
    """The pretrained (or random) GPT-2 with a fresh 2-class head, as described by run info."""
    from .config import preset
    from .params import add_classifier_head, init_params, load_params

    K = len(info.get("labels") or ("ham", "spam"))
    if info["tiny"]:
        config = preset("tiny")
        return _with_lora(init_params(config, seed=info["seed"], num_classes=K), config, info)
    config = preset(info["model_size"])
    if info["random_init"]:
        log(f"random {info['model_size']}-shaped weights (no pretrained weights: accuracy will be low)")
        return _with_lora(init_params(config, seed=info["seed"], num_classes=K), config, info)
    path = info["weights"]
    if os.path.isdir(path):
        raise NpgptError(f"--weights {path}: is a folder, expected a converted .h5 file; if it holds a "
                         f"downloaded checkpoint, run `python -m npgpt.weights convert {path}` and pass "
                         f"the .h5 file it prints")
    if not os.path.exists(path):
        if info.get("download") or (sys.stdin.isatty() and _ask(f"No weights at {path}. Download GPT-2 "
                                                                   f"{info['model_size']} now? [y/N] ")):
            from . import weights
            weights.main(["download", info["model_size"], "--dir", os.path.dirname(path) or "."])
        if not os.path.exists(path):
            raise NpgptError(f"no weights at {path}: run `python -m npgpt.weights download {info['model_size']}` "
                             f"(or pass --download, --weights PATH, or --tiny for a small random model)")
    # the default file must be the named size; a file given with --weights brings its own shapes
    explicit = info["weights"] != os.path.join(DEFAULT_WEIGHTS_DIR, f"gpt2-{info['model_size']}.h5")
    params, file_config, _ = load_params(path, config=None if explicit else config)
    if file_config != config:
        from .config import PRESETS
        info["model_size"] = next((n for n, c in PRESETS.items() if c == file_config),
                                  f"custom ({file_config.n_layer} layers, {file_config.n_embd} dims)")
        log(f"weights {path}: {info['model_size']}, not {config}")
    return _with_lora(add_classifier_head(params, K, seed=info["seed"]), file_config, info)


def _with_lora(params, config, info):
    """Add fresh LoRA pairs when the run uses LoRA (info["lora"], a LoraSpec dict)."""
    if info.get("lora"):
        from .lora import LoraSpec, add_lora
        spec = LoraSpec.from_dict(info["lora"])
        add_lora(params, config, spec.rank, spec.alpha, seed=info["seed"], targets=spec.targets,
                 train_head=spec.train_head)
    return params, config


def _ask(question) -> bool:
    try:
        return input(question).strip().lower() in ("y", "yes")
    except EOFError:
        return False


def save_outputs(run_dir, params, config, state, info, feats_summary, log, plots=True):
    from .finetune import _write_json
    from .lora import spec_of
    from .model import trainable_names
    from .params import save_params
    from .tokenizer import bpe_file_bytes

    labels = list(info.get("labels") or ("ham", "spam"))
    meta = {"kind": "npgpt-classifier", "labels": labels, "id2label": {str(i): s for i, s in enumerate(labels)},
            "text_column": info.get("text_column"), "label_column": info.get("label_column"),
            "pooling": info["pooling"],
            "max_length": info["pad_to"], "context_length": config.n_ctx, "pad_id": 50256,
            "tokenizer": "gpt2", "trainable": info["trainable"], "model_size": info["model_size"],
            "train_args": info, "lora": info.get("lora"), "causal_mask": info.get("causal", True),
            "final": state.metrics.get("final", {})}
    path = os.path.join(run_dir, "classifier.h5")
    files = bpe_file_bytes(info["bpe_dir"], weights_dir=os.path.dirname(info["weights"]) or ".")
    if info.get("save") == "trained":
        save_params(path, params, config, meta, files=files,
                    only=trainable_names(config, info["trainable"], lora=spec_of(info)), base=info["weights"])
    else:
        save_params(path, params, config, meta, files=files)
    _write_json(os.path.join(run_dir, "metrics.json"),
                {"metrics": state.metrics, "run_info": info, "train_time_s": state.train_time, **feats_summary})
    if plots:
        from .plots import plot_run
        written = plot_run(state.metrics, run_dir, title=os.path.basename(os.path.normpath(run_dir)))
        if written:
            log("plots: " + ", ".join(written))
    return path


def main(argv=None):
    try:
        return _main(argv)
    finally:
        release_claims()


def _main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    check_args(args, parser)
    t_start = time.time()
    log = print

    from .data import make_datasets
    from .finetune import Diverged, Interrupted, TrainSettings, fit
    from .kernels import set_num_threads

    if args.threads:
        set_num_threads(args.threads)

    announce_compilation(log)
    if args.resume:
        run_dir = args.resume
        check_resume_flags(argv, parser, run_dir)
        info = resume_info(run_dir, args, argv, parser, log)
        if info is None:
            return 0
        claim_run_dir(run_dir, "--resume")
    else:
        from .tabular import is_table
        table = args.data is not None and is_table(args.data)
        run_dir = choose_run_dir(args)
        info = {"model_size": "tiny" if args.tiny else args.model_size, "tiny": args.tiny,
                "random_init": args.random_init,
                "weights": args.weights or os.path.join(DEFAULT_WEIGHTS_DIR, f"gpt2-{args.model_size}.h5"),
                "download": args.download, "trainable": parse_trainable(args.trainable_blocks),
                "padding": parse_padding(args.max_length),
                "pooling": args.pooling.replace("-", "_"), "data": args.data, "data_dir": args.data_dir,
                "skip_bad_lines": args.skip_bad_lines, "parse": args.parse, "bpe_dir": args.bpe_dir,
                "epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr,
                "weight_decay": args.weight_decay, "decay_1d": not args.no_decay_1d,
                "eval_freq": args.eval_freq, "eval_iter": args.eval_iter, "seed": args.seed,
                "cache": not args.no_cache, "dense": args.dense, "save": args.save, "table": table,
                "text_column": args.text_column if table else None,
                "label_column": args.label_column if table else None,
                "labels": None if table else ["ham", "spam"],
                "validation": args.validation, "test": args.test, "split": args.split,
                "balance": args.balance or ("none" if table else "undersample"),
                "user_labels": args.labels.split(",") if args.labels else None,
                "lora": _lora_info(args), "causal": not args.no_causal_mask, "accumulate": args.accumulate}
        if args.lora:
            info["trainable"] = "lora"
        if table:   # the data before the model: the head needs the number of classes
            splits, info["labels"] = prepare_run_splits(info)   # written into the run folder below

    # the model first: a missing weights file is the likeliest problem and needs no data
    params, config = load_base_model(info, log)
    if isinstance(info["trainable"], int) and info["trainable"] > config.n_layer:
        parser.error(f"--trainable-blocks {info['trainable']}: the weights have only {config.n_layer} blocks")
    n_params = sum(a.size for a in params.values())
    from .lora import spec_of
    from .model import trainable_names
    spec = spec_of(info)
    names = trainable_names(config, info["trainable"], lora=spec)
    n_train = sum(params[n].size for n in names)
    if args.resume:
        restore_trained(run_dir, params, names)

    if info.get("table"):
        if args.resume:
            from .tabular import read_user_splits
            splits = read_user_splits(run_dir, info["labels"])
    else:
        splits = load_splits(info, args)
    if splits[0].attrs.get("warning"):
        log(splits[0].attrs["warning"])
    tok = load_tokenizer(info)
    datasets = make_datasets(splits, tok, info["padding"], context_length=config.n_ctx, progress=not args.quiet)
    if info["batch_size"] > len(datasets[0]):
        parser.error(f"--batch-size {info['batch_size']} is larger than the {len(datasets[0])} training messages")
    info["pad_to"] = datasets[0].pad_to
    if info.get("table"):
        counts = np.bincount(datasets[0].labels, minlength=len(info["labels"]))
        log("classes: " + ", ".join(f"{s} ({c})" for s, c in zip(info["labels"], counts)) + " in train")
    log(f"data: {len(datasets[0])} train / {len(datasets[1])} validation / {len(datasets[2])} test messages, "
        f"padding {info['padding']} ({datasets[0].pad_to or 'per batch'}), mean length "
        f"{np.mean(datasets[0].lengths):.1f} tokens")

    settings = TrainSettings(epochs=info["epochs"], batch_size=info["batch_size"], lr=info["lr"],
                             weight_decay=info["weight_decay"], decay_1d=info["decay_1d"], seed=info["seed"],
                             eval_freq=info["eval_freq"], eval_iter=info["eval_iter"],
                             trainable=info["trainable"], pooling=info["pooling"],
                             cache=info["cache"], dense=info["dense"], lora=spec,
                             causal=info.get("causal", True), accumulate=info.get("accumulate", 1),
                             **cache_settings(args))
    # everything is in place: now the run folder (a failed start leaves none behind)
    created = not args.resume
    if created:
        run_dir = create_run_dir(run_dir, explicit=bool(args.out))
    try:
        check_output_dir(run_dir, need_bytes=4 * n_params + 3 * 4 * n_train + (16 << 20))
    except NpgptError:
        if created:
            remove_if_empty(run_dir)
        raise
    if created:                          # the splits this run uses, kept with it
        from .data import write_split_csv
        from .tabular import SPLIT_FILES
        for name, df in zip(SPLIT_FILES, splits):
            write_split_csv(df, os.path.join(run_dir, SPLIT_FILES[name]))
    try:
        log(f"model: {info['model_size']} ({n_params / 1e6:.1f}M parameters, "
            f"{n_train / 1e6:.2f}M trainable: {info['trainable']}), pooling {info['pooling']}, run folder {run_dir}")
        if spec is not None:
            log(f"LoRA rank {spec.rank}, alpha {spec.alpha:g} on {', '.join(spec.targets) or 'no layer'}"
                f"{' + the full head' if spec.train_head else ''}: {n_train:,} trainable parameters")
        with np.errstate(over="ignore", invalid="ignore"):   # a diverging run is caught as Diverged
            state, feats = fit(params, config, datasets, settings, run_dir, info, resume=bool(args.resume),
                               log=log, progress=not args.quiet)
    except Interrupted as e:
        print(f"\ninterrupted: progress saved in {e.checkpoint}; continue with "
              f"`python -m npgpt.train --resume {run_dir}`", file=sys.stderr)
        return 130 if e.signum == 2 else 143
    except KeyboardInterrupt:            # before the first step (while caching): nothing to keep
        print(f"\ninterrupted before training started: {nothing_saved(run_dir, created)}", file=sys.stderr)
        return 130
    except Diverged as e:
        raise TrainingError(f"{e}; training stopped: {on_disk(run_dir, created)}. "
                            f"Try a lower --lr (this run: {info['lr']:g})") from None
    final = state.metrics["final"]
    path = save_outputs(run_dir, params, config, state, info, {}, log, plots=not args.no_plots)
    log(f"Training accuracy: {final['train_accuracy'] * 100:.2f}%")
    log(f"Validation accuracy: {final['validation_accuracy'] * 100:.2f}%")
    log(f"Test accuracy: {final['test_accuracy'] * 100:.2f}%")
    log(f"classifier saved to {path}")
    log(finish_checkpoint(run_dir, info))
    log(f"Training completed in {(time.time() - t_start) / 60:.2f} minutes "
        f"({state.train_time:.1f} s in training steps)")
    return 0


def prepare_run_splits(info: dict):
    """A user's table split as info says -> (splits, labels); the CSVs are written with the run folder."""
    from .tabular import prepare_user_splits
    return prepare_user_splits(info["data"], info["validation"], info["test"], text_column=info["text_column"],
                               label_column=info["label_column"], labels=info["user_labels"],
                               split=info["split"], balance=info["balance"], seed=info["seed"],
                               skip_bad_lines=info["skip_bad_lines"])


def cache_settings(args) -> dict:
    """The disk-cache flags as TrainSettings fields (per invocation, not part of the run's identity)."""
    from .prefix_cache import parse_size
    return {"cache_disk": not args.no_cache_disk, "cache_dir": args.cache_dir,
            "cache_memory": None if args.cache_memory is None else parse_size(args.cache_memory)}



def nothing_saved(run_dir, created) -> str:
    if created and remove_if_empty(run_dir):
        return f"nothing was saved (the run folder {run_dir} was removed)"
    return f"nothing new was saved in {run_dir}"


def on_disk(run_dir, created) -> str:
    """What a stopped run leaves on disk, in words."""
    from .checkpoint import CHECKPOINT
    path = os.path.join(run_dir, CHECKPOINT)
    if os.path.exists(path):
        try:
            epoch = _read_state(run_dir)["run_state"]["epoch"]
        except NpgptError:
            epoch = "?"
        return f"{path} (after epoch {epoch}) is kept"
    return nothing_saved(run_dir, created) + "; no epoch had completed"


def resume_info(run_dir, args, argv, parser, log):
    """The run info of the run to continue (epochs raised by --epochs), or None when it is complete."""
    from .checkpoint import CHECKPOINT
    if not os.path.isdir(run_dir):
        raise NpgptError(f"--resume {run_dir}: no such run folder")
    if not os.path.exists(os.path.join(run_dir, CHECKPOINT)):
        raise NpgptError(f"--resume {run_dir}: no {CHECKPOINT} to resume from")
    saved = _read_state(run_dir)
    info, done = saved["run_info"], saved["run_state"]["epoch"]
    finished = done >= info["epochs"] and os.path.exists(os.path.join(run_dir, "classifier.h5"))
    if "--epochs" in given_flags(argv):
        if args.epochs <= done:
            parser.error(f"--epochs {args.epochs}: the run in {run_dir} has done {done} epochs already; "
                         f"give more to train longer")
        info["epochs"] = args.epochs
    elif finished:
        log(f"{run_dir} is complete ({done} of {info['epochs']} epochs; its classifier.h5 is saved): "
            f"nothing to do. To train longer: --resume {run_dir} --epochs N (N > {done})")
        return None
    info.setdefault("save", "full")
    return info


def restore_trained(run_dir, params, names):
    """A finished run's checkpoint keeps no parameters: take the trained arrays from its
    classifier.h5 (full or --save trained) before the checkpoint's optimizer state is loaded."""
    import h5py
    from .checkpoint import CHECKPOINT
    from .errors import FormatError
    with h5py.File(os.path.join(run_dir, CHECKPOINT), "r") as f:
        if "params" in f:
            return
    path = os.path.join(run_dir, "classifier.h5")
    try:
        with h5py.File(path, "r") as f:
            for n in names:
                arr = f[n][()]
                if arr.shape != params[n].shape:
                    raise FormatError(f"{path}: array {n!r} does not fit the model")
                params[n][...] = arr
    except FormatError:
        raise
    except Exception as e:
        raise FormatError(f"{path}: cannot read the trained arrays to resume from ({e})") from None


def load_splits(info, args):
    """The three splits; a missing data file or a failed download names --data."""
    from .data import prepare_splits
    if info["data"] is not None and os.path.isdir(info["data"]):
        raise NpgptError(f"--data {info['data']}: is a folder, expected the SMSSpamCollection file or "
                         "UCI's zip (for a folder of split CSVs, pass it as --data-dir)")
    try:
        return prepare_splits(info["data"], info["data_dir"], skip_bad_lines=info["skip_bad_lines"],
                              progress=not args.quiet, parse=info.get("parse", "pandas"))
    except NpgptError as e:
        if info["data"] is None and "--data" not in str(e):
            raise type(e)(f"{e} (offline? pass --data PATH to the SMSSpamCollection file or UCI's zip, "
                          f"or put train/validation/test.csv in --data-dir {info['data_dir']})") from None
        raise


def load_tokenizer(info):
    """GPT-2's tokenizer; when none is found, the message names --bpe-dir."""
    from .tokenizer import get_tokenizer
    try:
        return get_tokenizer(info["bpe_dir"], weights_dir=os.path.dirname(info["weights"]) or ".")
    except NpgptError as e:
        if "--bpe-dir" in str(e):
            raise
        raise type(e)(f"--bpe-dir: {e}") from None


def finish_checkpoint(run_dir, info) -> str:
    """Shrink the checkpoint of a finished run to what `--resume RUN --epochs N` needs beyond the
    saved classifier (the AdamW moments and the run state); say what is kept."""
    from .checkpoint import CHECKPOINT, strip_params
    path = os.path.join(run_dir, CHECKPOINT)
    if not os.path.exists(path):
        return "no checkpoint kept"
    size = strip_params(path)
    return (f"{path} now holds only the optimizer state ({size / 2**20:.1f} MiB) so that "
            f"`--resume {run_dir} --epochs N` can train longer; delete it if you will not")


def _read_state(run_dir) -> dict:
    import h5py
    from .checkpoint import CHECKPOINT
    from .errors import FormatError
    path = os.path.join(run_dir, CHECKPOINT)
    try:
        with h5py.File(path, "r") as f:
            return json.loads(f.attrs["state"])
    except Exception as e:
        raise FormatError(f"{path}: not a readable checkpoint ({e})") from None


if __name__ == "__main__":
    run(main)
