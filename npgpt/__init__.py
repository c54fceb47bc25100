"""npgpt: GPT-2 from scratch in NumPy, backward pass by hand, fine-tuned on the CPU."""
import os as _os

# Numba's parallel kernels and BLAS's matmuls take turns on the same cores. OpenMP threads that
# spin after a parallel region (the default) keep those cores busy while BLAS wants them: on two
# cores a kernel + matmul pair measured 50x slower. Sleeping threads cost microseconds to wake.
# This must be set before the OpenMP runtime loads, so it is set when npgpt is imported.
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# OpenBLAS's own threads (NumPy's matmul) poll for work for about 2^28 cycles (~0.1 s) after each
# matmul, so a Numba kernel that follows one shares its cores with them: the attention kernel
# right after a matmul measured 2x slower on two cores. 2^8 cycles is enough to catch the next
# matmul in a row. OpenBLAS reads this when it loads, so it takes effect only if npgpt is
# imported before NumPy (as `python -m npgpt...` does); otherwise it changes nothing.
_os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "8")


def _keep_freed_memory():
    """Let glibc's malloc keep freed blocks of up to 32 MiB for reuse instead of returning them to
    the OS. Otherwise every large temporary (an activation of 2048 tokens x 3072 is 24 MiB) is a
    fresh mmap, and its first write page-faults on every page: the frozen blocks measured 5-10%
    faster with this. Does nothing where glibc is not the C library."""
    import ctypes
    import ctypes.util
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
        libc.mallopt(M_MMAP_THRESHOLD, 32 << 20)        # the largest value glibc accepts
        libc.mallopt(M_TRIM_THRESHOLD, 256 << 20)
    except (OSError, AttributeError):
        pass


if _os.environ.get("NPGPT_MALLOC_TUNING", "1") != "0":
    _keep_freed_memory()

__version__ = "0.1.0"


def fit(*args, **kwargs):
    """Fine-tune a classifier on texts and labels: see `npgpt.api.fit`."""
    from .api import fit as _fit
    return _fit(*args, **kwargs)


def load_classifier(path, bpe_dir=None, batch_size=8):
    """Read a classifier file written by `fit`, `Classifier.save` or `python -m npgpt.train`."""
    from .classify import load_classifier as _load
    return _load(path, bpe_dir, batch_size)
