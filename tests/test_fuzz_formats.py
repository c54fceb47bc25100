"""Property tests: mutated TF bundles, safetensors and HDF5 files either load to the original
arrays or raise NpgptError; never another exception, and never a large allocation.

Each mutation starts from a valid file (the TensorFlow-written fixture, a safetensors file of a
tiny GPT-2, an HDF5 file written by save_params), changes it (truncation, byte flips, edited JSON
header fields, re-encoded index entries with valid block checksums), and loads it under
tracemalloc, so that an allocation sized from a corrupt header would fail the test rather than
the machine.

What "the original arrays" means depends on what the format can detect:
- TF bundles checksum every block and every tensor: a load that succeeds must be exact.
- safetensors carries no checksum over the numbers: a flipped byte in the data area gives a
  different value, not an error. There, a successful load must have the same names and shapes,
  and no more changed values than flipped bytes (each byte belongs to one value); a flip in the
  JSON header must give an error or the exact arrays.
- HDF5 (as h5py writes it by default) has no checksum over its metadata either: one flipped bit
  in a dataset's address shifts the whole array by a few bytes and still loads (found by this
  test: byte 1434 ^ 4 of the file below shifts `wte` by one value). A successful load must then
  keep what load_params promises: the expected names and shapes, float32, finite values.
"""
import contextlib
import functools
import json
import os
import pathlib
import random
import shutil
import struct
import subprocess
import sys
import tempfile
import tracemalloc

import numpy as np
import pytest
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st
from safetensors.numpy import save_file

from fixtures.tfbundle import encode_entry, encode_table
from npgpt.errors import NpgptError
from npgpt.params import init_params, load_params, save_params
from npgpt.safetensors_io import load_gpt2_safetensors
from npgpt.tfcheckpoint import load_gpt2_tf, read_index, read_table
from test_safetensors import CONFIG, hf_gpt2_arrays

FIXTURE = pathlib.Path(__file__).parent / "fixtures" / "tiny_tf_checkpoint"
MAX_PEAK_BYTES = 64 << 20          # the files are < 1 MB; a corrupt size must not turn into GBs
# A random search seeded afresh on every run (NPGPT_FUZZ_SEED=N repeats one; the seed is added to
# every failure's message), NPGPT_FUZZ_EXAMPLES examples per test (150 by default; 5000 for a
# deeper search).
_EXAMPLES = int(os.environ.get("NPGPT_FUZZ_EXAMPLES") or 150)
SEED = int(os.environ.get("NPGPT_FUZZ_SEED") or random.SystemRandom().randrange(2 ** 32))
_SETTINGS = settings(max_examples=_EXAMPLES, deadline=None, database=None,
                     suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def FUZZ(test):
    """Hypothesis settings and seed for a fuzz test; a failure names the seed that repeats it."""
    inner = _SETTINGS(seed(SEED)(test))

    @functools.wraps(inner)
    def run(*args, **kwargs):
        try:
            return inner(*args, **kwargs)
        except BaseException as e:
            e.add_note(f"fuzz seed: NPGPT_FUZZ_SEED={SEED} NPGPT_FUZZ_EXAMPLES={_EXAMPLES} repeats this run")
            raise
    return run


@contextlib.contextmanager
def address_space_cap(extra=1 << 30):
    """Lower the process's address-space limit to its current size + `extra` for the duration, so
    that an allocation sized from a corrupt file fails (MemoryError) instead of exhausting the
    machine. Linux only; elsewhere, or if a lower limit is already set, it does nothing."""
    try:
        import resource
        with open("/proc/self/status") as f:
            vm = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
    except (ImportError, OSError, StopIteration, ValueError):
        yield
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    cap = vm + extra
    if (soft != resource.RLIM_INFINITY and soft <= cap) or (hard != resource.RLIM_INFINITY and hard < cap):
        yield
        return
    resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def load_guarded(fn, *args):
    """fn(*args) under tracemalloc and an address-space cap. Returns its result, or None if it
    raised NpgptError; fails if Python-level allocations peaked above MAX_PEAK_BYTES."""
    tracemalloc.start()
    try:
        with address_space_cap():
            try:
                result = fn(*args)
            except NpgptError:
                result = None
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < MAX_PEAK_BYTES, f"peak allocation {peak} bytes"
    return result


def assert_exact(params, ref):
    assert list(params) == list(ref)
    for name in ref:
        assert params[name].dtype == np.float32
        np.testing.assert_array_equal(params[name], ref[name], err_msg=name)


def assert_at_most_changed(params, ref, n_changed):
    """Same names and shapes, float32, finite, and at most n_changed values differ."""
    assert list(params) == list(ref)
    changed = 0
    for name in ref:
        assert params[name].dtype == np.float32 and params[name].shape == ref[name].shape, name
        assert np.isfinite(params[name]).all(), name
        changed += int((params[name] != ref[name]).sum())
    assert changed <= n_changed


@contextlib.contextmanager
def scratch_dir():
    with tempfile.TemporaryDirectory() as d:
        yield pathlib.Path(d)


def flips(size, max_flips=4):
    """A list of (position, nonzero xor mask), positions distinct, for a file of `size` bytes."""
    return st.lists(st.tuples(st.integers(0, size - 1), st.integers(1, 255)), min_size=1, max_size=max_flips,
                    unique_by=lambda change: change[0])


def flip(data: bytes, changes) -> bytes:
    b = bytearray(data)
    for pos, mask in changes:
        b[pos] ^= mask
    return bytes(b)


# A value for a varint field: small, near the data file's size, at the int32/int64/uint64 edges.
INTS = st.one_of(st.integers(0, 70), st.integers(0, 500_000),
                 st.sampled_from([2 ** 31 - 1, 2 ** 31, 2 ** 32, 2 ** 40, 2 ** 63 - 1, 2 ** 63, 2 ** 64 - 1]))

# Any JSON value, for edited header and hparams fields.
JSON_VALUES = st.recursive(
    st.one_of(st.none(), st.booleans(), INTS, st.integers(-2 ** 65, 2 ** 65), st.floats(), st.text(max_size=8)),
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=6), inner, max_size=3)),
    max_leaves=8)


# ----------------------------------------------------------------------------- TF bundle

TF_REF, _ = load_gpt2_tf(FIXTURE)
TF_INDEX = (FIXTURE / "model.ckpt.index").read_bytes()
TF_DATA = (FIXTURE / "model.ckpt.data-00000-of-00001").read_bytes()
TF_TABLE = read_table(FIXTURE / "model.ckpt.index")
TF_ENTRIES = read_index(FIXTURE / "model.ckpt")[1]


TF_HPARAMS = (FIXTURE / "hparams.json").read_bytes()


def load_tf(index: bytes = TF_INDEX, data: bytes = TF_DATA, hparams: bytes = TF_HPARAMS):
    with scratch_dir() as d:
        shutil.copy(FIXTURE / "checkpoint", d / "checkpoint")
        (d / "hparams.json").write_bytes(hparams)
        (d / "model.ckpt.index").write_bytes(index)
        (d / "model.ckpt.data-00000-of-00001").write_bytes(data)
        result = load_guarded(load_gpt2_tf, d)
    return None if result is None else result[0]


def check_tf(index: bytes = TF_INDEX, data: bytes = TF_DATA, hparams: bytes = TF_HPARAMS):
    params = load_tf(index, data, hparams)
    if params is not None:
        assert_exact(params, TF_REF)
    return params


def test_tf_fixture_loads():
    assert_exact(load_tf(), TF_REF)


@FUZZ
@given(st.data())
def test_tf_truncated(data):
    which = data.draw(st.sampled_from(["index", "data"]))
    full = TF_INDEX if which == "index" else TF_DATA
    n = data.draw(st.integers(0, len(full) - 1))
    assert check_tf(**{which: full[:n]}) is None        # something is always missing


@FUZZ
@given(flips(len(TF_INDEX)))
def test_tf_index_byte_flips(changes):
    check_tf(index=flip(TF_INDEX, changes))


@FUZZ
@given(flips(len(TF_DATA)))
def test_tf_data_byte_flips(changes):
    assert check_tf(data=flip(TF_DATA, changes)) is None   # every data byte is under a crc32c


def mutate_bytes(draw, value: bytes) -> bytes:
    """Flip, insert, delete or replace bytes of a short byte string."""
    op = draw(st.sampled_from(["flip", "insert", "delete", "replace"]))
    pos = draw(st.integers(0, len(value)))
    if op == "flip" and value:
        return flip(value, draw(flips(len(value), 3)))
    if op == "insert":
        return value[:pos] + draw(st.binary(min_size=1, max_size=12)) + value[pos:]
    if op == "delete":
        return value[:pos] + value[pos + draw(st.integers(1, 8)):]
    return draw(st.binary(max_size=40))


@FUZZ
@given(st.data())
def test_tf_entries_mutated_behind_valid_checksums(data):
    """Edit one key or value of the index table, then re-encode it with correct block crcs."""
    table = list(TF_TABLE)
    i = data.draw(st.integers(0, len(table) - 1))
    key, value = table[i]
    if data.draw(st.booleans()):
        value = mutate_bytes(data.draw, value)
    else:
        key = mutate_bytes(data.draw, key)
    table[i] = (key, value)
    table.sort(key=lambda kv: kv[0])
    keys = [k for k, _ in table]
    if len(set(keys)) < len(keys):
        return                                  # a table cannot hold the same key twice
    check_tf(index=encode_table(table, block_size=data.draw(st.sampled_from([64, 256, 4096]))))


@FUZZ
@given(st.data())
def test_tf_entry_fields_edited(data):
    """Give one BundleEntryProto field of one tensor another value (huge ones included)."""
    name = data.draw(st.sampled_from(sorted(TF_ENTRIES)))
    e = TF_ENTRIES[name]
    fields = dict(dtype=e.dtype_enum, shape=e.shape, shard_id=e.shard_id, offset=e.offset, size=e.size,
                  crc=e.crc32c)
    field = data.draw(st.sampled_from(sorted(fields)))
    if field == "shape":
        fields["shape"] = tuple(data.draw(st.lists(INTS, max_size=5)))
    elif field == "dtype":
        fields["dtype"] = data.draw(st.one_of(st.integers(0, 30), INTS))
    elif field == "crc":
        fields["crc"] = data.draw(st.integers(0, 2 ** 32 - 1))
    else:
        fields[field] = data.draw(INTS)
    table = [(k, encode_entry(**fields) if k == name.encode() else v) for k, v in TF_TABLE]
    check_tf(index=encode_table(table))      # e.g. a conv weight's [1,C,3C] given as [C,3C] still loads


@FUZZ
@given(st.data())
def test_tf_hparams_edited(data):
    """hparams.json is as untrusted as the rest: n_layer 2**63 must not build 12 * 2**63 names."""
    h = json.loads(TF_HPARAMS)
    key = data.draw(st.sampled_from(sorted(h) + ["extra"]))
    h[key] = data.draw(st.one_of(INTS, st.integers(-2 ** 65, 2 ** 65), JSON_VALUES))
    check_tf(hparams=json.dumps(h).encode())


# ----------------------------------------------------------------------------- safetensors

ST_HF, ST_REF = hf_gpt2_arrays(prefix="transformer.")
with tempfile.TemporaryDirectory() as _d:
    save_file(ST_HF, f"{_d}/model.safetensors")
    ST_FILE = pathlib.Path(f"{_d}/model.safetensors").read_bytes()
ST_HEADER_END = 8 + struct.unpack("<Q", ST_FILE[:8])[0]
ST_HEADER = json.loads(ST_FILE[8:ST_HEADER_END])


def load_st(raw: bytes):
    with scratch_dir() as d:
        (d / "model.safetensors").write_bytes(raw)
        result = load_guarded(load_gpt2_safetensors, d / "model.safetensors")
    return None if result is None else result[0]


def test_safetensors_file_loads():
    params = load_st(ST_FILE)
    assert_exact(params, {k: ST_REF[k] for k in params})


@FUZZ
@given(st.data())
def test_safetensors_truncated(data):
    n = data.draw(st.integers(0, len(ST_FILE) - 1))
    assert load_st(ST_FILE[:n]) is None


@FUZZ
@given(flips(ST_HEADER_END))
def test_safetensors_header_byte_flips(changes):
    params = load_st(flip(ST_FILE, changes))
    if params is not None:
        assert_exact(params, {k: ST_REF[k] for k in params})


@FUZZ
@given(flips(len(ST_FILE) - ST_HEADER_END))
def test_safetensors_data_byte_flips(changes):
    changes = [(ST_HEADER_END + pos, mask) for pos, mask in changes]
    params = load_st(flip(ST_FILE, changes))
    if params is not None:                          # else a flip made a value non-finite
        assert_at_most_changed(params, {k: ST_REF[k] for k in params}, len(changes))


@FUZZ
@given(st.data())
def test_safetensors_header_json_edited(data):
    header = json.loads(json.dumps(ST_HEADER))
    names = sorted(k for k in header if k != "__metadata__")
    name = data.draw(st.sampled_from(names))
    op = data.draw(st.sampled_from(["shape", "offsets", "dtype", "drop_field", "extra_field", "rename",
                                    "drop_tensor", "metadata", "header_len"]))
    header_len = None
    if op == "shape":
        header[name]["shape"] = data.draw(st.one_of(st.lists(INTS, max_size=4), JSON_VALUES))
    elif op == "offsets":
        header[name]["data_offsets"] = data.draw(st.one_of(st.lists(INTS, min_size=2, max_size=2), JSON_VALUES))
    elif op == "dtype":
        header[name]["dtype"] = data.draw(st.one_of(
            st.sampled_from(["F16", "F64", "BF16", "I32", "U8", "BOOL", "f32", ""]), JSON_VALUES))
    elif op == "drop_field":
        del header[name][data.draw(st.sampled_from(["dtype", "shape", "data_offsets"]))]
    elif op == "extra_field":
        header[name][data.draw(st.text(max_size=6))] = data.draw(JSON_VALUES)
    elif op == "rename":
        header[data.draw(st.text(max_size=30))] = header.pop(name)
    elif op == "drop_tensor":
        del header[name]
    elif op == "metadata":
        header["__metadata__"] = data.draw(JSON_VALUES)
    else:
        header_len = data.draw(st.one_of(INTS, st.integers(0, len(ST_FILE))))
    body = json.dumps(header).encode()
    raw = struct.pack("<Q", len(body) if header_len is None else header_len) + body + ST_FILE[ST_HEADER_END:]
    params = load_st(raw)
    if params is not None:
        assert_exact(params, {k: ST_REF[k] for k in params})


# ----------------------------------------------------------------------------- HDF5

H5_REF = init_params(CONFIG, seed=5)
with tempfile.TemporaryDirectory() as _d:
    save_params(f"{_d}/m.h5", H5_REF, CONFIG)
    H5_FILE = pathlib.Path(f"{_d}/m.h5").read_bytes()


def load_h5(raw: bytes):
    with scratch_dir() as d:
        (d / "m.h5").write_bytes(raw)
        result = load_guarded(load_params, d / "m.h5")
    return None if result is None else result[0]


def test_hdf5_file_loads():
    assert_exact(load_h5(H5_FILE), H5_REF)


@FUZZ
@given(st.data())
def test_hdf5_truncated(data):
    n = data.draw(st.integers(0, len(H5_FILE) - 1))
    params = load_h5(H5_FILE[:n])
    if params is not None:
        assert_exact(params, H5_REF)


# load_params checks the file's config against plausible bounds (and n_layer against the blocks
# present) before it builds any name from it: a flip in that attribute's bytes (n_layer 2
# becoming 2**56) is a FormatError.
def test_hdf5_huge_n_layer_is_a_format_error(tmp_path):
    import h5py
    path = tmp_path / "m.h5"
    path.write_bytes(H5_FILE)
    with h5py.File(path, "r+") as f:
        f.attrs["n_layer"] = 2 ** 56
    with pytest.raises(NpgptError, match=f"n_layer is {2 ** 56}, above the 128"):
        with address_space_cap():
            load_params(path)


@FUZZ
@given(flips(len(H5_FILE)))
def test_hdf5_byte_flips(changes):
    params = load_h5(flip(H5_FILE, changes))
    if params is not None:
        assert list(params) == list(H5_REF)
        for name, ref in H5_REF.items():
            assert params[name].dtype == np.float32 and params[name].shape == ref.shape, name
            assert np.isfinite(params[name]).all(), name


# Found by test_hdf5_byte_flips (changes [(2072, 71)] in the file h5py 3.16 / HDF5 2.0 writes):
# the size of the first object of the global heap collection that holds `meta`, 2 -> 69. HDF5's
# own read of the attribute then walks into a free-space object of size 0 and loops forever
# (H5HG__cache_heap_deserialize); npgpt.h5vlen reads the string itself. Run in a process of its
# own, so that a loop fails this test instead of hanging the suite.
def test_hdf5_heap_object_size_flip_ends(tmp_path):
    size_field = H5_FILE.index(b"GCOL") + 24          # collection header 16, index 2, refcount 2, 4 reserved
    assert H5_FILE[size_field] == 2                     # the 2 bytes of "{}"
    path = tmp_path / "m.h5"
    path.write_bytes(flip(H5_FILE, [(size_field, 71)]))
    code = ("import sys\nfrom npgpt.errors import FormatError\nfrom npgpt.params import load_params\n"
            "try:\n    print('meta', load_params(sys.argv[1])[2])\nexcept FormatError as e:\n    print('refused', e)\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(pathlib.Path(__file__).parent.parent),
                                                        os.environ.get("PYTHONPATH", "")]))
    r = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout == "meta {}\n"                      # the 2 bytes asked for, within the larger object


# ----------------------------------------------------------------------------- HDF5 from a hostile writer
#
# The loader (npgpt.h5read) is what stands between a downloaded file and the machine: every
# storage h5py can give one array, hostile ones included, either loads to exactly the original
# values or is refused with an NpgptError. No kind of storage is left out of the draw.

H5_NAMES = sorted(H5_REF)
STORAGES = ["contiguous", "chunked", "gzip", "shuffle_gzip", "fletcher32", "lzf", "scaleoffset", "float64",
            "float16", "int32", "unwritten_chunks", "external_storage", "soft_link", "external_link", "virtual",
            "virtual_missing", "shape", "scalar", "group"]
EXACT = {"contiguous", "chunked", "gzip", "shuffle_gzip", "fletcher32", "float64"}


def _store(f, name, arr, storage, chunks, d):
    """Put `arr` (the original array) into f[name] with the given storage."""
    import h5py
    if storage in ("contiguous", "float64", "float16", "int32"):
        dtype = {"float64": "f8", "float16": "f2", "int32": "i4"}.get(storage, "f4")
        f.create_dataset(name, data=arr.astype(dtype))
    elif storage in ("chunked", "gzip", "shuffle_gzip", "fletcher32", "lzf", "scaleoffset", "unwritten_chunks"):
        kw = {"gzip": dict(compression="gzip"), "shuffle_gzip": dict(compression="gzip", shuffle=True),
              "fletcher32": dict(fletcher32=True, compression="gzip"), "lzf": dict(compression="lzf"),
              "scaleoffset": dict(scaleoffset=2)}.get(storage, {})
        ds = f.create_dataset(name, shape=arr.shape, dtype="f4", chunks=chunks, **kw)
        if storage != "unwritten_chunks":
            ds[...] = arr
    elif storage == "external_storage":
        (d / "raw.bin").write_bytes(arr.tobytes())
        f.create_dataset(name, shape=arr.shape, dtype="f4", external=[(str(d / "raw.bin"), 0, arr.nbytes)])
    elif storage == "soft_link":
        f.create_dataset("elsewhere", data=arr)
        f[name] = h5py.SoftLink("/elsewhere")
    elif storage in ("external_link", "virtual", "virtual_missing"):
        with h5py.File(d / "other.h5", "w") as g:
            g.create_dataset("x", data=arr)
        if storage == "external_link":
            f[name] = h5py.ExternalLink(str(d / "other.h5"), "/x")
        else:
            layout = h5py.VirtualLayout(shape=arr.shape, dtype="f4")
            source = d / ("other.h5" if storage == "virtual" else "missing.h5")
            layout[...] = h5py.VirtualSource(str(source), "x", shape=arr.shape)
            f.create_virtual_dataset(name, layout, fillvalue=0)
    elif storage == "shape":
        f.create_dataset(name, data=np.concatenate([arr.reshape(-1), [0]]).astype("f4"))
    elif storage == "scalar":
        f.create_dataset(name, data=np.float32(1))
    else:
        f.create_group(name)


@FUZZ
@given(st.data())
def test_hdf5_storage_of_one_array_edited(data):
    import h5py
    name = data.draw(st.sampled_from(H5_NAMES))
    storage = data.draw(st.sampled_from(STORAGES))
    arr = H5_REF[name]
    chunks = tuple(data.draw(st.integers(1, max(s, 1))) for s in arr.shape) or None
    if storage in ("chunked", "gzip", "shuffle_gzip", "fletcher32", "lzf", "scaleoffset", "unwritten_chunks") \
            and chunks is None:
        storage = "contiguous"
    with scratch_dir() as d:
        (d / "m.h5").write_bytes(H5_FILE)
        with h5py.File(d / "m.h5", "r+") as f:
            del f[name]
            _store(f, name, arr, storage, chunks, d)
        result = load_guarded(load_params, d / "m.h5")
    params = None if result is None else result[0]
    if storage in EXACT:
        assert params is not None, storage
        assert_exact(params, H5_REF)
    elif storage != "float16":
        assert params is None, storage        # refused: not stored in the file, or not the array
    elif params is not None:                  # float16: loads, rounded
        np.testing.assert_allclose(params[name], arr.astype(np.float16), rtol=0, atol=0)


ATTR_VALUES = st.one_of(INTS, st.integers(-2 ** 65, 2 ** 65), st.floats(), st.text(max_size=12), st.booleans(),
                        st.lists(st.integers(0, 70), min_size=0, max_size=5).map(np.array),
                        JSON_VALUES.map(json.dumps))


@FUZZ
@given(st.data())
def test_hdf5_attributes_edited(data):
    """Any value in a root attribute: the config's, num_classes, meta (any JSON, or not JSON)."""
    import h5py
    key = data.draw(st.sampled_from(["n_layer", "n_head", "n_embd", "vocab_size", "n_ctx", "num_classes", "meta",
                                     "npgpt_format"]))
    value = data.draw(ATTR_VALUES)
    with scratch_dir() as d:
        (d / "m.h5").write_bytes(H5_FILE)
        with h5py.File(d / "m.h5", "r+") as f:
            try:
                f.attrs[key] = value
            except (TypeError, ValueError):
                return                                  # a value h5py cannot store
        result = load_guarded(load_params, d / "m.h5")
    if result is not None:
        assert_exact(result[0], H5_REF)
