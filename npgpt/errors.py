"""npgpt's own error types, and how a value appears in a message.

Everything a user can cause (a bad file, a bad flag, bad text) raises an `NpgptError`, so the
command-line tools can print one line and exit instead of showing a traceback.

Values in messages come from files anyone may have written (a label, a column name, a file name),
so they pass through two functions before they reach a terminal:
    printable(text)   control characters shown escaped (\\x1b, \\n): no escape sequence reaches
                      the terminal raw, and one line stays one line
    quote(value)      repr() cut to a bounded length: a 20 MB label is not a 20 MB message
"""

import reprlib

QUOTE_LIMIT = 80         # characters of a value quoted in a message


class NpgptError(Exception):
    """Base class of every error npgpt raises on purpose."""


class FormatError(NpgptError):
    """A file (HDF5, TF checkpoint, safetensors, dataset) is malformed or does not match its config."""


class DataError(NpgptError):
    """The dataset or the text given to classify is not usable."""


class TrainingError(NpgptError):
    """Training cannot go on (non-finite loss or gradient, unwritable output, ...)."""


def printable(text) -> str:
    """`text` with every character that is not printable (control characters, escape sequences'
    ESC, line and paragraph separators) written as its Python escape: safe to print on a terminal."""
    s = str(text)
    if s.isprintable():
        return s
    return "".join(ch if ch.isprintable() else ch.encode("unicode_escape").decode("ascii") for ch in s)


def quote(value, limit: int = QUOTE_LIMIT) -> str:
    """repr(value), cut to `limit` characters with "..." (and the full length) when longer."""
    r = repr(value[:limit + 1]) if isinstance(value, (bytes, str)) else reprlib.repr(value)
    if len(r) <= limit:
        return r
    n = len(value) if isinstance(value, (bytes, str)) else None
    return r[:limit - 3] + "..." + (f" ({n} characters)" if n is not None else "")
