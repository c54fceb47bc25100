"""Untrusted files stay harmless (issue 21): each file an attacker could hand a user, built here,
and what npgpt must do with it.

- A model file reads nothing but itself: external storage, external and soft links and virtual
  datasets are refused by name, before a byte of another file is read.
- Small inputs cannot take gigabytes: a compressed bomb, a huge declared vocabulary, a huge stored
  tokenizer, a huge meta attribute, a zip bomb. These run as a user runs them, in a subprocess
  whose address space is capped (`resource.setrlimit(RLIMIT_AS)`): the run must end with one line
  naming the file, never a MemoryError, a traceback or a kill.
- The base weights a model names are size-checked before they are hashed.
- No label, text or file name reaches the terminal raw.
- The prefix cache deletes only its own files, survives a full disk without SIGBUS, and
  recomputes entries that are FIFOs, folders or the wrong JSON.
- A JSONL line nested past the recursion limit is a bad line; the SMS zip never writes over a
  file and cleans up after itself; labels are checked (duplicates, lists and dicts).
"""
import csv
import errno
import json
import os
import resource
import subprocess
import sys
import zipfile
import zlib

import h5py
import numpy as np
import pytest

from helpers import REPO, SMALL_GPT2, SMS, one_error_line
from npgpt import params as P
from npgpt import prefix_cache
from npgpt.classify import load_classifier
from npgpt.cli import cache as cache_cli
from npgpt.config import GPT2Config
from npgpt.data import prepare_splits
from npgpt.errors import DataError, FormatError, NpgptError, TrainingError
from npgpt.tabular import read_table

LABELS = ["ham", "spam"]
CAP = 1 << 30              # address space of a probe: a tiny model's classify runs in well under this
META = {"kind": "npgpt-classifier", "labels": LABELS, "pooling": "last_token", "max_length": None}


def tiny_classifier(path, config=SMALL_GPT2, **meta):
    """A two-class classifier file with random weights (1.6 MB) -> its path."""
    P.save_params(path, P.init_params(config, seed=0, num_classes=2), config, meta=dict(META, **meta))
    return path


def replace(path, name, make):
    """Replace dataset `name` of an HDF5 file by what make(file, name, old array) creates."""
    with h5py.File(path, "r+") as f:
        old = f[name][()]
        del f[name]
        make(f, name, old)


def probe_env():
    env = {k: v for k, v in os.environ.items() if k not in ("NPGPT_DEBUG", "NPGPT_BPE_DIR")}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def probe(module, *args, cwd, cap=CAP, stdin=None):
    """`python -m <module> args` with its address space capped at `cap` bytes."""
    def limit():
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=cwd, env=probe_env(),
                          preexec_fn=limit, capture_output=True, text=True, encoding="utf-8",
                          errors="backslashreplace", input=stdin, timeout=600)


def refused(r, *words):
    """A probe that failed cleanly: exit 1, one line on stderr, no traceback, naming `words`."""
    line = one_error_line(r, 1)
    assert "MemoryError" not in line and line.startswith("error: ") and len(line) > 10, line
    for w in words:
        assert w in line, (w, line)
    return line


def classify_probe(model, bpe_dir, tmp_path, *texts):
    return probe("npgpt.classify", "--model", model, "--bpe-dir", bpe_dir, "--quiet", *(texts or ["hello"]),
                 cwd=tmp_path)


# ----------------------------------------------------------------------------- 1. a model file reads other files

def test_external_storage_is_refused(tmp_path, bpe_dir):
    secret = tmp_path / "outside" / "secret.txt"
    secret.parent.mkdir()
    secret.write_bytes(b"root:x:0:0:root:/root:/bin/bash\n" * 4)
    model = tiny_classifier(tmp_path / "classifier.h5")
    replace(model, "cls/w", lambda f, n, old: f.create_dataset(n, shape=old.shape, dtype="f4",
                                                               external=[(str(secret), 0, old.nbytes)]))
    r = classify_probe(model, bpe_dir, tmp_path)
    refused(r, str(model), "'cls/w'", "external storage")
    with pytest.raises(FormatError, match="external storage"):
        load_classifier(model, bpe_dir)


def _other_file(tmp_path):
    return tiny_classifier(tmp_path / "other.h5")


@pytest.mark.parametrize("kind", ["external_link", "soft_link", "virtual", "virtual_missing_source"])
def test_links_and_virtual_datasets_are_refused(tmp_path, bpe_dir, kind):
    model = tiny_classifier(tmp_path / "classifier.h5")
    other = _other_file(tmp_path)

    def make(f, name, old):
        if kind == "external_link":
            f[name] = h5py.ExternalLink(str(other), "/cls/w")
        elif kind == "soft_link":
            f["cls/w_copy"] = old
            f[name] = h5py.SoftLink("/cls/w_copy")
        else:
            source = other if kind == "virtual" else tmp_path / "missing.h5"
            layout = h5py.VirtualLayout(shape=old.shape, dtype="f4")
            layout[:] = h5py.VirtualSource(str(source), "cls/w", shape=old.shape)
            f.create_virtual_dataset(name, layout, fillvalue=0)
    replace(model, "cls/w", make)
    words = {"external_link": "ExternalLink", "soft_link": "SoftLink"}.get(kind, "virtual dataset")
    with pytest.raises(FormatError, match=words) as e:
        P.load_params(model)
    assert str(model) in str(e.value) and "\n" not in str(e.value)
    refused(classify_probe(model, bpe_dir, tmp_path), str(model), words)


def test_a_named_tokenizer_folder_is_read_only_for_gpt2s_files(tmp_path):
    """A file without a stored tokenizer may name its training's BPE folder: there, a file of
    another size than GPT-2's (a 64 GiB sparse encoder.json) is refused without being read."""
    folder = tmp_path / "elsewhere"
    folder.mkdir()
    with open(folder / "encoder.json", "wb") as fh:
        fh.truncate(64 << 30)
    (folder / "vocab.bpe").write_bytes(b"x" * 100)
    model = tiny_classifier(tmp_path / "classifier.h5", run_config={"bpe_dir": str(folder)})
    r = probe("npgpt.classify", "--model", model, "--quiet", "hello", cwd=tmp_path)
    refused(r, "encoder.json: not GPT-2's encoder.json")


def test_a_model_saved_again_holds_only_its_own_arrays(tmp_path, bpe_dir):
    """The plain file loads and saves again; the refused ones above never reach `save`."""
    model = tiny_classifier(tmp_path / "classifier.h5")
    clf = load_classifier(model, bpe_dir)
    clf.save(tmp_path / "again.h5")
    params, _, _ = P.load_params(tmp_path / "again.h5")
    assert np.array_equal(params["cls/w"], clf.params["cls/w"])


# ----------------------------------------------------------------------------- 2. small inputs, gigabytes

def _gzip_zeros(f, name, shape, chunks, dtype="f4"):
    """A gzip-compressed dataset of zeros, every chunk written directly: megabytes of file for
    gigabytes of array."""
    ds = f.create_dataset(name, shape=shape, dtype=dtype, chunks=chunks, compression="gzip")
    raw = zlib.compress(np.zeros(chunks, dtype).tobytes(), 9)
    grid = [range(0, s, c) for s, c in zip(shape, chunks)]
    for at in np.stack(np.meshgrid(*grid, indexing="ij"), -1).reshape(-1, len(shape)):
        ds.id.write_direct_chunk(tuple(int(a) for a in at), raw)


def _bomb(path, config, wte_chunks):
    """A classifier file of `config` whose wte is a gzip bomb (the rest tiny real arrays)."""
    params = P.init_params(GPT2Config(n_layer=config.n_layer, n_head=config.n_head, n_embd=config.n_embd,
                                      vocab_size=8, n_ctx=config.n_ctx), num_classes=2)
    P.save_params(path, params, GPT2Config(n_layer=config.n_layer, n_head=config.n_head, n_embd=config.n_embd,
                                           vocab_size=8, n_ctx=config.n_ctx), meta=META)
    with h5py.File(path, "r+") as f:
        f.attrs["vocab_size"] = config.vocab_size
        del f["wte"]
        _gzip_zeros(f, "wte", (config.vocab_size, config.n_embd), wte_chunks)
    return path


def test_a_huge_declared_vocabulary_is_refused_before_reading(tmp_path, bpe_dir):
    """vocab_size 8,388,608 x 64 channels: 2 GiB of zeros in a 2 MB file."""
    model = _bomb(tmp_path / "bomb.h5", GPT2Config(n_layer=1, n_head=2, n_embd=64, vocab_size=1 << 23, n_ctx=16),
                  (1 << 16, 64))
    assert os.path.getsize(model) < 8 << 20
    refused(classify_probe(model, bpe_dir, tmp_path), str(model), "vocab_size is 8388608")


def test_a_compressed_bomb_within_plausible_bounds_is_refused(tmp_path, bpe_dir):
    """vocab_size 131072 x 1024 channels is within bounds, but 512 MiB of arrays cannot come from
    a file of a few MB: refused before reading (h5read.check_budget)."""
    model = _bomb(tmp_path / "bomb.h5", GPT2Config(n_layer=1, n_head=2, n_embd=1024, vocab_size=1 << 17, n_ctx=16),
                  (1 << 13, 1024))
    refused(classify_probe(model, bpe_dir, tmp_path), str(model), "declares", "MiB of arrays")


def test_a_chunk_that_inflates_past_its_size_is_refused(tmp_path):
    """A chunk of a small array (64 bytes) whose 1 kB of stored bytes inflate to 1 MiB: read chunk
    by chunk, the inflation stops at the chunk's size. (A stored chunk much larger than its array
    is refused before it is read.)"""
    model = tiny_classifier(tmp_path / "classifier.h5")
    for megabytes, words in ((1, "has a chunk that inflates past its size of 64 bytes"),
                             (64, "has a chunk of 65238 bytes, larger than 64")):
        with h5py.File(model, "r+") as f:
            del f["cls/w"]
            ds = f.create_dataset("cls/w", shape=(8, 2), dtype="f4", chunks=(8, 2), compression="gzip")
            ds.id.write_direct_chunk((0, 0), zlib.compress(bytes(megabytes << 20), 9))
        with pytest.raises(FormatError, match=f"'cls/w' {words}"):
            P.load_params(model)


def test_unwritten_chunks_are_not_read_as_zeros(tmp_path):
    model = tiny_classifier(tmp_path / "classifier.h5")
    replace(model, "cls/w", lambda f, n, old: f.create_dataset(n, shape=old.shape, dtype="f4", chunks=(4, 2)))
    with pytest.raises(FormatError, match=r"'cls/w' stores 0 of its 2 chunks"):
        P.load_params(model)


def test_a_huge_stored_tokenizer_is_refused_before_reading(tmp_path, bpe_dir):
    """A 3 GiB encoder.json declared (its chunks unwritten: a file of kilobytes)."""
    model = tiny_classifier(tmp_path / "classifier.h5")
    with h5py.File(model, "a") as f:
        f.create_dataset("tokenizer/encoder.json", shape=(3 << 30,), dtype="u1", chunks=(1 << 20,))
        f.create_dataset("tokenizer/vocab.bpe", data=np.zeros(10, np.uint8))
    r = probe("npgpt.classify", "--model", model, "--quiet", "hello", cwd=tmp_path)
    refused(r, str(model), "'tokenizer/encoder.json' has shape (3221225472,), expected (1042301,)")


def test_a_huge_meta_attribute_is_refused(tmp_path, bpe_dir):
    """48 MB of meta (a JSON list of 24M numbers: gigabytes once parsed) is over the cap."""
    model = tiny_classifier(tmp_path / "classifier.h5")
    with h5py.File(model, "r+") as f:
        f.attrs["meta"] = "[" + "0," * (24 << 20) + "0]"
    refused(classify_probe(model, bpe_dir, tmp_path), str(model), "attribute 'meta' is", "more than")


def test_an_array_attribute_is_not_read(tmp_path):
    model = tiny_classifier(tmp_path / "classifier.h5")
    with h5py.File(model, "r+") as f:
        f.attrs["n_layer"] = np.full(4000, 2)
    with pytest.raises(FormatError, match="attribute 'n_layer' is not a number"):
        P.load_params(model)


def _zip_bomb(path, member="SMSSpamCollection", size=256 << 20):
    """A zip of about 250 kB holding one member of `size` bytes of zeros."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf, zf.open(member, "w", force_zip64=True) as out:
        block = bytes(16 << 20)
        for _ in range(size // len(block)):
            out.write(block)
    return path


def test_a_zip_bomb_is_refused_and_leaves_nothing(tmp_path, bpe_dir):
    bomb = _zip_bomb(tmp_path / "sms.zip")
    assert os.path.getsize(bomb) < 1 << 20
    data = tmp_path / "data"
    r = probe("npgpt.train", "--tiny", "--data", bomb, "--data-dir", data, "--bpe-dir", bpe_dir,
              "--out", tmp_path / "run", "--quiet", "--no-plots", cwd=tmp_path, cap=CAP + (512 << 20))
    refused(r, str(bomb), "'SMSSpamCollection' is larger than 64 MiB")
    assert not data.exists() or os.listdir(data) == []
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------- 3. base weights hashed first

def test_base_weights_are_size_checked_before_hashing(tmp_path, monkeypatch):
    """A trained-only file whose base_weights name a 64 GiB (sparse) file: refused by its size,
    never hashed."""
    huge = tmp_path / "huge.bin"
    with open(huge, "wb") as fh:
        fh.truncate(64 << 30)
    model = tiny_classifier(tmp_path / "classifier.h5",
                            base_weights={"path": str(huge), "given": "huge.bin", "sha256": "0" * 64})
    with h5py.File(model, "r+") as f:          # a trained-only file holds the head alone
        for name in list(f):
            if name != "cls":
                del f[name]
    hashed = []
    real = P.sha256_file
    monkeypatch.setattr(P, "sha256_file", lambda path, *a, **k: hashed.append(path) or real(path, *a, **k))
    with pytest.raises(FormatError, match=r"base weights .*huge\.bin are 68719476736 bytes"):
        P.load_params(model)
    assert hashed == []


# ----------------------------------------------------------------------------- 4. terminal injection

EVIL = ["ham\x1b]0;pwned\x07", "spam\r\n\x1b[1Afake line\x1b[2J"]


def _no_controls(text):
    """No escape, bell or carriage return: nothing a terminal would act on."""
    return not any(ch in text for ch in "\x1b\x07\r")


def test_labels_never_reach_the_terminal_raw(tmp_path, bpe_dir):
    model = tiny_classifier(tmp_path / "classifier.h5", labels=EVIL)
    r = classify_probe(model, bpe_dir, tmp_path, "hello", "free prize")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert len(lines) == 2 and _no_controls(r.stdout), r.stdout
    assert "\\x1b]0;pwned" in r.stdout or "\\x1b[1Afake" in r.stdout
    data = tmp_path / "data.csv"
    with open(data, "w", newline="") as fh:
        csv.writer(fh).writerows([("text", "label"), ("hello", EVIL[0]), ("free prize", EVIL[1])])
    r = probe("npgpt.evaluate", "--model", model, "--bpe-dir", bpe_dir, "--data", data, "--quiet",
              "--errors", "2", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert _no_controls(r.stdout + r.stderr) and "pwned" in r.stdout


def test_an_error_naming_a_hostile_file_name_is_one_escaped_line(tmp_path, bpe_dir):
    name = tmp_path / "x\x1b[2J\rfake.h5"
    name.write_bytes(b"not hdf5")
    r = classify_probe(name, bpe_dir, tmp_path)
    line = refused(r, "\\x1b[2J\\rfake.h5")
    assert _no_controls(r.stderr), line


# ----------------------------------------------------------------------------- 5-7. the prefix cache

CFG = GPT2Config(n_layer=2, n_head=4, n_embd=64)


def _seqs(n=10, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 50257, size=int(rng.integers(1, 30))) for _ in range(n)]


def test_the_cache_deletes_only_its_own_files(tmp_path, capsys):
    folder = tmp_path / "mine"
    folder.mkdir()
    mine = {"settings.json": b'{"a": 1}', "my_array.npy": b"\x93NUMPY...", "notes.tmp": b"draft",
            ".draft.npy.1.abc.tmp": b"x", "CACHEDIR.TAG": b"Signature: 8a477f597d28d172789f06886806bc55\n"}
    for name, data in mine.items():
        (folder / name).write_bytes(data)
        os.utime(folder / name, (1, 1))                              # old: a leftover by age
    params = P.init_params(CFG, seed=1, num_classes=2)
    prefix_cache.PrefixCache(str(folder), memory_limit=0).activations(params, CFG, _seqs(), 1, "last_token")
    prefix_cache.PrefixCache(str(folder)).activations(params, CFG, _seqs(seed=1), 1, "last_token")
    assert cache_cli.main(["ls", "--cache-dir", str(folder)]) == 0
    assert "2 entries" in capsys.readouterr().out
    assert cache_cli.main(["clear", "--cache-dir", str(folder)]) == 0
    assert "removed 2 entries" in capsys.readouterr().out
    for name, data in mine.items():
        assert (folder / name).read_bytes() == data, name
    assert sorted(os.listdir(folder)) == sorted(list(mine) + [prefix_cache.SUBFOLDER])


def test_a_full_disk_while_spilling_is_a_clean_error(tmp_path, monkeypatch):
    """The spilled prefix's space is reserved before it is mapped: ENOSPC there is one error,
    the partial file removed, not a SIGBUS on the first page the disk cannot hold."""
    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(os, "posix_fallocate", full)
    params = P.init_params(CFG, seed=2, num_classes=2)
    for use_disk in (True, False):
        run = tmp_path / f"run{use_disk}"
        run.mkdir()
        store = prefix_cache.PrefixCache(str(tmp_path / "cache"), use_disk=use_disk, memory_limit=0,
                                         spill_dir=str(run))
        with pytest.raises(TrainingError, match="No space left on device") as e:
            store.activations(params, CFG, _seqs(), 2, "last_token")
        assert "\n" not in str(e.value)
        assert os.listdir(run) == [] and prefix_cache.leftovers(str(tmp_path / "cache")) == []
        assert not [n for n in os.listdir(tmp_path / "cache") if ".npy" in n]


def _one_entry(tmp_path, seed=3):
    params = P.init_params(CFG, seed=seed, num_classes=2)
    store = prefix_cache.PrefixCache(str(tmp_path), max_tokens=128)
    good, _ = store.activations(params, CFG, _seqs(seed=seed), 2, "last_token")
    (entry,) = prefix_cache.entries(str(tmp_path))
    return params, store, good, tmp_path / (entry["key"] + ".npy"), tmp_path / (entry["key"] + ".json")


@pytest.mark.parametrize("damage", ["json_list", "json_folder", "npy_folder", "json_nested"])
def test_malformed_cache_entries_are_recomputed(tmp_path, damage):
    params, store, good, npy, meta = _one_entry(tmp_path)
    if damage == "json_list":
        meta.write_text("[1, 2, 3]")
    elif damage == "json_nested":
        meta.write_text("[" * 100_000 + "]" * 100_000)
    else:
        path = meta if damage == "json_folder" else npy
        path.unlink()
        path.mkdir()
    logs = []
    store.log = logs.append
    again, _ = store.activations(params, CFG, _seqs(seed=3), 2, "last_token")
    assert np.array_equal(again, good)
    assert any("damaged" in s for s in logs) and any("computing" in s for s in logs)


def test_a_fifo_cache_entry_is_recomputed_not_waited_on(tmp_path):
    """np.load of a FIFO never returns: the probe runs in a subprocess (its timeout only guards
    the test run against that hang)."""
    _, _, _, npy, _ = _one_entry(tmp_path)
    npy.unlink()
    os.mkfifo(npy)
    script = (
        "import sys, numpy as np\n"
        "from npgpt import params as P, prefix_cache\n"
        "from npgpt.config import GPT2Config\n"
        f"cfg = GPT2Config(n_layer=2, n_head=4, n_embd=64)\n"
        "params = P.init_params(cfg, seed=3, num_classes=2)\n"
        "rng = np.random.default_rng(3)\n"
        "seqs = [rng.integers(0, 50257, size=int(rng.integers(1, 30))) for _ in range(10)]\n"
        f"store = prefix_cache.PrefixCache({str(tmp_path)!r}, max_tokens=128, log=print)\n"
        "store.activations(params, cfg, seqs, 2, 'last_token')\n")
    r = subprocess.run([sys.executable, "-c", script], env=probe_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "damaged (unreadable (OSError: not a regular file))" in r.stdout and "saved" in r.stdout
    assert npy.is_file()


# ----------------------------------------------------------------------------- 8. deeply nested JSONL

def test_a_deeply_nested_jsonl_line_is_a_bad_line(tmp_path):
    path = tmp_path / "d.jsonl"
    rows = [json.dumps({"text": f"message {i}", "label": "ab"[i % 2]}) for i in range(6)]
    path.write_text("\n".join(rows[:3] + ["[" * 200_000 + "]" * 200_000] + rows[3:]) + "\n")
    with pytest.raises(DataError, match=r"d\.jsonl: line 4: JSON nested too deeply"):
        read_table(path)
    df = read_table(path, skip_bad_lines=True)
    assert len(df) == 6 and df.attrs["skipped"] == ["line 4: JSON nested too deeply"]


# ----------------------------------------------------------------------------- 9. the SMS zip

def _sms_zip(path, payload: bytes):
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("SMSSpamCollection", payload)
    return path


def test_the_sms_zip_never_writes_over_a_file(tmp_path, shared_data):
    data = tmp_path / "data"
    data.mkdir()
    theirs = b"ham\tmy own edited copy\nspam\twin\n"
    (data / "SMSSpamCollection").write_bytes(theirs)
    z = _sms_zip(tmp_path / "uci.zip", (shared_data / SMS).read_bytes())
    with pytest.raises(FormatError, match="differs from the .* already there"):
        prepare_splits(z, data)
    assert (data / "SMSSpamCollection").read_bytes() == theirs
    assert sorted(os.listdir(data)) == ["SMSSpamCollection"]


def test_an_sms_zip_that_does_not_parse_leaves_nothing(tmp_path):
    data = tmp_path / "data"
    z = _sms_zip(tmp_path / "bad.zip", b"ham\thello\n" + b"x" * (20 << 20) + b"\tlong label\n")
    with pytest.raises(DataError) as e:
        prepare_splits(z, data, parse="strict")
    assert len(str(e.value)) < 400 and "20971520 characters" in str(e.value)      # quoted, cut
    assert not data.exists() or os.listdir(data) == []


def test_a_long_bad_label_is_quoted_cut(tmp_path):
    path = tmp_path / "SMSSpamCollection"
    path.write_bytes(b"ham\thello\n" + b"y" * (1 << 20) + b"\tlong label\n")
    for parse in ("strict", "pandas"):
        with pytest.raises(DataError) as e:
            prepare_splits(path, tmp_path / "d", parse=parse)
        assert len(str(e.value)) < 400 and "line 2: unknown label 'yyy" in str(e.value)


# ----------------------------------------------------------------------------- 10. smaller

def test_duplicate_label_names_are_refused(tmp_path, bpe_dir):
    model = tiny_classifier(tmp_path / "classifier.h5", labels=["spam", "spam"])
    with pytest.raises(FormatError, match="meta labels name class 'spam' twice"):
        load_classifier(model, bpe_dir)


def test_list_and_dict_labels_are_bad_rows(tmp_path):
    import pandas as pd
    pytest.importorskip("pyarrow")
    path = tmp_path / "t.parquet"
    pd.DataFrame({"text": ["one", "two", "three", "four"],
                  "label": [["a"], ["b"], ["a"], ["b"]]}).to_parquet(path)
    with pytest.raises(DataError, match=r"row 1: label in column 'label' is a (list|ndarray), not a string or a number"):
        read_table(path)
    jsonl = tmp_path / "t.jsonl"
    jsonl.write_text('{"text": "one", "label": "a"}\n{"text": "two", "label": {"x": 1}}\n')
    with pytest.raises(DataError, match=r"line 2: label in column 'label' is a dict"):
        read_table(jsonl)


def test_a_half_written_last_line_is_not_classified(tmp_path, bpe_dir):
    model = tiny_classifier(tmp_path / "classifier.h5")
    texts = tmp_path / "texts.txt"
    texts.write_bytes(b"first message\nsecond message\nthird mess")
    r = probe("npgpt.classify", "--model", model, "--bpe-dir", bpe_dir, "--quiet", "--file", texts, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert len(r.stdout.splitlines()) == 2 and "third" not in r.stdout
    assert "line 3 has no newline at its end" in r.stderr
    r = probe("npgpt.classify", "--model", model, "--bpe-dir", bpe_dir, "--quiet", cwd=tmp_path,
              stdin="one\ntwo")                                                   # a pipe: complete
    assert r.returncode == 0 and len(r.stdout.splitlines()) == 2, r.stderr


def test_config_bounds_are_checked_on_any_load(tmp_path):
    model = tiny_classifier(tmp_path / "classifier.h5")
    for attr, value, words in (("n_ctx", 1 << 20, "n_ctx is 1048576"), ("num_classes", 1 << 30, "num_classes is"),
                               ("n_embd", 1 << 14, "n_embd is 16384")):
        with h5py.File(model, "r+") as f:
            old = f.attrs[attr]
            f.attrs[attr] = value
        with pytest.raises(NpgptError, match=words):
            P.load_params(model)
        with h5py.File(model, "r+") as f:
            f.attrs[attr] = old
