"""Files on disk: the few mechanisms every writer of npgpt shares, each written once.

    atomic_write(path)      a file appears whole or not at all (temporary name, fsync, rename)
    write_json(path, obj)   a JSON file, written that way
    temp_path(folder, name) a temporary file name that says which process writes it
    temp_owner(name)        ... and reads that process back from the name
    sha256_file(path)       the sha256 of a file's bytes, read in chunks
    process_alive(pid)      whether a process runs on this machine
    reserve_space(path)     give every byte of a file its disk blocks now (before it is memory-mapped)
    regular_file(path)      whether a path is a plain file (not a FIFO, device, folder or link)
    hold(path)              a shared lock on a file, held while the returned file object is open
    held(path)              whether any open file object holds such a lock (this process's too)

Why a write is atomic: a reader (another run, a later `--resume`, the user's `ls`) sees either the
old file or the new one, never half of one, and a failed or interrupted write (a full disk, Ctrl-C,
a kill) leaves the old file as it was. The bytes go to a temporary file in the same folder (a
rename is atomic only within one file system), which is flushed to the disk (fsync) and then
renamed over the target; the folder is fsynced too, so that the rename itself survives a crash.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import stat
import tempfile

from .errors import FormatError

TEMP_SUFFIX = ".tmp"


def temp_path(folder, name: str) -> str:
    """A fresh temporary path in `folder` for a file that will become `name`: `.<name>.<pid>.<random>.tmp`.
    The pid tells a later process whether the writer still runs (`temp_owner`), so a file left by a
    killed process can be told from one being written now."""
    fd, path = tempfile.mkstemp(prefix=f".{name}.{os.getpid()}.", suffix=TEMP_SUFFIX, dir=folder)
    os.close(fd)
    return path


def temp_owner(filename: str):
    """The pid in a name made by `temp_path`, or None when the name is not one of those."""
    parts = os.path.basename(filename).split(".")
    # "", name parts..., pid, random, "tmp"
    if len(parts) < 5 or parts[0] != "" or parts[-1] != TEMP_SUFFIX[1:] or not parts[-3].isdigit():
        return None
    return int(parts[-3])


def _umask() -> int:
    """The process's umask (read by setting it and putting it back)."""
    mask = os.umask(0o077)
    os.umask(mask)
    return mask


def fsync_folder(folder) -> None:
    """Make a rename in `folder` durable (where the system lets a folder be opened and synced)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def replace_durably(tmp, path) -> None:
    """Move the finished file `tmp` onto `path`: fsync its bytes, rename, fsync the folder."""
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    fsync_folder(os.path.dirname(os.path.abspath(path)))


@contextlib.contextmanager
def atomic_write(path):
    """`with atomic_write(path) as tmp: <write the file tmp>`: on success tmp becomes `path`, with
    the permissions any new file gets (0666 less the umask, not tempfile's private 0600); on an
    error tmp is removed and `path` is left as it was. The folder must exist."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    tmp = temp_path(folder, os.path.basename(path))
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())
        replace_durably(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)


def write_json(path, obj, indent=1) -> None:
    """Write obj as JSON to path, atomically."""
    with atomic_write(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(obj, fh, indent=indent)


def write_bytes(path, data: bytes) -> None:
    """Write bytes to path, atomically."""
    with atomic_write(path) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(data)


def sha256_file(path, chunk: int = 1 << 22, max_bytes: int | None = None) -> str:
    """The sha256 of a file's bytes (hex), read 4 MiB at a time; with max_bytes, FormatError once
    the file turns out longer (it is never read past that)."""
    h = hashlib.sha256()
    seen = 0
    with open(path, "rb") as fh:
        while True:
            block = fh.read(chunk if max_bytes is None else min(chunk, max_bytes + 1 - seen))
            if not block:
                return h.hexdigest()
            seen += len(block)
            if max_bytes is not None and seen > max_bytes:
                raise FormatError(f"{path}: longer than the {max_bytes} bytes expected")
            h.update(block)


def process_alive(pid: int) -> bool:
    """Whether a process with this id runs on this machine (one owned by another user counts)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:                         # exists, but owned by someone else
        return True
    return True


def reserve_space(path) -> None:
    """Give every byte of the file at `path` its blocks on disk now: OSError (ENOSPC) here when
    the disk is too full. A file about to be written through a memory map needs this: a sparse
    file gets its blocks only as pages are written, and a write the disk cannot hold is then no
    error but a SIGBUS that kills the process."""
    fd = os.open(path, os.O_RDWR)
    try:
        size = os.fstat(fd).st_size
        try:
            os.posix_fallocate(fd, 0, size)
            return
        except AttributeError:                  # (no posix_fallocate on this system)
            pass
        except OSError as e:
            if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                raise
        block = b"\0" * (1 << 20)                # no fallocate: write the zeros through the file
        for offset in range(0, size, len(block)):
            os.pwrite(fd, block[:size - offset], offset)
        os.fsync(fd)
    finally:
        os.close(fd)


def regular_file(path) -> bool:
    """Whether `path` is a regular file itself (not a symbolic link, a FIFO, a device or a folder):
    what a reader checks before opening a file that should be one, since opening a FIFO blocks."""
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        return False


def hold(path):
    """Open `path` and take a shared lock on it (flock): while the returned file object stays open
    (and however the process ends, the system releases it then), `held(path)` is true, so the file
    counts as in use. None where the system has no flock (Windows) or the file cannot be opened."""
    try:
        import fcntl
        fh = open(path, "rb")
    except (ImportError, OSError):
        return None
    try:
        fcntl.flock(fh, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        fh.close()
        return None
    return fh


def held(path) -> bool:
    """Whether a `hold` on `path` is open now, in any process (an exclusive lock cannot be had)."""
    try:
        import fcntl
        fh = open(path, "rb")
    except (ImportError, OSError):
        return False
    with fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        except OSError:
            return False
        fcntl.flock(fh, fcntl.LOCK_UN)
        return False
