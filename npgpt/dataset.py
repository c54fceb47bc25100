"""Labelled texts as token ids, in batches: what training and evaluation read.

    tokenize        texts -> TokenRows (all ids in one flat array, with offsets: no list per text)
    make_datasets   DataFrames [Label (class id), Text, Line] -> TextDataset (ids, lengths, labels)
    pad_length      the pad length of every batch ("longest" training text, N, or per batch)
    make_batch      ids [B,T] right-padded with 50256, lengths [B]
    train_batches   one epoch's shuffled batches (seeded by seed and epoch; last partial dropped)
    eval_batches    every row, in order

Which texts may be sorted, regrouped or packed without changing a result is
`npgpt.model.Padding`'s to say (it depends on the pooling and the causal mask).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import DataError
from .progress import bar
from .tokenizer import PAD_ID

SEED = 123            # the reference's seed


@dataclass
class TextDataset:
    """One split, tokenized. Row i: tokens[i] (unpadded ids), lengths[i], labels[i]."""
    tokens: object        # TokenRows (or a list of id lists), each row already cut to the length limit
    lengths: np.ndarray   # [N] int64, len(tokens[i])
    labels: np.ndarray    # [N] int64, class ids (SMS: 0 ham / 1 spam)
    lines: np.ndarray     # [N] int64, line in SMSSpamCollection (-1 if unknown)
    pad_to: int | None    # batches are padded to this length; None: to each batch's longest
    cut: int = 0          # rows that were longer than the length limit, cut to it
    limit: int = 0        # the length limit rows were cut to (0: not recorded)

    def __len__(self) -> int:
        return len(self.tokens)

    def batch(self, indices):
        """ids [B,T] int64, lengths [B] int64, labels [B] int64 for the given rows."""
        ids, lengths = make_batch(self.tokens, indices, self.pad_to)
        return ids, lengths, self.labels[np.asarray(indices)]


def pad_length(train_lengths, padding="longest", context_length=1024):
    """The length every batch is padded to, or None to pad each batch to its own longest row.

    padding: "longest" (the longest training example, cut to context_length: the reference's 120),
    an int (a fixed length), or "batch".
    """
    if padding == "longest":
        lengths = [t if np.isscalar(t) else len(t) for t in train_lengths]   # lengths, or token lists
        return int(min(max(lengths), context_length))
    if padding == "batch":
        return None
    if isinstance(padding, (int, np.integer)) and not isinstance(padding, bool):
        if not 1 <= padding <= context_length:
            raise DataError(f"pad length {padding} is outside 1..{context_length} (the context length)")
        return int(padding)
    raise DataError(f"padding must be 'longest', 'batch' or a length, got {padding!r}")


class TokenRows:
    """Token ids of many texts in one flat array: row i is ids[offsets[i]:offsets[i+1]].

    `rows[i]` is a view of that slice (no Python list per text), `len(rows)` the number of rows,
    so a TokenRows stands wherever a list of id lists did (make_batch, the prefix cache)."""

    def __init__(self, ids, offsets):
        self.ids = np.asarray(ids, dtype=np.int64)              # [sum of lengths]
        self.offsets = np.asarray(offsets, dtype=np.int64)      # [N+1], offsets[0] = 0

    @classmethod
    def from_lists(cls, lists):
        lengths = np.array([len(t) for t in lists], dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(lengths)])
        ids = np.fromiter((i for t in lists for i in t), dtype=np.int64, count=int(offsets[-1]))
        return cls(ids, offsets)

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)                            # [N]

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i):
        return self.ids[self.offsets[i]:self.offsets[i + 1]]

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    def cut(self, limit: int) -> "TokenRows":
        """Every row cut to its first `limit` ids."""
        lengths = np.minimum(self.lengths, limit)               # [N]
        keep = np.arange(len(self.ids)) - np.repeat(self.offsets[:-1], self.lengths) < np.repeat(lengths, self.lengths)
        return TokenRows(self.ids[keep], np.concatenate([[0], np.cumsum(lengths)]))


FEW_TEXTS = 16      # fewer are encoded one by one: tiktoken's encode_batch starts a thread pool (170 us
                    # for one SMS against 9 us for encode, measured)


def tokenize(tok, texts, batch_size=1024, progress=None) -> TokenRows:
    """GPT-2 ids of every text (special tokens as plain text), encoded in batches of
    `batch_size` (tiktoken's threads; one by one under FEW_TEXTS) into one flat TokenRows.
    progress(n) after each batch."""
    texts = list(texts)
    ids, offsets = [], [np.zeros(1, np.int64)]
    end = 0
    for start in range(0, len(texts), batch_size):
        chunk = texts[start:start + batch_size]
        if len(chunk) < FEW_TEXTS:     # a server's request: tiktoken's batch would start threads for it
            lists = [tok.encode(t, disallowed_special=()) for t in chunk]
        else:
            lists = tok.encode_batch(chunk, disallowed_special=())
        lengths = np.array([len(t) for t in lists], dtype=np.int64)
        ids.append(np.fromiter((i for t in lists for i in t), dtype=np.int64, count=int(lengths.sum())))
        offsets.append(end + np.cumsum(lengths))
        end += int(lengths.sum())
        if progress:
            progress(len(lists))
    return TokenRows(np.concatenate(ids) if ids else np.zeros(0, np.int64), np.concatenate(offsets))


def make_datasets(splits, tok, padding="longest", context_length=1024, progress=False):
    """Tokenize each DataFrame of `splits` (the first is the training set) into a TextDataset.

    Each frame has columns Label (class id) and Text, optionally Line. Every split is cut to the
    same limit: the pad length, or context_length with "batch" padding. So with "longest",
    validation and test messages longer than the longest training message are truncated to it,
    as in the reference. progress: a tqdm bar over the texts when True.
    """
    total = sum(len(df) for df in splits)
    with bar(enabled=progress and total >= 5000, total=total, unit="text", desc="tokenizing", leave=False) as shown:
        encoded = [tokenize(tok, df["Text"].tolist(), progress=shown.update) for df in splits]
    pad_to = pad_length(encoded[0].lengths, padding, context_length)
    limit = pad_to if pad_to is not None else context_length
    datasets = []
    for df, rows in zip(splits, encoded):
        lines = df["Line"].to_numpy(np.int64) if "Line" in df.columns else np.full(len(df), -1, np.int64)
        empty = np.flatnonzero(rows.lengths == 0)
        if len(empty):
            raise DataError(f"message {empty[0]} (line {lines[empty[0]]}) has no tokens")
        tokens = rows.cut(limit)
        datasets.append(TextDataset(
            tokens=tokens,
            lengths=tokens.lengths,                                       # [N]
            labels=df["Label"].to_numpy(np.int64),                        # [N]
            lines=lines,                                                  # [N]
            pad_to=pad_to,
            cut=int((rows.lengths > limit).sum()),
            limit=limit))
    return tuple(datasets)


def cut_summary(datasets, names=("training", "validation", "test")) -> str:
    """One line saying how many texts of each split were cut, and to what length; "" if none was.
    ("cut 3 of 40 training, 1 of 10 test texts to 18 tokens")"""
    parts = [f"{d.cut} of {len(d)} {name}" for d, name in zip(datasets, names) if d.cut]
    if not parts:
        return ""
    return f"cut {', '.join(parts)} texts to {datasets[0].limit} tokens (--max-length sets the length)"



def make_batch(token_lists, indices, pad_to=None):
    """Right-pad the chosen rows with PAD_ID (50256) into one array.

    T = pad_to, or the longest chosen row when None; rows longer than pad_to are cut.
    Returns ids [B,T] int64 and lengths [B] int64 (real tokens per row; the last one is at
    lengths-1).
    """
    rows = [token_lists[i] for i in np.asarray(indices, dtype=np.int64).tolist()]
    if not rows:
        raise ValueError("make_batch: no rows chosen")
    lengths = np.array([len(r) for r in rows], dtype=np.int64)          # [B]
    if pad_to is not None:
        lengths = np.minimum(lengths, pad_to)
    if lengths.min() == 0:
        raise DataError("make_batch: a message has no tokens")
    T = int(pad_to) if pad_to is not None else int(lengths.max())
    ids = np.full((len(rows), T), PAD_ID, dtype=np.int64)               # [B,T]
    for b, row in enumerate(rows):
        ids[b, :lengths[b]] = row[:lengths[b]]
    return ids, lengths


def train_batches(n_examples, batch_size, seed=SEED, epoch=0):
    """Index arrays [batch_size] of one training epoch: shuffled, last partial batch dropped.

    The order depends only on (seed, epoch) (both >= 0), so a resumed run sees the same batches.
    Each index appears at most once per epoch; the n_examples % batch_size left over are skipped.
    """
    if batch_size < 1:
        raise DataError(f"batch size must be at least 1, got {batch_size}")
    n_batches = n_examples // batch_size
    if n_batches == 0:
        raise DataError(f"batch size {batch_size} is larger than the {n_examples} training examples")
    order = np.random.default_rng([seed, epoch]).permutation(n_examples)  # [N]
    return [order[b * batch_size:(b + 1) * batch_size] for b in range(n_batches)]


def eval_batches(n_examples, batch_size):
    """Index arrays covering 0..n_examples-1 in order; the last batch may be smaller."""
    if batch_size < 1:
        raise DataError(f"batch size must be at least 1, got {batch_size}")
    return [np.arange(start, min(start + batch_size, n_examples))
            for start in range(0, n_examples, batch_size)]
