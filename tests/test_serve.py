"""The HTTP service, started for real with uvicorn on loopback and called with httpx, on a micro k-means
clusterwise model: predictions equal `hetlm score`'s (same fields), validation (422), limits (413), dynamic
batching, compute bounds (queue, 503, cancellation), Host and token checks, connection guards, untrusted folders."""

import asyncio
import dataclasses
import json
import shutil
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import httpx
import numpy as np
import polars as pl
import pytest
import uvicorn
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from hetlm.cli import app as cli
from hetlm.cluster.base import ClusterwiseLM, load_model
from hetlm.cluster.kmeans import KMeansClusterwise
from hetlm.encoders import encoder_from_settings
from hetlm.outcomes import OutcomeCalibrator
from hetlm.score import ScoreConfig, Scorer, log_sessions
from hetlm.serve import Batcher, PredictRequest, ServeConfig, create_app, guarded_protocol
from hetlm.tokenizer import load_tokenizer
from hetlm.train import TrainConfig

from .test_score import assert_same_score, log_head, train_micro

LIMITS = ServeConfig(max_body_bytes=40_000, max_sessions=40, max_pages=400, max_batch=8, max_wait_ms=20,
                     max_n_samples=32, max_batch_rows=100)
OPTIONS = {"k": 5, "n_samples": 4, "seed": 2}
CALIBRATOR = OutcomeCalibrator({"cart": (0.5, -1.0), "purchase": (0.8, -2.0)}, n_samples=4, n_users=50)


@contextmanager
def running(app, **config):
    """The app served by uvicorn in a thread on a free loopback port; yields its base URL."""
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", **config))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "server did not start"
        time.sleep(0.05)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)


@pytest.fixture(scope="module")
def clusterwise(taobao_prepared, tmp_path_factory):
    """Two k-means clusters of a micro LM, each fine-tuned a few steps, saved as `hetlm experiment` does."""
    prepared = taobao_prepared[0]
    folder = tmp_path_factory.mktemp("clusterwise")
    base = AutoModelForCausalLM.from_pretrained(train_micro(prepared, folder))
    encoder = {"name": "pagebag", "pooling": "mean", "model_name_or_path": None, "cache_dir": str(folder / "cache")}
    train = pl.read_parquet(prepared / "train.parquet").head(300)
    val = pl.read_parquet(prepared / "val.parquet").head(50)
    embed = encoder_from_settings(encoder).set_params(show_progress=False).transform
    config = TrainConfig(max_steps=3, batch_size=32, max_len=128, eval_every=10_000, save_every=10_000,
                         early_stopping_patience=None)
    model = KMeansClusterwise(2, folder / "train_clusters", config, progress=False).fit(
        base, train, embed(train["history"].to_list()), val, embed(val["history"].to_list()), encoder)
    model.save_pretrained(folder / "kmeans", load_tokenizer(prepared / "tokenizer"))
    CALIBRATOR.save_pretrained(folder / "kmeans")  # as `hetlm experiment` leaves one in each model folder
    return folder / "kmeans"


def test_model_folders_load_by_themselves(clusterwise, taobao_prepared, tmp_path):
    """A single-LM folder and a clusterwise folder each load with `load_model(path)` alone, tokenizer included,
    and score as the same LMs loaded by plain transformers beside the prepared tokenizer; without its
    tokenizer a folder is a clear error."""
    prepared = taobao_prepared[0]
    tokenizer = load_tokenizer(prepared / "tokenizer")
    histories = pl.read_parquet(prepared / "test.parquet")["history"].to_list()[:6]
    options = [ScoreConfig(k=5, n_samples=4, seed=1), ScoreConfig(strategy="sample", n_samples=2, seed=3)] * 3
    single = clusterwise.parent / "model"  # the LM the k-means clusters were fine-tuned from (`train_micro`)
    for folder in (single, clusterwise):
        model = load_model(folder)
        assert model.tokenizer.get_vocab() == tokenizer.get_vocab() and model.routed == (folder == clusterwise)
        if model.routed:
            plain = dataclasses.replace(model, tokenizer=tokenizer, models={
                k: AutoModelForCausalLM.from_pretrained(folder / f"cluster_{k}") for k in model.active})
        else:
            plain = ClusterwiseLM.single(AutoModelForCausalLM.from_pretrained(folder), tokenizer)
        got = Scorer(model, max_new_tokens=10).score(histories, options)
        for a, b in zip(got, Scorer(plain, max_new_tokens=10).score(histories, options), strict=True):
            assert_same_score(a, b)
        assert {s.cluster for s in got} <= ({0, 1} if model.routed else {None})
    bare = tmp_path / "bare"
    shutil.copytree(single, bare)
    shutil.rmtree(bare / "tokenizer")
    with pytest.raises(ValueError, match="no page tokenizer"):
        load_model(bare)


@pytest.fixture(scope="module")
def server(clusterwise):
    with running(create_app(clusterwise, max_new_tokens=10, limits=LIMITS)) as url, \
            httpx.Client(base_url=url, timeout=60) as client:
        yield client


def test_health_model_and_openapi(server, taobao_prepared):
    assert server.get("/health").json()["status"] == "ok"
    model = server.get("/model").json()
    assert model["kind"] == "kmeans" and model["clusters"] == [0, 1] and model["routing"] == "centroid"
    assert model["pages"] > 1000 and model["history_budget_tokens"] == 128 - 10 - 1
    assert model["limits"]["max_sessions"] == 40
    # How prepare cleaned the training log, recorded in its tokenizer and kept by the model folder's copy.
    assert model["cleaning"] == {"gap_minutes": 30.0, "use_log_sessions": True, "collapse_repeats": True,
                                 "min_session_len": 2, "long_sessions": "truncate", "long_session_percentile": 99.0,
                                 "long_session_cutoff": taobao_prepared[1]["long_session_cutoff"]}
    assert model["outcome_calibration"]["coefficients"] == {"cart": [0.5, -1.0], "purchase": [0.8, -2.0]}
    spec = server.get("/openapi.json").json()
    assert "/predict" in spec["paths"] and "PredictRequest" in spec["components"]["schemas"]


def test_predictions_equal_score_command(server, clusterwise, tmp_path):
    log = log_head(tmp_path / "log.csv", 3000)
    out = tmp_path / "scores.parquet"
    result = CliRunner().invoke(cli, ["score", str(clusterwise), str(log), "--source", "taobao", "--out", str(out),
                                      "--max-new-tokens", "10", "--k", "5", "--n-samples", "4", "--seed", "2"])
    assert result.exit_code == 0, result.output
    scores = pl.read_parquet(out)
    assert set(scores["cluster"].to_list()) <= {0, 1} and scores["cluster_prob"].is_between(0, 1).all()
    sessions, _ = log_sessions("taobao", log)
    for row in scores.head(4).iter_rows(named=True):
        history = sessions.filter(pl.col("user") == row["user"]).sort("session")["pages"].to_list()
        got = server.post("/predict", json={"sessions": history, **OPTIONS})
        assert got.status_code == 200, got.text
        got = got.json()
        # the fields of score's Parquet, by the same names and shapes
        assert set(row) - {"user"} <= set(got)
        assert got["cluster"] == row["cluster"] and got["cluster_prob"] == pytest.approx(row["cluster_prob"])
        assert got["next_session"] == row["next_session"] and got["decoder"] == row["decoder"]
        assert got["top_pages"] == row["top_pages"]
        np.testing.assert_allclose(got["top_probs"], row["top_probs"], rtol=1e-4)
        assert (got["p_cart"], got["p_purchase"]) == (row["p_cart"], row["p_purchase"])
        assert (got["p_cart_calibrated"], got["p_purchase_calibrated"]) == (
            row["p_cart_calibrated"], row["p_purchase_calibrated"]) == pytest.approx(
            (CALIBRATOR.transform("cart", [row["p_cart"]])[0], CALIBRATOR.transform("purchase", [row["p_purchase"]])[0]))
        assert got["sessions_used"] == row["sessions_used"] and got["n_samples"] == 4


def test_unknown_pages_are_reported(server):
    body = {"sessions": [["category_2520377", "Cart"], ["no such page", "Cart", "another_unknown"]], "n_samples": 0}
    got = server.post("/predict", json=body).json()
    assert got["unknown_pages"] == ["no_such_page", "another_unknown"]  # normalised like ingest, then [UNK]
    # n_samples 0: the exact probability that the first page is Cart, no sampling; no whole-session estimate
    assert 0 < got["p_cart_first_page"] < 1 and got["p_cart"] is None and got["n_samples"] == 0 and len(got["top_pages"]) == 10


def test_a_request_of_unknown_pages_only_gets_422(server):
    got = server.post("/predict", json={"sessions": [["no such page", "nor this"], ["x_1", "x_2"]], "n_samples": 0})
    assert got.status_code == 422 and "none of the pages sent is known" in got.json()["detail"]


def test_raw_sessions_are_cleaned_as_prepare_cleans_a_log(server):
    clean = [["category_2520377", "Cart", "category_4159072"], ["Cart", "category_2520377"]]
    raw = [["category_2520377", "category_2520377", "Cart", "category_4159072", "category_4159072"], ["Cart"],
           ["Cart", "Cart", "category_2520377"]]
    options = {"n_samples": 2, "seed": 1}
    got_clean, got_raw = (server.post("/predict", json={"sessions": s, **options}).json() for s in (clean, raw))
    assert got_clean["cleaning"] == {}
    assert got_raw.pop("cleaning") == {"immediate repeat of the same page (collapsed)": 3,
                                       "session shorter than 2 pages": 1}
    got_clean.pop("cleaning")
    assert got_raw == got_clean
    as_sent = server.post("/predict", json={"sessions": raw, "clean": False, **options}).json()
    assert as_sent["cleaning"] == {} and as_sent["sessions_used"] == 3
    nothing_left = server.post("/predict", json={"sessions": [["Cart", "Cart"], ["Purchase"]]})
    assert nothing_left.status_code == 422 and '"clean": false' in nothing_left.json()["detail"]


def test_long_sessions_are_cut_at_the_training_logs_cutoff(server, taobao_prepared):
    cutoff = taobao_prepared[1]["long_session_cutoff"]
    long = ["Cart", "Purchase"] * 100  # 200 pages: more than the model's context holds
    got = server.post("/predict", json={"sessions": [long], "n_samples": 0, "seed": 1})
    assert got.status_code == 200, got.text
    got = got.json()
    assert got.pop("cleaning") == {f"page beyond the 99th-percentile session length ({cutoff})": 200 - cutoff}
    cut = server.post("/predict", json={"sessions": [long[:cutoff]], "n_samples": 0, "seed": 1}).json()
    assert cut.pop("cleaning") == {} and got == cut


@pytest.mark.parametrize("body, where", [
    ({"sessions": []}, "sessions"),
    ({"sessions": [[]]}, "sessions.0"),
    ({"sessions": [["Cart", 123]]}, "sessions.0.1"),
    ({"sessions": [["Cart", "  "]]}, "sessions.0.1"),
    ({"sessions": [["Cart"]], "k": 0}, "k"),
    ({"sessions": [["Cart"]], "strategy": "beam"}, "strategy"),
    ({"sessions": [["Cart"]], "temperature": 0}, "temperature"),
    ({"sessions": [["Cart"]], "n_samples": -1}, "n_samples"),
    ({"sessions": [["Cart"]], "colour": "red"}, "colour"),
    ({"pages": [["Cart"]]}, "sessions"),
    ({"sessions": [["Cart"]], "k": True}, "k"),  # JSON true is not 1
    ({"sessions": [["Cart"]], "n_samples": 2.0}, "n_samples"),
    ({"sessions": [["Cart"]], "seed": 10**100}, "seed"),
    ({"sessions": [["Cart"]], "temperature": 1e-40}, "temperature"),  # logits would overflow: an empty session
    ({"sessions": [["Cart", "[EOS]"]]}, "sessions.0.1"),  # special tokens, refused as `hetlm score` refuses them
    ({"sessions": [["Cart", "Purchase"], [" [BOS] ", "Cart"]]}, "sessions.1.0"),
    ({"sessions": [["[PAD]", "[UNK]"]]}, "sessions.0.0"),
])
def test_malformed_requests_get_422(server, body, where):
    got = server.post("/predict", json=body)
    assert got.status_code == 422
    detail = got.json()["detail"]
    assert any(".".join(str(x) for x in d["loc"][1:]) == where and d["msg"] for d in detail), detail


def test_oversize_requests_get_413(server):
    too_many_sessions = server.post("/predict", json={"sessions": [["Cart"]] * 41, "n_samples": 0})
    assert too_many_sessions.status_code == 413 and "at most 40" in too_many_sessions.json()["detail"]
    too_many_pages = server.post("/predict", json={"sessions": [["Cart", "Purchase"] * 101] * 2, "n_samples": 0})
    assert too_many_pages.status_code == 413 and "at most 400" in too_many_pages.json()["detail"]
    too_long = server.post("/predict", json={"sessions": [["Cart", "Purchase"] * 100], "n_samples": 0,
                                             "clean": False})
    assert too_long.status_code == 422 and "context" in too_long.json()["detail"]
    huge = server.post("/predict", content=b'{"sessions": [["' + b"x" * 50_000 + b'"]]}',
                       headers={"content-type": "application/json"})
    assert huge.status_code == 413 and "40000 bytes" in huge.json()["detail"]
    assert server.get("/health").status_code == 200  # still serving


def test_concurrent_requests_are_batched(server, taobao_prepared):
    histories = pl.read_parquet(taobao_prepared[0] / "test.parquet")["history"].to_list()[:12]
    bodies = [{"sessions": h, **OPTIONS, "strategy": "sample" if i % 3 == 0 else "greedy"} for i, h in enumerate(histories)]
    alone = [server.post("/predict", json=b).json() for b in bodies]
    before = server.get("/health").json()
    with ThreadPoolExecutor(12) as pool:
        together = list(pool.map(lambda b: server.post("/predict", json=b), bodies))
    after = server.get("/health").json()
    assert all(r.status_code == 200 for r in together)
    assert after["requests"] - before["requests"] == 12 and after["batches"] - before["batches"] < 12
    for a, b in zip(alone, (r.json() for r in together)):
        np.testing.assert_allclose(a.pop("top_probs"), b.pop("top_probs"), rtol=1e-4)
        assert a.pop("cluster_prob") == pytest.approx(b.pop("cluster_prob"))
        for key in ("p_cart_first_page", "p_purchase_first_page"):  # from logits: float noise of the padding
            assert a.pop(key) == pytest.approx(b.pop(key), rel=1e-4)
        assert a == b


def test_serve_command_reports_a_bad_model_folder(tmp_path):
    result = CliRunner().invoke(cli, ["serve", str(tmp_path)])
    assert result.exit_code == 2 and "no page tokenizer found" in result.output and "Traceback" not in result.output


@pytest.mark.parametrize("content, where", [
    (b'{"sessions": [["Cart", "home"]], "temperature": NaN}', "temperature"),
    (b'{"sessions": [["Cart", "home"]], "temperature": Infinity}', "temperature"),
    (b'{"sessions": [["Cart", "\\ud800"]]}', "sessions.0.1"),  # a lone surrogate
    (b'{"sessions": [["Cart", "home"]], "\\udfff": 1}', ""),  # in a key: the body is not valid text
])
def test_inputs_json_cannot_hold_get_422_not_500(server, content, where):
    got = server.post("/predict", content=content, headers={"content-type": "application/json"})
    assert got.status_code == 422, got.text
    assert any(".".join(str(x) for x in d["loc"][1:]) == where for d in got.json()["detail"]), got.text


def poisoned(scorer: Scorer) -> Scorer:
    """`scorer` failing on any batch that holds a page named "poison" (a request that breaks the model code)."""
    real = scorer.score

    def score(histories, options, between_passes=None):
        if any(page == "poison" for history in histories for session in history for page in session):
            raise RuntimeError("poisoned request")
        return real(histories, options, between_passes)

    scorer.score = score
    return scorer


def test_poisoned_requests_fail_alone_and_every_valid_request_in_their_batches_succeeds(clusterwise, taobao_prepared):
    histories = [h for h in pl.read_parquet(taobao_prepared[0] / "test.parquet")["history"].to_list()
                 if len(h) < LIMITS.max_sessions and sum(map(len, h)) < LIMITS.max_pages - 2][:16]
    valid = [{"sessions": h, **OPTIONS} for h in histories]
    bad = [{"sessions": [*h, ["poison", "home"]], **OPTIONS} for h in histories[:4]]
    invalid = [{"sessions": histories[0], "seed": 10**100}, {"sessions": histories[1], "k": True}]
    bodies = [b for group in zip(valid[:4], bad, valid[4:8], valid[8:12]) for b in group] + valid[12:] + invalid
    scorer = poisoned(Scorer.from_pretrained(clusterwise, max_new_tokens=10))
    with running(create_app(scorer, limits=LIMITS)) as url, httpx.Client(base_url=url, timeout=120) as client:
        alone = client.post("/predict", json=valid[0]).json()
        with ThreadPoolExecutor(len(bodies)) as pool:
            got = dict(zip(map(id, bodies), pool.map(lambda b: client.post("/predict", json=b), bodies)))
        health = client.get("/health").json()
    assert [got[id(b)].status_code for b in valid] == [200] * len(valid)
    assert all(got[id(b)].status_code == 500 and "poisoned request" in got[id(b)].json()["detail"] for b in bad)
    assert all(got[id(b)].status_code == 422 for b in invalid)
    assert health["failed"] == 4 and health["rerun_alone"] > 4  # the poisoned ones shared batches with valid ones
    together = got[id(valid[0])].json()
    assert together["next_session"] == alone["next_session"] and together["p_cart"] == alone["p_cart"]


def test_connections_stalled_mid_headers_are_closed(clusterwise, taobao_prepared):
    app = create_app(Scorer.from_pretrained(clusterwise, max_new_tokens=10), limits=LIMITS)
    with running(app, http=guarded_protocol(0.5, 60, 100)) as url:
        host, port = url.removeprefix("http://").split(":")
        stalled = [socket.create_connection((host, int(port)), timeout=10) for _ in range(20)]
        for conn in stalled:
            conn.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-")  # and nothing more
        time.sleep(1.5)
        assert all(conn.recv(1024) == b"" for conn in stalled)  # closed by the server
        body = {"sessions": pl.read_parquet(taobao_prepared[0] / "test.parquet")["history"][0].to_list()[-3:],
                "n_samples": 0}
        with httpx.Client(base_url=url, timeout=60) as client:  # slow requests are fine once their headers are in
            assert client.post("/predict", json=body).status_code == 200
            time.sleep(1)  # a kept-alive connection that sends its next request later is fine too
            assert client.post("/predict", json=body).status_code == 200
        for conn in stalled:
            conn.close()


def test_per_request_budget(server):
    got = server.post("/predict", json={"sessions": [["Cart", "Purchase"]], "n_samples": 33})
    assert got.status_code == 422 and "at most 32" in got.json()["detail"]
    with pytest.raises(ValueError, match="max_batch_rows"):
        ServeConfig(max_n_samples=64, max_batch_rows=32)


def test_cheap_requests_are_batched_first_and_apart_from_costly_ones():
    async def batches():
        batcher = Batcher(None, max_batch=8, max_wait_ms=0, max_rows=40, max_queue=16)
        heavy = [batcher.submit(PredictRequest(sessions=[["a", "b"]], n_samples=16)) for _ in range(3)]
        light = [batcher.submit(PredictRequest(sessions=[["a", "b"]], n_samples=n)) for n in (0, 1, 1, 0)]
        light[1].cancel()  # its client hung up: never scored
        await asyncio.sleep(0)  # done callbacks run
        taken = [[w.request.n_samples for w in batcher._take()] for _ in range(4)]
        return taken, batcher.given_up, heavy

    taken, given_up, _ = asyncio.run(batches())
    # cheapest first; a costly request never rides along with cheap ones; at most 40 rows per batch
    assert taken == [[0, 0, 1], [16, 16], [16], []] and given_up == 1


def test_cheap_requests_go_first_while_a_costly_batch_is_scored():
    """The costly batch is paused between its decoding passes while a cheap request that came later is scored."""
    light_done, order = threading.Event(), []

    class Fake:
        def score(self, histories, options, between_passes=None):
            if options[0].n_samples == 0:
                order.append("light")
                light_done.set()
            else:
                for _ in range(3000):  # decoding passes, until the cheap request is done (or 30 s)
                    if between_passes is not None:
                        between_passes()
                    if light_done.is_set():
                        break
                    time.sleep(0.01)
                order.append("heavy")
            return [None] * len(histories)

    async def serve():
        batcher = Batcher(Fake(), max_batch=8, max_wait_ms=0, max_rows=40, max_queue=16)
        worker = asyncio.create_task(batcher.run())
        heavy = batcher.submit(PredictRequest(sessions=[["a", "b"]], n_samples=16))
        await asyncio.sleep(0.1)  # the costly batch under way
        light = batcher.submit(PredictRequest(sessions=[["a", "b"]], n_samples=0))
        await asyncio.wait_for(asyncio.gather(heavy, light), 60)
        worker.cancel()

    asyncio.run(serve())
    assert order == ["light", "heavy"]


@contextmanager
def blocked(scorer: Scorer):
    """`scorer` whose batches wait until released, recording the histories of each batch it scores."""
    real, entered, release, seen = scorer.score, threading.Event(), threading.Event(), []

    def score(histories, options, between_passes=None):
        entered.set()
        release.wait(60)
        seen.append(histories)
        return real(histories, options, between_passes)

    scorer.score = score
    try:
        yield entered, release, seen
    finally:
        release.set()
        scorer.score = real


def wait_for(client, **health):
    deadline = time.monotonic() + 30
    while any(client.get("/health").json()[k] != v for k, v in health.items()):
        assert time.monotonic() < deadline, client.get("/health").json()
        time.sleep(0.05)


@pytest.fixture(scope="module")
def micro_scorer(clusterwise):
    return Scorer.from_pretrained(clusterwise, max_new_tokens=10)


def test_full_queue_gets_503_and_requests_of_clients_that_hung_up_are_not_scored(micro_scorer):
    limits = LIMITS.model_copy(update={"max_queue": 2, "max_batch": 1})
    body = {"sessions": [["category_2520377", "Cart"]], "n_samples": 0}
    with blocked(micro_scorer) as (entered, release, seen), running(create_app(micro_scorer, limits=limits)) as url, \
            httpx.Client(base_url=url, timeout=60) as client, ThreadPoolExecutor(4) as pool:
        first = pool.submit(client.post, "/predict", json=body)
        assert entered.wait(30)  # being scored, blocked
        host, port = url.removeprefix("http://").split(":")
        gone = socket.create_connection((host, int(port)), timeout=10)  # a request whose client then hangs up
        payload = json.dumps({"sessions": [["category_2520377", "hung_up_client"]], "n_samples": 0}).encode()
        gone.sendall(b"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(payload), payload))
        second = pool.submit(client.post, "/predict", json=body)
        wait_for(client, waiting=2)
        full = client.post("/predict", json=body)
        assert full.status_code == 503 and "2 requests are waiting" in full.json()["detail"]
        gone.close()
        wait_for(client, waiting=1, given_up=1)
        release.set()
        assert first.result().status_code == 200 and second.result().status_code == 200
    assert len(seen) == 2 and not any("hung_up_client" in s for h in seen for user in h for s in user)


def test_requests_not_answered_in_time_get_503(micro_scorer):
    limits = LIMITS.model_copy(update={"request_timeout_s": 0.3})
    with blocked(micro_scorer), running(create_app(micro_scorer, limits=limits)) as url, \
            httpx.Client(base_url=url, timeout=60) as client:
        got = client.post("/predict", json={"sessions": [["category_2520377", "Cart"]], "n_samples": 0})
        assert got.status_code == 503 and "not answered within 0.3 s" in got.json()["detail"]


def test_host_header_and_bearer_token(micro_scorer):
    token = "s3cret-token-of-the-user"
    body = {"sessions": [["category_2520377", "Cart"]], "n_samples": 0}
    limits = LIMITS.model_copy(update={"token": token, "allowed_hosts": [*LIMITS.allowed_hosts, "hetlm.internal"]})
    with running(create_app(micro_scorer, limits=LIMITS)) as url, httpx.Client(base_url=url, timeout=60) as client:
        # a page on another site whose name now resolves to 127.0.0.1 (DNS rebinding) sends its own Host
        assert client.get("/model", headers={"host": "attacker.example"}).status_code == 400
        assert client.post("/predict", json=body, headers={"host": "attacker.example:8000"}).status_code == 400
        assert client.get("/model", headers={"host": "localhost:8000"}).status_code == 200
        assert "token" not in client.get("/model").json()["limits"]
    with running(create_app(micro_scorer, limits=limits)) as url, httpx.Client(base_url=url, timeout=60) as client:
        assert client.get("/health").status_code == 200  # liveness stays open
        for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": token}):
            got = client.post("/predict", json=body, headers=headers)
            assert got.status_code == 401 and got.headers["www-authenticate"] == "Bearer"
        assert client.get("/model").status_code == 401
        auth = {"authorization": f"Bearer {token}"}
        assert client.post("/predict", json=body, headers=auth).status_code == 200
        assert client.get("/model", headers=auth | {"host": "hetlm.internal"}).status_code == 200
        assert "s3cret" not in client.get("/model", headers=auth).text


def test_serve_command_passes_token_and_hosts(clusterwise, monkeypatch):
    import hetlm.serve

    got = {}
    monkeypatch.setattr(hetlm.serve, "serve", lambda scorer, host, port, limits: got.update(limits=limits, host=host))
    monkeypatch.setenv("HETLM_SERVE_TOKEN", "from-the-environment-0123")
    result = CliRunner().invoke(cli, ["serve", str(clusterwise), "--host", "0.0.0.0", "--allowed-host", "box.lan"])
    assert result.exit_code == 0, result.output
    assert got["limits"].token == "from-the-environment-0123" and "box.lan" in got["limits"].allowed_hosts
    assert "localhost" in got["limits"].allowed_hosts


def closed_by_server(conn: socket.socket) -> bool:
    try:
        return conn.recv(1024) == b""
    except ConnectionResetError:  # closed with bytes it had not read
        return True


def test_slow_bodies_time_out_and_open_connections_are_capped(micro_scorer, taobao_prepared):
    """300 clients that send headers and one byte of a body (the red team's attack, under the body limit) cannot
    hold the server: above the cap the stalest waiting connection is closed, and a held body times out."""
    body = {"sessions": pl.read_parquet(taobao_prepared[0] / "test.parquet")["history"][0].to_list()[-3:],
            "n_samples": 0}
    head = (b"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Content-Length: 30000\r\n\r\n{")
    app = create_app(micro_scorer, limits=LIMITS)
    with running(app, http=guarded_protocol(60, 60, 20)) as url:  # the cap alone closes connections here
        host, port = url.removeprefix("http://").split(":")
        with httpx.Client(base_url=url, timeout=60) as client:
            assert client.post("/predict", json=body).status_code == 200  # then kept alive, idle
            attackers = []
            for _ in range(300):
                conn = socket.create_connection((host, int(port)), timeout=30)
                conn.sendall(head)
                attackers.append(conn)
            # served beside them, on the same connection: a client that had an answer is closed last
            assert client.post("/predict", json=body).status_code == 200
            assert client.get("/health").json()["requests"] >= 2
        assert all(map(closed_by_server, attackers[:281]))  # oldest first
        for conn in attackers:
            conn.close()
    with running(app, http=guarded_protocol(60, 0.5, 100)) as url:
        host, port = url.removeprefix("http://").split(":")
        held = [socket.create_connection((host, int(port)), timeout=30) for _ in range(5)]
        for conn in held:
            conn.sendall(head)
        assert all(map(closed_by_server, held))  # once the body is late
        with httpx.Client(base_url=url, timeout=60) as client:
            assert client.post("/predict", json=body).status_code == 200
        for conn in held:
            conn.close()


def with_auto_map(folder, tmp_path, config_file):
    """A copy of a saved model folder whose `config_file` names custom code, as a hostile folder would."""
    copy = tmp_path / "hostile"
    shutil.copytree(folder, copy)
    path = copy / config_file
    config = json.loads(path.read_text())
    config["auto_map"] = {"AutoTokenizer": ["tokenization_evil.EvilTokenizer", None],
                          "AutoModelForCausalLM": "modeling_evil.EvilModel"}
    if "tokenizer_class" in config:  # a class transformers lacks: without the fix it asks "[y/N]" and runs the code
        config["tokenizer_class"] = "EvilTokenizer"
    path.write_text(json.dumps(config))
    (path.parent / "tokenization_evil.py").write_text(
        f"open({str(tmp_path / 'ran')!r}, 'w').write('ran')\n"
        "from transformers import PreTrainedTokenizerFast\nclass EvilTokenizer(PreTrainedTokenizerFast): pass\n")
    (path.parent / "modeling_evil.py").write_text(f"open({str(tmp_path / 'ran')!r}, 'w').write('ran')\n")
    return copy


@pytest.mark.parametrize("config_file", ["tokenizer/tokenizer_config.json", "config.json"])
def test_a_model_folder_naming_custom_code_is_refused(clusterwise, tmp_path, config_file, monkeypatch):
    hostile = with_auto_map(clusterwise.parent / "model", tmp_path, config_file)
    monkeypatch.setattr("builtins.input", lambda *a: pytest.fail("asked whether to run the folder's code"))
    with pytest.raises(ValueError, match="auto_map"):
        load_model(hostile)
    for command in (["serve", str(hostile)],
                    ["score", str(hostile), str(log_head(tmp_path / "log.csv", 500)), "--source", "taobao",
                     "--out", str(tmp_path / "scores.parquet")]):
        result = CliRunner().invoke(cli, command, input="y\n")
        assert result.exit_code == 2 and "auto_map" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "ran").exists()


def test_a_model_folder_cannot_choose_where_embeddings_are_cached(clusterwise, tmp_path):
    copy = tmp_path / "model"
    shutil.copytree(clusterwise, copy)
    assert "cache_dir" not in json.loads((copy / "clusterwise.json").read_text())["encoder"]  # not saved
    elsewhere = tmp_path / "elsewhere"
    config = json.loads((copy / "clusterwise.json").read_text())
    config["encoder"] |= {"cache_dir": str(elsewhere), "model_name_or_path": None}
    (copy / "clusterwise.json").write_text(json.dumps(config))
    history = [["category_2520377", "Cart"], ["category_4159072", "Cart"]]
    scorer = Scorer.from_pretrained(copy, max_new_tokens=4)
    scorer.score([history], [ScoreConfig(n_samples=0)])
    assert not elsewhere.exists()
    description = json.dumps(scorer.describe())
    assert str(tmp_path) not in description and str(clusterwise) not in description
    cached = Scorer.from_pretrained(copy, max_new_tokens=4, embedding_cache=tmp_path / "mine")
    cached.score([history], [ScoreConfig(n_samples=0)])
    assert (tmp_path / "mine" / "embeddings.sqlite").is_file() and not elsewhere.exists()
