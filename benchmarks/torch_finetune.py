"""The reference's fine-tuning procedure in PyTorch (chapter 6 of "Build a Large Language Model
(From Scratch)"), on 124M-shaped random weights, timed part by part.

    python benchmarks/torch_finetune.py --json torch.json [--epochs 1] [--threads 2]

What it does, as the reference does it:
- the SMS splits npgpt makes (1045 / 149 / 300 messages), every message padded with token 50256
  to the longest training message (120 tokens), validation and test cut to that length;
- the model of benchmarks/torch_gpt2.py (standard PyTorch modules), random GPT-2 initialisation,
  everything frozen but the last block, the final LayerNorm and a new 2-class head;
- AdamW (lr 5e-5, weight decay 0.1); batches of 8, shuffled, last partial batch dropped;
- the loss at the last position; every 50 steps the mean loss of 5 training and 5 validation
  batches; after each epoch the accuracy on 5 training and 5 validation batches; at the end the
  accuracy on all of the training (shuffled, 130 batches), validation and test sets.
One difference, without effect on time: the head is applied at the last position only, where the
reference applies it to every position and then reads the last one (a 2-column matmul).

Writes the time of each part to --json, so that a run of fewer epochs can be scaled to five.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

T_START = time.time()


def main(argv=None):
    p = argparse.ArgumentParser(prog="python benchmarks/torch_finetune.py",
                                description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    p.add_argument("--data", required=True, help="the SMSSpamCollection file")
    p.add_argument("--bpe-dir", required=True, help="folder with encoder.json and vocab.bpe")
    p.add_argument("--data-dir", required=True, help="where the split CSVs are written")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--attention", default="sdpa", choices=["sdpa", "manual"])
    p.add_argument("--json", required=True)
    args = p.parse_args(argv)

    import numpy as np
    import torch
    import torch.nn.functional as F
    from torch.utils.data import DataLoader, TensorDataset

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from common import REPO, write_json  # noqa: F401  (puts the repository on sys.path)
    from torch_gpt2 import GPT2Classifier, init_gpt2

    from npgpt.data import prepare_splits
    from npgpt.dataset import make_batch, make_datasets
    from npgpt.tokenizer import get_tokenizer

    torch.set_num_threads(args.threads)
    torch.manual_seed(123)
    splits = prepare_splits(args.data, args.data_dir, progress=False)
    datasets = make_datasets(splits, get_tokenizer(args.bpe_dir), "longest")
    pad_to = datasets[0].pad_to

    def loader(d, train):
        ids, _ = make_batch(d.tokens, np.arange(len(d)), pad_to=pad_to)
        tds = TensorDataset(torch.tensor(ids), torch.tensor(d.labels))
        return DataLoader(tds, batch_size=8, shuffle=train, drop_last=train, num_workers=0)

    train_loader, val_loader, test_loader = (loader(d, i == 0) for i, d in enumerate(datasets))
    model = init_gpt2(GPT2Classifier(attention=args.attention), seed=123)
    model.train_only_last(1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-5, weight_decay=0.1)

    def calc_loss_batch(ids, labels):
        return F.cross_entropy(model(ids), labels)

    def calc_loss_loader(data_loader, num_batches):
        total, n = 0.0, min(num_batches, len(data_loader))
        for i, (ids, labels) in enumerate(data_loader):
            if i >= n:
                break
            total += calc_loss_batch(ids, labels).item()
        return total / n

    def calc_accuracy_loader(data_loader, num_batches=None):
        model.eval()
        correct = seen = 0
        n = len(data_loader) if num_batches is None else min(num_batches, len(data_loader))
        for i, (ids, labels) in enumerate(data_loader):
            if i >= n:
                break
            with torch.no_grad():
                pred = torch.argmax(model(ids), dim=-1)
            correct += int((pred == labels).sum())
            seen += len(labels)
        return correct / seen

    t = {"steps": 0.0, "periodic_eval": 0.0, "epoch_accuracy": 0.0}
    n_steps = n_periodic = 0
    global_step = -1
    t_setup = time.time() - T_START
    for epoch in range(args.epochs):
        model.train()
        for ids, labels in train_loader:
            t0 = time.perf_counter()
            optimizer.zero_grad()
            loss = calc_loss_batch(ids, labels)
            loss.backward()
            optimizer.step()
            t["steps"] += time.perf_counter() - t0
            n_steps += 1
            global_step += 1
            if global_step % 50 == 0:
                t0 = time.perf_counter()
                model.eval()
                with torch.no_grad():
                    tl = calc_loss_loader(train_loader, 5)
                    vl = calc_loss_loader(val_loader, 5)
                model.train()
                t["periodic_eval"] += time.perf_counter() - t0
                n_periodic += 1
                print(f"Ep {epoch + 1} (Step {global_step:06d}): Train loss {tl:.3f}, Val loss {vl:.3f}", flush=True)
        t0 = time.perf_counter()
        ta, va = calc_accuracy_loader(train_loader, 5), calc_accuracy_loader(val_loader, 5)
        t["epoch_accuracy"] += time.perf_counter() - t0
        print(f"Training accuracy: {ta * 100:.2f}% | Validation accuracy: {va * 100:.2f}%", flush=True)
    t0 = time.perf_counter()
    final = {name: calc_accuracy_loader(dl) for name, dl in
             (("train", train_loader), ("validation", val_loader), ("test", test_loader))}
    t["final_eval"] = time.perf_counter() - t0
    for k, v in final.items():
        print(f"{k} accuracy: {v * 100:.2f}%", flush=True)
    write_json(args.json, {"epochs": args.epochs, "setup_s": t_setup, "steps_s": t["steps"], "n_steps": n_steps,
                           "periodic_eval_s": t["periodic_eval"], "n_periodic_evals": n_periodic,
                           "epoch_accuracy_s": t["epoch_accuracy"], "final_eval_s": t["final_eval"],
                           "wall_s": time.time() - T_START, "final_accuracy": final, "pad_to": pad_to,
                           "threads": torch.get_num_threads()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
