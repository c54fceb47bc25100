"""A trained classifier: load it from its file, label texts.

    clf = load_classifier("runs/<name>/classifier.h5")
    labels, probs = clf.classify(["You are a winner ...", "See you at 6?"])   # probs [N]
    P = clf.predict_proba(texts)                                               # [N, num_classes]
    clf.truncated        # indices of the texts the last call cut to the length limit

A text goes through the same steps as a training message:

    text -> GPT-2 token ids -> cut to max_length -> the model -> logits z [K]
         -> p = softmax(z) = exp(z - max z) / sum exp(z - max z)

`max_length` is the pad length training used (the longest training message, 120 tokens for the
reference), or None when training padded each batch to its own longest message. A text is cut to
it only where the model reads a fixed pad length (last_position pooling, or no causal mask);
otherwise inference reads up to the model's context, n_ctx tokens, however short the training
texts were (`limit`).

Padding follows what the model reads (`npgpt.model.Padding`):
- last_token (and first_token, mean) with causal attention: pad tokens after the last real token
  cannot change a result, so texts run deduplicated and packed with no padding at all
  (`npgpt.infer`), or sorted by length with each batch padded only to its longest text. A text
  gets the same probabilities alone or among any others.
- last_position: the head reads position T-1, a pad token whose activation depends on how many
  pads precede it, so texts are padded to max_length exactly as in training (the reference's
  `classify_review` does the same). A model trained with per-batch padding (max_length null), or
  without the causal mask, has no such fixed length: each batch, in the order given, is padded to
  its longest text as training's evaluation did, and a text's result then depends on the texts
  that share its batch.

`python -m npgpt.classify` is the command line over this (npgpt.cli.classify).
"""
from __future__ import annotations

if __name__ == "__main__":      # `python -m npgpt.classify`: the command line, npgpt.cli.classify
    from npgpt.cli import hand_over
    hand_over("classify")

import os
from dataclasses import dataclass, field

import numpy as np

from .config import GPT2Config
from .errors import DataError, FormatError, quote
from .ops import softmax

KIND = "npgpt-classifier"
DEFAULT_BATCH_SIZE = 8


# ----------------------------------------------------------------------------- the classifier

@dataclass
class Classifier:
    """A fine-tuned GPT-2 classifier ready to label texts (see `load_classifier`)."""
    params: dict
    config: GPT2Config
    labels: list                 # class names, by label id: ["ham", "spam"]
    pooling: str                 # "last_token", "last_position", "first_token" or "mean"
    max_length: int | None       # training's pad length; None: padded per batch
    tok: object                  # the GPT-2 tiktoken encoding
    meta: dict = field(default_factory=dict)
    path: str = ""
    batch_size: int = DEFAULT_BATCH_SIZE
    truncated: list = field(default_factory=list)   # set by each predict_proba / classify call
    bpe_dir: str | None = None   # the tokenizer folder it was loaded with (None: its file's own copy)
    bpe_files: dict | None = field(default=None, repr=False)   # the BPE files its file stores

    @property
    def limit(self) -> int:
        """Tokens a text may have; longer texts are cut to their first `limit` tokens: training's
        pad length where the model reads the padding (`padding.pad_to`), else the context n_ctx."""
        return self.padding.pad_to or self.config.n_ctx

    @property
    def limit_fix(self) -> str:
        """How to read longer texts, for a note on cut ones: "" when the limit is the context."""
        if self.limit == self.config.n_ctx:
            return ""
        return (f"the model reads the fixed length of its training ({self.pooling} pooling"
                f"{'' if self.causal else ', no causal mask'}); train with --max-length N for longer texts")

    @property
    def text_column(self) -> str:
        """The table column training read the texts from: where a table to classify has them too."""
        return self.meta.get("text_column") or training_setting(self.meta, "text_column") or "text"

    @property
    def label_column(self) -> str:
        """The table column training read the labels from."""
        return self.meta.get("label_column") or training_setting(self.meta, "label_column") or "label"

    @property
    def causal(self) -> bool:
        return self.meta.get("causal_mask", True)

    @property
    def padding(self):
        """What this model reads of padded texts (`npgpt.model.Padding`)."""
        from .model import Padding
        reads = self.pooling == "last_position" or not self.causal
        return Padding(self.pooling, self.causal, self.max_length if reads else None)

    def encode(self, texts):
        """Token ids of each text, cut to `limit` -> (TokenRows, indices of the cut texts).

        Raises DataError naming the first text that is not a string, empty or only whitespace."""
        from .dataset import tokenize

        texts = check_texts(texts)
        rows = tokenize(self.tok, texts)
        truncated = np.flatnonzero(rows.lengths > self.limit).tolist()
        return rows.cut(self.limit), truncated

    def batches(self, tokens):
        """Row indices of each batch: sorted by length where grouping cannot change a result."""
        lengths = np.array([len(t) for t in tokens], dtype=np.int64)            # [N]
        order = np.argsort(lengths, kind="stable") if self.padding.grouping_free else np.arange(len(tokens))
        return [order[i:i + self.batch_size] for i in range(0, len(order), self.batch_size)]

    def logits_of_tokens(self, tokens, progress=False) -> np.ndarray:
        """Class logits [N,K] of already encoded (and cut) texts; a progress bar when progress."""
        from . import infer
        if self.packs:
            return infer.packed_logits(self.merged_params(), self.config, tokens, self.pooling,
                                       self.padding.pad_to, progress=bool(progress))  # [N,K]
        return self._batched_logits(tokens, self.padding.pad_to, progress)

    @property
    def packs(self) -> bool:
        """Whether texts run packed (`npgpt.infer`): each text's numbers are then the same bits
        whichever texts share its call (infer's "Bits"), so a server may batch requests together."""
        from . import infer
        padding = self.padding
        return padding.grouping_free and padding.causal and self.pooling in infer.POOLINGS

    def _batched_logits(self, tokens, pad_to, progress) -> np.ndarray:
        """The batched path: first_token and mean pooling, per-batch last_position, no causal
        mask (every token then sees the padding, so texts cannot run packed without it)."""
        from .dataset import make_batch
        from .fastmodel import forward_cls
        from .lora import spec_of
        from .progress import bar

        lora = spec_of(self.meta)
        logits = np.zeros((len(tokens), len(self.labels)), np.float32)          # [N,K]
        with bar(enabled=bool(progress), total=len(tokens), unit="text", desc="classifying", leave=False) as b:
            for rows in self.batches(tokens):
                ids, lengths = make_batch(tokens, rows, pad_to)                 # [B,T], [B]
                logits[rows] = forward_cls(self.params, self.config, ids, lengths, self.pooling,
                                           lora=lora, causal=self.causal)      # [B,K]
                b.update(len(rows))
        return logits

    def merged_params(self) -> dict:
        """The parameters to run without LoRA arrays: self.params, or for a LoRA model each W
        folded into W + (alpha/r) A B once (`npgpt.lora.merge`), the same function to float32
        rounding, so that packed inference (`npgpt.infer`) applies."""
        from .lora import merge, spec_of
        spec = spec_of(self.meta)
        if spec is None:
            return self.params
        cached = self.__dict__.get("_merged")
        if cached is None or cached[0] is not self.params:
            cached = (self.params, merge(self.params, self.config, spec))
            self.__dict__["_merged"] = cached
        return cached[1]

    def predict_proba(self, texts, progress=False) -> np.ndarray:
        """Class probabilities [N, num_classes] (columns in the order of `labels`)."""
        tokens, self.truncated = self.encode(texts)
        return softmax(self.logits_of_tokens(tokens, progress))                # [N,K]

    def predict(self, texts, progress=False) -> list:
        """The most probable class name of each text."""
        P = self.predict_proba(texts, progress)                                 # [N,K]
        return [self.labels[k] for k in np.argmax(P, axis=1)]

    def explain(self, text: str, label=None):
        """Each token's gradient x input for the logit of `label` (None: the predicted one):
        `npgpt.explain.explain` -> Explanation."""
        from .explain import explain
        return explain(self, text, label)

    def save(self, path) -> str:
        """Write the classifier (parameters, config, labels, settings and the tokenizer's two files,
        so that it works offline from any folder) to an HDF5 file."""
        from .params import save_params
        path = os.fspath(path)
        meta = dict(self.meta, kind=KIND, labels=list(self.labels), pooling=self.pooling,
                    max_length=self.max_length,
                    id2label={str(i): s for i, s in enumerate(self.labels)})
        from .tokenizer import bpe_files_of
        files = self.bpe_files or bpe_files_of(self.tok) or classifier_bpe_files(self.path, self.meta, self.bpe_dir)
        save_params(path, self.params, self.config, meta, files=files)
        return path

    def classify(self, texts):
        """(labels: list of N class names, probabilities [N] of those labels)."""
        P = self.predict_proba(texts)                                           # [N,K]
        k = np.argmax(P, axis=1)                                                # [N]
        return [self.labels[i] for i in k], P[np.arange(len(k)), k]


def check_texts(texts) -> list:
    """The texts as a list (a single string is one text); DataError for a non-string, an empty or
    whitespace-only text, naming it by its 1-based position."""
    if isinstance(texts, str):
        texts = [texts]
    texts = list(texts)
    n = len(texts)
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise DataError(f"text {i + 1} of {n} is not a string ({type(text).__name__})")
        if not text.strip():
            raise DataError(f"text {i + 1} of {n} is empty" + (" (only whitespace)" if text else ""))
    return texts


# ----------------------------------------------------------------------------- loading

def training_setting(meta: dict, name: str):
    """A setting of the run that trained a classifier: from its saved run configuration
    (`run_config`), or from `train_args` in files written before there was one."""
    for key in ("run_config", "train_args"):
        d = meta.get(key)
        if isinstance(d, dict) and d.get(name) is not None:
            return d[name]
    return None


def load_classifier(path, bpe_dir=None, batch_size=DEFAULT_BATCH_SIZE) -> Classifier:
    """Read a classifier.h5 written by `python -m npgpt.train`, `npgpt.fit` or `Classifier.save`.

    The tokenizer comes from `bpe_dir`, else the file itself (files saved since it stores
    encoder.json and vocab.bpe), else NPGPT_BPE_DIR, else the folder used in training
    when it still exists, else `npgpt.tokenizer.get_tokenizer`'s other places.
    Raises FormatError (one line, naming the file) when the file is missing, unreadable, or not
    a classifier.

    The kernels this process will run are loaded from Numba's cache (compiled apart first when it
    is cold: `fastops.load_compiled_kernels`), so a classifier gives the same bits in every process
    that loads it: a notebook, the server, a Dask worker."""
    from .fastops import load_compiled_kernels
    from .params import load_params, num_classes_of

    path = os.fspath(path)
    if os.path.isdir(path):
        inside = os.path.join(path, "classifier.h5")
        hint = f"; this looks like a run folder: pass {inside}" if os.path.isfile(inside) else ""
        raise FormatError(f"{path}: is a folder, expected a classifier file (runs/<name>/classifier.h5){hint}")
    if not os.path.exists(path):
        raise FormatError(f"{path}: no such file (train a classifier with `python -m npgpt.train`; "
                          "it is saved as runs/<name>/classifier.h5)")
    if batch_size < 1:
        raise DataError(f"batch size must be at least 1, got {batch_size}")
    meta = _peek_meta(path)
    if meta is not None:              # fail before reading the arrays of, say, a 6 GB GPT-2 file
        _check_kind(path, meta)
    params, config, meta = load_params(path)
    _check_kind(path, meta)
    labels, pooling, max_length = _check_meta(path, meta, num_classes_of(params), config)
    tok, files = _tokenizer_of(path, meta, bpe_dir)
    load_compiled_kernels(log=lambda msg: None)
    return Classifier(params=params, config=config, labels=labels, pooling=pooling, max_length=max_length,
                      tok=tok, meta=meta, path=path, batch_size=batch_size, bpe_dir=bpe_dir, bpe_files=files)


def _check_meta(path, meta, K, config):
    """The labels, pooling and max_length a classifier file's meta gives, checked."""
    from .model import POOLINGS
    labels = meta.get("labels")
    if not isinstance(labels, list) or not all(isinstance(s, str) for s in labels) or len(labels) != K:
        raise FormatError(f"{path}: meta labels {quote(labels)} do not name the {K} classes of the head")
    if len(set(labels)) != len(labels):
        dup = next(s for s in labels if labels.count(s) > 1)
        raise FormatError(f"{path}: meta labels name class {quote(dup)} twice")
    pooling = meta.get("pooling")
    if pooling not in POOLINGS:
        raise FormatError(f"{path}: unknown pooling {quote(pooling)} in meta (expected one of {', '.join(POOLINGS)})")
    max_length = meta.get("max_length")
    if max_length is not None and (not isinstance(max_length, int) or not 1 <= max_length <= config.n_ctx):
        raise FormatError(f"{path}: meta max_length {quote(max_length)} is not a length in 1..{config.n_ctx}")
    if meta.get("pad_id", 50256) != 50256 or meta.get("tokenizer", "gpt2") != "gpt2":
        raise FormatError(f"{path}: the model expects tokenizer {quote(meta.get('tokenizer'))} with pad id "
                          f"{quote(meta.get('pad_id'))}; only GPT-2's (pad 50256) is supported")
    return labels, pooling, max_length


def _tokenizer_of(path, meta, bpe_dir):
    """The GPT-2 encoding for a classifier file: bpe_dir, else the file's own, else the places
    `get_tokenizer` looks (the training run's BPE folder first, when it still exists).
    -> (encoding, the BPE files the file stores or None)"""
    from .tokenizer import bpe_files_from_h5, encoding_from_bytes, get_tokenizer
    stored = bpe_files_from_h5(path) if bpe_dir is None else None   # self-contained files carry it
    if stored is not None:
        return encoding_from_bytes(stored, path), stored
    return get_tokenizer(*_bpe_places(meta, bpe_dir)), None


def _bpe_places(meta, bpe_dir):
    """(bpe_dir, weights_dir) for `npgpt.tokenizer`'s search, for a file without its own copy:
    bpe_dir, else the training run's BPE folder when it still exists; the folder of its weights."""
    if bpe_dir is None and not os.environ.get("NPGPT_BPE_DIR"):
        trained = training_setting(meta, "bpe_dir")
        if trained and os.path.isdir(trained):
            bpe_dir = trained
    weights = training_setting(meta, "weights")
    return bpe_dir, (os.path.dirname(weights) or ".") if weights else None


def classifier_bpe_files(path, meta, bpe_dir=None) -> dict:
    """The two BPE files a classifier file written from the file at `path` must carry: the ones it
    stores, else those in bpe_dir, else those `load_classifier` would find for it (sha256-checked
    in every case: GPT-2's two files, wherever they come from)."""
    from .tokenizer import bpe_file_bytes, bpe_files_from_h5, check_bpe_bytes
    stored = bpe_files_from_h5(path) if path and os.path.isfile(path) else None
    if stored is not None:
        check_bpe_bytes(stored, path)
        return stored
    return bpe_file_bytes(*_bpe_places(meta, bpe_dir))


def _peek_meta(path):
    """The meta attribute of an HDF5 file, or None if it cannot be read (load_params says why)."""
    from .params import read_header
    try:
        return read_header(path)[2]
    except FormatError:
        return None


def _check_kind(path, meta):
    kind = meta.get("kind") if isinstance(meta, dict) else None
    if kind != KIND:
        what = f"its kind is {quote(kind)}" if kind else "it has no classifier metadata"
        raise FormatError(f"{path}: not a classifier file ({what}; expected a classifier.h5 "
                          "written by `python -m npgpt.train`)")


def classify(texts, model_path, bpe_dir=None):
    """Load the classifier at `model_path` and classify texts -> (labels, probabilities [N]).

    Loads the model on every call; keep a `load_classifier` result to classify repeatedly."""
    return load_classifier(model_path, bpe_dir).classify(texts)
