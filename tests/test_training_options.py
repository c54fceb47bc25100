"""Training as practitioners run it: class-weighted cross-entropy, the learning-rate schedule of
appendix D (warmup, cosine to a minimum), gradient clipping, the best validation kept, early
stopping. Each against PyTorch or its definition, through the run service a user's run takes."""
import json
import math
import os
import signal
import subprocess
import sys

import h5py
import numpy as np
import pandas as pd
import pytest
import torch

import reference_torch as ref
from helpers import REPO, SMALL_GPT2, SMS, numerical_grad, rel_err
from npgpt import config as C, fastmodel, model, ops, optim
from npgpt.dataset import make_datasets, train_batches
from npgpt.errors import NpgptError
from npgpt.job import class_weight_vector
from npgpt.runconfig import ConfigError, RunConfig, RunOptions
from npgpt.tabular import read_user_splits
from npgpt.tokenizer import get_tokenizer
from npgpt.train import train_run


# ----------------------------------------------------------------------------- the weighted loss

@pytest.mark.parametrize("weights", [[1.0, 1.0, 1.0], [0.2, 3.0, 1.5], [5.0, 0.5, 2.0]])
def test_weighted_cross_entropy_gradient_matches_finite_differences(weights):
    rng = np.random.default_rng(1)
    z = rng.standard_normal((6, 3)) * 2
    y = np.array([0, 2, 1, 1, 0, 2])
    G = float(rng.standard_normal()) * 3                     # a random upstream gradient, not 1
    loss, saved = ops.cross_entropy_forward(z, y, np.array(weights))
    dz = ops.cross_entropy_backward(G, saved)
    f = lambda: G * ops.cross_entropy_forward(z, y, np.array(weights))[0]
    assert rel_err(dz, numerical_grad(f, z)) <= 1e-7
    w = np.array(weights)[y]
    nll = -np.log(np.exp(z) / np.exp(z).sum(1, keepdims=True))[np.arange(6), y]
    assert loss == pytest.approx((w * nll).sum() / w.sum(), rel=1e-12)          # the definition


@pytest.mark.parametrize("targets", [[0, 2, 1, 1, 0, 2], [1, 1, 1, 1, 1, 1]])
def test_weighted_cross_entropy_is_torchs(targets):
    """torch.nn.functional.cross_entropy(weight=): loss and gradient, float64; a batch of one
    class has the plain mean whatever its weight (the weights are normalised over the batch)."""
    rng = np.random.default_rng(2)
    z, y, w = rng.standard_normal((6, 3)) * 3, np.array(targets), np.array([0.3, 2.5, 1.2])
    loss, saved = ops.cross_entropy_forward(z, y, w)
    zt = torch.tensor(z, requires_grad=True)
    lt = torch.nn.functional.cross_entropy(zt, torch.tensor(y), weight=torch.tensor(w))
    lt.backward()
    assert loss == pytest.approx(float(lt.detach()), rel=1e-12)
    assert rel_err(ops.cross_entropy_backward(1.0, saved), zt.grad.numpy()) <= 1e-12
    if len(set(targets)) == 1:
        assert loss == pytest.approx(ops.cross_entropy_forward(z, y)[0], rel=1e-12)


@pytest.mark.parametrize("trainable", [1, "all"])
def test_class_weighted_model_gradients_are_torchs(trainable):
    """The whole model with class weights, the textbook and the training path, against the
    independent PyTorch GPT-2 with F.cross_entropy(weight=) (float32)."""
    cfg = C.GPT2Config(n_layer=2, n_head=4, n_embd=64, vocab_size=50257, n_ctx=32)
    params = C.init_params(cfg, seed=5, num_classes=3)
    rng = np.random.default_rng(6)
    ids = rng.integers(0, 50000, (4, 10))
    lengths, labels, w = np.array([10, 4, 7, 1]), np.array([2, 0, 2, 1]), np.array([0.5, 3.0, 1.25])
    tm = ref.load_from_npgpt(params, cfg, torch.float32)
    t_loss, t_grads, _ = ref.loss_and_grads(tm, ids, labels, lengths=lengths, class_weights=w)
    for impl in (model, fastmodel):
        loss, grads, _ = impl.loss_and_grads(params, cfg, ids, labels, trainable=trainable, lengths=lengths,
                                             class_weights=w)
        assert loss == pytest.approx(t_loss, abs=1e-5)
        for name, g in grads.items():
            assert rel_err(g, t_grads[name]) <= 2e-4, (impl.__name__, name)
        plain = impl.loss_and_grads(params, cfg, ids, labels, trainable=trainable, lengths=lengths)[0]
        assert abs(plain - loss) > 1e-3                       # the weights do change the loss


def test_balanced_weights_are_scikit_learns():
    from sklearn.utils.class_weight import compute_class_weight
    y = np.array([0] * 30 + [1] * 5 + [2] * 12)
    run = RunConfig(model="tiny", data="x.csv", class_weight="balanced")
    got = class_weight_vector(run, ["a", "b", "c"], y)
    assert np.allclose(got, compute_class_weight("balanced", classes=np.arange(3), y=y), rtol=1e-12)
    named = class_weight_vector(RunConfig(model="tiny", data="x.csv", class_weight="c=2.5,a=0.5"), ["a", "b", "c"], y)
    assert named.tolist() == [0.5, 1.0, 2.5]
    with pytest.raises(ConfigError, match="--class-weight 'd' is not a class"):
        class_weight_vector(RunConfig(model="tiny", data="x.csv", class_weight="d=2"), ["a", "b", "c"], y)


# ----------------------------------------------------------------------------- schedule and clipping

def appendix_d_lr(step, total, peak, warmup, initial, minimum):
    """The schedule of appendix D's training loop, as the book writes it (global_step = step)."""
    if step < warmup:
        return initial + step * (peak - initial) / warmup
    progress = (step - warmup) / (total - warmup)
    return minimum + (peak - minimum) * 0.5 * (1 + math.cos(math.pi * progress))


def test_schedule_is_appendix_ds_step_for_step():
    total, peak, warmup, initial, minimum = 97, 1e-3, 19, 1e-4, 1e-5
    got = [optim.scheduled_lr(s, total, peak, "cosine", warmup, initial, minimum) for s in range(total)]
    want = [appendix_d_lr(s, total, peak, warmup, initial, minimum) for s in range(total)]
    assert got == pytest.approx(want, rel=1e-15)
    assert got[0] == initial and max(got) == pytest.approx(peak) and got[-1] > minimum
    linear = [optim.scheduled_lr(s, 10, 1.0, "linear", 0, 0.0, 0.2) for s in range(10)]
    assert linear == pytest.approx([0.2 + 0.8 * (1 - s / 10) for s in range(10)])
    assert all(optim.scheduled_lr(s, 10, 3e-4) == 3e-4 for s in range(10))       # constant: the lr itself


def test_clip_grad_norm_is_torchs():
    rng = np.random.default_rng(3)
    shapes = {"a": (5, 4), "b": (4,), "c": (3, 3)}
    for max_norm in (0.5, 100.0):
        grads = {k: rng.standard_normal(s) for k, s in shapes.items()}
        tg = [torch.tensor(g, requires_grad=True) for g in grads.values()]
        for t, g in zip(tg, grads.values()):
            t.grad = torch.tensor(g.copy())
        t_norm = torch.nn.utils.clip_grad_norm_(tg, max_norm)
        norm = optim.clip_grad_norm(grads, max_norm)
        assert norm == pytest.approx(float(t_norm), rel=1e-12)
        for t, g in zip(tg, grads.values()):
            assert rel_err(g, t.grad.numpy()) <= 1e-12
        after = math.sqrt(sum((g ** 2).sum() for g in grads.values()))
        assert after == pytest.approx(min(norm, max_norm), rel=1e-6)           # clipped to max_norm, or as it was


def three_word_table(folder, noisy: bool) -> str:
    """120 texts, 3 classes, each text's class named by one word among filler words (80 train /
    20 validation / 20 test at --split 0.667,0.167). noisy: about a fifth of the labels drawn at
    random, so that a run that memorises the training split does worse on the validation split
    after a few epochs."""
    rng = np.random.default_rng(0)
    words = ["apple", "river", "hammer"]
    filler = "the a of to and in is it that was for on are with as by at this from or be".split()
    rows = []
    for i in range(120):
        k = i % 3
        label = k if not noisy or rng.random() > 0.3 else int(rng.integers(3))
        text = " ".join(list(rng.choice(filler, 4)) + [words[k]] + list(rng.choice(filler, 2)))
        rows.append((text, ["fruit", "river", "tool"][label]))
    path = folder / "table.csv"
    pd.DataFrame(rows, columns=["text", "label"]).to_csv(path, index=False)
    return str(path)


@pytest.fixture(scope="module")
def small_table(tmp_path_factory):
    return three_word_table(tmp_path_factory.mktemp("table"), noisy=False)


@pytest.fixture(scope="module")
def noisy_table(tmp_path_factory):
    return three_word_table(tmp_path_factory.mktemp("noisy"), noisy=True)


def run_small(path, out, bpe_dir, **settings):
    run = RunConfig(model="tiny", data=path, bpe_dir=bpe_dir, split="0.667,0.167", batch_size=8, **settings)
    return train_run(run, RunOptions(out=str(out), progress=False, plots=False), log=lambda s: None)


def test_appendix_d_run_is_torchs_after_20_steps(small_table, bpe_dir, tmp_path):
    """A run with appendix D's schedule and gradient clipping (through the run service): the
    learning rate of every step, and the trainable arrays after 20 steps, against PyTorch fed the
    same batches from the same start, its lr set each step as the book does, its gradients clipped
    by torch.nn.utils.clip_grad_norm_ (float32)."""
    s = dict(epochs=2, lr=1e-3, lr_schedule="cosine", warmup=4, initial_lr=1e-4, min_lr=1e-5, clip_grad_norm=0.05,
             trainable_blocks="all")
    result = run_small(small_table, tmp_path / "run", bpe_dir, **s)
    lrs = result.metrics["lr"]
    assert len(lrs) == 20 and lrs == pytest.approx([appendix_d_lr(k, 20, 1e-3, 4, 1e-4, 1e-5) for k in range(20)])
    # the same run in PyTorch: the run's own splits, batches, initial weights
    classes = result.classifier.labels
    splits = read_user_splits(tmp_path / "run", classes)
    train = make_datasets(splits, get_tokenizer(bpe_dir))[0]
    cfg = result.classifier.config
    start = C.init_params(cfg, seed=123, num_classes=len(classes))
    tm = ref.load_from_npgpt(start, cfg, torch.float32)
    tparams = ref.named_torch_params(tm)
    opt = torch.optim.AdamW(list(tparams.values()), lr=1e-3, weight_decay=0.1)
    step = 0
    for epoch in range(2):
        for rows in train_batches(len(train), 8, 123, epoch):
            ids, lengths, labels = train.batch(rows)
            for group in opt.param_groups:
                group["lr"] = appendix_d_lr(step, 20, 1e-3, 4, 1e-4, 1e-5)
            ref.loss_and_grads(tm, ids, labels, lengths=lengths)
            torch.nn.utils.clip_grad_norm_(list(tparams.values()), 0.05)
            opt.step()
            step += 1
    assert step == 20
    Cn = cfg.n_embd
    for name, want in ref.params_to_npgpt(tm).items():
        got = result.classifier.params[name]
        if name.endswith("attn/c_attn/b"):                    # the key third: rounding noise (test_vs_torch)
            got, want = np.delete(got, np.s_[Cn:2 * Cn]), np.delete(want, np.s_[Cn:2 * Cn])
        assert np.abs(got - want).max() <= 2e-5, name
    assert np.abs(result.classifier.params["h1/mlp/c_fc/w"] - start["h1/mlp/c_fc/w"]).max() > 1e-3   # it trained


# ----------------------------------------------------------------------------- the best validation, early stopping

def test_keep_best_saves_the_best_validations_parameters(noisy_table, bpe_dir, tmp_path):
    """--keep best: the saved arrays are those of the validation with the lowest loss, the same
    bits as a run stopped right there (a constant lr makes the first k epochs of a longer run the
    whole of a k-epoch run). The case is one whose validation loss rises after its best epoch."""
    over = dict(lr=1e-2, trainable_blocks="all", seed=1)             # a step so large it overshoots
    best = run_small(noisy_table, tmp_path / "best", bpe_dir, epochs=6, keep="best", **over)
    vals = best.metrics["validations"]
    losses = [v["loss"] for v in vals]
    k = int(np.argmin(losses))
    assert len(vals) == 6 and k < 5 and losses[-1] > losses[k]       # it did get worse after the best
    assert best.metrics["kept"]["epoch"] == k + 1 and best.classifier.meta["kept"]["epoch"] == k + 1
    short = run_small(noisy_table, tmp_path / "short", bpe_dir, epochs=k + 1, **over)
    last = run_small(noisy_table, tmp_path / "last", bpe_dir, epochs=6, **over)
    for name in short.classifier.params:
        assert np.array_equal(best.classifier.params[name], short.classifier.params[name]), name
    assert any(not np.array_equal(best.classifier.params[n], last.classifier.params[n]) for n in last.classifier.params)
    assert best.metrics["final"]["validation_loss"] == pytest.approx(losses[k], rel=1e-9)


def test_patience_stops_after_n_validations_without_improvement(noisy_table, bpe_dir, tmp_path):
    over = dict(lr=1e-2, trainable_blocks="all", seed=1)
    full = run_small(noisy_table, tmp_path / "full", bpe_dir, epochs=6, keep="best", **over).metrics
    losses = [v["loss"] for v in full["validations"]]
    # where patience 2 must stop: the second validation in a row that is not the best so far
    best, bad, stop = math.inf, 0, None
    for i, v in enumerate(losses):
        best, bad = (v, 0) if v < best else (best, bad + 1)
        if bad == 2:
            stop = i
            break
    assert stop is not None and stop < 5
    early = run_small(noisy_table, tmp_path / "early", bpe_dir, epochs=6, keep="best", patience=2, **over)
    assert [v["loss"] for v in early.metrics["validations"]] == losses[:stop + 1]
    assert early.state.stopped and early.state.epoch == stop + 1
    again = train_run_resume(tmp_path / "early")
    assert again is None                                              # an early-stopped run is complete


def test_an_interrupted_run_resumes_with_its_best_validation(noisy_table, bpe_dir, tmp_path):
    """Stopped (SIGTERM) in epoch 5, after its best validation (epoch 4), and resumed: the resumed
    run still keeps epoch 4's arrays, which only the checkpoint's copy of them can give back (the
    validations after the resume are all worse than epoch 4's)."""
    from npgpt.runs import Interrupted
    over = dict(lr=1e-2, trainable_blocks="all", seed=1, epochs=6, keep="best")
    whole = run_small(noisy_table, tmp_path / "whole", bpe_dir, **over)
    assert whole.metrics["kept"]["epoch"] == 4                     # the case this test is about

    def stop_in_epoch_5(line):
        if line.startswith("Ep 5 (Step"):
            os.kill(os.getpid(), signal.SIGTERM)

    run = RunConfig(model="tiny", data=noisy_table, bpe_dir=bpe_dir, split="0.667,0.167", batch_size=8, eval_freq=3,
                    **over)
    with pytest.raises(Interrupted):
        train_run(run, RunOptions(out=str(tmp_path / "cut"), progress=False, plots=False), log=stop_in_epoch_5)
    again = train_run_resume(tmp_path / "cut")
    assert again.metrics["kept"]["epoch"] == 4
    assert all(np.array_equal(again.classifier.params[n], whole.classifier.params[n]) for n in whole.classifier.params)


def train_run_resume(run_dir):
    from npgpt.train import resume_run
    return resume_run(str(run_dir), RunOptions(progress=False, plots=False), log=lambda s: None)


def test_metrics_and_plots_show_the_lr_and_the_kept_epoch(small_table, bpe_dir, tmp_path):
    run = RunConfig(model="tiny", data=small_table, bpe_dir=bpe_dir, split="0.667,0.167", batch_size=8, epochs=3,
                    keep="best", lr_schedule="linear", warmup=0.25, min_lr=1e-5, lr=1e-3)
    train_run(run, RunOptions(out=str(tmp_path / "r"), progress=False, plots=True), log=lambda s: None)
    m = json.loads((tmp_path / "r" / "metrics.json").read_text())
    assert len(m["metrics"]["lr"]) == 30 and m["metrics"]["kept"]["which"] == "best"
    assert m["metrics"]["lr"][0] == 0.0 and max(m["metrics"]["lr"]) == pytest.approx(1e-3)
    assert (tmp_path / "r" / "lr.png").stat().st_size > 1000 and (tmp_path / "r" / "loss.png").exists()
    assert json.loads((tmp_path / "r" / "run.json").read_text())["lr_schedule"] == "linear"


def test_a_run_without_matplotlib_says_once_how_to_get_the_plots(small_table, bpe_dir, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)          # `import matplotlib` raises ImportError
    run = RunConfig(model="tiny", data=small_table, bpe_dir=bpe_dir, split="0.667,0.167", epochs=1)
    said = []
    train_run(run, RunOptions(out=str(tmp_path / "r"), progress=False, plots=True), log=said.append)
    hints = [s for s in said if "plot]" in str(s)]
    assert hints == ['no plots: matplotlib is not installed (pip install -e ".[plot]" adds it)']
    assert not list((tmp_path / "r").glob("*.png"))


@pytest.mark.parametrize("settings, flag", [
    (dict(min_lr=1e-6), "--min-lr needs --lr-schedule"), (dict(initial_lr=1e-6), "--initial-lr needs --warmup"),
    (dict(warmup=2.5), "--warmup is a number of steps"), (dict(clip_grad_norm=0.0), "--clip-grad-norm must be"),
    (dict(patience=0), "--patience must be at least 1"), (dict(class_weight="spam=-1"), "--class-weight spam=-1"),
    (dict(validate_every="eval"), "--validate-every eval needs"), (dict(min_lr=1.0, lr_schedule="cosine"), "--min-lr must not"),
])
def test_settings_that_cannot_be_are_named(settings, flag):
    with pytest.raises(ConfigError) as e:
        RunConfig(model="tiny", **settings)
    assert str(e.value).startswith(flag)


def test_sms_data_without_undersampling_and_weighted(shared_data, bpe_dir, tmp_path):
    """--balance none --class-weight balanced on the SMS data: what a run loads is every message
    (3900 / 557 / 1115, the reference's steps without the undersampling), weighted by the training
    split's counts (job.load_data, as train_run calls it; the training itself is tested above)."""
    from npgpt.job import load_data
    run = RunConfig(model="tiny", data=str(shared_data / SMS), data_dir=str(tmp_path / "data"), bpe_dir=bpe_dir,
                    balance="none", class_weight="balanced")
    job = load_data(run, RunOptions(progress=False), log=lambda s: None)
    assert [len(d) for d in job.datasets] == [3900, 557, 1115]
    counts = np.bincount(job.datasets[0].labels, minlength=2)
    assert counts.sum() == 3900 and job.class_weights.tolist() == pytest.approx((3900 / (2 * counts)).tolist(), rel=1e-12)


# ----------------------------------------------------------------------------- the Python API and the estimator

EVERY_OPTION = dict(keep="best", best_metric="macro_f1", patience=2, class_weight="river=2", lr_schedule="cosine",
                    warmup=0.2, initial_lr=1e-4, min_lr=1e-5, clip_grad_norm=0.5)


def test_fit_takes_every_option_as_the_run_service_does(noisy_table, bpe_dir, tmp_path):
    """npgpt.fit on a DataFrame with every option gives the arrays of the run service on the same
    table read from its file (nothing dropped on the way), and the options changed the result."""
    import npgpt
    base = dict(epochs=4, lr=1e-2, trainable_blocks="all", seed=1)
    clf = npgpt.fit(pd.read_csv(noisy_table), model="tiny", out=str(tmp_path / "fit"), batch_size=8,
                    split="0.667,0.167", bpe_dir=bpe_dir, **base, **EVERY_OPTION)
    run = run_small(noisy_table, tmp_path / "service", bpe_dir, **{**base, **EVERY_OPTION})
    plain = run_small(noisy_table, tmp_path / "plain", bpe_dir, **base)
    assert clf.meta["kept"]["which"] == "best" and clf.meta["class_weights"] == [1.0, 2.0, 1.0]
    assert all(np.array_equal(clf.params[n], run.classifier.params[n]) for n in run.classifier.params)
    assert any(not np.array_equal(clf.params[n], plain.classifier.params[n]) for n in plain.classifier.params)


def test_the_estimator_passes_every_option_on(bpe_dir, tmp_path):
    from sklearn.base import clone
    from npgpt.estimator import GPT2Classifier
    rng = np.random.default_rng(1)
    words = {"fruit": "apple", "river": "river", "tool": "hammer"}
    y = [k for k in words for _ in range(30)]
    X = [f"the {rng.choice(['a', 'of', 'to'])} {words[k]} is here" for k in y]
    est = GPT2Classifier(model="tiny", epochs=3, lr=2e-3, bpe_dir=bpe_dir, out=str(tmp_path / "est"), **EVERY_OPTION)
    assert clone(est).get_params() == est.get_params()
    est.fit(X, y)
    meta, m = est.classifier_.meta, est.metrics_
    assert meta["kept"]["which"] == "best" and meta["class_weights"] == [1.0, 2.0, 1.0]
    assert m["lr"][0] == pytest.approx(1e-4) and max(m["lr"]) == pytest.approx(2e-3) and m["lr"][-1] < 2e-4
    run = json.loads((tmp_path / "est" / "run.json").read_text())
    assert {k: run[k] for k in EVERY_OPTION if k != "class_weight"} == {k: v for k, v in EVERY_OPTION.items()
                                                                       if k != "class_weight"}


# ----------------------------------------------------------------------------- resume, bit for bit

def test_interrupted_and_resumed_with_every_option_is_bit_exact(shared_data, bpe_dir, tmp_path):
    """A tiny SMS run with every option of this file, stopped by SIGTERM in its second epoch and
    resumed, ends with the uninterrupted run's arrays and metrics, bit for bit."""
    args = ["--tiny", "--data", str(shared_data / SMS), "--bpe-dir", bpe_dir, "--epochs", "3",
            "--no-plots", "--keep", "best", "--patience", "5", "--class-weight", "balanced", "--balance", "undersample",
            "--lr-schedule", "cosine", "--warmup", "0.2", "--initial-lr", "1e-5", "--min-lr", "1e-6",
            "--clip-grad-norm", "0.5", "--validate-every", "eval", "--eval-freq", "40"]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    popen = lambda *a: subprocess.Popen([sys.executable, "-u", "-m", "npgpt.train", *a], stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path)
    ref_p = popen(*args, "--data-dir", str(tmp_path / "d1"), "--out", str(tmp_path / "ref"))
    p = popen(*args, "--data-dir", str(tmp_path / "d2"), "--out", str(tmp_path / "run"))
    for line in p.stdout:
        if "Step 000160" in line:
            p.send_signal(signal.SIGTERM)
            break
    _, err = p.communicate(timeout=300)
    assert p.returncode == 143, err
    resumed = popen("--resume", str(tmp_path / "run"), "--no-plots")
    out, rerr = resumed.communicate(timeout=300)
    assert resumed.returncode == 0 and "resuming at epoch 2" in out, rerr
    ref_out, ref_err = ref_p.communicate(timeout=300)
    assert ref_p.returncode == 0, ref_err
    a, b = read_h5(tmp_path / "ref" / "classifier.h5"), read_h5(tmp_path / "run" / "classifier.h5")
    assert set(a) == set(b) and all(np.array_equal(a[n], b[n]) for n in a)
    ma = json.loads((tmp_path / "ref" / "metrics.json").read_text())["metrics"]
    mb = json.loads((tmp_path / "run" / "metrics.json").read_text())["metrics"]
    assert ma == mb and ma["kept"]["which"] == "best" and len(ma["validations"]) > 3
    assert ma["lr"][0] == pytest.approx(1e-5) and ma["lr"][-1] < 5e-5


def read_h5(path) -> dict:
    out = {}
    with h5py.File(path, "r") as f:
        f.visititems(lambda n, o: out.__setitem__(n, o[()]) if isinstance(o, h5py.Dataset) else None)
    return out
