"""Sampling cost side by side: PC (1000 steps), probability-flow ODE (RK45) and EDM Heun (35 NFE) on one model.

For each sampler: NFE, seconds, images/second and seconds per 1,000 images, with ``scoresde.sampling``'s
``pc_sampler`` / ``ode_sampler`` / ``heun_sampler`` (run under ``torch.inference_mode``). On CUDA each
sampler also runs on the fast path: the score network in bf16 autocast and channels-last (outputs cast
back to fp32, so the sampler's arithmetic stays fp32). The adaptive ODE keeps fp32 on the fast path as
well (bf16 rounding noise breaks RK45's error control at rtol = 1e-5: many more NFE), but gets
channels-last.

The model is a trained checkpoint (``--ckpt models/ve.pt``, the pipeline's ``save_model`` file; the SDE's
parameters from ``--schedule``, default data/noise/schedule.json) or, by default, a randomly initialised
``ScoreUNet`` for 32x32x3 (``UNET_PRESETS[32]``) on VESDE(0.01, 50) whose zero-initialised output layer is
re-drawn small (so the score is not identically 0). With a random model the ODE's NFE is not that of a
trained one: timings per NFE are what carry over.

    PYTHONPATH=. python benchmarks/sampling.py --device cuda --n 256 --out sampling.json
    PYTHONPATH=. python benchmarks/sampling.py --device cpu --n 4 --pc-steps 20 --ode-rtol 1e-3
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from scoresde.checkpoint import load_model_state  # noqa: E402
from scoresde.distributed import resolve_device  # noqa: E402
from scoresde.models import build_model, get_score_fn  # noqa: E402
from scoresde.pc import pc_sampler  # noqa: E402
from scoresde.sampling import heun_sampler, ode_sampler  # noqa: E402
from scoresde.sde import get_sde  # noqa: E402
from scoresde.unet import UNET_PRESETS  # noqa: E402


def load_model(args, device):
    """(model, sde, shape, description)."""
    if args.ckpt:
        obj = load_model_state(args.ckpt, map_location="cpu")
        info = obj.get("config") or {}
        kind = info.get("kind", "ve")
        if kind == "ncsn":
            raise SystemExit("an NCSN model has no SDE: benchmark a ve/vp/subvp checkpoint")
        shape = tuple(info["data_shape"])
        model = build_model(info["model"], shape)
        state = obj["ema"]["shadow"] if obj.get("ema") and not args.raw_weights else obj["model"]
        model.load_state_dict(state)
        sched = {}
        if Path(args.schedule).is_file():
            sched = json.loads(Path(args.schedule).read_text()).get(kind, {})
        params = {k: v for k, v in sched.items() if k != "N"}
        sde = get_sde(kind, **params, N=args.pc_steps)
        desc = f"{args.ckpt} ({kind}, {info.get('model')}, EMA={not args.raw_weights})"
    else:
        shape = (3, 32, 32)
        cfg = {"name": "unet", "embedding": "fourier", **UNET_PRESETS[32]}
        model = build_model(cfg, shape, seed=0)
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():  # the output conv is zero-initialised: make the score non-trivial
            w = model.conv_out.weight
            w.copy_(torch.randn(w.shape, generator=g) * 1e-2)
        sde = get_sde("ve", sigma_min=0.01, sigma_max=50.0, N=args.pc_steps)
        desc = f"random ScoreUNet {cfg} on VE(0.01, 50)"
    return model.to(device).eval(), sde, shape, desc


def fast_score_fn(model, sde, device, dtype):
    """The score of a channels-last model evaluated under autocast in ``dtype``; returns fp32."""
    inner = get_score_fn(model, sde)

    def score(x, t):
        with torch.autocast(device_type=device.type, dtype=dtype):
            out = inner(x.contiguous(memory_format=torch.channels_last), t)
        return out.float()

    return score


def run_batched(fn, n: int, batch_size: int):
    """Run ``fn(b) -> (x, nfe)`` over batches summing to ``n``; returns (nfe per batch, seconds)."""
    nfe = 0
    t0 = time.perf_counter()
    for lo in range(0, n, batch_size):
        x, nfe = fn(min(batch_size, n - lo))
        float(x.float().mean())  # forces completion (and a finite check below)
        if not torch.isfinite(x).all():
            raise FloatingPointError("non-finite samples")
    return nfe, time.perf_counter() - t0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto")
    p.add_argument("--n", type=int, default=64, help="images per sampler")
    p.add_argument("--batch-size", type=int, default=0, help="images per batch (0 = all n at once)")
    p.add_argument("--ckpt", default="", help="a save_model file (models/ve.pt ...); default: random model")
    p.add_argument("--schedule", default="data/noise/schedule.json")
    p.add_argument("--raw-weights", action="store_true", help="use the raw weights instead of the EMA")
    p.add_argument("--pc-steps", type=int, default=1000, help="PC discretisation steps N")
    p.add_argument("--ode-rtol", type=float, default=1e-5)
    p.add_argument("--heun-steps", type=int, default=18, help="2*steps-1 NFE (18 -> 35)")
    p.add_argument("--samplers", default="pc,ode,heun")
    p.add_argument("--fast", default="auto", choices=("auto", "on", "off"),
                   help="also run bf16-autocast + channels-last variants (auto = on CUDA)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--out", default="")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    bs = args.batch_size or args.n
    model, sde, shape, desc = load_model(args, device)
    fast = args.fast == "on" or (args.fast == "auto" and device.type == "cuda")
    fast_dtype = torch.bfloat16
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        fast_dtype = torch.float16
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True

    plain_score = get_score_fn(model, sde)
    samplers = {
        "pc": lambda sf: (lambda b, g: pc_sampler(sde, sf, (b, *shape), predictor="reverse_diffusion",
                                                  corrector="langevin", snr=0.16, n_corrector_steps=1,
                                                  generator=g)),
        "ode": lambda sf: (lambda b, g: ode_sampler(sde, sf, (b, *shape), rtol=args.ode_rtol, atol=args.ode_rtol,
                                                    generator=g)),
        "heun": lambda sf: (lambda b, g: heun_sampler(sde, sf, (b, *shape), num_steps=args.heun_steps, generator=g)),
    }
    labels = {"pc": f"PC reverse_diffusion+langevin N={args.pc_steps} snr=0.16",
              "ode": f"prob. flow ODE RK45 rtol=atol={args.ode_rtol:g}",
              "heun": f"EDM Heun {args.heun_steps} steps"}
    rows = []
    for name in [s for s in args.samplers.split(",") if s]:
        variants = [("fp32", plain_score)]
        if fast:
            if name == "ode":  # adaptive error control needs fp32: fast path = channels-last only
                model_cl = model.to(memory_format=torch.channels_last)
                variants.append(("fp32+channels_last", get_score_fn(model_cl, sde)))
            else:
                variants.append((f"{str(fast_dtype).split('.')[-1]}+channels_last",
                                 fast_score_fn(model.to(memory_format=torch.channels_last), sde, device, fast_dtype)))
        for variant, sf in variants:
            g = torch.Generator(device=device).manual_seed(args.seed)
            # warm-up: one tiny call (CUDA context, cuDNN autotuning) outside the clock
            with torch.inference_mode():
                sf(torch.zeros(min(bs, 2), *shape, device=device), torch.full((min(bs, 2),), 0.5, device=device))
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            fn = samplers[name](sf)
            try:
                nfe, secs = run_batched(lambda b: fn(b, g), args.n, bs)
            except Exception as e:
                print(f"[sampling] {name}/{variant} failed: {type(e).__name__}: {e}", file=sys.stderr)
                rows.append({"sampler": name, "variant": variant, "error": f"{type(e).__name__}: {e}"})
                continue
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            rows.append({"sampler": name, "label": labels[name], "variant": variant, "nfe": int(nfe), "n": args.n,
                         "batch_size": bs, "seconds": secs, "images_per_s": args.n / secs,
                         "s_per_1000_images": 1000.0 * secs / args.n, "ms_per_nfe_per_batch":
                         1000.0 * secs / max(nfe, 1) / max(1, -(-args.n // bs))})
        model = model.to(memory_format=torch.contiguous_format)
        plain_score = get_score_fn(model, sde)

    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"\nsampling cost: {desc}; {args.n} images of shape {shape} in batches of {bs}")
    print(f"device: {dev_name}; torch {torch.__version__}")
    print(f"{'sampler':<44} {'variant':<22} {'NFE':>6} {'seconds':>9} {'images/s':>10} {'s/1000 img':>11}")
    for r in rows:
        failed = "error" in r
        cells = (f"failed: {r['error'][:80]}" if failed else
                 f"{r['nfe']:>6} {r['seconds']:>9.2f} {r['images_per_s']:>10.2f} {r['s_per_1000_images']:>11.1f}")
        print(f"{r['sampler'] if failed else r['label']:<44} {r['variant']:<22} {cells}")
    by = {}
    for r in rows:
        if "error" not in r:
            by.setdefault(r["sampler"], []).append(r)
    for name, rs in by.items():
        if len(rs) == 2:
            print(f"  {name}: fast path {rs[0]['seconds'] / rs[1]['seconds']:.2f}x vs fp32")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"benchmark": "sampling", "device": dev_name, "device_type": device.type,
                                              "torch": torch.__version__, "model": desc, "shape": list(shape),
                                              "rows": rows}, indent=2))
        print(f"wrote {args.out}")
    return 0 if rows and all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
