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

    .venv/bin/python bench/bench_serve.py --attack [--slow-clients 300] [--heavy-clients 2] [--rounds 2]
                                          [--server-files 256]

--attack: light requests (as above, at the first --concurrency) alone, then beside attackers, --rounds times in
turn: --slow-clients connections that each send a /predict's headers (Content-Length 100000) and one body
byte, then hold (reconnecting --reconnect-s after the server closes them), and --heavy-clients clients sending requests at the
server's max_n_samples in a loop. The server runs with a file limit of --server-files (the red team's
`ulimit -n 256`). Per phase: the light requests' p50/p99 and failures, the heavy requests' answers, the
slow connections the server closed, and the most sockets the server held open (sampled from /proc).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
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

from hetlm.serve import BACKLOG, FD_MARGIN

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


def start_server(model: Path, prepared: Path, port: int, max_batch: int, files: int | None = None,
                 log=None) -> subprocess.Popen:
    """`hetlm serve` in a process of its own (with at most `files` open files; its stderr into `log`)."""
    def limit_files():
        resource.setrlimit(resource.RLIMIT_NOFILE, (files, files))

    # --tokenizer: model folders of runs older than self-contained ones hold none
    server = subprocess.Popen([sys.executable, "-m", "hetlm.cli", "serve", str(model), "--port", str(port),
                               "--max-batch", str(max_batch), "--tokenizer", str(prepared / "tokenizer")],
                              cwd=REPO, stdout=subprocess.DEVNULL, stderr=log,
                              preexec_fn=limit_files if files else None)
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


def stop_server(server: subprocess.Popen) -> None:
    server.terminate()
    try:
        server.wait(30)
    except subprocess.TimeoutExpired:  # still waiting on connections after 30 s
        server.kill()
        server.wait()


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


def open_files(pid: int) -> tuple[int, int]:
    """Sockets and all files the process holds open."""
    sockets = files = 0
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            sockets += os.readlink(fd).startswith("socket:")
            files += 1
        except OSError:  # closed meanwhile
            pass
    return sockets, files


def rss_mb(pid: int) -> float:
    line = next(x for x in Path(f"/proc/{pid}/status").read_text().splitlines() if x.startswith("VmRSS:"))
    return int(line.split()[1]) / 1024


async def slow_body_client(port: int, stop: asyncio.Event, counts: dict, pause_s: float) -> None:
    """Sends a request's headers and one byte of its body, holds the connection until the server closes it,
    and does it again `pause_s` later, until `stop`."""
    head = (b"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Content-Length: 100000\r\n\r\n{")
    stopped = asyncio.ensure_future(stop.wait())
    while not stop.is_set():
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            counts["refused"] += 1
            await asyncio.sleep(0.1)
            continue
        counts["opened"] += 1
        try:
            writer.write(head)
            await writer.drain()
            reading = asyncio.ensure_future(reader.read())
            await asyncio.wait({reading, stopped}, return_when=asyncio.FIRST_COMPLETED)
            counts["closed_by_server"] += reading.done()
            reading.cancel()
        except OSError:
            counts["closed_by_server"] += 1
        finally:
            writer.close()
        await asyncio.wait({stopped}, timeout=pause_s)
    stopped.cancel()


async def heavy_client(url: str, body: bytes, stop: asyncio.Event, statuses: dict) -> None:
    async with httpx.AsyncClient(base_url=url, timeout=120) as http:
        while not stop.is_set():
            try:
                status = (await http.post("/predict", content=body,
                                          headers={"content-type": "application/json"})).status_code
            except httpx.HTTPError as err:
                status = type(err).__name__
            statuses[str(status)] = statuses.get(str(status), 0) + 1


async def attacked(url: str, port: int, pid: int, bodies: list[bytes], heavy: bytes, n_requests: int,
                   concurrency: int, slow_clients: int, heavy_clients: int, idle_sockets: int,
                   reconnect_s: float) -> dict:
    """The light load of `load` beside slow-body and heavy clients (none: the light load alone), with the
    server's open connections (sockets beyond the `idle_sockets` of an idle server) and memory sampled."""
    stop, counts, statuses = asyncio.Event(), {"opened": 0, "closed_by_server": 0, "refused": 0}, {}
    peak = {"sockets": 0, "files": 0, "rss_mb": 0.0}

    async def sample():
        while not stop.is_set():
            sockets, files = open_files(pid)
            peak["sockets"], peak["files"] = max(peak["sockets"], sockets), max(peak["files"], files)
            peak["rss_mb"] = max(peak["rss_mb"], rss_mb(pid))
            await asyncio.sleep(0.1)

    attackers = [asyncio.ensure_future(slow_body_client(port, stop, counts, reconnect_s)) for _ in range(slow_clients)]
    attackers += [asyncio.ensure_future(heavy_client(url, heavy, stop, statuses)) for _ in range(heavy_clients)]
    attackers.append(asyncio.ensure_future(sample()))
    if slow_clients or heavy_clients:
        await asyncio.sleep(3)  # the attack under way before the light requests start
    latencies, failed, _, _, seconds = await load(url, bodies, n_requests, concurrency)
    stop.set()
    for task in attackers:
        task.cancel()
    await asyncio.gather(*attackers, return_exceptions=True)
    ms = 1000 * np.array(latencies) if latencies else np.array([np.nan])
    return {"slow_clients": slow_clients, "heavy_clients": heavy_clients, "light_requests": n_requests,
            "light_failed": failed, "light_p50_ms": float(np.percentile(ms, 50)),
            "light_p99_ms": float(np.percentile(ms, 99)), "light_ms": ms.tolist(), "seconds": seconds,
            "heavy_answers": statuses, "slow_opened": counts["opened"],
            "slow_closed_by_server": counts["closed_by_server"], "slow_refused": counts["refused"],
            "server_connections_max": peak["sockets"] - idle_sockets, "server_files_max": peak["files"],
            "server_rss_max_mb": peak["rss_mb"]}


def attack_bench(args, model: Path, prepared: Path, bodies: list[bytes], log_path: Path) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = open(log_path, "w")
    server = start_server(model, prepared, port, args.max_batch, args.server_files, log)
    rows = []
    try:
        limits = httpx.get(f"{url}/model").json()["limits"]
        histories = json.loads(bodies[0])["sessions"]
        heavy = json.dumps({"sessions": histories, "n_samples": limits["max_n_samples"], "k": 10}).encode()
        idle = open_files(server.pid)[0]  # the listening socket and the event loop's own
        asyncio.run(load(url, bodies, 8, 4))  # warm-up
        for _ in range(args.rounds):
            for slow, heavy_clients in ((0, 0), (args.slow_clients, args.heavy_clients)):
                rows.append(asyncio.run(attacked(url, port, server.pid, bodies, heavy, args.requests,
                                                 args.concurrency[0], slow, heavy_clients, idle, args.reconnect_s)))
        health = httpx.get(f"{url}/health").json()
    finally:
        stop_server(server)
        log.close()
    out_of_files = log_path.read_text().count("Too many open files")
    alone = np.concatenate([r.pop("light_ms") for r in rows[0::2]])
    beside = np.concatenate([r.pop("light_ms") for r in rows[1::2]])
    p99_alone, p99_beside = float(np.percentile(alone, 99)), float(np.percentile(beside, 99))
    cap = min(limits["max_connections"], args.server_files - FD_MARGIN) if args.server_files else limits["max_connections"]
    settings = {"model": str(model), "requests": args.requests, "concurrency": args.concurrency[0],
                "n_samples": args.n_samples, "heavy_n_samples": limits["max_n_samples"],
                "slow_clients": args.slow_clients, "reconnect_s": args.reconnect_s, "heavy_clients": args.heavy_clients,
                "rounds": args.rounds,
                "server_files": args.server_files, "connection_cap": cap, "accept_backlog": BACKLOG, "users": len(bodies)}
    summary = {"light_p99_ms_alone": p99_alone, "light_p99_ms_attacked": p99_beside,
               "light_p99_attacked_over_alone": p99_beside / p99_alone,
               "light_failed_attacked": sum(r["light_failed"] for r in rows[1::2]),
               "light_failed_alone": sum(r["light_failed"] for r in rows[0::2]),
               "server_connections_max": max(r["server_connections_max"] for r in rows),
               "server_files_max": max(r["server_files_max"] for r in rows),
               "server_out_of_files_errors": out_of_files,
               "server_given_up": health["given_up"]}
    record("bench_serve_attack", settings, rows, summary)


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
    parser.add_argument("--attack", action="store_true", help="light requests alone and beside attackers")
    parser.add_argument("--slow-clients", type=int, default=300)
    parser.add_argument("--reconnect-s", type=float, default=1.0, help="a slow client's pause before reconnecting")
    parser.add_argument("--heavy-clients", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2, help="--attack: light alone, then attacked, this many times")
    parser.add_argument("--server-files", type=int, default=256, help="--attack: the server's open-file limit")
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
        if args.attack:
            return attack_bench(args, model, prepared, bodies, Path(tmp) / "server.log")
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
            stop_server(server)
    settings = {"model": str(model), "requests": args.requests, "concurrency": args.concurrency,
                "n_samples": args.n_samples, "max_batch": args.max_batch, "users": len(bodies),
                "poison_every": args.poison_every}
    summary = {"all_requests_ok": all(r["failed"] == 0 for r in rows),
               "poisoned_requests_all_4xx": all(r["poisoned_mishandled"] == 0 for r in rows),
               "throughput_x_vs_first": rows[-1]["req_per_s"] / rows[0]["req_per_s"]}
    record("bench_serve", settings, rows, summary)


if __name__ == "__main__":
    main()
