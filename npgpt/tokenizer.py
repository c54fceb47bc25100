"""GPT-2's byte-level BPE tokenizer, as a tiktoken encoding built from local files.

GPT-2 turns text into ids in two steps: a regex splits the text into pieces (words, numbers,
punctuation, runs of spaces), then each piece's UTF-8 bytes are merged pairwise by the 50000
ranked rules of `vocab.bpe` until no rule applies; `encoder.json` maps the 50257 resulting tokens
to ids. Every byte is a token, so any text encodes and decodes back exactly.

Where the two files come from, first match wins:
  1. the `bpe_dir` argument;
  2. the directory in the environment variable NPGPT_BPE_DIR;
  3. the files that come with downloaded weights: `<folder>/` or `<folder>/<size>/` of the
     `weights_dir` given (the folder of --weights), of `weights/` under the current folder, and
     of the per-user weights folder, ~/.cache/npgpt/weights (`npgpt.userpaths`), where
     `python -m npgpt.weights download` puts them;
  4. tiktoken's own `gpt2` encoding (its cache, else a download).
Both files are checked against the sha256 values OpenAI published (the ones tiktoken hard-codes).

A classifier file carries the two files itself (those its tokenizer was built from,
`bpe_files_of`, else `bpe_file_bytes`, when it is saved; `tokenizer_from_h5` when it is loaded),
so it needs none of these places.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import stat
from pathlib import Path

from .errors import FormatError, NpgptError
from .fileio import sha256_file
from .userpaths import user_weights_dir, weights_dirs
from .weights import TOKENIZER_SHA256

PAD_ID = 50256          # <|endoftext|>, also used to right-pad classification batches
EOT = "<|endoftext|>"
N_VOCAB = 50257

BPE_FILES = TOKENIZER_SHA256          # GPT-2's two files and their published sha256
BPE_SIZES = {"encoder.json": 1042301, "vocab.bpe": 456318}    # bytes: a stored copy is read only at these
WEIGHT_SIZES = ("124M", "355M", "774M", "1558M")


def get_tokenizer(bpe_dir=None, weights_dir=None):
    """The GPT-2 `tiktoken.Encoding`, from the first place listed in the module docstring.

    An explicit `bpe_dir` (or NPGPT_BPE_DIR) must hold both files; the weights folders are only
    used when both files are there. Raises FormatError if a file's sha256 is wrong, NpgptError
    if no source works.
    """
    d = find_bpe_dir(bpe_dir, weights_dir)
    return _encoding_from_dir(d) if d is not None else _encoding_from_tiktoken()


def find_bpe_dir(bpe_dir=None, weights_dir=None):
    """The folder places 1-3 of the module docstring name, or None (tiktoken's turn)."""
    if bpe_dir is not None:
        if Path(bpe_dir).is_file():
            raise NpgptError(f"--bpe-dir {bpe_dir}: is a file, expected the folder holding encoder.json and vocab.bpe")
        return str(Path(bpe_dir).resolve())
    env_dir = os.environ.get("NPGPT_BPE_DIR")
    if env_dir:
        return str(Path(env_dir).resolve())
    roots = ([weights_dir] if weights_dir is not None else []) + weights_dirs()
    for root in map(Path, roots):
        for d in [root] + [root / size for size in WEIGHT_SIZES]:
            if all((d / name).is_file() for name in BPE_FILES):
                return str(d.resolve())
    return None


TIKTOKEN_URL = "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/"


def bpe_file_bytes(bpe_dir=None, weights_dir=None) -> dict:
    """{"encoder.json": bytes, "vocab.bpe": bytes} from where `get_tokenizer` finds them (tiktoken's
    cache last), sha256-checked: what a classifier file stores to be self-contained."""
    d = find_bpe_dir(bpe_dir, weights_dir)
    if d is not None:
        for name in BPE_FILES:
            if not (Path(d) / name).is_file():
                raise NpgptError(f"{Path(d) / name}: no such file (the tokenizer needs encoder.json and "
                                 "vocab.bpe; --bpe-dir names their folder)")
            check_bpe_file(Path(d) / name)
        return {name: (Path(d) / name).read_bytes() for name in BPE_FILES}
    import tiktoken.load
    try:
        return {name: tiktoken.load.read_file_cached(TIKTOKEN_URL + name, digest)
                for name, digest in BPE_FILES.items()}
    except Exception as e:
        raise NpgptError(f"cannot find GPT-2's encoder.json and vocab.bpe: pass --bpe-dir "
                         f"(tiktoken: {type(e).__name__})") from None


def encoding_from_bytes(files: dict, source: str = "the classifier file"):
    """The GPT-2 encoding from the two files' contents, after checking their sha256."""
    import tempfile
    check_bpe_bytes(files, source)
    with tempfile.TemporaryDirectory(prefix="npgpt-bpe-") as d:
        for name, data in files.items():
            Path(d, name).write_bytes(data)
        return _build_encoding(Path(d))


def check_bpe_bytes(files: dict, source: str = "the classifier file") -> None:
    """Raise FormatError unless `files` holds both BPE files with OpenAI's sha256."""
    for name, expected in BPE_FILES.items():
        if name not in files:
            raise FormatError(f"{source}: tokenizer file {name} is missing")
        digest = hashlib.sha256(files[name]).hexdigest()
        if digest != expected:
            raise FormatError(f"{source}: stored {name} has sha256 {digest}, not that of GPT-2's ({expected})")


def tokenizer_from_h5(path):
    """The encoding stored in a classifier file (`tokenizer/` arrays), or None if it has none."""
    files = bpe_files_from_h5(path)
    return None if files is None else encoding_from_bytes(files, str(path))


def bpe_files_from_h5(path):
    """{"encoder.json": bytes, "vocab.bpe": bytes} stored in a classifier file, or None if it has
    none. Each file is read only when its array has GPT-2's exact size (`BPE_SIZES`);
    `encoding_from_bytes` checks the sha256."""
    from .h5read import open_h5, read_bytes
    with open_h5(path) as f:
        if "tokenizer" not in f:
            return None
        return {name: read_bytes(f, path, f"tokenizer/{name}", size)
                for name, size in BPE_SIZES.items() if f"tokenizer/{name}" in f}


def encode(tok, text: str) -> list[int]:
    """Token ids of `text`; a literal "<|endoftext|>" in the text is plain text, not id 50256."""
    return tok.encode(text, disallowed_special=())


def decode(tok, ids) -> str:
    return tok.decode([int(i) for i in ids])


def check_bpe_file(path: Path) -> None:
    """Raise FormatError unless `path` (encoder.json or vocab.bpe) has OpenAI's sha256. The folder
    may be named by a model file (its training's BPE folder): only a regular file of GPT-2's exact
    size is hashed, so such a name can make npgpt read nothing else."""
    expected = BPE_FILES[path.name]
    st = os.stat(path)
    if not stat.S_ISREG(st.st_mode) or st.st_size != BPE_SIZES[path.name]:
        raise FormatError(f"{path}: not GPT-2's {path.name} (a {BPE_SIZES[path.name]}-byte file)")
    digest = sha256_file(path)
    if digest != expected:
        raise FormatError(f"{path}: sha256 {digest} is not that of GPT-2's {path.name} ({expected})")


@functools.lru_cache(maxsize=None)
def _encoding_from_dir(bpe_dir: str):
    d = Path(bpe_dir)
    for name in BPE_FILES:
        if not (d / name).is_file():
            raise NpgptError(f"{d / name}: no such file (the tokenizer needs encoder.json and vocab.bpe; "
                             "--bpe-dir names their folder)")
        check_bpe_file(d / name)
    return _build_encoding(d)


def _build_encoding(d: Path):
    import tiktoken
    import tiktoken.load
    import tiktoken_ext.openai_public

    with _without_tiktoken_file_cache():
        ranks = tiktoken.load.data_gym_to_mergeable_bpe_ranks(
            vocab_bpe_file=str(d / "vocab.bpe"), encoder_json_file=str(d / "encoder.json"),
            vocab_bpe_hash=BPE_FILES["vocab.bpe"], encoder_json_hash=BPE_FILES["encoder.json"])
    enc = tiktoken.Encoding(name="gpt2", pat_str=tiktoken_ext.openai_public.r50k_pat_str,
                            mergeable_ranks=ranks, special_tokens={EOT: PAD_ID},
                            explicit_n_vocab=N_VOCAB)
    enc.npgpt_bpe_files = {name: (d / name).read_bytes() for name in BPE_FILES}   # for bpe_files_of
    return enc


def bpe_files_of(enc):
    """The two files' contents (sha256-checked) an encoding was built from, which a classifier
    file saved with it stores; None for tiktoken's own encoding (`bpe_file_bytes` finds those)."""
    return getattr(enc, "npgpt_bpe_files", None)


@functools.lru_cache(maxsize=None)
def _encoding_from_tiktoken():
    import tiktoken

    try:
        return tiktoken.get_encoding("gpt2")
    except Exception as e:  # offline, no cache, corrupt cache: tiktoken raises many kinds
        raise NpgptError(
            "cannot load the GPT-2 tokenizer: pass --bpe-dir DIR (the folder with encoder.json and "
            f"vocab.bpe), put them in {user_weights_dir()} (`python -m npgpt.weights download 124M` "
            "does), or let tiktoken download them "
            f"(tiktoken: {type(e).__name__})") from e


@contextlib.contextmanager
def _without_tiktoken_file_cache():
    """tiktoken copies even local files into its cache folder; an empty TIKTOKEN_CACHE_DIR stops that."""
    old = os.environ.get("TIKTOKEN_CACHE_DIR")
    os.environ["TIKTOKEN_CACHE_DIR"] = ""
    try:
        yield
    finally:
        if old is None:
            del os.environ["TIKTOKEN_CACHE_DIR"]
        else:
            os.environ["TIKTOKEN_CACHE_DIR"] = old
