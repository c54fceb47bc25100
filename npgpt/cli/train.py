"""`python -m npgpt.train`: fine-tune GPT-2 into a text classifier on the CPU.

Defaults reproduce the reference's setting (chapter 6 of "Build a Large Language Model (From
Scratch)"): GPT-2 124M, the last block, the final LayerNorm and a new 2-class head trainable,
AdamW lr 5e-5 weight decay 0.1, 5 epochs of batch 8, evaluation every 50 steps, seed 123; but
pooling at the last real token (the reference's last-position pooling is `--pooling last-position`).

The command line is parse -> RunConfig (npgpt.runconfig: one field per flag, checked there) ->
npgpt.train.train_run (or resume_run) -> print. Output, in the run folder (`runs/<name>/`):
    classifier.h5    the fine-tuned model: every parameter, the head, config, labels, settings
    metrics.json     every logged value and the final accuracies
    checkpoint.h5    where to resume from (`--resume runs/<name>`)
    run.json         the run's settings
    loss.png, accuracy.png   when matplotlib is installed
"""
from __future__ import annotations

import argparse
import dataclasses
import sys

from ..errors import NpgptError, printable
from ..runconfig import SIZES, ConfigError, RunConfig, RunOptions
from ..runs import Interrupted
from ..train import resume_run, train_run
from . import announce_compilation, make_parser

GROUPS = {"model": "model", "data": "data", "training": "training",
          "schedule": "schedule, class weights, the epoch kept (appendix D)",
          "lora": "LoRA and the book's bonus experiments", "output": "output"}
OPTION_FIELDS = {f.name for f in dataclasses.fields(RunOptions)}
RESUMABLE = OPTION_FIELDS | {"epochs"}       # what --resume accepts besides the run folder


def _arg_type(f):
    """The argparse type of a field: int and float fields convert; the others stay strings and
    RunConfig reads them (a list 'a,b', 'longest|batch|N', 'K|all|head')."""
    t = str(f.type)
    if t.startswith("int") and "str" not in t:
        return int
    if t.startswith("float"):
        return float
    return str


def _add_field(group, f):
    """One flag per field: its default (in the help, not in the namespace: a flag not given is
    absent, and RunConfig's default applies), its help, its spelling."""
    m = f.metadata
    flag = m.get("flag") or "--" + f.name.replace("_", "-")
    default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    text = m["help"]
    if f.type == "bool" or isinstance(default, bool):
        action = "store_false" if m.get("negate") else "store_true"
        group.add_argument(flag, dest=f.name, action=action, default=argparse.SUPPRESS, help=text)
        return
    if default is not None and "default" not in text.lower():
        shown = ",".join(map(str, default)) if isinstance(default, tuple) else str(default).replace("_", "-")
        text += f" (default: {shown})"
    choices = m.get("choices")
    group.add_argument(flag, dest=f.name, type=_arg_type(f), default=argparse.SUPPRESS, help=text,
                       metavar=m.get("metavar"), choices=choices)


def build_parser():
    p = make_parser("python -m npgpt.train",
                    "Fine-tune GPT-2 into a text classifier on the CPU: on your labelled texts (--data FILE.csv), "
                    "or on the SMS Spam Collection (defaults: the reference's setting, last-real-token pooling).")
    groups = {key: p.add_argument_group(title) for key, title in GROUPS.items()}
    groups["model"].add_argument("--tiny", action="store_true", default=argparse.SUPPRESS,
                                 help="a small randomly initialised model (2 layers, 64 dims): the pipeline in "
                                      "seconds (as --model-size tiny)")
    for cls in (RunConfig, RunOptions):
        for f in dataclasses.fields(cls):
            _add_field(groups[f.metadata["group"]], f)
    groups["output"].add_argument(
        "--resume", default=None, metavar="RUN_DIR",
        help=f"continue an interrupted run with its own settings (with it give only "
             f"{', '.join(sorted(_flags(RESUMABLE)))} and --debug); --epochs N beyond the run's extends it; "
             f"a finished run says so and is left as it is")
    return p


def _flags(names):
    from ..runconfig import flag_of
    return [flag_of(n) for n in names]


def parse(argv, parser):
    """argv -> (RunConfig or None (resume), RunOptions, the folder to resume or None, epochs given).
    A setting that cannot be is a usage error naming its flag (exit 2)."""
    given = vars(parser.parse_args(argv))
    given.pop("debug", None)
    resume = given.pop("resume", None)
    if given.pop("tiny", False):
        if given.get("model", "tiny") != "tiny":      # a size that cannot be is named first
            if given["model"] not in SIZES:
                parser.error(str(ConfigError("model", f"must be one of {', '.join(SIZES)} (or --tiny for a small "
                                                      f"random model), got {given['model']!r}")))
            parser.error(f"--tiny and --model-size {given['model']} exclude each other (--tiny is --model-size tiny)")
        given["model"] = "tiny"
    options = {k: given.pop(k) for k in list(given) if k in OPTION_FIELDS}
    try:
        opts = RunOptions(**options)
        if resume is not None:
            import os
            if not os.path.isdir(resume):             # named before any flag the run fixes
                raise NpgptError(f"--resume {resume}: no such run folder")
            fixed = sorted(set(given) - {"epochs"})
            if fixed:
                parser.error(f"{', '.join(_flags(fixed))}: fixed by the run in {resume} and cannot change on "
                             f"--resume (with --resume give only {', '.join(sorted(_flags(RESUMABLE)))})")
            return None, opts, resume, given.get("epochs")
        return RunConfig(**given), opts, None, None
    except ConfigError as e:
        parser.error(str(e))


def say(message) -> None:
    """Print a message of the run, each line through `printable`: class names and column names
    come from the user's files and may hold escape sequences."""
    print("\n".join(printable(line) for line in str(message).split("\n")))


def _silent(message) -> None:
    pass


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    run, options, resume, epochs = parse(argv, parser)
    log = say if options.progress else _silent           # --quiet: the final lines only
    if options.progress:
        announce_compilation(print)
    try:
        result = resume_run(resume, options, epochs, log=log) if resume else train_run(run, options, log=log)
    except ConfigError as e:             # a setting the data or the weights rule out
        parser.error(str(e))
    except Interrupted as e:
        if e.checkpoint is None:
            print(f"\n{e}", file=sys.stderr)
            return 130
        import os
        run_dir = os.path.dirname(e.checkpoint)
        print(f"\n{e}; continue with `python -m npgpt.train --resume {run_dir}`", file=sys.stderr)
        return 130 if e.signum == 2 else 143
    if result is None:                   # a finished run, resumed without more epochs
        return 0
    final = result.metrics["final"]
    print(f"Training accuracy: {final['train_accuracy'] * 100:.2f}%")
    print(f"Validation accuracy: {final['validation_accuracy'] * 100:.2f}%")
    print(f"Test accuracy: {final['test_accuracy'] * 100:.2f}%")
    print(f"classifier saved to {result.classifier_path}")
    print(result.checkpoint_note)
    print(f"Training completed in {result.seconds / 60:.2f} minutes ({result.state.train_time:.1f} s in training steps)")
    return 0
