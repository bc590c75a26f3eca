"""Exponential moving average of a score network's weights (:class:`EMA`)."""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Mapping

import torch
from torch import nn

from scoresde.models import _unwrap

__all__ = ["EMA"]


class EMA:
    """Exponential moving average of a model's weights (Polyak averaging as used by NCSNv2 technique 5,
    Song & Ermon, 2020, and by DDPM / score SDE with decay 0.999–0.9999).

    ``shadow ← decay·shadow + (1 − decay)·θ`` for every floating-point parameter at :meth:`update`; buffers
    (and non-float entries) are copied. The shadow holds *every* entry of ``model.state_dict()``, so
    ``model.load_state_dict(ema.state_dict()["shadow"])`` loads the averaged weights. With
    ``use_num_updates=True`` the decay warms up as ``min(decay, (1 + n) / (10 + n))`` (score_sde's EMA).
    Deterministic: no randomness, updates in place with fixed arithmetic.
    """

    def __init__(self, model: nn.Module, decay: float = 0.999, use_num_updates: bool = False):
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay must be in [0, 1], got {decay}")
        self.decay = float(decay)
        self.use_num_updates = bool(use_num_updates)
        self.num_updates = 0
        model = _unwrap(model)
        self._param_names = {name for name, p in model.named_parameters() if p.dtype.is_floating_point}
        self.shadow: dict[str, torch.Tensor] = {
            k: v.detach().clone() for k, v in model.state_dict().items()
        }
        self._backup: dict[str, torch.Tensor] | None = None

    def _current_decay(self) -> float:
        if self.use_num_updates:
            return min(self.decay, (1.0 + self.num_updates) / (10.0 + self.num_updates))
        return self.decay

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """One EMA step towards ``model``'s current weights."""
        self.num_updates += 1
        decay = self._current_decay()
        state = _unwrap(model).state_dict()
        for k, v in state.items():
            s = self.shadow[k]
            if k in self._param_names:
                s.mul_(decay).add_(v.detach().to(s.device, s.dtype), alpha=1.0 - decay)
            else:
                s.copy_(v.detach())

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Overwrite ``model``'s weights (and buffers) with the EMA shadow."""
        _unwrap(model).load_state_dict(self.shadow)

    @torch.no_grad()
    def store(self, model: nn.Module) -> None:
        """Keep a copy of ``model``'s current weights for :meth:`restore`."""
        self._backup = {k: v.detach().clone() for k, v in _unwrap(model).state_dict().items()}

    @torch.no_grad()
    def restore(self, model: nn.Module) -> None:
        """Put back the weights saved by :meth:`store`."""
        if self._backup is None:
            raise RuntimeError("EMA.restore called without a preceding store")
        _unwrap(model).load_state_dict(self._backup)
        self._backup = None

    @contextlib.contextmanager
    def average_parameters(self, model: nn.Module) -> Iterator[nn.Module]:
        """Context manager: evaluate ``model`` with the EMA weights, restoring its own weights on exit."""
        self.store(model)
        self.copy_to(model)
        try:
            yield model
        finally:
            self.restore(model)

    def to(self, device: torch.device | str) -> "EMA":
        self.shadow = {k: v.to(device) for k, v in self.shadow.items()}
        return self

    def state_dict(self) -> dict[str, Any]:
        """Tensors, floats and ints only: loadable with ``torch.load(..., weights_only=True)``."""
        return {
            "decay": self.decay,
            "num_updates": self.num_updates,
            "use_num_updates": self.use_num_updates,
            "shadow": {k: v.clone() for k, v in self.shadow.items()},
        }

    @torch.no_grad()
    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        shadow = state["shadow"]
        missing = set(self.shadow) - set(shadow)
        unexpected = set(shadow) - set(self.shadow)
        if missing or unexpected:
            raise KeyError(f"EMA state does not match the model: missing {sorted(missing)}, "
                           f"unexpected {sorted(unexpected)}")
        for k, v in shadow.items():
            self.shadow[k].copy_(v)
        self.decay = float(state.get("decay", self.decay))
        self.num_updates = int(state.get("num_updates", 0))
        self.use_num_updates = bool(state.get("use_num_updates", self.use_num_updates))
