"""Inference throughput: npgpt's packed inference against a PyTorch GPT-2 classifier, texts per second.

    python benchmarks/classify.py                    # SMS test split + 10k texts (~10 min)
    python benchmarks/classify.py --large 2000 --repeats 1

Both sides hold the same 124M-shaped random weights (the work does not depend on their values)
and run in this process one after the other, on the same thread count. Texts are tokenized
beforehand (the same ids for every side); each row times the forward passes from ids to class
logits.

  npgpt packed        `npgpt.infer.packed_logits`, what `classify --file` and `evaluate` run:
                      repeated texts once, shared first tokens once, packed without padding, the last
                      block only at the last real token (last-token pooling).
  torch classify_review   the reference's `classify_review`: one text at a time, padded to 120
                      tokens, the logits at the last position (`torch.inference_mode`).
  torch padded batch  a plain Hugging Face-style batch: batches of --batch-size texts in the
                      order given, padded to each batch's longest, the logits at the last real token.

Sets: the SMS test split (300 messages, as `python -m npgpt.evaluate` scores) and --large distinct
texts (every distinct SMS message, then pairs of messages joined, each cut to 120 tokens; no
text repeats, though a few share their first 120 tokens: 5999 distinct of 6000, so deduplication
barely helps npgpt there). PyTorch's rows on the large set time its
first --torch-limit texts (a rate in texts/s; marked so). npgpt's and PyTorch's logits are compared.
"""
from __future__ import annotations

import os
import sys
import time

from common import arg_parser, default_data_dir, machine_info, print_info, set_threads, summary, write_json

import numpy as np  # noqa: E402  (after common: npgpt.tune_runtime() first)


def parse_args(argv=None):
    p = arg_parser(__doc__, __file__)
    p.add_argument("--large", type=int, default=10000, help="texts in the large set")
    p.add_argument("--torch-limit", type=int, default=1000, help="texts of the large set PyTorch classifies")
    p.add_argument("--batch-size", type=int, default=32, help="texts per PyTorch padded batch")
    p.add_argument("--repeats", type=int, default=3, help="interleaved turns on the SMS test split")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    return p.parse_args(argv)


def texts_and_tokens(large, work_dir):
    from npgpt.data import prepare_splits
    from npgpt.dataset import make_datasets
    from npgpt.tokenizer import encode, get_tokenizer

    shared = default_data_dir()
    sms = shared / "sms_spam_collection" / "SMSSpamCollection"
    tok = get_tokenizer(shared / "gpt2_bpe")
    test = make_datasets(prepare_splits(sms, work_dir, progress=False), tok)[2]
    small = [list(t) for t in test.tokens]                                  # cut to 120 like training
    big = [encode(tok, t)[:120] for t in large_texts(large)]
    return small, big


def large_texts(large) -> list:
    """`large` distinct texts: every distinct SMS message, then pairs of messages joined, shuffled."""
    from npgpt.data import read_sms_spam
    msgs = list(dict.fromkeys(read_sms_spam(default_data_dir() / "sms_spam_collection" / "SMSSpamCollection")["Text"]))
    rng = np.random.default_rng(0)
    texts, seen = [], set()
    for m in msgs:
        if len(texts) < large and m not in seen:
            seen.add(m)
            texts.append(m)
    while len(texts) < large:
        t = f"{msgs[rng.integers(len(msgs))]} {msgs[rng.integers(len(msgs))]}"
        if t not in seen:
            seen.add(t)
            texts.append(t)
    return [texts[i] for i in rng.permutation(len(texts))]


def torch_classify_review(model, tokens, pad_to=120):
    """One text at a time, padded to pad_to, logits at the last position."""
    import torch
    out = []
    with torch.inference_mode():
        for t in tokens:
            ids = torch.full((1, pad_to), 50256, dtype=torch.long)
            ids[0, :len(t)] = torch.tensor(t[:pad_to])
            out.append(model(ids)[0].numpy())
    return np.array(out)


def torch_padded_batches(model, tokens, batch_size):
    """Batches in the given order, padded to their longest, logits at the last real token."""
    import torch
    out = []
    with torch.inference_mode():
        for i in range(0, len(tokens), batch_size):
            rows = tokens[i:i + batch_size]
            lengths = [len(t) for t in rows]
            ids = torch.full((len(rows), max(lengths)), 50256, dtype=torch.long)
            for b, t in enumerate(rows):
                ids[b, :len(t)] = torch.tensor(t)
            out.append(model(ids, torch.tensor(lengths) - 1).numpy())
    return np.concatenate(out)


def timed(fn):
    t0 = time.perf_counter()
    r = fn()
    return time.perf_counter() - t0, r


def main(argv=None):
    import tempfile

    import torch

    from npgpt import infer, params as P
    from npgpt.config import preset
    from torch_gpt2 import from_npgpt

    args = parse_args(argv)
    set_threads(args.threads)
    command = "python benchmarks/classify.py " + " ".join(sys.argv[1:] if argv is None else argv)
    print(command)
    info = machine_info()
    print_info(info)
    cfg = preset("124M")
    params = P.init_params(cfg, seed=123, num_classes=2)
    tmodel = from_npgpt(params, cfg).eval()
    with tempfile.TemporaryDirectory() as d:
        small, big = texts_and_tokens(args.large, d)
    print(f"SMS test split: {len(small)} texts, {sum(map(len, small))} tokens "
          f"({len({tuple(t) for t in small})} distinct); large set: {len(big)} distinct texts, "
          f"{sum(map(len, big))} tokens (mean {np.mean([len(t) for t in big]):.1f})")

    npg = lambda toks: infer.packed_logits(params, cfg, toks, progress=False)  # noqa: E731
    # warm-up (Numba from its cache, BLAS and torch thread pools)
    npg(small[:16]), torch_padded_batches(tmodel, small[:16], args.batch_size), torch_classify_review(tmodel, small[:2])

    rows, check = [], {}
    t = {"npgpt packed": [], "torch padded batch": [], "torch classify_review": []}
    for k in range(args.repeats):              # interleaved turns on the SMS test split
        s, a = timed(lambda: npg(small))
        t["npgpt packed"].append(s)
        s, b = timed(lambda: torch_padded_batches(tmodel, small, args.batch_size))
        t["torch padded batch"].append(s)
        if k == 0:                             # one turn: the slowest by far
            s, c = timed(lambda: torch_classify_review(tmodel, small))
            t["torch classify_review"].append(s)
            check["sms: npgpt vs torch padded batch"] = float(np.abs(a - b).max())
        print(f"  turn {k + 1}: " + ", ".join(f"{n} {v[-1]:.2f} s" for n, v in t.items() if v), flush=True)
    for name, ts in t.items():
        st = summary(ts)
        rows.append({"set": "SMS test", "side": name, "texts": len(small), "s": st,
                     "texts_per_s": len(small) / st["median"]})

    s, a = timed(lambda: npg(big))
    rows.append({"set": f"{len(big)} texts", "side": "npgpt packed", "texts": len(big), "s": summary([s]),
                 "texts_per_s": len(big) / s})
    print(f"  large set, npgpt: {s:.1f} s", flush=True)
    sub = big[:args.torch_limit]
    s, b = timed(lambda: torch_padded_batches(tmodel, sub, args.batch_size))
    rows.append({"set": f"{len(big)} texts", "side": f"torch padded batch (first {len(sub)})", "texts": len(sub),
                 "s": summary([s]), "texts_per_s": len(sub) / s})
    check["large: npgpt vs torch padded batch"] = float(np.abs(a[:len(sub)] - b).max())
    print(f"  large set, torch padded batch, {len(sub)} texts: {s:.1f} s", flush=True)
    sub2 = big[:min(args.torch_limit, 300)]
    s, _ = timed(lambda: torch_classify_review(tmodel, sub2))
    rows.append({"set": f"{len(big)} texts", "side": f"torch classify_review (first {len(sub2)})",
                 "texts": len(sub2), "s": summary([s]), "texts_per_s": len(sub2) / s})

    print(f"\nlargest |logit difference|: " + ", ".join(f"{k} {v:.1e}" for k, v in check.items()))
    print(f"\n{'set':>12s} {'side':38s} {'texts':>6s} {'median s (min-max)':>22s} {'texts/s':>8s} {'npgpt x':>8s}")
    ref = {r["set"]: r["texts_per_s"] for r in rows if r["side"] == "npgpt packed"}
    for r in rows:
        st = r["s"]
        print(f"{r['set']:>12s} {r['side']:38s} {r['texts']:6d} {st['median']:9.2f} ({st['min']:.2f}-{st['max']:.2f})"
              f"{'':>3s} {r['texts_per_s']:8.1f} {ref[r['set']] / r['texts_per_s']:8.2f}")
    print(f"load average after: {machine_info()['load_avg_1_5_15']}")
    if args.json:
        write_json(args.json, {"command": command, "info": info, "rows": rows, "max_abs_logit_diff": check,
                               "args": vars(args)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
