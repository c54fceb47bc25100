"""LoRA (low-rank adaptation, appendix E of "Build a Large Language Model (From Scratch)").

Every adapted linear layer keeps its weights frozen and learns a low-rank update:

    y = x W + b + (alpha / r) (x A) B          A [in,r], B [r,out]

A starts like `torch.nn.init.kaiming_uniform_(A, a=sqrt(5))` on an [in,r] tensor (torch takes
fan_in = r there, so A ~ U(-1/sqrt(r), 1/sqrt(r))) and B at zero, so training starts from the
unchanged model. The math is `ops.lora_linear_forward` / `ops.lora_linear_backward`.

The arrays are named after the matrices they adapt. GPT-2's fused `c_attn` produces q, k and v;
appendix E's model has three separate Linear layers there, so `c_attn` gets three pairs, one per
column block:

    h{i}/attn/c_attn/q/lora_A [C,r]   h{i}/attn/c_attn/q/lora_B [r,C]     (and k, v)
    h{i}/attn/c_proj/lora_A   [C,r]   h{i}/attn/c_proj/lora_B   [r,C]
    h{i}/mlp/c_fc/lora_A      [C,r]   h{i}/mlp/c_fc/lora_B      [r,4C]
    h{i}/mlp/c_proj/lora_A    [4C,r]  h{i}/mlp/c_proj/lora_B    [r,C]
    cls/lora_A                [C,r]   cls/lora_B                [r,K]

Targets: "attn" (q, k, v, attention output), "mlp" (both MLP matrices), "head" (the classifier).
`LoraSpec` (rank, alpha, targets, train_head) is what the model needs besides the arrays; it is
saved in the classifier file's meta (`meta["lora"]`), so the file alone says how to apply them.

    python -m npgpt.lora merge RUN/classifier.h5 --out merged.h5

folds W + (alpha/r) A B into plain weights: a classifier file without LoRA arrays that gives the
same probabilities.
"""
from __future__ import annotations

if __name__ == "__main__":      # `python -m npgpt.lora`: the command line, npgpt.cli.lora
    from npgpt.cli import hand_over
    hand_over("lora")

import dataclasses
from dataclasses import dataclass

import numpy as np

from .errors import NpgptError

TARGETS = ("attn", "mlp", "head")


@dataclass(frozen=True)
class LoraSpec:
    rank: int
    alpha: float
    targets: tuple = TARGETS
    train_head: bool = False     # the head's own cls/w, cls/b train (and it gets no LoRA pair)

    def __post_init__(self):
        if not isinstance(self.rank, (int, np.integer)) or self.rank < 1:
            raise NpgptError(f"LoRA rank must be a positive integer, got {self.rank!r}")
        if not self.alpha > 0:
            raise NpgptError(f"LoRA alpha must be positive, got {self.alpha!r}")
        bad = [t for t in self.targets if t not in TARGETS]
        if bad or not self.targets:
            raise NpgptError(f"LoRA targets must be some of {', '.join(TARGETS)}, got {list(self.targets)}")
        if self.train_head and "head" in self.targets:
            object.__setattr__(self, "targets", tuple(t for t in self.targets if t != "head"))
        object.__setattr__(self, "targets", tuple(t for t in TARGETS if t in self.targets))
        if not self.targets and not self.train_head:
            raise NpgptError("LoRA needs at least one target (the head alone trains with --trainable-blocks head)")

    @property
    def scale(self) -> float:
        return float(self.alpha) / self.rank

    @property
    def blocks(self) -> bool:
        """Whether any transformer block is adapted (else backward can stop at the head)."""
        return "attn" in self.targets or "mlp" in self.targets

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["targets"] = list(self.targets)
        return d

    @classmethod
    def from_dict(cls, d) -> "LoraSpec":
        try:
            return cls(rank=int(d["rank"]), alpha=float(d["alpha"]), targets=tuple(d["targets"]),
                       train_head=bool(d.get("train_head", False)))
        except (KeyError, TypeError, ValueError) as e:
            raise NpgptError(f"bad LoRA settings {d!r} ({e})") from None


def spec_of(meta) -> LoraSpec | None:
    """The LoraSpec saved in a file's meta, or None when the model has no LoRA arrays."""
    d = (meta or {}).get("lora") if isinstance(meta, dict) else None
    return LoraSpec.from_dict(d) if d else None


# ----------------------------------------------------------------------------- names and shapes

def adapted(config, targets, num_classes=2) -> dict:
    """The adapted matrices: prefix -> (in, out), in model order. c_attn's three column blocks
    are `h{i}/attn/c_attn/q` etc."""
    C = config.n_embd
    out = {}
    for i in range(config.n_layer):
        if "attn" in targets:
            for part in "qkv":
                out[f"h{i}/attn/c_attn/{part}"] = (C, C)
            out[f"h{i}/attn/c_proj"] = (C, C)
        if "mlp" in targets:
            out[f"h{i}/mlp/c_fc"] = (C, 4 * C)
            out[f"h{i}/mlp/c_proj"] = (4 * C, C)
    if "head" in targets:
        out["cls"] = (C, num_classes)
    return out


def lora_shapes(config, spec: LoraSpec, num_classes=2) -> dict:
    """name -> shape of every LoRA array for this spec."""
    shapes = {}
    for prefix, (n_in, n_out) in adapted(config, spec.targets, num_classes).items():
        shapes[f"{prefix}/lora_A"] = (n_in, spec.rank)
        shapes[f"{prefix}/lora_B"] = (spec.rank, n_out)
    return shapes


def trainable_names(config, spec: LoraSpec, num_classes=2) -> list:
    """The arrays that train with trainable="lora": the LoRA pairs (+ cls/w, cls/b with train_head)."""
    names = list(lora_shapes(config, spec, num_classes))
    if spec.train_head:
        names += ["cls/w", "cls/b"]
    return names


def is_lora_name(name: str) -> bool:
    return name.endswith("/lora_A") or name.endswith("/lora_B")


# ----------------------------------------------------------------------------- add and merge

def add_lora(params: dict, config, rank: int, alpha: float | None = None, seed: int = 0,
             targets=TARGETS, train_head=False) -> LoraSpec:
    """Add fresh LoRA arrays to params (in place): A ~ U(-1/sqrt(r), 1/sqrt(r)), B = 0.
    alpha defaults to rank (scale 1). Returns the LoraSpec to pass to the model as `lora=`."""
    spec = LoraSpec(rank=int(rank), alpha=float(rank if alpha is None else alpha),
                    targets=tuple(targets), train_head=train_head)
    K = params["cls/b"].shape[0] if "cls/b" in params else 2
    dtype = params["wte"].dtype
    rng = np.random.default_rng(seed)
    bound = 1.0 / np.sqrt(spec.rank)
    for name, shape in lora_shapes(config, spec, K).items():
        if name.endswith("/lora_A"):
            params[name] = rng.uniform(-bound, bound, size=shape).astype(dtype)
        else:
            params[name] = np.zeros(shape, dtype)
    return spec


def merge(params: dict, config, spec: LoraSpec) -> dict:
    """A new parameter dict without LoRA arrays: each adapted W becomes W + (alpha/r) A B
    (computed in float64, stored in W's dtype); b is unchanged."""
    out = {k: v for k, v in params.items() if not is_lora_name(k)}
    C = config.n_embd
    K = params["cls/b"].shape[0]
    for prefix in adapted(config, spec.targets, K):
        delta = spec.scale * (params[f"{prefix}/lora_A"].astype(np.float64)
                              @ params[f"{prefix}/lora_B"].astype(np.float64))    # [in,out]
        if "/c_attn/" in prefix:
            j = "qkv".index(prefix[-1])
            wname = prefix[:-2] + "/w"
            w = out[wname].astype(np.float64)            # a fresh copy of [C,3C]
            w[:, j * C:(j + 1) * C] += delta
            out[wname] = w.astype(params[wname].dtype)
        else:
            wname = f"{prefix}/w"
            out[wname] = (params[wname].astype(np.float64) + delta).astype(params[wname].dtype)
    return out


def count(config, spec: LoraSpec, num_classes=2) -> int:
    """Trainable parameters with this spec (124M, r = 16, 2 classes: 2,666,528, as in appendix E)."""
    n = sum(int(np.prod(s)) for s in lora_shapes(config, spec, num_classes).values())
    if spec.train_head:
        n += config.n_embd * num_classes + num_classes
    return n
