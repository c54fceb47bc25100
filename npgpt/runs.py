"""Run folders: where a training run keeps its files, made only when training starts, never shared;
and the signals that stop a run cleanly.

    runs/<name>/    classifier.h5, metrics.json, checkpoint.h5, run.json (the RunConfig), the three
                    split CSVs of a run on your own data, loss.png and accuracy.png

- A default name is runs/<data>-<size>-<time>; a name another run took meanwhile gets -2, -3, ...
  An explicit folder (--out) that holds a run is an error (resume it instead).
- A run claims its folder while it works (`.npgpt-run`, created exclusively, holding its pid): two
  processes started at once with one folder cannot both write into it; a claim left by a killed
  process is taken over.
- Ctrl-C or SIGTERM sets a flag that the training loop reads at the end of its step: it writes a
  checkpoint and stops (`StopFlag`, `Interrupted`); a second Ctrl-C stops at once.
"""
from __future__ import annotations

import os
import shutil
import signal
import time

from .errors import NpgptError, TrainingError
from .fileio import process_alive

CLAIM = ".npgpt-run"         # in a run folder while a training process works in it: that process's pid
RUN_FILES = ("checkpoint.h5", "classifier.h5", "metrics.json")


def has_run(path) -> bool:
    return any(os.path.exists(os.path.join(path, n)) for n in RUN_FILES)


def default_name(stem: str, model: str) -> str:
    """runs/<stem>-<size>-<time> (not created yet); stem names the data."""
    return os.path.join("runs", f"{stem}-{model}-{time.strftime('%Y%m%d-%H%M%S')}")


def check_out(out) -> None:
    """An --out that can take a new run: not a file, not a folder holding a run."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise NpgptError(f"--out {out}: is a file, expected a folder for the run")
    if has_run(out):
        raise NpgptError(f"--out {out} already holds a run: pass --resume {out} to continue it, "
                         "or choose another --out")


def _not_a_folder(path) -> str:
    """'X is a file, not a folder' for the first part of path that is a file; "" if none is."""
    parts = os.path.normpath(path).split(os.sep)
    for i in range(1, len(parts) + 1):
        p = os.sep.join(parts[:i]) or os.sep
        if os.path.exists(p) and not os.path.isdir(p):
            return f"{p} is a file, not a folder"
    return ""


def create(run_dir, explicit: bool) -> str:
    """Create the run folder and claim it, exclusively: a folder of that name made by another run
    meanwhile gets a suffix (-2, -3, ...) for a default name, and is an error for an --out that
    holds a run. -> the folder"""
    parent = os.path.dirname(run_dir) or "."
    try:
        os.makedirs(parent, exist_ok=True)
    except OSError as e:
        why = _not_a_folder(parent) or f"creating {parent}: {e.strerror or e}"
        raise TrainingError(f"cannot write to the run folder {run_dir} ({why})") from None
    if explicit:
        try:
            os.mkdir(run_dir)
        except FileExistsError:
            pass                            # made by the user, or by another run a moment ago
        except OSError as e:
            raise TrainingError(f"cannot write to the run folder {run_dir} ({e.strerror or e})") from None
        claim(run_dir, "--out")
        if has_run(run_dir):                # a run that started, and finished, since check_out
            release(run_dir)
            check_out(run_dir)
        return run_dir
    for n in range(1, 1000):
        name = run_dir if n == 1 else f"{run_dir}-{n}"
        try:
            os.mkdir(name)
        except FileExistsError:
            continue
        except OSError as e:
            raise TrainingError(f"cannot write to the run folder {name} ({e.strerror or e})") from None
        claim(name, "run folder")
        return name
    raise TrainingError(f"cannot find a free run folder name next to {run_dir}")


def claim(run_dir, flag: str) -> None:
    """Make `run_dir` this process's alone: create its CLAIM file exclusively (O_EXCL), so two
    processes started at once with the same --out (or --resume) cannot both write into it.
    A claim left by a process that no longer runs (killed) is taken over; a live one is an error."""
    path = os.path.join(run_dir, CLAIM)
    for _ in range(3):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            pid = _claim_pid(path)
            if pid is None or process_alive(pid):
                who = f"pid {pid}" if pid else "see its " + CLAIM
                raise NpgptError(f"{flag} {run_dir}: another training process ({who}) is using this run folder; "
                                 f"wait for it to finish, or choose another folder (if none is running, delete "
                                 f"{path})") from None
            try:                           # left by a process that was killed: take it over
                os.remove(path)
            except FileNotFoundError:
                pass
            continue
        except OSError as e:
            raise TrainingError(f"cannot write to the run folder {run_dir} ({e.strerror or e})") from None
        with os.fdopen(fd, "w") as fh:
            fh.write(str(os.getpid()))
        return
    raise NpgptError(f"{flag} {run_dir}: cannot claim the run folder ({path} keeps changing)")


def _claim_pid(path):
    """The pid in a claim file; None while it is still empty (being written) or unreadable."""
    try:
        with open(path) as fh:
            text = fh.read().strip()
        return int(text) if text else None
    except (OSError, ValueError):
        return None


def release(run_dir) -> None:
    """Remove this process's claim on run_dir (if it still holds one)."""
    path = os.path.join(run_dir, CLAIM)
    if _claim_pid(path) == os.getpid():
        try:
            os.remove(path)
        except OSError:
            pass


def remove_if_empty(run_dir) -> bool:
    """Remove a run folder this run created if it holds nothing but the split CSVs written at its
    start (they are worth keeping only with a checkpoint or a classifier), its run.json and this
    run's claim."""
    from .runconfig import RUN_FILE
    from .tabular import SPLIT_FILES
    try:
        if set(os.listdir(run_dir)) <= set(SPLIT_FILES.values()) | {CLAIM, RUN_FILE}:
            for name in os.listdir(run_dir):
                os.remove(os.path.join(run_dir, name))
        os.rmdir(run_dir)
        return True
    except OSError:
        return False


def check_writable(run_dir, need_bytes: int):
    """Fail before training if the run folder cannot be written or the disk is too full."""
    try:
        os.makedirs(run_dir, exist_ok=True)
        probe = os.path.join(run_dir, ".write-test")
        with open(probe, "wb") as fh:
            fh.write(b"0" * 4096)
            fh.flush()
            os.fsync(fh.fileno())
        os.remove(probe)
    except OSError as e:
        raise TrainingError(f"cannot write to the run folder {run_dir} ({e.strerror or e})") from None
    free = shutil.disk_usage(run_dir).free
    if free < need_bytes:
        raise TrainingError(f"only {free / 2**20:.0f} MiB free in {run_dir}; the run needs about "
                            f"{need_bytes / 2**20:.0f} MiB (classifier + checkpoint)")


# ----------------------------------------------------------------------------- signals

class Interrupted(KeyboardInterrupt):
    """Training stopped on a signal (Ctrl-C: 2, SIGTERM: 15), after writing a checkpoint (its path),
    or before there was anything to save (checkpoint None). str(): what happened, for the user."""

    def __init__(self, signum, checkpoint, message=None):
        super().__init__(message or f"interrupted: progress saved in {checkpoint}")
        self.signum, self.checkpoint = signum, checkpoint


class StopFlag:
    """Ctrl-C / SIGTERM set a flag (`signum`); the loop checkpoints at the end of the current step.
    Outside the main thread (where no handler can be set) it stays None."""

    def __init__(self):
        self.signum = None
        self._old = {}

    def __enter__(self):
        for s in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[s] = signal.signal(s, self._handle)
            except ValueError:      # not the main thread
                pass
        return self

    def _handle(self, signum, frame):
        if self.signum is not None:  # a second Ctrl-C: stop now (the checkpoint on disk is intact)
            raise KeyboardInterrupt
        self.signum = signum

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)
