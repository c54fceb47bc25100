"""Progress bars (tqdm on stderr) that read well in a terminal and leave a redirected log clean.

A bar is shown only when its stream (stderr) is a terminal or a Jupyter notebook's output (whose
stream draws a carriage return as a terminal does): a file or a pipe (`train > log 2>&1`,
`evaluate 2>ev.err`) gets no bar and no carriage return, only the plain lines the command prints
(one per evaluation, none per batch). NPGPT_PROGRESS=1 forces bars off a terminal too (updated
every 30 s at most, in plain ASCII), NPGPT_PROGRESS=0 hides them everywhere.

The first update of a bar made with `untimed=1` is counted but not timed: the first training
batch and the first pack of the frozen prefix compile Numba's kernels, and a rate measured over
them would promise an ETA many times too long (`1/130 [00:16<35:26]`).
"""
from __future__ import annotations

import functools
import os
import sys

ENV = "NPGPT_PROGRESS"


def _is_terminal(stream) -> bool:
    """A terminal, or a Jupyter kernel's output stream (ipykernel's OutStream: not a tty, but a
    notebook redraws a line on a carriage return)."""
    if type(stream).__module__.startswith("ipykernel."):
        return True
    try:
        return stream.isatty()
    except (AttributeError, ValueError):        # no isatty, or a closed stream
        return False


def shows_bars(stream=None) -> bool:
    """Whether a bar written to `stream` (stderr by default) is shown: on a terminal, unless
    NPGPT_PROGRESS=0; off a terminal only with NPGPT_PROGRESS=1."""
    forced = os.environ.get(ENV, "").strip().lower()
    if forced in ("0", "no", "never", "false"):
        return False
    if forced in ("1", "yes", "always", "true"):
        return True
    return _is_terminal(sys.stderr if stream is None else stream)


def bar_options(stream=None) -> dict:
    """tqdm keyword arguments for a bar written to `stream` (stderr by default): live on a
    terminal; every 30 s at most and in ASCII where bars are forced into a file."""
    stream = sys.stderr if stream is None else stream
    if _is_terminal(stream):
        return {"mininterval": 0.5}
    return {"mininterval": 30.0, "maxinterval": 60.0, "ascii": True}


def bar(enabled: bool = True, untimed: int = 0, **kwargs):
    """A tqdm bar with `bar_options()`, shown when `enabled` and `shows_bars()`; otherwise one
    that shows nothing (its `disable` is True: write lines through the log instead).
    untimed: how many first updates are counted but left out of the rate and the ETA."""
    return _bar_class()(disable=not (enabled and shows_bars()), untimed=untimed, **{**bar_options(), **kwargs})


@functools.cache
def _bar_class():
    """tqdm's class with the untimed first updates (made on first use: importing this module
    does not import tqdm)."""
    from tqdm import tqdm

    class Bar(tqdm):
        def __init__(self, *args, untimed=0, **kwargs):
            self.untimed = untimed
            super().__init__(*args, **kwargs)

        def update(self, n=1):
            if self.untimed <= 0 or self.disable:
                return super().update(n)
            self.untimed -= 1
            self.n += n
            self.initial = self.n                  # the rate without smoothing: (n - initial) / elapsed
            self.last_print_n, self.last_print_t = self.n, self._time()     # the next rate starts here
            self.refresh()
            return True

    return Bar


def write_above(b, log, message: str) -> None:
    """log(message), with the bar `b` cleared first and drawn again after when it is live (the
    line stays above the bar); a bar that shows nothing leaves the line to the log alone."""
    if b.disable:
        log(message)
        return
    with b.external_write_mode():
        log(message)
