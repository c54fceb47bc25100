"""`python -m npgpt.weights`: download GPT-2's published weights, or convert files on disk, to
npgpt's HDF5 file (npgpt.weights is the library).

    python -m npgpt.weights download 124M               # OpenAI's TF checkpoint -> ~/.cache/npgpt/weights/gpt2-124M.h5
    python -m npgpt.weights download 355M --source hf   # Hugging Face's model.safetensors (and tokenizer) instead
    python -m npgpt.weights convert weights/124M        # files already on disk, no network at all
    python -m npgpt.weights convert model.safetensors --size 124M --out gpt2.h5
"""
from __future__ import annotations

import argparse
import os
import sys

from ..config import PRESETS
from ..weights import HF_BASE, MIRROR_ENV, OPENAI_BASE, convert, download
from . import make_parser


def main(argv=None) -> int:
    parser = make_parser("python -m npgpt.weights",
                         "Download GPT-2's published weights and convert them to npgpt's HDF5 file.")
    sub = parser.add_subparsers(dest="command", metavar="{download,convert}")

    def add_common(p):
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show the full traceback on errors")
        p.add_argument("--dir", default=None, help="weights folder (downloads go to DIR/<size>/, output to "
                       "DIR/gpt2-<size>.h5; default: $NPGPT_WEIGHTS_DIR, else ~/.cache/npgpt/weights, found "
                       "from any folder)")
        p.add_argument("--out", default=None, help="output .h5 file (default: DIR/gpt2-<size>.h5)")

    d = sub.add_parser("download", help="fetch a published checkpoint and convert it",
                       formatter_class=parser.formatter_class)
    d.add_argument("size", choices=list(PRESETS), help="model size")
    d.add_argument("--source", choices=("openai", "hf"), default="openai",
                   help="openai: OpenAI's TF checkpoint; hf: Hugging Face's model.safetensors; either also "
                        "gives the tokenizer's encoder.json and vocab.bpe")
    d.add_argument("--mirror", default=os.environ.get(MIRROR_ENV),
                   help=f"fallback base URL with the same layout (default: ${MIRROR_ENV}, else none)")
    d.add_argument("--base-url", default=None,
                   help=f"main base URL (default: {OPENAI_BASE} for openai, {HF_BASE} for hf)")
    d.add_argument("--force", action="store_true", help="convert again even if the .h5 exists")
    d.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_common(d)

    c = sub.add_parser("convert", help="convert a checkpoint already on disk (no network)",
                       formatter_class=parser.formatter_class)
    c.add_argument("path", help="TF checkpoint directory (with hparams.json) or .safetensors file")
    c.add_argument("--size", choices=list(PRESETS), default=None,
                   help="model size: names the output, gives n_head for safetensors, and the shapes are "
                        "checked against it (default: from the file's shapes)")
    add_common(c)

    args = parser.parse_args(argv)
    if args.command is None:
        parser.error("choose a command: download or convert")
    if args.command == "download":
        out = download(args.size, args.source, args.dir, args.out, args.mirror, args.base_url,
                       progress=not args.no_progress, force=args.force,
                       log=lambda msg: print(msg, file=sys.stderr))
    else:
        out = convert(args.path, args.out, args.size, args.dir)
    print(out)
    return 0
