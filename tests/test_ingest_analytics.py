"""Analytics exports as their vendors document them: GA4 BigQuery export (ga4), Adobe Analytics data feeds
(adobe), and outcome codes of any log (generic --cart-events / --purchase-events, the no-outcome warning,
--sample-users)."""

from __future__ import annotations

import gzip
import json
import warnings

import polars as pl
import pytest
from typer.testing import CliRunner

from hetlm import partitioned
from hetlm.cli import app
from hetlm.ingest import IngestError, NoOutcomesWarning, read_events
from hetlm.prepare import PrepareConfig, prepare

from .analytics_exports import (
    adobe_rows, browsing, ga4_event, ga4_param, write_adobe, write_ga4,
)
from .test_prepare_streaming import assert_same_prepared


T0 = 1_609_459_200_000_000  # 2021-01-01 00:00 UTC in microseconds


def ga4_row(us, name, pseudo="p1", session=111, params=(), items=(), user_id=None, numbers=False):
    """An export row; `numbers` writes INTEGERs as JSON numbers instead of BigQuery's strings."""
    row = {"event_date": "20210101", "event_timestamp": us if numbers else str(us), "event_name": name,
           "user_pseudo_id": pseudo, "user_id": user_id, "platform": "WEB", "device": {"category": "mobile"},
           "event_params": [ga4_param(k, v) for k, v in params], "items": [{"item_name": n, "item_category": c}
                                                                             for n, c in items]}
    if session is not None:
        row["event_params"].append(ga4_param("ga_session_id", session))
    return row


def write_lines(path, rows, gz=False):
    text = "".join(json.dumps(r) + "\n" for r in rows).encode()
    path.write_bytes(gzip.compress(text) if gz else text)
    return path


def as_tuples(events: pl.DataFrame) -> list[tuple]:
    return list(events.select("user", "session", "ts", "page").iter_rows())


# --- GA4 ----------------------------------------------------------------------------------------------


def test_ga4_two_days_pages_items_and_outcomes(tmp_path):
    loc = "https://shop.googlemerchandisestore.com/Google+Redesign/Apparel/Men%27s/Men%27s+T-Shirts?hl=en#top"
    day1 = [
        ga4_row(T0 + 5, "page_view", params=[("page_location", loc), ("page_title", "Men's T-Shirts | Store")]),
        ga4_row(T0 + 5, "session_start"),  # not a page
        ga4_row(T0 + 9_000, "view_item", items=[("Google Tee", "Apparel"), ("Google Cap", "Headgear")]),
        ga4_row(T0 + 20_000, "add_to_cart", items=[("Google Tee", "Apparel")]),
        ga4_row(T0 + 30_000, "page_view", pseudo="p2", session=None, user_id="u9",
                params=[("page_location", "https://shop.googlemerchandisestore.com/")], numbers=True),
    ]
    day2 = [ga4_row(T0 + 86_400_000_000, "page_view", session=222, params=[("page_location", "https://x.com/basket.html")]),
            ga4_row(T0 + 86_400_000_001, "purchase", session=222)]
    write_lines(tmp_path / "events_20210101.json.gz", day1, gz=True)
    write_lines(tmp_path / "events_20210102.json", day2)
    (tmp_path / "notes.txt").write_text("not an export file")
    result = read_events("ga4", tmp_path)
    ms = T0 // 1000
    assert as_tuples(result.events) == [
        ("p1", "p1-111", ms, "apparel_mens_mens_t_shirts"),
        ("p1", "p1-111", ms + 9, "Google_Tee"),
        ("p1", "p1-111", ms + 9, "Google_Cap"),
        ("p1", "p1-111", ms + 20, "Cart"),
        ("p2", None, ms + 30, "home"),  # no ga_session_id: sessions split on the gap
        ("p1", "p1-222", ms + 86_400_000, "basket"),
        ("p1", "p1-222", ms + 86_400_000, "Purchase"),
    ]
    assert result.event_values["page_view"] == 3 and result.skipped == {}
    by_title = read_events("ga4", tmp_path / "events_2021010[12]*", user="user_id", page="page_title",
                           items="item_category", purchase_events="purchase,begin_checkout", on_bad_rows="skip")
    assert by_title.events["page"].to_list()[:3] == ["Men's_T-Shirts_|_Store", "Apparel", "Headgear"]
    assert by_title.skipped == {"page_view without a page_title parameter": 2}
    assert "u9" in set(read_events("ga4", tmp_path, user="user_id").events["user"])
    no_items = read_events("ga4", tmp_path / "events_20210101.json.gz", items=None)
    assert "Google_Tee" not in set(no_items.events["page"])


def test_ga4_parquet_export_reads_as_the_json_one(tmp_path):
    files = write_ga4(browsing(4, visits=2, days=2), tmp_path / "json", gz=False)
    (tmp_path / "pq").mkdir()
    for file in files:
        rows = pl.read_ndjson(file).with_columns(pl.col("event_timestamp").cast(pl.Int64))  # INT64, as in Parquet
        rows.write_parquet(tmp_path / "pq" / file.name.replace(".json", ".parquet"))
    assert read_events("ga4", tmp_path / "pq").events.equals(read_events("ga4", tmp_path / "json").events)


@pytest.mark.filterwarnings("ignore::hetlm.ingest.NoOutcomesWarning")
def test_ga4_missing_parameters_are_bad_rows_with_their_line(tmp_path):
    rows = [ga4_row(T0, "page_view", params=[("page_location", "https://x.com/a")]),
            ga4_row(T0 + 1, "page_view", params=[("page_title", "B")]),  # no page_location
            ga4_row(T0 + 2, "view_item", items=[(None, "C")]),  # no item_name
            ga4_row("soon", "page_view", params=[("page_location", "https://x.com/c")])]
    log = write_lines(tmp_path / "events_20210101.json", rows)
    with pytest.raises(IngestError) as err:
        read_events("ga4", log)
    assert err.value.line == 4 and "event without a numeric event_timestamp" in err.value.problem
    skipped = read_events("ga4", log, on_bad_rows="skip").skipped
    assert skipped == {"event without a numeric event_timestamp": 1, "page_view without a page_location parameter": 1,
                       "view_item with no item_name and without a page_location parameter": 1}  # no page to fall back to
    skipped = read_events("ga4", log, on_bad_rows="skip", empty_items="bad").skipped
    assert skipped == {"event without a numeric event_timestamp": 1, "page_view without a page_location parameter": 1,
                       "view_item without an item with an item_name": 1}


def test_ga4_folder_without_export_files_is_an_error(tmp_path):
    with pytest.raises(IngestError, match="no GA4 export files"):
        read_events("ga4", tmp_path)
    with pytest.raises(ValueError, match="page must be one of"):
        read_events("ga4", write_lines(tmp_path / "events_1.json", [ga4_event(browsing(1)[0])]), page="url")


# --- Adobe --------------------------------------------------------------------------------------------


def adobe_hit(high, time, pagename="", url="", events="", page_event="0", exclude="0", source="1", visit="1",
              page_num="1"):
    return {"post_visid_high": high, "post_visid_low": "7", "hit_time_gmt": str(time), "post_pagename": pagename,
            "post_page_url": url, "post_event_list": events, "post_page_event": page_event, "exclude_hit": exclude,
            "hit_source": source, "visit_num": visit, "visit_page_num": page_num, "visit_start_time_gmt": "100"}


def test_adobe_feed_escapes_exclusions_links_and_events(tmp_path):
    day1 = [
        adobe_hit("1", 100, pagename="Home\tPage"),  # an escaped tab inside the value
        adobe_hit("1", 101, pagename="Search: a\nb", page_num="2"),  # an escaped newline
        adobe_hit("1", 101, pagename="C:\\shop\\", page_num="3"),  # backslashes, the last before the delimiter
        adobe_hit("1", 102, url="https://www.example.com/Shop/Shoes.html?id=1", events="2,12", page_num="4"),
        adobe_hit("1", 103, events="12,200", page_event="100", page_num="4"),  # a link hit: Cart, no page
        adobe_hit("1", 104, pagename="Bot page", exclude="1"),
        adobe_hit("1", 104, pagename="Imported", source="5"),
    ]
    day2 = [adobe_hit("2", 200, pagename="Checkout", visit="3"), adobe_hit("2", 201, events="1", page_event="100",
                                                                           visit="3")]
    write_adobe(day1, tmp_path / "2021-01-01")
    write_adobe(day2, tmp_path / "2021-01-02", gz=True, name="01-rsid_2021-01-02.tsv")
    result = read_events("adobe", tmp_path)
    visit1, visit2 = "1-7-1-100", "2-7-3-100"
    assert as_tuples(result.events) == [
        ("1-7", visit1, 100_000, "Home_Page"),
        ("1-7", visit1, 101_000, "Search:_a_b"),
        ("1-7", visit1, 101_000, "C:\\shop\\"),
        ("1-7", visit1, 102_000, "shop_shoes"),  # no pagename: the URL's path
        ("1-7", visit1, 102_000, "Cart"),
        ("1-7", visit1, 103_000, "Cart"),
        ("2-7", visit2, 200_000, "Checkout"),
        ("2-7", visit2, 201_000, "Purchase"),
    ]
    assert result.skipped == {"hit excluded by Adobe (exclude_hit not 0)": 1,
                              "data source hit (hit_source 5, 7, 8 or 9)": 1}
    assert result.event_values == {"12 (Cart Add)": 2, "2 (Product View)": 1, "200 (Custom Event 1)": 1,
                                   "1 (Purchase)": 1}
    by_name = read_events("adobe", tmp_path / "2021-01-01" / "hit_data.tsv", cart_events="Custom Event 1",
                          page="post_page_url")
    assert by_name.events["page"].to_list() == ["shop_shoes", "Cart"]  # event 200 only on the link hit


def test_adobe_error_lines_count_escaped_newlines(tmp_path):
    rows = [adobe_hit("1", 100, pagename="two\nlines"), adobe_hit("1", "noon", pagename="B")]
    write_adobe(rows, tmp_path)
    with pytest.raises(IngestError) as err:
        read_events("adobe", tmp_path)
    assert err.value.path == str(tmp_path / "hit_data.tsv") and err.value.line == 3
    assert "hit without a numeric hit_time_gmt" in err.value.problem


def test_adobe_partitioned_prepare_keeps_escaped_newlines_inside_records(monkeypatch, tmp_path):
    hits = browsing(30, visits=3, days=2, seed=1)
    rows = adobe_rows(hits)
    for row in rows[::7]:
        row["post_pagename"] += "\\\nx"  # a value ending in a backslash, then an escaped newline
    for day in (1, 2):
        write_adobe([r for r in rows if int(r["hit_time_gmt"]) % 2 == day % 2], tmp_path / "feed" / f"day{day}")
    monkeypatch.setattr(partitioned, "CHUNK_BYTES", 2_000)
    for partitions in (1, 3):
        prepare("adobe", tmp_path / "feed", tmp_path / str(partitions), PrepareConfig(partitions=partitions))
    assert_same_prepared(tmp_path / "1", tmp_path / "3")


def test_ga4_partitioned_prepare_equals_in_memory(monkeypatch, tmp_path):
    write_ga4(browsing(30, visits=3, days=3, seed=2), tmp_path / "export")
    monkeypatch.setattr(partitioned, "CHUNK_BYTES", 20_000)
    for partitions in (1, 4):
        prepare("ga4", tmp_path / "export", tmp_path / str(partitions), PrepareConfig(partitions=partitions))
    assert_same_prepared(tmp_path / "1", tmp_path / "4")


# --- any log's outcome codes --------------------------------------------------------------------------


def product_hits(path):
    """A GA360 product-hit extract: fullVisitorId, visitNumber, hitNumber, action_type (3 add to cart,
    6 purchase, 0/1/2 other), productSKU; every 4th visit adds to cart, every 8th buys."""
    rows = []
    for user in range(40):
        for visit in range(1, 4):
            actions = ["2", "1", "2", "0"] + ["3"] * ((user + visit) % 4 == 0) + ["6"] * ((user + visit) % 8 == 0)
            rows += [(f"{10**18 + user}", visit, hit + 1, 1_600_000_000 + visit * 86_400 + hit * 30, action,
                      f"GGOEGAAX0{hit % 5}")
                     for hit, action in enumerate(actions)]
    pl.DataFrame(rows, schema=["fullVisitorId", "visitNumber", "hitNumber", "visitStartTime", "action_type",
                               "productSKU"], orient="row").write_csv(path)
    return path


GA360_HITS = dict(user="fullVisitorId", session="visitNumber", page="productSKU", time="visitStartTime",
                  order="hitNumber", event="action_type")


def test_numeric_outcome_codes_give_the_true_rates(tmp_path):
    log = product_hits(tmp_path / "hits.csv")
    summary = prepare("generic", log, tmp_path / "out", PrepareConfig(split="user"), cart_events="3",
                      purchase_events=["6"], **GA360_HITS)
    raw = pl.read_csv(log, schema_overrides={"fullVisitorId": pl.Utf8, "action_type": pl.Utf8})
    visits = raw.group_by("fullVisitorId", "visitNumber").agg(
        start=(pl.col("visitStartTime") * 1000 + pl.col("hitNumber")).min(), cart=(pl.col("action_type") == "3").any(),
        purchase=(pl.col("action_type") == "6").any())
    for split in ("train", "test"):
        samples = pl.read_parquet(tmp_path / "out" / f"{split}.parquet")
        truth = samples.join(visits, left_on=["user", "target_start"], right_on=["fullVisitorId", "start"])
        assert truth.height == samples.height
        rates = summary["outcome_rates"][split]
        assert rates["cart"] == pytest.approx(truth["cart"].mean())
        assert rates["purchase"] == pytest.approx(truth["purchase"].mean())
    assert summary["outcome_rates"]["train"]["cart"] > summary["outcome_rates"]["train"]["purchase"] > 0


def test_event_values_that_never_match_warn_with_the_values_seen(tmp_path):
    log = product_hits(tmp_path / "hits.csv")
    with pytest.warns(NoOutcomesWarning, match="no event was read as Cart or Purchase") as caught:
        read_events("generic", log, **GA360_HITS)
    assert all(seen in str(caught[0].message) for seen in ("'2' (240)", "'1' (120)", "'0' (120)", "'3' (30)", "'6' (15)"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        read_events("generic", log, cart_events="3", **GA360_HITS)  # one code maps: no warning
    result = CliRunner().invoke(app, ["prepare", "generic", str(log), "--out", str(tmp_path / "out"),
                                      "--partitions", "2", *[a for k, v in GA360_HITS.items() for a in (f"--{k}", v)]])
    assert result.exit_code == 0, result.output
    shown = " ".join(result.output.split())
    assert "warning:" in shown and "no event was read as Cart or Purchase" in shown and "--cart-events" in shown
    result = CliRunner().invoke(app, ["prepare", "generic", str(log), "--out", str(tmp_path / "out"),
                                      "--cart-events", "3", "--purchase-events", "6",
                                      *[a for k, v in GA360_HITS.items() for a in (f"--{k}", v)]])
    assert result.exit_code == 0 and "warning" not in result.output
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["outcome_rates"]["train"]["cart"] > 0


def test_sample_users_keeps_whole_users_the_same_every_run(tmp_path):
    log = product_hits(tmp_path / "hits.csv")
    full = read_events("generic", log, cart_events="3", **GA360_HITS).events
    half = read_events("generic", log, sample=0.5, cart_events="3", **GA360_HITS).events
    assert half.equals(read_events("generic", log, sample=0.5, cart_events="3", **GA360_HITS).events)
    users = set(half["user"])
    assert 8 < len(users) < 32  # about half of the 40
    assert half.equals(full.filter(pl.col("user").is_in(users)))  # every event of a kept user
    summary = prepare("generic", log, tmp_path / "out", PrepareConfig(sample_users=0.5), cart_events="3",
                      **GA360_HITS)
    assert summary["users"] == len(users)


def test_cli_rejects_options_a_source_does_not_take(tmp_path):
    result = CliRunner().invoke(app, ["prepare", "adobe", str(tmp_path), "--out", str(tmp_path / "o"),
                                      "--items", "item_name"])
    assert result.exit_code == 2 and "do not apply to the adobe source" in " ".join(result.output.split())



def real_product_hits(shared_data, path):
    """The issue's extract from the real GA360 sample: one row per product of a hit (impressions left out)."""
    rows = []
    with gzip.open(shared_data / "ga360-merchandise-store" / "ga_sessions_20160801.json.gz", "rt") as f:
        for line in f:
            visit = json.loads(line)
            rows += [(visit["fullVisitorId"], visit["visitNumber"], visit["visitStartTime"], int(hit["time"]),
                      hit["eCommerceAction"]["action_type"], product["productSKU"])
                     for hit in visit.get("hits", []) for product in hit.get("product") or []
                     if not product.get("isImpression")]
    pl.DataFrame(rows, schema=["fullVisitorId", "visitNumber", "visitStartTime", "time", "action_type", "productSKU"],
                 orient="row").write_csv(path)
    return path


def test_real_ga360_product_hits_need_and_get_their_codes(shared_data, tmp_path):
    log = real_product_hits(shared_data, tmp_path / "hits.csv")
    options = dict(user="fullVisitorId", session="visitNumber", page="productSKU", time="visitStartTime",
                   order="time", event="action_type")
    with pytest.warns(NoOutcomesWarning, match="'3' \\(534\\)"):
        prepare("generic", log, tmp_path / "plain", PrepareConfig(split="user"), **options)
    summary = prepare("generic", log, tmp_path / "coded", PrepareConfig(split="user"), cart_events="3",
                      purchase_events="6", **options)
    raw = pl.read_csv(log, schema_overrides={"fullVisitorId": pl.Utf8, "action_type": pl.Utf8})
    visits = raw.group_by("fullVisitorId", "visitNumber").agg(
        start=(pl.col("visitStartTime") * 1000 + pl.col("time")).min(), cart=(pl.col("action_type") == "3").any(),
        purchase=(pl.col("action_type") == "6").any())
    train = pl.read_parquet(tmp_path / "coded" / "train.parquet").join(
        visits, left_on=["user", "target_start"], right_on=["fullVisitorId", "start"])
    rates = summary["outcome_rates"]["train"]
    assert train.height == summary["samples"]["train"] > 0
    assert rates["cart"] == pytest.approx(train["cart"].mean()) and rates["cart"] > 0
    assert rates["purchase"] == pytest.approx(train["purchase"].mean()) and rates["purchase"] > 0
