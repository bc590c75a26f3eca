"""Devices, processes and ranks for the training engine (issue 5).

Launched under ``torchrun`` (``WORLD_SIZE > 1``) the model is wrapped in DistributedDataParallel (NCCL on
CUDA, gloo on CPU). All ranks draw the same global batch from the shared data-order generator
(:class:`BatchSampler`) and rank ``r`` takes slice ``[r*b/W, (r+1)*b/W)``, so the averaged gradient equals
the single-process gradient on the same global batch; each rank has its own loss-noise generator
(:func:`derive_seed`). Logging, the progress bar and checkpoint writes happen on rank 0.

Also here: :func:`resolve_device` and :data:`DEVICE_PATTERN` (the device strings every config accepts),
:func:`unwrap_model`, and :class:`StopFlag`, which turns SIGTERM/SIGINT (preemption, cancellation) into a
flag the training loop checks at step boundaries.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np
import torch
from torch import nn

logger = logging.getLogger(__name__)

__all__ = [
    "DEVICE_PATTERN",
    "resolve_device",
    "unwrap_model",
    "Dist",
    "setup_dist",
    "wrap_ddp",
    "BatchSampler",
    "derive_seed",
    "STREAM_DATA",
    "STREAM_LOSS",
    "STREAM_GLOBAL",
    "StopFlag",
]

#: Valid device strings (``re.fullmatch``): ``auto`` (CUDA if available, else CPU), ``cpu``, ``cuda``, ``cuda:N``.
DEVICE_PATTERN = r"auto|cpu|cuda(:\d+)?"


def resolve_device(device: str = "auto") -> torch.device:
    """``"auto"`` -> ``cuda`` if available else ``cpu``; under torchrun CUDA uses ``LOCAL_RANK``."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"device {device!r} requested but CUDA is not available")
        if dev.index is None:
            dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    return dev


def unwrap_model(model: nn.Module) -> nn.Module:
    """The underlying module of a DDP / DataParallel / torch.compile wrapper."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(getattr(model, "_orig_mod"), nn.Module):
            model = model._orig_mod
        else:
            return model


# --------------------------------------------------------------------------------------
# Process group
# --------------------------------------------------------------------------------------


@dataclass
class Dist:
    """This process's place in the (possibly trivial) process group; collectives are no-ops when alone."""

    enabled: bool = False
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False  # the group was created by setup_dist (and is destroyed by its caller)

    def close(self) -> None:
        """Destroy the process group if :func:`setup_dist` created it."""
        if self.owns_group and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()

    def barrier(self) -> None:
        if self.enabled:
            torch.distributed.barrier()

    def gather_objects(self, obj: Any) -> list:
        if not self.enabled:
            return [obj]
        out: list = [None] * self.world_size
        torch.distributed.all_gather_object(out, obj)
        return out

    def broadcast_object(self, obj: Any) -> Any:
        if not self.enabled:
            return obj
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def shard(self, batch: torch.Tensor) -> torch.Tensor:
        """This rank's slice ``[r*b/W, (r+1)*b/W)`` of a global batch (all of it when alone)."""
        if self.world_size <= 1:
            return batch
        b = batch.shape[0] // self.world_size
        return batch[self.rank * b : (self.rank + 1) * b]

    def mean_and_any(self, values: torch.Tensor, flag: int, device: torch.device) -> tuple[torch.Tensor, bool]:
        """One all-reduce (enabled group only): ``values`` averaged over ranks, and whether any rank's ``flag``
        is set (e.g. a stop signal)."""
        flat = torch.cat([values.flatten(), torch.tensor([float(flag)], device=device)])
        if device.type == "cpu" or torch.distributed.get_backend() == "gloo":
            flat = flat.cpu()
        torch.distributed.all_reduce(flat)
        return flat[:-1].reshape(-1, *values.shape[1:]) / self.world_size, bool(flat[-1].item() > 0)


def setup_dist(device: str = "auto") -> tuple[Dist, torch.device]:
    """Join the torchrun process group (``WORLD_SIZE > 1``, or one already initialised) and pick the device.

    ``device`` is a :data:`DEVICE_PATTERN` string; under torchrun ``"auto"``/``"cuda"`` mean this process's
    ``LOCAL_RANK`` GPU. The group is initialised here (NCCL on CUDA, gloo on CPU) unless it already exists.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    dist_avail = torch.distributed.is_available()
    if world <= 1 and not (dist_avail and torch.distributed.is_initialized()):
        return Dist(), resolve_device(device)
    if not dist_avail:
        raise RuntimeError("WORLD_SIZE > 1 but torch.distributed is not available")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device)
    if dev.type == "cuda" and device in ("auto", "cuda"):
        dev = torch.device("cuda", local_rank % torch.cuda.device_count())
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    owns = False
    if not torch.distributed.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        torch.distributed.init_process_group(backend=backend, init_method="env://")
        owns = True
    d = Dist(
        enabled=torch.distributed.get_world_size() > 1,
        rank=torch.distributed.get_rank(),
        world_size=torch.distributed.get_world_size(),
        local_rank=local_rank,
        owns_group=owns,
    )
    return d, dev


class _DDP(nn.parallel.DistributedDataParallel):
    """DDP that forwards unknown attribute look-ups (e.g. ``embedding``) to the wrapped module,
    so loss closures such as ``get_score_fn(model)`` work unchanged."""

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.module, name)


def wrap_ddp(module: nn.Module, device: torch.device, find_unused_parameters: bool = False) -> nn.Module:
    """DistributedDataParallel around ``module`` (broadcasts rank 0's parameters and buffers); attribute
    look-ups that DDP does not know fall through to the wrapped module."""
    return _DDP(module, device_ids=[device.index] if device.type == "cuda" else None,
                find_unused_parameters=find_unused_parameters)


# --------------------------------------------------------------------------------------
# Data order and per-rank random streams
# --------------------------------------------------------------------------------------


STREAM_DATA, STREAM_LOSS, STREAM_GLOBAL = 1, 2, 3


def derive_seed(*parts: int) -> int:
    """Independent 63-bit seed for a (seed, stream, rank) triple (numpy SeedSequence mixing)."""
    a, b = np.random.SeedSequence([int(p) for p in parts]).generate_state(2, np.uint32)
    return ((int(a) << 32) | int(b)) & ((1 << 63) - 1)


class BatchSampler:
    """Draws global batches of indices: per-epoch random permutations (without replacement
    inside an epoch) from a dedicated CPU generator. State = generator + current permutation +
    position, so a resumed run draws exactly the same batches. Every rank holds the same sampler."""

    def __init__(self, n: int, seed: int):
        if n < 1:
            raise ValueError("training data is empty")
        self.n = n
        self.generator = torch.Generator(device="cpu")
        self.generator.manual_seed(seed)
        self.perm = torch.randperm(n, generator=self.generator)
        self.pos = 0
        self.epoch = 0

    def next(self, batch_size: int) -> torch.Tensor:
        parts = []
        need = batch_size
        while need > 0:
            if self.pos >= self.n:
                self.perm = torch.randperm(self.n, generator=self.generator)
                self.pos = 0
                self.epoch += 1
            take = min(need, self.n - self.pos)
            parts.append(self.perm[self.pos : self.pos + take])
            self.pos += take
            need -= take
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def state_dict(self) -> dict:
        return {
            "generator": self.generator.get_state(),
            "perm": self.perm.clone(),
            "pos": int(self.pos),
            "epoch": int(self.epoch),
            "n": int(self.n),
        }

    def load_state_dict(self, s: Mapping[str, Any]) -> None:
        if int(s["n"]) != self.n:
            raise ValueError(f"checkpoint was made with {int(s['n'])} training examples, data has {self.n}")
        self.generator.set_state(s["generator"])
        self.perm = s["perm"].clone()
        self.pos = int(s["pos"])
        self.epoch = int(s["epoch"])


# --------------------------------------------------------------------------------------
# Signals
# --------------------------------------------------------------------------------------


class StopFlag:
    """Turns SIGTERM/SIGINT into a flag (``signum``) checked at step boundaries (a second signal acts
    normally). Only installed in the main thread; a context manager that restores the old handlers."""

    def __init__(self, enabled: bool):
        self.signum = 0
        self._old: dict[int, Any] = {}
        self.enabled = enabled and threading.current_thread() is threading.main_thread()

    def _handler(self, signum, frame):  # noqa: ARG002
        if self.signum:  # second signal: restore and re-deliver
            self.restore()
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            os.kill(os.getpid(), signum)
            return
        self.signum = signum
        logger.warning("received %s: will checkpoint and stop at the next step", signal.Signals(signum).name)

    def __enter__(self):
        if self.enabled:
            for s in (signal.SIGTERM, signal.SIGINT):
                try:
                    self._old[s] = signal.signal(s, self._handler)
                except (ValueError, OSError):  # pragma: no cover
                    pass
        return self

    def restore(self) -> None:
        for s, h in self._old.items():
            with contextlib.suppress(ValueError, OSError, TypeError):
                signal.signal(s, h)
        self._old.clear()

    def __exit__(self, *exc):
        self.restore()
        return False
