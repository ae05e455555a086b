"""A hetlm prepared folder -> the inputs of the RecBole peers (runs in the project's venv).

RecBole reads "benchmark" atomic files, one row per (context, next page); items are hetlm token ids
written as tokens, so the peers' scores map back to hetlm's page vocabulary without a tokenizer:

Files are named after the output folder, as RecBole finds them (data_path/<name>/<name>.<part>.inter):

- <name>.train.inter: each user's most recent training sample (its history holds the user's earlier
  training targets), history and target flattened into one page sequence without session
  boundaries; every prefix predicts its next page ([UNK] targets left out), the context being the
  last `max_len` pages before it, as RecBole's own augmentation does.
- <name>.valid.inter / <name>.test.inter: one row per val / test sample whose next session's first
  page is known: the flattened history -> that first page (RecBole validates, and reports a test
  figure, on these).
- contexts.json: the flattened history of every val and test sample, in the order of val.parquet and
  test.parquet (unknown first pages included: the set metrics score every test user), plus the size
  of the page vocabulary, for the peers' rankings.
"""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl

from hetlm.tokenizer import BOS_ID, EOS_ID, UNK_ID, load_tokenizer

HEADER = "user_id:token\titem_id_list:token_seq\titem_id:token\n"
BOUNDARIES = (BOS_ID, EOS_ID)


def flat_pages(ids: list[int]) -> list[int]:
    """Token ids of [BOS] p .. [EOS] sessions -> the page ids alone."""
    return [i for i in ids if i not in BOUNDARIES]


def _line(user: str, context: list[int], item: int) -> str:
    return f"{user}\t{' '.join(map(str, context))}\t{item}\n"


def training_sequences(train: pl.DataFrame) -> list[tuple[str, list[int]]]:
    """(user, page ids) per user: the user's latest training sample, history + target flattened."""
    latest = train.sort("user", "target_start").group_by("user", maintain_order=True).last()
    return [(str(user), flat_pages(inputs + target))
            for user, inputs, target in latest.select("user", "input_ids", "target_ids").iter_rows()]


def write_inputs(prepared: str | Path, out: str | Path, max_len: int = 50) -> dict:
    """Write the RecBole files and contexts.json of `prepared` into `out`; returns row counts."""
    prepared, out = Path(prepared), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    train, val, test = (pl.read_parquet(prepared / f"{split}.parquet") for split in ("train", "val", "test"))
    counts = {"train": 0}
    with open(out / f"{out.name}.train.inter", "w") as f:
        f.write(HEADER)
        for user, pages in training_sequences(train):
            for position in range(1, len(pages)):
                if pages[position] != UNK_ID:
                    f.write(_line(user, pages[max(0, position - max_len):position], pages[position]))
                    counts["train"] += 1
    contexts = {"n_tokens": len(load_tokenizer(prepared / "tokenizer"))}
    for name, split in (("valid", val), ("test", test)):
        rows = split.select(pl.col("user").cast(pl.Utf8), "input_ids", "target_ids").rows()
        contexts[name] = [flat_pages(inputs)[-max_len:] for _, inputs, _ in rows]
        known = [(user, context, target[1]) for (user, _, target), context in zip(rows, contexts[name])
                 if target[1] != UNK_ID]
        with open(out / f"{out.name}.{name}.inter", "w") as f:
            f.write(HEADER + "".join(_line(*row) for row in known))
        counts[name] = len(known)
    (out / "contexts.json").write_text(json.dumps(contexts))
    return counts
