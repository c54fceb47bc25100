"""Texts in, one row of predictions per text out: what `classify --file ... --out FILE` does.

    texts = read_texts("inbox.csv", text_column="body")     # pd.Series, index = each row's id
    frame = prediction_frame(clf, texts)                      # [label, p_ham, p_spam] per row
    write_predictions(frame, "predicted.parquet")             # .csv / .jsonl / .parquet

The row id is what names a row to the user, so that a prediction can be put back beside its input:
    a table (.csv/.tsv/.jsonl)   the 1-based line of the file where the row starts (index "line"),
                                 the line that tabular.py's error messages name; a quoted
                                 multi-line field keeps its row one record, so ids may skip lines
    a .parquet table             the 1-based row number (index "row")
    id_column= (--id-column)     that column's values instead (index named after the column)
    any other file               one text per line; its 1-based line number (index "line")
A table is read by `npgpt.tabular.read_table`, as `train --data` reads one (a header row, quoted
fields, the same errors), with no label column.
"""
from __future__ import annotations

import json
import os

import numpy as np
import pandas as pd

from .data import split_lines
from .errors import DataError, quote
from .fileio import atomic_write
from .tabular import is_table, read_table

OUT_EXTENSIONS = (".csv", ".jsonl", ".parquet")


# ----------------------------------------------------------------------------- texts in

def read_lines(raw: bytes, source: str, skip_empty=False, notes=None):
    """Texts of a file or stdin, one per line -> (texts, their 1-based line numbers).

    A trailing "\\r" and a UTF-8 byte-order mark are dropped. A blank (or whitespace-only) line is
    a DataError naming it unless skip_empty; so is a line that is not UTF-8.
    notes: a list, for a file (not a pipe): only complete lines are texts. A last line with no
    newline at its end may be half-written (a file still being appended to): it is left out, and
    a note saying so is added to `notes`."""
    lines = split_lines(raw)
    if notes is not None and lines and not raw.endswith(b"\n"):
        notes.append(f"note: {source}: line {len(lines)} has no newline at its end (a file still being "
                     "written?): left out; end the file with a newline to classify it")
        lines = lines[:-1]
    texts, numbers = [], []
    for n, line in enumerate(lines, start=1):
        if line.endswith(b"\r"):
            line = line[:-1]
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"{source}: line {n} is not valid UTF-8 (byte {e.start})") from None
        if not text.strip():
            if skip_empty:
                continue
            raise DataError(f"{source}: line {n} is blank (pass --skip-empty to skip blank lines)")
        texts.append(text)
        numbers.append(n)
    if not texts:
        raise DataError(f"{source}: no texts to classify")
    return texts, numbers


def text_series(texts, ids, id_name: str) -> pd.Series:
    """Texts as read_texts returns them: a Series named "text", indexed by the row ids."""
    return pd.Series(list(texts), index=pd.Index(list(ids), name=id_name), name="text", dtype=object)


def read_texts(path, text_column=None, id_column=None, skip_bad_lines=False) -> pd.Series:
    """The texts of a file, indexed by their row id (see the module's docstring) -> pd.Series.

    .csv/.tsv/.jsonl/.parquet: a table, the texts in `text_column` (None: "text", train's
    default); bad rows are errors naming file and line, or with skip_bad_lines left out. Anything
    else: one text per line, blank lines errors or (skip_bad_lines) skipped, and a last line with
    no newline left out. What the caller should print (skipped rows, the left-out line) is in
    `series.attrs["notes"]`."""
    path = os.fspath(path)
    if is_table(path):
        df = read_table(path, text_column or "text", None, skip_bad_lines=skip_bad_lines, id_column=id_column)
        unit = "row" if path.lower().endswith(".parquet") else "line"
        ids, name = (df["Id"], str(id_column)) if id_column is not None else (df["Line"], unit)
        series = text_series(df["Text"], ids, name)
        series.attrs["notes"] = [df.attrs["warning"]] if df.attrs.get("warning") else []
        return series
    if text_column is not None or id_column is not None:
        flag = "--text-column" if text_column is not None else "--id-column"
        raise DataError(f"{path}: {flag} needs a table (.csv, .tsv, .jsonl, .parquet); this file is read "
                        "as one text per line")
    try:
        with open(path, "rb") as fh:
            raw = fh.read()
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise DataError(f"{path}: is a folder, expected a file of texts") from None
    notes = []
    texts, lines = read_lines(raw, path, skip_bad_lines, notes)
    series = text_series(texts, lines, "line")
    series.attrs["notes"] = notes
    return series


# ----------------------------------------------------------------------------- predictions out

def prediction_frame(classifier, texts: pd.Series, progress=False) -> pd.DataFrame:
    """One row per text, with the index of `texts` (the input's row ids): column "label" (the
    predicted class name), then one float column per class, "p_<label>", in classifier.labels
    order, each row's probabilities exactly `classifier.predict_proba` of its text (its float32
    values held as float64, so that every output format writes them to full precision).

    frame.attrs["truncated"]: the ids of the texts cut to the model's length limit."""
    columns = ["p_" + name for name in classifier.labels]
    if texts.index.name in ["label"] + columns:
        raise DataError(f"the row id's name {quote(texts.index.name)} is also a column of the predictions; "
                        "choose another --id-column")
    P = classifier.predict_proba(texts.tolist(), progress=progress)           # [N,K]
    best = np.argmax(P, axis=1)                                               # [N]
    frame = pd.DataFrame(P.astype(np.float64), index=texts.index.copy(), columns=columns)
    frame.insert(0, "label", pd.Series([classifier.labels[k] for k in best], index=frame.index, dtype=object))
    frame.attrs["truncated"] = [texts.index[i] for i in classifier.truncated]
    return frame


def check_out_path(path, flag="--out") -> str:
    """The extension of a predictions file: .csv, .jsonl or .parquet; else a one-line DataError
    naming the option that gave the path (`flag`)."""
    ext = os.path.splitext(os.fspath(path))[1].lower()
    if ext not in OUT_EXTENSIONS:
        raise DataError(f"{flag} {path}: unknown file type {ext or '(no extension)'!r}; "
                        f"use {', '.join(OUT_EXTENSIONS)}")
    if os.path.isdir(path):
        raise DataError(f"{flag} {path}: is a folder, expected a file name ({', '.join(OUT_EXTENSIONS)})")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise DataError(f"{flag} {path}: no folder {folder}")
    return ext


def write_predictions(frame: pd.DataFrame, path, flag="--out") -> None:
    """Write a prediction frame, its row id as the first column, by the extension of path:
    .csv (a header row), .jsonl (one JSON object a line) or .parquet. Atomic (`fileio.atomic_write`):
    an existing file is replaced whole, or left as it was when writing fails."""
    ext = check_out_path(path, flag)
    table = frame.reset_index()
    with atomic_write(path) as tmp:
        if ext == ".csv":
            table.to_csv(tmp, index=False, encoding="utf-8")
        elif ext == ".parquet":
            _write_parquet(table, tmp, f"{flag} {path}")
        else:
            with open(tmp, "w", encoding="utf-8") as fh:
                for record in table.to_dict("records"):
                    fh.write(json.dumps({k: _plain(v) for k, v in record.items()}, ensure_ascii=False) + "\n")


def _write_parquet(table: pd.DataFrame, tmp, where) -> None:
    try:
        table.to_parquet(tmp, index=False)
    except ImportError as e:
        raise DataError(f"{where}: writing Parquet needs pyarrow or fastparquet ({e})") from None
    except (TypeError, ValueError) as e:  # pyarrow's errors derive from these: ids of mixed types, say
        raise DataError(f"{where}: cannot be written as Parquet ({str(e).splitlines()[0]}); "
                        "write .csv or .jsonl") from None


def _plain(value):
    """A NumPy scalar as the Python number json writes (an id read from Parquet may be one)."""
    return value.item() if isinstance(value, np.generic) else value
