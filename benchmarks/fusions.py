"""The fusions proposed for the training step and the frozen prefix, each measured against what
npgpt runs (124M shapes, float32, medians of interleaved calls, caches flushed between calls).

    python benchmarks/fusions.py            # ~1 min
    python benchmarks/fusions.py --json fusions.json

  ln_1 + c_attn gradients   the first trainable block's ln_1 and c_attn gradients from one
                            product M = xhat^T dy (kept: `ops.layernorm_linear_param_grads`)
                            against the two-product chain (dW = h^T dy, dh = dy W^T, LayerNorm
                            backward): the pooled block's whole backward, 8 messages.
  weight gradient into AdamW  the four rank-8 weight gradients of the pooled block (c_attn's
                            query columns, attn c_proj, c_fc, mlp c_proj: 8 rows each) computed
                            inside the update (a prototype kernel here) against x^T dy, the
                            non-finite check and `kernels.adamw_update`.
  non-finite check          `kernels.all_finite` (kept) against `np.isfinite(g).all()` over 7.09M.
  bias adds                 the `y += b` of a prefix block's four linear layers against their
                            matmuls, 2048 rows: the most a bias folded into another kernel saves.
"""
from __future__ import annotations

import os
import time

from common import arg_parser, machine_info, print_info, set_threads, write_json

import numpy as np  # noqa: E402  (after common: npgpt.tune_runtime() first)
from numba import njit, prange  # noqa: E402

C, B = 768, 8


def parse_args(argv=None):
    p = arg_parser(__doc__, __file__)
    p.add_argument("--calls", type=int, default=100, help="interleaved calls per row")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--json", default=None)
    return p.parse_args(argv)


_FLUSH = None


def flush():
    """Stream 120 MB through the caches, as a training step's other work does between two calls."""
    global _FLUSH
    if _FLUSH is None:
        _FLUSH = np.ones(30_000_000, np.float32)
    _FLUSH += 1.0


def interleaved(fns, calls):
    """Median ms of each function, called in turns with the caches flushed before each call."""
    times = {k: [] for k in fns}
    for f in fns.values():
        f()
    for _ in range(calls):
        for k, f in fns.items():
            flush()
            t = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t)
    return {k: float(np.median(v) * 1e3) for k, v in times.items()}


@njit(parallel=True, fastmath={"reassoc", "contract", "arcp", "nsz", "afn"}, cache=False)
def _adamw_outer(p, m, v, X, DY, decay, c1, b2, c2, step_size, bias2_sqrt, eps):
    """AdamW on p [I,J] with the gradient X^T DY (X [K,I], DY [K,J]) formed row by row inside."""
    n_in, n_out = p.shape
    for i in prange(n_in):
        g = np.empty(n_out, dtype=p.dtype)
        xi = X[0, i]
        for j in range(n_out):
            g[j] = xi * DY[0, j]
        for k in range(1, X.shape[0]):
            xi = X[k, i]
            for j in range(n_out):
                g[j] += xi * DY[k, j]
        for j in range(n_out):
            gi = g[j]
            mi = m[i, j] + c1 * (gi - m[i, j])
            vi = v[i, j] * b2 + c2 * (gi * gi)
            m[i, j] = mi
            v[i, j] = vi
            p[i, j] = p[i, j] * decay - step_size * (mi / (np.sqrt(vi) / bias2_sqrt + eps))


def ln_attn_rows(calls):
    from npgpt import fastmodel as model, params as P
    from npgpt.config import preset
    cfg = preset("124M")
    rng = np.random.default_rng(0)
    p = {k: v for k, v in P.init_params(cfg, seed=0, num_classes=2).items() if k.startswith("h11/")}
    lens = rng.integers(10, 60, B)                        # SMS-like lengths: ~270 seen rows
    pos = lens - 1
    idx, _ = model.seen_rows(B, int(lens.max()), pos)
    x = rng.standard_normal((len(idx), C), dtype=np.float32)
    _, saved = model.block_forward_pooled(p, 11, x, pos, cfg.n_head, packed=True)
    dy = rng.standard_normal((B, C), dtype=np.float32)
    # need_dx=True runs the two-product chain (and adds only the residual scatter of 8 rows)
    r = interleaved({"one product (kept)": lambda: model.block_backward_pooled(dy, saved, 11, {}, need_dx=False),
                     "two products": lambda: model.block_backward_pooled(dy, saved, 11, {}, need_dx=True)}, calls)
    return {"rows": int(len(idx)), **r}


def adamw_rows(calls):
    from npgpt import kernels
    rng = np.random.default_rng(1)
    shapes = [(C, C), (C, C), (C, 4 * C), (4 * C, C)]
    P = [rng.standard_normal(s, dtype=np.float32) for s in shapes]
    M = [np.zeros(s, np.float32) for s in shapes]
    V = [np.zeros(s, np.float32) for s in shapes]
    X = [rng.standard_normal((B, s[0]), dtype=np.float32) for s in shapes]
    DY = [rng.standard_normal((B, s[1]), dtype=np.float32) for s in shapes]
    f32 = np.float32
    consts = (f32(1 - 5e-5 * 0.1), f32(0.1), f32(0.999), f32(0.001), f32(5e-5 / 0.19), f32(0.05), f32(1e-8))

    def separate():
        for p, m, v, x, dy in zip(P, M, V, X, DY):
            g = x.T @ dy
            assert kernels.all_finite(g)
            kernels.adamw_update(p, g, m, v, 2, 5e-5, 0.9, 0.999, 1e-8, 0.1)

    def fused():
        for p, m, v, x, dy in zip(P, M, V, X, DY):     # the factors' check stands for the gradient's
            assert kernels.all_finite(x) and kernels.all_finite(dy)
            _adamw_outer(p, m, v, x, dy, *consts)

    return interleaved({"x^T dy, check, AdamW (kept)": separate, "dW inside AdamW": fused}, calls)


def finite_rows(calls):
    from npgpt import kernels
    g = np.random.default_rng(2).standard_normal(7_090_000, dtype=np.float32)
    return interleaved({"kernels.all_finite (kept)": lambda: kernels.all_finite(g),
                        "np.isfinite(g).all()": lambda: bool(np.isfinite(g).all())}, calls)


def bias_rows(calls):
    rng = np.random.default_rng(3)
    fns = {}
    for cin, cout in ((C, 3 * C), (C, C), (C, 4 * C), (4 * C, C)):
        x = rng.standard_normal((2048, cin), dtype=np.float32)
        w = rng.standard_normal((cin, cout), dtype=np.float32)
        b = rng.standard_normal(cout, dtype=np.float32)
        y = np.empty((2048, cout), np.float32)
        fns[f"matmul {cin}x{cout}"] = lambda x=x, w=w, y=y: np.matmul(x, w, out=y)
        fns[f"bias add {cout}"] = lambda y=y, b=b: y.__iadd__(b)
    r = interleaved(fns, max(10, calls // 4))
    mm = sum(v for k, v in r.items() if k.startswith("matmul"))
    ba = sum(v for k, v in r.items() if k.startswith("bias"))
    return {"matmuls": mm, "bias adds": ba, "bias share": ba / mm}


def main(argv=None):
    args = parse_args(argv)
    set_threads(args.threads)
    info = machine_info()
    print_info(info)
    out = {"machine": info}
    for name, fn in (("ln_1 + c_attn gradients", ln_attn_rows), ("weight gradient into AdamW", adamw_rows),
                     ("non-finite check", finite_rows), ("bias adds", bias_rows)):
        r = fn(args.calls)
        out[name] = r
        print(f"\n{name}:")
        for k, v in r.items():
            print(f"  {k:32s} " + (f"{v:9d}" if isinstance(v, int) else f"{v:9.3f}" + ("" if "share" in k else " ms")))
    write_json(args.json, out)


if __name__ == "__main__":
    main()
