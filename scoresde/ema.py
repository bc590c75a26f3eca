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
    ``model.load_state_dict(ema.state_dict()["shadow"])`` loads the averaged weights.

    Warm-up (``warmup=True``, score_sde's ``ExponentialMovingAverage(use_num_updates=True)``): the n-th update
    (n = 1, 2, … counting this one, ``num_updates`` after it) uses

        decay_n = min(decay, (1 + n) / (10 + n)),

    so early updates follow the weights closely (2/11, 3/12, …) instead of dragging the random initialisation
    along for ~1/(1 − decay) steps; the rule reaches ``decay`` at n = (10·decay − 1)/(1 − decay) (8 990 for
    0.999). After k updates towards θ_1..θ_k the shadow is
    ``Π_{n≤k} d_n · θ_0 + Σ_n (1 − d_n) Π_{m>n} d_m · θ_n``. ``use_num_updates`` is the older name of
    ``warmup`` (same flag). Deterministic: no randomness, updates in place with fixed arithmetic.
    """

    def __init__(self, model: nn.Module, decay: float = 0.999, warmup: bool = False, *,
                 use_num_updates: bool | None = None):
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay must be in [0, 1], got {decay}")
        self.decay = float(decay)
        self.warmup = bool(warmup if use_num_updates is None else use_num_updates)
        self.num_updates = 0  # updates so far: the warm-up's n, kept in state_dict so a resumed run continues it
        model = _unwrap(model)
        self._param_names = {name for name, p in model.named_parameters() if p.dtype.is_floating_point}
        self.shadow: dict[str, torch.Tensor] = {
            k: v.detach().clone() for k, v in model.state_dict().items()
        }
        self._backup: dict[str, torch.Tensor] | None = None

    @property
    def use_num_updates(self) -> bool:
        """The older name of :attr:`warmup` (score_sde's argument name)."""
        return self.warmup

    @use_num_updates.setter
    def use_num_updates(self, value: bool) -> None:
        self.warmup = bool(value)

    def _current_decay(self) -> float:
        # Called after num_updates was incremented (here and by fastpath.MultiTensorEMA): n counts this update.
        if self.warmup:
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
            "warmup": self.warmup,
            "use_num_updates": self.warmup,  # the same flag under its older key, for readers of older versions
            "shadow": {k: v.clone() for k, v in self.shadow.items()},
        }

    @torch.no_grad()
    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Load a :meth:`state_dict`; the saved decay, update count and warm-up flag replace this EMA's.

        Older state dicts load too: without ``warmup`` the flag is read from ``use_num_updates``; one with
        neither was written before the warm-up existed, by an EMA with a constant decay, so it is continued
        without warm-up (restarting the rule at n = 0 would pull the average back towards the current
        weights); without ``num_updates`` the count starts at 0.
        """
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
        self.warmup = bool(state.get("warmup", state.get("use_num_updates", False)))
