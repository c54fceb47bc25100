"""`python -m npgpt.serve`: a classifier behind an HTTP JSON API, with a page at /.

    python -m npgpt.serve --model runs/<name>/classifier.h5          # http://127.0.0.1:8000/
    curl -s localhost:8000/v1/classify -d '{"inputs": "You are a winner!"}'

The app is `npgpt.http_api` (routes, limits, status codes), its queue and worker thread
`npgpt.batcher`; this module reads the flags, binds the socket and runs uvicorn. SIGTERM or
Ctrl-C stops taking connections, answers every request already queued, and exits 0.
docs/serving.md has the details.
"""
from __future__ import annotations

import os
import signal
import socket
import sys

from ..errors import NpgptError
from . import expect_file, make_parser

MISSING_EXTRA = ('the server needs Starlette and uvicorn, an optional extra: pip install -e ".[serve]" '
                 '(or pip install "npgpt[serve]")')


def build_parser():
    from ..batcher import DEFAULT_MAX_BATCH_TOKENS, DEFAULT_MAX_QUEUE, DEFAULT_MAX_WAIT_MS
    from ..http_api import Limits
    p = make_parser("python -m npgpt.serve", "Serve a classifier over HTTP: POST /v1/classify, POST /v1/explain, "
                    "GET /v1/info, GET /health, and a page at / (docs/serving.md).")
    p.add_argument("--model", required=True, help="the classifier, runs/<name>/classifier.h5")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=8000, help="port to bind (0: any free port)")
    p.add_argument("--api-key", default=None,           # not the environment's: --help would show it
                   help="require 'Authorization: Bearer KEY' on /v1/* (default: $NPGPT_API_KEY, else none)")
    p.add_argument("--cors", default=None, metavar="ORIGIN", help="allow browser pages from ORIGIN to call the API")
    p.add_argument("--max-batch-tokens", type=int, default=DEFAULT_MAX_BATCH_TOKENS,
                   help="tokens of queued requests run in one packed pass (0: no batching, one request per pass)")
    p.add_argument("--max-wait-ms", type=float, default=DEFAULT_MAX_WAIT_MS,
                   help="how long the oldest request waits for others to join its pass (each arrival "
                        "stretches the wait to this long after it, to 10x in all)")
    p.add_argument("--max-queue", type=int, default=DEFAULT_MAX_QUEUE,
                   help="requests waiting before new ones get 429 Too Many Requests")
    p.add_argument("--max-texts", type=int, default=Limits.max_texts, help="texts in one request (more: 413)")
    p.add_argument("--max-body", type=int, default=Limits.max_body, help="bytes of a request body (more: 413)")
    p.add_argument("--truncate", action="store_true",
                   help="cut texts longer than the model reads (default: refuse them with 422)")
    p.add_argument("--threads", type=int, default=None,
                   help="threads for Numba and BLAS (default: all cores; 1 on a machine shared with other work)")
    p.add_argument("--access-log", action="store_true", help="log every request")
    p.add_argument("--bpe-dir", default=None,
                   help="folder with GPT-2's encoder.json and vocab.bpe (default: the ones stored in the model file)")
    return p


def main(argv=None):
    try:                 # first, --help included: the flags' defaults live in the app's module
        import starlette  # noqa: F401
        import uvicorn
    except ImportError:
        raise NpgptError(MISSING_EXTRA) from None
    parser = build_parser()
    args = parser.parse_args(argv)
    for flag in ("max_texts", "max_body", "max_queue", "threads"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be at least 1")
    if args.max_batch_tokens < 0 or args.max_wait_ms < 0:
        parser.error("--max-batch-tokens and --max-wait-ms must be >= 0")
    from ..batcher import Batcher
    from ..classify import load_classifier
    from ..http_api import Limits, make_app

    expect_file(args.model, "--model", "a classifier file", "runs/<name>/classifier.h5")
    clf = load_classifier(args.model, args.bpe_dir)
    sock = _bind(args.host, args.port)
    batcher = Batcher(clf, args.max_batch_tokens, args.max_wait_ms, args.max_queue, threads=args.threads)
    _warm_up(batcher, clf)
    app = make_app(clf, Limits(args.max_texts, args.max_body, args.truncate,
                                   args.api_key or os.environ.get("NPGPT_API_KEY") or None),
                   batcher=batcher, cors_origin=args.cors)
    server = _server_class(uvicorn)(uvicorn.Config(app, log_level="info", access_log=args.access_log, lifespan="on"))
    server.batcher = batcher
    host, port = sock.getsockname()[:2]
    print(f"serving {clf.path} ({', '.join(clf.labels)}) on http://{host}:{port}/ (Ctrl-C stops)", flush=True)
    with _signals_end_the_server():
        server.run(sockets=[sock])
    print("stopped: every queued request was answered", flush=True)
    return 0


def _warm_up(batcher, clf) -> None:
    """One pass before the first request: the kernels loaded (from Numba's cache, as
    `load_classifier` arranged), the worker's threads started, BLAS awake. Without it the first
    request waited for all of that (464 ms against ~5 ms after, a tiny model)."""
    tokens = clf.encode(["warm-up"])[0]
    batcher.call(lambda: clf.logits_of_tokens(tokens)).result()


def _bind(host: str, port: int) -> socket.socket:
    """A listening socket (bound here, so that --port 0 can say which port it got). Its protocol is
    named (IPPROTO_TCP, not 0): asyncio turns Nagle's algorithm off (TCP_NODELAY) only on sockets
    that say they are TCP, and with it on, a response's body waits for the client's delayed ACK of
    its headers: 40 ms more on every request."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise NpgptError(f"cannot listen on {host}:{port} ({e.strerror}); choose another --port or --host") from None
    sock.listen(2048)
    return sock


def _server_class(uvicorn):
    """uvicorn's Server, but a stop signal also tells the batcher to run what it holds now: uvicorn
    waits for every open request before the app shuts down, and a request must not sit out
    --max-wait-ms meanwhile."""
    class Server(uvicorn.Server):
        batcher = None

        def handle_exit(self, sig, frame):
            super().handle_exit(sig, frame)
            if self.batcher is not None:
                self.batcher.hurry()
    return Server


class _signals_end_the_server:
    """uvicorn catches SIGINT/SIGTERM, shuts down gracefully (queued requests are answered), then
    raises the signal again for the handler that was there before it. Here that handler does
    nothing: the graceful stop is the whole answer to the signal, and the exit code is 0."""

    def __enter__(self):
        self.old = {s: signal.signal(s, lambda *_: None) for s in (signal.SIGINT, signal.SIGTERM)}

    def __exit__(self, *exc):
        for s, handler in self.old.items():
            signal.signal(s, handler)
        sys.stdout.flush()
