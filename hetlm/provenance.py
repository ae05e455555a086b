"""What produced a run: package versions, the git revision and fingerprints of the data it read.

Every run folder (`hetlm experiment`'s results.json, `hetlm train`'s run.json) carries these beside its
resolved config, so a result can be tied to the exact code and bytes it came from.
"""

from __future__ import annotations

import glob
import hashlib
import os
import platform
import subprocess
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

PACKAGES = ["hetlm", "torch", "transformers", "tokenizers", "polars", "pyarrow", "numpy", "scikit-learn",
            "sentence-transformers", "sacrebleu"]


def git_revision() -> str | None:
    """The commit of the hetlm checkout in use (None for an installed copy outside git)."""
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=Path(__file__).parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def versions() -> dict[str, str]:
    found = {}
    for name in PACKAGES:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            continue
    return found


def environment() -> dict:
    return {"python": platform.python_version(), "versions": versions(), "cpu_count": os.cpu_count(),
            "platform": platform.platform(), "git": git_revision()}


def sha256(path: str | Path) -> str:
    """Fingerprint of a data file."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def fingerprint(path: str | Path) -> str:
    """Fingerprint of a log given as a file, a folder (every file under it) or a glob: a file's sha256, else
    the sha256 of the sorted list of member files' relative names and sha256s (renaming a member changes it)."""
    path = Path(path)
    if path.is_file():
        return sha256(path)
    if path.is_dir():
        members = [f for f in path.rglob("*") if f.is_file()]
    else:  # a glob ("ga4/events_2021*.json.gz")
        members = [Path(f) for f in glob.glob(str(path)) if Path(f).is_file()]
    if not members:
        raise FileNotFoundError(f"{path}: no files to fingerprint")
    root = Path(os.path.commonpath([f.parent for f in members]))  # names relative to the members' common folder
    listing = "".join(f"{f.relative_to(root).as_posix()}\t{sha256(f)}\n" for f in sorted(members))
    return hashlib.sha256(listing.encode()).hexdigest()
