"""A GPT-2: its hyper-parameters, the arrays they define, and their random initialisation.

    GPT2Config            n_layer, n_head, n_embd, vocab_size, n_ctx
    PRESETS, preset()     OpenAI's four published sizes (124M, 355M, 774M, 1558M) and a tiny one
    param_shapes()        every parameter's name and shape, in GPT-2's own checkpoint names
    init_params()         random weights as GPT-2 initialises them
    add_classifier_head() a fresh classifier head (cls/w, cls/b)

Parameters live in a plain dict keyed by OpenAI's checkpoint names (without the `model/` prefix),
in OpenAI's orientation (`y = x @ w + b`):

    wte [V,C]  wpe [n_ctx,C]
    h{i}/ln_1/g [C]  h{i}/ln_1/b [C]
    h{i}/attn/c_attn/w [C,3C]  h{i}/attn/c_attn/b [3C]
    h{i}/attn/c_proj/w [C,C]   h{i}/attn/c_proj/b [C]
    h{i}/ln_2/g [C]  h{i}/ln_2/b [C]
    h{i}/mlp/c_fc/w [C,4C]     h{i}/mlp/c_fc/b [4C]
    h{i}/mlp/c_proj/w [4C,C]   h{i}/mlp/c_proj/b [C]
    ln_f/g [C]  ln_f/b [C]
    cls/w [C,num_classes]  cls/b [num_classes]      (classifier only)

(LoRA's arrays are named after what they adapt: `npgpt.lora`.)
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from .errors import NpgptError


@dataclass(frozen=True)
class GPT2Config:
    n_layer: int = 12        # transformer blocks
    n_head: int = 12         # attention heads per block
    n_embd: int = 768        # channels C
    vocab_size: int = 50257  # V
    n_ctx: int = 1024        # longest sequence (rows of wpe)

    def __post_init__(self):
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise NpgptError(f"config: {f.name} must be a positive integer, got {v!r}")
        if self.n_embd % self.n_head:
            raise NpgptError(f"config: n_embd {self.n_embd} is not divisible by n_head {self.n_head}")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d) -> "GPT2Config":
        names = {f.name for f in dataclasses.fields(cls)}
        missing = names - set(d)
        if missing:
            raise NpgptError(f"config: missing {', '.join(sorted(missing))}")
        try:
            return cls(**{k: int(d[k]) for k in names})
        except (TypeError, ValueError) as e:
            raise NpgptError(f"config: bad value ({e})") from None


# As OpenAI published them (hparams.json of each size).
PRESETS = {
    "124M": GPT2Config(n_layer=12, n_head=12, n_embd=768),
    "355M": GPT2Config(n_layer=24, n_head=16, n_embd=1024),
    "774M": GPT2Config(n_layer=36, n_head=20, n_embd=1280),
    "1558M": GPT2Config(n_layer=48, n_head=25, n_embd=1600),
}

# Hugging Face's model names for the same sizes.
HF_NAMES = {"124M": "gpt2", "355M": "gpt2-medium", "774M": "gpt2-large", "1558M": "gpt2-xl"}

# A small model for tests and demos: same structure, a few seconds to train.
TINY = GPT2Config(n_layer=2, n_head=4, n_embd=64, vocab_size=50257, n_ctx=256)


# What a file may declare: a config outside these bounds is not a GPT-2 this library can run, and
# reading it could ask for any amount of memory (npgpt.params checks a file's config against them
# before reading an array). GPT-2's largest size has 48 layers, 25 heads, 1600 channels, 50257
# tokens, 1024 positions.
PLAUSIBLE = {"n_layer": 128, "n_head": 128, "n_embd": 8192, "vocab_size": 1 << 17, "n_ctx": 8192}
MAX_CLASSES = 10_000


def implausible(config: GPT2Config, num_classes: int | None = None) -> str | None:
    """What is out of bounds in a config read from a file (`PLAUSIBLE`, `MAX_CLASSES`), or None."""
    for name, most in PLAUSIBLE.items():
        if getattr(config, name) > most:
            return f"{name} is {getattr(config, name)}, above the {most} this library accepts"
    if num_classes is not None and not 0 < num_classes <= MAX_CLASSES:
        return f"num_classes is {num_classes}, not in 1..{MAX_CLASSES}"
    return None


def preset(name: str) -> GPT2Config:
    """The config of one of OpenAI's sizes ('124M', '355M', '774M', '1558M') or 'tiny'."""
    if name == "tiny":
        return TINY
    if name not in PRESETS:
        raise NpgptError(f"unknown model size {name!r}; choose one of {', '.join(PRESETS)} or tiny")
    return PRESETS[name]


# ----------------------------------------------------------------------------- parameters

BLOCK_PARAMS = (
    "ln_1/g", "ln_1/b",
    "attn/c_attn/w", "attn/c_attn/b",
    "attn/c_proj/w", "attn/c_proj/b",
    "ln_2/g", "ln_2/b",
    "mlp/c_fc/w", "mlp/c_fc/b",
    "mlp/c_proj/w", "mlp/c_proj/b",
)


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
    """The same parameters in another dtype (float64 for gradient checks)."""
    return {k: v.astype(dtype, copy=False) for k, v in params.items()}
