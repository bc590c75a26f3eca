"""A short real-data run on MNIST with scoresde alone (no DVC / Prefect / MLflow): train, sample, FID.

1. MNIST from the gzipped IDX files under ``--root`` (``scoresde.image_datasets.load_mnist``, MD5-verified; every
   split whose image + label files are present — e.g. only the 10,000 test images), shuffled with a
   fixed seed into a training part and a held-out part (``--heldout``).
2. A VE-SDE ``ScoreUNet`` (Song et al., 2021; sigma_max = the largest pairwise distance of the training
   images, NCSNv2 technique 1, unless ``--sigma-max``) trained with ``scoresde.training.train`` on the fast
   path (bf16 autocast, channels-last, fused Adam on CUDA) for a wall-clock budget: a calibration chunk
   measures steps/second, then the run resumes from its checkpoint up to the step count that fits
   ``--seconds`` (which also exercises checkpoint/resume on the device).
3. Samples from the EMA weights with the PC sampler (reverse diffusion + Langevin, snr 0.16, N = 1000) and
   EDM Heun (35 NFE); NFE and seconds per sampler.
4. ``scoresde.classifier``'s CNN trained on the same training images (its held-out accuracy is reported),
   whose penultimate features give a Frechet distance (``scoresde.metrics.frechet_distance``; the
   MNIST-classifier FID of NCSN / score-SDE papers' spirit — not comparable to Inception FIDs) between
   samples and held-out images, beside the real-vs-real floor (training images vs held-out) at equal n.

Writes to ``--out``: ``summary.json``, ``loss.csv`` (+ ``loss.png`` if matplotlib is there),
``samples_pc.png``, ``samples_heun.png``, ``real.png``.

From the repository root (``--root DATA_DIR``: the folder holding the MNIST IDX files; ``--out OUT_DIR``:
where the results go, default ``mnist_short_out``):

    PYTHONPATH=. python benchmarks/mnist_short.py --root data/raw --device cuda --seconds 100 --out OUT_DIR
    PYTHONPATH=. python benchmarks/mnist_short.py --root DATA_DIR --device cpu --quick --out OUT_DIR
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from scoresde.classifier import ClassifierConfig, accuracy, train_classifier  # noqa: E402
from scoresde.data import from_model_space, to_model_space  # noqa: E402
from scoresde.image_datasets import load_mnist  # noqa: E402
from scoresde.distributed import resolve_device  # noqa: E402
from scoresde.losses import sde_dsm_loss  # noqa: E402
from scoresde.metrics import feature_statistics, frechet_distance  # noqa: E402
from scoresde.models import build_model, clone_model, get_score_fn  # noqa: E402
from scoresde.noise import sigma_begin_from_data  # noqa: E402
from scoresde.pc import pc_sampler  # noqa: E402
from scoresde.sampling import heun_sampler  # noqa: E402
from scoresde.sde import VESDE  # noqa: E402
from scoresde.training import TrainConfig, train  # noqa: E402
from scoresde.unet import UNET_PRESETS  # noqa: E402


def log(msg: str) -> None:
    print(f"[mnist_short] {msg}", flush=True)


def save_grid(x01: torch.Tensor, path: Path, nrow: int = 16) -> str | None:
    try:
        from torchvision.utils import save_image

        save_image(x01[: nrow * nrow].float().cpu(), str(path), nrow=nrow, padding=1)
        return path.name
    except Exception as e:  # no PIL etc.: the figures are optional, the numbers are not
        log(f"could not write {path.name}: {type(e).__name__}: {e}")
        return None


@torch.no_grad()
def cnn_features(model, x01: torch.Tensor, device, batch_size: int = 1000) -> torch.Tensor:
    model.eval()
    out = [model.features(x01[i:i + batch_size].to(device))[0].float().cpu() for i in range(0, len(x01), batch_size)]
    return torch.cat(out)


def fid(f1: torch.Tensor, f2: torch.Tensor) -> float | None:
    try:
        return frechet_distance(*feature_statistics(f1), *feature_statistics(f2))
    except Exception as e:  # e.g. singular covariances with very few samples (--quick)
        log(f"Frechet distance failed: {type(e).__name__}: {e}")
        return None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--root", default="data/raw", help="folder with the MNIST IDX files (or its mnist/ subfolder)")
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default="mnist_short_out")
    p.add_argument("--seconds", type=float, default=120.0, help="training wall-clock budget")
    p.add_argument("--calib-steps", type=int, default=200, help="first chunk, to measure steps/second")
    p.add_argument("--max-steps", type=int, default=200_000)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--ema-decay", type=float, default=0.999)
    p.add_argument("--ch", type=int, default=64)
    p.add_argument("--num-res-blocks", type=int, default=2)
    p.add_argument("--sigma-max", type=float, default=0.0, help="0 = largest pairwise distance (NCSNv2 technique 1)")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--heldout", type=int, default=2000)
    p.add_argument("--limit", type=int, default=0, help="use at most this many images per split (0 = all)")
    p.add_argument("--n-samples", type=int, default=500)
    p.add_argument("--sample-batch", type=int, default=500)
    p.add_argument("--pc-steps", type=int, default=1000)
    p.add_argument("--heun-steps", type=int, default=18)
    p.add_argument("--classifier-epochs", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    p.add_argument("--quick", action="store_true", help="tiny sizes for a CPU smoke test")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.seconds, args.calib_steps, args.ch, args.num_res_blocks = min(args.seconds, 6.0), 3, 8, 1
        args.batch_size, args.heldout, args.limit = 16, 100, args.limit or 400
        args.n_samples, args.sample_batch, args.pc_steps, args.heun_steps = 16, 16, 10, 3
        args.classifier_epochs, args.warmup = 1, 2

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = resolve_device(args.device)
    summary: dict = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                     "torch": torch.__version__, "args": vars(args)}
    t_all = time.perf_counter()

    # ---- data --------------------------------------------------------------------------------
    raw = load_mnist(args.root, splits="available", limit=args.limit or None)
    g = torch.Generator().manual_seed(args.seed)
    perm = torch.randperm(len(raw), generator=g)
    x_all = torch.from_numpy(raw.x).float().div_(255.0)[perm]
    y_all = torch.from_numpy(raw.labels)[perm]
    n_hold = min(args.heldout, len(raw) // 5)
    x_hold, y_hold = x_all[:n_hold], y_all[:n_hold]
    x_train, y_train = x_all[n_hold:], y_all[n_hold:]
    summary["data"] = {"splits_found": raw.meta.get("splits"), "train": len(x_train), "heldout": len(x_hold),
                       "shape": list(x_train.shape[1:])}
    log(f"MNIST splits {raw.meta.get('splits')}: {len(x_train)} training / {len(x_hold)} held-out images")
    save_grid(x_hold[:256], out / "real.png")

    # ---- VE SDE + model ---------------------------------------------------------------------------
    if args.sigma_max > 0:
        sigma_max = args.sigma_max
    else:
        sub = x_train[: min(len(x_train), 5000)].reshape(-1, 28 * 28).to(device)
        sigma_max = float(sigma_begin_from_data(sub))
    sde = VESDE(sigma_min=0.01, sigma_max=sigma_max, N=args.pc_steps)
    mcfg = {"name": "unet", "embedding": "fourier", **UNET_PRESETS[28], "ch": args.ch,
            "num_res_blocks": args.num_res_blocks}
    model = build_model(mcfg, (1, 28, 28), seed=args.seed)
    summary["model"] = {**{k: list(v) if isinstance(v, tuple) else v for k, v in mcfg.items()},
                        "params": sum(p.numel() for p in model.parameters())}
    summary["sde"] = {"kind": "ve", "sigma_min": 0.01, "sigma_max": sigma_max, "N": args.pc_steps}
    log(f"VE SDE sigma 0.01 -> {sigma_max:.2f}; ScoreUNet {mcfg} ({summary['model']['params']:,} parameters)")

    def loss_fn(m, x, gen):
        return sde_dsm_loss(sde, get_score_fn(m, sde), x, generator=gen)

    losses: list[tuple[int, float, float]] = []
    t_train0 = time.perf_counter()

    def log_fn(step, metrics):
        losses.append((step, metrics["loss"], time.perf_counter() - t_train0))

    def config(steps):
        return TrainConfig(steps=steps, batch_size=args.batch_size, lr=args.lr, warmup=args.warmup,
                           ema_decay=args.ema_decay, grad_clip=1.0, ckpt_every=max(steps, 1), log_every=50 if not args.quick else 1,
                           seed=args.seed, device=str(device), compile=args.compile, handle_signals=False)

    data = to_model_space(x_train, centered=False)
    with tempfile.TemporaryDirectory(prefix="mnist-ckpt-") as ckpt:
        t0 = time.perf_counter()
        res = train(model, loss_fn, data, config(args.calib_steps), ckpt, fingerprint="mnist_short", log_fn=log_fn,
                    progress=False)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        calib_s = time.perf_counter() - t0
        # steady-state rate from the second half of the calibration chunk (the first steps autotune/compile)
        half = [(s, t) for s, _, t in losses if s >= args.calib_steps // 2]
        if len(half) >= 2 and half[-1][1] > half[0][1]:
            rate = (half[-1][0] - half[0][0]) / (half[-1][1] - half[0][1])
        else:
            rate = args.calib_steps / max(calib_s, 1e-9)
        remaining = max(0.0, args.seconds - calib_s)
        total = int(min(args.max_steps, args.calib_steps + math.floor(0.92 * remaining * rate)))
        log(f"calibration: {args.calib_steps} steps in {calib_s:.1f} s ({rate:.1f} steps/s); training to step {total}")
        if total > args.calib_steps:
            res = train(model, loss_fn, data, config(total), ckpt, fingerprint="mnist_short", log_fn=log_fn,
                        progress=False)
            if res.resumed_from != args.calib_steps:
                log(f"WARNING: expected to resume from step {args.calib_steps}, resumed from {res.resumed_from}")
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    train_s = time.perf_counter() - t_train0
    summary["train"] = {"steps": res.final_step, "seconds": train_s, "steps_per_s": res.final_step / train_s,
                        "images_per_s": res.final_step * args.batch_size / train_s,
                        "resumed_from": res.resumed_from, "final_loss": losses[-1][1] if losses else None,
                        "fast_path": res.fast_path}
    log(f"trained {res.final_step} steps in {train_s:.1f} s; final loss {summary['train']['final_loss']}")
    with open(out / "loss.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["step", "loss", "seconds"])
        w.writerows(losses)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(5, 3))
        ax.plot([s for s, _, _ in losses], [v for _, v, _ in losses])
        ax.set_xlabel("step")
        ax.set_ylabel("DSM loss (VE)")
        ax.set_yscale("log")
        ax.set_title(f"MNIST VE, {summary['device']}")
        fig.tight_layout()
        fig.savefig(out / "loss.png", dpi=120)
        plt.close(fig)
    except Exception as e:
        log(f"no loss.png ({type(e).__name__}: {e})")

    # ---- sampling (EMA weights) ------------------------------------------------------------------
    ema_model = clone_model(res.model).to(device).eval()
    res.ema.copy_to(ema_model)
    ema_model = ema_model.to(memory_format=torch.contiguous_format)
    score_fn = get_score_fn(ema_model, sde)
    samples, sampling = {}, {}
    for name in ("pc", "heun"):
        gen = torch.Generator(device=device).manual_seed(args.seed + 1)
        xs, nfe = [], 0
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        for lo in range(0, args.n_samples, args.sample_batch):
            b = min(args.sample_batch, args.n_samples - lo)
            if name == "pc":
                x, nfe = pc_sampler(sde, score_fn, (b, 1, 28, 28), predictor="reverse_diffusion", corrector="langevin",
                                    snr=0.16, n_corrector_steps=1, denoise=True, generator=gen)
            else:
                x, nfe = heun_sampler(sde, score_fn, (b, 1, 28, 28), num_steps=args.heun_steps, generator=gen)
            xs.append(from_model_space(x.float(), centered=False).cpu())
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        secs = time.perf_counter() - t0
        samples[name] = torch.cat(xs)
        sampling[name] = {"nfe": int(nfe), "seconds": secs, "n": args.n_samples,
                          "s_per_1000_images": 1000 * secs / args.n_samples,
                          "finite": bool(torch.isfinite(samples[name]).all())}
        save_grid(samples[name][:256], out / f"samples_{name}.png")
        log(f"{name}: {args.n_samples} samples, NFE {nfe}, {secs:.1f} s")
    summary["sampling"] = sampling

    # ---- classifier features + Frechet distance ------------------------------------------------------
    t0 = time.perf_counter()
    ccfg = ClassifierConfig(in_channels=1, image_size=(28, 28), num_classes=10, width=32, feature_dim=128)
    clf = train_classifier(x_train, y_train, ccfg, epochs=args.classifier_epochs, batch_size=256,
                           generator=torch.Generator().manual_seed(args.seed), device=device)
    acc = accuracy(clf, x_hold, y_hold)
    f_hold = cnn_features(clf, x_hold, device)
    n_ref = min(len(x_train), len(x_hold), args.n_samples)
    f_train = cnn_features(clf, x_train[:n_ref], device)
    metrics = {"classifier_heldout_accuracy": acc, "classifier_seconds": time.perf_counter() - t0,
               "feature_dim": ccfg.feature_dim, "reference": f"held-out images (n={len(x_hold)})",
               f"fid_mnist_cnn_real_train_n{n_ref}": fid(f_train, f_hold)}
    for name, xs in samples.items():
        metrics[f"fid_mnist_cnn_{name}_n{len(xs)}"] = fid(cnn_features(clf, xs, device), f_hold)
        # samples the classifier labels confidently look like digits
        with torch.no_grad():
            probs = torch.softmax(torch.cat([clf(xs[i:i + 1000].to(device)).float().cpu()
                                             for i in range(0, len(xs), 1000)]), dim=1)
        metrics[f"{name}_mean_max_class_prob"] = float(probs.max(dim=1).values.mean())
        metrics[f"{name}_class_histogram"] = torch.bincount(probs.argmax(dim=1), minlength=10).tolist()
    summary["metrics"] = metrics
    summary["total_seconds"] = time.perf_counter() - t_all
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    log("classifier held-out accuracy {:.4f}; ".format(acc) + ", ".join(
        f"{k} = {v:.2f}" for k, v in metrics.items() if k.startswith("fid_") and isinstance(v, float)))
    log(f"wrote {out}/summary.json ({summary['total_seconds']:.0f} s in all)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
