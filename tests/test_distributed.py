"""npgpt on Dask (issue 26), on a LocalCluster of 2 worker processes x 1 thread bound to 127.0.0.1:

- a corpus of 2,000 texts in 4 Parquet files classified on the workers equals the classifier's
  predict_proba in this process, file by file, row id by row id;
- a rerun writes only the files whose output is missing;
- a worker process killed (SIGKILL) in the middle of a job: the job finishes on the others with the
  same output;
- training with the frozen prefix in shards computed on the workers (and streamed from their
  memory-mapped files) gives the parameters of the single-process run, bit for bit; a second run
  finds every shard in the cache;
- a worker with another weights file or another npgpt version is an error naming it; importing
  npgpt imports no Dask, and a missing Dask names the extra that installs it.
"""
import os
import signal
import subprocess
import sys

import cloudpickle
import numpy as np
import pandas as pd
import pytest

import npgpt
from helpers import REPO, SMALL_GPT2, SMS
from npgpt import corpus, distributed
from npgpt import params as P
from npgpt.classify import load_classifier
from npgpt.errors import DataError, NpgptError

FILES, PER_FILE = 4, 500


@pytest.fixture(scope="module")
def client():
    """A LocalCluster (2 processes x 1 thread, 127.0.0.1) whose workers import this checkout."""
    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join([str(REPO), old or ""]).rstrip(os.pathsep)
    cloudpickle.register_pickle_by_value(sys.modules[__name__])    # the workers cannot import this file
    try:
        with distributed.cluster(workers=2, log=lambda msg: None) as c:
            yield c
    finally:
        if old is None:
            del os.environ["PYTHONPATH"]
        else:
            os.environ["PYTHONPATH"] = old


@pytest.fixture(scope="module")
def model(tmp_path_factory, bpe_dir):
    """A two-class classifier with random weights (GPT-2's vocabulary, 2 layers of 8 dims)."""
    path = str(tmp_path_factory.mktemp("model") / "classifier.h5")
    meta = {"kind": "npgpt-classifier", "labels": ["ham", "spam"], "pooling": "last_token", "max_length": None}
    P.save_params(path, P.init_params(SMALL_GPT2, seed=0, num_classes=2), SMALL_GPT2, meta=meta)
    return corpus.model_ref(path, bpe_dir)


@pytest.fixture(scope="module")
def texts(tmp_path_factory, shared_data):
    """FILES Parquet files of PER_FILE SMS texts each -> their paths."""
    folder = tmp_path_factory.mktemp("texts")
    lines = (shared_data / SMS).read_text(encoding="utf-8").splitlines()[:FILES * PER_FILE]
    bodies = [line.split("\t", 1)[1] for line in lines]
    paths = []
    for k in range(FILES):
        path = str(folder / f"part{k}.parquet")
        pd.DataFrame({"text": bodies[k * PER_FILE:(k + 1) * PER_FILE]}).to_parquet(path, index=False)
        paths.append(path)
    return paths


def expected(model, files):
    """Each file's predictions computed in this process by predict_proba: [N,K] per file."""
    clf = load_classifier(model.path, model.bpe_dir, model.batch_size)
    return [clf.predict_proba(pd.read_parquet(f)["text"].tolist()) for f in files]


def check_outputs(out_dir, files, want):
    for f, P_want in zip(files, want):
        got = pd.read_parquet(os.path.join(out_dir, os.path.basename(f)))
        assert list(got.columns) == ["row", "label", "p_ham", "p_spam"]
        assert got["row"].tolist() == list(range(1, PER_FILE + 1))
        np.testing.assert_array_equal(got[["p_ham", "p_spam"]].to_numpy(), P_want.astype(np.float64))
        assert got["label"].tolist() == [["ham", "spam"][k] for k in P_want.argmax(axis=1)]


def test_corpus_equals_predict_proba_and_a_rerun_skips_finished_files(client, model, texts, tmp_path):
    out = str(tmp_path / "preds")
    done = corpus.classify_files(client, texts, model, out, "text", progress=False, log=lambda msg: None)
    assert done["written"] == FILES and done["texts"] == FILES * PER_FILE and done["skipped"] == 0
    check_outputs(out, texts, expected(model, texts))

    kept = {f: os.stat(os.path.join(out, f)).st_mtime_ns for f in sorted(os.listdir(out))}
    os.remove(os.path.join(out, "part2.parquet"))          # as if the job had stopped before it
    said = []
    done = corpus.classify_files(client, texts, model, out, "text", progress=False, log=said.append)
    assert (done["written"], done["skipped"]) == (1, FILES - 1)
    assert said == [f"{FILES - 1} of {FILES} files already have their predictions in {out}: skipped"]
    for name, mtime in kept.items():
        if name != "part2.parquet":
            assert os.stat(os.path.join(out, name)).st_mtime_ns == mtime
    check_outputs(out, texts, expected(model, texts))


def test_files_cut_in_pieces_equal_predict_proba_and_another_job_s_folder_is_refused(client, model, texts, tmp_path):
    """--partition-rows: each file in pieces of that many rows, row ids kept (a CSV's quoted
    record over two lines included); the folder reads back as one table; a rerun into it with
    another piece size or another model is an error naming the flag."""
    csv = tmp_path / "notes.csv"
    rows = [f"note {i}" if i != 7 else "two\nlines" for i in range(50)]
    pd.DataFrame({"text": rows}).to_csv(csv, index=False)
    files = texts[:2] + [str(csv)]
    out = str(tmp_path / "preds")
    done = corpus.classify_files(client, files, model, out, "text", progress=False, log=lambda msg: None,
                                 partition_rows=300)
    assert done["written"] == 5 and done["texts"] == 2 * PER_FILE + 50
    assert sorted(os.listdir(out)) == ["_npgpt_job.json", "notes.parquet", "part0-00000.parquet",
                                       "part0-00001.parquet", "part1-00000.parquet", "part1-00001.parquet"]
    for f, want in zip(texts[:2], expected(model, texts[:2])):
        stem = os.path.join(out, os.path.splitext(os.path.basename(f))[0])
        first, second = (pd.read_parquet(f"{stem}-{k:05d}.parquet") for k in (0, 1))
        got = pd.concat([first, second])
        assert len(first) == 300 and got["row"].tolist() == list(range(1, PER_FILE + 1))
        np.testing.assert_array_equal(got[["p_ham", "p_spam"]].to_numpy(), want.astype(np.float64))
    assert len(pd.read_parquet(out)) == 2 * PER_FILE + 50                      # the job's record is skipped

    cut = str(tmp_path / "cut")
    corpus.classify_files(client, [str(csv)], model, cut, "text", progress=False, log=lambda msg: None,
                          partition_rows=20)
    got = pd.concat([pd.read_parquet(os.path.join(cut, f"notes-{k:05d}.parquet")) for k in range(3)])
    clf = load_classifier(model.path, model.bpe_dir)
    assert got["line"].tolist() == [2 + i + (i > 7) for i in range(50)]       # the line each row starts on
    np.testing.assert_array_equal(got[["p_ham", "p_spam"]].to_numpy(), clf.predict_proba(rows).astype(np.float64))

    for ref, rows_, says in ((model, 200, "--partition-rows was 300"),
                             (corpus.ModelRef(model.path, "0" * 64, model.bpe_dir), 300,
                              f"--model was a model with sha256 {model.sha256[:12]}")):
        with pytest.raises(DataError, match=says):
            corpus.classify_files(client, files, ref, out, "text", progress=False, log=lambda msg: None,
                                  partition_rows=rows_)


def _install_killer(marker):
    """On a worker: the next partition it predicts kills its process (SIGKILL), once per marker."""
    real = corpus.predict_partition

    def killer(part, ref, text_column="text"):
        if not os.path.exists(marker):
            open(marker, "w").close()
            os.kill(os.getpid(), signal.SIGKILL)
        return real(part, ref, text_column)
    killer.__wrapped__ = real
    corpus.predict_partition = killer


def _remove_killer():
    corpus.predict_partition = getattr(corpus.predict_partition, "__wrapped__", corpus.predict_partition)


def test_a_worker_killed_mid_job_leaves_the_job_to_finish_with_the_same_output(client, model, texts, tmp_path):
    marker = str(tmp_path / "killed")
    pids = set(client.run(os.getpid).values())
    client.run(_install_killer, marker)
    try:
        out = str(tmp_path / "preds")
        done = corpus.classify_files(client, texts, model, out, "text", progress=False, log=lambda msg: None)
    finally:
        client.run(_remove_killer)
    assert os.path.exists(marker)                          # a worker was killed during the job
    assert set(client.run(os.getpid).values()) != pids     # (and replaced by its nanny)
    assert done["written"] == FILES
    check_outputs(out, texts, expected(model, texts))


def test_the_prefix_on_workers_trains_the_same_parameters_bit_for_bit(client, tmp_path, bpe_dir):
    from npgpt.runconfig import RunConfig, RunOptions
    from npgpt.train import train_run
    data = str(tmp_path / "tickets.csv")            # 20 tickets of each class: a few steps
    tickets = pd.read_csv(REPO / "examples" / "support_tickets.csv")
    tickets.groupby("label").head(20).to_csv(data, index=False)
    run = RunConfig(model="tiny", data=data, bpe_dir=bpe_dir, epochs=1, batch_size=8)
    quiet = lambda msg: None
    single = train_run(run, RunOptions(out=str(tmp_path / "a"), cache_dir=str(tmp_path / "cache-a"),
                                       progress=False, plots=False), log=quiet)
    said = []
    options = RunOptions(out=str(tmp_path / "b"), cache_dir=str(tmp_path / "cache-b"), progress=False,
                         plots=False, scheduler=client.scheduler.address, shard_tokens=500, cache_memory="1K")
    sharded = train_run(run, options, log=said.append)
    shards = [line for line in said if line.startswith("frozen prefix in")]
    n = int(shards[0].split()[3])
    assert n > 2 and shards[0].endswith(f"tokens: 0 in the cache {tmp_path / 'cache-b'}, {n} to compute")
    assert any(line.endswith("its shards are memory-mapped, streamed from disk") for line in said)  # (1K)
    a, b = P.load_params(single.classifier_path)[0], P.load_params(sharded.classifier_path)[0]
    assert sorted(a) == sorted(b)
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)

    said.clear()                                           # again: every shard read from the cache
    train_run(run, RunOptions(out=str(tmp_path / "c"), cache_dir=str(tmp_path / "cache-b"), progress=False,
                              plots=False, workers=2, shard_tokens=500), log=said.append)
    assert f"frozen prefix in {n} shards of about 500 tokens: {n} in the cache {tmp_path / 'cache-b'}, 0 to compute" \
        in said
    assert not any(line.startswith("dask:") for line in said)      # no cluster started for nothing


def test_the_prefix_on_workers_trains_a_124m_shaped_model_to_the_same_bits(client, tmp_path, bpe_dir):
    """The real shapes (12 blocks of 768, random weights from the seed on every worker) on 16
    tickets: the sharded prefix trains the same parameters as one process."""
    from npgpt.runconfig import RunConfig, RunOptions
    from npgpt.train import train_run
    data = str(tmp_path / "tickets.csv")
    pd.read_csv(REPO / "examples" / "support_tickets.csv").groupby("label").head(4).to_csv(data, index=False)
    run = RunConfig(model="124M", random_init=True, data=data, bpe_dir=bpe_dir, epochs=1, batch_size=4,
                    eval_freq=1000, split=(0.5, 0.25))
    quiet = lambda msg: None
    base = dict(progress=False, plots=False)
    single = train_run(run, RunOptions(out=str(tmp_path / "a"), cache_dir=str(tmp_path / "cache-a"), **base),
                       log=quiet)
    said = []
    sharded = train_run(run, RunOptions(out=str(tmp_path / "b"), cache_dir=str(tmp_path / "cache-b"),
                                        scheduler=client.scheduler.address, shard_tokens=60, **base),
                        log=said.append)
    shards = [line for line in said if line.startswith("frozen prefix in")]
    assert int(shards[0].split()[3]) > 2, shards                      # computed in several shards
    a, b = P.load_params(single.classifier_path)[0], P.load_params(sharded.classifier_path)[0]
    assert sorted(a) == sorted(b) and a["h11/attn/c_attn/w"].shape == (768, 2304)
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def _kernel_cache_stats():
    """On a worker: (cache hits, cache misses) of npgpt's kernels (a miss: compiled in this process)."""
    from numba.core.registry import CPUDispatcher
    from npgpt import kernels
    stats = [k.stats for k in vars(kernels).values() if isinstance(k, CPUDispatcher) and k.overloads]
    return sum(sum(s.cache_hits.values()) for s in stats), sum(sum(s.cache_misses.values()) for s in stats)


def test_workers_run_the_kernels_from_numba_s_cache_even_when_it_is_cold(model, texts, tmp_path):
    """A worker whose machine has no compiled kernels yet (an empty NUMBA_CACHE_DIR) has them
    compiled apart and loads them, as every npgpt run does: none compiled in the worker itself."""
    saved = {k: os.environ.get(k) for k in ("PYTHONPATH", "NUMBA_CACHE_DIR")}
    os.environ["PYTHONPATH"] = os.pathsep.join([str(REPO), saved["PYTHONPATH"] or ""]).rstrip(os.pathsep)
    os.environ["NUMBA_CACHE_DIR"] = str(tmp_path / "numba-cache")
    try:
        with distributed.cluster(workers=1, log=lambda msg: None) as cold:
            part = corpus.read_partition(corpus.Piece(texts[0], 0, 50, ""), "text")
            got = cold.submit(corpus.predict_partition, part, model, "text").result()
            (hits, misses), = cold.run(_kernel_cache_stats).values()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    assert len(got) == 50 and hits > 0 and misses == 0, (hits, misses)
    assert os.listdir(tmp_path / "numba-cache")                    # compiled apart, into that cache


def test_a_worker_with_another_weights_file_is_named(client, tmp_path):
    from npgpt.config import init_params, preset
    path = tmp_path / "gpt2-tiny.h5"
    P.save_params(str(path), init_params(preset("tiny"), seed=0), preset("tiny"))
    from npgpt.runconfig import RunConfig
    recipe = distributed.recipe_of(RunConfig(model="124M", weights=str(path)), 2)
    with open(path, "ab") as fh:                           # the file changes after the trainer hashed it
        fh.write(b"\0")
    with pytest.raises(NpgptError, match=rf"Dask worker tcp://127\.0\.0\.1:\d+: the weights file {path} differs "
                                         r"from the trainer's \(sha256 [0-9a-f]{12}, the trainer's [0-9a-f]{12}\)"):
        client.submit(distributed.worker_model, recipe, pure=False).result()


def test_a_worker_with_another_npgpt_version_is_named():
    class Client:
        def run(self, fn):
            return {"tcp://10.0.0.1:4000": npgpt.__version__, "tcp://10.0.0.2:4000": "0.0.9"}
    with pytest.raises(NpgptError, match=r"^Dask worker tcp://10\.0\.0\.2:4000 runs npgpt 0\.0\.9, this process "):
        distributed.check_versions(Client())


def test_importing_npgpt_imports_no_dask_and_a_missing_dask_names_the_extra():
    code = ("import sys, npgpt, npgpt.train, npgpt.classify, npgpt.corpus, npgpt.distributed, npgpt.cli.classify; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('dask', 'distributed')))")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    assert subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          check=True).stdout.strip() == "[]"
    code = ("import sys; sys.modules['distributed'] = None\n"
            "from npgpt.distributed import require_dask\n"
            "try:\n    require_dask()\nexcept Exception as e:\n    print(type(e).__name__, e)")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.strip() == ('NpgptError --scheduler and --workers need Dask (distributed is missing or broken): '
                           'pip install -e ".[dask]"')


def test_the_classify_command_on_a_cluster(client, model, texts, tmp_path, capsys):
    from npgpt.cli import classify as cli
    out = str(tmp_path / "preds")
    pattern = os.path.join(os.path.dirname(texts[0]), "part[01].parquet")
    assert cli.main(["--model", model.path, "--bpe-dir", model.bpe_dir, "--file", pattern, "--text-column", "text",
                     "--out", out, "--scheduler", client.scheduler.address, "--quiet"]) == 0
    err = capsys.readouterr().err
    assert f"wrote predictions for {2 * PER_FILE} texts in 2 files to {out} (0 files already there)" in err
    assert sorted(os.listdir(out)) == ["_npgpt_job.json", "part0.parquet", "part1.parquet"]
    check_outputs(out, texts[:2], expected(model, texts[:2]))
    for argv, message in ((["--out", out + ".parquet"], "--out is a folder"), ([], "need --file PATTERN"),
                          (["--out", out, "--json"], "--json and --top print per text")):
        with pytest.raises(SystemExit) as stop:
            cli.main(["--model", model.path, "--workers", "2"] + (["--file", pattern] if argv else []) + argv)
        assert stop.value.code == 2 and message in capsys.readouterr().err
    with pytest.raises(SystemExit) as stop:                   # pieces are for a cluster
        cli.main(["--model", model.path, "--file", texts[0], "--partition-rows", "100"])
    assert stop.value.code == 2 and "--partition-rows cuts files for a cluster" in capsys.readouterr().err
