"""npgpt on Dask against one process: texts/s classifying a corpus, the overhead per partition, and
the frozen prefix of a table, each both ways in the same run.

    python benchmarks/distributed.py                           # 20,000 texts each (~45 min on 2 cores)
    python benchmarks/distributed.py --texts 2000 --prefix-texts 2000 --json distributed.json

124M-shaped random weights (the work does not depend on their values), texts as
benchmarks/classify.py makes them (distinct SMS messages, then pairs joined).

  classify   one process on --threads threads: `Classifier.predict_proba` of every text (what
             `classify --file` runs), against `npgpt.corpus.classify_files` on a LocalCluster of
             2 workers x 1 thread: --partitions Parquet files in, one Parquet file out per file,
             each worker loading the classifier once (counted). The cluster's start is timed apart.
             Also one process on 1 thread over the first quarter of the texts (the rate of one
             core), and where the cluster's wall time went: each worker's busy seconds (Dask's
             task stream), its first task (which loads the classifier and its kernels) apart.
  work       the token rows each side computes (no timing, the same every run): packed inference
             computes a repeated text once and the first tokens texts share once, within one call:
             one process shares across all the texts, the cluster within each partition only.
             `--counts-only` prints these and stops.
  overhead   the same job over --tiny-partitions files of one text each: wall seconds per partition,
             and worker-seconds per partition (wall x workers / partitions), beyond the work itself.
  prefix     the frozen prefix (blocks 0..10 of 12: --trainable-blocks 1) of --prefix-texts texts at
             their true length: `PrefixCache.activations` in one process, against the sharded prefix
             on a LocalCluster (`npgpt.distributed.cluster_prefix`, cluster start included) with
             --shard-tokens tokens per shard; the two results are compared bit for bit.
"""
from __future__ import annotations

import os
import sys
import tempfile
import time
from types import SimpleNamespace

_HERE = os.path.dirname(os.path.abspath(__file__))      # last on the path: `import distributed` is Dask's,
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE] + [_HERE]    # not this file

from common import arg_parser, default_data_dir, machine_info, print_info, set_threads, write_json  # noqa: E402

import numpy as np  # noqa: E402  (after common: npgpt.tune_runtime() first)
import pandas as pd  # noqa: E402

from classify import large_texts  # noqa: E402


def parse_args(argv=None):
    p = arg_parser(__doc__, __file__)
    p.add_argument("--texts", type=int, default=20000, help="texts classified each way")
    p.add_argument("--partitions", type=int, default=8, help="input files of the classify job")
    p.add_argument("--tiny-partitions", type=int, default=40, help="one-text files of the overhead job")
    p.add_argument("--prefix-texts", type=int, default=20000, help="texts whose frozen prefix is computed")
    p.add_argument("--shard-tokens", type=int, default=20000, help="tokens per shard of the sharded prefix")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="threads of the one-process side")
    p.add_argument("--counts-only", action="store_true", help="print the work rows (token counts) and stop")
    p.add_argument("--parts", default="classify,prefix", help="which parts to run: classify, prefix or both")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    return p.parse_args(argv)


def timed(fn):
    t0 = time.perf_counter()
    r = fn()
    return time.perf_counter() - t0, r


def write_files(texts, n, folder) -> list:
    """texts split into n Parquet files (a column "text") -> their paths."""
    os.makedirs(folder, exist_ok=True)
    paths = []
    for k, part in enumerate(np.array_split(np.arange(len(texts)), n)):
        path = os.path.join(folder, f"part{k:04d}.parquet")
        pd.DataFrame({"text": [texts[i] for i in part]}).to_parquet(path, index=False)
        paths.append(path)
    return paths


def computed_rows(token_lists) -> tuple:
    """(tokens, token rows packed inference computes) for one call on these token id lists: each
    distinct sequence once, the first tokens it shares with its neighbour in sorted order once
    (`npgpt.infer.packed_logits`'s packs, 2048 tokens each)."""
    from npgpt import prefix_tree
    seqs = [np.array(t, np.int64) for t in dict.fromkeys(tuple(int(i) for i in t) for t in token_lists)]
    return sum(len(t) for t in token_lists), sum(len(lay.ids) for _, lay in prefix_tree.packed_layouts(seqs, 2048))


def work_rows(args, clf_path, texts, rows) -> None:
    """The work rows: tokens and computed token rows of one process (all texts in one call), of
    its first quarter (the 1-thread row) and of the cluster's partitions."""
    from npgpt.classify import load_classifier
    clf = load_classifier(clf_path, str(default_data_dir() / "gpt2_bpe"))
    tokens = list(clf.encode(texts)[0])
    sides = {"one process, all texts in one call": [tokens],
             "one process, 1 thread: the first quarter": [tokens[:max(1, len(tokens) // 4)]],
             f"LocalCluster, {args.partitions} partitions":
                 [tokens[p[0]:p[-1] + 1] for p in np.array_split(np.arange(len(tokens)), args.partitions)]}
    for side, calls in sides.items():
        counts = [computed_rows(c) for c in calls]
        total, done = sum(a for a, _ in counts), sum(b for _, b in counts)
        rows.append(("work", f"{side} ({total} tokens)", sum(map(len, calls)), float(done), done / total))
        print(f"  work, {side}: {done} of {total} tokens computed ({done / total:.3f})", flush=True)


def worker_busy(tasks) -> dict:
    """Dask task-stream records -> {worker: (first task's seconds, the other tasks' seconds, tasks)}:
    the seconds each worker spent computing (the reads and writes inside its tasks included)."""
    spans = {}
    for task in tasks:
        compute = [(sp["start"], sp["stop"]) for sp in task["startstops"] if sp["action"] == "compute"]
        spans.setdefault(task["worker"], []).extend(compute)
    busy = {}
    for worker, ss in spans.items():
        ss.sort()
        seconds = [b - a for a, b in ss]
        busy[worker] = (seconds[0], sum(seconds[1:]), len(seconds))
    return busy


def classify_rows(args, d, clf_path, texts, rows):
    from distributed import get_task_stream
    from npgpt import corpus, distributed
    from npgpt.classify import load_classifier
    bpe = str(default_data_dir() / "gpt2_bpe")
    clf = load_classifier(clf_path, bpe)
    labels = clf.labels
    clf.predict_proba(texts[:16])                                        # warm-up: kernels, BLAS
    s, P_one = timed(lambda: clf.predict_proba(texts))
    rows.append(("classify", f"one process, {args.threads} threads", len(texts), s, len(texts) / s))
    print(f"  classify, one process: {s:.1f} s", flush=True)
    set_threads(1)
    quarter = texts[:max(1, len(texts) // 4)]
    s, _ = timed(lambda: clf.predict_proba(quarter))
    set_threads(args.threads)
    rows.append(("classify", "one process, 1 thread (the first quarter of the texts)", len(quarter), s,
                 len(quarter) / s))
    print(f"  classify, one process on 1 thread: {s:.1f} s for {len(quarter)} texts", flush=True)
    del clf
    files = write_files(texts, args.partitions, os.path.join(d, "texts"))
    tiny = write_files(texts[:args.tiny_partitions], args.tiny_partitions, os.path.join(d, "tiny"))
    ref = corpus.model_ref(clf_path, bpe)
    quiet = lambda msg: None  # noqa: E731
    t0 = time.perf_counter()
    with distributed.cluster(workers=2, log=print) as client:
        start = time.perf_counter() - t0
        with get_task_stream(client) as stream:
            s, _ = timed(lambda: corpus.classify_files(client, files, ref, os.path.join(d, "preds"), "text",
                                                       labels=labels, progress=False, log=quiet))
        rows.append(("classify", f"LocalCluster 2x1, {args.partitions} partitions (start {start:.1f} s apart)",
                     len(texts), s, len(texts) / s))
        print(f"  classify, LocalCluster: {s:.1f} s (start {start:.1f} s)", flush=True)
        busy = worker_busy(stream.data)
        for worker, (first, rest, n) in sorted(busy.items()):
            rows.append(("busy", f"worker {worker}: first task (loads) {first:.1f} s, {n - 1} more tasks",
                         n, first + rest, (first + rest) / s))
            print(f"  {worker}: busy {first + rest:.1f} s of {s:.1f} (first task {first:.1f} s)", flush=True)
        s, _ = timed(lambda: corpus.classify_files(client, tiny, ref, os.path.join(d, "tiny-preds"), "text",
                                                   labels=labels, progress=False, log=quiet))
        rows.append(("overhead", f"{args.tiny_partitions} partitions of 1 text: s per partition "
                                 f"(worker-s: {2 * s / args.tiny_partitions:.3f})",
                     args.tiny_partitions, s / args.tiny_partitions, args.tiny_partitions / s))
    got = np.concatenate([pd.read_parquet(os.path.join(d, "preds", os.path.basename(f)))[["p_0", "p_1"]].to_numpy()
                          for f in files])
    return float(np.abs(got - P_one).max())


def prefix_rows(args, d, weights, texts, rows):
    from npgpt import distributed
    from npgpt.job import load_model
    from npgpt.prefix_cache import PrefixCache, weight_digests
    from npgpt.runconfig import RunConfig, RunOptions
    from npgpt.tokenizer import encode, get_tokenizer
    tok = get_tokenizer(default_data_dir() / "gpt2_bpe")
    seqs = [np.array(s, np.int64) for s in dict.fromkeys(tuple(encode(tok, t)[:120]) for t in texts)]
    run = RunConfig(model="124M", weights=weights)
    params, cfg, _ = load_model(run, 2, RunOptions(progress=False), log=lambda m: None)
    depth = cfg.n_layer - 1
    digests = weight_digests(params, depth)
    one = PrefixCache(os.path.join(d, "cache-one"))
    s, (flat, offsets) = timed(lambda: one.activations(params, cfg, seqs, depth, "last_token", digests=digests))
    tokens = int(offsets[-1])
    rows.append(("prefix", f"one process, {args.threads} threads", len(seqs), s, tokens / s))
    print(f"  prefix, one process: {s:.1f} s", flush=True)
    store = PrefixCache(os.path.join(d, "cache-cluster"))
    job = SimpleNamespace(run=run, classes=["0", "1"])
    options = RunOptions(workers=2, shard_tokens=args.shard_tokens, progress=False)
    sharded = distributed.cluster_prefix(job, options, store, log=print)
    s, views = timed(lambda: sharded(params, cfg, seqs, depth, "last_token", digests=digests))
    rows.append(("prefix", f"LocalCluster 2x1, shards of {args.shard_tokens} tokens (start included)",
                 len(seqs), s, tokens / s))
    print(f"  prefix, LocalCluster: {s:.1f} s", flush=True)
    rows_differ, largest, scale, where = 0, 0.0, 0.0, []
    for u in range(len(seqs)):
        a, b = views[u], flat[offsets[u]:offsets[u + 1]]                          # [n,C] each
        if not np.array_equal(a, b):
            differ = np.flatnonzero(np.any(a != b, axis=1))
            rows_differ += len(differ)
            largest = max(largest, float(np.abs(a - b).max()))
            scale = max(scale, float(np.abs(b).max()))
            where.append(f"sequence {u} ({len(a)} tokens): positions {differ[:4].tolist()}")
    if rows_differ:
        print(f"  prefix: {rows_differ} of {tokens} token rows in {len(where)} sequences differ from the one-process "
              f"prefix, by at most {largest:.2e} (the largest |activation| there: {scale:.1f}); "
              f"{'; '.join(where[:5])}", flush=True)
    rows.append(("prefix", f"token rows differing, by at most {largest:.2e}", len(seqs), float(rows_differ),
                 rows_differ / tokens))
    return tokens, rows_differ == 0


def main(argv=None):
    from npgpt import params as P
    from npgpt.config import init_params, preset
    args = parse_args(argv)
    for name in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE"):
        if name in os.environ:
            sys.exit(f"unset {name} first: the workers and this process must run the same BLAS kernels")
    set_threads(args.threads)
    from npgpt.fastops import load_compiled_kernels
    load_compiled_kernels()                   # from Numba's cache, as the workers and every npgpt run
    command = "python benchmarks/distributed.py " + " ".join(sys.argv[1:] if argv is None else argv)
    print(command)
    info = machine_info()
    print_info(info)
    cfg = preset("124M")
    texts = large_texts(max(args.texts, args.prefix_texts))
    rows = []
    with tempfile.TemporaryDirectory() as d:
        clf_path, weights = os.path.join(d, "classifier.h5"), os.path.join(d, "gpt2-124M.h5")
        meta = {"kind": "npgpt-classifier", "labels": ["0", "1"], "pooling": "last_token", "max_length": 120}
        P.save_params(clf_path, init_params(cfg, seed=123, num_classes=2), cfg, meta=meta)
        P.save_params(weights, init_params(cfg, seed=123), cfg)
        work_rows(args, clf_path, texts[:args.texts], rows)
        if args.counts_only:
            return report(rows, args, command, info, None, None, None)
        parts = set(args.parts.split(","))
        diff = classify_rows(args, d, clf_path, texts[:args.texts], rows) if "classify" in parts else None
        tokens, same = prefix_rows(args, d, weights, texts[:args.prefix_texts], rows) if "prefix" in parts \
            else (None, None)
    return report(rows, args, command, info, diff, tokens, same)


def report(rows, args, command, info, diff, tokens, same) -> int:
    """The table (and the JSON file); diff/tokens/same None when only the work was counted."""
    if diff is not None:
        print(f"\nclassify: largest |p difference| one process vs cluster {diff:.1e}")
    if tokens is not None:
        print(f"prefix: {tokens} tokens, the cluster's shards {'equal' if same else 'DIFFER FROM'} the one-process "
              "prefix bit for bit")
    print("\n(work rows: items = texts, s = token rows computed, per s = their fraction of the tokens; busy rows: "
          "items = tasks, s = seconds computing, per s = the fraction of the job's wall time)")
    print(f"\n{'what':>9s} {'side':70s} {'items':>6s} {'s':>9s} {'per s':>9s}")
    for what, side, n, s, rate in rows:
        seconds = f"{s:9.0f}" if what == "work" else f"{s:9.3f}"
        print(f"{what:>9s} {side:70s} {n:6d} {seconds} {rate:9.1f}" if rate >= 10 else
              f"{what:>9s} {side:70s} {n:6d} {seconds} {rate:9.3f}")
    print(f"load average after: {machine_info()['load_avg_1_5_15']}")
    if args.json:
        write_json(args.json, {"command": command, "info": info, "args": vars(args), "max_abs_p_diff": diff,
                               "prefix_tokens": tokens, "prefix_bit_equal": same,
                               "rows": [dict(zip(("what", "side", "items", "s", "per_s"), r)) for r in rows]})
    return 0


if __name__ == "__main__":
    sys.exit(main())
