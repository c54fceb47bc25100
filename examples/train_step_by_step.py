"""One training step of the spam classifier, written out stage by stage.

    python examples/train_step_by_step.py                       # tiny random GPT-2 (2 blocks, 64 dims)
    python examples/train_step_by_step.py --weights weights/gpt2-124M.h5

The reference's setting: the last block, the final LayerNorm and a 2-class head train, everything
below is frozen. The stages are the ones `npgpt.model.loss_and_grads` (the textbook) runs, spelled
out with the operations of `npgpt.ops`, every position of the last block (the training path,
`npgpt.fastmodel`, computes the same numbers at fewer positions, see docs/backprop.md):

  1. weights      a GPT-2 and a fresh classifier head
  2. forward      frozen prefix (embeddings, blocks 0..L-2, nothing saved), the last block (saving
                  what its backward needs), ln_f, the head at each message's last real token
  3. loss         mean cross-entropy
  4. backward     head -> ln_f -> the pooled rows -> the last block, stopping there
  5. check        the same gradients from npgpt.model.loss_and_grads and npgpt.fastmodel
  6. AdamW        one step: what moves, what stays, and the loss after it
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import numpy as np  # noqa: E402

from npgpt import fastmodel, model, ops  # noqa: E402
from npgpt.config import TINY, add_classifier_head, init_params  # noqa: E402
from npgpt.optim import AdamW  # noqa: E402


def norm(a):
    return float(np.sqrt((np.asarray(a, np.float64) ** 2).sum()))


def main(argv=None):
    p = argparse.ArgumentParser(description="One training step of the classifier, stage by stage.")
    p.add_argument("--weights", default=None, help="a GPT-2 HDF5 file (default: tiny random weights)")
    p.add_argument("--seed", type=int, default=123, help="seed of the weights, the head and the batch")
    a = p.parse_args(argv)

    # 1. weights ----------------------------------------------------------------------------------
    if a.weights:
        from npgpt.params import load_params
        params, cfg, _ = load_params(a.weights)
        if "cls/w" not in params:
            add_classifier_head(params, 2, seed=a.seed)
        print(f"1. weights: {a.weights}, {cfg.n_layer} blocks of {cfg.n_embd} channels")
    else:
        cfg = TINY
        params = init_params(cfg, seed=a.seed, num_classes=2)
        print(f"1. weights: tiny random GPT-2, {cfg.n_layer} blocks of {cfg.n_embd} channels, {cfg.n_head} heads")
    L = cfg.n_layer
    last = L - 1
    trainable = model.trainable_names(cfg, 1)               # the last block, ln_f, the head
    print(f"   trainable: {len(trainable)} arrays, "
          f"{sum(params[n].size for n in trainable):,} of {sum(v.size for v in params.values()):,} numbers")

    # a batch of 4 'messages': random token ids, right-padded with <|endoftext|>
    rng = np.random.default_rng(a.seed)
    lengths = np.array([7, 3, 5, 2])
    ids = np.full((4, lengths.max()), model.PAD_ID)
    for b, n in enumerate(lengths):
        ids[b, :n] = rng.integers(0, 50000, n)
    labels = np.array([0, 1, 1, 0])
    pos = lengths - 1                                        # the last real token of each message
    rows = np.arange(len(ids))

    # 2. forward ----------------------------------------------------------------------------------
    x = model.forward_prefix(params, cfg, ids, last)                                       # [B,T,C]
    print(f"2. forward: ids {ids.shape} -> frozen prefix (embeddings, blocks 0..{last - 1}) -> x {x.shape}, nothing saved")
    y, saved_block = model.block_forward(params, last, x, cfg.n_head)                     # [B,T,C]
    print(f"   block {last} (trainable) -> {y.shape}, saving the inputs of its 4 linear layers, "
          f"2 LayerNorms' (mean, rstd), the attention probabilities {saved_block.attn.att.shape}, GELU's input")
    pooled = y[rows, pos]                                                                  # [B,C]
    h, saved_lnf = ops.layernorm_forward(pooled, params["ln_f/g"], params["ln_f/b"])       # [B,C]
    logits, saved_cls = ops.linear_forward(h, params["cls/w"], params["cls/b"])           # [B,2]
    print(f"   pooled at positions {pos.tolist()} -> ln_f -> head -> logits {logits.shape}")

    # 3. loss -------------------------------------------------------------------------------------
    loss, saved_ce = ops.cross_entropy_forward(logits, labels)
    print(f"3. loss: cross-entropy {loss:.6f} (log 2 = {np.log(2):.6f} for a head that cannot tell yet)")

    # 4. backward ---------------------------------------------------------------------------------
    grads = {}
    dlogits = ops.cross_entropy_backward(1.0, saved_ce)                                    # [B,2]
    print(f"4. backward: dlogits = (softmax - onehot) / B, rows sum to {np.abs(dlogits.sum(1)).max():.1e}")
    dh, grads["cls/w"], grads["cls/b"] = ops.linear_backward(dlogits, saved_cls)          # [B,C]
    dpooled, grads["ln_f/g"], grads["ln_f/b"] = ops.layernorm_backward(dh, saved_lnf)     # [B,C]
    dy = np.zeros_like(y)                                                                  # [B,T,C]
    dy[rows, pos] = dpooled                     # only the pooled rows receive a gradient
    print(f"   head, ln_f: |dcls/w| {norm(grads['cls/w']):.3e}, |dln_f/g| {norm(grads['ln_f/g']):.3e}; "
          f"dy nonzero at {int((np.abs(dy).sum(-1) > 0).sum())} of {dy.shape[0] * dy.shape[1]} positions")
    model.block_backward(dy, saved_block, last, grads, need_dx=False)   # stops: nothing below trains
    for n in ("attn/c_attn/w", "attn/c_proj/w", "mlp/c_fc/w", "mlp/c_proj/w", "ln_1/g"):
        print(f"   block {last}: |d h{last}/{n}| {norm(grads[f'h{last}/{n}']):.3e}")
    print(f"   backward stops at block {last}: no gradient is computed for blocks 0..{last - 1} or the embeddings")

    # 5. check ------------------------------------------------------------------------------------
    worst = {}
    for impl in (model, fastmodel):
        loss2, grads2, _ = impl.loss_and_grads(params, cfg, ids, labels, trainable=1, lengths=lengths)
        assert sorted(grads) == sorted(grads2) == sorted(trainable)
        worst[impl.__name__] = max(float(np.abs(grads[n] - grads2[n]).max() / max(np.abs(grads2[n]).max(), 1e-30))
                                   for n in grads)
    print(f"5. check: npgpt.model.loss_and_grads gives loss {loss2:.6f} and the same {len(grads)} gradients "
          f"(largest relative difference {max(worst.values()):.1e}; npgpt.fastmodel's too, computing the "
          f"last block at fewer positions)")

    # 6. AdamW ------------------------------------------------------------------------------------
    before = {n: v.copy() for n, v in params.items()}
    opt = AdamW(lr=5e-5, weight_decay=0.1)                   # the reference's settings
    opt.step(params, grads)
    moved = [n for n in params if not np.array_equal(params[n], before[n])]
    step = max(float(np.abs(params[n] - before[n]).max()) for n in moved)
    print(f"6. AdamW (lr 5e-5, weight decay 0.1): {len(moved)} arrays moved, all of them trainable: "
          f"{sorted(moved) == sorted(trainable)}; largest change {step:.2e} "
          f"(the first step moves each number by about lr, whatever its gradient's size)")
    loss3, _, _ = model.loss_and_grads(params, cfg, ids, labels, trainable=1, lengths=lengths)
    print(f"   loss after the step: {loss3:.6f} (was {loss:.6f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
