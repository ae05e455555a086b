"""The HTTP service, started for real with uvicorn on loopback and called with httpx, on a micro k-means
clusterwise model: predictions equal `hetlm score`'s, validation (422), limits (413), dynamic batching."""

import dataclasses
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
from hetlm.serve import ServeConfig, create_app, header_timeout_protocol
from hetlm.tokenizer import load_tokenizer
from hetlm.train import TrainConfig

from .test_score import assert_same_score, log_head, train_micro

LIMITS = ServeConfig(max_body_bytes=40_000, max_sessions=40, max_pages=400, max_batch=8, max_wait_ms=20)
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
        assert got["cluster"] == row["cluster"] and got["cluster_probability"] == pytest.approx(row["cluster_prob"])
        assert got["next_session"] == row["next_session"]
        assert [p["page"] for p in got["top_pages"]] == row["top_pages"]
        np.testing.assert_allclose([p["probability"] for p in got["top_pages"]], row["top_probs"], rtol=1e-4)
        assert (got["p_cart"], got["p_purchase"]) == (row["p_cart"], row["p_purchase"])
        assert (got["p_cart_calibrated"], got["p_purchase_calibrated"]) == (
            row["p_cart_calibrated"], row["p_purchase_calibrated"]) == pytest.approx(
            (CALIBRATOR.transform("cart", [row["p_cart"]])[0], CALIBRATOR.transform("purchase", [row["p_purchase"]])[0]))
        assert got["sessions_used"] == row["sessions_used"] and got["n_samples"] == 4


def test_unknown_pages_are_reported(server):
    body = {"sessions": [["category_2520377", "Cart"], ["no such page", "Cart", "another_unknown"]], "n_samples": 0}
    got = server.post("/predict", json=body).json()
    assert got["unknown_pages"] == ["no_such_page", "another_unknown"]  # normalised like ingest, then [UNK]
    # n_samples 0: the exact probability that the first page is Cart, no sampling
    assert 0 < got["p_cart"] < 1 and got["se_cart"] == 0 and got["n_samples"] == 0 and len(got["top_pages"]) == 10


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
        top_a, top_b = a.pop("top_pages"), b.pop("top_pages")
        assert [p["page"] for p in top_a] == [p["page"] for p in top_b]
        np.testing.assert_allclose([p["probability"] for p in top_a], [p["probability"] for p in top_b], rtol=1e-4)
        assert a.pop("cluster_probability") == pytest.approx(b.pop("cluster_probability"))
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

    def score(histories, options):
        if any(page == "poison" for history in histories for session in history for page in session):
            raise RuntimeError("poisoned request")
        return real(histories, options)

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
    with running(app, http=header_timeout_protocol(0.5)) as url:
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
