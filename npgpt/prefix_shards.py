"""The frozen prefix in shards: one prefix-cache entry per group of sequences, so that many
processes (on many machines) can compute it at once.

One entry of `npgpt.prefix_cache` is computed by one process. For a large training set the
distinct sequences are split into shards instead: consecutive groups in lexicographic order
(`prefix_tree.lexicographic`, so the first tokens neighbours share stay in one shard and are still
computed once), about `tokens_per_shard` tokens each (`prefix_tree.packs`). Each shard is an
ordinary entry of the cache, keyed by its own sequences' content, so

    any process that reads and writes the cache folder can compute any shard (`npgpt.distributed`
    hands the missing ones to Dask workers); a shard already there is not recomputed; training
    reads the shards as it reads the single entry (memory-mapped when they exceed the memory limit).

    views = sharded(store, compute_missing)(params, config, seqs, depth, mode, digests=...)

Bits: every operation of a block works row by row but attention, which reads one sequence's rows;
so a row does not depend on the other sequences of its pack, and a run trained on the shards
gives the parameters of a run trained on the single entry, bit for bit (tests/test_distributed.py).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np

from . import prefix_tree
from .prefix_cache import weight_digests

TOKENS_PER_SHARD = 200_000          # 124M: 600 MiB of activations, ~10 min on one core


@dataclass(eq=False)
class Shard:
    """One group of sequences and the cache entry holding their activations."""
    members: np.ndarray         # [n] indices into the full list of sequences
    seqs: list                  # those sequences, in that order (1-D int arrays)
    key: str                    # the entry's key at the depth asked

    @property
    def tokens(self) -> int:
        return int(sum(len(s) for s in self.seqs))


def plan(store, digests, seqs, depth: int, mode: str, tokens_per_shard: int = TOKENS_PER_SHARD) -> list:
    """seqs split into Shards of about tokens_per_shard tokens, in lexicographic order."""
    order = prefix_tree.lexicographic(seqs)                                        # [S]
    lengths = np.array([len(seqs[j]) for j in order], dtype=np.int64)              # [S]
    out = []
    for a, b in prefix_tree.packs(lengths, tokens_per_shard):
        members = order[a:b]
        group = [seqs[j] for j in members]
        out.append(Shard(members, group, store.keys(digests, group, depth, mode)[depth]))
    return out


def sharded(store, compute_missing, tokens_per_shard: int = TOKENS_PER_SHARD, log=None):
    """A function for `prefix_cache.dataset_activations(sharded=)`: the shards missing from `store`
    are given to compute_missing(shards, depth=, mode=, digests=, lora=, causal=, progress=) (which
    writes them to the cache), then every shard is read, verified (one still missing is computed
    here). -> one [T,C] array per sequence, views of the shards' arrays."""
    log = log or (lambda msg: None)

    def activations(params, config, seqs, depth, mode, digests=None, progress=None, lora=None, causal=True):
        digests = weight_digests(params, depth) if digests is None else digests
        shards = plan(store, digests, seqs, depth, mode, tokens_per_shard)
        missing = [s for s in shards if not store.has(s.key)]
        computed = {s.key for s in missing}
        log(f"frozen prefix in {len(shards)} shards of about {tokens_per_shard} tokens: "
            f"{len(shards) - len(missing)} in the cache {store.dir}, {len(missing)} to compute")
        if missing:
            compute_missing(missing, depth=depth, mode=mode, digests=digests, lora=lora, causal=causal,
                            progress=progress)
        reader = _reader(store, sum(s.tokens for s in shards) * config.n_embd * params["wte"].dtype.itemsize)
        views = [None] * len(seqs)
        for s in shards:
            flat, offsets = reader.activations(params, config, s.seqs, depth, mode, digests=digests, lora=lora,
                                               causal=causal)
            for i, u in enumerate(s.members):
                views[u] = flat[offsets[i]:offsets[i + 1]]
            if progress and s.key not in computed:
                progress(s.tokens)
        return views
    return activations


def _reader(store, nbytes: int):
    """The store the shards are read through: quiet (one line per shard would flood the log), and
    memory-mapping every shard when all of them together exceed the store's memory limit."""
    reader = copy.copy(store)
    reader.log = lambda msg: None
    if nbytes > store.memory_limit:
        store.log(f"frozen prefix ({nbytes / 2**20:.0f} MiB) exceeds the cache memory limit "
                  f"({store.memory_limit / 2**20:.0f} MiB): its shards are memory-mapped, streamed from disk")
        reader.memory_limit = 0
    return reader
