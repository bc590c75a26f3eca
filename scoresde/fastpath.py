"""Training fast path (issue 7; the article names compute cost as score models' main weakness).

Each knob is a :class:`scoresde.training.TrainConfig` field whose ``"auto"`` resolves per device
(:func:`resolve_fast_path`); on CPU every ``"auto"`` resolves to the plain fp32 eager path, bit-identical to
the engine without these options:

* ``amp`` + ``amp_dtype``: ``torch.autocast`` in bfloat16 (``amp_dtype="auto"`` on a GPU that supports
  it; no grad scaler needed) or float16 (with a GradScaler); CUDA only, and off unless asked for
  (``amp=True``): measured on an H200 with our default U-Nets (1.5M and 24M parameters, batch 128-512),
  the step is bound by kernel launches, and autocast's weight casts cost as much as or more than bf16
  saves (bf16 + channels-last 1.10-1.30x vs fused fp32 1.31-1.54x over plain).
* ``channels_last``: model and image batches in ``torch.channels_last`` (NHWC), which the
  tensor-core convolution kernels prefer; ``"auto"`` = on for CUDA with 4-D image data when ``amp`` is on.
* ``optimizer_impl``: Adam's ``fused`` (one kernel for all parameters; ``"auto"`` on CUDA), ``foreach``
  (multi-tensor) or ``for_loop`` implementation; with fused/foreach the EMA update is also multi-tensor
  (:class:`MultiTensorEMA`).
* ``compile``: ``torch.compile`` of the module used for the training forward; EMA, checkpoints and
  the returned model use the uncompiled module (state_dict keys unchanged).
* no host-device synchronisation inside a step: losses and gradient norms stay on the device and are
  fetched every ``min(log_every, ckpt_every, 25)`` steps; small datasets are kept on the device, larger
  ones are gathered from pinned host memory (both in :func:`scoresde.training.train`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from scoresde.distributed import unwrap_model

if TYPE_CHECKING:  # pragma: no cover
    from scoresde.training import TrainConfig

__all__ = [
    "AMP_DTYPES",
    "OPTIMIZER_IMPLS",
    "FastPath",
    "resolve_fast_path",
    "cuda_supports_bf16",
    "MultiTensorEMA",
    "with_optimizer_impl",
]

#: Valid ``TrainConfig.amp_dtype`` values.
AMP_DTYPES = ("auto", "float16", "bfloat16")
#: Valid ``TrainConfig.optimizer_impl`` values.
OPTIMIZER_IMPLS = ("auto", "fused", "foreach", "for_loop")


@dataclass(frozen=True)
class FastPath:
    """The fast-path settings a :class:`TrainConfig` resolves to on one device (see :func:`resolve_fast_path`)."""

    device: str
    amp: bool                     # autocast on
    amp_dtype: str                # "float16" | "bfloat16" (meaningful when amp)
    grad_scaler: bool             # GradScaler on (float16 autocast)
    channels_last: bool
    optimizer_impl: str           # "fused" | "foreach" | "for_loop" | "default" (torch's own choice)
    compile: bool
    multi_tensor_ema: bool        # EMA updated with torch._foreach_* (with fused/foreach Adam)
    cudnn_benchmark: bool

    @property
    def amp_torch_dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.amp_dtype == "bfloat16" else torch.float16

    def optimizer_kwargs(self) -> dict:
        """Keyword arguments selecting Adam's implementation (empty = torch's default, as before issue 7)."""
        return {"fused": {"fused": True}, "foreach": {"foreach": True},
                "for_loop": {"foreach": False, "fused": False}}.get(self.optimizer_impl, {})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def cuda_supports_bf16(device: torch.device) -> bool:
    """Whether the CUDA device computes bfloat16 natively (``False`` without a driver)."""
    try:
        return bool(torch.cuda.is_bf16_supported(including_emulation=False))
    except TypeError:  # older torch without the keyword
        return bool(torch.cuda.is_bf16_supported())
    except Exception:  # pragma: no cover - no driver
        return False


def resolve_fast_path(config: "TrainConfig", device: torch.device | str, data_ndim: int = 4) -> FastPath:
    """Resolve the ``"auto"`` fast-path options of ``config`` for ``device`` and data with ``data_ndim`` dims.

    CUDA: fused Adam + multi-tensor EMA; with ``amp``, bf16 autocast (fp16 + GradScaler where bf16 is
    unsupported) and channels-last for image batches (``data_ndim == 4``) and cuDNN autotuning. CPU: every
    ``"auto"`` is the plain fp32 eager path (autocast is never used on CPU; explicit ``channels_last=True`` /
    ``optimizer_impl`` are honoured).
    """
    device = torch.device(device)
    cuda = device.type == "cuda"
    amp = bool(config.amp) and cuda
    if config.amp_dtype == "auto":
        amp_dtype = "bfloat16" if cuda and cuda_supports_bf16(device) else "float16"
    else:
        amp_dtype = config.amp_dtype
    channels_last = (amp and data_ndim == 4) if config.channels_last == "auto" else bool(config.channels_last)
    channels_last = channels_last and data_ndim == 4
    impl = config.optimizer_impl
    if impl == "auto":
        impl = "fused" if cuda else "default"
    return FastPath(
        device=str(device), amp=amp, amp_dtype=amp_dtype, grad_scaler=amp and amp_dtype == "float16",
        channels_last=channels_last, optimizer_impl=impl, compile=bool(config.compile),
        multi_tensor_ema=impl in ("fused", "foreach"), cudnn_benchmark=cuda and (amp or channels_last),
    )


class MultiTensorEMA:
    """Applies :meth:`scoresde.models.EMA.update` with ``torch._foreach_*`` kernels: the same arithmetic
    (``shadow <- decay*shadow + (1-decay)*theta`` for float parameters, copies for buffers) in a few
    launches instead of two per tensor. The model's state_dict tensors are views of its parameters, so
    the lists are built once. Falls back to ``ema.update`` if the EMA does not expose its shadow."""

    def __init__(self, ema: Any, model: nn.Module):
        self.ema = ema
        self.ok = False
        names = getattr(ema, "_param_names", None)
        shadow = getattr(ema, "shadow", None)
        if not isinstance(names, (set, frozenset)) or not isinstance(shadow, dict) or not hasattr(ema, "_current_decay"):
            return
        self.ps, self.pm, self.bs, self.bm = [], [], [], []
        for k, v in unwrap_model(model).state_dict().items():
            s = shadow.get(k)
            if s is None:
                return
            if k in names and s.dtype == v.dtype and s.device == v.device:
                self.ps.append(s)
                self.pm.append(v)
            elif k in names:
                return
            else:
                self.bs.append(s)
                self.bm.append(v)
        self.ok = True

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        if not self.ok:
            self.ema.update(model)
            return
        self.ema.num_updates += 1
        decay = self.ema._current_decay()
        if self.ps:
            torch._foreach_mul_(self.ps, decay)
            torch._foreach_add_(self.ps, self.pm, alpha=1.0 - decay)
        for s, v in zip(self.bs, self.bm):
            s.copy_(v)


def with_optimizer_impl(state: dict, optimizer: torch.optim.Optimizer) -> dict:
    """The saved optimizer state with its per-group implementation flags (``fused``/``foreach``) replaced
    by the current optimizer's, so a checkpoint written with one implementation (e.g. fused on a GPU)
    resumes with the one configured now (load_state_dict would otherwise restore the saved flags, and
    place Adam's step counters for them)."""
    groups = state.get("param_groups") if isinstance(state, dict) else None
    if not groups:
        return state
    current = optimizer.param_groups[0]
    keys = [k for k in ("fused", "foreach", "capturable") if k in current]
    if all(g.get(k) == current[k] for g in groups for k in keys):
        return state
    return {**state, "param_groups": [{**g, **{k: current[k] for k in keys}} for g in groups]}
