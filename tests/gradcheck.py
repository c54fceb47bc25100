"""Finite differences for the gradient tests (float64, central differences)."""
import numpy as np


def numerical_grad(f, x, h=1e-6, indices=None):
    """d f() / d x by central differences, x modified in place and restored.

    indices: flat indices to check (all when None); the others are left at 0."""
    grad = np.zeros(x.size)
    flat = x.reshape(-1)
    assert flat.base is x or flat is x or np.shares_memory(flat, x)
    for j in (range(x.size) if indices is None else indices):
        old = flat[j]
        flat[j] = old + h
        fp = f()
        flat[j] = old - h
        fm = f()
        flat[j] = old
        grad[j] = (fp - fm) / (2 * h)
    return grad.reshape(x.shape)


def rel_error(a, b):
    """max|a - b| / max(max|a|, max|b|): one number per array, scale-free."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    scale = max(np.abs(a).max(), np.abs(b).max())
    return float(np.abs(a - b).max() / scale) if scale > 0 else 0.0
