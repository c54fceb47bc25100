"""`python -m npgpt.generate`: greedy continuation of a prompt with pretrained GPT-2 weights
(the check that they loaded right; npgpt.generate is the library).

    python -m npgpt.generate "Every effort moves you" --max-new-tokens 15
"""
from __future__ import annotations

import os
import sys

import numpy as np

from ..errors import NpgptError
from ..generate import TextStream, generate_greedy
from . import make_parser


def main(argv=None):
    parser = make_parser("python -m npgpt.generate",
                         "Greedy continuation of a prompt with pretrained GPT-2 weights.")
    parser.add_argument("prompt", help="text to continue")
    parser.add_argument("--max-new-tokens", type=int, default=15, help="tokens to generate")
    parser.add_argument("--model-size", default="124M", help="124M, 355M, 774M or 1558M")
    parser.add_argument("--weights", default=None,
                        help="converted HDF5 weights (default: weights/gpt2-<size>.h5)")
    parser.add_argument("--bpe-dir", default=None,
                        help="folder with GPT-2's encoder.json and vocab.bpe (default: $NPGPT_BPE_DIR, else the "
                             "folder of --weights or its <size>/ subfolder, else tiktoken's cache or download)")
    parser.add_argument("--no-cache", action="store_true", help="recompute the prefix for every token")
    parser.add_argument("--stream", action="store_true", help="print tokens as they come")
    args = parser.parse_args(argv)
    if args.max_new_tokens < 1:
        parser.error("--max-new-tokens must be at least 1")
    from ..params import load_params
    from ..tokenizer import get_tokenizer

    from ..tokenizer import N_VOCAB

    path = args.weights or os.path.join("weights", f"gpt2-{args.model_size}.h5")
    if os.path.isdir(path):
        raise NpgptError(f"--weights {path}: is a folder, expected a converted .h5 file (a downloaded "
                         f"checkpoint folder converts with `python -m npgpt.weights convert {path}`)")
    if not os.path.exists(path):
        raise NpgptError(f"no weights at {path}: run `python -m npgpt.weights download {args.model_size}` "
                         f"(or pass --weights)")
    params, config, meta = load_params(path)
    if config.vocab_size != N_VOCAB:
        raise NpgptError(f"--weights {path}: its vocabulary has {config.vocab_size} tokens, GPT-2's tokenizer "
                         f"{N_VOCAB}: generate needs GPT-2 weights (python -m npgpt.weights download)")
    if "cls/w" in params:
        params = {k: v for k, v in params.items() if not k.startswith("cls/")}   # a classifier's LM body
    tok = get_tokenizer(args.bpe_dir, weights_dir=os.path.dirname(path) or ".")
    ids = np.array([tok.encode(args.prompt, disallowed_special=())], dtype=np.int64)
    if ids.shape[1] == 0:
        raise NpgptError("the prompt is empty")
    if args.stream:
        text = TextStream(tok)
        sys.stdout.write(args.prompt)
        cb = lambda new: (sys.stdout.write(text.add(int(new[0, 0]))), sys.stdout.flush())
        generate_greedy(params, config, ids, args.max_new_tokens, not args.no_cache, cb)
        sys.stdout.write(text.end() + "\n")
    else:
        out = generate_greedy(params, config, ids, args.max_new_tokens, not args.no_cache)
        print(tok.decode(out[0].tolist()))
    return 0
