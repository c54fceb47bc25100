"""Files found from any folder (npgpt.userpaths), and classifier files that carry their tokenizer.

- The per-user folder: $XDG_CACHE_HOME/npgpt, else ~/.cache/npgpt; $NPGPT_WEIGHTS_DIR and
  $NPGPT_DATA_DIR replace its weights/ and data/; ./weights/gpt2-<size>.h5 and a ./data holding
  the SMS data still win; an empty ./weights (as in a checkout) does not.
- `weights download` and `weights convert` write there by default, and what they wrote (the .h5,
  the tokenizer's two files) is then found from another folder; messages name the real path.
- End to end, offline, from an empty folder: `train --tiny` finds the SMS data and the tokenizer in
  the per-user folder, and `classify` on its output works from a third folder with neither.
- Every writer of classifier files (train, Classifier.save after fit, lora merge) writes the
  tokenizer into the file: `load_classifier` works with no bpe dir, no weights folder and a
  tiktoken that cannot download.
Every test points HOME and XDG_CACHE_HOME at its own tmp folders: the real ~/.cache is never used.
"""
import os
import shutil

import numpy as np
import pytest

from helpers import SMS, cli_env, one_error_line, run_module
from test_download import FAST, FIXTURE, serve_openai_layout, server  # noqa: F401  (server: a fixture)
from npgpt import prefix_cache, tokenizer, userpaths
from npgpt.errors import NpgptError

BPE_NAMES = ("encoder.json", "vocab.bpe")
TEXTS = ["WINNER!! Claim your free prize now", "see you at 8?"]


@pytest.fixture
def user(tmp_path, monkeypatch):
    """A user with an empty home and cache, working in an empty folder: -> the XDG cache folder."""
    for name in ("NPGPT_WEIGHTS_DIR", "NPGPT_DATA_DIR", "NPGPT_BPE_DIR", "NPGPT_CACHE_DIR"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    (tmp_path / "project").mkdir()
    monkeypatch.chdir(tmp_path / "project")
    return tmp_path / "xdg"


@pytest.fixture
def nowhere(tmp_path, monkeypatch):
    """No tokenizer files anywhere npgpt looks: an empty working folder and per-user weights folder
    (HOME and XDG_CACHE_HOME stay: in this process they also place Numba's cache of the kernels)."""
    for name in ("NPGPT_BPE_DIR",):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NPGPT_WEIGHTS_DIR", str(tmp_path / "no-weights"))
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")


def _copy_bpe(src_dir, dest):
    dest.mkdir(parents=True, exist_ok=True)
    for name in BPE_NAMES:
        shutil.copy(os.path.join(src_dir, name), dest / name)


def test_cache_root_follows_xdg_then_home(user, tmp_path, monkeypatch):
    assert userpaths.cache_root() == str(user / "npgpt")
    assert userpaths.user_weights_dir() == str(user / "npgpt" / "weights")
    assert userpaths.user_data_dir() == str(user / "npgpt" / "data")
    assert prefix_cache.default_dir() == str(user / "npgpt" / "prefix")
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/dir")          # the XDG spec: ignored
    assert userpaths.cache_root() == str(tmp_path / "home" / ".cache" / "npgpt")
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert userpaths.user_weights_dir() == str(tmp_path / "home" / ".cache" / "npgpt" / "weights")
    monkeypatch.setenv("NPGPT_WEIGHTS_DIR", str(tmp_path / "w"))
    monkeypatch.setenv("NPGPT_DATA_DIR", str(tmp_path / "d"))
    assert userpaths.user_weights_dir() == str(tmp_path / "w")
    assert userpaths.data_dir() == str(tmp_path / "d")


def test_a_projects_own_weights_and_data_win(user):
    assert userpaths.weights_file("124M") == str(user / "npgpt" / "weights" / "gpt2-124M.h5")
    os.mkdir("weights")                                  # a checkout's weights/ with only a README
    open("weights/README.md", "w").close()
    assert userpaths.weights_file("124M") == str(user / "npgpt" / "weights" / "gpt2-124M.h5")
    open("weights/gpt2-124M.h5", "wb").close()
    assert userpaths.weights_file("124M") == os.path.join("weights", "gpt2-124M.h5")
    os.mkdir("data")
    assert userpaths.data_dir() == str(user / "npgpt" / "data")
    open("data/SMSSpamCollection", "w").close()
    assert userpaths.data_dir() == "data"


def test_tokenizer_files_found_in_the_user_folder_and_local_ones_win(user, bpe_dir):
    assert tokenizer.find_bpe_dir() is None
    _copy_bpe(bpe_dir, user / "npgpt" / "weights" / "124M")          # where `weights download` puts them
    assert tokenizer.find_bpe_dir() == str(user / "npgpt" / "weights" / "124M")
    _copy_bpe(bpe_dir, user.parent / "project" / "weights")
    assert tokenizer.find_bpe_dir() == str(user.parent / "project" / "weights")


def test_messages_name_the_real_weights_path(user, monkeypatch):
    from npgpt.job import _weights_file
    from npgpt.runconfig import RunConfig, RunOptions
    with pytest.raises(NpgptError) as e:
        _weights_file(RunConfig(model="124M"), RunOptions(), print)
    assert f"no weights at {user / 'npgpt' / 'weights' / 'gpt2-124M.h5'}:" in str(e.value)
    _offline_tiktoken(monkeypatch)
    with pytest.raises(NpgptError) as e:
        tokenizer.get_tokenizer()
    assert f"put them in {user / 'npgpt' / 'weights'} (`python -m npgpt.weights download 124M` does)" in str(e.value)


def test_download_writes_to_the_user_folder_and_is_found_from_anywhere(user, server, shared_data, monkeypatch):
    from npgpt.weights import download
    serve_openai_layout(server, shared_data)
    out = download("124M", base_url=server.url, **FAST)
    assert out == str(user / "npgpt" / "weights" / "gpt2-124M.h5")
    assert os.listdir(".") == []                                      # nothing in the working folder
    os.makedirs("elsewhere")
    monkeypatch.chdir("elsewhere")
    assert userpaths.weights_file("124M") == out
    assert tokenizer.find_bpe_dir() == str(user / "npgpt" / "weights" / "124M")


def test_convert_of_a_folder_keeps_its_tokenizer_files_where_runs_look(user, tmp_path, bpe_dir, monkeypatch):
    from npgpt.weights import convert
    src = tmp_path / "Downloads" / "124M"                       # the checkpoint fetched by hand
    shutil.copytree(FIXTURE, src)
    _copy_bpe(bpe_dir, src)
    out = convert(src)
    assert os.path.dirname(out) == str(user / "npgpt" / "weights")
    shutil.rmtree(tmp_path / "Downloads")
    os.makedirs("elsewhere")
    monkeypatch.chdir("elsewhere")
    assert tokenizer.find_bpe_dir() == str(user / "npgpt" / "weights")


@pytest.fixture(scope="module")
def offline_env(tmp_path_factory):
    """The environment of the commands below: offline, no per-user folder set by variable, one
    Numba cache for the module (the kernels compile once)."""
    env = cli_env(tmp_path_factory, offline=True)
    for name in ("NPGPT_WEIGHTS_DIR", "NPGPT_DATA_DIR"):
        env.pop(name, None)
    return env


def _as_user(env, xdg, home):
    return dict(env, HOME=str(home), XDG_CACHE_HOME=str(xdg))


def test_cli_convert_writes_to_the_user_folder(user, tmp_path, offline_env):
    env = _as_user(offline_env, user, tmp_path / "home")
    r = run_module("npgpt.weights", "convert", FIXTURE, env=env, cwd=tmp_path / "project")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == str(user / "npgpt" / "weights" / "gpt2-tiny_tf_checkpoint.h5")
    assert os.path.isfile(r.stdout.strip()) and os.listdir(tmp_path / "project") == []


# ----------------------------------------------------------------------------- end to end, offline

def test_train_and_classify_offline_from_other_folders(tmp_path, offline_env, shared_data, bpe_dir):
    """The data and the tokenizer from the per-user folder; then classify from a folder and a
    user with nothing at all: the classifier file is enough."""
    xdg = tmp_path / "xdg"
    _copy_bpe(bpe_dir, xdg / "npgpt" / "weights" / "124M")
    (xdg / "npgpt" / "data").mkdir(parents=True)
    shutil.copy(shared_data / SMS, xdg / "npgpt" / "data" / "SMSSpamCollection")
    (tmp_path / "project").mkdir()
    env = _as_user(offline_env, xdg, tmp_path / "home")
    r = run_module("npgpt.train", "--tiny", "--epochs", "1", "--eval-freq", "1000", "--quiet", "--no-plots",
                   "--out", "run", env=env, cwd=tmp_path / "project")
    assert r.returncode == 0, r.stderr[-3000:]
    assert (xdg / "npgpt" / "data" / "train.csv").is_file() and not (tmp_path / "project" / "data").exists()
    (tmp_path / "other").mkdir()
    env.update(HOME=str(tmp_path / "empty-home"), XDG_CACHE_HOME=str(tmp_path / "empty-xdg"))
    r = run_module("npgpt.classify", "--model", tmp_path / "project" / "run" / "classifier.h5", *TEXTS,
                   env=env, cwd=tmp_path / "other")
    assert r.returncode == 0, r.stderr[-3000:]
    assert len(r.stdout.strip().splitlines()) == 2 and not (tmp_path / "empty-xdg").exists()


def test_train_offline_without_a_tokenizer_names_the_user_folder(tmp_path, offline_env, shared_data):
    env = _as_user(offline_env, tmp_path / "xdg", tmp_path / "home")
    (tmp_path / "project").mkdir()
    r = run_module("npgpt.train", "--tiny", "--data", shared_data / SMS, "--quiet", "--out", "run",
                   env=env, cwd=tmp_path / "project")
    line = one_error_line(r, 1)
    assert f"put them in {tmp_path / 'xdg' / 'npgpt' / 'weights'}" in line


# ----------------------------------------------------------------------------- every writer carries the tokenizer

def _offline_tiktoken(monkeypatch):
    """tiktoken cannot download, nor use an encoding it made before; npgpt's own caches of
    encodings are emptied."""
    import tiktoken
    import tiktoken.load
    read_file = tiktoken.load.read_file

    def refuse(*args, **kwargs):
        raise ConnectionError("offline")

    def local_only(path):
        if "://" in str(path):
            raise ConnectionError(f"offline: {path}")
        return read_file(path)
    monkeypatch.setattr(tiktoken, "get_encoding", refuse)
    monkeypatch.setattr(tiktoken.load, "read_file", local_only)
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", "")
    tokenizer._encoding_from_tiktoken.cache_clear()
    tokenizer._encoding_from_dir.cache_clear()


def _classifies_offline(path, monkeypatch):
    """load_classifier(path) with no bpe dir, no weights folder, tiktoken offline: the probabilities."""
    from npgpt.classify import load_classifier
    _offline_tiktoken(monkeypatch)
    return load_classifier(path).predict_proba(TEXTS)


def test_fit_then_save_carries_the_tokenizer(nowhere, tmp_path, bpe_dir, monkeypatch):
    """The BPE folder fit used is gone before fit's classifier is saved, and when the saved files
    are classified."""
    import npgpt
    from npgpt.params import load_params, save_params
    texts = ["win a prize now", "free cash prize", "see you at 8", "lunch tomorrow?"] * 10
    labels = ["spam", "spam", "ham", "ham"] * 10
    _copy_bpe(bpe_dir, tmp_path / "bpe")
    clf = npgpt.fit(texts, labels, model="tiny", epochs=1, batch_size=4, bpe_dir=str(tmp_path / "bpe"),
                    out=str(tmp_path / "run"), plots=False)
    want = clf.predict_proba(TEXTS)
    # a file loaded with a bpe dir (an older file, no copy of its own) is saved with one too
    params, config, meta = load_params(tmp_path / "run" / "classifier.h5")
    save_params(tmp_path / "old.h5", params, config, meta)
    npgpt.load_classifier(tmp_path / "old.h5", bpe_dir=str(tmp_path / "bpe")).save(tmp_path / "resaved.h5")
    shutil.rmtree(tmp_path / "bpe")
    clf.save(tmp_path / "my.h5")                                       # its run's file has the copy
    np.testing.assert_array_equal(_classifies_offline(tmp_path / "my.h5", monkeypatch), want)
    np.testing.assert_array_equal(_classifies_offline(tmp_path / "resaved.h5", monkeypatch), want)
    with pytest.raises(NpgptError, match="cannot load the GPT-2 tokenizer"):
        _classifies_offline(tmp_path / "old.h5", monkeypatch)          # (the check itself can fail)


def test_a_classifier_built_by_hand_saves_the_tokenizer_it_was_given(nowhere, tmp_path, bpe_dir, monkeypatch):
    """Classifier(tok=get_tokenizer(folder)) with no bpe_dir: its file carries that folder's files."""
    from npgpt.classify import Classifier
    from npgpt.config import init_params, preset
    from npgpt.tokenizer import get_tokenizer
    _copy_bpe(bpe_dir, tmp_path / "bpe")
    cfg = preset("tiny")
    clf = Classifier(params=init_params(cfg, seed=1, num_classes=2), config=cfg, labels=["a", "b"],
                     pooling="last_token", max_length=None, tok=get_tokenizer(tmp_path / "bpe"))
    want = clf.predict_proba(TEXTS)
    shutil.rmtree(tmp_path / "bpe")
    clf.save(tmp_path / "by-hand.h5")
    np.testing.assert_array_equal(_classifies_offline(tmp_path / "by-hand.h5", monkeypatch), want)


def test_lora_merge_carries_the_tokenizer(nowhere, tmp_path, bpe_dir, monkeypatch):
    from npgpt import config as C, lora, params as P
    from npgpt.cli import lora as lora_cli
    from npgpt.tokenizer import bpe_file_bytes
    cfg = C.preset("tiny")
    p = P.init_params(cfg, seed=0, num_classes=2)
    spec = lora.LoraSpec(2, 4)
    lora.add_lora(p, cfg, spec.rank, spec.alpha, seed=1)
    for name in p:
        if name.endswith("lora_B"):
            p[name][...] = np.random.default_rng(2).normal(0, 0.5, p[name].shape)
    meta = {"kind": "npgpt-classifier", "labels": ["ham", "spam"], "pooling": "last_token",
            "max_length": None, "lora": spec.to_dict()}
    P.save_params(tmp_path / "lora.h5", p, cfg, meta, files=bpe_file_bytes(bpe_dir))   # as train writes it
    P.save_params(tmp_path / "bare.h5", p, cfg, meta)                                  # a file without one
    _offline_tiktoken(monkeypatch)
    assert lora_cli.main(["merge", str(tmp_path / "lora.h5"), "--out", str(tmp_path / "merged.h5"), "--quiet"]) == 0
    want = _classifies_offline(tmp_path / "lora.h5", monkeypatch)
    np.testing.assert_allclose(_classifies_offline(tmp_path / "merged.h5", monkeypatch), want, atol=1e-5)
    assert np.abs(want - 0.5).max() > 1e-3
    merge_bare = ["merge", str(tmp_path / "bare.h5"), "--out", str(tmp_path / "m2.h5"), "--quiet"]
    with pytest.raises(NpgptError, match="pass --bpe-dir"):                          # nothing written
        lora_cli.main(merge_bare)
    with pytest.raises(NpgptError, match=r"nope.encoder.json: no such file .*--bpe-dir names their folder"):
        lora_cli.main(merge_bare + ["--bpe-dir", str(tmp_path / "nope")])
    assert not (tmp_path / "m2.h5").exists()
    assert lora_cli.main(merge_bare + ["--bpe-dir", bpe_dir]) == 0
    np.testing.assert_allclose(_classifies_offline(tmp_path / "m2.h5", monkeypatch), want, atol=1e-5)
