"""Tables in, predictions out (npgpt.predictions, `classify --file ... --out`, `evaluate --predictions`).

- Reading: a CSV's header is never a text and a quoted multi-line field is one record; TSV,
  JSONL, Parquet and plain text files; each text's row id (the line where its row starts, a
  Parquet row number, a text file's line, or --id-column's value).
- The frame: "label" then p_<class> in the model's class order, equal to predict_proba, indexed by
  the row ids; each of .csv/.jsonl/.parquet reads back equal to it.
- The command line: classify --file TABLE --out FILE, evaluate --predictions FILE; every mistake
  a user can make (unknown column, unknown extension, a duplicate id, --out over --file) is one line.

The classifier is a tiny random one (no training): what is tested is where each text and each
probability goes, not what the model learned.
"""
import json

import numpy as np
import pandas as pd
import pytest

from helpers import cli_env, one_error_line, run_module
from npgpt.classify import Classifier, load_classifier
from npgpt.cli import classify as classify_cli
from npgpt.cli import evaluate as evaluate_cli
from npgpt.config import init_params, preset
from npgpt.errors import DataError
from npgpt.predictions import prediction_frame, read_texts, write_predictions
from npgpt.tokenizer import get_tokenizer

LABELS = ["cat", "dog", "owl"]
CSV = 'id,body,other\n7,first text,x\n8,"a quoted text\nover two lines, with a comma",y\n9,third,z\n'
CSV_TEXTS = ["first text", "a quoted text\nover two lines, with a comma", "third"]


@pytest.fixture(scope="module")
def model_file(tmp_path_factory, bpe_dir):
    """A tiny random three-class classifier trained (so its meta says) on column "body"."""
    cfg = preset("tiny")
    clf = Classifier(params=init_params(cfg, seed=5, num_classes=3), config=cfg, labels=list(LABELS),
                     pooling="last_token", max_length=None, tok=get_tokenizer(bpe_dir),
                     meta={"text_column": "body", "label_column": "kind"})
    return clf.save(tmp_path_factory.mktemp("model") / "classifier.h5")


@pytest.fixture(scope="module")
def clf(model_file, bpe_dir):
    return load_classifier(model_file, bpe_dir)


def write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


# ----------------------------------------------------------------------------- texts in

def test_csv_header_is_no_text_and_a_quoted_multiline_field_is_one_record(tmp_path):
    texts = read_texts(write(tmp_path / "t.csv", CSV), text_column="body")
    assert texts.tolist() == CSV_TEXTS
    assert texts.index.name == "line" and texts.index.tolist() == [2, 3, 5]    # where each row starts
    assert texts.attrs["notes"] == []
    by_id = read_texts(tmp_path / "t.csv", text_column="body", id_column="id")
    assert by_id.index.name == "id" and by_id.index.tolist() == ["7", "8", "9"] and by_id.tolist() == CSV_TEXTS


def test_tsv_jsonl_parquet_and_a_text_file(tmp_path):
    tsv = read_texts(write(tmp_path / "t.tsv", "text\tn\nalpha beta\t1\n\ngamma\t2\n"), skip_bad_lines=True)
    assert tsv.tolist() == ["alpha beta", "gamma"] and tsv.index.tolist() == [2, 4]
    assert "line 3: blank line" in tsv.attrs["notes"][0]                      # the skipped row is reported
    rows = [{"text": "one", "k": 1}, {"text": "two", "k": 2}]
    jsonl = read_texts(write(tmp_path / "t.jsonl", "\n".join(json.dumps(r) for r in rows) + "\n"), id_column="k")
    assert jsonl.tolist() == ["one", "two"] and jsonl.index.tolist() == [1, 2] and jsonl.index.name == "k"
    pd.DataFrame({"text": ["p", "q", "r"]}).to_parquet(tmp_path / "t.parquet")
    parquet = read_texts(tmp_path / "t.parquet")
    assert parquet.index.name == "row" and parquet.index.tolist() == [1, 2, 3] and parquet.tolist() == ["p", "q", "r"]
    lines = read_texts(write(tmp_path / "t.txt", "id,text\n\nsecond, line\nhalf"), skip_bad_lines=True)
    assert lines.tolist() == ["id,text", "second, line"] and lines.index.tolist() == [1, 3]   # a .txt is lines
    assert lines.index.name == "line" and "line 4 has no newline at its end" in lines.attrs["notes"][0]


def test_reading_errors_are_one_line(tmp_path):
    write(tmp_path / "t.csv", CSV)
    cases = [
        (dict(path=tmp_path / "t.csv", text_column="nope"), "no column 'nope' (a text column; choose one with "
                                                            "--text-column); the file's columns: id, body, other"),
        (dict(path=tmp_path / "t.csv", text_column="body", id_column="idx"), "no column 'idx' (an id column; choose one with --id-column)"),
        (dict(path=write(tmp_path / "d.csv", "id,text\n1,a\n2,b\n1,c\n"), id_column="id"),
         "line 2 and line 4 have the same id '1' in column 'id'"),
        (dict(path=write(tmp_path / "m.csv", "id,text\n1,a\n,b\n"), id_column="id"), "line 3: missing id"),
        (dict(path=tmp_path / "t.txt"), "t.txt: no such file"),
        (dict(path=tmp_path / "t.parquet"), "t.parquet: no such file"),
        (dict(path=write(tmp_path / "u.txt", "a\n"), text_column="body"), "--text-column needs a table"),
    ]
    for kwargs, expected in cases:
        with pytest.raises(DataError) as e:
            read_texts(kwargs.pop("path"), **kwargs)
        assert expected in str(e.value) and "\n" not in str(e.value), str(e.value)


# ----------------------------------------------------------------------------- predictions out

def test_frame_is_predict_proba_by_row_id(tmp_path, clf):
    texts = read_texts(write(tmp_path / "t.csv", CSV), text_column="body")
    frame = prediction_frame(clf, texts)
    assert list(frame.columns) == ["label", "p_cat", "p_dog", "p_owl"]
    assert frame.index.equals(texts.index)
    P = clf.predict_proba(CSV_TEXTS)                                           # [3,3]
    np.testing.assert_array_equal(frame[["p_cat", "p_dog", "p_owl"]].to_numpy(), P)
    assert frame["label"].tolist() == [LABELS[k] for k in P.argmax(axis=1)]
    assert len(set(frame["label"])) > 1              # the seed gives texts different labels: order is seen
    shuffled = texts.iloc[[2, 0, 1]]
    again = prediction_frame(clf, shuffled)
    pd.testing.assert_frame_equal(again, frame.loc[shuffled.index])            # each row goes with its text


@pytest.mark.parametrize("ext", ["csv", "jsonl", "parquet"])
def test_each_format_round_trips(tmp_path, clf, ext):
    texts = read_texts(write(tmp_path / "t.csv", CSV), text_column="body")
    frame = prediction_frame(clf, texts)
    out = tmp_path / f"p.{ext}"
    write_predictions(frame, out)
    back = {"csv": pd.read_csv, "parquet": pd.read_parquet,
            # (json, not pd.read_json: pandas parses JSON floats to about 15 digits, not to the last bit)
            "jsonl": lambda p: pd.DataFrame([json.loads(line) for line in p.read_text().splitlines()])}[ext](out)
    assert list(back.columns) == ["line", "label", "p_cat", "p_dog", "p_owl"]
    assert (back.dtypes[["p_cat", "p_dog", "p_owl"]] == np.float64).all()
    pd.testing.assert_frame_equal(back.set_index("line"), frame, check_index_type=False, check_dtype=False,
                                  check_exact=True)                             # to the last bit
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["t.csv", f"p.{ext}"])   # no temporary left


def test_unknown_extension_and_id_named_like_a_column(tmp_path, clf):
    texts = read_texts(write(tmp_path / "t.csv", "label,text\nx,hello\n"), id_column="label")
    with pytest.raises(DataError, match="the row id's name 'label' is also a column"):
        prediction_frame(clf, texts)
    frame = prediction_frame(clf, read_texts(tmp_path / "t.csv"))
    with pytest.raises(DataError, match=r"^--out p\.xlsx: unknown file type '\.xlsx'; use \.csv, \.jsonl, \.parquet$"):
        write_predictions(frame, "p.xlsx")
    mixed = read_texts(write(tmp_path / "m.jsonl", '{"k": 1, "text": "a"}\n{"k": "x", "text": "b"}\n'), id_column="k")
    with pytest.raises(DataError, match=r"p\.parquet: cannot be written as Parquet .*; write \.csv or \.jsonl$"):
        write_predictions(prediction_frame(clf, mixed), tmp_path / "p.parquet")
    assert not (tmp_path / "p.parquet").exists()


# ----------------------------------------------------------------------------- the command line

def test_classify_file_table_out(tmp_path, model_file, bpe_dir, clf, capsys):
    data = write(tmp_path / "t.csv", CSV)
    out = tmp_path / "p.jsonl"
    assert classify_cli.main(["--model", model_file, "--bpe-dir", bpe_dir, "--file", str(data), "--out", str(out),
                              "--id-column", "id", "--quiet"]) == 0
    std = capsys.readouterr()
    assert std.out == "" and std.err == f"wrote 3 predictions to {out} (columns: id, label, p_cat, p_dog, p_owl)\n"
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == ["7", "8", "9"]
    P = clf.predict_proba(CSV_TEXTS)
    assert [[r[f"p_{c}"] for c in LABELS] for r in rows] == P.astype(np.float64).tolist()
    # without --out: one line per record (the model's column "body"), the header never classified
    assert classify_cli.main(["--model", model_file, "--bpe-dir", bpe_dir, "--file", str(data)]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in printed] == [r["label"] for r in rows]
    assert printed[1].endswith("a quoted text over two lines, with a comma")


def test_classify_table_bad_rows_named_and_skipped(tmp_path, model_file, bpe_dir, capsys):
    data = write(tmp_path / "t.csv", "body,n\nfine,1\n,2\nalso fine,3\n")
    argv = ["--model", model_file, "--bpe-dir", bpe_dir, "--file", str(data), "--out", str(tmp_path / "p.csv")]
    with pytest.raises(DataError, match=r"t\.csv: line 3: empty text in column 'body' \(--skip-bad-lines skips"):
        classify_cli.main(argv)
    assert classify_cli.main(argv + ["--skip-bad-lines"]) == 0
    assert "skipped 1 bad row: line 3: empty text" in capsys.readouterr().err
    assert pd.read_csv(tmp_path / "p.csv")["line"].tolist() == [2, 4]


def test_classify_usage_errors(tmp_path, model_file, bpe_dir, capsys):
    data = write(tmp_path / "t.csv", CSV)
    for argv, expected in [(["--file", str(data), "--out", str(data)], "is the --file being read"),
                           (["--file", str(write(tmp_path / "t.txt", "a\n")), "--text-column", "body"],
                            "--text-column needs --file with a table")]:
        with pytest.raises(SystemExit) as e:
            classify_cli.main(["--model", model_file, "--bpe-dir", bpe_dir, *argv])
        assert e.value.code == 2
        (line,) = capsys.readouterr().err.strip().splitlines()
        assert expected in line
    assert data.read_text() == CSV


def test_classify_errors_are_one_line_from_the_command(tmp_path_factory, tmp_path, model_file, bpe_dir):
    env = cli_env(tmp_path_factory)
    data = write(tmp_path / "t.csv", CSV)
    r = run_module("npgpt.classify", "--model", model_file, "--bpe-dir", bpe_dir, "--file", data,
                   "--text-column", "txt", env=env, cwd=tmp_path)
    assert one_error_line(r, 1) == (f"error: {data}: no column 'txt' (a text column; choose one with --text-column); "
                                    "the file's columns: id, body, other")
    r = run_module("npgpt.classify", "--model", model_file, "--file", data, "--out", "p.tsv", env=env, cwd=tmp_path)
    assert one_error_line(r, 1) == "error: --out p.tsv: unknown file type '.tsv'; use .csv, .jsonl, .parquet"


def test_evaluate_predictions_beside_the_metrics(tmp_path, model_file, bpe_dir, clf, capsys):
    data = write(tmp_path / "l.tsv", "kind\tbody\ncat\tfirst text\ndog\t\"a quoted text\nover two lines, "
                                      "with a comma\"\nowl\tthird\n")
    preds, metrics = tmp_path / "p.csv", tmp_path / "m.json"
    assert evaluate_cli.main(["--model", model_file, "--bpe-dir", bpe_dir, "--data", str(data), "--quiet",
                              "--out", str(metrics), "--predictions", str(preds), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert json.loads(metrics.read_text()) == result
    back = pd.read_csv(preds)
    assert list(back.columns) == ["line", "true", "label", "p_cat", "p_dog", "p_owl"]
    assert back["line"].tolist() == [2, 3, 5] and back["true"].tolist() == LABELS
    np.testing.assert_array_equal(back[["p_cat", "p_dog", "p_owl"]].to_numpy(), clf.predict_proba(CSV_TEXTS))
    assert (back["label"] == back["true"]).mean() == result["accuracy"]
    assert result["confusion"] == pd.crosstab(back["true"], back["label"]).reindex(
        index=LABELS, columns=LABELS, fill_value=0).to_numpy().tolist()
    with pytest.raises(DataError, match=r"^--predictions p\.txt: unknown file type"):
        evaluate_cli.main(["--model", model_file, "--data", str(data), "--predictions", "p.txt"])
