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


def test_one_batch_is_the_draw_of_the_shared_generator():
    """Batch 0 draws from seed + 0: a one-batch run (every default experiment) gives the samples the shared
    generator seeded ``seed`` gave before per-batch seeds, so the committed numbers do not move."""
    model, cpu = _model(), torch.device("cpu")
    cfg = {**CFG, "batch_size": 4}
    shared, _, _ = generate("ncsn", model, cfg, SCHEDULE, 4, cpu, torch.Generator().manual_seed(5), False)
    per_batch, _, _ = generate("ncsn", model, cfg, SCHEDULE, 4, cpu, None, False, seed=5)
    assert torch.equal(shared, per_batch)


def test_seconds_count_kept_batches_with_the_time_they_took(tmp_path):
    from scoresde.checkpoint import safe_load

    model, cpu = _model(), torch.device("cpu")
    _, _, seconds = generate("ncsn", model, CFG, SCHEDULE, 4, cpu, None, False, seed=3, resume_dir=tmp_path)
    kept = [safe_load(p)["seconds"] for p in sorted(tmp_path.glob("batch_*.pt"))]
    assert len(kept) == 2 and seconds == pytest.approx(sum(kept))
    _, _, again = generate("ncsn", model, CFG, SCHEDULE, 4, cpu, None, False, seed=3, resume_dir=tmp_path)
    assert again == pytest.approx(seconds), "a resumed run reports the sampling time of all its samples"
