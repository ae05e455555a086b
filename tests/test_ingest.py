"""Ingest adapters on the shared real logs, checked against plain-Python counts of the raw files,
plus small broken inputs that must fail with the right file line."""

from __future__ import annotations

import csv
import gzip
import json
import os
import zipfile
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path

import polars as pl
import pytest

from hetlm.ingest import CART, EVENT_SCHEMA, PURCHASE, SOURCES, IngestError, read_events
from hetlm.ingest.ga360 import HIT_TWICE, page_names, read_ga360
from hetlm.ingest.generic import read_generic
from hetlm.ingest.msnbc import read_msnbc
from hetlm.ingest.otto import read_otto
from hetlm.ingest.rees46 import read_rees46
from hetlm.ingest.taobao import read_taobao

DATA = Path(os.environ.get("HETLM_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
TAOBAO = "taobao-userbehavior/UserBehavior_head.csv"
REES46 = "rees46-sample/2019-Oct-sample.csv"
GA360 = "ga360-merchandise-store/ga_sessions_20160801.json.gz"
OTTO = "otto-sample/train_test_resource.jsonl"
MSNBC = "msnbc/msnbc990928.zip"
DIGINETICA = "diginetica-sample/sample_train-item-views.csv"
DIGINETICA_OPTIONS = dict(
    sep=";", user="user_id", session="session_id", page="item_id", page_prefix="item ",
    time="eventdate", order="timeframe",
)


def shared(relative: str) -> Path:
    path = DATA / relative
    if not path.exists():
        pytest.skip(f"shared dataset {path} not found (set HETLM_SHARED_DATA to the data folder)")
    return path


def utc_ms(text: str, fmt: str) -> int:
    return int(datetime.strptime(text, fmt).replace(tzinfo=timezone.utc).timestamp() * 1000)


def check_contract(events: pl.DataFrame) -> None:
    assert dict(events.schema) == EVENT_SCHEMA
    assert events["user"].null_count() == 0 and events["ts"].null_count() == 0
    assert not events["page"].str.contains(r"\s").any() and events["page"].null_count() == 0


# --- the shared real logs -----------------------------------------------------------------------


def test_taobao_truncated_last_line_is_an_error_naming_file_and_line():
    path = shared(TAOBAO)
    with pytest.raises(IngestError) as caught:
        read_taobao(path)
    assert caught.value.line == 84476 and f"{path}:84476" in str(caught.value)


def test_taobao_skipping_counts_the_truncated_line():
    path = shared(TAOBAO)
    with open(path, newline="") as f:
        rows = [r for r in csv.reader(f) if len(r) == 5]
    result = read_events("taobao", path, on_bad_rows="skip")
    check_contract(result.events)
    assert result.skipped == {"truncated line (missing fields)": 1}
    assert result.events.height == len(rows) == 84475
    assert result.events["user"].n_unique() == len({r[0] for r in rows}) == 815
    pages = Counter(result.events["page"])
    assert pages[CART] == sum(r[3] == "cart" for r in rows)
    assert pages[PURCHASE] == sum(r[3] == "buy" for r in rows)


def test_rees46_matches_a_plain_csv_reading():
    path = shared(REES46)
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    outcome = {"cart": "Cart", "purchase": "Purchase", "remove_from_cart": "Remove_from_cart"}
    expected_pages = Counter(
        outcome.get(r["event_type"])
        or (r["category_code"].replace(".", "_") if r["category_code"] else f"category_{r['category_id']}")
        for r in rows
    )
    result = read_rees46(path)
    check_contract(result.events)
    assert result.skipped == {}
    assert Counter(result.events["page"]) == expected_pages
    assert result.events["user"].n_unique() == len({r["user_id"] for r in rows})
    assert result.events["session"].n_unique() == len({r["user_session"] for r in rows})
    assert result.events["ts"].to_list() == [utc_ms(r["event_time"], "%Y-%m-%d %H:%M:%S UTC") for r in rows]


def ga360_sessions() -> list[dict]:
    with gzip.open(shared(GA360), "rt") as f:
        return [json.loads(line) for line in f]


def ga360_kinds(session: dict) -> list[str]:
    """The session's events in time/hit order, pages written as 'page', outcomes by name."""
    kinds = []
    for hit in sorted(session["hits"], key=lambda h: (int(h["time"]), int(h["hitNumber"]))):
        kinds += ["page"] if hit["type"] == "PAGE" else []
        action = hit.get("eCommerceAction", {}).get("action_type")
        kinds += [{"3": CART, "6": PURCHASE}[action]] if action in ("3", "6") else []
    return kinds


def test_ga360_matches_a_plain_json_reading():
    sessions = ga360_sessions()
    kinds = {f"{s['fullVisitorId']}-{s['visitId']}": ga360_kinds(s) for s in sessions}
    result = read_events("ga360", shared(GA360))
    check_contract(result.events)
    assert len(sessions) == 1711 and result.skipped == {}
    assert result.events.height == sum(len(k) for k in kinds.values())
    assert result.events["user"].n_unique() == len({s["fullVisitorId"] for s in sessions})
    assert result.events["session"].n_unique() == sum(bool(k) for k in kinds.values())
    pages = Counter(result.events["page"])
    assert pages[CART] == sum(k.count(CART) for k in kinds.values()) > 0
    assert pages[PURCHASE] == sum(k.count(PURCHASE) for k in kinds.values()) > 0
    got = result.events.with_columns(
        kind=pl.when(pl.col("page").is_in([CART, PURCHASE])).then("page").otherwise(pl.lit("page"))
    ).group_by("session", maintain_order=True).agg("kind", "ts")
    assert {row["session"]: row["kind"] for row in got.iter_rows(named=True)} == {
        s: k for s, k in kinds.items() if k
    }
    assert all(ts == sorted(ts) for ts in got["ts"].to_list())
    first = sessions[0]
    start = int(first["visitStartTime"]) * 1000
    first_ts = result.events.filter(pl.col("session") == f"{first['fullVisitorId']}-{first['visitId']}")["ts"]
    assert first_ts.to_list() == sorted(start + int(h["time"]) for h in first["hits"] if h["type"] == "PAGE")


@pytest.mark.parametrize(
    "path, name",
    [
        ("/google+redesign/apparel/men++s/men++s+t+shirts", "apparel mens mens t shirts"),
        ("/google+redesign/apparel/kid+s/kid+s+toddler/quickview", "apparel kids kids toddler quickview"),
        ("/google+redesign/bags/backpacks/oasis+backpack.axd", "bags backpacks oasis backpack"),
        ("/basket.html", "basket"),
        ("/myaccount.html?mode=vieworder", "myaccount"),
        ("/asearch.html/quickview#top", "asearch quickview"),
        ("/google+redesign/", "home"),
        ("/", "home"),
        ("/Caf%C3%A9/Men%27s+Hats", "café mens hats"),
    ],
)
def test_ga360_page_names(path, name):
    assert page_names(pl.Series([path])).to_list() == [name]


def test_otto_matches_a_plain_json_reading():
    path = shared(OTTO)
    with open(path) as f:
        months = [json.loads(line) for line in f if line.strip()]
    names = {"carts": CART, "orders": PURCHASE}
    expected = [
        (str(m["session"]), e["ts"], names.get(e["type"], f"item_{e['aid']}"))
        for m in months
        for e in m["events"]
    ]
    result = read_otto(path)
    check_contract(result.events)
    assert result.events.select("user", "ts", "page").rows() == expected
    assert result.events["session"].null_count() == result.events.height
    assert result.events["user"].n_unique() == len(months)
    assert {CART, PURCHASE} <= set(result.events["page"])


@pytest.fixture(scope="module")
def msnbc_raw() -> tuple[list[str], list[str]]:
    """Category names and sequence lines of the .seq, read with zipfile and str methods."""
    with zipfile.ZipFile(shared(MSNBC)) as z:
        text = z.read("msnbc990928.seq").decode()
    content = [line for line in text.splitlines() if line.strip() and not line.startswith("%")]
    return content[0].split(), content[1:]


def test_msnbc_matches_a_plain_reading(msnbc_raw):
    names, sequences = msnbc_raw
    result = read_events("msnbc", shared(MSNBC))
    check_contract(result.events)
    assert result.anonymous and result.skipped == {}
    assert result.events["user"].n_unique() == len(sequences) == 989_818
    numbers = Counter(" ".join(sequences).split())
    pages = dict(result.events["page"].value_counts().rows())
    assert pages == {names[int(k) - 1]: n for k, n in numbers.items()}
    first = result.events.filter(pl.col("user") == "v2")
    assert first["page"].to_list() == [names[int(k) - 1] for k in sequences[2].split()]
    assert first["ts"].to_list() == [200_000 + i for i in range(len(first))]
    assert (result.events["user"] == result.events["session"]).all()


def test_diginetica_through_generic_matches_a_plain_csv_reading():
    path = shared(DIGINETICA)
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f, delimiter=";"))
    users = [r["user_id"] if r["user_id"] not in ("", "NA") else f"session:{r['session_id']}" for r in rows]
    result = read_events("generic", path, **DIGINETICA_OPTIONS)
    check_contract(result.events)
    assert result.anonymous and result.skipped == {}
    assert result.events["user"].to_list() == users
    assert result.events["session"].to_list() == [r["session_id"] for r in rows]
    assert result.events["page"].to_list() == [f"item_{r['item_id']}" for r in rows]
    expected_ts = [utc_ms(r["eventdate"], "%Y-%m-%d") + int(r["timeframe"]) for r in rows]
    assert result.events["ts"].to_list() == expected_ts


# --- small inputs, good and broken ----------------------------------------------------------------


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_generic_missing_column_names_it_and_lists_the_found_ones(tmp_path):
    path = write(tmp_path, "log.csv", "visitor,page\nu1,p1\n")
    with pytest.raises(IngestError, match=r"'user'.*\['visitor', 'page'\]") as caught:
        read_generic(path, user="user", page="page")
    assert caught.value.line == 1


def test_generic_one_column_hints_at_the_separator(tmp_path):
    path = write(tmp_path, "log.csv", "user;page\nu1;p1\n")
    with pytest.raises(IngestError, match="--sep"):
        read_generic(path, user="user", page="page")
    assert read_generic(path, user="user", page="page", sep=";").events.height == 1


def test_generic_empty_file(tmp_path):
    with pytest.raises(IngestError, match="empty"):
        read_generic(write(tmp_path, "log.csv", ""), user="user", page="page")


def test_generic_unparsable_time_names_its_line_or_is_skipped(tmp_path):
    path = write(tmp_path, "log.tsv", "user\tpage\ttime\nu1\tp1\t1000\nu1\tp2\tsoon\nu1\tp3\t1002\n")
    with pytest.raises(IngestError) as caught:
        read_generic(path, user="user", page="page", time="time")
    assert caught.value.line == 3 and f"{path}:3" in str(caught.value)
    result = read_generic(path, user="user", page="page", time="time", on_bad_rows="skip")
    assert result.events["ts"].to_list() == [1_000_000, 1_002_000]
    assert sum(result.skipped.values()) == 1


def test_generic_events_users_and_clock(tmp_path):
    path = write(
        tmp_path, "log.csv",
        "user,session,page,event,time\n"
        "u1,s1,Home Page,view,2020-01-01 00:00:01\n"
        ",s2,shoes,CART,2020-01-01 00:00:02\n"
        "NA,s2,shoes,Purchase,2020-01-01 00:00:03\n"
        "NA,s3, ,view,2020-01-01 00:00:04\n",
    )
    result = read_generic(path, user="user", session="session", page="page", event="event", time="time",
                          on_bad_rows="skip")
    assert result.events.rows() == [
        ("u1", "s1", utc_ms("2020-01-01 00:00:01", "%Y-%m-%d %H:%M:%S"), "Home_Page"),
        ("session:s2", "s2", utc_ms("2020-01-01 00:00:02", "%Y-%m-%d %H:%M:%S"), CART),
        ("session:s2", "s2", utc_ms("2020-01-01 00:00:03", "%Y-%m-%d %H:%M:%S"), PURCHASE),
    ]
    assert result.skipped == {"missing page": 1}
    assert not result.anonymous  # one fallback user of two


def test_generic_user_without_session_is_a_bad_row(tmp_path):
    path = write(tmp_path, "log.csv", "user,page\nu1,p1\nNA,p2\n")
    with pytest.raises(IngestError, match="missing user") as caught:
        read_generic(path, user="user", page="page")
    assert caught.value.line == 3
    assert read_generic(path, user="user", page="page", on_bad_rows="skip").events["ts"].to_list() == [0]


def test_generic_parquet_with_datetime_column(tmp_path):
    path = tmp_path / "log.parquet"
    pl.DataFrame({
        "u": [7, 8], "p": ["a", "b"], "t": [datetime(2020, 1, 1), datetime(2020, 1, 2)],
    }).write_parquet(path)
    result = read_generic(path, user="u", page="p", time="t", page_prefix="cat ")
    assert result.events.rows() == [
        ("7", None, utc_ms("2020-01-01", "%Y-%m-%d"), "cat_a"),
        ("8", None, utc_ms("2020-01-02", "%Y-%m-%d"), "cat_b"),
    ]


def test_generic_millisecond_clock(tmp_path):
    path = write(tmp_path, "log.csv", "user,page,time\nu1,p1,1500\n")
    assert read_generic(path, user="user", page="page", time="time", time_unit="ms").events["ts"][0] == 1500


def test_rees46_missing_column(tmp_path):
    path = write(tmp_path, "oct.csv", "event_time,event_type,user_id\n2019-10-01 00:00:00 UTC,view,1\n")
    with pytest.raises(IngestError, match="category_code"):
        read_rees46(path)


GA_SESSION = {
    "fullVisitorId": "42", "visitId": "7", "visitStartTime": "1470000000",
    "hits": [
        {"hitNumber": "1", "time": "0", "type": "PAGE", "page": {"pagePath": "/home"},
         "eCommerceAction": {"action_type": "0"}},
        {"hitNumber": "2", "time": "500", "type": "EVENT", "page": {"pagePath": "/home"},
         "eCommerceAction": {"action_type": "3"}},
        {"hitNumber": "3", "time": "900", "type": "PAGE", "page": {"pagePath": "/ordercompleted.html"},
         "eCommerceAction": {"action_type": "6"}},
    ],
}


def test_ga360_small_session_and_outcome_order(tmp_path):
    path = tmp_path / "ga.json.gz"
    with gzip.open(path, "wt") as f:
        f.write(json.dumps(GA_SESSION) + "\n")
    start = 1_470_000_000_000
    assert read_ga360(path).events.rows() == [
        ("42", "42-7", start, "home"),
        ("42", "42-7", start + 500, CART),
        ("42", "42-7", start + 900, "ordercompleted"),
        ("42", "42-7", start + 900, PURCHASE),
    ]


def test_ga360_malformed_line_names_its_line_or_is_skipped(tmp_path):
    good = json.dumps(GA_SESSION)
    path = write(tmp_path, "ga.json", f"{good}\n\n{{\"fullVisitorId\": \"1\", \"hits\": [\n{good}\n")
    with pytest.raises(IngestError, match="malformed JSON") as caught:
        read_ga360(path)
    assert caught.value.line == 3
    result = read_ga360(path, on_bad_rows="skip")
    # The session's second copy is the same hits again: kept once, counted.
    assert result.events.height == 4 and result.skipped.pop(HIT_TWICE) == 3 and sum(result.skipped.values()) == 1


def test_otto_malformed_line_and_unknown_type(tmp_path):
    good = '{"session": 5, "events": [{"aid": 1, "ts": 10, "type": "clicks"}]}'
    path = write(tmp_path, "otto.jsonl", f"{good}\n{good}\n[1, 2]\n")
    with pytest.raises(IngestError) as caught:
        read_otto(path)
    assert caught.value.line == 3
    odd = '{"session": 6, "events": [{"aid": 2, "ts": 11, "type": "views"}]}'
    path = write(tmp_path, "otto2.jsonl", f"{good}\n{odd}\n")
    with pytest.raises(IngestError, match="clicks/carts/orders") as caught:
        read_otto(path)
    assert caught.value.line == 2


def test_msnbc_plain_gz_file_and_bad_number(tmp_path):
    header = "% Different categories found in input file:\n\nhome news\n\n% Sequences:\n\n"
    path = tmp_path / "tiny.seq.gz"
    path.write_bytes(gzip.compress((header + "1 2 \n2 \n").encode()))
    result = read_msnbc(path)
    assert result.events.rows() == [
        ("v0", "v0", 0, "home"), ("v0", "v0", 1, "news"), ("v1", "v1", 100_000, "news"),
    ]
    bad = write(tmp_path, "bad.seq", header + "1 2 \n2 3 \n")
    with pytest.raises(IngestError, match="1..2") as caught:
        read_msnbc(bad)
    assert caught.value.line == 8


def test_read_events_unknown_source_and_missing_file(tmp_path):
    assert set(SOURCES) == {"generic", "taobao", "rees46", "ga360", "otto", "msnbc", "ga4", "adobe"}
    with pytest.raises(ValueError, match="ga360"):
        read_events("nosuch", tmp_path / "x.csv")
    with pytest.raises(IngestError, match="no such file"):
        read_events("taobao", tmp_path / "missing.csv")
