"""The SMS Spam Collection: fetch, parse, balance, split, as the reference does.

(A user's own tables are read and split by `npgpt.tabular`; both are then tokenized and batched
by `npgpt.dataset`.)

The pipeline, one function a step:

    download_sms_spam / extract_sms_spam   UCI zip -> data/SMSSpamCollection
    read_sms_spam                          file -> DataFrame [Label "ham"/"spam", Text, Line]
                                           (parse="pandas", the reference's read, or "strict")
    balance_and_split                      undersample ham, shuffle, 70/10/20 -> 3 DataFrames
    prepare_splits                         all of the above, writing/reusing train/validation/test.csv

`Line` is the 1-based line number where a message starts in SMSSpamCollection. The corpus has
duplicate messages (5574 lines, 5171 distinct), so Line, not Text, identifies a row.

Two parses of the file:
- "pandas" (the default): exactly the reference's `pd.read_csv(path, sep="\t", header=None,
  names=["Label", "Text"])`. Its C parser treats a `"` that opens a field as a quote: UCI's line
  5082 opens such a quote that closes only on line 5084, so lines 5082-5084 become one message
  (the quotes removed, the two newlines kept) and the file gives 5572 messages, 4825 ham. This is
  the parse the reference's splits, and so its published accuracies, come from.
- "strict": one message a line, the text verbatim after the first tab (5574 messages, 4827 ham),
  every bad line reported by its number. For a file whose quotes are not CSV quoting (an SMS may
  well begin with `"`), this is the faithful reading.
"""
from __future__ import annotations

import contextlib
import csv
import json
import os
import zipfile
import zlib
from pathlib import Path

import pandas as pd

from . import userpaths
from .dataset import SEED
from .errors import DataError, FormatError, quote
from .fileio import atomic_write, replace_durably, temp_path, write_bytes

LABELS = ("ham", "spam")             # label id 0, 1
SPLITS = ("train", "validation", "test")
SPLITS_RECIPE = "splits.json"       # beside the CSVs: the parse and seed they were made with
DATA_FILE = "SMSSpamCollection"
DATA_SHA256 = "7d039a24a6083ed9ef0f806ebad56bbb976e3aeb8de05669173bfdc4996c239d"  # UCI's file
UCI_URL = "https://archive.ics.uci.edu/static/public/228/sms+spam+collection.zip"
MIRROR_URL = "https://f001.backblazeb2.com/file/LLMs-from-scratch/sms%2Bspam%2Bcollection.zip"
HEADER_WORDS = ("label", "labels", "class", "category", "target", "type")


# ---------------------------------------------------------------------------------------------
# Fetching


def source_urls() -> list[str]:
    """UCI first, then the mirror (NPGPT_DATA_MIRROR if set, else the book's copy of the zip)."""
    return [UCI_URL, os.environ.get("NPGPT_DATA_MIRROR") or MIRROR_URL]


def download_sms_spam(data_dir=None, urls=None, progress=True) -> Path:
    """Download the UCI zip into `data_dir` (default: `npgpt.userpaths.data_dir()`, found from any
    folder) and extract SMSSpamCollection; return its path.

    A SMSSpamCollection already in `data_dir` is used as it is. The zip is deleted afterwards.
    """
    from .download import download_file

    data_dir = Path(data_dir or userpaths.data_dir())
    target = data_dir / DATA_FILE
    if target.is_file():
        return target
    made = not data_dir.exists()
    data_dir.mkdir(parents=True, exist_ok=True)
    zip_path = data_dir / "sms_spam_collection.zip"
    urls = [urls] if isinstance(urls, str) else list(urls or source_urls())
    try:
        download_file(urls, zip_path, expected_size=None, progress=progress,
                      hint=f"download {UCI_URL} by other means and pass its path, "
                           f"or put the {DATA_FILE} file in {data_dir}")
    except BaseException:
        if made:                        # a failed download leaves no empty data folder behind
            with contextlib.suppress(OSError):
                data_dir.rmdir()
        raise
    try:
        return extract_sms_spam(zip_path, data_dir)
    finally:
        zip_path.unlink(missing_ok=True)


MAX_MEMBER_BYTES = 64 << 20     # UCI's SMSSpamCollection is 0.5 MB: a zip member past this is not it


def extract_sms_spam(zip_path, out_dir) -> Path:
    """Write the zip's SMSSpamCollection (and its readme) into `out_dir`; return the data file.

    UCI's zip holds the two files either at its top level or inside a second zip,
    `smsspamcollection.zip`; both layouts work. See `_extract` for the limits."""
    return _extract(zip_path, out_dir)[0]


def _extract(zip_path, out_dir):
    """`extract_sms_spam`, returning also the files it created: -> (data file, [new files]).

    A zip may come from anyone: each member is streamed (never read whole) to a temporary file
    beside its target, at most MAX_MEMBER_BYTES, then moved into place. An existing file is never
    written over: one with the same bytes stays as it is, a data file that differs is an error (a
    readme that differs is kept, the zip's dropped). A failed extraction leaves nothing behind."""
    zip_path, out_dir = Path(zip_path), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    found = {}                                              # name -> temporary file
    try:
        try:
            with zipfile.ZipFile(zip_path) as zf:
                _find_members(zf, {DATA_FILE, "readme"}, out_dir, found, depth=1, source=zip_path)
        except (zipfile.BadZipFile, zipfile.LargeZipFile, zlib.error, EOFError) as e:
            raise FormatError(f"{zip_path}: not a readable zip file ({e})") from None
        if DATA_FILE not in found:
            raise FormatError(f"{zip_path}: no {DATA_FILE} inside (nor inside a zip within it)")
        return out_dir / DATA_FILE, _install(found, out_dir, zip_path)
    finally:
        for tmp in found.values():
            tmp.unlink(missing_ok=True)


def _install(found: dict, out_dir: Path, zip_path) -> list:
    """Move the extracted temporary files into place, never over a file. -> the files created"""
    target = out_dir / DATA_FILE
    if target.exists() and not _same_bytes(found[DATA_FILE], target):
        raise FormatError(f"{zip_path}: its {DATA_FILE} differs from the {target} already there, which "
                          f"is left as it is: move that file away, or give it with --data")
    created = []
    for name, tmp in found.items():
        if not (out_dir / name).exists():
            replace_durably(tmp, out_dir / name)
            created.append(out_dir / name)
    return created


def _same_bytes(a: Path, b: Path) -> bool:
    import filecmp
    return b.is_file() and filecmp.cmp(a, b, shallow=False)


def _find_members(zf: zipfile.ZipFile, names: set, folder: Path, found: dict, depth: int, source) -> None:
    """Stream the members named in `names` to temporary files in `folder` (found: {basename: path}),
    looking `depth` zips deep."""
    for info in zf.infolist():
        base = info.filename.rsplit("/", 1)[-1]
        if base in names and base not in found:
            found[base] = _copy_member(zf, info, folder, base, source)
    if DATA_FILE not in found and depth > 0:
        for info in zf.infolist():
            if info.filename.lower().endswith(".zip"):
                inner = _copy_member(zf, info, folder, "inner.zip", source)
                try:
                    with zipfile.ZipFile(inner) as izf:
                        _find_members(izf, names, folder, found, depth - 1, source)
                finally:
                    inner.unlink(missing_ok=True)
                if DATA_FILE in found:
                    break


def _copy_member(zf: zipfile.ZipFile, info, folder: Path, name: str, source) -> Path:
    """One member streamed to a temporary file in folder, at most MAX_MEMBER_BYTES (the size it
    declares and the bytes it inflates to both count). -> the temporary file"""
    too_big = FormatError(f"{source}: member {quote(info.filename)} is larger than "
                          f"{MAX_MEMBER_BYTES >> 20} MiB: not the SMS Spam Collection")
    if info.file_size > MAX_MEMBER_BYTES:
        raise too_big
    tmp = Path(temp_path(folder, name))
    try:
        written = 0
        with zf.open(info) as src, open(tmp, "wb") as dst:
            while chunk := src.read(1 << 20):
                written += len(chunk)
                if written > MAX_MEMBER_BYTES:
                    raise too_big
                dst.write(chunk)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


# ---------------------------------------------------------------------------------------------
# Parsing


def split_lines(raw: bytes) -> list:
    """The lines of a file's bytes: a UTF-8 byte-order mark (some editors add one) is dropped, and
    the newline that ends the file does not start another line. ("\r" endings stay on the lines.)"""
    if raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
    lines = raw.split(b"\n")
    if lines[-1] == b"":
        lines.pop()
    return lines


PARSES = ("pandas", "strict")


def read_sms_spam(path, skip_bad_lines=False, parse="pandas") -> pd.DataFrame:
    """Read SMSSpamCollection (`label<TAB>text`, label ham or spam) as `parse` says.

    parse="pandas" (default): the reference's read_csv, see `read_sms_spam_pandas`.
    parse="strict": one message a line, see below.

    Returns a DataFrame with columns Label ("ham"/"spam"), Text, Line (1-based line number).
    The text after the first tab is kept verbatim, further tabs included; only a trailing "\\r"
    is stripped. Nothing is unquoted: UCI's file gives 5574 messages, 4827 ham and 747 spam.
    (pandas' read_csv with its default quoting, as the reference book uses, treats a `"` that
    opens a field as a quote, merges lines and sees 5572 messages, 4825 ham.)

    A line without a tab, with an unknown label, blank, empty after the tab, not UTF-8, or a
    header line ("label<TAB>text") raises DataError naming the line. With skip_bad_lines=True
    such lines are left out instead: `df.attrs["skipped"]` lists them ("line 7: no tab ...")
    and `df.attrs["warning"]` is a one-line summary to print ("" when nothing was skipped).
    """
    if parse not in PARSES:
        raise DataError(f"unknown parse {parse!r} (expected one of {', '.join(PARSES)})")
    path = Path(path)
    if parse == "pandas":
        return read_sms_spam_pandas(path, skip_bad_lines)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    lines = split_lines(raw)
    rows, skipped = [], []
    for n, line in enumerate(lines, start=1):
        row = _parse_line(line)
        if isinstance(row, str):
            if not skip_bad_lines:
                raise DataError(f"{path}: line {n}: {row} (--skip-bad-lines skips such lines)")
            skipped.append(f"line {n}: {row}")
        else:
            rows.append((*row, n))
    if not rows:
        raise DataError(f"{path}: no messages")
    df = pd.DataFrame(rows, columns=["Label", "Text", "Line"])
    df.attrs["skipped"] = skipped
    df.attrs["warning"] = skipped_warning(path, skipped)
    return df


def read_sms_spam_pandas(path, skip_bad_lines=False) -> pd.DataFrame:
    """The reference's read: `pd.read_csv(path, sep="\t", header=None, names=["Label", "Text"])`.

    Columns Label, Text, Line as `read_sms_spam`. pandas' C parser treats a field that opens with
    `"` as quoted: the quotes go and the field runs to the closing quote, across newlines. Line is
    where a row starts: 1 + the lines every earlier row spans (each embedded newline one more;
    the parser skips blank lines, so rows are counted from the raw bytes only when there are none).
    A row with a label other than ham/spam, or no text, raises DataError naming its line (or is
    skipped with skip_bad_lines, as in the strict parse).
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise DataError(f"{path}: line {line}: not valid UTF-8 (byte {e.start}); "
                        "--parse strict can skip such lines with --skip-bad-lines") from None
    try:
        df = pd.read_csv(path, sep="\t", header=None, names=["Label", "Text"])
    except (pd.errors.ParserError, pd.errors.EmptyDataError, ValueError) as e:
        raise DataError(f"{path}: pandas cannot read it ({str(e).splitlines()[0]}); "
                        "try --parse strict") from None
    labels = df["Label"].astype(object).tolist()
    texts = df["Text"].astype(object).tolist()
    rows, skipped, line = [], [], 1
    for label, text in zip(labels, texts):
        label = label if isinstance(label, str) else ""
        reason = None
        if label.strip().lower() in HEADER_WORDS:
            reason = f"a header line ({quote(label)}); the file must have none"
        elif label not in LABELS:
            reason = f"unknown label {quote(label)} (expected ham or spam)"
        elif not isinstance(text, str) or not text:
            reason = "empty message"
        if reason is None:
            rows.append((label, text, line))
        elif skip_bad_lines:
            skipped.append(f"line {line}: {reason}")
        else:
            raise DataError(f"{path}: line {line}: {reason} (--skip-bad-lines skips such lines)")
        line += 1 + label.count("\n") + (text.count("\n") if isinstance(text, str) else 0)
    if not rows:
        raise DataError(f"{path}: no messages")
    out = pd.DataFrame(rows, columns=["Label", "Text", "Line"])
    out["Label"] = out["Label"].astype(object)
    out["Text"] = out["Text"].astype(object)
    out.attrs["skipped"] = skipped
    out.attrs["warning"] = skipped_warning(path, skipped)
    return out


def _parse_line(line: bytes):
    """(label, text), or the reason the line is unusable as a string."""
    if line.endswith(b"\r"):
        line = line[:-1]
    try:
        s = line.decode("utf-8")
    except UnicodeDecodeError as e:
        return f"not valid UTF-8 (byte {e.start})"
    if not s.strip():
        return "blank line"
    if "\t" not in s:
        return "no tab between label and text"
    label, text = s.split("\t", 1)
    if label.strip().lower() in HEADER_WORDS:
        return f"a header line ({quote(label)}); the file must have none"
    if label not in LABELS:
        return f"unknown label {quote(label)} (expected ham or spam)"
    if not text:
        return "empty message"
    return label, text


def skipped_warning(path, skipped: list) -> str:
    """One line for the CLI: how many lines were skipped and the first few reasons."""
    if not skipped:
        return ""
    first = "; ".join(skipped[:3]) + ("; ..." if len(skipped) > 3 else "")
    return f"warning: {path}: skipped {len(skipped)} bad line{'s' if len(skipped) > 1 else ''} ({first})"


# ---------------------------------------------------------------------------------------------
# Balancing and splitting


def balance_and_split(df: pd.DataFrame, seed=SEED, train_frac=0.7, validation_frac=0.1, undersample=True):
    """Undersample ham to the spam count, shuffle, split 70/10/20, as the reference book does.

    Label becomes 0 (ham) / 1 (spam). From UCI's file: 747 + 747 = 1494 -> 1045 / 149 / 300.
    undersample=False keeps every message (`--balance none`, with `--class-weight` to weigh the
    rare class up): 5572 -> 3900 / 557 / 1115, shuffled and split the same way.
    Returns (train, validation, test) DataFrames with columns Label, Text, Line.
    """
    num_spam = int((df["Label"] == "spam").sum())
    num_ham = int((df["Label"] == "ham").sum())
    if num_spam == 0 or num_ham < num_spam:
        raise DataError(f"cannot balance {num_ham} ham and {num_spam} spam messages "
                        "(need at least one spam and as many ham as spam)")
    ham = df[df["Label"] == "ham"]
    ham_subset = ham.sample(num_spam, random_state=seed) if undersample else ham
    balanced = pd.concat([ham_subset, df[df["Label"] == "spam"]])
    balanced["Label"] = balanced["Label"].map({"ham": 0, "spam": 1})
    df = balanced.sample(frac=1, random_state=seed).reset_index(drop=True)
    train_end = int(len(df) * train_frac)
    validation_end = train_end + int(len(df) * validation_frac)
    splits = df[:train_end], df[train_end:validation_end], df[validation_end:]
    if min(len(s) for s in splits) == 0:
        sizes = " / ".join(str(len(s)) for s in splits)
        raise DataError(f"too few messages to split: {len(df)} balanced -> {sizes} (train / validation / test)")
    return tuple(s.reset_index(drop=True) for s in splits)


def prepare_splits(data_path=None, out_dir=None, skip_bad_lines=False, seed=SEED,
                   rebuild=False, urls=None, progress=True, parse="pandas", balance="undersample"):
    """The (train, validation, test) DataFrames, with train.csv, validation.csv, test.csv in out_dir.

    data_path None: the three CSVs in `out_dir` are reused when all are there and `splits.json`
    says they were made with this parse, seed and balance; else they are built from
    `out_dir/SMSSpamCollection`, downloaded first if missing. data_path given (the
    SMSSpamCollection file or UCI's zip): the CSVs are always rebuilt from it, as with rebuild.
    parse: "pandas" (the reference's read, and so its exact splits) or "strict" (`read_sms_spam`).
    balance: "undersample" (the reference) or "none" (every message).
    Each returned frame carries the parse's `attrs["skipped"]` and `attrs["warning"]`
    (empty when the CSVs were reused). Runs sharing out_dir may call this at the same time: each
    writes through its own temporary files and renames them into place.
    """
    out_dir = Path(out_dir or userpaths.data_dir())
    csvs = [out_dir / f"{name}.csv" for name in SPLITS]
    recipe = {"parse": parse, "seed": int(seed), "balance": balance}
    if (data_path is None and not rebuild and all(p.is_file() for p in csvs)
            and _read_recipe(out_dir) == recipe):
        return tuple(_tag(read_split_csv(p), []) for p in csvs)
    created = []                        # files extracted from a zip now: removed if it is unusable
    if data_path is None:
        data_path = out_dir / DATA_FILE
        if not data_path.is_file():
            data_path = download_sms_spam(out_dir, urls=urls, progress=progress)
    elif zipfile.is_zipfile(data_path):
        data_path, created = _extract(data_path, out_dir)
    try:
        messages = read_sms_spam(data_path, skip_bad_lines=skip_bad_lines, parse=parse)
        splits = balance_and_split(messages, seed=seed, undersample=balance != "none")
    except BaseException:
        for p in created:
            p.unlink(missing_ok=True)
        raise
    out_dir.mkdir(parents=True, exist_ok=True)
    for split, p in zip(splits, csvs):
        write_split_csv(split, p)
    write_bytes(out_dir / SPLITS_RECIPE, json.dumps(recipe).encode())
    return tuple(_tag(s, messages.attrs["skipped"], messages.attrs["warning"]) for s in splits)


def _read_recipe(out_dir: Path):
    """How the CSVs in out_dir were made ({"parse", "seed", "balance"}), or None (made before the record
    was kept, or unreadable: they are rebuilt)."""
    try:
        return json.loads((out_dir / SPLITS_RECIPE).read_text())
    except (OSError, ValueError, RecursionError):
        return None


def write_split_csv(df: pd.DataFrame, path) -> None:
    """Write a split atomically, every text quoted (a bare "\r" inside a text would otherwise
    end the CSV row)."""
    with atomic_write(path) as tmp:
        df.to_csv(tmp, index=False, encoding="utf-8", quoting=csv.QUOTE_NONNUMERIC)


def _tag(df, skipped, warning=""):
    df.attrs["skipped"] = list(skipped)
    df.attrs["warning"] = warning
    return df


def read_split_csv(path) -> pd.DataFrame:
    """A split written by prepare_splits: columns Label (0/1), Text and, if present, Line.

    Texts come back exactly as written: no NA parsing ("NA", "null", "" stay strings).
    """
    path = Path(path)
    try:
        df = pd.read_csv(path, keep_default_na=False, dtype={"Text": str}, encoding="utf-8")
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, ValueError) as e:
        raise FormatError(f"{path}: not a readable split CSV ({str(e).splitlines()[0]})") from None
    if len(df) == 0:
        raise FormatError(f"{path}: no rows")
    missing = {"Label", "Text"} - set(df.columns)
    if missing:
        raise FormatError(f"{path}: missing column(s) {', '.join(sorted(missing))}")
    if not df["Label"].isin([0, 1]).all() or df["Label"].dtype.kind not in "iu":
        raise FormatError(f"{path}: Label must be 0 (ham) or 1 (spam) on every row")
    if "Line" in df.columns and df["Line"].dtype.kind not in "iu":
        raise FormatError(f"{path}: Line must be an integer on every row")
    return df


if __name__ == "__main__":          # a library module: say where its commands are
    import sys
    print("npgpt.data is a library module (the SMS Spam Collection: fetch, parse, split).\n"
          "Its work is done by: python -m npgpt.train --data FILE [--data-dir DIR]  and  "
          "python -m npgpt.evaluate --data FILE (see --help of each).", file=sys.stderr)
    sys.exit(2)
