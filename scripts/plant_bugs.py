"""Plant known bugs one at a time in a scratch copy of the checkout and report which test catches each.

    python scripts/plant_bugs.py                 # every bug of scripts/planted_bugs.toml, its named test files
    python scripts/plant_bugs.py --all           # each bug against the whole suite (slow: the suite per bug)
    python scripts/plant_bugs.py --only accumulate-divisor,cache-key-last-block
    python scripts/plant_bugs.py --list          # the bugs, checked (each old text found exactly once), no tests run

Each entry of the list names a module file, the exact text to replace (found exactly once, else
the entry is refused), the text that replaces it, what the bug does, and the test files expected
to catch it. The checkout is copied once into a temporary folder (the working tree as it is,
without .git); each bug is written into the copy, the tests run there with `pytest -x -q`, and
the module is put back byte for byte, with its time stamp (Numba's cache of the kernels stays
valid). A bug is caught when pytest fails: the first FAILED (or ERROR) line names the test.
Exit status 0 when every bug was caught, 1 otherwise. CI does not run this (minutes per bug).
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BUGS = Path(__file__).resolve().parent / "planted_bugs.toml"
SKIP = shutil.ignore_patterns(".git", "runs", "data", ".pytest_cache", "*.egg-info")


def load(path=BUGS) -> list[dict]:
    """The entries of the bug list, each checked: its fields there, its old text once in its file."""
    with open(path, "rb") as fh:
        bugs = tomllib.load(fh)["bug"]
    names = set()
    for b in bugs:
        missing = {"name", "file", "old", "new", "what", "tests"} - set(b)
        if missing:
            raise SystemExit(f"{path}: entry {b.get('name', '?')!r} lacks {', '.join(sorted(missing))}")
        if b["name"] in names:
            raise SystemExit(f"{path}: two entries are named {b['name']!r}")
        names.add(b["name"])
    return bugs


def refusal(bug, root=REPO) -> str:
    """Why a bug cannot be planted in the checkout at root ("" when it can)."""
    path = root / bug["file"]
    if not path.is_file():
        return f"{bug['file']}: no such file"
    n = path.read_text(encoding="utf-8").count(bug["old"])
    if n != 1:
        return f"{bug['file']}: the old text is found {n} times, not exactly once"
    if bug["old"] == bug["new"]:
        return "the new text is the old text"
    return ""


def first_failure(output: str) -> str:
    """The test named by pytest's first FAILED or ERROR line of its short summary ("" if none)."""
    for line in output.splitlines():
        m = re.match(r"(FAILED|ERROR) (.+?)( - .*)?$", line)
        if m:
            return m.group(2)
    return ""


def run_tests(scratch: Path, tests: list[str], timeout: float) -> tuple[int, str]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(scratch), os.environ.get("PYTHONPATH", "")]).rstrip(
        os.pathsep))
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests]
    try:
        p = subprocess.run(cmd, cwd=scratch, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        return -1, (e.stdout or "") if isinstance(e.stdout, str) else ""
    return p.returncode, p.stdout + p.stderr


def plant(bug, scratch: Path, tests: list[str], timeout: float) -> dict:
    """Write the bug into the scratch copy, run the tests, put the file back as it was."""
    path = scratch / bug["file"]
    original = path.read_bytes()
    stat = path.stat()
    text = original.decode("utf-8")
    path.write_text(text.replace(bug["old"], bug["new"], 1), encoding="utf-8")
    t0 = time.time()
    try:
        code, output = run_tests(scratch, tests, timeout)
    finally:
        path.write_bytes(original)
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    caught = code not in (0, 5, -1)           # 5: no test collected; -1: timed out
    return {"caught": caught, "by": first_failure(output) if caught else "", "code": code,
            "seconds": time.time() - t0, "output": output}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--all", action="store_true", help="run the whole suite for each bug, not its named test files")
    p.add_argument("--only", help="comma-separated names of the bugs to plant")
    p.add_argument("--list", action="store_true", help="list and check the bugs, run nothing")
    p.add_argument("--bugs", default=str(BUGS), help="the bug list (TOML)")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per bug")
    p.add_argument("--verbose", action="store_true", help="show pytest's output of the bugs not caught")
    args = p.parse_args(argv)
    bugs = load(Path(args.bugs))
    if args.only:
        wanted = set(args.only.split(","))
        unknown = wanted - {b["name"] for b in bugs}
        if unknown:
            raise SystemExit(f"unknown bug(s): {', '.join(sorted(unknown))}")
        bugs = [b for b in bugs if b["name"] in wanted]
    refused = {b["name"]: refusal(b) for b in bugs}
    if args.list:
        for b in bugs:
            print(f"{b['name']:32} {b['file']:26} {'REFUSED: ' + refused[b['name']] if refused[b['name']] else b['what']}")
        modules = {b["file"] for b in bugs}
        print(f"{len(bugs)} bugs in {len(modules)} files")
        return 1 if any(refused.values()) else 0
    failures = 0
    with tempfile.TemporaryDirectory(prefix="npgpt-planted-") as tmp:
        scratch = Path(tmp) / "checkout"
        shutil.copytree(REPO, scratch, ignore=SKIP, symlinks=True)
        print(f"scratch copy: {scratch}")
        print(f"{'bug':32} {'module':24} {'result':11} caught by")
        for b in bugs:
            if refused[b["name"]]:
                print(f"{b['name']:32} {b['file']:24} {'REFUSED':11} {refused[b['name']]}")
                failures += 1
                continue
            tests = ["tests"] if args.all else list(b["tests"])
            r = plant(b, scratch, tests, args.timeout)
            result = "caught" if r["caught"] else "NOT caught"
            print(f"{b['name']:32} {b['file']:24} {result:11} {r['by'] or '-'}  ({r['seconds']:.0f} s)", flush=True)
            if not r["caught"]:
                failures += 1
                if args.verbose:
                    print(r["output"][-3000:])
    print(f"{len(bugs) - failures} of {len(bugs)} bugs caught")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
