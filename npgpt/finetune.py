"""The training loop: GPT-2 fine-tuned as a classifier, as the reference trains it.

The loop is the reference's (chapter 6 of "Build a Large Language Model (From Scratch)"): AdamW,
shuffled batches with the last partial batch dropped, an estimate of train and validation loss on
the first `eval_iter` batches every `eval_freq` steps, train and validation accuracy after each
epoch on those batches, and accuracies on the whole splits at the end.

What makes it fast without changing a number:
- The frozen prefix computed once (`npgpt.prefix`, `npgpt.prefix_cache`): with blocks 0..s-1
  frozen, the activations entering block s depend only on the tokens, so each example's are
  computed once and every step and every evaluation runs only the trainable blocks.
- No padding waste: batches are built from the cached activations padded only to the batch's
  longest example, and `npgpt.fastmodel` runs the blocks on the positions the loss reads alone.
- Estimates and the final evaluation run many messages per forward pass where grouping changes no
  result (`npgpt.model.Padding.grouping_free`).

Robustness: a checkpoint (`npgpt.checkpoint`) after every epoch and on Ctrl-C / SIGTERM; a
non-finite loss or gradient stops the run before the step is applied (`Diverged`) and keeps the
last good checkpoint. Resuming from a checkpoint continues with exactly the numbers of an
uninterrupted run.
"""
from __future__ import annotations

import functools
import os
import time
from dataclasses import asdict, dataclass, field

import numpy as np

from . import fastmodel, fastops
from .checkpoint import CHECKPOINT, load_checkpoint, save_checkpoint
from .dataset import eval_batches, train_batches
from .errors import TrainingError
from .fileio import write_json
from .model import Padding, trainable_names
from .ops import cross_entropy_forward
from .optim import AdamW, clip_grad_norm, scheduled_lr
from .prefix_cache import prefetch
from .progress import bar, write_above
from .runs import Interrupted, StopFlag

EVAL_BATCH = 64   # messages per forward pass of the final evaluation, when grouping is free


@dataclass
class RunState:
    """Where a run is, saved in every checkpoint."""
    epoch: int = 0                 # epochs completed
    batch: int = 0                 # batches completed in the current epoch
    step: int = -1                 # optimizer steps taken - 1 (the reference's global_step)
    examples_seen: int = 0
    train_time: float = 0.0        # seconds spent in the training loop, summed over resumes
    stopped: bool = False          # stopped early (--patience)
    best: dict | None = None       # the best validation so far (--keep best, --patience): where, its figures
    since_best: int = 0            # validations since the best one
    metrics: dict = field(default_factory=lambda: {
        "steps": [], "examples_seen": [], "train_loss": [], "val_loss": [],
        "epoch_train_acc": [], "epoch_val_acc": [], "epoch_examples_seen": [], "lr": [], "validations": []})


class Diverged(TrainingError):
    """A non-finite loss or gradient: training stopped before the step was applied."""

    def __init__(self, step, epoch, batch):
        super().__init__(f"non-finite loss or gradient at step {step} (epoch {epoch}, batch {batch})")
        self.step, self.epoch, self.batch = step, epoch, batch


# ----------------------------------------------------------------------------- batches and evaluation

def batch_inputs(dataset, feats, rows, pooling):
    """Keyword arguments of `fastmodel.loss_and_grads` / `forward_cls` for the chosen rows: ids
    (feats None), or the cached activations entering the first trainable block, padded to the
    batch's longest. -> (kwargs, labels [B])"""
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


def evaluate(params, config, dataset, run, feats=None, start=0, batches=None, class_weights=None):
    """Loss and accuracy over the given index batches (all of the split when None). The loss is
    the mean over messages of -log p(true label), the definition `npgpt.evaluate` prints (so a
    short last batch weighs by its size, not as much as a full one); with class_weights [K], the
    weighted mean the run minimises (each message counts by its class's weight).

    run: the RunConfig (pooling, mask, LoRA, dense). feats: the split's prefix (activations
    entering block `start`), or None to run from ids.
    Returns (loss, accuracy, predicted labels in the order of the batches' rows)."""
    if batches is None:
        batches = eval_batches(len(dataset), run.batch_size)
    loss_sum, correct, total, weight, preds = 0.0, 0, 0, 0.0, []
    for k, rows in enumerate(batches):
        if k + 1 < len(batches):               # a prefix on disk: its next batch is read meanwhile
            prefetch(feats, batches[k + 1])
        inputs, labels = batch_inputs(dataset, feats, rows, run.pooling)
        logits = fastmodel.forward_cls(params, config, pooling=run.pooling, dense=run.dense,
                                       start=start if feats is not None else 0, lora=run.lora_spec,
                                       causal=run.causal_mask, **inputs)
        w = len(rows) if class_weights is None else float(np.sum(class_weights[labels]))
        loss_sum += float(cross_entropy_forward(logits, labels, class_weights)[0]) * w   # batch mean x its weight
        weight += w
        p = np.argmax(logits, axis=-1)
        preds.append(p)
        correct += int((p == labels).sum())
        total += len(rows)
    return loss_sum / weight, correct / total, np.concatenate(preds)


def macro_f1(true, pred, num_classes: int) -> float:
    """The mean over classes of F1 = 2 TP / (2 TP + FP + FN) (0 for a class never seen nor
    predicted), as `npgpt.evaluate` reports it."""
    from .evaluate import confusion_matrix, per_class_metrics
    return per_class_metrics(confusion_matrix(true, pred, num_classes), range(num_classes))[1]["f1"]


def padding_of(dataset, run) -> Padding:
    return Padding(run.pooling, run.causal_mask, dataset.pad_to)


def estimate_batches(dataset, run) -> list:
    """The first `eval_iter` batches in order, as one forward pass when grouping does not change a
    result (the last block's weights are then read once for all of them). The loss is the same
    mean over the same messages."""
    batches = eval_batches(len(dataset), run.batch_size)[:run.eval_iter]
    if len(batches) > 1 and padding_of(dataset, run).grouping_free:
        return [np.concatenate(batches)]
    return batches


def final_batches(dataset, run) -> list:
    """Every row, for the final evaluation: sorted by length, in batches of EVAL_BATCH, where that
    changes no result (then each batch pads little); else in order, in the run's batches, as the
    estimates were taken."""
    if not padding_of(dataset, run).grouping_free:
        return eval_batches(len(dataset), run.batch_size)
    order = np.argsort(dataset.lengths, kind="stable")
    size = max(run.batch_size, EVAL_BATCH)
    return [order[i:i + size] for i in range(0, len(order), size)]


def accumulate_grads(acc, grads):
    """acc + grads, name by name (acc None: a copy of grads). The mean over N equal batches of
    their mean-loss gradients is the gradient of one batch N times larger."""
    if acc is None:
        return {k: g.copy() for k, g in grads.items()}
    for k, g in grads.items():
        acc[k] += g
    return acc


def all_finite(loss, grads) -> bool:
    """No NaN or inf in the loss or any gradient (checked before AdamW uses them)."""
    return np.isfinite(loss) and all(fastops.all_finite(g) for g in grads.values())


# ----------------------------------------------------------------------------- the loop

class Trainer:
    """The training loop of one run.

    params (updated in place), config: the model; datasets: (train, validation, test);
    run: the RunConfig; feats: per dataset its frozen prefix (activations entering block `start`),
    or None to run from token ids; record: what every checkpoint and metrics.json carry besides
    the run's state (the RunConfig, the class names); class_weights [K]: the weighted loss, or
    None. log: a function of one string."""

    def __init__(self, params, config, datasets, run, run_dir, record: dict, feats=(None, None, None), start=0,
                 log=print, progress=True, class_weights=None):
        self.params, self.config, self.datasets, self.run = params, config, datasets, run
        self.run_dir, self.record, self.log, self.progress = run_dir, record, log, progress
        self.feats = list(feats)
        self.start = start if self.feats[0] is not None else 0
        self.class_weights = class_weights
        self.names = trainable_names(config, run.trainable, lora=run.lora_spec)
        self.opt = AdamW(lr=run.lr, weight_decay=run.weight_decay, decay_1d=run.decay_1d,
                         update=fastops.adamw_update)
        self.state = RunState()
        self.best_params = None                     # the trainable arrays of the best validation
        train, val = datasets[0], datasets[1]
        self.estimates = {"train": estimate_batches(train, run), "validation": estimate_batches(val, run)}
        self.state.metrics["estimate_messages"] = {k: int(sum(map(len, b))) for k, b in self.estimates.items()}
        per_epoch = -(-(len(train) // run.batch_size) // run.accumulate)         # optimizer steps
        self.total_steps = run.epochs * per_epoch
        self.warmup_steps = int(round(run.warmup * self.total_steps)) if run.warmup < 1 else int(run.warmup)

    def resume(self):
        """Continue from the run folder's checkpoint (parameters, AdamW moments, state, the best
        validation's arrays)."""
        best = {}
        saved = load_checkpoint(self.run_dir, self.params, self.opt, extra=best)
        self.state = RunState(**saved["run_state"])
        self.best_params = {k[len("best/"):]: v for k, v in best.items()} or None
        s = self.state
        self.log(f"resuming at epoch {s.epoch + 1}, batch {s.batch}, step {s.step + 1}")

    def checkpoint(self, order=None) -> str:
        state = {"run_state": asdict(self.state), **self.record}
        extra = {f"best/{n}": a for n, a in (self.best_params or {}).items()}
        path = save_checkpoint(self.run_dir, self.params, self.names, self.opt, state, order, extra=extra)
        write_json(os.path.join(self.run_dir, "metrics.json"), {"metrics": self.state.metrics, **self.record})
        return path

    def train(self) -> RunState:
        """Epochs from where the state is to run.epochs, or until --patience stops the run;
        Interrupted (after a checkpoint) on a signal."""
        with StopFlag() as stop:
            for epoch in range(self.state.epoch, self.run.epochs):
                if self.state.stopped:
                    break
                self._epoch(epoch, stop)
        return self.state

    def _epoch(self, epoch, stop):
        run, state = self.run, self.state
        batches = train_batches(len(self.datasets[0]), run.batch_size, run.seed, epoch)
        shown = bar(enabled=self.progress, total=len(batches), initial=state.batch, unit="batch", untimed=1,
                    desc=f"epoch {epoch + 1}/{run.epochs}", dynamic_ncols=True)   # untimed: it compiles kernels
        say = functools.partial(write_above, shown, self.log)     # a line above a live bar, else to the log
        t_epoch, n_epoch = time.time(), 0
        acc, n_acc, seen = None, 0, 0        # gradients summed over the accumulated batches
        for bi in range(state.batch, len(batches)):
            t0 = time.time()
            if bi + 1 < len(batches):        # a prefix on disk: its next batch is read meanwhile
                prefetch(self.feats[0], batches[bi + 1])
            loss, grads = self._loss_and_grads(batches[bi])
            if not all_finite(loss, grads):
                shown.close()
                raise Diverged(state.step + 1, epoch + 1, bi + 1)
            n_epoch += len(batches[bi])
            seen += len(batches[bi])
            shown.update(1)
            if run.accumulate > 1:
                acc, n_acc = accumulate_grads(acc, grads), n_acc + 1
                if n_acc < run.accumulate and bi + 1 < len(batches):
                    state.train_time += time.time() - t0
                    continue
                grads = {k: g / g.dtype.type(n_acc) for k, g in acc.items()}
                acc, n_acc = None, 0
            self._apply(grads, seen, bi, t0)
            seen = 0
            if state.step % run.eval_freq == 0:
                say(self._log_losses(epoch))
                if run.validate_every == "eval":
                    self._validate(epoch, say)
            shown.set_postfix(loss=f"{loss:.3f}", ex_s=f"{n_epoch / max(time.time() - t_epoch, 1e-9):.0f}",
                              refresh=False)
            if stop.signum is not None or state.stopped:
                shown.close()
                if state.stopped:
                    self.checkpoint()
                    return
                raise Interrupted(stop.signum, self.checkpoint(np.concatenate(batches)))
        shown.close()
        self._end_epoch(epoch)
        if stop.signum is not None:
            raise Interrupted(stop.signum, os.path.join(self.run_dir, CHECKPOINT))

    def _loss_and_grads(self, rows):
        run = self.run
        inputs, labels = batch_inputs(self.datasets[0], self.feats[0], rows, run.pooling)
        loss, grads, _ = fastmodel.loss_and_grads(self.params, self.config, labels=labels, trainable=run.trainable,
                                                  pooling=run.pooling, dense=run.dense, lora=run.lora_spec,
                                                  causal=run.causal_mask, class_weights=self.class_weights,
                                                  **inputs)
        return loss, grads

    def _apply(self, grads, seen, bi, t0):
        """One AdamW step at the scheduled learning rate, after clipping, and the state that says so."""
        run, state = self.run, self.state
        self.opt.lr = scheduled_lr(state.step + 1, self.total_steps, run.lr, run.lr_schedule, self.warmup_steps,
                                   run.initial_lr, run.min_lr)
        if run.clip_grad_norm is not None:
            clip_grad_norm(grads, run.clip_grad_norm)
        self.opt.step(self.params, grads)
        state.step += 1
        state.batch = bi + 1
        state.examples_seen += seen
        state.train_time += time.time() - t0
        state.metrics["lr"].append(self.opt.lr)

    def _estimate(self, split):
        """(loss, accuracy) on the first eval_iter batches of 'train' or 'validation'."""
        k = 0 if split == "train" else 1
        return evaluate(self.params, self.config, self.datasets[k], self.run, self.feats[k], self.start,
                        self.estimates[split])[:2]

    def _log_losses(self, epoch) -> str:
        m, state = self.state.metrics, self.state
        tl, vl = self._estimate("train")[0], self._estimate("validation")[0]
        m["steps"].append(state.step)
        m["examples_seen"].append(state.examples_seen)
        m["train_loss"].append(tl)
        m["val_loss"].append(vl)
        n = m["estimate_messages"]
        return (f"Ep {epoch + 1} (Step {state.step:06d}): Train loss ({n['train']} msgs) {tl:.3f}, "
                f"Val loss ({n['validation']} msgs) {vl:.3f}")

    def _end_epoch(self, epoch):
        m, state = self.state.metrics, self.state
        ta, va = self._estimate("train")[1], self._estimate("validation")[1]
        m["epoch_train_acc"].append(ta)
        m["epoch_val_acc"].append(va)
        m["epoch_examples_seen"].append(state.examples_seen)
        n = m["estimate_messages"]
        self.log(f"Ep {epoch + 1}: train acc ({n['train']} msgs) {ta * 100:.2f}% | "
                 f"val acc ({n['validation']} msgs) {va * 100:.2f}%")
        state.epoch, state.batch = epoch + 1, 0
        if self.run.validate_every == "epoch" and (self.run.keep == "best" or self.run.patience):
            self._validate(epoch, self.log)
        self.checkpoint()

    def _validate(self, epoch, say):
        """Score the whole validation split; keep the trainable arrays when it is the best so far
        (--keep best); count validations without improvement (--patience)."""
        run, state = self.run, self.state
        val = self.datasets[1]
        batches = final_batches(val, run)
        loss, accuracy, preds = evaluate(self.params, self.config, val, run, self.feats[1], self.start, batches,
                                         self.class_weights)
        f1 = macro_f1(val.labels[np.concatenate(batches)], preds, len(self.params["cls/b"]))
        entry = {"epoch": epoch + 1, "step": state.step, "examples_seen": state.examples_seen, "loss": loss,
                 "accuracy": accuracy, "macro_f1": f1}
        state.metrics["validations"].append(entry)
        value = entry[run.best_metric]
        better = state.best is None or (value < state.best[run.best_metric] if run.best_metric == "loss"
                                        else value > state.best[run.best_metric])
        if better:
            state.best, state.since_best = entry, 0
            if run.keep == "best":
                self.best_params = {n: self.params[n].copy() for n in self.names}
        else:
            state.since_best += 1
        say(f"validation ({len(val)} msgs, epoch {epoch + 1}, step {state.step}): loss {loss:.4f}, accuracy "
            f"{accuracy * 100:.2f}%, macro F1 {f1 * 100:.2f}%" + (" (best so far)" if better else
                                                                   f" ({state.since_best} without improvement)"))
        if run.patience and state.since_best >= run.patience:
            state.stopped = True
            say(f"stopping early: {state.since_best} validations without improvement of the {run.best_metric} "
                f"(best: epoch {state.best['epoch']}, step {state.best['step']})")

    def final_evaluation(self) -> dict:
        """With --keep best, the best validation's arrays back in place; then loss and accuracy on
        the whole of each split, into the metrics ("final"), and which step the parameters are of
        ("kept")."""
        state = self.state
        if self.run.keep == "best" and self.best_params is not None:
            for name, arr in self.best_params.items():
                self.params[name][...] = arr
            state.metrics["kept"] = dict(state.best, which="best")
            self.log(f"kept the parameters of epoch {state.best['epoch']}, step {state.best['step']} (the best "
                     f"validation {self.run.best_metric}: {state.best[self.run.best_metric]:.4f})")
        else:
            state.metrics["kept"] = {"which": "last", "epoch": state.epoch + (state.batch > 0), "step": state.step}
        final = {}
        for name, d, f in zip(("train", "validation", "test"), self.datasets, self.feats):
            final[f"{name}_loss"], final[f"{name}_accuracy"], _ = evaluate(
                self.params, self.config, d, self.run, f, self.start, final_batches(d, self.run))
        state.metrics["final"] = final
        return final
