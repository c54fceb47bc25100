"""Training checkpoints: everything needed to continue a run exactly where it stopped.

One HDF5 file, `checkpoint.h5` in the run folder:
    params/<name>      the trainable arrays (the frozen ones come from the base weights)
    adam/m/<name>      AdamW first moments
    adam/v/<name>      AdamW second moments
    best/<name>        the trainable arrays of the best validation so far (--keep best)
    order              the current epoch's example order (for checking, it is derived from the seed)
    attrs["state"]     JSON: epoch, batch in epoch, global step, examples seen, AdamW step count,
                       metrics so far, the run's arguments

Written atomically (`npgpt.fileio.atomic_write`): a write that fails (disk full, Ctrl-C) leaves
the previous checkpoint as it was.
"""
from __future__ import annotations

import json
import os

import numpy as np

from .errors import FormatError, TrainingError, quote
from .fileio import atomic_write

CHECKPOINT = "checkpoint.h5"


def save_checkpoint(run_dir, params: dict, trainable: list, opt, state: dict, order=None, extra=None) -> str:
    """Write the run's checkpoint (atomically: the previous one stays whole until this one is).
    extra: more arrays to keep, by their name in the file ("best/<name>")."""
    import h5py

    path = os.path.join(run_dir, CHECKPOINT)
    try:
        with atomic_write(path) as tmp:
            with h5py.File(tmp, "w") as f:
                f.attrs["state"] = json.dumps(state)
                f.attrs["adam_t"] = opt.t
                for name in trainable:
                    f.create_dataset(f"params/{name}", data=params[name])
                    if name in opt.m:
                        f.create_dataset(f"adam/m/{name}", data=opt.m[name])
                        f.create_dataset(f"adam/v/{name}", data=opt.v[name])
                if order is not None:
                    f.create_dataset("order", data=np.asarray(order))
                for name, arr in (extra or {}).items():
                    f.create_dataset(name, data=arr)
    except OSError as e:
        raise TrainingError(f"cannot write checkpoint {path} ({e.strerror or e}); "
                            "the previous checkpoint is unchanged") from None
    return path


STATE_MAX_BYTES = 64 << 20     # the run state: settings and metrics so far, a few kB to MB


def load_checkpoint(run_dir, params: dict, opt, extra=None) -> dict:
    """Put the checkpoint's arrays into params and opt (shapes checked before each is read,
    through `npgpt.h5read`), and its best/ arrays (--keep best) into the dict `extra` when given;
    return its state."""
    from .h5read import check_budget, dataset_names, open_h5, read_array, read_attr

    path = os.path.join(run_dir, CHECKPOINT)
    if not os.path.exists(path):
        raise FormatError(f"{path}: no checkpoint to resume from")
    with open_h5(path) as f:
        state = _state(f, path)
        opt.t = int(read_attr(f, path, "adam_t", 0))
        targets = {"params": params, "best": {} if extra is None else extra, "adam/m": opt.m, "adam/v": opt.v}
        names = [n for n in dataset_names(f) if n != "order"]      # (order: only for checking)
        for n in names:
            group, name = _group_and_name(n)
            if group not in targets or name not in params:
                raise FormatError(f"{path}: array {quote(n)} does not fit the model")
        check_budget(f, path, names)
        for n in names:
            group, name = _group_and_name(n)
            arr = read_array(f, path, n, params[name].shape)
            if not np.isfinite(arr).all():
                raise FormatError(f"{path}: array {quote(n)} has non-finite values")
            arr = arr.astype(params[name].dtype, copy=False)
            if group == "params":
                params[name][...] = arr
            elif group == "best":
                targets["best"][n] = arr.copy()
            else:
                targets[group][name] = arr.copy()
    return state


def _group_and_name(n: str) -> tuple:
    """A checkpoint array's group (params, best, adam/m, adam/v) and parameter name."""
    head = n.split("/", 1)[0]
    return (head, n[len(head) + 1:]) if head in ("params", "best") else (n[:6], n[7:])


def _state(f, path) -> dict:
    """The JSON run state of an open checkpoint, read under a size cap."""
    from .h5read import read_attr
    text = read_attr(f, path, "state", None, max_bytes=STATE_MAX_BYTES)
    try:
        state = json.loads(text)
    except Exception as e:          # (None: no state; RecursionError: nested thousands deep)
        raise FormatError(f"{path}: not a readable checkpoint (its state: {type(e).__name__})") from None
    if not isinstance(state, dict):
        raise FormatError(f"{path}: not a readable checkpoint (its state is not a JSON object)")
    return state


def strip_params(path) -> int:
    """Rewrite a finished run's checkpoint without its parameter arrays (classifier.h5 holds them):
    what is left, the AdamW moments and the run state, is what `--resume RUN --epochs N` needs to
    continue exactly. Atomic like save_checkpoint. -> the new file's size in bytes"""
    import h5py

    path = os.fspath(path)
    try:
        with atomic_write(path) as tmp:
            with h5py.File(path, "r") as src, h5py.File(tmp, "w") as dst:
                for k, v in src.attrs.items():
                    dst.attrs[k] = v
                for name in src:
                    if name != "params":
                        src.copy(src[name], dst, name=name)
    except OSError as e:
        raise TrainingError(f"cannot rewrite checkpoint {path} ({e.strerror or e}); it is unchanged") from None
    return os.path.getsize(path)


def read_state(run_dir) -> dict:
    """The JSON state of a run folder's checkpoint: run_state, the run's settings."""
    from .h5read import open_h5
    path = os.path.join(run_dir, CHECKPOINT)
    with open_h5(path) as f:
        return _state(f, path)
