"""The disk cache of frozen-prefix activations (npgpt.prefix_cache): a run from the cache ends with
exactly the parameters of a run that computed the prefix; a deeper prefix computed from a cached
shallower one is the same bits; damaged or partial entries are recomputed; a prefix above the
memory limit stays on disk and trains the same; `python -m npgpt.cache ls|clear`."""
import json
import os
import time

import numpy as np
import pytest

from npgpt import fileio, model, params as P, prefix_cache
from npgpt.cli import cache as cache_cli
from npgpt.config import GPT2Config
from npgpt.errors import TrainingError
from npgpt.runconfig import RunConfig, RunOptions
from npgpt.train import train_run
from helpers import SMS


@pytest.fixture(scope="module")
def datasets(shared_data, bpe_dir, tmp_path_factory):
    """How _fit's runs read the SMS data: the file, a data folder, the BPE folder."""
    return dict(data=str(shared_data / SMS), data_dir=str(tmp_path_factory.mktemp("data")), bpe_dir=bpe_dir)


def _fit(datasets, run_dir, **options):
    """A tiny one-epoch SMS run through the run service -> (trained params, metrics, log lines)."""
    logs = []
    run = RunConfig(model="tiny", epochs=1, eval_freq=40, **datasets)
    result = train_run(run, RunOptions(out=str(run_dir), progress=False, plots=False, **options), log=logs.append)
    return result.classifier.params, result.metrics, logs


def _random_seqs(n, seed=0, vocab=50257, max_len=40):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab, size=int(rng.integers(1, max_len))) for _ in range(n)]


def test_cached_run_ends_with_the_same_parameters(datasets, tmp_path):
    cdir = str(tmp_path / "cache")
    p0, m0, _ = _fit(datasets, tmp_path / "nodisk", cache_disk=False)             # computed, no disk
    p1, m1, logs1 = _fit(datasets, tmp_path / "first", cache_dir=cdir)             # computed, written
    assert any("saved the frozen prefix" in s for s in logs1)
    (entry,) = prefix_cache.entries(cdir)                                          # what `cache ls` shows
    assert entry["made_from"] == {"data": os.path.abspath(datasets["data"]), "model": "tiny"}
    p2, m2, logs2 = _fit(datasets, tmp_path / "second", cache_dir=cdir)            # read from disk
    assert any("read from the cache" in s for s in logs2) and not any("computing" in s for s in logs2)
    for name in p0:
        assert np.array_equal(p0[name], p1[name]) and np.array_equal(p0[name], p2[name]), name
    assert m0 == m1 == m2


def test_a_shallower_entry_serves_a_deeper_run_bit_for_bit(tmp_path):
    cfg = GPT2Config(n_layer=4, n_head=4, n_embd=64)
    params = P.init_params(cfg, seed=1, num_classes=2)
    seqs = _random_seqs(60)
    digests = prefix_cache.weight_digests(params, 3)
    fresh, off = prefix_cache.PrefixCache(use_disk=False, max_tokens=256).activations(
        params, cfg, seqs, 3, "last_token", digests)
    logs = []
    store = prefix_cache.PrefixCache(str(tmp_path), max_tokens=256, log=logs.append)
    store.activations(params, cfg, seqs, 1, "last_token", digests)                 # depth 1 on disk
    from_1, off_1 = store.activations(params, cfg, seqs, 3, "last_token", digests)  # blocks 1..2 from it
    assert any("from the cached depth 1" in s for s in logs)
    assert np.array_equal(off, off_1) and np.array_equal(fresh, from_1)
    # and the packed prefix equals the per-sequence forward (to float32 round-off)
    for s in (0, 17, 59):
        ref = model.forward_prefix(params, cfg, seqs[s][None], 3)[0]
        np.testing.assert_allclose(fresh[off[s]:off[s + 1]], ref, rtol=1e-4, atol=1e-5)
    # another depth, other tokens or other weights: other keys
    keys = {store.key(digests, "a", 3, "last_token"), store.key(digests, "a", 2, "last_token"),
            store.key(digests, "b", 3, "last_token"), store.key(digests, "a", 3, "last_position:120")}
    params["h0/mlp/c_fc/w"][0, 0] += 1
    keys.add(store.key(prefix_cache.weight_digests(params, 3), "a", 3, "last_token"))
    assert len(keys) == 5


@pytest.mark.parametrize("damage", ["flip", "truncate", "no_meta", "bad_meta", "shape"])
def test_damaged_entries_are_recomputed(tmp_path, damage):
    cfg = GPT2Config(n_layer=2, n_head=4, n_embd=64)
    params = P.init_params(cfg, seed=2, num_classes=2)
    seqs = _random_seqs(30, seed=3)
    store = prefix_cache.PrefixCache(str(tmp_path), max_tokens=128)
    good, _ = store.activations(params, cfg, seqs, 2, "last_token")
    (entry,) = prefix_cache.entries(str(tmp_path))
    npy, meta = tmp_path / (entry["key"] + ".npy"), tmp_path / (entry["key"] + ".json")
    if damage == "flip":                       # one byte of the activations changed
        raw = bytearray(npy.read_bytes())
        raw[-7] ^= 0x40
        npy.write_bytes(bytes(raw))
    elif damage == "truncate":                 # a partial array
        npy.write_bytes(npy.read_bytes()[:-512])
    elif damage == "no_meta":                  # interrupted before the description was written
        meta.unlink()
    elif damage == "bad_meta":
        meta.write_text("{not json")
    else:                                      # a well-formed array of the wrong shape
        np.save(npy, np.zeros((3, 64), np.float32))
    logs = []
    store.log = logs.append
    again, _ = store.activations(params, cfg, seqs, 2, "last_token")
    assert np.array_equal(again, good)
    assert any("computing" in s for s in logs)
    if damage != "no_meta":
        assert any("damaged" in s for s in logs)
    # the recomputed entry is whole again and is read next time
    logs.clear()
    store.activations(params, cfg, seqs, 2, "last_token")
    assert any("read from the cache" in s for s in logs)


def test_above_the_memory_limit_the_prefix_stays_on_disk(datasets, tmp_path):
    p0, m0, _ = _fit(datasets, tmp_path / "mem", cache_disk=False)
    p1, m1, logs = _fit(datasets, tmp_path / "disk", cache_disk=False, cache_memory=0)   # spilled, run folder
    assert any("exceeds the cache memory limit" in s for s in logs)
    assert not [f for f in os.listdir(tmp_path / "disk") if ".npy" in f]               # removed at once
    cdir = str(tmp_path / "cache")
    p2, m2, _ = _fit(datasets, tmp_path / "c1", cache_dir=cdir, cache_memory=0)          # written to the cache
    p3, m3, logs3 = _fit(datasets, tmp_path / "c2", cache_dir=cdir, cache_memory=0)      # memory-mapped from it
    assert any("read from the cache" in s for s in logs3)
    for name in p0:
        for p in (p1, p2, p3):
            assert np.array_equal(p0[name], p[name]), name
    assert m0 == m1 == m2 == m3


def test_memory_mapped_read(tmp_path):
    cfg = GPT2Config(n_layer=2, n_head=4, n_embd=64)
    params = P.init_params(cfg, seed=4, num_classes=2)
    seqs = _random_seqs(20, seed=5)
    a, _ = prefix_cache.PrefixCache(str(tmp_path)).activations(params, cfg, seqs, 2, "last_token")
    b, _ = prefix_cache.PrefixCache(str(tmp_path), memory_limit=0).activations(params, cfg, seqs, 2, "last_token")
    assert isinstance(b, np.memmap) and not isinstance(a, np.memmap) and np.array_equal(a, b)


def test_parse_size():
    assert prefix_cache.parse_size("512M") == 512 << 20
    assert prefix_cache.parse_size("2G") == 2 << 30
    assert prefix_cache.parse_size("1.5GiB") == 3 << 29
    assert prefix_cache.parse_size("1000") == 1000
    with pytest.raises(ValueError):
        prefix_cache.parse_size("lots")


def test_cache_cli_ls_and_clear(tmp_path, capsys):
    cfg = GPT2Config(n_layer=2, n_head=4, n_embd=64)
    params = P.init_params(cfg, seed=6, num_classes=2)
    store = prefix_cache.PrefixCache(str(tmp_path))
    store.activations(params, cfg, _random_seqs(10), 1, "last_token")
    store.activations(params, cfg, _random_seqs(10), 2, "last_token")
    assert cache_cli.main(["ls", "--cache-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "2 entries" in out and "depth 1" in out and "depth 2" in out
    assert cache_cli.main(["clear", "--cache-dir", str(tmp_path)]) == 0
    assert "removed 2 entries" in capsys.readouterr().out
    assert prefix_cache.entries(str(tmp_path)) == [] and os.listdir(tmp_path) == [prefix_cache.MARKER]


def test_default_folder_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("NPGPT_CACHE_DIR", str(tmp_path / "x"))
    assert prefix_cache.default_dir() == str(tmp_path / "x")
    monkeypatch.delenv("NPGPT_CACHE_DIR")
    assert prefix_cache.default_dir().endswith(os.path.join(".cache", "npgpt", "prefix"))


@pytest.mark.parametrize("use_disk", [False, True])
def test_depth_zero_is_the_embeddings(tmp_path, use_disk):
    """A run whose first trainable block is block 0 (LoRA in every block, or every block trainable)
    gets only the embeddings wte[id] + wpe[position], never stored on disk, twice in a row (the second call may not
    read back an entry that was never written)."""
    cfg = GPT2Config(n_layer=2, n_head=2, n_embd=16, vocab_size=50257, n_ctx=64)
    params = P.init_params(cfg, seed=3, num_classes=2)
    seqs = _random_seqs(5, seed=4, max_len=20)
    for _ in range(2):
        store = prefix_cache.PrefixCache(str(tmp_path), use_disk=use_disk, max_tokens=32)
        flat, offsets = store.activations(params, cfg, seqs, 0, "last_token")
        for s, ids in enumerate(seqs):
            want = params["wte"][ids] + params["wpe"][np.arange(len(ids))]          # [T,C]
            np.testing.assert_array_equal(flat[offsets[s]:offsets[s + 1]], want)
        assert prefix_cache.entries(str(tmp_path)) == []   # the embeddings are never written to disk


class _Stop(Exception):
    pass


def _stop_after_first_pack(_):
    raise _Stop


@pytest.mark.parametrize("use_disk", [False, True])
def test_a_failed_spilled_computation_leaves_no_file(tmp_path, use_disk):
    """An error (or Ctrl-C) while a prefix above the memory limit is being written to its file
    removes the partial file, in the cache folder and in the run folder alike."""
    cfg = GPT2Config(n_layer=2, n_head=4, n_embd=64)
    params = P.init_params(cfg, seed=7, num_classes=2)
    cdir, run = tmp_path / "cache", tmp_path / "run"
    run.mkdir()
    store = prefix_cache.PrefixCache(str(cdir), use_disk=use_disk, memory_limit=0, spill_dir=str(run), max_tokens=64)
    with pytest.raises(_Stop):
        store.activations(params, cfg, _random_seqs(40, seed=8), 2, "last_token", progress=_stop_after_first_pack)
    assert os.listdir(run) == [] and (not cdir.exists() or os.listdir(cdir) in ([], [prefix_cache.MARKER]))


def test_the_run_folder_file_is_unlinked_while_it_is_written(tmp_path):
    """Without the disk cache, the spilled prefix lives in the run folder with no name from its
    first byte on: a killed run leaves nothing behind. It still trains from the same numbers."""
    cfg = GPT2Config(n_layer=2, n_head=4, n_embd=64)
    params = P.init_params(cfg, seed=9, num_classes=2)
    seqs = _random_seqs(40, seed=10)
    run = tmp_path / "run"
    run.mkdir()
    seen = []
    store = prefix_cache.PrefixCache(str(tmp_path / "cache"), use_disk=False, memory_limit=0, spill_dir=str(run),
                                     max_tokens=64)
    flat, off = store.activations(params, cfg, seqs, 2, "last_token", progress=lambda n: seen.append(os.listdir(run)))
    assert len(seen) > 1 and all(s == [] for s in seen) and os.listdir(run) == []
    ref, off_ref = prefix_cache.PrefixCache(use_disk=False, max_tokens=64).activations(params, cfg, seqs, 2, "last_token")
    assert isinstance(flat, np.memmap) and not flat.flags.writeable
    assert np.array_equal(off, off_ref) and np.array_equal(np.asarray(flat), ref)


def test_a_killed_runs_partial_file_is_listed_then_removed(tmp_path, capsys):
    """A run killed while writing its prefix into the cache leaves its temporary file (named by
    fileio.temp_path: .<key>.npy.<pid>.<random>.tmp): `cache ls` shows it, the next run removes it
    and says so; a file of a process still running, or one written to in the last 2 minutes, is kept."""
    import subprocess
    import sys
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    dead = tmp_path / f".{'ab' * 32}.npy.{p.pid}.x1y2z3w4.tmp"
    live = tmp_path / f".{'cd' * 32}.npy.{os.getpid()}.a1b2c3d4.tmp"
    assert fileio.temp_owner(dead.name) == p.pid and fileio.temp_owner(live.name) == os.getpid()
    dead.write_bytes(b"\0" * (3 << 20))
    live.write_bytes(b"\0" * 1024)
    fresh = tmp_path / f".{'ef' * 32}.npy.{p.pid}.q1r2s3t4.tmp"   # written to a moment ago: maybe another machine's
    fresh.write_bytes(b"\0" * 1024)
    old = time.time() - 600
    for f in (dead, live):
        os.utime(f, (old, old))
    assert cache_cli.main(["ls", "--cache-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert f"{dead.name}  3.0 MiB  partial: left by a stopped run" in out
    assert f"{live.name}  0.0 MiB  partial: being written" in out
    cfg = GPT2Config(n_layer=2, n_head=4, n_embd=64)
    params = P.init_params(cfg, seed=11, num_classes=2)
    logs = []
    prefix_cache.PrefixCache(str(tmp_path), log=logs.append).activations(params, cfg, _random_seqs(5), 1, "last_token")
    assert not dead.exists() and live.exists() and fresh.exists()
    assert any(f"removed {dead.name} (3 MiB)" in s for s in logs)


def test_too_little_disk_for_the_spill_is_one_clear_error(tmp_path, monkeypatch):
    import collections
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(prefix_cache.shutil, "disk_usage", lambda path: usage(1 << 30, 1 << 30, 1 << 20))
    cfg = GPT2Config(n_layer=2, n_head=4, n_embd=64)
    params = P.init_params(cfg, seed=12, num_classes=2)
    for use_disk, fix in ((True, "--cache-dir"), (False, "--out")):
        store = prefix_cache.PrefixCache(str(tmp_path), use_disk=use_disk, memory_limit=0, spill_dir=str(tmp_path))
        with pytest.raises(TrainingError) as e:
            store.activations(params, cfg, _random_seqs(10), 1, "last_token")
        msg = str(e.value)
        assert "\n" not in msg and f"give {fix} on a larger disk" in msg and "--cache-memory" in msg
        assert str(tmp_path) in msg and os.listdir(tmp_path) in ([], [prefix_cache.MARKER])


def test_prefetch_asks_for_any_examples_pages_and_changes_nothing(tmp_path):
    """prefetch (madvise WILLNEED on the next batch of a memory-mapped prefix) takes examples at
    any offset, not only page-aligned ones, and leaves the numbers alone; in memory it does nothing."""
    cfg = GPT2Config(n_layer=2, n_head=4, n_embd=24)
    params = P.init_params(cfg, seed=13, num_classes=2)
    seqs = _random_seqs(50, seed=14)
    flat, off = prefix_cache.PrefixCache(str(tmp_path), memory_limit=0).activations(params, cfg, seqs, 1, "last_token")
    assert isinstance(flat, np.memmap)
    feats = [flat[off[u]:off[u + 1]] for u in range(len(seqs))]
    before = [np.array(f) for f in feats]
    assert any((f.ctypes.data % 4096) != 0 for f in feats)        # unaligned starts are exercised
    prefix_cache.prefetch(feats, list(range(len(feats))))
    prefix_cache.prefetch(feats, [len(feats) - 1, 0])
    prefix_cache.prefetch(before, [0, 1])                          # arrays in memory: nothing to do
    prefix_cache.prefetch(None, [0])
    assert all(np.array_equal(a, np.asarray(b)) for a, b in zip(before, feats))


# ----------------------------------------------------------------------------- what is kept: ls, age, size cap, in use

def _entry(store, seed, n=10, depth=1):
    """Store one entry (its own random sequences) -> (its array as the store returns it, its key)."""
    cfg = GPT2Config(n_layer=2, n_head=4, n_embd=64)
    params = P.init_params(cfg, seed=20, num_classes=2)
    before = {e["key"] for e in prefix_cache.entries(store.dir)}
    seqs = list(np.random.default_rng(seed).integers(0, 50257, size=(n, 12)))   # every entry the same size
    arr, _ = store.activations(params, cfg, seqs, depth, "last_token")
    (key,) = {e["key"] for e in prefix_cache.entries(store.dir)} - before or {None}
    return arr, key


def _age(folder, key, days):
    old = time.time() - days * 86400
    os.utime(os.path.join(folder, key + ".json"), (old, old))


def test_ls_says_what_each_entry_was_made_from(tmp_path, capsys):
    store = prefix_cache.PrefixCache(str(tmp_path), made_from={"data": "/home/u/tickets.csv", "model": "124M (/w.h5)"})
    _entry(store, seed=1)
    assert cache_cli.main(["ls", "--cache-dir", str(tmp_path)]) == 0
    line = capsys.readouterr().out.splitlines()[1]
    today = time.strftime("%Y-%m-%d")
    assert "data /home/u/tickets.csv  model 124M (/w.h5)  depth 1" in line and f"last used {today}" in line
    assert "MiB" in line and "IN USE" not in line


def test_a_read_is_a_use_and_clear_older_than_removes_only_unused_entries(tmp_path, capsys):
    store = prefix_cache.PrefixCache(str(tmp_path))
    _, old_key = _entry(store, seed=1)
    _, new_key = _entry(store, seed=2)
    _age(tmp_path, old_key, 10)
    _age(tmp_path, new_key, 10)
    _entry(store, seed=2)                                              # read again: used now
    assert [e["key"] for e in prefix_cache.entries(str(tmp_path))] == [old_key, new_key]   # oldest use first
    assert cache_cli.main(["clear", "--older-than", "5", "--cache-dir", str(tmp_path)]) == 0
    assert "removed 1 entry not used for 5 days" in capsys.readouterr().out
    assert [e["key"] for e in prefix_cache.entries(str(tmp_path))] == [new_key]
    with pytest.raises(SystemExit):
        cache_cli.main(["ls", "--older-than", "5", "--cache-dir", str(tmp_path)])


def test_the_size_cap_removes_the_least_recently_used(tmp_path):
    logs = []
    store = prefix_cache.PrefixCache(str(tmp_path), log=logs.append)
    _, a = _entry(store, seed=1)
    _, b = _entry(store, seed=2)
    _age(tmp_path, a, 2)
    _age(tmp_path, b, 1)
    _entry(store, seed=1)                                              # a read: a is now the most recent
    size = max(e["files_bytes"] for e in prefix_cache.entries(str(tmp_path)))
    store.max_bytes = int(2.5 * size)                                  # room for two entries
    _, c = _entry(store, seed=3)
    assert {e["key"] for e in prefix_cache.entries(str(tmp_path))} == {a, c}
    assert any(f"removed prefix cache entry {b[:16]}" in s and "--cache-max" in s for s in logs)
    store.max_bytes = 0                                                # a new entry is kept, every other goes
    _, d = _entry(store, seed=4)
    assert [e["key"] for e in prefix_cache.entries(str(tmp_path))] == [d]


def test_an_entry_in_use_and_files_not_the_caches_are_never_removed(tmp_path, capsys):
    """A memory-mapped entry (a running job streams it from disk) holds a lock on its file while
    the mapping lives: eviction and clear keep it, ls says so; once it is dropped it goes."""
    import gc
    store = prefix_cache.PrefixCache(str(tmp_path), memory_limit=0)
    mapped, key = _entry(store, seed=1)
    assert isinstance(mapped, np.memmap)
    view = mapped[3:5]                                                 # a view keeps the lock too
    del mapped
    (tmp_path / "notes.txt").write_text("mine")                        # someone else's file in the folder
    written = tmp_path / f".{'cd' * 32}.npy.{os.getpid()}.a1b2c3d4.tmp"    # an entry a live job is writing
    written.write_bytes(b"\0" * 1024)
    assert prefix_cache.evict(str(tmp_path), 0) == []
    assert cache_cli.main(["clear", "--cache-dir", str(tmp_path)]) == 0
    assert "removed 0 entries (0.0 MiB)" in capsys.readouterr().out
    assert cache_cli.main(["ls", "--cache-dir", str(tmp_path)]) == 0
    assert "IN USE" in capsys.readouterr().out
    assert cache_cli.main(["clear", "--cache-dir", str(tmp_path)]) == 0
    assert "kept 1 entry in use by a running job" in capsys.readouterr().out
    del view
    gc.collect()
    assert [e["key"] for e in prefix_cache.evict(str(tmp_path), 0)] == [key]
    assert prefix_cache.clear(str(tmp_path))[2] == 0
    assert sorted(os.listdir(tmp_path)) == [written.name, prefix_cache.MARKER, "notes.txt"]


def test_cache_max_is_a_size():
    from npgpt.runconfig import ConfigError
    assert RunOptions(cache_max="20G").cache_max_bytes == 20 << 30
    with pytest.raises(ConfigError, match="cache-max.*must be a size"):
        RunOptions(cache_max="lots")
