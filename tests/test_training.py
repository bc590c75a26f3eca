"""Training engine: atomic checkpoints, bit-identical resume (in-process, SIGKILL, SIGTERM), torn and
stale checkpoints, NaN guard, safe loading (issue 6; issue 3 train stage)."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import pickle
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from scoresde import checkpoint, distributed
from scoresde.checkpoint import (
    CorruptCheckpointError,
    UnsafeCheckpointError,
    list_checkpoints,
    load_checkpoint,
    load_model_state,
    save_model,
)
from scoresde.training import NonFiniteLossError, TrainConfig, train

WORKER = Path(__file__).with_name("_train_worker.py")
_spec = importlib.util.spec_from_file_location("_train_worker", WORKER)
worker = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(worker)


def _args(ckpt_dir, **kw):
    argv = ["--ckpt-dir", str(ckpt_dir)]
    for k, v in kw.items():
        argv += [f"--{k.replace('_', '-')}", str(v)]
    return worker.parser().parse_args(argv)


def run_inprocess(ckpt_dir, fingerprint="fp-test", log_fn=None, loss_wrapper=None, **kw):
    model, loss_fn, data, config = worker.build(_args(ckpt_dir, **kw))
    if loss_wrapper is not None:
        loss_fn = loss_wrapper(loss_fn)
    return train(model, loss_fn, data, config, ckpt_dir, fingerprint=fingerprint, log_fn=log_fn, progress=False)


def assert_same_state(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs"


def assert_same_result(res, ref):
    assert_same_state(res.model.state_dict(), ref.model.state_dict())
    assert_same_state(res.ema.state_dict()["shadow"], ref.ema.state_dict()["shadow"])
    assert res.losses == ref.losses



class Interrupt(Exception):
    pass


def interrupt_at(n):
    """Wrap a loss so that its n-th call raises (a crash in the middle of step n)."""

    def wrap(loss_fn):
        calls = [0]

        def f(model, x, g):
            calls[0] += 1
            if calls[0] == n:
                raise Interrupt(f"simulated crash at call {n}")
            return loss_fn(model, x, g)

        return f

    return wrap


# ---------------------------------------------------------------------------------------------------------
# config
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "field,value",
    [("steps", -1), ("batch_size", 0), ("lr", 0.0), ("lr", float("nan")), ("ema_decay", 1.0),
     ("grad_clip", -1.0), ("ckpt_every", 0), ("log_every", 0), ("device", "gpu"), ("steps", 1.5),
     ("steps", 0), ("device", "mps"), ("device", "cuda:x"), ("amp_dtype", "fp8"), ("optimizer_impl", "sgd")],
)
def test_config_validation_names_field(field, value):
    kw = {"steps": 10, "batch_size": 4, "lr": 1e-3, field: value}
    with pytest.raises(ValueError, match=f"TrainConfig.{field}"):
        TrainConfig(**kw)


def test_config_from_dict_rejects_unknown_keys():
    assert TrainConfig.from_dict({"steps": 1, "batch_size": 2, "lr": 0.1}).grad_clip == 1.0
    with pytest.raises(ValueError, match="stepz"):
        TrainConfig.from_dict({"stepz": 1, "batch_size": 2, "lr": 0.1})


def test_resolve_device_auto():
    assert distributed.resolve_device("cpu").type == "cpu"
    assert distributed.resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")


# ---------------------------------------------------------------------------------------------------------
# checkpoints
# ---------------------------------------------------------------------------------------------------------


def test_checkpoints_written_atomically_pruned_and_weights_only(tmp_path):
    logged = []
    res = run_inprocess(tmp_path, steps=17, ckpt_every=5, log_every=4, log_fn=lambda s, m: logged.append((s, m)))
    assert res.resumed_from is None and res.steps_done == 17 and res.final_step == 17
    names = sorted(p.name for p in tmp_path.iterdir())
    # every 5 steps and at the end; the newest two kept; no temp file left behind
    assert names == ["ckpt_00000015.pt", "ckpt_00000017.pt"], names
    assert res.checkpoint == tmp_path / "ckpt_00000017.pt"
    ck = torch.load(tmp_path / "ckpt_00000017.pt", map_location="cpu", weights_only=True)
    assert ck["step"] == 17 and ck["fingerprint"] == "fp-test"
    for key in ("model", "ema", "optimizer", "scaler", "rng", "losses", "config"):
        assert key in ck
    for key in ("torch_cpu", "numpy", "python", "data_gen", "loss_gen"):
        assert key in ck["rng"]
    assert_same_state(ck["model"], res.model.state_dict())
    # log_fn on every log_every steps; the loss curve also has the final partial window
    assert [s for s, _ in logged] == [4, 8, 12, 16, 17]
    assert {"loss", "lr", "steps_per_sec", "grad_norm"} <= set(logged[0][1])
    assert [s for s, _ in res.losses] == [4, 8, 12, 16, 17]
    assert all(np.isfinite(v) for _, v in res.losses)
    # warm-up: lr rises linearly over the first 5 steps then stays at lr
    assert logged[0][1]["lr"] == pytest.approx(2e-3 * 4 / 5) and logged[1][1]["lr"] == pytest.approx(2e-3)


def test_rng_state_roundtrip_through_weights_only_file(tmp_path):
    sampler = distributed.BatchSampler(100, seed=5)
    gen = torch.Generator().manual_seed(7)
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    random.gauss(0, 1)  # leaves a cached gauss_next
    np.random.standard_normal()  # numpy has_gauss = 1 path
    sampler.next(30)
    checkpoint.atomic_torch_save(checkpoint.capture_rng(sampler, gen), tmp_path / "rng.pt")
    expected = (random.random(), random.gauss(0, 1), np.random.standard_normal(3), torch.rand(3),
                sampler.next(130), torch.rand(3, generator=gen))
    random.seed(99)
    np.random.seed(99)
    torch.manual_seed(99)
    sampler2 = distributed.BatchSampler(100, seed=0)
    gen2 = torch.Generator().manual_seed(0)
    rng = torch.load(tmp_path / "rng.pt", map_location="cpu", weights_only=True)
    checkpoint.restore_rng(rng, sampler2, gen2)
    got = (random.random(), random.gauss(0, 1), np.random.standard_normal(3), torch.rand(3),
           sampler2.next(130), torch.rand(3, generator=gen2))
    assert got[0] == expected[0] and got[1] == expected[1]
    assert np.array_equal(got[2], expected[2])
    for a, b in zip(got[3:], expected[3:]):
        assert torch.equal(a, b)


def test_batch_sampler_covers_each_epoch_once():
    s = distributed.BatchSampler(10, seed=0)
    idx = torch.cat([s.next(4) for _ in range(5)])  # 20 draws = 2 epochs
    assert sorted(idx[:10].tolist()) == list(range(10)) and sorted(idx[10:].tolist()) == list(range(10))


def test_resume_after_inprocess_crash_is_bit_identical(tmp_path):
    ref = run_inprocess(tmp_path / "ref", steps=23)
    with pytest.raises(Interrupt):
        run_inprocess(tmp_path / "run", steps=23, loss_wrapper=interrupt_at(13))
    assert [s for s, _ in list_checkpoints(tmp_path / "run")] == [10, 5]
    res = run_inprocess(tmp_path / "run", steps=23)
    assert res.resumed_from == 10 and res.steps_done == 13
    assert_same_result(res, ref)
    # rerunning a finished run trains nothing and returns the same weights
    again = run_inprocess(tmp_path / "run", steps=23)
    assert again.resumed_from == 23 and again.steps_done == 0
    assert_same_result(again, ref)


def _unet_run(ckpt_dir, steps, loss_wrapper=None):
    """Tiny ScoreUNet with dropout (uses torch's global RNG) on the VP SDE loss."""
    from scoresde.losses import sde_dsm_loss
    from scoresde.models import build_model, get_score_fn
    from scoresde.sde import get_sde

    sde = get_sde("vp")
    model = build_model({"name": "unet", "ch": 8, "ch_mult": [1, 2], "attn_resolutions": [4], "dropout": 0.1,
                         "embedding": "sinusoidal"}, (1, 8, 8), seed=0)
    data = torch.rand(48, 1, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1

    def loss_fn(m, x, g):
        return sde_dsm_loss(sde, get_score_fn(m, sde), x, generator=g)

    if loss_wrapper is not None:
        loss_fn = loss_wrapper(loss_fn)
    cfg = TrainConfig(steps=steps, batch_size=8, lr=1e-3, ckpt_every=3, log_every=2, device="cpu")
    return train(model, loss_fn, data, cfg, ckpt_dir, fingerprint="unet", progress=False)


def test_unet_with_dropout_and_sde_loss_resumes_bit_identical(tmp_path):
    ref = _unet_run(tmp_path / "ref", 7)
    with pytest.raises(Interrupt):
        _unet_run(tmp_path / "run", 7, loss_wrapper=interrupt_at(5))
    res = _unet_run(tmp_path / "run", 7)
    assert res.resumed_from == 3
    assert_same_result(res, ref)


def test_torn_checkpoint_is_ignored_and_older_one_used(tmp_path, caplog):
    ref = run_inprocess(tmp_path / "ref", steps=16)
    with pytest.raises(Interrupt):
        run_inprocess(tmp_path / "run", steps=16, loss_wrapper=interrupt_at(12))
    newest = tmp_path / "run" / "ckpt_00000010.pt"
    data = newest.read_bytes()
    newest.write_bytes(data[: len(data) // 2])  # torn write
    (tmp_path / "run" / ".tmp-ckpt_00000011.pt.123.abcd.tmp").write_bytes(data[:100])  # leftover temp
    with pytest.raises(CorruptCheckpointError, match="ckpt_00000010.pt"):
        load_checkpoint(newest)
    with caplog.at_level(logging.WARNING, logger="scoresde.checkpoint"):
        res = run_inprocess(tmp_path / "run", steps=16)
    assert res.resumed_from == 5
    assert "torn/corrupt" in caplog.text and "ckpt_00000010.pt" in caplog.text
    assert_same_result(res, ref)
    assert not list((tmp_path / "run").glob(".tmp-*"))


def test_stale_fingerprint_checkpoint_is_ignored(tmp_path, caplog):
    run_inprocess(tmp_path, steps=10, fingerprint="params-A")
    with caplog.at_level(logging.WARNING, logger="scoresde.checkpoint"):
        res = run_inprocess(tmp_path, steps=10, fingerprint="params-B")
    assert res.resumed_from is None and res.steps_done == 10
    assert "stale" in caplog.text and "params-A" in caplog.text
    # stale ones moved aside (kept, not resumed, not shadowing or pruning the new ones)
    assert len(list((tmp_path / "stale").glob("*.pt"))) == 2
    assert load_checkpoint(tmp_path / "ckpt_00000010.pt")["fingerprint"] == "params-B"
    # switching the params back finds the earlier run's work again
    res = run_inprocess(tmp_path, steps=10, fingerprint="params-A")
    assert res.resumed_from == 10 and res.steps_done == 0
    assert load_checkpoint(tmp_path / "ckpt_00000010.pt")["fingerprint"] == "params-A"


def test_checkpoints_beyond_requested_steps_do_not_displace_new_ones(tmp_path):
    run_inprocess(tmp_path, steps=20, fingerprint="fp")  # leaves ckpts 15, 20
    res = run_inprocess(tmp_path, steps=12, fingerprint="fp")  # same fingerprint, fewer steps
    assert res.resumed_from is None and res.final_step == 12
    assert [s for s, _ in list_checkpoints(tmp_path)] == [20, 15, 12, 10]


def test_nan_loss_raises_naming_step_and_keeps_last_good_checkpoint(tmp_path):
    with pytest.raises(NonFiniteLossError, match=r"step 8\b") as ei:
        run_inprocess(tmp_path, steps=20, ckpt_every=5, nan_at=8)
    assert ei.value.step == 8 and np.isnan(ei.value.value)
    assert "nan" in str(ei.value)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [5]
    ck = load_checkpoint(tmp_path / "ckpt_00000005.pt")
    assert all(torch.isfinite(v).all() for v in ck["model"].values())


def test_inf_loss_at_checkpoint_step_writes_no_checkpoint(tmp_path):
    def wrap(loss_fn):
        calls = [0]

        def f(model, x, g):
            calls[0] += 1
            loss = loss_fn(model, x, g)
            return loss + float("inf") if calls[0] == 10 else loss

        return f

    with pytest.raises(NonFiniteLossError, match="step 10"):
        run_inprocess(tmp_path, steps=20, ckpt_every=5, loss_wrapper=wrap)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [5]


# ---------------------------------------------------------------------------------------------------------
# safe loading
# ---------------------------------------------------------------------------------------------------------


class _Evil:
    def __init__(self, sentinel):
        self.sentinel = str(sentinel)

    def __reduce__(self):
        return (os.system, (f"touch {self.sentinel}",))


def _write_evil(path: Path, sentinel: Path, how: str):
    obj = {"step": 99, "model": _Evil(sentinel), "fingerprint": "fp-test"}
    if how == "torch":
        torch.save(obj, path)
    else:
        with open(path, "wb") as f:
            pickle.dump(obj, f, protocol=2)


@pytest.mark.parametrize("how", ["torch", "pickle"])
def test_malicious_checkpoint_is_refused_and_not_executed(tmp_path, how):
    sentinel = tmp_path / "pwned"
    bad = tmp_path / "ckpt_00000099.pt"
    _write_evil(bad, sentinel, how)
    with pytest.raises(UnsafeCheckpointError, match="ckpt_00000099.pt") as ei:
        load_checkpoint(bad)
    assert "refusing" in str(ei.value)
    with pytest.raises(UnsafeCheckpointError, match="ckpt_00000099.pt"):
        load_model_state(bad)
    assert not sentinel.exists()


def test_training_skips_malicious_checkpoint(tmp_path, caplog):
    sentinel = tmp_path / "pwned"
    ref = run_inprocess(tmp_path / "ref", steps=6)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    _write_evil(run_dir / "ckpt_00000005.pt", sentinel, "torch")
    with caplog.at_level(logging.WARNING, logger="scoresde.checkpoint"):
        res = run_inprocess(run_dir, steps=6)
    assert not sentinel.exists()
    assert res.resumed_from is None and "refusing" in caplog.text
    assert_same_result(res, ref)


def test_save_model_roundtrip(tmp_path):
    res = run_inprocess(tmp_path / "c", steps=3)
    out = tmp_path / "models" / "ve.pt"
    save_model(out, res.model, res.ema, {"sde": "ve", "steps": 3, "sigmas": [1.0, 0.1]})
    obj = torch.load(out, map_location="cpu", weights_only=True)
    assert obj["config"] == {"sde": "ve", "steps": 3, "sigmas": [1.0, 0.1]}
    loaded = load_model_state(out)
    assert_same_state(loaded["model"], res.model.state_dict())
    assert_same_state(loaded["ema"]["shadow"], res.ema.state_dict()["shadow"])
    assert sorted(p.name for p in out.parent.iterdir()) == ["ve.pt"]
    with pytest.raises(TypeError, match="JSON"):
        save_model(out, res.model, res.ema, {"bad": object()})
    with pytest.raises(FileNotFoundError):
        load_model_state(tmp_path / "missing.pt")


# ---------------------------------------------------------------------------------------------------------
# crash in a separate process: SIGKILL and SIGTERM
# ---------------------------------------------------------------------------------------------------------

_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _worker_cmd(ckpt_dir, out, **kw):
    cmd = [sys.executable, str(WORKER), "--ckpt-dir", str(ckpt_dir), "--out", str(out)]
    for k, v in kw.items():
        cmd += [f"--{k.replace('_', '-')}", str(v)]
    return cmd


def _start_and_signal(cmd, ckpt_dir, min_step, sig, timeout=120.0):
    """Start the worker, send ``sig`` once a checkpoint of step >= min_step exists; return (proc, steps seen)."""
    proc = subprocess.Popen(cmd, env=_ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            steps = [s for s, _ in list_checkpoints(ckpt_dir)]
            if steps and max(steps) >= min_step:
                proc.send_signal(sig)
                break
            if proc.poll() is not None:
                break
            time.sleep(0.005)
        out, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc, out, err


def test_sigkill_and_sigterm_then_rerun_gives_identical_weights(tmp_path):
    steps, every = 60, 5
    common = dict(steps=steps, ckpt_every=every)
    ref_out = tmp_path / "ref.pt"
    # uninterrupted reference: same worker code, in this process (one intra-op thread, like the subprocesses)
    assert worker.main(_worker_cmd(tmp_path / "ref_ckpt", ref_out, **common)[2:]) == 0
    out, ckpt = tmp_path / "run.pt", tmp_path / "run_ckpt"
    cmd = _worker_cmd(ckpt, out, step_sleep=0.04, **common)

    # 1) SIGKILL after the first checkpoint: no chance to clean up
    proc, _, err = _start_and_signal(cmd, ckpt, min_step=every, sig=signal.SIGKILL)
    assert proc.returncode == -signal.SIGKILL, err
    assert not out.exists()
    killed_at = max(s for s, _ in list_checkpoints(ckpt))
    assert every <= killed_at < steps

    # 2) SIGTERM (preemption): checkpoint at the current step, then a clear non-zero exit
    proc, _, err = _start_and_signal(cmd, ckpt, min_step=killed_at + 2 * every, sig=signal.SIGTERM)
    assert proc.returncode not in (0, None), err
    assert "interrupted by SIGTERM" in err, err[-2000:]
    assert not out.exists()
    termed_at = max(s for s, _ in list_checkpoints(ckpt))
    assert killed_at < termed_at < steps

    # 3) rerun to completion
    subprocess.run(_worker_cmd(ckpt, out, **common), env=_ENV, check=True, timeout=120, capture_output=True)
    info = json.loads(Path(str(out) + ".json").read_text())
    assert info["resumed_from"] == termed_at and info["steps_done"] == steps - termed_at
    ref_info = json.loads(Path(str(ref_out) + ".json").read_text())
    assert info["losses"] == ref_info["losses"]

    got, ref = load_model_state(out), load_model_state(ref_out)
    assert_same_state(got["model"], ref["model"])
    assert_same_state(got["ema"]["shadow"], ref["ema"]["shadow"])
    assert not list(ckpt.glob(".tmp-*"))
