"""npgpt.h5vlen: a variable-length string attribute read from the file's bytes, never by HDF5.

Files that HDF5 writes read to exactly what h5py reads from them (h5py is the reference on a
sound file, and the only reader that may touch one here); damaged ones end in a value or a
FormatError after a bounded number of reads, whatever byte of the attribute's object header or
heap collection is changed.
"""
import json

import h5py
import pytest

from npgpt.config import GPT2Config
from npgpt.errors import FormatError
from npgpt.h5read import read_attr
from npgpt.h5vlen import vlen_attribute
from npgpt.params import init_params, load_params, save_params

CONFIG = GPT2Config(n_layer=1, n_head=2, n_embd=8, vocab_size=11, n_ctx=16)
META = {"labels": ["ham", "spam", "café ☕"], "args": {"lr": 3e-4, "epochs": 2}, "note": "x" * 40}
MAX = 1 << 24


class CountingFile:
    """A file in memory that keeps where it was read, (position, bytes) per read: `data` (a
    bytearray) may be changed between parses."""

    def __init__(self, data: bytearray):
        self.data, self.pos, self.ranges = data, 0, []

    def seek(self, pos):
        self.pos = pos

    def read(self, n):
        self.ranges.append((self.pos, n))
        out = bytes(self.data[self.pos:self.pos + n])
        self.pos += len(out)
        return out

    @property
    def reads(self) -> int:
        return len(self.ranges)


def parse(data: bytearray, header: int, name="meta", max_bytes=MAX):
    """-> (the value or the FormatError, the CountingFile that was read)"""
    fh = CountingFile(data)
    try:
        return vlen_attribute(fh, len(data), header, name, max_bytes, where=f"m.h5: attribute {name!r}"), fh
    except FormatError as e:
        return e, fh


def root_header(path) -> int:
    with h5py.File(path, "r") as f:
        return h5py.h5o.get_info(f.id).addr


def h5py_strings(path) -> dict:
    """Every variable-length string attribute of the root, as h5py reads it (sound files only)."""
    with h5py.File(path, "r") as f:
        infos = {k: h5py.check_string_dtype(f.attrs.get_id(k).dtype) for k in f.attrs}
        return {k: f.attrs[k] for k, info in infos.items() if info is not None and info.length is None}


def npgpt_strings(path, names) -> dict:
    with h5py.File(path, "r") as f:
        return {k: read_attr(f, path, k, max_bytes=MAX) for k in names}


STRINGS = {"meta": json.dumps(META, ensure_ascii=False), "empty": "", "long": "0," * 150_000, "odd": "abc"}


def _write(path, layout):
    kw = {"latest": dict(libver="latest"), "userblock": dict(userblock_size=512)}.get(layout, {})
    if layout == "4-byte addresses":
        fcpl = h5py.h5p.create(h5py.h5p.FILE_CREATE)
        fcpl.set_sizes(4, 4)
        f = h5py.File(h5py.h5f.create(str(path).encode(), h5py.h5f.ACC_TRUNC, fcpl=fcpl))
    else:
        f = h5py.File(path, "w", **kw)
    with f:
        f.attrs["n"] = 3
        for k, v in STRINGS.items():
            f.attrs[k] = v
    if layout == "rewritten":            # each new value a new heap object, the old ones freed
        with h5py.File(path, "r+") as f:
            for text in ("a" * 13, "b" * 5, json.dumps(META)):
                f.attrs["meta"] = text


@pytest.mark.parametrize("layout", ["default", "latest", "userblock", "4-byte addresses", "rewritten"])
def test_strings_read_as_h5py_reads_them(tmp_path, layout):
    path = tmp_path / "a.h5"
    _write(path, layout)
    expected = h5py_strings(path)
    assert set(expected) == set(STRINGS)
    assert npgpt_strings(path, expected) == expected


def test_a_model_file_as_npgpt_writes_it_loads_its_meta(tmp_path):
    """The `meta` of every file written so far (h5py's variable-length UTF-8 string): the same."""
    path = tmp_path / "m.h5"
    save_params(path, init_params(CONFIG, seed=0), CONFIG, meta=META)
    with h5py.File(path, "r") as f:
        assert h5py.check_string_dtype(f.attrs.get_id("meta").dtype).length is None
        assert read_attr(f, path, "meta", max_bytes=MAX) == f.attrs["meta"] == json.dumps(META)
    assert load_params(path)[2] == META


def test_attributes_in_dense_storage_are_refused(tmp_path):
    path = tmp_path / "a.h5"
    with h5py.File(path, "w", libver="latest") as f:
        for i in range(12):                   # over 8: a fractal heap, not the object header
            f.attrs[f"k{i}"] = f"v{i}"
    with h5py.File(path, "r") as f:
        with pytest.raises(FormatError, match="'k3' is not in the root group's object header"):
            read_attr(f, path, "k3")


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    """(bytes of a tiny model file as save_params writes it, its root header's address)"""
    path = tmp_path_factory.mktemp("vlen") / "m.h5"
    save_params(path, init_params(CONFIG, seed=1), CONFIG)        # meta "{}"
    return bytearray(path.read_bytes()), root_header(path)


def _heap(data: bytearray):
    """(address of the heap collection, its size, address of meta's 2 bytes)"""
    at = data.index(b"GCOL")
    return at, int.from_bytes(data[at + 8:at + 16], "little"), data.index(b"{}", at)


def test_a_long_string_is_refused_before_its_bytes_are_read(tmp_path):
    path = tmp_path / "a.h5"
    with h5py.File(path, "w") as f:
        f.attrs["meta"] = "x" * 100_000
    value, fh = parse(bytearray(path.read_bytes()), root_header(path), max_bytes=1000)
    assert isinstance(value, FormatError) and "is 100000 bytes, more than the 1000 allowed" in str(value)
    assert sum(n for _, n in fh.ranges) < 1000


def test_a_string_longer_than_its_heap_object_is_refused(model_file):
    data, header = model_file
    data = bytearray(data)
    at, _, _ = _heap(data)
    data[at + 24] = 1                          # the object's size: 1 byte, for a 2-byte string
    value, _ = parse(data, header)
    assert isinstance(value, FormatError) and "is 2 bytes, longer than its heap object of 1" in str(value)


def test_object_header_blocks_that_loop_are_refused(model_file):
    data, header = model_file
    data = bytearray(data)
    start = header + 16                        # the first message: the continuation to the next block
    assert int.from_bytes(data[start:start + 2], "little") == 0x10
    block = int.from_bytes(data[start + 8:start + 16], "little")
    data[block:block + 24] = data[start:start + 24]                # whose first message leads to itself
    value, fh = parse(data, header, name="absent")                 # (so that every block is walked)
    assert isinstance(value, FormatError) and "whose blocks loop" in str(value)
    assert fh.reads < 50                 # each of the ten messages once, not the loop 65536 times


XORS = (0x01, 0x47, 0x80, 0xFF)


def test_every_byte_of_the_attribute_and_its_heap_changed(model_file):
    """Each byte that the sound parse reads (object header, attribute messages) and each byte of
    the heap collection, XORed with each of XORS: "{}", or the changed text when the change is in
    the string's own two bytes, or a FormatError; never another exception, never more than 100
    reads (the sound file takes fewer than 30)."""
    data, header = model_file
    value, fh = parse(data, header)
    assert value == "{}" and fh.reads < 30
    heap, size, text = _heap(data)
    positions = {p for at, n in fh.ranges for p in range(at, at + n)} | set(range(heap, heap + size))
    assert len(positions) > size > 1000
    outcomes = {"value": 0, "error": 0}
    for pos in sorted(positions):
        for xor in XORS:
            data[pos] ^= xor
            try:
                value, fh = parse(data, header)
                expected = data[text:text + 2].decode("utf-8", "replace")
            finally:
                data[pos] ^= xor
            assert fh.reads <= 100, (pos, xor)
            if not isinstance(value, FormatError):
                assert value == (expected if text <= pos < text + 2 else "{}"), (pos, xor, value)
            outcomes["value" if isinstance(value, str) else "error"] += 1
    assert outcomes["error"] > 100 and outcomes["value"] > 1000, outcomes
