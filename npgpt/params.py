"""Parameters: names, shapes, random initialisation, and HDF5 save/load with validation.

Parameters live in a plain dict keyed by GPT-2's own checkpoint names (OpenAI's, without the
`model/` prefix), in OpenAI's orientation (`y = x @ w + b`):

    wte [V,C]  wpe [n_ctx,C]
    h{i}/ln_1/g [C]  h{i}/ln_1/b [C]
    h{i}/attn/c_attn/w [C,3C]  h{i}/attn/c_attn/b [3C]
    h{i}/attn/c_proj/w [C,C]   h{i}/attn/c_proj/b [C]
    h{i}/ln_2/g [C]  h{i}/ln_2/b [C]
    h{i}/mlp/c_fc/w [C,4C]     h{i}/mlp/c_fc/b [4C]
    h{i}/mlp/c_proj/w [4C,C]   h{i}/mlp/c_proj/b [C]
    ln_f/g [C]  ln_f/b [C]
    cls/w [C,num_classes]  cls/b [num_classes]      (classifier only)

An HDF5 file holds one dataset per name (h5py turns the slashes into groups) and the config as
attributes of the root group, so `h5dump` or any HDF5 viewer shows the model as OpenAI named it.

Two additions a classifier file may carry:
- `tokenizer/encoder.json`, `tokenizer/vocab.bpe`: GPT-2's two BPE files as uint8 arrays, so the
  file is self-contained (`npgpt.tokenizer.tokenizer_from_h5` reads them, sha256-checked).
- only some of the arrays (`save_params(..., base=...)`): the ones that trained; meta
  `base_weights` names the file holding the rest (`path`, `sha256`), read and checked on load.
"""
from __future__ import annotations

import json
import os

import numpy as np

from .config import GPT2Config
from .errors import FormatError

BLOCK_PARAMS = (
    "ln_1/g", "ln_1/b",
    "attn/c_attn/w", "attn/c_attn/b",
    "attn/c_proj/w", "attn/c_proj/b",
    "ln_2/g", "ln_2/b",
    "mlp/c_fc/w", "mlp/c_fc/b",
    "mlp/c_proj/w", "mlp/c_proj/b",
)

FORMAT_VERSION = 1


def block_shapes(C: int) -> dict:
    """Shapes of one block's parameters, keyed by the name inside the block."""
    return {
        "ln_1/g": (C,), "ln_1/b": (C,),
        "attn/c_attn/w": (C, 3 * C), "attn/c_attn/b": (3 * C,),
        "attn/c_proj/w": (C, C), "attn/c_proj/b": (C,),
        "ln_2/g": (C,), "ln_2/b": (C,),
        "mlp/c_fc/w": (C, 4 * C), "mlp/c_fc/b": (4 * C,),
        "mlp/c_proj/w": (4 * C, C), "mlp/c_proj/b": (C,),
    }


def param_shapes(config: GPT2Config, num_classes: int | None = None) -> dict:
    """Every parameter name of a model with this config, with its shape, in checkpoint order."""
    C = config.n_embd
    shapes = {"wte": (config.vocab_size, C), "wpe": (config.n_ctx, C)}
    for i in range(config.n_layer):
        for name, shape in block_shapes(C).items():
            shapes[f"h{i}/{name}"] = shape
    shapes["ln_f/g"] = (C,)
    shapes["ln_f/b"] = (C,)
    if num_classes:
        shapes["cls/w"] = (C, num_classes)
        shapes["cls/b"] = (num_classes,)
    return shapes


def num_classes_of(params: dict) -> int | None:
    """Number of classes of the classification head, or None for a language model."""
    return params["cls/b"].shape[0] if "cls/b" in params else None


def init_params(config: GPT2Config, seed: int = 0, num_classes: int | None = None,
                dtype=np.float32) -> dict:
    """Random parameters as GPT-2 initialises them: N(0, 0.02) weights (c_proj scaled by
    1/sqrt(2 n_layer)), zero biases, LayerNorm gains 1."""
    rng = np.random.default_rng(seed)
    params = {}
    for name, shape in param_shapes(config, num_classes).items():
        leaf = name.rsplit("/", 1)[-1]
        if name in ("wte", "wpe") or leaf == "w":
            std = 0.02
            if name.endswith("c_proj/w"):
                std = 0.02 / np.sqrt(2 * config.n_layer)
            arr = rng.standard_normal(shape, dtype=np.float32) * np.float32(std)
        elif leaf == "g":
            arr = np.ones(shape, np.float32)
        else:
            arr = np.zeros(shape, np.float32)
        params[name] = arr.astype(dtype, copy=False)
    return params


def add_classifier_head(params: dict, num_classes: int, seed: int = 0) -> dict:
    """Add a fresh `cls/w`, `cls/b` head (N(0, 0.02) weights, zero bias) to a language model."""
    C = params["wte"].shape[1]
    dtype = params["wte"].dtype
    rng = np.random.default_rng(seed)
    params["cls/w"] = (rng.standard_normal((C, num_classes), dtype=np.float32) * np.float32(0.02)).astype(dtype)
    params["cls/b"] = np.zeros(num_classes, dtype)
    return params


def cast_params(params: dict, dtype) -> dict:
    return {k: v.astype(dtype, copy=False) for k, v in params.items()}


# ----------------------------------------------------------------------------- HDF5

def sha256_of(path, chunk=1 << 22) -> str:
    import hashlib
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while True:
            b = fh.read(chunk)
            if not b:
                return h.hexdigest()
            h.update(b)


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
                                "sha256": sha256_of(base)}
    if set(expected) != set(params):
        extra = sorted(set(params) - set(expected))
        missing = sorted(set(expected) - set(params))
        raise FormatError(f"{path}: params do not match config (missing {missing[:3]}, extra {extra[:3]})")
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    tmp = path + ".tmp"
    try:
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
            f.flush()
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


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
            try:
                file_config = GPT2Config.from_dict({k: f.attrs[k] for k in
                                                   ("n_layer", "n_head", "n_embd", "vocab_size", "n_ctx")
                                                   if k in f.attrs})
                num_classes = int(f.attrs.get("num_classes", 0)) or None
                meta = json.loads(f.attrs.get("meta", "{}"))
            except FormatError:
                raise
            except Exception as e:
                raise FormatError(f"{path}: bad config attributes ({e})") from None
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
                params[name] = arr
    except FormatError:
        raise
    except Exception as e:
        raise FormatError(f"{path}: cannot read ({type(e).__name__}: {e})") from None
    return params, file_config, meta


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
    digest = sha256_of(found)
    if digest != base.get("sha256"):
        raise FormatError(f"{path}: its base weights {found} have sha256 {digest[:12]}..., not the "
                          f"{str(base.get('sha256'))[:12]}... it was trained from: they are other weights")
    params, base_config, _ = load_params(found, dtype)
    if base_config != config:
        raise FormatError(f"{path}: base weights {found} have config {base_config}, expected {config}")
    return params
