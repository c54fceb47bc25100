"""Training from Python as a notebook does it (pandas imported first) against the command line, in one run.

    python benchmarks/fit_python.py                          # ~2 min on 2 cores
    python benchmarks/fit_python.py --old /path/to/checkout  # also an older npgpt, same run

Each variant is a fresh process, timed from start to exit (imports included), in turns:

  cli                    python -m npgpt.train --tiny --data sms.csv --quiet ... (the same settings)
  python, pandas first   import pandas; import npgpt; npgpt.fit(df, model="tiny", ...)
  ... (--old DIR)        the same script with DIR's npgpt on the path

The data: 300 ham and 300 spam messages of the SMS Spam Collection, written once as a CSV; the
tiny model with every block trained, lr 1e-3, 2 epochs; both write their plots, as by default. Numba's cache
is warmed by an untimed turn of each variant. OPENBLAS_CORETYPE / OPENBLAS_L2_SIZE are dropped
from the children's environment (a user's machine has neither).
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

from common import REPO, default_data_dir, interleaved, machine_info, print_info, summary, write_json

SETTINGS = dict(trainable_blocks="all", lr=1e-3, epochs=2)
NOTEBOOK = """
import pandas as pd
import npgpt
df = pd.read_csv({data!r})
npgpt.fit(df, model="tiny", bpe_dir={bpe!r}, out={out!r}, trainable_blocks="all", lr=1e-3, epochs=2)
"""


def write_data(folder) -> str:
    import pandas as pd
    sms = pd.read_csv(default_data_dir() / "sms_spam_collection" / "SMSSpamCollection", sep="\t", header=None,
                      names=["label", "text"], quoting=3)
    df = sms.groupby("label").head(300).sample(frac=1, random_state=0)[["text", "label"]]
    path = os.path.join(folder, "sms.csv")
    df.to_csv(path, index=False)
    return path


def variants(folder, data, bpe, old=None) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE",
                                                            "OMP_WAIT_POLICY", "OPENBLAS_THREAD_TIMEOUT")}
    count = iter(range(10 ** 6))

    def timed(argv, path):
        def run():
            t0 = time.perf_counter()
            subprocess.run(argv(next(count)), cwd=folder, env={**env, "PYTHONPATH": str(path)}, check=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            return time.perf_counter() - t0
        return run

    cli = lambda i: [sys.executable, "-m", "npgpt.train", "--tiny", "--data", data, "--bpe-dir", bpe,
                     "--trainable-blocks", "all", "--lr", "1e-3", "--epochs", "2", "--quiet",
                     "--out", f"cli{i}"]
    notebook = lambda i: [sys.executable, "-c", NOTEBOOK.format(data=data, bpe=bpe, out=f"py{i}")]
    out = {"cli": timed(cli, REPO), "python, pandas first": timed(notebook, REPO)}
    if old:
        out[f"python, pandas first ({os.path.basename(os.path.abspath(old))})"] = timed(notebook, old)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--old", help="a checkout of an older npgpt, timed in the same turns")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)
    info = machine_info()
    print_info(info)
    bpe = str(default_data_dir() / "gpt2_bpe")
    with tempfile.TemporaryDirectory() as folder:
        data = write_data(folder)
        times = interleaved(variants(folder, data, bpe, args.old), args.repeats, warmup=1, self_timed=True)
    stats = {name: summary(ts) for name, ts in times.items()}
    cli = stats["cli"]["median"]
    print(f"{'variant':<40} {'median s':>9} {'min-max s':>13} {'x cli':>6}")
    for name, s in stats.items():
        print(f"{name:<40} {s['median']:9.2f} {s['min']:6.2f}-{s['max']:<6.2f} {s['median'] / cli:6.2f}")
    if args.json:
        write_json(args.json, {"machine": info, "seconds": times, "stats": stats})


if __name__ == "__main__":
    sys.exit(main())
