"""Get GPT-2's published weights and convert them to npgpt's HDF5 file, with no TensorFlow.

    python -m npgpt.weights download 124M               # OpenAI's TF checkpoint -> ~/.cache/npgpt/weights/gpt2-124M.h5
    python -m npgpt.weights download 355M --source hf   # Hugging Face's model.safetensors (and tokenizer) instead
    python -m npgpt.weights convert weights/124M        # files already on disk, no network at all
    python -m npgpt.weights convert model.safetensors --size 124M --out gpt2.h5

`<dir>` is `--dir`, else the per-user weights folder (`npgpt.userpaths`: ~/.cache/npgpt/weights,
or $NPGPT_WEIGHTS_DIR), where every run finds the weights and the tokenizer from any folder.
`download` puts OpenAI's seven files (or Hugging Face's model.safetensors, config.json, and the
tokenizer's vocab.json and merges.txt, converted to OpenAI's encoder.json and vocab.bpe) in
`<dir>/<size>/`, skipping the ones already complete, checks the tokenizer files' sha256, then
converts to `<dir>/gpt2-<size>.h5`; `convert` of a checkpoint folder holding the tokenizer's
encoder.json and vocab.bpe copies them beside the .h5, so that they too are found from any folder.
The .h5 holds
OpenAI's names without `model/`, float32, conv weights [1,in,out] reshaped to [in,out], the
config as attributes (see npgpt.params).

A mirror (`--mirror URL` or the NPGPT_MIRROR environment variable) is tried when the main source
fails. It must serve the same layout: `<mirror>/<size>/<file>` for OpenAI's files,
`<mirror>/openai-community/<name>/resolve/main/<file>` for Hugging Face's. `--base-url` replaces
the main source itself (e.g. a local copy served over HTTP).
"""
from __future__ import annotations

if __name__ == "__main__":      # `python -m npgpt.weights`: the command line, npgpt.cli.weights
    from npgpt.cli import hand_over
    hand_over("weights")

import hashlib
import json
import os

from .config import HF_NAMES, PRESETS
from .download import check_sha256, download_file
from .errors import FormatError
from .fileio import regular_file, sha256_file, write_bytes
from .params import save_params
from .userpaths import user_weights_dir

OPENAI_BASE = "https://openaipublic.blob.core.windows.net/gpt-2/models"
HF_BASE = "https://huggingface.co"
MIRROR_ENV = "NPGPT_MIRROR"

OPENAI_FILES = ("checkpoint", "encoder.json", "hparams.json", "model.ckpt.data-00000-of-00001",
                "model.ckpt.index", "model.ckpt.meta", "vocab.bpe")

# The tokenizer files are the same for every size (tiktoken checks the same values).
TOKENIZER_SHA256 = {
    "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
    "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
}


def _urls(base_url: str, mirror: str | None, path: str) -> list[str]:
    bases = [base_url] + ([mirror] if mirror else [])
    return [b.rstrip("/") + "/" + path for b in bases]


def _check_size(size: str) -> None:
    if size not in PRESETS:
        raise FormatError(f"unknown model size {size!r}; choose one of {', '.join(PRESETS)}")


def download_openai(size: str, weights_dir=None, base_url: str = OPENAI_BASE,
                    mirror: str | None = None, progress: bool = True, **download_kw) -> str:
    """Fetch OpenAI's checkpoint files of one size into `<weights_dir>/<size>/`; return that dir."""
    _check_size(size)
    directory = os.path.join(os.fspath(weights_dir or user_weights_dir()), size)
    hint = (f"if you fetch the files another way, put {', '.join(OPENAI_FILES)} in {directory}/ "
            f"and run `python -m npgpt.weights convert {directory}`")
    for name in OPENAI_FILES:
        path = download_file(_urls(base_url, mirror, f"{size}/{name}"), os.path.join(directory, name),
                             progress=progress, hint=hint, **download_kw)
        if name in TOKENIZER_SHA256:
            check_sha256(path, TOKENIZER_SHA256[name])
    return directory


def download_hf(size: str, weights_dir=None, base_url: str = HF_BASE,
                mirror: str | None = None, progress: bool = True, **download_kw) -> str:
    """Fetch Hugging Face's `openai-community/<name>` config.json (which gives n_head), the
    tokenizer's vocab.json and merges.txt (made into OpenAI's encoder.json and vocab.bpe by
    `tokenizer_from_hf`, unless those two are there already) and model.safetensors into
    `<weights_dir>/<size>/`; return the path of the .safetensors file. The tokenizer comes before
    the big file, so that files which are not GPT-2's tokenizer stop the download early."""
    _check_size(size)
    directory = os.path.join(os.fspath(weights_dir or user_weights_dir()), size)
    dest = os.path.join(directory, "model.safetensors")
    hint = (f"if you fetch Hugging Face's model.safetensors another way, save it as {dest} and run "
            f"`python -m npgpt.weights convert {dest} --size {size}`")
    tokenizer_hint = (f"if you fetch it another way, save it in {directory}/ and run this again, or put "
                      f"OpenAI's {' and '.join(TOKENIZER_SHA256)} there")

    def fetch(name, what_to_do):
        url_path = f"openai-community/{HF_NAMES[size]}/resolve/main/{name}"
        download_file(_urls(base_url, mirror, url_path), os.path.join(directory, name), progress=progress,
                      hint=what_to_do, **download_kw)

    fetch("config.json", hint)
    if not all(_published(os.path.join(directory, name)) for name in TOKENIZER_SHA256):
        for name in HF_TOKENIZER:
            fetch(name, tokenizer_hint)
        tokenizer_from_hf(directory)
    fetch("model.safetensors", hint)
    return dest


def encoder_json_from_hf(vocab_json: bytes) -> bytes:
    """OpenAI's encoder.json from Hugging Face's vocab.json: the same {token: id} object, written
    the way OpenAI wrote it (json.dumps's default ", " and ": " separators and \\u escapes, where
    Hugging Face's file is compact UTF-8), the tokens in id order (as OpenAI's are: the order of a
    JSON object's keys carries no meaning, so another writer may have changed it)."""
    vocab = json.loads(vocab_json)
    if not isinstance(vocab, dict) or not all(type(i) is int for i in vocab.values()):
        raise ValueError("not a JSON object of token ids")
    return json.dumps(dict(sorted(vocab.items(), key=lambda item: item[1]))).encode()


def vocab_bpe_from_hf(merges_txt: bytes) -> bytes:
    """OpenAI's vocab.bpe from Hugging Face's merges.txt: the same lines ("#version: 0.2", then
    one merge "a b" per line, best first), each ended by "\\n" whatever the file's line ends
    were, and no empty line at the end."""
    return b"".join(line + b"\n" for line in merges_txt.rstrip(b"\r\n").splitlines())


# Hugging Face's name of each tokenizer file: (OpenAI's name, the conversion to OpenAI's bytes).
HF_TOKENIZER = {"vocab.json": ("encoder.json", encoder_json_from_hf),
                "merges.txt": ("vocab.bpe", vocab_bpe_from_hf)}


def tokenizer_from_hf(directory) -> None:
    """Write OpenAI's encoder.json and vocab.bpe into `directory` from Hugging Face's vocab.json
    and merges.txt there. The result must be OpenAI's files byte for byte (TOKENIZER_SHA256),
    which also checks that Hugging Face's files are GPT-2's tokenizer. Both are converted and
    checked before either is written; on a mismatch the Hugging Face file is removed (a rerun
    fetches it afresh) and FormatError names it."""
    converted = {}
    for hf_name, (name, to_openai) in HF_TOKENIZER.items():
        source = os.path.join(directory, hf_name)
        with open(source, "rb") as fh:
            raw = fh.read()
        try:
            data = to_openai(raw)
        except ValueError as e:
            problem = f"cannot be read: {e}"
        else:
            digest = hashlib.sha256(data).hexdigest()
            problem = (f"made into {name}, its sha256 is {digest}, not the published {TOKENIZER_SHA256[name]}"
                       if digest != TOKENIZER_SHA256[name] else "")
        if problem:
            os.remove(source)
            raise FormatError(f"{source}: not GPT-2's tokenizer ({problem}); removed it: run again to "
                              f"download it afresh, or put OpenAI's {name} in {directory}/")
        converted[name] = data
    for name, data in converted.items():
        write_bytes(os.path.join(directory, name), data)


def load_pretrained(path, size: str | None = None):
    """Read GPT-2 weights from a TF checkpoint directory (with hparams.json) or a .safetensors
    file. Returns (params, config, source)."""
    from .safetensors_io import load_gpt2_safetensors, read_header
    from .tfcheckpoint import load_gpt2_tf

    path = os.fspath(path)
    if size is not None:
        _check_size(size)
    if os.path.isdir(path):
        if any(fn.endswith(".index") for fn in os.listdir(path)) or os.path.exists(os.path.join(path, "hparams.json")):
            params, config = load_gpt2_tf(path)
            return params, config, "openai-tf"
        if os.path.isfile(os.path.join(path, "model.safetensors")):
            path = os.path.join(path, "model.safetensors")
        else:
            raise FormatError(f"{path}: neither a TF checkpoint (hparams.json, *.index) nor model.safetensors found")
    elif not os.path.exists(path):
        raise FormatError(f"{path}: no such file or directory")
    elif path.endswith(".index"):
        params, config = load_gpt2_tf(os.path.dirname(path) or ".")
        return params, config, "openai-tf"
    elif not path.endswith(".safetensors"):
        raise FormatError(f"{path}: expected a TF checkpoint directory or a .safetensors file")
    n_head = None
    if size:                            # the size gives n_head, which the shapes do not tell
        entries = read_header(path)[0]
        wte = entries.get("wte.weight") or entries.get("transformer.wte.weight")
        if wte and wte[1][-1:] != (PRESETS[size].n_embd,):
            raise FormatError(f"{path}: a model of shape {wte[1]} is not GPT-2 {size} "
                              f"({PRESETS[size].n_embd} wide)")
        n_head = PRESETS[size].n_head
    params, config = load_gpt2_safetensors(path, n_head=n_head)
    return params, config, "hf-safetensors"


def convert(path, out=None, size: str | None = None, weights_dir=None) -> str:
    """Convert a checkpoint on disk to HDF5. Default output: `<weights_dir>/gpt2-<size>.h5`, where
    size is the given one, else the preset the config matches, else the checkpoint's name."""
    params, config, source = load_pretrained(path, size)
    if size is not None and config != PRESETS[size]:
        want = PRESETS[size]
        raise FormatError(f"{path}: a model with {config.n_layer} layers, {config.n_head} heads, {config.n_embd} "
                          f"dims and {config.vocab_size} tokens is not GPT-2 {size} ({want.n_layer} layers, "
                          f"{want.n_head} heads, {want.n_embd} dims); drop --size, or pick the size it is")
    if out is None:
        name = size or next((s for s, c in PRESETS.items() if c == config), None)
        if name is None:
            p = os.path.abspath(os.fspath(path))
            name = os.path.basename(p if os.path.isdir(p) else os.path.splitext(p)[0])
        out = os.path.join(os.fspath(weights_dir or user_weights_dir()), f"gpt2-{name}.h5")
    save_params(out, params, config, meta={"source": source, "converted_from": os.path.abspath(os.fspath(path))})
    _keep_tokenizer(path, os.path.dirname(os.path.abspath(os.fspath(out))))
    return os.fspath(out)


def _published(path) -> bool:
    """Whether `path` is a regular file with the sha256 of OpenAI's file of its name
    (encoder.json or vocab.bpe, TOKENIZER_SHA256)."""
    return regular_file(path) and sha256_file(path) == TOKENIZER_SHA256[os.path.basename(path)]


def _keep_tokenizer(src, dest) -> None:
    """Copy GPT-2's encoder.json and vocab.bpe (checked) from a converted checkpoint folder `src`
    (or the folder of a converted .safetensors file) to `dest`, the .h5's folder, where every run
    looks for them (`npgpt.tokenizer`), unless they are there already (or `src` is
    `dest/<size>/`, where `download` left them)."""
    src, dest = os.path.abspath(os.fspath(src)), os.path.abspath(dest)
    if os.path.isfile(src):
        src = os.path.dirname(src)
    if not os.path.isdir(src) or os.path.dirname(src) == dest or src == dest:
        return
    for name in TOKENIZER_SHA256:
        found, target = os.path.join(src, name), os.path.join(dest, name)
        if not os.path.exists(target) and _published(found):
            with open(found, "rb") as fh:
                write_bytes(target, fh.read())


def download(size: str, source: str = "openai", weights_dir=None, out=None, mirror=None,
             base_url=None, progress: bool = True, force: bool = False, log=None, **download_kw) -> str:
    """Download one size (skipping complete files) and convert it; return the .h5 path.
    log: a function of one string for what the user should see (an .h5 already there)."""
    _check_size(size)
    weights_dir = os.fspath(weights_dir or user_weights_dir())
    out = out or os.path.join(weights_dir, f"gpt2-{size}.h5")
    if source == "openai":
        ckpt = download_openai(size, weights_dir, base_url or OPENAI_BASE, mirror, progress, **download_kw)
    elif source == "hf":
        ckpt = download_hf(size, weights_dir, base_url or HF_BASE, mirror, progress, **download_kw)
    else:
        raise FormatError(f"unknown source {source!r}; choose openai or hf")
    if os.path.exists(out) and not force:
        (log or (lambda msg: None))(f"{out} already exists (use --force to convert again)")
        return out
    return convert(ckpt, out, weights_dir=weights_dir)
