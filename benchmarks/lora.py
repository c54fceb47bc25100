"""LoRA at 124M: npgpt's training step against a PyTorch LoRA doing the same job, in one run.

The job is appendix E's: GPT-2 124M (random weights of the real shapes here), LoRA rank 16,
alpha 16 on q, k, v, the attention output, both MLP matrices of every block and the head;
AdamW lr 8e-4, weight decay 0.1, batches of 8 SMS messages from the training split in the
training loop's shuffled order.

- PyTorch (benchmarks/torch_gpt2.py's model, every nn.Linear wrapped in a LoRA module, c_attn with
  three pairs for q, k, v; F.scaled_dot_product_attention): batches padded to 120 tokens, every
  position computed, the logits read at the last position, as the reference does.
- npgpt: what `python -m npgpt.train --lora 16` runs: batches padded only to their longest
  message, the last block computed at the pooled position only, last-token pooling.

The job also evaluates, as appendix E's `train_classifier_simple` does with eval_freq 50 and
eval_iter 5 (and `python -m npgpt.train` likewise): train and validation loss on 5 batches each at
steps 0, 50, ..., 600 (13 times), train and validation accuracy on 5 batches each after every
epoch: 180 forward passes of a batch of 8 without gradients in 650 steps. Those are timed as
well (torch under `torch.no_grad()`, padded to 120; npgpt's `forward_cls` as in training).

The two sides run in turns (npgpt step, torch step, npgpt eval batch, torch eval batch, ...) on
the same batches, so a busy machine slows both alike; the report gives medians, min-max, their
ratios, and the 5-epoch job time the medians imply (650 steps + 180 evaluation batches: a
projection, marked as such, not a measured 5-epoch run).
The reference's head reads ln_f at every position and keeps the last; here torch applies ln_f and
the head at the last position only (under 0.1% of its step), which favours torch, if anything.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/lora.py --steps 20
"""
from __future__ import annotations

import argparse
import math
import sys
import time

import common  # noqa: F401  (puts the repository on sys.path)
from common import default_data_dir, interleaved, machine_info, print_info, set_threads, summary

import numpy as np  # noqa: E402  (after common: npgpt.tune_runtime() first)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--steps", type=int, default=20, help="timed training steps per side")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per side first")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--threads", type=int, default=None, help="threads for both (default: all cores)")
    p.add_argument("--data-dir", default="/tmp/npgpt-bench-data", help="where the split CSVs go")
    p.add_argument("--shared-data", default=str(default_data_dir()), help="SMS data and GPT-2 BPE files")
    return p.parse_args(argv)


def torch_lora_model(params, config, rank, alpha):
    import torch
    import torch.nn as nn
    from torch_gpt2 import from_npgpt

    class LoRA(nn.Module):
        def __init__(self, n_in, n_out):
            super().__init__()
            self.A = nn.Parameter(torch.empty(n_in, rank))
            nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
            self.B = nn.Parameter(torch.zeros(rank, n_out))

        def forward(self, x):
            return (alpha / rank) * (x @ self.A @ self.B)

    class LinearWithLoRA(nn.Module):
        def __init__(self, linear, parts=1):
            super().__init__()
            self.linear = linear
            n = linear.out_features // parts
            self.loras = nn.ModuleList(LoRA(linear.in_features, n) for _ in range(parts))

        def forward(self, x):
            delta = [l(x) for l in self.loras]
            return self.linear(x) + (delta[0] if len(delta) == 1 else torch.cat(delta, dim=-1))

    m = from_npgpt(params, config)
    for p in m.parameters():
        p.requires_grad_(False)
    for blk in m.h:
        blk.attn.c_attn = LinearWithLoRA(blk.attn.c_attn, parts=3)     # q, k, v: three pairs
        blk.attn.c_proj = LinearWithLoRA(blk.attn.c_proj)
        blk.c_fc = LinearWithLoRA(blk.c_fc)
        blk.c_proj = LinearWithLoRA(blk.c_proj)
    m.cls = LinearWithLoRA(m.cls)
    return m


def main(argv=None):
    args = parse_args(argv)
    import torch
    import torch.nn.functional as F

    from npgpt import fastmodel as model, fastops, finetune, lora, optim
    from npgpt.config import init_params, preset
    from npgpt.data import prepare_splits
    from npgpt.dataset import eval_batches, make_datasets, train_batches
    from npgpt.prefix_cache import PrefixCache, dataset_activations
    from npgpt.tokenizer import get_tokenizer

    if args.threads:
        set_threads(args.threads)
    shared = args.shared_data
    splits = prepare_splits(f"{shared}/sms_spam_collection/SMSSpamCollection", args.data_dir, progress=False)
    tok = get_tokenizer(f"{shared}/gpt2_bpe")
    train = make_datasets(splits, tok, "longest")[0]
    cfg = preset("124M")
    params = init_params(cfg, seed=123, num_classes=2)
    tmodel = torch_lora_model(params, cfg, args.rank, float(args.rank))
    spec = lora.add_lora(params, cfg, args.rank, seed=123)
    n_np = lora.count(cfg, spec)
    n_t = sum(p.numel() for p in tmodel.parameters() if p.requires_grad)
    assert n_np == n_t, (n_np, n_t)

    in_memory = PrefixCache(use_disk=False)
    feats = dataset_activations(in_memory, params, cfg, [train], 0, "last_token")[0]   # the embeddings
    opt = optim.AdamW(lr=8e-4, weight_decay=0.1, update=fastops.adamw_update)
    t_opt = torch.optim.AdamW([p for p in tmodel.parameters() if p.requires_grad], lr=8e-4, weight_decay=0.1)
    batches = train_batches(len(train), 8, 123, 0)
    val = make_datasets(splits, tok, "longest")[1]
    val_feats = dataset_activations(in_memory, params, cfg, [val], 0, "last_token")[0]
    evals = [(train, feats, b) for b in eval_batches(len(train), 8)[:5]] + \
        [(val, val_feats, b) for b in eval_batches(len(val), 8)[:5]]          # what one evaluation reads
    it = {"npgpt": 0, "torch": 0, "npgpt eval": 0, "torch eval": 0}

    def npgpt_step():
        rows = batches[it["npgpt"] % len(batches)]
        it["npgpt"] += 1
        inputs, labels = finetune.batch_inputs(train, feats, rows, "last_token")
        _, grads, _ = model.loss_and_grads(params, cfg, labels=labels, trainable="lora", lora=spec, **inputs)
        opt.step(params, grads)

    def torch_step():
        rows = batches[it["torch"] % len(batches)]
        it["torch"] += 1
        ids, _ = train.batch(rows)[:2]                                          # [8,120]
        t_opt.zero_grad(set_to_none=True)
        logits = tmodel(torch.as_tensor(ids, dtype=torch.long))                 # last position
        F.cross_entropy(logits, torch.as_tensor(train.labels[rows], dtype=torch.long)).backward()
        t_opt.step()

    def npgpt_eval():
        d, f, rows = evals[it["npgpt eval"] % len(evals)]
        it["npgpt eval"] += 1
        inputs, labels = finetune.batch_inputs(d, f, rows, "last_token")
        model.forward_cls(params, cfg, lora=spec, **inputs)

    def torch_eval():
        d, _, rows = evals[it["torch eval"] % len(evals)]
        it["torch eval"] += 1
        ids = d.batch(rows)[0]                                                  # [8,120]
        with torch.no_grad():
            tmodel(torch.as_tensor(ids, dtype=torch.long))

    times = interleaved({"npgpt": npgpt_step, "torch": torch_step, "npgpt eval": npgpt_eval,
                         "torch eval": torch_eval}, args.steps, warmup=args.warmup)
    info = machine_info()
    print_info(info)
    print(f"LoRA rank {args.rank} on 124M (random weights): {n_np:,} trainable parameters on both sides; "
          f"batch 8, {args.steps} timed steps each after {args.warmup} warm-up, in turns")
    print(f"padding: torch {train.pad_to} tokens per row, every position; npgpt per batch "
          f"(mean batch length {np.mean([train.lengths[b].max() for b in batches[:args.steps + args.warmup]]):.1f})")
    s = {k: summary(v) for k, v in times.items()}
    job = {}
    for k in ("npgpt", "torch"):
        e = s[f"{k} eval"]
        job[k] = 650 * s[k]["median"] + 180 * e["median"]
        print(f"{k:6s} step: median {s[k]['median']:.3f} s (min {s[k]['min']:.3f}, max {s[k]['max']:.3f}); "
              f"eval batch: median {e['median']:.3f} s (min {e['min']:.3f}, max {e['max']:.3f})")
        print(f"{k:6s} 5 epochs (650 steps + 180 eval batches) would take {job[k] / 60:.1f} min (projection)")
    print(f"ratio npgpt / torch (medians): step {s['npgpt']['median'] / s['torch']['median']:.2f}, "
          f"eval batch {s['npgpt eval']['median'] / s['torch eval']['median']:.2f}, "
          f"5-epoch job {job['npgpt'] / job['torch']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
