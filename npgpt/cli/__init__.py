"""The command line: every `python -m npgpt.X` and `npgpt X` is a module of this package,
`npgpt.cli.X`, with a `main(argv)`. Nothing in the library imports this package.

    python -m npgpt.train ...   runs npgpt/train.py, whose `if __name__ == "__main__"` block calls
                                hand_over("train"): npgpt.cli.train.main, through `run`
    npgpt train ...             the same, through npgpt/__main__.py

What every command shares, here: one-line errors, exit codes, `--debug`, the parser's help format
and its "did you mean" for a mistyped option, Numba's compilation announced once.

User errors (`NpgptError`) print `error: <message>` on stderr and exit 1; usage errors exit 2
(argparse); Ctrl-C exits 130. `--debug` (or NPGPT_DEBUG=1) shows the traceback instead.
`run` also calls `npgpt.tune_runtime()` (the runtime settings, docs/troubleshooting.md).
"""
from __future__ import annotations

import argparse
import os
import re
import sys

from ..errors import NpgptError, printable


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (plus a pointer to --help), exit code 2, and a
    negative number in any spelling is an option's value: `--lr -1e-3` reaches the check that
    says "--lr must be positive" (argparse alone knows only -3 and -0.5, and would say
    "expected one argument")."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._negative_number_matcher = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$|^-(inf|infinity|nan)$",
                                                   re.IGNORECASE)

    def error(self, message):
        print(f"{self.prog}: error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)

    def parse_known_args(self, args=None, namespace=None):
        """A mistyped option is named first, with the option it is closest to: `--modle x.h5`
        says "unrecognized option --modle (did you mean --model?)", not that --model is missing."""
        args = sys.argv[1:] if args is None else list(args)
        if not any(isinstance(a, argparse._SubParsersAction) for a in self._actions):   # the subcommand checks
            import difflib
            known = sorted(self._option_string_actions)
            for arg in args:
                if arg == "--":
                    break
                name = arg.split("=", 1)[0]
                if arg.startswith("--") and name not in self._option_string_actions:
                    close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
                    self.error(f"unrecognized option {name}" + (f" (did you mean {close[0]}?)" if close else ""))
        return super().parse_known_args(args, namespace)


class HelpFormatter(argparse.HelpFormatter):
    """Adds "(default: X)" to an option's help when it has a default worth naming (not None,
    not False) and the help does not already say what the default is."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text.lower() or action.default in (None, False, argparse.SUPPRESS):
            return text
        if action.option_strings or action.nargs in (argparse.OPTIONAL, argparse.ZERO_OR_MORE):
            return text + " (default: %(default)s)"
        return text


_prog_override = None      # "npgpt train" when run through the npgpt command


def make_parser(prog: str, description: str) -> argparse.ArgumentParser:
    parser = _Parser(prog=_prog_override or prog, description=description, formatter_class=HelpFormatter,
                     allow_abbrev=False)
    parser.add_argument("--debug", action="store_true", help="show the full traceback on errors")
    return parser


def expect_file(path, flag: str, what: str = "a file", hint: str = "") -> None:
    """NpgptError unless `path` is an existing file: names the flag that gave it, and for a folder
    says what was expected instead (`hint`, e.g. the file inside a run folder)."""
    path = os.fspath(path)
    if os.path.isdir(path):
        raise NpgptError(f"{flag} {path}: is a folder, expected {what}" + (f" ({hint})" if hint else ""))
    if not os.path.exists(path):
        raise NpgptError(f"{flag} {path}: no such file" + (f" ({hint})" if hint else ""))


def reader_gone() -> None:
    """Exit quietly when the reader of stdout has gone (`npgpt ... | head -5`): point stdout at
    /dev/null, so that the flush at exit does not fail a second time and print a traceback."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass
    sys.exit(0)


def run(main, argv=None, prog=None) -> None:
    """Call main(argv) and turn its failures into one line on stderr and an exit code."""
    global _prog_override
    from .. import tune_runtime
    tune_runtime()
    _prog_override = prog
    argv = sys.argv[1:] if argv is None else argv
    debug = "--debug" in argv or os.environ.get("NPGPT_DEBUG") == "1"
    try:
        code = main(argv)
    except NpgptError as e:
        if debug:
            raise
        print(f"error: {printable(e)}", file=sys.stderr)
        sys.exit(1)
    except BrokenPipeError:         # the reader went away (`... | head`): nothing left to say
        reader_gone()
    except KeyboardInterrupt:
        if debug:
            raise
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except (OSError, MemoryError) as e:
        if debug:
            raise
        print(f"error: {printable(e) or type(e).__name__}", file=sys.stderr)   # MemoryError has no message
        sys.exit(1)
    sys.exit(code or 0)


def announce_compilation(write=print, text="compiling kernels (first run only: later runs load them "
                                            "from Numba's cache)") -> None:
    """Say once, when Numba starts compiling a kernel (not when it loads one from its cache), that
    the first steps are slow because of it. For the rest of the process."""
    from numba.core import event

    class _Once(event.Listener):
        said = False

        def on_start(self, ev):
            if not self.said:
                self.said = True
                write(text)

        def on_end(self, ev):
            pass

    event.register("numba:compile", _Once())


def hand_over(command: str) -> None:
    """`python -m npgpt.<command>`: run npgpt.cli.<command>'s main through `run`, which exits.
    Called from the `if __name__ == "__main__"` block at the top of npgpt/<command>.py, before
    that module imports NumPy (so `tune_runtime` comes first)."""
    from .. import tune_runtime
    tune_runtime()
    import importlib
    run(importlib.import_module(f"npgpt.cli.{command}").main)


def shorten(text: str, width: int) -> str:
    """One display line: whitespace runs become one space, other control characters are shown
    escaped (\\x1b, `npgpt.errors.printable`), and the text is cut to `width` characters with "..."."""
    s = printable(" ".join(text.split()))
    return s if len(s) <= width else s[:max(width - 3, 1)] + "..."
