"""Train a run: a RunConfig and data in, a classifier, its metrics and its run folder out.

    from npgpt.runconfig import RunConfig
    from npgpt.train import train_run
    result = train_run(RunConfig(model="tiny", data="examples/support_tickets.csv", trainable_blocks="all", lr=1e-3))
    result.classifier.predict(["I was billed twice"]); result.metrics["final"]; result.run_dir

The command line (`python -m npgpt.train`, npgpt.cli.train) and `npgpt.fit` both call `train_run`
(or `resume_run`): the same run from the same data and seed gives the same parameters, bit for bit.
Steps: the data (a table before the model: the head needs the number of classes), the model, the
tokenizer and the token ids; then, with everything in place, the run folder (a failed start leaves
none); the frozen prefix; the loop (`npgpt.finetune`); the classifier file, metrics.json, plots.
"""
from __future__ import annotations

if __name__ == "__main__":      # `python -m npgpt.train`: the command line, npgpt.cli.train
    from npgpt.cli import hand_over
    hand_over("train")

import functools
import os
import time
from dataclasses import dataclass

import numpy as np

from . import runs
from .errors import NpgptError, TrainingError
from .finetune import Diverged, RunState, Trainer
from .runconfig import RUN_FILE, ConfigError, RunConfig, RunOptions
from .job import load_data, model_summary

CHECKPOINT = "checkpoint.h5"


@dataclass
class RunResult:
    """What a finished run gives back. `classifier` (npgpt.classify.Classifier) is read from
    classifier_path when first used: a run from the command line never holds two copies of the
    weights."""
    classifier_path: str         # the run's classifier.h5
    bpe_dir: str | None          # the tokenizer files it was trained with (None: its own copy)
    metrics: dict                # every logged value; metrics["final"]: loss and accuracy per split
    run_dir: str                 # the run folder
    state: RunState
    checkpoint_note: str         # what is left of checkpoint.h5, in words
    seconds: float               # the whole run, start to saved files

    @functools.cached_property
    def classifier(self):
        from .classify import load_classifier
        return load_classifier(self.classifier_path, self.bpe_dir)


def train_run(run: RunConfig, options: RunOptions | None = None, data=None, validation=None, test=None,
              log=print) -> RunResult:
    """Train the run `run` describes; return its result.

    data / validation / test: texts and labels in memory (a DataFrame, or (texts, labels)) for a
    run whose config says data="<memory>" (npgpt.fit); else the files the config names are read.
    options: threads, progress bars, plots, the cache folder, the run folder (RunOptions).
    Raises npgpt's errors (NpgptError), and runs.Interrupted (a KeyboardInterrupt) on Ctrl-C or
    SIGTERM after saving a checkpoint."""
    options = options or RunOptions()
    t_start = time.time()
    _prepare_process(options, log)
    if options.out:
        runs.check_out(options.out)
    job = load_data(run, options, log, frames=(data, validation, test))
    run = job.run                             # with the class names resolved
    run_dir = runs.create(options.out or runs.default_name(_stem(run), run.model), explicit=bool(options.out))
    try:
        try:
            _start_folder(run_dir, job)
        except KeyboardInterrupt:
            raise runs.Interrupted(2, None, f"interrupted before training started: "
                                            f"{_nothing_saved(run_dir, True)}") from None
        return _train(job, run_dir, options, log, created=True, t_start=t_start)
    finally:
        runs.release(run_dir)


def resume_run(run_dir, options: RunOptions | None = None, epochs: int | None = None, log=print):
    """Continue the run in run_dir from its checkpoint with its own settings; epochs beyond the
    run's own train it longer. -> RunResult, or None for a finished run (nothing to do)."""
    from .checkpoint import read_state
    options = options or RunOptions()
    t_start = time.time()
    if not os.path.isdir(run_dir):
        raise NpgptError(f"--resume {run_dir}: no such run folder")
    if not os.path.exists(os.path.join(run_dir, CHECKPOINT)):
        raise NpgptError(f"--resume {run_dir}: no {CHECKPOINT} to resume from")
    saved = read_state(run_dir)
    run, done = _saved_run(saved), saved["run_state"]["epoch"]
    stopped = saved["run_state"].get("stopped", False)
    if epochs is not None:
        if epochs <= done:
            raise ConfigError("epochs", f"{epochs}: the run in {run_dir} has done {done} epochs already; "
                                        f"give more to train longer")
        run = run.replace(epochs=epochs)
    elif (done >= run.epochs or stopped) and os.path.exists(os.path.join(run_dir, "classifier.h5")):
        why = "stopped early, " if stopped and done < run.epochs else ""
        log(f"{run_dir} is complete ({why}{done} of {run.epochs} epochs; its classifier.h5 is saved): "
            f"nothing to do. To train longer: --resume {run_dir} --epochs N (N > {done})")
        return None
    _prepare_process(options, log)
    runs.claim(run_dir, "--resume")
    try:
        job = load_data(run, options, log, run_dir=run_dir)
        return _train(job, run_dir, options, log, created=False, t_start=t_start, extended=epochs is not None)
    finally:
        runs.release(run_dir)


def _saved_run(saved: dict) -> RunConfig:
    """The RunConfig a checkpoint holds (or, for a run started before there was one, its info)."""
    if "run_config" in saved:
        return RunConfig.from_dict(saved["run_config"])
    from .runconfig import from_old_info
    return from_old_info(saved["run_info"])


def _stem(run: RunConfig) -> str:
    """What a default run folder's name says of the data: the file's name, fit (from Python), spam."""
    from .runconfig import MEMORY
    if run.data == MEMORY:
        return "fit"
    return os.path.splitext(os.path.basename(run.data))[0] if run.is_table else "spam"


def _prepare_process(options: RunOptions, log) -> None:
    """The threads the run asks for; the kernels as every run loads them (`load_compiled_kernels`);
    Dask, when the frozen prefix runs on a cluster (a missing extra said before any data is read)."""
    from .fastops import load_compiled_kernels, set_num_threads
    if options.scheduler or options.workers:
        from .distributed import require_dask
        require_dask()
    if options.threads:
        set_num_threads(options.threads)
    load_compiled_kernels(log)


def _start_folder(run_dir, job) -> None:
    """The new run folder: checked for room, then the splits the run uses and its RunConfig."""
    from .fileio import write_json
    from .tabular import write_splits
    try:
        runs.check_writable(run_dir, need_bytes=4 * job.n_params + 3 * 4 * job.n_train + (16 << 20))
    except NpgptError:
        runs.remove_if_empty(run_dir)
        raise
    write_splits(job.splits, run_dir)
    write_json(os.path.join(run_dir, RUN_FILE), job.run.to_dict())


def _train(job, run_dir, options, log, created: bool, t_start: float, extended=False) -> RunResult:
    """The prefix, the loop, the files: the run in its folder. extended: a resumed run given more
    epochs (an early stop no longer ends it)."""
    run = job.run
    record = {"run_config": run.to_dict(), "classes": job.classes,
              "class_weights": None if job.class_weights is None else job.class_weights.tolist()}
    try:
        log(model_summary(job, run_dir))
        trainer = Trainer(job.params, job.config, job.datasets, run, run_dir, record, log=log,
                          progress=options.progress, class_weights=job.class_weights)
        if not created:
            _restore_trained(run_dir, job.params, trainer.names)
            trainer.resume()
            trainer.state.stopped = trainer.state.stopped and not extended
        with np.errstate(over="ignore", invalid="ignore"):   # a diverging run is caught as Diverged
            trainer.feats, trainer.start = _frozen_prefix(job, options, run_dir, log)
            trainer.train()
    except runs.Interrupted:
        raise
    except KeyboardInterrupt:            # before the first step (while caching): nothing to keep
        raise runs.Interrupted(2, None, f"interrupted before training started: {_nothing_saved(run_dir, created)}") \
            from None
    except Diverged as e:
        raise TrainingError(f"{e}; training stopped: {_on_disk(run_dir, created)}. "
                            f"Try a lower --lr (this run: {run.lr:g})") from None
    trainer.final_evaluation()
    path = _save_outputs(run_dir, job, trainer.state, record, log, plots=options.plots)
    return RunResult(path, run.bpe_dir, trainer.state.metrics, run_dir, trainer.state,
                     _finish_checkpoint(run_dir, keep_params=run.keep == "best"), time.time() - t_start)


def _frozen_prefix(job, options, run_dir, log):
    """Each dataset's activations entering the first trainable block, computed once (or read from
    the disk cache). -> (feats per dataset, or Nones when nothing is cached; that block's index)"""
    from .model import first_trainable_block
    from .prefix_cache import PrefixCache, dataset_activations
    from .progress import bar, write_above
    run = job.run
    if not run.cache or run.dense or run.trainable == "all":
        return [None, None, None], 0
    start = first_trainable_block(job.config, run.trainable, run.lora_spec)
    t0 = time.time()
    distinct = []                             # (tokens, sequences) the prefix is computed for
    with bar(enabled=options.progress, unit="tok", leave=False, untimed=1,          # untimed: it compiles kernels
             desc=f"frozen blocks 0..{start - 1}" if start else "embeddings") as shown:
        say = functools.partial(write_above, shown, log)         # a line above a live bar, else to the log
        store = PrefixCache(options.cache_dir, use_disk=options.cache_disk, memory_limit=options.cache_memory_bytes,
                            spill_dir=run_dir, log=say, max_bytes=options.cache_max_bytes, made_from=_made_from(job))
        sharded = None
        if options.scheduler or options.workers:             # shards computed on a Dask cluster
            from .distributed import cluster_prefix
            sharded = cluster_prefix(job, options, store, say)

        def sized(tokens, sequences):
            distinct.append((tokens, sequences))
            shown.reset(total=tokens)
        feats = dataset_activations(store, job.params, job.config, job.datasets, start, run.pooling,
                                    causal=run.causal_mask, progress=shown.update, lora=run.lora_spec,
                                    sharded=sharded, sized=sized)
    if feats[0] is None:
        return [None, None, None], 0
    what = f"the frozen prefix (blocks 0..{start - 1})" if start else "the embeddings"
    log(f"cached {what} in {time.time() - t0:.1f} s: {_prefix_counts(job, run, *distinct[0])}")
    return feats, start


def _prefix_counts(job, run, tokens, sequences) -> str:
    """The frozen prefix's size in words: the tokens computed, and why the examples hold more
    (a text that occurs several times, in one split or in two, is computed once)."""
    examples = sum(len(d) for d in job.datasets)
    in_all = sum(int(d.lengths.sum()) if run.pooling == "last_token" else len(d) * (d.pad_to or 0)
                 for d in job.datasets)
    line = f"{tokens} tokens of {sequences} distinct texts"
    if sequences == examples:
        return line
    return line + f" (the {examples} texts of the three splits hold {in_all}: a repeated text is computed once)"


def _made_from(job) -> dict:
    """What the run's prefix cache entries are made from, as `python -m npgpt.cache ls` shows it:
    the data (a file's absolute path) and the model (its size, and its weights file if any)."""
    from .job import weights_path
    from .runconfig import MEMORY
    run = job.run
    data = ("data in memory (npgpt.fit)" if run.data == MEMORY else os.path.abspath(run.data) if run.data
            else "the SMS Spam Collection")
    model = job.model_name if run.tiny or run.random_init else f"{job.model_name} ({os.path.abspath(weights_path(run))})"
    return {"data": data, "model": model}


def _restore_trained(run_dir, params, names):
    """A finished run's checkpoint keeps no parameters: take the trained arrays from its
    classifier.h5 (full or --save trained) before the checkpoint's optimizer state is loaded."""
    from .h5read import open_h5, read_array
    with open_h5(os.path.join(run_dir, CHECKPOINT)) as f:
        if "params" in f:
            return
    path = os.path.join(run_dir, "classifier.h5")
    with open_h5(path) as f:
        for n in names:
            params[n][...] = read_array(f, path, n, params[n].shape)


def _save_outputs(run_dir, job, state, record, log, plots=True) -> str:
    """classifier.h5 (every array, or with --save trained only those that trained), metrics.json
    and the plots. -> the classifier's path"""
    from .fileio import write_json
    from .model import trainable_names
    from .params import save_params
    from .tokenizer import bpe_file_bytes
    from .job import weights_path
    run, classes = job.run, job.classes
    meta = {"kind": "npgpt-classifier", "labels": classes, "id2label": {str(i): s for i, s in enumerate(classes)},
            "text_column": run.text_column if run.is_table else None,
            "label_column": run.label_column if run.is_table else None, "pooling": run.pooling,
            "max_length": job.datasets[0].pad_to, "context_length": job.config.n_ctx, "pad_id": 50256,
            "tokenizer": "gpt2", "trainable": run.trainable, "model_size": job.model_name,
            "run_config": run.to_dict(), "lora": run.lora_spec.to_dict() if run.lora_spec else None,
            "causal_mask": run.causal_mask, "final": state.metrics.get("final", {}),
            "kept": state.metrics.get("kept"), "class_weights": record["class_weights"]}
    path = os.path.join(run_dir, "classifier.h5")
    files = bpe_file_bytes(run.bpe_dir, weights_dir=os.path.dirname(weights_path(run)) or ".")
    only = None
    if run.save == "trained":
        only = trainable_names(job.config, run.trainable, num_classes=len(classes), lora=run.lora_spec)
    save_params(path, job.params, job.config, meta, files=files, only=only,
                base=weights_path(run) if only else None)
    write_json(os.path.join(run_dir, "metrics.json"),
               {"metrics": state.metrics, **record, "model_size": job.model_name, "train_time_s": state.train_time})
    if plots:
        from .plots import NO_MATPLOTLIB, plot_run
        written = plot_run(state.metrics, run_dir, title=os.path.basename(os.path.normpath(run_dir)))
        if written is None:
            log(NO_MATPLOTLIB)
        elif written:
            log("plots: " + ", ".join(written))
    return path


def _finish_checkpoint(run_dir, keep_params=False) -> str:
    """Shrink the checkpoint of a finished run to what `--resume RUN --epochs N` needs beyond the
    saved classifier (the AdamW moments and the run state); say what is kept. keep_params: the
    classifier holds other arrays than the last step's (--keep best): the checkpoint keeps those."""
    from .checkpoint import strip_params
    path = os.path.join(run_dir, CHECKPOINT)
    if not os.path.exists(path):
        return "no checkpoint kept"
    if keep_params:
        return (f"{path} holds the last step's parameters and the optimizer state ({os.path.getsize(path) / 2**20:.1f}"
                f" MiB) so that `--resume {run_dir} --epochs N` can train longer; delete it if you will not")
    size = strip_params(path)
    return (f"{path} now holds only the optimizer state ({size / 2**20:.1f} MiB) so that "
            f"`--resume {run_dir} --epochs N` can train longer; delete it if you will not")


def _nothing_saved(run_dir, created) -> str:
    if created and runs.remove_if_empty(run_dir):
        return f"nothing was saved (the run folder {run_dir} was removed)"
    return f"nothing new was saved in {run_dir}"


def _on_disk(run_dir, created) -> str:
    """What a stopped run leaves on disk, in words."""
    from .checkpoint import read_state
    path = os.path.join(run_dir, CHECKPOINT)
    if os.path.exists(path):
        try:
            epoch = read_state(run_dir)["run_state"]["epoch"]
        except NpgptError:
            epoch = "?"
        return f"{path} (after epoch {epoch}) is kept"
    return _nothing_saved(run_dir, created) + "; no epoch had completed"


