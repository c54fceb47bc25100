"""What every command-line tool shares: one-line errors, exit codes, `--debug`.

    def main(argv=None):
        parser = make_parser("python -m npgpt.X", "what it does")
        ...
        args = parser.parse_args(argv)
        ...

    if __name__ == "__main__":
        run(main)

User errors (`NpgptError`) print `error: <message>` on stderr and exit 1; usage errors exit 2
(argparse); Ctrl-C exits 130. `--debug` (or NPGPT_DEBUG=1) shows the traceback instead.
"""
from __future__ import annotations

import argparse
import os
import sys

from .errors import NpgptError


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (plus a pointer to --help), exit code 2."""

    def error(self, message):
        print(f"{self.prog}: error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


def make_parser(prog: str, description: str) -> argparse.ArgumentParser:
    parser = _Parser(prog=prog, description=description,
                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--debug", action="store_true", help="show the full traceback on errors")
    return parser


def run(main, argv=None) -> None:
    """Call main(argv) and turn its failures into one line on stderr and an exit code."""
    argv = sys.argv[1:] if argv is None else argv
    debug = "--debug" in argv or os.environ.get("NPGPT_DEBUG") == "1"
    try:
        code = main(argv)
    except NpgptError as e:
        if debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except BrokenPipeError:         # the reader went away (`... | head`): nothing left to say
        try:
            sys.stdout = open(os.devnull, "w")
        except OSError:
            pass
        sys.exit(0)
    except KeyboardInterrupt:
        if debug:
            raise
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except (OSError, MemoryError) as e:
        if debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    sys.exit(code or 0)
