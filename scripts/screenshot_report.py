"""Open reports/report.html in a real headless browser (Debian's chromium) and save a PNG screenshot.

    python scripts/screenshot_report.py [reports/report.html] [--out reports/report.png] [--size 1280,4000]

Chromium runs fully offline: no sandbox (containers run as root), no GPU, no QUIC, no first-run,
background networking, component updates or sync, and a throw-away profile folder. The report is
self-contained, so what the screenshot shows is what a person opening the file offline sees.
Install the browser with ``apt-get update && apt-get install -y --no-install-recommends chromium fonts-dejavu-core``.
Exit status: 0 written, 2 no chromium found, 1 chromium failed or wrote nothing.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def find_chromium() -> str | None:
    env = os.environ.get("CHROMIUM")
    if env and shutil.which(env):
        return shutil.which(env)
    for name in CANDIDATES:
        path = shutil.which(name)
        if path:
            return path
    return None


def screenshot(html: str | Path, out: str | Path, size: tuple[int, int] = (1280, 4000), timeout_s: float = 120.0,
               browser: str | None = None) -> Path:
    """Render ``html`` with headless chromium into the PNG ``out``; returns ``out``."""
    browser = browser or find_chromium()
    if browser is None:
        raise FileNotFoundError("chromium not found (apt-get install -y chromium)")
    html, out = Path(html).resolve(), Path(out).resolve()
    if not html.is_file():
        raise FileNotFoundError(f"{html} not found: generate the report first (python -m pipeline.report)")
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.exists():
        out.unlink()
    with tempfile.TemporaryDirectory(prefix="chromium-profile-") as profile:
        cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               "--disable-dev-shm-usage", "--hide-scrollbars", f"--user-data-dir={profile}",
               f"--screenshot={out}", f"--window-size={size[0]},{size[1]}", html.as_uri()]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s,
                              env={**os.environ, "HOME": profile})
    if not out.is_file() or out.stat().st_size == 0:
        raise RuntimeError(f"chromium wrote no screenshot (exit {proc.returncode}): {proc.stderr[-2000:]}")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("html", nargs="?", default="reports/report.html")
    parser.add_argument("--out", default="reports/report.png")
    parser.add_argument("--size", default="1280,4000", help="window WIDTH,HEIGHT in pixels")
    args = parser.parse_args(argv)
    width, height = (int(v) for v in args.size.split(","))
    if find_chromium() is None:
        print("chromium not found: apt-get update && apt-get install -y --no-install-recommends chromium", file=sys.stderr)
        return 2
    try:
        path = screenshot(args.html, args.out, (width, height))
        print(f"{path} ({path.stat().st_size // 1024} KiB)")
        return 0
    except (RuntimeError, FileNotFoundError, subprocess.TimeoutExpired) as err:
        print(f"screenshot failed: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
