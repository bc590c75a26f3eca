"""Training throughput (images/second) of the training engine: plain fp32 eager vs the fast path.

The measured loop is :func:`scoresde.training.train` itself (sample a batch, ``sde_dsm_loss`` of a VE SDE,
Adam with warm-up and gradient clipping, EMA, losses kept on the device), on the default ``ScoreUNet``
for 32x32x3 images (``scoresde.unet.UNET_PRESETS[32]``) and synthetic data, in one process on one device:

- ``plain``:   fp32, eager, contiguous (NCHW), for-loop Adam, per-tensor EMA (amp=False, channels_last=False,
               optimizer_impl="for_loop", compile=False);
- ``fast``:    the engine's defaults (``"auto"``): on CUDA fused Adam + multi-tensor EMA in fp32 (cuDNN's TF32
               convolutions as torch sets them); on CPU ``"auto"`` is the plain path, so the ratio is ~1.0 there;
- ``compile``: ``fast`` + ``torch.compile`` (with ``--compile``);
- ``bf16``, ``compile_bf16``: opt-in mixed precision (bf16 autocast + channels-last; with ``--bf16``).

Measured on an NVIDIA H200 (torch 2.11), default 32x32 U-Net (1.5M parameters), batch 128: plain 2253 img/s,
fast 3481 (1.54x), compile 5788 (2.57x), bf16 2699 (1.20x), compile_bf16 4022 (1.78x); batch 512: plain 8204,
fast 12060 (1.47x), bf16 9016 (1.10x); 128-channel U-Net (24M), batch 128: plain 2611, fast 3427 (1.31x),
bf16 3401 (1.30x). The step is bound by kernel launches at these sizes: fewer launches (fused Adam, multi-tensor
EMA, compile's fusion) pay, autocast's extra casts do not.

Warm-up steps (``--warmup``; they include cuDNN autotuning and compilation) are excluded: the clock starts
at the engine's log step ``warmup`` and stops at the last step, each after a ``torch.cuda.synchronize``.

    PYTHONPATH=. python benchmarks/train_throughput.py --device cuda --batch-size 128 --steps 100 --warmup 20 --compile
    PYTHONPATH=. python benchmarks/train_throughput.py --device cpu --batch-size 16 --steps 5 --warmup 2

Prints a table with both rows and the ratio; ``--out FILE`` writes the figures as JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from scoresde.distributed import resolve_device  # noqa: E402
from scoresde.losses import sde_dsm_loss  # noqa: E402
from scoresde.models import build_model, get_score_fn  # noqa: E402
from scoresde.sde import VESDE  # noqa: E402
from scoresde.training import TrainConfig, train  # noqa: E402
from scoresde.unet import UNET_PRESETS  # noqa: E402

VARIANTS = {
    "plain": dict(amp=False, channels_last=False, optimizer_impl="for_loop", compile=False),
    # the engine's defaults: fused Adam + multi-tensor EMA in fp32 on CUDA, plain on CPU
    "fast": dict(amp=False, channels_last="auto", optimizer_impl="auto", compile=False),
    "compile": dict(amp=False, channels_last="auto", optimizer_impl="auto", compile=True),
    # opt-in mixed precision: bf16 autocast (+ channels-last); for small, launch-bound U-Nets its weight
    # casts cost about what bf16 saves (measured on an H200, see README)
    "bf16": dict(amp=True, amp_dtype="auto", channels_last="auto", optimizer_impl="auto", compile=False),
    "compile_bf16": dict(amp=True, amp_dtype="auto", channels_last="auto", optimizer_impl="auto", compile=True),
}


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def model_config(args) -> dict:
    cfg = {"name": "unet", "embedding": "fourier", **UNET_PRESETS[args.size]}
    if args.ch:
        cfg["ch"] = args.ch
    if args.ch_mult:
        cfg["ch_mult"] = tuple(int(v) for v in args.ch_mult.split(","))
    if args.num_res_blocks:
        cfg["num_res_blocks"] = args.num_res_blocks
    cfg["ch_mult"] = list(cfg["ch_mult"])
    cfg["attn_resolutions"] = list(cfg["attn_resolutions"])
    return cfg


def measure(variant: str, args, device: torch.device, data: torch.Tensor, mcfg: dict) -> dict:
    """Images/second of `train` for one variant (steps after the warm-up only)."""
    sde = VESDE(0.01, 50.0, N=1000)

    def loss_fn(model, x, g):
        return sde_dsm_loss(sde, get_score_fn(model, sde), x, generator=g)

    warmup, steps = args.warmup, args.steps
    log_every = math.gcd(warmup, steps) if warmup else steps
    marks: dict[int, float] = {}

    def log_fn(step: int, metrics: dict) -> None:  # runs right after the engine synced its losses
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        marks[step] = time.perf_counter()

    model = build_model(mcfg, tuple(data.shape[1:]), seed=0)
    n_params = sum(p.numel() for p in model.parameters())
    cfg = TrainConfig(steps=warmup + steps, batch_size=args.batch_size, lr=2e-4, warmup=100, grad_clip=1.0,
                      ema_decay=0.999, ckpt_every=10**9, log_every=log_every, seed=0, device=str(device),
                      handle_signals=False, **VARIANTS[variant])
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="throughput-") as ckpt:
        res = train(model, loss_fn, data, cfg, ckpt, fingerprint=variant, log_fn=log_fn, progress=False)
    total = time.perf_counter() - t0
    start = marks.get(warmup, t0)
    end = marks[warmup + steps]
    seconds = end - start
    out = {
        "variant": variant,
        "images_per_s": steps * args.batch_size / seconds,
        "ms_per_step": 1000.0 * seconds / steps,
        "timed_steps": steps,
        "warmup_steps": warmup,
        "wall_s_incl_warmup_and_setup": total,
        "final_loss": res.losses[-1][1] if res.losses else None,
        "fast_path": res.fast_path,
        "params": n_params,
    }
    if device.type == "cuda":
        out["peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--steps", type=int, default=50, help="timed steps (after the warm-up)")
    p.add_argument("--warmup", type=int, default=10, help="untimed steps first (autotuning, compilation)")
    p.add_argument("--compile", action="store_true", help="also measure fast path + torch.compile")
    p.add_argument("--bf16", action="store_true", help="also measure opt-in bf16 autocast (+ compile with --compile)")
    p.add_argument("--only", default="", help="comma-separated subset of variants (" + ",".join(VARIANTS) + ")")
    p.add_argument("--size", type=int, default=32, choices=sorted(UNET_PRESETS), help="image size (preset)")
    p.add_argument("--channels", type=int, default=3)
    p.add_argument("--ch", type=int, default=0, help="override the preset's base width (e.g. 128 = NCSN++)")
    p.add_argument("--ch-mult", default="", help="override the preset's ch_mult, e.g. 1,2,2,2")
    p.add_argument("--num-res-blocks", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    p.add_argument("--out", default="", help="write the figures as JSON here")
    args = p.parse_args(argv)
    if args.steps < 1 or args.warmup < 0 or args.batch_size < 1:
        p.error("--steps >= 1, --warmup >= 0, --batch-size >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)

    device = resolve_device(args.device)
    mcfg = model_config(args)
    g = torch.Generator().manual_seed(0)
    n = max(4 * args.batch_size, 512)
    data = torch.rand(n, args.channels, args.size, args.size, generator=g)  # synthetic, in [0, 1]

    variants = ["plain", "fast"] + (["compile"] if args.compile else []) + (["bf16"] if args.bf16 else []) \
        + (["compile_bf16"] if args.bf16 and args.compile else [])
    if args.only:
        variants = [v for v in args.only.split(",") if v]
        bad = [v for v in variants if v not in VARIANTS]
        if bad:
            p.error(f"unknown variant(s) {bad}; valid: {list(VARIANTS)}")
    rows = []
    for v in variants:
        try:
            rows.append(measure(v, args, device, data, mcfg))
        except Exception as e:  # e.g. torch.compile without a working compiler: report, keep the others
            print(f"[train_throughput] variant {v} failed: {type(e).__name__}: {e}", file=sys.stderr)
            rows.append({"variant": v, "error": f"{type(e).__name__}: {e}"})

    base = next((r for r in rows if r["variant"] == "plain" and "images_per_s" in r), None)
    for r in rows:
        if base and "images_per_s" in r:
            r["speedup_vs_plain"] = r["images_per_s"] / base["images_per_s"]

    name = device_name(device)
    print(f"\ntraining throughput: ScoreUNet {mcfg} on {args.channels}x{args.size}x{args.size}, "
          f"VE sde_dsm_loss + Adam + EMA, batch {args.batch_size}, {args.steps} timed steps "
          f"(+{args.warmup} warm-up)")
    print(f"device: {name}; torch {torch.__version__}")
    print(f"{'variant':<9} {'images/s':>10} {'ms/step':>9} {'vs plain':>9}  resolved settings")
    for r in rows:
        if "error" in r:
            print(f"{r['variant']:<9} {'failed':>10}  {r['error'][:100]}")
            continue
        fp = r["fast_path"]
        desc = (f"amp={fp['amp_dtype'] if fp['amp'] else 'off'} channels_last={fp['channels_last']} "
                f"adam={fp['optimizer_impl']} compile={fp['compile']}")
        print(f"{r['variant']:<9} {r['images_per_s']:>10.1f} {r['ms_per_step']:>9.2f} "
              f"{r.get('speedup_vs_plain', float('nan')):>8.2f}x  {desc}")
    if args.out:
        result = {"benchmark": "train_throughput", "device": name, "device_type": device.type,
                  "torch": torch.__version__, "batch_size": args.batch_size, "steps": args.steps,
                  "warmup": args.warmup, "image_shape": [args.channels, args.size, args.size],
                  "model": mcfg, "rows": rows}
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2))
        print(f"wrote {args.out}")
    return 0 if all("error" not in r for r in rows if "compile" not in r["variant"]) else 1


if __name__ == "__main__":
    raise SystemExit(main())
