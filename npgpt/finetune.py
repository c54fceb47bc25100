"""Fine-tuning GPT-2 as a classifier: the training loop, evaluation, and the frozen-prefix cache.

The loop is the reference's (chapter 6 of "Build a Large Language Model (From Scratch)"):
AdamW, shuffled batches with the last partial batch dropped, an evaluation of train and validation
loss on a few batches every `eval_freq` steps, train and validation accuracy after each epoch,
and full accuracies at the end.

What makes it fast without changing a number:
- Frozen prefix computed once (`prefix_cache`): with blocks 0..s-1 frozen, the activations entering
  block s depend only on the tokens, so each example's are computed once, at its true length,
  and every epoch and every evaluation runs only the trainable blocks.
- No padding waste: with last-token pooling and causal attention, padding never changes a result,
  so batches are built from the cached activations padded only to the batch's longest example,
  and the model runs its blocks on the real positions alone, packed (`model.seen_rows`).
- Only what the loss reads: the last block runs at the pooled position alone (`model.dense=False`).

Robustness: a checkpoint (`npgpt.checkpoint`) after every epoch and on Ctrl-C / SIGTERM; a
non-finite loss or gradient stops the run and keeps the last good checkpoint.
"""
from __future__ import annotations

import json
import os
import signal
import time
from dataclasses import asdict, dataclass, field

import numpy as np

from . import kernels, model
from .checkpoint import load_checkpoint, save_checkpoint
from .cli import bar_options
from .data import eval_batches, train_batches
from .errors import TrainingError
from .optim import AdamW
from .prefix_cache import prefetch


@dataclass
class TrainSettings:
    """The knobs of a run; defaults are the reference's."""
    epochs: int = 5
    batch_size: int = 8
    lr: float = 5e-5
    weight_decay: float = 0.1
    decay_1d: bool = True
    seed: int = 123
    eval_freq: int = 50
    eval_iter: int = 5
    trainable: object = 1          # "head", K, or "all"
    pooling: str = "last_token"    # or "last_position"
    cache: bool = True             # compute the frozen prefix once
    cache_disk: bool = True        # keep it in the disk cache (npgpt.prefix_cache) for later runs
    cache_dir: str | None = None   # the disk cache folder (None: $NPGPT_CACHE_DIR or ~/.cache/npgpt/prefix)
    cache_memory: int | None = None  # bytes of prefix held in memory; above: on disk (None: half of free RAM)
    dense: bool = False            # run every position of the last block (the textbook forward)
    lora: object = None            # npgpt.lora.LoraSpec, with trainable="lora"
    causal: bool = True            # False: attention without the causal mask
    accumulate: int = 1            # batches whose mean gradient makes one optimizer step


@dataclass
class RunState:
    """Where a run is, saved in every checkpoint."""
    epoch: int = 0                 # epochs completed
    batch: int = 0                 # batches completed in the current epoch
    step: int = -1                 # optimizer steps taken - 1 (the reference's global_step)
    examples_seen: int = 0
    train_time: float = 0.0        # seconds spent in the training loop, summed over resumes
    metrics: dict = field(default_factory=lambda: {
        "steps": [], "examples_seen": [], "train_loss": [], "val_loss": [],
        "epoch_train_acc": [], "epoch_val_acc": [], "epoch_examples_seen": []})


# ----------------------------------------------------------------------------- frozen prefix

def cache_start(config, settings: TrainSettings):
    """The block index whose input is cached, or None when nothing can be cached."""
    if not settings.cache or settings.dense or settings.trainable == "all":
        return None
    return model.first_trainable_block(config, settings.trainable, settings.lora)


def prefix_cache(params, config, dataset, start: int, pooling: str, max_tokens=2048, progress=None,
                 store=None, digests=None, lora=None, causal=True):
    """The activations entering block `start` for every example of one dataset (see `prefix_caches`).
    -> list of [T_i, C] float arrays, one per example"""
    return prefix_caches(params, config, [dataset], start, pooling, max_tokens, progress, store, digests,
                         lora, causal)[0]


def prefix_caches(params, config, datasets, start: int, pooling: str, max_tokens=2048, progress=None,
                  store=None, digests=None, lora=None, causal=True):
    """The activations entering block `start` for every example of every dataset, computed once.

    last_token pooling: each example at its true length (padding never matters);
    last_position pooling: each example padded to the dataset's pad length, since the pooled
    position then is a pad token whose activation depends on the padding.
    The distinct token sequences of all the datasets (the SMS data holds some spam several times)
    go to `npgpt.prefix_cache`, which runs them packed along one axis, about max_tokens per
    matmul, with no padding computed, and keeps the result in its disk cache (store: a
    `prefix_cache.PrefixCache`; None: computed in memory, no disk). Repeated sequences share rows.
    -> per dataset, a list of [T_i, C] arrays (views of one array), or None for a dataset whose
       pooled activations depend on the batch (last_position with per-batch padding)
    Without the causal mask (causal=False) every token sees the padding, so examples are padded to
    the pad length as for last_position."""
    from .prefix_cache import PrefixCache

    store = store or PrefixCache(use_disk=False, max_tokens=max_tokens)
    first, seqs, where, mode = {}, [], [], pooling
    for d in datasets:
        if pooling == "last_position" or not causal:   # the padding is read: pad to pad_to
            if d.pad_to is None:
                where.append(None)
                continue
            mode = f"{pooling}:{d.pad_to}" + ("" if causal else ":no-causal-mask")
            lengths = np.full(len(d), d.pad_to)
        else:
            lengths = d.lengths
        rows = []
        for r in range(len(d)):
            ids = tuple(d.tokens[r][:lengths[r]]) + (model.PAD_ID,) * int(lengths[r] - min(len(d.tokens[r]), lengths[r]))
            if ids not in first:                  # token sequence -> its row in seqs
                first[ids] = len(seqs)
                seqs.append(np.array(ids, dtype=np.int64))
            rows.append(first[ids])
        where.append(rows)
    if not seqs:
        return [None] * len(datasets)
    flat, offsets = store.activations(params, config, seqs, start, mode, digests=digests, progress=progress,
                                      lora=lora, causal=causal)
    return [None if rows is None else [flat[offsets[u]:offsets[u + 1]] for u in rows] for rows in where]


def _ids(dataset, rows, T):
    from .data import make_batch
    return make_batch(dataset.tokens, rows, pad_to=T)


def batch_inputs(dataset, feats, rows, pooling, causal=True):
    """Keyword arguments for model.loss_and_grads / forward_cls for the chosen rows."""
    rows = np.asarray(rows)
    labels = dataset.labels[rows]
    if feats is None:
        ids, lengths = dataset.batch(rows)[:2]
        return dict(ids=ids, lengths=lengths), labels
    lengths = dataset.lengths[rows]
    if pooling == "last_position":
        lengths = np.full(len(rows), dataset.pad_to)
    T = int(max(feats[r].shape[0] for r in rows))
    C = feats[rows[0]].shape[1]
    x = np.zeros((len(rows), T, C), feats[rows[0]].dtype)                          # [B,T,C]
    for b, r in enumerate(rows):
        x[b, :feats[r].shape[0]] = feats[r]
    return dict(ids=None, x_start=x, lengths=np.minimum(lengths, T)), labels


# ----------------------------------------------------------------------------- evaluation

def evaluate(params, config, dataset, settings: TrainSettings, feats=None, start=0, batches=None):
    """Loss and accuracy over the given index batches (all of the split when None). The loss is
    the mean over messages of -log p(true label), the definition `npgpt.evaluate` prints (so a
    short last batch weighs by its size, not as much as a full one).

    feats: the split's prefix cache (activations entering block `start`), or None to run from ids.
    Returns (loss, accuracy, predicted labels in the order of the batches' rows)."""
    if batches is None:
        batches = eval_batches(len(dataset), settings.batch_size)
    loss_sum, correct, total, preds = 0.0, 0, 0, []
    from .ops import cross_entropy_forward
    for k, rows in enumerate(batches):
        if k + 1 < len(batches):               # a prefix on disk: its next batch is read meanwhile
            prefetch(feats, batches[k + 1])
        inputs, labels = batch_inputs(dataset, feats, rows, settings.pooling, settings.causal)
        logits = model.forward_cls(params, config, pooling=settings.pooling, dense=settings.dense,
                                   start=start if feats is not None else 0, lora=settings.lora,
                                   causal=settings.causal, **inputs)
        loss_sum += float(cross_entropy_forward(logits, labels)[0]) * len(rows)   # batch mean x B
        p = np.argmax(logits, axis=-1)
        preds.append(p)
        correct += int((p == labels).sum())
        total += len(rows)
    return loss_sum / total, correct / total, np.concatenate(preds)


def grouping_free(dataset, pooling, causal=True):
    """Whether a message's logits are the same whichever messages share its batch: causal
    attention with a pooling that reads no padding, or a fixed pad length for every batch."""
    return (causal and pooling in ("last_token", "first_token", "mean")) or dataset.pad_to is not None


def eval_groups(dataset, batches, pooling, causal=True):
    """The estimate's batches as one forward pass when grouping does not change a result: the
    last block's weights are then read once for all its messages instead of once per batch.
    The loss is the same mean over the same messages."""
    if len(batches) > 1 and grouping_free(dataset, pooling, causal):
        return [np.concatenate(batches)]
    return batches


EVAL_BATCH = 64   # messages per forward pass of the final evaluation, when grouping is free


def full_eval_batches(dataset, batch_size, pooling):
    """All rows, sorted by length where that is harmless (results then do not depend on how rows
    are grouped: last-token pooling, or a fixed pad length), so each batch pads little."""
    sort = pooling in ("last_token", "first_token", "mean") or dataset.pad_to is not None
    order = np.argsort(dataset.lengths, kind="stable") if sort else np.arange(len(dataset))
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


# ----------------------------------------------------------------------------- training

class _StopFlag:
    """Ctrl-C / SIGTERM set a flag; the loop checkpoints at the end of the current step."""

    def __init__(self):
        self.signum = None
        self._old = {}

    def __enter__(self):
        for s in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[s] = signal.signal(s, self._handle)
            except ValueError:      # not the main thread
                pass
        return self

    def _handle(self, signum, frame):
        if self.signum is not None:  # a second Ctrl-C: stop now (the checkpoint on disk is intact)
            raise KeyboardInterrupt
        self.signum = signum

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)


class Interrupted(Exception):
    """Training stopped on a signal after writing a checkpoint."""

    def __init__(self, signum, checkpoint):
        super().__init__(f"interrupted: checkpoint written to {checkpoint}")
        self.signum, self.checkpoint = signum, checkpoint


class Diverged(TrainingError):
    """A non-finite loss or gradient: training stopped before the step was applied."""

    def __init__(self, step, epoch, batch):
        super().__init__(f"non-finite loss or gradient at step {step} (epoch {epoch}, batch {batch})")
        self.step, self.epoch, self.batch = step, epoch, batch


def _all_finite(loss, grads):
    """No NaN or inf in the loss or any gradient (checked before AdamW uses them)."""
    return np.isfinite(loss) and all(kernels.all_finite(g) for g in grads.values())


def fit(params, config, datasets, settings: TrainSettings, run_dir, run_info: dict,
        resume=False, log=print, progress=True):
    """Train params in place on datasets = (train, validation, test); return the RunState.

    run_info: JSON-serialisable description of the run (saved in checkpoints for resuming)."""
    from tqdm import tqdm

    train, val, test = datasets
    names = model.trainable_names(config, settings.trainable, lora=settings.lora)
    opt = AdamW(lr=settings.lr, weight_decay=settings.weight_decay, decay_1d=settings.decay_1d)
    state = RunState()
    if resume:
        saved = load_checkpoint(run_dir, params, opt)
        state = RunState(**saved["run_state"])
        log(f"resuming at epoch {state.epoch + 1}, batch {state.batch}, step {state.step + 1}")

    start = cache_start(config, settings)
    feats = [None, None, None]
    if start is not None:
        t0 = time.time()
        from .prefix_cache import PrefixCache
        total = sum(int(d.lengths.sum()) if settings.pooling == "last_token" else len(d) * (d.pad_to or 0)
                    for d in datasets)
        store = PrefixCache(settings.cache_dir, use_disk=settings.cache_disk, memory_limit=settings.cache_memory,
                            spill_dir=run_dir, log=log)
        with tqdm(unit="tok", desc=f"frozen blocks 0..{start - 1}" if start else "embeddings",
                  disable=not progress, leave=False, **bar_options()) as bar:
            feats = prefix_caches(params, config, datasets, start, settings.pooling, progress=bar.update,
                                  store=store, lora=settings.lora, causal=settings.causal)
        if feats[0] is not None:
            what = f"the frozen prefix (blocks 0..{start - 1})" if start else "the embeddings"
            log(f"cached {what} of {total} tokens in {time.time() - t0:.1f} s")
    fstart = start if feats[0] is not None else 0
    m = state.metrics
    eval_train = eval_batches(len(train), settings.batch_size)[:settings.eval_iter]
    eval_val = eval_batches(len(val), settings.batch_size)[:settings.eval_iter]
    n_tr, n_va = sum(map(len, eval_train)), sum(map(len, eval_val))   # messages behind each estimate
    eval_train = eval_groups(train, eval_train, settings.pooling, settings.causal)
    eval_val = eval_groups(val, eval_val, settings.pooling, settings.causal)
    m["estimate_messages"] = {"train": n_tr, "validation": n_va}

    def checkpoint(order=None):
        st = {"run_state": asdict(state), "run_info": run_info}
        path = save_checkpoint(run_dir, params, names, opt, st, order)
        _write_json(os.path.join(run_dir, "metrics.json"), {"metrics": m, "run_info": run_info})
        return path

    def step_loss(rows):
        inputs, labels = batch_inputs(train, feats[0], rows, settings.pooling, settings.causal)
        return model.loss_and_grads(params, config, labels=labels, trainable=settings.trainable,
                                    pooling=settings.pooling, dense=settings.dense, lora=settings.lora,
                                    causal=settings.causal, **inputs)

    with _StopFlag() as stop:
        for epoch in range(state.epoch, settings.epochs):
            batches = train_batches(len(train), settings.batch_size, settings.seed, epoch)
            bar = tqdm(total=len(batches), initial=state.batch, desc=f"epoch {epoch + 1}/{settings.epochs}",
                       disable=not progress, unit="batch", dynamic_ncols=True, **bar_options())
            t_epoch, n_epoch = time.time(), 0
            acc, n_acc, seen = None, 0, 0        # gradients summed over the accumulated batches
            for bi in range(state.batch, len(batches)):
                t0 = time.time()
                if bi + 1 < len(batches):       # a prefix on disk: its next batch is read meanwhile
                    prefetch(feats[0], batches[bi + 1])
                loss, grads, _ = step_loss(batches[bi])
                if not _all_finite(loss, grads):
                    bar.close()
                    raise Diverged(state.step + 1, epoch + 1, bi + 1)
                n_epoch += len(batches[bi])
                seen += len(batches[bi])
                bar.update(1)
                if settings.accumulate > 1:
                    acc, n_acc = accumulate_grads(acc, grads), n_acc + 1
                    if n_acc < settings.accumulate and bi + 1 < len(batches):
                        state.train_time += time.time() - t0
                        continue
                    grads = {k: g / g.dtype.type(n_acc) for k, g in acc.items()}
                    acc, n_acc = None, 0
                opt.step(params, grads)
                state.step += 1
                state.batch = bi + 1
                state.examples_seen += seen
                seen = 0
                state.train_time += time.time() - t0
                if state.step % settings.eval_freq == 0:
                    tl = evaluate(params, config, train, settings, feats[0], fstart, eval_train)[0]
                    vl = evaluate(params, config, val, settings, feats[1], fstart, eval_val)[0]
                    m["steps"].append(state.step)
                    m["examples_seen"].append(state.examples_seen)
                    m["train_loss"].append(tl)
                    m["val_loss"].append(vl)
                    bar.write(f"Ep {epoch + 1} (Step {state.step:06d}): Train loss ({n_tr} msgs) {tl:.3f}, "
                              f"Val loss ({n_va} msgs) {vl:.3f}")
                bar.set_postfix(loss=f"{loss:.3f}", ex_s=f"{n_epoch / max(time.time() - t_epoch, 1e-9):.0f}", refresh=False)
                if stop.signum is not None:
                    bar.close()
                    raise Interrupted(stop.signum, checkpoint(np.concatenate(batches)))
            bar.close()
            ta = evaluate(params, config, train, settings, feats[0], fstart, eval_train)[1]
            va = evaluate(params, config, val, settings, feats[1], fstart, eval_val)[1]
            m["epoch_train_acc"].append(ta)
            m["epoch_val_acc"].append(va)
            m["epoch_examples_seen"].append(state.examples_seen)
            log(f"Ep {epoch + 1}: train acc ({n_tr} msgs) {ta * 100:.2f}% | val acc ({n_va} msgs) {va * 100:.2f}%")
            state.epoch, state.batch = epoch + 1, 0
            checkpoint()
            if stop.signum is not None:
                raise Interrupted(stop.signum, os.path.join(run_dir, "checkpoint.h5"))

    final = {}
    for name, d, f in zip(("train", "validation", "test"), datasets, feats):
        size = max(settings.batch_size, EVAL_BATCH) if grouping_free(d, settings.pooling, settings.causal) \
            else settings.batch_size
        batches = full_eval_batches(d, size, settings.pooling)
        final[f"{name}_loss"], final[f"{name}_accuracy"], _ = evaluate(params, config, d, settings, f, fstart, batches)
    m["final"] = final
    return state, feats


def accumulate_grads(acc, grads):
    """acc + grads, name by name (acc None: a copy of grads). The mean over N equal batches of
    their mean-loss gradients is the gradient of one batch N times larger."""
    if acc is None:
        return {k: g.copy() for k, g in grads.items()}
    for k, g in grads.items():
        acc[k] += g
    return acc


def _write_json(path, obj):
    tmp = path + ".tmp"
    with open(tmp, "w") as fh:
        json.dump(obj, fh, indent=1)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
