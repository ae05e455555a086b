"""One way to configure every command (nanoGPT's configurator idea, validated by pydantic): the command's
config model, read from a JSON file (`--config`), changed by the command's own options, then by
`--set key=value` overrides whose dotted keys reach into nested models (`--set train.lr=3e-4`). Later
sources win: defaults < the file < the options given < --set.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TypeVar

from pydantic import BaseModel, ValidationError

C = TypeVar("C", bound=BaseModel)


def one_of(value: str, known: Iterable[str], what: str) -> str:
    """`value` if it is one of `known`, else a ValueError listing them (for validators of names)."""
    if value not in known:
        raise ValueError(f"unknown {what} {value!r}; choose from {', '.join(known)}")
    return value


def parse_overrides(pairs: Sequence[str]) -> dict:
    """`key=value` pairs -> nested changes (`a.b=1` -> {"a": {"b": 1}}); a value is JSON when it parses as
    JSON (numbers, true, null, lists, objects), else the text itself."""
    changes: dict = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--set {pair!r}: expected key=value")
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            value = text
        *parents, last = key.split(".")
        node = changes
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"--set {pair!r}: {part!r} is given a value and settings inside it")
        node[last] = value
    return changes


def _check_keys(model_cls: type[BaseModel], changes: dict, prefix: str = "") -> None:
    """A ValueError naming the first key that is not a setting of `model_cls` (or of a model nested in it)."""
    for key, value in changes.items():
        field = model_cls.model_fields.get(key)
        if field is None:
            raise ValueError(f"unknown setting {prefix + key!r}; {model_cls.__name__} has: "
                             f"{', '.join(model_cls.model_fields)}")
        inner = field.annotation
        if isinstance(value, dict) and isinstance(inner, type) and issubclass(inner, BaseModel):
            _check_keys(inner, value, f"{prefix}{key}.")


def _merged(base: dict, changes: dict) -> dict:
    out = dict(base)
    for key, value in changes.items():
        nested = isinstance(value, dict) and isinstance(out.get(key), dict)
        out[key] = _merged(out[key], value) if nested else value
    return out


def load_config(model_cls: type[C], path: str | Path | None = None, options: dict | None = None,
                overrides: Sequence[str] = ()) -> C:
    """`model_cls` from the JSON file `path` (default: its defaults), then `options` (nested changes, e.g. the
    command-line options given), then `overrides` ("key=value", dotted keys). Unknown keys and bad values are
    ValueErrors naming the setting (and the file, for its own)."""
    try:
        config = model_cls.model_validate_json(Path(path).read_text()) if path is not None else model_cls()
    except ValidationError as err:
        raise ValueError(f"{path}: {err}") from err
    changes = _merged(options or {}, parse_overrides(overrides))
    if not changes:
        return config
    _check_keys(model_cls, changes)
    # Changes apply to the resolved config, so a nested model keeps its own defaults beside a changed field.
    return model_cls.model_validate(_merged(config.model_dump(), changes))
