"""Faults of the experiment stages: SIGKILL mid-sampling and a disk that fills up (issue 15, items 3 and 4).

* annealing / ablation@* / samplers draw batch i from seed + i and keep finished batches in
  checkpoints/samples/<stage>/ until their outputs are written: a rerun after SIGKILL draws only the missing
  batches and writes the metrics of an uninterrupted run.
* Out of space, every write (checkpoints, kept batches, outputs) fails with scoresde.atomic.DiskFullError
  (an OSError: "no space left on device writing <path>"); the previous file stays, no temporary file is
  left, and a rerun after space is freed equals an uninterrupted run.

A full disk is injected at the Python level (``open`` of files under a directory fails with ENOSPC once a
byte budget is spent: :func:`fill_up`), in-process or in a stage subprocess run through this file
(``python tests/test_faults.py DIR BUDGET MODULE ARGS...``); one test also fills a real tmpfs when the
machine lets an unprivileged user namespace mount one (skipped otherwise).
"""
from __future__ import annotations

import builtins
import errno
import io
import json
import os
import pickle
import re
import runpy
import shutil
import signal
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------- a disk that fills up
def fill_up(directory, budget: int, real_open=io.open):
    """An ``open`` under which files opened for writing below ``directory`` take at most ``budget`` bytes in
    all (what this process writes there); the write that goes beyond writes what fits and raises ENOSPC,
    as a full filesystem does, and so does every later one."""
    root = os.path.realpath(directory) + os.sep
    left = [int(budget)]

    class FullDisk:
        def __init__(self, f):
            self._f = f

        def write(self, data):
            if len(data) > left[0]:
                if left[0]:
                    self._f.write(data[:left[0]])
                left[0] = 0
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            left[0] -= len(data)
            return self._f.write(data)

        def writelines(self, lines):
            for line in lines:
                self.write(line)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self._f.close()

        def __getattr__(self, name):
            return getattr(self._f, name)

    def open_(file, mode="r", *args, **kwargs):
        f = real_open(file, mode, *args, **kwargs)
        if (isinstance(file, (str, os.PathLike)) and any(c in mode for c in "wax+")
                and os.path.realpath(file).startswith(root)):
            return FullDisk(f)
        return f

    return open_


def _main(argv: list[str]) -> None:
    """``DIR BUDGET MODULE ARGS...``: run ``python -m MODULE ARGS...`` on a disk that fills up under DIR."""
    directory, budget, module, *args = argv
    builtins.open = io.open = fill_up(directory, int(budget))
    sys.argv = [module, *args]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    _main(sys.argv[1:])
    raise SystemExit(0)


import numpy as np  # noqa: E402 (the block above runs stages without pytest)
import pytest  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402

from pipeline.io import DiskFullError, write_csv, write_json  # noqa: E402
from scoresde.checkpoint import atomic_torch_save, load_checkpoint, safe_load  # noqa: E402

TIMING = {"seconds", "seconds_per_1000", "train_seconds"}  # wall-clock: the only values a rerun may change
TOY_MIXTURE = {"weights": [0.8, 0.2], "means": [[5.0, 5.0], [-5.0, -5.0]], "std": 1.0}


def _tmp_files(root: Path) -> list[Path]:
    return [p for p in root.rglob(".tmp-*")]


@pytest.fixture
def disk_full(monkeypatch):
    """``disk_full(directory, budget)``: this process's disk under ``directory`` fills up after ``budget`` bytes."""
    def install(directory, budget: int = 0):
        opener = fill_up(directory, budget, real_open=io.open)
        monkeypatch.setattr(builtins, "open", opener)
        monkeypatch.setattr(io, "open", opener)
    return install


# ---------------------------------------------------------------------------------- the atomic writer
WRITERS = {
    "checkpoint.pt": lambda p, v: atomic_torch_save({"step": v, "model": {"w": torch.full((4096,), float(v))}}, p),
    "metrics.json": lambda p, v: write_json(p, {"value": v, "pad": "x" * 8192}),
    "table.csv": lambda p, v: write_csv(p, ["a", "b"], [[v, "x" * 100]] * 200),
    "samples.npz": lambda p, v: _save_samples(p, v),
    "figure.png": lambda p, v: _save_figure(p, v),
}


def _save_samples(path: Path, v: int) -> None:
    from pipeline.io import atomic_path

    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.savez_compressed(fh, x=np.random.default_rng(v).integers(0, 255, (64, 1, 8, 8), dtype=np.uint8))


def _save_figure(path: Path, v: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from pipeline.io import save_figure

    fig = plt.figure(figsize=(3, 3))
    plt.imshow(np.random.default_rng(v).random((32, 32)))
    save_figure(fig, path)


@pytest.mark.parametrize("name", list(WRITERS))
def test_out_of_space_names_the_path_keeps_the_previous_file_and_leaves_no_temp(tmp_path, disk_full, name):
    path = tmp_path / "out" / name
    WRITERS[name](path, 1)
    before = path.read_bytes()
    disk_full(tmp_path, budget=len(before) // 2)  # the next write runs out of space halfway
    with pytest.raises(DiskFullError) as err:
        WRITERS[name](path, 2)
    assert isinstance(err.value, OSError) and err.value.errno == errno.ENOSPC
    assert str(err.value) == f"no space left on device writing {path}"
    assert err.value.filename == str(path)
    assert path.read_bytes() == before, "the previous file is untouched"
    assert _tmp_files(tmp_path) == [], "the temporary file is removed"


def test_disk_full_error_is_one_picklable_line():
    e = DiskFullError("models/ve.pt", "RuntimeError: file write failed")
    assert str(e) == "no space left on device writing models/ve.pt" and "\n" not in str(e)
    again = pickle.loads(pickle.dumps(e))
    assert type(again) is DiskFullError and str(again) == str(e) and again.errno == errno.ENOSPC
    quota = DiskFullError("x.pt", code=errno.EDQUOT)
    assert str(quota) == "disk quota exceeded writing x.pt"


def test_other_failures_are_not_reported_as_a_full_disk(tmp_path):
    path = tmp_path / "m.json"
    with pytest.raises(TypeError):
        write_json(path, {"not json": object()})
    assert not path.exists() and _tmp_files(tmp_path) == []


_REAL_TMPFS = r"""
import os, sys, torch
from scoresde.atomic import DiskFullError
from scoresde.checkpoint import atomic_torch_save, load_checkpoint
d = sys.argv[1]
atomic_torch_save({"step": 1, "model": {"w": torch.ones(16)}}, f"{d}/ckpt_00000001.pt")
try:
    atomic_torch_save({"step": 2, "model": {"w": torch.ones(1 << 20)}}, f"{d}/ckpt_00000002.pt")  # 4 MiB > 1 MiB
except DiskFullError as e:
    print("ERROR", e)
print("LEFT", sorted(os.listdir(d)), load_checkpoint(f"{d}/ckpt_00000001.pt")["step"])
"""


def test_a_real_full_tmpfs(tmp_path):
    """The kernel's ENOSPC through torch's writer (it wraps the OSError in a RuntimeError) on a 1 MiB tmpfs."""
    unshare = shutil.which("unshare")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    script = tmp_path / "fill.py"
    script.write_text(_REAL_TMPFS)
    if unshare is None:
        pytest.skip("no unshare(1)")
    mount = f"mount -t tmpfs -o size=1m tmpfs {mnt}"
    probe = subprocess.run([unshare, "-rm", "sh", "-c", mount], capture_output=True, text=True, timeout=60)
    if probe.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs in a user namespace here: {probe.stderr.strip()[:200]}")
    cmd = [unshare, "-rm", "sh", "-c", f"{mount} && exec {sys.executable} {script} {mnt}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr
    assert f"ERROR no space left on device writing {mnt}/ckpt_00000002.pt" in proc.stdout, proc.stdout
    assert "LEFT ['ckpt_00000001.pt'] 1" in proc.stdout, proc.stdout


# ---------------------------------------------------------------------------------- kept batches
def _model():
    from scoresde.models import build_model

    cfg = {"name": "unet", "ch": 8, "ch_mult": [1, 2], "num_res_blocks": 1, "attn_resolutions": [],
           "embedding": "fourier"}
    return build_model(cfg, (1, 8, 8), seed=0).eval()


SCHEDULE = {"data_shape": [1, 8, 8], "sigmas": [1.0, 0.3, 0.1, 0.03]}
COMMON = {"batch_size": 2, "n_steps_each": 2, "step_lr": 4e-5}
CONFIGS = {"fixed": {**COMMON, "sampler": "langevin", "sigma": None, "denoise": False},
           "annealed": {**COMMON, "sampler": "annealed_langevin", "denoise": True},
           "annealed_again": {**COMMON, "sampler": "annealed_langevin", "denoise": True}}


def test_samplers_of_one_stage_share_starting_noise_and_resume_after_a_crash(tmp_path, monkeypatch):
    """sample_and_score: the same per-batch seeds for every config; a crash in the second config's second
    batch, then a rerun: only the missing batches are drawn, the samples and scores are the uninterrupted ones."""
    import pipeline.comparison as comparison
    import scoresde.sampling as sampling
    from pipeline.generation import RESUME_ROOT, discard_batches
    from pipeline.tracking import NullRun

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(comparison, "sample_quality", lambda x, seed, device: {"checksum": float(x.double().sum())})
    model, cpu = _model(), torch.device("cpu")
    ref, ref_x = comparison.sample_and_score("ncsn", model, CONFIGS, SCHEDULE, 6, cpu, 3, False, NullRun(), "t")
    assert torch.equal(ref_x["annealed"], ref_x["annealed_again"]), "same starting noise for every sampler"
    assert not torch.equal(ref_x["annealed"][:2], ref_x["annealed"][2:4]), "batches draw from their own seeds"
    discard_batches("t")
    assert not (tmp_path / RESUME_ROOT / "t").exists()

    real, calls = sampling.annealed_langevin, []

    def crashing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("simulated crash in the second batch of 'annealed'")
        return real(*args, **kwargs)

    monkeypatch.setattr(sampling, "annealed_langevin", crashing)
    with pytest.raises(RuntimeError, match="simulated crash"):
        comparison.sample_and_score("ncsn", model, CONFIGS, SCHEDULE, 6, cpu, 3, False, NullRun(), "t")
    kept = sorted(p.relative_to(tmp_path / RESUME_ROOT / "t").parts[0] + "/" + p.name
                  for p in (tmp_path / RESUME_ROOT / "t").rglob("batch_*.pt"))
    assert kept == ["annealed/batch_000000.pt", "fixed/batch_000000.pt", "fixed/batch_000001.pt",
                    "fixed/batch_000002.pt"]

    calls.clear()
    monkeypatch.setattr(sampling, "annealed_langevin", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    again, x = comparison.sample_and_score("ncsn", model, CONFIGS, SCHEDULE, 6, cpu, 3, False, NullRun(), "t")
    assert len(calls) == 2 + 3, "annealed: the 2 missing batches; annealed_again: all 3"
    for name in CONFIGS:
        assert torch.equal(x[name], ref_x[name])
        assert {k: v for k, v in again[name].items() if k not in TIMING} == \
               {k: v for k, v in ref[name].items() if k not in TIMING}


def test_a_kept_batch_of_another_shape_is_drawn_again(tmp_path):
    from pipeline.generation import generate

    model, cpu, cfg = _model(), torch.device("cpu"), CONFIGS["annealed"]
    ref, _, _ = generate("ncsn", model, cfg, SCHEDULE, 4, cpu, None, False, seed=1)
    atomic_torch_save({"x": torch.zeros(3, 1, 8, 8), "nfe": 9, "seconds": 0.0}, tmp_path / "batch_000000.pt")
    x, _, _ = generate("ncsn", model, cfg, SCHEDULE, 4, cpu, None, False, seed=1, resume_dir=tmp_path)
    assert torch.equal(x, ref)


# ---------------------------------------------------------------------------------- the stages, in a subprocess
def _workspace(root: Path, params_fn) -> Path:
    """What the annealing / ablation stages read, on toy 2-D data: prepared points, a schedule, the points
    reference of fid_ref, a small NCSN score MLP saved as train@ncsn saves it; and params.yaml."""
    from pipeline.params import load_stage_params
    from pipeline.schedule import NOISE, build_schedule
    from scoresde.checkpoint import save_model
    from scoresde.datasets import get_dataset
    from scoresde.ema import EMA
    from scoresde.models import build_model

    root.mkdir(parents=True, exist_ok=True)
    ds = get_dataset("toy", **TOY_MIXTURE, n=300, n_test=0, seed=0)
    ds.write(str(root / "data/prepared/data.parquet"), meta={"seed": 0})
    x = torch.as_tensor(ds.x, dtype=torch.float32)
    noise = load_stage_params({"noise": NOISE}, ROOT / "params.yaml")["noise"]
    noise.update(sigma_begin=20.0, sigma_end=1.0, num_levels=4)
    noise["ve"].update(sigma_min=0.5, sigma_max="auto")
    (root / "data/noise").mkdir(parents=True)
    (root / "data/noise/schedule.json").write_text(json.dumps(build_schedule(noise, x)))
    (root / "data/fid").mkdir(parents=True)
    with open(root / "data/fid/ref_stats.npz", "wb") as fh:
        np.savez(fh, kind=np.array("points"), dataset=np.array("toy"), points=x.numpy(),
                 mixture_weights=np.array(TOY_MIXTURE["weights"]), mixture_means=np.array(TOY_MIXTURE["means"]),
                 mixture_std=np.array(TOY_MIXTURE["std"]))
    cfg = {"name": "mlp", "hidden": 64, "n_layers": 2, "embedding": "fourier"}
    model = build_model(cfg, (2,), seed=0)
    save_model(root / "models/ncsn.pt", model, EMA(model),
               {"kind": "ncsn", "centered": False, "model": cfg, "data_shape": [2], "dataset": "toy"})
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["cpu_threads"] = 1
    params_fn(params)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return root


def _env() -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT), SCORESDE_TRACKING="off", OMP_NUM_THREADS="1")
    env.pop("SCORESDE_PARENT_RUN_ID", None)
    return env


def _stage(ws: Path, *cmd: str, full: tuple[str, int] | None = None) -> subprocess.CompletedProcess:
    """``python -m <cmd>`` in ``ws``; with ``full=(dir, budget)`` on a disk that fills up under ``ws/dir``."""
    argv = [sys.executable, "-m", *cmd] if full is None else \
        [sys.executable, __file__, str(ws / full[0]), str(full[1]), *cmd]
    return subprocess.run(argv, cwd=ws, env=_env(), capture_output=True, text=True, timeout=600)


BATCH_LINE = re.compile(r"^\[\w+\] batch \d+/\d+: ", re.M)


def _without_timing(metrics: dict) -> dict:
    return {k: _without_timing(v) if isinstance(v, dict) else v for k, v in metrics.items() if k not in TIMING}


def _annealing_params(p: dict) -> None:
    # 2 samplers x 4 batches; 4 levels x 300 Langevin steps per batch (~0.5 s): the kill lands in between
    p["annealing"].update(device="cpu", n=8, batch_size=2, n_steps_each=300, n_show=8)


@pytest.mark.slow  # 50 s on 2 busy cores: three stage runs
def test_annealing_killed_mid_sampling_resumes_with_the_uninterrupted_metrics(tmp_path):
    ws = _workspace(tmp_path / "ws", _annealing_params)
    metrics, kept_root = ws / "reports/metrics/annealing.json", ws / "checkpoints/samples/annealing"
    first = _stage(ws, "stages.annealing")
    assert first.returncode == 0, first.stderr[-3000:]
    assert len(BATCH_LINE.findall(first.stdout)) == 8
    reference = json.loads(metrics.read_text())
    assert not kept_root.exists(), "the kept batches are removed once the outputs are written"
    shutil.rmtree(ws / "reports")

    proc = subprocess.Popen([sys.executable, "-m", "stages.annealing"], cwd=ws, env=_env(), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    seen = []
    for line in proc.stdout:  # SIGKILL as soon as the first batch is reported (it is kept before that)
        seen.append(line)
        if BATCH_LINE.match(line):
            proc.send_signal(signal.SIGKILL)
            break
    proc.stdout.close()
    assert proc.wait(timeout=60) == -signal.SIGKILL, "".join(seen)
    kept = len(list(kept_root.rglob("batch_*.pt")))
    assert 1 <= kept < 8 and not metrics.exists()

    rerun = _stage(ws, "stages.annealing")
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    drawn = len(BATCH_LINE.findall(rerun.stdout))
    assert drawn == 8 - kept, rerun.stdout
    assert _without_timing(json.loads(metrics.read_text())) == _without_timing(reference)
    assert not kept_root.exists()
    print(f"annealing: 8 batches uninterrupted; killed with {kept} kept, the rerun drew {drawn}")


def _same(a, b) -> bool:
    """Equal values, tensors bit for bit, in nested dicts / lists."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def _ablation_params(p: dict) -> None:
    a = p["ablation"]
    a.update(device="cpu", num_levels=3, n_show=8, sigma_ends=[0.1])
    a["train"].update(steps=4, batch_size=32, warmup=0, log_every=2, ckpt_every=2,
                      model={"name": "mlp", "embedding": "fourier", "hidden": 16, "n_layers": 1})
    a["sample"].update(n=8, batch_size=4, n_steps_each=2)


@pytest.mark.slow  # 75 s on 2 busy cores: four stage runs
def test_ablation_on_a_disk_that_fills_up_then_a_rerun_equals_an_uninterrupted_run(tmp_path):
    ws = _workspace(tmp_path / "ws", _ablation_params)
    cmd = ("stages.ablation", "--sigma-end", "0.1")
    ckpts, kept_root = ws / "checkpoints/ablation_0.1", ws / "checkpoints/samples/ablation_0.1"
    metrics, figure = ws / "reports/metrics/ablation_0.1.json", ws / "reports/figures/ablation_sigma_end_0.1.png"

    first = _stage(ws, *cmd)
    assert first.returncode == 0, first.stderr[-3000:]
    reference = json.loads(metrics.read_text())
    final = safe_load(ckpts / "ckpt_00000004.pt")
    size = (ckpts / "ckpt_00000004.pt").stat().st_size
    shutil.rmtree(ckpts)
    shutil.rmtree(ws / "reports")

    # 1) the disk fills up while the step-4 training checkpoint is written (room for 1.5 checkpoints)
    out = _stage(ws, *cmd, full=("checkpoints/ablation_0.1", size * 3 // 2))
    assert out.returncode != 0
    last = out.stderr.strip().splitlines()[-1]
    assert "no space left on device writing checkpoints/ablation_0.1/ckpt_00000004.pt" in last, out.stderr[-3000:]
    assert load_checkpoint(ckpts / "ckpt_00000002.pt")["step"] == 2, "the previous checkpoint stays loadable"
    assert sorted(p.name for p in ckpts.iterdir()) == ["ckpt_00000002.pt"], "no torn or temporary file"
    assert not metrics.exists() and not figure.exists()

    # 2) space for the checkpoints, none for the outputs: training resumes, the samples are kept, no output
    out = _stage(ws, *cmd, full=("reports", 0))
    assert out.returncode != 0
    assert "no space left on device writing reports/figures/ablation_sigma_end_0.1.png" in out.stderr, \
        out.stderr[-3000:]
    assert len(BATCH_LINE.findall(out.stdout)) == 2
    assert not metrics.exists() and not figure.exists() and _tmp_files(ws) == []
    assert len(list(kept_root.rglob("batch_*.pt"))) == 2

    # 3) space freed: the rerun draws nothing again and equals the uninterrupted run
    out = _stage(ws, *cmd)
    assert out.returncode == 0, out.stderr[-3000:]
    assert BATCH_LINE.findall(out.stdout) == [] and "2 of 2 batches were kept" in out.stdout
    assert _without_timing(json.loads(metrics.read_text())) == _without_timing(reference)
    again = safe_load(ckpts / "ckpt_00000004.pt")
    for part in ("model", "ema", "optimizer", "losses", "step"):
        assert _same(again[part], final[part]), part
    assert not kept_root.exists() and _tmp_files(ws) == []
