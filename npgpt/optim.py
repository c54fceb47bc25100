"""AdamW, written out with torch.optim.AdamW's semantics.

Per trainable array p with gradient g, at step t (starting at 1):
    p = p * (1 - lr * wd)                      decoupled weight decay
    m = b1 * m + (1 - b1) * g                  first moment
    v = b2 * v + (1 - b2) * g^2                second moment
    p = p - lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)
Weight decay applies to every array, as torch does by default; `decay_1d=False` exempts the
1-D arrays (biases and LayerNorm gains), a common choice. State is keyed by parameter name.

Two companions of the step, as appendix D of "Build a Large Language Model (From Scratch)" adds
them to the training loop: `scheduled_lr` (linear warmup, then constant, linear or cosine decay)
and `clip_grad_norm` (the global L2 norm of every gradient, as torch.nn.utils.clip_grad_norm_).
"""
from __future__ import annotations

import math

import numpy as np

SCHEDULES = ("constant", "linear", "cosine")


def adamw_update(p, g, m, v, t, lr, beta1, beta2, eps, weight_decay):
    """One AdamW step on one array, in place: the formulas above (t counts from 1).

        p = p * (1 - lr * weight_decay)
        m = m + (1 - beta1) (g - m)                  (= beta1 m + (1 - beta1) g)
        v = beta2 v + (1 - beta2) g^2
        p = p - lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)

    p, g, m, v [...] (p, m, v updated in place)"""
    step_size = lr / (1 - beta1 ** t)
    bias2_sqrt = np.sqrt(1 - beta2 ** t)
    if weight_decay:
        p *= 1 - lr * weight_decay
    m += (1 - beta1) * (g - m)
    v *= beta2
    v += (1 - beta2) * (g * g)
    denom = np.sqrt(v)
    denom /= bias2_sqrt
    denom += eps
    p -= step_size * (m / denom)


class AdamW:
    """update: the function that applies one step to one array (`adamw_update` above; training
    passes `npgpt.fastops.adamw_update`, the same numbers in one pass of a Numba kernel)."""

    def __init__(self, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01, decay_1d=True,
                 update=adamw_update):
        self.lr, self.betas, self.eps = lr, betas, eps
        self.weight_decay, self.decay_1d = weight_decay, decay_1d
        self.update = update
        self.t = 0
        self.m = {}   # name -> first moment
        self.v = {}   # name -> second moment

    def step(self, params: dict, grads: dict) -> None:
        """Update params[name] in place for every name in grads."""
        self.t += 1
        b1, b2 = self.betas
        for name, g in grads.items():
            p = params[name]
            if name not in self.m:
                self.m[name] = np.zeros_like(p)
                self.v[name] = np.zeros_like(p)
            wd = self.weight_decay if (self.decay_1d or p.ndim > 1) else 0.0
            self.update(p, g, self.m[name], self.v[name], self.t, self.lr, b1, b2, self.eps, wd)

    def state_dict(self) -> dict:
        """Arrays keyed 'm/<name>', 'v/<name>' plus the step count, for checkpoints."""
        d = {f"m/{k}": a for k, a in self.m.items()}
        d.update({f"v/{k}": a for k, a in self.v.items()})
        return {"t": self.t, "arrays": d}

    def load_state_dict(self, state: dict) -> None:
        """Take t, m and v from a state_dict, as copies: steps update the moments in place, so
        sharing them would let two optimizers (or a kept state_dict) change each other."""
        self.t = int(state["t"])
        self.m = {k[2:]: np.array(a) for k, a in state["arrays"].items() if k.startswith("m/")}
        self.v = {k[2:]: np.array(a) for k, a in state["arrays"].items() if k.startswith("v/")}


def scheduled_lr(step: int, total_steps: int, peak_lr: float, schedule: str = "constant", warmup_steps: int = 0,
                 initial_lr: float = 0.0, min_lr: float = 0.0) -> float:
    """The learning rate of optimizer step `step` (0 for the first) of a run of `total_steps`:

        step s < W (warmup):  lr = initial_lr + s (peak_lr - initial_lr) / W
        after, with progress p = (s - W) / (total_steps - W), from 0 towards 1:
          constant:  lr = peak_lr
          linear:    lr = min_lr + (peak_lr - min_lr) (1 - p)
          cosine:    lr = min_lr + (peak_lr - min_lr) (1 + cos(pi p)) / 2

    Appendix D's schedule is warmup then cosine, step for step (its global_step is s)."""
    if step < warmup_steps:
        return initial_lr + step * (peak_lr - initial_lr) / warmup_steps
    if schedule == "constant":
        return peak_lr
    progress = (step - warmup_steps) / max(total_steps - warmup_steps, 1)
    if schedule == "linear":
        return min_lr + (peak_lr - min_lr) * (1.0 - progress)
    if schedule == "cosine":
        return min_lr + (peak_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}, got {schedule!r}")


def clip_grad_norm(grads: dict, max_norm: float) -> float:
    """Scale every gradient by min(1, max_norm / (norm + 1e-6)) in place, where norm is the L2 norm
    of all of them together, sqrt(sum of squares over every array), as
    torch.nn.utils.clip_grad_norm_ does. -> norm (before clipping)"""
    total = math.sqrt(sum(float(np.dot(g.ravel(), g.ravel())) for g in grads.values()))
    coef = max_norm / (total + 1e-6)
    if coef < 1.0:
        for g in grads.values():
            g *= g.dtype.type(coef)
    return total
