"""Training engine: crash-safe, resumable, EMA, AMP and DistributedDataParallel.

The engine is generic: it takes a model and a loss closure ``loss_fn(model, x_batch, generator) -> scalar``
(e.g. a partial of :func:`scoresde.losses.dsm_loss`, the NCSN objective of Song & Ermon 2019 eq. (5), or
:func:`scoresde.losses.sde_dsm_loss`, the continuous objective of Song et al. 2021 eq. (7)). Optimisation
follows score_sde (Song et al. 2021, ``losses.optimization_manager``): Adam, linear learning-rate warm-up,
gradient-norm clipping, and an EMA of the weights (NCSNv2 technique 5, Song & Ermon 2020).

:func:`train` reads top to bottom like NVlabs/edm's ``training_loop``: set up, resume, then per step (batch,
forward/backward, optimizer), EMA, sync, log, checkpoint. The details live beside it:
:mod:`scoresde.checkpoint` (issue 6: atomic checkpoints with every RNG state and the params fingerprint,
torn/stale/unsafe files skipped; on CPU a resumed run is bit-identical to an uninterrupted one),
:mod:`scoresde.distributed` (issue 5: devices, torchrun/DDP, the shared data order, per-rank noise streams,
signals) and :mod:`scoresde.fastpath` (issue 7: AMP, channels-last, fused Adam, multi-tensor EMA, compile;
every ``"auto"`` is the plain fp32 eager path on CPU). Losses stay on the device between syncs (every
``min(log_every, ckpt_every, 25)`` steps). A NaN/Inf loss raises :class:`NonFiniteLossError` before any
checkpoint of that step is written; SIGTERM/SIGINT write a checkpoint at the next step boundary and raise
:class:`TrainingInterrupted`; rerunning resumes from there.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import re
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch
from torch import nn

from scoresde.checkpoint import (atomic_torch_save, capture_rng, checkpoint_path, make_checkpoint, prune_checkpoints,
                                 read_loss_curve, restore_rank_rng, select_resume_checkpoint)
from scoresde.distributed import (DEVICE_PATTERN, STREAM_DATA, STREAM_GLOBAL, STREAM_LOSS, BatchSampler, Dist,
                                  StopFlag, derive_seed, setup_dist, unwrap_model, wrap_ddp)
from scoresde.ema import EMA
from scoresde.fastpath import AMP_DTYPES, OPTIMIZER_IMPLS, MultiTensorEMA, resolve_fast_path, with_optimizer_impl

logger = logging.getLogger(__name__)

__all__ = ["TrainConfig", "TrainResult", "train", "NonFiniteLossError", "TrainingInterrupted"]

LossFn = Callable[[nn.Module, torch.Tensor, torch.Generator], torch.Tensor]
LogFn = Callable[[int, dict], None]


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or infinite."""

    def __init__(self, step: int, value: float):
        self.step = int(step)
        self.value = float(value)
        super().__init__(
            f"non-finite training loss {value!r} at step {step}; training stopped and no "
            f"checkpoint was written for this step (the last good checkpoint is kept). "
            f"Lower the learning rate, enable grad_clip, or check the data/noise schedule."
        )


class TrainingInterrupted(RuntimeError):
    """Training was stopped by a signal after writing a checkpoint."""

    def __init__(self, step: int, signum: int, path: Path | None):
        self.step = int(step)
        self.signum = int(signum)
        self.path = path
        try:
            name = signal.Signals(signum).name
        except ValueError:
            name = str(signum)
        super().__init__(
            f"training interrupted by {name} at step {step}; checkpoint {path} written — "
            f"rerun to resume"
        )


@dataclass
class TrainConfig:
    """Training hyper-parameters; the one place they are validated (``ValueError`` naming the field).

    ``steps`` (>= 1) is the total number of optimiser steps (a resumed run does the remainder).
    ``batch_size`` is the *global* batch (split across ranks under DDP).
    ``lr`` is Adam's learning rate, reached linearly over ``warmup`` steps (score_sde).
    ``grad_clip`` is the max global gradient norm (``None`` disables clipping).
    ``device``: ``"auto"`` (CUDA if available, else CPU), ``"cpu"``, ``"cuda"``, ``"cuda:1"``...
    (:data:`scoresde.distributed.DEVICE_PATTERN`).
    ``amp``: mixed precision (``torch.autocast`` in ``amp_dtype``, plus a GradScaler for float16);
    only used on CUDA, ignored on CPU. ``amp_dtype``: ``"auto"`` (bfloat16 where the CUDA device
    supports it, else float16), ``"float16"`` or ``"bfloat16"``. Off by default (see :mod:`scoresde.fastpath`).
    ``channels_last``: ``True``/``False``/``"auto"`` (on for CUDA with 4-D image data under amp, else off).
    ``optimizer_impl``: Adam implementation, ``"auto"`` (fused on CUDA, torch's default on CPU),
    ``"fused"``, ``"foreach"`` or ``"for_loop"``.
    ``compile``: ``torch.compile`` the model for the training forward (default off).
    ``handle_signals``: on SIGTERM/SIGINT write a checkpoint at the next step and stop.
    ``ddp_find_unused_parameters``: passed to DistributedDataParallel (models with unused branches).
    ``ema_warmup``: score_sde's EMA warm-up, decay_n = min(``ema_decay``, (1 + n) / (10 + n)) at the n-th
    update (:class:`scoresde.ema.EMA`); a resumed run continues the count saved in its checkpoint.
    """

    steps: int
    batch_size: int
    lr: float
    ema_decay: float = 0.999
    grad_clip: float | None = 1.0
    warmup: int = 0
    ckpt_every: int = 100
    log_every: int = 10
    seed: int = 0
    device: str = "auto"
    amp: bool = False
    amp_dtype: str = "auto"
    channels_last: bool | str = "auto"
    optimizer_impl: str = "auto"
    compile: bool = False
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0
    handle_signals: bool = True
    ddp_find_unused_parameters: bool = False
    ema_warmup: bool = True

    def __post_init__(self) -> None:
        def bad(name: str, expected: str) -> ValueError:
            return ValueError(f"TrainConfig.{name}: expected {expected}, got {getattr(self, name)!r}")

        def is_int(v: Any) -> bool:
            return isinstance(v, (int, np.integer)) and not isinstance(v, bool)

        def is_num(v: Any) -> bool:
            return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)

        def one_of(values: tuple) -> str:
            return "one of " + ", ".join(repr(v) for v in values)

        for name, lo in (("steps", 1), ("batch_size", 1), ("warmup", 0), ("ckpt_every", 1), ("log_every", 1),
                         ("seed", 0)):
            v = getattr(self, name)
            if not is_int(v) or v < lo:
                raise bad(name, f"an integer >= {lo}")
            setattr(self, name, int(v))
        if not is_num(self.lr) or not (self.lr > 0 and math.isfinite(self.lr)):
            raise bad("lr", "a positive finite number")
        if self.grad_clip is not None and (not is_num(self.grad_clip) or not self.grad_clip > 0):
            raise bad("grad_clip", "a positive number or None")
        for name in ("ema_decay", "beta1", "beta2"):
            v = getattr(self, name)
            if not is_num(v) or not (0.0 <= v < 1.0):
                raise bad(name, "a number in [0, 1)")
        if not is_num(self.eps) or not self.eps > 0:
            raise bad("eps", "a positive number")
        if not is_num(self.weight_decay) or self.weight_decay < 0:
            raise bad("weight_decay", "a non-negative number")
        if not isinstance(self.device, str) or not re.fullmatch(DEVICE_PATTERN, self.device):
            raise bad("device", "'auto', 'cpu', 'cuda' or 'cuda:N'")
        if not isinstance(self.amp_dtype, str) or self.amp_dtype not in AMP_DTYPES:
            raise bad("amp_dtype", one_of(AMP_DTYPES))
        if not (isinstance(self.channels_last, bool) or self.channels_last == "auto"):
            raise bad("channels_last", "true, false or 'auto'")
        if not isinstance(self.optimizer_impl, str) or self.optimizer_impl not in OPTIMIZER_IMPLS:
            raise bad("optimizer_impl", one_of(OPTIMIZER_IMPLS))
        for name in ("amp", "compile", "handle_signals", "ddp_find_unused_parameters", "ema_warmup"):
            if not isinstance(getattr(self, name), bool):
                raise bad(name, "a boolean")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "TrainConfig":
        """Build from a plain dict; unknown keys raise ``ValueError`` naming them."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"TrainConfig: unknown keys {unknown}; valid keys: {sorted(names)}")
        return cls(**dict(d))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class TrainResult:
    model: nn.Module
    ema: Any
    losses: list[tuple[int, float]]
    resumed_from: int | None
    steps_done: int
    seconds: float
    final_step: int = 0
    checkpoint: Path | None = None
    fast_path: dict | None = None  # the resolved fast-path settings (FastPath.to_dict())


def train(
    model: nn.Module,
    loss_fn: LossFn,
    data: torch.Tensor,
    config: TrainConfig,
    ckpt_dir: str | os.PathLike,
    *,
    fingerprint: str = "",
    log_fn: LogFn | None = None,
    progress: bool = True,
) -> TrainResult:
    """Train ``model`` on ``data`` (a tensor ``(N, *dims)``) by minimising ``loss_fn``.

    ``loss_fn(model, x_batch, generator)`` returns a scalar loss; ``generator`` is the dedicated
    loss-noise generator on the training device (pass it to ``torch.randn``/``rand``/``randint``).
    Under DDP ``model`` passed to ``loss_fn`` is the DDP wrapper (attribute look-ups fall through
    to the wrapped module).

    Resumes automatically from the newest valid checkpoint in ``ckpt_dir`` whose fingerprint
    equals ``fingerprint``. ``log_fn(step, metrics)`` is called on rank 0 every ``log_every``
    steps with ``{"loss", "lr", "steps_per_sec"}`` (+ ``"grad_norm"`` when clipping), ``loss``
    being the mean over the window (and over ranks).

    Returns a :class:`TrainResult` whose ``losses`` are ``(step, window mean loss)`` pairs.
    Raises :class:`NonFiniteLossError` on a NaN/Inf loss, :class:`TrainingInterrupted` after a
    SIGTERM/SIGINT (a checkpoint was written first).
    """
    if not isinstance(config, TrainConfig):
        raise TypeError(f"config must be a TrainConfig, got {type(config).__name__}")
    if not isinstance(data, torch.Tensor) or data.ndim < 1 or data.shape[0] < 1:
        raise ValueError("data must be a non-empty tensor of shape (N, ...)")
    ckpt_dir = Path(ckpt_dir)
    t_start = time.perf_counter()
    dist, device = setup_dist(config.device)
    W, rank, is_main = dist.world_size, dist.rank, dist.rank == 0
    with contextlib.ExitStack() as cleanup:  # however training ends (last in, first out):
        cleanup.callback(dist.close)  # leave a process group created by setup_dist
        cleanup.callback(setattr, torch.backends.cudnn, "benchmark", torch.backends.cudnn.benchmark)
        if config.batch_size % W != 0:
            raise ValueError(f"TrainConfig.batch_size={config.batch_size} must be divisible by the world size {W}")

        # ---- set up: fast path, data, model, optimizer, random streams ----------------------------------
        fast = resolve_fast_path(config, device, data.ndim)
        if fast.cudnn_benchmark:
            torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick the fastest kernels
        if is_main and device.type == "cuda":
            logger.info("training fast path on %s: %s", device, fast.to_dict())
        n = data.shape[0]
        if device.type == "cuda" and data.device.type == "cpu" and data.numel() * data.element_size() <= (2 << 30):
            data = data.to(device)  # small enough: keep it on the device, else gather batches from pinned memory
        pin = device.type == "cuda" and data.device.type == "cpu"
        model = unwrap_model(model).to(device)
        if fast.channels_last:
            model = model.to(memory_format=torch.channels_last)
            if data.device.type != "cpu":
                data = data.contiguous(memory_format=torch.channels_last)
        model.train()
        optimizer = torch.optim.Adam(
            model.parameters(), lr=config.lr, betas=(config.beta1, config.beta2), eps=config.eps,
            weight_decay=config.weight_decay, **fast.optimizer_kwargs(),
        )
        use_scaler = fast.grad_scaler
        scaler = torch.amp.GradScaler(device.type if device.type == "cuda" else "cpu", enabled=use_scaler)
        sampler = BatchSampler(n, derive_seed(config.seed, STREAM_DATA, 0))  # same on all ranks
        loss_gen = torch.Generator(device=device)
        loss_gen.manual_seed(derive_seed(config.seed, STREAM_LOSS, rank))
        # DDP broadcasts rank 0's parameters and buffers here, so every rank starts (and builds its EMA)
        # from the same weights; a resumed checkpoint is then loaded identically on every rank.
        train_model: nn.Module = model
        if fast.compile:
            # Only the training forward is compiled; `model` (EMA, checkpoints, result) stays the plain module.
            train_model = torch.compile(model)
        if dist.enabled:
            train_model = wrap_ddp(train_model, device, config.ddp_find_unused_parameters)

        # ---- resume ---------------------------------------------------------------------------------------
        found = select_resume_checkpoint(ckpt_dir, fingerprint, config.steps, dist)
        if found is not None:
            path, ckpt = found
            model.load_state_dict(ckpt["model"])
            ema = EMA(model, config.ema_decay, warmup=config.ema_warmup)
            ema.load_state_dict(ckpt["ema"])
            optimizer.load_state_dict(with_optimizer_impl(ckpt["optimizer"], optimizer))
            if use_scaler and ckpt.get("scaler"):
                scaler.load_state_dict(ckpt["scaler"])
            if not restore_rank_rng(ckpt, dist, sampler, loss_gen, path):  # a rank the checkpoint did not have
                torch.manual_seed(derive_seed(config.seed, STREAM_GLOBAL, rank))
            start_step = resumed_from = int(ckpt["step"])
            curve = _LossCurve(*read_loss_curve(ckpt), pending_first_step=start_step + 1)
            if is_main:
                logger.info("resuming from %s (step %d of %d)", path, start_step, config.steps)
            del ckpt, found
        else:
            ema = EMA(model, config.ema_decay, warmup=config.ema_warmup)
            # Fresh start: a reproducible global stream (dropout etc.), distinct per rank.
            torch.manual_seed(derive_seed(config.seed, STREAM_GLOBAL, rank))
            start_step, resumed_from, curve = 0, None, _LossCurve(pending_first_step=1)

        params = [p for p in model.parameters() if p.requires_grad]
        ema_updater = MultiTensorEMA(ema, model) if fast.multi_tensor_ema else ema
        # Loss values stay on the device between syncs (no per-step host sync on CUDA).
        sync_every = 1 if device.type == "cpu" else max(1, min(config.log_every, config.ckpt_every, 25))
        clip = config.grad_clip is not None
        last_ckpt: Path | None = None
        bar = _progress_bar(total=config.steps, initial=start_step, disable=not (progress and is_main), desc="train",
                            dynamic_ncols=True, file=sys.stderr, mininterval=0.5)
        cleanup.callback(bar.close)
        stop = cleanup.enter_context(StopFlag(config.handle_signals))  # SIGTERM/SIGINT -> stop.signum
        t_last, step_last = time.perf_counter(), start_step
        step = start_step
        while step < config.steps:
            # ---- step: learning rate, batch, forward/backward, optimizer ----------------------------------
            lr = _lr_at(config, step)
            for g in optimizer.param_groups:
                g["lr"] = lr
            x = _next_batch(sampler, data, config.batch_size, dist, device, pin, fast.channels_last)
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast(device_type=device.type, dtype=fast.amp_torch_dtype, enabled=fast.amp):
                loss = loss_fn(train_model, x, loss_gen)
            if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
                raise TypeError("loss_fn must return a scalar tensor")
            loss = loss.reshape(())
            scaler.scale(loss.float()).backward()
            if clip:
                scaler.unscale_(optimizer)
                gnorm = torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
            else:
                gnorm = torch.zeros((), device=device)
            scaler.step(optimizer)
            scaler.update()

            # ---- EMA ------------------------------------------------------------------------------------
            ema_updater.update(model)
            step += 1
            curve.pending.append(torch.stack([loss.detach().float(), gnorm.detach().float().reshape(())]))

            # ---- sync: fetch losses (mean over ranks), NaN guard, agree on a stop signal -----------------
            at_log = step % config.log_every == 0
            at_ckpt = step % config.ckpt_every == 0 or step == config.steps
            at_sync = at_log or at_ckpt or step % sync_every == 0
            stop_signal = stop.signum
            if at_sync or (stop_signal and not dist.enabled):
                stop_signal = curve.fetch(stop_signal, dist, device)  # raises NonFiniteLossError before any write

            # ---- log ------------------------------------------------------------------------------------
            if at_log or (step == config.steps and curve.window):
                now = time.perf_counter()
                metrics = {
                    "loss": curve.close_window(step),
                    "lr": lr,
                    "steps_per_sec": (step - step_last) / max(now - t_last, 1e-9),
                }
                if clip:
                    metrics["grad_norm"] = float(np.mean(curve.gnorm_window))
                if use_scaler:
                    metrics["amp_scale"] = float(scaler.get_scale())
                t_last, step_last = now, step
                curve.clear_window()
                if is_main:
                    bar.set_postfix(loss=f"{metrics['loss']:.4g}", refresh=False)
                    if log_fn is not None:
                        log_fn(step, metrics)

            # ---- checkpoint (collective: every rank's RNG state; rank 0 writes) -------------------------
            if at_ckpt or (stop_signal and at_sync) or (stop_signal and not dist.enabled):
                rng_all = dist.gather_objects(capture_rng(sampler, loss_gen))
                path = None
                if is_main:
                    state = make_checkpoint(
                        step=step, model=model, ema=ema, optimizer=optimizer,
                        scaler=scaler.state_dict() if use_scaler else {}, rng_per_rank=rng_all,
                        fingerprint=fingerprint, config=config.to_dict(), world_size=W,
                        losses=curve.losses, window=curve.window, gnorm_window=curve.gnorm_window)
                    path = last_ckpt = atomic_torch_save(state, checkpoint_path(ckpt_dir, step))
                    prune_checkpoints(ckpt_dir, step)
                dist.barrier()
                if stop_signal:
                    raise TrainingInterrupted(step, stop_signal, path)
            bar.update(1)

        if last_ckpt is None and is_main and step > 0 and resumed_from == step:
            last_ckpt = checkpoint_path(ckpt_dir, step)  # a finished run, rerun: its final checkpoint
    return TrainResult(model=model, ema=ema, losses=list(curve.losses), resumed_from=resumed_from,
                       steps_done=step - start_step, seconds=time.perf_counter() - t_start, final_step=step,
                       checkpoint=last_ckpt, fast_path=fast.to_dict())


@dataclass
class _LossCurve:
    """The loss curve: ``(step, window mean)`` points logged so far, the open logging window (losses and
    gradient norms fetched from the device), and the ``pending`` per-step device values not fetched yet."""

    losses: list = field(default_factory=list)
    window: list = field(default_factory=list)
    gnorm_window: list = field(default_factory=list)
    pending: list = field(default_factory=list)
    pending_first_step: int = 1  # the step of pending[0]

    def fetch(self, stop_signal: int, dist: Dist, device: torch.device) -> int:
        """Sync pending losses (averaged over ranks), check finiteness; returns the agreed stop signal."""
        if not self.pending and not dist.enabled:
            return stop_signal
        if self.pending:
            vals = torch.stack(self.pending).float()  # (k, 2): loss, grad norm
        else:
            vals = torch.zeros(0, 2, device=device)
        if dist.enabled:
            vals, any_stop = dist.mean_and_any(vals, stop_signal, device)
            stop_signal = int(any_stop) and (stop_signal or signal.SIGTERM)
        host = vals.cpu().double()
        for i, (lv, gv) in enumerate(host.tolist()):
            if not math.isfinite(lv):
                raise NonFiniteLossError(self.pending_first_step + i, lv)
            self.window.append(lv)
            self.gnorm_window.append(gv)
        self.pending_first_step += len(self.pending)
        self.pending = []
        return stop_signal

    def close_window(self, step: int) -> float:
        """Append ``(step, mean loss of the window)`` to the curve and return the mean."""
        mean_loss = float(np.mean(self.window))
        self.losses.append((step, mean_loss))
        return mean_loss

    def clear_window(self) -> None:
        self.window.clear()
        self.gnorm_window.clear()


def _lr_at(config: TrainConfig, step: int) -> float:
    """Learning rate for 0-based optimiser step ``step`` (linear warm-up as in score_sde)."""
    if config.warmup > 0:
        return config.lr * min(1.0, (step + 1) / config.warmup)
    return config.lr


def _next_batch(sampler: BatchSampler, data: torch.Tensor, batch_size: int, dist: Dist, device: torch.device,
                pin: bool, channels_last: bool) -> torch.Tensor:
    """The next global batch of indices, this rank's slice of it, gathered onto ``device``."""
    idx = dist.shard(sampler.next(batch_size))
    if data.device != torch.device("cpu"):
        x = data[idx.to(data.device)]
    else:
        x = data[idx]
        if pin:
            x = x.pin_memory()
        x = x.to(device, non_blocking=pin)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def _progress_bar(**kw):
    """tqdm when installed (a bare GPU image may lack it), else a silent stand-in."""
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover - depends on the environment
        return _NoBar()
    return tqdm(**kw)


class _NoBar:
    def __getattr__(self, name):  # update, set_postfix, close: do nothing
        return lambda *a, **k: None
