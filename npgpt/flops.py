"""Counting the model: parameters, and the matmul FLOPs of a training step.

Only the linear layers are counted (c_attn, attn c_proj, c_fc, mlp c_proj): at GPT-2's sizes and
SMS lengths they are nearly all the work. Attention's score and value products (T^2 per head),
LayerNorm, GELU, the head and the optimizer are left out. A matmul [N,k] @ [k,n] is 2 N k n FLOPs;
its backward is two matmuls of the same size (dX = dY W^T and dW = X^T dY), so forward + backward
of a linear layer is 3 times its forward. These are the counts `benchmarks/finetune.py` uses.
"""
from __future__ import annotations

import numpy as np

from .config import GPT2Config
from .config import param_shapes


def param_count(config: GPT2Config, num_classes: int | None = None, names=None) -> int:
    """Number of parameters (of `names` only, when given), from `params.param_shapes`."""
    shapes = param_shapes(config, num_classes)
    return int(sum(np.prod(shapes[n]) for n in (shapes if names is None else names)))


def block_flops_per_token(config: GPT2Config) -> int:
    """Forward FLOPs of one block's linear layers for one token (one row):
    2 (3C^2 + C^2 + 4C^2 + 4C^2) = 24 C^2."""
    C = config.n_embd
    return 2 * (3 * C * C + C * C + 4 * C * C + 4 * C * C)


def dense_step_flops(config: GPT2Config, batch: int, T: int, trainable_blocks: int = 1) -> int:
    """A textbook training step (the reference's procedure): every block forward over all B*T
    rows, padding included, then the backward (2x the forward) of the trainable blocks."""
    L, K = config.n_layer, trainable_blocks
    return (L + 2 * K) * block_flops_per_token(config) * batch * T


def pooled_last_block_flops(config: GPT2Config, lengths, backward: bool = True) -> int:
    """npgpt's last block (`model.block_forward_pooled`) on a batch of messages of these true
    lengths: keys and values (2C of c_attn's 3C columns) at every real token; the query, attn
    c_proj and the MLP (C^2 + C^2 + 4C^2 + 4C^2 = 10C^2) at one row per message.
    With backward: forward + backward = 3 x forward."""
    C = config.n_embd
    lengths = np.asarray(lengths)
    fwd = 2 * int(lengths.sum()) * C * 2 * C + 2 * len(lengths) * 10 * C * C
    return 3 * fwd if backward else fwd


def prefix_flops(config: GPT2Config, tokens: int, stop: int) -> int:
    """The frozen prefix (blocks 0..stop-1) over `tokens` tokens, forward only: computed once per
    distinct message for the whole run, not once per step."""
    return stop * block_flops_per_token(config) * int(tokens)
