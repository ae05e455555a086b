"""`hetlm serve`: next-session predictions over HTTP (FastAPI), with dynamic batching.

    POST /predict   a user's sessions (lists of page names, oldest first) and options -> cluster and its
                    probability, the next session, the top-k first pages, P(Cart), P(Purchase), and the
                    pages the model does not know (scored as [UNK])
    GET  /health    liveness, and how many requests and batches were served
    GET  /model     the model: pages, clusters, context budget, limits
    GET  /docs, /openapi.json   the API description (the /docs page loads Swagger UI from a CDN)

Dynamic batching: each /predict puts its request on an asyncio queue; one worker takes the first waiting
request, waits up to `max_wait_ms` for more (up to `max_batch`), and scores them all in one batched
pass (`Scorer.score`) in a thread, so the event loop keeps accepting requests meanwhile. A user's
result does not depend on the batch it shares (see `hetlm.score`), so batching changes only throughput;
a batch that fails is scored again request by request, so only the request at fault gets its 500.

Cheapest first: a request costs 1 + n_samples decoded rows; the worker scores the cheapest waiting requests
first, and a batch holds requests within 2x of its cheapest's cost (at most `max_batch` requests and
`max_batch_rows` rows), so costly requests are scored in batches of their own and never slow a batch of cheap
ones; while a costly batch is scored, cheaper requests that arrive are scored by a second (express) worker,
the costly batch paused between its decoding passes meanwhile, so they wait for one pass at most. At most `max_queue` requests wait (503 beyond); a request not answered within `request_timeout_s` gets 503,
and one whose client hung up leaves the queue unscored.

Untrusted clients (see `ServeConfig`): the Host header must name an allowed host (DNS rebinding), an optional
bearer token guards every path but /health, and the h11 protocol of `serve` (`guarded_protocol`) closes a
connection whose headers or body do not arrive in time and caps open connections (the stalest connection still
sending its request makes room for a new one), so slow clients cannot hold the server's file descriptors.

Malformed requests get 422 with pydantic's message; requests over the limits of `create_app` (body
bytes, sessions, pages) get 413, n_samples over `max_n_samples` 422, pages reserved for the tokenizer
([PAD], [BOS], ... as `hetlm score` refuses them) 422, and a request with no page the model knows 422.

Page names are normalised as the ingest adapters do (whitespace -> "_"). Sessions are cleaned as `hetlm prepare` cleaned the model's training log (`sessions.SessionCleaning`, stored
with the tokenizer: immediate repeats of a page collapsed, sessions shorter than `min_session_len` pages
dropped, sessions longer than the training log's cutoff truncated or dropped; the response counts what
was removed), unless the request says `"clean": false`. A last session that still does not fit the
model's context gets 422.
"""

from __future__ import annotations

import asyncio
import heapq
import hmac
import itertools
import json
import math
import re
import threading
import unicodedata
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Annotated

from fastapi import FastAPI, HTTPException, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictStr, model_validator
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.responses import JSONResponse, Response

from .ingest.base import ZERO_WIDTH
from .score import ScoreConfig, Scorer, UserScore
from .tokenizer import SPECIALS

LOOPBACK_HOSTS = ["127.0.0.1", "localhost", "[::1]"]


def _page_name(page: str) -> str:
    """A page name as the ingest adapters normalise it (`ingest.base.normalize_pages`); names of special tokens
    are refused, as `hetlm score` refuses them in a log (`ingest.read_events`)."""
    try:
        page.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("a page name must be valid Unicode text (this one holds a lone surrogate)") from None
    name = re.sub(r"\s+", "_", re.sub(ZERO_WIDTH, "", unicodedata.normalize("NFC", page)).strip())
    if not name:
        raise ValueError("a page name must hold a non-space character")
    if name in SPECIALS:
        raise ValueError(f"page name {name!r} is reserved for the tokenizer ({' '.join(SPECIALS)})")
    return name


Page = Annotated[StrictStr, AfterValidator(_page_name)]
Session = Annotated[list[Page], Field(min_length=1)]


class PredictRequest(ScoreConfig):
    sessions: list[Session] = Field(min_length=1, description="the user's sessions, oldest first; each a non-empty "
                                    "list of page names")
    clean: bool = Field(True, description="clean the sessions as `hetlm prepare` cleaned the training log "
                        "(immediate repeats collapsed, short sessions dropped, long ones cut); false uses them "
                        "as sent")

    @property
    def rows(self) -> int:
        """What scoring it costs: decoded sequences (its next session and its outcome draws)."""
        return 1 + self.n_samples


class PredictResponse(BaseModel):
    """A `hetlm.score.UserScore`, with the names and shapes of `hetlm score`'s Parquet columns, and what the
    request's cleaning removed."""

    cluster: int | None = Field(description="the routed cluster (null for a single LM)")
    cluster_prob: float = Field(description="how sure the routing is (1 for a single LM)")
    next_session: list[str]
    decoder: str = Field(description="how next_session was decoded: set, greedy or sample")
    top_pages: list[str] = Field(description="most likely first pages of the next session, likeliest first")
    top_probs: list[float] = Field(description="their probabilities")
    p_cart: float | None = Field(description="P(Cart anywhere in the next session), Monte Carlo over n_samples "
                                             "sessions; null when n_samples is 0 or the vocabulary has no Cart page")
    se_cart: float | None
    p_purchase: float | None
    se_purchase: float | None
    p_cart_first_page: float | None = Field(description="P(the next session's first page is Cart), exact, no "
                                                        "sampling; a lower bound of p_cart")
    p_purchase_first_page: float | None
    p_cart_calibrated: float | None = Field(description="p_cart after the model's Platt scaling; null without one")
    p_purchase_calibrated: float | None
    n_samples: int
    unknown_pages: list[str] = Field(description="pages not in the model's vocabulary, scored as [UNK]")
    sessions_used: int = Field(description="most recent sessions that fit the model's context")
    cleaning: dict[str, int] = Field(description="pages removed by cleaning, by reason (as in prepare's summary)")


class ServeConfig(BaseModel):
    """Request limits, compute bounds, batching and connection guards of `create_app` and `serve`."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    max_body_bytes: int = Field(1 << 20, ge=1)  # 413 above
    max_sessions: int = Field(1000, ge=1)       # 413 above
    max_pages: int = Field(20_000, ge=1)        # pages over all sessions of a request; 413 above
    max_n_samples: int = Field(64, ge=0, le=1024)  # outcome draws a request may ask for; 422 above
    max_batch: int = Field(32, ge=1)            # requests scored together
    max_batch_rows: int = Field(320, ge=1)      # decoded rows (1 + n_samples per request) scored together
    max_wait_ms: float = Field(5.0, ge=0)       # how long the first request of a batch waits for others
    max_queue: int = Field(256, ge=1)           # requests waiting to be scored; 503 beyond
    request_timeout_s: float = Field(60.0, gt=0)  # a request not answered by then gets 503
    header_timeout_s: float = Field(10.0, gt=0)  # request headers must be complete by then (`serve`)
    body_timeout_s: float = Field(10.0, gt=0)   # and the body this long after the headers (`serve`)
    max_connections: int = Field(256, ge=1)     # open connections (`serve`; at most the file limit less 128)
    allowed_hosts: list[str] = Field(default_factory=lambda: list(LOOPBACK_HOSTS))  # Host header names; "*": any
    token: str | None = Field(None, min_length=16, repr=False)  # bearer token required on every path but /health

    @model_validator(mode="after")
    def _one_request_fits_a_batch(self) -> ServeConfig:
        if self.max_n_samples + 1 > self.max_batch_rows:
            raise ValueError(f"max_batch_rows ({self.max_batch_rows}) must hold one request of max_n_samples "
                             f"({self.max_n_samples} + 1 rows)")
        return self


def _number(x: float) -> float | None:
    return None if math.isnan(x) else x  # NaN -> null


def prediction_response(score: UserScore, n_samples: int, cleaning: dict[str, int]) -> PredictResponse:
    s = asdict(score)
    for key in ("p_cart", "se_cart", "p_purchase", "se_purchase", "p_cart_calibrated", "p_purchase_calibrated"):
        s[key] = _number(s[key])
    return PredictResponse(**s, n_samples=n_samples, cleaning=cleaning)


class QueueFull(Exception):
    pass


@dataclass(order=True)
class _Waiting:
    rows: int                                  # cheapest first,
    seq: int                                   # then oldest first
    request: PredictRequest = field(compare=False)
    future: asyncio.Future = field(compare=False)


EXPRESS_POLL_S = 0.005  # how often the express worker looks for requests cheaper than the batch being scored


class Batcher:
    """Groups waiting requests into batches, cheapest first (module docstring): the main worker scores them in
    turn; while it scores a costly batch, the express worker scores cheaper requests that arrive, the costly
    batch paused between its decoding passes meanwhile."""

    def __init__(self, scorer: Scorer, max_batch: int, max_wait_ms: float, max_rows: int = 320, max_queue: int = 256):
        self.scorer, self.max_batch, self.max_wait = scorer, max_batch, max_wait_ms / 1000
        self.max_rows, self.max_queue = max_rows, max_queue
        self.waiting: list[_Waiting] = []  # a heap; entries whose future is done (given up) are skipped
        self._arrived = asyncio.Event()
        self._seq = itertools.count()
        self._main_rows: int | None = None  # the cheapest request's rows in the main worker's batch
        self._main_busy = asyncio.Event()    # set while the main worker scores
        self._resume = threading.Event()     # cleared while the express worker scores
        self._resume.set()
        self.requests = self.batches = 0
        self.failed = self.isolated = 0  # requests that failed; requests re-run alone after their batch failed
        self.given_up = 0                # requests left unscored: their client hung up or they timed out

    def submit(self, request: PredictRequest) -> asyncio.Future:
        """The future of this request's score; QueueFull when `max_queue` requests wait."""
        if len(self.waiting) >= self.max_queue:
            self.waiting = [w for w in self.waiting if not w.future.done()]
            heapq.heapify(self.waiting)
            if len(self.waiting) >= self.max_queue:
                raise QueueFull
        future = asyncio.get_running_loop().create_future()
        future.add_done_callback(self._count_given_up)
        heapq.heappush(self.waiting, _Waiting(request.rows, next(self._seq), request, future))
        self._arrived.set()
        return future

    def _count_given_up(self, future: asyncio.Future) -> None:
        self.given_up += future.cancelled()

    async def run(self) -> None:
        express = asyncio.create_task(self._express())
        try:
            while True:
                await self._arrived.wait()
                if len(self.waiting) < self.max_batch:
                    await asyncio.sleep(self.max_wait)  # for others to batch with
                batch = self._take()
                if not self.waiting:
                    self._arrived.clear()
                if batch:
                    self._main_rows = batch[0].rows
                    self._main_busy.set()
                    try:
                        await self._score(batch, self._resume.wait)
                    finally:
                        self._main_rows = None
                        self._main_busy.clear()
        finally:
            express.cancel()

    async def _express(self) -> None:
        while True:
            await self._main_busy.wait()
            await asyncio.sleep(EXPRESS_POLL_S)
            first = self._cheapest()
            if self._main_rows is None or first is None or not self._main_rows > 2 * first.rows:
                continue
            batch = self._take()  # all within 2x of `first`: cheaper than the main worker's batch
            self._resume.clear()
            try:
                await self._score(batch)
            finally:
                self._resume.set()

    def _cheapest(self) -> _Waiting | None:
        while self.waiting and self.waiting[0].future.done():
            heapq.heappop(self.waiting)
        return self.waiting[0] if self.waiting else None

    def _take(self) -> list[_Waiting]:
        """The cheapest waiting requests within 2x of the cheapest's rows, up to max_batch and max_rows."""
        batch, rows = [], 0
        while (first := self._cheapest()) is not None and len(batch) < self.max_batch:
            if batch and (first.rows > 2 * batch[0].rows or rows + first.rows > self.max_rows):
                break
            batch.append(heapq.heappop(self.waiting))
            rows += first.rows
        return batch

    async def _score(self, batch: list[_Waiting], between_passes=None) -> None:
        """Score a batch together; if that fails, each request alone, so only the one at fault fails."""
        requests = [w.request for w in batch]
        try:
            scores = await asyncio.to_thread(self.scorer.score, [r.sessions for r in requests], requests,
                                             between_passes)
        except Exception as err:  # noqa: BLE001 (the caller gets the error; the service keeps running)
            if len(batch) > 1:
                self.isolated += len(batch)
                for one in batch:
                    await self._score([one], between_passes)
                return
            self.failed += 1
            if not batch[0].future.done():
                batch[0].future.set_exception(err)
            return
        self.requests, self.batches = self.requests + len(batch), self.batches + 1
        for w, score in zip(batch, scores):
            if not w.future.done():  # a client that went away cancelled its future
                w.future.set_result(score)


class SafeJSONResponse(JSONResponse):
    """JSON that any request's error can be written in: non-ASCII escaped (a lone surrogate a client sent
    cannot be UTF-8 encoded), NaN and infinities (which JSON lacks) as text."""

    def render(self, content) -> bytes:
        return json.dumps(_finite(jsonable_encoder(content)), ensure_ascii=True, allow_nan=False).encode()


def _finite(value):
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


class BodyLimit:
    """ASGI middleware: 413 for a request body over `max_bytes` (declared or streamed); a client that hangs up
    mid-body is dropped without calling the app."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and int(declared) > self.max_bytes:
            return await self._too_large(scope, receive, send)
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                return await self._too_large(scope, receive, send)
            more = message.get("more_body", False)
        body = {"type": "http.request", "body": b"".join(chunks), "more_body": False}
        await self.app(scope, _replay(body, receive), send)

    async def _too_large(self, scope, receive, send):
        detail = f"request body over {self.max_bytes} bytes"
        await JSONResponse({"detail": detail}, status_code=413)(scope, receive, send)


def _replay(body: dict, receive):
    """`receive` giving the whole body once, then the server's messages (which tell when the client hangs up)."""
    pending = [body]

    async def replay():
        return pending.pop() if pending else await receive()
    return replay


class BearerToken:
    """ASGI middleware: 401 for a request without `Authorization: Bearer <token>` (/health stays open)."""

    def __init__(self, app, token: str):
        self.app, self.expected = app, f"Bearer {token}".encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] == "/health" or hmac.compare_digest(
                dict(scope["headers"]).get(b"authorization", b""), self.expected):
            return await self.app(scope, receive, send)
        response = JSONResponse({"detail": "missing or wrong bearer token (Authorization: Bearer <token>)"}, 401,
                                headers={"WWW-Authenticate": "Bearer"})
        await response(scope, receive, send)


async def _hung_up(request: Request) -> None:
    """Returns when the client closes its connection."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def create_app(model: str | Path | Scorer, tokenizer_dir: str | Path | None = None, routing: str | None = None,
               max_new_tokens: int = 40, limits: ServeConfig | None = None) -> FastAPI:
    """The service for a model folder (or an already loaded `Scorer`, shared e.g. with `hetlm score`); requests
    are cleaned by the scorer's `cleaning`."""
    limits = limits or ServeConfig()
    scorer = model if isinstance(model, Scorer) else Scorer.from_pretrained(
        model, tokenizer_dir, routing=routing, max_new_tokens=max_new_tokens)
    cleaning = scorer.cleaning

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        app.state.batcher = Batcher(scorer, limits.max_batch, limits.max_wait_ms, limits.max_batch_rows,
                                    limits.max_queue)
        worker = asyncio.create_task(app.state.batcher.run())
        yield
        worker.cancel()

    app = FastAPI(title="hetlm", summary="next-session predictions from page-level LMs", lifespan=lifespan)
    app.add_middleware(BodyLimit, max_bytes=limits.max_body_bytes)  # innermost: after the checks below
    if limits.token is not None:
        app.add_middleware(BearerToken, token=limits.token)
    app.add_middleware(TrustedHostMiddleware, allowed_hosts=limits.allowed_hosts, www_redirect=False)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, err: RequestValidationError) -> JSONResponse:
        # FastAPI's own handler fails (500) on inputs JSON cannot hold: NaN, Infinity, lone surrogates.
        return SafeJSONResponse({"detail": err.errors()}, status_code=422)

    @app.post("/predict", response_model=PredictResponse)
    async def predict(body: PredictRequest, request: Request) -> PredictResponse:
        if len(body.sessions) > limits.max_sessions:
            raise HTTPException(413, f"{len(body.sessions)} sessions; at most {limits.max_sessions} per request")
        pages = sum(len(s) for s in body.sessions)
        if pages > limits.max_pages:
            raise HTTPException(413, f"{pages} pages; at most {limits.max_pages} per request")
        if body.n_samples > limits.max_n_samples:
            raise HTTPException(422, f"n_samples {body.n_samples}; this server draws at most {limits.max_n_samples}")
        removed = {}
        if body.clean:
            sessions, removed = cleaning.clean_user(body.sessions)
            if not sessions:
                raise HTTPException(422, f"no session of {cleaning.min_session_len} or more pages is left after "
                                         f"cleaning ({removed}); send \"clean\": false to use the sessions as sent")
            body = body.model_copy(update={"sessions": sessions})
        if not any(p in scorer.vocab for s in body.sessions for p in s):
            raise HTTPException(422, f"none of the pages sent is known to the model (e.g. {body.sessions[-1][0]!r}); "
                                     "a prediction would rest on [UNK] alone (GET /model: its vocabulary size)")
        if len(body.sessions[-1]) + 2 > scorer.history_budget:
            raise HTTPException(422, f"the last session has {len(body.sessions[-1])} pages; the model's context "
                                     f"holds {scorer.history_budget - 2}")
        try:
            future = request.app.state.batcher.submit(body)
        except QueueFull:
            raise HTTPException(503, f"{limits.max_queue} requests are waiting; retry later",
                                headers={"Retry-After": "1"}) from None
        gone = asyncio.ensure_future(_hung_up(request))
        done, _ = await asyncio.wait({future, gone}, timeout=limits.request_timeout_s,
                                     return_when=asyncio.FIRST_COMPLETED)
        gone.cancel()
        if future not in done:
            future.cancel()  # leaves the queue unscored (a batch being scored runs to its end)
            if gone in done:
                return Response(status_code=499)  # nobody reads it
            raise HTTPException(503, f"not answered within {limits.request_timeout_s:g} s (the server is busy); "
                                     "retry later", headers={"Retry-After": "1"})
        if future.exception() is not None:  # this request only: its batch was re-run without it
            err = future.exception()
            return SafeJSONResponse({"detail": f"scoring this request failed ({type(err).__name__}: {err})"}, 500)
        return prediction_response(future.result(), body.n_samples, removed)

    @app.get("/health")
    async def health(request: Request) -> dict:
        batcher = request.app.state.batcher
        return {"status": "ok", "requests": batcher.requests, "batches": batcher.batches, "failed": batcher.failed,
                "rerun_alone": batcher.isolated, "given_up": batcher.given_up,
                "waiting": sum(not w.future.done() for w in batcher.waiting)}

    @app.get("/model")
    async def describe() -> dict:
        return scorer.describe() | {"limits": limits.model_dump(exclude={"token"})}

    return app


def guarded_protocol(header_timeout_s: float, body_timeout_s: float, max_connections: int) -> type:
    """uvicorn's h11 protocol with the guards it lacks against clients that hold connections open (uvicorn
    times out idle keep-alive connections only): a connection whose request headers are not complete
    `header_timeout_s` after it opened or after its last response, or whose body is not complete
    `body_timeout_s` after its headers, is closed; and at most `max_connections` stay open: a new one closes
    the connection that has waited longest for its client's request, among those that never had a request
    answered first (kept-alive clients last; never one whose request is being answered), or, when every one
    is being answered, gets a 503 itself. Bodies are buffered only while they
    arrive, so held bodies take at most max_connections x max_body_bytes."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    timeouts = {h11.IDLE: header_timeout_s, h11.SEND_BODY: body_timeout_s}
    detail = b'{"detail": "too many open connections; retry later"}'
    busy = (b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nconnection: close\r\n"
            b"content-length: %d\r\n\r\n%s" % (len(detail), detail))

    class Guarded(H11Protocol):
        _timer = None
        _owed = None           # what the client owes: h11.IDLE (request headers) or h11.SEND_BODY; None: nothing
        waiting_since = None   # loop time since when it owes it
        answered = False       # whether a request of this connection was answered

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            if len(self.connections) > max_connections:  # closing ones too: they hold a descriptor until lost
                waiting = [c for c in self.connections
                           if c is not self and c.waiting_since is not None and not c.transport.is_closing()]
                if not waiting:
                    transport.write(busy)
                    transport.close()
                    return
                min(waiting, key=lambda c: (c.answered, c.waiting_since)).transport.close()
            self._track()

        def handle_events(self) -> None:
            super().handle_events()
            self._track()

        def on_response_complete(self) -> None:
            self.answered = True
            super().on_response_complete()
            self._track()

        def connection_lost(self, exc) -> None:
            self._owe(None)
            super().connection_lost(exc)

        def _track(self) -> None:
            state = self.conn.their_state
            self._owe(state if state in timeouts and not self.transport.is_closing() else None)

        def _owe(self, state) -> None:
            if state is self._owed:
                return
            if self._timer is not None:
                self._timer.cancel()
            self._owed, self._timer, self.waiting_since = state, None, None
            if state is not None:
                self.waiting_since = self.loop.time()
                self._timer = self.loop.call_later(timeouts[state], self.transport.close)

    return Guarded


# asyncio accepts up to `backlog` connections per turn of the event loop, and a connection reaches
# `connection_made` (where the cap applies) two or three turns later: the file descriptors kept below the file
# limit are those bursts plus the model's files, logs and sockets.
BACKLOG = 16
FD_MARGIN = 4 * BACKLOG + 64


def serve(model: str | Path | Scorer, host: str = "127.0.0.1", port: int = 8000, **options) -> None:
    """Run the service with uvicorn until interrupted (options go to `create_app`); the bound host is an allowed
    Host header name too, unless it is a wildcard address."""
    import resource

    import uvicorn

    limits = options.pop("limits", None) or ServeConfig()
    if host not in ("0.0.0.0", "::", "") and host not in limits.allowed_hosts:
        named = f"[{host}]" if ":" in host else host  # an IPv6 address as a Host header writes it
        limits = limits.model_copy(update={"allowed_hosts": [*limits.allowed_hosts, named]})
    files = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    connections = limits.max_connections if files == resource.RLIM_INFINITY else min(
        limits.max_connections, max(files - FD_MARGIN, 1))
    uvicorn.run(create_app(model, limits=limits, **options), host=host, port=port, backlog=BACKLOG,
                http=guarded_protocol(limits.header_timeout_s, limits.body_timeout_s, connections))
