"""Round trips of a run's settings: what goes in comes back, field by field.

RunConfig -> run.json -> RunConfig; the settings a run writes into its checkpoint and its
classifier file (and what `load_classifier` makes of them); a classifier saved again; a run
stopped after an epoch and resumed for more, against the run that never stopped. The run is a
LoRA run with the head trained in full, the causal mask off, last-position pooling at a fixed pad
length, gradient accumulation, warmup, clipping, class weights, the best epoch kept: settings a
lost field would change. (A constant learning rate after warmup: a decaying schedule's steps
depend on the number of epochs, so a run extended with --epochs follows another schedule.)"""
import dataclasses
import json

import numpy as np
import pytest

from npgpt import config as C
from npgpt.checkpoint import read_state
from npgpt.classify import load_classifier
from npgpt.lora import LoraSpec, spec_of
from npgpt.runconfig import RunConfig, RunOptions
from npgpt.train import resume_run, train_run
from test_options_end_to_end import EVERY_FIELD, one_thread, table  # noqa: F401 (a fixture)


@pytest.mark.parametrize("name", sorted(EVERY_FIELD))
def test_run_config_through_json_field_by_field(name):
    value, needs = EVERY_FIELD[name]
    run = RunConfig(data="x.csv", **{**needs, name: value})
    back = RunConfig.from_dict(json.loads(json.dumps(run.to_dict())))
    for f in dataclasses.fields(RunConfig):
        assert getattr(back, f.name) == getattr(run, f.name), f.name
    assert back == run


SETTINGS = dict(model="tiny", lora=2, lora_alpha=3.0, lora_targets="attn", lora_train_head=True,
                pooling="last_position", max_length=12, causal_mask=False, accumulate=2, decay_1d=False, seed=7,
                batch_size=4, lr=5e-3, weight_decay=0.05, class_weight="balanced", keep="best", warmup=2,
                initial_lr=1e-3, clip_grad_norm=1.0, eval_freq=3, eval_iter=2, split="0.6,0.2")


@pytest.fixture(scope="module")
def runs(bpe_dir, tmp_path_factory):
    """The run of SETTINGS for 2 epochs; the same run for 1 epoch, resumed with --epochs 2."""
    folder = tmp_path_factory.mktemp("runs")
    path = folder / "three.csv"
    table(48, seed=4).to_csv(path, index=False)
    run = RunConfig(data=str(path), bpe_dir=bpe_dir, epochs=2, **SETTINGS)
    opts = lambda name: RunOptions(out=str(folder / name), progress=False, plots=False)
    whole = train_run(run, opts("whole"), log=lambda m: None)
    train_run(run.replace(epochs=1), opts("resumed"), log=lambda m: None)
    resumed = resume_run(str(folder / "resumed"), RunOptions(progress=False, plots=False), epochs=2,
                         log=lambda m: None)
    return run, whole, resumed


def test_run_json_checkpoint_and_classifier_keep_every_setting(runs):
    run, whole, _ = runs
    saved = json.loads(open(f"{whole.run_dir}/run.json").read())
    want = run.replace(labels=["fruit", "river", "tool"]).to_dict()
    assert saved == want
    assert RunConfig.from_dict(saved).to_dict() == want
    assert read_state(whole.run_dir)["run_config"] == want
    meta = whole.classifier.meta
    assert meta["run_config"] == want
    assert (meta["pooling"], meta["max_length"], meta["causal_mask"], meta["trainable"]) == \
        ("last_position", 12, False, "lora")
    assert meta["lora"] == {"rank": 2, "alpha": 3.0, "targets": ["attn"], "train_head": True}
    assert meta["labels"] == ["fruit", "river", "tool"] and meta["model_size"] == "tiny"
    assert meta["kept"]["which"] == "best" and len(meta["class_weights"]) == 3


def test_loaded_classifier_reads_the_settings_back(runs):
    _, whole, _ = runs
    clf = load_classifier(whole.classifier_path)
    assert (clf.pooling, clf.max_length, clf.causal, clf.labels) == \
        ("last_position", 12, False, ["fruit", "river", "tool"])
    assert spec_of(clf.meta) == LoraSpec(rank=2, alpha=3.0, targets=("attn",), train_head=True)


def test_lora_train_head_trains_the_head_and_gives_it_no_pair(runs):
    """--lora-train-head through the run: the head's own arrays trained, no LoRA pair on it; the
    attention's pairs trained (B moved from zero); the frozen arrays as initialised."""
    _, whole, _ = runs
    p = whole.classifier.params
    start = C.init_params(C.TINY, seed=7, num_classes=3)
    assert np.abs(p["cls/w"] - start["cls/w"]).max() > 1e-3
    assert not any(n.startswith("cls/lora") for n in p)
    assert np.abs(p["h1/attn/c_attn/q/lora_B"]).max() > 1e-4
    assert not any("mlp" in n and "lora" in n for n in p)
    assert np.array_equal(p["h1/mlp/c_fc/w"], start["h1/mlp/c_fc/w"])


def test_saved_again_the_classifier_is_the_same(runs, tmp_path):
    _, whole, _ = runs
    clf = whole.classifier
    again = load_classifier(clf.save(tmp_path / "again.h5"))
    assert (again.pooling, again.max_length, again.causal, again.labels) == \
        (clf.pooling, clf.max_length, clf.causal, clf.labels)
    assert spec_of(again.meta) == spec_of(clf.meta)
    assert set(again.params) == set(clf.params) and all(np.array_equal(again.params[n], clf.params[n]) for n in
                                                        clf.params)
    texts = ["a apple of", "hammer " * 20, "river"]                        # the second is longer than 12 tokens
    assert np.array_equal(again.predict_proba(texts), clf.predict_proba(texts))


def test_resumed_for_another_epoch_is_the_run_that_never_stopped(runs):
    """Every setting survives the checkpoint: the resumed run ends with the same arrays, bit for
    bit, the same metrics and the same state (but for the time it took). The first epoch's
    validation is the best: the arrays kept are those the checkpoint held for it."""
    _, whole, resumed = runs
    assert whole.metrics["kept"]["epoch"] == 1 and len(whole.metrics["validations"]) == 2
    a, b = whole.classifier.params, resumed.classifier.params
    assert set(a) == set(b) and all(np.array_equal(a[n], b[n]) for n in a)
    sa, sb = dataclasses.asdict(whole.state), dataclasses.asdict(resumed.state)
    sa.pop("train_time"), sb.pop("train_time")
    assert sa == sb
    assert read_state(resumed.run_dir)["run_config"] == read_state(whole.run_dir)["run_config"]
