"""A variable-length string attribute read from the file's own bytes: HDF5 never reads it.

HDF5 keeps a variable-length string outside its attribute. The attribute holds a "heap ID"
(the string's length, the address of a global heap collection, the object's index in it), and
the characters live in that collection. HDF5's own read walks the collection's objects trusting
every size in it: one corrupt size (a free-space object of size 0) makes that walk loop forever,
holding the GIL. A stranger's model file can do that, so `read_vlen_string` finds the heap ID
and walks the collection itself, with plain file reads, every address and size checked against
the file and every loop bounded:

    object header of the root group (version 1, as h5py writes by default; or version 2,
    "OHDR", as `libver="latest"` writes), its messages, continued in further blocks
      the attribute message of that name (versions 1-3): name, datatype, dataspace, data
        data: the heap ID = length u32, collection address, object index u32
    global heap collection: "GCOL", version 1, 3 reserved bytes, collection size (all of it)
      objects: index u16, reference count u16, 4 reserved bytes, size, data padded to 8 bytes;
      index 0 is the free space, which ends the list

Integers are little-endian; addresses are relative to the file's base address (after its user
block), and their widths (and those of lengths) are the file's own, as HDF5 reports them. An
attribute kept in "dense" storage (a fractal heap: more than 8 attributes in a version-2 header)
is not read. Everything wrong is a FormatError naming the file and the attribute.
"""
from __future__ import annotations

import os

from .errors import FormatError, quote

MAX_MESSAGES = 1 << 16       # header messages walked, at most (a model's root has about ten)
MAX_OBJECTS = 1 << 16        # objects in one heap collection: their index is 16 bits
ATTRIBUTE, CONTINUATION = 0x000C, 0x0010     # header message types
VLEN, STRING = 9, 1          # datatype class "variable-length", and its kind "string"


def read_vlen_string(f, path, name: str, max_bytes: int) -> str:
    """The root attribute `name` of the open h5py file `f` (at `path`), a scalar variable-length
    string, read by `vlen_attribute` where HDF5 says the root group's object header is."""
    import h5py
    plist = f.id.get_create_plist()
    header = h5py.h5o.get_info(f.id).addr
    with open(path, "rb") as fh:
        return vlen_attribute(fh, os.fstat(fh.fileno()).st_size, header, name, max_bytes,
                              where=f"{path}: attribute {quote(name)}", base=plist.get_userblock(),
                              widths=plist.get_sizes())


def vlen_attribute(fh, size: int, header: int, name: str, max_bytes: int, where: str,
                   base: int = 0, widths=(8, 8)) -> str:
    """The variable-length string attribute `name` of the object whose header is at `header`,
    from `fh` (a binary file of `size` bytes, opened by the caller; any seekable one), as text
    (UTF-8; undecodable bytes replaced). FormatError (starting with `where`) for anything
    inconsistent, or when the string is longer than max_bytes bytes: checked before its bytes
    are read. base: the file's base address; widths: (address, length) widths in bytes."""
    r = _Reader(fh, size, base, *widths, where)
    length, collection, index = _heap_id(r, header, name)
    if length > max_bytes:
        r.fail(f"is {length} bytes, more than the {max_bytes} allowed")
    data = _heap_object(r, collection, index, length) if length else b""
    return data.decode("utf-8", "replace")


class _Reader:
    """Bounds-checked reads of one file: `at(addr, n)` is exactly n bytes at the (relative)
    address addr, or a FormatError saying the file ends first."""

    def __init__(self, fh, size: int, base: int, addr_width: int, length_width: int, where: str):
        self.fh, self.base, self.where = fh, base, where
        self.sa, self.sl = addr_width, length_width
        self.end = size - base                       # relative addresses below this are in the file

    def at(self, addr: int, n: int) -> bytes:
        if addr < 0 or n < 0 or addr + n > self.end:
            self.fail(f"points past the end of the file ({n} bytes at {addr}, file of {self.end})")
        self.fh.seek(self.base + addr)
        data = self.fh.read(n)
        if len(data) != n:
            self.fail("cannot be read: the file ended early")
        return data

    def fail(self, why: str):
        raise FormatError(f"{self.where} {why}")


def _uint(data: bytes, at: int, width: int) -> int:
    return int.from_bytes(data[at:at + width], "little")


def _align8(n: int) -> int:
    return (n + 7) & ~7


def _blocks(r: _Reader, header: int):
    """The object header at `header`: (version, flags, start, end), its first block of messages
    between start and end."""
    first = r.at(header, 16)
    if first[:4] == b"OHDR":
        if first[4] != 2:
            r.fail(f"is on an object header of version {first[4]}, not 2")
        flags = first[5]
        at = 6 + (16 if flags & 0x20 else 0) + (4 if flags & 0x10 else 0)      # times, attribute limits
        width = 1 << (flags & 3)
        size = _uint(r.at(header + at, width), 0, width)
        return 2, flags, header + at + width, header + at + width + size
    if first[0] != 1:
        r.fail(f"is on an object header of version {first[0]}, not 1 or 2")
    return 1, 0, header + 16, header + 16 + _uint(first, 8, 4)       # 12 bytes, padded to 16


def _messages(r: _Reader, header: int):
    """(type, address of its data, size) of every message of an object header, continuation
    blocks followed; at most MAX_MESSAGES of them, each block visited once."""
    version, flags, start, end = _blocks(r, header)
    prefix = 8 if version == 1 else 4 + (2 if flags & 0x04 else 0)    # a message's own header
    blocks, seen, count = [(start, end)], set(), 0
    while blocks:
        start, end = blocks.pop(0)
        if start in seen:
            r.fail(f"is on an object header whose blocks loop (at {start})")
        seen.add(start)
        at = start
        while at + prefix <= end:
            count += 1
            if count > MAX_MESSAGES:
                r.fail(f"is on an object header of more than {MAX_MESSAGES} messages")
            head = r.at(at, prefix)
            kind = _uint(head, 0, 2) if version == 1 else head[0]
            size = _uint(head, 2, 2) if version == 1 else _uint(head, 1, 2)
            data = at + prefix
            if data + size > end:
                r.fail(f"is on an object header with a message past its block ({data + size} > {end})")
            if kind == CONTINUATION:
                block = r.at(data, r.sa + r.sl)
                more, length = _uint(block, 0, r.sa), _uint(block, r.sa, r.sl)
                if version == 2:            # "OCHK", the messages, a 4-byte checksum
                    if r.at(more, 4) != b"OCHK" or length < 8:
                        r.fail(f"is on an object header with a bad continuation block at {more}")
                    blocks.append((more + 4, more + length - 4))
                else:
                    blocks.append((more, more + length))
            else:
                yield kind, data, size
            at = data + size


def _heap_id(r: _Reader, header: int, name: str):
    """(length, collection address, object index) stored in the attribute message `name`."""
    want = name.encode("utf-8") + b"\0"
    for kind, at, size in _messages(r, header):
        if kind != ATTRIBUTE or size < 8:
            continue
        msg = r.at(at, min(size, 9 + len(want)))       # enough for the name: the rest if it is this one
        version, flags = msg[0], msg[1]
        name_size, type_size, space_size = _uint(msg, 2, 2), _uint(msg, 4, 2), _uint(msg, 6, 2)
        if version not in (1, 2, 3):
            r.fail(f"has an attribute message of version {version}")
        pad = _align8 if version == 1 else (lambda n: n)
        start = 9 if version == 3 else 8
        if msg[start:start + name_size] != want:
            continue
        msg = r.at(at, size)
        dtype = start + pad(name_size)
        space = dtype + pad(type_size)
        data = space + pad(space_size)
        id_size = 4 + r.sa + 4
        if version > 1 and flags & 3:
            r.fail("has a shared datatype or dataspace; npgpt reads only its own")
        if data + id_size > size or type_size < 8 or space_size < 4:
            r.fail(f"has an attribute message of {size} bytes, too short for what it declares")
        if msg[dtype] & 0x0F != VLEN or msg[dtype + 1] & 0x0F != STRING:
            r.fail("is not a variable-length string in the file")
        if msg[space + 1] != 0 or (msg[space] >= 2 and msg[space + 3] != 0):
            r.fail("is not one string in the file (its dataspace is not scalar)")
        return _uint(msg, data, 4), _uint(msg, data + 4, r.sa), _uint(msg, data + 4 + r.sa, 4)
    r.fail("is not in the root group's object header (attributes in dense storage are not read)")


def _heap_object(r: _Reader, collection: int, index: int, length: int) -> bytes:
    """The first `length` bytes of object `index` of the global heap collection at `collection`."""
    if not 1 <= index < MAX_OBJECTS:
        r.fail(f"points to global heap object {index}; objects are numbered 1 to {MAX_OBJECTS - 1}")
    head_size = _align8(8 + r.sl)                    # of the collection, and of each object
    head = r.at(collection, head_size)
    if head[:4] != b"GCOL" or head[4] != 1:
        r.fail(f"points to {collection}, which holds no global heap collection (version 1)")
    size = _uint(head, 8, r.sl)
    if size < head_size or collection + size > r.end:
        r.fail(f"points to a global heap collection of {size} bytes at {collection}, past the end of the file")
    at = head_size
    for _ in range(MAX_OBJECTS):
        if at + head_size > size:
            break
        obj = r.at(collection + at, head_size)
        found, obj_size = _uint(obj, 0, 2), _uint(obj, 8, r.sl)
        if found == 0:                                  # the free space: no objects after it
            break
        if at + head_size + obj_size > size:
            r.fail(f"points to a global heap collection whose object {found} ends past it")
        if found == index:
            if length > obj_size:
                r.fail(f"is {length} bytes, longer than its heap object of {obj_size}")
            return r.at(collection + at + head_size, length)
        at += head_size + _align8(obj_size)
    r.fail(f"points to global heap object {index}, which its collection at {collection} does not hold")
