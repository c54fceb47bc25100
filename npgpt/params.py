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
                     implausible, init_params, num_classes_of, param_shapes)
from .errors import FormatError, quote
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

    Returns (params, config, meta). The file may come from anyone, so it is read through
    `npgpt.h5read` (its own arrays only: no external storage, links or virtual datasets) and
    checked before any array is read: the config within `config.PLAUSIBLE`, every array present,
    no extra ones, the right shape, a float dtype, no more bytes than the file's size can hold;
    after: finite values. Errors name the file and the array."""
    from .h5read import check_budget, dataset_names, open_h5

    path = os.fspath(path)
    with open_h5(path) as f:
        file_config, num_classes, meta = _header(f, path)
        if config is not None and config != file_config:
            raise FormatError(f"{path}: config {file_config} does not match the expected {config}")
        found = [name for name in dataset_names(f) if not name.startswith("tokenizer/")]
        params = {}
        if meta.get("base_weights"):
            # a trained-only file: its base (loaded and checked first, so that n_layer is
            # known to be right) supplies every array the file does not hold
            params = _load_base(path, meta["base_weights"], dtype, file_config, num_classes)
        else:
            # The names are built from n_layer: check it against the datasets present first.
            blocks = {name.split("/", 1)[0] for name in found if name.startswith("h") and "/" in name}
            if file_config.n_layer != len(blocks):
                raise FormatError(f"{path}: n_layer is {file_config.n_layer} but the file holds "
                                  f"{len(blocks)} blocks")
        expected = param_shapes(file_config, num_classes)
        expected.update(_lora_shapes(meta, file_config, num_classes))
        extra = sorted(set(found) - set(expected))
        if extra:
            raise FormatError(f"{path}: unexpected array {quote(extra[0])}")
        if params:
            expected = {n: expected[n] for n in found}     # the arrays that trained
        check_budget(f, path, [n for n in expected if n in f])
        for name, shape in expected.items():
            params[name] = _read_array(f, path, name, shape, dtype)
    return params, file_config, meta


META_MAX_BYTES = 16 << 20      # a classifier's meta is a few kB; more is not a model file


def _header(f, path):
    """(GPT2Config, number of classes or None, meta dict) from a file's root attributes, each
    read under a size cap and the config checked to be plausible (`config.PLAUSIBLE`)."""
    from .h5read import read_attr
    names = ("n_layer", "n_head", "n_embd", "vocab_size", "n_ctx")
    values = {k: read_attr(f, path, k) for k in names}
    num_classes = read_attr(f, path, "num_classes", 0)
    text = read_attr(f, path, "meta", "{}", max_bytes=META_MAX_BYTES)
    try:
        config = GPT2Config.from_dict({k: v for k, v in values.items() if v is not None})
        num_classes = int(num_classes) or None
        meta = json.loads(text)
    except FormatError:
        raise
    except Exception as e:      # (RecursionError: a meta nested thousands deep)
        raise FormatError(f"{path}: bad config attributes ({type(e).__name__}: {str(e)[:200]})") from None
    if not isinstance(meta, dict):
        raise FormatError(f"{path}: meta is a JSON {type(meta).__name__}, expected an object")
    problem = implausible(config, num_classes)
    if problem:
        raise FormatError(f"{path}: {problem}; not a GPT-2 this library can load")
    return config, num_classes, meta


def read_header(path):
    """(config, number of classes or None, meta) of a params file, without reading its arrays."""
    from .h5read import open_h5
    with open_h5(path) as f:
        return _header(f, os.fspath(path))


def _read_array(f, path, name, shape, dtype):
    """One parameter, checked before and after it is read (`h5read.read_array`: present, stored
    in the file, its shape, a float dtype), then finite values. -> the array in dtype"""
    from .h5read import read_array
    arr = read_array(f, path, name, shape).astype(dtype, copy=False)
    if not np.isfinite(arr).all():
        raise FormatError(f"{path}: array {quote(name)} has non-finite values")
    return arr


def find_base(path, base: dict):
    """Where the base weights of a trained-only file are: the absolute path saved, else the path
    as given at training relative to the file's folder or the current one. -> path or None"""
    given = base.get("given") if isinstance(base.get("given"), str) else ""
    for cand in (base.get("path"), os.path.join(os.path.dirname(os.path.abspath(path)), given), given):
        if isinstance(cand, str) and cand and os.path.isfile(cand):      # (never a number: a file descriptor)
            return cand
    return None


def _load_base(path, base: dict, dtype, config, num_classes):
    """The base weights a trained-only file builds on, sha256-checked, with the file's config."""
    if not isinstance(base, dict):
        raise FormatError(f"{path}: meta base_weights is not an object")
    found = find_base(path, base)
    if found is None:
        raise FormatError(f"{path}: holds only the trained arrays; its base weights {base.get('path')} "
                          f"(sha256 {str(base.get('sha256'))[:12]}...) are missing: put that file back, or "
                          "train with --save full for a file that stands alone")
    # The size first: a base for this config holds its arrays in float16 to float64, plus HDF5's
    # few kB per array. A file far off that is not the base, and is never read whole to find out.
    count = sum(int(np.prod(s)) for s in param_shapes(config).values())
    low, high = 2 * count, 8 * count + (1 << 20) + 4096 * len(param_shapes(config))
    size = os.path.getsize(found)
    if not low <= size <= high:
        raise FormatError(f"{path}: its base weights {found} are {size} bytes, not the {low}..{high} "
                          f"that a model of config {config} takes: they are other weights")
    digest = sha256_file(found, max_bytes=high)
    if digest != base.get("sha256"):
        raise FormatError(f"{path}: its base weights {found} have sha256 {digest[:12]}..., not the "
                          f"{str(base.get('sha256'))[:12]}... it was trained from: they are other weights")
    params, base_config, _ = load_params(found, dtype)
    if base_config != config:
        raise FormatError(f"{path}: base weights {found} have config {base_config}, expected {config}")
    return params
