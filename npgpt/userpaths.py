"""Where npgpt keeps a user's downloaded files, so that a run finds them from any folder.

    ~/.cache/npgpt/            ($XDG_CACHE_HOME/npgpt when that is set): `cache_root()`
        weights/               GPT-2's converted weights, gpt2-<size>.h5, and the downloaded
                               checkpoints in <size>/ (with the tokenizer's encoder.json, vocab.bpe)
                               ($NPGPT_WEIGHTS_DIR instead, when set)
        data/                  the SMS Spam Collection and its train/validation/test CSVs
                               ($NPGPT_DATA_DIR instead, when set)
        prefix/                the frozen-prefix cache (npgpt.prefix_cache; $NPGPT_CACHE_DIR instead)

A project's own copy still wins: a `weights/gpt2-<size>.h5` under the current folder is used
before the per-user one, and a `data/` folder under the current folder that holds the SMS file
or its split CSVs is used before the per-user one. What npgpt downloads goes to the per-user
folders, never to whatever folder a command happens to run in.
"""
from __future__ import annotations

import os

WEIGHTS_ENV = "NPGPT_WEIGHTS_DIR"
DATA_ENV = "NPGPT_DATA_DIR"
LOCAL_WEIGHTS = "weights"          # under the current folder: a project's own copy
LOCAL_DATA = "data"


def cache_root() -> str:
    """$XDG_CACHE_HOME/npgpt, else ~/.cache/npgpt (the XDG base directory rule)."""
    base = os.environ.get("XDG_CACHE_HOME")
    if not base or not os.path.isabs(base):          # the spec: a relative value is ignored
        base = os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "npgpt")


def user_weights_dir() -> str:
    """Where downloaded and converted weights go: $NPGPT_WEIGHTS_DIR, else <cache_root>/weights."""
    return os.environ.get(WEIGHTS_ENV) or os.path.join(cache_root(), "weights")


def user_data_dir() -> str:
    """Where the SMS data goes: $NPGPT_DATA_DIR, else <cache_root>/data."""
    return os.environ.get(DATA_ENV) or os.path.join(cache_root(), "data")


def weights_dirs() -> list:
    """The folders weights and the tokenizer files are looked for in, first match wins:
    ./weights (a project's own copy), then the per-user folder."""
    return [LOCAL_WEIGHTS, user_weights_dir()]


def weights_file(size: str) -> str:
    """The converted weights of a GPT-2 size: ./weights/gpt2-<size>.h5 when it exists, else the
    per-user one (also when that does not exist yet: it is where a download puts it)."""
    name = f"gpt2-{size}.h5"
    local = os.path.join(LOCAL_WEIGHTS, name)
    return local if os.path.exists(local) else os.path.join(user_weights_dir(), name)


def data_dir(names=("SMSSpamCollection", "train.csv")) -> str:
    """The SMS data folder: ./data when it holds one of `names` (the data file or its CSVs),
    else the per-user one."""
    if any(os.path.exists(os.path.join(LOCAL_DATA, n)) for n in names):
        return LOCAL_DATA
    return user_data_dir()
