"""docs/backprop.md and the examples cannot drift from the code.

- every `npgpt.x.y` name the document mentions exists (the failure lists the missing ones);
- every test it cites (`tests/test_x.py::test_name`, or a test file) exists;
- every Python code block in it runs;
- the examples run and print what they claim.
"""
import importlib
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DOC = REPO / "docs" / "backprop.md"


def doc_text():
    return DOC.read_text(encoding="utf-8")


def resolve(dotted):
    """The object a dotted name `npgpt.module.attr...` points at (ImportError/AttributeError if none)."""
    parts = dotted.split(".")
    for k in range(len(parts), 0, -1):          # the longest importable module prefix
        try:
            obj = importlib.import_module(".".join(parts[:k]))
        except ImportError:
            continue
        for attr in parts[k:]:
            obj = getattr(obj, attr)
        return obj
    raise ImportError(dotted)


def test_every_npgpt_name_exists():
    names = sorted(set(re.findall(r"\bnpgpt(?:\.[A-Za-z_][A-Za-z0-9_]*)+", doc_text())))
    assert len(names) > 20
    missing = []
    for n in names:
        try:
            resolve(n)
        except (ImportError, AttributeError):
            missing.append(n)
    assert not missing, f"docs/backprop.md names {len(missing)} missing object(s): {', '.join(missing)}"


def test_every_cited_test_exists():
    text = doc_text()
    cited = sorted(set(re.findall(r"tests/(test_\w+\.py)(?:::(\w+))?", text)))
    assert len(cited) > 10
    missing = []
    for fname, func in cited:
        path = REPO / "tests" / fname
        if not path.exists():
            missing.append(f"tests/{fname}")
        elif func and not re.search(rf"^def {func}\(", path.read_text(encoding="utf-8"), re.M):
            missing.append(f"tests/{fname}::{func}")
    assert not missing, f"docs/backprop.md cites {len(missing)} missing test(s): {', '.join(missing)}"


def python_blocks():
    return re.findall(r"^```python\n(.*?)^```", doc_text(), re.S | re.M)


def test_doc_has_code_blocks_and_a_mermaid_diagram():
    assert len(python_blocks()) >= 2
    assert "```mermaid\nflowchart" in doc_text()


@pytest.mark.parametrize("k", range(len(python_blocks())))
def test_python_block_runs(k):
    code = python_blocks()[k]
    exec(compile(code, f"docs/backprop.md python block {k + 1}", "exec"), {"__name__": f"doc_block_{k}"})


def run_example(name, *args):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    r = subprocess.run([sys.executable, str(REPO / "examples" / name), *args], capture_output=True,
                       text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr
    return r.stdout


@pytest.mark.parametrize("op", ["layernorm", "attention"])
def test_gradcheck_example(op):
    out = run_example("gradcheck_one_op.py", "--op", op)
    errors = [float(e) for e in re.findall(r"relative error (\S+)", out)]
    assert errors and max(errors) < 1e-6, out
    assert out.rstrip().splitlines()[-1].startswith("OK:"), out


def test_gradcheck_example_catches_a_wrong_backward():
    """The script's check can fail: a layer norm backward missing one of its two row means."""
    code = (
        "import runpy, sys, numpy as np\n"
        "from npgpt import kernels, ops\n"
        "def wrong(dy, saved):\n"
        "    x, mean, rstd, g = saved\n"
        "    xhat = (x - mean[:, None]) * rstd[:, None]\n"
        "    dxhat = dy * g\n"
        "    dx = rstd[:, None] * (dxhat - dxhat.mean(-1, keepdims=True))\n"
        "    return dx, (dy * xhat).sum(0), dy.sum(0)\n"
        "ops.layernorm_backward = wrong\n"
        f"sys.argv = ['gradcheck_one_op.py']\n"
        f"runpy.run_path({str(REPO / 'examples' / 'gradcheck_one_op.py')!r}, run_name='__main__')\n")
    env = dict(os.environ, PYTHONPATH=str(REPO), NPGPT_NUMBA="0")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 1 and "FAILED" in r.stdout, (r.stdout, r.stderr)


def test_train_step_by_step_example():
    out = run_example("train_step_by_step.py")
    for stage in ("1. weights", "2. forward", "3. loss", "4. backward", "5. check", "6. AdamW"):
        assert stage in out, out
    assert "all of them trainable: True" in out, out
    after, before = re.search(r"loss after the step: (\S+) \(was (\S+)\)", out).groups()
    assert float(after) < float(before), out            # one step down the gradient lowers the loss
    diff = float(re.search(r"largest relative difference (\S+);", out).group(1))
    assert diff < 1e-4, out


def test_flops_counts_agree_with_the_benchmark():
    """npgpt.flops and benchmarks/finetune.py count a block's linear layers alike."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import finetune as bench
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    from npgpt import flops
    from npgpt.config import preset
    cfg = preset("124M")
    assert (bench.C, bench.L) == (cfg.n_embd, cfg.n_layer)
    assert flops.block_flops_per_token(cfg) == bench.LIN
