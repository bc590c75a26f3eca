"""Checkpoint and model files of the training engine: atomic writes, safe loading, discovery (issue 6).

* Checkpoints hold model, EMA, optimizer, grad scaler, step, every RNG state (torch CPU/CUDA, numpy,
  python, the data-order sampler and the loss generator; :func:`capture_rng`), the caller's params
  fingerprint and the loss curve so far. They are written atomically through :mod:`scoresde.atomic`
  (temp file in the same directory, fsync, ``os.replace``, directory fsync); the newest two are kept.
* :func:`find_resumable_checkpoint` returns the newest checkpoint that loads and carries the same
  fingerprint; a torn (truncated/corrupt) file is skipped with a warning, a stale one (other params) is
  moved aside to ``stale/`` (and moved back when the params match again).
* A write that runs out of space raises :class:`scoresde.atomic.DiskFullError` (an ``OSError``: ``no space
  left on device writing <path>``); the previous checkpoints stay as they were and no temporary file is left.
* Everything is loaded with ``torch.load(..., weights_only=True)``: a file that would run code when
  unpickled is refused (:class:`UnsafeCheckpointError`) and nothing in it is executed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import pickle
import random
import re
from collections import OrderedDict
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from torch import nn

from scoresde.atomic import TMP_PREFIX, DiskFullError, atomic_path
from scoresde.distributed import Dist, unwrap_model

logger = logging.getLogger(__name__)

__all__ = [
    "CheckpointError",
    "DiskFullError",
    "CorruptCheckpointError",
    "UnsafeCheckpointError",
    "CKPT_FORMAT",
    "CKPT_PATTERN",
    "KEEP_CHECKPOINTS",
    "atomic_torch_save",
    "safe_load",
    "load_checkpoint",
    "save_model",
    "load_model_state",
    "to_cpu",
    "capture_rng",
    "restore_rng",
    "restore_rank_rng",
    "make_checkpoint",
    "read_loss_curve",
    "select_resume_checkpoint",
    "checkpoint_path",
    "list_checkpoints",
    "find_resumable_checkpoint",
    "cleanup_tmp",
    "prune_checkpoints",
]

CKPT_PATTERN = re.compile(r"^ckpt_(\d{8,})\.pt$")
CKPT_FORMAT = 1
KEEP_CHECKPOINTS = 2

_STALE_DIR = "stale"
_KEEP_STALE = 4
_STALE_PATTERN = re.compile(r"^([0-9a-f]{12})-ckpt_(\d{8,})\.pt$")


class CheckpointError(RuntimeError):
    """A checkpoint or model file cannot be used."""


class CorruptCheckpointError(CheckpointError):
    """The file is truncated, torn or otherwise not a readable torch file."""


class UnsafeCheckpointError(CheckpointError):
    """The file contains pickled objects outside torch's weights-only allowlist (possibly code)."""


# --------------------------------------------------------------------------------------
# Writing and loading files
# --------------------------------------------------------------------------------------


def to_cpu(obj: Any) -> Any:
    """Recursively detach tensors to CPU (portable files)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        items = ((k, to_cpu(v)) for k, v in obj.items())
        return type(obj)(items) if type(obj) in (dict, OrderedDict) else dict(items)
    if isinstance(obj, list):
        return [to_cpu(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(to_cpu(v) for v in obj)
    return obj


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` through :func:`scoresde.atomic.atomic_path`: a crash at any moment leaves either the
    previous file or the complete new one under ``path``, never a torn one (only a ``.tmp-*`` file, which
    :func:`cleanup_tmp` removes on the next training start). Out of space: :class:`DiskFullError` naming
    ``path``, the temporary file removed.

    torch.save names the zip archive after the file it writes to, so it writes to an open file object:
    the bytes depend only on ``obj``, never on the random temporary name.
    """
    path = Path(path)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        torch.save(obj, f)
    return path


def safe_load(path: str | os.PathLike, map_location: Any = "cpu") -> Any:
    """``torch.load(..., weights_only=True)`` of any file written by :func:`atomic_torch_save`, with clear
    errors naming the file: :class:`UnsafeCheckpointError` (refused, nothing executed),
    :class:`CorruptCheckpointError` (torn/truncated) or ``FileNotFoundError``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        msg = str(e)
        detail = next((ln.strip() for ln in msg.splitlines()
                       if "GLOBAL" in ln or "Unsupported" in ln or "Unpickler" in ln), msg.splitlines()[0] if msg else "")
        truncated = any(w in msg.lower() for w in ("truncated", "eof", "ran out of input"))
        if "Weights only load failed" in msg and not truncated:
            raise UnsafeCheckpointError(
                f"refusing to load {path}: it contains pickled objects or opcodes outside torch's "
                f"weights-only allowlist (it could run code when unpickled); nothing from it was "
                f"executed. Detail: {detail}"
            ) from None
        raise CorruptCheckpointError(f"cannot read checkpoint {path} (corrupt or truncated): {detail}") from None
    except (RuntimeError, EOFError, OSError, ValueError, KeyError, IndexError, TypeError, AttributeError) as e:
        raise CorruptCheckpointError(f"cannot read checkpoint {path} (corrupt or truncated): {e}") from None


def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> dict:
    """Load a training checkpoint with ``torch.load(..., weights_only=True)`` only.

    Raises :class:`UnsafeCheckpointError` (the file would execute code / contains non-allowlisted
    objects — refused, nothing executed), :class:`CorruptCheckpointError` (torn/truncated/not a
    checkpoint) or ``FileNotFoundError``; every message names the file.
    """
    path = Path(path)
    obj = safe_load(path, map_location)
    if not isinstance(obj, dict) or "step" not in obj or "model" not in obj:
        raise CorruptCheckpointError(f"{path} is not a scoresde training checkpoint (missing 'step'/'model')")
    return obj


def make_checkpoint(*, step: int, model: nn.Module, ema: Any, optimizer: torch.optim.Optimizer,
                    scaler: Mapping[str, Any], rng_per_rank: list, fingerprint: str, config: Mapping[str, Any],
                    world_size: int, losses: list[tuple[int, float]], window: list[float],
                    gnorm_window: list[float]) -> dict:
    """The training checkpoint (format :data:`CKPT_FORMAT`): everything a resumed run needs, weights_only-
    loadable, tensors on the CPU. ``rng_per_rank`` is every rank's :func:`capture_rng`; ``losses`` the logged
    ``(step, mean loss)`` points, ``window``/``gnorm_window`` the values of the open logging window."""
    return {
        "format": CKPT_FORMAT,
        "step": int(step),
        "model": to_cpu(model.state_dict()),
        "ema": to_cpu(ema.state_dict()),
        "optimizer": to_cpu(optimizer.state_dict()),
        "scaler": scaler,
        "rng": rng_per_rank[0],
        "rng_per_rank": rng_per_rank,
        "fingerprint": fingerprint,
        "config": config,
        "world_size": world_size,
        "losses": {
            "steps": torch.tensor([s for s, _ in losses], dtype=torch.int64),
            "values": torch.tensor([v for _, v in losses], dtype=torch.float64),
            "window": torch.tensor(window, dtype=torch.float64),
            "gnorm_window": torch.tensor(gnorm_window, dtype=torch.float64),
        },
    }


def read_loss_curve(ckpt: Mapping[str, Any]) -> tuple[list[tuple[int, float]], list[float], list[float]]:
    """``(losses, window, gnorm_window)`` of a training checkpoint (see :func:`make_checkpoint`)."""
    saved = ckpt["losses"]
    return (
        [(int(s), float(v)) for s, v in zip(saved["steps"].tolist(), saved["values"].tolist())],
        [float(v) for v in saved["window"].tolist()],
        [float(v) for v in saved.get("gnorm_window", torch.zeros(0)).tolist()],
    )


def save_model(path: str | os.PathLike, model: nn.Module, ema: Any, config: Mapping[str, Any]) -> Path:
    """Atomically write the final ``{"model", "ema", "config"}`` file (``config`` must be JSON-able)."""
    config = dict(config)
    try:
        json.dumps(config)
    except (TypeError, ValueError) as e:
        raise TypeError(f"save_model: config must be JSON-serialisable plain data: {e}") from None
    obj = {
        "model": to_cpu(unwrap_model(model).state_dict()),
        "ema": to_cpu(ema.state_dict()) if ema is not None else None,
        "config": config,
    }
    return atomic_torch_save(obj, path)


def load_model_state(path: str | os.PathLike, map_location: Any = "cpu") -> dict:
    """Load a file written by :func:`save_model` (``weights_only=True``; unsafe files refused)."""
    path = Path(path)
    obj = safe_load(path, map_location)
    if not isinstance(obj, dict) or "model" not in obj:
        raise CorruptCheckpointError(f"{path} is not a scoresde model file (missing 'model')")
    return obj


# --------------------------------------------------------------------------------------
# RNG state capture (weights_only-loadable: tensors, ints, floats, strings, None)
# --------------------------------------------------------------------------------------


def _numpy_state() -> dict:
    name, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    return {
        "name": str(name),
        "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64).copy()),
        "pos": int(pos),
        "has_gauss": int(has_gauss),
        "cached_gaussian": float(cached),
    }


def _set_numpy_state(s: Mapping[str, Any]) -> None:
    keys = s["keys"].numpy().astype(np.uint32)
    np.random.set_state((s["name"], keys, int(s["pos"]), int(s["has_gauss"]), float(s["cached_gaussian"])))


def _python_state() -> dict:
    version, internal, gauss_next = random.getstate()
    return {
        "version": int(version),
        "state": torch.tensor(internal, dtype=torch.int64),
        "gauss_next": None if gauss_next is None else float(gauss_next),
    }


def _set_python_state(s: Mapping[str, Any]) -> None:
    internal = tuple(int(v) for v in s["state"].tolist())
    random.setstate((int(s["version"]), internal, s["gauss_next"]))


def capture_rng(sampler: Any, loss_gen: torch.Generator) -> dict:
    """Every random state of this process: torch CPU (and CUDA once initialised), numpy, python, the
    data-order ``sampler`` (a :class:`scoresde.distributed.BatchSampler`) and the loss generator."""
    rng = {
        "torch_cpu": torch.get_rng_state(),
        "numpy": _numpy_state(),
        "python": _python_state(),
        "data_gen": sampler.state_dict(),
        "loss_gen": loss_gen.get_state(),
        "loss_gen_device": str(loss_gen.device),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        rng["torch_cuda"] = list(torch.cuda.get_rng_state_all())
    return rng


def restore_rng(rng: Mapping[str, Any], sampler: Any, loss_gen: torch.Generator) -> None:
    """Inverse of :func:`capture_rng`; the loss generator is kept (with a warning) across device types."""
    torch.set_rng_state(rng["torch_cpu"])
    if "torch_cuda" in rng and torch.cuda.is_available():
        states = list(rng["torch_cuda"])
        n = min(len(states), torch.cuda.device_count())
        for i in range(n):
            torch.cuda.set_rng_state(states[i], i)
    _set_numpy_state(rng["numpy"])
    _set_python_state(rng["python"])
    try:
        sampler.load_state_dict(rng["data_gen"])
    except ValueError as e:  # e.g. made with another number of training examples
        raise CheckpointError(str(e)) from None
    if str(rng.get("loss_gen_device", loss_gen.device)).split(":")[0] == loss_gen.device.type:
        loss_gen.set_state(rng["loss_gen"])
    else:
        logger.warning(
            "checkpoint loss generator was on %s, now training on %s: the loss noise stream is "
            "reseeded (resume is exact only on the same device type)",
            rng.get("loss_gen_device"), loss_gen.device,
        )


def restore_rank_rng(ckpt: Mapping[str, Any], dist: Dist, sampler: Any, loss_gen: torch.Generator,
                     path: Path | None = None) -> bool:
    """Restore this rank's streams from a training checkpoint (:func:`restore_rng`). Returns ``False`` for a
    rank the checkpoint has no streams for (written with fewer ranks): the data order is restored, the loss
    generator left as seeded, and the caller reseeds the global torch stream."""
    per_rank = ckpt.get("rng_per_rank") or [ckpt["rng"]]
    if len(per_rank) != dist.world_size:
        logger.warning(
            "checkpoint %s was written with world size %d, now %d: the data order is kept but "
            "per-rank noise streams are reseeded for new ranks (not bit-identical)", path, len(per_rank),
            dist.world_size,
        )
    if dist.rank < len(per_rank):
        restore_rng(per_rank[dist.rank], sampler, loss_gen)
        return True
    restore_rng({**per_rank[0], "loss_gen_device": "none"}, sampler, loss_gen)
    return False


# --------------------------------------------------------------------------------------
# Checkpoint directories: naming, discovery, stale checkpoints, pruning
# --------------------------------------------------------------------------------------


def checkpoint_path(ckpt_dir: str | os.PathLike, step: int) -> Path:
    """``ckpt_dir/ckpt_{step:08d}.pt``."""
    return Path(ckpt_dir) / f"ckpt_{step:08d}.pt"


def list_checkpoints(ckpt_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """``(step, path)`` of ``ckpt_*.pt`` files, newest (highest step) first."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return []
    out = []
    for p in ckpt_dir.iterdir():
        m = CKPT_PATTERN.match(p.name)
        if m and p.is_file():
            out.append((int(m.group(1)), p))
    out.sort(key=lambda t: t[0], reverse=True)
    return out


def _fp_tag(fingerprint: str) -> str:
    """Short filesystem-safe tag of a fingerprint (names files moved to ``stale/``)."""
    return hashlib.sha256(str(fingerprint).encode()).hexdigest()[:12]


def find_resumable_checkpoint(
    ckpt_dir: str | os.PathLike, fingerprint: str = "", max_step: int | None = None,
    *, move_stale: bool = True,
) -> tuple[Path, dict] | None:
    """Newest checkpoint in ``ckpt_dir`` that loads safely and carries ``fingerprint``.

    * torn/corrupt and unsafe files are skipped with a warning (left in place; a later write of the
      same step replaces them, pruning never lets them displace valid checkpoints);
    * checkpoints with another fingerprint (made with other params) are skipped with a warning and,
      with ``move_stale``, moved to ``ckpt_dir/stale/`` (the newest few are kept there); a stale
      checkpoint whose fingerprint matches again (params switched back) is moved back and resumed;
    * checkpoints beyond ``max_step`` are skipped (they cannot be un-trained).

    Returns ``(path, checkpoint dict)`` or ``None``.
    """
    ckpt_dir = Path(ckpt_dir)
    stale_dir = ckpt_dir / _STALE_DIR
    tag = _fp_tag(fingerprint)
    candidates = [(step, 1, p) for step, p in list_checkpoints(ckpt_dir)]
    if stale_dir.is_dir():
        for p in stale_dir.iterdir():
            m = _STALE_PATTERN.match(p.name)
            if m and m.group(1) == tag and p.is_file():
                candidates.append((int(m.group(2)), 0, p))
    candidates.sort(key=lambda t: (t[0], t[1]), reverse=True)
    found = None
    for step, in_main, path in candidates:
        try:
            ckpt = load_checkpoint(path, map_location="cpu")
        except UnsafeCheckpointError as e:
            logger.warning("ignoring checkpoint: %s", e)
            continue
        except (CheckpointError, OSError) as e:
            logger.warning("ignoring torn/corrupt checkpoint %s: %s", path, e)
            continue
        fp = ckpt.get("fingerprint", "")
        if fp != fingerprint:
            logger.warning(
                "ignoring stale checkpoint %s: made with other params (fingerprint %r, expected %r)%s",
                path, fp, fingerprint, f"; moved to {_STALE_DIR}/" if move_stale and in_main else "",
            )
            if move_stale and in_main:
                stale_dir.mkdir(exist_ok=True)
                with contextlib.suppress(OSError):
                    os.replace(path, stale_dir / f"{_fp_tag(fp)}-{path.name}")
            continue
        if int(ckpt["step"]) != step:
            logger.warning("ignoring checkpoint %s: its step %s does not match its name", path, ckpt["step"])
            continue
        if max_step is not None and step > max_step:
            logger.warning("ignoring checkpoint %s: step %d is beyond the %d requested steps", path, step, max_step)
            continue
        if not in_main:
            target = checkpoint_path(ckpt_dir, step)
            os.replace(path, target)
            logger.warning("params match an earlier run again: restored %s from %s/", target.name, _STALE_DIR)
            path = target
        found = (path, ckpt)
        break
    if stale_dir.is_dir():  # bound the disk used by stale checkpoints
        stale = sorted((p for p in stale_dir.iterdir() if _STALE_PATTERN.match(p.name)),
                       key=lambda p: p.stat().st_mtime, reverse=True)
        for p in stale[_KEEP_STALE:]:
            with contextlib.suppress(OSError):
                p.unlink()
    return found


def select_resume_checkpoint(ckpt_dir: Path, fingerprint: str, max_step: int, dist: Dist) -> tuple[Path, dict] | None:
    """Collective: rank 0 creates ``ckpt_dir``, removes temp files and picks the newest resumable checkpoint
    (:func:`find_resumable_checkpoint`); every other rank loads the same file."""
    if dist.rank == 0:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        cleanup_tmp(ckpt_dir)
        found = find_resumable_checkpoint(ckpt_dir, fingerprint, max_step)
        chosen = str(found[0]) if found else None
    else:
        found, chosen = None, None
    chosen = dist.broadcast_object(chosen)
    if chosen is not None and found is None:
        found = (Path(chosen), load_checkpoint(chosen, map_location="cpu"))
    return found


def cleanup_tmp(ckpt_dir: str | os.PathLike) -> None:
    """Remove temporary files (``.tmp-*``, see :mod:`scoresde.atomic`) left by interrupted writes."""
    for p in Path(ckpt_dir).glob(TMP_PREFIX + "*"):
        if not p.is_file():
            continue
        with contextlib.suppress(OSError):
            p.unlink()
            logger.info("removed leftover temp file %s (an interrupted checkpoint write)", p)


def prune_checkpoints(ckpt_dir: str | os.PathLike, newest: int, keep: int = KEEP_CHECKPOINTS) -> None:
    """Delete checkpoints older than the ``keep`` newest at or below step ``newest`` (the one just
    written); files with higher steps (torn, or beyond the requested steps) never displace them."""
    below = [(s, p) for s, p in list_checkpoints(ckpt_dir) if s <= newest]
    for _, p in below[keep:]:
        with contextlib.suppress(OSError):
            p.unlink()
