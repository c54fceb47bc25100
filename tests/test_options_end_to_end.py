"""Training options through the path a user's run takes (`npgpt.fit`, the run service, the command
line), each against a plainly written loop or the option's definition, on a case where the
option changes the result.

The hand loop below is the whole of training, written out: the run's own splits and token ids,
GPT-2's initialisation, each epoch's order drawn from numpy's generator seeded by (seed, epoch),
the last partial batch dropped, gradient groups of --accumulate batches averaged over their real
size, the schedule's learning rate, and AdamW's update applied array by array, each array's
weight decay chosen by the definition of --no-decay-1d."""
import dataclasses
import math
import types

import numpy as np
import pandas as pd
import pytest

import npgpt
from npgpt import config as C, fastmodel, fastops
from npgpt.cli.train import build_parser, parse
from npgpt.dataset import make_datasets
from npgpt.runconfig import MEMORY, RunConfig, RunOptions
from npgpt.tabular import read_user_splits
from npgpt.tokenizer import get_tokenizer
from npgpt.train import train_run

WORDS = {"fruit": "apple", "river": "river", "tool": "hammer"}


def table(n=60, seed=0) -> pd.DataFrame:
    """n texts of 3 classes, each naming its class's word among random filler words."""
    rng = np.random.default_rng(seed)
    filler = "the a of to and in is it that was for on are with as by at this from or be".split()
    rows = []
    for i in range(n):
        name = list(WORDS)[i % 3]
        rows.append((" ".join(list(rng.choice(filler, 1 + i % 5)) + [WORDS[name]] + list(rng.choice(filler, 2))),
                     name))
    return pd.DataFrame(rows, columns=["text", "label"])


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tiny runs of a module on one thread (Numba and BLAS), the counts before restored after:
    for arrays this small, threads cost more than they give, above all on a busy machine. (The
    numbers do not depend on the thread count.)"""
    import numba
    from threadpoolctl import threadpool_limits
    before = numba.get_num_threads()
    limits = threadpool_limits(limits=1, user_api="blas")
    numba.set_num_threads(1)
    yield
    numba.set_num_threads(before)
    limits.restore_original_limits()


@pytest.fixture(scope="module")
def csv_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("table") / "three.csv"
    table().to_csv(path, index=False)
    return str(path)


def quiet(out):
    return RunOptions(out=str(out), progress=False, plots=False)


def mean_loss(params, dataset, rows, pooling):
    """The mean over the messages `rows` of -log p(true label)."""
    ids, lengths, labels = dataset.batch(rows)
    z = fastmodel.forward_cls(params, C.TINY, ids, lengths, pooling).astype(np.float64)
    logp = z - z.max(axis=1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(axis=1, keepdims=True))
    return float(-logp[np.arange(len(rows)), labels].mean())


def hand_loop(run_dir, bpe_dir, *, epochs, batch_size, lr, weight_decay, decay_1d=True, accumulate=1, seed=123,
              schedule="constant", pooling="last_token", max_length="longest", eval_freq=None, eval_iter=5):
    """The trained parameters, the learning rate of every step, and (with eval_freq) the logged
    estimates [(step, train loss, validation loss)] on the first eval_iter batches of each split,
    in order, every eval_freq steps from the first: by the definitions (the last block, ln_f and
    the head train: --trainable-blocks 1, the default)."""
    classes = sorted(WORDS)
    train, val, _ = make_datasets(read_user_splits(run_dir, classes), get_tokenizer(bpe_dir), max_length,
                                  C.TINY.n_ctx)
    logged = []
    params = C.init_params(C.TINY, seed=seed, num_classes=len(classes))
    n_batches = len(train) // batch_size
    total = epochs * math.ceil(n_batches / accumulate)
    m, v = {}, {}
    b1, b2, eps, t, lrs = 0.9, 0.999, 1e-8, 0, []
    for epoch in range(epochs):
        order = np.random.default_rng([seed, epoch]).permutation(len(train))
        batches = [order[i * batch_size:(i + 1) * batch_size] for i in range(n_batches)]
        for g0 in range(0, n_batches, accumulate):
            group = batches[g0:g0 + accumulate]
            summed = None
            for rows in group:
                ids, lengths, labels = train.batch(rows)
                grads = fastmodel.loss_and_grads(params, C.TINY, ids, labels, trainable=1, lengths=lengths,
                                                 pooling=pooling)[1]
                summed = grads if summed is None else {k: summed[k] + grads[k] for k in grads}
            step_lr = lr if schedule == "constant" else lr * (1 - t / total)       # linear to 0
            lrs.append(step_lr)
            t += 1
            for name, g in summed.items():
                g = g / np.float32(len(group))                       # the mean over the group's real size
                p = params[name]
                wd = weight_decay if (decay_1d or p.ndim > 1) else 0.0
                m.setdefault(name, np.zeros_like(p)), v.setdefault(name, np.zeros_like(p))
                fastops.adamw_update(p, g, m[name], v[name], t, step_lr, b1, b2, eps, wd)   # AdamW's formulas
            if eval_freq and (t - 1) % eval_freq == 0:
                logged.append((t - 1, *(mean_loss(params, d, np.arange(min(len(d), eval_iter * batch_size)), pooling)
                                        for d in (train, val))))
    return params, lrs, logged


def max_diff(a: dict, b: dict) -> float:
    return max(float(np.abs(a[n] - b[n]).max()) for n in b)


def test_accumulate_with_a_short_last_group_is_the_hand_loop(csv_path, bpe_dir, tmp_path):
    """42 training texts, batches of 6: 7 batches an epoch, so --accumulate 3 makes groups of 3, 3
    and 1, the last one averaged over its one batch; 3 steps an epoch, 6 in all, on which the
    linear schedule's learning rates are drawn. Two epochs: the second epoch's order is its own.
    The losses logged every 2 steps (--eval-freq 2) on the first 2 batches (--eval-iter 2)."""
    s = dict(epochs=2, batch_size=6, lr=5e-3, weight_decay=0.1, seed=5, eval_freq=2, eval_iter=2)
    run = RunConfig(model="tiny", data=csv_path, bpe_dir=bpe_dir, accumulate=3,
                    lr_schedule="linear", **s)
    result = train_run(run, quiet(tmp_path / "acc"), log=lambda m: None)
    want, lrs, logged = hand_loop(tmp_path / "acc", bpe_dir, accumulate=3, schedule="linear", **s)
    assert len(result.metrics["lr"]) == 6
    assert result.metrics["lr"] == pytest.approx(lrs, rel=1e-12)
    m = result.metrics
    assert m["steps"] == [0, 2, 4] == [k for k, _, _ in logged]
    assert m["estimate_messages"] == {"train": 12, "validation": 6}
    assert m["train_loss"] == pytest.approx([tl for _, tl, _ in logged], rel=1e-5)
    assert m["val_loss"] == pytest.approx([vl for _, _, vl in logged], rel=1e-5)
    got = result.classifier.params
    assert max_diff(got, want) <= 2e-6
    start = C.init_params(C.TINY, seed=5, num_classes=3)
    assert max_diff(got, start) > 1e-3                                    # it trained


def test_no_decay_1d_through_fit_is_the_hand_loop(bpe_dir, tmp_path):
    """npgpt.fit(no_decay_1d=True): the 1-D arrays (biases, gains) are not decayed, the others are;
    with the same run decayed everywhere the arrays differ (the option changes the result)."""
    s = dict(epochs=2, batch_size=6, lr=1e-2, weight_decay=0.5, seed=3)
    clf = npgpt.fit(table(), model="tiny", out=str(tmp_path / "fit"), bpe_dir=bpe_dir,
                    no_decay_1d=True, **s)
    assert clf.meta["run_config"]["decay_1d"] is False
    exempt = hand_loop(tmp_path / "fit", bpe_dir, decay_1d=False, **s)[0]
    decayed = hand_loop(tmp_path / "fit", bpe_dir, decay_1d=True, **s)[0]
    assert max_diff(clf.params, exempt) <= 2e-6
    assert max_diff(clf.params, decayed) > 1e-3


def test_batch_order_of_each_epoch_follows_the_seed(csv_path, bpe_dir, tmp_path):
    """Two epochs with --seed 11 through the run service: the hand loop's orders, drawn anew for
    each epoch from (seed, epoch)."""
    s = dict(epochs=2, batch_size=6, lr=5e-3, weight_decay=0.1, seed=11)
    run = RunConfig(model="tiny", data=csv_path, bpe_dir=bpe_dir, **s)
    got = train_run(run, quiet(tmp_path / "order"), log=lambda m: None).classifier.params
    want = hand_loop(tmp_path / "order", bpe_dir, **s)[0]
    assert max_diff(got, want) <= 2e-6
    start = C.init_params(C.TINY, seed=11, num_classes=3)
    assert max_diff(got, start) > 1e-3                                    # it trained


@pytest.mark.parametrize("max_length, pooling", [(6, "last_position"), ("batch", "mean")])
def test_pad_length_and_pooling_through_fit_are_the_hand_loop(bpe_dir, tmp_path, max_length, pooling):
    """npgpt.fit(max_length=, pooling=): texts cut and padded to that length (or each batch to its
    longest), the head reading the position the pooling names: the hand loop's arrays."""
    s = dict(epochs=1, batch_size=6, lr=5e-3, weight_decay=0.1, seed=4)
    clf = npgpt.fit(table(), model="tiny", out=str(tmp_path / "fit"), bpe_dir=bpe_dir, max_length=max_length,
                    pooling=pooling.replace("_", "-"), **s)
    assert (clf.pooling, clf.max_length) == (pooling, None if max_length == "batch" else max_length)
    want = hand_loop(tmp_path / "fit", bpe_dir, max_length=max_length, pooling=pooling, **s)[0]
    other = hand_loop(tmp_path / "fit", bpe_dir, **s)[0]                   # the defaults: longest, last_token
    assert max_diff(clf.params, want) <= 2e-6
    assert max_diff(clf.params, other) > 1e-4


def trained_by_definition(trainable, n_layer=2):
    """--trainable-blocks K: the head, ln_f and the last K blocks; head: the head alone; all: every array."""
    names = set(C.param_shapes(C.TINY, 3))
    if trainable == "all":
        return names
    if trainable == "head":
        return {"cls/w", "cls/b"}
    blocks = {f"h{i}/" for i in range(n_layer - trainable, n_layer)}
    return {n for n in names if n.startswith(("cls/", "ln_f/")) or n[:3] in blocks}


@pytest.mark.parametrize("trainable", ["head", 0, 2])
def test_trainable_blocks_train_those_arrays_and_no_other(csv_path, bpe_dir, tmp_path, trainable):
    """After one epoch through the run service, the arrays that moved from their initial values
    are exactly those --trainable-blocks names (weight decay moves every trainable array)."""
    s = dict(epochs=1, batch_size=6, lr=5e-3, seed=2)
    run = RunConfig(model="tiny", data=csv_path, bpe_dir=bpe_dir, trainable_blocks=trainable, **s)
    got = train_run(run, quiet(tmp_path / "t"), log=lambda m: None).classifier.params
    start = C.init_params(C.TINY, seed=2, num_classes=3)
    moved = {n for n in start if not np.array_equal(got[n], start[n])}
    assert moved == trained_by_definition(trainable)


# ----------------------------------------------------------------------------- every flag reaches the RunConfig

# field -> (its value, the other settings it needs); each field alone on top of RunConfig's defaults
EVERY_FIELD = {
    "model": ("355M", {}), "weights": ("w.h5", {}), "random_init": (True, {}), "trainable_blocks": (2, {}),
    "text_column": ("body", {}), "label_column": ("y", {}), "labels": (["b", "a"], {}),
    "validation": ("v.csv", {}), "test": ("t.csv", {}), "split": ((0.6, 0.2), {}), "balance": ("undersample", {}),
    "data_dir": ("dd", {}), "skip_bad_lines": (True, {}), "parse": ("strict", {}), "bpe_dir": ("bpe", {}),
    "max_length": (32, {}), "pooling": ("last_position", {}), "epochs": (3, {}), "batch_size": (4, {}),
    "lr": (1e-3, {}), "weight_decay": (0.2, {}), "decay_1d": (False, {}), "eval_freq": (7, {}),
    "eval_iter": (2, {}), "seed": (9, {}), "cache": (False, {}), "dense": (True, {}),
    "lr_schedule": ("cosine", {}), "warmup": (3, {}), "initial_lr": (1e-5, {"warmup": 2}),
    "min_lr": (1e-6, {"lr_schedule": "linear"}), "clip_grad_norm": (1.5, {}), "class_weight": ({"a": 2.0}, {}),
    "keep": ("best", {}), "best_metric": ("accuracy", {}), "validate_every": ("eval", {"keep": "best"}),
    "patience": (2, {}), "lora": (4, {}), "lora_alpha": (8.0, {"lora": 4}),
    "lora_targets": (("attn", "mlp"), {"lora": 4}), "lora_train_head": (True, {"lora": 4}), "accumulate": (3, {}),
    "causal_mask": (False, {}), "save": ("trained", {}),
}


def argv_of(settings: dict) -> list:
    """The command line that says `settings`, flag by flag as --help spells them."""
    fields = {f.name: f for f in dataclasses.fields(RunConfig)}
    argv = []
    for name, value in settings.items():
        meta = fields[name].metadata
        flag = meta.get("flag") or "--" + name.replace("_", "-")
        if isinstance(value, bool):
            assert value != fields[name].default
            argv.append(flag)
            continue
        if isinstance(value, dict):
            value = ",".join(f"{k}={w}" for k, w in value.items())
        elif isinstance(value, (list, tuple)):
            value = ",".join(map(str, value))
        argv += [flag, str(value).replace("_", "-") if name == "pooling" else str(value)]
    return argv


def test_every_field_is_listed():
    assert set(EVERY_FIELD) == {f.name for f in dataclasses.fields(RunConfig)} - {"data"}


@pytest.mark.parametrize("name", sorted(EVERY_FIELD))
def test_every_flag_reaches_the_run_config(name):
    """`python -m npgpt.train --data x.csv FLAG VALUE` makes RunConfig(data="x.csv", field=value),
    each field alone, and the value is not the default (the flag changes the run)."""
    value, needs = EVERY_FIELD[name]
    settings = {**needs, name: value}
    want = RunConfig(data="x.csv", **settings)
    run, _, _, _ = parse(["--data", "x.csv", *argv_of(settings)], build_parser())
    assert run == want
    assert getattr(run, name) != getattr(RunConfig(data="x.csv", **needs), name)


FIT_SKIPS = {"validation", "test", "text_column", "label_column"}     # fit's own arguments (frames, columns)


@pytest.mark.parametrize("name", sorted(set(EVERY_FIELD) - FIT_SKIPS))
def test_fit_passes_every_field_on(name, monkeypatch):
    """npgpt.fit(texts, labels, field=value) hands train_run the RunConfig of the same settings
    (flags that turn a setting off also as no_<flag>=True; --labels as labels_order=)."""
    import npgpt.train
    seen = {}
    monkeypatch.setattr(npgpt.train, "train_run", lambda run, options, **kw: seen.update(run=run, options=options)
                        or types.SimpleNamespace(classifier=None))
    value, needs = EVERY_FIELD[name]
    settings = {**needs, name: value}
    want = RunConfig(data=MEMORY, **settings)
    spellings = [dict(settings)]
    fields = {f.name: f for f in dataclasses.fields(RunConfig)}
    if fields[name].metadata.get("negate"):
        flag = fields[name].metadata["flag"][2:].replace("-", "_")
        spellings.append({**needs, flag: not value})
    if name == "labels":
        spellings = [{"labels_order": value}]
    model = settings.pop("model", "124M")
    for s in spellings:
        s.pop("model", None)
        seen.clear()
        npgpt.fit(["a b", "c d"], ["a", "b"], model=model, **s)
        assert seen["run"] == want, s
