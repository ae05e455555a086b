"""Logs written the way the analytics products export them, for the ga4 and adobe adapters' tests and
bench/bench_ingest.py: a GA4 BigQuery export (events_YYYYMMDD files, the documented schema, INTEGER fields
as JSON strings as BigQuery writes them) and an Adobe Analytics data feed (hit data with column_headers.tsv
and event.tsv, values escaped as Adobe documents). `browsing` generates the visits both are written from.
"""

from __future__ import annotations

import gzip
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

DAY_US = 86_400 * 10**6
START_US = 1_609_459_200 * 10**6  # 2021-01-01 00:00 UTC
SECTIONS = ["Apparel/Mens", "Apparel/Womens", "Bags", "Drinkware", "Office", "Lifestyle", "Electronics", "Kids"]


@dataclass
class Hit:
    """One page view, item view or outcome of a generated visit."""

    user: str
    visit: int        # the user's visit number (1-based)
    visit_start: int  # unix seconds
    us: int           # microseconds since the epoch
    kind: str         # "page", "item", "cart" or "purchase"
    path: str = ""    # page views: the URL path
    title: str = ""
    items: list[str] = field(default_factory=list)


def browsing(users: int, visits: int = 3, pages: int = 5, days: int = 2, seed: int = 0) -> list[Hit]:
    """`users` users with `visits` visits each spread over `days` days, each visit `pages` page views (some
    followed by an item view), a cart addition in every 4th visit and a purchase in every 8th, in time order."""
    rng = np.random.default_rng(seed)
    hits = []
    for u in range(users):
        user = f"{1_000_000 + u}.{1_600_000_000 + u}"
        for v in range(visits):
            start_us = START_US + int(rng.integers(0, days * DAY_US - 3_600 * 10**6))
            us = start_us
            for p in range(pages):
                section = SECTIONS[int(rng.integers(len(SECTIONS)))]
                hits.append(Hit(user, v + 1, start_us // 10**6, us, "page", f"/Google+Redesign/{section}",
                                section.replace("/", " | ")))
                us += int(rng.integers(5, 120)) * 10**6
                if rng.random() < 0.3:
                    hits.append(Hit(user, v + 1, start_us // 10**6, us, "item", items=[f"Google {section} Tee"]))
                    us += 10**6
            for kind, every in (("cart", 4), ("purchase", 8)):
                if (u + v) % every == 0:
                    hits.append(Hit(user, v + 1, start_us // 10**6, us, kind, items=["Google Tee"]))
                    us += 10**6
    return sorted(hits, key=lambda h: h.us)


# --- GA4 BigQuery export ------------------------------------------------------------------------------

GA4_NAMES = {"page": "page_view", "item": "view_item", "cart": "add_to_cart", "purchase": "purchase"}


def ga4_param(key: str, value) -> dict:
    """An event_params entry: the value in the field of its type, the others null (as BigQuery writes)."""
    typed = {"string_value": None, "int_value": None, "float_value": None, "double_value": None}
    typed["int_value" if isinstance(value, int) else "string_value"] = str(value) if isinstance(value, int) else value
    return {"key": key, "value": typed}


def ga4_event(hit: Hit, host: str = "https://shop.googlemerchandisestore.com") -> dict:
    """The export row of a hit, with the schema's top-level fields (INTEGERs as strings)."""
    params = [ga4_param("ga_session_id", hit.visit_start), ga4_param("ga_session_number", hit.visit),
              ga4_param("engaged_session_event", 1)]
    if hit.kind == "page":
        params += [ga4_param("page_location", host + hit.path + "?utm_source=x"), ga4_param("page_title", hit.title)]
    return {
        "event_date": _date(hit.us), "event_timestamp": str(hit.us), "event_name": GA4_NAMES[hit.kind],
        "event_params": params, "event_previous_timestamp": None, "event_value_in_usd": None,
        "event_bundle_sequence_id": "1", "event_server_timestamp_offset": None, "user_id": None,
        "user_pseudo_id": hit.user, "privacy_info": {"analytics_storage": "Yes", "ads_storage": "Yes"},
        "user_properties": [], "user_first_touch_timestamp": str(START_US),
        "device": {"category": "desktop", "operating_system": "Linux", "web_info": {"browser": "Chrome"}},
        "geo": {"country": "Germany", "city": "Berlin"}, "stream_id": "2100450278", "platform": "WEB",
        "ecommerce": None,
        "items": [{"item_id": f"GGOE{i:04d}", "item_name": name, "item_brand": "Google",
                   "item_category": name.split(" ")[1], "price": 20.0, "quantity": "1", "item_params": []}
                  for i, name in enumerate(hit.items)],
    }


def _date(us: int) -> str:
    return np.datetime64(us, "us").astype("datetime64[D]").astype(str).replace("-", "")


def write_ga4(hits: list[Hit], folder: Path, gz: bool = True) -> list[Path]:
    """events_YYYYMMDD.json(.gz), one per day, rows in an order of BigQuery's (by user, not by time)."""
    folder.mkdir(parents=True, exist_ok=True)
    days: dict[str, list[str]] = {}
    for hit in sorted(hits, key=lambda h: (h.user, h.us)):
        days.setdefault(_date(hit.us), []).append(json.dumps(ga4_event(hit)))
    files = []
    for day, lines in sorted(days.items()):
        text = ("\n".join(lines) + "\n").encode()
        file = folder / f"events_{day}.json{'.gz' if gz else ''}"
        file.write_bytes(gzip.compress(text, 1) if gz else text)
        files.append(file)
    return files


# --- Adobe Analytics data feed ------------------------------------------------------------------------

ADOBE_COLUMNS = [
    "accept_language", "date_time", "exclude_hit", "hit_source", "hit_time_gmt", "hitid_high", "hitid_low",
    "post_event_list", "post_page_event", "post_pagename", "post_page_url", "post_product_list",
    "post_visid_high", "post_visid_low", "user_agent", "visit_num", "visit_page_num", "visit_start_time_gmt",
]
# event.tsv as Adobe delivers it: id, name (standard commerce events, then custom events 200+).
ADOBE_EVENTS = {"1": "Purchase", "2": "Product View", "10": "Cart Open", "11": "Cart Checkout", "12": "Cart Add",
                "13": "Cart Remove", "14": "Cart View", "200": "Custom Event 1"}
ADOBE_EVENT_IDS = {"page": "", "item": "2", "cart": "12,200", "purchase": "1"}


def escape(value: str) -> str:
    """A value as hit data holds it: backslash, tab and newline escaped with a backslash."""
    return value.replace("\\", "\\\\").replace("\t", "\\\t").replace("\n", "\\\n")


def adobe_hit(hit: Hit, number: int, page_num: int, host: str = "https://www.example.com") -> dict:
    visid_high, visid_low = hit.user.split(".")
    page = hit.kind == "page"
    return {
        "accept_language": "en-US", "date_time": "2021-01-01 00:00:00", "exclude_hit": "0", "hit_source": "1",
        "hit_time_gmt": str(hit.us // 10**6), "hitid_high": str(number), "hitid_low": str(number * 7),
        "post_event_list": ADOBE_EVENT_IDS[hit.kind], "post_page_event": "0" if page else "100",
        "post_pagename": hit.title if page else "", "post_page_url": host + hit.path if page else "",
        "post_product_list": ";".join(["", *hit.items[:1]]) if hit.items else "",
        "post_visid_high": visid_high, "post_visid_low": visid_low, "user_agent": "Mozilla/5.0",
        "visit_num": str(hit.visit), "visit_page_num": str(page_num), "visit_start_time_gmt": str(hit.visit_start),
    }


def write_adobe(rows: list[dict], folder: Path, gz: bool = False, name: str = "hit_data.tsv",
                columns: list[str] = ADOBE_COLUMNS, lookups: bool = True) -> Path:
    """hit data (values escaped) and, with `lookups`, column_headers.tsv and event.tsv in `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    if lookups:
        (folder / "column_headers.tsv").write_text("\t".join(columns) + "\n")
        (folder / "event.tsv").write_text("".join(f"{k}\t{v}\n" for k, v in ADOBE_EVENTS.items()))
    text = "".join("\t".join(escape(row.get(c, "")) for c in columns) + "\n" for row in rows).encode()
    file = folder / (name + (".gz" if gz else ""))
    file.write_bytes(gzip.compress(text, 1) if gz else text)
    return file


def adobe_rows(hits: list[Hit]) -> list[dict]:
    page_nums: dict[tuple, int] = {}
    rows = []
    for number, hit in enumerate(hits):
        key = (hit.user, hit.visit)
        page_nums[key] = page_nums.get(key, 0) + (hit.kind == "page")
        rows.append(adobe_hit(hit, number, page_nums[key]))
    return rows
