"""Sequences that begin alike, computed once: the shared first tokens of many sequences.

With causal attention the activation at position t, in every block, depends only on tokens
0..t. Two sequences that share their first k tokens therefore have the same activations at
positions 0..k-1, and the frozen prefix needs them once. The SMS data shows why this pays: many
spam messages begin alike ("FREE", "URGENT! You have won", "Sunshine Quiz"); of its 41,358
distinct tokens at true length, 4,707 (11.4%) are such repeats.

Sorted in lexicographic order, a sequence shares with the one just before it the longest prefix
it shares with any earlier one. So each sequence reads its first k tokens' rows from its
predecessor (which may itself have read them from its own) and computes the rest:

    path   for each sequence, the row that holds each of its positions (shared rows first)
    new    the rows each sequence computes: positions first_new[s].. of sequence s

Every operation of a block except attention works row by row, so it runs on the new rows alone;
attention (`fastops.attention_tree_forward`) reads each sequence's rows through its path.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def lexicographic(seqs) -> np.ndarray:
    """Indices of seqs in lexicographic order of their tokens. seqs: list of 1-D int arrays -> [S]"""
    keys = [tuple(int(t) for t in s) for s in seqs]
    return np.array(sorted(range(len(seqs)), key=keys.__getitem__), dtype=np.int64)


def common_prefix(a, b) -> int:
    """Number of leading tokens a and b share."""
    n = min(len(a), len(b))
    diff = np.flatnonzero(np.asarray(a[:n]) != np.asarray(b[:n]))
    return int(diff[0]) if len(diff) else n


def shared_lengths(seqs) -> np.ndarray:
    """For sequences in the order given: how many first tokens each takes from the one before it
    (at most its length - 1: every sequence computes at least its last row). -> [S]"""
    out = np.zeros(len(seqs), dtype=np.int64)
    for j in range(1, len(seqs)):
        out[j] = min(common_prefix(seqs[j - 1], seqs[j]), len(seqs[j]) - 1)
    return out


@dataclass
class Layout:
    """Where each position of a group of sequences lives, in a compact array of new rows."""
    ids: np.ndarray        # [N] the token id of each new row
    pos: np.ndarray        # [N] its position in its sequence
    seq: np.ndarray        # [N] the sequence (index in the group) that computes it
    path: np.ndarray       # [P] for sequence s, path[pstarts[s]:pstarts[s+1]] = its rows, position by position
    pstarts: np.ndarray    # [S+1]
    first_new: np.ndarray  # [S] positions first_new[s].. are rows sequence s computes

    @property
    def tree(self):
        """The arguments `fastops.attention_tree_forward` takes after qkv (path, pstarts, first_new)."""
        return self.path, self.pstarts, self.first_new

    def rows_of(self, s) -> np.ndarray:
        """The rows holding positions 0..T_s-1 of sequence s. -> [T_s]"""
        return self.path[self.pstarts[s]:self.pstarts[s + 1]]


def layout(seqs, shared=None) -> Layout:
    """The shared-prefix layout of sequences in the order given (sort them with `lexicographic`
    for the most sharing): sequence j reads its first shared[j] tokens' rows from j-1.
    shared: `shared_lengths(seqs)` when None (the first sequence shares nothing whatever it says)."""
    shared = shared_lengths(seqs) if shared is None else np.array(shared, dtype=np.int64)  # [S]
    lengths = np.array([len(s) for s in seqs], dtype=np.int64)                  # [S]
    if not len(seqs):
        empty = np.zeros(0, np.int64)
        return Layout(empty, empty, empty, empty, np.zeros(1, np.int64), empty)
    shared[0] = 0
    pstarts = np.concatenate([[0], np.cumsum(lengths)])                         # [S+1]
    path = np.empty(int(pstarts[-1]), dtype=np.int64)                           # [P]
    ids, pos, seq = [], [], []
    n = 0
    for j, s in enumerate(seqs):
        k, T = int(shared[j]), int(lengths[j])
        if k:
            path[pstarts[j]:pstarts[j] + k] = path[pstarts[j - 1]:pstarts[j - 1] + k]
        path[pstarts[j] + k:pstarts[j + 1]] = np.arange(n, n + T - k)
        ids.append(np.asarray(s[k:], dtype=np.int64))
        pos.append(np.arange(k, T, dtype=np.int64))
        seq.append(np.full(T - k, j, dtype=np.int64))
        n += T - k
    return Layout(np.concatenate(ids), np.concatenate(pos), np.concatenate(seq), path, pstarts, shared)


def packs(lengths, max_tokens: int) -> list:
    """Consecutive sequences grouped into packs of about max_tokens rows (at least one sequence each).
    lengths [S] -> list of (first, stop) sequence index ranges"""
    out, k = [], 0
    csum = np.cumsum(lengths)
    while k < len(lengths):
        base = csum[k - 1] if k else 0
        n = int(np.searchsorted(csum[k:] - base, max_tokens, side="right"))
        out.append((k, k + max(1, n)))
        k += max(1, n)
    return out


def packed_layouts(seqs, max_tokens: int):
    """The sequences in lexicographic order, in packs of about max_tokens computed rows, each pack
    with its layout (sharing stops at a pack's first sequence).
    -> list of (members [n] indices into seqs, Layout of those sequences in that order)"""
    order = lexicographic(seqs)                                                 # [S]
    ordered = [seqs[j] for j in order]
    shared = shared_lengths(ordered)                                            # [S]
    own = np.array([len(s) for s in ordered], dtype=np.int64) - shared          # [S] rows each computes
    return [(order[a:b], layout(ordered[a:b], shared[a:b])) for a, b in packs(own, max_tokens)]
