"""Check one backward by finite differences, from scratch: LayerNorm by default.

    python examples/gradcheck_one_op.py                  # layer norm
    python examples/gradcheck_one_op.py --op gelu        # or: linear, attention, cross_entropy

The trick that makes one finite-difference loop check any backward: give the forward output y a
random upstream gradient G and look at the scalar f = sum(G * y). Its derivative with respect to
an input is exactly what the backward returns when handed dout = G. So nudge each input element
by +-h, recompute f, and compare (f(x+h) - f(x-h)) / 2h with the backward's answer.

Everything is float64: with h = 1e-6 the central difference is accurate to about 1e-9 relative,
so a correct backward shows a relative error far below 1e-6 and a wrong one shows 1e-2 or more.

By default npgpt's kernels run as their NumPy twins (NPGPT_NUMBA=0: nothing to compile, under a
second); `NPGPT_NUMBA=1 python examples/gradcheck_one_op.py` checks the Numba kernels instead
(compiled on the first run, cached on disk after that).
"""
import argparse
import os
import sys

os.environ.setdefault("NPGPT_NUMBA", "0")          # before npgpt is imported
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import numpy as np  # noqa: E402

from npgpt import ops  # noqa: E402


def numerical_grad(f, x, h=1e-6):
    """d f() / d x by central differences, one element at a time (x is changed and restored)."""
    grad = np.zeros_like(x)
    flat, gflat = x.reshape(-1), grad.reshape(-1)   # views: writing flat[j] changes x
    for j in range(flat.size):
        old = flat[j]
        flat[j] = old + h
        f_plus = f()
        flat[j] = old - h
        f_minus = f()
        flat[j] = old
        gflat[j] = (f_plus - f_minus) / (2 * h)
    return grad


def rel_error(a, b):
    """max|a - b| / max(max|a|, max|b|): one scale-free number per array."""
    return float(np.abs(a - b).max() / max(np.abs(a).max(), np.abs(b).max()))


def case(op, rng):
    """-> (inputs {name: array}, f() = sum(G * forward(inputs)), {name: the backward's gradient})"""
    if op == "layernorm":
        x, g, b = rng.standard_normal((4, 8)), 1 + 0.1 * rng.standard_normal(8), 0.1 * rng.standard_normal(8)
        G = rng.standard_normal((4, 8))
        y, saved = ops.layernorm_forward(x, g, b)
        dx, dg, db = ops.layernorm_backward(G, saved)
        return dict(x=x, g=g, b=b), lambda: (G * ops.layernorm_forward(x, g, b)[0]).sum(), dict(x=dx, g=dg, b=db)
    if op == "gelu":
        x, G = 2 * rng.standard_normal((4, 8)), rng.standard_normal((4, 8))
        y, saved = ops.gelu_forward(x)
        return dict(x=x), lambda: (G * ops.gelu_forward(x)[0]).sum(), dict(x=ops.gelu_backward(G, saved))
    if op == "linear":
        x, w, b = rng.standard_normal((2, 3, 4)), rng.standard_normal((4, 5)), rng.standard_normal(5)
        G = rng.standard_normal((2, 3, 5))
        y, saved = ops.linear_forward(x, w, b)
        dx, dw, db = ops.linear_backward(G, saved)
        return dict(x=x, w=w, b=b), lambda: (G * ops.linear_forward(x, w, b)[0]).sum(), dict(x=dx, w=dw, b=db)
    if op == "attention":
        qkv, G = rng.standard_normal((2, 5, 3 * 6)), rng.standard_normal((2, 5, 6))     # 2 heads of 3
        out, saved = ops.attention_forward(qkv, 2)
        return dict(qkv=qkv), lambda: (G * ops.attention_forward(qkv, 2)[0]).sum(), \
            dict(qkv=ops.attention_backward(G, saved))
    if op == "cross_entropy":                        # a scalar loss: f is the loss itself
        logits, targets = 3 * rng.standard_normal((5, 3)), np.array([0, 2, 1, 1, 0])
        loss, saved = ops.cross_entropy_forward(logits, targets)
        return dict(logits=logits), lambda: ops.cross_entropy_forward(logits, targets)[0], \
            dict(logits=ops.cross_entropy_backward(1.0, saved))
    raise ValueError(op)


def main(argv=None):
    p = argparse.ArgumentParser(description="Check one npgpt backward by finite differences.")
    p.add_argument("--op", default="layernorm", choices=["layernorm", "gelu", "linear", "attention", "cross_entropy"],
                   help="the operation to check (default: layernorm)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random inputs and upstream gradient")
    a = p.parse_args(argv)
    inputs, f, analytic = case(a.op, np.random.default_rng(a.seed))
    worst = 0.0
    for name, x in inputs.items():
        err = rel_error(analytic[name], numerical_grad(f, x))
        worst = max(worst, err)
        print(f"{a.op}: d/d{name:<6s} {str(x.shape):10s} relative error {err:.2e}")
    ok = worst < 1e-6
    print(f"{'OK' if ok else 'FAILED'}: worst relative error {worst:.2e} (a correct backward in float64 is below 1e-6)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
