"""The process's threads and memory, set up once for npgpt's kernels however NumPy was imported.

npgpt runs two thread pools on the same cores, one after the other: Numba's (OpenMP) for its
kernels and OpenBLAS's for NumPy's matmuls. Each pool, left to its defaults, keeps its idle
threads spinning after every call, waiting for the next one: OpenMP for a while, OpenBLAS for
about 2^28 cycles (~0.1 s). On two cores, a kernel that follows a matmul then shares its cores
with OpenBLAS's spinning thread, and a matmul with OpenMP's: a tiny model's training measured 6-11x
slower. Either pool sleeping at once is enough to avoid it (both are set here):

- OpenMP: `OMP_WAIT_POLICY=PASSIVE`, read when the OpenMP runtime loads, which is when Numba
  starts its thread pool (npgpt's first parallel kernel), not when NumPy is imported. Set here
  before that, unless already set.
- OpenBLAS: `OPENBLAS_THREAD_TIMEOUT=8` (2^8 cycles of spinning, which still catches the next
  matmul of a row of them). OpenBLAS reads it when it loads, i.e. when NumPy is imported, often
  long before npgpt (a notebook imports pandas first). So when OpenBLAS is loaded already, this
  module sets the variable, has OpenBLAS read its environment again (`openblas_read_env`) and
  stops its thread pool (`blas_thread_shutdown_`): the next matmul starts it again, with the
  short timeout. Done once, from the thread that first loads npgpt's kernels: no matmul may run
  in another thread at that moment (npgpt's own never do).
- glibc's malloc keeps freed blocks of up to 32 MiB for reuse (mallopt M_MMAP_THRESHOLD,
  M_TRIM_THRESHOLD) instead of returning them to the OS: otherwise every large temporary (an
  activation of 2048 tokens x 3072 is 24 MiB) is a fresh mmap whose first write page-faults on
  every page; the frozen blocks measured 5-10% faster. `NPGPT_MALLOC_TUNING=0` skips it.

`prepare()` does all of it, once; `npgpt.kernels` calls it when it is imported, so any path that
runs a kernel (`npgpt.fit`, the estimator, a Classifier, the command line) is set up with no call
to remember. A variable the user set is left as it is. `state()` says what is in force.
"""
from __future__ import annotations

import ctypes
import os

OMP_WAIT_POLICY = "PASSIVE"
OPENBLAS_THREAD_TIMEOUT = "8"

_done: dict | None = None


def prepare() -> dict:
    """Set up this process for npgpt's kernels (see the module's docstring); return what was
    done this time ({} when it was done before)."""
    global _done
    if _done is not None:
        return {}
    _done = {}
    if "OMP_WAIT_POLICY" not in os.environ and not _numba_pool_started():
        os.environ["OMP_WAIT_POLICY"] = OMP_WAIT_POLICY
        _done["OMP_WAIT_POLICY"] = OMP_WAIT_POLICY
    if "OPENBLAS_THREAD_TIMEOUT" not in os.environ:
        os.environ["OPENBLAS_THREAD_TIMEOUT"] = OPENBLAS_THREAD_TIMEOUT
        _done["OPENBLAS_THREAD_TIMEOUT"] = OPENBLAS_THREAD_TIMEOUT
        if _restart_openblas_threads():
            _done["openblas"] = "thread pool restarted with the new timeout"
    if os.environ.get("NPGPT_MALLOC_TUNING", "1") != "0" and _keep_freed_memory():
        _done["malloc"] = "M_MMAP_THRESHOLD 32 MiB, M_TRIM_THRESHOLD 256 MiB"
    return dict(_done)


def state() -> dict:
    """What is in force now: the two variables, the timeout OpenBLAS's threads were started with
    (as OpenBLAS reports it; None when no OpenBLAS is loaded), whether Numba's pool has started,
    and what `prepare` did."""
    blas = _openblas()
    return {"OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY"),
            "OPENBLAS_THREAD_TIMEOUT": os.environ.get("OPENBLAS_THREAD_TIMEOUT"),
            "openblas_thread_timeout": blas.openblas_thread_timeout() if blas is not None else None,
            "numba_pool_started": _numba_pool_started(),
            "prepared": dict(_done) if _done is not None else None}


def _numba_pool_started() -> bool:
    """Whether Numba has started its thread pool (and so loaded its OpenMP runtime), without
    importing Numba when nothing has."""
    import sys
    parallel = sys.modules.get("numba.np.ufunc.parallel")
    return bool(parallel is not None and getattr(parallel, "_is_initialized", False))


def _openblas():
    """The OpenBLAS library this process has loaded (NumPy's), as ctypes sees it; None when there
    is none (NumPy not imported yet, another BLAS, or no /proc to list loaded libraries)."""
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if "openblas" in line.rsplit("/", 1)[-1].lower()}
    except OSError:
        return None
    for path in sorted(paths):
        try:
            lib = ctypes.CDLL(path)
            lib.openblas_read_env, lib.blas_thread_shutdown_, lib.openblas_thread_timeout
        except (OSError, AttributeError):
            continue
        return lib
    return None


def _restart_openblas_threads() -> bool:
    """Have a loaded OpenBLAS read its environment again and stop its thread pool, so that the
    next matmul starts it with the timeout now in the environment. False when no OpenBLAS with
    these entry points is loaded (then it reads the variable when it loads)."""
    blas = _openblas()
    if blas is None:
        return False
    blas.openblas_read_env()
    blas.blas_thread_shutdown_()
    return True


def _keep_freed_memory() -> bool:
    import ctypes.util
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
        ok = libc.mallopt(M_MMAP_THRESHOLD, 32 << 20)        # the largest value glibc accepts
        libc.mallopt(M_TRIM_THRESHOLD, 256 << 20)
        return bool(ok)
    except (OSError, AttributeError):
        return False
