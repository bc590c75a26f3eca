"""Training fast path (issue 7): TrainConfig options, CPU equivalence, CUDA bf16 + channels-last.

CPU: ``"auto"`` resolves to the plain fp32 eager path, bit-identical to explicit plain settings;
explicit channels-last / foreach Adam train and match the plain run within float tolerance.
CUDA-only tests are skipped without a GPU; ``torch.compile`` is tested under ``slow``.
"""

from __future__ import annotations

import pytest
import torch

from scoresde.losses import sde_dsm_loss
from scoresde.models import build_model, get_score_fn
from scoresde.sde import VESDE
from scoresde.checkpoint import list_checkpoints, load_checkpoint
from scoresde.fastpath import resolve_fast_path
from scoresde.training import TrainConfig, train

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA device")

UNET = {"name": "unet", "ch": 8, "ch_mult": [1, 2], "num_res_blocks": 1, "attn_resolutions": [4],
        "embedding": "fourier"}



def _images(n=32, c=1, size=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, c, size, size, generator=g)


def _run(tmp_path, name, steps=6, model_cfg=UNET, data=None, **cfg):
    data = _images() if data is None else data
    model = build_model(model_cfg, tuple(data.shape[1:]), seed=0)
    sde = VESDE(0.01, 5.0, N=100)

    def loss_fn(m, x, g):
        return sde_dsm_loss(sde, get_score_fn(m, sde), x, generator=g)

    kw = dict(steps=steps, batch_size=8, lr=1e-3, ema_decay=0.9, warmup=2, ckpt_every=3, log_every=2, seed=0,
              device="cpu", handle_signals=False)
    kw.update(cfg)
    return train(model, loss_fn, data, TrainConfig(**kw), tmp_path / name, fingerprint="fp", progress=False)


def _max_diff(a: dict, b: dict) -> float:
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


# --------------------------------------------------------------------------------------------- config


@pytest.mark.parametrize("field,value", [
    ("amp_dtype", "fp8"), ("amp_dtype", None), ("channels_last", "yes"), ("channels_last", 1),
    ("optimizer_impl", "adamw"), ("optimizer_impl", True), ("compile", "auto"), ("compile", 1), ("amp", "auto"),
])
def test_fast_path_options_validate_naming_field(field, value):
    with pytest.raises(ValueError, match=f"TrainConfig.{field}"):
        TrainConfig(steps=1, batch_size=2, lr=1e-3, **{field: value})


def test_fast_path_options_accept_valid_values_and_roundtrip():
    cfg = TrainConfig(steps=1, batch_size=2, lr=1e-3, amp_dtype="bfloat16", channels_last=True,
                      optimizer_impl="foreach", compile=False)
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg
    d = TrainConfig(steps=1, batch_size=2, lr=1e-3)
    assert (d.amp_dtype, d.channels_last, d.optimizer_impl, d.compile) == ("auto", "auto", "auto", False)


def test_auto_resolves_to_plain_path_on_cpu():
    fp = resolve_fast_path(TrainConfig(steps=1, batch_size=2, lr=1e-3), "cpu", data_ndim=4)
    assert not fp.amp and not fp.grad_scaler and not fp.channels_last and not fp.compile
    assert fp.optimizer_impl == "default" and fp.optimizer_kwargs() == {} and not fp.multi_tensor_ema
    # explicit choices are honoured on CPU; channels-last only for 4-D image batches
    fp = resolve_fast_path(TrainConfig(steps=1, batch_size=2, lr=1e-3, channels_last=True,
                                       optimizer_impl="foreach"), "cpu", data_ndim=2)
    assert not fp.channels_last and fp.optimizer_kwargs() == {"foreach": True} and fp.multi_tensor_ema


def test_auto_resolution_on_cuda_device_object():
    """Resolution is a pure function of the config and device type (no CUDA needed to check the rules)."""
    # default on CUDA: fp32 with the launch-saving parts (fused Adam, multi-tensor EMA), no autocast/NHWC
    fp = resolve_fast_path(TrainConfig(steps=1, batch_size=2, lr=1e-3), torch.device("cuda", 0), data_ndim=4)
    assert not fp.amp and not fp.grad_scaler and not fp.channels_last
    assert fp.optimizer_impl == "fused" and fp.multi_tensor_ema
    # opt-in mixed precision brings channels-last (image batches only) and cuDNN autotuning with it
    cfg = TrainConfig(steps=1, batch_size=2, lr=1e-3, amp=True, amp_dtype="float16")
    fp = resolve_fast_path(cfg, torch.device("cuda", 0), data_ndim=4)
    assert fp.amp and fp.amp_dtype == "float16" and fp.grad_scaler
    assert fp.channels_last and fp.optimizer_impl == "fused" and fp.multi_tensor_ema and fp.cudnn_benchmark
    fp = resolve_fast_path(cfg, torch.device("cuda", 0), 2)
    assert fp.amp and not fp.channels_last


# ----------------------------------------------------------------------------------------- CPU runs


def test_cpu_defaults_are_bit_identical_to_explicit_plain_settings(tmp_path):
    auto = _run(tmp_path, "auto")
    plain = _run(tmp_path, "plain", amp=False, amp_dtype="float16", channels_last=False,
                 optimizer_impl="auto", compile=False)
    for a, b in ((auto.model.state_dict(), plain.model.state_dict()),
                 (auto.ema.state_dict()["shadow"], plain.ema.state_dict()["shadow"])):
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert auto.losses == plain.losses
    assert auto.fast_path["optimizer_impl"] == "default" and not auto.fast_path["channels_last"]


def test_channels_last_on_cpu_trains_and_matches_plain(tmp_path):
    plain = _run(tmp_path, "plain", channels_last=False)
    cl = _run(tmp_path, "cl", channels_last=True)
    assert cl.fast_path["channels_last"]
    assert _max_diff(cl.model.state_dict(), plain.model.state_dict()) < 1e-4
    assert _max_diff(cl.ema.state_dict()["shadow"], plain.ema.state_dict()["shadow"]) < 1e-4
    for (s1, l1), (s2, l2) in zip(cl.losses, plain.losses):
        assert s1 == s2 and l1 == pytest.approx(l2, rel=1e-4, abs=1e-5)
    # the written model is an ordinary state_dict: loads into a contiguous model
    fresh = build_model(UNET, (1, 8, 8))
    fresh.load_state_dict(cl.model.state_dict())


def test_foreach_adam_and_multi_tensor_ema_match_for_loop(tmp_path):
    loop = _run(tmp_path, "loop", optimizer_impl="for_loop")
    fe = _run(tmp_path, "foreach", optimizer_impl="foreach")
    assert fe.fast_path["multi_tensor_ema"] and not loop.fast_path["multi_tensor_ema"]
    assert _max_diff(fe.model.state_dict(), loop.model.state_dict()) < 1e-5
    assert _max_diff(fe.ema.state_dict()["shadow"], loop.ema.state_dict()["shadow"]) < 1e-5
    assert fe.ema.num_updates == loop.ema.num_updates == 6


def test_resume_with_another_optimizer_impl(tmp_path):
    """A checkpoint written with foreach Adam resumes under for_loop (the flags follow the current config)."""
    ref = _run(tmp_path, "ref", steps=6, optimizer_impl="for_loop")
    _run(tmp_path, "mixed", steps=3, optimizer_impl="foreach")
    res = _run(tmp_path, "mixed", steps=6, optimizer_impl="for_loop")
    assert res.resumed_from == 3 and res.steps_done == 3
    assert _max_diff(res.model.state_dict(), ref.model.state_dict()) < 1e-5


@pytest.mark.slow
def test_compile_trains_and_checkpoints_plain_state_dict(tmp_path):
    if not hasattr(torch, "compile"):
        pytest.skip("torch.compile unavailable")
    try:
        res = _run(tmp_path, "compiled", steps=3, compile=True)
    except Exception as e:  # no C++ compiler / inductor unsupported on this platform
        pytest.skip(f"torch.compile unsupported here: {type(e).__name__}: {e}")
    plain = _run(tmp_path, "plain", steps=3)
    assert not any("_orig_mod" in k for k in res.model.state_dict())
    assert _max_diff(res.model.state_dict(), plain.model.state_dict()) < 1e-3
    ckpt = load_checkpoint(list_checkpoints(tmp_path / "compiled")[0][1])
    assert not any("_orig_mod" in k for k in ckpt["model"])
    again = _run(tmp_path, "compiled", steps=6, compile=True)
    assert again.resumed_from == 3


# ---------------------------------------------------------------------------------------------- CUDA


@needs_cuda
def test_cuda_bf16_channels_last_fused_trains_with_finite_loss(tmp_path):
    data = _images(64, 3, 16)
    cfg = {**UNET, "ch_mult": [1, 2], "attn_resolutions": [8]}
    res = _run(tmp_path, "cuda", steps=20, model_cfg=cfg, data=data, device="cuda", amp=True,
               amp_dtype="auto", channels_last="auto", optimizer_impl="auto", log_every=5, ckpt_every=10)
    fp = res.fast_path
    assert fp["amp"] and fp["channels_last"] and fp["optimizer_impl"] == "fused"
    if torch.cuda.is_bf16_supported():
        assert fp["amp_dtype"] == "bfloat16" and not fp["grad_scaler"]
    assert all(torch.isfinite(torch.tensor(v)) for _, v in res.losses)
    assert all(torch.isfinite(v).all() for v in res.model.state_dict().values())


@needs_cuda
def test_cuda_fp16_grad_scaler_trains(tmp_path):
    res = _run(tmp_path, "fp16", steps=10, device="cuda", amp=True, amp_dtype="float16", log_every=5, ckpt_every=5)
    assert res.fast_path["grad_scaler"]
    assert all(torch.isfinite(torch.tensor(v)) for _, v in res.losses)


@needs_cuda
def test_cuda_fast_path_checkpoint_resume(tmp_path):
    """Interrupted-and-resumed equals uninterrupted (bit-identical is not promised on CUDA: tolerance)."""
    kw = dict(device="cuda", amp=True, channels_last=True, optimizer_impl="fused", log_every=3, ckpt_every=3)
    ref = _run(tmp_path, "ref", steps=9, **kw)
    first = _run(tmp_path, "run", steps=6, **kw)
    assert [s for s, _ in list_checkpoints(tmp_path / "run")][0] == 6 and first.final_step == 6
    res = _run(tmp_path, "run", steps=9, **kw)
    assert res.resumed_from == 6 and res.steps_done == 3
    assert _max_diff(res.model.state_dict(), ref.model.state_dict()) < 1e-3
    assert _max_diff(res.ema.state_dict()["shadow"], ref.ema.state_dict()["shadow"]) < 1e-3
    # a GPU fast-path checkpoint also resumes on CPU with the plain path
    cpu = _run(tmp_path, "run", steps=12, device="cpu", log_every=3, ckpt_every=3)
    assert cpu.resumed_from == 9 and cpu.final_step == 12
