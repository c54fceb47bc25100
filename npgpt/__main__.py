"""`python -m npgpt` (or the `npgpt` console script): the commands, one line each.

    npgpt train --tiny            same as  python -m npgpt.train --tiny
"""
import sys

COMMANDS = {
    "train": "fine-tune GPT-2 into a classifier: the SMS spam job, or --data FILE of your own (a run folder under runs/)",
    "classify": "label texts with a trained classifier (runs/<name>/classifier.h5)",
    "evaluate": "accuracy, per-class precision/recall/F1 and confusion matrix of a classifier on a labelled file",
    "generate": "continue a prompt with GPT-2: greedy, or sampled with --temperature and --top-k",
    "weights": "download GPT-2's published weights or convert files on disk to npgpt's HDF5",
    "lora": "fold a classifier's LoRA pairs into its weights (lora merge)",
    "serve": "serve a classifier over HTTP: a JSON API with dynamic batching and a page at / (extra [serve])",
    "cache": "list or clear the disk cache of frozen-prefix activations",
}


def usage() -> str:
    w = max(map(len, COMMANDS))
    lines = ["usage: npgpt COMMAND [options]   (or python -m npgpt COMMAND; python -m npgpt.COMMAND)",
             "", "commands:"]
    lines += [f"  {name:<{w}}  {text}" for name, text in COMMANDS.items()]
    lines += ["", "`npgpt COMMAND --help` lists the options of each command."]
    return "\n".join(lines)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    if argv[0] in ("-V", "--version"):
        from . import __version__
        print(f"npgpt {__version__}")
        return 0
    name = argv[0]
    if name not in COMMANDS:
        print(f"npgpt: error: unknown command {name!r}; choose one of {', '.join(COMMANDS)} "
              "(see npgpt --help)", file=sys.stderr)
        return 2
    from . import tune_runtime
    tune_runtime()                        # before the command imports NumPy
    import importlib
    from .cli import run
    module = importlib.import_module(f"npgpt.cli.{name}")
    run(module.main, argv[1:], prog=f"npgpt {name}")


def console_main():
    """Entry point of the `npgpt` console script."""
    try:
        code = main()
        sys.stdout.flush()
    except BrokenPipeError:
        from .cli import reader_gone
        reader_gone()
    sys.exit(code)


if __name__ == "__main__":
    console_main()
