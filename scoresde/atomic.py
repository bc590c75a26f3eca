"""Atomic file writes: the one helper every output, checkpoint and report of the project goes through.

``with atomic_path(path) as tmp:`` yields a fresh, uniquely named temporary file beside ``path`` (same
directory, so the final ``os.replace`` is atomic on POSIX). When the block succeeds the file is fsync'ed,
given normal permissions, renamed over ``path`` and the directory entry fsync'ed; when anything fails
(the block, the fsync, the rename; an exception or a signal) the temporary file is removed and ``path`` is
untouched. A crash at any moment therefore leaves either the previous file or the complete new one under
``path``, never a torn one (after a SIGKILL, at most a ``.tmp-*`` file, which the next run's cleanup removes).

A write that runs out of space (``ENOSPC``, or ``EDQUOT`` for a quota; whatever the writer wrapped it in,
e.g. torch's ``RuntimeError`` around the ``OSError`` of its file object) is raised as :class:`DiskFullError`,
an ``OSError`` whose message is one line naming the final path: ``no space left on device writing <path>``.

Callers write to ``tmp`` by name (``fig.savefig(tmp)``, ``df.to_parquet(tmp)``) or through
:func:`atomic_write_bytes` / :func:`atomic_write_text`. Note for ``torch.save``: it names the zip archive
after the file it writes to, so it must write to a file object (see ``scoresde.checkpoint``), not to
``tmp`` by name, or the bytes would depend on the random temporary name.
"""
from __future__ import annotations

import contextlib
import errno
import os
import secrets
from pathlib import Path
from typing import Iterator

__all__ = ["TMP_PREFIX", "DiskFullError", "is_disk_full", "atomic_path", "atomic_write_bytes", "atomic_write_text",
           "fsync_dir"]

TMP_PREFIX = ".tmp-"
_NO_SPACE = {errno.ENOSPC} | ({errno.EDQUOT} if hasattr(errno, "EDQUOT") else set())
_NO_SPACE_TEXT = ("no space left on device", "disk quota exceeded")


class DiskFullError(OSError):
    """Writing ``path`` ran out of space (ENOSPC / EDQUOT). The previous file under ``path`` is untouched and
    no temporary file is left; free some space and rerun (finished checkpoints and sample batches are kept).

    ``str()`` is one line: ``no space left on device writing <path>`` (``disk quota exceeded writing <path>``
    for a quota). ``errno`` is ENOSPC or EDQUOT, ``filename`` the path, ``detail`` the underlying error.
    """

    def __init__(self, path: str | os.PathLike, detail: str = "", code: int = errno.ENOSPC):
        self.path, self.detail = str(path), str(detail)
        super().__init__(code, _reason(code))
        self.filename = self.path

    def __str__(self) -> str:
        return f"{_reason(self.errno)} writing {self.path}"

    def __reduce__(self):  # picklable with its own arguments (OSError would pass (errno, strerror))
        return type(self), (self.path, self.detail, self.errno)


def _reason(code: int) -> str:
    return "disk quota exceeded" if code != errno.ENOSPC and code in _NO_SPACE else "no space left on device"


def _no_space_errno(exc: BaseException) -> int | None:
    """ENOSPC / EDQUOT when ``exc`` or an exception it was raised from/during says so, else None."""
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, DiskFullError):
            return e.errno
        if isinstance(e, OSError) and e.errno in _NO_SPACE:
            return e.errno
        text = str(e).lower()
        for code, words in zip((errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)), _NO_SPACE_TEXT):
            if words in text:  # e.g. pyarrow's OSError with the errno only in its message
                return code
        e = e.__cause__ or e.__context__
    return None


def _filesystem_full(directory: Path) -> bool:
    """No block left for an unprivileged writer on ``directory``'s filesystem (statvfs; False if unknown)."""
    try:
        st = os.statvfs(directory)
    except (OSError, AttributeError):  # pragma: no cover - e.g. Windows
        return False
    return st.f_blocks > 0 and st.f_bavail == 0


def is_disk_full(exc: BaseException, directory: str | os.PathLike | None = None) -> int | None:
    """The errno (ENOSPC / EDQUOT) if ``exc`` is a write that ran out of space, else None.

    Looks through the exception chain (writers wrap the ``OSError``: torch raises ``RuntimeError`` around
    it); for an opaque error (torch's C++ writer by file name says only "iostream error") a full filesystem
    under ``directory`` counts as ENOSPC.
    """
    code = _no_space_errno(exc)
    if code is None and directory is not None and isinstance(exc, Exception) and _filesystem_full(Path(directory)):
        code = errno.ENOSPC
    return code


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
    """Yield a unique temporary path beside ``path``; it replaces ``path`` only if the block succeeds.

    On any failure the temporary file is removed and the error re-raised, a lack of space as
    :class:`DiskFullError` naming ``path``.
    """
    path = Path(path)
    tmp: Path | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # pid + random token: concurrent writers (two stages, two ranks) never share a temporary file; the
        # real suffix is kept last so that writers choosing a format by extension (savefig) still work.
        name = f"{TMP_PREFIX}{path.name}.{os.getpid()}.{secrets.token_hex(4)}{path.suffix}"
        fd = os.open(path.parent / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o600)
        tmp = path.parent / name
        os.close(fd)
        yield tmp
        _fsync_file(tmp)  # ENOSPC may only show here (delayed allocation, network filesystems)
        os.chmod(tmp, mode)  # outputs are meant to be shared
        os.replace(tmp, path)
    except BaseException as exc:
        # judged before the temporary file goes: while it holds the partial write, a full disk reads as full
        code = None if isinstance(exc, DiskFullError) else is_disk_full(exc, path.parent if tmp else None)
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        if code is not None:
            raise DiskFullError(path, f"{type(exc).__name__}: {exc}", code) from exc
        raise
    fsync_dir(path.parent)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)
