"""The whole fine-tuning job, end to end: npgpt's default against the reference procedure in PyTorch.

    python benchmarks/finetune.py                          # 5 epochs each (PyTorch: ~10-20 min)
    python benchmarks/finetune.py --torch-epochs 1         # quick look: PyTorch's 5 epochs scaled
    python benchmarks/finetune.py --side npgpt --epochs 1 --json out.json
    python benchmarks/finetune.py --side npgpt --sweep     # + 5 runs sharing the disk prefix cache

Both sides train GPT-2 124M-shaped random weights (same shapes, same work as OpenAI's weights)
on the real SMS data, the last block + final LayerNorm + a 2-class head trainable, AdamW, batch 8,
an evaluation every 50 steps, accuracies after each epoch and at the end. Each side runs in its
own process, on the same number of threads; its wall time (launch to exit) and peak resident
memory (the child's own getrusage maximum) are measured from outside.

  npgpt     `python -m npgpt.train --weights ...` as a user runs it (the weights: 124M-shaped
            random ones, written to an HDF5 file before the runs): last-real-token pooling,
            the frozen blocks 0..10 computed once per distinct message at its true length (many
            messages packed into each matmul, the first tokens that messages share once), the last block only where the head reads (keys
            and values at the real tokens, the rest at the last one).
  PyTorch   benchmarks/torch_finetune.py: the reference's procedure (every message padded to 120
            tokens, the logits at the last position, all 12 blocks every step and every evaluation).

npgpt runs before and after PyTorch (--npgpt-runs, default 2); the later runs find Numba's
compiled kernels in the on-disk cache, and their start-up time (launch to the line that opens the
training) is reported. Each of these runs is cold: it gets an empty prefix cache folder of its own
(it computes the frozen prefix and writes it there, as a user's first run does).

--sweep: five more npgpt runs, one after another, sharing one prefix cache folder, as a user tuning
a model runs them: trainable blocks 2 then 1, lr 5e-5 and 1e-4, and the reference's last-position
pooling. The first computes blocks 0..9 and caches them; the second reads them; the third computes
block 10 from them and caches depth 11; the fourth reads that; the fifth (last-position pooling:
every message padded to 120, so other token ids) computes its own prefix. Their total is compared
with one cold run.

Work and lower bound: the matmul FLOPs of the linear layers each side must do (npgpt: blocks 0..10
once over the rows of the distinct messages of train, validation and test at true length that its
packs compute (a first token shared with the message before it in the pack: once),
then per step and per evaluation the last block's rows; PyTorch: all 12 blocks over 8 x 120 tokens per step and per
evaluation batch, plus the last block's backward), divided by a GEMM peak measured here with
NumPy at the same thread count (the best of the model's linear-layer shapes at 4096 rows).
"""
from __future__ import annotations

import os

ENV_AT_LAUNCH = dict(os.environ)   # before npgpt is imported: both sides start from this environment

import argparse  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

from common import (REPO, arg_parser, default_data_dir, gemm_peak, machine_info, print_info,  # noqa: E402
                    set_threads, write_json)

C = 768            # 124M: channels
L = 12             # blocks
LIN = 24 * C * C   # linear-layer FLOPs of one block per token: 2 x (3C^2 + C^2 + 4C^2 + 4C^2)


def parse_args(argv=None):
    p = arg_parser(__doc__, __file__)
    p.add_argument("--epochs", type=int, default=5, help="epochs for npgpt (and PyTorch, unless --torch-epochs)")
    p.add_argument("--torch-epochs", type=int, default=None,
                   help="epochs for PyTorch; its time is then scaled to --epochs part by part (and marked so)")
    p.add_argument("--side", default="both", choices=["both", "npgpt", "torch"])
    p.add_argument("--npgpt-runs", type=int, default=2, help="npgpt runs, split before and after PyTorch")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="threads for both sides")
    p.add_argument("--torch-attention", default="sdpa", choices=["sdpa", "manual"])
    p.add_argument("--data", default=None, help="SMSSpamCollection (default: $NPGPT_SHARED_DATA/sms_spam_collection)")
    p.add_argument("--bpe-dir", default=None, help="GPT-2 BPE files (default: $NPGPT_SHARED_DATA/gpt2_bpe)")
    p.add_argument("--work-dir", default=None, help="where runs and split CSVs go (default: a temporary folder)")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    p.add_argument("--sweep", action="store_true", help="also run the 5-run sweep with a shared disk cache")
    a = p.parse_args(argv)
    shared = default_data_dir()
    a.data = a.data or str(shared / "sms_spam_collection" / "SMSSpamCollection")
    a.bpe_dir = a.bpe_dir or str(shared / "gpt2_bpe")
    if a.torch_epochs is None:
        a.torch_epochs = a.epochs
    if min(a.epochs, a.torch_epochs, a.threads, a.npgpt_runs) < 1:
        p.error("--epochs, --torch-epochs, --threads and --npgpt-runs must be at least 1")
    for path in (a.data, a.bpe_dir):
        if not os.path.exists(path):
            p.error(f"{path} not found (set NPGPT_SHARED_DATA or pass --data / --bpe-dir)")
    return a


# ----------------------------------------------------------------------------- the work each side does

def count_work(args, work_dir):
    """Linear-layer matmul FLOPs of npgpt's default run and of the reference procedure."""
    import numpy as np

    from npgpt.data import prepare_splits
    from npgpt.dataset import eval_batches, make_datasets, train_batches
    from npgpt.finetune import final_batches
    from npgpt.runconfig import RunConfig
    from npgpt.tokenizer import get_tokenizer

    splits = prepare_splits(args.data, os.path.join(work_dir, "data-count"), progress=False)
    train, val, test = make_datasets(splits, get_tokenizer(args.bpe_dir), "longest")
    B, pad = 8, train.pad_to

    def last_block(rows, lengths, backward):
        """The pooled last block: keys and values (2 of c_attn's 3 parts) at each message's real
        tokens, the query, c_proj and the MLP at one row per message (10 C^2 per message).
        Backward: c_proj and the MLP a dW and a dX product each (2 x 9 C^2 per message); c_attn,
        whose input (the frozen prefix) needs no gradient, one product for ln_1's and its own
        gradients (`fastops.layernorm_linear_param_grads`): as many FLOPs as its forward."""
        kv = 2 * int(lengths[rows].sum()) * C * 2 * C
        per_message = 2 * len(rows) * C * C
        return 2 * kv + (10 + 1 + 18) * per_message if backward else kv + 10 * per_message

    def prefix_rows(datasets, max_tokens=2048):
        """Rows the frozen prefix computes: the distinct messages of all splits (a repeated message
        once), in the packs `npgpt.prefix_cache` makes, the first tokens a message shares with the
        one before it in its pack once (`npgpt.prefix_tree`)."""
        from npgpt import prefix_tree
        seqs = list({tuple(t[:n]): np.array(t[:n]) for d in datasets for t, n in zip(d.tokens, d.lengths)}.values())
        return sum(len(lay.ids) for _, lay in prefix_tree.packed_layouts(seqs, max_tokens))

    npg = {"prefix": prefix_rows((train, val, test)) * (L - 1) * LIN,
           "steps": 0, "evals": 0}
    ref = {"steps": 0, "evals": 0}
    step, eval_rows = -1, []
    first5 = [(train, b) for b in eval_batches(len(train), B)[:5]] + [(val, b) for b in eval_batches(len(val), B)[:5]]
    for epoch in range(args.epochs):
        for rows in train_batches(len(train), B, 123, epoch):
            step += 1
            npg["steps"] += last_block(rows, train.lengths, True)
            ref["steps"] += (L + 2) * LIN * len(rows) * pad       # 12 blocks forward, the last one backward
            if step % 50 == 0:
                eval_rows += first5
        eval_rows += first5                                          # accuracies after the epoch
    for d in (train, val, test):
        eval_rows += [(d, b) for b in final_batches(d, RunConfig(batch_size=B))]
    for d, rows in eval_rows:
        npg["evals"] += last_block(rows, d.lengths, False)
    # the reference's evaluations: the same counts of batches, each 8 (or fewer) x 120 tokens, 12 blocks;
    # its final training-set pass is over 130 batches of 8 (drop_last), npgpt's over all 1045 rows
    n_periodic = (step // 50 + 1) * 10 + args.epochs * 10
    ref["evals"] = n_periodic * B * pad * L * LIN
    ref["evals"] += (len(train) // B * B + len(val) + len(test)) * pad * L * LIN
    npg["total"] = sum(npg.values())
    ref["total"] = ref["steps"] + ref["evals"]
    return {"npgpt": npg, "torch": ref, "tokens": {n: int(d.lengths.sum()) for n, d in
                                                    (("train", train), ("validation", val), ("test", test))},
            "steps": step + 1, "pad_to": pad}


# ----------------------------------------------------------------------------- running a side

def run_child(cmd, log_prefix=""):
    """Run cmd in the environment this script was launched with (not the one npgpt's import set
    up here), echo its output with time stamps; -> wall s, peak RSS MiB, exit code, [(t, line)]."""
    t0 = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=ENV_AT_LAUNCH, cwd=str(REPO))
    lines = []
    for line in proc.stdout:
        t = time.time() - t0
        lines.append((t, line.rstrip("\n")))
        print(f"  {log_prefix}[{t:7.1f} s] {line.rstrip()}", flush=True)
    _, status, rusage = os.wait4(proc.pid, 0)
    wall = time.time() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    return {"wall_s": wall, "peak_rss_mib": rusage.ru_maxrss / 1024, "exit": proc.returncode,
            "user_s": rusage.ru_utime, "sys_s": rusage.ru_stime}, lines


SWEEP = [("2", "5e-5", "last-token"), ("2", "1e-4", "last-token"), ("1", "5e-5", "last-token"),
         ("1", "1e-4", "last-token"), ("1", "5e-5", "last-position")]


def weights_file(work_dir):
    """124M-shaped random weights in npgpt's HDF5 format, written once before any run: each npgpt
    run reads them as a user's run reads the converted GPT-2 weights (`--weights`)."""
    path = os.path.join(work_dir, "gpt2-124M-random.h5")
    if not os.path.exists(path):
        from npgpt.config import preset
        from npgpt.params import init_params, save_params
        config = preset("124M")
        save_params(path, init_params(config, seed=123), config)
    return path


def run_npgpt(args, work_dir, k, extra=(), cache_dir=None):
    out = os.path.join(work_dir, f"npgpt-run{k}")
    cmd = [sys.executable, "-u", "-m", "npgpt.train", "--weights", weights_file(work_dir), "--data", args.data,
           "--bpe-dir", args.bpe_dir, "--data-dir", os.path.join(work_dir, f"data-npgpt{k}"), "--out", out,
           "--epochs", str(args.epochs), "--threads", str(args.threads), "--no-plots",   # a log: no bars
           "--cache-dir", cache_dir or os.path.join(work_dir, f"prefix-cache-{k}"), *extra]
    res, lines = run_child(cmd, log_prefix=f"npgpt {k}: ")
    if res["exit"] != 0:
        raise SystemExit(f"npgpt run failed with exit code {res['exit']}")
    res["start_s"] = next((t for t, line in lines if line.startswith("model:")), None)
    res["prefix_s"] = next((float(re.search(r" in ([0-9.]+) s", line).group(1)) for _, line in lines
                            if line.startswith("cached the frozen prefix")), None)
    metrics = json.load(open(os.path.join(out, "metrics.json")))
    res["train_steps_s"] = metrics.get("train_time_s")
    res["final_accuracy"] = {k.replace("_accuracy", ""): v for k, v in metrics["metrics"]["final"].items()
                             if k.endswith("accuracy")}
    res["epochs"] = args.epochs
    res["prefix_source"] = ("cache" if any("read from the cache" in line for _, line in lines) else
                            "cache + blocks" if any("from the cached depth" in line for _, line in lines) else
                            "computed")
    return res


def run_torch(args, work_dir):
    path = os.path.join(work_dir, "torch.json")
    cmd = [sys.executable, "-u", str(Path(__file__).with_name("torch_finetune.py")), "--data", args.data,
           "--bpe-dir", args.bpe_dir, "--data-dir", os.path.join(work_dir, "data-torch"), "--json", path,
           "--epochs", str(args.torch_epochs), "--threads", str(args.threads), "--attention", args.torch_attention]
    res, _ = run_child(cmd, log_prefix="torch: ")
    if res["exit"] != 0:
        raise SystemExit(f"PyTorch run failed with exit code {res['exit']}")
    parts = json.load(open(path))
    res.update(parts=parts, epochs=args.torch_epochs, final_accuracy=parts["final_accuracy"])
    res["wall_5_s"] = res["wall_s"]
    if args.torch_epochs != args.epochs:         # scale the parts that grow with the epochs
        f = args.epochs / args.torch_epochs
        steps_total = parts["n_steps"] * f
        n_periodic = (int(steps_total) - 1) // 50 + 1
        per_eval = parts["periodic_eval_s"] / max(parts["n_periodic_evals"], 1)
        rest = res["wall_s"] - parts["steps_s"] - parts["periodic_eval_s"] - parts["epoch_accuracy_s"]
        res["wall_5_s"] = rest + parts["steps_s"] * f + per_eval * n_periodic + parts["epoch_accuracy_s"] * f
        res["scaled_from_epochs"] = args.torch_epochs
    return res


def kernel_start_time():
    """Seconds for a fresh interpreter to import npgpt and run each kernel once (from Numba's
    on-disk cache when it is warm)."""
    code = ("import time; t0 = time.time(); import npgpt; npgpt.tune_runtime(); import numpy as np; import npgpt.kernels as K; "
            "x = np.ones((4, 8), np.float32); g = np.ones(8, np.float32); y, m, r = K.layernorm_forward(x, g, g); "
            "K.layernorm_backward(x, x, m, r, g); K.gelu_backward(x, K.gelu_forward(x)); "
            "q = np.ones((1, 3, 24), np.float32); o, a = K.attention_forward(q, 2); K.attention_backward(o, q, a, 2); "
            "o, a = K.attention_query_forward(q[:, 0, :8], q[:, :, 8:], np.array([2]), 2); "
            "K.attention_query_backward(o, q[:, 0, :8], q[:, :, 8:], a, np.array([2]), 2); "
            "K.adamw_update(x, x.copy(), x.copy(), x.copy() ** 2, 1, 1e-3, 0.9, 0.999, 1e-8, 0.1); "
            "print(time.time() - t0)")
    t0 = time.time()
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=str(REPO),
                       env=ENV_AT_LAUNCH)
    return {"in_process_s": float(r.stdout.strip()) if r.returncode == 0 else None,
            "launch_to_exit_s": time.time() - t0}


# ----------------------------------------------------------------------------- main

def main(argv=None):
    args = parse_args(argv)
    import torch  # noqa: F401  (for the version in the header only; the runs are child processes)
    set_threads(args.threads)
    command = "python benchmarks/finetune.py " + " ".join(sys.argv[1:] if argv is None else argv)
    print(command)
    info = machine_info()
    print_info(info)
    tmp = tempfile.TemporaryDirectory(prefix="npgpt-bench-") if args.work_dir is None else None
    work_dir = args.work_dir or tmp.name
    os.makedirs(work_dir, exist_ok=True)

    peak = gemm_peak()
    work = count_work(args, work_dir)
    print(f"GEMM peak (NumPy float32, {args.threads} threads, 4096 rows): "
          + ", ".join(f"{k} {v:.0f}" for k, v in peak.items() if k != "peak") + f" GFLOP/s; peak {peak['peak']:.0f}")
    print(f"work (linear-layer matmul FLOPs): npgpt {work['npgpt']['total'] / 1e12:.2f} T "
          f"(prefix {work['npgpt']['prefix'] / 1e12:.2f}, steps {work['npgpt']['steps'] / 1e12:.2f}, "
          f"evaluations {work['npgpt']['evals'] / 1e12:.2f}); PyTorch reference {work['torch']['total'] / 1e12:.2f} T")

    kstart = kernel_start_time()
    runs, torch_run = [], None
    n_before = (args.npgpt_runs + 1) // 2
    if args.side in ("both", "npgpt"):
        for k in range(n_before):
            runs.append(run_npgpt(args, work_dir, len(runs) + 1))
    if args.side in ("both", "torch"):
        torch_run = run_torch(args, work_dir)
    if args.side in ("both", "npgpt"):
        for k in range(args.npgpt_runs - n_before):
            runs.append(run_npgpt(args, work_dir, len(runs) + 1))
    sweep = []
    if args.sweep:
        shared_cache = os.path.join(work_dir, "prefix-cache-sweep")
        for j, (blocks, lr, pooling) in enumerate(SWEEP, 1):
            r = run_npgpt(args, work_dir, f"sweep{j}", ["--trainable-blocks", blocks, "--lr", lr,
                                                        "--pooling", pooling], cache_dir=shared_cache)
            r.update(trainable_blocks=blocks, lr=lr, pooling=pooling)
            sweep.append(r)
    kstart_after = kernel_start_time()

    rows = []
    for k, r in enumerate(runs, 1):
        rows.append({"side": f"npgpt default (run {k})", "epochs": r["epochs"], "wall_s": r["wall_s"],
                     "peak_rss_mib": r["peak_rss_mib"], "flops": work["npgpt"]["total"],
                     "start_s": r["start_s"], "prefix_s": r["prefix_s"], "train_steps_s": r["train_steps_s"],
                     "final_accuracy": r["final_accuracy"]})
    if torch_run:
        rows.append({"side": "PyTorch reference" + (f" ({torch_run['epochs']} epoch(s), scaled)"
                                                    if "scaled_from_epochs" in torch_run else ""),
                     "epochs": args.epochs, "wall_s": torch_run["wall_5_s"], "measured_wall_s": torch_run["wall_s"],
                     "peak_rss_mib": torch_run["peak_rss_mib"], "flops": work["torch"]["total"],
                     "parts": torch_run["parts"], "final_accuracy": torch_run["final_accuracy"]})
    bound = {"npgpt": work["npgpt"]["total"] / (peak["peak"] * 1e9), "torch": work["torch"]["total"] / (peak["peak"] * 1e9)}
    for r in rows:
        r["gflops_achieved"] = r["flops"] / r["wall_s"] / 1e9
        r["lower_bound_s"] = bound["npgpt" if r["side"].startswith("npgpt") else "torch"]
        r["x_lower_bound"] = r["wall_s"] / r["lower_bound_s"]

    print(f"\nload average after the runs: {machine_info()['load_avg_1_5_15']}")
    print(f"\n{'side':44s} {'epochs':>6s} {'wall s':>8s} {'peak RSS MiB':>12s} {'TFLOP':>6s} {'GFLOP/s':>8s}"
          f" {'bound s':>8s} {'x bound':>7s} {'test acc':>8s}")
    for r in rows:
        print(f"{r['side']:44s} {r['epochs']:6d} {r['wall_s']:8.1f} {r['peak_rss_mib']:12.0f} {r['flops'] / 1e12:6.2f}"
              f" {r['gflops_achieved']:8.0f} {r['lower_bound_s']:8.1f} {r['x_lower_bound']:7.2f}"
              f" {r['final_accuracy']['test'] * 100:7.2f}%")
    import numpy as np
    summary = {}
    if runs and torch_run:
        med = float(np.median([r["wall_s"] for r in runs]))
        summary = {"npgpt_median_wall_s": med, "torch_wall_s": torch_run["wall_5_s"],
                   "speedup": torch_run["wall_5_s"] / med,
                   "npgpt_median_x_bound": med / bound["npgpt"],
                   "peak_rss_ratio": max(r["peak_rss_mib"] for r in runs) / torch_run["peak_rss_mib"]}
        print(f"\nnpgpt median {med:.1f} s vs PyTorch {torch_run['wall_5_s']:.1f} s: {summary['speedup']:.1f}x faster; "
              f"npgpt at {summary['npgpt_median_x_bound']:.2f}x its GEMM lower bound ({bound['npgpt']:.1f} s); "
              f"peak RSS npgpt/PyTorch {summary['peak_rss_ratio']:.2f}")
    for k, r in enumerate(runs, 1):
        print(f"npgpt run {k}: launch to training start {r['start_s']:.1f} s, frozen prefix {r['prefix_s']} s, "
              f"training steps {r['train_steps_s']:.1f} s")
    if sweep:
        cold = float(np.median([r["wall_s"] for r in runs])) if runs else sweep[0]["wall_s"]
        total = sum(r["wall_s"] for r in sweep)
        grid = sum(r["wall_s"] for r in sweep if r["pooling"] == "last-token")
        print(f"\nsweep, one disk cache ({len(sweep)} runs, {args.epochs} epochs each):")
        print(f"{'run':>3s} {'blocks':>6s} {'lr':>6s} {'pooling':>14s} {'prefix':>15s} {'prefix s':>8s} "
              f"{'wall s':>7s} {'peak RSS MiB':>12s} {'test acc':>8s}")
        for j, r in enumerate(sweep, 1):
            print(f"{j:3d} {r['trainable_blocks']:>6s} {r['lr']:>6s} {r['pooling']:>14s} {r['prefix_source']:>15s} "
                  f"{r['prefix_s'] if r['prefix_s'] is not None else float('nan'):8.1f} {r['wall_s']:7.1f} "
                  f"{r['peak_rss_mib']:12.0f} {r['final_accuracy']['test'] * 100:7.2f}%")
        summary["sweep"] = {"total_s": total, "cold_run_s": cold, "x_cold": total / cold,
                            "last_token_runs_s": grid, "last_token_runs_x_cold": grid / cold}
        print(f"sweep total {total:.1f} s = {total / cold:.2f}x one cold run ({cold:.1f} s"
              f"{', median of the default runs' if runs else ', sweep run 1'}); the four last-token runs "
              f"{grid:.1f} s = {grid / cold:.2f}x")
    print(f"import npgpt + one call of every kernel, fresh interpreter: {kstart['in_process_s']:.2f} s before the runs, "
          f"{kstart_after['in_process_s']:.2f} s after (launch to exit {kstart_after['launch_to_exit_s']:.2f} s)")
    if args.json:
        write_json(args.json, {"command": command, "info": info, "gemm_peak_gflops": peak, "work": work,
                               "lower_bound_s": bound, "rows": rows, "summary": summary,
                               "kernel_start": {"before": kstart, "after": kstart_after}, "sweep": sweep,
                               "args": vars(args)})
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
