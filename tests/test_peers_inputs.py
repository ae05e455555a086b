"""bench/peers/inputs.py: the RecBole peers' files from a prepared folder (no RecBole needed)."""

import json

import polars as pl

from bench.peers.inputs import write_inputs
from hetlm.tokenizer import BOS_ID, EOS_ID, PAD_ID, SPECIALS, UNK_ID, load_tokenizer

MAX_LEN = 8  # short, so contexts are cut


def read_inter(path):
    lines = path.read_text().splitlines()
    assert lines[0] == "user_id:token\titem_id_list:token_seq\titem_id:token"
    rows = [line.split("\t") for line in lines[1:]]
    return [(user, [int(i) for i in context.split()], int(item)) for user, context, item in rows]


def test_inputs_from_a_prepared_folder(taobao_prepared, tmp_path):
    prepared, _ = taobao_prepared
    out = tmp_path / "taobao"
    counts = write_inputs(prepared, out, max_len=MAX_LEN)
    tokenizer = load_tokenizer(prepared / "tokenizer")
    train, val, test = (pl.read_parquet(prepared / f"{s}.parquet") for s in ("train", "val", "test"))

    rows = read_inter(out / "taobao.train.inter")
    assert len(rows) == counts["train"] > 0
    by_user: dict[str, list] = {}
    for user, context, item in rows:
        by_user.setdefault(user, []).append((context, item))
        assert 1 <= len(context) <= MAX_LEN and item >= len(SPECIALS)
        assert not {PAD_ID, BOS_ID, EOS_ID} & set(context)
    assert set(by_user) == set(train["user"].cast(pl.Utf8))
    for user_rows in by_user.values():
        # Every prefix of one page sequence: each context is the previous one plus its next page.
        assert len(user_rows[0][0]) == 1
        for (context, item), (following, _) in zip(user_rows, user_rows[1:]):
            assert following == (context + [item])[-MAX_LEN:]
    # Every training target session is among its user's next pages, in order.
    for user, target_ids in train.select(pl.col("user").cast(pl.Utf8), "target_ids").iter_rows():
        pages = [item for _, item in by_user[user]]
        target = target_ids[1:-1]
        assert any(pages[i:i + len(target)] == target for i in range(len(pages)))

    contexts = json.loads((out / "contexts.json").read_text())
    assert contexts["n_tokens"] == len(tokenizer)
    vocabulary = set(tokenizer.get_vocab())
    for name, split in (("valid", val), ("test", test)):
        assert len(contexts[name]) == split.height
        expected_rows = []
        for (history, target), context in zip(split.select("history", "target").iter_rows(), contexts[name]):
            # The flattened history by page name, unknown pages as [UNK], its last MAX_LEN pages.
            names = [page if page in vocabulary else "[UNK]" for session in history for page in session]
            assert tokenizer.convert_ids_to_tokens(context) == names[-MAX_LEN:]
            first = tokenizer.convert_tokens_to_ids(target[0])
            if first != UNK_ID:
                expected_rows.append((context, first))
        got = read_inter(out / f"taobao.{name}.inter")
        assert [(context, item) for _, context, item in got] == expected_rows
        assert counts[name] == len(expected_rows) < split.height  # some first pages are unknown
