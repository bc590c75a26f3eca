"""Relaying a stage command's output to the flow's log: :func:`run_command` and :class:`OutputRelay`.

A training progress bar redraws itself with ``\r`` a few times a second; relayed line by line, each
redraw would become a Prefect log record (hundreds per stage, thousands on a long GPU run). The relay
passes ordinary lines through at once and progress lines at most once per ``interval_s`` (10 s) per
command, always ending with the last one, so the log shows where a stage is without the flood. The
same records go to the stage's log file; the tail quoted in a failure keeps one (the newest) line
per run of consecutive progress lines.
"""
from __future__ import annotations

import codecs
import collections
import contextlib
import os
import re
import shlex
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

PROGRESS_INTERVAL_S = 10.0  # at most one progress record per command per this many seconds
_TQDM_LIKE = re.compile(r"\d+%\||\b\d+/\d+ \[\d+:\d\d|\b\d+it \[\d+:\d\d")  # "42%|###", "3/80 [00:01", "7it [00:02"


class OutputRelay:
    """Splits a command's output into lines and decides which become log records.

    Ordinary lines pass through at once. Progress lines -- a segment ended by ``\r`` (how tqdm and
    most bars redraw), or a tqdm-like line (``42%|``, ``3/80 [00:01``) -- go out at most once per
    ``interval_s``; the newest one held back is emitted before the next ordinary line or by
    :meth:`finish`, so records keep the output's order and the last progress state is always logged.
    ``emit(line)`` receives the records; :attr:`tail` holds the last lines, consecutive progress lines collapsed into one.
    """

    def __init__(self, emit: Any, tail_lines: int, interval_s: float = PROGRESS_INTERVAL_S,
                 clock: Any = time.monotonic):
        self.emit, self.interval_s, self.clock = emit, interval_s, clock
        self.tail: collections.deque[str] = collections.deque(maxlen=tail_lines)
        self._buffer = ""
        self._last_progress_emit: float | None = None
        self._pending: str | None = None
        self._tail_is_progress = False
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.records = 0

    def feed(self, data: bytes) -> None:
        text = self._buffer + self._decoder.decode(data)
        hold = text.endswith("\r")  # maybe the first half of \r\n: decide with the next chunk
        if hold:
            text = text[:-1]
        parts = re.split(r"(\r\n|\n|\r)", text)
        self._buffer = parts.pop() + ("\r" if hold else "")
        for segment, end in zip(parts[::2], parts[1::2]):
            self._segment(segment, end)

    def finish(self) -> None:
        text = self._buffer + self._decoder.decode(b"", final=True)
        self._buffer = ""
        if text.endswith("\r"):
            self._segment(text[:-1], "\r")
        elif text:
            self._segment(text, "\n")
        if self._pending is not None:
            self._out(self._pending)
            self._pending = None

    def _segment(self, line: str, end: str) -> None:
        # A line ended by \n after a bar's \r is ordinary unless it looks like a bar: tqdm.write() and
        # log messages print that way, while tqdm's own last redraw ("100%|...|\n") is tqdm-like.
        progress = end == "\r" or bool(_TQDM_LIKE.search(line))
        if progress:
            line = line.rstrip()
            if not line:
                return
            if self._tail_is_progress and self.tail:
                self.tail[-1] = line
            else:
                self.tail.append(line)
            self._tail_is_progress = True
            now = self.clock()
            if self._last_progress_emit is None or now - self._last_progress_emit >= self.interval_s:
                self._last_progress_emit = now
                self._pending = None
                self._out(line)
            else:
                self._pending = line
            return
        if self._pending is not None:  # the bar's latest state first: records stay in output order
            self._last_progress_emit = self.clock()
            self._out(self._pending)
            self._pending = None
        self.tail.append(line)
        self._tail_is_progress = False
        self._out(line)

    def _out(self, line: str) -> None:
        self.records += 1
        self.emit(line)


def run_command(argv: list[str], *, cwd: str, env: dict, tail_lines: int, log_file: Path,
                timeout_s: float | None, on_line: Any = None,
                progress_interval_s: float = PROGRESS_INTERVAL_S) -> tuple[int, list[str], bool]:
    """Run one command, relaying its merged stdout/stderr line by line to ``on_line`` and to
    ``log_file`` through an :class:`OutputRelay` (progress refreshes thinned to one per
    ``progress_interval_s``); returns (exit code, last lines, timed out)."""
    log_file.parent.mkdir(parents=True, exist_ok=True)
    timed_out = threading.Event()
    with open(log_file, "a", encoding="utf-8", errors="replace") as log:
        def emit(line: str) -> None:
            log.write(line + "\n")
            log.flush()
            if on_line:
                on_line(line)

        relay = OutputRelay(emit, tail_lines, progress_interval_s)
        log.write(f"$ {shlex.join(argv)}\n")
        log.flush()
        try:
            proc = subprocess.Popen(argv, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, bufsize=0)
        except OSError as err:
            relay.tail.append(f"cannot start {argv[0]!r}: {err}")
            log.write(relay.tail[-1] + "\n")
            return 127, list(relay.tail), False

        def kill() -> None:
            timed_out.set()
            _terminate(proc)

        timer = threading.Timer(timeout_s, kill) if timeout_s else None
        if timer:
            timer.daemon = True
            timer.start()
        try:
            assert proc.stdout is not None
            fd = proc.stdout.fileno()
            while chunk := os.read(fd, 65536):
                relay.feed(chunk)
            relay.finish()
            code = proc.wait()
        except BaseException:
            _terminate(proc)
            with contextlib.suppress(Exception):
                relay.finish()
            raise
        finally:
            if timer:
                timer.cancel()
            proc.stdout.close()
    return code, list(relay.tail), timed_out.is_set()


def _terminate(proc: subprocess.Popen, grace_s: float = 10.0) -> None:
    if proc.poll() is not None:
        return
    with contextlib.suppress(OSError):
        proc.terminate()
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(OSError):
            proc.kill()
        proc.wait()


