"""Classify a corpus on a Dask cluster: tables of texts in, one Parquet file of predictions per
input file out (`python -m npgpt.classify --file 'texts/*.parquet' --out preds/ --workers 2`).

    texts = corpus_frame(files, "text")          # dask DataFrame, one partition per file
    preds = classify_frame(texts, "runs/x/classifier.h5", "text")   # map_partitions, explicit meta
    classify_files(client, files, ref, "preds/")                  # both, written partition by partition

One input file is one partition, or, with `partition_rows`, pieces of that many rows (a file of
a million texts is then worked on by every worker): out/<name>.parquet, or out/<name>-00000.parquet,
out/<name>-00001.parquet, ... for a file cut in pieces. `pd.read_parquet("preds/")` reads them all
(it skips `_npgpt_job.json`, the job's record: the model's sha256, the columns and the piece
size; a rerun with another of these into the same folder is an error, not a mix of two jobs).

A partition's predictions are `npgpt.predictions.prediction_frame` of its texts (the row ids of
its file, a label, p_<class> per class): the same numbers as `Classifier.predict_proba` in one
process. `predict_partition` is a plain pandas function of one partition: what Ray Data's
`map_batches(batch_format="pandas")` or a Spark pandas UDF would call (docs/distributed.md).

The classifier is loaded once per worker process (`worker_classifier`, keyed by the model file's
path and sha256, which the worker checks against this process's), never pickled with a task. Each
output file is written atomically (`fileio.atomic_write`), so a file that exists is complete: a
rerun skips the input files whose output is there, and a worker killed mid-job loses only the
partitions it was computing, which Dask runs again on the others.
"""
from __future__ import annotations

import glob
import json
import os
from dataclasses import dataclass

import numpy as np
import pandas as pd

from .errors import DataError
from .predictions import prediction_frame, read_texts, write_predictions


@dataclass(frozen=True)
class ModelRef:
    """Where a worker finds the classifier: its path (the same on every worker), sha256, options."""
    path: str
    sha256: str
    bpe_dir: str | None = None
    batch_size: int = 8


def model_ref(path, bpe_dir=None, batch_size=8) -> ModelRef:
    from .fileio import sha256_file
    path = os.path.abspath(path)
    return ModelRef(path, sha256_file(path), bpe_dir and os.path.abspath(bpe_dir), batch_size)


_CLASSIFIERS: dict = {}          # in each worker process: ModelRef -> Classifier (the last one kept)


def worker_classifier(ref: ModelRef):
    """The classifier `ref` names, loaded once per process; a file that differs from the one the
    job was started with is an error naming it."""
    if ref not in _CLASSIFIERS:
        from .classify import load_classifier
        from .errors import NpgptError
        from .fileio import sha256_file
        sha = sha256_file(ref.path) if os.path.isfile(ref.path) else "missing"
        if sha != ref.sha256:
            raise NpgptError(f"{_where()}: the classifier {ref.path} differs from the one the job started with "
                             f"(sha256 {sha[:12]}, expected {ref.sha256[:12]}): the same file on every worker")
        _CLASSIFIERS.clear()
        _CLASSIFIERS[ref] = load_classifier(ref.path, ref.bpe_dir, ref.batch_size)
    return _CLASSIFIERS[ref]


def _where() -> str:
    try:
        from .distributed import worker_address
        return f"Dask worker {worker_address()}"
    except (ImportError, ValueError):
        return "this process"


def _worker_threads() -> None:
    """On a Dask worker: Numba and BLAS on its thread count (elsewhere: left as they are)."""
    try:
        from .distributed import use_worker_threads
        use_worker_threads()
    except (ImportError, ValueError):        # not in a worker
        pass


# ----------------------------------------------------------------------------- one partition

def predict_partition(part: pd.DataFrame, ref: ModelRef, text_column: str = "text") -> pd.DataFrame:
    """The predictions of one partition's texts (its index kept): label, then p_<class> per class."""
    _worker_threads()
    return prediction_frame(worker_classifier(ref), part[text_column])


def prediction_meta(labels, index_name: str) -> pd.DataFrame:
    """The empty frame `predict_partition` returns for these classes (Dask's `meta`)."""
    columns = {"label": pd.Series([], dtype=object)}
    columns.update({"p_" + name: pd.Series([], dtype=np.float64) for name in labels})
    return pd.DataFrame(columns, index=pd.Index([], dtype=np.int64, name=index_name))


@dataclass(frozen=True)
class Piece:
    """One partition: rows [start, stop) of an input file (stop None: to its end), written to out."""
    path: str
    start: int
    stop: int | None
    out: str


_LAST_READ: dict = {}        # in each worker process: (path, size, mtime, columns) -> the file's texts (the last one)


def read_partition(piece: Piece, text_column: str, id_column=None) -> pd.DataFrame:
    """One piece of an input file as a partition: a column `text_column`, indexed by the file's row
    ids. A file cut in pieces is read once per worker process while its pieces follow each other."""
    st = os.stat(piece.path)
    key = (piece.path, st.st_size, st.st_mtime_ns, text_column, id_column)
    texts = _LAST_READ.get(key)
    if texts is None:                    # (a worker with several threads may replace it meanwhile: harmless)
        texts = read_texts(piece.path, text_column, id_column)
        _LAST_READ.clear()
        _LAST_READ[key] = texts
    return texts.iloc[piece.start:piece.stop].to_frame(text_column)


# ----------------------------------------------------------------------------- a Dask DataFrame

def corpus_frame(pieces, text_column: str, id_column=None):
    """A Dask DataFrame of the pieces' texts, one partition per Piece (read on the workers); input
    files instead of pieces: one partition per file."""
    import dask.dataframe as dd
    pieces = [p if isinstance(p, Piece) else Piece(os.fspath(p), 0, None, "") for p in pieces]
    index_name = id_column or ("row" if pieces[0].path.lower().endswith(".parquet") else "line")
    meta = pd.DataFrame({text_column: pd.Series([], dtype=object)},
                        index=pd.Index([], dtype=np.int64, name=index_name))
    return dd.from_map(read_partition, pieces, text_column=text_column, id_column=id_column, meta=meta,
                       enforce_metadata=False)


def classify_frame(texts, model, text_column: str = "text", labels=None):
    """Predictions of a Dask DataFrame of texts: map_partitions of `predict_partition` with its
    meta. model: a ModelRef (or a path); labels: the classifier's (read from the file when None)."""
    ref = model if isinstance(model, ModelRef) else model_ref(model)
    if labels is None:
        from .classify import load_classifier
        labels = load_classifier(ref.path, ref.bpe_dir).labels
    meta = prediction_meta(labels, texts.index.name)
    return texts.map_partitions(predict_partition, ref, text_column, meta=meta, enforce_metadata=False)


# ----------------------------------------------------------------------------- files in, files out

def expand_files(pattern) -> list:
    """The files a --file pattern names (a glob, sorted), each a table; DataError otherwise."""
    from .tabular import is_table
    files = sorted(glob.glob(os.fspath(pattern))) if glob.has_magic(os.fspath(pattern)) else [os.fspath(pattern)]
    files = [f for f in files if os.path.isfile(f)]
    if not files:
        raise DataError(f"--file {pattern}: no file matches")
    wrong = [f for f in files if not is_table(f)]
    if wrong:
        raise DataError(f"--file {wrong[0]}: a cluster job reads tables (.csv, .tsv, .jsonl, .parquet)")
    return files


def count_rows(path, text_column: str, id_column=None) -> int:
    """The rows of a table: from a Parquet file's footer, else by reading it (its errors then
    show here, before the job starts)."""
    if os.fspath(path).lower().endswith(".parquet"):
        import pyarrow.parquet as pq
        return pq.ParquetFile(path).metadata.num_rows
    return len(read_texts(path, text_column, id_column))


def plan(files, out_dir, partition_rows=None, text_column="text", id_column=None) -> list:
    """The job's pieces: each file whole (partition_rows None) or cut in pieces of partition_rows
    rows, each with its output path; DataError if two outputs would share a name."""
    pieces = []
    for f in files:
        stem = os.path.join(out_dir, os.path.splitext(os.path.basename(f))[0])
        n = count_rows(f, text_column, id_column) if partition_rows else 0
        if not partition_rows or n <= partition_rows:
            pieces.append(Piece(os.fspath(f), 0, None, stem + ".parquet"))
            continue
        for k, start in enumerate(range(0, n, partition_rows)):
            pieces.append(Piece(os.fspath(f), start, min(start + partition_rows, n), f"{stem}-{k:05d}.parquet"))
    names = [p.out for p in pieces]
    if len(set(names)) < len(names):
        twice = os.path.basename(next(n for n in names if names.count(n) > 1))
        raise DataError(f"--file: two input files give the output name {twice} in --out {out_dir}; rename one")
    return pieces


JOB_FILE = "_npgpt_job.json"


def check_job(out_dir, ref: ModelRef, text_column: str, id_column, partition_rows) -> None:
    """Record what the predictions in out_dir are (the model's sha256, the columns, the piece size)
    the first time; later, a DataError naming what differs from that record."""
    from .fileio import atomic_write
    record = {"model_sha256": ref.sha256, "text_column": text_column, "id_column": id_column,
              "partition_rows": partition_rows}
    path = os.path.join(out_dir, JOB_FILE)
    if not os.path.isfile(path):
        with atomic_write(path) as tmp, open(tmp, "w", encoding="utf-8") as fh:
            json.dump(record, fh, indent=1)
        return
    with open(path, encoding="utf-8") as fh:
        old = json.load(fh)
    flags = {"model_sha256": "--model", "text_column": "--text-column", "id_column": "--id-column",
             "partition_rows": "--partition-rows"}
    for key, flag in flags.items():
        if old.get(key) != record[key]:
            was = old.get(key) if key != "model_sha256" else f"a model with sha256 {str(old.get(key))[:12]}"
            raise DataError(f"--out {out_dir} holds the predictions of another job ({flag} was {was}): give "
                            f"that {flag} to finish it, or another --out")


def write_partition(frame: pd.DataFrame, path) -> tuple:
    """Write one partition's predictions (atomic). -> (rows, rows whose text was cut)"""
    cut = len(frame.attrs.get("truncated", ()))
    frame = frame.copy(deep=False)
    frame.attrs = {}             # the cut rows' ids are counted, not stored (pandas puts attrs in Parquet's metadata)
    write_predictions(frame, path)
    return len(frame), cut


def classify_files(client, files, ref: ModelRef, out_dir, text_column: str, id_column=None, labels=None,
                   progress=True, log=print, partition_rows=None) -> dict:
    """Classify every piece of the input files (whole files, or pieces of partition_rows rows)
    whose output in out_dir is not there yet, on the client's cluster, each partition's
    predictions written by the worker that computed them.
    -> counts: partitions written and skipped, texts classified and cut to the length limit"""
    import dask
    from distributed import as_completed
    from .progress import bar
    pieces = plan(files, out_dir, partition_rows, text_column, id_column)
    os.makedirs(out_dir, exist_ok=True)
    check_job(out_dir, ref, text_column, id_column, partition_rows)
    todo = [p for p in pieces if not os.path.isfile(p.out)]
    done = {"written": 0, "skipped": len(pieces) - len(todo), "texts": 0, "cut": 0}
    unit = "files" if len(pieces) == len(files) else "partitions"
    if done["skipped"]:
        log(f"{done['skipped']} of {len(pieces)} {unit} already have their predictions in {out_dir}: skipped")
    if not todo:
        return done
    workers = len(client.scheduler_info().get("workers", {}))
    if len(pieces) < workers and partition_rows is None:
        log(f"{len(pieces)} input file{'s' if len(pieces) > 1 else ''} for {workers} workers: some stay idle "
            "(--partition-rows N cuts each file in pieces of N rows)")
    preds = classify_frame(corpus_frame(todo, text_column, id_column), ref, text_column, labels)
    writes = [dask.delayed(write_partition)(part, p.out) for part, p in zip(preds.to_delayed(), todo)]
    with bar(enabled=progress, total=len(todo), unit=unit[:-1], desc="classify") as shown:
        for future in as_completed(client.compute(writes)):
            rows, cut = future.result()
            done["written"] += 1
            done["texts"] += rows
            done["cut"] += cut
            shown.update(1)
    return done
