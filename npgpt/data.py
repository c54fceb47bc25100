"""The SMS Spam Collection: fetch, parse, balance, split, tokenize, batch.

The pipeline, one function a step:

    download_sms_spam / extract_sms_spam   UCI zip -> data/SMSSpamCollection
    read_sms_spam                          file -> DataFrame [Label "ham"/"spam", Text, Line]
    balance_and_split                      undersample ham, shuffle, 70/10/20 -> 3 DataFrames
    prepare_splits                         all of the above, writing/reusing train/validation/test.csv
    make_datasets                          DataFrames -> SpamDataset (token ids, lengths, labels)
    train_batches / eval_batches           index arrays per batch
    make_batch                             ids [B,T] right-padded with 50256, lengths [B]

`Line` is the 1-based line number of a message in SMSSpamCollection. The corpus has duplicate
messages (5574 lines, 5171 distinct), so Line, not Text, identifies a row.
"""
from __future__ import annotations

import csv
import io
import os
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from .errors import DataError, FormatError
from .tokenizer import PAD_ID, encode

LABELS = ("ham", "spam")             # label id 0, 1
SPLITS = ("train", "validation", "test")
DATA_FILE = "SMSSpamCollection"
DATA_SHA256 = "7d039a24a6083ed9ef0f806ebad56bbb976e3aeb8de05669173bfdc4996c239d"  # UCI's file
UCI_URL = "https://archive.ics.uci.edu/static/public/228/sms+spam+collection.zip"
MIRROR_URL = "https://f001.backblazeb2.com/file/LLMs-from-scratch/sms%2Bspam%2Bcollection.zip"
DEFAULT_DATA_DIR = "data"            # under the current directory
SEED = 123
HEADER_WORDS = ("label", "labels", "class", "category", "target", "type")


# ---------------------------------------------------------------------------------------------
# Fetching


def source_urls() -> list[str]:
    """UCI first, then the mirror (NPGPT_DATA_MIRROR if set, else the book's copy of the zip)."""
    return [UCI_URL, os.environ.get("NPGPT_DATA_MIRROR") or MIRROR_URL]


def download_sms_spam(data_dir=DEFAULT_DATA_DIR, urls=None, progress=True) -> Path:
    """Download the UCI zip into `data_dir` and extract SMSSpamCollection; return its path.

    A SMSSpamCollection already in `data_dir` is used as it is. The zip is deleted afterwards.
    """
    from .download import download_file

    data_dir = Path(data_dir)
    target = data_dir / DATA_FILE
    if target.is_file():
        return target
    data_dir.mkdir(parents=True, exist_ok=True)
    zip_path = data_dir / "sms_spam_collection.zip"
    urls = [urls] if isinstance(urls, str) else list(urls or source_urls())
    download_file(urls, zip_path, expected_size=None, progress=progress,
                  hint=f"download {UCI_URL} by other means and pass its path, "
                       f"or put the {DATA_FILE} file in {data_dir}")
    try:
        return extract_sms_spam(zip_path, data_dir)
    finally:
        zip_path.unlink(missing_ok=True)


def extract_sms_spam(zip_path, out_dir) -> Path:
    """Write the zip's SMSSpamCollection (and its readme) into `out_dir`; return the data file.

    UCI's zip holds the two files either at its top level or inside a second zip,
    `smsspamcollection.zip`; both layouts work.
    """
    zip_path, out_dir = Path(zip_path), Path(out_dir)
    try:
        with zipfile.ZipFile(zip_path) as zf:
            found = _find_members(zf, {DATA_FILE, "readme"}, depth=1)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, zlib.error) as e:
        raise FormatError(f"{zip_path}: not a readable zip file ({e})") from None
    if DATA_FILE not in found:
        raise FormatError(f"{zip_path}: no {DATA_FILE} inside (nor inside a zip within it)")
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, data in found.items():
        _write_atomic(out_dir / name, data)
    return out_dir / DATA_FILE


def _find_members(zf: zipfile.ZipFile, names: set, depth: int) -> dict:
    """{basename: bytes} for members named in `names`, looking `depth` zips deep."""
    found = {}
    for info in zf.infolist():
        base = info.filename.rsplit("/", 1)[-1]
        if base in names and base not in found:
            found[base] = zf.read(info)
    if DATA_FILE not in found and depth > 0:
        for info in zf.infolist():
            if info.filename.lower().endswith(".zip"):
                with zipfile.ZipFile(io.BytesIO(zf.read(info))) as inner:
                    found.update(_find_members(inner, names, depth - 1))
                if DATA_FILE in found:
                    break
    return found


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".part")
    tmp.write_bytes(data)
    os.replace(tmp, path)


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


def read_sms_spam(path, skip_bad_lines=False) -> pd.DataFrame:
    """Parse SMSSpamCollection: one message a line, `label<TAB>text`, label ham or spam.

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
    path = Path(path)
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
                raise DataError(f"{path}: line {n}: {row}")
            skipped.append(f"line {n}: {row}")
        else:
            rows.append((*row, n))
    if not rows:
        raise DataError(f"{path}: no messages")
    df = pd.DataFrame(rows, columns=["Label", "Text", "Line"])
    df.attrs["skipped"] = skipped
    df.attrs["warning"] = skipped_warning(path, skipped)
    return df


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
        return f"a header line ({label!r}); the file must have none"
    if label not in LABELS:
        return f"unknown label {label!r} (expected ham or spam)"
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


def balance_and_split(df: pd.DataFrame, seed=SEED, train_frac=0.7, validation_frac=0.1):
    """Undersample ham to the spam count, shuffle, split 70/10/20, as the reference book does.

    Label becomes 0 (ham) / 1 (spam). From UCI's file: 747 + 747 = 1494 -> 1045 / 149 / 300.
    Returns (train, validation, test) DataFrames with columns Label, Text, Line.
    """
    num_spam = int((df["Label"] == "spam").sum())
    num_ham = int((df["Label"] == "ham").sum())
    if num_spam == 0 or num_ham < num_spam:
        raise DataError(f"cannot balance {num_ham} ham and {num_spam} spam messages "
                        "(need at least one spam and as many ham as spam)")
    ham_subset = df[df["Label"] == "ham"].sample(num_spam, random_state=seed)
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


def prepare_splits(data_path=None, out_dir=DEFAULT_DATA_DIR, skip_bad_lines=False, seed=SEED,
                   rebuild=False, urls=None, progress=True):
    """The (train, validation, test) DataFrames, with train.csv, validation.csv, test.csv in out_dir.

    data_path None: the three CSVs in `out_dir` are reused when all are there; else they are
    built from `out_dir/SMSSpamCollection`, downloaded first if missing. data_path given (the
    SMSSpamCollection file or UCI's zip): the CSVs are always rebuilt from it, as with rebuild.
    Each returned frame carries the parse's `attrs["skipped"]` and `attrs["warning"]`
    (empty when the CSVs were reused).
    """
    out_dir = Path(out_dir)
    csvs = [out_dir / f"{name}.csv" for name in SPLITS]
    if data_path is None and not rebuild and all(p.is_file() for p in csvs):
        return tuple(_tag(read_split_csv(p), []) for p in csvs)
    if data_path is None:
        data_path = out_dir / DATA_FILE
        if not data_path.is_file():
            data_path = download_sms_spam(out_dir, urls=urls, progress=progress)
    elif zipfile.is_zipfile(data_path):
        data_path = extract_sms_spam(data_path, out_dir)
    messages = read_sms_spam(data_path, skip_bad_lines=skip_bad_lines)
    splits = balance_and_split(messages, seed=seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    for split, p in zip(splits, csvs):
        tmp = p.with_name(p.name + ".part")
        # Every text quoted: a bare "\r" inside a message would otherwise end the CSV row.
        split.to_csv(tmp, index=False, encoding="utf-8", quoting=csv.QUOTE_NONNUMERIC)
        os.replace(tmp, p)
    return tuple(_tag(s, messages.attrs["skipped"], messages.attrs["warning"]) for s in splits)


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


# ---------------------------------------------------------------------------------------------
# Tokenizing and batching


@dataclass
class SpamDataset:
    """One split, tokenized. Row i: tokens[i] (unpadded ids), lengths[i], labels[i]."""
    tokens: list          # N lists of token ids, each already cut to the length limit
    lengths: np.ndarray   # [N] int64, len(tokens[i])
    labels: np.ndarray    # [N] int64, 0 ham / 1 spam
    lines: np.ndarray     # [N] int64, line in SMSSpamCollection (-1 if unknown)
    pad_to: int | None    # batches are padded to this length; None: to each batch's longest

    def __len__(self) -> int:
        return len(self.tokens)

    def batch(self, indices):
        """ids [B,T] int64, lengths [B] int64, labels [B] int64 for the given rows."""
        ids, lengths = make_batch(self.tokens, indices, self.pad_to)
        return ids, lengths, self.labels[np.asarray(indices)]


def pad_length(train_tokens, padding="longest", context_length=1024):
    """The length every batch is padded to, or None to pad each batch to its own longest row.

    padding: "longest" (the longest training example, cut to context_length: the reference's 120),
    an int (a fixed length), or "batch".
    """
    if padding == "longest":
        return min(max(len(t) for t in train_tokens), context_length)
    if padding == "batch":
        return None
    if isinstance(padding, (int, np.integer)) and not isinstance(padding, bool):
        if not 1 <= padding <= context_length:
            raise DataError(f"pad length {padding} is outside 1..{context_length} (the context length)")
        return int(padding)
    raise DataError(f"padding must be 'longest', 'batch' or a length, got {padding!r}")


def make_datasets(splits, tok, padding="longest", context_length=1024):
    """Tokenize each DataFrame of `splits` (the first is the training set) into a SpamDataset.

    Every split is cut to the same limit: the pad length, or context_length with "batch"
    padding. So with "longest", validation and test messages longer than the longest training
    message are truncated to it, as in the reference.
    """
    encoded = [[encode(tok, text) for text in df["Text"]] for df in splits]
    pad_to = pad_length(encoded[0], padding, context_length)
    limit = pad_to if pad_to is not None else context_length
    datasets = []
    for df, token_lists in zip(splits, encoded):
        lines = df["Line"].to_numpy(np.int64) if "Line" in df.columns else np.full(len(df), -1, np.int64)
        for i, ids in enumerate(token_lists):
            if not ids:
                raise DataError(f"message {i} (line {lines[i]}) has no tokens")
        tokens = [ids[:limit] for ids in token_lists]
        datasets.append(SpamDataset(
            tokens=tokens,
            lengths=np.array([len(t) for t in tokens], dtype=np.int64),  # [N]
            labels=df["Label"].to_numpy(np.int64),                        # [N]
            lines=lines,                                                  # [N]
            pad_to=pad_to))
    return tuple(datasets)


def make_batch(token_lists, indices, pad_to=None):
    """Right-pad the chosen rows with PAD_ID (50256) into one array.

    T = pad_to, or the longest chosen row when None; rows longer than pad_to are cut.
    Returns ids [B,T] int64 and lengths [B] int64 (real tokens per row; the last one is at
    lengths-1).
    """
    rows = [token_lists[i] for i in np.asarray(indices).tolist()]
    if not rows:
        raise ValueError("make_batch: no rows chosen")
    lengths = np.array([len(r) for r in rows], dtype=np.int64)          # [B]
    if pad_to is not None:
        lengths = np.minimum(lengths, pad_to)
    if lengths.min() == 0:
        raise DataError("make_batch: a message has no tokens")
    T = int(pad_to) if pad_to is not None else int(lengths.max())
    ids = np.full((len(rows), T), PAD_ID, dtype=np.int64)               # [B,T]
    for b, row in enumerate(rows):
        ids[b, :lengths[b]] = row[:lengths[b]]
    return ids, lengths


def train_batches(n_examples, batch_size, seed=SEED, epoch=0):
    """Index arrays [batch_size] of one training epoch: shuffled, last partial batch dropped.

    The order depends only on (seed, epoch) (both >= 0), so a resumed run sees the same batches.
    Each index appears at most once per epoch; the n_examples % batch_size left over are skipped.
    """
    if batch_size < 1:
        raise DataError(f"batch size must be at least 1, got {batch_size}")
    n_batches = n_examples // batch_size
    if n_batches == 0:
        raise DataError(f"batch size {batch_size} is larger than the {n_examples} training examples")
    order = np.random.default_rng([seed, epoch]).permutation(n_examples)  # [N]
    return [order[b * batch_size:(b + 1) * batch_size] for b in range(n_batches)]


def eval_batches(n_examples, batch_size):
    """Index arrays covering 0..n_examples-1 in order; the last batch may be smaller."""
    if batch_size < 1:
        raise DataError(f"batch size must be at least 1, got {batch_size}")
    return [np.arange(start, min(start + batch_size, n_examples))
            for start in range(0, n_examples, batch_size)]


if __name__ == "__main__":          # a library module: say where its commands are
    import sys
    print("npgpt.data is a library module (the SMS Spam Collection: fetch, parse, split, batches).\n"
          "Its work is done by: python -m npgpt.train --data FILE [--data-dir DIR]  and  "
          "python -m npgpt.evaluate --data FILE (see --help of each).", file=sys.stderr)
    sys.exit(2)
