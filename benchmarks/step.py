"""npgpt against PyTorch on one training step and one evaluation forward, side by side.

    python benchmarks/step.py                       # 124M, batches 8x120 and 8x40, kernels too
    python benchmarks/step.py --repeats 5 --shapes 8x120 --json out.json

Both sides hold the same 124M weights (npgpt's random init, copied into the PyTorch model of
benchmarks/torch_gpt2.py), run in float32 on the same number of threads, on identical batches.
PyTorch runs in a worker process of its own, started with this process's environment as it was
at launch (npgpt sets OMP_WAIT_POLICY=PASSIVE for itself when imported; PyTorch keeps its
default). The two sides take turns, after warm-up calls. Before each turn the benchmark sleeps
--settle seconds, so that the thread pools of whatever ran before stop polling for work (OpenBLAS's
threads poll for up to ~0.1 s after a matmul, PyTorch's OpenMP threads for some milliseconds: on 2
cores they would slow the next call, which a library running alone never sees); then the turn
runs the same call --inner times in a row, the first call is not counted (it wakes the threads
and the caches), and the turn's time is the median of the others. Each row gives the median and
min-max over --repeats turns of the same run.

  train step, dense    loss and gradients of the last block, ln_f and the head (everything else
                       frozen), then one AdamW step; every position of every block is computed,
                       pooling at the last position (the reference's setting).
                       npgpt: fastmodel.loss_and_grads(trainable=1, pooling="last_position", dense=True)
                       + optim.AdamW.step.  PyTorch: forward, cross-entropy, backward (autograd
                       stops at the first trainable block), torch.optim.AdamW.step.
  eval forward, dense  class logits of the batch. npgpt: fastmodel.forward_cls(dense=True);
                       PyTorch: the module under torch.inference_mode().
  ... npgpt default    the same numbers computed npgpt's default way: blocks 0..10 are frozen, so
                       their output is computed once per example before training (forward_prefix,
                       not timed here), and the last block runs only where the head reads
                       (dense=False). The ratio is against PyTorch's dense row.

Then the kernels (LayerNorm, attention, GELU, forward and backward; the AdamW update of the 7.09M
trainable parameters): Numba, its NumPy twin, and the PyTorch operation, at 1 thread and at
--threads. The row "block matmuls" is the four linear-layer matmuls of one block (no Numba there:
both npgpt columns are NumPy's matmul, i.e. OpenBLAS, against PyTorch's BLAS): most of a dense
step's time, and the floor of what npgpt's dense path can reach against PyTorch. Ratios are npgpt/PyTorch: below 1, npgpt is faster.
"""
from __future__ import annotations

import os

ENV_AT_LAUNCH = dict(os.environ)   # before npgpt is imported: the PyTorch worker gets this environment

import argparse  # noqa: E402
import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

from common import arg_parser, fmt_ms, interleaved, machine_info, print_info, summary, write_json  # noqa: E402

KERNELS = ("layernorm fwd", "layernorm bwd", "attention fwd", "attention bwd", "gelu fwd", "gelu bwd", "block matmuls")


def parse_args(argv=None):
    p = arg_parser(__doc__, __file__)
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="threads for both sides (default: all cores)")
    p.add_argument("--repeats", type=int, default=7, help="turns per variant (after a warm-up turn)")
    p.add_argument("--inner", type=int, default=3, help="calls per turn; the first is not counted")
    p.add_argument("--settle", type=float, default=0.2, help="seconds of sleep before each turn")
    p.add_argument("--shapes", default="8x120,8x40", help="batch shapes BxT, comma-separated")
    p.add_argument("--torch-attention", default="sdpa", choices=["sdpa", "manual"],
                   help="PyTorch attention: the fused scaled_dot_product_attention, or written out")
    p.add_argument("--no-kernels", action="store_true", help="skip the per-kernel table")
    p.add_argument("--no-default-path", action="store_true", help="skip the npgpt default-path rows")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    p.add_argument("--torch-worker", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.threads < 1 or a.repeats < 1 or a.inner < 2:
        p.error("--threads and --repeats must be at least 1, --inner at least 2")
    try:
        a.shapes = [tuple(int(v) for v in s.lower().split("x")) for s in a.shapes.split(",")]
        assert all(len(s) == 2 and min(s) >= 1 for s in a.shapes)
    except (ValueError, AssertionError):
        p.error("--shapes must look like 8x120,8x40")
    return a


# ----------------------------------------------------------------------------- the same inputs on both sides

def model_inputs(B, T, vocab_size):
    import numpy as np
    r = np.random.default_rng(B * 1000 + T)
    return r.integers(0, vocab_size - 1, (B, T)), r.integers(0, 2, B)


def kernel_inputs(B, T, C=768, H=12):
    """Arrays for the kernel rows of one batch shape (the same in both processes)."""
    import numpy as np
    r = np.random.default_rng(B * 1000 + T + 1)
    f32 = np.float32
    N = B * T
    return {"x": r.standard_normal((N, C), dtype=f32), "g": 1 + 0.1 * r.standard_normal(C, dtype=f32),
            "b": 0.1 * r.standard_normal(C, dtype=f32), "dy": r.standard_normal((N, C), dtype=f32),
            "qkv": r.standard_normal((B, T, 3 * C), dtype=f32), "dout": r.standard_normal((B, T, C), dtype=f32),
            "f": 2 * r.standard_normal((N, 4 * C), dtype=f32), "df": r.standard_normal((N, 4 * C), dtype=f32),
            "w": [0.02 * r.standard_normal(s, dtype=f32) for s in ((C, 3 * C), (C, C), (C, 4 * C), (4 * C, C))],
            "H": H}


def block_matmuls(a, matmul):
    """The four matmuls of a block's linear layers (c_attn, attn c_proj, c_fc, mlp c_proj) on
    N rows: the GEMM work both sides hand to their BLAS (NumPy: OpenBLAS; PyTorch: its own)."""
    w1, w2, w3, w4 = a["w"]
    x, f = a["x"], a["f"]
    return matmul(x, w1), matmul(x, w2), matmul(x, w3), matmul(f, w4)


def adamw_inputs():
    """Parameters and gradients of the reference's trainable set: last block, ln_f, 2-class head."""
    import numpy as np

    from npgpt import config, params
    from npgpt.model import trainable_names
    cfg = config.preset("124M")
    shapes = params.param_shapes(cfg, 2)
    r = np.random.default_rng(99)
    return {n: (r.standard_normal(shapes[n], dtype=np.float32), r.standard_normal(shapes[n], dtype=np.float32))
            for n in trainable_names(cfg, 1)}


# ----------------------------------------------------------------------------- npgpt's side

def npgpt_cases(args):
    """{key: callable} for npgpt, and the logits it computes per shape (for the check)."""
    import numpy as np

    from npgpt import config, fastops, ops, optim, params
    from npgpt import fastmodel as model
    from npgpt import kernels as K

    cfg = config.preset("124M")
    p = params.init_params(cfg, seed=0, num_classes=2)
    opt = optim.AdamW(lr=5e-5, weight_decay=0.1, update=fastops.adamw_update)      # as training runs it
    numpy_twins = {                # each kernel's NumPy statement, in the kernel's call form
        "layernorm_forward": lambda x, g, b: (lambda y, s: (y, s.mean, s.rstd))(*ops.layernorm_forward(x, g, b)),
        "layernorm_backward": lambda dy, x, m, r, g: ops.layernorm_backward(dy, ops.LayerNormSaved(x, m, r, g)),
        "gelu_forward": lambda x: ops.gelu_forward(x)[0], "gelu_backward": ops.gelu_backward,
        "attention_forward": lambda qkv, H: (lambda o, s: (o, s.att))(*ops.attention_forward(qkv, H)),
        "attention_backward": lambda do, qkv, att, H: ops.attention_backward(do, ops.AttentionSaved(qkv, att, H, True))}
    first = cfg.n_layer - 1
    cases, logits = {}, {}
    for B, T in args.shapes:
        ids, labels = model_inputs(B, T, cfg.vocab_size)
        x_start = model.forward_prefix(p, cfg, ids, first)                                  # [B,T,C]
        lengths = np.full(B, T)
        kw = dict(pooling="last_position")
        logits[(B, T)] = (model.forward_cls(p, cfg, ids, dense=True, **kw),
                          model.forward_cls(p, cfg, x_start=x_start, start=first, lengths=lengths, **kw))

        def step(ids=ids, labels=labels):
            _, grads, _ = model.loss_and_grads(p, cfg, ids, labels, trainable=1, dense=True, **kw)
            opt.step(p, grads)

        def step_default(x_start=x_start, labels=labels, lengths=lengths):
            _, grads, _ = model.loss_and_grads(p, cfg, None, labels, trainable=1, x_start=x_start,
                                               lengths=lengths, **kw)
            opt.step(p, grads)

        cases[f"step {B}x{T}"] = step
        cases[f"eval {B}x{T}"] = lambda ids=ids: model.forward_cls(p, cfg, ids, dense=True, **kw)
        cases[f"step_default {B}x{T}"] = step_default
        cases[f"eval_default {B}x{T}"] = lambda x=x_start, n=lengths: model.forward_cls(
            p, cfg, x_start=x, start=first, lengths=n, **kw)

        a = kernel_inputs(B, T)
        H = a["H"]
        _, mean, rstd = numpy_twins["layernorm_forward"](a["x"], a["g"], a["b"])
        _, att = numpy_twins["attention_forward"](a["qkv"], H)
        for impl in ("numba", "np"):
            f = {n: (getattr(K, n) if impl == "numba" else numpy_twins[n])
                 for n in ("layernorm_forward", "layernorm_backward", "gelu_forward",
                           "gelu_backward", "attention_forward", "attention_backward")}
            cases[f"{impl} layernorm fwd {B}x{T}"] = lambda f=f, a=a: f["layernorm_forward"](a["x"], a["g"], a["b"])
            cases[f"{impl} layernorm bwd {B}x{T}"] = lambda f=f, a=a, m=mean, s=rstd: f["layernorm_backward"](
                a["dy"], a["x"], m, s, a["g"])
            cases[f"{impl} attention fwd {B}x{T}"] = lambda f=f, a=a: f["attention_forward"](a["qkv"], a["H"])
            cases[f"{impl} attention bwd {B}x{T}"] = lambda f=f, a=a, att=att: f["attention_backward"](
                a["dout"], a["qkv"], att, a["H"])
            cases[f"{impl} gelu fwd {B}x{T}"] = lambda f=f, a=a: f["gelu_forward"](a["f"])
            cases[f"{impl} gelu bwd {B}x{T}"] = lambda f=f, a=a: f["gelu_backward"](a["df"], a["f"])
            cases[f"{impl} block matmuls {B}x{T}"] = lambda a=a: block_matmuls(a, np.matmul)
    state = {impl: {n: (pg[0].copy(), pg[1], np.zeros_like(pg[0]), np.zeros_like(pg[0]))
                    for n, pg in adamw_inputs().items()} for impl in ("numba", "np")}
    for impl in ("numba", "np"):
        fn = K.adamw_update if impl == "numba" else optim.adamw_update
        cases[f"{impl} adamw"] = lambda fn=fn, s=state[impl]: [fn(*a, 3, 5e-5, 0.9, 0.999, 1e-8, 0.1)
                                                              for a in s.values()]
    return cases, logits


# ----------------------------------------------------------------------------- PyTorch's side (worker process)

def torch_cases(args):
    import numpy as np
    import torch
    import torch.nn.functional as F

    from npgpt import config, params
    from torch_gpt2 import from_npgpt

    cfg = config.preset("124M")
    m = from_npgpt(params.init_params(cfg, seed=0, num_classes=2), cfg, attention=args.torch_attention)
    opt = torch.optim.AdamW(m.train_only_last(1), lr=5e-5, weight_decay=0.1)
    cases, logits = {}, {}
    for B, T in args.shapes:
        ids, labels = (torch.as_tensor(a) for a in model_inputs(B, T, cfg.vocab_size))
        with torch.inference_mode():
            logits[(B, T)] = m(ids).numpy()

        def step(ids=ids, labels=labels):
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(m(ids), labels).backward()
            opt.step()

        def evaluate(ids=ids):
            with torch.inference_mode():
                m(ids)

        cases[f"step {B}x{T}"], cases[f"eval {B}x{T}"] = step, evaluate
        a = {k: torch.tensor(v, requires_grad=k in ("x", "g", "b", "qkv", "f")) if k not in ("H", "w") else v
             for k, v in kernel_inputs(B, T).items()}
        a["w"] = [torch.tensor(w) for w in a["w"]]
        C, H = a["x"].shape[1], a["H"]
        y = F.layer_norm(a["x"], (C,), a["g"], a["b"], 1e-5)
        o = _attention(a["qkv"], H, args.torch_attention)
        gl = F.gelu(a["f"], approximate="tanh")
        cases[f"torch layernorm fwd {B}x{T}"] = lambda a=a, C=C: _inference(F.layer_norm, a["x"], (C,), a["g"], a["b"], 1e-5)
        cases[f"torch layernorm bwd {B}x{T}"] = lambda y=y, a=a: torch.autograd.grad(
            y, (a["x"], a["g"], a["b"]), a["dy"], retain_graph=True)
        cases[f"torch attention fwd {B}x{T}"] = lambda a=a, H=H: _inference(_attention, a["qkv"], H, args.torch_attention)
        cases[f"torch attention bwd {B}x{T}"] = lambda o=o, a=a: torch.autograd.grad(o, a["qkv"], a["dout"], retain_graph=True)
        cases[f"torch gelu fwd {B}x{T}"] = lambda a=a: _inference(F.gelu, a["f"], approximate="tanh")
        cases[f"torch gelu bwd {B}x{T}"] = lambda gl=gl, a=a: torch.autograd.grad(gl, a["f"], a["df"], retain_graph=True)
        cases[f"torch block matmuls {B}x{T}"] = lambda a=a: _inference(block_matmuls, a, torch.matmul)
    tparams = []
    for w, g in adamw_inputs().values():
        t = torch.tensor(w, requires_grad=True)
        t.grad = torch.as_tensor(g)
        tparams.append(t)
    topt = torch.optim.AdamW(tparams, lr=5e-5, weight_decay=0.1)
    cases["torch adamw"] = topt.step
    return cases, logits


def _inference(fn, *a, **k):
    import torch
    with torch.inference_mode():
        return fn(*a, **k)


def _attention(qkv, H, how):
    """PyTorch's attention core on qkv [B,T,3C] -> [B,T,C], as in torch_gpt2."""
    import torch
    import torch.nn.functional as F
    B, T, C3 = qkv.shape
    C = C3 // 3
    q, k, v = (a.view(B, T, H, C // H).transpose(1, 2) for a in qkv.split(C, dim=-1))
    if how == "sdpa":
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    else:
        s = (q @ k.transpose(-2, -1)) * (C // H) ** -0.5
        y = torch.softmax(s.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf")), -1) @ v
    return y.transpose(1, 2).reshape(B, T, C)


def worker(args):
    """Serve timing requests on stdin: `threads N`, `time KEY`, `logits`, `info`."""
    import torch
    torch.set_num_threads(args.threads)
    cases, logits = torch_cases(args)
    for line in sys.stdin:
        cmd, _, arg = line.strip().partition(" ")
        if cmd == "threads":
            torch.set_num_threads(int(arg))
            reply = torch.get_num_threads()
        elif cmd == "time":
            key, _, inner = arg.rpartition(" ")
            reply = timed(cases[key], int(inner))()
        elif cmd == "logits":
            reply = {f"{b}x{t}": v.tolist() for (b, t), v in logits.items()}
        elif cmd == "info":
            reply = {"torch": torch.__version__, "torch_threads": torch.get_num_threads(),
                     "torch_blas": "MKL" if torch.backends.mkl.is_available() else "other",
                     "omp_wait_policy": ENV_AT_LAUNCH.get("OMP_WAIT_POLICY", "(unset)")}
        else:
            break
        print(json.dumps(reply), flush=True)
    return 0


class TorchWorker:
    def __init__(self, args, argv):
        cmd = [sys.executable, os.path.abspath(__file__), "--torch-worker", *argv]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=ENV_AT_LAUNCH)

    def ask(self, line):
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        reply = self.proc.stdout.readline()
        if not reply:
            raise SystemExit("the PyTorch worker process ended early")
        return json.loads(reply)

    def close(self):
        self.proc.stdin.write("quit\n")
        self.proc.stdin.close()
        self.proc.wait()


# ----------------------------------------------------------------------------- timing in turns

def in_turns(variants, repeats, settle, warmup=1):
    """variants: {name: () -> seconds}; each called repeats times, in turns, after warm-up turns;
    `settle` seconds of sleep before each turn."""
    times = interleaved(variants, repeats, warmup, settle=settle, self_timed=True)
    return {k: summary(v) for k, v in times.items()}


def timed(fn, inner):
    """A turn: fn called `inner` times in a row -> the median time of all calls but the first."""
    def turn():
        ts = []
        for _ in range(inner):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
        return float(sorted(ts[1:])[(len(ts) - 2) // 2]) if len(ts) > 2 else ts[1]
    return turn


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args.torch_worker:
        return worker(args)
    import npgpt  # first, as in `python -m npgpt.train`: it sets up the thread runtimes
    npgpt.tune_runtime()
    import numpy as np

    from npgpt.fastops import set_num_threads

    command = "python benchmarks/step.py " + " ".join(argv)
    print(command, flush=True)
    set_num_threads(args.threads)
    tw = TorchWorker(args, argv)
    try:
        ncases, nlogits = npgpt_cases(args)
        tlogits = tw.ask("logits")
        info = machine_info()
        info.update(tw.ask("info"))
        print_info(info)
        print(f"PyTorch worker: OMP_WAIT_POLICY {info['omp_wait_policy']}, {info['torch_threads']} threads")
        rows, krows = [], []
        for B, T in args.shapes:
            s = f"{B}x{T}"
            dense, default = nlogits[(B, T)]
            diff = float(max(np.abs(np.array(tlogits[s]) - dense).max(), np.abs(default - dense).max()))
            keys = ["step", "eval"] + ([] if args.no_default_path else ["step_default", "eval_default"])
            variants = {}
            for k in keys:
                variants[f"npgpt {k}"] = timed(ncases[f"{k} {s}"], args.inner)
                if not k.endswith("default"):
                    variants[f"torch {k}"] = lambda k=k: tw.ask(f"time {k} {s} {args.inner}")
            ts = in_turns(variants, args.repeats, args.settle)
            for k, label in (("step", "train step, dense"), ("eval", "eval forward, dense"),
                             ("step_default", "train step, npgpt default"), ("eval_default", "eval forward, npgpt default")):
                if f"npgpt {k}" in ts:
                    tk = ts[f"torch {k.replace('_default', '')}"]
                    rows.append({"row": label, "shape": s, "npgpt_s": ts[f"npgpt {k}"], "torch_s": tk,
                                 "ratio": ts[f"npgpt {k}"]["median"] / tk["median"], "max_abs_logit_diff": diff})
            print(f"{s}: logits of npgpt dense, npgpt default and PyTorch agree to {diff:.1e}", flush=True)
        print(f"\n{'row':30s} {'shape':>6s}  {'npgpt ms (min-max)':>26s}  {'PyTorch ms (min-max)':>26s}  npgpt/PyTorch")
        for r in rows:
            print(f"{r['row']:30s} {r['shape']:>6s}  {fmt_ms(r['npgpt_s']):>26s}  {fmt_ms(r['torch_s']):>26s}  {r['ratio']:6.2f}")

        if not args.no_kernels:
            for threads in sorted({1, args.threads}):
                set_num_threads(threads)
                tw.ask(f"threads {threads}")
                names = [(k, f"{k} {B}x{T}", f"{B}x{T}") for B, T in args.shapes for k in KERNELS] + [("adamw", "adamw", "7.09M")]
                for name, key, shape in names:
                    inner = max(args.inner, 10)
                    variants = {"numba": timed(ncases[f"numba {key}"], inner), "numpy": timed(ncases[f"np {key}"], inner),
                                "torch": lambda key=key: tw.ask(f"time torch {key} {inner}")}
                    ts = in_turns(variants, args.repeats, args.settle)
                    krows.append({"kernel": name, "shape": shape, "threads": threads, **{f"{k}_s": v for k, v in ts.items()},
                                  "ratio": ts["numba"]["median"] / ts["torch"]["median"]})
            set_num_threads(args.threads)
            print(f"\n{'kernel':14s} {'shape':>7s} {'thr':>3s}  {'Numba ms (min-max)':>24s}  {'NumPy twin ms':>24s}"
                  f"  {'PyTorch ms (min-max)':>24s}  Numba/PyTorch")
            for r in krows:
                print(f"{r['kernel']:14s} {r['shape']:>7s} {r['threads']:3d}  {fmt_ms(r['numba_s']):>24s}"
                      f"  {fmt_ms(r['numpy_s']):>24s}  {fmt_ms(r['torch_s']):>24s}  {r['ratio']:6.2f}")
    finally:
        tw.close()
    print(f"\nload average after the run: {machine_info()['load_avg_1_5_15']}")
    if args.json:
        write_json(args.json, {"command": command, "info": info, "rows": rows, "kernels": krows,
                               "args": {k: v for k, v in vars(args).items() if k not in ("shapes", "torch_worker")},
                               "shapes": [f"{b}x{t}" for b, t in args.shapes]})
    return 0


if __name__ == "__main__":
    sys.exit(main())
