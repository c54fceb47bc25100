"""The training job end to end on the real SMS data with the tiny random model: it learns, it
writes a loadable classifier and metrics, the fast paths train like the dense path, an
interrupted and resumed run ends bit for bit where an uninterrupted one does, and failures
keep what was already done."""
import json
import os
import signal
import subprocess
import sys

import h5py
import numpy as np
import pytest

from npgpt import finetune, model, params as P
from npgpt.cli import train
from npgpt.config import preset
from npgpt.data import prepare_splits
from npgpt.dataset import TextDataset, eval_batches, make_datasets
from npgpt.errors import TrainingError
from npgpt.runconfig import RunConfig, RunOptions
from npgpt.tokenizer import get_tokenizer
from npgpt.train import train_run


@pytest.fixture(scope="module")
def data_args(shared_data, tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    prepare_splits(shared_data / "sms_spam_collection" / "SMSSpamCollection", d)   # the CSVs
    return ["--data", str(shared_data / "sms_spam_collection" / "SMSSpamCollection"),
            "--data-dir", str(d), "--bpe-dir", str(shared_data / "gpt2_bpe")]


def run_train(args, env_extra=None, **kw):
    env = dict(os.environ, **(env_extra or {}))
    return subprocess.Popen([sys.executable, "-u", "-m", "npgpt.train", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, **kw)


def read_h5(path):
    out = {}
    with h5py.File(path, "r") as f:
        f.visititems(lambda n, o: out.__setitem__(n, o[()]) if isinstance(o, h5py.Dataset) else None)
    return out


def test_end_to_end_tiny(data_args, tmp_path):
    out = tmp_path / "run"
    code = train.main(["--tiny", "--epochs", "2", "--out", str(out), "--quiet", *data_args])
    assert code == 0
    metrics = json.loads((out / "metrics.json").read_text())["metrics"]
    losses = metrics["train_loss"]
    assert len(losses) == 6 and len(metrics["epoch_val_acc"]) == 2     # steps 0, 50, ..., 250
    assert np.mean(losses[-2:]) < losses[0] - 0.1                     # it learns
    final = metrics["final"]
    assert final["train_accuracy"] > 0.6 and set(final) >= {"test_accuracy", "validation_accuracy"}
    params, cfg, meta = P.load_params(out / "classifier.h5")
    assert cfg == preset("tiny") and meta["labels"] == ["ham", "spam"] and meta["pooling"] == "last_token"
    assert meta["max_length"] == 120 and meta["run_config"]["epochs"] == 2
    assert (out / "loss.png").stat().st_size > 1000 and (out / "accuracy.png").exists()
    # the saved model gives the accuracy the run reported
    splits = prepare_splits(None, data_args[3])
    tok = get_tokenizer(data_args[5])
    test = make_datasets(splits, tok)[2]
    _, acc, _ = finetune.evaluate(params, cfg, test, RunConfig(model="tiny"))
    assert acc == pytest.approx(final["test_accuracy"], abs=1e-12)


def _fit(data_args, run_dir, **settings):
    """A tiny SMS run through the run service -> (trained params, metrics, log lines)."""
    logs = []
    run = RunConfig(model="tiny", data=data_args[1], data_dir=data_args[3], bpe_dir=data_args[5], **settings)
    result = train_run(run, RunOptions(out=str(run_dir), progress=False, plots=False), log=logs.append)
    return result.classifier.params, result.metrics, logs


@pytest.mark.parametrize("pooling", ["last_token", "last_position"])
def test_cached_unpadded_pooled_training_equals_dense(data_args, tmp_path, pooling):
    """One epoch through fit(): the default fast path (prefix cache, batches padded only to their
    longest message with last_token, to 120 with last_position, last block at the pooled position)
    against the dense path (every block and every position from the ids, padded to 120). Same
    losses and parameters to float32 round-off."""
    pa, ma, logs = _fit(data_args, tmp_path / "a", epochs=1, eval_freq=40, pooling=pooling)
    assert any("cached the frozen prefix (blocks 0..0)" in s for s in logs)   # the fast path does use it
    pb, mb, _ = _fit(data_args, tmp_path / "b", epochs=1, eval_freq=40, pooling=pooling, cache=False, dense=True)
    np.testing.assert_allclose(ma["train_loss"], mb["train_loss"], rtol=1e-4)
    np.testing.assert_allclose(ma["val_loss"], mb["val_loss"], rtol=1e-4)
    assert ma["final"]["test_accuracy"] == pytest.approx(mb["final"]["test_accuracy"], abs=2 / 300)
    C = preset("tiny").n_embd
    for name in model.trainable_names(preset("tiny"), 1):
        a, b = pa[name], pb[name]
        if name.endswith("c_attn/b"):
            # The key bias shifts every score of a row equally, so its true gradient is 0 and
            # both paths feed Adam float32 round-off (~1e-9) there, which Adam scales up to steps
            # of up to lr. Bound it by 5% of the largest possible movement (lr * steps) instead.
            assert np.abs(a[C:2 * C] - b[C:2 * C]).max() <= 0.05 * 5e-5 * 130
            a, b = np.delete(a, np.s_[C:2 * C]), np.delete(b, np.s_[C:2 * C])
        assert np.abs(a - b).max() <= 1e-4 * np.abs(b).max() + 1e-7, name


def test_interrupt_and_resume_is_bit_exact(data_args, tmp_path):
    """Each process gets its own data folder (nothing shared between the two runs); every
    assertion carries the processes' stderr."""
    def common(name):
        args = list(data_args)
        args[args.index("--data-dir") + 1] = str(tmp_path / f"data-{name}")
        return ["--tiny", "--epochs", "2", "--no-plots", *args, "--out", str(tmp_path / name)]   # lines read

    ref = run_train(common("ref"))
    # interrupted run: SIGTERM once step 150 (in epoch 2) has been evaluated
    p = run_train(common("run"))
    seen = []
    for line in p.stdout:
        seen.append(line)
        if "Step 000150" in line:
            p.send_signal(signal.SIGTERM)
            break
    _, err = p.communicate(timeout=300)
    log = f"interrupted run stdout:\n{''.join(seen)}\nstderr:\n{err}"
    assert p.returncode == 143, log
    assert "--resume" in err and "Traceback" not in err, log
    with h5py.File(tmp_path / "run" / "checkpoint.h5", "r") as f:
        state = json.loads(f.attrs["state"])["run_state"]
    assert state["epoch"] == 1 and 0 < state["batch"] < 130, (state, log)   # stopped mid-epoch
    assert not (tmp_path / "run" / "classifier.h5").exists(), log
    resumed = run_train(["--resume", str(tmp_path / "run"), "--no-plots"])
    out, rerr = resumed.communicate(timeout=300)
    log += f"\nresumed run stdout:\n{out}\nstderr:\n{rerr}"
    assert resumed.returncode == 0, log
    assert "resuming at epoch 2" in out, log
    ref_out, ref_err = ref.communicate(timeout=300)
    log += f"\nreference run stdout:\n{ref_out}\nstderr:\n{ref_err}"
    assert ref.returncode == 0, log
    a, b = read_h5(tmp_path / "ref" / "classifier.h5"), read_h5(tmp_path / "run" / "classifier.h5")
    assert set(a) == set(b), log
    for name in a:
        assert np.array_equal(a[name], b[name]), name                 # bit for bit
    ma = json.loads((tmp_path / "ref" / "metrics.json").read_text())["metrics"]
    mb = json.loads((tmp_path / "run" / "metrics.json").read_text())["metrics"]
    assert ma == mb


def test_non_finite_loss_stops_and_keeps_checkpoint(data_args, tmp_path, monkeypatch):
    real = finetune.fastmodel.loss_and_grads
    calls = {"n": 0}

    def poisoned(*a, **kw):
        loss, grads, logits = real(*a, **kw)
        calls["n"] += 1
        if calls["n"] == 140:                                         # in the second epoch
            grads["cls/b"] = grads["cls/b"] * np.float32("nan")
        return loss, grads, logits

    monkeypatch.setattr(finetune.fastmodel, "loss_and_grads", poisoned)
    out = tmp_path / "run"
    with pytest.raises(TrainingError, match="step 139"):
        train.main(["--tiny", "--epochs", "2", "--out", str(out), "--quiet", "--no-plots", *data_args])
    with h5py.File(out / "checkpoint.h5", "r") as f:
        state = json.loads(f.attrs["state"])["run_state"]
        assert state["epoch"] == 1 and state["batch"] == 0           # the end-of-epoch-1 checkpoint
        assert np.isfinite(f["params/cls/b"][()]).all()


def test_unwritable_output_fails_before_training(data_args, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    p = run_train(["--tiny", "--out", str(blocker / "run"), *data_args])      # not --quiet: no line is hidden
    out, err = p.communicate(timeout=120)
    assert p.returncode == 1
    assert err.strip().startswith("error: cannot write to the run folder") and len(err.strip().splitlines()) == 1
    assert f"{blocker} is a file, not a folder" in err
    assert "Ep 1" not in out


def test_existing_run_is_not_overwritten(data_args, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "checkpoint.h5").write_bytes(b"x")
    p = run_train(["--tiny", "--out", str(out), "--quiet", *data_args])
    _, err = p.communicate(timeout=120)
    assert p.returncode == 1 and "--resume" in err
    assert (out / "checkpoint.h5").read_bytes() == b"x"


def test_disk_full_keeps_previous_checkpoint(data_args, tmp_path, monkeypatch):
    """The second checkpoint write fails as on a full disk: a one-line TrainingError, the first
    checkpoint intact and loadable, no temporary file left behind."""
    real_file = h5py.File
    opened = {"w": 0}

    def file_on_full_disk(path, mode="r", *a, **kw):
        if mode == "w":
            opened["w"] += 1
            if opened["w"] == 2:
                f = real_file(path, mode, *a, **kw)       # a partial file appears, then the disk is full
                f.close()
                raise OSError(28, "No space left on device")
        return real_file(path, mode, *a, **kw)

    monkeypatch.setattr(h5py, "File", file_on_full_disk)
    out = tmp_path / "run"
    with pytest.raises(TrainingError, match="No space left on device.*previous checkpoint is unchanged"):
        train.main(["--tiny", "--epochs", "2", "--out", str(out), "--quiet", "--no-plots", *data_args])
    monkeypatch.setattr(h5py, "File", real_file)
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint.h5", "metrics.json", "run.json", "test.csv",
                                                     "train.csv", "validation.csv"]   # the splits the run used
    with h5py.File(out / "checkpoint.h5", "r") as f:
        state = json.loads(f.attrs["state"])["run_state"]
    assert state["epoch"] == 1 and state["batch"] == 0


def _texts(lengths, pad_to, seed=0):
    rng = np.random.default_rng(seed)
    tokens = [list(rng.integers(0, 50000, n)) for n in lengths]
    return TextDataset(tokens, np.array(lengths), rng.integers(0, 2, len(lengths)), np.arange(len(lengths)), pad_to)


CASES = [("last_token", None, True, True), ("mean", None, True, True), ("last_position", 12, True, True),
         ("last_position", None, True, False), ("last_token", None, False, False), ("last_token", 12, False, True)]


@pytest.mark.parametrize("pooling,pad_to,causal,free", CASES)
def test_estimate_batches_merge_only_where_grouping_changes_nothing(pooling, pad_to, causal, free):
    """Estimates run their batches as one forward pass only where a message's logits do not depend
    on its batch; there the loss and accuracy equal the batch-by-batch ones."""
    cfg = preset("tiny")
    params = P.init_params(cfg, seed=3, num_classes=2)
    d = _texts([3, 9, 1, 12, 5, 7, 2, 11, 4, 6], pad_to)
    run = RunConfig(model="tiny", pooling=pooling, causal_mask=causal, batch_size=3, eval_iter=4)
    batches = eval_batches(len(d), 3)
    assert finetune.padding_of(d, run).grouping_free is free
    groups = finetune.estimate_batches(d, run)
    by_batch = finetune.evaluate(params, cfg, d, run, batches=batches)
    merged = finetune.evaluate(params, cfg, d, run, batches=[np.concatenate(batches)])
    if not free:                              # one pass would change the loss: the batches stay
        assert [b.tolist() for b in groups] == [b.tolist() for b in batches]
        assert merged[0] != pytest.approx(by_batch[0], rel=1e-6)
        return
    assert len(groups) == 1 and np.array_equal(groups[0], np.arange(10))
    assert merged[0] == pytest.approx(by_batch[0], rel=1e-6) and merged[1] == by_batch[1]
    np.testing.assert_array_equal(merged[2], by_batch[2])


@pytest.mark.parametrize("pooling,pad_to,causal,free", CASES)
def test_the_final_evaluation_sorts_only_where_grouping_changes_nothing(pooling, pad_to, causal, free):
    """The final evaluation sorts messages by length (and runs 64 at a time) only where a message's
    logits do not depend on its batch: then it equals the batch-by-batch evaluation in order.
    Otherwise (no causal mask, or last-position pooling, with per-batch padding) it evaluates in
    order, in the run's batches, as the estimates and `npgpt.evaluate` do: sorting would pad each
    message less than training did and change the numbers."""
    cfg = preset("tiny")
    params = P.init_params(cfg, seed=4, num_classes=2)
    d = _texts([3, 9, 1, 12, 5, 7, 2, 11, 4, 6], pad_to, seed=1)
    run = RunConfig(model="tiny", pooling=pooling, causal_mask=causal, batch_size=3)
    final = finetune.final_batches(d, run)
    in_order = finetune.evaluate(params, cfg, d, run)                # eval_batches: in order, batches of 3
    got = finetune.evaluate(params, cfg, d, run, batches=final)
    assert got[0] == pytest.approx(in_order[0], rel=1e-6) and got[1] == in_order[1]
    if free:
        assert [len(b) for b in final] == [10] and list(final[0]) == list(np.argsort(d.lengths, kind="stable"))
    else:
        assert [b.tolist() for b in final] == [b.tolist() for b in eval_batches(10, 3)]
        order = np.argsort(d.lengths, kind="stable")
        sorted_batches = [order[i:i + 3] for i in range(0, 10, 3)]
        assert finetune.evaluate(params, cfg, d, run, batches=sorted_batches)[0] != pytest.approx(in_order[0], rel=1e-6)
