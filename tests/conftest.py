"""Shared test setup (helpers that are not fixtures: tests/helpers.py).

- `shared_data`: the folder of third-party data files (`NPGPT_SHARED_DATA`, default
  `<repo>/../shared/data`); `bpe_dir`: GPT-2's two BPE files in it; `tok`: the tokenizer.
- With `NPGPT_NO_SKIP=1` (set by .ci/run) a skipped test fails the run: in CI every test, and the
  PyTorch comparison tests above all, must run.
"""
import os
import pathlib

import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent


def shared_data_dir() -> pathlib.Path:
    return pathlib.Path(os.environ.get("NPGPT_SHARED_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> pathlib.Path:
    d = shared_data_dir()
    assert d.is_dir(), f"shared data not found at {d}; set NPGPT_SHARED_DATA"
    return d


@pytest.fixture(scope="session")
def bpe_dir(shared_data) -> str:
    return str(shared_data / "gpt2_bpe")


@pytest.fixture(scope="session")
def tok(bpe_dir):
    from npgpt.tokenizer import get_tokenizer
    return get_tokenizer(bpe_dir)


_skipped = []


def pytest_configure(config):
    """Every test, and every process a test starts, uses fresh per-user folders (prefix cache,
    weights, SMS data), never the user's ~/.cache/npgpt."""
    import tempfile
    os.environ["NPGPT_CACHE_DIR"] = tempfile.mkdtemp(prefix="npgpt-test-prefix-cache-")
    os.environ["NPGPT_WEIGHTS_DIR"] = tempfile.mkdtemp(prefix="npgpt-test-weights-")
    os.environ["NPGPT_DATA_DIR"] = tempfile.mkdtemp(prefix="npgpt-test-data-")


def pytest_unconfigure(config):
    import shutil
    for name in ("NPGPT_CACHE_DIR", "NPGPT_WEIGHTS_DIR", "NPGPT_DATA_DIR"):
        shutil.rmtree(os.environ.get(name, ""), ignore_errors=True)


def pytest_runtest_logreport(report):
    if report.skipped:
        _skipped.append(report.nodeid)


def pytest_sessionfinish(session, exitstatus):
    if os.environ.get("NPGPT_NO_SKIP") == "1" and _skipped:
        print(f"\nNPGPT_NO_SKIP=1 and {len(_skipped)} test(s) were skipped: {_skipped[:5]}")
        session.exitstatus = 1
