"""The command-line tools, run as a user runs them: `python -m npgpt.X` in a subprocess.

- `--help` works for every tool.
- A normal run of train (tiny, one epoch), classify (arguments, --file, stdin, --json) and
  evaluate, in a scratch folder.
- Bad input ends with exactly one line on stderr, no traceback, exit 1 (failed work); usage
  errors exit 2 and end with argparse's error line; `--debug` shows the traceback.
"""
import json
import os
import pathlib
import re
import subprocess
import sys

import pytest

from helpers import REPO, SMS, cli_env, one_error_line, run_module

LINE = re.compile(r"^(ham|spam) +(0\.\d{3}|1\.000)  \S")     # "spam  0.973  You are a winner ..."


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return cli_env(tmp_path_factory)


@pytest.fixture(scope="module")
def cwd(tmp_path_factory):
    """The working folder of every command, so nothing is written into the repository."""
    return tmp_path_factory.mktemp("cwd")


@pytest.fixture(scope="module")
def npgpt(env, cwd):
    def call(module, *args, stdin=None):
        return run_module(f"npgpt.{module}", *args, env=env, cwd=cwd, stdin=stdin)
    return call


@pytest.fixture(scope="module")
def trained(npgpt, shared_data, bpe_dir, cwd):
    """`python -m npgpt.train --tiny --epochs 1` -> (completed process, run folder)."""
    run_dir = cwd / "runs" / "tiny"
    r = npgpt("train", "--tiny", "--epochs", "1", "--data", shared_data / SMS, "--data-dir", cwd / "data",
              "--bpe-dir", bpe_dir, "--out", run_dir, "--quiet", "--no-plots")
    assert r.returncode == 0, r.stderr
    return r, run_dir


@pytest.fixture(scope="module")
def model(trained):
    return trained[1] / "classifier.h5"


# ----------------------------------------------------------------------------- normal runs

@pytest.mark.parametrize("module", ["train", "classify", "evaluate", "generate", "weights"])
def test_help(npgpt, module):
    r = npgpt(module, "--help")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("usage: python -m npgpt.")
    assert "--debug" in r.stdout


def test_train(trained):
    r, run_dir = trained
    assert (run_dir / "classifier.h5").is_file()
    final = json.loads((run_dir / "metrics.json").read_text())["metrics"]["final"]
    assert f"Test accuracy: {final['test_accuracy'] * 100:.2f}%" in r.stdout


def test_classify_arguments(npgpt, model, bpe_dir):
    r = npgpt("classify", "--model", model, "--bpe-dir", bpe_dir,
              "WINNER!! You have won a £1000 prize, call 09061701461 now", "ok see you at 6")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert len(lines) == 2
    assert all(LINE.match(s) for s in lines), lines
    assert lines[1].endswith("ok see you at 6")
    assert r.stderr == ""


def test_classify_file_with_a_long_line(npgpt, model, bpe_dir, tmp_path):
    f = tmp_path / "texts.txt"
    f.write_text("hello there\n😀 你好\n" + "word " * 4000 + "\n", encoding="utf-8")
    r = npgpt("classify", "--model", model, "--bpe-dir", bpe_dir, "--file", f)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert len(lines) == 3 and all(LINE.match(s) for s in lines), lines
    assert lines[1].endswith("😀 你好")
    assert len(lines[2]) < 100                                  # the text shown is shortened
    note = one_error_line(r, 0)
    assert note.startswith("note: 1 text (line 3) has more than 256 tokens")        # the context: tiny n_ctx


@pytest.mark.parametrize("args", [[], ["-"], ["--file", "-"]])
def test_classify_stdin(npgpt, model, bpe_dir, args):
    r = npgpt("classify", "--model", model, "--bpe-dir", bpe_dir, *args, stdin="first text\nsecond text\n")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert len(lines) == 2 and lines[0].endswith("first text") and lines[1].endswith("second text")


def test_classify_json(npgpt, model, bpe_dir):
    texts = ["Free entry in 2 a wkly comp", "Sorry, I'll call later", "spam " * 300]
    r = npgpt("classify", "--model", model, "--bpe-dir", bpe_dir, "--json", *texts)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert [o["text"] for o in out] == texts
    assert [o["truncated"] for o in out] == [False, False, True]
    for o in out:
        assert set(o) == {"text", "label", "probability", "probabilities", "truncated"}
        assert set(o["probabilities"]) == {"ham", "spam"}
        assert sum(o["probabilities"].values()) == pytest.approx(1, abs=1e-9)
        assert o["label"] == max(o["probabilities"], key=o["probabilities"].get)
        assert o["probability"] == o["probabilities"][o["label"]]
    assert "note: 1 text (text 3)" in r.stderr


def test_evaluate(npgpt, trained, model, bpe_dir, cwd):
    final = json.loads((trained[1] / "metrics.json").read_text())["metrics"]["final"]
    r = npgpt("evaluate", "--model", model, "--bpe-dir", bpe_dir, "--data-dir", cwd / "data")
    assert r.returncode == 0, r.stderr
    assert "test split: 300 messages" in r.stdout
    assert f"accuracy   {final['test_accuracy'] * 100:6.2f}%" in r.stdout
    assert "confusion matrix" in r.stdout
    r = npgpt("evaluate", "--model", model, "--bpe-dir", bpe_dir, "--data-dir", cwd / "data", "--json",
              "--split", "validation")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["split"] == "validation" and out["n"] == 149
    assert out["accuracy"] == final["validation_accuracy"]
    assert {"precision", "recall", "f1", "confusion"} <= set(out)


# ----------------------------------------------------------------------------- failures

@pytest.fixture(scope="module")
def malformed(tmp_path_factory):
    f = tmp_path_factory.mktemp("bad") / "SMSSpamCollection"
    f.write_text("ham\tsee you soon\nspam\tWIN cash now\nthis line has no tab\nham\tok\n", encoding="utf-8")
    return f


def test_classify_missing_model(npgpt, cwd):
    line = one_error_line(npgpt("classify", "--model", cwd / "nope.h5", "hi"), 1)
    assert line.startswith("error: ") and "nope.h5: no such file" in line


def test_classify_not_a_classifier(npgpt, tmp_path):
    f = tmp_path / "model.h5"
    f.write_text("plain text\n")
    line = one_error_line(npgpt("classify", "--model", f, "hi"), 1)
    assert "model.h5" in line and "HDF5" in line


def test_classify_empty_text(npgpt, model, bpe_dir):
    line = one_error_line(npgpt("classify", "--model", model, "--bpe-dir", bpe_dir, "fine", ""), 1)
    assert line == "error: text 2 of 2 is empty"


def test_classify_blank_line_in_file(npgpt, model, bpe_dir, tmp_path):
    f = tmp_path / "texts.txt"
    f.write_text("one\n\nthree\n")
    line = one_error_line(npgpt("classify", "--model", model, "--bpe-dir", bpe_dir, "--file", f), 1)
    assert "line 2 is blank" in line
    r = npgpt("classify", "--model", model, "--bpe-dir", bpe_dir, "--file", f, "--skip-empty")
    assert r.returncode == 0 and len(r.stdout.splitlines()) == 2


def test_train_missing_data(npgpt, bpe_dir, cwd, tmp_path):
    line = one_error_line(npgpt("train", "--tiny", "--data", tmp_path / "missing.txt", "--bpe-dir", bpe_dir,
                                "--out", tmp_path / "run", "--quiet", "--no-plots"), 1)
    assert "missing.txt: no such file" in line


def test_train_malformed_line(npgpt, bpe_dir, malformed, tmp_path):
    line = one_error_line(npgpt("train", "--tiny", "--data", malformed, "--data-dir", tmp_path / "data",
                                "--bpe-dir", bpe_dir, "--out", tmp_path / "run", "--quiet", "--no-plots"), 1)
    assert "line 3" in line and "no tab" in line and "--skip-bad-lines" in line


def test_evaluate_missing_and_malformed_data(npgpt, model, bpe_dir, malformed, tmp_path):
    line = one_error_line(npgpt("evaluate", "--model", model, "--bpe-dir", bpe_dir,
                                "--data", tmp_path / "missing.txt", "--data-dir", tmp_path / "d"), 1)
    assert "missing.txt: no such file" in line
    line = one_error_line(npgpt("evaluate", "--model", model, "--bpe-dir", bpe_dir,
                                "--data", malformed, "--data-dir", tmp_path / "d"), 1)
    assert "line 3" in line and "--skip-bad-lines" in line
    table = tmp_path / "scored.csv"
    table.write_text('text,label\nsee you soon,ham\n"a text over\ntwo lines",spam\nmaybe a winner,eggs\n')
    line = one_error_line(npgpt("evaluate", "--model", model, "--bpe-dir", bpe_dir, "--data", table), 1)
    assert "scored.csv: line 5: label 'eggs' is not one of" in line     # the file's line, 1-based


@pytest.mark.parametrize("module, args, message", [
    ("train", ["--tiny", "--epochs", "0"], "--epochs must be at least 1"),
    ("classify", ["--model", "m.h5", "--batch-size", "0", "hi"], "--batch-size must be at least 1"),
    ("classify", ["hi"], "the following arguments are required: --model"),
    ("evaluate", ["--model", "m.h5", "--split", "dev"], "invalid choice: 'dev'"),
    # a mistyped option is named, before a required option it hides, with the closest real one
    ("classify", ["--modle", "m.h5", "hi"], "unrecognized option --modle (did you mean --model?)"),
    ("train", ["--tiny", "--epoch", "2"], "unrecognized option --epoch (did you mean --epochs?)"),
    ("train", ["--tiny", "--learning-rate=1e-3"], "unrecognized option --learning-rate"),
    ("weights", ["download", "124M", "--dri", "w"], "unrecognized option --dri (did you mean --dir?)"),
])
def test_usage_errors_exit_2(npgpt, module, args, message):
    r = npgpt(module, *args)
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr                       # one line, no usage block
    prog = f"python -m npgpt.{module}" + (f" {args[0]}" if module == "weights" else "")   # a subcommand's own
    assert lines[0].startswith(f"{prog}: error: ") and message in lines[0]


def test_debug_shows_the_traceback(npgpt, cwd):
    r = npgpt("classify", "--model", cwd / "nope.h5", "--debug", "hi")
    assert r.returncode == 1
    assert "Traceback" in r.stderr and "FormatError" in r.stderr
