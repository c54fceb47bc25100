"""One explanation against one prediction of the same text, at GPT-2 124M's shapes.

    python benchmarks/explain.py                 # ~1 min on 2 cores
    python benchmarks/explain.py --repeats 21 --json out.json

A classifier with 124M-shaped random weights (last-token pooling) and a text of about 60 tokens.
In turns, after warm-up calls:

  predict_proba    `Classifier.predict_proba([text])`: inference's packed forward (`npgpt.infer`)
  explain          `Classifier.explain(text)`: the textbook forward keeping every block's saved
                   arrays, then the input-gradient backward through every block (`npgpt.explain`)
  textbook forward the first half of explain alone (`npgpt.explain.forward_with_tape`), to show
                   how explain's time splits into forward and backward

Medians with min-max; the ratio explain / predict_proba is from the same run.
"""
from __future__ import annotations


from common import arg_parser, default_data_dir, fmt_ms, interleaved, machine_info, print_info, summary, write_json

import numpy as np  # noqa: E402  (after common: npgpt.tune_runtime() first)

TEXT = ("Congratulations! You have been selected to receive a free two-week cruise to the Bahamas. "
        "To claim your prize, call 0800 555 0199 before midnight tonight and quote code WIN2024; "
        "standard rates apply, reply STOP to opt out. Offer ends Friday, terms at winprize.example.")


def parse_args(argv=None):
    p = arg_parser(__doc__, __file__)
    p.add_argument("--repeats", type=int, default=11, help="timed turns")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    from npgpt import explain, model
    from npgpt.classify import Classifier
    from npgpt.config import init_params, preset
    from npgpt.tokenizer import get_tokenizer

    config = preset("124M")
    clf = Classifier(params=init_params(config, seed=0, num_classes=2), config=config, labels=["ham", "spam"],
                     pooling="last_token", max_length=None,
                     tok=get_tokenizer(str(default_data_dir() / "gpt2_bpe")))
    ids = np.array([clf.encode([TEXT])[0][0]])                                  # [1,T]
    x, _ = model.ops.embedding_forward(ids, clf.params["wte"], clf.params["wpe"])
    pos = np.array([ids.shape[1] - 1])
    variants = {"predict_proba": lambda: clf.predict_proba([TEXT]),
                "explain": lambda: clf.explain(TEXT),
                "textbook forward": lambda: explain.forward_with_tape(clf.params, config, x, pos)}
    info = machine_info()
    print_info(info)
    times = interleaved(variants, args.repeats, warmup=2)
    res = {name: summary(ts) for name, ts in times.items()}
    print(f"124M shapes, one text of {ids.shape[1]} tokens, {args.repeats} turns: median ms (min-max)")
    for name, s in res.items():
        print(f"  {name:<17} {fmt_ms(s)}")
    ratio = res["explain"]["median"] / res["predict_proba"]["median"]
    print(f"explain / predict_proba: {ratio:.2f}x")
    if args.json:
        write_json(args.json, {"machine": info, "tokens": int(ids.shape[1]), "times": res, "ratio": ratio})


if __name__ == "__main__":
    main()
