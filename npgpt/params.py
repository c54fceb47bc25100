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

def save_params(path, params: dict, config: GPT2Config, meta: dict | None = None) -> None:
    """Write params to an HDF5 file, atomically (temporary name, fsync, rename).

    The config goes in root attributes; `meta` (JSON-serialisable) in the `meta` attribute."""
    import h5py

    path = os.fspath(path)
    expected = param_shapes(config, num_classes_of(params))
    expected.update(_lora_shapes(meta, config, num_classes_of(params)))
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
            f.attrs["meta"] = json.dumps(meta or {})
            for name in expected:
                f.create_dataset(name, data=np.ascontiguousarray(params[name]))
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
            f.visititems(lambda name, obj: found.append(name) if isinstance(obj, h5py.Dataset) else None)
            # The names are built from n_layer: check it against the datasets present first, so
            # that a corrupt attribute (n_layer 2**56) cannot make param_shapes build names
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
            params = {}
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
