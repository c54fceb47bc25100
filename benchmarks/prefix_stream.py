"""What streaming the frozen prefix from disk costs: reading formats, and whole training steps.

    python benchmarks/prefix_stream.py read                  # memmap .npy vs HDF5, 50k examples x 768
    python benchmarks/prefix_stream.py step                  # 124M step, prefix in memory vs spilled (SMS)
    python benchmarks/prefix_stream.py step --data my.csv    # the same on a table of your own
    python benchmarks/prefix_stream.py make-csv /tmp/x.csv --texts 20000   # a synthetic 5-class table

read   one file of --examples examples' activations (lengths uniform in --min-len..--max-len
       tokens, --width floats a token, float32, written once into --work-dir), stored three ways:
         npy memmap       one [N,C] .npy array read memory-mapped, example s = rows off[s]..off[s+1]-1
                          (what npgpt.prefix_cache writes);
         h5 row chunks    one [N,C] HDF5 dataset chunked (--chunk-rows, C), no compression, read by
                          the same offsets;
         h5 per example   one HDF5 dataset per example ("chunked per example" taken literally).
         npy + WILLNEED   the .npy, each batch's pages asked for first (npgpt.prefix_cache.prefetch).
       A turn reads --batches batches of 8 random examples (the same examples for every format) into
       one padded [8,T,C] array, as npgpt.finetune.batch_inputs does. Warm: the files are in the OS
       page cache (read once before). Cold: before each turn the file's pages are dropped from the
       page cache (posix_fadvise DONTNEED; no root needed) and the file is opened anew. Also the
       sha256 of the whole .npy (the check npgpt makes on every read of a cache entry), warm.
step   one training step of npgpt's default path at 124M shapes (random weights; blocks 0..10
       frozen, the last block, ln_f and the head trained, batch 8, last-token pooling): gathering
       the batch from the prefix, loss and gradients, the AdamW update. The prefix is computed once
       into --cache-dir (or read from it), then held two ways: in memory (np.array) and memory-mapped
       from the cache entry (what a run with a small --cache-memory does). Turns alternate on the
       same batches: in memory; memory-mapped with the turn's examples in the page cache (warm);
       memory-mapped with the entry's pages dropped before the turn (cold: a prefix larger than
       memory), without and with the next batch's pages asked for ahead, as `train` does.
Timing follows benchmarks/common.py: variants in turns, medians and min-max of one run.
"""
from __future__ import annotations

import os
import sys
import time

from common import arg_parser, default_data_dir, fmt_ms, machine_info, print_info, summary, write_json  # noqa: E402


def parse_args(argv=None):
    p = arg_parser(__doc__, __file__)
    p.add_argument("mode", choices=["read", "step", "make-csv"])
    p.add_argument("path", nargs="?", default=None, help="make-csv: the CSV to write")
    p.add_argument("--work-dir", default="/tmp/npgpt-prefix-stream", help="read: where the files are written")
    p.add_argument("--keep", action="store_true", help="read: keep the files (default: removed at the end)")
    p.add_argument("--examples", type=int, default=50_000)
    p.add_argument("--min-len", type=int, default=4)
    p.add_argument("--max-len", type=int, default=44)
    p.add_argument("--width", type=int, default=768)
    p.add_argument("--chunk-rows", type=int, default=32, help="read: rows per HDF5 chunk (h5 row chunks)")
    p.add_argument("--batches", type=int, default=200, help="read: batches per turn")
    p.add_argument("--repeats", type=int, default=5, help="turns per variant (after a warm-up turn)")
    p.add_argument("--data", default=None, help="step: a .csv/.tsv/.jsonl table (default: the SMS data)")
    p.add_argument("--cache-dir", default="/tmp/npgpt-prefix-stream-cache", help="step: the prefix cache folder")
    p.add_argument("--steps", type=int, default=40, help="step: training steps per turn")
    p.add_argument("--texts", type=int, default=20_000, help="make-csv: rows")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- a synthetic table

TOPICS = {
    "billing": "invoice charge refund payment card bill price paid twice receipt subscription fee".split(),
    "shipping": "parcel delivery courier tracking shipped arrived late address box package warehouse".split(),
    "technical": "error crash login password app screen update install bug freezes server".split(),
    "account": "profile email username settings delete close account privacy verify phone".split(),
    "praise": "great thanks wonderful helpful quick friendly love excellent perfect happy".split(),
}
FILLER = ("the a my your this that it is was and but so please can you i we they have had "
          "not today yesterday again still now when why how what there here with for of on").split()


def make_csv(path, n, seed=0):
    """n texts of 6-30 words, a class's topic words mixed with filler, as text,label CSV."""
    import numpy as np
    import pandas as pd
    rng = np.random.default_rng(seed)
    names = sorted(TOPICS)
    labels = rng.integers(0, len(names), size=n)
    texts = []
    for k in labels:
        m = int(rng.integers(6, 31))
        words = [TOPICS[names[k]][rng.integers(len(TOPICS[names[k]]))] if rng.random() < 0.3
                 else FILLER[rng.integers(len(FILLER))] for _ in range(m)]
        texts.append(" ".join(words).capitalize() + ".")
    pd.DataFrame({"text": texts, "label": [names[k] for k in labels]}).to_csv(path, index=False)
    print(f"wrote {n} texts, {len(names)} classes to {path}")


# ----------------------------------------------------------------------------- read: formats

def drop_cache(path):
    """Evict the file's pages from the OS page cache (clean pages only: the file is synced)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def gather(get, batch, C, dtype):
    """The padded [B,T,C] batch of examples `batch` (get(s) -> its [T_s,C] rows)."""
    import numpy as np
    parts = [get(s) for s in batch]
    x = np.zeros((len(parts), max(p.shape[0] for p in parts), C), dtype)          # [B,T,C]
    for b, p in enumerate(parts):
        x[b, :p.shape[0]] = p
    return x


def read_mode(a):
    import h5py
    import numpy as np

    from npgpt.prefix_cache import prefetch

    rng = np.random.default_rng(0)
    lengths = rng.integers(a.min_len, a.max_len + 1, size=a.examples)               # [S]
    off = np.concatenate([[0], np.cumsum(lengths)])                                  # [S+1]
    rows, C = int(off[-1]), a.width
    os.makedirs(a.work_dir, exist_ok=True)
    npy, h5r, h5e = (os.path.join(a.work_dir, f) for f in ("prefix.npy", "rows.h5", "examples.h5"))
    print(f"{a.examples} examples, {rows} tokens x {C} float32 = {rows * C * 4 / 2**30:.2f} GiB per format")
    block = rng.standard_normal((4096, C)).astype(np.float32)                       # repeated: no compression anyway
    t0 = time.perf_counter()
    out = np.lib.format.open_memmap(npy, mode="w+", dtype=np.float32, shape=(rows, C))
    for i in range(0, rows, len(block)):
        n = min(len(block), rows - i)
        out[i:i + n] = block[:n] + np.float32(i)
    out.flush()
    del out
    t_npy = time.perf_counter() - t0
    t0 = time.perf_counter()
    with h5py.File(h5r, "w") as f:
        d = f.create_dataset("prefix", shape=(rows, C), dtype=np.float32, chunks=(a.chunk_rows, C))
        for i in range(0, rows, len(block)):
            n = min(len(block), rows - i)
            d[i:i + n] = block[:n] + np.float32(i)
    t_h5r = time.perf_counter() - t0
    t0 = time.perf_counter()
    src = np.load(npy, mmap_mode="r")
    with h5py.File(h5e, "w") as f:
        g = f.create_group("prefix")
        for s in range(a.examples):
            g.create_dataset(str(s), data=src[off[s]:off[s + 1]])
    del src
    t_h5e = time.perf_counter() - t0
    sizes = {p: os.path.getsize(p) for p in (npy, h5r, h5e)}
    print(f"written: npy {t_npy:.1f} s ({sizes[npy] / 2**30:.2f} GiB), h5 row chunks {t_h5r:.1f} s "
          f"({sizes[h5r] / 2**30:.2f} GiB), h5 per example {t_h5e:.1f} s ({sizes[h5e] / 2**30:.2f} GiB)")

    batches = [rng.integers(0, a.examples, size=8) for _ in range(a.batches)]
    opened = {}

    def open_fmt(name, cold):
        for other in list(opened):      # (a page still mapped by any open view would stay cached)
            if other == name or cold:
                opened.pop(other)[1]()
        path = {"npy memmap": npy, "npy memmap + WILLNEED": npy, "h5 row chunks": h5r, "h5 per example": h5e}[name]
        if cold:
            drop_cache(path)
        if name.startswith("npy memmap"):
            arr = np.load(npy, mmap_mode="r")
            opened[name] = (lambda s: arr[off[s]:off[s + 1]], lambda: None)
        elif name == "h5 row chunks":
            f = h5py.File(h5r, "r")
            d = f["prefix"]
            opened[name] = (lambda s: d[off[s]:off[s + 1]], f.close)
        else:
            f = h5py.File(h5e, "r")
            g = f["prefix"]
            opened[name] = (lambda s: g[str(s)][()], f.close)
        return opened[name][0]

    def turn(name, cold):
        get = open_fmt(name, cold)
        t0 = time.perf_counter()
        for b in batches:
            if name == "npy memmap + WILLNEED":       # npgpt.prefix_cache.prefetch, then the copy
                prefetch([get(s) for s in b], range(len(b)))
            gather(get, b, C, np.float32)
        return (time.perf_counter() - t0) / len(batches)

    # the same examples through each format, to be sure they read the same rows
    for b in batches[:3]:
        ref = gather(open_fmt("npy memmap", False), b, C, np.float32)
        for name in ("h5 row chunks", "h5 per example"):
            assert np.array_equal(ref, gather(open_fmt(name, False), b, C, np.float32)), name
    names = ("npy memmap", "npy memmap + WILLNEED", "h5 row chunks", "h5 per example")
    results = {}
    for cold in (False, True):
        for name in names:                      # warm-up turn (warm: reads every page once)
            if not cold:
                get = open_fmt(name, False)
                for s in range(a.examples):
                    get(s)
            turn(name, cold)
        times = {n: [] for n in names}
        for _ in range(a.repeats):
            for name in names:
                times[name].append(turn(name, cold))
        for name in names:
            results[f"{name}, {'cold' if cold else 'warm'}"] = summary(times[name])
    for name in list(opened):
        opened.pop(name)[1]()
    from npgpt.prefix_cache import checksum
    arr = np.load(npy, mmap_mode="r")
    checksum(arr)
    t0 = time.perf_counter()
    checksum(arr)
    t_sha = time.perf_counter() - t0
    del arr
    print(f"\nms per batch of 8 examples (median, min-max over {a.repeats} turns of {a.batches} batches):")
    base = {c: results[f"npy memmap, {c}"]["median"] for c in ("warm", "cold")}
    for k, v in results.items():
        print(f"  {k:30s} {fmt_ms(v)}  x{v['median'] / base[k.rsplit(', ', 1)[1]]:.2f} of npy memmap")
    print(f"sha256 of the .npy, warm: {t_sha:.2f} s = {sizes[npy] / t_sha / 2**20:.0f} MiB/s")
    return {"rows": rows, "width": C, "examples": a.examples, "bytes": sizes, "write_s":
            {"npy": t_npy, "h5_rows": t_h5r, "h5_examples": t_h5e}, "ms_per_batch": results, "sha256_s": t_sha}


# ----------------------------------------------------------------------------- step: training

def step_mode(a):
    import tempfile

    import numpy as np

    from npgpt import fastmodel as model, fastops, finetune, params as P
    from npgpt.config import preset
    from npgpt.data import prepare_splits
    from npgpt.dataset import make_datasets, train_batches
    from npgpt.optim import AdamW
    from npgpt.prefix_cache import PrefixCache, dataset_activations, prefetch
    from npgpt.tokenizer import get_tokenizer

    shared = default_data_dir()
    if a.data is None:
        with tempfile.TemporaryDirectory(prefix="npgpt-prefix-stream-") as tmp:     # the split CSVs
            splits = prepare_splits(shared / "sms_spam_collection" / "SMSSpamCollection", tmp)
        K, what = 2, "SMS spam (undersampled)"
    else:
        from npgpt.tabular import prepare_user_splits
        splits, names = prepare_user_splits(a.data)
        K, what = len(names), a.data
    datasets = make_datasets(splits, get_tokenizer(shared / "gpt2_bpe"))
    cfg = preset("124M")
    params = P.init_params(cfg, seed=123, num_classes=K)
    start = cfg.n_layer - 1
    tokens = sum(int(d.lengths.sum()) for d in datasets)
    print(f"{what}: {len(datasets[0])} training texts, {tokens} tokens in all splits, {K} classes")
    logs = []
    t0 = time.perf_counter()
    mem = dataset_activations(PrefixCache(a.cache_dir, memory_limit=1 << 62, log=logs.append), params, cfg,
                              datasets, start, "last_token")
    t_mem = time.perf_counter() - t0
    t0 = time.perf_counter()
    disk = dataset_activations(PrefixCache(a.cache_dir, memory_limit=0, log=logs.append), params, cfg,
                               datasets, start, "last_token")
    t_disk = time.perf_counter() - t0
    print("\n".join("  " + s for s in logs))
    assert isinstance(disk[0][0], np.memmap) and not isinstance(mem[0][0], np.memmap)
    print(f"prefix ready: in memory {t_mem:.1f} s (computed or read and checksummed), "
          f"memory-mapped {t_disk:.1f} s (read and checksummed)")
    train = datasets[0]
    opt = AdamW(lr=5e-5, weight_decay=0.1, update=fastops.adamw_update)

    def drop(feats):
        """Evict the memory-mapped entry's pages: unmapped from this process, then out of the page cache."""
        import mmap
        feats[0]._mmap.madvise(mmap.MADV_DONTNEED)
        drop_cache(feats[0].filename)

    def steps(feats, batches, parts, cold=False, ahead=False):
        t_gather, t_step = [], []
        if cold:
            drop(feats)
        elif isinstance(feats[0], np.memmap):       # warm: this turn's examples in the page cache
            for rows in batches:                    # (a cold turn before may have dropped them)
                for r in rows:
                    feats[r].sum()
        for k, rows in enumerate(batches):
            t0 = time.perf_counter()
            if ahead and k + 1 < len(batches):
                prefetch(feats, batches[k + 1])
            inputs, labels = finetune.batch_inputs(train, feats, rows, "last_token")
            t1 = time.perf_counter()
            loss, grads, _ = model.loss_and_grads(params, cfg, labels=labels, trainable=1, pooling="last_token",
                                                  **inputs)
            opt.step(params, grads)
            t_gather.append(t1 - t0)
            t_step.append(time.perf_counter() - t0)
        parts["gather"] += t_gather
        parts["step"] += t_step

    variants = {"in memory": (mem[0], False, False), "memory-mapped, warm": (disk[0], False, False),
                "memory-mapped, cold": (disk[0], True, False),
                "memory-mapped, cold, next batch prefetched": (disk[0], True, True)}
    res = {n: {"gather": [], "step": []} for n in variants}
    warm = {n: {"gather": [], "step": []} for n in variants}
    for r in range(a.repeats + 1):
        batches = train_batches(len(train), 8, seed=123, epoch=r)[:a.steps]
        for name, (feats, cold, ahead) in variants.items():
            steps(feats, batches, res[name] if r else warm[name], cold, ahead)
    print(f"\nms per training step (median, min-max over {a.repeats} turns x {a.steps} steps; cold: the "
          f"entry's pages dropped from the page cache before each turn):")
    out = {}
    for name in variants:
        out[name] = {k: summary(v) for k, v in res[name].items()}
        print(f"  {name:44s} step {fmt_ms(out[name]['step'])}   of which gathering the batch "
              f"{fmt_ms(out[name]['gather'])}")
    ratio = {n: out[n]["step"]["median"] / out["in memory"]["step"]["median"] for n in variants}
    print("whole step / in memory: " + ", ".join(f"{n} {v:.3f}" for n, v in ratio.items()))
    return {"data": what, "tokens": tokens, "ready_s": {"memory": t_mem, "memmap": t_disk}, "ms": out,
            "ratio": ratio, "log": logs}


def main(argv=None):
    a = parse_args(argv)
    if a.mode == "make-csv":
        if not a.path:
            sys.exit("make-csv needs the CSV path")
        make_csv(a.path, a.texts)
        return
    info = machine_info()
    print_info(info)
    try:
        result = read_mode(a) if a.mode == "read" else step_mode(a)
    finally:
        if a.mode == "read" and not a.keep:
            for f in ("prefix.npy", "rows.h5", "examples.h5"):
                if os.path.exists(os.path.join(a.work_dir, f)):
                    os.remove(os.path.join(a.work_dir, f))
    if a.json:
        write_json(a.json, {"machine": info, "mode": a.mode, **result})


if __name__ == "__main__":
    main()
