"""The server: the batcher without HTTP, the API through Starlette's TestClient, a real uvicorn
process stopped by SIGTERM, and the page in a real browser (Debian's Chromium, Playwright).

- The batcher: requests submitted from many threads share packed passes, and each gets exactly
  (bit for bit) `Classifier.predict_proba` on its texts alone; --max-batch-tokens 0 runs one pass
  per request; a full queue is refused; close() answers what is queued.
- The API: the shape of /v1/classify (Hugging Face's pipeline: {"label", "score"} by score),
  /v1/explain equal to npgpt.explain, /v1/info; every bad input answered with its status code and
  a one-key {"error": ...} naming the limit, the server answering normally afterwards.
- SIGTERM: requests queued when it arrives are answered, the process exits 0.
- The page: types a text, presses the button, reads the bars and the shaded tokens, checks them
  against the API, saves a screenshot into tmp_path.

The model is a tiny random GPT-2 with a random 3-class head: serving does not care whether it
learned, and building it takes no training. Servers bind 127.0.0.1 only; every wait is bounded.
"""
import json
import os
import re
import signal
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx2 as httpx
import numpy as np
import pytest
from starlette.testclient import TestClient

from helpers import REPO
from npgpt.batcher import Batcher, QueueFull, Timing
from npgpt.classify import Classifier
from npgpt.config import preset
from npgpt.explain import explain
from npgpt.http_api import Limits, make_app
from npgpt.params import init_params

WAIT = 60            # seconds: the bound of every wait (never a timed assertion)
TEXTS = ["You are a winner! Claim your prize now", "ok see you at 6", "I was billed twice this month",
         "where is my parcel?", "hi", "Call 09061701461 to claim your £900 prize, valid 12 hrs only",
         "Are you coming to dinner tonight or not?", "my password does not work 😕"]
LABELS = ["billing", "delivery", "spam"]
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--disable-quic"]


@pytest.fixture(scope="module")
def clf(tok, bpe_dir):
    cfg = preset("tiny")
    params = init_params(cfg, seed=7, num_classes=len(LABELS))
    params["cls/w"] *= 50                      # a random head that still tells the classes apart
    return Classifier(params=params, config=cfg, labels=LABELS, pooling="last_token", max_length=None, tok=tok,
                      bpe_dir=bpe_dir, meta={"model_size": "tiny"})


@pytest.fixture(scope="module")
def model_file(clf, tmp_path_factory):
    return clf.save(tmp_path_factory.mktemp("model") / "classifier.h5")


def _client(clf, limits=None, batcher=None, cors=None):
    return TestClient(make_app(clf, limits or Limits(), batcher or Batcher(clf, max_wait_ms=1), cors_origin=cors))


# ----------------------------------------------------------------------------- the batcher alone

def test_concurrent_requests_share_passes_and_each_gets_its_own_answer_bit_for_bit(clf):
    """A request of two or more texts gets predict_proba's bits exactly. A request of one text gets
    the bits predict_proba gives that text beside any other: alone, the pooled rows are one row,
    and NumPy sends a one-row product to BLAS gemv, whose sums run in another order than gemm's
    (a float32 ulp or so, under 1e-6 in probability; docs/serving.md)."""
    requests = [TEXTS[i:i + 2 + i % 2] for i in range(6)] + [[t] for t in TEXTS[:6]]
    batcher = Batcher(clf, max_wait_ms=WAIT * 1000)          # waits until the budget fills or close()
    running, gate = threading.Event(), threading.Event()
    batcher.call(lambda: running.set() or gate.wait(WAIT))   # the worker is busy while they arrive
    assert running.wait(WAIT)
    start = threading.Barrier(len(requests))

    def one(texts):
        start.wait(WAIT)
        return batcher.submit(clf.encode(texts)[0])

    with ThreadPoolExecutor(len(requests)) as pool:
        futures = list(pool.map(one, requests))
    gate.set()
    batcher.close(WAIT)                                       # no more waiting: run what is queued
    assert batcher.batches == 1                               # all twelve in one packed pass
    for texts, future in zip(requests, futures):
        got = future.result(WAIT)                                                  # [n,K]
        assert np.array_equal(got, clf.predict_proba(texts)), texts


def test_no_batching_runs_one_pass_per_request_and_the_budget_splits_passes(clf):
    off = Batcher(clf, max_batch_tokens=0)
    got = [off.submit(clf.encode([t])[0]).result(WAIT) for t in TEXTS[:3]]
    off.close(WAIT)
    assert off.batches == 3 and all(np.array_equal(g, clf.predict_proba([t])) for g, t in zip(got, TEXTS))
    small = Batcher(clf, max_batch_tokens=12, max_wait_ms=WAIT * 1000)
    n = [len(t) for t in clf.encode(TEXTS[:4])[0]]             # 9, 5, 6, 5 tokens: {9}, {5, 6}, {5}
    assert n == [9, 5, 6, 5]
    futures = [small.submit(clf.encode([t])[0]) for t in TEXTS[:4]]
    small.close(WAIT)
    assert small.batches == 3 and all(f.done() for f in futures)


def test_a_model_that_does_not_run_packed_runs_each_request_alone(clf):
    """Mean pooling runs in padded batches, whose numbers depend on the batch: no sharing."""
    from dataclasses import replace
    mean = replace(clf, pooling="mean")
    assert not mean.packs
    batcher = Batcher(mean, max_wait_ms=WAIT * 1000)
    requests = [TEXTS[:2], TEXTS[2:3], TEXTS[3:6]]
    futures = [batcher.submit(mean.encode(texts)[0]) for texts in requests]
    batcher.close(WAIT)
    assert batcher.batches == 3
    assert all(np.array_equal(f.result(WAIT), mean.predict_proba(t)) for f, t in zip(futures, requests))


def test_a_full_queue_is_refused_and_close_answers_what_is_queued(clf):
    batcher = Batcher(clf, max_queue=2)
    running, gate = threading.Event(), threading.Event()
    blocked = batcher.call(lambda: running.set() or gate.wait(WAIT))   # the worker is busy until the gate opens
    assert running.wait(WAIT)
    queued = [batcher.submit(clf.encode([t])[0]) for t in TEXTS[:2]]
    with pytest.raises(QueueFull, match="--max-queue"):
        batcher.submit(clf.encode(["one more"])[0])
    gate.set()
    batcher.close(WAIT)
    assert blocked.result(WAIT) is True
    assert all(np.array_equal(f.result(WAIT), clf.predict_proba([t])) for f, t in zip(queued, TEXTS))


class Held:
    """A classifier whose passes wait while `gate` is closed (open at first)."""

    def __init__(self, clf):
        self.clf, self.gate, self.running = clf, threading.Event(), threading.Event()
        self.gate.set()

    def __getattr__(self, name):
        return getattr(self.clf, name)

    def logits_of_tokens(self, tokens):
        self.running.set()
        assert self.gate.wait(WAIT)
        return self.clf.logits_of_tokens(tokens)


def test_a_lone_client_does_not_wait_and_company_brings_the_wait_back(clf):
    """Company is assumed until a pass shows a lone client; then the wait is skipped (10 minutes
    here: the test would time out); a request that arrives while a pass runs means company: the
    next pass waits, counted from the end of that pass (4 s here), so a request sent just after
    it ended joins it."""
    alone = Batcher(clf, max_wait_ms=50)
    assert np.array_equal(alone.submit(clf.encode([TEXTS[0]])[0]).result(WAIT), clf.predict_proba([TEXTS[0]]))
    alone.max_wait = 10 * WAIT                                # from now on a wait would time the test out
    for t in TEXTS[1:4]:                                      # one at a time: each runs at once
        assert np.array_equal(alone.submit(clf.encode([t])[0]).result(WAIT), clf.predict_proba([t]))
    assert alone.batches == 4
    alone.close(WAIT)

    held = Held(clf)
    batcher = Batcher(held, max_wait_ms=50)
    batcher.submit(clf.encode([TEXTS[0]])[0]).result(WAIT)    # a lone client so far
    batcher.max_wait = 4.0
    held.gate.clear()
    held.running.clear()
    first = batcher.submit(clf.encode([TEXTS[1]])[0])         # runs at once, and its pass is held...
    assert held.running.wait(WAIT)
    during = batcher.submit(clf.encode([TEXTS[3]])[0])        # ...while a request arrives,
    threading.Event().wait(4.5)                               # more than the wait before the pass ends
    held.gate.set()
    first.result(WAIT)
    threading.Event().wait(0.2)
    assert not during.done()                                  # it waits for company, which comes:
    after = batcher.submit(clf.encode([TEXTS[4]])[0])
    batcher.close(WAIT)
    assert batcher.batches == 3                               # the two shared one pass
    for future, t in ((during, TEXTS[3]), (after, TEXTS[4])):
        assert np.array_equal(future.result(WAIT), clf.predict_proba([t]))


def test_arrivals_stretch_the_wait_up_to_its_cap(clf):
    """Requests that keep arriving, each within max_wait of the one before, join one pass even
    when the last comes after max_wait (1 s here; they come every 0.3 s); a stream that never
    pauses is cut at WAIT_STRETCH max_wait (0.1 s: 1 s here, a request every 0.05 s for 2 s)."""
    from npgpt.batcher import WAIT_STRETCH
    batcher = Batcher(clf, max_wait_ms=1000)
    futures = []
    for t in TEXTS[:5]:
        futures.append(batcher.submit(clf.encode([t])[0]))
        threading.Event().wait(0.3)
    assert all(np.array_equal(f.result(WAIT), clf.predict_proba([t])) for f, t in zip(futures, TEXTS))
    assert batcher.batches == 1
    batcher.close(WAIT)
    assert WAIT_STRETCH * 0.1 < 2
    stream = Batcher(clf, max_wait_ms=100)
    futures = []
    for i in range(40):
        futures.append(stream.submit(clf.encode([TEXTS[i % len(TEXTS)]])[0]))
        threading.Event().wait(0.05)
    assert all(f.result(WAIT) is not None for f in futures)
    stream.close(WAIT)
    assert stream.batches >= 2


def test_the_timing_of_requests_that_share_a_pass(clf):
    """Each request's Timing: submitted, then its pass's start and end (shared by the pass), the
    pass's texts and tokens; a request held behind other work has waited at least that long."""
    batcher = Batcher(clf, max_wait_ms=WAIT * 1000)
    running, gate = threading.Event(), threading.Event()
    batcher.call(lambda: running.set() or gate.wait(WAIT))             # the worker is busy
    assert running.wait(WAIT)
    timings = [Timing(), Timing()]
    futures = [batcher.submit(clf.encode(texts)[0], t) for texts, t in zip((TEXTS[:2], TEXTS[2:3]), timings)]
    held = threading.Event()
    held.wait(0.05)
    gate.set()
    batcher.close(WAIT)
    assert all(f.done() for f in futures) and batcher.batches == 1
    a, b = timings
    tokens = sum(map(len, clf.encode(TEXTS[:3])[0]))
    assert (a.started, a.finished, a.texts, a.tokens) == (b.started, b.finished, 3, tokens)
    assert a.submitted <= b.submitted and b.submitted + 0.05 <= a.started <= a.finished


def test_classify_says_where_its_time_went_in_tei_s_headers_and_server_timing(clf):
    """x-total/tokenization/queue/inference-time in whole ms, x-compute-tokens, Server-Timing."""
    batcher = Batcher(clf, max_wait_ms=1)
    running, gate = threading.Event(), threading.Event()
    with _client(clf, batcher=batcher) as c:
        batcher.call(lambda: running.set() or gate.wait(WAIT))         # the request waits behind this
        assert running.wait(WAIT)
        with ThreadPoolExecutor(1) as pool:
            answer = pool.submit(c.post, "/v1/classify", json={"inputs": TEXTS[5]})
            while batcher.pending < 2 and not answer.done():           # the request is queued...
                threading.Event().wait(0.01)
            threading.Event().wait(0.2)                                 # ...and waits at least 0.2 s
            gate.set()
            r = answer.result(WAIT)
    assert r.status_code == 200
    ms = {k: int(r.headers[f"x-{k}-time"]) for k in ("total", "tokenization", "queue", "inference")}
    assert ms["queue"] >= 200 - 1 and ms["total"] >= ms["queue"] + ms["inference"] + ms["tokenization"] - 2, ms
    assert int(r.headers["x-compute-tokens"]) == len(clf.encode([TEXTS[5]])[0][0])
    parts = r.headers["server-timing"].split(",")
    timing = dict(re.match(r"(\w+);dur=([\d.]+)", part.strip()).groups() for part in parts)
    assert set(timing) == {"tokenization", "queue", "inference", "total"}
    assert all(0 <= float(timing[k]) - ms[k] < 1.01 for k in ms), (timing, ms)      # whole ms: cut down
    assert 'desc="1 text in the pass"' in r.headers["server-timing"]


# ----------------------------------------------------------------------------- the API

def test_classify_answers_in_the_pipeline_shape_with_predict_proba_s_numbers(clf):
    with _client(clf) as c:
        one = c.post("/v1/classify", json={"inputs": TEXTS[0]}).json()
        many = c.post("/v1/classify", json={"inputs": TEXTS[:3], "top_k": 2}).json()
        info = c.get("/v1/info").json()
    P = clf.predict_proba(TEXTS[:3])                                               # [3,K]
    assert [d["label"] for d in one] == [LABELS[k] for k in np.argsort(-P[0])]
    assert [d["score"] for d in one] == sorted(P[0].tolist(), reverse=True)
    assert len(many) == 3 and all(len(ranked) == 2 for ranked in many)
    assert [[d["score"] for d in r] for r in many] == np.sort(P, axis=1)[:, ::-1][:, :2].tolist()
    assert info["labels"] == LABELS and info["context_length"] == 256 and info["pooling"] == "last_token"
    assert info["batching"]["on"] and "api_key" not in info["limits"]


def test_explain_route_is_npgpt_explain(clf):
    with _client(clf) as c:
        got = c.post("/v1/explain", json={"inputs": TEXTS[2], "label": "spam"}).json()
        default = c.post("/v1/explain", json={"inputs": TEXTS[2]}).json()
    assert got == json.loads(json.dumps(explain(clf, TEXTS[2], "spam").to_dict()))
    assert default["label"] == clf.predict([TEXTS[2]])[0] and [t["token"] for t in got["tokens"]][:2] == ["I", " was"]


LONG = "word " * 300                   # 301 tokens: over the tiny model's 256


@pytest.mark.parametrize("route, body, status, says", [
    ("/v1/classify", b"{not json", 422, "not valid JSON"),
    ("/v1/classify", b"[1, 2]", 422, "JSON object"),
    ("/v1/classify", {"text": "hi"}, 422, "unknown key 'text'"),
    ("/v1/classify", {"inputs": 5}, 422, "not int"),
    ("/v1/classify", {"inputs": []}, 422, "empty list"),
    ("/v1/classify", {"inputs": ["fine", ""]}, 422, "text 2 of 2 is empty"),
    ("/v1/classify", {"inputs": ["fine", None]}, 422, "text 2 of 2 is not a string"),
    ("/v1/classify", {"inputs": "hi", "top_k": 0}, 422, "top_k"),
    ("/v1/classify", {"inputs": ["hi"] * 5}, 413, "--max-texts"),
    ("/v1/classify", {"inputs": "x" * 3000}, 413, "--max-body"),
    ("/v1/classify", {"inputs": LONG}, 422, "--truncate"),
    ("/v1/explain", {"inputs": ["hi"]}, 422, "one text"),
    ("/v1/explain", {"inputs": "hi", "label": "ham"}, 422, "label 'ham' is not one of the model's labels"),
    ("/v1/explain", {"inputs": LONG}, 422, "--truncate"),
    ("/v1/nothing", {"inputs": "hi"}, 404, "no route"),
])
def test_bad_input_gets_its_status_and_one_error_naming_the_fix_and_the_server_goes_on(clf, route, body, status, says):
    with _client(clf, Limits(max_texts=4, max_body=2000)) as c:
        r = c.post(route, content=body) if isinstance(body, bytes) else c.post(route, json=body)
        assert r.status_code == status and list(r.json()) == ["error"] and says in r.json()["error"], r.text
        assert c.post("/v1/classify", json={"inputs": "still here"}).status_code == 200


def test_truncate_cuts_and_says_so(clf):
    with _client(clf, Limits(truncate=True)) as c:
        r = c.post("/v1/explain", json={"inputs": LONG})
        ranked = c.post("/v1/classify", json={"inputs": ["hi", LONG]})
    assert r.status_code == 200 and len(r.json()["tokens"]) == 256
    assert r.json()["truncated"] == len(clf.tok.encode(LONG)) - 256 > 0
    assert ranked.status_code == 200 and ranked.headers["x-truncated-texts"] == "1"
    assert ranked.json()[1][0]["score"] == clf.predict_proba([LONG]).max()


def test_a_failure_inside_is_a_json_500_and_the_server_goes_on(clf):
    class Broken:                       # a model that fails on one text
        labels, packs = clf.labels, False

        def logits_of_tokens(self, tokens):
            if len(tokens[0]) == 1:
                raise FloatingPointError("boom")
            return clf.logits_of_tokens(tokens)
    with TestClient(make_app(clf, Limits(), Batcher(Broken(), max_batch_tokens=0)), raise_server_exceptions=False) as c:
        r = c.post("/v1/classify", json={"inputs": "hi"})
        assert r.status_code == 500 and r.json() == {"error": "internal error (FloatingPointError); the server's "
                                                              "log has the traceback"}
        assert c.post("/v1/classify", json={"inputs": "hi there"}).status_code == 200


def test_a_full_queue_answers_429_with_retry_after(clf):
    batcher = Batcher(clf, max_queue=1)
    running, gate = threading.Event(), threading.Event()
    batcher.call(lambda: running.set() or gate.wait(WAIT))     # the worker is busy...
    assert running.wait(WAIT)
    batcher.call(lambda: None)                                 # ...and the one queue place taken
    with _client(clf, batcher=batcher) as c:
        r = c.post("/v1/classify", json={"inputs": "hi"})
        gate.set()
    assert r.status_code == 429 and r.headers["retry-after"] == "1" and "--max-queue" in r.json()["error"]


def test_api_key_and_cors(clf):
    with _client(clf, Limits(api_key="s3cret"), cors="http://example.test") as c:
        assert c.post("/v1/classify", json={"inputs": "hi"}).status_code == 401
        wrong = c.get("/v1/info", headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401 and "--api-key" in wrong.json()["error"]
        ok = c.get("/v1/info", headers={"Authorization": "Bearer s3cret", "Origin": "http://example.test"})
        assert ok.status_code == 200 and ok.headers["access-control-allow-origin"] == "http://example.test"
        assert c.get("/health").status_code == 200 and "<textarea" in c.get("/").text   # not API routes
    with _client(clf) as c:
        assert "access-control-allow-origin" not in c.get("/v1/info", headers={"Origin": "http://example.test"}).headers


# ----------------------------------------------------------------------------- a real server

def _start(model_file, bpe_dir, tmp_path, *flags):
    """`python -m npgpt.serve` on 127.0.0.1, a free port -> (process, base URL)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.Popen([sys.executable, "-m", "npgpt.serve", "--model", str(model_file), "--bpe-dir", bpe_dir,
                             "--host", "127.0.0.1", "--port", "0", *flags], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()                               # "serving ... on http://127.0.0.1:PORT/ ..."
    found = re.search(r"http://127\.0\.0\.1:\d+", line)
    assert found, (line, proc.poll())
    url = found.group(0)
    for _ in range(WAIT * 10):                                  # until /health answers (bounded)
        try:
            if httpx.get(url + "/health", timeout=WAIT).status_code == 200:
                return proc, url
        except httpx.TransportError:
            threading.Event().wait(0.1)
    proc.kill()
    raise AssertionError("the server did not answer /health")


def _stop(proc):
    if proc.poll() is None:
        proc.kill()
    proc.communicate(timeout=WAIT)


def test_sigterm_answers_the_queued_requests_and_exits_0(clf, model_file, bpe_dir, tmp_path):
    proc, url = _start(model_file, bpe_dir, tmp_path, "--max-wait-ms", str(WAIT * 1000))   # requests wait
    try:
        with ThreadPoolExecutor(3) as pool:
            answers = [pool.submit(httpx.post, url + "/v1/classify", json={"inputs": t}, timeout=WAIT)
                       for t in TEXTS[:3]]
            for _ in range(WAIT * 10):               # all three wait for company (assumed at first)
                queued = httpx.get(url + "/health", timeout=WAIT).json()["queued"]
                if queued == 3:
                    break
                threading.Event().wait(0.1)
            proc.send_signal(signal.SIGTERM)
            got = [a.result(WAIT) for a in answers]
        out, err = proc.communicate(timeout=WAIT)
    finally:
        _stop(proc)
    assert queued == 3 and proc.returncode == 0, (queued, err)
    assert "every queued request was answered" in out
    for t, r in zip(TEXTS, got):
        assert r.status_code == 200 and r.json()[0]["score"] == clf.predict_proba([t]).max()


def test_the_page_in_a_browser_shows_the_api_s_bars_and_shaded_tokens(model_file, bpe_dir, tmp_path):
    from playwright.sync_api import sync_playwright
    proc, url = _start(model_file, bpe_dir, tmp_path)
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS, timeout=WAIT * 1000)
            page = browser.new_page()
            page.set_default_timeout(WAIT * 1000)
            page.goto(url + "/")
            page.wait_for_function("document.getElementById('settings').textContent.includes('labels:')")
            page.fill("#text", TEXTS[0])
            page.click("#go")
            page.wait_for_selector("body[data-done='yes']")
            bars = page.eval_on_selector_all(".bar-row", "rows => rows.map(r => [r.dataset.label, +r.dataset.score,"
                                                         " r.querySelector('.bar-fill').style.width])")
            tokens = page.eval_on_selector_all(".tok", "s => s.map(t => [t.textContent, +t.dataset.score,"
                                                       " t.style.backgroundColor])")
            settings = page.text_content("#settings")
            page.screenshot(path=str(tmp_path / "page.png"), full_page=True)
            browser.close()
        ranked = httpx.post(url + "/v1/classify", json={"inputs": TEXTS[0]}, timeout=WAIT).json()
        explained = httpx.post(url + "/v1/explain", json={"inputs": TEXTS[0]}, timeout=WAIT).json()
    finally:
        _stop(proc)
    assert [(label, score) for label, score, _ in bars] == [(d["label"], d["score"]) for d in ranked]
    assert [float(w.rstrip("%")) for *_, w in bars] == [round(100 * d["score"], 1) for d in ranked]
    assert [(t, s) for t, s, _ in tokens] == [(d["token"], d["score"]) for d in explained["tokens"]]
    top = max(abs(d["score"]) for d in explained["tokens"])
    for (_, s, color), d in zip(tokens, explained["tokens"]):    # red towards the label, blue away
        rgba = [float(v) for v in re.findall(r"[\d.]+", color)] + [1.0]     # rgb(...) when opaque
        assert rgba[:3] == ([220, 40, 40] if s >= 0 else [40, 90, 220])
        assert abs(rgba[3] - (abs(s) / top) ** 0.5) <= 0.005                # sqrt of its share; 2 digits kept
    assert "billing, delivery, spam" in settings and "last_token" in settings
    assert (tmp_path / "page.png").stat().st_size > 1000


def test_the_core_install_does_not_need_the_extra_and_its_absence_is_one_line(model_file, tmp_path):
    """`import npgpt` (and the batcher) import no Starlette; without it `npgpt serve` says how to install it."""
    blocked = "import sys; sys.modules['starlette'] = None; sys.modules['uvicorn'] = None; "
    env = {"PYTHONPATH": str(REPO), "PATH": os.environ["PATH"], "NUMBA_CACHE_DIR": str(tmp_path / "numba")}
    r = subprocess.run([sys.executable, "-c", "import sys, npgpt, npgpt.classify, npgpt.batcher; "
                        "print(sorted({'starlette', 'uvicorn'} & set(sys.modules)))"],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=WAIT)
    assert r.stdout.strip() == "[]", r.stderr
    r = subprocess.run([sys.executable, "-c", blocked + "from npgpt.__main__ import main; main(['serve', '--model', "
                        f"{str(model_file)!r}])"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=WAIT)
    assert r.returncode == 1 and r.stderr.strip().splitlines() == [
        'error: the server needs Starlette and uvicorn, an optional extra: pip install -e ".[serve]" '
        '(or pip install "npgpt[serve]")'], r.stderr


def test_the_server_s_connections_send_without_waiting_for_acks():
    """The listening socket npgpt binds says it is TCP, so asyncio (uvicorn's transport) turns
    Nagle's algorithm off on every connection it accepts: without it, a response's body waited for
    the client's delayed ACK of its headers, 40 ms on every request (GET /health took 44 ms)."""
    import asyncio
    import socket
    from npgpt.cli.serve import _bind

    async def accept_one():
        seen = asyncio.get_running_loop().create_future()

        class Record(asyncio.Protocol):
            def connection_made(self, transport):
                sock = transport.get_extra_info("socket")
                seen.set_result(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
                transport.close()

        listening = _bind("127.0.0.1", 0)
        server = await asyncio.get_running_loop().create_server(Record, sock=listening)
        _, writer = await asyncio.open_connection("127.0.0.1", listening.getsockname()[1])
        nodelay = await asyncio.wait_for(seen, WAIT)
        writer.close()
        server.close()
        return nodelay

    assert asyncio.run(accept_one()) != 0


def test_the_worker_runs_the_model_on_the_threads_asked_for(clf):
    """Numba's thread count belongs to each thread: --threads must be set on the worker itself."""
    import numba
    batcher = Batcher(clf, threads=1)
    seen = batcher.call(numba.get_num_threads).result(WAIT)
    batcher.close(WAIT)
    assert seen == 1


def test_the_server_runs_a_pass_on_its_worker_before_it_listens(model_file, bpe_dir, monkeypatch):
    """`npgpt serve` runs one pass on the batcher's worker thread before it builds the app and
    listens: the first request does not pay for the worker's start and the kernels' loading."""
    import npgpt.http_api
    from npgpt.classify import Classifier
    from npgpt.cli.serve import main
    passes, original = [], Classifier.logits_of_tokens

    def recorded(self, tokens):
        passes.append(threading.current_thread().name)
        return original(self, tokens)

    class Built(Exception):
        pass

    def make_app(clf, limits, batcher, cors_origin=None):
        raise Built(batcher, list(passes))                     # what had run when the app was built

    monkeypatch.setattr(Classifier, "logits_of_tokens", recorded)
    monkeypatch.setattr(npgpt.http_api, "make_app", make_app)
    with pytest.raises(Built) as built:
        main(["--model", str(model_file), "--bpe-dir", bpe_dir, "--port", "0"])
    batcher, before = built.value.args
    batcher.close(WAIT)
    assert before == ["npgpt-batcher"]
