"""Training checkpoints (npgpt.checkpoint) on their own, without a training run.

- save then load restores the trainable arrays, both AdamW moments under their own names and the
  step count, exactly; the next AdamW step is then the one the uninterrupted optimizer takes;
- a checkpoint that does not fit (a wrong shape, an unknown array) or holds a non-finite value is
  a one-line FormatError naming the file and the array;
- strip_params keeps the moments and the state, drops the arrays the classifier file holds.
"""
import json

import h5py
import numpy as np
import pytest

from npgpt import model
from npgpt.checkpoint import CHECKPOINT, load_checkpoint, save_checkpoint, strip_params
from npgpt.config import GPT2Config
from npgpt.errors import FormatError
from npgpt.optim import AdamW
from npgpt.params import init_params

CFG = GPT2Config(n_layer=2, n_head=2, n_embd=16, vocab_size=64, n_ctx=16)


def trained(steps=3, seed=0):
    """Params, trainable names and an AdamW that took `steps` steps on random gradients."""
    params = init_params(CFG, seed=seed, num_classes=2)
    names = model.trainable_names(CFG, 1)
    opt = AdamW(lr=1e-2, weight_decay=0.1)
    rng = np.random.default_rng(seed)
    for _ in range(steps):
        opt.step(params, {n: rng.standard_normal(params[n].shape).astype(params[n].dtype) for n in names})
    return params, names, opt


def test_round_trip_restores_params_moments_and_step(tmp_path):
    params, names, opt = trained()
    state = {"run_state": {"epoch": 1, "batch": 7}, "run_info": {"seed": 123}}
    save_checkpoint(tmp_path, params, names, opt, state, order=np.arange(5))
    assert not (tmp_path / (CHECKPOINT + ".tmp")).exists()

    fresh = init_params(CFG, seed=99, num_classes=2)               # other values everywhere
    opt2 = AdamW(lr=1e-2, weight_decay=0.1)
    assert load_checkpoint(tmp_path, fresh, opt2) == state
    assert opt2.t == opt.t == 3
    for n in names:
        assert np.array_equal(fresh[n], params[n]), n
        assert np.array_equal(opt2.m[n], opt.m[n]), n               # first moments as first moments
        assert np.array_equal(opt2.v[n], opt.v[n]), n
    assert not np.array_equal(opt.m[names[0]], opt.v[names[0]])     # so a swap would show
    # and one more step lands where the optimizer that never stopped lands
    g = {n: np.random.default_rng(5).standard_normal(params[n].shape).astype(params[n].dtype) for n in names}
    opt.step(params, g)
    opt2.step(fresh, g)
    for n in names:
        assert np.array_equal(fresh[n], params[n]), n


@pytest.mark.parametrize("array, change, words", [
    ("adam/v/cls/b", lambda a: np.full_like(a, np.nan), "non-finite"),
    ("params/h1/ln_1/g", lambda a: np.where(np.arange(a.size) == 3, np.inf, a).astype(a.dtype), "non-finite"),
    ("adam/m/cls/w", lambda a: a[:-1], "has shape (15, 2), expected (16, 2)"),
    ("params/cls/w", lambda a: a.T, "has shape (2, 16), expected (16, 2)"),
])
def test_bad_array_is_a_format_error_naming_it(tmp_path, array, change, words):
    params, names, opt = trained()
    path = save_checkpoint(tmp_path, params, names, opt, {"run_state": {}})
    with h5py.File(path, "r+") as f:
        new = change(f[array][()])
        del f[array]
        f[array] = new
    fresh = init_params(CFG, seed=99, num_classes=2)
    with pytest.raises(FormatError) as e:
        load_checkpoint(tmp_path, fresh, AdamW())
    msg = str(e.value)
    assert "\n" not in msg and CHECKPOINT in msg and repr(array) in msg and words in msg


def test_unknown_array_and_missing_file(tmp_path):
    params, names, opt = trained()
    path = save_checkpoint(tmp_path, params, names, opt, {"run_state": {}})
    with h5py.File(path, "r+") as f:
        f["params/h9/ln_1/g"] = np.ones(16, np.float32)            # a block the model does not have
    with pytest.raises(FormatError, match="'params/h9/ln_1/g' does not fit the model"):
        load_checkpoint(tmp_path, init_params(CFG, seed=1, num_classes=2), AdamW())
    with pytest.raises(FormatError, match="no checkpoint to resume from"):
        load_checkpoint(tmp_path / "nothing", params, AdamW())


def test_strip_params_keeps_what_resuming_needs(tmp_path):
    params, names, opt = trained()
    state = {"run_state": {"epoch": 5, "batch": 0}}
    path = save_checkpoint(tmp_path, params, names, opt, state)
    before = (tmp_path / CHECKPOINT).stat().st_size
    assert strip_params(path) == (tmp_path / CHECKPOINT).stat().st_size < before
    with h5py.File(path, "r") as f:
        assert "params" not in f and json.loads(f.attrs["state"]) == state and int(f.attrs["adam_t"]) == 3
        for n in names:
            assert np.array_equal(f[f"adam/m/{n}"][()], opt.m[n]) and np.array_equal(f[f"adam/v/{n}"][()], opt.v[n])
    fresh = init_params(CFG, seed=99, num_classes=2)
    opt2 = AdamW()
    assert load_checkpoint(tmp_path, fresh, opt2) == state and opt2.t == 3
    assert all(np.array_equal(opt2.m[n], opt.m[n]) for n in names)
