"""GPT-2: the forward over blocks, the two heads, and the backward that walks the blocks in
reverse only as deep as the trainable set needs.

    ids [B,T] -> embedding -> block 0 .. block L-1 -> ln_f -> LM head (x @ wte^T)  -> [B,T,V]
                                                          -> classifier (x @ cls/w + cls/b) at one
                                                             position per sequence -> [B,K]

Each block (pre-LN):  x = x + c_proj(attn(c_attn(ln_1(x))));  x = x + mlp_c_proj(gelu(c_fc(ln_2(x))))

The trainable set (`trainable` argument):
    "head"  the classifier only (cls/w, cls/b)
    K (int) the classifier, ln_f and the last K blocks (K = 1 is the reference's setting)
    "all"   every array, embeddings included

Speed without changing a number (see `forward_prefix` and `dense`):
- The blocks below the first trainable one are a fixed function of the tokens, so their output can
  be computed once per example and passed back in as `x_start`.
- With causal attention the pooled output of sequence b depends on positions 0..pos[b] alone, so
  the blocks run on those rows only, packed one sequence after another (`seen_rows`): padding
  is never computed (`dense=False`, the default).
- The classifier reads one position per sequence, so in the last block only the keys and values
  need every position: queries, attention output, MLP, ln_f and head run at that position alone
  (`dense=False`). `dense=True` runs every position, as a textbook forward does.
"""
from __future__ import annotations

import numpy as np

from . import ops
from .config import GPT2Config
from .errors import NpgptError
from .params import BLOCK_PARAMS, param_shapes

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


def _check_lora(params, lora):
    if lora is None and ("cls/lora_A" in params or "h0/attn/c_proj/lora_A" in params
                         or "h0/mlp/c_fc/lora_A" in params):
        raise NpgptError("params hold LoRA arrays: pass lora= (the LoraSpec of npgpt.lora)")


# ----------------------------------------------------------------------------- positions read by the head

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


# ----------------------------------------------------------------------------- one block

def _p(params, i, name):
    return params[f"h{i}/{name}"]


def _lin_forward(params, name, x, lora):
    """The linear layer `name` (name/w, name/b) on x, with its LoRA pair when lora is set and
    the pair exists. -> y, saved (tagged for `_lin_backward`)"""
    w, b = params[f"{name}/w"], params[f"{name}/b"]
    if lora is not None and f"{name}/lora_A" in params:
        y, s = ops.lora_linear_forward(x, w, b, params[f"{name}/lora_A"], params[f"{name}/lora_B"], lora.scale)
        return y, ("lora", name, s)
    y, s = ops.linear_forward(x, w, b)
    return y, ("plain", name, s)


def _lin_backward(dy, saved, grads, need_dx=True, full=True):
    """Backward of `_lin_forward`: grads of the LoRA pair (if any), or of w and b when full."""
    kind, name, s = saved
    if kind == "lora":
        dx, grads[f"{name}/lora_A"], grads[f"{name}/lora_B"] = ops.lora_linear_backward(dy, s, need_dx)
        return dx
    dx, dw, db = ops.linear_backward(dy, s, need_dx=need_dx, need_dw=full)
    if full:
        grads[f"{name}/w"], grads[f"{name}/b"] = dw, db
    return dx


def _qkv_forward(params, i, x, lora, parts="qkv"):
    """Columns `parts` (a contiguous run of q, k, v) of c_attn on x. With LoRA on c_attn, each of
    q, k, v is its own LoRA linear over its column block of w (three pairs, as in appendix E).
    x [...,C] -> y [...,len(parts)*C]"""
    name = f"h{i}/attn/c_attn"
    w, b = params[f"{name}/w"], params[f"{name}/b"]
    C = w.shape[0]
    j0 = "qkv".index(parts[0])
    if lora is None or f"{name}/q/lora_A" not in params:
        cols = slice(j0 * C, (j0 + len(parts)) * C)
        y, s = ops.linear_forward(x, w[:, cols], b[cols])
        return y, ("plain", s)
    ys, ss = [], []
    for part in parts:
        j = "qkv".index(part)
        y, s = ops.lora_linear_forward(x, w[:, j * C:(j + 1) * C], b[j * C:(j + 1) * C],
                                       params[f"{name}/{part}/lora_A"], params[f"{name}/{part}/lora_B"],
                                       lora.scale)                                          # [...,C]
        ys.append(y)
        ss.append((part, s))
    return np.concatenate(ys, axis=-1), ("lora", ss)


def _qkv_backward(dy, saved, i, grads, need_dx=True, full=True):
    """Backward of `_qkv_forward` -> dx, and (dw, db) of those columns when full (plain only)."""
    kind, s = saved
    if kind == "plain":
        return ops.linear_backward(dy, s, need_dx=need_dx, need_dw=full)
    C = dy.shape[-1] // len(s)
    dx = None
    for j, (part, sj) in enumerate(s):
        name = f"h{i}/attn/c_attn/{part}"
        dxj, grads[f"{name}/lora_A"], grads[f"{name}/lora_B"] = ops.lora_linear_backward(
            dy[..., j * C:(j + 1) * C], sj, need_dx)
        if need_dx:
            dx = dxj if dx is None else dx + dxj
    return dx, None, None


def block_forward(params, i, x, n_head, save=True, starts=None, lora=None, causal=True, rows=None, tree=None):
    """Block i over every position. x [B,T,C] -> x [B,T,C] (and what backward needs, if save).

    With `starts`, x is instead [N,C]: sequences packed one after another along the rows
    (sequence s is rows starts[s]..starts[s+1]-1), forward only. Every operation but attention
    works row by row, so only attention needs to know where the sequences begin.
    With `rows` = (idx, B, T), x is [N,C] too: the rows idx (b*T + t, a causal prefix of each
    sequence, see `seen_rows`) of a [B,T] batch, forward and backward (causal attention only).
    With `tree` = (path, pstarts, first_new), x is [N,C]: the rows of sequences that share their
    first tokens, each shared row once (`npgpt.prefix_tree`), forward only, causal attention.
    lora: a `npgpt.lora.LoraSpec` when params hold LoRA pairs; causal=False drops the causal mask."""
    h1, ln1 = ops.layernorm_forward(x, _p(params, i, "ln_1/g"), _p(params, i, "ln_1/b"))    # [B,T,C]
    qkv, fc_attn = _qkv_forward(params, i, h1, lora)                                        # [B,T,3C]
    if tree is not None:
        if save or not causal:
            raise ValueError("block_forward: shared-prefix rows (tree) are forward only, causal; pass save=False")
        a, attn = ops.attention_tree_forward(qkv, *tree, n_head), None                      # [N,C]
    elif starts is not None:
        if save:
            raise ValueError("block_forward: packed sequences (starts) are forward only; pass save=False")
        a, attn = ops.attention_packed_forward(qkv, starts, n_head, causal=causal), None    # [N,C]
    elif rows is not None:
        if not causal:
            raise ValueError("block_forward: rows= needs causal attention (later rows are dropped)")
        a, attn = ops.attention_rows_forward(qkv, *rows, n_head)                            # [N,C]
    else:
        a, attn = ops.attention_forward(qkv, n_head, causal=causal)                         # [B,T,C]
    o, fc_aproj = _lin_forward(params, f"h{i}/attn/c_proj", a, lora)                        # [B,T,C]
    x1 = x + o                                                                              # [B,T,C]
    h2, ln2 = ops.layernorm_forward(x1, _p(params, i, "ln_2/g"), _p(params, i, "ln_2/b"))   # [B,T,C]
    f, fc_fc = _lin_forward(params, f"h{i}/mlp/c_fc", h2, lora)                             # [B,T,4C]
    gl, gelu = ops.gelu_forward(f)                                                          # [B,T,4C]
    m, fc_mproj = _lin_forward(params, f"h{i}/mlp/c_proj", gl, lora)                        # [B,T,C]
    x2 = x1 + m                                                                             # [B,T,C]
    saved = (ln1, fc_attn, attn, fc_aproj, ln2, fc_fc, gelu, fc_mproj, rows is not None) if save else None
    return x2, saved


def block_backward(dx2, saved, i, grads, need_dx=True, full=True):
    """Backward of block i: fills grads[h{i}/...] and returns dx [B,T,C] (None if not need_dx).
    full=False (LoRA training): only the LoRA pairs get gradients, none of w, b, g.

    The residual x2 = x1 + m sends dx2 to both branches; x1 = x + o likewise."""
    ln1, fc_attn, attn, fc_aproj, ln2, fc_fc, gelu, fc_mproj, packed = saved
    dgl = _lin_backward(dx2, fc_mproj, grads, full=full)                                    # [B,T,4C]
    df = ops.gelu_backward(dgl, gelu)                                                       # [B,T,4C]
    dh2 = _lin_backward(df, fc_fc, grads, full=full)                                        # [B,T,C]
    dx1_ln, dg, db = ops.layernorm_backward(dh2, ln2)                                       # [B,T,C]
    if full:
        grads[f"h{i}/ln_2/g"], grads[f"h{i}/ln_2/b"] = dg, db
    dx1 = dx2 + dx1_ln                                                                      # [B,T,C]
    da = _lin_backward(dx1, fc_aproj, grads, full=full)                                     # [B,T,C]
    dqkv = (ops.attention_rows_backward if packed else ops.attention_backward)(da, attn)   # [B,T,3C]
    dh1, dw, db = _qkv_backward(dqkv, fc_attn, i, grads, need_dx=need_dx or full, full=full)  # [B,T,C]
    if full:
        grads[f"h{i}/attn/c_attn/w"], grads[f"h{i}/attn/c_attn/b"] = dw, db
    if not need_dx and not full:
        return None
    dx_ln, dg, db = ops.layernorm_backward(dh1, ln1)                                        # [B,T,C]
    if full:
        grads[f"h{i}/ln_1/g"], grads[f"h{i}/ln_1/b"] = dg, db
    if not need_dx:
        return None
    return dx1 + dx_ln                                                                      # [B,T,C]


def seen_rows(B, T, pos):
    """The rows of a flattened [B*T] batch that the pooled outputs depend on: positions 0..pos[b] of
    each sequence (causal attention: later positions, padding among them, are never read).
    -> idx [N] (sorted row numbers b*T + t), qrow [B] (where each pooled row sits within idx)"""
    seen = np.arange(T)[None, :] <= np.asarray(pos)[:, None]                               # [B,T]
    idx = np.flatnonzero(seen)                                                             # [N]
    qrow = np.cumsum(np.asarray(pos) + 1) - 1                                              # [B]
    return idx, qrow


def block_forward_pooled(params, i, x, pos, n_head, save=True, lora=None, packed=False):
    """Block i computed only where the classifier reads: keys and values at the positions a pooled
    query can see (0..pos[b], no padding after it), the rest (query, attention output, MLP) at
    position pos[b] of each sequence only. Causal attention only.

    x [B,T,C], pos [B] -> y [B,C] (equal to block_forward(x)[b, pos[b]]).
    packed=True: x is [N,C] instead, the rows `seen_rows(B, max(pos)+1, pos)` alone (positions
    0..pos[b] of each sequence, one sequence after another), and the backward returns theirs."""
    B, C = len(pos), x.shape[-1]
    T = int(np.max(pos)) + 1 if packed else x.shape[1]
    idx, qrow = seen_rows(B, T, pos)                                                        # [N], [B]
    xs = x if packed else x.reshape(B * T, C)[idx]                                          # [N,C]
    h1, ln1 = ops.layernorm_forward(xs, _p(params, i, "ln_1/g"), _p(params, i, "ln_1/b"))   # [N,C]
    kv_seen, fc_kv = _qkv_forward(params, i, h1, lora, parts="kv")                          # [N,2C]
    kv = np.zeros((B * T, 2 * C), kv_seen.dtype)                                            # [B*T,2C]
    kv[idx] = kv_seen                                        # back in place; unseen rows stay 0
    kv = kv.reshape(B, T, 2 * C)                                                            # [B,T,2C]
    q, fc_q = _qkv_forward(params, i, h1[qrow], lora, parts="q")                            # [B,C]
    a, attn = ops.attention_query_forward(q, kv, pos, n_head)                               # [B,C]
    o, fc_aproj = _lin_forward(params, f"h{i}/attn/c_proj", a, lora)                        # [B,C]
    x1 = xs[qrow] + o                                                                       # [B,C] (= x[b, pos[b]] + o)
    h2, ln2 = ops.layernorm_forward(x1, _p(params, i, "ln_2/g"), _p(params, i, "ln_2/b"))   # [B,C]
    f, fc_fc = _lin_forward(params, f"h{i}/mlp/c_fc", h2, lora)                             # [B,4C]
    gl, gelu = ops.gelu_forward(f)                                                          # [B,4C]
    m, fc_mproj = _lin_forward(params, f"h{i}/mlp/c_proj", gl, lora)                        # [B,C]
    x2 = x1 + m                                                                             # [B,C]
    fuse = (_p(params, i, "attn/c_attn/w"), _p(params, i, "ln_1/b"))   # for the first trainable block
    saved = ((B, T, C, packed), pos, idx, qrow, ln1, fc_kv, fc_q, attn, fc_aproj, ln2, fc_fc, gelu, fc_mproj,
             fuse) if save else None
    return x2, saved


def block_backward_pooled(dx2, saved, i, grads, need_dx=True, full=True):
    """Backward of `block_forward_pooled`: dx2 [B,C] at the pooled rows -> dx [B,T,C]
    (packed: dx [N,C] of the seen rows).

    c_attn's gradient is the query part (from pooled rows) next to the key/value part (the seen
    rows); the residual carries dx1 to x only at the pooled rows; unseen rows get zero gradient.
    full=False (LoRA training): only the LoRA pairs get gradients.
    As the first trainable block (need_dx=False, full), ln_1 and c_attn's gradients come from one
    product (`ops.layernorm_linear_param_grads`): no gradient for ln_1's output is formed."""
    shape, pos, idx, qrow, ln1, fc_kv, fc_q, attn, fc_aproj, ln2, fc_fc, gelu, fc_mproj, fuse = saved
    B, T, C, packed = shape
    dgl = _lin_backward(dx2, fc_mproj, grads, full=full)                                    # [B,4C]
    df = ops.gelu_backward(dgl, gelu)                                                       # [B,4C]
    dh2 = _lin_backward(df, fc_fc, grads, full=full)                                        # [B,C]
    dx1_ln, dg, db = ops.layernorm_backward(dh2, ln2)                                       # [B,C]
    if full:
        grads[f"h{i}/ln_2/g"], grads[f"h{i}/ln_2/b"] = dg, db
    dx1 = dx2 + dx1_ln                                                                      # [B,C]
    da = _lin_backward(dx1, fc_aproj, grads, full=full)                                     # [B,C]
    dq, dkv = ops.attention_query_backward(da, attn)                                        # [B,C], [B,T,2C]
    dkv_seen = dkv.reshape(B * T, 2 * C)[idx]                                               # [N,2C]
    if full and not need_dx and fc_q[0] == fc_kv[0] == "plain":
        _attn_ln_param_grads(dq, dkv_seen, qrow, ln1, fuse, i, grads)
        return None
    dh1_q, dwq, dbq = _qkv_backward(dq, fc_q, i, grads, full=full)                          # [B,C]
    dh1, dwkv, dbkv = _qkv_backward(dkv_seen, fc_kv, i, grads, need_dx=need_dx or full, full=full)  # [N,C]
    if full:
        grads[f"h{i}/attn/c_attn/w"] = np.concatenate([dwq, dwkv], axis=1)                  # [C,3C]
        grads[f"h{i}/attn/c_attn/b"] = np.concatenate([dbq, dbkv])                          # [3C]
    if not need_dx and not full:
        return None
    dh1[qrow] += dh1_q                                                                      # [N,C]
    dx_seen, dg, db = ops.layernorm_backward(dh1, ln1)                                      # [N,C]
    if full:
        grads[f"h{i}/ln_1/g"], grads[f"h{i}/ln_1/b"] = dg, db
    if not need_dx:
        return None
    dx_seen[qrow] += dx1                                                                    # residual
    if packed:
        return dx_seen                                                                      # [N,C]
    dx = np.zeros((B * T, C), dx_seen.dtype)                                                # [B*T,C]
    dx[idx] = dx_seen
    return dx.reshape(B, T, C)                                                              # [B,T,C]


def _attn_ln_param_grads(dq, dkv_seen, qrow, ln1, fuse, i, grads):
    """c_attn's and ln_1's gradients of the pooled block when its input needs none:
    M = xhat^T [dq | dkv], the query columns over the pooled rows, key and value over the seen ones.
    dq [B,C], dkv_seen [N,2C] -> grads h{i}/attn/c_attn/w, /b, h{i}/ln_1/g, /b"""
    x, mean, rstd, g = ln1                                                                  # [N,C], [N], [N], [C]
    w, b = fuse                                                                             # [C,3C], [C]
    C = x.shape[1]
    xhat = (x - mean[:, None]) * rstd[:, None]                                              # [N,C]
    M = np.empty((C, 3 * C), np.result_type(xhat, dq))                                      # [C,3C]
    np.matmul(xhat[qrow].T, dq, out=M[:, :C])                                               # [C,C]
    np.matmul(xhat.T, dkv_seen, out=M[:, C:])                                               # [C,2C]
    dc = np.concatenate([dq.sum(axis=0), dkv_seen.sum(axis=0)])                             # [3C]
    dw, dg, db = ops.layernorm_linear_param_grads(M, dc, w, g, b)
    grads[f"h{i}/attn/c_attn/w"], grads[f"h{i}/attn/c_attn/b"] = dw, dc
    grads[f"h{i}/ln_1/g"], grads[f"h{i}/ln_1/b"] = dg, db


# ----------------------------------------------------------------------------- forward

def _check_ids(ids, config):
    ids = np.asarray(ids)
    if ids.ndim != 2 or ids.dtype.kind not in "iu":
        raise NpgptError(f"ids must be a 2-D integer array [B,T], got shape {ids.shape} {ids.dtype}")
    if ids.shape[1] > config.n_ctx or ids.shape[1] < 1:
        raise NpgptError(f"sequence length {ids.shape[1]} is outside 1..{config.n_ctx}")
    if ids.size and (ids.min() < 0 or ids.max() >= config.vocab_size):
        raise NpgptError(f"token ids must be in 0..{config.vocab_size - 1}")
    return ids


def forward_prefix(params, config: GPT2Config, ids, stop: int, lora=None, causal=True):
    """The activations entering block `stop`: embeddings, then blocks 0..stop-1, nothing saved.

    With those blocks frozen this is a fixed function of the tokens: compute it once and pass it
    back as `x_start` to `forward_cls` / `loss_and_grads`. ids [B,T] -> x [B,T,C]"""
    ids = _check_ids(ids, config)
    x, _ = ops.embedding_forward(ids, params["wte"], params["wpe"])                         # [B,T,C]
    for i in range(stop):
        x, _ = block_forward(params, i, x, config.n_head, save=False, lora=lora, causal=causal)  # [B,T,C]
    return x


def forward_prefix_packed(params, config: GPT2Config, seqs, stop: int, lora=None, causal=True):
    """`forward_prefix` for sequences of different lengths without padding: their tokens are packed
    along one axis, so each matmul runs over all of them at once, and attention keeps each sequence
    to itself. seqs: list of 1-D token arrays [T_s] -> list of [T_s,C] arrays (views of one array)"""
    lengths = np.array([len(s) for s in seqs])
    if len(seqs) == 0 or lengths.min() < 1 or lengths.max() > config.n_ctx:
        raise NpgptError(f"packed sequences need lengths in 1..{config.n_ctx}")
    ids = np.concatenate(seqs)                                                             # [N]
    if ids.dtype.kind not in "iu" or ids.min() < 0 or ids.max() >= config.vocab_size:
        raise NpgptError(f"token ids must be integers in 0..{config.vocab_size - 1}")
    starts = np.concatenate([[0], np.cumsum(lengths)])                                     # [S+1]
    pos = np.arange(len(ids)) - np.repeat(starts[:-1], lengths)                            # [N] position in its sequence
    x = params["wte"][ids] + params["wpe"][pos]                                            # [N,C]
    for i in range(stop):
        x, _ = block_forward(params, i, x, config.n_head, save=False, starts=starts, lora=lora,
                             causal=causal)                                                # [N,C]
    return np.split(x, starts[1:-1])


def forward_lm(params, config: GPT2Config, ids, lora=None):
    """Language-model logits: ids [B,T] -> logits [B,T,V] (LM head tied to wte)."""
    x = forward_prefix(params, config, ids, config.n_layer, lora=lora)                     # [B,T,C]
    h, _ = ops.layernorm_forward(x, params["ln_f/g"], params["ln_f/b"])                    # [B,T,C]
    return h @ params["wte"].T                                                             # [B,T,V]


def _pooled_last_block(dense, causal, pooling):
    """Whether the last block may run at the pooled positions only: it needs causal attention
    (a query then sees keys 0..pos only) and one position per sequence (not mean pooling)."""
    return not dense and causal and pooling != "mean"


def _packed_blocks(dense, causal, start, L):
    """Whether blocks start..L-1 may run on the seen rows alone (positions 0..pos[b]): with causal
    attention no pooled output depends on a later position."""
    return not dense and causal and start < L


def mean_weights(pos, T, dtype=np.float32):
    """Mean pooling's weights: 1/(pos[b]+1) at positions 0..pos[b] of sequence b, 0 after.
    pos [B] -> w [B,T]"""
    w = (np.arange(T)[None, :] <= np.asarray(pos)[:, None]).astype(dtype)                  # [B,T]
    return w / w.sum(axis=1, keepdims=True)


def _cls_forward(params, config, x, start, pos, save_from, dense, lora=None, causal=True,
                 pooling="last_token"):
    """Blocks start..L-1 on x [B,T,C], then ln_f and the head at pos (or, for mean pooling, the
    mean of ln_f's output over positions 0..pos[b]). Saves what backward needs for blocks
    >= save_from (and for ln_f/head when save_from <= L).

    Not dense (with causal attention): the blocks run on the seen rows alone, positions 0..pos[b]
    of each sequence packed one after another (`seen_rows`): the padding after pos[b] is never
    computed, and each matmul runs over the batch's real tokens only."""
    L = config.n_layer
    B = x.shape[0]
    rows = np.arange(B)
    saved = {}
    packed = _packed_blocks(dense, causal, start, L)
    if packed:
        Tp, C = int(pos.max()) + 1, x.shape[2]
        idx, _ = seen_rows(B, Tp, pos)                                                     # [N]
        saved["packed"] = (x.shape, Tp, idx)
        x = x[:, :Tp].reshape(B * Tp, C)[idx]                                              # [N,C]
    for i in range(start, L):
        last = (i == L - 1)
        if last and _pooled_last_block(dense, causal, pooling):
            x, saved[i] = block_forward_pooled(params, i, x, pos, config.n_head, save=i >= save_from,
                                               lora=lora, packed=packed)                   # [B,C]
        else:
            x, saved[i] = block_forward(params, i, x, config.n_head, save=i >= save_from, lora=lora,
                                        causal=causal, rows=(idx, B, Tp) if packed else None)  # [B,T,C]
    if packed and pooling == "mean":         # the seen rows back on the [B,Tp] grid, zeros after pos
        grid = np.zeros((B * Tp, C), x.dtype)
        grid[idx] = x
        x = grid.reshape(B, Tp, C)                                                         # [B,Tp,C]
    if pooling == "mean":                    # ln_f at every position, then the mean of the real ones
        h_all, saved["ln_f"] = ops.layernorm_forward(x, params["ln_f/g"], params["ln_f/b"])  # [B,T,C]
        w = mean_weights(pos, x.shape[1], h_all.dtype)                                     # [B,T]
        saved["mean"] = w
        h = np.einsum("bt,btc->bc", w, h_all)                                              # [B,C]
    else:
        if x.ndim == 3:                      # dense, or no block ran: read the pooled rows now
            saved["pool"] = x.shape
            x = x[rows, pos]                                                               # [B,C]
        h, saved["ln_f"] = ops.layernorm_forward(x, params["ln_f/g"], params["ln_f/b"])    # [B,C]
    logits, saved["cls"] = _lin_forward(params, "cls", h, lora)                            # [B,K]
    return logits, saved


def forward_cls(params, config: GPT2Config, ids=None, lengths=None, pooling="last_token",
                dense=False, x_start=None, start=0, lora=None, causal=True):
    """Class logits [B,K] at one position per sequence (see `pooled_positions`), or the mean
    over the real tokens with pooling="mean".

    Either ids [B,T], or x_start [B,T,C] = forward_prefix(ids, start) with the block index `start`
    it enters (then lengths are needed for last_token and mean pooling).
    lora: the LoraSpec when params hold LoRA pairs; causal=False: attention without the mask."""
    _check_lora(params, lora)
    if x_start is None:
        x_start = forward_prefix(params, config, ids, start, lora=lora, causal=causal)
    pos = pooled_positions(ids if ids is not None else x_start[..., 0], lengths, pooling)
    logits, _ = _cls_forward(params, config, x_start, start, pos, save_from=config.n_layer + 1,
                             dense=dense, lora=lora, causal=causal, pooling=pooling)
    return logits


# ----------------------------------------------------------------------------- loss and gradients

def loss_and_grads(params, config: GPT2Config, ids, labels, trainable=1, lengths=None,
                   pooling="last_token", dense=False, x_start=None, lora=None, causal=True):
    """Mean cross-entropy of the classifier on a batch, and its gradient for every trainable array.

    ids [B,T] (or x_start [B,T,C], the activations entering the first trainable block, from
    `forward_prefix`), labels [B] -> (loss, grads {name: array}, logits [B,K]).
    No gradient is computed for a frozen array, and backward stops at the first trainable block.
    trainable="lora" (with lora=, the LoraSpec): the LoRA pairs alone train (and the head with
    lora.train_head); backward then runs through every block but computes no w, b or g gradient."""
    L = config.n_layer
    _check_lora(params, lora)
    first = first_trainable_block(config, trainable, lora)
    full = trainable != "lora"
    labels = np.asarray(labels)
    if x_start is None:
        ids = _check_ids(ids, config)
        if trainable == "all":
            x_start, emb = ops.embedding_forward(ids, params["wte"], params["wpe"])         # [B,T,C]
        else:
            x_start = forward_prefix(params, config, ids, first, lora=lora, causal=causal)  # [B,T,C]
    elif trainable == "all":
        raise NpgptError("x_start cannot be used when the embeddings train")
    pos = pooled_positions(ids if ids is not None else x_start[..., 0], lengths, pooling)
    if labels.shape != (x_start.shape[0],):
        raise NpgptError(f"labels must have shape ({x_start.shape[0]},), got {labels.shape}")

    # forward, saving from the first trainable block on
    logits, saved = _cls_forward(params, config, x_start, first, pos, save_from=first, dense=dense,
                                 lora=lora, causal=causal, pooling=pooling)
    loss, ce = ops.cross_entropy_forward(logits, labels)

    # backward, in reverse, as deep as the trainable set needs
    grads = {}
    dlogits = ops.cross_entropy_backward(1.0, ce)                                          # [B,K]
    head_only = trainable == "head" or (trainable == "lora" and first == L)
    dh = _lin_backward(dlogits, saved["cls"], grads, need_dx=not head_only,
                       full=full or lora.train_head)                                       # [B,C]
    if head_only:
        return loss, grads, logits
    dx, dg, db = ops.layernorm_backward(dh if "mean" not in saved else
                                        saved["mean"][:, :, None] * dh[:, None, :],        # [B,T,C]
                                        saved["ln_f"])                                     # [B,C]
    if full:
        grads["ln_f/g"], grads["ln_f/b"] = dg, db
    if "pool" in saved:                      # dense: scatter the pooled rows back into [B,T,C]
        d = np.zeros(saved["pool"], dx.dtype)
        d[np.arange(len(pos)), pos] = dx
        dx = d
    if "packed" in saved and pooling == "mean":   # the grid's seen rows
        dx = dx.reshape(-1, dx.shape[-1])[saved["packed"][2]]                              # [N,C]
    for i in reversed(range(first, L)):
        need_dx = i > first or trainable == "all"
        if i == L - 1 and _pooled_last_block(dense, causal, pooling):
            dx = block_backward_pooled(dx, saved[i], i, grads, need_dx=need_dx, full=full)  # [N,C]
        else:
            dx = block_backward(dx, saved[i], i, grads, need_dx=need_dx, full=full)         # [N,C]
    if "packed" in saved and dx is not None:      # the seen rows back in [B,T,C]; the rest is 0
        shape, Tp, idx = saved["packed"]
        d = np.zeros((shape[0] * Tp, shape[2]), dx.dtype)
        d[idx] = dx
        dx = np.zeros(shape, dx.dtype)
        dx[:, :Tp] = d.reshape(shape[0], Tp, shape[2])                                     # [B,T,C]
    if trainable == "all":
        grads["wte"], grads["wpe"] = ops.embedding_backward(dx, emb)
    return loss, grads, logits
