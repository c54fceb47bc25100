"""The frozen prefix's store: activations computed once per (weights, tokens, depth), kept on disk.

With blocks 0..d-1 frozen, the activations entering block d are a fixed function of the weights
that feed them (wte, wpe, blocks 0..d-1) and of the token ids. `npgpt.prefix` computes them;
this module keeps the result in a cache folder, so a later run on the same data reuses it:

    cache folder   `--cache-dir`, else $NPGPT_CACHE_DIR, else ~/.cache/npgpt/prefix
    one entry      <key>.npy   the activations, one [N,C] array (sequence s is rows off[s]..off[s+1]-1)
                   <key>.json  what it holds: depth, rows, columns, dtype, the sha256 of the array's bytes
    key            sha256 of: the sha256 of each array feeding it (embeddings, blocks < depth), the
                   token ids and lengths, the depth, the pooling mode, the packing (max_tokens) and
                   the kernels (Numba or NumPy). A content hash: never a path or a time.

What the cache owns: its folder holds a marker, `CACHEDIR.TAG` (the standard tag that backup
tools skip, naming npgpt), and its own files, each named by an exact pattern (`ENTRY`, and
`LEFTOVER` for temporary files): nothing else is ever read, listed or removed. A `--cache-dir`
that already holds other files is used through a subfolder, `npgpt-prefix-cache/`
(`cache_folder`). An entry that is not a regular file (a FIFO would block a read), not readable
or not well formed is removed and recomputed.

Reuse: an entry at depth d serves a run whose first trainable block is s >= d, by computing
blocks d..s-1 from it (a cache at depth 10 serves `--trainable-blocks 1` and `2`), the same bits
as a computation from the embeddings (`npgpt.prefix`).

Safety: an entry is written to a temporary name and renamed (`npgpt.fileio`: the .npy first, the
.json last, so a .json always describes a complete array), and verified on every read (shape,
dtype, checksum); a corrupt or partial entry is removed and recomputed, never trusted.

Memory: the prefix takes rows x C x 4 bytes (41.4k distinct tokens x 768 = 121 MiB for SMS at
124M). Above `memory_limit` bytes the array is not held in memory: it is written to a file as it
is computed and read back memory-mapped, so training streams it from disk page by page, and
`prefetch` asks the system for the next batch's pages (madvise WILLNEED) while a step runs.
Where the file lives: with the disk cache it is the cache entry itself (a copy in the run folder
would double the disk it takes, and the next run on the same data reuses it; `python -m
npgpt.cache clear` removes it); without it, a file in the run folder unlinked as soon as it is
created, so it goes when the run ends, however it ends. An error or Ctrl-C while it is written
removes the partial file; one left by a killed run (its temporary name says which process wrote it,
`fileio.temp_owner`) is listed by `python -m npgpt.cache ls` and removed by the next run using the folder. Too little free disk is one error before any work.

Keeping it in bounds: an entry's .json says what it was made from (`made_from`: the data file, the
model) and its modification time is the entry's last use (set on every read). The folder is kept
under a size cap (`--cache-max`, default `DEFAULT_MAX_FRACTION` of the disk it is on): after each
new entry, the entries used longest ago are removed until the rest fit (`evict`). An entry a
running job has memory-mapped is in use: the job holds a shared lock on its .npy for as long as
the mapping lives (`fileio.hold`, released by the system however the job ends), and neither
eviction nor `clear` removes it. `python -m npgpt.cache clear --older-than DAYS` removes the
entries not used for DAYS days.

Why one memory-mapped .npy and not HDF5 chunked per example: `benchmarks/prefix_stream.py read`
(50k examples, 1.2M tokens x 768, 3.4 GiB; ms per batch of 8 random examples, median of 5 turns):
warm page cache .npy 0.13, HDF5 chunks of 32 rows 0.57, one HDF5 dataset per example 1.66;
cold (pages dropped) .npy with WILLNEED 0.91, HDF5 5.47 and 5.26 (HDF5 reads one example after
the other, synchronously; the .npy's pages are asked for all at once). Same bytes on disk,
offsets in memory, no library call per read, and the cache's checksum covers the file as it is.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time

import numpy as np

from . import fastops, prefix
from .errors import TrainingError
from .fileio import (held, hold, process_alive, regular_file, replace_durably, reserve_space, temp_owner,
                     temp_path, write_bytes, write_json)
from .model import Padding
from .userpaths import cache_root

VERSION = 2              # 2: shared first tokens computed once (npgpt.prefix_tree)
ENV = "NPGPT_CACHE_DIR"
MARKER = "CACHEDIR.TAG"
MARKER_TEXT = ("Signature: 8a477f597d28d172789f06886806bc55\n"
               "# npgpt prefix cache: the frozen-prefix activations of npgpt runs (`python -m npgpt.cache`).\n")
SUBFOLDER = "npgpt-prefix-cache"
ENTRY = re.compile(r"[0-9a-f]{64}\.(npy|json)\Z")                                   # <key>.npy, <key>.json
DEFAULT_MAX_FRACTION = 0.1     # the default size cap: a tenth of the disk the cache is on
LEFTOVER = re.compile(r"\.([0-9a-f]{64}\.(npy|json)|CACHEDIR\.TAG)\.\d+\.[a-z0-9_]+\.tmp\Z")  # fileio.temp_path's


def default_dir() -> str:
    """The cache folder: $NPGPT_CACHE_DIR, else ~/.cache/npgpt/prefix ($XDG_CACHE_HOME/npgpt/prefix
    when that is set: `npgpt.userpaths`)."""
    return os.environ.get(ENV) or os.path.join(cache_root(), "prefix")


def cache_folder(given) -> str:
    """The folder the cache keeps its files in, for a --cache-dir (or $NPGPT_CACHE_DIR) `given`:
    `given` itself when it is new, empty, marked as npgpt's or holds only the cache's own files;
    else its subfolder SUBFOLDER, so that the cache never mixes its files with anyone else's."""
    given = os.fspath(given)
    return given if _ours(given) else os.path.join(given, SUBFOLDER)


def _ours(folder) -> bool:
    """Whether `folder` is (or can become) the cache's: missing, marked, or only its own files."""
    try:
        names = os.listdir(folder)
    except FileNotFoundError:
        return True
    except OSError:
        return False
    return _marked(folder) or all(n == MARKER or ENTRY.match(n) or LEFTOVER.match(n) for n in names)


def _marked(folder) -> bool:
    path = os.path.join(folder, MARKER)
    if not regular_file(path):
        return False
    try:
        with open(path, "rb") as fh:
            return b"npgpt prefix cache" in fh.read(4096)
    except OSError:
        return False


def claim_folder(folder) -> None:
    """Create the cache folder if needed and mark it as npgpt's; TrainingError when it holds
    files the cache did not write (a subfolder someone else made, say)."""
    os.makedirs(folder, exist_ok=True)
    if _marked(folder):
        return
    if not _ours(folder):
        raise TrainingError(f"the prefix cache folder {folder} holds files npgpt did not write: "
                            "give --cache-dir a new or empty folder")
    write_bytes(os.path.join(folder, MARKER), MARKER_TEXT.encode())


def default_max_bytes(folder) -> int:
    """The default size cap of a cache folder: DEFAULT_MAX_FRACTION of the disk it is (or will be) on."""
    folder = os.path.abspath(os.fspath(folder))
    while not os.path.exists(folder) and os.path.dirname(folder) != folder:
        folder = os.path.dirname(folder)
    return int(shutil.disk_usage(folder).total * DEFAULT_MAX_FRACTION)


def free_memory() -> int:
    """Bytes of memory available now (MemAvailable on Linux; 4 GiB when unknown)."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 4 << 30


def default_memory_limit() -> int:
    """Half of the memory available now: the default of `--cache-memory`."""
    return free_memory() // 2


def parse_size(text: str) -> int:
    """'512M', '2G', '1.5GiB', '100000' (bytes) -> bytes."""
    t = str(text).strip().upper().removesuffix("IB").removesuffix("B")
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}.get(t[-1:], 1)
    number = t[:-1] if t[-1:] in "KMGT" and t else t
    value = float(number)
    if value < 0:
        raise ValueError(text)
    return int(value * mult)


def weight_digests(params, depth: int) -> list:
    """sha256 of the arrays feeding the activations entering block `depth`:
    [embeddings (wte, wpe), block 0, ..., block depth-1], each over names, shapes, dtypes, bytes."""
    def digest(names):
        h = hashlib.sha256()
        for name in names:
            a = np.ascontiguousarray(params[name])
            h.update(f"{name}|{a.shape}|{a.dtype.str}|".encode())
            h.update(memoryview(a).cast("B"))
        return h.hexdigest()
    out = [digest(["wte", "wpe"])]
    for i in range(depth):
        out.append(digest(sorted(n for n in params if n.startswith(f"h{i}/"))))
    return out


class PrefixCache:
    """The cache folder (or no folder, with use_disk=False) and how the prefix is computed.

    log: a function of one string for what the user should see (sizes, hits, corrupt entries).
    max_bytes: the folder's size cap (None: `default_max_bytes`); made_from: what a new entry's
    .json records it was made from, for `python -m npgpt.cache ls` ({"data": ..., "model": ...})."""

    def __init__(self, cache_dir=None, use_disk=True, memory_limit=None, spill_dir=None,
                 max_tokens=2048, log=None, max_bytes=None, made_from=None):
        self.dir = cache_folder(cache_dir or default_dir())
        self.max_bytes = default_max_bytes(self.dir) if max_bytes is None else int(max_bytes)
        self.made_from = dict(made_from or {})
        self.use_disk = use_disk
        self.memory_limit = default_memory_limit() if memory_limit is None else int(memory_limit)
        self.spill_dir = spill_dir
        self.max_tokens = max_tokens
        self.log = log or (lambda msg: None)

    # ------------------------------------------------------------------ keys and entries

    def key(self, digests, seqs_digest: str, depth: int, mode: str) -> str:
        parts = [f"npgpt-prefix-v{VERSION}", *digests[:depth + 1], seqs_digest, f"depth={depth}",
                 f"mode={mode}", f"max_tokens={self.max_tokens}", f"numba={int(fastops.USE_NUMBA)}"]
        return hashlib.sha256("|".join(parts).encode()).hexdigest()

    def keys(self, digests, seqs, depth: int, mode: str) -> list:
        """The keys of the entries holding seqs' activations at depths 0..depth (a list of depth+1)."""
        h = hashlib.sha256()
        h.update(np.array([len(s) for s in seqs], dtype=np.int64).tobytes())
        h.update(np.concatenate(seqs).astype(np.int64).tobytes())
        return [self.key(digests, h.hexdigest(), d, mode) for d in range(depth + 1)]

    def has(self, key) -> bool:
        """Whether entry `key` is there (its .json written last: not verified; `read` verifies)."""
        return regular_file(self._paths(key)[1])

    def _paths(self, key):
        return os.path.join(self.dir, key + ".npy"), os.path.join(self.dir, key + ".json")

    def read(self, key, rows: int, cols: int, dtype):
        """The verified array of an entry, or None (missing; a corrupt entry is removed)."""
        npy, meta_path = self._paths(key)
        if not os.path.lexists(meta_path):
            return None
        try:
            problem = None
            if not (regular_file(meta_path) and regular_file(npy)):    # (np.load of a FIFO never returns)
                raise OSError("not a regular file")
            with open(meta_path) as fh:
                meta = json.load(fh)
            if not isinstance(meta, dict):
                raise ValueError(f"a JSON {type(meta).__name__}, not an object")
            arr = np.load(npy, mmap_mode="r")
            if arr.shape != (rows, cols) or meta.get("rows") != rows or meta.get("cols") != cols:
                problem = f"shape {arr.shape}, expected {(rows, cols)}"
            elif arr.dtype != np.dtype(dtype) or meta.get("dtype") != np.dtype(dtype).str:
                problem = f"dtype {arr.dtype}, expected {np.dtype(dtype)}"
            elif checksum(arr) != meta.get("sha256"):
                problem = "checksum mismatch"
        except (OSError, ValueError, KeyError, TypeError, RecursionError) as e:
            problem = f"unreadable ({type(e).__name__}: {str(e)[:100]})"
        if problem:
            self.log(f"prefix cache entry {key[:16]} is damaged ({problem}): recomputing it")
            remove_entry(self.dir, key)
            return None
        _touch(meta_path)                              # its last use, for eviction
        if rows * cols * arr.dtype.itemsize <= self.memory_limit:
            return np.array(arr)                       # small enough: into memory
        return _held(arr, npy)                         # memory-mapped, read-only, in use while mapped

    def _new_array(self, key, rows, cols, dtype):
        """Where a new prefix is written: memory, or a file when it exceeds the memory limit.
        -> (array, path of its file or None). With the disk cache the file becomes the entry;
        without it (a file in the run folder for this run only) it is unlinked at once where the
        system allows (POSIX): the mapping keeps the data, and no way of stopping the run, not
        even a kill, leaves it behind."""
        nbytes = rows * cols * np.dtype(dtype).itemsize
        if nbytes <= self.memory_limit:
            return np.empty((rows, cols), dtype), None
        folder = self.dir if self.use_disk else (self.spill_dir or self.dir)
        if folder == self.dir:
            claim_folder(folder)
        else:
            os.makedirs(folder, exist_ok=True)
        free = shutil.disk_usage(folder).free
        if free < nbytes + (64 << 20):
            fix = "--cache-dir on a larger disk" if self.use_disk else "--out on a larger disk"
            raise TrainingError(f"the frozen prefix needs {nbytes / 2**30:.2f} GiB on disk in {folder}, "
                                f"{free / 2**30:.2f} GiB are free: free space, give {fix}, or raise --cache-memory")
        path = temp_path(folder, key + ".npy")
        self.log(f"frozen prefix ({nbytes / 2**20:.0f} MiB) exceeds the cache memory limit "
                 f"({self.memory_limit / 2**20:.0f} MiB): kept on disk in {folder}"
                 + ("" if self.use_disk else " for this run only (removed when it ends)"))
        arr = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=(rows, cols))
        try:
            reserve_space(path)            # a full disk: this error now, not a SIGBUS mid-write
        except OSError as e:
            del arr
            os.remove(path)
            raise TrainingError(f"cannot reserve {nbytes / 2**30:.2f} GiB in {folder} for the frozen prefix "
                                f"({e.strerror or e}): free space, or raise --cache-memory") from None
        if not self.use_disk:
            try:
                os.remove(path)
                path = None
            except OSError:                # (Windows: an open file stays until it is closed)
                pass
        return arr, path

    def remove_leftovers(self):
        """Remove the temporary files of runs that stopped without cleaning up (killed while
        computing a prefix): files named by `fileio.temp_path` whose process is gone and that were
        not written to for 2 minutes (a folder shared by machines sees other machines' pids as
        gone). Logged."""
        for name, pid, size in leftovers(self.dir):
            path = os.path.join(self.dir, name)
            if pid is not None and process_alive(pid):
                continue
            try:
                if time.time() - os.path.getmtime(path) < 120:
                    continue
                os.remove(path)
            except OSError:
                continue
            self.log(f"removed {name} ({size / 2**20:.0f} MiB) from {self.dir}: a partial prefix left "
                     f"by a run that stopped while computing it")

    def write(self, key, arr, meta: dict, tmp_path=None):
        """Store arr as entry `key`, atomically. -> the array to use (memory-mapped if it was)."""
        claim_folder(self.dir)
        npy, meta_path = self._paths(key)
        if tmp_path is None:
            tmp_path = temp_path(self.dir, key + ".npy")
            try:
                with open(tmp_path, "wb") as fh:
                    np.save(fh, arr)
            except BaseException:                        # (a full disk): no partial file left
                os.remove(tmp_path)
                raise
        else:
            arr.flush()
        meta = dict(meta, version=VERSION, key=key, rows=int(arr.shape[0]), cols=int(arr.shape[1]),
                    dtype=arr.dtype.str, bytes=int(arr.nbytes), sha256=checksum(arr),
                    created=time.strftime("%Y-%m-%dT%H:%M:%S"), made_from=self.made_from)
        replace_durably(tmp_path, npy)
        write_json(meta_path, meta)
        out = arr if not isinstance(arr, np.memmap) else _held(np.load(npy, mmap_mode="r"), npy)
        for e in evict(self.dir, self.max_bytes, keep={key}):
            self.log(f"removed prefix cache entry {e['key'][:16]} ({e['files_bytes'] / 2**20:.0f} MiB, "
                     f"last used {_when(e['last_used'])}): the cache is kept under {self.max_bytes / 2**30:.2f} "
                     "GiB (--cache-max)")
        return out

    # ------------------------------------------------------------------ the prefix of many sequences

    def activations(self, params, config, seqs, depth: int, mode: str, digests=None, progress=None,
                    lora=None, causal=True):
        """The activations entering block `depth` for each token sequence in seqs: read from the
        cache, or computed (from the deepest cached depth below, if any) and stored.

        seqs: list of 1-D int arrays (distinct sequences); mode: a string naming how they were
        made (pooling and pad length), part of the key. digests: `weight_digests(params, depth)`
        (computed here when None). progress: called with a number of tokens done. lora, causal: as
        for `model.block_forward` (mode must name a causal=False run: the key does not see it).
        -> (flat [N,C] array, offsets [S+1]): sequence s is flat[offsets[s]:offsets[s+1]]"""
        lengths = np.array([len(s) for s in seqs], dtype=np.int64)                 # [S]
        offsets = np.concatenate([[0], np.cumsum(lengths)])                         # [S+1]
        shape, dtype = (int(offsets[-1]), config.n_embd), params["wte"].dtype
        digests = weight_digests(params, depth) if digests is None else digests
        keys = self.keys(digests, seqs, depth, mode)
        use_disk = self.use_disk and depth > 0      # the embeddings alone cost less to look up than to read
        start_depth, src = self._deepest(keys, shape, dtype) if use_disk else (0, None)
        if src is not None and start_depth == depth:
            self._say_read(depth, shape, dtype)
            if progress:
                progress(shape[0])
            return src, offsets
        out, tmp_path = self._computed(params, config, seqs, offsets, keys[depth], shape, dtype,
                                       start_depth, depth, src, lora, causal, progress)
        meta = {"depth": depth, "sequences": len(seqs), "mode": mode, "weights": digests[0][:16]}
        return self._kept(keys[depth], out, tmp_path, meta, use_disk), offsets

    def _deepest(self, keys, shape, dtype):
        """(depth, array) of the deepest entry among keys[1..] in the cache, or (0, None)."""
        self.remove_leftovers()
        for d in range(len(keys) - 1, 0, -1):
            src = self.read(keys[d], *shape, dtype)
            if src is not None:
                return d, src
        return 0, None

    def _say_read(self, depth, shape, dtype):
        nbytes = shape[0] * shape[1] * np.dtype(dtype).itemsize
        self.log(f"frozen prefix (blocks 0..{depth - 1}, {shape[0]} tokens, {nbytes / 2**20:.0f} MiB) "
                 f"read from the cache {self.dir}" + ("" if nbytes <= self.memory_limit else
                 f" (above the cache memory limit of {self.memory_limit / 2**20:.0f} MiB: "
                 f"memory-mapped, streamed from disk)"))

    def _computed(self, params, config, seqs, offsets, key, shape, dtype, start_depth, depth, src,
                  lora, causal, progress):
        """The activations computed into a new array (in memory or its file; an error or Ctrl-C
        removes the partial file). -> (array, its temporary file or None)"""
        rows, cols = shape
        nbytes = rows * cols * np.dtype(dtype).itemsize
        if depth > 0:
            what = f"blocks {start_depth}..{depth - 1}" + (f" from the cached depth {start_depth}" if start_depth else "")
            self.log(f"computing the frozen prefix: {what}, {rows} tokens x {cols} = {nbytes / 2**20:.0f} MiB")
        out, tmp_path = self._new_array(key, rows, cols, dtype)
        try:
            computed = prefix.compute(params, config, seqs, offsets, out, start_depth, depth, src, lora=lora,
                                      causal=causal, max_tokens=self.max_tokens, progress=progress)
        except BaseException:
            if tmp_path is not None and os.path.exists(tmp_path):
                os.remove(tmp_path)
            raise
        if depth > 0 and computed < rows:
            self.log(f"computed {computed} of the {rows} rows: first tokens that several sequences share, once")
        return out, tmp_path

    def _kept(self, key, out, tmp_path, meta, use_disk):
        """The computed array as the run reads it: stored as the entry `key` (with the disk cache),
        or for this run only (read-only; a file on disk is unlinked, the mapping keeps its data)."""
        nbytes = out.nbytes
        if use_disk:
            try:
                out = self.write(key, out, meta, tmp_path)
                self.log(f"saved the frozen prefix ({nbytes / 2**20:.0f} MiB) to the cache {self.dir}")
                return out
            except OSError as e:
                self.log(f"could not save the frozen prefix to {self.dir} ({e.strerror or e}); continuing")
        if tmp_path is not None and os.path.exists(tmp_path):   # not unlinked at once (see _new_array): now
            out.flush()
            out = np.load(tmp_path, mmap_mode="r")
            try:
                os.remove(tmp_path)
            except OSError:
                self.log(f"{tmp_path} ({nbytes / 2**20:.0f} MiB) could not be removed now: remove it after the run")
            return out
        if isinstance(out, np.memmap):                     # its file unlinked at once: read-only from here
            out.flush()
            out.flags.writeable = False
        return out


def dataset_activations(store, params, config, datasets, start: int, pooling: str, causal=True,
                        progress=None, digests=None, lora=None, sharded=None, sized=None):
    """The activations entering block `start` for every example of every dataset, each distinct
    sequence computed once (`prefix.distinct_sequences`): at its true length, or padded to the
    dataset's pad length when the padding is read (last_position pooling, no causal mask).
    store: a PrefixCache (PrefixCache(use_disk=False): in memory, no disk). sharded: None (one
    entry), or a function called as `store.activations` is, giving one [T,C] array per sequence
    (`npgpt.prefix_shards`: one entry per group of sequences, computed elsewhere). progress: called
    with a number of tokens done; sized: called first with (tokens, sequences) of the distinct
    sequences, the total that progress counts to (a text that occurs twice is computed once).
    -> per dataset, a list of [T_i, C] arrays (views of one array, or of one per shard), or None
       for a dataset whose activations depend on the batch (it reads the padding and pads per batch)"""
    padding_of = lambda d: Padding(pooling, causal, d.pad_to)
    seqs, where = prefix.distinct_sequences(datasets, padding_of)
    if not seqs:
        return [None] * len(datasets)
    if sized:
        sized(sum(len(s) for s in seqs), len(seqs))
    reads = Padding(pooling, causal).reads_padding
    pad_to = next(d.pad_to for d, w in zip(datasets, where) if w is not None)
    mode = f"{pooling}:{pad_to}" + ("" if causal else ":no-causal-mask") if reads else pooling
    if sharded is None:
        flat, offsets = store.activations(params, config, seqs, start, mode, digests=digests, progress=progress,
                                          lora=lora, causal=causal)
        views = [flat[offsets[u]:offsets[u + 1]] for u in range(len(seqs))]
    else:
        views = sharded(params, config, seqs, start, mode, digests=digests, progress=progress, lora=lora,
                        causal=causal)
    return [None if rows is None else [views[u] for u in rows] for rows in where]


def prefetch(feats, rows) -> None:
    """Start reading the memory-mapped activations of examples `rows` now (madvise WILLNEED):
    the system reads them in the background, so the batch built from them later finds them in
    memory instead of waiting on one page fault after another. A no-op for arrays in memory.
    feats: list of [T_i,C] views of memory-mapped arrays (one, or one per shard: each view's own
    mapping is advised)."""
    import mmap
    if feats is None or not len(rows) or not hasattr(mmap, "MADV_WILLNEED"):
        return
    bases = {}                                                    # id of a mapping -> where it starts
    for r in rows:
        v = feats[r]
        mm = getattr(v, "_mmap", None)
        if mm is None or not hasattr(mm, "madvise"):
            continue
        if id(mm) not in bases:
            bases[id(mm)] = np.frombuffer(mm, np.uint8).ctypes.data
        start = v.ctypes.data - bases[id(mm)]
        lo = start - start % mmap.PAGESIZE
        mm.madvise(mmap.MADV_WILLNEED, lo, min(len(mm), start + v.nbytes) - lo)


def checksum(arr) -> str:
    """sha256 of an array's bytes, read 64 MiB at a time (works on memory-mapped arrays)."""
    h = hashlib.sha256()
    flat = arr.reshape(arr.shape[0], -1) if arr.ndim > 1 else arr.reshape(-1, 1)
    step = max(1, (64 << 20) // max(1, flat[0:1].nbytes))
    for i in range(0, flat.shape[0], step):
        h.update(memoryview(np.ascontiguousarray(flat[i:i + step])).cast("B"))
    return h.hexdigest()


# ----------------------------------------------------------------------------- listing and clearing

def entries(cache_dir=None) -> list:
    """The entries of a cache folder: dicts from their .json, plus 'files_bytes'; sorted by time."""
    d = cache_folder(cache_dir or default_dir())
    out = []
    if not os.path.isdir(d):
        return out
    for name in sorted(os.listdir(d)):
        if not (ENTRY.match(name) and name.endswith(".json")):
            continue
        key = name[:-5]
        path, npy = os.path.join(d, name), os.path.join(d, key + ".npy")
        try:
            if not regular_file(path):
                raise OSError("not a regular file")
            with open(path) as fh:
                meta = json.load(fh)
            if not isinstance(meta, dict):
                raise ValueError("not an object")
        except (OSError, ValueError, RecursionError):
            meta = {"key": key, "damaged": True}
        meta["files_bytes"] = sum(os.lstat(p).st_size for p in (npy, path) if regular_file(p))
        meta["key"] = key
        meta["last_used"] = os.lstat(path).st_mtime
        meta["in_use"] = regular_file(npy) and held(npy)
        out.append(meta)
    return sorted(out, key=lambda m: m["last_used"])


def leftovers(cache_dir=None) -> list:
    """Temporary files in a cache folder (named by `fileio.temp_path`): [(name, pid of the process
    that writes it, bytes)]. A file whose process still runs is being written; any other was left
    by a run that was killed."""
    d = cache_folder(cache_dir or default_dir())
    out = []
    if not os.path.isdir(d):
        return out
    for name in sorted(os.listdir(d)):
        pid = temp_owner(name)
        if pid is None or not LEFTOVER.match(name):
            continue
        try:
            out.append((name, pid, os.path.getsize(os.path.join(d, name))))
        except OSError:
            pass
    return out


def remove_entry(cache_dir, key):
    """Remove an entry's two files (whatever they are: a damaged entry may be a folder or a FIFO).
    A folder in an entry's place is removed only when empty; the entry then cannot be saved."""
    for suffix in (".json", ".npy"):
        path = os.path.join(cache_dir, key + suffix)
        try:
            if os.path.isdir(path) and not os.path.islink(path):
                os.rmdir(path)
            else:
                os.remove(path)
        except OSError:
            pass


def clear(cache_dir=None, older_than=None) -> tuple:
    """Remove the entries not in use (and, clearing all, the temporary files of runs no longer
    running): only files the cache can identify as its own (`cache_folder`, `ENTRY`, `LEFTOVER`).
    older_than: seconds; only the entries last used longer ago.
    -> (entries removed, bytes freed, entries kept in use)"""
    d = cache_folder(cache_dir or default_dir())
    if not os.path.isdir(d):
        return 0, 0, 0
    now, n, freed, busy = time.time(), 0, 0, set()
    for e in entries(d):
        if older_than is not None and now - e["last_used"] < older_than:
            continue
        if e["in_use"]:
            busy.add(e["key"])
            continue
        remove_entry(d, e["key"])
        n, freed = n + 1, freed + e["files_bytes"]
    for name in os.listdir(d) if older_than is None else []:
        path = os.path.join(d, name)               # an entry's half left by a crash, a leftover
        pid = temp_owner(name)
        being_written = LEFTOVER.match(name) and pid is not None and process_alive(pid)
        if ((ENTRY.match(name) and name[:64] not in busy) or (LEFTOVER.match(name) and not being_written)) \
                and not os.path.isdir(path):
            freed += os.lstat(path).st_size
            os.remove(path)
    return n, freed, len(busy)


def evict(cache_dir, max_bytes: int, keep=()) -> list:
    """Remove the entries used longest ago until the folder's entries take at most max_bytes;
    never one in use or named in `keep`. -> the entries removed (dicts as `entries` gives)"""
    found = entries(cache_dir)                           # least recently used first
    total = sum(e["files_bytes"] for e in found)
    removed = []
    for e in found:
        if total <= max_bytes:
            break
        if e["key"] in keep or e["in_use"]:
            continue
        remove_entry(cache_folder(cache_dir), e["key"])
        total -= e["files_bytes"]
        removed.append(e)
    return removed


def _touch(path) -> None:
    """Set a file's modification time to now: an entry's .json records its last use so."""
    try:
        os.utime(path)
    except OSError:
        pass


def _held(arr, npy):
    """The memory-mapped entry `arr`, holding a shared lock on its file for as long as it (or any
    view of it) lives: the entry is in use (`fileio.hold`)."""
    arr._npgpt_hold = hold(npy)
    return arr


def _when(t) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(t))
