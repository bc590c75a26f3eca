"""Cost versus quality of every sampler on the article's Fig. 1 mixture, with exact scores.

The mixture 0.8 N((5,5), I) + 0.2 N((-5,-5), I) has closed-form scores for every noise level and SDE time
(scoresde.toy), so what is measured is the sampler alone, not a network. For each sampler: NFE (score
evaluations), wall seconds, mode-weight error (max_k |fraction nearest mu_k - w_k|) and sliced Wasserstein
distance to an i.i.d. sample of the same size. This is the start of the compute-cost study the article's
"Computation Cost" section discusses.

    .venv/bin/python benchmarks/samplers.py            # n = 5000 points, N = 1000 SDE steps
    .venv/bin/python benchmarks/samplers.py --n 2000 --N 500 --sigma-max 100

Reference rows: "i.i.d." is a second exact sample (the noise floor of both metrics at this n).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scoresde import pc, sampling  # noqa: E402
from scoresde.metrics import mode_weight_error, sliced_wasserstein  # noqa: E402
from scoresde.noise import geometric_sigmas  # noqa: E402
from scoresde.sde import get_sde  # noqa: E402
from scoresde.toy import GaussianMixture  # noqa: E402


def fig1_mixture() -> GaussianMixture:
    return GaussianMixture([0.8, 0.2], [(5.0, 5.0), (-5.0, -5.0)], 1.0)


def cases(mix: GaussianMixture, n: int, N: int, sigma_max: float):
    """(name, sde label, thunk(generator) -> (x, nfe)) for every sampler configuration."""

    def uniform(g):
        return torch.rand(n, 2, generator=g) * 16.0 - 8.0

    out = [
        ("langevin eps=0.1 x1000 (Fig.1)", "-", lambda g: (sampling.langevin(mix.score, uniform(g), 0.1, 1000, generator=g), 1000)),
        (
            "annealed_langevin 20->1 L=10 eps=0.1 (Fig.1)",
            "-",
            lambda g: (
                sampling.annealed_langevin(
                    mix.ncsn_score(), uniform(g), geometric_sigmas(20.0, 1.0, 10), 100, step_lr=0.1, denoise=False, generator=g
                ),
                1000,
            ),
        ),
        (
            "annealed_langevin 20->0.01 L=10 eps=5e-5 +denoise",
            "-",
            lambda g: (
                sampling.annealed_langevin(
                    mix.ncsn_score(), uniform(g), geometric_sigmas(20.0, 0.01, 10), 100, step_lr=5e-5, denoise=True, generator=g
                ),
                1001,
            ),
        ),
    ]
    for name in ["ve", "vp", "subvp"]:
        kw = {"N": N, "sigma_max": sigma_max} if name == "ve" else {"N": N}
        sde = get_sde(name, **kw)
        sf = mix.sde_score(sde)
        label = f"{name}(sigma_max={sigma_max:g})" if name == "ve" else name
        shape = (n, 2)
        out += [
            (f"pc reverse_diffusion+langevin N={N}", label, lambda g, sde=sde, sf=sf: pc.pc_sampler(sde, sf, shape, generator=g)),
            (
                f"pc euler_maruyama N={N}",
                label,
                lambda g, sde=sde, sf=sf: pc.pc_sampler(sde, sf, shape, predictor="euler_maruyama", corrector="none", generator=g),
            ),
        ]
        if name != "subvp":
            out.append(
                (
                    f"pc ancestral N={N}",
                    label,
                    lambda g, sde=sde, sf=sf: pc.pc_sampler(sde, sf, shape, predictor="ancestral", corrector="none", generator=g),
                )
            )
        out += [
            ("ode RK45 rtol=atol=1e-5", label, lambda g, sde=sde, sf=sf: sampling.ode_sampler(sde, sf, shape, generator=g)),
            ("heun (EDM) 18 steps", label, lambda g, sde=sde, sf=sf: sampling.heun_sampler(sde, sf, shape, generator=g)),
        ]
    return out


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=5000, help="points per sampler")
    ap.add_argument("--N", type=int, default=1000, help="discretisation steps of the SDEs")
    ap.add_argument("--sigma-max", type=float, default=50.0, help="VE sigma_max")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 makes timings comparable)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    mix = fig1_mixture()
    iid = mix.sample(args.n, generator=torch.Generator().manual_seed(args.seed + 1000))
    ref = mix.sample(args.n, generator=torch.Generator().manual_seed(args.seed + 2000))

    def sw(x):
        return sliced_wasserstein(x, iid, n_projections=128, generator=torch.Generator().manual_seed(args.seed))

    rows = [dict(sampler="i.i.d. (noise floor)", sde="-", nfe=0, seconds=0.0, mwe=mode_weight_error(ref, mix), sw=sw(ref))]
    for name, label, run in cases(mix, args.n, args.N, args.sigma_max):
        g = torch.Generator().manual_seed(args.seed)
        t0 = time.perf_counter()
        x, nfe = run(g)
        sec = time.perf_counter() - t0
        rows.append(dict(sampler=name, sde=label, nfe=int(nfe), seconds=sec, mwe=mode_weight_error(x, mix), sw=sw(x)))

    print(f"Fig. 1 mixture, exact scores, n={args.n}, seed={args.seed}, torch threads={args.threads}")
    header = f"{'sampler':<50} {'sde':<18} {'NFE':>6} {'seconds':>8} {'mode-wt err':>11} {'sliced W1':>9}"
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['sampler']:<50} {r['sde']:<18} {r['nfe']:>6d} {r['seconds']:>8.2f} {r['mwe']:>11.4f} {r['sw']:>9.4f}")
    return rows


if __name__ == "__main__":
    main()
