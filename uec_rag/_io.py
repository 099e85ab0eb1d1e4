"""File-system helpers: the cache folder and atomic writes."""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

__all__ = ["CACHE_ENV", "atomic_directory", "atomic_file", "cache_dir"]

CACHE_ENV = "UEC_RAG_CACHE"
"""Environment variable that overrides the cache folder."""


def cache_dir() -> Path:
    """Return the cache folder, creating it if needed.

    ``$UEC_RAG_CACHE`` when set; otherwise the platform default:
    ``%LOCALAPPDATA%\\uec_rag\\Cache`` on Windows, ``~/Library/Caches/uec_rag`` on macOS
    and ``$XDG_CACHE_HOME/uec_rag`` (default ``~/.cache/uec_rag``) elsewhere.
    """
    override = os.environ.get(CACHE_ENV)
    if override:
        path = Path(override).expanduser()
    elif sys.platform == "win32":
        base = os.environ.get("LOCALAPPDATA") or str(Path.home() / "AppData" / "Local")
        path = Path(base) / "uec_rag" / "Cache"
    elif sys.platform == "darwin":
        path = Path.home() / "Library" / "Caches" / "uec_rag"
    else:
        base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
        path = Path(base) / "uec_rag"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _new_sibling(target: Path, create: Callable[[Path], None]) -> Path:
    """Create a fresh hidden temporary next to ``target`` with ``create`` and return its path.

    Unlike ``mkstemp`` and ``mkdtemp``, which make owner-only entries, the callers
    create with modes 0o666 and 0o777 and let the umask decide, so the result gets
    the permissions of a file or folder made the ordinary way.
    """
    while True:
        candidate = target.parent / f".{target.name}.{secrets.token_hex(8)}.tmp"
        try:
            create(candidate)
        except FileExistsError:
            continue
        return candidate


@contextlib.contextmanager
def atomic_directory(target: Path) -> Iterator[Path]:
    """Yield a temporary folder that is renamed to ``target`` on success.

    The folder is created next to ``target`` (same file system), so the final
    ``os.replace`` is atomic: a crash leaves either no ``target`` or a complete
    one, never a half-written folder. If another process finished ``target``
    first, its copy is kept and ours is discarded.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = _new_sibling(target, lambda path: os.mkdir(path, 0o777))
    try:
        yield tmp
        try:
            os.replace(tmp, target)
        except OSError:
            if not target.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def atomic_file(target: Path) -> Iterator[Path]:
    """Yield a temporary path that is renamed to ``target`` on success."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = _new_sibling(
        target, lambda path: os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
    )
    try:
        yield tmp
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
