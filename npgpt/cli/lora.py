"""`python -m npgpt.lora merge RUN/classifier.h5 --out merged.h5`: fold every LoRA pair into the
weight it adapts (npgpt.lora.merge): a classifier file without LoRA arrays that classifies the same.
"""
from __future__ import annotations

from ..classify import classifier_bpe_files
from ..errors import FormatError
from ..lora import adapted, merge, spec_of
from ..params import load_params, save_params
from . import make_parser


def build_parser():
    p = make_parser("python -m npgpt.lora", "LoRA tools for npgpt classifier files.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    m = sub.add_parser("merge", help="fold W + (alpha/r) A B into plain weights",
                       description="Fold every LoRA pair into the weight it adapts: the result is a "
                                   "classifier file without LoRA arrays that classifies the same.")
    m.add_argument("model", help="classifier file with LoRA arrays (RUN/classifier.h5)")
    m.add_argument("--out", required=True, help="where to write the merged classifier file")
    m.add_argument("--bpe-dir", default=None,
                   help="folder with GPT-2's encoder.json and vocab.bpe, for a file that does not carry them "
                        "(the merged file always does)")
    m.add_argument("--quiet", action="store_true", help="print nothing on success")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    params, config, meta = load_params(args.model)
    spec = spec_of(meta)
    if spec is None:
        raise FormatError(f"{args.model}: has no LoRA arrays to merge (meta holds no 'lora' settings)")
    merged = merge(params, config, spec)
    meta = dict(meta)
    meta["lora_merged"] = meta.pop("lora")
    # the merged file carries the tokenizer, as every classifier file does (classify works offline)
    save_params(args.out, merged, config, meta, files=classifier_bpe_files(args.model, meta, args.bpe_dir))
    if not args.quiet:
        n = len(adapted(config, spec.targets, params["cls/b"].shape[0]))
        print(f"merged {n} LoRA pairs (rank {spec.rank}, alpha {spec.alpha:g}) into {args.out}")
    return 0
