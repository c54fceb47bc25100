"""`python -m npgpt.generate`: continuation of a prompt with pretrained GPT-2 weights, greedy (the
check that they loaded right) or sampled with chapter 5's temperature and top-k (npgpt.generate
is the library).

    python -m npgpt.generate "Every effort moves you" --max-new-tokens 15
    python -m npgpt.generate "Every effort moves you" --temperature 1.4 --top-k 25 --seed 123
    python -m npgpt.generate --tiny --temperature 1.0 --top-k 5 --seed 1 "Hello"   (no download)
"""
from __future__ import annotations

import math
import os
import sys

import numpy as np

from ..errors import NpgptError
from ..generate import TextStream, generate
from ..userpaths import weights_file
from . import make_parser

TINY_SEED = 123       # the --tiny model's weights: the same random model every time


def build_parser():
    parser = make_parser("python -m npgpt.generate",
                         "Continue a prompt with GPT-2: greedy by default (the check that pretrained weights "
                         "loaded right), or sampled with --temperature and --top-k (chapter 5).")
    parser.add_argument("prompt", help="text to continue")
    parser.add_argument("--max-new-tokens", type=int, default=15, help="tokens to generate")
    parser.add_argument("--temperature", type=float, default=0.0, metavar="T",
                        help="0: always the most likely token (greedy); above 0: sample from softmax(logits / T), "
                             "sharper below 1, flatter above")
    parser.add_argument("--top-k", type=int, default=None, metavar="K",
                        help="sample only among the K most likely tokens (default: all)")
    parser.add_argument("--seed", type=int, default=None,
                        help="seed of the sampling: the same seed gives the same text (default: a new draw each run)")
    parser.add_argument("--model-size", default="124M", help="124M, 355M, 774M or 1558M")
    parser.add_argument("--weights", default=None,
                        help="converted HDF5 weights (default: ./weights/gpt2-<size>.h5 if there, else "
                             "~/.cache/npgpt/weights/gpt2-<size>.h5 or $NPGPT_WEIGHTS_DIR's)")
    parser.add_argument("--tiny", action="store_true",
                        help="a small random model (2 layers, 64 dims, the one train --tiny starts from): tries the "
                             "command without weights; its text is gibberish")
    parser.add_argument("--bpe-dir", default=None,
                        help="folder with GPT-2's encoder.json and vocab.bpe (default: $NPGPT_BPE_DIR, else the "
                             "folder of --weights or its <size>/ subfolder, else tiktoken's cache or download)")
    parser.add_argument("--no-cache", action="store_true", help="recompute the prefix for every token")
    parser.add_argument("--stream", action="store_true", help="print tokens as they come")
    return parser


def check(args, parser) -> None:
    """Usage errors, each naming its flag (exit 2)."""
    if args.max_new_tokens < 1:
        parser.error("--max-new-tokens must be at least 1")
    if not math.isfinite(args.temperature) or args.temperature < 0:
        parser.error(f"--temperature must be a finite number >= 0 (0 is greedy), got {args.temperature}")
    if args.top_k is not None and args.top_k < 1:
        parser.error(f"--top-k must be at least 1, got {args.top_k}")
    if args.seed is not None and args.seed < 0:
        parser.error(f"--seed must be a whole number >= 0, got {args.seed}")
    if args.tiny and args.weights:
        parser.error("--tiny and --weights exclude each other (--tiny is a random model, no file)")


def load_model(args):
    """(params, config, the folder to look for the tokenizer in) of --tiny, --weights or --model-size."""
    from ..params import load_params
    from ..tokenizer import N_VOCAB

    if args.tiny:
        from ..config import init_params, preset
        config = preset("tiny")
        return init_params(config, seed=TINY_SEED), config, "."
    path = args.weights or weights_file(args.model_size)
    if os.path.isdir(path):
        raise NpgptError(f"--weights {path}: is a folder, expected a converted .h5 file (a downloaded "
                         f"checkpoint folder converts with `python -m npgpt.weights convert {path}`)")
    if not os.path.exists(path):
        raise NpgptError(f"no weights at {path}: run `python -m npgpt.weights download {args.model_size}` "
                         f"(or pass --weights, or --tiny for a small random model)")
    params, config, meta = load_params(path)
    if config.vocab_size != N_VOCAB:
        raise NpgptError(f"--weights {path}: its vocabulary has {config.vocab_size} tokens, GPT-2's tokenizer "
                         f"{N_VOCAB}: generate needs GPT-2 weights (python -m npgpt.weights download)")
    if "cls/w" in params:
        params = {k: v for k, v in params.items() if not k.startswith("cls/")}   # a classifier's LM body
    return params, config, os.path.dirname(path) or "."


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    check(args, parser)
    from ..tokenizer import get_tokenizer

    params, config, weights_dir = load_model(args)
    tok = get_tokenizer(args.bpe_dir, weights_dir=weights_dir)
    ids = np.array([tok.encode(args.prompt, disallowed_special=())], dtype=np.int64)
    if ids.shape[1] == 0:
        raise NpgptError("the prompt is empty")
    settings = dict(temperature=args.temperature, top_k=args.top_k, seed=args.seed, use_cache=not args.no_cache)
    if args.stream:
        text = TextStream(tok)
        sys.stdout.write(args.prompt)
        cb = lambda new: (sys.stdout.write(text.add(int(new[0, 0]))), sys.stdout.flush())
        generate(params, config, ids, args.max_new_tokens, progress=cb, **settings)
        sys.stdout.write(text.end() + "\n")
    else:
        out = generate(params, config, ids, args.max_new_tokens, **settings)
        print(tok.decode(out[0].tolist()))
    return 0
