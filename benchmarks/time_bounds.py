"""Wall-clock figures that used to be assertions in the test suite, measured and printed beside their bounds.

A test asserting ``elapsed < bound`` fails on a loaded machine (six jobs on two cores) without anything being
wrong, and passes on a fast one without proving much; the suite keeps the functional part of those tests (the
error, its message, nothing written) and this script keeps the figures:

- ``unet_step_cpu_s``      8x8 ScoreUNet, batch 64, forward + backward + Adam, median CPU seconds, one thread
                           (tests/test_models.py; bound 0.5 s, measured 0.06 s on a 2-core runner);
- ``inception_offline_s``  resolve_inception with an unreachable download URL: the classifier fallback
                           (tests/test_fidelity.py; bound 30 s);
- ``down_server_s``        ensure_reachable on a port nobody listens on, timeout_s = 2
                           (tests/test_reliability.py; bound 5 s);
- ``slow_server_s``        configure() on a server that answers after 5 s, timeout_s = 1
                           (tests/test_reliability.py; bound 4 s);
- ``stage_dead_server_s``  ``python -m stages.train --sde ve`` against a dead MLFLOW_TRACKING_URI: exit 1 before
                           any work (tests/test_pipeline_e2e.py; bound 30 s, interpreter start-up included).

The quick sweep's wall time (tests/test_sweep.py asserted < 300 s) is in the output of ``make sweep``.

    PYTHONPATH=. python benchmarks/time_bounds.py [--out FILE]

Prints one line per figure: value, bound, and whether it is within; exits 0 (a figure is not a test).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

BOUNDS = {"unet_step_cpu_s": 0.5, "inception_offline_s": 30.0, "down_server_s": 5.0, "slow_server_s": 4.0,
          "stage_dead_server_s": 30.0}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def unet_step_cpu_s(repeats: int = 5) -> float:
    import torch

    from scoresde.unet import ScoreUNet

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model, x = ScoreUNet(), torch.rand(64, 1, 8, 8)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    times = []
    for i in range(repeats + 1):
        t0 = time.process_time()
        loss = (model(x, torch.rand(x.shape[0]) + 0.01) - x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if i:  # the first step is a warm-up
            times.append(time.process_time() - t0)
    return sorted(times)[len(times) // 2]


def inception_offline_s() -> float:
    import torch_fidelity.feature_extractor_inceptionv3 as inc

    from pipeline import fidelity as fd

    with tempfile.TemporaryDirectory() as tmp:
        os.environ["TORCH_HOME"] = tmp
        inc.URL_INCEPTION_V3 = "http://127.0.0.1:9/weights-inception-2015-12-05-6726825d.pth"
        t0 = time.perf_counter()
        ok, _, _ = fd.resolve_inception(None, download=True)
        seconds = time.perf_counter() - t0
    assert not ok
    return seconds


def down_server_s() -> float:
    from pipeline.tracking import TrackingUnavailable, ensure_reachable

    t0 = time.perf_counter()
    try:
        ensure_reachable(f"http://127.0.0.1:{_free_port()}", timeout_s=2)
    except TrackingUnavailable:
        return time.perf_counter() - t0
    raise AssertionError("a dead server was reported reachable")


class _SlowHealth(BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 - http.server API
        time.sleep(5)
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args):
        pass


def slow_server_s() -> float:
    from pipeline.tracking import TrackingUnavailable, configure

    server = HTTPServer(("127.0.0.1", 0), _SlowHealth)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    try:
        t0 = time.perf_counter()
        try:
            configure({"uri": f"http://127.0.0.1:{server.server_address[1]}", "timeout_s": 1,
                       "offline_fallback": False})
        except TrackingUnavailable:
            return time.perf_counter() - t0
        raise AssertionError("a 5 s server was reported reachable within 1 s")
    finally:
        server.shutdown()
        server.server_close()


def stage_dead_server_s() -> float:
    with tempfile.TemporaryDirectory() as tmp:
        shutil.copy(ROOT / "params.yaml", Path(tmp) / "params.yaml")
        env = {**os.environ, "PYTHONPATH": str(ROOT), "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{_free_port()}",
               "OMP_NUM_THREADS": "1"}
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "stages.train", "--sde", "ve"], cwd=tmp, env=env,
                              capture_output=True, text=True, timeout=300)
        seconds = time.perf_counter() - t0
    assert proc.returncode == 1, proc.stderr[-2000:]
    return seconds


FIGURES = {"unet_step_cpu_s": unet_step_cpu_s, "inception_offline_s": inception_offline_s,
           "down_server_s": down_server_s, "slow_server_s": slow_server_s, "stage_dead_server_s": stage_dead_server_s}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="*", choices=list(FIGURES), help="measure only these figures")
    parser.add_argument("--out", type=Path, help="also write the figures as JSON")
    args = parser.parse_args(argv)
    results = {}
    print(f"{'figure':22s} {'seconds':>9s} {'bound':>7s}  within  ({platform.node()}, {os.cpu_count()} CPUs)")
    for name in args.only or FIGURES:
        value = FIGURES[name]()
        results[name] = {"seconds": value, "bound": BOUNDS[name], "within": value < BOUNDS[name]}
        print(f"{name:22s} {value:9.3f} {BOUNDS[name]:7.1f}  {'yes' if value < BOUNDS[name] else 'NO'}", flush=True)
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
