"""Load test of `hetlm serve`: a fixed number of /predict requests from C concurrent clients on loopback.

    .venv/bin/python bench/bench_serve.py [--model DIR] [--requests 400] [--concurrency 1 4 16] [--n-samples 8]
                                          [--poison-every N]

Starts its own server (`hetlm serve`, a separate process) on the demo run's small LM (runs/demo/models/small,
histories from runs/demo/prepared/test.parquet) or, without a demo run, on a tiny LM it trains for
--train-steps steps on the shipped Taobao sample. Each request is one test user's history with
greedy decoding and an n_samples-draw outcome estimate. Per concurrency: requests/s, p50/p99 latency,
failed requests and the mean number of requests the server scored per batch (dynamic batching). Stops
by itself; the server is stopped at the end. With --poison-every N every Nth request is one of POISONED
(malformed, NaN, a lone surrogate, over a limit): each must get a 4xx and every valid request still succeed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import polars as pl
from common import REPO, SHIPPED, record

DEMO = REPO / "runs" / "demo"


def tiny_model(folder: Path, steps: int) -> tuple[Path, Path]:
    """(model folder with its tokenizer, prepared folder): a tiny LM trained on the shipped sample."""
    import torch

    from hetlm.cluster.base import ClusterwiseLM
    from hetlm.models import build_model
    from hetlm.prepare import prepare
    from hetlm.tokenizer import load_tokenizer
    from hetlm.train import TrainConfig, train_lm

    prepared = folder / "prepared"
    prepare("taobao", SHIPPED, prepared)
    tokenizer = load_tokenizer(prepared / "tokenizer")
    torch.manual_seed(0)
    model = build_model("tiny", len(tokenizer))
    train_lm(model, pl.read_parquet(prepared / "train.parquet"), None,
             TrainConfig(lr=3e-3, max_steps=steps, early_stopping_patience=None, save_every=10**9),
             folder / "train", progress=False)
    ClusterwiseLM.single(model, tokenizer).save_pretrained(folder / "model")
    return folder / "model", prepared


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: Path, prepared: Path, port: int, max_batch: int) -> subprocess.Popen:
    # --tokenizer: model folders of runs older than self-contained ones hold none
    server = subprocess.Popen([sys.executable, "-m", "hetlm.cli", "serve", str(model), "--port", str(port),
                               "--max-batch", str(max_batch), "--tokenizer", str(prepared / "tokenizer")],
                              cwd=REPO, stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"the server exited with code {server.returncode}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                return server
        except httpx.TransportError:
            time.sleep(0.5)
    server.terminate()
    raise RuntimeError("the server did not answer /health within 180 s")


# Requests no valid user sends, mixed into the valid ones (--poison-every): each must get its own 4xx, and the
# valid requests batched with them must all succeed.
POISONED = [
    b'{"sessions": [["a", "b"]], "temperature": NaN}',
    b'{"sessions": [["a", "\\ud800"]]}',                      # a lone surrogate
    b'{"sessions": [["a", "b"]], "k": true}',
    b'{"sessions": [["a", "b"]], "seed": ' + str(10**100).encode() + b'}',
    b'{"sessions": [["a", "b"]], "temperature": 1e-40}',
    b'{"sessions": [["a", "b"]], "clean": false, "n_samples": 0, "k": 1, "sessions": [["p"' + b', "p"' * 5000 + b']]}',
    b'{"sessions": [["a", "b"]]',                               # cut short
    b'{"sessions": []}',
]


async def load(url: str, bodies: list[bytes], n_requests: int, concurrency: int,
               poison_every: int = 0) -> tuple[list[float], int, int, int, float]:
    """Latencies (s) of the successful valid requests, failed valid requests, poisoned requests answered 4xx,
    poisoned requests answered otherwise (5xx, or 200), and wall seconds for n_requests requests."""
    latencies, failed, rejected, mishandled, next_request = [], 0, 0, 0, iter(range(n_requests))

    async def client(http: httpx.AsyncClient) -> None:
        nonlocal failed, rejected, mishandled
        for i in next_request:  # the clients share one iterator: n_requests in all
            poisoned = poison_every and i % poison_every == poison_every - 1
            content = POISONED[i // poison_every % len(POISONED)] if poisoned else bodies[i % len(bodies)]
            started = time.perf_counter()
            try:
                status = (await http.post("/predict", content=content,
                                          headers={"content-type": "application/json"})).status_code
            except httpx.HTTPError:
                status = None
            if poisoned:
                rejected += status is not None and 400 <= status < 500
                mishandled += not (status is not None and 400 <= status < 500)
            elif status == 200:
                latencies.append(time.perf_counter() - started)
            else:
                failed += 1

    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as http:
        started = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(concurrency)))
        return latencies, failed, rejected, mishandled, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, help="model folder (default: the demo's small LM, else train one)")
    parser.add_argument("--prepared", type=Path, help="prepared folder whose test histories are sent")
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--n-samples", type=int, default=8, help="outcome draws per request")
    parser.add_argument("--max-batch", type=int, default=32)
    parser.add_argument("--train-steps", type=int, default=100)
    parser.add_argument("--poison-every", type=int, default=0,
                        help="every Nth request is malformed or over a limit (0: none); valid ones must all succeed")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        model, prepared = args.model, args.prepared
        if model is None and (DEMO / "models" / "small").is_dir():
            model, prepared = DEMO / "models" / "small", prepared or DEMO / "prepared"
        elif model is None:
            model, prepared = tiny_model(Path(tmp), args.train_steps)
        if prepared is None:
            parser.error("--prepared is needed with --model")
        histories = pl.read_parquet(prepared / "test.parquet")["history"].to_list()
        bodies = [json.dumps({"sessions": h, "n_samples": args.n_samples, "k": 10}).encode() for h in histories]
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        server = start_server(model, prepared, port, args.max_batch)
        rows = []
        try:
            asyncio.run(load(url, bodies, 8, 4))  # warm-up
            for concurrency in args.concurrency:
                before = httpx.get(f"{url}/health").json()
                latencies, failed, rejected, mishandled, seconds = asyncio.run(
                    load(url, bodies, args.requests, concurrency, args.poison_every))
                after = httpx.get(f"{url}/health").json()
                ms = 1000 * np.array(latencies) if latencies else np.array([np.nan])
                rows.append({"concurrency": concurrency, "requests": args.requests, "failed": failed,
                             "poisoned_4xx": rejected, "poisoned_mishandled": mishandled,
                             "seconds": seconds, "req_per_s": len(latencies) / seconds,
                             "p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99)),
                             "mean_batch": (after["requests"] - before["requests"]) /
                                           max(after["batches"] - before["batches"], 1)})
        finally:
            server.terminate()
            server.wait(30)
    settings = {"model": str(model), "requests": args.requests, "concurrency": args.concurrency,
                "n_samples": args.n_samples, "max_batch": args.max_batch, "users": len(bodies),
                "poison_every": args.poison_every}
    summary = {"all_requests_ok": all(r["failed"] == 0 for r in rows),
               "poisoned_requests_all_4xx": all(r["poisoned_mishandled"] == 0 for r in rows),
               "throughput_x_vs_first": rows[-1]["req_per_s"] / rows[0]["req_per_s"]}
    record("bench_serve", settings, rows, summary)


if __name__ == "__main__":
    main()
