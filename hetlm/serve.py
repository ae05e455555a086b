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

Malformed requests get 422 with pydantic's message; requests over the limits of `create_app` (body
bytes, sessions, pages) get 413. Page names are normalised as the ingest adapters do (whitespace -> "_").
Sessions are cleaned as `hetlm prepare` cleaned the model's training log (`sessions.SessionCleaning`, stored
with the tokenizer: immediate repeats of a page collapsed, sessions shorter than `min_session_len` pages
dropped, sessions longer than the training log's cutoff truncated or dropped; the response counts what
was removed), unless the request says `"clean": false`. A last session that still does not fit the
model's context gets 422.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
import unicodedata
from contextlib import asynccontextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Annotated

from fastapi import FastAPI, HTTPException, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictStr
from starlette.responses import JSONResponse

from .ingest.base import ZERO_WIDTH
from .score import ScoreConfig, Scorer, UserScore


def _page_name(page: str) -> str:
    """A page name as the ingest adapters normalise it (`ingest.base.normalize_pages`)."""
    try:
        page.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("a page name must be valid Unicode text (this one holds a lone surrogate)") from None
    name = re.sub(r"\s+", "_", re.sub(ZERO_WIDTH, "", unicodedata.normalize("NFC", page)).strip())
    if not name:
        raise ValueError("a page name must hold a non-space character")
    return name


Page = Annotated[StrictStr, AfterValidator(_page_name)]
Session = Annotated[list[Page], Field(min_length=1)]


class PredictRequest(ScoreConfig):
    sessions: list[Session] = Field(min_length=1, description="the user's sessions, oldest first; each a non-empty "
                                    "list of page names")
    clean: bool = Field(True, description="clean the sessions as `hetlm prepare` cleaned the training log "
                        "(immediate repeats collapsed, short sessions dropped, long ones cut); false uses them "
                        "as sent")


class PagePrediction(BaseModel):
    page: str
    probability: float


class PredictResponse(BaseModel):
    cluster: int | None = Field(description="the routed cluster (null for a single LM)")
    cluster_probability: float
    next_session: list[str]
    top_pages: list[PagePrediction] = Field(description="most likely first pages of the next session")
    p_cart: float | None = Field(description="n_samples 0: P(the next session's first page is Cart), exact; n_samples N: "
                                             "P(Cart anywhere in the next session), Monte Carlo over N sessions; null "
                                             "when the vocabulary has no Cart page")
    se_cart: float | None
    p_purchase: float | None
    se_purchase: float | None
    p_cart_calibrated: float | None = Field(description="p_cart after the model's Platt scaling; null without one")
    p_purchase_calibrated: float | None
    n_samples: int
    unknown_pages: list[str] = Field(description="pages not in the model's vocabulary, scored as [UNK]")
    sessions_used: int = Field(description="most recent sessions that fit the model's context")
    cleaning: dict[str, int] = Field(description="pages removed by cleaning, by reason (as in prepare's summary)")


class ServeConfig(BaseModel):
    """Request limits (413 above them) and dynamic batching settings of `create_app`."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    max_body_bytes: int = Field(1 << 20, ge=1)
    max_sessions: int = Field(1000, ge=1)
    max_pages: int = Field(20_000, ge=1)        # pages over all sessions of a request
    max_batch: int = Field(32, ge=1)            # requests scored together
    max_wait_ms: float = Field(5.0, ge=0)       # how long the first request of a batch waits for others
    header_timeout_s: float = Field(10.0, gt=0)  # a connection whose request headers take longer is closed (`serve`)


def _number(x: float) -> float | None:
    return None if math.isnan(x) else x  # NaN -> null


def prediction_response(score: UserScore, n_samples: int, cleaning: dict[str, int]) -> PredictResponse:
    s = asdict(score)
    return PredictResponse(
        cluster=s["cluster"], cluster_probability=s["cluster_prob"], next_session=s["next_session"],
        top_pages=[PagePrediction(page=p, probability=q) for p, q in zip(s["top_pages"], s["top_probs"])],
        **{key: _number(s[key]) for key in ("p_cart", "se_cart", "p_purchase", "se_purchase", "p_cart_calibrated",
                                            "p_purchase_calibrated")},
        n_samples=n_samples, unknown_pages=s["unknown_pages"], sessions_used=s["sessions_used"], cleaning=cleaning,
    )


class Batcher:
    """Groups queued requests into batches scored by one worker task."""

    def __init__(self, scorer: Scorer, max_batch: int, max_wait_ms: float):
        self.scorer, self.max_batch, self.max_wait = scorer, max_batch, max_wait_ms / 1000
        self.queue: asyncio.Queue = asyncio.Queue()
        self.requests = self.batches = 0
        self.failed = self.isolated = 0  # requests that failed; requests re-run alone after their batch failed

    async def predict(self, request: PredictRequest) -> UserScore:
        future = asyncio.get_running_loop().create_future()
        await self.queue.put((request, future))
        return await future

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self.queue.get()]
            deadline = loop.time() + self.max_wait
            while len(batch) < self.max_batch:
                try:
                    batch.append(await asyncio.wait_for(self.queue.get(), max(deadline - loop.time(), 0)))
                except asyncio.TimeoutError:
                    break
            await self._score(batch)

    async def _score(self, batch: list) -> None:
        """Score a batch together; if that fails, each request alone, so only the one at fault fails."""
        requests = [r for r, _ in batch]
        try:
            scores = await asyncio.to_thread(self.scorer.score, [r.sessions for r in requests], requests)
        except Exception as err:  # noqa: BLE001 (the caller gets the error; the service keeps running)
            if len(batch) > 1:
                self.isolated += len(batch)
                for one in batch:
                    await self._score([one])
                return
            self.failed += 1
            if not batch[0][1].done():
                batch[0][1].set_exception(err)
            return
        self.requests, self.batches = self.requests + len(batch), self.batches + 1
        for (_, future), score in zip(batch, scores):
            if not future.done():  # a client that went away cancelled its future
                future.set_result(score)


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
    """ASGI middleware: 413 for a request body over `max_bytes` (declared or streamed)."""

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
            if message["type"] != "http.request":
                return await self.app(scope, _replay([message]), send)
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                return await self._too_large(scope, receive, send)
            more = message.get("more_body", False)
        await self.app(scope, _replay([{"type": "http.request", "body": b"".join(chunks), "more_body": False}]), send)

    async def _too_large(self, scope, receive, send):
        detail = f"request body over {self.max_bytes} bytes"
        await JSONResponse({"detail": detail}, status_code=413)(scope, receive, send)


def _replay(messages: list[dict]):
    async def receive():
        return messages.pop(0) if messages else {"type": "http.disconnect"}
    return receive


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
        app.state.batcher = Batcher(scorer, limits.max_batch, limits.max_wait_ms)
        worker = asyncio.create_task(app.state.batcher.run())
        yield
        worker.cancel()

    app = FastAPI(title="hetlm", summary="next-session predictions from page-level LMs", lifespan=lifespan)
    app.add_middleware(BodyLimit, max_bytes=limits.max_body_bytes)

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
        removed = {}
        if body.clean:
            sessions, removed = cleaning.clean_user(body.sessions)
            if not sessions:
                raise HTTPException(422, f"no session of {cleaning.min_session_len} or more pages is left after "
                                         f"cleaning ({removed}); send \"clean\": false to use the sessions as sent")
            body = body.model_copy(update={"sessions": sessions})
        if len(body.sessions[-1]) + 2 > scorer.history_budget:
            raise HTTPException(422, f"the last session has {len(body.sessions[-1])} pages; the model's context "
                                     f"holds {scorer.history_budget - 2}")
        try:
            score = await request.app.state.batcher.predict(body)
        except Exception as err:  # noqa: BLE001 (this request only: its batch was re-run without it)
            return SafeJSONResponse({"detail": f"scoring this request failed ({type(err).__name__}: {err})"}, 500)
        return prediction_response(score, body.n_samples, removed)

    @app.get("/health")
    async def health(request: Request) -> dict:
        batcher = request.app.state.batcher
        return {"status": "ok", "requests": batcher.requests, "batches": batcher.batches, "failed": batcher.failed,
                "rerun_alone": batcher.isolated}

    @app.get("/model")
    async def describe() -> dict:
        return scorer.describe() | {"limits": limits.model_dump()}

    return app


def header_timeout_protocol(seconds: float) -> type:
    """uvicorn's h11 protocol, closing a connection whose request headers are not complete `seconds` after it
    opened or after its last response: uvicorn times out idle keep-alive connections only, so clients that
    stall mid-headers would hold connections (and file descriptors) forever."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class HeaderTimeout(H11Protocol):
        _timer = None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._arm()

        def handle_events(self) -> None:
            cycle = self.cycle
            super().handle_events()
            if self.cycle is not cycle:  # a request's headers are complete
                self._disarm()

        def connection_lost(self, exc) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _arm(self) -> None:
            self._disarm()
            self._timer = self.loop.call_later(seconds, self._too_slow)

        def _disarm(self) -> None:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None

        def _too_slow(self) -> None:
            if not self.transport.is_closing():
                self.transport.close()

    return HeaderTimeout


def serve(model: str | Path | Scorer, host: str = "127.0.0.1", port: int = 8000, **options) -> None:
    """Run the service with uvicorn until interrupted (options go to `create_app`)."""
    import uvicorn

    limits = options.get("limits") or ServeConfig()
    uvicorn.run(create_app(model, **options), host=host, port=port,
                http=header_timeout_protocol(limits.header_timeout_s))
