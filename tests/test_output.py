"""What the commands print, in a terminal and in a log, and README's sample outputs.

- Progress bars only where their stream is a terminal (NPGPT_PROGRESS=1 forces them, =0 hides
  them): a redirected log gets plain lines, one per evaluation, and no carriage return.
- A bar's first update (kernels compiling) is counted but not timed: the ETA comes from the
  steps after it. The frozen-prefix bar counts to a total, the number the run then prints.
- `train --quiet` prints the final lines only; `npgpt.fit` prints nothing unless verbose=True.
- README's sample outputs are the real output of their commands, run here (`check_sample`):
  `x` in a sample stands for digits that depend on the run and the CPU, a `...` line for lines
  left out, `...` inside a line for text left out.

stdout and stderr are pipes or pytest's captures here, never terminals: what a log gets.
"""
import io
import json
import os
import re
import shutil
from pathlib import Path

import pytest

from helpers import SMS, run_module
from npgpt.progress import bar, shows_bars

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
FINAL = ("Training accuracy: ", "Validation accuracy: ", "Test accuracy: ", "classifier saved to ")


# ----------------------------------------------------------------------------- the bars themselves

class Terminal(io.StringIO):
    def isatty(self):
        return True


class NotebookOutput(io.StringIO):
    """What a Jupyter kernel's stderr looks like to npgpt: ipykernel's OutStream, not a tty."""
    def isatty(self):
        return False


NotebookOutput.__module__ = "ipykernel.iostream"


def test_bars_show_on_a_terminal_only_unless_forced(monkeypatch):
    monkeypatch.delenv("NPGPT_PROGRESS", raising=False)
    assert shows_bars(Terminal()) and not shows_bars(io.StringIO())
    assert shows_bars(NotebookOutput())                          # a notebook draws them too
    monkeypatch.setenv("NPGPT_PROGRESS", "1")
    assert shows_bars(io.StringIO())
    monkeypatch.setenv("NPGPT_PROGRESS", "0")
    assert not shows_bars(Terminal())


def test_the_first_update_is_counted_but_not_timed(monkeypatch):
    """A first step of 100 s (compiling) and nine of 1 s each: the ETA of the 90 steps left is
    90 s, at 1 step/s, not 90 x 10.9 s at the average rate; the elapsed time is still 109 s."""
    monkeypatch.setenv("NPGPT_PROGRESS", "1")
    clock = [0.0]
    b = bar(total=100, untimed=1, file=io.StringIO(), mininterval=0, miniters=1)
    b._time = lambda: clock[0]
    b.start_t = b.last_print_t = 0.0
    clock[0] = 100.0
    b.update(1)
    assert b.format_dict["rate"] is None                       # no rate yet: ETA "?", not 2:45:00
    assert "<?" in b.format_meter(**b.format_dict), b.format_meter(**b.format_dict)
    for _ in range(9):
        clock[0] += 1.0
        b.update(1)
    d = b.format_dict
    assert d["n"] == 10 and d["elapsed"] == pytest.approx(109.0)
    assert d["rate"] == pytest.approx(1.0)
    assert "01:30" in b.format_meter(**d)                      # the ETA of 90 steps at 1 step/s
    b.close()


# ----------------------------------------------------------------------------- a training run in a log

def _env(**extra):
    """A command's environment: this checkout first on the path, no NPGPT_PROGRESS of the user's."""
    env = {k: v for k, v in os.environ.items() if k != "NPGPT_PROGRESS"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return {**env, **extra}


@pytest.fixture(scope="module")
def sms_run(shared_data, bpe_dir, tmp_path_factory):
    """`python -m npgpt.train --tiny` on the SMS data (README's sample command), its stdout and
    stderr pipes (not terminals, as in `train > log 2> err`): (stdout, stderr, run folder)."""
    out = tmp_path_factory.mktemp("sms") / "runs" / "spam-tiny-sample"
    r = run_module("npgpt.train", "--tiny", "--data", shared_data / SMS, "--bpe-dir", bpe_dir, "--out", out,
                   env=_env(), cwd=out.parent.parent)
    assert r.returncode == 0, r.stderr
    return r.stdout, r.stderr, out


def test_a_log_gets_one_line_per_evaluation_and_no_bar(sms_run):
    stdout, stderr, run = sms_run
    assert stderr == ""                                         # no bar, no carriage return
    assert "\r" not in stdout and "batch/s" not in stdout
    metrics = json.loads((run / "metrics.json").read_text())["metrics"]
    step_lines = [s for s in stdout.splitlines() if re.match(r"Ep \d+ \(Step \d{6}\)", s)]
    assert len(step_lines) == len(metrics["steps"]) == 13        # 650 steps, one line every 50
    assert len([s for s in stdout.splitlines() if re.match(r"Ep \d+: train acc", s)]) == 5


def test_the_frozen_prefix_line_says_why_it_counts_fewer_tokens(sms_run):
    """One count of the tokens computed; the larger count of all the examples' tokens comes with
    its reason (the SMS data holds repeated messages, computed once)."""
    stdout = sms_run[0]
    m = re.search(r"^cached the frozen prefix \(blocks 0\.\.0\) in [\d.]+ s: (\d+) tokens of (\d+) distinct texts "
                  r"\(the (\d+) texts of the three splits hold (\d+): a repeated text is computed once\)$", stdout, re.M)
    assert m, stdout
    tokens, distinct, texts, in_all = map(int, m.groups())
    assert texts == 1045 + 149 + 300 and distinct < texts and tokens < in_all
    for line in stdout.split(m.group(0))[0].splitlines():    # the prefix's lines before it: the same count
        if "frozen prefix" in line and " tokens" in line:
            assert re.findall(r"(\d+) tokens", line) == [str(tokens)], stdout


# ----------------------------------------------------------------------------- --quiet, fit, forced bars

def _tickets(tmp_path, n=40):
    """The first n rows of examples/support_tickets.csv: a quick run with a frozen block."""
    lines = (REPO / "examples" / "support_tickets.csv").read_text(encoding="utf-8").splitlines()
    path = tmp_path / "tickets.csv"
    path.write_text("\n".join(lines[:n + 1]) + "\n", encoding="utf-8")
    return path


def test_quiet_prints_the_final_lines_only(tmp_path, bpe_dir, capfd):
    from npgpt.cli import train
    assert train.main(["--tiny", "--data", str(_tickets(tmp_path)), "--bpe-dir", bpe_dir, "--epochs", "2",
                       "--eval-freq", "1", "--out", str(tmp_path / "run"), "--quiet"]) == 0
    out, err = capfd.readouterr()
    lines = out.splitlines()
    assert err == ""
    assert [s[:len(p)] for s, p in zip(lines, FINAL)] == list(FINAL), out
    assert len(lines) == 6 and lines[4].startswith(str(tmp_path / "run" / "checkpoint.h5")) \
        and lines[5].startswith("Training completed in "), out


def test_fit_is_silent_unless_verbose(tmp_path, bpe_dir, capfd):
    import pandas as pd
    import npgpt
    df = pd.read_csv(_tickets(tmp_path))
    kw = dict(model="tiny", epochs=1, eval_freq=1, bpe_dir=bpe_dir)
    npgpt.fit(df, out=str(tmp_path / "a"), **kw)
    npgpt.fit(df, out=str(tmp_path / "b"), quiet=True, **kw)
    assert capfd.readouterr() == ("", "")
    npgpt.fit(df, out=str(tmp_path / "c"), verbose=True, **kw)
    out, err = capfd.readouterr()
    assert "Ep 1 (Step 000001)" in out and err == ""


def test_forced_bars_count_the_frozen_prefix_to_its_total(tmp_path, bpe_dir, capfd, monkeypatch):
    """NPGPT_PROGRESS=1 draws the bars in a log too; the frozen prefix's bar has the total the
    run then reports (not `6816tok [00:33, ...]`), and every line sits outside the bars."""
    from npgpt.cli import train
    monkeypatch.setenv("NPGPT_PROGRESS", "1")
    assert train.main(["--tiny", "--data", str(_tickets(tmp_path)), "--bpe-dir", bpe_dir, "--epochs", "1",
                       "--out", str(tmp_path / "run"), "--no-plots"]) == 0
    out, err = capfd.readouterr()
    tokens = re.search(r"^cached the frozen prefix \(blocks 0\.\.0\) in [\d.]+ s: (\d+) tokens", out, re.M).group(1)
    assert re.search(rf"frozen blocks 0\.\.0: +0% *\| *\| 0/{tokens} ", err), err
    assert re.search(r"epoch 1/1: 100%.*\| \d+/\d+ \[", err), err
    assert "\r" not in out


def test_evaluate_in_a_log_prints_no_bar(sms_run, bpe_dir, capfd, monkeypatch):
    """`evaluate 2>ev.err`: nothing in ev.err on success; the same command with bars forced draws
    its bar there (the classifying bar over the 300 test texts)."""
    from npgpt.cli import evaluate
    model = str(sms_run[2] / "classifier.h5")
    monkeypatch.delenv("NPGPT_PROGRESS", raising=False)
    assert evaluate.main(["--model", model, "--bpe-dir", bpe_dir]) == 0
    out, err = capfd.readouterr()
    assert err == "" and "accuracy" in out
    monkeypatch.setenv("NPGPT_PROGRESS", "1")
    assert evaluate.main(["--model", model, "--bpe-dir", bpe_dir]) == 0
    assert "classifying" in capfd.readouterr().err


# ----------------------------------------------------------------------------- README's samples

def sample_pattern(sample: str) -> re.Pattern:
    """A sample (lines of README) as a regex over the output: a run of n `x` standing alone (not in a
    word) is n or more digits, `...` in a line is any text, a `...` line is any lines; else literal."""
    parts = []
    for line in sample.splitlines():
        if line.strip() == "...":
            parts.append(r"(?:.*\n)*?")
            continue
        pieces = re.split(r"(\.\.\.|(?<![A-Za-z])x+(?![A-Za-z]))", line)
        parts.append("".join(".*" if p == "..." else rf"\d{{{len(p)},}}" if p and set(p) == {"x"} else re.escape(p)
                             for p in pieces) + r"\n")
    return re.compile("^" + "".join(parts), re.M)


def readme_sample(after: str) -> str:
    """The indented block that follows the README line holding `after` (4 spaces removed)."""
    lines = README.read_text(encoding="utf-8").splitlines()
    start = next(i for i, s in enumerate(lines) if after in s) + 1
    while not lines[start].startswith("    "):
        start += 1
    block = []
    for s in lines[start:]:
        if not s.startswith("    "):
            break
        block.append(s[4:])
    return "\n".join(block)


def test_sample_pattern_rejects_what_differs():
    p = sample_pattern("data: 1045 train\n...\nEp 5: acc xx.xx%\ntexts x")
    assert p.search("data: 1045 train\nEp 1\nEp 2\nEp 5: acc 97.25%\ntexts 3\n")
    assert not p.search("data: 1046 train\nEp 5: acc 97.25%\ntexts 3\n")       # a count that changed
    assert not p.search("data: 1045 train\nEp 5: acc 97.25%\nextra\ntexts 3\n")  # a line not in the sample
    assert not p.search("data: 1045 train\nEp 5: acc 97.2%\ntexts 3\n")         # another shape


def test_readme_sample_of_the_main_job_is_its_real_output(sms_run):
    sample = readme_sample("What it prints")
    assert sample.startswith("python -m npgpt.train --tiny\n")   # the command, as README shows it
    out = sms_run[0].replace(str(sms_run[2]), "runs/spam-tiny-20260101-000000")
    assert sample_pattern(sample.split("\n", 1)[1]).search(out), out


def test_readme_sample_of_your_own_data_is_its_real_output(tmp_path, bpe_dir):
    """The commands of "Your own data" as README shows them (from the repository folder), and the
    line classify prints."""
    sample = readme_sample("runs as it is")
    commands = [s for s in sample.splitlines() if s.startswith("python -m npgpt.")]
    shown = sample.splitlines()[-1]
    assert commands[0] == ("python -m npgpt.train --data examples/support_tickets.csv --tiny --trainable-blocks all "
                           "--lr 1e-3 --out runs/tickets")
    assert commands[-1] == 'python -m npgpt.classify --model runs/tickets/classifier.h5 --top 2 "I was billed ' \
                           'twice this month"'
    shutil.copytree(REPO / "examples", tmp_path / "examples")
    r = run_module(*commands[0].split()[2:], "--bpe-dir", bpe_dir, env=_env(), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    r = run_module("npgpt.classify", "--model", "runs/tickets/classifier.h5", "--top", "2",
                   "I was billed twice this month", env=_env(), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert sample_pattern(shown).search(r.stdout), r.stdout


def test_readme_puts_the_cpu_torch_install_before_the_tests_and_names_both_exit_codes():
    text = README.read_text(encoding="utf-8")
    assert text.index("pip install torch==") < text.index("pytest")
    table = (REPO / "docs" / "troubleshooting.md").read_text(encoding="utf-8")
    assert "| 130 | interrupted with Ctrl-C (SIGINT) |" in table and "| 143 | stopped with SIGTERM |" in table
    assert "130" in text and "143" in text


def test_readme_model_line_of_124m_is_its_parameter_count():
    """README quotes the 124M run's model line (no real weights here): its two counts are the
    arithmetic of the 124M shapes, as model_summary prints them."""
    from npgpt.config import param_shapes, preset
    from npgpt.model import trainable_names
    import numpy as np
    cfg = preset("124M")
    shapes = param_shapes(cfg, num_classes=2)
    total = sum(int(np.prod(s)) for s in shapes.values())
    trained = sum(int(np.prod(shapes[n])) for n in trainable_names(cfg, 1, num_classes=2))
    line = f"model: 124M ({total / 1e6:.1f}M parameters, {trained / 1e6:.2f}M trainable: 1), ..."
    assert f"`{line}`" in README.read_text(encoding="utf-8")
