"""Fast inference for many texts: deduplicated, packed without padding, shared first tokens once.

    logits = packed_logits(params, config, tokens)          # tokens: list of id lists -> [N,K]

What a batch of padded texts would compute, without the padding:
- Repeated texts (the same token ids) are computed once.
- The distinct sequences are sorted in lexicographic order and packed one after another along
  one axis, about `max_tokens` rows per pack, so every matmul of blocks 0..L-2 is one large GEMM
  over real tokens only; the first tokens a sequence shares with the one before it are computed
  once (`npgpt.prefix_tree`), and attention keeps each sequence to its own rows
  (`fastmodel.SharedPrefix`).
- The last block runs only where the head reads (`fastmodel.block_forward_pooled`: keys and values
  at every real token, the rest at the pooled one), on the pack laid out as a [B,T,C] batch
  (it computes the seen rows alone, so the batch's padding costs memory, not time).

Pooling: last_token reads each sequence's last real token, so the result does not depend on which
texts share a pack: a text gets the same logits as `model.forward_cls` on it alone (to float32
round-off). last_position with a pad length reads position pad_len-1: each sequence is padded to
pad_len with 50256 first, as in training (its pads are then real rows of the pack).

Bits: a text's logits are the same bits whichever texts share its pack (the server batches
requests together and answers each with what `Classifier.predict_proba` gives its texts alone).
BLAS alone would not give that: NumPy sends a product with one row to gemv, whose sums run in
another order than gemm's, and OpenBLAS computes the head's narrow product (K = 2..4 classes)
with kernels whose sums depend on the number of rows. So a pack of one sequence runs as two
copies (the second sharing all but its last token: one more row, and no product has one row),
and the head is one float64 sum over C per logit (`head_logits`). Wider products with two rows
or more give each row the same bits whatever the other rows (tests/test_serve.py).
"""
from __future__ import annotations

import numpy as np

from . import fastmodel, fastops, ops, prefix_tree
from .model import PAD_ID, Padding

POOLINGS = ("last_token", "last_position")     # the head reads the last (padded) position


def packed_logits(params, config, tokens, pooling="last_token", pad_to=None, max_tokens=2048, progress=None):
    """Class logits [N,K] of N token sequences (lists or arrays of ids, each 1..n_ctx long).

    pooling "last_position" needs pad_to (every sequence is padded to it first).
    progress: None (a tqdm bar on stderr when there are 1000 texts or more and stderr is a
    terminal), True / False, or a function called with a number of tokens done."""
    if pooling == "last_position" and pad_to is None:
        raise ValueError("packed_logits: last_position pooling needs pad_to")
    padding = Padding(pooling, True, pad_to)
    first, seqs, where = {}, [], []
    for t in tokens:                                   # dedupe: token sequence -> its row in seqs
        n = padding.length(len(t))                     # its own length, or pad_to (last_position)
        ids = tuple(int(i) for i in t[:n]) + (PAD_ID,) * (n - min(len(t), n))
        if ids not in first:
            first[ids] = len(seqs)
            seqs.append(np.array(ids, dtype=np.int64))
        where.append(first[ids])
    K = params["cls/w"].shape[1]
    if not seqs:
        return np.zeros((0, K), np.float32)
    lengths = np.array([len(s) for s in seqs], dtype=np.int64)                 # [S]
    if lengths.min() < 1 or lengths.max() > config.n_ctx:
        raise ValueError(f"packed_logits: sequence lengths must be in 1..{config.n_ctx}")
    out = np.zeros((len(seqs), K), np.float32)                                  # [S,K]
    bar, update = _progress(progress, len(tokens), int(lengths.sum()))
    try:
        for rows, lay in prefix_tree.packed_layouts(seqs, max_tokens):         # rows [n]
            out[rows] = _pack_logits(params, config, lay)
            update(int(lengths[rows].sum()))
    finally:
        if bar is not None:
            bar.close()
    return out[np.array(where)]                                                 # [N,K]


def _pack_logits(params, config, lay):
    """Logits [S,K] of one pack of sequences (its `prefix_tree.Layout`): blocks 0..L-2 on the
    pack's new rows (shared first tokens once), the last block pooled."""
    if len(lay.pstarts) == 2:       # one sequence: run it as two (module docstring, "Bits")
        seq = lay.ids                                                           # [T] all its rows are new
        return _pack_logits(params, config, prefix_tree.layout([seq, seq], [0, len(seq) - 1]))[:1]
    L = config.n_layer
    lengths = np.diff(lay.pstarts)                                              # [S]
    x = params["wte"][lay.ids] + params["wpe"][lay.pos]                         # [N,C] new rows
    tree = fastmodel.SharedPrefix(*lay.tree, config.n_head)
    for i in range(L - 1):
        x = fastmodel.block_infer(params, i, x, tree)                          # [N,C]
    S, T, C = len(lengths), int(lengths.max()), x.shape[1]
    last = lengths - 1                                                          # [S] pooled positions
    if L == 0:
        h = x[lay.path[lay.pstarts[1:] - 1]]                                    # [S,C]
    else:
        pos = np.arange(len(lay.path)) - np.repeat(lay.pstarts[:-1], lengths)   # [P] every position
        xb = np.zeros((S, T, C), x.dtype)                                       # [S,T,C]
        xb[np.repeat(np.arange(S), lengths), pos] = x[lay.path]                 # unpacked; pads stay 0
        h, _ = fastmodel.block_forward_pooled(params, L - 1, xb, last, config.n_head)  # [S,C]
    h, _ = fastops.layernorm_forward(h, params["ln_f/g"], params["ln_f/b"])     # [S,C]
    return head_logits(h, params["cls/w"], params["cls/b"])                     # [S,K]


def head_logits(h, w, b) -> np.ndarray:
    """h @ w + b for the classifier head, each row's numbers independent of the other rows: each
    logit one sum over C in float64 (module docstring, "Bits").
    h [S,C], w [C,K], b [K] -> [S,K] in h's dtype"""
    z = np.einsum("sc,ck->sk", h.astype(np.float64), w.astype(np.float64)) + b             # [S,K]
    return z.astype(h.dtype)


def _progress(progress, n_texts, n_tokens):
    if callable(progress):
        return None, progress
    if progress is None:
        progress = n_texts >= 1000         # shown on a terminal only (npgpt.progress)
    if not progress:
        return None, lambda n: None
    from .progress import bar
    b = bar(total=n_tokens, unit="tok", desc=f"classifying {n_texts} texts", leave=False)
    return b, b.update
