"""GPT-2 hyper-parameters and OpenAI's four published sizes."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

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


def preset(name: str) -> GPT2Config:
    """The config of one of OpenAI's sizes ('124M', '355M', '774M', '1558M') or 'tiny'."""
    if name == "tiny":
        return TINY
    if name not in PRESETS:
        raise NpgptError(f"unknown model size {name!r}; choose one of {', '.join(PRESETS)} or tiny")
    return PRESETS[name]
