"""Run folders, model files and messages, met as a user meets them: the CLIs in a subprocess,
in a scratch folder, offline (a proxy that refuses every connection, an empty tiktoken cache).

- A classifier file is self-contained: it classifies from another folder after the training
  folders (the data, the BPE folder) are gone; its stored tokenizer is sha256-checked.
- Run folders: unique, made only when training starts (a failed start leaves none), never one
  holding another run; `--resume` of a finished run changes nothing, `--epochs N` extends it
  exactly as a longer run; run-fixed flags with `--resume` are refused by name.
- `--save trained`: only the trained arrays plus the base weights' sha256 and path, checked on load.
- Usage errors exit 2 and name the flag; missing inputs name the flag that fixes them; a folder
  where a file is expected is said so.
- Output: estimates labelled, one loss definition (train's final loss = evaluate's), metrics
  model_size, Numba's compilation announced, progress bars quiet when not on a terminal, plots.
- `import npgpt` changes nothing; `python -m npgpt` and the `npgpt` script list the commands.
"""
import hashlib
import json
import os
import pathlib
import shutil
import struct
import subprocess
import sys

import pytest

from helpers import REPO, SMS, cli_env, one_error_line, run_module


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return cli_env(tmp_path_factory, offline=True)


@pytest.fixture(scope="module")
def home(tmp_path_factory, shared_data):
    """The training folder: the data file and a relative BPE folder, as README's commands use."""
    d = tmp_path_factory.mktemp("home")
    shutil.copy(shared_data / SMS, d / "SMSSpamCollection")
    shutil.copytree(shared_data / "gpt2_bpe", d / "bpe")
    return d


def call(env, cwd, *args, module="npgpt.train", stdin=None, timeout=300):
    return run_module(module, *args, env=env, cwd=cwd, stdin=stdin, timeout=timeout)


def tiny(env, cwd, *args, **kw):
    return call(env, cwd, "--tiny", "--data", "SMSSpamCollection", "--bpe-dir", "bpe", "--no-plots", *args, **kw)


def md5s(folder):
    return {p.name: hashlib.md5(p.read_bytes()).hexdigest() for p in sorted(pathlib.Path(folder).iterdir())}


@pytest.fixture(scope="module")
def first(env, home):
    """The first training of the module (fresh Numba cache): one epoch into runs/a."""
    r = tiny(env, home, "--epochs", "1", "--out", "runs/a")      # not --quiet: the output tests read every line
    assert r.returncode == 0, r.stderr
    return r, home / "runs" / "a"


# ----------------------------------------------------------------------------- self-contained files

def test_classifier_works_from_anywhere_after_the_training_folders_are_gone(env, first, home, tmp_path):
    _, run = first
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    shutil.copy(run / "classifier.h5", elsewhere / "model.h5")
    moved = home.parent / (home.name + "-bpe-moved")
    os.rename(home / "bpe", moved)                       # the training's --bpe-dir is gone
    try:
        r = call(env, elsewhere, "--model", "model.h5", "WINNER! claim your prize now", "see you at 6",
                 module="npgpt.classify")
        assert r.returncode == 0, r.stderr
        assert len(r.stdout.splitlines()) == 2
        shutil.copy(home / "SMSSpamCollection", elsewhere / "SMSSpamCollection")
        r = call(env, elsewhere, "--model", "model.h5", "--data", "SMSSpamCollection", "--json",
                 module="npgpt.evaluate")
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["n"] == 5572     # the whole file, read as the reference reads it
        assert sorted(os.listdir(elsewhere)) == ["SMSSpamCollection", "model.h5"]   # nothing written
    finally:
        os.rename(moved, home / "bpe")


def test_stored_tokenizer_is_checked(env, first, tmp_path):
    import h5py
    import numpy as np
    f = tmp_path / "model.h5"
    shutil.copy(first[1] / "classifier.h5", f)
    with h5py.File(f, "r+") as h:
        data = h["tokenizer/vocab.bpe"][()]
        data[100] = (int(data[100]) + 1) % 256
        del h["tokenizer/vocab.bpe"]
        h["tokenizer/vocab.bpe"] = np.asarray(data, np.uint8)
    line = one_error_line(call(env, tmp_path, "--model", f, "hello", module="npgpt.classify"), 1)
    assert "vocab.bpe" in line and "sha256" in line


def test_older_files_without_a_stored_tokenizer_still_load(env, first, home, tmp_path):
    import h5py
    f = tmp_path / "old.h5"
    shutil.copy(first[1] / "classifier.h5", f)
    with h5py.File(f, "r+") as h:
        del h["tokenizer"]
    r = call(env, home, "--model", f, "hello", module="npgpt.classify")      # training's bpe_dir again
    assert r.returncode == 0, r.stderr


# ----------------------------------------------------------------------------- run folders

def test_finished_run_resume_changes_nothing_and_epochs_extends_it(env, first, home):
    _, run = first
    before = md5s(run)
    r = call(env, home, "--resume", run)
    assert r.returncode == 0, r.stderr
    assert "is complete" in r.stdout and "--epochs" in r.stdout
    assert md5s(run) == before
    # the finished run's checkpoint keeps only what extending needs, and says so
    import h5py
    with h5py.File(run / "checkpoint.h5", "r") as h:
        assert "params" not in h and "adam" in h
    assert "optimizer state" in first[0].stdout
    # extend to 2 epochs: the same numbers as a 2-epoch run from the start
    ext_home = home.parent / (home.name + "-ext")
    shutil.copytree(home, ext_home, ignore=shutil.ignore_patterns("runs", "data"))
    shutil.copytree(run, ext_home / "runs" / "a")
    r = call(env, ext_home, "--resume", "runs/a", "--epochs", "2")     # not --quiet: every line it prints
    assert r.returncode == 0, r.stderr
    assert "resuming at epoch 2" in r.stdout
    assert "compiling kernels" not in r.stdout             # compiled once, by the first run
    ext = json.loads((ext_home / "runs/a/metrics.json").read_text())["metrics"]
    r = tiny(env, ext_home, "--epochs", "2", "--out", "runs/b")   # progress bars on, stderr not a terminal
    assert r.returncode == 0, r.stderr
    assert "\r" not in r.stderr and "batch" not in r.stderr, r.stderr   # no bar at all in a log (260 batches)
    full = json.loads((ext_home / "runs/b/metrics.json").read_text())["metrics"]
    assert len(ext["epoch_val_acc"]) == 2
    assert ext["final"] == pytest.approx(full["final"], rel=1e-6)
    assert ext["epoch_val_acc"] == full["epoch_val_acc"]
    assert ext["train_loss"] == pytest.approx(full["train_loss"], rel=1e-6)


def test_resume_refuses_flags_the_run_fixed(env, first, home):
    r = call(env, home, "--resume", first[1], "--lr", "1e-3", "--batch-size", "4")
    line = one_error_line(r, 2)
    assert "--batch-size" in line and "--lr" in line and "--resume" in line
    line = one_error_line(call(env, home, "--resume", first[1], "--epochs", "1"), 2)
    assert "--epochs 1" in line and "1 epochs already" in line


def test_out_holding_a_run_is_refused(env, first, home):
    line = one_error_line(tiny(env, home, "--out", first[1], "--quiet"), 1)
    assert "already holds a run" in line and "--resume" in line


def test_run_folder_names_are_unique(tmp_path, monkeypatch):
    from npgpt import runs
    monkeypatch.chdir(tmp_path)
    a = runs.create(os.path.join("runs", "spam-tiny-20260101-000000"), explicit=False)
    b = runs.create(os.path.join("runs", "spam-tiny-20260101-000000"), explicit=False)
    assert a != b and os.path.isdir(a) and os.path.isdir(b)
    assert b.endswith("-2")


# `python -m npgpt.train` with time.strftime's run-folder stamp fixed, so that two processes
# started at any moment collide on the default name runs/spam-tiny-<stamp> as if in one second
_SAME_SECOND = ("import runpy, sys, time; real = time.strftime; "
                "time.strftime = lambda f, *a: '20260101-000000' if f == '%Y%m%d-%H%M%S' else real(f, *a); "
                "runpy.run_module('npgpt.train', run_name='__main__', alter_sys=True)")


def _two_trainings_at_once(env, cwd, *args_each):
    """Start one training process per argument list at the same moment; wait for all."""
    procs = [subprocess.Popen([sys.executable, "-c", _SAME_SECOND, "--tiny", "--data", "SMSSpamCollection",
                               "--bpe-dir", "bpe", "--no-plots", "--quiet", "--epochs", "1", *args],
                              cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for args in args_each]
    return [(p, *p.communicate(timeout=600)) for p in procs]


def _fresh_home(home, tmp_path):
    d = tmp_path / "home"
    d.mkdir()
    (d / "SMSSpamCollection").symlink_to(home / "SMSSpamCollection")
    (d / "bpe").symlink_to(home / "bpe")
    return d


def _run_folder_of(stdout):
    """The run folder a --quiet run names in its final lines ("classifier saved to RUN/classifier.h5")."""
    line = next(s for s in stdout.splitlines() if s.startswith("classifier saved to "))
    return os.path.dirname(line[len("classifier saved to "):].strip())


def _complete_run_of_seed(folder, seed):
    """The folder holds one whole run, that of the process given --seed seed."""
    names = set(os.listdir(folder))
    assert {"classifier.h5", "checkpoint.h5", "metrics.json", "train.csv", "validation.csv", "test.csv"} <= names
    assert ".npgpt-run" not in names                       # the claim is released at the end
    saved = json.loads((folder / "metrics.json").read_text())
    assert saved["run_config"]["seed"] == seed
    assert saved["metrics"]["final"]["test_accuracy"] > 0
    from npgpt.params import load_params
    assert load_params(folder / "classifier.h5")[2]["run_config"]["seed"] == seed


def test_two_runs_started_in_the_same_second_get_two_folders(env, home, tmp_path):
    cwd = _fresh_home(home, tmp_path)
    results = _two_trainings_at_once(env, cwd, ["--seed", "1"], ["--seed", "2"])
    folders = []
    for p, out, err in results:
        assert p.returncode == 0, err
        folders.append(_run_folder_of(out))
    assert sorted(folders) == [os.path.join("runs", "spam-tiny-20260101-000000"),
                               os.path.join("runs", "spam-tiny-20260101-000000-2")]
    assert sorted(os.listdir(cwd / "runs")) == ["spam-tiny-20260101-000000", "spam-tiny-20260101-000000-2"]
    for folder, seed in zip(folders, (1, 2)):
        _complete_run_of_seed(cwd / folder, seed)


def test_two_runs_started_at_once_with_one_out_do_not_share_it(env, home, tmp_path):
    """Same --out: one run trains in it, the other stops before writing anything, saying why."""
    cwd = _fresh_home(home, tmp_path)
    results = _two_trainings_at_once(env, cwd, ["--seed", "1", "--out", "runs/x"], ["--seed", "2", "--out", "runs/x"])
    codes = sorted(p.returncode for p, _, _ in results)
    assert codes == [0, 1], [err for _, _, err in results]
    (winner, _, _), = [r for r in results if r[0].returncode == 0]
    (_, lost_out, lost_err), = [r for r in results if r[0].returncode == 1]
    line = lost_err.strip().splitlines()
    assert len(line) == 1 and "Traceback" not in lost_err, lost_err
    assert "runs/x" in line[0] and ("another training process" in line[0] or "already holds a run" in line[0])
    assert "Ep 1" not in lost_out
    _complete_run_of_seed(cwd / "runs" / "x", 1 if results[0][0] is winner else 2)
    assert os.listdir(cwd / "runs") == ["x"]


def test_a_claim_left_by_a_killed_run_is_taken_over(tmp_path, monkeypatch):
    from npgpt import runs
    from npgpt.errors import NpgptError
    monkeypatch.chdir(tmp_path)
    os.mkdir("r")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (tmp_path / "r" / runs.CLAIM).write_text(dead.stdout.strip())   # a pid that has exited
    try:
        assert runs.create("r", explicit=True) == "r"
        assert (tmp_path / "r" / runs.CLAIM).read_text() == str(os.getpid())
        with pytest.raises(NpgptError, match=r"--out r: another training process \(pid \d+\) is using"):
            runs.claim("r", "--out")                 # a live claim (this process's own)
    finally:
        runs.release("r")
    assert os.listdir("r") == []


@pytest.mark.parametrize("args, code, words", [
    (["--data", "missing.txt"], 1, ["missing.txt: no such file"]),
    (["--bpe-dir", "empty"], 1, ["encoder.json", "--bpe-dir"]),
    (["--lr", "nan"], 2, ["--lr", "finite"]),
    (["--lr", "inf"], 2, ["--lr", "finite"]),
    (["--lr", "-1e-3"], 2, ["--lr must be positive"]),        # a negative value, not "expected one argument"
    (["--lr", "-2E-5"], 2, ["--lr must be positive"]),
    (["--clip-grad-norm", "-inf"], 2, ["--clip-grad-norm", "finite"]),
    (["--weight-decay", "nan"], 2, ["--weight-decay", "finite"]),
    (["--batch-size", "100000"], 2, ["--batch-size 100000", "1045 training messages"]),
    (["--trainable-blocks", "99"], 2, ["--trainable-blocks 99", "2 blocks"]),
    (["--max-length", "500"], 2, ["--max-length", "256", "--tiny"]),
    (["--model-size", "9M"], 2, ["--model-size", "124M"]),
    (["--save", "trained"], 2, ["--save trained", "--save full"]),
    (["--data", "."], 1, ["--data .: is a folder", "SMSSpamCollection"]),
])
def test_failed_starts_leave_no_run_folder(env, home, tmp_path, args, code, words):
    for name in ("SMSSpamCollection", "bpe"):
        os.symlink(home / name, tmp_path / name)
    (tmp_path / "empty").mkdir()
    base = ["--data", "SMSSpamCollection", "--bpe-dir", "bpe", "--no-plots"]      # every line, to check the last
    r = call(env, tmp_path, "--tiny", *base, *args)
    line = one_error_line(r, code)
    assert all(w in line for w in words), line
    assert "cached the frozen prefix" not in r.stdout
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_resume_names_a_missing_run_folder_before_any_other_flag(env, tmp_path):
    line = one_error_line(call(env, tmp_path, "--resume", "nope_run", "--tiny"), 1)
    assert line == "error: --resume nope_run: no such run folder"


def test_divergence_says_what_is_on_disk_and_suggests_a_lower_lr(env, home, tmp_path):
    for name in ("SMSSpamCollection", "bpe"):
        os.symlink(home / name, tmp_path / name)
    r = call(env, tmp_path, "--tiny", "--data", "SMSSpamCollection", "--bpe-dir", "bpe", "--quiet", "--no-plots",
             "--lr", "1e30", "--trainable-blocks", "all")
    line = one_error_line(r, 1)
    assert "non-finite loss" in line and "lower --lr" in line and "nothing was saved" in line
    assert not any((tmp_path / "runs").iterdir())


def test_model_size_tiny_is_the_tiny_model(env, home):
    line = one_error_line(call(env, home, "--model-size", "tiny", "--trainable-blocks", "5"), 2)
    assert "--tiny" in line and "download" not in line


# ----------------------------------------------------------------------------- messages

def test_offline_missing_inputs_name_the_flag(env, tmp_path):
    env = {**env, "NPGPT_DATA_DIR": str(tmp_path / "no-data")}    # not the session's, which other tests fill
    line = one_error_line(call(env, tmp_path, "--tiny", "--quiet"), 1)
    assert "--data" in line
    shutil.copy(pathlib.Path(os.environ.get("NPGPT_SHARED_DATA", REPO.parent / "shared" / "data")) / SMS,
                tmp_path / "SMSSpamCollection")
    line = one_error_line(call(env, tmp_path, "--tiny", "--quiet", "--data", "SMSSpamCollection"), 1)
    assert "--bpe-dir" in line
    assert not (tmp_path / "runs").exists()


def test_folder_where_a_file_is_expected(env, first, home, tmp_path):
    line = one_error_line(call(env, home, "--model", "runs/a", "hi", module="npgpt.classify"), 1)
    assert "is a folder" in line and os.path.join("runs/a", "classifier.h5") in line
    (tmp_path / "124M").mkdir()
    line = one_error_line(call(env, tmp_path, "--weights", "124M", "--quiet"), 1)
    assert "--weights 124M: is a folder" in line and "npgpt.weights convert" in line
    line = one_error_line(call(env, tmp_path, "hello", "--weights", "124M", module="npgpt.generate"), 1)
    assert "is a folder" in line


def _save_weights(path, **config):
    code = ("import sys; from npgpt.config import GPT2Config; from npgpt.params import init_params, save_params; "
            f"c = GPT2Config(**{config!r}); save_params(sys.argv[1], init_params(c, seed=7), c)")
    subprocess.run([sys.executable, "-c", code, str(path)], check=True, env={**os.environ, "PYTHONPATH": str(REPO)})


def test_generate_checks_the_vocabulary(env, tmp_path, home):
    _save_weights(tmp_path / "small.h5", n_layer=1, n_head=2, n_embd=8, vocab_size=100, n_ctx=32)
    line = one_error_line(call(env, tmp_path, "hello world", "--weights", "small.h5", "--bpe-dir", home / "bpe",
                               module="npgpt.generate"), 1)
    assert "100 tokens" in line and "50257" in line


def test_convert_checks_the_size(env, tmp_path):
    ckpt = REPO / "tests" / "fixtures" / "tiny_tf_checkpoint"
    line = one_error_line(call(env, tmp_path, "convert", ckpt, "--size", "124M", "--dir", tmp_path / "w",
                               module="npgpt.weights"), 1)
    assert "not GPT-2 124M" in line
    assert not (tmp_path / "w" / "gpt2-124M.h5").exists()


# ----------------------------------------------------------------------------- --save trained

def test_save_trained_needs_its_base(env, home, tmp_path):
    w = tmp_path / "w"
    w.mkdir()
    _save_weights(w / "base.h5", n_layer=2, n_head=4, n_embd=64, vocab_size=50257, n_ctx=256)
    for name in ("SMSSpamCollection", "bpe"):
        os.symlink(home / name, tmp_path / name)
    r = call(env, tmp_path, "--weights", "w/base.h5", "--save", "trained", "--epochs", "1", "--data",
             "SMSSpamCollection", "--bpe-dir", "bpe", "--out", "run", "--quiet", "--no-plots")
    assert r.returncode == 0, r.stderr
    f = tmp_path / "run" / "classifier.h5"
    assert f.stat().st_size < (w / "base.h5").stat().st_size / 2
    ok = call(env, tmp_path, "--model", f, "free prize", module="npgpt.classify")
    assert ok.returncode == 0, ok.stderr
    os.rename(w / "base.h5", tmp_path / "moved.h5")
    line = one_error_line(call(env, tmp_path, "--model", f, "free prize", module="npgpt.classify"), 1)
    assert "base weights" in line and str(w / "base.h5") in line and "missing" in line
    _save_weights(w / "base.h5", n_layer=2, n_head=4, n_embd=64, vocab_size=50257, n_ctx=256)
    import h5py
    with h5py.File(w / "base.h5", "r+") as h:
        h["wte"][0, 0] = 1.0
    line = one_error_line(call(env, tmp_path, "--model", f, "free prize", module="npgpt.classify"), 1)
    assert "sha256" in line


# ----------------------------------------------------------------------------- output

def test_output_labels_estimates_and_metrics(first, home):
    r, run = first
    assert "compiling kernels (first run only" in r.stdout
    assert "train acc (40 msgs)" in r.stdout and "val acc (40 msgs)" in r.stdout
    assert "Train loss (40 msgs)" in r.stdout
    m = json.loads((run / "metrics.json").read_text())
    assert m["model_size"] == "tiny" and m["run_config"]["model"] == "tiny"


def test_one_loss_definition(env, first, home):
    final = json.loads((first[1] / "metrics.json").read_text())["metrics"]["final"]
    r = call(env, home, "--model", first[1] / "classifier.h5", "--json", "--data-dir", "data",
             module="npgpt.evaluate")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["loss"] == pytest.approx(final["test_loss"], rel=1e-5)


def test_plots(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    import matplotlib.figure
    from npgpt.plots import plot_run
    seen = []
    real = matplotlib.figure.Figure.savefig

    def record(fig, path, **kw):
        ax = fig.axes[0]
        seen.append({"title": ax.get_title(), "xlabels": [a.get_xlabel() for a in fig.axes],
                     "ylabel": ax.get_ylabel(), "legend": [t.get_text() for t in ax.get_legend().get_texts()],
                     "y": [list(line.get_ydata()) for line in ax.get_lines()]})
        return real(fig, path, **kw)
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", record)
    metrics = {"steps": [0, 50], "examples_seen": [8, 408], "train_loss": [0.7, 0.6], "val_loss": [0.71, 0.65],
               "epoch_train_acc": [0.8, 0.85], "epoch_val_acc": [0.75, 0.8], "epoch_examples_seen": [1040, 2080],
               "estimate_messages": {"train": 40, "validation": 40},
               "final": {"train_accuracy": 0.86, "validation_accuracy": 0.84, "test_accuracy": 0.84}}
    written = plot_run(metrics, tmp_path, title="spam-tiny-x")
    assert len(written) == 2
    loss, acc = seen
    assert "spam-tiny-x" in acc["title"] and "spam-tiny-x" in loss["title"]
    assert any("Epoch" in x for x in acc["xlabels"])
    assert "%" in acc["ylabel"] and acc["y"][0] == [80.0, 85.0]
    assert any("estimate on 40 messages" in t for t in acc["legend"])
    for p in written:
        with open(p, "rb") as fh:
            width = struct.unpack(">I", fh.read(24)[16:20])[0]
        assert width >= 800


# ----------------------------------------------------------------------------- help, entry points

@pytest.mark.parametrize("module", ["npgpt.train", "npgpt.classify", "npgpt.evaluate", "npgpt.generate", "npgpt.serve"])
def test_help_has_no_doubled_defaults_and_every_option_has_help(env, tmp_path, module):
    import importlib
    r = call(env, tmp_path, "--help", module=module)
    assert r.returncode == 0
    assert "(default: None)" not in r.stdout
    from npgpt.cli import HelpFormatter
    mod = importlib.import_module(module)
    if hasattr(mod, "build_parser"):
        for action in mod.build_parser()._actions:
            assert action.help, action.option_strings
            text = HelpFormatter("x")._get_help_string(action)
            assert text.lower().count("(default:") <= 1, text
    if module == "npgpt.train":
        text = " ".join(r.stdout.split())
        assert "NPGPT_BPE_DIR" in text
        assert "with --resume, a larger number trains a run longer" in text


def test_python_m_npgpt_and_the_console_script(env, tmp_path):
    r = call(env, tmp_path, module="npgpt")
    assert r.returncode == 0
    commands = sorted(p.stem for p in (REPO / "npgpt" / "cli").glob("*.py")    # a command is a module with a main
                      if p.stem != "__init__" and "\ndef main(" in p.read_text())
    assert len(commands) >= 7                                   # every python -m npgpt.X is npgpt X
    for name in commands:
        assert any(line.split()[:1] == [name] for line in r.stdout.splitlines()), (name, r.stdout)
        h = call(env, tmp_path, name, "--help", module="npgpt")
        assert h.returncode == 0 and h.stdout.startswith(f"usage: npgpt {name}"), h.stderr
    text = (REPO / "pyproject.toml").read_text()
    assert '[project.scripts]\nnpgpt = "npgpt.__main__:console_main"' in text
    code = "import sys; from npgpt.__main__ import console_main; sys.argv = ['npgpt', 'train', '--help']; console_main()"
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.startswith("usage: npgpt train"), r.stderr
    r = call(env, tmp_path, "nonsense", module="npgpt")
    assert r.returncode == 2 and "unknown command" in r.stderr


@pytest.mark.parametrize("argv", [["--help"], ["train", "--help"], ["cache", "--help"]])
def test_a_reader_that_went_away_is_no_error(env, tmp_path, argv):
    """`npgpt --help | head -1`: the reader closes the pipe; npgpt stops quietly, exit 0, no
    traceback (stdout here is a pipe whose reading end is already closed)."""
    read, write = os.pipe()
    os.close(read)
    code = f"import sys; from npgpt.__main__ import console_main; sys.argv = ['npgpt', *{argv!r}]; console_main()"
    try:
        r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, stdout=write, stderr=subprocess.PIPE,
                           text=True)
    finally:
        os.close(write)
    assert r.returncode == 0 and r.stderr == "", r.stderr


def test_python_m_npgpt_data_is_not_silent(env, tmp_path):
    r = call(env, tmp_path, "--help", module="npgpt.data")
    assert r.returncode == 2 and "npgpt.train --data" in r.stderr


def test_import_changes_nothing_until_tune_runtime(env, tmp_path):
    """The command line's early call, before NumPy is imported; the kernels make the same call
    when they load (tests/test_runtime.py)."""
    code = ("import os, json; before = dict(os.environ); import npgpt, npgpt.model, npgpt.api; "
            "same = dict(os.environ) == before; done = npgpt.tune_runtime(); "
            "print(json.dumps([same, os.environ.get('OMP_WAIT_POLICY'), sorted(done)]))")
    e = {k: v for k, v in env.items() if k not in ("OMP_WAIT_POLICY", "OPENBLAS_THREAD_TIMEOUT")}
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=e, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    same, omp, done = json.loads(r.stdout)
    assert same and omp == "PASSIVE" and "OPENBLAS_THREAD_TIMEOUT" in done


def test_interrupt_at_the_start_leaves_a_checkpoint_or_nothing_and_says_which(env, first, home, tmp_path):
    import signal
    for name in ("SMSSpamCollection", "bpe"):
        os.symlink(home / name, tmp_path / name)
    p = subprocess.Popen([sys.executable, "-m", "npgpt.train", "--tiny", "--data", "SMSSpamCollection",
                          "--bpe-dir", "bpe", "--no-plots", "--out", "run"], cwd=tmp_path,
                         env={**env, "PYTHONUNBUFFERED": "1"}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True,
                         # Ctrl-C as in a terminal even when pytest runs as a background job (which
                         # starts with SIGINT ignored, and a child would inherit that)
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    for line in p.stdout:
        if line.startswith("model:"):          # printed just before the frozen blocks are cached
            p.send_signal(signal.SIGINT)
            break
    out, err = p.communicate(timeout=120)
    assert p.returncode == 130, err
    assert "Traceback" not in err
    if "nothing was saved" in err:
        assert not (tmp_path / "run").exists()
    else:
        assert "progress saved in" in err and (tmp_path / "run" / "checkpoint.h5").is_file()
