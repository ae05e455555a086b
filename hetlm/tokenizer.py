"""Page-level tokenizer: one page = one token, saved as a PreTrainedTokenizerFast.

Page names are whitespace-free (see `hetlm.ingest.base.normalize_pages`), so a WordLevel model over
whitespace-split text is exact: `tok("home apparel_mens Cart")` gives three ids, and the folder loads with
`transformers.AutoTokenizer.from_pretrained`.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

PAD, UNK, BOS, EOS = "[PAD]", "[UNK]", "[BOS]", "[EOS]"
SPECIALS = (PAD, UNK, BOS, EOS)
PAD_ID, UNK_ID, BOS_ID, EOS_ID = range(4)


def build_tokenizer(pages: Iterable[str]) -> PreTrainedTokenizerFast:
    """A tokenizer whose vocabulary is the specials (ids 0-3) then `pages` in the order given."""
    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    for page in pages:
        if page in vocab:
            raise ValueError(f"page {page!r} is listed twice or clashes with a special token")
        if not page or any(ch.isspace() for ch in page):
            raise ValueError(f"page {page!r} is empty or holds whitespace; normalise page names first")
        vocab[page] = len(vocab)
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token=PAD, unk_token=UNK, bos_token=BOS, eos_token=EOS,
        padding_side="left", model_input_names=["input_ids", "attention_mask"],
        # A page such as "a[UNK]b" is one word, not "a" [UNK] "b"; "[BOS]" alone still maps to id 2.
        split_special_tokens=True,
    )


class CustomCodeError(ValueError):
    """A model or tokenizer folder that names its own Python code."""


def refuse_custom_code(folder: str | Path, config_file: str) -> None:
    """hetlm never needs a folder's own Python, and a model folder may come from anyone: a config that names
    some (`auto_map`, which transformers would run after a prompt) is refused, not run."""
    path = Path(folder) / config_file
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError):
        return  # missing or unreadable: the loader's own error says so
    if isinstance(config, dict) and "auto_map" in config:
        raise CustomCodeError(f"{path} names Python code of its own (auto_map: {sorted(config['auto_map'])}); hetlm "
                              "runs no code from a model folder: use a folder saved by hetlm, or remove auto_map")


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerFast:
    refuse_custom_code(path, "tokenizer_config.json")
    tok = AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)
    ids = [tok.convert_tokens_to_ids(t) for t in SPECIALS]
    if ids != [PAD_ID, UNK_ID, BOS_ID, EOS_ID]:
        raise ValueError(f"{path}: not a hetlm page tokenizer (special ids {ids}, expected 0-3)")
    return tok


def page_vocabulary(tok: PreTrainedTokenizerFast) -> list[str]:
    """Page names by id, specials excluded (index 0 is id 4)."""
    return tok.convert_ids_to_tokens(list(range(len(SPECIALS), len(tok))))
