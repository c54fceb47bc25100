"""A user's labelled text: read a table, choose the classes, split it, write the splits.

    read_table        .csv / .tsv / .jsonl / .parquet -> DataFrame [Text, Label (str), Line]
    class_names       the classes: the training labels sorted (numerically if all are integers),
                      or the order the user gives
    label_ids         class names -> ids, an error naming the first unknown label and its line
    stratified_split  per class, the same fractions to train / validation / test (seeded)
    undersample       every class cut to the smallest class's count (seeded)
    prepare_user_splits   all of the above; the three splits written as CSVs in the run folder

Every row carries `Line`: the 1-based line of the file where the row starts (the row number for
.parquet), so any error names a place the user can open. CSV and TSV are read by Python's csv
module (a header row; quoted fields may hold commas, tabs, quotes and newlines), JSONL one object a
line by the json module, Parquet by pandas.
"""
from __future__ import annotations

import csv
import io
import json
import os
import re
from pathlib import Path

import numpy as np
import pandas as pd

from .errors import DataError, quote

TABLE_EXTENSIONS = (".csv", ".tsv", ".jsonl", ".parquet")
SPLIT_FILES = {"train": "train.csv", "validation": "validation.csv", "test": "test.csv"}
_INT = re.compile(r"[+-]?\d+\Z")


def is_table(path) -> bool:
    """True for a file npgpt reads as a table (by extension), False for the SMS file or UCI zip."""
    return Path(path).suffix.lower() in TABLE_EXTENSIONS


# ----------------------------------------------------------------------------- reading


def read_table(path, text_column="text", label_column="label", skip_bad_lines=False,
               id_column=None) -> pd.DataFrame:
    """The rows of a table as a DataFrame with columns Text, Label (a string), Line (and Id).

    label_column None: a file of texts only (Label is then ""). id_column: a column naming each row
    to the user, carried as it is into a column Id (a missing value is a bad row; a value twice is
    an error naming both lines). A missing column raises DataError
    listing the file's columns. Bad rows (blank line, wrong number of fields, a repeated header,
    empty text, empty label, invalid UTF-8, a JSONL line that is not an object) raise DataError
    naming file and line; with skip_bad_lines they are left out and listed in
    `df.attrs["skipped"]`, summarised in `df.attrs["warning"]`.
    """
    path = Path(path)
    ext = path.suffix.lower()
    if path.is_dir():
        raise DataError(f"{path}: is a folder, expected a table file ({', '.join(TABLE_EXTENSIONS)})")
    if ext not in TABLE_EXTENSIONS:
        raise DataError(f"{path}: unknown table type {ext or '(no extension)'!r}; "
                        f"use {', '.join(TABLE_EXTENSIONS)}")
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    bad = _BadRows(path, skip_bad_lines, "row" if ext == ".parquet" else "line")
    if ext == ".parquet":
        records = _parquet_records(path)
    else:
        text = _decode(path, bad)
        records = _jsonl_records(text, bad) if ext == ".jsonl" else _delimited_records(text, ext, bad)
    columns, records = records
    return _frame(records, columns, text_column, label_column, bad, "the file's columns", "--", id_column)


def read_frame(data, text_column="text", label_column="label", source="the DataFrame",
               skip_bad_lines=False) -> pd.DataFrame:
    """Texts and labels held in memory, as `read_table` returns a file's: data is a pandas
    DataFrame holding both columns, or a pair (texts, labels) of equal lengths. Rows are numbered
    from 1 (`Line`); a missing value (None, NaN), an empty text or label is an error naming the
    row, as in a file: a DataFrame's row by its index label, a list's by its position (from 0).
    -> DataFrame [Text, Label (a string), Line]"""
    if isinstance(data, tuple):
        if len(data) != 2:
            raise DataError(f"{source}: expected (texts, labels), got a tuple of {len(data)}")
        texts, labels = (list(data[0]) if not isinstance(data[0], str) else [data[0]]), list(data[1])
        if len(texts) != len(labels):
            raise DataError(f"{source}: {len(texts)} texts but {len(labels)} labels")
        text_column, label_column = "text", "label"
        columns, rows = [text_column, label_column], zip(texts, labels)
        records = [(i + 1, {text_column: t, label_column: lab}) for i, (t, lab) in enumerate(rows)]
        row_name = lambda line: f"position {line - 1}"                       # noqa: E731
    elif hasattr(data, "columns") and hasattr(data, "to_dict"):
        columns = [str(c) for c in data.columns]
        records = [(i + 1, rec) for i, rec in enumerate(data.to_dict("records"))]
        index = list(data.index)
        row_name = lambda line: f"row with index {quote(_index_value(index[line - 1]))}"   # noqa: E731
    else:
        raise DataError(f"{source}: expected a DataFrame or (texts, labels), got {type(data).__name__}")
    records = [(i, {k: (None if is_missing_value(v) else v) for k, v in rec.items()}) for i, rec in records]
    return _frame(records, columns, text_column, label_column,
                  _BadRows(source, skip_bad_lines, "row", row_name), "its columns", "")


def _index_value(value):
    """A DataFrame index label as it is quoted in a message: 20, not np.int64(20)."""
    return value.item() if isinstance(value, np.generic) else value


def _frame(records, columns, text_column, label_column, bad, listing, dashes, id_column=None) -> pd.DataFrame:
    """The usable rows of [(line, record or the reason it is unusable)] as [Text, Label, Line]
    (and Id, the id_column's values)."""
    roles = {}                                   # column -> its role, the text's first
    for column, role in ((text_column, "text"), (label_column, "label"), (id_column, "id")):
        if column is not None:
            roles.setdefault(column, role)
    missing = [c for c in roles if c not in columns]
    if missing:
        which = f"{'an' if roles[missing[0]] == 'id' else 'a'} {roles[missing[0]]} column"
        flag = f"--{roles[missing[0]]}-column" if dashes else f"{roles[missing[0]]}_column="
        raise DataError(f"{bad.source}: no column {quote(missing[0])} ({which}; choose one with {flag}); "
                        f"{listing}: {', '.join(str(c)[:40] for c in columns[:20]) or '(none)'}"
                        + (f" and {len(columns) - 20} more" if len(columns) > 20 else ""))
    rows = []
    for line, rec in records:
        if isinstance(rec, str):                 # a reason: the row is unusable
            if line not in bad.dropped:
                bad.add(line, rec)
            continue
        text = rec.get(text_column)
        label = rec.get(label_column, "") if label_column is not None else ""
        if not isinstance(text, str) or not text.strip():
            bad.add(line, f"empty text in column {quote(text_column)}" if text in (None, "") or isinstance(text, str)
                    else f"text in column {quote(text_column)} is not a string ({type(text).__name__})")
            continue
        if label_column is not None and not _is_label_value(label):
            bad.add(line, f"label in column {quote(label_column)} is a {type(label).__name__}, "
                          "not a string or a number")
            continue
        label = _label_string(label)
        if label_column is not None and label is None:
            bad.add(line, f"missing label in column {quote(label_column)} (empty, NaN or None)")
            continue
        if id_column is not None and _id_problem(rec.get(id_column)):
            bad.add(line, f"{_id_problem(rec.get(id_column))} in column {quote(id_column)}")
            continue
        rows.append((text, label, line) + ((rec[id_column],) if id_column is not None else ()))
    if not rows:
        raise DataError(f"{bad.source}: no usable rows" + (f" ({bad.summary()})" if bad.skipped else ""))
    df = pd.DataFrame(rows, columns=["Text", "Label", "Line"] + (["Id"] if id_column is not None else []))
    if id_column is not None:
        _check_unique_ids(df, id_column, bad)
    df["Text"] = df["Text"].astype(object)
    df["Label"] = df["Label"].astype(object)
    df.attrs["skipped"] = list(bad.skipped)
    df.attrs["warning"] = bad.warning()
    df.attrs["source"] = str(bad.source)
    return df


def _id_problem(value) -> str:
    """Why a cell cannot be a row's id ("" when it can): missing, or not a string or a number."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return "missing id (empty, NaN or None)"
    if isinstance(value, bool) or not _is_label_value(value):
        return f"the id is a {type(value).__name__}, not a string or a number"
    return ""


def _check_unique_ids(df: pd.DataFrame, id_column, bad) -> None:
    """DataError naming the first id that two rows share, and the lines of both."""
    seen = df["Id"].duplicated(keep=False)
    if seen.any():
        twice = df[seen]
        first = twice[twice["Id"] == twice["Id"].iloc[0]]["Line"].tolist()
        raise DataError(f"{bad.source}: {bad.row_name(first[0])} and {bad.row_name(first[1])} have the same id "
                        f"{quote(_index_value(twice['Id'].iloc[0]))} in column {quote(id_column)} "
                        f"(--id-column must name each row once)")


class _BadRows:
    """Collects (or raises on) unusable rows of one source (a file, or data in memory)."""

    def __init__(self, source, skip, unit="line", row_name=None):
        self.source, self.skip, self.unit, self.skipped = source, skip, unit, []
        self.row_name = row_name or (lambda line: f"{unit} {line}")     # how a message names the row
        self.dropped = set()          # lines blanked for not being UTF-8 (already counted)

    def add(self, line, reason):
        what = self.row_name(line)
        if not self.skip:
            fix = "--skip-bad-lines" if self.unit == "line" or str(self.source).endswith(".parquet") else \
                "skip_bad_lines=True"
            raise DataError(f"{self.source}: {what}: {reason} ({fix} skips such rows)")
        self.skipped.append(f"{what}: {reason}")

    def summary(self):
        first = "; ".join(self.skipped[:3]) + ("; ..." if len(self.skipped) > 3 else "")
        return f"skipped {len(self.skipped)} bad row{'s' if len(self.skipped) > 1 else ''}: {first}"

    def warning(self):
        return f"warning: {self.source}: {self.summary()}" if self.skipped else ""


def _decode(path: Path, bad: _BadRows) -> str:
    """The file as text: UTF-8 (a byte-order mark dropped). A line that is not UTF-8 is an error,
    or, when skipping, becomes an empty line (so later line numbers stay right) and is counted."""
    raw = path.read_bytes()
    if raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        pass
    lines = raw.split(b"\n")
    for n, line in enumerate(lines, start=1):
        try:
            line.decode("utf-8")
        except UnicodeDecodeError as e:
            bad.add(n, f"not valid UTF-8 (byte {e.start} of the line)")
            bad.dropped.add(n)
            lines[n - 1] = b""
    return b"\n".join(lines).decode("utf-8")


def _delimited_records(text: str, ext: str, bad: _BadRows):
    """(header, [(line, {column: value} or reason)]) of a CSV (comma) or TSV (tab) file."""
    reader = csv.reader(io.StringIO(text, newline=""), delimiter="\t" if ext == ".tsv" else ",")
    header, records, start = None, [], 1
    try:
        for row in reader:
            line, start = start, reader.line_num + 1
            if header is None:
                if not row or not any(c.strip() for c in row):
                    continue                      # blank lines before the header
                header = [c.strip() for c in row]
                if len(set(header)) != len(header):
                    dup = next(c for c in header if header.count(c) > 1)
                    raise DataError(f"{bad.source}: line {line}: the header names column {quote(dup)} twice")
                continue
            if not row or not any(c.strip() for c in row):
                records.append((line, "blank line"))
            elif [c.strip() for c in row] == header:
                records.append((line, "a repeated header row"))
            elif len(row) != len(header):
                records.append((line, f"{len(row)} fields, the header has {len(header)}"))
            else:
                records.append((line, dict(zip(header, row))))
    except csv.Error as e:
        raise DataError(f"{bad.source}: line {reader.line_num}: not readable as "
                        f"{'TSV' if ext == '.tsv' else 'CSV'} ({e})") from None
    if header is None:
        raise DataError(f"{bad.source}: empty file (a header row naming the columns comes first)")
    return header, records


def _jsonl_records(text: str, bad: _BadRows):
    """(columns seen, [(line, object or reason)]) of a JSON Lines file."""
    columns, records = {}, []
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            records.append((n, "blank line"))
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            records.append((n, f"not JSON ({e.msg}, column {e.colno})"))
            continue
        except RecursionError:          # brackets nested past Python's recursion limit
            records.append((n, "JSON nested too deeply"))
            continue
        if not isinstance(obj, dict):
            records.append((n, f"a JSON {type(obj).__name__}, not an object"))
            continue
        columns.update(dict.fromkeys(obj))
        records.append((n, obj))
    return list(columns), records


def _parquet_records(path: Path):
    try:
        df = pd.read_parquet(path)
    except ImportError as e:
        raise DataError(f"{path}: reading Parquet needs pyarrow or fastparquet ({e})") from None
    except Exception as e:  # noqa: BLE001  (pandas raises engine-specific errors)
        raise DataError(f"{path}: not a readable Parquet file ({str(e).splitlines()[0]})") from None
    records = [(i + 1, {k: (None if is_missing_value(v) else v) for k, v in rec.items()})
               for i, rec in enumerate(df.to_dict("records"))]
    return [str(c) for c in df.columns], records


def is_missing_label(v) -> bool:
    """A label that names no class: missing, blank, or the text NaN or None (`_label_string`)."""
    return _is_label_value(v) and _label_string(v) is None


def is_missing_value(v) -> bool:
    """None, NaN, pandas' NA or NaT: a cell with no value."""
    try:
        return bool(pd.isna(v))
    except (TypeError, ValueError):
        return False


def _is_label_value(label) -> bool:
    """Whether a cell can be a label: None (missing), a string, an integer or a float (a list or
    a dict from JSONL or Parquet is not: its repr would become a class name)."""
    return label is None or isinstance(label, (str, int, float, np.integer, np.floating, np.bool_))


def _label_string(label):
    """A label as the class name it stands for: strings stripped, integers (1, 1.0, True: no)
    written in decimal; None for a missing label: blank, None, NaN, or the text NaN (any case) or
    None. (Texts are taken as they are: a text "NA" or "nan" is a text.)"""
    if label is None or isinstance(label, bool):
        return None if label is None else str(label)
    if isinstance(label, (int, np.integer)):
        return str(int(label))
    if isinstance(label, (float, np.floating)):
        if not np.isfinite(label):
            return None
        return str(int(label)) if float(label).is_integer() else str(label)
    s = str(label).strip()
    return None if not s or s.lower() == "nan" or s == "None" else s


# ----------------------------------------------------------------------------- classes


def class_names(train_labels, given=None) -> list:
    """The class names in id order: `given` (e.g. from --labels a,b,c) if set, else the distinct
    training labels sorted, numerically when every one is an integer ("2" before "10")."""
    if given:
        names = [str(s).strip() for s in given]
        if any(not s for s in names) or len(set(names)) != len(names):
            raise DataError(f"--labels must name each class once, got {quote(','.join(names))}")
        return names
    distinct = set(train_labels)
    if all(_INT.match(s) for s in distinct):
        return sorted(distinct, key=int)
    return sorted(distinct)


def label_ids(df: pd.DataFrame, names: list, where: str) -> np.ndarray:
    """Label id of every row [N] int64; DataError naming the first label not among `names`."""
    index = {s: i for i, s in enumerate(names)}
    ids = np.array([index.get(s, -1) for s in df["Label"]], dtype=np.int64)   # [N]
    if (ids < 0).any():
        i = int(np.flatnonzero(ids < 0)[0])
        raise DataError(f"{where}: line {df['Line'].iloc[i]}: label {quote(df['Label'].iloc[i])} is not one of "
                        f"the training data's classes ({', '.join(n[:40] for n in names[:20])}"
                        + (", ...)" if len(names) > 20 else ")"))
    return ids


# ----------------------------------------------------------------------------- splitting


def parse_split(value) -> tuple:
    """'0.7,0.1' -> (0.7, 0.1): the train and validation fractions, the rest is test."""
    if isinstance(value, str):
        try:
            parts = tuple(float(x) for x in value.split(","))
        except ValueError:
            parts = ()
    else:
        parts = tuple(float(x) for x in value)
    if len(parts) != 2 or parts[0] <= 0 or parts[1] < 0 or parts[0] + parts[1] > 1:
        raise DataError(f"--split must be two fractions TRAIN,VALIDATION with TRAIN > 0 and a sum "
                        f"of at most 1 (the rest is test), got {value!r}")
    return parts


def undersample(df: pd.DataFrame, seed: int) -> pd.DataFrame:
    """Every class cut to the count of the smallest, by pandas' seeded `sample`, in file order."""
    smallest = int(df["Label"].value_counts().min())
    parts = [g.sample(smallest, random_state=seed) if len(g) > smallest else g
             for _, g in df.groupby("Label", sort=True)]
    return pd.concat(parts).sort_index()


def stratified_split(df: pd.DataFrame, fractions, seed: int) -> list:
    """Split df into len(fractions) frames (fractions sum to 1) class by class.

    Each class's rows are shuffled (numpy's generator seeded by `seed`) and cut at
    round(n_c * cumulative fraction), so every part holds each class within one example of its
    exact share. Each part is then shuffled again, so classes are interleaved."""
    rng = np.random.default_rng(seed)
    bounds = np.cumsum(fractions)
    parts = [[] for _ in fractions]
    for _, g in df.groupby("Label", sort=True):
        idx = g.index.to_numpy()[rng.permutation(len(g))]
        cuts = [0] + [int(round(len(g) * b)) for b in bounds[:-1]] + [len(g)]
        for k in range(len(fractions)):
            parts[k].append(idx[cuts[k]:cuts[k + 1]])
    out = []
    for chunks in parts:
        idx = np.concatenate(chunks)
        out.append(df.loc[idx[rng.permutation(len(idx))]].reset_index(drop=True))
    return out


def prepare_user_splits(data, validation=None, test=None, *, text_column="text", label_column="label",
                        labels=None, split=(0.7, 0.1), balance="none", seed=123, skip_bad_lines=False,
                        out_dir=None):
    """(train, validation, test) DataFrames [Label id, Text, Line, Name] and the class names.

    data: the training file, or texts and labels in memory (a DataFrame, or (texts, labels):
    `read_frame`). validation / test: given explicitly, likewise; a split not given is cut off the
    training data (stratified, `split` = train and validation fractions, rescaled when only one
    is missing). balance "undersample" cuts each class of the training data to the smallest
    first. out_dir: where train/validation/test.csv are written (the run folder).
    Each frame's attrs["warning"] joins the skipped-rows warnings of the sources read."""
    if balance not in ("none", "undersample"):
        raise DataError(f"--balance must be none or undersample, got {balance!r}")
    opts = dict(text_column=text_column, label_column=label_column, skip_bad_lines=skip_bad_lines)
    source = _read(data, "training", opts)
    warnings = [source.attrs["warning"]]
    names = class_names(source["Label"], labels)
    label_ids(source, names, source.attrs["source"])          # every training label is a class
    if len(set(source["Label"])) < 2:
        raise DataError(f"{source.attrs['source']}: only one class ({quote(source['Label'].iloc[0])}); "
                        "a classifier needs at least two")
    if balance == "undersample":
        source = undersample(source, seed)
    given = {}
    for name, where in (("validation", validation), ("test", test)):
        if where is not None:
            given[name] = _read(where, name, opts)
            warnings.append(given[name].attrs["warning"])
            label_ids(given[name], names, given[name].attrs["source"])
    parts = _cut(source, given, split, seed)
    splits = []
    for name in ("train", "validation", "test"):
        df = parts[name]
        if len(df) == 0:
            raise DataError(f"{source.attrs['source']}: the {name} split is empty ({len(source)} rows; give more "
                            f"data, another --split, or --{name} FILE)")
        out = pd.DataFrame({"Label": label_ids(df, names, name), "Text": df["Text"].to_numpy(object),
                            "Line": df["Line"].to_numpy(np.int64), "Name": df["Label"].to_numpy(object)})
        out.attrs["warning"] = "\n".join(w for w in warnings if w)
        out.attrs["skipped"] = []
        splits.append(out)
    if out_dir is not None:
        write_splits(splits, out_dir)
    return tuple(splits), names


def _read(where, name, opts) -> pd.DataFrame:
    """A table file (a path), or texts and labels in memory."""
    if isinstance(where, (str, os.PathLike)):
        return read_table(where, **opts)
    return read_frame(where, source=f"the {name} data", **opts)


def _cut(source, given: dict, split, seed) -> dict:
    """The splits not given, cut off source (stratified), beside the given ones: name -> frame."""
    f_train, f_val = parse_split(split)
    f_test = 1.0 - f_train - f_val
    wanted = [("train", f_train)] + [(n, f) for n, f in (("validation", f_val), ("test", f_test)) if n not in given]
    total = sum(f for _, f in wanted)
    fractions = [f / total for _, f in wanted]
    cut = stratified_split(source, fractions, seed) if len(wanted) > 1 else [source.reset_index(drop=True)]
    parts = dict(zip([n for n, _ in wanted], cut))
    parts.update(given)
    return parts


def write_splits(splits, out_dir) -> None:
    """The three splits as train.csv, validation.csv, test.csv in out_dir (the run folder)."""
    from .data import write_split_csv
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, df in zip(SPLIT_FILES, splits):
        write_split_csv(df, out_dir / SPLIT_FILES[name])


def read_user_splits(run_dir, names) -> tuple:
    """The three split CSVs a run wrote (prepare_user_splits) -> (train, validation, test)."""
    out = []
    for name, file in SPLIT_FILES.items():
        path = Path(run_dir) / file
        try:
            df = pd.read_csv(path, keep_default_na=False, dtype={"Text": str, "Name": str}, encoding="utf-8")
        except FileNotFoundError:
            raise DataError(f"{path}: no such file (the run's {name} split)") from None
        df["Label"] = label_ids(df.rename(columns={"Label": "Id", "Name": "Label"}), names, str(path))
        df.attrs["warning"], df.attrs["skipped"] = "", []
        out.append(df)
    return tuple(out)
