"""Gaussian cache: combined ensemble Gaussians stored by ensemble and text.

An entry is the ensemble's combined mean and variance for one text, plus the
per-member coefficients that produced it. The key is the ensemble fingerprint
(members, posteriors and settings) and the sha256 of the text's kind
(``"query"`` or ``"document"``) and the text. The framework adapters write every
Gaussian they compute here, so a reranker never re-encodes a document that the
vector store already embedded.

Two stores implement the same interface:

* :class:`SQLiteGaussianCache`, the persistent default. It is one SQLite file
  (Python's ``sqlite3`` module, no server) in write-ahead-log (WAL) mode. Each
  :meth:`~GaussianCache.put_many` call is one transaction, so a process killed
  mid-write leaves the file readable, with every entry either old or new. Each
  thread gets its own connection, and SQLite's file locks with a busy timeout
  serialise writers across threads and processes.
* :class:`MemoryGaussianCache`, a dictionary guarded by a lock, for tests and
  short-lived processes.

Arrays are stored as raw little-endian float32 bytes with their length, so
reading an entry never unpickles anything.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import sqlite3
import threading
import weakref
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from uec_rag._io import cache_dir
from uec_rag.encoders.base import Kind, check_kind, check_texts

__all__ = [
    "DEFAULT_CACHE_FILE",
    "CacheEntry",
    "GaussianCache",
    "MemoryGaussianCache",
    "SQLiteGaussianCache",
    "open_cache",
    "text_key",
]

logger = logging.getLogger(__name__)

DEFAULT_CACHE_FILE = "gaussians.sqlite"
"""File name of the default persistent cache inside :func:`uec_rag._io.cache_dir`."""

_SQL_MAX_PARAMETERS = 900
"""Keys per ``IN (...)`` lookup, below SQLite's historic limit of 999 bound parameters."""

_SCHEMA = """
CREATE TABLE IF NOT EXISTS gaussians (
    fingerprint TEXT NOT NULL,
    key BLOB NOT NULL,
    dim INTEGER NOT NULL,
    n_members INTEGER NOT NULL,
    mean BLOB NOT NULL,
    variance BLOB NOT NULL,
    coefficients BLOB NOT NULL,
    PRIMARY KEY (fingerprint, key)
) WITHOUT ROWID
"""


def text_key(kind: Kind, text: str) -> bytes:
    """Return the 32-byte sha256 digest of ``kind`` and ``text``.

    The kind is part of the key because queries and documents are encoded
    differently (E5 prefixes, for example), so the same string has two entries.
    """
    digest = hashlib.sha256()
    digest.update(kind.encode("ascii"))
    digest.update(b"\x00")
    digest.update(text.encode("utf-8", errors="surrogatepass"))
    return digest.digest()


@dataclass(frozen=True)
class CacheEntry:
    """The combined Gaussian of one text and the member coefficients behind it.

    Attributes
    ----------
    mean : np.ndarray
        Combined mean, shape ``[D]``, float32.
    variance : np.ndarray
        Combined per-dimension variance, shape ``[D]``, float32.
    coefficients : np.ndarray
        Per-member coefficients, shape ``[K]``, float32.
    """

    mean: np.ndarray
    variance: np.ndarray
    coefficients: np.ndarray


def _as_rows(name: str, array: np.ndarray, rows: int) -> np.ndarray:
    array = np.ascontiguousarray(array, dtype="<f4")
    if array.ndim != 2 or array.shape[0] != rows:
        raise ValueError(f"{name} must have shape [{rows}, *], got shape {array.shape}")
    return array


def _entries_from_arrays(
    count: int, mean: np.ndarray, variance: np.ndarray, coefficients: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    mean = _as_rows("mean", mean, count)
    variance = _as_rows("variance", variance, count)
    coefficients = _as_rows("coefficients", coefficients, count)
    if variance.shape != mean.shape:
        raise ValueError(
            f"mean and variance must have equal shapes, got {mean.shape} and {variance.shape}"
        )
    return mean, variance, coefficients


class GaussianCache(ABC):
    """Interface of a Gaussian cache: batched lookups and batched writes.

    Implementations are safe to share between threads. Keys are
    ``(fingerprint, sha256(kind, text))``; see :func:`text_key`.
    """

    def get_many(
        self, fingerprint: str, kind: Kind, texts: Sequence[str]
    ) -> list[CacheEntry | None]:
        """Look up ``texts``; the result has one entry per text, ``None`` for a miss."""
        kind = check_kind(kind)
        texts = check_texts(texts)
        keys = [text_key(kind, text) for text in texts]
        found = self._get_keys(fingerprint, list(dict.fromkeys(keys)))
        return [found.get(key) for key in keys]

    def put_many(
        self,
        fingerprint: str,
        kind: Kind,
        texts: Sequence[str],
        mean: np.ndarray,
        variance: np.ndarray,
        coefficients: np.ndarray,
    ) -> None:
        """Store the Gaussians of ``texts`` (row ``i`` of each array belongs to ``texts[i]``).

        Existing entries with the same key are replaced. The whole batch is
        written atomically.

        Raises
        ------
        ValueError
            If an array does not have one row per text, or mean and variance
            differ in shape.
        """
        kind = check_kind(kind)
        texts = check_texts(texts)
        mean, variance, coefficients = _entries_from_arrays(
            len(texts), mean, variance, coefficients
        )
        if not texts:
            return
        keys = [text_key(kind, text) for text in texts]
        self._put_rows(fingerprint, keys, mean, variance, coefficients)

    @abstractmethod
    def _get_keys(self, fingerprint: str, keys: list[bytes]) -> dict[bytes, CacheEntry]: ...

    @abstractmethod
    def _put_rows(
        self,
        fingerprint: str,
        keys: list[bytes],
        mean: np.ndarray,
        variance: np.ndarray,
        coefficients: np.ndarray,
    ) -> None: ...

    @abstractmethod
    def count(self, fingerprint: str | None = None) -> int:
        """Return the number of entries, for one ensemble fingerprint or in total."""

    @abstractmethod
    def clear(self, fingerprint: str | None = None) -> None:
        """Delete the entries of one ensemble fingerprint, or all entries."""

    def close(self) -> None:  # noqa: B027 - optional hook, not every store holds resources
        """Release resources; the default implementation has none."""

    def __len__(self) -> int:
        return self.count()


class MemoryGaussianCache(GaussianCache):
    """Gaussian cache in a dictionary, for tests and short-lived processes.

    It is thread-safe (one lock) and pickles with its entries. It grows without
    bound; call :meth:`clear` to empty it.
    """

    def __init__(self) -> None:
        self._entries: dict[tuple[str, bytes], CacheEntry] = {}
        self._lock = threading.Lock()

    def _get_keys(self, fingerprint: str, keys: list[bytes]) -> dict[bytes, CacheEntry]:
        with self._lock:
            found = {key: self._entries.get((fingerprint, key)) for key in keys}
        return {key: entry for key, entry in found.items() if entry is not None}

    def _put_rows(
        self,
        fingerprint: str,
        keys: list[bytes],
        mean: np.ndarray,
        variance: np.ndarray,
        coefficients: np.ndarray,
    ) -> None:
        # Copies, so a caller that later modifies its arrays cannot change cached entries.
        new_entries = {
            (fingerprint, key): CacheEntry(
                mean[row].copy(), variance[row].copy(), coefficients[row].copy()
            )
            for row, key in enumerate(keys)
        }
        with self._lock:
            self._entries.update(new_entries)

    def count(self, fingerprint: str | None = None) -> int:
        with self._lock:
            if fingerprint is None:
                return len(self._entries)
            return sum(1 for stored, _ in self._entries if stored == fingerprint)

    def clear(self, fingerprint: str | None = None) -> None:
        with self._lock:
            if fingerprint is None:
                self._entries.clear()
            else:
                for key in [key for key in self._entries if key[0] == fingerprint]:
                    del self._entries[key]

    def __getstate__(self) -> dict[str, Any]:
        with self._lock:
            return {"entries": dict(self._entries)}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self._entries = state["entries"]
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"MemoryGaussianCache(entries={self.count()})"


def _close_connections(connections: list[tuple[int, sqlite3.Connection]]) -> None:
    # SQLite forbids using a connection in a process forked from its opener,
    # so a child skips the connections it inherited.
    pid = os.getpid()
    for opener_pid, connection in connections:
        if opener_pid != pid:
            continue
        with contextlib.suppress(sqlite3.Error):
            connection.close()
    connections.clear()


class SQLiteGaussianCache(GaussianCache):
    """Persistent Gaussian cache in one SQLite file.

    Why SQLite: it ships with Python (``sqlite3``), needs no server, and gives
    atomic, durable transactions with cross-process file locking. In WAL mode
    readers never block the single writer, and a process killed mid-transaction
    leaves the last committed state, which SQLite restores on the next open.

    Parameters
    ----------
    path : str or Path
        The database file; its folder is created if needed.
    timeout : float, default 60.0
        Seconds a connection waits for another thread's or process's write lock
        (SQLite's busy timeout) before raising ``sqlite3.OperationalError``.

    Notes
    -----
    Each thread uses its own connection, opened on first use. The object
    pickles as its path and timeout, so a copy in a worker process opens the
    same file. WAL needs a local file system; SQLite documents that WAL does
    not work over network file systems.
    """

    def __init__(self, path: str | Path, *, timeout: float = 60.0) -> None:
        if timeout <= 0:
            raise ValueError(f"timeout must be > 0 seconds, got {timeout}")
        self.path = Path(path).expanduser()
        self.timeout = float(timeout)
        self._local = threading.local()
        self._connections: list[tuple[int, sqlite3.Connection]] = []
        self._connections_lock = threading.Lock()
        self._finalizer = weakref.finalize(self, _close_connections, self._connections)

        # Create the file and table now, so a bad path fails at construction.
        self._connection()

    def _connection(self) -> sqlite3.Connection:
        connection: sqlite3.Connection | None = getattr(self._local, "connection", None)
        if connection is not None and getattr(self._local, "pid", None) == os.getpid():
            return connection

        # A connection inherited through fork must not be used by the child, so
        # a new process (or thread) opens its own.
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            connection = sqlite3.connect(
                self.path, timeout=self.timeout, isolation_level=None, check_same_thread=False
            )
            connection.execute("PRAGMA journal_mode=WAL")
            connection.execute("PRAGMA synchronous=NORMAL")
            connection.execute(_SCHEMA)
        except sqlite3.DatabaseError as error:
            raise sqlite3.DatabaseError(
                f"cannot open the Gaussian cache {self.path}: {error}; "
                "if the file is not a uec_rag cache or is damaged, delete it (it is rebuilt "
                "on demand) or pass another path"
            ) from error
        self._local.connection = connection
        self._local.pid = os.getpid()
        with self._connections_lock:
            self._connections.append((os.getpid(), connection))
        return connection

    @staticmethod
    def _chunks(keys: list[bytes]) -> Iterator[list[bytes]]:
        for start in range(0, len(keys), _SQL_MAX_PARAMETERS):
            yield keys[start : start + _SQL_MAX_PARAMETERS]

    def _get_keys(self, fingerprint: str, keys: list[bytes]) -> dict[bytes, CacheEntry]:
        connection = self._connection()
        found: dict[bytes, CacheEntry] = {}
        for chunk in self._chunks(keys):
            placeholders = ",".join("?" * len(chunk))
            rows = connection.execute(
                "SELECT key, dim, n_members, mean, variance, coefficients FROM gaussians "
                f"WHERE fingerprint = ? AND key IN ({placeholders})",
                [fingerprint, *chunk],
            ).fetchall()
            for key, dim, n_members, mean, variance, coefficients in rows:
                found[bytes(key)] = CacheEntry(
                    self._decode(mean, dim, "mean"),
                    self._decode(variance, dim, "variance"),
                    self._decode(coefficients, n_members, "coefficients"),
                )
        return found

    def _decode(self, blob: bytes, length: int, name: str) -> np.ndarray:
        array = np.frombuffer(blob, dtype="<f4")
        if array.shape[0] != length:
            raise sqlite3.DatabaseError(
                f"Gaussian cache {self.path} has a damaged {name} entry "
                f"({array.shape[0]} values, expected {length}); delete the file to rebuild it"
            )
        return array.astype(np.float32)

    def _put_rows(
        self,
        fingerprint: str,
        keys: list[bytes],
        mean: np.ndarray,
        variance: np.ndarray,
        coefficients: np.ndarray,
    ) -> None:
        rows = [
            (
                fingerprint,
                key,
                mean.shape[1],
                coefficients.shape[1],
                mean[row].tobytes(),
                variance[row].tobytes(),
                coefficients[row].tobytes(),
            )
            for row, key in enumerate(keys)
        ]
        connection = self._connection()

        # BEGIN IMMEDIATE takes the write lock up front, so two writers queue on
        # the busy timeout instead of failing on a lock upgrade.
        connection.execute("BEGIN IMMEDIATE")
        try:
            connection.executemany(
                "INSERT OR REPLACE INTO gaussians "
                "(fingerprint, key, dim, n_members, mean, variance, coefficients) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                rows,
            )
        except BaseException:
            connection.execute("ROLLBACK")
            raise
        connection.execute("COMMIT")

    def count(self, fingerprint: str | None = None) -> int:
        connection = self._connection()
        if fingerprint is None:
            (total,) = connection.execute("SELECT COUNT(*) FROM gaussians").fetchone()
        else:
            (total,) = connection.execute(
                "SELECT COUNT(*) FROM gaussians WHERE fingerprint = ?", (fingerprint,)
            ).fetchone()
        return int(total)

    def clear(self, fingerprint: str | None = None) -> None:
        connection = self._connection()
        if fingerprint is None:
            connection.execute("DELETE FROM gaussians")
        else:
            connection.execute("DELETE FROM gaussians WHERE fingerprint = ?", (fingerprint,))

    def close(self) -> None:
        """Close every connection this object opened; later calls reopen them."""
        with self._connections_lock:
            _close_connections(self._connections)
        self._local = threading.local()

    def __getstate__(self) -> dict[str, Any]:
        return {"path": str(self.path), "timeout": self.timeout}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["path"], timeout=state["timeout"])  # type: ignore[misc]

    def __repr__(self) -> str:
        return f"SQLiteGaussianCache({str(self.path)!r})"


CacheSpec = GaussianCache | str | os.PathLike[str] | None
"""Cache specification accepted by :func:`open_cache`."""


def open_cache(spec: CacheSpec) -> GaussianCache | None:
    """Return the Gaussian cache that ``spec`` names.

    Parameters
    ----------
    spec : GaussianCache, str, path or None
        ``"sqlite"``: the persistent default, ``<cache_dir()>/gaussians.sqlite``
        (the cache folder is ``$UEC_RAG_CACHE`` when set). ``"memory"``: a new
        :class:`MemoryGaussianCache`. Any other string or path: a SQLite file
        there. A :class:`GaussianCache` is returned as is. ``None`` turns
        caching off.

    Raises
    ------
    TypeError
        If ``spec`` is of another type.
    """
    if spec is None or isinstance(spec, GaussianCache):
        return spec
    if isinstance(spec, str) and spec == "sqlite":
        return SQLiteGaussianCache(cache_dir() / DEFAULT_CACHE_FILE)
    if isinstance(spec, str) and spec == "memory":
        return MemoryGaussianCache()
    if isinstance(spec, (str, os.PathLike)):
        path = Path(spec)
        if path.is_dir():
            path = path / DEFAULT_CACHE_FILE
        return SQLiteGaussianCache(path)
    raise TypeError(
        "cache must be 'sqlite', 'memory', a file path, a GaussianCache or None, "
        f"got {type(spec).__name__}: {spec!r:.80}"
    )
