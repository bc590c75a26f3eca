"""The article's Figure 1 as library code: Langevin dynamics with and without annealing on a 2-D mixture.

The mixture is the article's (Song & Ermon, 2019, Sec. 3.2.2): p = 0.8 N((5, 5), I) + 0.2 N((-5, -5), I).
Samples are drawn three ways and compared with i.i.d. samples of p:

- **Langevin without annealing** (article Eq. "Langevin", ε = ``langevin_step``): from Uniform[-r, r]^2 the
  chain settles into the mode nearest to where it started and cannot cross the low-density region
  between the modes, so both modes get about half of the points whatever their weights — the failure the
  article shows in Figure 1 (third panel).
- **Annealed Langevin** (NCSN's Algorithm 1): geometric σ_1 = 20 > … > σ_L = 1, L = 10, α_i = ε σ_i²/σ_L²
  with ε = ``step_lr`` = 0.1, as in NCSN's toy experiment. At large σ the perturbed density p_σ connects
  the modes and the chains redistribute in proportion to the weights; the proportions survive as σ
  decreases.

Both are run twice: with the **exact** scores of the mixture (Langevin: ∇ log p; annealed: ∇ log p_σ,
``GaussianMixture.ncsn_score()``, i.e. ``perturb(σ).score``), and with a **learned** score network (a ``ScoreMLP`` trained here by
denoising score matching (``dsm_loss``) on i.i.d. samples with the same σ's, through the train stage's
``train_model``; plain Langevin then uses the network at its smallest level σ_L, the closest it has to
∇ log p).

Metrics, reports/metrics/toy.json::

    {"exact":   {"mode_weight_error":  {"iid": …, "langevin": …, "annealed_langevin": …},
                 "sliced_wasserstein": {"iid": …, "langevin": …, "annealed_langevin": …}},
     "learned": {…same…}}

``mode_weight_error`` = max_k |fraction of samples nearest μ_k − w_k|; ``sliced_wasserstein`` is measured
against an independent i.i.d. reference sample of the same size (its ``iid`` entry is the two-sample noise
floor). Without ``denoise`` annealed Langevin samples p_{σ_L} (σ_L = 1 blurs each mode from std 1 to √2), so
its sliced Wasserstein stays above the floor even when its mode weights are right.

Choice that differs from NCSN's toy script: ``n_steps_each`` defaults to 200, not 100. With 100 steps per
level the chains freeze between the modes a little too early (at σ ≈ 3–4, where p_σ still puts a few
per cent of each component on the wrong side) and the major mode comes out at ≈ 0.78 ± 0.005 over seeds,
i.e. right at the 0.02 tolerance; 200 steps per level gives ≈ 0.79 (set ``n_steps_each: 100`` to see it).
Plain Langevin gets the same total number of steps by default.

Figures: reports/figures/toy_exact.png and toy_learned.png, four panels each (true density with the score
field used by plain Langevin, i.i.d. samples, Langevin, annealed Langevin).

The stage ``toy`` wires these pieces (stages/toy.py); the section ``toy`` of params.yaml is :data:`TOY`.
"""
from __future__ import annotations

from pipeline.io import Timer, save_figure
from pipeline.params import Bool, Float, Int, List, OrAuto, Section, Str, less_than, sums_to_one

METRICS = "reports/metrics/toy.json"
FIGURES = {"exact": "reports/figures/toy_exact.png", "learned": "reports/figures/toy_learned.png"}
CKPT_DIR = "checkpoints/toy"
METHODS = ("iid", "langevin", "annealed_langevin")


def _mixture_checks(d: dict):
    if len(d["means"]) != len(d["weights"]):
        return "means", f"expected one mean per weight ({len(d['weights'])}), got {len(d['means'])}"
    if any(len(m) != 2 for m in d["means"]):
        return "means", "expected 2-D means (the figure is a plane), e.g. [[5.0, 5.0], [-5.0, -5.0]]"
    return None


TRAIN = Section({
    "steps": Int(4000, ge=1, le=10_000_000),
    "batch_size": Int(256, ge=1, le=65_536),
    "lr": Float(2e-3, gt=0, le=1),
    "warmup": Int(50, ge=0),
    "grad_clip": Float(1.0, gt=0),
    "ema_decay": Float(0.999, ge=0, lt=1),
    "use_ema": Bool(True),
    "anneal_power": Float(2.0, ge=0, le=4),
    "n_data": Int(10_000, ge=10, le=10_000_000),
    "ckpt_every": Int(1000, ge=1),
    "log_every": Int(100, ge=1),
    "model": Section({
        "hidden": Int(64, ge=4, le=8192),
        "n_layers": Int(2, ge=1, le=32),
        "embedding": Str("fourier", choices=("fourier",)),
    }),
})

TOY = Section({
    "weights": List(Float(gt=0, le=1), min_len=1),
    "means": List(List(Float(), min_len=1), min_len=1),
    "std": Float(gt=0),
    "n": Int(ge=10, le=10_000_000),
    "n_learned": Int(ge=10, le=10_000_000),
    "init_range": Float(8.0, gt=0),
    "sigma_begin": Float(gt=0),
    "sigma_end": Float(gt=0),
    "num_levels": Int(ge=2, le=10_000),
    "n_steps_each": Int(ge=1, le=1_000_000),
    "step_lr": Float(gt=0, le=100),
    "denoise": Bool(False),
    "langevin_step": Float(gt=0, le=100),
    "langevin_steps": OrAuto(Int(ge=1, le=10_000_000)),
    "sw_projections": Int(128, ge=1, le=100_000),
    "train": TRAIN,
}, checks=[sums_to_one("weights"), _mixture_checks, less_than("sigma_end", "sigma_begin")])


# ---------------------------------------------------------------------------------------- pieces
def make_mixture(p: dict):
    from scoresde.toy import GaussianMixture

    return GaussianMixture(p["weights"], p["means"], p["std"])


def toy_sigmas(p: dict):
    from scoresde.noise import geometric_sigmas

    return geometric_sigmas(p["sigma_begin"], p["sigma_end"], p["num_levels"]).float()


def uniform_init(n: int, p: dict, generator):
    import torch

    r = p["init_range"]
    return torch.rand((n, 2), generator=generator) * (2 * r) - r


def run_samplers(data_score, ncsn_score, p: dict, n: int, generator, mixture) -> dict:
    """i.i.d., Langevin (``data_score(x)``) and annealed Langevin (``ncsn_score(x, σ)``) samples, n each.

    Both chains start from the same Uniform[-r, r]^2 points. Returns {"iid", "langevin", "annealed_langevin"}.
    """
    from scoresde.sampling import annealed_langevin, langevin

    sigmas = toy_sigmas(p)
    steps = p["langevin_steps"] if p["langevin_steps"] != "auto" else len(sigmas) * p["n_steps_each"]
    x0 = uniform_init(n, p, generator)
    return {
        "iid": mixture.sample(n, generator=generator),
        "langevin": langevin(data_score, x0, p["langevin_step"], steps, generator=generator),
        "annealed_langevin": annealed_langevin(ncsn_score, x0, sigmas, p["n_steps_each"], step_lr=p["step_lr"],
                                               denoise=p["denoise"], generator=generator),
    }


def sample_metrics(samples: dict, mixture, reference, projections: int, seed: int) -> dict:
    """{"mode_weight_error": {method: …}, "sliced_wasserstein": {method: …}} against an i.i.d. reference."""
    import torch

    from scoresde.metrics import mode_weight_error, sliced_wasserstein

    out = {"mode_weight_error": {}, "sliced_wasserstein": {}}
    for method in METHODS:
        x = samples[method]
        out["mode_weight_error"][method] = mode_weight_error(x, mixture)
        g = torch.Generator().manual_seed(seed)  # the same directions for every method
        out["sliced_wasserstein"][method] = sliced_wasserstein(x, reference, projections, generator=g)
    return out


def train_score_net(p: dict, mixture, seed: int, run, ckpt_dir: str = CKPT_DIR, progress: bool = False):
    """A ScoreMLP trained by DSM on ``n_data`` i.i.d. mixture samples at the toy σ's; returns (model, seconds, loss)."""
    import torch

    from pipeline.io import fingerprint
    from pipeline.trainer import final_loss, train_model

    t = p["train"]
    sigmas = toy_sigmas(p)
    cfg = {"steps": t["steps"], "batch_size": t["batch_size"], "lr": t["lr"], "warmup": t["warmup"],
           "grad_clip": t["grad_clip"], "ema_decay": t["ema_decay"], "ckpt_every": t["ckpt_every"],
           "log_every": t["log_every"], "anneal_power": t["anneal_power"], "centered": False,
           "model": {"name": "mlp", **t["model"]}}
    g = torch.Generator().manual_seed(seed)
    data = mixture.sample(t["n_data"], generator=g)
    schedule = {"sigmas": [float(s) for s in sigmas]}
    fp = fingerprint("toy", cfg, schedule, repr(mixture), seed)
    # train_model builds the network from torch's global RNG (randomly seeded per process): seed it here,
    # without leaking the state to the caller, so that a rerun gives the same network.
    with Timer() as timer, torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model, ema, result = train_model("ncsn", cfg, schedule, data, "cpu", run, ckpt_dir, fp, seed=seed,
                                         progress=progress)
    if t["use_ema"] and ema is not None:
        ema.copy_to(model)
    loss = final_loss(result.losses)
    return model.eval(), timer.seconds, float("nan") if loss is None else loss


def plot_panels(mixture, samples: dict, field_score, title: str, path: str, p: dict) -> None:
    """Four panels: density (+ the score field plain Langevin follows), i.i.d., Langevin, annealed Langevin."""
    import numpy as np
    import torch

    from pipeline.figures import pyplot

    plt = pyplot()

    lim = max(p["init_range"], float(mixture.means.abs().max()) + 4 * mixture.std)
    grid = torch.linspace(-lim, lim, 200)
    xx, yy = torch.meshgrid(grid, grid, indexing="xy")
    pts = torch.stack([xx.reshape(-1), yy.reshape(-1)], dim=1)
    dens = mixture.log_prob(pts).exp().reshape(200, 200).numpy()
    q = torch.linspace(-lim, lim, 17)
    qx, qy = torch.meshgrid(q, q, indexing="xy")
    qpts = torch.stack([qx.reshape(-1), qy.reshape(-1)], dim=1)
    with torch.no_grad():
        s = field_score(qpts).float()
    s = s / s.norm(dim=1, keepdim=True).clamp_min(1e-8)  # directions only (magnitudes span decades)

    fig, axes = plt.subplots(1, 4, figsize=(16, 4.3))
    ax = axes[0]
    from matplotlib.colors import PowerNorm

    ax.imshow(dens, extent=(-lim, lim, -lim, lim), origin="lower", cmap="viridis", norm=PowerNorm(0.4))
    ax.quiver(qpts[:, 0].numpy(), qpts[:, 1].numpy(), s[:, 0].numpy(), s[:, 1].numpy(), color="white",
              width=0.004, alpha=0.8)
    ax.set_title("true density (arrows: score used by Langevin)", fontsize=9)
    names = {"iid": "i.i.d. samples", "langevin": "Langevin (no annealing)", "annealed_langevin": "annealed Langevin"}
    true_w = ", ".join(f"{w:.2f}" for w in mixture.weights.tolist())
    for ax, method in zip(axes[1:], METHODS):
        x = samples[method].detach().cpu().numpy()
        x = x[np.all(np.isfinite(x), axis=1)]
        k = min(len(x), 3000)
        ax.scatter(x[:k, 0], x[:k, 1], s=2, alpha=0.4)
        w = ", ".join(f"{v:.3f}" for v in mixture.mode_weights(torch.as_tensor(x)).tolist())
        ax.set_title(f"{names[method]}\nmode weights {w} (true {true_w})", fontsize=9)
    for ax in axes:
        ax.set_xlim(-lim, lim), ax.set_ylim(-lim, lim), ax.set_aspect("equal")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    save_figure(fig, path, dpi=80)


def flat_metrics(results: dict) -> dict[str, float]:
    """toy.json flattened for MLflow: ``exact_mode_weight_error_langevin`` …"""
    return {f"{kind}_{metric}_{method}": v for kind, d in results.items() for metric, m in d.items()
            for method, v in m.items()}




def run_experiment(p: dict, seed: int, run) -> tuple[dict, dict, float]:
    """Figure 1 with exact scores, then with a learned ScoreMLP; writes both figures.

    Returns (results in toy.json's layout, seconds per phase, the network's final training loss).
    """
    import torch

    from scoresde.models import get_score_fn

    mixture = make_mixture(p)
    results, seconds = {}, {}

    # exact scores: ∇ log p for Langevin, ∇ log p_σ (the perturbed mixture) for annealed Langevin
    g = torch.Generator().manual_seed(seed + 1)
    with Timer() as timer:
        samples = run_samplers(mixture.score, mixture.ncsn_score(), p, p["n"], g, mixture)
    seconds["exact_sampling"] = timer.seconds
    reference = mixture.sample(p["n"], generator=torch.Generator().manual_seed(seed + 2))
    results["exact"] = sample_metrics(samples, mixture, reference, p["sw_projections"], seed)
    plot_panels(mixture, samples, mixture.score, f"exact scores: {mixture}", FIGURES["exact"], p)

    # learned scores: a ScoreMLP trained by DSM on the same σ's
    model, seconds["training"], loss = train_score_net(p, mixture, seed, run)
    net = get_score_fn(model)
    sigma_L = float(toy_sigmas(p)[-1])

    def net_data_score(x):  # plain Langevin uses the network at its smallest noise level
        return net(x, torch.full((x.shape[0],), sigma_L, dtype=x.dtype))

    g = torch.Generator().manual_seed(seed + 3)
    with Timer() as timer, torch.no_grad():
        samples = run_samplers(net_data_score, net, p, p["n_learned"], g, mixture)
    seconds["learned_sampling"] = timer.seconds
    reference = mixture.sample(p["n_learned"], generator=torch.Generator().manual_seed(seed + 4))
    results["learned"] = sample_metrics(samples, mixture, reference, p["sw_projections"], seed)
    plot_panels(mixture, samples, net_data_score, f"learned scores: ScoreMLP trained by DSM "
                f"({p['train']['steps']} steps), σ = {p['sigma_begin']:g} → {p['sigma_end']:g}, L = {p['num_levels']}",
                FIGURES["learned"], p)
    return results, seconds, loss
