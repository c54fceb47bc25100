"""`python -m npgpt.classify`: label texts with a classifier fine-tuned by `python -m npgpt.train`.

    python -m npgpt.classify --model runs/<name>/classifier.h5 "You are a winner ..." "See you at 6?"
    spam  0.973  You are a winner ...
    ham   0.991  See you at 6?

From Python:

    clf = load_classifier("runs/<name>/classifier.h5")
    labels, probs = clf.classify(["You are a winner ...", "See you at 6?"])   # probs [N]
    P = clf.predict_proba(texts)                                               # [N, num_classes]
    clf.truncated        # indices of the texts the last call cut to the length limit

A text goes through the same steps as a training message:

    text -> GPT-2 token ids -> cut to max_length -> right-padded with 50256 into a batch [B,T]
         -> forward_cls -> logits z [B,K] -> p = softmax(z) = exp(z - max z) / sum exp(z - max z)

`max_length` is the pad length training used (the longest training message, 120 tokens for the
reference), or the context length when training padded each batch to its own longest message.

Padding follows the pooling the model was trained with:
- last_token: the head reads the last real token. Attention is causal, so pad tokens after it
  cannot change it: texts are sorted by length and each batch is padded only to its longest text.
  A text gets the same probabilities alone or in any batch.
- last_position: the head reads position T-1, a pad token whose activation depends on how many
  pads precede it. So texts are padded to max_length exactly as in training (the reference's
  `classify_review` does the same). A model trained with per-batch padding (max_length null) has
  no fixed T: each batch, in the order given, is padded to its longest text as training's
  evaluation did, and a text's result then depends on the texts that share its batch.
"""
from __future__ import annotations

if __name__ == "__main__":      # `python -m npgpt.classify`: the runtime settings before NumPy loads
    from npgpt import tune_runtime
    tune_runtime()

import json
import os
import sys
from dataclasses import dataclass, field

import numpy as np

from .cli import make_parser, run
from .config import GPT2Config
from .errors import DataError, FormatError

KIND = "npgpt-classifier"
DEFAULT_BATCH_SIZE = 8


# ----------------------------------------------------------------------------- the classifier

@dataclass
class Classifier:
    """A fine-tuned GPT-2 classifier ready to label texts (see `load_classifier`)."""
    params: dict
    config: GPT2Config
    labels: list                 # class names, by label id: ["ham", "spam"]
    pooling: str                 # "last_token" or "last_position"
    max_length: int | None       # training's pad length; None: padded per batch
    tok: object                  # the GPT-2 tiktoken encoding
    meta: dict = field(default_factory=dict)
    path: str = ""
    batch_size: int = DEFAULT_BATCH_SIZE
    truncated: list = field(default_factory=list)   # set by each predict_proba / classify call

    @property
    def limit(self) -> int:
        """Tokens a text may have; longer texts are cut to their first `limit` tokens."""
        return self.max_length or self.config.n_ctx

    def encode(self, texts):
        """Token ids of each text, cut to `limit` -> (list of id lists, indices of the cut texts).

        Raises DataError naming the first text that is not a string, empty or only whitespace."""
        from .data import tokenize

        texts = check_texts(texts)
        rows = tokenize(self.tok, texts)
        truncated = np.flatnonzero(rows.lengths > self.limit).tolist()
        return rows.cut(self.limit), truncated

    def batches(self, tokens):
        """Row indices of each batch: sorted by length where padding cannot change a result."""
        lengths = np.array([len(t) for t in tokens], dtype=np.int64)            # [N]
        if self.pooling != "last_position" or self.max_length is not None:
            order = np.argsort(lengths, kind="stable")                          # [N]
        else:
            order = np.arange(len(tokens))                                      # [N]
        return [order[i:i + self.batch_size] for i in range(0, len(order), self.batch_size)]

    def logits_of_tokens(self, tokens, progress=False) -> np.ndarray:
        """Class logits [N,K] of already encoded (and cut) texts; a tqdm bar when progress."""
        from tqdm import tqdm
        from .data import make_batch
        from .lora import spec_of
        from .model import forward_cls

        lora, causal = spec_of(self.meta), self.meta.get("causal_mask", True)  # as in training
        pad_to = self.max_length if self.pooling == "last_position" or not causal else None
        if causal and (self.pooling == "last_token" or (self.pooling == "last_position" and pad_to is not None)):
            from .infer import packed_logits        # grouping cannot matter: deduplicated, sorted, packed
            return packed_logits(self.merged_params(), self.config, tokens, self.pooling, pad_to,
                                 progress=bool(progress))                        # [N,K]
        # the batched path: first_token / mean pooling, per-batch last_position, no causal mask
        # (every token then sees the padding, so texts cannot be packed without it)
        logits = np.zeros((len(tokens), len(self.labels)), np.float32)          # [N,K]
        from .cli import bar_options
        with tqdm(total=len(tokens), unit="text", desc="classifying", disable=not progress, leave=False,
                  **bar_options()) as bar:
            for rows in self.batches(tokens):
                ids, lengths = make_batch(tokens, rows, pad_to)                 # [B,T], [B]
                logits[rows] = forward_cls(self.params, self.config, ids, lengths, self.pooling,
                                           lora=lora, causal=causal)            # [B,K]
                bar.update(len(rows))
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

    def save(self, path) -> str:
        """Write the classifier (parameters, config, labels, settings) to an HDF5 file."""
        from .params import save_params
        path = os.fspath(path)
        meta = dict(self.meta, kind=KIND, labels=list(self.labels), pooling=self.pooling,
                    max_length=self.max_length,
                    id2label={str(i): s for i, s in enumerate(self.labels)})
        save_params(path, self.params, self.config, meta)
        return path

    def classify(self, texts):
        """(labels: list of N class names, probabilities [N] of those labels)."""
        P = self.predict_proba(texts)                                           # [N,K]
        k = np.argmax(P, axis=1)                                                # [N]
        return [self.labels[i] for i in k], P[np.arange(len(k)), k]


def softmax(z) -> np.ndarray:
    """Row-wise softmax in float64: exp(z - max z) / sum(exp(z - max z)). z [N,K] -> [N,K]"""
    z = np.asarray(z, dtype=np.float64)
    e = np.exp(z - z.max(axis=1, keepdims=True))                               # [N,K]
    return e / e.sum(axis=1, keepdims=True)


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


def load_classifier(path, bpe_dir=None, batch_size=DEFAULT_BATCH_SIZE) -> Classifier:
    """Read a classifier.h5 written by `python -m npgpt.train`.

    The tokenizer comes from `bpe_dir`, else the file itself (files saved since it stores
    encoder.json and vocab.bpe), else NPGPT_BPE_DIR, else the folder used in training
    when it still exists, else `npgpt.tokenizer.get_tokenizer`'s other places.
    Raises FormatError (one line, naming the file) when the file is missing, unreadable, or not
    a classifier."""
    from .params import load_params, num_classes_of
    from .tokenizer import get_tokenizer

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
    labels = meta.get("labels")
    K = num_classes_of(params)
    if not isinstance(labels, list) or not all(isinstance(s, str) for s in labels) or len(labels) != K:
        raise FormatError(f"{path}: meta labels {labels!r} do not name the {K} classes of the head")
    pooling = meta.get("pooling")
    from .model import POOLINGS
    if pooling not in POOLINGS:
        raise FormatError(f"{path}: unknown pooling {pooling!r} in meta (expected one of {', '.join(POOLINGS)})")
    max_length = meta.get("max_length")
    if max_length is not None and (not isinstance(max_length, int) or not 1 <= max_length <= config.n_ctx):
        raise FormatError(f"{path}: meta max_length {max_length!r} is not a length in 1..{config.n_ctx}")
    if meta.get("pad_id", 50256) != 50256 or meta.get("tokenizer", "gpt2") != "gpt2":
        raise FormatError(f"{path}: the model expects tokenizer {meta.get('tokenizer')!r} with pad id "
                          f"{meta.get('pad_id')!r}; only GPT-2's (pad 50256) is supported")
    train_args = meta.get("train_args") or {}
    from .tokenizer import tokenizer_from_h5
    stored = tokenizer_from_h5(path) if bpe_dir is None else None   # self-contained files carry it
    if stored is not None:
        return Classifier(params=params, config=config, labels=labels, pooling=pooling,
                          max_length=max_length, tok=stored, meta=meta, path=path, batch_size=batch_size)
    if bpe_dir is None and not os.environ.get("NPGPT_BPE_DIR"):
        trained = train_args.get("bpe_dir")
        if trained and os.path.isdir(trained):
            bpe_dir = trained
    weights = train_args.get("weights")
    tok = get_tokenizer(bpe_dir, weights_dir=(os.path.dirname(weights) or ".") if weights else None)
    return Classifier(params=params, config=config, labels=labels, pooling=pooling,
                      max_length=max_length, tok=tok, meta=meta, path=path, batch_size=batch_size)


def _peek_meta(path):
    """The meta attribute of an HDF5 file, or None if it cannot be read (load_params says why)."""
    try:
        import h5py
        with h5py.File(path, "r") as f:
            return json.loads(f.attrs.get("meta", "{}"))
    except Exception:
        return None


def _check_kind(path, meta):
    kind = meta.get("kind") if isinstance(meta, dict) else None
    if kind != KIND:
        what = f"its kind is {kind!r}" if kind else "it has no classifier metadata"
        raise FormatError(f"{path}: not a classifier file ({what}; expected a classifier.h5 "
                          "written by `python -m npgpt.train`)")


def classify(texts, model_path, bpe_dir=None):
    """Load the classifier at `model_path` and classify texts -> (labels, probabilities [N]).

    Loads the model on every call; keep a `load_classifier` result to classify repeatedly."""
    return load_classifier(model_path, bpe_dir).classify(texts)


# ----------------------------------------------------------------------------- command line

def read_lines(raw: bytes, source: str, skip_empty=False):
    """Texts of a file or stdin, one per line -> (texts, their 1-based line numbers).

    A trailing "\\r" and a UTF-8 byte-order mark are dropped. A blank (or whitespace-only) line is
    a DataError naming it unless skip_empty; so is a line that is not UTF-8."""
    from .data import split_lines
    texts, numbers = [], []
    for n, line in enumerate(split_lines(raw), start=1):
        if line.endswith(b"\r"):
            line = line[:-1]
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"{source}: line {n} is not valid UTF-8 (byte {e.start})") from None
        if not text.strip():
            if skip_empty:
                continue
            raise DataError(f"{source}: line {n} is blank (pass --skip-empty to skip blank lines)")
        texts.append(text)
        numbers.append(n)
    if not texts:
        raise DataError(f"{source}: no texts to classify")
    return texts, numbers


def shorten(text: str, width: int) -> str:
    """One display line: whitespace runs become one space, other control characters are shown
    escaped (\\x1b), and the text is cut to `width` characters with "..."."""
    s = " ".join(text.split())
    s = "".join(ch if ch.isprintable() else ch.encode("unicode_escape").decode("ascii") for ch in s)
    return s if len(s) <= width else s[:max(width - 3, 1)] + "..."


def truncation_note(names: list, limit: int) -> str:
    """One stderr line naming the texts that were cut to `limit` tokens."""
    shown = ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")
    many = len(names) > 1
    return (f"note: {len(names)} text{'s' if many else ''} ({shown}) {'have' if many else 'has'} more "
            f"than {limit} tokens; only the first {limit} tokens were used")


def build_parser():
    p = make_parser("python -m npgpt.classify",
                    "Label texts (with the classes the model was trained on: ham/spam, or your own) "
                    "with a classifier trained by python -m npgpt.train. Each line printed is: the label, "
                    "the probability the model gives that label, the text.")
    p.add_argument("texts", nargs="*", metavar="TEXT",
                   help="texts to classify; none, or '-', reads stdin, one text per line")
    p.add_argument("--model", required=True, help="the classifier, runs/<name>/classifier.h5")
    p.add_argument("--file", default=None, help="read the texts from this file, one per line ('-': stdin)")
    p.add_argument("--skip-empty", action="store_true", help="skip blank lines of --file or stdin")
    p.add_argument("--json", action="store_true",
                   help="print a JSON list (each text's label and every class's probability by name)")
    p.add_argument("--top", type=int, default=1, metavar="K",
                   help="show the K most probable classes of each text (default 1)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--bpe-dir", default=None,
                   help="folder with GPT-2's encoder.json and vocab.bpe (default: the ones stored in the model "
                        "file; older files: $NPGPT_BPE_DIR, the training run's folder, weights/, tiktoken)")
    p.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE, help="texts per forward pass")
    p.add_argument("--width", type=int, default=60, help="characters of each text shown")
    return p


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        parser.error("--batch-size must be at least 1")
    if args.width < 4:
        parser.error("--width must be at least 4")
    if args.top < 1:
        parser.error("--top must be at least 1")
    if args.texts and args.file is not None:
        parser.error("give texts as arguments or with --file, not both")
    if "-" in args.texts and len(args.texts) > 1:
        parser.error("'-' (read stdin) cannot be combined with other texts")
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(errors="backslashreplace")   # any text prints, whatever the terminal

    # the texts first: a bad input fails before the model is read
    if args.file is not None and args.file != "-":
        try:
            with open(args.file, "rb") as fh:
                raw = fh.read()
        except FileNotFoundError:
            raise DataError(f"{args.file}: no such file") from None
        texts, lines = read_lines(raw, args.file, args.skip_empty)
        names = [f"line {n}" for n in lines]
    elif args.file == "-" or not args.texts or args.texts == ["-"]:
        if sys.stdin.isatty():
            print("reading texts from stdin, one per line (end with Ctrl-D)", file=sys.stderr)
        texts, lines = read_lines(sys.stdin.buffer.read(), "<stdin>", args.skip_empty)
        names = [f"line {n}" for n in lines]
    else:
        texts = check_texts(args.texts)
        names = [f"text {i + 1}" for i in range(len(texts))]

    clf = load_classifier(args.model, args.bpe_dir, args.batch_size)
    P = clf.predict_proba(texts, progress=not args.quiet and len(texts) >= 100)   # [N,K]
    if clf.truncated:
        print(truncation_note([names[i] for i in clf.truncated], clf.limit), file=sys.stderr)
    try:
        print_results(texts, clf.labels, P, set(clf.truncated), args.json, args.width, args.top)
    except BrokenPipeError:           # the reader stopped early (`... | head`): not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0


def print_results(texts, labels, P, cut: set, as_json: bool, width: int, top: int = 1):
    """One line per text (label, its probability, the text shortened; with top K > 1 the K most
    probable labels, each with its probability), or a JSON list."""
    top = min(top, len(labels))
    order = np.argsort(-P, axis=1, kind="stable")[:, :top]                      # [N,top]
    k = order[:, 0]                                                             # [N]
    if as_json:
        out = [{"text": text, "label": labels[k[i]], "probability": float(P[i, k[i]]),
                "probabilities": {name: float(P[i, j]) for j, name in enumerate(labels)},
                "truncated": i in cut}
               for i, text in enumerate(texts)]
        if top > 1:
            for i, item in enumerate(out):
                item["top"] = [{"label": labels[j], "probability": float(P[i, j])} for j in order[i]]
        print(json.dumps(out, indent=1))
    else:
        w = max(len(s) for s in labels)
        for i, text in enumerate(texts):
            best = "  ".join(f"{labels[j]:<{w}}  {P[i, j]:.3f}" for j in order[i])
            print(f"{best}  {shorten(text, width)}")
    sys.stdout.flush()


if __name__ == "__main__":
    run(main)
