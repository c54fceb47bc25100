"""A user's own labelled text: reading tables, classes, stratified splits, training any number of
classes, the saved classifier, `npgpt.fit` against the command line, classify --top/--json."""
import csv
import json
import random

import numpy as np
import pandas as pd
import pytest

import npgpt
from npgpt.classify import load_classifier
from npgpt.config import init_params
from npgpt.cli import train
from npgpt.dataset import TokenRows, make_batch, make_datasets, tokenize
from npgpt.ops import softmax
from npgpt.errors import DataError
from npgpt.model import forward_cls
from npgpt.tabular import (class_names, parse_split, prepare_user_splits, read_frame, read_table,
                           read_user_splits, stratified_split, undersample)
from npgpt.tokenizer import encode, get_tokenizer


def write_csv(path, rows, header=("text", "label"), delimiter=","):
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh, delimiter=delimiter)
        w.writerow(header)
        w.writerows(rows)
    return path


def labelled(n_per_class, classes, seed=0):
    rng = random.Random(seed)
    rows = [(f"text {i} of class {c} {rng.random():.4f}", c) for c in classes for i in range(n_per_class[c])]
    rng.shuffle(rows)
    return rows


KEYS = ["apple", "river", "engine", "violin"]
FILLER = "the a of to and in is it that was for on are with as by at this from or be".split()


def token_identity_rows(n, seed):
    """The class is which of four words the text holds, among random filler words."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        words = rng.choices(FILLER, k=rng.randint(3, 8))
        words.insert(rng.randint(0, len(words)), KEYS[i % 4])
        rows.append((" ".join(words), KEYS[i % 4]))
    return rows


# --- reading -------------------------------------------------------------------------------


def test_csv_with_quoted_commas_newlines_and_quotes(tmp_path):
    path = tmp_path / "t.csv"
    path.write_bytes(b'id,text,label\n1,"a, b and c",x\n2,"two\nlines, here",y\n'
                     b'3,"she said ""hi""\ttab",x\n4,plain,y\n')
    df = read_table(path)
    assert df["Text"].tolist() == ["a, b and c", "two\nlines, here", 'she said "hi"\ttab', "plain"]
    assert df["Label"].tolist() == ["x", "y", "x", "y"]
    assert df["Line"].tolist() == [2, 3, 5, 6]      # where each row starts


def test_tsv_and_jsonl_and_column_choice(tmp_path):
    tsv = write_csv(tmp_path / "t.tsv", [("hello, world", "greet"), ('"quoted" text', "other")],
                    header=("body", "intent"), delimiter="\t")
    df = read_table(tsv, text_column="body", label_column="intent")
    assert df["Text"].tolist() == ["hello, world", '"quoted" text'] and df["Label"].tolist() == ["greet", "other"]
    jl = tmp_path / "t.jsonl"
    jl.write_text('{"text": "first", "label": 2}\n{"text": "second", "label": 10, "extra": 1}\n'
                  '{"text": "third", "label": 2.0}\n')
    df = read_table(jl)
    assert df["Label"].tolist() == ["2", "10", "2"] and df["Line"].tolist() == [1, 2, 3]
    assert class_names(df["Label"]) == ["2", "10"]          # integers sort as numbers
    with pytest.raises(DataError, match=r"t\.jsonl: no column 'category'.*columns: text, label, extra"):
        read_table(jl, label_column="category")
    with pytest.raises(DataError, match=r"no column 'body'.*--text-column.*columns: text, label"):
        read_table(write_csv(tmp_path / "c.csv", [("a", "b")]), text_column="body")


def test_parquet_if_pandas_can(tmp_path):
    pytest.importorskip("pyarrow")
    path = tmp_path / "t.parquet"
    pd.DataFrame({"text": ["one", "two"], "label": [0, 1]}).to_parquet(path)
    df = read_table(path)
    assert df["Text"].tolist() == ["one", "two"] and df["Label"].tolist() == ["0", "1"]


@pytest.mark.parametrize("body, line, reason", [
    (b"text,label\nfine,a\n\nalso,b\n", 3, "blank line"),
    (b"text,label\nfine,a\n  ,b\n", 3, "empty text"),
    (b"text,label\nfine,a\nno label,\n", 3, "missing label"),
    (b"text,label\nfine,a\ntext,label\nok,b\n", 3, "repeated header"),
    (b"text,label\nfine,a\ncaf\xe9,b\n", 3, "not valid UTF-8"),
    (b"text,label\nfine,a\none,two,three\n", 3, "3 fields"),
    (b'text,label\nfine,a\n"multi\nline",b\n,c\n', 5, "empty text"),
])
def test_bad_rows_name_file_and_line(tmp_path, body, line, reason):
    path = tmp_path / "bad.csv"
    path.write_bytes(body)
    with pytest.raises(DataError, match=rf"bad\.csv: line {line}: .*{reason}"):
        read_table(path)
    df = read_table(path, skip_bad_lines=True)
    assert len(df.attrs["skipped"]) == 1 and df.attrs["skipped"][0].startswith(f"line {line}:")
    assert "skipped 1 bad row" in df.attrs["warning"]


def test_jsonl_bad_lines(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text('{"text": "a", "label": "p"}\n[1, 2]\n{"text": "b", "label": null}\nnot json\n')
    with pytest.raises(DataError, match=r"x\.jsonl: line 2: a JSON list"):
        read_table(path)
    df = read_table(path, skip_bad_lines=True)
    assert df["Text"].tolist() == ["a"] and [s.split(":")[0] for s in df.attrs["skipped"]] == ["line 2", "line 3", "line 4"]


def test_a_label_written_as_nan_is_missing_but_a_text_nan_is_a_text(tmp_path):
    """A label cell NaN (any case) or None is a missing label, a bad row like an empty one; texts
    are never read as missing values: "NA", "null", "nan" stay texts."""
    path = tmp_path / "d.csv"
    path.write_text("text,label\nNA,a\nnull,b\nnan,a\nsome text,NaN\nmore,None\nlast,nan\n")
    with pytest.raises(DataError, match=r"d\.csv: line 5: missing label in column 'label' \(empty, NaN or None\)"):
        read_table(path)
    df = read_table(path, skip_bad_lines=True)
    assert df["Text"].tolist() == ["NA", "null", "nan"] and df["Label"].tolist() == ["a", "b", "a"]
    assert [s.split(":")[0] for s in df.attrs["skipped"]] == ["line 5", "line 6", "line 7"]


def test_missing_values_in_memory_are_named_by_index_label_or_position(tmp_path):
    """npgpt.fit's data in memory: a NaN or None label or text is refused (never the class or
    the word "nan"), naming a DataFrame's row by its index label and a list's by its position, in
    the training, validation and test data alike."""
    frame = pd.DataFrame({"text": ["one", "two", "three", "four"], "label": ["a", "b", np.nan, "b"]},
                         index=[10, 20, 30, 40])
    with pytest.raises(DataError, match=r"the training data: row with index 30: missing label in column 'label'"):
        npgpt.fit(frame, model="tiny", out=str(tmp_path / "x"))
    texts = pd.DataFrame({"text": ["one", None, "three", "four"], "label": list("abab")}, index=list("pqrs"))
    with pytest.raises(DataError, match=r"row with index 'q': empty text in column 'text'"):
        npgpt.fit(texts, model="tiny", out=str(tmp_path / "x"))
    with pytest.raises(DataError, match=r"the training data: position 2: missing label"):
        npgpt.fit(["one", "two", "three"], ["a", "b", None], model="tiny", out=str(tmp_path / "x"))
    good = (["one", "two", "three", "four"], list("abab"))
    with pytest.raises(DataError, match=r"the validation data: position 1: missing label"):
        npgpt.fit(*good, validation=(["x", "y"], ["a", float("nan")]), model="tiny", out=str(tmp_path / "x"))
    with pytest.raises(DataError, match=r"the test data: row with index 7: missing label"):
        npgpt.fit(*good, test=pd.DataFrame({"text": ["x"], "label": ["NaN"]}, index=[7]), model="tiny",
                  out=str(tmp_path / "x"))
    kept = read_frame(frame, skip_bad_lines=True)
    assert kept["Text"].tolist() == ["one", "two", "four"] and kept.attrs["skipped"][0].startswith("row with index 30:")


def test_a_folder_given_as_a_table_is_named_as_a_folder(tmp_path):
    data = write_csv(tmp_path / "d.csv", labelled({"a": 10, "b": 10}, "ab"))
    (tmp_path / "val").mkdir()
    with pytest.raises(DataError, match=r"val: is a folder, expected a table file \(\.csv, \.tsv"):
        prepare_user_splits(data, validation=tmp_path / "val")


# --- classes and splits --------------------------------------------------------------------


def test_class_order_and_unknown_labels(tmp_path):
    data = write_csv(tmp_path / "d.csv", labelled({"b": 10, "a": 10, "c": 10}, "bac"))
    splits, names = prepare_user_splits(data)
    assert names == ["a", "b", "c"]
    splits, names = prepare_user_splits(data, labels=["c", "a", "b"])
    assert names == ["c", "a", "b"]
    for df in splits:
        assert [names[i] for i in df["Label"]] == df["Name"].tolist()
    val = write_csv(tmp_path / "v.csv", [("fine", "a"), ("new class", "zebra")])
    with pytest.raises(DataError, match=r"v\.csv: line 3: label 'zebra' is not one of .*a, b, c"):
        prepare_user_splits(data, validation=val)
    with pytest.raises(DataError, match=r"d\.csv: line \d+: label 'c' is not one of"):
        prepare_user_splits(data, labels=["a", "b"])
    one = write_csv(tmp_path / "one.csv", [("x", "a"), ("y", "a")])
    with pytest.raises(DataError, match="only one class"):
        prepare_user_splits(one)
    for bad in ("0.7", "0.9,0.2", "0,0.1", "a,b"):
        with pytest.raises(DataError, match="--split"):
            parse_split(bad)


@pytest.mark.parametrize("counts", [{"a": 50, "b": 31, "c": 7},
                                    {f"k{i}": n for i, n in enumerate([40, 3, 17, 25, 9, 12, 61])}])
def test_stratified_split_proportions(counts):
    df = pd.DataFrame(labelled(counts, list(counts)), columns=["Text", "Label"])
    fractions = (0.7, 0.1, 0.2)
    parts = stratified_split(df, fractions, seed=5)
    assert sum(len(p) for p in parts) == len(df)
    assert sorted(pd.concat(parts)["Text"]) == sorted(df["Text"])          # a partition
    for p, f in zip(parts, fractions):
        got = p["Label"].value_counts().to_dict()
        for c, n in counts.items():
            assert abs(got.get(c, 0) - n * f) <= 1, (c, got.get(c, 0), n * f)
    again = stratified_split(df, fractions, seed=5)
    assert all(a["Text"].tolist() == b["Text"].tolist() for a, b in zip(parts, again))
    other = stratified_split(df, fractions, seed=6)
    assert parts[0]["Text"].tolist() != other[0]["Text"].tolist()
    assert parts[0]["Label"].tolist() != sorted(parts[0]["Label"])       # classes interleaved


def test_explicit_splits_and_rescaled_fractions(tmp_path):
    data = write_csv(tmp_path / "d.csv", labelled({"a": 40, "b": 50}, "ab"))
    val = write_csv(tmp_path / "v.csv", [("v1", "a"), ("v2", "b"), ("v3", "b")])
    tst = write_csv(tmp_path / "t.csv", [("t1", "a"), ("t2", "b")])
    (train_, v, t), _ = prepare_user_splits(data, validation=val, test=tst)
    assert len(train_) == 90 and v["Text"].tolist() == ["v1", "v2", "v3"] and t["Text"].tolist() == ["t1", "t2"]
    (train_, v, t), _ = prepare_user_splits(data, validation=val, split="0.7,0.1")
    assert v["Text"].tolist() == ["v1", "v2", "v3"]
    assert abs(len(t) - 90 * 0.2 / 0.9) <= 2           # 0.7 : 0.2 rescaled, within 1 a class
    (train_, v, t), _ = prepare_user_splits(data, test=tst, split="0.6,0.2")
    assert t["Text"].tolist() == ["t1", "t2"] and abs(len(v) - 90 * 0.2 / 0.8) <= 2
    (train_, v, t), names = prepare_user_splits(data, out_dir=tmp_path / "run")
    back = read_user_splits(tmp_path / "run", names)
    for a, b in zip((train_, v, t), back):
        assert a["Text"].tolist() == b["Text"].tolist() and a["Label"].tolist() == b["Label"].tolist()


def test_balance_undersample(tmp_path):
    data = write_csv(tmp_path / "d.csv", labelled({"a": 30, "b": 12, "c": 50}, "abc"))
    splits, names = prepare_user_splits(data, balance="undersample", split="0.5,0.25")
    both = pd.concat(splits)
    assert both["Name"].value_counts().to_dict() == {"a": 12, "b": 12, "c": 12}
    splits, _ = prepare_user_splits(data)                                    # --balance none: all kept
    assert len(pd.concat(splits)) == 92
    df = pd.DataFrame(labelled({"a": 9, "b": 4}, "ab"), columns=["Text", "Label"])
    assert undersample(df, 1)["Label"].value_counts().to_dict() == {"a": 4, "b": 4}


# --- tokens in flat arrays -----------------------------------------------------------------


def test_token_rows_are_flat_views(tok):
    texts = ["hello world", "a", "the quick brown fox jumps", "<|endoftext|> kept as text"]
    rows = tokenize(tok, texts, batch_size=3)
    assert len(rows) == 4 and rows.ids.ndim == 1 and rows.offsets.tolist()[0] == 0
    for i, t in enumerate(texts):
        assert rows[i].tolist() == encode(tok, t)
        assert rows[i].base is rows.ids or rows[i].base is rows.ids.base    # a view, no copy
    cut = rows.cut(2)
    assert [r.tolist() for r in cut] == [encode(tok, t)[:2] for t in texts]
    ids, lengths = make_batch(cut, [2, 1], pad_to=3)
    assert lengths.tolist() == [2, 1] and ids[0, :2].tolist() == encode(tok, texts[2])[:2]
    assert TokenRows.from_lists([[1, 2], [3]])[1].tolist() == [3]


# --- training, the classifier file, the API ------------------------------------------------


def train_cli(tmp_path, data, name, *extra, bpe_dir):
    out = tmp_path / name
    code = train.main(["--tiny", "--data", str(data), "--out", str(out), "--quiet", "--no-plots",
                       "--bpe-dir", bpe_dir, *extra])
    assert code == 0
    return out


def test_tiny_model_learns_four_classes_from_token_identity(tmp_path, bpe_dir):
    data = write_csv(tmp_path / "words.csv", token_identity_rows(480, seed=0))
    run = train_cli(tmp_path, data, "run", "--trainable-blocks", "all", "--lr", "1e-3", "--epochs", "4",
                    "--batch-size", "16", "--eval-freq", "1000", bpe_dir=bpe_dir)
    metrics = json.loads((run / "metrics.json").read_text())["metrics"]["final"]
    assert metrics["test_accuracy"] >= 0.9          # chance is 0.25
    clf = load_classifier(run / "classifier.h5")
    assert clf.labels == sorted(KEYS) and clf.meta["id2label"] == {str(i): k for i, k in enumerate(sorted(KEYS))}
    assert clf.meta["text_column"] == "text" and clf.meta["label_column"] == "label"
    assert {p.name for p in run.iterdir()} >= {"train.csv", "validation.csv", "test.csv", "classifier.h5"}
    fresh = [" ".join(["the", k, "of", "it"]) for k in KEYS]
    assert clf.predict(fresh) == KEYS


def test_saved_seven_class_classifier_equals_forward_cls(tmp_path, bpe_dir, tok):
    classes = [f"c{i}" for i in range(7)]
    data = write_csv(tmp_path / "seven.csv", labelled({c: 12 for c in classes}, classes))
    run = train_cli(tmp_path, data, "run7", "--epochs", "1", bpe_dir=bpe_dir)
    clf = load_classifier(run / "classifier.h5")
    assert clf.labels == classes and clf.params["cls/w"].shape[1] == 7
    test = pd.read_csv(run / "test.csv", keep_default_na=False)
    texts = test["Text"].tolist()
    (ds,) = make_datasets((test,), tok, padding=clf.max_length)
    logits = np.concatenate([forward_cls(clf.params, clf.config, *make_batch(ds.tokens, [i]), "last_token")
                             for i in range(len(ds))])
    np.testing.assert_allclose(clf.predict_proba(texts), softmax(logits), atol=1e-6, rtol=0)
    clf.save(tmp_path / "copy.h5")
    again = npgpt.load_classifier(tmp_path / "copy.h5", bpe_dir)
    assert again.labels == classes
    np.testing.assert_array_equal(again.predict_proba(texts), clf.predict_proba(texts))


def test_fit_agrees_with_the_cli(tmp_path, bpe_dir):
    """The same data and seed through `python -m npgpt.train` and `npgpt.fit` (lists, and a
    DataFrame): the same parameters, bit for bit, and so the same probabilities."""
    rows = token_identity_rows(120, seed=3)
    data = write_csv(tmp_path / "d.csv", rows)
    run = train_cli(tmp_path, data, "cli", "--epochs", "2", "--seed", "7", bpe_dir=bpe_dir)
    cli = load_classifier(run / "classifier.h5")
    texts, labels = [t for t, _ in rows], [c for _, c in rows]
    clf = npgpt.fit(texts, labels, model="tiny", epochs=2, seed=7, out=str(tmp_path / "api"),
                    bpe_dir=bpe_dir, no_plots=True)
    assert set(clf.params) == set(cli.params)
    for name in cli.params:
        assert clf.params[name].dtype == cli.params[name].dtype and np.array_equal(clf.params[name], cli.params[name]), name
    start = init_params(cli.config, seed=7, num_classes=len(KEYS))
    assert not np.array_equal(start["h1/mlp/c_fc/w"], cli.params["h1/mlp/c_fc/w"])   # it did train
    probe = texts[:10] + ["an apple", "by the river"]
    np.testing.assert_array_equal(clf.predict_proba(probe), cli.predict_proba(probe))
    assert clf.predict(probe) == cli.predict(probe) and clf.labels == cli.labels
    frame = pd.DataFrame({"body": texts, "tag": labels})
    clf2 = npgpt.fit(frame, text_column="body", label_column="tag", model="tiny", epochs=2, seed=7,
                     out=str(tmp_path / "api2"), bpe_dir=bpe_dir, no_plots=True)
    for name in cli.params:
        assert np.array_equal(clf2.params[name], cli.params[name]), name
    held = npgpt.fit(texts[:90], labels[:90], validation=(texts[90:100], labels[90:100]),
                     test=(texts[100:], labels[100:]), model="tiny", epochs=1, out=str(tmp_path / "api3"),
                     bpe_dir=bpe_dir, no_plots=True)
    run3 = tmp_path / "api3"
    assert pd.read_csv(run3 / "validation.csv")["Text"].tolist() == texts[90:100]
    assert pd.read_csv(run3 / "test.csv")["Text"].tolist() == texts[100:] and len(pd.read_csv(run3 / "train.csv")) == 90
    assert held.labels == sorted(KEYS)
    with pytest.raises(DataError, match="2 texts but 1 labels"):
        npgpt.fit(["a", "b"], ["x"], model="tiny", out=str(tmp_path / "bad"))


def test_training_says_how_many_texts_it_cut(tmp_path, bpe_dir, capsys):
    """Texts longer than the pad length (the longest training text, 2 tokens) are cut, and the run
    says so in one line; a run that cuts nothing prints no such line."""
    texts, labels = ["an apple", "by river", "an apple", "by river"], ["a", "b", "a", "b"]
    test = (["an apple by the river today", "an apple"], ["a", "a"])
    npgpt.fit(texts, labels, validation=(texts, labels), test=test, model="tiny", epochs=1, batch_size=2,
              out=str(tmp_path / "cut"), bpe_dir=bpe_dir, no_plots=True, verbose=True)
    assert "\ncut 1 of 2 test texts to 2 tokens (--max-length sets the length)\n" in capsys.readouterr().out
    npgpt.fit(texts, labels, validation=(texts, labels), test=(texts, labels), model="tiny", epochs=1,
              batch_size=2, out=str(tmp_path / "none"), bpe_dir=bpe_dir, no_plots=True, verbose=True)
    assert "texts to" not in capsys.readouterr().out


def test_classify_prints_names_top_and_json(tmp_path, bpe_dir, capsys):
    from npgpt.cli import classify
    data = write_csv(tmp_path / "d.csv", token_identity_rows(80, seed=1))
    run = train_cli(tmp_path, data, "run", "--epochs", "1", bpe_dir=bpe_dir)
    model = str(run / "classifier.h5")
    capsys.readouterr()
    assert classify.main(["--model", model, "--bpe-dir", bpe_dir, "--json", "--top", "3", "an apple"]) == 0
    (item,) = json.loads(capsys.readouterr().out)
    assert set(item["probabilities"]) == set(KEYS)
    assert abs(sum(item["probabilities"].values()) - 1) < 1e-9
    top = item["top"]
    assert len(top) == 3 and [t["probability"] for t in top] == sorted(item["probabilities"].values(), reverse=True)[:3]
    assert top[0]["label"] == item["label"] == max(item["probabilities"], key=item["probabilities"].get)
    assert classify.main(["--model", model, "--bpe-dir", bpe_dir, "--top", "2", "an apple"]) == 0
    line = capsys.readouterr().out.strip()
    assert line.split()[0] == top[0]["label"] and line.split()[2] == top[1]["label"]
