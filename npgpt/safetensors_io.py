"""Read safetensors files (the format Hugging Face publishes GPT-2 in) with NumPy alone.

    [8 bytes: N, uint64 little-endian] [N bytes: JSON header] [data area: raw little-endian bytes]

    header = {"wte.weight": {"dtype": "F32", "shape": [50257, 768], "data_offsets": [begin, end]},
              ...,
              "__metadata__": {"format": "pt"}}          (optional)

Offsets are relative to the start of the data area; tensor bytes are in C order. The header is
untrusted: its length, every offset, dtype and shape are checked (sizes computed with Python
integers, so a shape like [2**40, 2**40] is refused, not allocated) before any array is read,
and the arrays are sliced from a read-only memory map of the file, never read past its end.

Hugging Face's GPT-2 names map to npgpt's (OpenAI's) names:

    wte.weight -> wte      wpe.weight -> wpe      ln_f.weight|bias -> ln_f/g|b
    h.{i}.ln_1.weight|bias -> h{i}/ln_1/g|b                       (LayerNorm: weight = gain g)
    h.{i}.attn.c_attn.weight|bias -> h{i}/attn/c_attn/w|b         (Conv1D: [in, out], as OpenAI's)
    h.{i}.attn.c_proj.*, h.{i}.mlp.c_fc.*, h.{i}.mlp.c_proj.*      likewise
    h.{i}.attn.bias, h.{i}.attn.masked_bias                       causal-mask buffers, skipped

Some files prefix every name with `transformer.`.
"""
from __future__ import annotations

import json
import os
import re

import numpy as np

from .config import PRESETS, TINY, GPT2Config
from .errors import FormatError, NpgptError
from .config import param_shapes

MAX_HEADER_BYTES = 100 << 20

DTYPES = {
    "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"),
    "BF16": np.dtype("<u2"),          # bfloat16: the top half of a float32, widened on reading
    "I64": np.dtype("<i8"), "I32": np.dtype("<i4"), "I16": np.dtype("<i2"), "I8": np.dtype("i1"),
    "U64": np.dtype("<u8"), "U32": np.dtype("<u4"), "U16": np.dtype("<u2"), "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")


def _no_duplicate_keys(pairs):
    d = {}
    for k, v in pairs:
        if k in d:
            raise ValueError(f"duplicate key {k!r}")
        d[k] = v
    return d


def read_header(path) -> tuple[dict, int, int]:
    """Parse and check the header. Returns ({name: (dtype str, shape, begin, end)}, data start,
    data length); begin/end are relative to the data start."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FormatError(f"{path}: no such file")
    file_size = os.path.getsize(path)
    if file_size < 8:
        raise FormatError(f"{path}: {file_size} bytes is too short for a safetensors file")
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        if n > MAX_HEADER_BYTES:
            raise FormatError(f"{path}: header length {n} is larger than {MAX_HEADER_BYTES} bytes (not safetensors?)")
        if 8 + n > file_size:
            raise FormatError(f"{path}: header length {n} runs past the end of the file ({file_size} bytes; truncated?)")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicate_keys)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise FormatError(f"{path}: header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise FormatError(f"{path}: header is not a JSON object")
    data_start, data_len = 8 + n, file_size - 8 - n
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict):
        raise FormatError(f"{path}: __metadata__ is not a JSON object")

    entries = {}
    for name, info in header.items():
        what = f"{path}: tensor {name!r}"
        if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
            raise FormatError(f"{what}: entry must have exactly dtype, shape and data_offsets")
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if not isinstance(dtype, str) or dtype not in DTYPES:
            raise FormatError(f"{what}: unsupported dtype {dtype!r}")
        if (not isinstance(shape, list) or len(shape) > 64
                or not all(type(d) is int and d >= 0 for d in shape)):
            raise FormatError(f"{what}: bad shape {str(shape)[:80]}")
        if (not isinstance(offsets, list) or len(offsets) != 2
                or not all(type(o) is int for o in offsets)
                or not 0 <= offsets[0] <= offsets[1] <= data_len):
            raise FormatError(f"{what}: data_offsets {str(offsets)[:80]} outside the data area "
                              f"({data_len} bytes; truncated?)")
        count = 1
        for d in shape:
            count *= d                       # Python int: no overflow, no allocation
        begin, end = offsets
        if end - begin != count * DTYPES[dtype].itemsize:
            raise FormatError(f"{what}: {end - begin} bytes do not hold shape {shape} of {dtype}")
        entries[name] = (dtype, tuple(shape), begin, end)

    spans = sorted((b, e, name) for name, (_, _, b, e) in entries.items() if e > b)
    for (b0, e0, n0), (b1, e1, n1) in zip(spans, spans[1:]):
        if b1 < e0:
            raise FormatError(f"{path}: tensors {n0!r} and {n1!r} overlap")
    return entries, data_start, data_len


def read_safetensors(path, names=None) -> dict:
    """Read the tensors `names` (all when None) of a safetensors file as NumPy arrays
    (BF16 is widened to float32; everything else keeps its dtype, in native byte order)."""
    path = os.fspath(path)
    entries, data_start, data_len = read_header(path)
    if names is None:
        names = list(entries)
    for name in names:
        if name not in entries:
            raise FormatError(f"{path}: tensor {name!r} is missing")
    if data_len == 0 or not names:
        mm = np.zeros(0, np.uint8)
    else:
        mm = np.memmap(path, dtype=np.uint8, mode="r", offset=data_start, shape=(data_len,))
    out = {}
    try:
        for name in names:
            dtype, shape, begin, end = entries[name]
            raw = np.array(mm[begin:end])                      # copy out of the map: [nbytes] uint8
            arr = raw.view(DTYPES[dtype]).reshape(shape)
            if dtype == "BF16":
                arr = (arr.astype(np.uint32) << 16).view(np.float32)
            out[name] = arr.astype(arr.dtype.newbyteorder("="), copy=False)
    finally:
        del mm
    return out


# ----------------------------------------------------------------------------- GPT-2

_LINEAR = r"attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj"


def hf_to_npgpt(key: str):
    """Hugging Face GPT-2 name -> npgpt name; None for the buffers to skip; KeyError if unknown."""
    name = key[len("transformer."):] if key.startswith("transformer.") else key
    if name in ("wte.weight", "wpe.weight"):
        return name[:3]
    if name == "lm_head.weight":
        return None                                     # tied to wte: GPT-2 has no separate head
    m = re.fullmatch(r"ln_f\.(weight|bias)", name)
    if m:
        return "ln_f/" + ("g" if m.group(1) == "weight" else "b")
    m = re.fullmatch(r"h\.(0|[1-9]\d{0,3})\.(ln_1|ln_2)\.(weight|bias)", name)
    if m:
        return f"h{m.group(1)}/{m.group(2)}/" + ("g" if m.group(3) == "weight" else "b")
    m = re.fullmatch(rf"h\.(0|[1-9]\d{{0,3}})\.({_LINEAR})\.(weight|bias)", name)
    if m:
        return f"h{m.group(1)}/{m.group(2).replace('.', '/')}/" + ("w" if m.group(3) == "weight" else "b")
    if re.fullmatch(r"h\.\d+\.attn\.(bias|masked_bias)", name):
        return None                                     # causal-mask buffers, not parameters
    raise KeyError(key)


def _n_head_for(path, n_embd: int, n_head) -> int:
    """n_head is not in the arrays' shapes: take it from the caller, a config.json beside the
    file, or the preset with the same width."""
    if n_head is not None:
        return n_head
    cfg_path = os.path.join(os.path.dirname(os.path.abspath(path)), "config.json")
    if os.path.isfile(cfg_path):
        try:
            with open(cfg_path, "rb") as f:
                cfg = json.loads(f.read(1 << 20))
            n_head = cfg["n_head"]
        except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
            raise FormatError(f"{cfg_path}: cannot read n_head ({type(e).__name__}: {e})") from None
        if type(n_head) is not int:
            raise FormatError(f"{cfg_path}: n_head is not an integer")
        return n_head
    for config in (*PRESETS.values(), TINY):
        if config.n_embd == n_embd:
            return config.n_head
    raise FormatError(f"{path}: cannot tell the number of heads of a model {n_embd} wide; "
                      "pass --size or put its config.json beside it")


def load_gpt2_safetensors(path, n_head: int | None = None) -> tuple[dict, GPT2Config]:
    """A Hugging Face GPT-2 safetensors file -> (params in npgpt's names, float32, config).

    The config comes from the shapes (wte [V,C], wpe [n_ctx,C], the number of blocks h.N);
    n_head from the argument, a config.json beside the file, or the preset of the same width."""
    path = os.fspath(path)
    entries, _, _ = read_header(path)
    names = {}                                          # npgpt name -> file name
    for key in entries:
        try:
            name = hf_to_npgpt(key)
        except KeyError:
            raise FormatError(f"{path}: tensor {key!r} is not a GPT-2 parameter") from None
        if name is None:
            continue
        if name in names:
            raise FormatError(f"{path}: tensors {names[name]!r} and {key!r} are the same parameter")
        names[name] = key
    for needed in ("wte", "wpe"):
        if needed not in names:
            raise FormatError(f"{path}: tensor {needed + '.weight'!r} is missing")
        if len(entries[names[needed]][1]) != 2:
            raise FormatError(f"{path}: tensor {names[needed]!r} has shape {entries[names[needed]][1]}, expected 2-D")
    (V, C), (T, _) = entries[names["wte"]][1], entries[names["wpe"]][1]
    n_layer = len({n.split("/")[0] for n in names if n.startswith("h")})
    try:
        config = GPT2Config(n_layer=n_layer, n_head=_n_head_for(path, C, n_head), n_embd=C,
                            vocab_size=V, n_ctx=T)
    except FormatError:
        raise
    except NpgptError as e:
        raise FormatError(f"{path}: shapes give no valid GPT-2 config ({e})") from None
    expected = param_shapes(config)
    for name, shape in expected.items():
        if name not in names:
            raise FormatError(f"{path}: tensor for {name!r} is missing")
        dtype, file_shape, _, _ = entries[names[name]]
        if file_shape != shape:
            raise FormatError(f"{path}: tensor {names[name]!r} has shape {file_shape}, expected {shape}")
        if dtype not in FLOAT_DTYPES:
            raise FormatError(f"{path}: tensor {names[name]!r} has dtype {dtype}, expected a float type")
    extra = sorted(set(names) - set(expected))
    if extra:
        raise FormatError(f"{path}: tensor {names[extra[0]]!r} is not part of a GPT-2 with {config}")
    arrays = read_safetensors(path, [names[n] for n in expected])
    params = {}
    for name in expected:
        arr = arrays.pop(names[name]).astype(np.float32, copy=False)
        if not np.isfinite(arr).all():
            raise FormatError(f"{path}: tensor {names[name]!r} has non-finite values")
        params[name] = arr
    return params, config
