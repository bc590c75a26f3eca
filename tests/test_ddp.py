"""Multi-process training (issue 5): torchrun with 2 CPU processes on gloo matches single-process
training on the same global batch; rank 0 alone writes checkpoints; per-rank noise generators are
checkpointed and a preempted (SIGTERM) DDP run resumes bit for bit."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from scoresde.checkpoint import list_checkpoints, load_checkpoint, load_model_state

WORKER = Path(__file__).with_name("_train_worker.py")


def _env() -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    if Path("/sys/class/net/lo").exists():
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")  # offline sandboxes: stay on loopback
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker_args(ckpt_dir, out, **kw):
    args = [str(WORKER), "--ckpt-dir", str(ckpt_dir), "--out", str(out)]
    for k, v in kw.items():
        args += [f"--{k.replace('_', '-')}", str(v)]
    return args


def _torchrun_cmd(nproc, ckpt_dir, out, **kw):
    port = _free_port()
    return [
        sys.executable, "-m", "torch.distributed.run",
        "--nnodes", "1", "--nproc-per-node", str(nproc),
        "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--local-addr", "127.0.0.1",
        "--max-restarts", "0",
        *_worker_args(ckpt_dir, out, **kw),
    ]


def _run(cmd, timeout=180):
    p = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, f"{cmd}\n--- stdout\n{p.stdout[-3000:]}\n--- stderr\n{p.stderr[-5000:]}"
    return p


def _run_single_inprocess(ckpt_dir, out, **kw):
    """The single-process reference, in this process (saves a torch import); same worker code."""
    spec = importlib.util.spec_from_file_location("_train_worker", WORKER)
    worker = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(worker)
    n = torch.get_num_threads()
    try:
        assert worker.main(_worker_args(ckpt_dir, out, **kw)[1:]) == 0
    finally:
        torch.set_num_threads(n)


def _info(out: Path) -> dict:
    return json.loads(Path(str(out) + ".json").read_text())


def test_ddp_two_cpu_processes_match_single_process(tmp_path):
    """Deterministic loss (no noise): rank r takes its half of the same global batch, DDP averages the
    gradients, so after K steps the weights equal single-process training up to float reduction order."""
    kw = dict(steps=20, batch_size=32, ckpt_every=10, log_every=4, loss="mse")
    single = tmp_path / "single.pt"
    ddp = tmp_path / "ddp.pt"
    _run(_torchrun_cmd(2, tmp_path / "c_ddp", ddp, **kw))
    _run_single_inprocess(tmp_path / "c_single", single, **kw)

    assert _info(ddp)["world_size"] == 2 and _info(single)["world_size"] == 1
    a, b = load_model_state(single), load_model_state(ddp)
    delta = max((a["model"][k] - b["model"][k]).abs().max().item() for k in a["model"])
    moved = max((a["model"][k] - load_checkpoint(tmp_path / "c_single" / "ckpt_00000010.pt")["model"][k])
                .abs().max().item() for k in a["model"])
    assert delta < 1e-5 < moved, (delta, moved)  # same result, and training actually changed the weights
    for k in a["ema"]["shadow"]:
        torch.testing.assert_close(a["ema"]["shadow"][k], b["ema"]["shadow"][k], rtol=1e-5, atol=1e-5)
    # logged losses are the rank-average = the global-batch loss
    la, lb = _info(single)["losses"], _info(ddp)["losses"]
    assert [s for s, _ in la] == [s for s, _ in lb]
    for (_, x), (_, y) in zip(la, lb):
        assert abs(x - y) <= 1e-5 * max(1.0, abs(x))

    # rank 0 alone wrote checkpoints (atomically: nothing else in the directory), with both ranks' RNG
    assert sorted(p.name for p in (tmp_path / "c_ddp").iterdir()) == ["ckpt_00000010.pt", "ckpt_00000020.pt"]
    ck = load_checkpoint(tmp_path / "c_ddp" / "ckpt_00000020.pt")
    assert ck["world_size"] == 2 and len(ck["rng_per_rank"]) == 2
    r0, r1 = ck["rng_per_rank"]
    assert torch.equal(r0["data_gen"]["generator"], r1["data_gen"]["generator"])  # one global data order
    assert not torch.equal(r0["loss_gen"], r1["loss_gen"])  # per-rank noise streams


@pytest.mark.slow
def test_ddp_preempted_by_sigterm_resumes_bit_identical(tmp_path):
    """Noisy DSM loss with per-rank generators: SIGTERM to torchrun mid-run -> every rank agrees on a stop
    step, rank 0 checkpoints it; the rerun resumes and ends bit-identical to an uninterrupted DDP run."""
    kw = dict(steps=30, batch_size=32, ckpt_every=5, log_every=3, loss="dsm")
    ref = tmp_path / "ref.pt"
    _run(_torchrun_cmd(2, tmp_path / "c_ref", ref, **kw))

    out, ckpt = tmp_path / "run.pt", tmp_path / "c_run"
    proc = subprocess.Popen(_torchrun_cmd(2, ckpt, out, step_sleep=0.1, **kw), env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and proc.poll() is None:
            if any(s >= 5 for s, _ in list_checkpoints(ckpt)):
                proc.send_signal(signal.SIGTERM)
                break
            time.sleep(0.01)
        _, err = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode != 0, err[-3000:]
    assert not out.exists()
    stopped = max(s for s, _ in list_checkpoints(ckpt))
    assert 5 <= stopped < 30

    _run(_torchrun_cmd(2, ckpt, out, **kw))
    info = _info(out)
    assert info["resumed_from"] == stopped and info["steps_done"] == 30 - stopped
    assert info["losses"] == _info(ref)["losses"]
    a, b = load_model_state(out), load_model_state(ref)
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for k in a["ema"]["shadow"]:
        assert torch.equal(a["ema"]["shadow"][k], b["ema"]["shadow"][k]), k
