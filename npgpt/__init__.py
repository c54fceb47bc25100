"""npgpt: GPT-2 from scratch in NumPy, backward pass by hand, fine-tuned on the CPU.

    npgpt.fit(texts, labels, model="tiny")      -> a trained Classifier (npgpt.api)
    npgpt.load_classifier("runs/x/classifier.h5")
    npgpt.GPT2Classifier(model="tiny").fit(X, y) scikit-learn's conventions (npgpt.estimator)

Importing npgpt changes nothing in the process and imports nothing heavy. The command-line tools
call `tune_runtime()` (below) first thing; call it yourself, before importing NumPy, to get the
same speed in a script. docs/modules.md maps the modules.
"""
import os as _os

__version__ = "0.1.0"

_tuned = False


def tune_runtime() -> dict:
    """Make Numba kernels and NumPy's matmuls share two cores well; return what was set.

    - OMP_WAIT_POLICY=PASSIVE: Numba's parallel kernels and BLAS's matmuls take turns on the same
      cores. OpenMP threads that spin after a parallel region (the default) keep those cores busy
      while BLAS wants them: on two cores a kernel + matmul pair measured 50x slower. Sleeping
      threads cost microseconds to wake. Read when the OpenMP runtime loads (Numba's first
      parallel kernel).
    - OPENBLAS_THREAD_TIMEOUT=8: OpenBLAS's threads poll for work for about 2^28 cycles (~0.1 s)
      after each matmul, so a Numba kernel that follows one shares its cores with them (the
      attention kernel right after a matmul measured 2x slower). 2^8 cycles catches the next
      matmul in a row. Read when OpenBLAS loads, i.e. when NumPy is first imported: it takes
      effect only if this is called before `import numpy`.
    - glibc malloc keeps freed blocks of up to 32 MiB for reuse (mallopt M_MMAP_THRESHOLD,
      M_TRIM_THRESHOLD) instead of returning them to the OS: otherwise every large temporary (an
      activation of 2048 tokens x 3072 is 24 MiB) is a fresh mmap whose first write page-faults
      on every page; the frozen blocks measured 5-10% faster. Skipped with NPGPT_MALLOC_TUNING=0
      and where glibc is not the C library.
    Environment variables already set are left as they are. Calling it again does nothing."""
    global _tuned
    done = {}
    if _tuned:
        return done
    _tuned = True
    for name, value in (("OMP_WAIT_POLICY", "PASSIVE"), ("OPENBLAS_THREAD_TIMEOUT", "8")):
        if name not in _os.environ:
            _os.environ[name] = value
            done[name] = value
    if _os.environ.get("NPGPT_MALLOC_TUNING", "1") != "0" and _keep_freed_memory():
        done["malloc"] = "M_MMAP_THRESHOLD 32 MiB, M_TRIM_THRESHOLD 256 MiB"
    return done


def _keep_freed_memory() -> bool:
    import ctypes
    import ctypes.util
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
        ok = libc.mallopt(M_MMAP_THRESHOLD, 32 << 20)        # the largest value glibc accepts
        libc.mallopt(M_TRIM_THRESHOLD, 256 << 20)
        return bool(ok)
    except (OSError, AttributeError):
        return False


def fit(*args, **kwargs):
    """Fine-tune a classifier on texts and labels: see `npgpt.api.fit`."""
    from .api import fit as _fit
    return _fit(*args, **kwargs)


def load_classifier(path, bpe_dir=None, batch_size=8):
    """Read a classifier file written by `fit`, `Classifier.save` or `python -m npgpt.train`."""
    from .classify import load_classifier as _load
    return _load(path, bpe_dir, batch_size)


def __getattr__(name):
    """`npgpt.GPT2Classifier`, imported when first used (so `import npgpt` stays light)."""
    if name == "GPT2Classifier":
        from .estimator import GPT2Classifier
        return GPT2Classifier
    raise AttributeError(f"module 'npgpt' has no attribute {name!r}")
