"""The GPT-2 tokenizer built from OpenAI's encoder.json and vocab.bpe."""
import hashlib
import pathlib
import json
import os
import shutil
from pathlib import Path

import pytest

from npgpt import tokenizer
from npgpt.errors import FormatError, NpgptError
from npgpt.tokenizer import BPE_FILES, PAD_ID, decode, encode, get_tokenizer


def test_the_shared_bpe_files_are_gpt2s(bpe_dir):
    for name, sha in BPE_FILES.items():
        assert hashlib.sha256((pathlib.Path(bpe_dir) / name).read_bytes()).hexdigest() == sha, name


@pytest.fixture
def clean_env(monkeypatch, tmp_path):
    """No NPGPT_BPE_DIR, and a current directory without weights/."""
    monkeypatch.delenv("NPGPT_BPE_DIR", raising=False)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def link_bpe_files(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    for name in BPE_FILES:
        (dst / name).symlink_to(src / name)
    return dst


def test_known_ids(tok):
    assert encode(tok, "Hello, world") == [15496, 11, 995]
    assert tok.n_vocab == 50257
    assert tok.encode("<|endoftext|>", allowed_special="all") == [PAD_ID]


def test_endoftext_in_text_is_plain_text(tok):
    ids = encode(tok, "win <|endoftext|> now")
    assert PAD_ID not in ids
    assert decode(tok, ids) == "win <|endoftext|> now"


def test_ids_are_those_of_encoder_json(tok, bpe_dir):
    vocab = json.loads((pathlib.Path(bpe_dir) / "encoder.json").read_text())
    assert vocab["<|endoftext|>"] == PAD_ID
    # "\u0120" (Ġ) is GPT-2's printable stand-in for the space byte
    assert encode(tok, " spam") == [vocab["\u0120spam"]] == [18084]
    assert encode(tok, "FREE!!") == [vocab["FREE"], vocab["!!"]]
    assert decode(tok, [vocab["\u0120world"]]) == " world"


@pytest.mark.parametrize("text", [
    "",
    "Ok lar... Joking wif u oni...",
    "£1.50/wk, café, naïve — “quoted” …",
    "emoji 😀👍🏽 and flags 🇬🇧 and ZWJ 👨‍👩‍👧",
    "日本語のテキスト, 中文, العربية, עברית, русский, ελληνικά, हिन्दी",
    "controls \x00\x01\x07\x1b[0m\x7f \x91\x92\x96 tab\there\r\nnew line\n",
    "   leading and trailing spaces   ",
])
def test_round_trip(tok, text):
    ids = encode(tok, text)
    assert all(0 <= i < 50257 for i in ids)
    assert decode(tok, ids) == text


def test_wrong_hash_is_format_error(bpe_dir, tmp_path):
    d = tmp_path / "bad"
    d.mkdir()
    shutil.copy(pathlib.Path(bpe_dir) / "encoder.json", d / "encoder.json")
    data = bytearray((pathlib.Path(bpe_dir) / "vocab.bpe").read_bytes())
    data[-2] ^= 1  # one flipped bit in the last merge rule
    (d / "vocab.bpe").write_bytes(bytes(data))
    with pytest.raises(FormatError, match=r"vocab\.bpe"):
        get_tokenizer(d)


def test_missing_file_in_explicit_dir(bpe_dir, tmp_path):
    d = tmp_path / "half"
    d.mkdir()
    (d / "vocab.bpe").symlink_to(pathlib.Path(bpe_dir) / "vocab.bpe")
    with pytest.raises(NpgptError, match=r"encoder\.json"):
        get_tokenizer(d)


def test_env_var_dir(bpe_dir, clean_env, monkeypatch):
    d = link_bpe_files(pathlib.Path(bpe_dir), clean_env / "from_env")
    monkeypatch.setenv("NPGPT_BPE_DIR", str(d))
    tok = get_tokenizer()
    assert tok is tokenizer._encoding_from_dir(str(d.resolve()))
    assert encode(tok, "Hello, world") == [15496, 11, 995]


def test_explicit_dir_beats_env_var(bpe_dir, clean_env, monkeypatch):
    monkeypatch.setenv("NPGPT_BPE_DIR", str(clean_env / "does_not_exist"))
    assert encode(get_tokenizer(bpe_dir), "Hello") == [15496]
    with pytest.raises(NpgptError, match="does_not_exist"):
        get_tokenizer()


def test_weights_folder_under_cwd(bpe_dir, clean_env):
    d = link_bpe_files(pathlib.Path(bpe_dir), clean_env / "weights" / "124M")
    tok = get_tokenizer()
    assert tok is tokenizer._encoding_from_dir(str(d.resolve()))


def test_weights_dir_passed_in(bpe_dir, clean_env):
    d = link_bpe_files(pathlib.Path(bpe_dir), clean_env / "elsewhere" / "355M")
    assert get_tokenizer(weights_dir=clean_env / "elsewhere") is tokenizer._encoding_from_dir(str(d.resolve()))


def test_cached_per_directory(bpe_dir):
    assert get_tokenizer(bpe_dir) is get_tokenizer(str(bpe_dir))


def test_nothing_available_says_where_to_put_files(clean_env, monkeypatch):
    import tiktoken

    def offline(name):
        raise ConnectionError("no network")

    monkeypatch.setattr(tiktoken, "get_encoding", offline)
    tokenizer._encoding_from_tiktoken.cache_clear()
    try:
        with pytest.raises(NpgptError, match=r"encoder\.json and vocab\.bpe"):
            get_tokenizer()
    finally:
        tokenizer._encoding_from_tiktoken.cache_clear()


def test_local_files_leave_tiktoken_cache_env_alone(bpe_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "cache"))
    d = link_bpe_files(pathlib.Path(bpe_dir), tmp_path / "fresh")
    get_tokenizer(d)
    assert os.environ["TIKTOKEN_CACHE_DIR"] == str(tmp_path / "cache")
    assert not (tmp_path / "cache").exists()  # local files are not copied into tiktoken's cache


def test_weights_folder_with_one_file_is_passed_over(bpe_dir, clean_env):
    # weights/ holds only encoder.json (say, a copy half done): the next place, weights/124M, is used
    (clean_env / "weights").mkdir()
    shutil.copy(pathlib.Path(bpe_dir) / "encoder.json", clean_env / "weights" / "encoder.json")
    d = link_bpe_files(pathlib.Path(bpe_dir), clean_env / "weights" / "124M")
    assert tokenizer.find_bpe_dir() == str(d.resolve())
    assert get_tokenizer() is tokenizer._encoding_from_dir(str(d.resolve()))


def test_bpe_file_bytes_are_checked(bpe_dir, tmp_path):
    # what a classifier file stores: GPT-2's two files, never a wrong one
    files = tokenizer.bpe_file_bytes(bpe_dir)
    assert {n: hashlib.sha256(b).hexdigest() for n, b in files.items()} == BPE_FILES
    bad = tmp_path / "bad"
    bad.mkdir()
    shutil.copy(pathlib.Path(bpe_dir) / "encoder.json", bad / "encoder.json")
    (bad / "vocab.bpe").write_text("#version: 0.2\nh e\n")               # another size: not even hashed
    with pytest.raises(FormatError, match=r"vocab\.bpe: not GPT-2's vocab\.bpe \(a 456318-byte file\)"):
        tokenizer.bpe_file_bytes(bad)
    raw = bytearray((pathlib.Path(bpe_dir) / "vocab.bpe").read_bytes())
    raw[-2] ^= 1
    (bad / "vocab.bpe").write_bytes(bytes(raw))                          # the right size, other bytes
    with pytest.raises(FormatError, match=r"vocab\.bpe: sha256 .* is not that of GPT-2's"):
        tokenizer.bpe_file_bytes(bad)
