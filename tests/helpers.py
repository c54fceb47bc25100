"""What many test files share (imported as `from helpers import ...`; pytest puts tests/ on the path).

- rel_err, numerical_grad: the gradient checks' measure and finite differences (float64).
- SMALL, SMALL_GPT2: tiny configurations (vocabulary 11, or GPT-2's 50257 for real token ids).
- one_error_line: a failed command's one line of stderr.
- run_module: `python -m <module> ...` in a subprocess, as a user runs it.
"""
import os
import pathlib
import subprocess
import sys

import numpy as np

from npgpt.config import GPT2Config

REPO = pathlib.Path(__file__).resolve().parent.parent
SMS = "sms_spam_collection/SMSSpamCollection"      # under the shared data folder

SMALL = GPT2Config(n_layer=2, n_head=2, n_embd=8, vocab_size=11, n_ctx=16)
SMALL_GPT2 = GPT2Config(n_layer=2, n_head=2, n_embd=8, vocab_size=50257, n_ctx=16)

# no network: a proxy that refuses every connection
OFFLINE = {"https_proxy": "http://127.0.0.1:9", "http_proxy": "http://127.0.0.1:9",
           "HTTPS_PROXY": "http://127.0.0.1:9", "HTTP_PROXY": "http://127.0.0.1:9", "no_proxy": "", "NO_PROXY": ""}


def rel_err(a, b) -> float:
    """max|a - b| / max(max|a|, max|b|): one number per array, scale-free (0 when both are zero)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    scale = max(np.abs(a).max(), np.abs(b).max()) if a.size else 0.0
    return float(np.abs(a - b).max() / scale) if scale > 0 else 0.0


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


def one_error_line(r, code):
    """Assert a failure: exit `code`, no traceback, and one line on stderr; return that line."""
    assert r.returncode == code, (r.returncode, r.stdout[-2000:], r.stderr)
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    return lines[0]


def cli_env(tmp_factory, offline=False) -> dict:
    """The environment of a command a test runs: this checkout first on the path, a fresh Numba
    cache, none of the user's npgpt switches; offline: no network and an empty tiktoken cache."""
    e = {k: v for k, v in os.environ.items() if k not in ("NPGPT_DEBUG", "NPGPT_BPE_DIR")}
    if offline:
        e.update(OFFLINE)
        e["TIKTOKEN_CACHE_DIR"] = str(tmp_factory.mktemp("tiktoken-empty"))
    e["NUMBA_CACHE_DIR"] = str(tmp_factory.mktemp("numba-cache"))
    e["PYTHONPATH"] = os.pathsep.join([str(REPO), e.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return e


def run_module(module, *args, env, cwd, stdin=None, timeout=300):
    """`python -m <module> args...` -> the completed process (text, utf-8)."""
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=cwd, env=env, input=stdin,
                          capture_output=True, text=True, encoding="utf-8", timeout=timeout)
