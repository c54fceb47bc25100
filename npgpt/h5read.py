"""Reading HDF5 files that may come from anyone: a model file reads nothing but itself.

A classifier, a weights file or a checkpoint is often downloaded from a stranger. HDF5 can do
much more than hold arrays, and each of these would let such a file reach outside itself:

    external storage    a dataset's bytes live in another file (`/etc/passwd`, say)
    external links      a name points into another HDF5 file
    soft links          a name points elsewhere in the file (or nowhere)
    virtual datasets    a dataset is assembled from other files' datasets (missing ones read as 0)

and a few small bytes can ask for gigabytes: a gzip-compressed chunk of zeros, a dataset whose
chunks were never written (read as the fill value), a huge declared shape, a huge attribute.

So every read goes through this module, which accepts only datasets stored in the file itself,
contiguous or chunked, reached through plain (hard) links, and
- checks a dataset's shape and dtype against what the caller expects *before* reading it;
- reads a chunked dataset chunk by chunk, undoing its filters itself (gzip, shuffle, fletcher32;
  any other filter is refused), so that no chunk can expand past its declared size, and requires
  every chunk to be stored (no fill values);
- reads an attribute only when it is a scalar of the expected kind and under a size cap; a
  variable-length string attribute (`meta`, a checkpoint's `state`) is read from the file's bytes
  by `h5vlen`, never by HDF5 (whose walk of the heap holding it can loop forever on a corrupt size);
- `check_budget`: the arrays a file declares may not exceed what its size can plausibly hold
  (`MAX_EXPANSION` times it: float weights compress by a few percent, not a thousandfold).

Every failure is a `FormatError` naming the file and the array or attribute.
"""
from __future__ import annotations

import contextlib
import math
import os
import zlib

import numpy as np

from .errors import FormatError, NpgptError, quote
from .h5vlen import read_vlen_string

MAX_EXPANSION = 8            # declared array bytes per byte of file, at most
BUDGET_SLACK = 1 << 20       # ... plus this much, for tiny files
FILTERS = {1: "deflate", 2: "shuffle", 3: "fletcher32"}   # HDF5 filter ids this module can undo


@contextlib.contextmanager
def open_h5(path):
    """`with open_h5(path) as f:` the HDF5 file opened read-only, with every link in it checked
    to be a plain (hard) link. FormatError for a missing file, a folder, or not HDF5."""
    import h5py
    path = os.fspath(path)
    if os.path.isdir(path):
        raise FormatError(f"{path}: is a folder, expected an HDF5 file")
    if not os.path.exists(path):
        raise FormatError(f"{path}: no such file")
    try:
        f = h5py.File(path, "r")
    except Exception as e:  # h5py raises OSError for anything not HDF5
        raise FormatError(f"{path}: not a readable HDF5 file ({e})") from None
    with f:
        try:
            _check_links(f, path)
            yield f
        except NpgptError:
            raise
        except Exception as e:   # h5py's errors on a damaged file (OSError, RuntimeError, KeyError...)
            raise FormatError(f"{path}: cannot read ({type(e).__name__}: {str(e)[:200]})") from None


def _check_links(f, path) -> None:
    """FormatError for any soft or external link anywhere in the file."""
    import h5py
    bad = []

    def visit(name, link):
        if not isinstance(link, h5py.HardLink) and not bad:
            bad.append((name, type(link).__name__))
    try:
        f.visititems_links(visit)
    except Exception as e:
        raise FormatError(f"{path}: cannot list its contents ({type(e).__name__}: {e})") from None
    if bad:
        name, kind = bad[0]
        raise FormatError(f"{path}: {quote(name)} is a {kind}; a model file may hold only its own "
                          "arrays (no soft or external links)")


def dataset_names(f) -> list:
    """Every dataset in the file, by its full name ("h0/attn/c_attn/w")."""
    import h5py
    found = []
    f.visititems(lambda name, obj: found.append(name) if isinstance(obj, h5py.Dataset) else None)
    return found


def _dataset(f, path, name):
    import h5py
    obj = f.get(name)
    if not isinstance(obj, h5py.Dataset):
        raise FormatError(f"{path}: array {quote(name)} is missing")
    return obj


def stored_bytes(f, path, name, kinds="f") -> int:
    """The bytes a dataset takes once read (shape times item size), after checking its dtype is
    one of `kinds` ("f": float16/32/64; "iu": integers; "u": unsigned...)."""
    ds = _dataset(f, path, name)
    sizes = (2, 4, 8) if ds.dtype.kind == "f" else (1, 2, 4, 8)
    if ds.dtype.kind not in kinds or ds.dtype.itemsize not in sizes:
        raise FormatError(f"{path}: array {quote(name)} has dtype {ds.dtype}, expected "
                          f"{'a float type' if kinds == 'f' else 'an integer type'}")
    return math.prod(ds.shape) * ds.dtype.itemsize


def check_budget(f, path, names, kinds="f") -> None:
    """FormatError when the arrays `names` would take more memory than the file's size can hold
    (`MAX_EXPANSION` times it, plus `BUDGET_SLACK`): a few compressed bytes cannot become gigabytes."""
    total = sum(stored_bytes(f, path, n, kinds) for n in names)
    size = os.path.getsize(path)
    if total > MAX_EXPANSION * size + BUDGET_SLACK:
        raise FormatError(f"{path}: declares {total / 2**20:.1f} MiB of arrays in a file of "
                          f"{size / 2**20:.1f} MiB; no real model compresses that well")


def read_array(f, path, name, shape, kinds="f") -> np.ndarray:
    """The dataset `name`, checked before it is read: present, stored in this file (see the module
    docstring), of `shape`, of a dtype of `kinds`. -> the array in the file's dtype"""
    import h5py
    ds = _dataset(f, path, name)
    if tuple(ds.shape) != tuple(shape):
        raise FormatError(f"{path}: array {quote(name)} has shape {tuple(ds.shape)}, expected {tuple(shape)}")
    stored_bytes(f, path, name, kinds)                      # the dtype check
    try:
        plist = ds.id.get_create_plist()
        layout = plist.get_layout()
        if plist.get_external_count() or layout == h5py.h5d.VIRTUAL:
            raise FormatError(f"{path}: array {quote(name)} is stored in other files "
                              f"({'a virtual dataset' if layout == h5py.h5d.VIRTUAL else 'external storage'}); "
                              "a model file may hold only its own arrays")
        if layout == h5py.h5d.CONTIGUOUS:
            if ds.size and ds.id.get_offset() is None:
                raise FormatError(f"{path}: array {quote(name)} has no data stored")
            return np.asarray(ds[()])
        if layout == h5py.h5d.CHUNKED:
            return _read_chunked(ds, plist, f"{path}: array {quote(name)}")
        raise FormatError(f"{path}: array {quote(name)} has an unsupported storage layout ({layout}); "
                          "expected contiguous or chunked")
    except FormatError:
        raise
    except Exception as e:
        raise FormatError(f"{path}: array {quote(name)} cannot be read ({type(e).__name__}: {e})") from None


def _read_chunked(ds, plist, where) -> np.ndarray:
    """A chunked dataset, one chunk at a time: every chunk of the grid stored once, each undone
    through its filters here (`_unfilter`) to exactly the chunk's size."""
    chunk = plist.get_chunk()                                    # chunk shape
    filters = [plist.get_filter(i)[0] for i in range(plist.get_nfilters())]
    unknown = [c for c in filters if c not in FILTERS]
    if unknown:
        raise FormatError(f"{where} uses HDF5 filter {unknown[0]}; only {', '.join(FILTERS.values())} are read")
    shape, dtype = tuple(ds.shape), ds.dtype
    if any(c > max(s, 1) for c, s in zip(chunk, shape)):
        raise FormatError(f"{where} has chunks {chunk} larger than the array {shape}")
    chunk_bytes = math.prod(chunk) * dtype.itemsize
    grid = [math.ceil(s / c) for s, c in zip(shape, chunk)]
    expected = math.prod(grid)
    if ds.id.get_num_chunks() != expected:
        raise FormatError(f"{where} stores {ds.id.get_num_chunks()} of its {expected} chunks")
    out = np.empty(shape, dtype)
    seen = set()
    for i in range(expected):
        info = ds.id.get_chunk_info(i)
        at = tuple(info.chunk_offset)
        if at in seen or any(o % c or o >= s for o, c, s in zip(at, chunk, shape)):
            raise FormatError(f"{where} has a chunk at {at} that does not fit its grid")
        seen.add(at)
        if info.size > chunk_bytes + chunk_bytes // 100 + 1024:     # deflate adds at most ~0.03%
            raise FormatError(f"{where} has a chunk of {info.size} bytes, larger than {chunk_bytes}")
        mask, raw = ds.id.read_direct_chunk(at)
        block = np.frombuffer(_unfilter(raw, filters, mask, chunk_bytes, dtype.itemsize, where), dtype)
        block = block.reshape(chunk)
        region = tuple(slice(o, min(o + c, s)) for o, c, s in zip(at, chunk, shape))
        out[region] = block[tuple(slice(0, r.stop - r.start) for r in region)]
    return out


def _unfilter(raw: bytes, filters, mask: int, chunk_bytes: int, itemsize: int, where) -> bytes:
    """One chunk's stored bytes back to its raw bytes: the filters undone in reverse order (those
    whose bit is set in `mask` were skipped when it was written). Inflating stops at chunk_bytes.
    (fletcher32's checksum is dropped unchecked: the values are checked finite, and a model file
    has no checksum over its metadata anyway.)"""
    data = raw
    for i in reversed(range(len(filters))):
        if mask & (1 << i):
            continue
        code = filters[i]
        if code == 3:                               # fletcher32: a 4-byte checksum at the end
            data = data[:-4]
        elif code == 1:                             # deflate
            d = zlib.decompressobj()
            try:
                data = d.decompress(data, chunk_bytes + 1)
            except zlib.error as e:
                raise FormatError(f"{where} has a chunk that does not inflate ({e})") from None
            if len(data) > chunk_bytes or not d.eof:
                raise FormatError(f"{where} has a chunk that inflates past its size of {chunk_bytes} bytes")
        elif code == 2 and len(data) == chunk_bytes and itemsize > 1:    # shuffle: byte planes back
            data = np.frombuffer(data, np.uint8).reshape(itemsize, -1).T.tobytes()
    if len(data) != chunk_bytes:
        raise FormatError(f"{where} has a chunk of {len(data)} bytes, expected {chunk_bytes}")
    return data


def read_bytes(f, path, name, size: int) -> bytes:
    """A file stored as a 1-D uint8 dataset (the tokenizer's), which must be exactly `size` bytes
    long: checked before a byte is read."""
    ds = _dataset(f, path, name)
    if ds.shape != (size,):
        raise FormatError(f"{path}: stored file {quote(name)} has shape {ds.shape}, expected ({size},)")
    return read_array(f, path, name, (size,), kinds="u").astype(np.uint8, copy=False).tobytes()


def read_attr(f, path, name, default=None, max_bytes: int = 1 << 10):
    """A root attribute as a Python int, float, bool or str (`default` when absent), checked before
    it is read: a scalar (or one-element) number, or a scalar string of at most max_bytes.
    Numbers and fixed-length strings are stored in the attribute itself and read by HDF5; a
    variable-length string (h5py's default for a str) is read by `h5vlen`, never by HDF5."""
    import h5py
    try:
        if name not in f.attrs:
            return default
        aid = f.attrs.get_id(name)
        shape, dtype = aid.shape, aid.dtype
        text = h5py.check_string_dtype(dtype)
        if text is not None:
            if shape != ():
                raise FormatError(f"{path}: attribute {quote(name)} is an array of shape {shape}, expected one string")
            if text.length is None:
                return read_vlen_string(f, path, name, max_bytes)
            if text.length > max_bytes:
                raise FormatError(f"{path}: attribute {quote(name)} is {text.length} bytes, more than "
                                  f"the {max_bytes} allowed")
            value = f.attrs[name]
            return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
        if dtype.kind not in "iufb" or math.prod(shape) != 1:
            raise FormatError(f"{path}: attribute {quote(name)} is not a number (dtype {dtype}, shape {shape})")
        return np.asarray(f.attrs[name]).reshape(()).item()
    except FormatError:
        raise
    except Exception as e:
        raise FormatError(f"{path}: attribute {quote(name)} cannot be read ({type(e).__name__}: {e})") from None
