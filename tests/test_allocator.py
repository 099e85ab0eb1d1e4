"""The command line's allocator setting: glibc keeps freed memory instead of unmapping it."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

import uec_rag.cli
from uec_rag._allocator import keep_freed_memory
from uec_rag.cli import main

_PROBE = """
import ctypes

from uec_rag._allocator import keep_freed_memory


class Info(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                     "fsmblks", "uordblks", "fordblks", "keepcost")
    ]


libc = ctypes.CDLL(None)
libc.mallinfo2.restype = Info


def mapped_growth():
    before = libc.mallinfo2().hblkhd
    block = bytearray(64 * 2**20)
    growth = libc.mallinfo2().hblkhd - before
    del block
    return growth


print(mapped_growth() >= 64 * 2**20, keep_freed_memory(), mapped_growth())
"""

glibc = pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
    reason="the allocator setting applies to glibc on Linux only",
)


@glibc
def test_setting_stops_mmap_for_large_blocks():
    result = subprocess.run(
        [sys.executable, "-c", _PROBE], capture_output=True, text=True, check=True
    )
    # Before: a 64 MiB block is a fresh mapping. After: it comes from the heap.
    assert result.stdout.split() == ["True", "True", "0"]


def test_other_libc_left_alone(monkeypatch):
    monkeypatch.setattr(platform, "libc_ver", lambda: ("", ""))
    assert keep_freed_memory() is False


@pytest.mark.parametrize(("value", "calls"), [(None, 1), ("0", 0), ("1", 1)])
def test_cli_setting_and_opt_out(monkeypatch, tmp_path, value, calls):
    recorded = []
    monkeypatch.setattr(uec_rag.cli, "keep_freed_memory", lambda: recorded.append(True))
    if value is None:
        monkeypatch.delenv("UEC_RAG_KEEP_FREED_MEMORY", raising=False)
    else:
        monkeypatch.setenv("UEC_RAG_KEEP_FREED_MEMORY", value)
    missing = tmp_path / "missing.jsonl"
    status = main(["fit", "--model", "minilm", "--data", str(missing), "--out", "x"])
    assert status != 0
    assert len(recorded) == calls
