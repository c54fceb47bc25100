"""The process is set up for npgpt's kernels with no call to remember (npgpt.runtime): a notebook that
imported pandas (and so NumPy and OpenBLAS's thread pool) before npgpt gets the settings the
command line gets, checked in a fresh interpreter as the user would have it."""
import json
import os
import subprocess
import sys

from helpers import REPO

# A notebook's order: pandas first, a matmul (OpenBLAS's pool is running), then npgpt.
NOTEBOOK = """
import json, os
import pandas, numpy as np
a = np.ones((256, 256), np.float32); a @ a
def threads():    # the process's threads but the main one, save those a library named (pyarrow's jemalloc_bg_thd)
    comm = lambda t: open(f"/proc/self/task/{t}/comm").read()
    return {t for t in os.listdir("/proc/self/task") if t != str(os.getpid()) and comm(t) == comm(os.getpid())}
blas_threads = threads()
before = dict(os.environ)
import npgpt, npgpt.api, npgpt.classify, npgpt.estimator
import_changed = dict(os.environ) != before
from npgpt import fastops, runtime
fastops.layernorm_forward(np.ones((4, 8), np.float32), np.ones(8, np.float32), np.zeros(8, np.float32))
a @ a
print(json.dumps({"state": runtime.state(), "import_changed": import_changed,
                  "blas_threads": sorted(blas_threads),
                  "still_running": sorted(blas_threads & threads())}))
"""


def _notebook(**env_vars):
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "OPENBLAS_THREAD_TIMEOUT")}
    env.update(env_vars, PYTHONPATH=str(REPO), OPENBLAS_NUM_THREADS="2")
    r = subprocess.run([sys.executable, "-c", NOTEBOOK], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_a_notebook_that_imported_numpy_first_gets_the_runtime_settings():
    out = _notebook()
    state = out["state"]
    assert not out["import_changed"]                          # `import npgpt` alone changes nothing
    assert state["numba_pool_started"]                        # the kernel ran on Numba's pool ...
    assert state["prepared"]["OMP_WAIT_POLICY"] == "PASSIVE"  # ... started after the policy was set
    assert state["OMP_WAIT_POLICY"] == "PASSIVE"
    assert state["openblas_thread_timeout"] == 8              # OpenBLAS read its environment again
    assert out["blas_threads"], "OpenBLAS started no thread of its own: the check below proves nothing"
    assert out["still_running"] == []                        # and its old, long-spinning threads are gone


def test_settings_the_user_made_are_left_alone():
    out = _notebook(OMP_WAIT_POLICY="ACTIVE", OPENBLAS_THREAD_TIMEOUT="12")
    state = out["state"]
    assert state["OMP_WAIT_POLICY"] == "ACTIVE" and state["OPENBLAS_THREAD_TIMEOUT"] == "12"
    assert "OMP_WAIT_POLICY" not in state["prepared"] and "openblas" not in state["prepared"]
    assert state["openblas_thread_timeout"] == 12
    assert out["still_running"] == out["blas_threads"]        # OpenBLAS's pool was not touched
