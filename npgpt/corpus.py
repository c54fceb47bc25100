"""Classify a corpus on a Dask cluster: tables of texts in, one Parquet file of predictions per
input file out (`python -m npgpt.classify --file 'texts/*.parquet' --out preds/ --workers 2`).

    texts = corpus_frame(files, "text")          # dask DataFrame, one partition per file
    preds = classify_frame(texts, "runs/x/classifier.h5", "text")   # map_partitions, explicit meta
    classify_files(client, files, "runs/x/classifier.h5", "preds/") # both, written partition by partition

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


def read_partition(path, text_column: str, id_column=None) -> pd.DataFrame:
    """One input file as a partition: a column `text_column`, indexed by the file's row ids."""
    return read_texts(path, text_column, id_column).to_frame(text_column)


# ----------------------------------------------------------------------------- a Dask DataFrame

def corpus_frame(files, text_column: str, id_column=None):
    """A Dask DataFrame of the files' texts, one partition per file (read on the workers)."""
    import dask.dataframe as dd
    index_name = id_column or ("row" if str(files[0]).lower().endswith(".parquet") else "line")
    meta = pd.DataFrame({text_column: pd.Series([], dtype=object)},
                        index=pd.Index([], dtype=np.int64, name=index_name))
    return dd.from_map(read_partition, list(files), text_column=text_column, id_column=id_column, meta=meta,
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


def output_paths(files, out_dir) -> list:
    """out_dir/<input file's name>.parquet for each input file; DataError if two names collide."""
    names = [os.path.splitext(os.path.basename(f))[0] + ".parquet" for f in files]
    if len(set(names)) < len(names):
        twice = next(n for n in names if names.count(n) > 1)
        raise DataError(f"--file: two input files give the output name {twice} in --out {out_dir}; rename one")
    return [os.path.join(out_dir, n) for n in names]


def write_partition(frame: pd.DataFrame, path) -> tuple:
    """Write one partition's predictions (atomic). -> (rows, rows whose text was cut)"""
    cut = len(frame.attrs.get("truncated", ()))
    frame = frame.copy(deep=False)
    frame.attrs = {}             # the cut rows' ids are counted, not stored (pandas puts attrs in Parquet's metadata)
    write_predictions(frame, path)
    return len(frame), cut


def classify_files(client, files, ref: ModelRef, out_dir, text_column: str, id_column=None, labels=None,
                   progress=True, log=print) -> dict:
    """Classify every input file whose output (out_dir/<name>.parquet) is not there yet, on the
    client's cluster, each partition's predictions written by the worker that computed them.
    -> counts: files written and skipped, texts classified and cut to the length limit"""
    import dask
    from distributed import as_completed
    from .progress import bar
    os.makedirs(out_dir, exist_ok=True)
    todo = [(f, out) for f, out in zip(files, output_paths(files, out_dir)) if not os.path.isfile(out)]
    done = {"written": 0, "skipped": len(files) - len(todo), "texts": 0, "cut": 0}
    if done["skipped"]:
        log(f"{done['skipped']} of {len(files)} files already have their predictions in {out_dir}: skipped")
    if not todo:
        return done
    preds = classify_frame(corpus_frame([f for f, _ in todo], text_column, id_column), ref, text_column, labels)
    writes = [dask.delayed(write_partition)(part, out) for part, (_, out) in zip(preds.to_delayed(), todo)]
    with bar(enabled=progress, total=len(todo), unit="file", desc="classify") as shown:
        for future in as_completed(client.compute(writes)):
            rows, cut = future.result()
            done["written"] += 1
            done["texts"] += rows
            done["cut"] += cut
            shown.update(1)
    return done
