"""Atomic file writes: the one helper every output, checkpoint and report of the project goes through.

``with atomic_path(path) as tmp:`` yields a fresh, uniquely named temporary file beside ``path`` (same
directory, so the final ``os.replace`` is atomic on POSIX). When the block succeeds the file is fsync'ed,
given normal permissions, renamed over ``path`` and the directory entry fsync'ed; when it fails the
temporary file is removed and ``path`` is untouched. A crash at any moment therefore leaves either the
previous file or the complete new one under ``path``, never a torn one (only a ``.tmp-*`` file).

Callers write to ``tmp`` by name (``fig.savefig(tmp)``, ``df.to_parquet(tmp)``) or through
:func:`atomic_write_bytes` / :func:`atomic_write_text`. Note for ``torch.save``: it names the zip archive
after the file it writes to, so it must write to a file object (see ``scoresde.checkpoint``), not to
``tmp`` by name, or the bytes would depend on the random temporary name.
"""
from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path
from typing import Iterator

TMP_PREFIX = ".tmp-"


def fsync_dir(directory: str | os.PathLike) -> None:
    """Make a rename in ``directory`` durable (no-op where directories cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # pragma: no cover - e.g. Windows
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as fh:
        fh.flush()
        os.fsync(fh.fileno())


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, mode: int = 0o644) -> Iterator[Path]:
    """Yield a unique temporary path beside ``path``; it replaces ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # pid + random token: concurrent writers (two stages, two ranks) never share a temporary file; the
    # real suffix is kept last so that writers choosing a format by extension (savefig) still work.
    tmp = path.parent / f"{TMP_PREFIX}{path.name}.{os.getpid()}.{secrets.token_hex(4)}{path.suffix}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o600)
    os.close(fd)
    try:
        yield tmp
        _fsync_file(tmp)
        os.chmod(tmp, mode)  # outputs are meant to be shared
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    fsync_dir(path.parent)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)
