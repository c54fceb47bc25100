"""GPT-2, the textbook version: the forward over every position of every sequence, the two heads,
and the backward that walks the blocks in reverse as deep as the trainable set needs.

    ids [B,T] -> embedding -> block 0 .. block L-1 -> ln_f -> LM head (x @ wte^T)   -> [B,T,V]
                                                          -> pooling -> classifier -> [B,K]

Each block (pre-LN):  x = x + c_proj(attn(c_attn(ln_1(x))));  x = x + mlp_c_proj(gelu(c_fc(ln_2(x))))

Everything here is plain NumPy through `npgpt.ops`: it runs without Numba, and every number can be
followed by hand. Training uses `npgpt.fastmodel`, which computes the same numbers only where the
loss reads them (tests/test_fastmodel.py compares the two).

The trainable set (`trainable` argument):
    "head"  the classifier only (cls/w, cls/b)
    K (int) the classifier, ln_f and the last K blocks (K = 1 is the reference's setting)
    "all"   every array, embeddings included
    "lora"  the LoRA pairs alone (`npgpt.lora`; the head too with `lora.train_head`)
The blocks below the first trainable one are a fixed function of the tokens: `forward_prefix`
computes them, and their output can be passed back in as `x_start` to skip them.

Pooling (which positions the classifier reads):
    last_token     the last real token of each sequence (position length-1)
    last_position  position T-1, a pad token when the sequence is shorter (the reference's choice)
    first_token    position 0
    mean           the mean over the real tokens, positions 0..length-1
Every pooling is a weighted sum over positions (`pooling_weights`): one weight of 1, or 1/length
at each real token; so the head is the same code, and its backward the same three lines, for all four.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from . import ops
from .config import BLOCK_PARAMS, GPT2Config, param_shapes
from .errors import NpgptError

PAD_ID = 50256
POOLINGS = ("last_token", "last_position", "first_token", "mean")


# ----------------------------------------------------------------------------- trainable sets

def first_trainable_block(config: GPT2Config, trainable, lora=None) -> int:
    """Index of the first block whose parameters train (n_layer if none do).
    "lora": 0 when LoRA adapts the blocks (every block has pairs), n_layer when only the head."""
    if trainable == "head":
        return config.n_layer
    if trainable == "all":
        return 0
    if trainable == "lora":
        return 0 if lora is None or lora.blocks else config.n_layer
    if isinstance(trainable, (int, np.integer)) and not isinstance(trainable, bool) \
            and 0 <= trainable <= config.n_layer:
        return config.n_layer - int(trainable)
    raise NpgptError(f"trainable must be 'head', 'all', 'lora' or a number of blocks 0..{config.n_layer}, "
                     f"got {trainable!r}")


def trainable_names(config: GPT2Config, trainable, num_classes: int = 2, lora=None) -> list:
    """The parameter names that get gradients for this trainable set."""
    if trainable == "lora":
        if lora is None:
            raise NpgptError("trainable='lora' needs lora= (the LoraSpec from npgpt.lora.add_lora)")
        from .lora import trainable_names as lora_names
        return lora_names(config, lora, num_classes)
    first = first_trainable_block(config, trainable)
    names = []
    if trainable == "all":
        names += ["wte", "wpe"]
    for i in range(first, config.n_layer):
        names += [f"h{i}/{n}" for n in BLOCK_PARAMS]
    if trainable != "head":
        names += ["ln_f/g", "ln_f/b"]
    names += ["cls/w", "cls/b"]
    assert set(names) <= set(param_shapes(config, num_classes))
    return names


def check_lora(params, lora):
    """NpgptError when params hold LoRA arrays but no LoraSpec says how to apply them."""
    if lora is None and ("cls/lora_A" in params or "h0/attn/c_proj/lora_A" in params
                         or "h0/mlp/c_fc/lora_A" in params):
        raise NpgptError("params hold LoRA arrays: pass lora= (the LoraSpec of npgpt.lora)")


# ----------------------------------------------------------------------------- linear layers, plain or LoRA

class LinearSaved(NamedTuple):
    name: str                  # the layer, e.g. "h3/mlp/c_fc"
    lora: bool                 # whether it ran with its LoRA pair
    op: tuple                  # ops.LinearSaved or ops.LoraLinearSaved


def linear_forward(params, name, x, lora=None):
    """The linear layer `name` (name/w, name/b) on x, with its LoRA pair (name/lora_A, name/lora_B)
    when lora is set and the pair exists. x [...,Cin] -> y [...,Cout]"""
    w, b = params[f"{name}/w"], params[f"{name}/b"]
    if lora is not None and f"{name}/lora_A" in params:
        y, s = ops.lora_linear_forward(x, w, b, params[f"{name}/lora_A"], params[f"{name}/lora_B"], lora.scale)
        return y, LinearSaved(name, True, s)
    y, s = ops.linear_forward(x, w, b)
    return y, LinearSaved(name, False, s)


def linear_backward(dy, saved: LinearSaved, grads, need_dx=True, full=True):
    """Backward of `linear_forward`: fills grads with the LoRA pair's gradients (if it ran with
    one), or with w's and b's when full. -> dx (None unless need_dx)"""
    name = saved.name
    if saved.lora:
        dx, grads[f"{name}/lora_A"], grads[f"{name}/lora_B"] = ops.lora_linear_backward(dy, saved.op, need_dx)
        return dx
    dx, dw, db = ops.linear_backward(dy, saved.op, need_dx=need_dx, need_dw=full)
    if full:
        grads[f"{name}/w"], grads[f"{name}/b"] = dw, db
    return dx


class QkvSaved(NamedTuple):
    lora: bool
    op: object                 # ops.LinearSaved, or [(part, ops.LoraLinearSaved)] with LoRA


def qkv_forward(params, i, x, lora=None, parts="qkv"):
    """Columns `parts` (a contiguous run of q, k, v) of block i's c_attn on x. With LoRA on c_attn,
    each of q, k, v is its own LoRA linear over its column block of w (three pairs, as in
    appendix E's model, which has three Linear layers there).
    x [...,C] -> y [...,len(parts)*C]"""
    name = f"h{i}/attn/c_attn"
    w, b = params[f"{name}/w"], params[f"{name}/b"]
    C = w.shape[0]
    j0 = "qkv".index(parts[0])
    if lora is None or f"{name}/q/lora_A" not in params:
        cols = slice(j0 * C, (j0 + len(parts)) * C)
        y, s = ops.linear_forward(x, w[:, cols], b[cols])
        return y, QkvSaved(False, s)
    ys, ss = [], []
    for part in parts:
        j = "qkv".index(part)
        y, s = ops.lora_linear_forward(x, w[:, j * C:(j + 1) * C], b[j * C:(j + 1) * C],
                                       params[f"{name}/{part}/lora_A"], params[f"{name}/{part}/lora_B"],
                                       lora.scale)                                          # [...,C]
        ys.append(y)
        ss.append((part, s))
    return np.concatenate(ys, axis=-1), QkvSaved(True, ss)


def qkv_backward(dy, saved: QkvSaved, i, grads, need_dx=True, full=True):
    """Backward of `qkv_forward` -> dx, and (dw, db) of those columns when full (plain only; the
    caller stores them: the pooled block joins the query's and the keys' and values' columns)."""
    if not saved.lora:
        return ops.linear_backward(dy, saved.op, need_dx=need_dx, need_dw=full)
    C = dy.shape[-1] // len(saved.op)
    dx = None
    for j, (part, sj) in enumerate(saved.op):
        name = f"h{i}/attn/c_attn/{part}"
        dxj, grads[f"{name}/lora_A"], grads[f"{name}/lora_B"] = ops.lora_linear_backward(
            dy[..., j * C:(j + 1) * C], sj, need_dx)
        if need_dx:
            dx = dxj if dx is None else dx + dxj
    return dx, None, None


# ----------------------------------------------------------------------------- one block

class BlockSaved(NamedTuple):
    ln_1: ops.LayerNormSaved
    c_attn: QkvSaved
    attn: tuple                # ops.AttentionSaved (a fast path's attention: its own)
    c_proj: LinearSaved
    ln_2: ops.LayerNormSaved
    c_fc: LinearSaved
    gelu: np.ndarray           # GELU's input
    mlp_c_proj: LinearSaved


def block_forward(params, i, x, n_head, causal=True, lora=None):
    """Block i over every position. x [B,T,C] -> x [B,T,C], BlockSaved.
    lora: the `npgpt.lora.LoraSpec` when params hold LoRA pairs; causal=False drops the mask."""
    p = lambda n: params[f"h{i}/{n}"]
    h1, ln_1 = ops.layernorm_forward(x, p("ln_1/g"), p("ln_1/b"))                           # [B,T,C]
    qkv, c_attn = qkv_forward(params, i, h1, lora)                                          # [B,T,3C]
    a, attn = ops.attention_forward(qkv, n_head, causal=causal)                             # [B,T,C]
    o, c_proj = linear_forward(params, f"h{i}/attn/c_proj", a, lora)                        # [B,T,C]
    x1 = x + o                                                                              # [B,T,C]
    h2, ln_2 = ops.layernorm_forward(x1, p("ln_2/g"), p("ln_2/b"))                          # [B,T,C]
    f, c_fc = linear_forward(params, f"h{i}/mlp/c_fc", h2, lora)                            # [B,T,4C]
    gl, gelu = ops.gelu_forward(f)                                                          # [B,T,4C]
    m, mlp_c_proj = linear_forward(params, f"h{i}/mlp/c_proj", gl, lora)                    # [B,T,C]
    return x1 + m, BlockSaved(ln_1, c_attn, attn, c_proj, ln_2, c_fc, gelu, mlp_c_proj)     # [B,T,C]


def block_backward(dx2, saved: BlockSaved, i, grads, need_dx=True, full=True):
    """Backward of block i: fills grads[h{i}/...] and returns dx [B,T,C] (None unless need_dx).
    full=False (LoRA training): only the LoRA pairs get gradients, none of w, b, g.

    The residual x2 = x1 + m sends dx2 to both branches, and x1 = x + o likewise: the gradient
    of a sum reaches each term whole."""
    dgl = linear_backward(dx2, saved.mlp_c_proj, grads, full=full)                          # [B,T,4C]
    df = ops.gelu_backward(dgl, saved.gelu)                                                 # [B,T,4C]
    dh2 = linear_backward(df, saved.c_fc, grads, full=full)                                 # [B,T,C]
    dx1_ln, dg, db = ops.layernorm_backward(dh2, saved.ln_2)                                # [B,T,C]
    if full:
        grads[f"h{i}/ln_2/g"], grads[f"h{i}/ln_2/b"] = dg, db
    dx1 = dx2 + dx1_ln                                                                      # [B,T,C]
    da = linear_backward(dx1, saved.c_proj, grads, full=full)                               # [B,T,C]
    dqkv = ops.attention_backward(da, saved.attn)                                           # [B,T,3C]
    dh1, dw, db = qkv_backward(dqkv, saved.c_attn, i, grads, need_dx=need_dx or full, full=full)  # [B,T,C]
    if full:
        grads[f"h{i}/attn/c_attn/w"], grads[f"h{i}/attn/c_attn/b"] = dw, db
    if not need_dx and not full:
        return None
    dx_ln, dg, db = ops.layernorm_backward(dh1, saved.ln_1)                                 # [B,T,C]
    if full:
        grads[f"h{i}/ln_1/g"], grads[f"h{i}/ln_1/b"] = dg, db
    return dx1 + dx_ln if need_dx else None                                                 # [B,T,C]


# ----------------------------------------------------------------------------- the classifier head

def check_ids(ids, config):
    """ids as a [B,T] integer array of valid token ids (NpgptError otherwise)."""
    ids = np.asarray(ids)
    if ids.ndim != 2 or ids.dtype.kind not in "iu":
        raise NpgptError(f"ids must be a 2-D integer array [B,T], got shape {ids.shape} {ids.dtype}")
    if ids.shape[1] > config.n_ctx or ids.shape[1] < 1:
        raise NpgptError(f"sequence length {ids.shape[1]} is outside 1..{config.n_ctx}")
    if ids.size and (ids.min() < 0 or ids.max() >= config.vocab_size):
        raise NpgptError(f"token ids must be in 0..{config.vocab_size - 1}")
    return ids


def pooled_positions(ids, lengths=None, pooling="last_token"):
    """The position whose logits the classifier reads, per sequence.

    last_token: the last real token, lengths-1 (lengths derived from trailing pad ids when None);
    last_position: T-1 whatever the padding (the reference's choice);
    first_token: 0; mean: lengths-1, the last of the real tokens the mean runs over.
    ids [B,T] (or only its shape) -> pos [B] int64"""
    B, T = ids.shape
    if pooling == "last_position":
        return np.full(B, T - 1, dtype=np.int64)
    if pooling == "first_token":
        return np.zeros(B, dtype=np.int64)
    if pooling not in ("last_token", "mean"):
        raise NpgptError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
    if lengths is None:
        if not isinstance(ids, np.ndarray) or ids.dtype.kind not in "iu":
            raise NpgptError("lengths are needed to pool at the last token when no ids are given")
        real = ids != PAD_ID                                  # [B,T]
        # length = 1 + index of the last non-pad token (at least 1)
        lengths = np.where(real.any(axis=1), T - np.argmax(real[:, ::-1], axis=1), 1)
    lengths = np.asarray(lengths, dtype=np.int64)
    if lengths.shape != (B,) or (lengths < 1).any() or (lengths > T).any():
        raise NpgptError(f"lengths must be {B} values in 1..{T}")
    return lengths - 1


@dataclass(frozen=True)
class Padding:
    """What a classifier reads of right-padded sequences, and so what may be done to a batch
    without changing any result. The one place that decides it (training's batches and
    evaluations, the frozen prefix, inference).

    With causal attention a position sees only itself and earlier positions, so the pad tokens
    after a text's last real token change nothing at that token or before it: last_token,
    first_token and mean pooling read only real tokens. last_position reads position T-1, a pad
    token whose activation depends on how many pads precede it; and without the causal mask
    every token sees every pad. Those read the padding."""
    pooling: str
    causal: bool = True
    pad_to: int | None = None  # the fixed pad length of every batch; None: each batch's longest

    @property
    def reads_padding(self) -> bool:
        """Whether a text's logits depend on the pad tokens after it."""
        return self.pooling == "last_position" or not self.causal

    @property
    def grouping_free(self) -> bool:
        """Whether a text's logits are the same whichever texts share its batch, in any order, so
        that texts may be sorted, regrouped, deduplicated or packed along one axis (each padded
        to `length` first): no padding is read, or every batch is padded to the same length."""
        return not self.reads_padding or self.pad_to is not None

    def length(self, n_tokens: int) -> int:
        """The length a text of n_tokens is computed at on its own: its own, or the pad length
        when the padding is read (pad_to must be set then)."""
        if not self.reads_padding:
            return n_tokens
        if self.pad_to is None:
            raise ValueError("a pooling that reads the padding needs a fixed pad length here")
        return self.pad_to


def mean_weights(pos, T, dtype=np.float32):
    """Mean pooling's weights: 1/(pos[b]+1) at positions 0..pos[b] of sequence b, 0 after.
    pos [B] -> w [B,T]"""
    w = (np.arange(T)[None, :] <= np.asarray(pos)[:, None]).astype(dtype)                  # [B,T]
    return w / w.sum(axis=1, keepdims=True)


def pooling_weights(pos, T, pooling, dtype=np.float32):
    """The pooled vector of sequence b is sum_t w[b,t] h[b,t]: w is one-hot at pos[b], or for
    mean pooling `mean_weights`. pos [B] -> w [B,T]"""
    if pooling == "mean":
        return mean_weights(pos, T, dtype)
    w = np.zeros((len(pos), T), dtype)                                                     # [B,T]
    w[np.arange(len(pos)), pos] = 1
    return w


class HeadSaved(NamedTuple):
    ln_f: ops.LayerNormSaved
    weights: np.ndarray        # [B,T] the pooling weights
    cls: LinearSaved


def head_forward(params, x, pos, pooling, lora=None):
    """ln_f at every position, the pooled vector of each sequence, the classifier.
    (LayerNorm works row by row, so the pooled rows of ln_f's output are ln_f of the pooled rows;
    normalising first lets mean pooling average ln_f's outputs, as the other poolings read them.)
    x [B,T,C], pos [B] -> logits [B,K], HeadSaved"""
    h, ln_f = ops.layernorm_forward(x, params["ln_f/g"], params["ln_f/b"])                 # [B,T,C]
    w = pooling_weights(pos, x.shape[1], pooling, h.dtype)                                 # [B,T]
    pooled = np.einsum("bt,btc->bc", w, h)                                                 # [B,C]
    logits, cls = linear_forward(params, "cls", pooled, lora)                              # [B,K]
    return logits, HeadSaved(ln_f, w, cls)


def head_backward(dlogits, saved: HeadSaved, grads, need_dx=True, train_ln_f=True, train_head=True):
    """Backward of `head_forward`: the classifier's gradients (its LoRA pair's, if it has one;
    w's and b's when train_head), ln_f's when train_ln_f, and dx [B,T,C] (None unless need_dx).
    Through the pooling: each position gets the pooled vector's gradient times its weight."""
    more = need_dx or train_ln_f
    dpooled = linear_backward(dlogits, saved.cls, grads, need_dx=more, full=train_head)     # [B,C]
    if not more:
        return None
    dh = saved.weights[:, :, None] * dpooled[:, None, :]                                    # [B,T,C]
    dx, dg, db = ops.layernorm_backward(dh, saved.ln_f)                                     # [B,T,C]
    if train_ln_f:
        grads["ln_f/g"], grads["ln_f/b"] = dg, db
    return dx if need_dx else None


# ----------------------------------------------------------------------------- forward

def forward_prefix(params, config: GPT2Config, ids, stop: int, lora=None, causal=True):
    """The activations entering block `stop`: the embeddings, then blocks 0..stop-1.

    With those blocks frozen this is a fixed function of the tokens: compute it once and pass it
    back as `x_start` to `forward_cls` / `loss_and_grads`. ids [B,T] -> x [B,T,C]"""
    ids = check_ids(ids, config)
    x, _ = ops.embedding_forward(ids, params["wte"], params["wpe"])                         # [B,T,C]
    for i in range(stop):
        x, _ = block_forward(params, i, x, config.n_head, causal=causal, lora=lora)         # [B,T,C]
    return x


def forward_lm(params, config: GPT2Config, ids, lora=None):
    """Language-model logits: ids [B,T] -> logits [B,T,V] (the LM head is wte, tied)."""
    x = forward_prefix(params, config, ids, config.n_layer, lora=lora)                     # [B,T,C]
    h, _ = ops.layernorm_forward(x, params["ln_f/g"], params["ln_f/b"])                    # [B,T,C]
    return h @ params["wte"].T                                                             # [B,T,V]


def forward_cls(params, config: GPT2Config, ids=None, lengths=None, pooling="last_token",
                x_start=None, start=0, lora=None, causal=True):
    """Class logits [B,K] of a batch: blocks, ln_f, the pooled vector, the classifier.

    Either ids [B,T], or x_start [B,T,C] = forward_prefix(ids, start) with the block index `start`
    it enters (then lengths are needed for last_token and mean pooling).
    lora: the LoraSpec when params hold LoRA pairs; causal=False: attention without the mask."""
    check_lora(params, lora)
    x = forward_prefix(params, config, ids, start, lora=lora, causal=causal) if x_start is None else x_start
    pos = pooled_positions(ids if ids is not None else x[..., 0], lengths, pooling)       # [B]
    for i in range(start, config.n_layer):
        x, _ = block_forward(params, i, x, config.n_head, causal=causal, lora=lora)        # [B,T,C]
    return head_forward(params, x, pos, pooling, lora)[0]                                  # [B,K]


# ----------------------------------------------------------------------------- loss and gradients

def loss_and_grads(params, config: GPT2Config, ids, labels, trainable=1, lengths=None,
                   pooling="last_token", x_start=None, lora=None, causal=True, class_weights=None):
    """Mean cross-entropy of the classifier on a batch, and its gradient for every trainable array.

    ids [B,T] (or x_start [B,T,C], the activations entering the first trainable block, from
    `forward_prefix`), labels [B] -> (loss, grads {name: array}, logits [B,K]).

    The backward is the chain rule from the loss back: cross-entropy -> classifier -> pooling ->
    ln_f -> the blocks in reverse, stopping at the first trainable one (-> the embeddings when
    they train). No gradient is computed for a frozen array. trainable="lora": backward runs
    through every block but computes no w, b or g gradient, only the LoRA pairs' (and the head's
    own with lora.train_head). class_weights [K]: the weighted mean loss (`ops.cross_entropy_forward`)."""
    L = config.n_layer
    check_lora(params, lora)
    first = first_trainable_block(config, trainable, lora)
    full = trainable != "lora"
    labels = np.asarray(labels)
    if x_start is not None and trainable == "all":
        raise NpgptError("x_start cannot be used when the embeddings train")
    if x_start is None:
        ids = check_ids(ids, config)
        x, emb = ops.embedding_forward(ids, params["wte"], params["wpe"])                   # [B,T,C]
        for i in range(first if trainable != "all" else 0):                                 # frozen: nothing kept
            x, _ = block_forward(params, i, x, config.n_head, causal=causal, lora=lora)
    else:
        x = x_start
    pos = pooled_positions(ids if ids is not None else x[..., 0], lengths, pooling)        # [B]
    if labels.shape != (x.shape[0],):
        raise NpgptError(f"labels must have shape ({x.shape[0]},), got {labels.shape}")

    # forward, keeping what the backward needs from the first trainable block on
    saved = {}
    for i in range(first, L):
        x, saved[i] = block_forward(params, i, x, config.n_head, causal=causal, lora=lora)  # [B,T,C]
    logits, head = head_forward(params, x, pos, pooling, lora)                             # [B,K]
    loss, ce = ops.cross_entropy_forward(logits, labels, class_weights)

    # backward, in reverse
    grads = {}
    dlogits = ops.cross_entropy_backward(1.0, ce)                                          # [B,K]
    dx = head_backward(dlogits, head, grads, need_dx=first < L, train_ln_f=full and trainable != "head",
                       train_head=full or lora.train_head)                                 # [B,T,C]
    for i in reversed(range(first, L)):
        dx = block_backward(dx, saved.pop(i), i, grads, need_dx=i > first or trainable == "all",
                            full=full)                                                     # [B,T,C]
    if trainable == "all":
        grads["wte"], grads["wpe"] = ops.embedding_backward(dx, emb)
    return loss, grads, logits
