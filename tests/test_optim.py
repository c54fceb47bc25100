"""AdamW (npgpt.optim): the formulas by hand, the state round trip. (Against torch.optim.AdamW:
tests/test_vs_torch.py; the kernel against the NumPy update: tests/test_kernels.py.)"""
import numpy as np

from npgpt.optim import AdamW


def test_adamw_formula():
    """Two steps by hand against the formulas in npgpt.optim (float64)."""
    rng = np.random.default_rng(0)
    p0 = rng.standard_normal((3, 2))
    b0 = rng.standard_normal(2)
    params = {"w": p0.copy(), "b": b0.copy()}
    g1, g2 = rng.standard_normal((3, 2)), rng.standard_normal((3, 2))
    h1, h2 = rng.standard_normal(2), rng.standard_normal(2)      # random: a sign change included
    h2[0] = -np.sign(h1[0]) * 3 * abs(h1[0])
    opt = AdamW(lr=0.1, weight_decay=0.5, decay_1d=False)
    opt.step(params, {"w": g1, "b": h1})
    opt.step(params, {"w": g2, "b": h2})

    def adamw(p, grads, wd):
        m, v = 0, 0
        for t, g in enumerate(grads, start=1):
            p = p * (1 - 0.1 * wd)
            m = 0.9 * m + 0.1 * g
            v = 0.999 * v + 0.001 * g * g
            p = p - 0.1 * (m / (1 - 0.9 ** t)) / (np.sqrt(v / (1 - 0.999 ** t)) + 1e-8)
        return p

    np.testing.assert_allclose(params["w"], adamw(p0, (g1, g2), 0.5), rtol=1e-12)
    # the 1-D array is exempt from decay (decay_1d=False)
    np.testing.assert_allclose(params["b"], adamw(b0, (h1, h2), 0.0), rtol=1e-12)
    assert opt.t == 2 and set(opt.m) == {"w", "b"}


def test_adamw_state_dict_round_trip():
    """state_dict / load_state_dict keep t, m and v apart and exact: the restored optimizer's next
    step is the one the original takes."""
    rng = np.random.default_rng(3)
    params = {"w": rng.standard_normal((3, 2)), "b": rng.standard_normal(2)}
    opt = AdamW(lr=0.1, weight_decay=0.5)
    for _ in range(3):
        opt.step(params, {k: rng.standard_normal(a.shape) for k, a in params.items()})
    state = opt.state_dict()
    assert state["t"] == 3 and set(state["arrays"]) == {"m/w", "m/b", "v/w", "v/b"}
    again = AdamW(lr=0.1, weight_decay=0.5)
    again.load_state_dict(state)
    assert again.t == 3 and set(again.m) == set(again.v) == {"w", "b"}
    for k in params:
        assert np.array_equal(again.m[k], opt.m[k]) and np.array_equal(again.v[k], opt.v[k])
        assert not np.array_equal(opt.m[k], opt.v[k])
    copy = {k: a.copy() for k, a in params.items()}
    g = {k: rng.standard_normal(a.shape) for k, a in params.items()}
    opt.step(params, g)
    again.step(copy, g)
    for k in params:
        assert np.array_equal(copy[k], params[k])
