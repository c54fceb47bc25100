"""npgpt against an independent PyTorch GPT-2 (tests/reference_torch.py).

Checks, in float32, on a tiny model (two vocabularies) and on the real 124M shapes with random
weights: LM logits, class logits for every pooling, the mean cross-entropy loss, and the gradient
of every trainable array for several trainable sets, of the textbook (npgpt.model) and of the
training path (npgpt.fastmodel); that class logits do not depend on right
padding; that the key third of c_attn/b has a zero gradient (so its float32 value is rounding
noise, which the AdamW run leaves out); and that npgpt's AdamW follows torch.optim.AdamW, both in
a short training run and fed the same gradients directly.

Every measured error is printed (`pytest -s`) and, when the env var NPGPT_ERROR_REPORT names a
file, appended to it as `name: value` lines.
"""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

import reference_torch as ref
from npgpt.config import GPT2Config, preset
from npgpt.params import init_params, param_shapes
import npgpt.fastmodel as fastmodel
import npgpt.fastops as fastops
import npgpt.model as model
import npgpt.optim as optim
from helpers import rel_err

IMPLS = {"textbook": model, "fast": fastmodel}

# Tolerances (float32 unless stated).
LOGITS_ATOL = 1e-4        # max |npgpt - torch| on LM and class logits (logits are O(1))
LOSS_ATOL = 1e-5          # |npgpt - torch| on the mean cross-entropy (about 0.7)
GRAD_RTOL = 1e-4          # per array: max|npgpt - torch| / max|torch|
PAD_ATOL = 1e-5           # npgpt padded batch vs each sequence alone (same code, other shapes)
ADAMW_TRAIN_ATOL = 1e-6   # params after 10 AdamW steps on each side's own gradients
ADAMW_PURE_ATOL = 1e-12   # float64 params after 10 AdamW steps on identical gradients

PAD_ID = ref.PAD_ID
TRAINABLE_SETS = ("head", 1, 2, "all")

CASES = {
    # name: (config, batch size, sequence length, lengths for last_token pooling)
    "tiny": (GPT2Config(n_layer=2, n_head=4, n_embd=64, vocab_size=50257, n_ctx=32), 3, 16, (16, 9, 1)),
    "tiny_v97": (GPT2Config(n_layer=2, n_head=4, n_embd=64, vocab_size=97, n_ctx=32), 3, 16, (16, 9, 1)),
    "124M": (preset("124M"), 2, 8, (8, 3)),
}


def record(name: str, value: float) -> None:
    """Print one measured error and append it to $NPGPT_ERROR_REPORT when set."""
    print(f"{name}: {value:.3e}")
    path = os.environ.get("NPGPT_ERROR_REPORT")
    if path:
        with open(path, "a") as f:
            f.write(f"{name}: {value:.6e}\n")


def max_abs(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def scaled_params(config: GPT2Config, seed: int = 0) -> dict:
    """init_params(config, seed, num_classes=2), rescaled so the test can see what it checks:
    - wte, wpe, cls/w and every linear weight with std 1/sqrt(fan_in), so activations and logits
      are O(1) (GPT-2's 0.02 leaves them small enough to hide an error in the tolerance);
    - c_attn/w with std 1.2/sqrt(C), so attention scores are O(1) and the softmax is far from
      uniform (a wrong 1/sqrt(D) scale shows);
    - c_fc/w with std 2/sqrt(C), so GELU sees |x| up to ~8 (the tanh and erf forms differ by up to
      ~5e-4 there, so the wrong GELU shows);
    - every gain and bias random (gains 1 + 0.1 N, biases 0.1 N), so no term hides behind a 1 or 0."""
    params = init_params(config, seed, num_classes=2)
    rng = np.random.default_rng(seed + 1)
    C = config.n_embd
    for name, arr in params.items():
        std = float(arr.std()) if arr.ndim == 2 else 0.0
        if name in ("wte", "wpe"):
            arr *= np.float32(1.0 / (std * np.sqrt(C)))
        elif name.endswith("attn/c_attn/w"):
            arr *= np.float32(1.2 / (std * np.sqrt(C)))
        elif name.endswith("mlp/c_fc/w"):
            arr *= np.float32(2.0 / (std * np.sqrt(C)))
        elif arr.ndim == 2:                              # c_proj weights, cls/w: fan_in rows
            arr *= np.float32(1.0 / (std * np.sqrt(arr.shape[0])))
        elif name.endswith("/g"):
            arr[...] = 1.0 + 0.1 * rng.standard_normal(arr.shape)
        else:
            arr[...] = 0.1 * rng.standard_normal(arr.shape)
    return params




def expected_trainable(config: GPT2Config, trainable) -> set:
    """The trainable set as documented: 'head' = cls/w, cls/b; int K = head + ln_f + the last K
    blocks; 'all' = every array including wte and wpe."""
    names = set(param_shapes(config, 2))
    head = {"cls/w", "cls/b"}
    if trainable == "all":
        return names
    if trainable == "head":
        return head
    first = config.n_layer - trainable
    blocks = {n for n in names if n.startswith("h") and int(n.split("/")[0][1:]) >= first}
    return head | {"ln_f/g", "ln_f/b"} | blocks


def make_batch(config: GPT2Config, B: int, T: int, lengths, seed: int):
    """ids [B,T] with row b right-padded after lengths[b] tokens, and labels [B]. Real tokens never
    equal the pad id; padding uses the pad id when the vocabulary has it, token 0 otherwise."""
    rng = np.random.default_rng(seed)
    hi = min(config.vocab_size, PAD_ID)
    ids = rng.integers(0, hi, size=(B, T))
    pad = PAD_ID if config.vocab_size > PAD_ID else 0
    for b, n in enumerate(lengths):
        ids[b, n:] = pad
    labels = rng.integers(0, 2, size=B)
    return ids, labels, np.asarray(lengths)


@pytest.fixture(scope="module", params=list(CASES))
def case(request):
    """Params, the torch model holding the same numbers, and a padded batch; built once per
    module for each case (the 124M params are ~0.5 GB)."""
    name = request.param
    config, B, T, lengths = CASES[name]
    params = scaled_params(config)
    tmodel = ref.load_from_npgpt(params, config, torch.float32)
    ids, labels, lengths = make_batch(config, B, T, lengths, seed=1)
    c = dict(name=name, config=config, params=params, tmodel=tmodel, ids=ids, labels=labels,
             lengths=lengths, torch_results={})
    yield c
    c.clear()


def torch_results(case, pooling):
    """(loss, grads of every array, logits) from the torch model, computed once per pooling."""
    if pooling not in case["torch_results"]:
        case["torch_results"][pooling] = ref.loss_and_grads(
            case["tmodel"], case["ids"], case["labels"], lengths=case["lengths"], pooling=pooling)
    return case["torch_results"][pooling]


# ----------------------------------------------------------------------------- forward

def test_lm_logits(case):
    ids = case["ids"]
    got = model.forward_lm(case["params"], case["config"], ids)                 # [B,T,V]
    with torch.no_grad():
        want = case["tmodel"].forward_lm(torch.as_tensor(ids)).numpy()          # [B,T,V]
    assert got.shape == want.shape
    assert got.dtype == np.float32
    assert np.abs(want).max() > 1.0  # logits really are O(1)
    err = max_abs(got, want)
    record(f"{case['name']} lm_logits max_abs", err)
    assert err <= LOGITS_ATOL


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("pooling", ref.POOLINGS)
def test_cls_logits(case, pooling, impl):
    ids, lengths = case["ids"], case["lengths"]
    with torch.no_grad():
        want = case["tmodel"].forward_cls(torch.as_tensor(ids), lengths=lengths,
                                          pooling=pooling).numpy()               # [B,2]
    got = IMPLS[impl].forward_cls(case["params"], case["config"], ids, lengths=lengths, pooling=pooling)
    assert got.shape == want.shape == (len(ids), 2)
    assert np.abs(want).max() > 0.3
    err = max_abs(got, want)
    record(f"{case['name']} {impl} cls_logits {pooling} max_abs", err)
    assert err <= LOGITS_ATOL
    if pooling == "last_token" and case["config"].vocab_size > PAD_ID:
        # lengths derived from the pad id must give the same logits
        derived = IMPLS[impl].forward_cls(case["params"], case["config"], ids, pooling=pooling)
        err = max_abs(derived, want)
        record(f"{case['name']} {impl} cls_logits {pooling} derived_lengths max_abs", err)
        assert err <= LOGITS_ATOL


# ----------------------------------------------------------------------------- loss and gradients

@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("pooling", ref.POOLINGS)
@pytest.mark.parametrize("trainable", TRAINABLE_SETS)
def test_loss_and_grads(case, trainable, pooling, impl):
    config, params = case["config"], case["params"]
    t_loss, t_grads, t_logits = torch_results(case, pooling)
    loss, grads, logits = IMPLS[impl].loss_and_grads(params, config, case["ids"], case["labels"],
                                                     trainable=trainable, lengths=case["lengths"],
                                                     pooling=pooling)
    tag = f"{case['name']} {impl} trainable={trainable} {pooling}"

    # exactly the trainable arrays get a gradient, as documented
    names = set(model.trainable_names(config, trainable))
    assert names == expected_trainable(config, trainable)
    assert set(grads) == names

    loss_err = abs(float(loss) - t_loss)
    logits_err = max_abs(logits, t_logits)
    record(f"{tag} loss abs", loss_err)
    record(f"{tag} logits max_abs", logits_err)
    assert loss_err <= LOSS_ATOL
    assert logits_err <= LOGITS_ATOL

    errs = {}
    for name in sorted(names):
        g = grads[name]
        assert g.shape == params[name].shape, name
        assert g.dtype == np.float32, name
        errs[name] = rel_err(g, t_grads[name])
    worst = max(errs, key=errs.get)
    record(f"{tag} grad max_rel ({worst})", errs[worst])
    bad = {k: f"{v:.2e}" for k, v in errs.items() if not v <= GRAD_RTOL}
    assert not bad, f"gradients off by more than {GRAD_RTOL:g} (relative): {bad}"


# ----------------------------------------------------------------------------- padding

def test_padding_invariance(case):
    """With last_token pooling a right-padded row gives the logits of the same tokens alone,
    whether the lengths are given or (when the vocabulary has the pad id) derived from it."""
    config, params = case["config"], case["params"]
    ids, lengths = case["ids"], case["lengths"]
    assert (lengths < ids.shape[1]).any()  # the batch really is padded
    runs = {"given": fastmodel.forward_cls(params, config, ids, lengths=lengths, pooling="last_token")}
    if config.vocab_size > PAD_ID:
        runs["derived"] = fastmodel.forward_cls(params, config, ids, pooling="last_token")
    for how, padded in runs.items():
        worst = 0.0
        for b, n in enumerate(lengths):
            row = ids[b:b + 1, :n]                                               # [1,n]
            alone = fastmodel.forward_cls(params, config, row, lengths=[n], pooling="last_token")[0]
            with torch.no_grad():
                t_alone = case["tmodel"].forward_cls(torch.as_tensor(row), lengths=[n],
                                                     pooling="last_token").numpy()[0]
            assert max_abs(alone, t_alone) <= LOGITS_ATOL
            worst = max(worst, max_abs(padded[b], alone))
        record(f"{case['name']} padding_invariance lengths_{how} max_abs", worst)
        assert worst <= PAD_ATOL


def test_packed_prefix_path(case):
    """The training path: the frozen blocks over the messages packed without padding (packed
    attention kernel), re-padded, then the pooled last block: class logits as PyTorch's."""
    config, params = case["config"], case["params"]
    ids, lengths = case["ids"], case["lengths"]
    first = config.n_layer - 1
    seqs = [ids[b, :n] for b, n in enumerate(lengths)]
    x = np.zeros((len(ids), ids.shape[1], config.n_embd), np.float32)            # [B,T,C]
    for b, xb in enumerate(fastmodel.forward_prefix_packed(params, config, seqs, first)):
        x[b, :len(xb)] = xb
    got = fastmodel.forward_cls(params, config, x_start=x, start=first, lengths=lengths)
    with torch.no_grad():
        want = case["tmodel"].forward_cls(torch.as_tensor(ids), lengths=lengths,
                                          pooling="last_token").numpy()          # [B,2]
    err = max_abs(got, want)
    record(f"{case['name']} packed_prefix cls_logits max_abs", err)
    assert err <= LOGITS_ATOL


# ----------------------------------------------------------------------------- AdamW

def test_adamw_training_matches_torch():
    """10 AdamW steps (lr 5e-5, weight decay 0.1) on a fixed sequence of batches, trainable=1:
    npgpt on its own gradients, torch on autograd's; every array ends up equal."""
    config, B, T, lengths = CASES["tiny"]
    params = scaled_params(config, seed=3)
    start = {k: v.copy() for k, v in params.items()}
    trainable = expected_trainable(config, 1)
    tmodel = ref.load_from_npgpt(params, config, torch.float32, trainable_names=trainable)
    tparams = ref.named_torch_params(tmodel)
    t_opt = torch.optim.AdamW([tparams[n] for n in sorted(trainable)], lr=5e-5, weight_decay=0.1)
    opt = optim.AdamW(lr=5e-5, weight_decay=0.1, update=fastops.adamw_update)      # as training runs it
    for step in range(10):
        ids, labels, lens = make_batch(config, B, T, lengths, seed=100 + step)
        _, grads, _ = fastmodel.loss_and_grads(params, config, ids, labels, trainable=1, lengths=lens)
        opt.step(params, grads)
        ref.loss_and_grads(tmodel, ids, labels, lengths=lens)
        t_opt.step()
    after = ref.params_to_npgpt(tmodel)
    moved = max(max_abs(params[n], start[n]) for n in trainable)
    assert moved > 100 * ADAMW_TRAIN_ATOL  # the steps did move the weights
    for n in set(params) - trainable:
        np.testing.assert_array_equal(params[n], start[n], err_msg=f"frozen {n} changed")
    # The key third of c_attn/b is left out: its exact gradient is zero (see
    # test_key_bias_gradient_is_zero), so both sides feed AdamW float32 rounding noise (~1e-9,
    # below eps = 1e-8), which AdamW scales up to steps of a sizeable fraction of lr with random
    # sign. What is left to compare there is noise, not arithmetic.
    C = config.n_embd
    key = slice(C, 2 * C)
    errs = {}
    for n in params:
        a, b = params[n], after[n]
        if n.endswith("attn/c_attn/b"):
            a, b = np.delete(a, np.s_[key]), np.delete(b, np.s_[key])
        errs[n] = max_abs(a, b)
    key_diff = max(max_abs(params[n][key], after[n][key]) for n in trainable if n.endswith("c_attn/b"))
    record("adamw_training 10 steps key-bias noise max_abs (not checked)", key_diff)
    worst = max(errs, key=errs.get)
    record(f"adamw_training 10 steps max_abs ({worst})", errs[worst])
    bad = {k: f"{v:.2e}" for k, v in errs.items() if not v <= ADAMW_TRAIN_ATOL}
    assert not bad, f"params differ by more than {ADAMW_TRAIN_ATOL:g}: {bad}"


def test_key_bias_gradient_is_zero():
    """softmax(q.(k + b_k)) = softmax(q.k + q.b_k): a key bias adds the same number to every score
    of a query row, so the gradient of the key third of c_attn/b is exactly zero. In float64 both
    npgpt and torch show it (in float32 it is rounding noise, ~1e-9)."""
    config, B, T, lengths = CASES["tiny"]
    params = {k: v.astype(np.float64) for k, v in scaled_params(config, seed=3).items()}
    ids, labels, lens = make_batch(config, B, T, lengths, seed=100)
    _, grads, _ = model.loss_and_grads(params, config, ids, labels, trainable="all", lengths=lens)
    tmodel = ref.load_from_npgpt(params, config, torch.float64)
    _, t_grads, _ = ref.loss_and_grads(tmodel, ids, labels, lengths=lens)
    C = config.n_embd
    for i in range(config.n_layer):
        name = f"h{i}/attn/c_attn/b"
        for g in (grads[name], t_grads[name]):
            assert g.dtype == np.float64
            key = float(np.abs(g[C:2 * C]).max())
            assert key <= 1e-12 * float(np.abs(g).max()), (name, key)
        record(f"float64 {name} key-third max_abs npgpt", float(np.abs(grads[name][C:2 * C]).max()))


PURE_SHAPES = {"a/w": (6, 5), "a/b": (5,), "ln/g": (5,), "ln/b": (5,), "e": (7, 3)}


@pytest.mark.parametrize("hyper", [
    dict(lr=1e-2, weight_decay=0.1),
    dict(lr=3e-3, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.5),
])
@pytest.mark.parametrize("decay_1d", [True, False])
@pytest.mark.parametrize("update", ["numpy", "kernel"])
def test_adamw_same_gradients(hyper, decay_1d, update):
    """The same random gradients fed to both optimizers for 10 steps, float64, with the textbook's
    update (optim.adamw_update) and the training path's (fastops.adamw_update). With
    decay_1d=False, 1-D arrays are exempt from weight decay: torch gets two param groups."""
    rng = np.random.default_rng(7)
    params = {n: rng.standard_normal(s) for n, s in PURE_SHAPES.items()}
    tp = {n: torch.tensor(v, dtype=torch.float64, requires_grad=True) for n, v in params.items()}
    flat = [tp[n] for n in PURE_SHAPES if tp[n].ndim >= 2]
    one_d = [tp[n] for n in PURE_SHAPES if tp[n].ndim == 1]
    wd = hyper["weight_decay"]
    groups = [{"params": flat}, {"params": one_d, "weight_decay": wd if decay_1d else 0.0}]
    t_opt = torch.optim.AdamW(groups, **hyper)
    opt = optim.AdamW(decay_1d=decay_1d, update=optim.adamw_update if update == "numpy" else fastops.adamw_update,
                      **hyper)
    # the decay of 1-D arrays changes them by far more than the tolerance, so the test can tell
    other = {n: torch.tensor(v, dtype=torch.float64, requires_grad=True) for n, v in params.items()}
    o_opt = torch.optim.AdamW([{"params": [other[n] for n in PURE_SHAPES if other[n].ndim >= 2]},
                               {"params": [other[n] for n in PURE_SHAPES if other[n].ndim == 1],
                                "weight_decay": 0.0 if decay_1d else wd}], **hyper)
    for _ in range(10):
        grads = {n: rng.standard_normal(s) for n, s in PURE_SHAPES.items()}
        opt.step(params, grads)
        for n, g in grads.items():
            tp[n].grad = torch.from_numpy(g.copy())
            other[n].grad = torch.from_numpy(g.copy())
        t_opt.step()
        o_opt.step()
    errs = {n: max_abs(params[n], tp[n].detach().numpy()) for n in params}
    worst = max(errs, key=errs.get)
    name = "adamw_same_grads " + ",".join(f"{k}={v}" for k, v in hyper.items()) + f" decay_1d={decay_1d}"
    record(f"{name} max_abs ({worst})", errs[worst])
    assert all(params[n].dtype == np.float64 for n in params)
    assert max(max_abs(params[n], other[n].detach().numpy()) for n in params
               if params[n].ndim == 1) > 1e-6
    bad = {k: f"{v:.2e}" for k, v in errs.items() if not v <= ADAMW_PURE_ATOL}
    assert not bad, f"params differ by more than {ADAMW_PURE_ATOL:g}: {bad}"
