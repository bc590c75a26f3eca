"""Helper for tests/test_training.py and tests/test_ddp.py: a tiny, fully seeded training run.

Run as a script (in a subprocess, or under torchrun) or import ``build`` in-process:

    python tests/_train_worker.py --ckpt-dir D --out model.pt --steps 40 --ckpt-every 5
    python -m torch.distributed.run --nproc-per-node 2 tests/_train_worker.py ... --loss mse

It trains a small ScoreMLP on a 2-D Gaussian-mixture sample with the real NCSN ``dsm_loss``
(``--loss dsm``) or a deterministic regression loss (``--loss mse``, no noise: DDP must then match
single-process training up to float reduction order). Rank 0 writes ``--out`` (save_model) and
``--out``.json (losses, resumed_from, steps_done).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from scoresde.checkpoint import save_model  # noqa: E402
from scoresde.training import TrainConfig, train  # noqa: E402


def make_data(n: int = 256, seed: int = 123) -> torch.Tensor:
    """Two-component 2-D mixture (weights 0.8/0.2, means ±(5, 5), std 1), drawn with its own generator."""
    g = torch.Generator().manual_seed(seed)
    comp = (torch.rand(n, generator=g) < 0.2).float()
    means = torch.stack([5 - 10 * comp, 5 - 10 * comp], dim=1)
    return (means + torch.randn(n, 2, generator=g)).float()


def make_model(seed: int = 0) -> torch.nn.Module:
    from scoresde.models import ScoreMLP

    torch.manual_seed(seed)
    return ScoreMLP(2, hidden=32, n_layers=2, embedding="fourier", emb_dim=16)


SIGMAS = torch.logspace(1, -1, 8)  # 10 -> 0.1, geometric (NCSN)


def dsm(model, x, generator, *, sleep: float = 0.0, nan_at: int = 0, counter=None):
    from scoresde.losses import dsm_loss
    from scoresde.models import get_score_fn

    if sleep:
        time.sleep(sleep)
    loss = dsm_loss(get_score_fn(model), x, SIGMAS, generator=generator)
    return _maybe_nan(loss, nan_at, counter)


def mse(model, x, generator, *, sleep: float = 0.0, nan_at: int = 0, counter=None):
    """Deterministic: regress model(x, σ=1) onto a fixed function of x (no randomness)."""
    if sleep:
        time.sleep(sleep)
    sigma = torch.ones(x.shape[0], dtype=x.dtype, device=x.device)
    target = torch.tanh(x.flip(-1) * 0.3)
    loss = ((model(x, sigma) - target) ** 2).sum(-1).mean()
    return _maybe_nan(loss, nan_at, counter)


def _maybe_nan(loss, nan_at, counter):
    if counter is not None:
        counter[0] += 1
        if nan_at and counter[0] == nan_at:
            return loss * float("nan")
    return loss


def build(args: argparse.Namespace):
    """(model, loss_fn, data, config) for the given arguments."""
    data = make_data(args.n)
    model = make_model(args.model_seed)
    base = {"dsm": dsm, "mse": mse}[args.loss]
    counter = [args.start_count]
    loss_fn = functools.partial(base, sleep=args.step_sleep, nan_at=args.nan_at, counter=counter)
    config = TrainConfig(
        steps=args.steps, batch_size=args.batch_size, lr=args.lr, ema_decay=0.9, grad_clip=args.grad_clip,
        warmup=args.warmup, ckpt_every=args.ckpt_every, log_every=args.log_every, seed=args.seed,
        device="cpu",
    )
    return model, loss_fn, data, config


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser()
    p.add_argument("--ckpt-dir", required=True)
    p.add_argument("--out", default="")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--ckpt-every", type=int, default=5)
    p.add_argument("--log-every", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model-seed", type=int, default=0)
    p.add_argument("--n", type=int, default=256)
    p.add_argument("--loss", choices=["dsm", "mse"], default="dsm")
    p.add_argument("--step-sleep", type=float, default=0.0)
    p.add_argument("--nan-at", type=int, default=0)
    p.add_argument("--start-count", type=int, default=0)
    p.add_argument("--fingerprint", default="fp-test")
    return p


def main(argv=None) -> int:
    torch.set_num_threads(1)
    args = parser().parse_args(argv)
    model, loss_fn, data, config = build(args)
    res = train(model, loss_fn, data, config, Path(args.ckpt_dir), fingerprint=args.fingerprint, progress=False)
    if int(os.environ.get("RANK", "0")) == 0 and args.out:
        save_model(args.out, res.model, res.ema, {"steps": config.steps})
        Path(args.out + ".json").write_text(json.dumps({
            "losses": res.losses, "resumed_from": res.resumed_from, "steps_done": res.steps_done,
            "world_size": int(os.environ.get("WORLD_SIZE", "1")), "seconds": res.seconds,
        }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
