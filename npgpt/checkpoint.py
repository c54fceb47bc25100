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

from .errors import FormatError, TrainingError
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


def load_checkpoint(run_dir, params: dict, opt, extra=None) -> dict:
    """Put the checkpoint's arrays into params and opt (shapes checked), and its best/ arrays into
    the dict `extra` when given; return its state."""
    import h5py

    path = os.path.join(run_dir, CHECKPOINT)
    if not os.path.exists(path):
        raise FormatError(f"{path}: no checkpoint to resume from")
    try:
        with h5py.File(path, "r") as f:
            state = json.loads(f.attrs["state"])
            opt.t = int(f.attrs["adam_t"])
            names = []
            f.visititems(lambda n, o: names.append(n) if isinstance(o, h5py.Dataset) else None)
            targets = {"params": params, "adam/m": opt.m, "adam/v": opt.v, "best": {} if extra is None else extra}
            for n in names:
                if n == "order":
                    continue
                group, name = n.split("/", 1) if n.split("/", 1)[0] in ("params", "best") else (n[:6], n[7:])
                arr = f[n][()]
                if group not in targets or name not in params or arr.shape != params[name].shape:
                    raise FormatError(f"{path}: array {n!r} does not fit the model")
                if not np.isfinite(arr).all():
                    raise FormatError(f"{path}: array {n!r} has non-finite values")
                arr = arr.astype(params[name].dtype, copy=False)
                if group == "params":
                    params[name][...] = arr
                elif group == "best":
                    targets["best"][n] = arr.copy()
                else:
                    targets[group][name] = arr.copy()
    except FormatError:
        raise
    except Exception as e:
        raise FormatError(f"{path}: cannot read checkpoint ({type(e).__name__}: {e})") from None
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
    import h5py
    path = os.path.join(run_dir, CHECKPOINT)
    try:
        with h5py.File(path, "r") as f:
            return json.loads(f.attrs["state"])
    except Exception as e:
        raise FormatError(f"{path}: not a readable checkpoint ({e})") from None
