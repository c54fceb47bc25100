"""Progress bars (tqdm on stderr) that read well in a terminal and in a log file.

A terminal gets a live bar; a file or a pipe (a redirected log) gets an update every 30 s at most
and the last one, in plain ASCII, instead of one line per step.
"""
from __future__ import annotations

import sys


def bar_options(stream=None) -> dict:
    """tqdm keyword arguments for a bar written to `stream` (stderr by default)."""
    stream = sys.stderr if stream is None else stream
    try:
        tty = stream.isatty()
    except (AttributeError, ValueError):
        tty = False
    return {"mininterval": 0.5} if tty else {"mininterval": 30.0, "maxinterval": 60.0, "ascii": True}


def bar(enabled: bool = True, **kwargs):
    """A tqdm bar with `bar_options()`; `enabled=False` gives one that shows nothing."""
    from tqdm import tqdm
    return tqdm(disable=not enabled, **bar_options(), **kwargs)
