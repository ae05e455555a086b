"""Outputs that are whole or absent: written under a temporary name, renamed into place on success.

A killed or failed `hetlm prepare` or `hetlm score` leaves the previous complete output (or none), never
a mix of old and new files or a partly written file that reads as whole. A prepared folder is complete
when its summary.json, written last, lists the sha256 of each file beside it and they still match
(`check_prepared`, run by every command that reads one).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from .provenance import sha256

SUMMARY = "summary.json"
SPLIT_FILES = ("train.parquet", "val.parquet", "test.parquet")
OLD_TOKENIZER = ".tokenizer.old"  # the replaced tokenizer/ while publish_prepared swaps in the new one
PREPARED_ENTRIES = (*SPLIT_FILES, "tokenizer", SUMMARY)  # what publish_prepared writes into a prepared folder
PREPARED_FILES = (*SPLIT_FILES, "tokenizer/tokenizer.json",
                  "tokenizer/tokenizer_config.json")


class IncompleteOutput(ValueError):
    """An output folder or file that a killed or failed run left incomplete, or that changed since."""


@contextlib.contextmanager
def work_dir(parent: Path, prefix: str) -> Iterator[Path]:
    """A scratch folder `parent/<prefix><pid>`, removed on exit. Folders of the same prefix left by processes
    that no longer run (killed) are removed first."""
    parent.mkdir(parents=True, exist_ok=True)
    for stale in parent.glob(f"{prefix}*"):
        pid = stale.name[len(prefix):]
        if pid.isdigit() and not _running(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)
    work = parent / f"{prefix}{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    try:
        yield work
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def write_atomically(path: str | Path, data: str | bytes) -> Path:
    """Write `path` whole or not at all: into `.<name>.tmp` beside it, then renamed onto it; on failure (a
    full disk, Ctrl-C) the temp file is removed and the previous file, if any, is left as it was."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
        os.replace(tmp, path)
    except OSError as err:  # a failed write() names no file
        tmp.unlink(missing_ok=True)
        raise OSError(err.errno, err.strerror, err.filename or str(path)) from err
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def os_error_message(err: OSError) -> str:
    """An OSError as one line for the user: what failed on which file, and what to do for a full or
    read-only disk."""
    where = f" {err.filename}" if err.filename else ""
    advice = {28: ": the disk is full; free space (or choose another --out) and rerun",
              30: ": the file system is read-only; choose another --out"}.get(err.errno, "")
    return f"{err.strerror or err}{':' if where else ''}{where}{advice}"


def writable_folder(folder: Path, what: str = "--out") -> Path:
    """`folder`, created if needed; a clear error when it is a file or cannot be written."""
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"{what} {folder} is a file, not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ValueError(f"{what} {folder} cannot be created ({err.strerror})") from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ValueError(f"{what} {folder} is not writable")
    return folder


def fingerprints(folder: Path) -> dict[str, str]:
    return {name: sha256(folder / name) for name in PREPARED_FILES}


def publish_prepared(new: Path, out: Path, summary: dict) -> None:
    """Move a complete prepared folder `new` into `out`, summary.json (with fingerprints) last. The old
    summary.json goes first, so between the renames `out` reads as incomplete, not as the old run."""
    summary["fingerprints"] = fingerprints(new)
    (out / SUMMARY).unlink(missing_ok=True)
    for name in SPLIT_FILES:
        os.replace(new / name, out / name)
    old = out / OLD_TOKENIZER
    shutil.rmtree(old, ignore_errors=True)
    if (out / "tokenizer").exists():
        os.replace(out / "tokenizer", old)
    os.replace(new / "tokenizer", out / "tokenizer")
    shutil.rmtree(old, ignore_errors=True)
    (new / SUMMARY).write_text(json.dumps(summary, indent=2))
    os.replace(new / SUMMARY, out / SUMMARY)


def check_prepared(folder: str | Path) -> dict:
    """The summary of a complete prepared folder; IncompleteOutput (saying to rerun prepare) otherwise."""
    folder = Path(folder)
    rerun = f"rerun `hetlm prepare ... --out {folder}`"
    if not folder.is_dir():
        raise IncompleteOutput(f"{folder} is not a folder written by `hetlm prepare`: run `hetlm prepare ... "
                               f"--out {folder}` first")
    try:
        summary = json.loads((folder / SUMMARY).read_text())
    except FileNotFoundError:
        if any((folder / name).exists() for name in ("train.parquet", "tokenizer")):
            raise IncompleteOutput(f"{folder} is incomplete (no {SUMMARY}: prepare was interrupted or failed); "
                                   f"{rerun} (a folder made by hand needs a {SUMMARY}; {{}} is checked for nothing)"
                                   ) from None
        raise IncompleteOutput(f"{folder} is not a folder written by `hetlm prepare` (no {SUMMARY}): run "
                               f"`hetlm prepare ... --out {folder}` first") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise IncompleteOutput(f"{folder / SUMMARY} is not readable JSON (partly written?); {rerun}") from None
    for name, digest in summary.get("fingerprints", {}).items():  # folders prepared before fingerprints: none
        path = folder / name
        if not path.is_file() or sha256(path) != digest:
            state = "is missing" if not path.is_file() else f"does not match {SUMMARY}"
            raise IncompleteOutput(f"{path} {state} (changed, replaced or partly written since prepare finished); "
                                   f"{rerun}")
    return summary

