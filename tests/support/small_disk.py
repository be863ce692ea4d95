"""A real, small filesystem that tests can fill up: a tmpfs mounted for the test.

Mounting needs root (CI runs as root here); elsewhere the tests that need it are skipped.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest


@contextmanager
def small_disk(mountpoint: Path, size: int) -> Iterator[Path]:
    """Mount a ``size``-byte tmpfs on ``mountpoint`` for the block; skip the test if we cannot."""
    mount, umount = shutil.which("mount"), shutil.which("umount")
    if os.geteuid() != 0 or mount is None or umount is None:
        pytest.skip("mounting a small filesystem needs root and mount(8)")
    mountpoint.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(
        [mount, "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mountpoint)],
        capture_output=True,
        text=True,
        check=False,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield mountpoint
    finally:
        subprocess.run([umount, "-l", str(mountpoint)], check=False)


def fill_disk(directory: Path) -> Path:
    """Write a file in ``directory`` until the filesystem is full; return it (delete to free)."""
    filler = directory / "filler"
    chunk = b"\0" * 4096
    with filler.open("wb", buffering=0) as out:
        try:
            while out.write(chunk):
                pass
        except OSError:  # ENOSPC: full
            pass
    return filler
