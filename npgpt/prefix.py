"""The frozen prefix: the activations entering the first trainable block, computed once for every
distinct token sequence, packed.

With blocks 0..d-1 frozen, the activations entering block d are a fixed function of the tokens,
so training computes them once per example and each step starts at block d (`x_start`). Here
they are computed for many sequences at once: packed one after another along one axis, about
`max_tokens` rows per pack, so each matmul runs over real tokens only (no padding), and attention
keeps each sequence to itself. With causal attention the sequences are sorted and the first tokens
a sequence shares with the one before it in its pack are computed once (`npgpt.prefix_tree`).

Sequences go through the blocks in the same packs whichever depth they start from, so starting
from a stored depth gives the same bits as starting from the embeddings. `npgpt.prefix_cache`
keeps the results on disk; `distinct_sequences` says which sequences a set of datasets needs.
"""
from __future__ import annotations

import numpy as np

from . import fastmodel, prefix_tree
from .model import PAD_ID


def distinct_sequences(datasets, padding_of):
    """The token sequences the examples of each dataset are computed as, each distinct one once
    (the SMS data holds some messages several times).

    datasets: objects with `tokens` (one id array per example), `lengths`; padding_of(dataset):
    its `npgpt.model.Padding`. An example is computed at its true length, or, when the padding is
    read (last_position pooling, no causal mask), padded with 50256 to the pad length; a dataset
    that reads the padding without a fixed pad length gets None (its activations depend on the
    batch).
    -> (seqs: list of int64 arrays, where: per dataset a list of each example's index in seqs,
        or None)"""
    first, seqs, where = {}, [], []
    for d in datasets:
        padding = padding_of(d)
        if not padding.grouping_free:
            where.append(None)
            continue
        rows = []
        for r in range(len(d)):
            n = padding.length(int(d.lengths[r]))
            ids = tuple(d.tokens[r][:n]) + (PAD_ID,) * int(n - min(len(d.tokens[r]), n))
            if ids not in first:                  # token sequence -> its row in seqs
                first[ids] = len(seqs)
                seqs.append(np.array(ids, dtype=np.int64))
            rows.append(first[ids])
        where.append(rows)
    return seqs, where


def compute(params, config, seqs, offsets, out, start_depth, depth, src=None, lora=None, causal=True,
            max_tokens=2048, progress=None) -> int:
    """Fill out [N,C] with the activations entering block `depth` of every sequence (sequence s at
    rows offsets[s]..offsets[s+1]-1), pack by pack: from the embeddings (src None), or from src,
    the activations entering block start_depth, laid out as out.
    -> the number of rows computed (fewer than N when sequences share first tokens)"""
    if causal:
        return _compute_shared(params, config, seqs, offsets, out, start_depth, depth, src, lora,
                               max_tokens, progress)
    lengths = np.diff(offsets)                                                     # [S]
    attention_of = lambda starts: fastmodel.Packed(starts, config.n_head, causal=False)
    for a, b in prefix_tree.packs(lengths, max_tokens):
        lo, hi = offsets[a], offsets[b]
        starts = offsets[a:b + 1] - lo                                             # [n+1]
        if src is None:
            ids = np.concatenate(seqs[a:b])                                        # [n_tok]
            pos = np.arange(hi - lo) - np.repeat(starts[:-1], lengths[a:b])        # [n_tok]
            x = params["wte"][ids] + params["wpe"][pos]                            # [n_tok,C]
        else:
            x = np.array(src[lo:hi])                                               # [n_tok,C]
        for i in range(start_depth, depth):
            x = fastmodel.block_infer(params, i, x, attention_of(starts), lora=lora)     # [n_tok,C]
        out[lo:hi] = x
        if progress:
            progress(int(hi - lo))
    return int(offsets[-1])


def _compute_shared(params, config, seqs, offsets, out, start_depth, depth, src, lora, max_tokens,
                    progress) -> int:
    """`compute` for causal attention, on each pack's new rows alone (see `npgpt.prefix_tree`)."""
    lengths = np.diff(offsets)                                                     # [S]
    computed = 0                                                                   # rows computed
    for members, lay in prefix_tree.packed_layouts(seqs, max_tokens):             # members [n]
        if src is None:
            x = params["wte"][lay.ids] + params["wpe"][lay.pos]                    # [n_new,C]
        else:
            x = np.asarray(src[offsets[members][lay.seq] + lay.pos])               # [n_new,C] a copy
        tree = fastmodel.SharedPrefix(*lay.tree, config.n_head)
        for i in range(start_depth, depth):
            x = fastmodel.block_infer(params, i, x, tree, lora=lora)              # [n_new,C]
        for m, j in enumerate(members):                                            # every position, shared or not
            out[offsets[j]:offsets[j + 1]] = x[lay.rows_of(m)]
        computed += len(lay.ids)
        if progress:
            progress(int(lengths[members].sum()))
    return computed
