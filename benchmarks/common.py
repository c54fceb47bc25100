"""What every benchmark prints and saves: the machine, the library versions, the BLAS kernel and
the thread counts; plus interleaved timing and a GEMM peak measurement.

Timing rule: never a lone absolute time. Variants are run in turns (A, B, A, B, ...), after
warm-up calls, and each is reported as median and min-max over the same run, so that a neighbour's
process slowing the machine down slows every variant alike.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

# npgpt's runtime settings (passive OpenMP waits, short OpenBLAS polling, malloc reuse), as the
# CLIs set them: before NumPy is first imported, so import this module before NumPy.
import npgpt  # noqa: E402

npgpt.tune_runtime()

ENV_VARS = ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "OPENBLAS_NUM_THREADS", "OPENBLAS_CORETYPE",
            "OPENBLAS_L2_SIZE", "OPENBLAS_THREAD_TIMEOUT", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS",
            "NUMBA_THREADING_LAYER", "NPGPT_NUMBA", "NUMBA_CACHE_DIR")


def arg_parser(doc: str, script: str) -> argparse.ArgumentParser:
    """A benchmark's argument parser: `python benchmarks/<script>` as its name, the docstring's
    first paragraph as the description and the rest, kept as written, after the options."""
    first, _, rest = doc.strip().partition("\n\n")
    return argparse.ArgumentParser(prog=f"python benchmarks/{os.path.basename(script)}", description=first,
                                   epilog=rest or None, formatter_class=argparse.RawDescriptionHelpFormatter)


def default_data_dir() -> Path:
    """The shared data folder: NPGPT_SHARED_DATA, else `shared/data` beside the repository."""
    return Path(os.environ.get("NPGPT_SHARED_DATA", REPO.parent / "shared" / "data"))


def set_threads(n: int) -> None:
    """n threads for npgpt (Numba and BLAS) and for torch, in this process."""
    from npgpt.fastops import set_num_threads
    set_num_threads(n)
    try:
        import torch
    except ImportError:
        return
    torch.set_num_threads(n)


def machine_info() -> dict:
    """CPU, load, library versions, the BLAS library and kernel NumPy uses, thread counts."""
    info = {"python": platform.python_version(), "platform": platform.platform(),
            "cpu": _cpu_model(), "cores": os.cpu_count(), "load_avg_1_5_15": _loadavg(),
            "time": time.strftime("%Y-%m-%d %H:%M:%S"),
            "env": {k: os.environ[k] for k in ENV_VARS if k in os.environ}}
    import numpy as np
    info["numpy"] = np.__version__
    try:
        import numba
        info["numba"] = numba.__version__
        info["numba_threads"] = numba.get_num_threads()
        try:
            info["numba_threading_layer"] = numba.threading_layer()
        except ValueError:                                # no parallel kernel has run yet
            info["numba_threading_layer"] = "(not started)"
    except ImportError:
        pass
    try:
        import threadpoolctl
        info["threadpoolctl"] = threadpoolctl.__version__
        info["blas"] = [{k: d.get(k) for k in ("internal_api", "version", "architecture",
                                               "threading_layer", "num_threads", "filepath")}
                        for d in threadpoolctl.threadpool_info() if d["user_api"] == "blas"]
        info["openmp"] = [{k: d.get(k) for k in ("internal_api", "version", "num_threads", "filepath")}
                          for d in threadpoolctl.threadpool_info() if d["user_api"] == "openmp"]
    except ImportError:
        pass
    if "torch" in sys.modules:
        import torch
        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
        info["torch_blas"] = "MKL" if torch.backends.mkl.is_available() else "other"
    return info


def _cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _loadavg():
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def print_info(info: dict, out=sys.stdout) -> None:
    blas = ", ".join(f"{b['internal_api']} {b['version']} kernel {b['architecture']} "
                     f"({b['threading_layer']}, {b['num_threads']} threads)" for b in info.get("blas", []))
    lines = [f"machine: {info['cpu']}, {info['cores']} cores, load {info['load_avg_1_5_15']}, {info['time']}",
             f"python {info['python']}, numpy {info['numpy']}, numba {info.get('numba', '-')} "
             f"({info.get('numba_threading_layer', '-')} layer, {info.get('numba_threads', '-')} threads)"
             + (f", torch {info['torch']} ({info['torch_threads']} threads, BLAS {info['torch_blas']})"
                if "torch" in info else ""),
             f"numpy BLAS: {blas or 'unknown (threadpoolctl missing)'}"]
    if info["env"]:
        lines.append("env: " + " ".join(f"{k}={v}" for k, v in info["env"].items()))
    print("\n".join(lines), file=out)


def interleaved(variants: dict, repeats: int, warmup: int = 1, settle: float = 0.0,
                self_timed: bool = False) -> dict:
    """Time each callable of `variants` (name -> fn) `repeats` times, in turns, after `warmup`
    untimed turns, sleeping `settle` seconds before each call. With self_timed, each fn measures
    itself and returns its seconds (a turn of several calls, or a call in another process).

    -> {name: [seconds, ...]}"""
    for _ in range(warmup):
        for fn in variants.values():
            fn()
    times = {name: [] for name in variants}
    for _ in range(repeats):
        for name, fn in variants.items():
            time.sleep(settle)
            t0 = time.perf_counter()
            r = fn()
            times[name].append(r if self_timed else time.perf_counter() - t0)
    return times


def summary(ts) -> dict:
    import numpy as np
    ts = np.asarray(ts, dtype=float)
    return {"median": float(np.median(ts)), "min": float(ts.min()), "max": float(ts.max()), "n": int(ts.size)}


def fmt_ms(s: dict) -> str:
    return f"{s['median'] * 1e3:8.2f} ({s['min'] * 1e3:.2f}-{s['max'] * 1e3:.2f})"


def gemm_peak(rows: int = 4096, repeats: int = 7) -> dict:
    """NumPy's float32 GEMM speed on the model's linear-layer shapes at `rows` rows, in GFLOP/s,
    from the fastest of `repeats` calls: {shape: GFLOP/s, ..., "peak": the best of them}."""
    import numpy as np
    r = np.random.default_rng(0)
    out = {}
    for k, n in ((768, 2304), (768, 3072), (3072, 768), (768, 768)):
        a = r.standard_normal((rows, k), dtype=np.float32)
        b = r.standard_normal((k, n), dtype=np.float32)
        ts = interleaved({"gemm": lambda: a @ b}, repeats, warmup=2)["gemm"]
        out[f"{rows}x{k}x{n}"] = 2 * rows * k * n / min(ts) / 1e9
    out["peak"] = max(out.values())
    return out


def write_json(path, obj) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        json.dump(obj, fh, indent=1)
        fh.write("\n")
