"""The signing secret registration learns, kept beside the spool: ``webhook_secret``, and the id
of the endpoint it belongs to in ``webhook_secret.endpoint``.

KonPro tells an endpoint's secret only when it registers it (``endpoint.list`` may answer
``null``), so the reconciler keeps it on disk, and the bridge's workers read it from there. Each
file is written atomically, mode 0600, and made durable before it counts as stored.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import tempfile
import time
from pathlib import Path
from typing import Final, NamedTuple

SECRET_FILE_NAME: Final = "webhook_secret"  # noqa: S105 - a file name, not a secret
ENDPOINT_FILE_NAME: Final = "webhook_secret.endpoint"  # whose secret it is


def load_stored_secret(spool_dir: Path) -> str | None:
    """The signing secret a reconciler stored under ``spool_dir``, if there is one.

    A file that exists but cannot be read, or is not text, raises ``OSError``: better a failed
    start than a bridge that silently cannot check signatures.
    """
    return _read_text(spool_dir / SECRET_FILE_NAME) or None


def store_secret(spool_dir: Path, secret: str, endpoint_id: str) -> Path:
    """Write the secret to ``<spool_dir>/webhook_secret`` and the id of its endpoint beside it
    (``webhook_secret.endpoint``), each mode 0600, atomically. The id goes with a digest of the
    secret it belongs to: written second, it could be the previous secret's, were the second
    write lost (a full disk, a kill between the two)."""
    spool_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    target = _write_privately(spool_dir, SECRET_FILE_NAME, secret)
    _write_privately(spool_dir, ENDPOINT_FILE_NAME, f"{endpoint_id} {_digest(secret)}")
    _fsync_directory(spool_dir)
    return target


class StoredSecret(NamedTuple):
    """The secret on disk, and the endpoint it is known to belong to (``None``: not known)."""

    value: str
    endpoint_id: str | None


def load_stored(spool_dir: Path) -> StoredSecret | None:
    """The stored secret with its endpoint, each file read once; ``OSError`` as
    ``load_stored_secret``."""
    secret = load_stored_secret(spool_dir)
    if secret is None:
        return None
    return StoredSecret(secret, _endpoint_of(spool_dir, secret))


def load_stored_endpoint(spool_dir: Path) -> str | None:
    """The endpoint whose secret is stored, if the reconciler that stored it said (and the id
    is that secret's, not a previous one's); ``OSError`` as ``load_stored_secret``."""
    stored = load_stored(spool_dir)
    return stored.endpoint_id if stored is not None else None


def _endpoint_of(spool_dir: Path, secret: str) -> str | None:
    text = _read_text(spool_dir / ENDPOINT_FILE_NAME)
    if text is None:
        return None
    endpoint_id, _, digest = text.rpartition(" ")
    if not _DIGEST.fullmatch(digest):  # older versions wrote the id alone
        return text or None
    if _digest(secret) != digest:
        return None  # the id of the secret before: whose this one is, is not known
    return endpoint_id or None


def _read_text(path: Path) -> str | None:
    """The file's text, stripped; ``None`` if there is no file. One that cannot be read, or is
    not UTF-8 text (damaged, or edited by hand), raises ``OSError``."""
    try:
        return path.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        return None
    except UnicodeDecodeError as exc:
        raise OSError(f"{path} is not UTF-8 text ({exc.reason})") from None


_DIGEST: Final = re.compile(r"[0-9a-f]{16}")


def _digest(secret: str) -> str:
    """Enough of the secret's SHA-256 to tell it from another; nothing to learn it from."""
    return hashlib.sha256(secret.encode()).hexdigest()[:16]


def _write_privately(directory: Path, name: str, text: str) -> Path:
    target = directory / name
    _remove_left_behind(directory, name)
    fd, temporary = tempfile.mkstemp(dir=directory, prefix=f".{name}.")  # mode 0600
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as file:
            file.write(text + "\n")
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise
    return target


_LEFT_BEHIND_AFTER: Final = 60.0  # seconds; a write takes milliseconds


def _remove_left_behind(directory: Path, name: str) -> None:
    """Remove the temporary copies a killed write left (each holds a secret); one younger than
    a minute may be another process's write in progress, and is left to it."""
    now = time.time()
    for leftover in directory.glob(f".{name}.*"):
        with contextlib.suppress(OSError):
            if now - leftover.lstat().st_mtime > _LEFT_BEHIND_AFTER:
                leftover.unlink()


def _fsync_directory(directory: Path) -> None:
    """Make the rename durable: without this a crash can leave the old file in place."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
