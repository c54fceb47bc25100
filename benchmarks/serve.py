"""The server under load, on loopback: dynamic batching on and off in the same run.

    python benchmarks/serve.py [--json serve.json] [--client wrk|python] [--phase-seconds 60]
                               [--phase-requests 6000] [--requests 10000] [--seconds 360]
                               [--threads 1] [--rounds 3]

A 124M-shaped classifier with random weights (the work of the real one; its labels mean nothing)
is served twice by `python -m npgpt.serve` on 127.0.0.1: batching on (the defaults) and off
(--max-batch-tokens 0). A load generator sends SMS texts, one per request, at concurrency 1, 8 and
32 to each server in turn: `wrk` (Debian's package, `apt-get install wrk`; one thread, with
serve_wrk.lua for the bodies, so the client hardly takes a core from the server) or, with
--client python or without wrk, Python threads (one keep-alive connection each). Each phase is
bounded in seconds and requests and split into rounds, the two servers taking turns, each round
starting once the other server has answered what it still held (and, at concurrency 1,
`predict_proba` on one text in this process). Reported: texts/s (answers within
the phase's time: a pass still running at its end is not counted), p50/p95/p99 latency, the
server's peak RSS.

Then the long run, on the batching server at concurrency 32 (the Python client, which reads
every answer): --requests requests (bounded by --seconds), one in ten malformed (bad JSON, wrong types, empty, too many texts, too long): the
number of 5xx answers (must be 0), every valid answer compared with `predict_proba` on that text
alone in this process (must be equal), and the server's RSS after the first 1,000 requests and at
the end.

Where the time went: each phase's medians of the server's own timing headers (x-queue-time,
x-inference-time, x-total-time), and the client's p50 beyond the server's median total (HTTP,
the client). And, in this process, the ceiling batching can reach: `Classifier.logits_of_tokens` on
passes of 1, 2, 4, ... 128 of the SMS texts (in turns, medians): milliseconds per text and per
pass. Batched / unbatched throughput cannot exceed (ms per text alone) / (ms per text in a full
pass); the pass sizes also show which --max-batch-tokens is worth its latency
(`--packs-only` runs this part alone, and then NumPy's GEMM speed on the block's shapes at a
full pass's rows and at 4,096).

The targets (ratios in one run): at concurrency 32 batched throughput >= 3x unbatched; at
concurrency 1 p50 latency within 1.3x of `predict_proba` on one text in-process; RSS at the end
within 1.1x of RSS after 1,000 requests. The client shares the machine's cores with the server
(wrk's one thread far less than Python's).
"""
from __future__ import annotations

import itertools
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time

from common import (REPO, arg_parser, default_data_dir, gemm_peak, machine_info, print_info, set_threads, summary,
                    write_json)

import numpy as np  # noqa: E402  (after common: npgpt.tune_runtime() first)

TIMES = ("total", "queue", "inference")       # the server's timing headers, x-<name>-time in whole ms
MALFORMED = [b"{not json", b'{"inputs": 5}', b'{"inputs": []}', b'{"inputs": ""}', b'{"text": "hi"}',
             json.dumps({"inputs": ["hi"] * 100}).encode(), json.dumps({"inputs": "spam " * 2000}).encode()]


def parse_args(argv=None):
    p = arg_parser(__doc__, __file__)
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--phase-requests", type=int, default=6000, help="answers per (mode, concurrency) phase at most (a safety bound: wrk's rate "
                   "is void when a round reaches it, and the run stops)")
    p.add_argument("--phase-seconds", type=float, default=60, help="seconds per phase at most")
    p.add_argument("--rounds", type=int, default=3, help="turns each phase is split into, the servers alternating")
    p.add_argument("--concurrency", default="1,8,32", help="the phases' concurrencies, comma-separated")
    p.add_argument("--requests", type=int, default=10000, help="requests of the long run (0: none)")
    p.add_argument("--seconds", type=float, default=360, help="seconds of the long run at most")
    p.add_argument("--texts", type=int, default=300, help="distinct SMS texts sent")
    p.add_argument("--packs-only", action="store_true", help="only the in-process pass sizes (the ceiling)")
    p.add_argument("--pack-repeats", type=int, default=7, help="turns of the pass-size timing")
    p.add_argument("--client", choices=("wrk", "python"), default="wrk" if shutil.which("wrk") else "python",
                   help="load generator of the phases: wrk (Debian's `wrk`, one thread: the server keeps the "
                        "cores; the default when installed) or Python threads")
    p.add_argument("--threads", type=int, default=1,
                   help="threads of each server and of the in-process calls (the client needs a core too)")
    return p.parse_args(argv)


def build_classifier(folder, bpe_dir):
    """A 124M-shaped classifier, random weights, saved -> (path, Classifier loaded from it)."""
    from npgpt.classify import Classifier, load_classifier
    from npgpt.config import preset
    from npgpt.params import init_params
    from npgpt.tokenizer import get_tokenizer
    cfg = preset("124M")
    clf = Classifier(params=init_params(cfg, seed=123, num_classes=2), config=cfg, labels=["ham", "spam"],
                     pooling="last_token", max_length=None, tok=get_tokenizer(bpe_dir), bpe_dir=bpe_dir,
                     meta={"model_size": "124M"})
    path = clf.save(os.path.join(folder, "classifier.h5"))
    return path, load_classifier(path, bpe_dir)


def start_server(model, bpe_dir, threads, *flags):
    """`python -m npgpt.serve` on 127.0.0.1, a free port -> (process, URL)."""
    import httpx2 as httpx
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.Popen([sys.executable, "-m", "npgpt.serve", "--model", model, "--bpe-dir", bpe_dir,
                             "--port", "0", "--threads", str(threads), *flags], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            text=True)
    url = re.search(r"http://127\.0\.0\.1:\d+", proc.stdout.readline()).group(0)
    for _ in range(600):
        try:
            httpx.get(url + "/health", timeout=60)
            return proc, url
        except httpx.TransportError:
            time.sleep(0.1)
    raise RuntimeError("the server did not start")


def rss_mib(pid) -> tuple:
    """(current RSS, peak RSS) of a process in MiB, from /proc."""
    fields = dict(line.split(":", 1) for line in open(f"/proc/{pid}/status"))
    return tuple(int(fields[k].split()[0]) / 1024 for k in ("VmRSS", "VmHWM"))


def load(url, texts, concurrency, n_requests, seconds, malformed_every=0, on_done=None):
    """Send requests from `concurrency` threads until n_requests are answered or `seconds` pass.
    -> list of (index, seconds, status, body) in completion order"""
    import httpx2 as httpx
    counter, lock, results = itertools.count(), threading.Lock(), []
    stop = time.perf_counter() + seconds

    def worker():
        with httpx.Client(timeout=120) as client:
            while time.perf_counter() < stop:
                i = next(counter)
                if i >= n_requests:
                    return
                if malformed_every and i % malformed_every == malformed_every - 1:
                    body = MALFORMED[(i // malformed_every) % len(MALFORMED)]
                else:
                    body = json.dumps({"inputs": texts[i % len(texts)], "top_k": None}).encode()
                t0 = time.perf_counter()
                r = client.post(url + "/v1/classify", content=body, headers={"Content-Type": "application/json"})
                dt = time.perf_counter() - t0
                server = {k: float(r.headers[f"x-{k}-time"]) for k in TIMES if f"x-{k}-time" in r.headers}
                if "x-compute-tokens" in r.headers:
                    server["pass_tokens"] = int(r.headers["x-compute-tokens"])
                with lock:
                    results.append((i, dt, r.status_code, r.content, server))
                    if on_done:
                        on_done(len(results))

    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results, time.perf_counter() - t0


def python_phase(url, texts, concurrency, n_requests, seconds) -> dict:
    """One round of the Python client (`load`) -> latencies (s), statuses, server timings, elapsed."""
    results, elapsed = load(url, texts, concurrency, n_requests, seconds)
    return {"latency": [dt for _, dt, status, _, _ in results if status == 200],
            "status": [status for _, _, status, _, _ in results],
            "server": [server for _, _, status, _, server in results if status == 200], "elapsed": elapsed}


def wrk_phase(url, texts, concurrency, n_requests, seconds) -> dict:
    """One round of `wrk -t1` (serve_wrk.lua): bounded by `seconds`, and by n_requests answers
    (its thread then stops, but wrk still counts the whole duration: the cap is a safety bound,
    set above what the phase can answer). Answers still in flight at the end are not counted."""
    with tempfile.NamedTemporaryFile("w", suffix=".jsonl") as bodies:
        for t in texts:
            bodies.write(json.dumps({"inputs": t, "top_k": None}) + "\n")
        bodies.flush()
        out = subprocess.run(["wrk", "-t1", f"-c{concurrency}", f"-d{max(1, round(seconds))}s", "--timeout", "120s",
                              "-s", str(REPO / "benchmarks" / "serve_wrk.lua"), url, "--", bodies.name,
                              str(n_requests)], capture_output=True, text=True, check=True).stdout
    got = json.loads(out.split("npgpt-json ", 1)[1])
    answers = [line.split() for line in got["answers"]]
    if got["socket_errors"]:
        raise RuntimeError(f"wrk: {got['socket_errors']} socket errors")
    if len(answers) >= n_requests:
        raise RuntimeError(f"wrk answered {len(answers)} requests, the cap of a round: raise --phase-requests")
    ok = [a for a in answers if a[0] == "200"]
    return {"latency": [v / 1e6 for v, n in got["latency_us"] for _ in range(n)],
            "status": [int(a[0]) for a in answers],
            "server": [{"total": float(a[1]), "queue": float(a[2]), "inference": float(a[3]),
                        "pass_tokens": int(a[4])} for a in ok],
            "elapsed": got["duration_us"] / 1e6}


def drain(url, seconds=120) -> None:
    """Wait until the server has answered everything queued (its /health says 0 texts pending):
    wrk leaves requests in flight when its time is up, and the next round, on the other server,
    must not share the cores with their passes."""
    import httpx2 as httpx
    stop = time.perf_counter() + seconds
    while httpx.get(url + "/health", timeout=60).json()["queued"] and time.perf_counter() < stop:
        time.sleep(0.05)


def phase_row(mode, concurrency, rounds, pid) -> dict:
    """A row of the table from a phase's rounds (dicts of python_phase / wrk_phase)."""
    ok = [dt for r in rounds for dt in r["latency"]]
    server = [s for r in rounds for s in r["server"]]
    elapsed = sum(r["elapsed"] for r in rounds)
    ms = np.percentile(np.array(ok) * 1000, [50, 95, 99]) if ok else [float("nan")] * 3
    row = {"mode": mode, "concurrency": concurrency, "requests": sum(len(r["status"]) for r in rounds),
           "ok": len(server), "texts_per_s": len(server) / elapsed, "p50_ms": ms[0], "p95_ms": ms[1],
           "p99_ms": ms[2], "peak_rss_mib": rss_mib(pid)[1]}
    for k in TIMES:                               # medians of the server's own account
        row[f"server_{k}_ms"] = float(np.median([s[k] for s in server])) if server else float("nan")
    row["pass_tokens_median"] = float(np.median([s["pass_tokens"] for s in server])) if server else 0.0
    row["beyond_server_ms"] = ms[0] - row["server_total_ms"]      # p50 seen by the client - the server's
    return row


def pack_rows(clf, texts, args) -> list:
    """In this process: logits_of_tokens on passes of 1, 2, 4, ... 128 distinct texts, in turns.
    -> a row per pass size: texts, tokens, median ms per pass and per text"""
    from common import interleaved
    tokens = list(clf.encode(texts)[0])
    sizes = [n for n in (1, 2, 4, 8, 16, 32, 64, 128) if n <= len(tokens)]
    passes = {n: [list(t) for t in tokens[:n]] for n in sizes}
    times = interleaved({n: (lambda p=p: clf.logits_of_tokens(p)) for n, p in passes.items()}, args.pack_repeats)
    rows = []
    for n in sizes:
        med = float(np.median(times[n]))
        rows.append({"texts": n, "tokens": sum(map(len, passes[n])), "ms_per_pass": med * 1000,
                     "ms_per_text": med * 1000 / n})
    return rows


def long_run(url, pid, texts, clf, args) -> dict:
    """10,000 requests, one in ten malformed: 5xx count, answers against predict_proba, RSS."""
    marks = {}

    def on_done(n):
        if n in (1000, args.requests):
            marks[n] = rss_mib(pid)[0]

    results, elapsed = load(url, texts, 32, args.requests, args.seconds, malformed_every=10, on_done=on_done)
    marks.setdefault("end", rss_mib(pid)[0])
    expected = {t: clf.predict_proba([t])[0] for t in texts}                     # alone, in this process
    wrong = 0
    for i, _, status, body, _ in results:
        if status == 200:
            got = {d["label"]: d["score"] for d in json.loads(body)}
            want = expected[texts[i % len(texts)]]
            wrong += any(got[label] != float(p) for label, p in zip(clf.labels, want))
    statuses = {}
    for _, _, status, _, _ in results:
        statuses[status] = statuses.get(status, 0) + 1
    return {"requests": len(results), "seconds": elapsed, "statuses": statuses,
            "server_errors": sum(n for s, n in statuses.items() if s >= 500), "answers_not_equal": wrong,
            "rss_after_1000_mib": marks.get(1000), "rss_at_end_mib": marks.get(args.requests, marks["end"])}


def phases(servers, texts, concurrency, args, inproc, clf) -> list:
    """One concurrency, each server in turn for --rounds short rounds (A, B, A, B, ...: a neighbour's
    load slows both alike); inproc: a list to extend with in-process predict_proba seconds, one text
    per call, a round of its own after each pair. -> a row per server"""
    got = {mode: [] for mode in servers}
    run = wrk_phase if args.client == "wrk" else python_phase
    for _ in range(args.rounds):
        for mode, (proc, url) in servers.items():
            got[mode].append(run(url, texts, concurrency, args.phase_requests // args.rounds,
                                 args.phase_seconds / args.rounds))
            drain(url)
        if inproc is not None:
            stop = time.perf_counter() + args.phase_seconds / args.rounds
            for t in itertools.islice(itertools.cycle(texts), args.phase_requests // args.rounds):
                t0 = time.perf_counter()
                clf.predict_proba([t])
                inproc.append(time.perf_counter() - t0)
                if t0 > stop:
                    break
    rows = [phase_row(mode, concurrency, got[mode], servers[mode][0].pid) for mode in servers]
    for r in rows:
        print("  " + ", ".join(f"{k} {v:.1f}" if isinstance(v, float) else f"{k} {v}" for k, v in r.items()),
              flush=True)
    return rows


def main(argv=None):
    from npgpt.data import read_sms_spam
    args = parse_args(argv)
    set_threads(args.threads)
    print("python benchmarks/serve.py " + " ".join(sys.argv[1:] if argv is None else argv))
    info = machine_info()
    print_info(info)
    data = default_data_dir()
    bpe_dir = str(data / "gpt2_bpe")
    texts = read_sms_spam(data / "sms_spam_collection" / "SMSSpamCollection")["Text"].drop_duplicates()
    texts = texts.sample(args.texts, random_state=0).tolist()
    with tempfile.TemporaryDirectory() as folder:
        model, clf = build_classifier(folder, bpe_dir)
        lengths = [len(t) for t in clf.encode(texts)[0]]
        print(f"{len(texts)} SMS texts, mean {np.mean(lengths):.1f} tokens; model 124M shapes, random weights")
        packs = pack_rows(clf, texts, args)
        report_packs(packs)
        if args.packs_only:
            gemm = {rows: gemm_peak(rows) for rows in (32 * 24, 4096)}
            for rows, rates in gemm.items():
                print(f"NumPy float32 GEMM, the block's shapes at {rows} rows: " +
                      ", ".join(f"{k.split('x', 1)[1]} {v:.0f}" for k, v in rates.items() if k != "peak") + " GFLOP/s")
            if args.json:
                write_json(args.json, {"info": info, "packs": packs, "gemm_gflops": gemm})
            return
        servers = {"batched": start_server(model, bpe_dir, args.threads),
                   "unbatched": start_server(model, bpe_dir, args.threads, "--max-batch-tokens", "0")}
        try:
            for proc, url in servers.values():
                load(url, texts, 2, 4, 60)                                     # warm-up
            rows, inproc = [], []
            for concurrency in map(int, args.concurrency.split(",")):
                rows += phases(servers, texts, concurrency, args, inproc if concurrency == 1 else None, clf)
            inproc = summary(inproc)["median"] if inproc else None
            proc, url = servers["batched"]
            long = long_run(url, proc.pid, texts, clf, args) if args.requests else None
        finally:
            for proc, _ in servers.values():
                proc.terminate()
                proc.wait(60)
    report(rows, inproc, long, packs)
    if args.json:
        write_json(args.json, {"info": info, "client": args.client, "packs": packs, "phases": rows, "in_process_p50_s": inproc,
                               "long_run": long})


def report_packs(packs) -> None:
    print(f"\nin this process, one pass of n texts: {'texts':>5s} {'tokens':>6s} {'ms/pass':>8s} {'ms/text':>8s}")
    for r in packs:
        print(f"{'':36s} {r['texts']:5d} {r['tokens']:6d} {r['ms_per_pass']:8.1f} {r['ms_per_text']:8.2f}")
    best = min(packs, key=lambda r: r["ms_per_text"])
    print(f"ceiling of batching: {packs[0]['ms_per_text']:.1f} / {best['ms_per_text']:.1f} ms per text = "
          f"{packs[0]['ms_per_text'] / best['ms_per_text']:.2f}x (passes of {best['texts']} texts)", flush=True)


def report(rows, inproc, long, packs) -> None:
    print(f"\n{'mode':>10s} {'conc':>4s} {'requests':>8s} {'texts/s':>8s} {'p50 ms':>8s} {'p95 ms':>8s} "
          f"{'p99 ms':>8s} {'peak RSS MiB':>12s}   server's medians, ms: queue inference total; beyond")
    for r in rows:
        print(f"{r['mode']:>10s} {r['concurrency']:4d} {r['requests']:8d} {r['texts_per_s']:8.1f} {r['p50_ms']:8.0f} "
              f"{r['p95_ms']:8.0f} {r['p99_ms']:8.0f} {r['peak_rss_mib']:12.0f}   {r['server_queue_ms']:5.0f} "
              f"{r['server_inference_ms']:9.0f} {r['server_total_ms']:5.0f}; {r['beyond_server_ms']:6.1f}; "
              f"{r['pass_tokens_median']:6.0f}")
    by = {(r["mode"], r["concurrency"]): r for r in rows}
    best = min(packs, key=lambda r: r["ms_per_text"])
    print()
    for c in sorted({r["concurrency"] for r in rows} - {1}):
        print(f"concurrency {c}: batched / unbatched texts/s = "
              f"{by['batched', c]['texts_per_s'] / by['unbatched', c]['texts_per_s']:.2f}x (target at 32: >= 3; "
              f"the ceiling in this process {packs[0]['ms_per_text'] / best['ms_per_text']:.2f}x)")
    if inproc:
        print(f"concurrency 1: batched p50 / in-process predict_proba p50 ({inproc * 1000:.0f} ms) = "
              f"{by['batched', 1]['p50_ms'] / (inproc * 1000):.2f}x (target <= 1.3)")
    if not long:
        return
    print(f"long run: {long['requests']} requests in {long['seconds']:.0f} s, statuses {long['statuses']}, "
          f"5xx {long['server_errors']}, answers not equal to predict_proba {long['answers_not_equal']}")
    if long["rss_after_1000_mib"]:
        print(f"RSS at the end / after 1,000 requests = {long['rss_at_end_mib']:.0f} / "
              f"{long['rss_after_1000_mib']:.0f} MiB = {long['rss_at_end_mib'] / long['rss_after_1000_mib']:.3f}x "
              "(target <= 1.1)")


if __name__ == "__main__":
    main()
