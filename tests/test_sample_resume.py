"""Sampling survives a crash: finished batches are kept and a rerun gives the uninterrupted result."""
from __future__ import annotations

import pytest
import torch

import scoresde.sampling as sampling
from scoresde.models import build_model
from pipeline.generation import generate

SCHEDULE = {"data_shape": [1, 8, 8], "sigmas": [1.0, 0.3, 0.1, 0.03]}
CFG = {"sampler": "annealed_langevin", "batch_size": 2, "n_steps_each": 2, "step_lr": 4e-5, "denoise": True}


def _model():
    cfg = {"name": "unet", "ch": 8, "ch_mult": [1, 2], "num_res_blocks": 1, "attn_resolutions": [], "embedding": "fourier"}
    return build_model(cfg, (1, 8, 8), seed=0).eval()


def test_batches_draw_from_their_own_seed():
    model = _model()
    x, nfe, _ = generate("ncsn", model, CFG, SCHEDULE, 6, torch.device("cpu"), None, False, seed=3)
    assert x.shape == (6, 1, 8, 8) and nfe == 4 * 2 + 1
    # batch i depends on seed + i only: the second batch of seed 3 is the first batch of seed 4
    y, _, _ = generate("ncsn", model, CFG, SCHEDULE, 2, torch.device("cpu"), None, False, seed=4)
    assert torch.equal(x[2:4], y)


def test_crash_mid_sampling_then_rerun_equals_uninterrupted(tmp_path, monkeypatch):
    model = _model()
    ref, _, _ = generate("ncsn", model, CFG, SCHEDULE, 6, torch.device("cpu"), None, False, seed=3)

    real, calls = sampling.annealed_langevin, []

    def crashing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("simulated crash in the third batch")
        return real(*args, **kwargs)

    monkeypatch.setattr(sampling, "annealed_langevin", crashing)
    with pytest.raises(RuntimeError, match="third batch"):
        generate("ncsn", model, CFG, SCHEDULE, 6, torch.device("cpu"), None, False, seed=3, resume_dir=tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["batch_000000.pt", "batch_000001.pt"]

    calls.clear()
    monkeypatch.setattr(sampling, "annealed_langevin", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    x, _, _ = generate("ncsn", model, CFG, SCHEDULE, 6, torch.device("cpu"), None, False, seed=3, resume_dir=tmp_path)
    assert len(calls) == 1, "only the unfinished batch is drawn again"
    assert torch.equal(x, ref)
