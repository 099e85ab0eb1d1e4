"""Tests of the Gaussian cache: both stores, concurrency, pickling and a real SIGKILL mid-write."""

from __future__ import annotations

import os
import pickle
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from uec_rag.cache import (
    DEFAULT_CACHE_FILE,
    GaussianCache,
    MemoryGaussianCache,
    SQLiteGaussianCache,
    open_cache,
    text_key,
)

FINGERPRINT = "ensemble-a"


def _arrays(count: int, dim: int = 6, members: int = 3, seed: int = 0):
    rng = np.random.default_rng(seed)
    mean = rng.normal(size=(count, dim)).astype(np.float32)
    variance = rng.uniform(0.01, 1.0, size=(count, dim)).astype(np.float32)
    coefficients = rng.dirichlet(np.ones(members), size=count).astype(np.float32)
    return mean, variance, coefficients


@pytest.fixture(params=["memory", "sqlite"])
def cache(request, tmp_path: Path) -> GaussianCache:
    if request.param == "memory":
        return MemoryGaussianCache()
    return SQLiteGaussianCache(tmp_path / "cache.sqlite")


def test_text_key_separates_kind():
    assert text_key("query", "a") != text_key("document", "a")
    assert text_key("query", "a") == text_key("query", "a")
    assert len(text_key("document", "ü")) == 32


def test_roundtrip_exact_values(cache: GaussianCache):
    texts = ["alpha", "beta", "gamma"]
    mean, variance, coefficients = _arrays(3)
    cache.put_many(FINGERPRINT, "document", texts, mean, variance, coefficients)

    entries = cache.get_many(FINGERPRINT, "document", ["gamma", "missing", "alpha"])

    assert entries[1] is None
    np.testing.assert_array_equal(entries[0].mean, mean[2])
    np.testing.assert_array_equal(entries[0].variance, variance[2])
    np.testing.assert_array_equal(entries[0].coefficients, coefficients[2])
    np.testing.assert_array_equal(entries[2].mean, mean[0])
    assert entries[0].mean.dtype == np.float32
    assert entries[0].coefficients.shape == (3,)


def test_kind_and_fingerprint_isolate_entries(cache: GaussianCache):
    mean, variance, coefficients = _arrays(1)
    cache.put_many(FINGERPRINT, "document", ["text"], mean, variance, coefficients)

    assert cache.get_many(FINGERPRINT, "query", ["text"]) == [None]
    assert cache.get_many("other-ensemble", "document", ["text"]) == [None]
    assert cache.count(FINGERPRINT) == 1
    assert cache.count("other-ensemble") == 0


def test_put_replaces_entry(cache: GaussianCache):
    first = _arrays(1, seed=1)
    second = _arrays(1, seed=2)
    cache.put_many(FINGERPRINT, "document", ["text"], *first)
    cache.put_many(FINGERPRINT, "document", ["text"], *second)

    (entry,) = cache.get_many(FINGERPRINT, "document", ["text"])

    np.testing.assert_array_equal(entry.mean, second[0][0])
    assert len(cache) == 1


def test_duplicate_lookups_return_same_entry(cache: GaussianCache):
    cache.put_many(FINGERPRINT, "document", ["x"], *_arrays(1))
    entries = cache.get_many(FINGERPRINT, "document", ["x", "x", "x"])
    assert all(entry is not None for entry in entries)
    np.testing.assert_array_equal(entries[0].mean, entries[2].mean)


def test_many_keys_beyond_sql_parameter_limit(cache: GaussianCache):
    texts = [f"text {index}" for index in range(2100)]
    mean, variance, coefficients = _arrays(len(texts), dim=2, members=2)
    cache.put_many(FINGERPRINT, "document", texts, mean, variance, coefficients)

    entries = cache.get_many(FINGERPRINT, "document", texts)

    assert all(entry is not None for entry in entries)
    np.testing.assert_array_equal(np.stack([entry.mean for entry in entries]), mean)


def test_clear_by_fingerprint(cache: GaussianCache):
    cache.put_many("a", "document", ["x"], *_arrays(1))
    cache.put_many("b", "document", ["x"], *_arrays(1))
    cache.clear("a")
    assert cache.count("a") == 0
    assert cache.count("b") == 1
    cache.clear()
    assert len(cache) == 0


def test_stored_arrays_are_copies(cache: GaussianCache):
    mean, variance, coefficients = _arrays(1)
    cache.put_many(FINGERPRINT, "document", ["x"], mean, variance, coefficients)
    expected = mean.copy()
    mean[:] = 99.0
    (entry,) = cache.get_many(FINGERPRINT, "document", ["x"])
    np.testing.assert_array_equal(entry.mean, expected[0])


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ((2, 2, 2), "mean must have shape"),
        ((3, 2, 3), "variance must have shape"),
        ((3, 3, 1), "coefficients must have shape"),
    ],
)
def test_put_rejects_wrong_row_counts(cache: GaussianCache, rows, message):
    mean, variance, coefficients = _arrays(3)
    with pytest.raises(ValueError, match=message):
        cache.put_many(
            FINGERPRINT,
            "document",
            ["a", "b", "c"],
            mean[: rows[0]],
            variance[: rows[1]],
            coefficients[: rows[2]],
        )


def test_put_rejects_unequal_mean_variance(cache: GaussianCache):
    mean, variance, coefficients = _arrays(2)
    with pytest.raises(ValueError, match="equal shapes"):
        cache.put_many(FINGERPRINT, "document", ["a", "b"], mean, variance[:, :3], coefficients)


def test_rejects_bad_texts_and_kind(cache: GaussianCache):
    with pytest.raises(TypeError, match=r"texts\[1\] must be str"):
        cache.get_many(FINGERPRINT, "document", ["ok", 3])
    with pytest.raises(TypeError, match="single str"):
        cache.get_many(FINGERPRINT, "document", "not a list")
    with pytest.raises(ValueError, match="kind must be"):
        cache.get_many(FINGERPRINT, "passage", ["x"])


def test_empty_batches(cache: GaussianCache):
    assert cache.get_many(FINGERPRINT, "document", []) == []
    empty = np.zeros((0, 4), dtype=np.float32)
    cache.put_many(FINGERPRINT, "document", [], empty, empty, np.zeros((0, 2)))
    assert len(cache) == 0


def test_pickle_keeps_entries(cache: GaussianCache):
    cache.put_many(FINGERPRINT, "document", ["x"], *_arrays(1))
    restored = pickle.loads(pickle.dumps(cache))
    (entry,) = restored.get_many(FINGERPRINT, "document", ["x"])
    assert entry is not None
    assert type(restored) is type(cache)


def test_sqlite_persists_across_instances(tmp_path: Path):
    path = tmp_path / "sub" / "cache.sqlite"
    first = SQLiteGaussianCache(path)
    first.put_many(FINGERPRINT, "query", ["q"], *_arrays(1))
    first.close()

    second = SQLiteGaussianCache(path)

    assert second.get_many(FINGERPRINT, "query", ["q"])[0] is not None
    mode = second._connection().execute("PRAGMA journal_mode").fetchone()[0]
    assert mode == "wal"


def test_sqlite_rejects_non_database_file(tmp_path: Path):
    path = tmp_path / "not-a-db.sqlite"
    path.write_bytes(b"this is not an SQLite database" * 100)
    with pytest.raises(sqlite3.DatabaseError, match="delete it"):
        SQLiteGaussianCache(path)


def test_sqlite_rejects_bad_timeout(tmp_path: Path):
    with pytest.raises(ValueError, match="timeout must be > 0"):
        SQLiteGaussianCache(tmp_path / "c.sqlite", timeout=0)


def test_sqlite_threads_write_and_read(tmp_path: Path):
    cache = SQLiteGaussianCache(tmp_path / "cache.sqlite")
    errors: list[BaseException] = []

    def work(worker: int) -> None:
        try:
            for batch in range(10):
                texts = [f"w{worker} b{batch} t{index}" for index in range(20)]
                mean, variance, coefficients = _arrays(20, seed=worker * 100 + batch)
                cache.put_many(FINGERPRINT, "document", texts, mean, variance, coefficients)
                entries = cache.get_many(FINGERPRINT, "document", texts)
                got = np.stack([entry.mean for entry in entries])
                np.testing.assert_array_equal(got, mean)
        except BaseException as error:  # collected and re-raised in the main thread
            errors.append(error)

    threads = [threading.Thread(target=work, args=(worker,)) for worker in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert errors == []
    assert cache.count(FINGERPRINT) == 8 * 10 * 20


def test_open_cache_specs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("UEC_RAG_CACHE", str(tmp_path / "cache-root"))

    default = open_cache("sqlite")
    assert isinstance(default, SQLiteGaussianCache)
    assert default.path == tmp_path / "cache-root" / DEFAULT_CACHE_FILE

    assert isinstance(open_cache("memory"), MemoryGaussianCache)
    assert open_cache(None) is None

    explicit = open_cache(tmp_path / "x.sqlite")
    assert explicit.path == tmp_path / "x.sqlite"

    folder = open_cache(tmp_path)
    assert folder.path == tmp_path / DEFAULT_CACHE_FILE

    existing = MemoryGaussianCache()
    assert open_cache(existing) is existing

    with pytest.raises(TypeError, match="cache must be"):
        open_cache(3)


_WRITER = textwrap.dedent(
    """
    import sys
    import numpy as np
    from uec_rag.cache import SQLiteGaussianCache

    path, ready = sys.argv[1], sys.argv[2]
    cache = SQLiteGaussianCache(path)
    texts = [f"text {index}" for index in range(1000)]
    generation = 0
    while True:
        generation += 1
        # Every row of a generation carries the generation number, so a reader
        # can tell whether one batch was written partly.
        mean = np.full((1000, 64), generation, dtype=np.float32)
        variance = np.full((1000, 64), generation, dtype=np.float32)
        coefficients = np.full((1000, 3), generation, dtype=np.float32)
        cache.put_many("fp", "document", texts, mean, variance, coefficients)
        if generation == 3:
            open(ready, "w").close()
    """
)


@pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL is POSIX-only")
@pytest.mark.parametrize("delay", [0.05, 0.3, 0.7])
def test_sqlite_survives_sigkill_mid_write(tmp_path: Path, delay: float):
    path = tmp_path / "cache.sqlite"
    ready = tmp_path / "ready"
    process = subprocess.Popen([sys.executable, "-c", _WRITER, str(path), str(ready)])
    try:
        deadline = time.monotonic() + 600
        while not ready.exists():
            assert process.poll() is None, "the writer process exited early"
            assert time.monotonic() < deadline, "the writer process never became ready"
            time.sleep(0.05)

        # Let the writer run a few more transactions, then kill it without warning.
        time.sleep(delay)
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == -signal.SIGKILL

    cache = SQLiteGaussianCache(path)
    texts = [f"text {index}" for index in range(1000)]
    entries = cache.get_many("fp", "document", texts)

    assert all(entry is not None for entry in entries)
    generations = {float(entry.mean[0]) for entry in entries}
    assert len(generations) == 1, f"a batch was written partly: generations {generations}"
    (generation,) = generations
    assert generation >= 3
    for entry in entries:
        assert np.all(entry.mean == generation)
        assert np.all(entry.variance == generation)
        assert np.all(entry.coefficients == generation)
    integrity = cache._connection().execute("PRAGMA integrity_check").fetchone()[0]
    assert integrity == "ok"

    # The cache still accepts writes after the crash.
    cache.put_many("fp", "document", ["new"], *_arrays(1, dim=64))
    assert cache.count("fp") == 1001


_BATCH_WRITER = textwrap.dedent(
    """
    import sys
    import numpy as np
    from uec_rag.cache import SQLiteGaussianCache

    path, prefix = sys.argv[1], sys.argv[2]
    cache = SQLiteGaussianCache(path)
    for batch in range(20):
        texts = [f"{prefix} {batch} {index}" for index in range(50)]
        values = np.full((50, 16), batch, dtype=np.float32)
        cache.put_many("fp", "document", texts, values, values, np.ones((50, 2), np.float32))
    """
)


def test_sqlite_processes_write_concurrently(tmp_path: Path):
    path = tmp_path / "cache.sqlite"
    SQLiteGaussianCache(path)
    writers = [
        subprocess.Popen([sys.executable, "-c", _BATCH_WRITER, str(path), f"writer{index}"])
        for index in range(3)
    ]
    for writer in writers:
        assert writer.wait(timeout=300) == 0

    cache = SQLiteGaussianCache(path)

    assert cache.count("fp") == 3 * 20 * 50
    (entry,) = cache.get_many("fp", "document", ["writer2 7 49"])
    assert np.all(entry.mean == 7)
