"""Load test of `hetlm serve`: a fixed number of /predict requests from C concurrent clients on loopback.

    .venv/bin/python bench/bench_serve.py [--model DIR] [--requests 400] [--concurrency 1 4 16] [--n-samples 8]

Starts its own server (`hetlm serve`, a separate process) on the demo run's small LM (runs/demo/models/small,
histories from runs/demo/prepared/test.parquet) or, without a demo run, on a tiny LM it trains for
--train-steps steps on the shipped Taobao sample. Each request is one test user's history with
greedy decoding and an n_samples-draw outcome estimate. Per concurrency: requests/s, p50/p99 latency,
failed requests and the mean number of requests the server scored per batch (dynamic batching). Stops
by itself; the server is stopped at the end.
"""

from __future__ import annotations

import argparse
import asyncio
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
    model.save_pretrained(folder / "model")
    tokenizer.save_pretrained(folder / "model")
    return folder / "model", prepared


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: Path, port: int, max_batch: int) -> subprocess.Popen:
    server = subprocess.Popen([sys.executable, "-m", "hetlm.cli", "serve", str(model), "--port", str(port),
                               "--max-batch", str(max_batch)], cwd=REPO, stdout=subprocess.DEVNULL)
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


async def load(url: str, bodies: list[dict], n_requests: int, concurrency: int) -> tuple[list[float], int, float]:
    """Latencies (s) of the successful requests, failures, and wall seconds for n_requests requests."""
    latencies, failed, next_request = [], 0, iter(range(n_requests))

    async def client(http: httpx.AsyncClient) -> None:
        nonlocal failed
        for i in next_request:  # the clients share one iterator: n_requests in all
            started = time.perf_counter()
            try:
                ok = (await http.post("/predict", json=bodies[i % len(bodies)])).status_code == 200
            except httpx.HTTPError:
                ok = False
            if ok:
                latencies.append(time.perf_counter() - started)
            else:
                failed += 1

    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as http:
        started = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(concurrency)))
        return latencies, failed, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, help="model folder (default: the demo's small LM, else train one)")
    parser.add_argument("--prepared", type=Path, help="prepared folder whose test histories are sent")
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--n-samples", type=int, default=8, help="outcome draws per request")
    parser.add_argument("--max-batch", type=int, default=32)
    parser.add_argument("--train-steps", type=int, default=100)
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
        bodies = [{"sessions": h, "n_samples": args.n_samples, "k": 10} for h in histories]
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        server = start_server(model, port, args.max_batch)
        rows = []
        try:
            asyncio.run(load(url, bodies, 8, 4))  # warm-up
            for concurrency in args.concurrency:
                before = httpx.get(f"{url}/health").json()
                latencies, failed, seconds = asyncio.run(load(url, bodies, args.requests, concurrency))
                after = httpx.get(f"{url}/health").json()
                ms = 1000 * np.array(latencies) if latencies else np.array([np.nan])
                rows.append({"concurrency": concurrency, "requests": args.requests, "failed": failed,
                             "seconds": seconds, "req_per_s": len(latencies) / seconds,
                             "p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99)),
                             "mean_batch": (after["requests"] - before["requests"]) /
                                           max(after["batches"] - before["batches"], 1)})
        finally:
            server.terminate()
            server.wait(30)
    settings = {"model": str(model), "requests": args.requests, "concurrency": args.concurrency,
                "n_samples": args.n_samples, "max_batch": args.max_batch, "users": len(bodies)}
    summary = {"all_requests_ok": all(r["failed"] == 0 for r in rows),
               "throughput_x_vs_first": rows[-1]["req_per_s"] / rows[0]["req_per_s"]}
    record("bench_serve", settings, rows, summary)


if __name__ == "__main__":
    main()
