"""The SMS Spam Collection pipeline (npgpt.data): parse, balance/split, CSVs, fetch."""
import csv
import hashlib
import io
import os
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from npgpt import data, download  # noqa: F401  (a broken import must fail, not skip)
from npgpt.data import (DATA_SHA256, balance_and_split, extract_sms_spam, prepare_splits, read_sms_spam,
                        read_split_csv)
from npgpt.errors import DataError, FormatError, NpgptError


@pytest.fixture(scope="module")
def sms_path(shared_data):
    path = shared_data / "sms_spam_collection" / "SMSSpamCollection"
    assert hashlib.sha256(path.read_bytes()).hexdigest() == DATA_SHA256
    return path


@pytest.fixture(scope="module")
def messages(sms_path):
    return read_sms_spam(sms_path, parse="strict")


@pytest.fixture(scope="module")
def pandas_messages(sms_path):
    return read_sms_spam(sms_path)


@pytest.fixture(scope="module")
def splits(sms_path, tmp_path_factory):
    return prepare_splits(sms_path, tmp_path_factory.mktemp("splits"))


def write_lines(path, lines):
    path.write_bytes(b"".join(line + b"\n" for line in lines))
    return path


def small_corpus(n_spam=10, n_ham=15):
    return ([b"spam\tWIN a prize %d now" % i for i in range(n_spam)]
            + [b"ham\tsee you at %d" % i for i in range(n_ham)])


# --- parsing -------------------------------------------------------------------------------


def test_parse_counts(messages):
    assert len(messages) == 5574
    assert messages["Label"].value_counts().to_dict() == {"ham": 4827, "spam": 747}
    assert messages["Line"].tolist() == list(range(1, 5575))
    assert messages.attrs["skipped"] == [] and messages.attrs["warning"] == ""


def test_parse_is_verbatim(messages, sms_path):
    # Writing the rows back gives the file byte for byte: no quote processing, nothing stripped.
    rebuilt = "".join(f"{label}\t{text}\n" for label, text in zip(messages["Label"], messages["Text"]))
    assert rebuilt.encode("utf-8") == sms_path.read_bytes()
    assert messages["Text"].str.startswith('"').sum() > 0  # the lines pandas' quoting merges


def test_pandas_default_quoting_merges_lines(sms_path, pandas_messages, messages):
    # The default parse is the reference book's read_csv: 5572 messages, lines 5082-5084 merged.
    df = pd.read_csv(sms_path, sep="\t", header=None, names=["Label", "Text"])
    assert len(df) == len(pandas_messages) == 5572
    assert pandas_messages["Label"].value_counts().to_dict() == {"ham": 4825, "spam": 747}
    assert pandas_messages["Text"].tolist() == df["Text"].tolist()
    assert pandas_messages["Label"].tolist() == df["Label"].tolist()
    # Line is where each row starts: every row but the merged one is its line's strict message
    strict = messages.set_index("Line")
    lines = pandas_messages["Line"].to_numpy()
    assert lines[0] == 1 and lines[-1] == 5574 and (np.diff(lines) >= 1).all()
    merged = np.flatnonzero(np.diff(lines) > 1)
    assert merged.tolist() == [5081] and lines[5081] == 5082 and lines[5082] == 5085
    same = np.delete(np.arange(len(lines)), merged)
    ours, theirs = strict.loc[lines[same], "Text"].to_numpy(), pandas_messages["Text"].to_numpy()[same]
    quoted = np.array([t.startswith('"') for t in ours])
    assert (ours[~quoted] == theirs[~quoted]).all()       # only a field opening with a quote changes
    assert quoted.sum() > 0 and all(t.strip('"') == u or '""' in t for t, u in zip(ours[quoted], theirs[quoted])
                                    if t.endswith('"'))
    assert pandas_messages["Text"][5081].count("\n") == 2
    assert strict.loc[5082, "Text"].startswith('"') and not pandas_messages["Text"][5081].startswith('"')


def test_pandas_parse_bad_rows_name_their_line(tmp_path):
    path = write_lines(tmp_path / "sms", [b"ham\tfine", b'spam\t"two\nlines"', b"eggs\tx", b"ham\tlast"])
    with pytest.raises(DataError, match=r"line 4: unknown label 'eggs'"):
        read_sms_spam(path)
    df = read_sms_spam(path, skip_bad_lines=True)
    assert df["Line"].tolist() == [1, 2, 5] and df["Text"].tolist() == ["fine", "two\nlines", "last"]
    assert "line 4" in df.attrs["warning"]
    path = write_lines(tmp_path / "latin", [b"ham\tfine", b"ham\tcaf\xe9"])
    with pytest.raises(DataError, match=r"line 2: not valid UTF-8"):
        read_sms_spam(path)
    with pytest.raises(DataError, match="unknown parse"):
        read_sms_spam(path, parse="loose")


@pytest.mark.parametrize("bad, line_no, reason", [
    (b"ham no tab here", 3, "no tab"),
    (b"eggs\tunknown label", 3, "unknown label 'eggs'"),
    (b"Ham\tcase matters", 3, "unknown label 'Ham'"),
    (b"", 3, "blank line"),
    (b"   \r", 3, "blank line"),
    (b"ham\t", 3, "empty message"),
    (b"ham\tcaf\xe9 in latin-1", 3, "not valid UTF-8"),
    (b"spam\t\xff\xfe", 3, "not valid UTF-8"),
])
def test_bad_line_names_line_number(tmp_path, bad, line_no, reason):
    path = write_lines(tmp_path / "sms", [b"ham\tfine", b"spam\talso fine", bad, b"ham\tlast"])
    with pytest.raises(DataError, match=rf"line {line_no}: .*{reason}"):
        read_sms_spam(path, parse="strict")
    df = read_sms_spam(path, skip_bad_lines=True, parse="strict")
    assert df["Line"].tolist() == [1, 2, 4]
    assert len(df.attrs["skipped"]) == 1 and df.attrs["skipped"][0].startswith(f"line {line_no}:")
    assert "skipped 1 bad line" in df.attrs["warning"]


@pytest.mark.parametrize("header", [b"label\ttext", b"Label\tSMS", b"LABEL\tMessage", b"class\ttext"])
def test_header_line_is_an_error(tmp_path, header):
    path = write_lines(tmp_path / "sms", [header, b"ham\tfine", b"spam\tbuy"])
    with pytest.raises(DataError, match=r"line 1: a header line"):
        read_sms_spam(path, parse="strict")
    assert read_sms_spam(path, skip_bad_lines=True, parse="strict")["Text"].tolist() == ["fine", "buy"]


def test_skip_bad_lines_counts_them_all(tmp_path):
    lines = [b"label\ttext", b"ham\tok 1", b"no tab", b"", b"spam\tok 2", b"junk\tx",
             b"ham\t\xc3", b"ham\tok 3"]
    path = write_lines(tmp_path / "sms", lines)
    with pytest.raises(DataError, match=r"line 1:"):
        read_sms_spam(path, parse="strict")
    df = read_sms_spam(path, skip_bad_lines=True, parse="strict")
    assert df["Line"].tolist() == [2, 5, 8]
    assert [s.split(":")[0] for s in df.attrs["skipped"]] == [f"line {n}" for n in (1, 3, 4, 6, 7)]
    assert "skipped 5 bad lines" in df.attrs["warning"]


def test_text_after_first_tab_is_kept(tmp_path):
    path = write_lines(tmp_path / "sms", [b'ham\ta\tb\t "quoted" \r', b"spam\t<|endoftext|> \xc2\x91\r\r"])
    df = read_sms_spam(path, parse="strict")
    assert df["Text"].tolist() == ['a\tb\t "quoted" ', "<|endoftext|> \x91\r"]  # one trailing \r goes
    assert df["Label"].tolist() == ["ham", "spam"]


def test_no_trailing_newline_and_missing_file(tmp_path):
    (tmp_path / "sms").write_bytes(b"ham\tone\nspam\ttwo")
    assert read_sms_spam(tmp_path / "sms", parse="strict")["Text"].tolist() == ["one", "two"]
    with pytest.raises(DataError, match="no such file"):
        read_sms_spam(tmp_path / "absent")


# --- balance and split ---------------------------------------------------------------------


def test_split_sizes_and_balance(splits):
    train, validation, test = splits
    assert (len(train), len(validation), len(test)) == (1045, 149, 300)
    both = pd.concat(splits)
    assert both["Label"].value_counts().to_dict() == {0: 747, 1: 747}
    assert list(train.columns) == ["Label", "Text", "Line"]


def test_splits_disjoint_by_line(splits, pandas_messages):
    messages = pandas_messages
    lines = [set(s["Line"]) for s in splits]
    assert sum(len(x) for x in lines) == 1494
    assert not (lines[0] & lines[1]) and not (lines[0] & lines[2]) and not (lines[1] & lines[2])
    # every spam message is used once; each row is the message on its line
    by_line = messages.set_index("Line")
    both = pd.concat(splits)
    assert set(both.loc[both["Label"] == 1, "Line"]) == set(messages.loc[messages["Label"] == "spam", "Line"])
    assert (by_line.loc[both["Line"], "Text"].to_numpy() == both["Text"].to_numpy()).all()
    assert (by_line.loc[both["Line"], "Label"].map({"ham": 0, "spam": 1}).to_numpy()
            == both["Label"].to_numpy()).all()


def reference_splits(sms_path, seed=123):
    """The reference's steps (chapter 6), written from their description: pandas' default read,
    ham undersampled to the spam count, labels mapped, shuffled, cut 70 / 10 / rest; `seed` is
    the random_state of both sample() calls."""
    df = pd.read_csv(sms_path, sep="\t", header=None, names=["Label", "Text"])
    assert len(df) == 5572
    num_spam = df[df["Label"] == "spam"].shape[0]
    assert num_spam == 747
    ham_subset = df[df["Label"] == "ham"].sample(num_spam, random_state=seed)
    balanced_df = pd.concat([ham_subset, df[df["Label"] == "spam"]])
    balanced_df["Label"] = balanced_df["Label"].map({"ham": 0, "spam": 1})
    df = balanced_df.sample(frac=1, random_state=seed).reset_index(drop=True)
    train_end = int(len(df) * 0.7)
    validation_end = train_end + int(len(df) * 0.1)
    return df[:train_end], df[train_end:validation_end], df[validation_end:]


def test_split_matches_reference_code(splits, sms_path):
    ref = reference_splits(sms_path)
    assert [len(r) for r in ref] == [1045, 149, 300]
    for ours, theirs in zip(splits, ref):
        assert ours["Text"].tolist() == theirs["Text"].tolist()      # same messages, same order
        assert ours["Label"].tolist() == theirs["Label"].tolist()


def test_another_seed_matches_reference_code_with_that_seed(sms_path, pandas_messages, tmp_path):
    """The seed drives both the undersampling and the shuffle: seed 7 gives the reference's steps
    with random_state=7 row for row (not, say, seed 7's ham rows in seed 123's order)."""
    ref = reference_splits(sms_path, seed=7)
    for ours in (balance_and_split(pandas_messages, seed=7), prepare_splits(sms_path, tmp_path, seed=7)):
        for a, b in zip(ours, ref):
            assert a["Text"].tolist() == b["Text"].tolist()
            assert a["Label"].tolist() == b["Label"].tolist()


def test_balance_none_keeps_every_message_split_as_the_reference_splits(sms_path, pandas_messages, tmp_path):
    """--balance none on the SMS data: every message, shuffled and cut 70 / 10 / rest by the
    reference's own steps without the undersampling; the seed still drives the shuffle."""
    kept = prepare_splits(sms_path, tmp_path, balance="none")
    assert [len(s) for s in kept] == [3900, 557, 1115]
    both = pd.concat(kept)
    assert both["Label"].value_counts().to_dict() == {0: 4825, 1: 747}
    assert sorted(both["Line"]) == sorted(pandas_messages["Line"])
    df = pd.read_csv(sms_path, sep="\t", header=None, names=["Label", "Text"])
    df["Label"] = df["Label"].map({"ham": 0, "spam": 1})
    df = pd.concat([df[df["Label"] == 0], df[df["Label"] == 1]]).sample(frac=1, random_state=123)
    assert kept[0]["Text"].tolist() == df["Text"].tolist()[:3900]
    other = balance_and_split(pandas_messages, seed=7, undersample=False)
    assert other[0]["Line"].tolist() != kept[0]["Line"].tolist()


def test_the_splits_made_one_way_are_not_reused_for_another(sms_path, tmp_path, monkeypatch):
    """The CSVs in a data folder record their parse, seed and balance; a run asking for another
    of any of them rebuilds them."""
    prepare_splits(sms_path, tmp_path)
    (tmp_path / data.DATA_FILE).write_bytes(Path(sms_path).read_bytes())   # what a rebuild reads

    def reread(*args, **kwargs):
        raise AssertionError("rebuilt")

    monkeypatch.setattr(data, "read_sms_spam", reread)
    prepare_splits(None, tmp_path)                                 # the same recipe: reused
    for other in (dict(parse="strict"), dict(seed=7), dict(balance="none")):
        with pytest.raises(AssertionError, match="rebuilt"):
            prepare_splits(None, tmp_path, **other)


def test_strict_parse_gives_another_split(sms_path, splits, tmp_path):
    strict = prepare_splits(sms_path, tmp_path, parse="strict")
    assert [len(s) for s in strict] == [1045, 149, 300]
    assert [s["Label"].tolist() for s in strict] == [s["Label"].tolist() for s in splits]
    differ = sum(a != b for a, b in zip(strict[0]["Text"], splits[0]["Text"]))
    assert differ > 100   # sample() draws from a different set of ham rows


def test_concurrent_prepare_splits_into_one_folder(sms_path, tmp_path):
    # Two runs sharing a data folder rebuild the same CSVs at once; neither may break the other.
    from concurrent.futures import ThreadPoolExecutor
    expected = [s["Text"].tolist() for s in prepare_splits(sms_path, tmp_path / "ref")]
    for attempt in range(6):
        with ThreadPoolExecutor(max_workers=3) as pool:
            jobs = [pool.submit(prepare_splits, sms_path, tmp_path / "shared") for _ in range(3)]
            results = [j.result() for j in jobs]
        for got in results:
            assert [s["Text"].tolist() for s in got] == expected
        for name, texts in zip(data.SPLITS, expected):
            assert read_split_csv(tmp_path / "shared" / f"{name}.csv")["Text"].tolist() == texts
        assert sorted(p.name for p in (tmp_path / "shared").iterdir()) == sorted(
            [f"{n}.csv" for n in data.SPLITS] + ["splits.json"])


def test_split_is_reproducible(sms_path, splits, tmp_path):
    again = prepare_splits(sms_path, tmp_path)
    for a, b in zip(splits, again):
        pd.testing.assert_frame_equal(a, b)
    assert splits[0]["Line"].tolist()[:3] == [2088, 4695, 882]
    other_seed = balance_and_split(read_sms_spam(sms_path), seed=7)
    assert other_seed[0]["Line"].tolist() != splits[0]["Line"].tolist()


def test_csvs_round_trip_and_are_reused(sms_path, tmp_path, monkeypatch):
    built = prepare_splits(sms_path, tmp_path)
    for name, df in zip(data.SPLITS, built):
        back = read_split_csv(tmp_path / f"{name}.csv")
        assert back["Text"].tolist() == df["Text"].tolist()
        assert back["Label"].tolist() == df["Label"].tolist() and back["Line"].tolist() == df["Line"].tolist()

    def no_network(*args, **kwargs):
        raise AssertionError("the CSVs should have been reused")

    monkeypatch.setattr(data, "download_sms_spam", no_network)
    monkeypatch.setattr(data, "read_sms_spam", no_network)
    reused = prepare_splits(None, tmp_path)  # no SMSSpamCollection in tmp_path: must read the CSVs
    for a, b in zip(built, reused):
        assert a["Text"].tolist() == b["Text"].tolist() and a["Line"].tolist() == b["Line"].tolist()
    with pytest.raises(AssertionError, match="reused"):   # made by another parse: rebuilt, not reused
        prepare_splits(None, tmp_path, parse="strict")
    (tmp_path / "splits.json").unlink()                    # CSVs of unknown making: rebuilt
    with pytest.raises(AssertionError, match="reused"):
        prepare_splits(None, tmp_path)


def test_csv_keeps_awkward_texts(tmp_path):
    awkward = [b"NA", b"null", b"nan", b"#N/A", b"None", b"0123", b"1.0", b"  padded  ", b'say "hi", ok',
               b"a\rb", b"\rstart", b"tab\tinside", b'"', b'""', b"a,b,c", b"\xef\xbb\xbfbom", b"\x00nul"]
    lines = [b"spam\t" + t for t in awkward] + [b"ham\t" + t for t in awkward]
    built = prepare_splits(write_lines(tmp_path / "sms", lines), tmp_path / "out", parse="strict")
    texts = sorted(pd.concat(built)["Text"].tolist())
    assert texts == sorted([t.decode("utf-8") for t in awkward] * 2)
    for name, df in zip(data.SPLITS, built):
        assert read_split_csv(tmp_path / "out" / f"{name}.csv")["Text"].tolist() == df["Text"].tolist()


def test_bad_split_csv(tmp_path):
    (tmp_path / "x.csv").write_text("Label,Body\n0,hi\n")
    with pytest.raises(FormatError, match=r"x\.csv: missing column\(s\) Text"):
        read_split_csv(tmp_path / "x.csv")
    (tmp_path / "y.csv").write_text("Label,Text\nham,hi\n")
    with pytest.raises(FormatError, match=r"y\.csv: Label must be 0"):
        read_split_csv(tmp_path / "y.csv")
    (tmp_path / "z.csv").write_text("Label,Text\n")
    with pytest.raises(FormatError, match=r"z\.csv: no rows"):
        read_split_csv(tmp_path / "z.csv")


def test_too_little_data(tmp_path):
    with pytest.raises(DataError, match="cannot balance"):
        prepare_splits(write_lines(tmp_path / "sms", [b"ham\ta", b"ham\tb"]), tmp_path)
    with pytest.raises(DataError, match="too few messages"):
        prepare_splits(write_lines(tmp_path / "sms", small_corpus(2, 2)), tmp_path)


def test_skip_warning_reaches_splits(tmp_path):
    path = write_lines(tmp_path / "sms", [b"Label\tSMS"] + small_corpus())
    with pytest.raises(DataError, match="line 1"):
        prepare_splits(path, tmp_path)
    train, validation, test = prepare_splits(path, tmp_path, skip_bad_lines=True)
    assert (len(train), len(validation), len(test)) == (14, 2, 4)
    assert len(train.attrs["skipped"]) == 1 and "line 1" in train.attrs["warning"]


# --- zip extraction and download -----------------------------------------------------------


def make_zip(members: dict) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, payload in members.items():
            zf.writestr(name, payload)
    return buf.getvalue()


README = "SMS Spam Collection v.1\r\nJosé María\r\n".encode("latin-1")


@pytest.mark.parametrize("layout", ["flat", "nested", "folder"])
def test_extract_zip(tmp_path, sms_path, layout):
    payload = sms_path.read_bytes()
    inner = {"SMSSpamCollection": payload, "readme": README}
    if layout == "flat":
        blob = make_zip(inner)
    elif layout == "nested":
        blob = make_zip({"smsspamcollection.zip": make_zip(inner)})
    else:
        blob = make_zip({"smsspamcollection/SMSSpamCollection": payload, "smsspamcollection/readme": README})
    (tmp_path / "uci.zip").write_bytes(blob)
    out = extract_sms_spam(tmp_path / "uci.zip", tmp_path / "data")
    assert out == tmp_path / "data" / "SMSSpamCollection"
    assert out.read_bytes() == payload
    assert (tmp_path / "data" / "readme").read_bytes() == README


def test_extract_zip_errors(tmp_path):
    (tmp_path / "html.zip").write_bytes(b"<html>Service unavailable</html>")
    with pytest.raises(FormatError, match=r"html\.zip: not a readable zip"):
        extract_sms_spam(tmp_path / "html.zip", tmp_path)
    (tmp_path / "other.zip").write_bytes(make_zip({"readme": README}))
    with pytest.raises(FormatError, match=r"other\.zip: no SMSSpamCollection"):
        extract_sms_spam(tmp_path / "other.zip", tmp_path)


def test_prepare_splits_from_zip(tmp_path, sms_path, splits):
    (tmp_path / "uci.zip").write_bytes(make_zip({"smsspamcollection.zip": make_zip(
        {"SMSSpamCollection": sms_path.read_bytes(), "readme": README})}))
    got = prepare_splits(tmp_path / "uci.zip", tmp_path / "data")
    assert (tmp_path / "data" / "SMSSpamCollection").read_bytes() == sms_path.read_bytes()
    for a, b in zip(got, splits):
        assert a["Line"].tolist() == b["Line"].tolist()


def test_source_urls(monkeypatch):
    monkeypatch.delenv("NPGPT_DATA_MIRROR", raising=False)
    assert data.source_urls() == [data.UCI_URL, data.MIRROR_URL]
    monkeypatch.setenv("NPGPT_DATA_MIRROR", "http://127.0.0.1:1/sms.zip")
    assert data.source_urls() == [data.UCI_URL, "http://127.0.0.1:1/sms.zip"]


@pytest.fixture
def local_server(tmp_path, sms_path):
    """An http.server on 127.0.0.1 serving sms.zip (UCI's flat layout); yields its base URL."""
    import functools
    import http.server
    import threading

    served = tmp_path / "served"
    served.mkdir()
    (served / "sms.zip").write_bytes(make_zip({"SMSSpamCollection": sms_path.read_bytes(), "readme": README}))
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()
    thread.join()


def test_download_through_local_server(local_server, tmp_path, sms_path, splits):
    # the first URL is missing (404), the second is the mirror
    urls = [f"{local_server}/missing.zip", f"{local_server}/sms.zip"]
    got = prepare_splits(None, tmp_path / "data", urls=urls, progress=False)
    assert (tmp_path / "data" / "SMSSpamCollection").read_bytes() == sms_path.read_bytes()
    assert not (tmp_path / "data" / "sms_spam_collection.zip").exists()
    for a, b in zip(got, splits):
        assert a["Line"].tolist() == b["Line"].tolist()


def test_download_failure_says_what_to_do(local_server, tmp_path):
    with pytest.raises(NpgptError, match=r"404.*SMSSpamCollection"):
        data.download_sms_spam(tmp_path / "data", urls=[f"{local_server}/missing.zip"], progress=False)
    assert not (tmp_path / "data").exists()             # no empty data folder left behind
    (tmp_path / "mine").mkdir()                          # a folder the user made stays
    with pytest.raises(NpgptError):
        data.download_sms_spam(tmp_path / "mine", urls=[f"{local_server}/missing.zip"], progress=False)
    assert os.listdir(tmp_path / "mine") == []


def test_downloaded_file_that_is_not_a_zip(local_server, tmp_path):
    (tmp_path / "served" / "page.zip").write_bytes(b"<html>moved</html>")
    with pytest.raises(FormatError, match="not a readable zip"):
        data.download_sms_spam(tmp_path / "data", urls=[f"{local_server}/page.zip"], progress=False)
    assert not (tmp_path / "data" / "sms_spam_collection.zip").exists()  # a rerun downloads again


def test_split_files_get_the_usual_permissions(sms_path, tmp_path):
    # written through a private temporary file, but readable as any new file is (0666 less umask)
    import os
    import stat
    umask = os.umask(0o022)
    try:
        prepare_splits(sms_path, tmp_path)
    finally:
        os.umask(umask)
    for name in ["train.csv", "validation.csv", "test.csv", "splits.json"]:
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o644, name
