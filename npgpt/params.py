"""GPT-2's parameters in an HDF5 file: save and load, with every array validated.

An HDF5 file holds one dataset per parameter name (`npgpt.config` lists them; h5py turns the
slashes into groups) and the config as attributes of the root group, so `h5dump` or any HDF5
viewer shows the model as OpenAI named it.

Two additions a classifier file may carry:
- `tokenizer/encoder.json`, `tokenizer/vocab.bpe`: GPT-2's two BPE files as uint8 arrays, so the
  file is self-contained (`npgpt.tokenizer.tokenizer_from_h5` reads them, sha256-checked).
- only some of the arrays (`save_params(..., base=...)`): the ones that trained; meta
  `base_weights` names the file holding the rest (`path`, `sha256`), read and checked on load.

The parameters' names, shapes and random initialisation are `npgpt.config`'s; `init_params`,
`add_classifier_head`, `param_shapes` and `num_classes_of` are importable from here too.
"""
from __future__ import annotations

import json
import os

import numpy as np

from .config import (BLOCK_PARAMS, GPT2Config, add_classifier_head, block_shapes, cast_params,  # noqa: F401
                     init_params, num_classes_of, param_shapes)
from .errors import FormatError
from .fileio import atomic_write, sha256_file

FORMAT_VERSION = 1


# ----------------------------------------------------------------------------- HDF5

def save_params(path, params: dict, config: GPT2Config, meta: dict | None = None,
                files: dict | None = None, only: list | None = None, base: str | None = None) -> None:
    """Write params to an HDF5 file, atomically (temporary name, fsync, rename).

    The config goes in root attributes; `meta` (JSON-serialisable) in the `meta` attribute.
    files: {name: bytes} stored as uint8 arrays under `tokenizer/` (the BPE files).
    only, base: write only the arrays named in `only`; the rest are those of the weights file
    `base`, whose path (absolute and as given) and sha256 go into meta `base_weights`."""
    import h5py

    path = os.fspath(path)
    expected = param_shapes(config, num_classes_of(params))
    expected.update(_lora_shapes(meta, config, num_classes_of(params)))
    meta = dict(meta or {})
    if only is not None:
        meta["base_weights"] = {"path": os.path.abspath(base), "given": os.fspath(base),
                                "sha256": sha256_file(base)}
    if set(expected) != set(params):
        extra = sorted(set(params) - set(expected))
        missing = sorted(set(expected) - set(params))
        raise FormatError(f"{path}: params do not match config (missing {missing[:3]}, extra {extra[:3]})")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with atomic_write(path) as tmp:
        with h5py.File(tmp, "w") as f:
            f.attrs["npgpt_format"] = FORMAT_VERSION
            for k, v in config.to_dict().items():
                f.attrs[k] = v
            f.attrs["num_classes"] = num_classes_of(params) or 0
            f.attrs["meta"] = json.dumps(meta)
            for name in expected:
                if only is None or name in only:
                    f.create_dataset(name, data=np.ascontiguousarray(params[name]))
            for name, data in (files or {}).items():
                f.create_dataset(f"tokenizer/{name}", data=np.frombuffer(data, np.uint8))


def _lora_shapes(meta, config, num_classes) -> dict:
    """The LoRA arrays (`npgpt.lora`) a file holds when its meta has LoRA settings, else none."""
    if not isinstance(meta, dict) or not meta.get("lora"):
        return {}
    from . import lora
    try:
        return lora.lora_shapes(config, lora.LoraSpec.from_dict(meta["lora"]), num_classes or 2)
    except Exception as e:
        raise FormatError(f"bad LoRA settings in meta ({e})") from None


def load_params(path, dtype=np.float32, config: GPT2Config | None = None):
    """Read an HDF5 file written by `save_params` (or by `python -m npgpt.weights`).

    Returns (params, config, meta). Every array is checked against the config before it is read:
    present, no extra ones, right shape, a float dtype, finite values. Errors name the array."""
    import h5py

    path = os.fspath(path)
    if not os.path.exists(path):
        raise FormatError(f"{path}: no such file")
    try:
        f = h5py.File(path, "r")
    except Exception as e:  # h5py raises OSError for anything not HDF5
        raise FormatError(f"{path}: not a readable HDF5 file ({e})") from None
    try:
        with f:
            file_config, num_classes, meta = _header(f, path)
            if config is not None and config != file_config:
                raise FormatError(f"{path}: config {file_config} does not match the expected {config}")
            found = []
            f.visititems(lambda name, obj: found.append(name) if isinstance(obj, h5py.Dataset)
                         and not name.startswith("tokenizer/") else None)
            params = {}
            if isinstance(meta, dict) and meta.get("base_weights"):
                # a trained-only file: its base (loaded and checked first, so that n_layer is
                # known to be right) supplies every array the file does not hold
                params = _load_base(path, meta["base_weights"], dtype, file_config, num_classes)
            else:
                # The names are built from n_layer: check it against the datasets present first,
                # so that a corrupt attribute (n_layer 2**56) cannot make param_shapes build names
                # without bound.
                blocks = {name.split("/", 1)[0] for name in found if name.startswith("h") and "/" in name}
                if file_config.n_layer != len(blocks):
                    raise FormatError(f"{path}: n_layer is {file_config.n_layer} but the file holds "
                                      f"{len(blocks)} blocks")
            expected = param_shapes(file_config, num_classes)
            expected.update(_lora_shapes(meta, file_config, num_classes))
            extra = sorted(set(found) - set(expected))
            if extra:
                raise FormatError(f"{path}: unexpected array {extra[0]!r}")
            if params:
                expected = {n: expected[n] for n in found}     # the arrays that trained
            for name, shape in expected.items():
                params[name] = _read_array(f, path, name, shape, dtype)
    except FormatError:
        raise
    except Exception as e:
        raise FormatError(f"{path}: cannot read ({type(e).__name__}: {e})") from None
    return params, file_config, meta


def _header(f, path):
    """(GPT2Config, number of classes or None, meta) from a file's root attributes."""
    try:
        config = GPT2Config.from_dict({k: f.attrs[k] for k in ("n_layer", "n_head", "n_embd", "vocab_size", "n_ctx")
                                       if k in f.attrs})
        return config, int(f.attrs.get("num_classes", 0)) or None, json.loads(f.attrs.get("meta", "{}"))
    except FormatError:
        raise
    except Exception as e:
        raise FormatError(f"{path}: bad config attributes ({e})") from None


def _read_array(f, path, name, shape, dtype):
    """One parameter, checked before and after it is read: present, its shape, a float dtype,
    finite values. -> the array in dtype"""
    import h5py
    if name not in f or not isinstance(f[name], h5py.Dataset):
        raise FormatError(f"{path}: array {name!r} is missing")
    ds = f[name]
    if tuple(ds.shape) != shape:
        raise FormatError(f"{path}: array {name!r} has shape {tuple(ds.shape)}, expected {shape}")
    if ds.dtype.kind != "f" or ds.dtype.itemsize not in (2, 4, 8):
        raise FormatError(f"{path}: array {name!r} has dtype {ds.dtype}, expected a float type")
    try:
        arr = ds[()]
    except Exception as e:
        raise FormatError(f"{path}: array {name!r} cannot be read ({e})") from None
    arr = np.asarray(arr).astype(dtype, copy=False)
    if not np.isfinite(arr).all():
        raise FormatError(f"{path}: array {name!r} has non-finite values")
    return arr


def find_base(path, base: dict):
    """Where the base weights of a trained-only file are: the absolute path saved, else the path
    as given at training relative to the file's folder or the current one. -> path or None"""
    given = base.get("given") or ""
    for cand in (base.get("path"), os.path.join(os.path.dirname(os.path.abspath(path)), given), given):
        if cand and os.path.isfile(cand):
            return cand
    return None


def _load_base(path, base: dict, dtype, config, num_classes):
    """The base weights a trained-only file builds on, sha256-checked, with the file's config."""
    found = find_base(path, base)
    if found is None:
        raise FormatError(f"{path}: holds only the trained arrays; its base weights {base.get('path')} "
                          f"(sha256 {str(base.get('sha256'))[:12]}...) are missing: put that file back, or "
                          "train with --save full for a file that stands alone")
    digest = sha256_file(found)
    if digest != base.get("sha256"):
        raise FormatError(f"{path}: its base weights {found} have sha256 {digest[:12]}..., not the "
                          f"{str(base.get('sha256'))[:12]}... it was trained from: they are other weights")
    params, base_config, _ = load_params(found, dtype)
    if base_config != config:
        raise FormatError(f"{path}: base weights {found} have config {base_config}, expected {config}")
    return params
