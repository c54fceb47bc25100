"""The HTTP JSON API and the page, as a Starlette app over one `Classifier` and its `Batcher`.

    app = make_app(classifier, Limits(max_texts=32), batcher=Batcher(classifier))
    uvicorn.run(app, host="127.0.0.1", port=8000)        # what `python -m npgpt.serve` does

Routes (docs/serving.md has examples):
    GET  /             the page (npgpt/static/index.html: no CDN, works offline)
    GET  /health       {"status": "ok", "queued": texts waiting, "batches": passes run}
    GET  /v1/info      labels, model size, context, pooling, version, batching and limits
    POST /v1/classify  {"inputs": "text" | ["text", ...], "top_k": k | null}
                       -> [{"label", "score"}, ...] sorted by score (a list of those for a list)
    POST /v1/explain   {"inputs": "text", "label": name | null} -> npgpt.explain's Explanation

Every /v1/classify answer says where its time went, in text-embeddings-inference's headers
(whole milliseconds: x-total-time, x-tokenization-time, x-queue-time, x-inference-time; and
x-compute-tokens, the tokens of the pass it shared) and in the W3C `Server-Timing` header
(fractional milliseconds, shown by a browser's developer tools).

Status codes follow Hugging Face's text-embeddings-inference: 413 too many texts or a body too
big, 422 input that is not what the route takes (or too long without --truncate), 429 a full
queue (with Retry-After), 401 a missing or wrong API key. Every error is {"error": "..."} naming
the limit or flag. Errors are answered, never raised out of a route: bad input cannot stop the
server. Importing this module needs Starlette (`pip install -e ".[serve]"`); `import npgpt` does
not import it.
"""
from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import time
from dataclasses import asdict, dataclass
from importlib import resources

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse
from starlette.routing import Route

from .batcher import Batcher, Closed, QueueFull, Timing
from .errors import NpgptError, quote

RETRY_AFTER_S = 1


@dataclass
class Limits:
    """What one request may ask (the flags of `python -m npgpt.serve` of the same names)."""
    max_texts: int = 32                  # texts in one /v1/classify request
    max_body: int = 1 << 20              # bytes of a request body
    truncate: bool = False               # cut texts over the model's limit (else 422)
    api_key: str | None = None           # required as "Authorization: Bearer KEY" on /v1/*


class HTTPError(Exception):
    """An answer other than 200: its status, its one-line message, extra headers."""

    def __init__(self, status: int, message: str, headers=None):
        super().__init__(message)
        self.status, self.headers = status, headers or {}


def make_app(classifier, limits: Limits = None, batcher: Batcher = None, cors_origin=None) -> Starlette:
    """The Starlette app serving `classifier`. The batcher (default: one with default settings)
    is closed when the app shuts down, after it has answered every queued request."""
    limits = limits or Limits()
    batcher = batcher or Batcher(classifier)
    service = _Service(classifier, limits, batcher)
    routes = [Route("/", service.page), Route("/health", service.health),
              Route("/v1/info", service.api(service.info)),
              Route("/v1/classify", service.api(service.classify), methods=["POST"]),
              Route("/v1/explain", service.api(service.explain), methods=["POST"])]
    middleware = []
    if cors_origin:
        from starlette.middleware.cors import CORSMiddleware
        middleware.append(Middleware(CORSMiddleware, allow_origins=[cors_origin], allow_methods=["GET", "POST"],
                                     allow_headers=["Authorization", "Content-Type"]))

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        await asyncio.get_running_loop().run_in_executor(None, batcher.close)

    app = Starlette(routes=routes, middleware=middleware, lifespan=lifespan,
                    exception_handlers={404: _not_found, 405: _not_allowed, Exception: _internal})
    app.state.batcher = batcher
    return app


async def _not_found(request, exc):
    return _error(404, f"no route {request.url.path} (routes: /, /health, /v1/info, /v1/classify, /v1/explain)")


async def _not_allowed(request, exc):
    return _error(405, f"{request.method} is not allowed on {request.url.path}")


async def _internal(request, exc):
    """A bug, not the request's fault: still JSON, and the server goes on (uvicorn logs the traceback)."""
    return _error(500, f"internal error ({type(exc).__name__}); the server's log has the traceback")


def _error(status: int, message: str, headers=None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


class _Service:
    """The routes' handlers, sharing the classifier, the limits and the batcher."""

    def __init__(self, classifier, limits: Limits, batcher: Batcher):
        self.clf, self.limits, self.batcher = classifier, limits, batcher

    def api(self, handler):
        """A /v1 route: the API key checked first; HTTPError and NpgptError answered as JSON."""
        async def route(request: Request):
            try:
                self._check_key(request)
                answer = await handler(request)
                return answer if isinstance(answer, JSONResponse) else JSONResponse(answer)
            except HTTPError as e:
                return _error(e.status, str(e), e.headers)
            except QueueFull as e:
                return _error(429, f"{e}; retry after {RETRY_AFTER_S} s", {"Retry-After": str(RETRY_AFTER_S)})
            except Closed as e:
                return _error(503, str(e))
            except NpgptError as e:             # the texts themselves (npgpt.classify.check_texts, labels)
                return _error(422, str(e))
        return route

    def _check_key(self, request: Request) -> None:
        key = self.limits.api_key
        if key is None:
            return
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {key}".encode()):
            raise HTTPError(401, "missing or wrong API key: send the header 'Authorization: Bearer KEY' "
                                 "with the server's --api-key (or NPGPT_API_KEY)")

    async def page(self, request: Request):
        return HTMLResponse(resources.files("npgpt").joinpath("static/index.html").read_text(encoding="utf-8"))

    async def health(self, request: Request):
        return JSONResponse({"status": "ok", "queued": self.batcher.pending, "batches": self.batcher.batches})

    async def info(self, request: Request) -> dict:
        from . import __version__
        clf, b = self.clf, self.batcher
        return {"labels": list(clf.labels), "model_size": clf.meta.get("model_size"),
                "parameters": int(sum(a.size for a in clf.params.values())),
                "context_length": clf.config.n_ctx, "token_limit": clf.limit, "pooling": clf.pooling,
                "npgpt_version": __version__,
                "batching": {"on": b.batching, "max_batch_tokens": b.max_batch_tokens,
                             "max_wait_ms": b.max_wait * 1000, "max_queue": b.max_queue},
                "limits": {k: v for k, v in asdict(self.limits).items() if k != "api_key"}}

    async def classify(self, request: Request):
        arrived = time.monotonic()
        body = await self._json(request, {"inputs", "top_k"})
        inputs = body.get("inputs")
        texts = [inputs] if isinstance(inputs, str) else inputs
        if not isinstance(texts, list):
            raise HTTPError(422, f"inputs must be a text or a list of texts, not {type(inputs).__name__}")
        if not texts:
            raise HTTPError(422, "inputs is an empty list: send at least one text")
        if len(texts) > self.limits.max_texts:
            raise HTTPError(413, f"{len(texts)} texts in one request; the limit (--max-texts) is "
                                 f"{self.limits.max_texts}")
        top_k = body.get("top_k")
        if top_k is not None and (type(top_k) is not int or top_k < 1):
            raise HTTPError(422, f"top_k must be a whole number >= 1 or null (every class), not {quote(top_k)}")
        encoding = time.monotonic()
        tokens, cut = self._encode(texts)
        timing = Timing()
        probs = await asyncio.wrap_future(self.batcher.submit(tokens, timing))     # [n,K]
        answers = [_ranked(self.clf.labels, p, top_k) for p in probs]
        answer = answers[0] if isinstance(inputs, str) else answers
        headers = timing_headers(arrived, encoding, timing)
        if cut:      # --truncate cut some texts: the body keeps the pipeline's shape, a header names them
            headers.update({"X-Truncated-Texts": ",".join(map(str, cut)), "X-Token-Limit": str(self.clf.limit)})
        return JSONResponse(answer, headers=headers)

    async def explain(self, request: Request) -> dict:
        from .explain import explain, label_index
        body = await self._json(request, {"inputs", "label"})
        text, label = body.get("inputs"), body.get("label")
        if not isinstance(text, str):
            raise HTTPError(422, f"inputs must be one text (a string), not {type(text).__name__}")
        if label is not None and not isinstance(label, str):
            raise HTTPError(422, f"label must be a label name or null, not {type(label).__name__}")
        label_index(self.clf.labels, label)                                          # 422 before queueing
        self._encode([text])
        return (await asyncio.wrap_future(self.batcher.call(lambda: explain(self.clf, text, label)))).to_dict()

    def _encode(self, texts):
        """Token ids of each text, cut to the model's limit -> (tokens, indices of the cut texts):
        422 for a longer text unless --truncate."""
        tokens, cut = self.clf.encode(texts)            # DataError (422) names a non-string or empty text
        if cut and not self.limits.truncate:
            raise HTTPError(422, f"text {cut[0] + 1} of {len(texts)} is longer than the model's {self.clf.limit} "
                                 "tokens (start the server with --truncate to cut such texts)")
        return tokens, cut

    async def _json(self, request: Request, keys: set) -> dict:
        """The request's JSON object, its body read up to --max-body bytes (413 past it)."""
        limit = self.limits.max_body
        too_big = HTTPError(413, f"the request body is over {limit} bytes (--max-body)")
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise too_big
        raw = bytearray()
        async for chunk in request.stream():
            raw += chunk
            if len(raw) > limit:
                raise too_big
        try:
            body = json.loads(raw)
        except (ValueError, RecursionError):
            raise HTTPError(422, "the body is not valid JSON (UTF-8)") from None
        if not isinstance(body, dict):
            raise HTTPError(422, f"the body must be a JSON object with these keys: {', '.join(sorted(keys))}")
        unknown = sorted(set(body) - keys)
        if unknown:
            raise HTTPError(422, f"unknown key {quote(unknown[0])}; this route takes {', '.join(sorted(keys))}")
        if "inputs" not in body:
            raise HTTPError(422, "the body has no \"inputs\": send {\"inputs\": \"a text\"}")
        return body


def timing_headers(arrived: float, encoding: float, timing: Timing) -> dict:
    """Where a request's time went (time.monotonic() seconds: the request arrived, its texts
    began to be tokenized, then the batcher's Timing), as TEI's headers and Server-Timing."""
    ms = {"total": time.monotonic() - arrived, "tokenization": timing.submitted - encoding,
          "queue": timing.started - timing.submitted, "inference": timing.finished - timing.started}
    ms = {k: max(0.0, v) * 1000 for k, v in ms.items()}
    headers = {f"x-{k}-time": str(int(v)) for k, v in ms.items()}
    headers["x-compute-tokens"] = str(timing.tokens)
    headers["Server-Timing"] = ", ".join(f"{k};dur={v:.2f}" for k, v in ms.items() if k != "total") + \
        f", total;dur={ms['total']:.2f};desc=\"{timing.texts} text{'' if timing.texts == 1 else 's'} in the pass\""
    return headers


def _ranked(labels, probs, top_k) -> list:
    """[{"label", "score"}] by decreasing score, the top_k first (None: every class)."""
    order = sorted(range(len(labels)), key=lambda k: -probs[k])[:top_k]
    return [{"label": labels[k], "score": float(probs[k])} for k in order]
