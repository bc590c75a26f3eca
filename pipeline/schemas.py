"""params.yaml sections shared by several stages, in the schema language of :mod:`pipeline.params`.

- ``MODEL_KINDS``: the score models of the per-model matrix (dvc.yaml's ``vars: sdes`` must list the
  same; a test keeps them equal). NCSN is the discrete-σ model of Song & Ermon (2019), the others the
  SDEs of Song et al. (2021).
- ``train_section(kind)``: ``train.<kind>`` (read by ``train@<kind>``; the ablation's ``ablation.train``
  is ``train_section("ncsn")``);
- ``sample_section(kind)``: ``sample.<kind>`` (also ``ablation.sample`` and each ``samplers.<name>``);
- ``PREPARE``, ``EVALUATE``: read by ``prepare`` / ``fid_ref`` and ``fid_ref`` / ``evaluate@*``.

Choices and the device pattern come from the library (``scoresde.distributed``, ``scoresde.fastpath``),
so params validation and ``TrainConfig`` accept the same values.
"""
from __future__ import annotations

from pipeline.params import (Bool, Float, Int, List, Optional, OrAuto, Section, Str, sums_to_one)
from scoresde.distributed import DEVICE_PATTERN
from scoresde.fastpath import AMP_DTYPES, OPTIMIZER_IMPLS

MODEL_KINDS = ("ncsn", "ve", "vp", "subvp", "edm")
SDE_KINDS = ("ve", "vp", "subvp")  # the SDEs of Song et al. (2021) with their own forward processes
LANGEVIN_KINDS = ("ncsn", "ve", "edm")  # samplers in σ-space need a σ-conditioned score
SAMPLERS = ("annealed_langevin", "langevin", "pc", "ode", "heun", "dpm_solver")
DATASETS = ("toy", "digits", "mnist", "cifar10", "celeba")

DEVICE = Str(pattern=DEVICE_PATTERN, hint="'auto', 'cpu', 'cuda' or 'cuda:N'")

MODEL = Section({
    "name": Str(choices=("unet", "mlp")),
    "embedding": Str(choices=("fourier", "sinusoidal")),
    # U-Net
    "ch": Optional(Int(ge=4, le=1024)),
    "ch_mult": Optional(List(Int(ge=1, le=16), min_len=1, max_len=6)),
    "num_res_blocks": Optional(Int(ge=1, le=8)),
    "attn_resolutions": Optional(List(Int(ge=1))),
    "dropout": Optional(Float(ge=0, lt=1)),
    # MLP
    "hidden": Optional(Int(ge=4, le=8192)),
    "n_layers": Optional(Int(ge=1, le=32)),
})

# Training speed knobs: they change how fast, not what is trained (left out of the checkpoint fingerprint).
FAST_PATH = {
    "amp": OrAuto(Bool(), default="auto"),                        # autocast on CUDA (auto = off)
    "amp_dtype": Str("auto", choices=AMP_DTYPES),                 # auto = bf16 where supported
    "channels_last": OrAuto(Bool(), default="auto"),              # auto = on for CUDA image batches under amp
    "compile": Bool(False),                                       # torch.compile the training forward
    "optimizer_impl": Str("auto", choices=OPTIMIZER_IMPLS),       # auto = fused Adam on CUDA
}


def train_section(kind: str) -> Section:
    fields = {
        "steps": Int(ge=1, le=10_000_000),
        "batch_size": Int(ge=1, le=65_536),
        "lr": Float(gt=0, le=1),
        "warmup": Int(0, ge=0),
        "grad_clip": Optional(Float(gt=0)),
        "ema_decay": Float(ge=0, lt=1),
        "ema_warmup": Bool(True),  # decay_t = min(ema_decay, (1 + t) / (10 + t)) (score_sde)
        "ckpt_every": Int(ge=1),
        "log_every": Int(ge=1),
        "centered": Bool(),
        "model": MODEL,
        **FAST_PATH,
    }
    if kind == "ncsn":
        fields["anneal_power"] = Float(2.0, ge=0, le=4)
    elif kind == "edm":  # EDM's training distribution of σ: ln σ ~ N(P_mean, P_std²) (Karras et al., 2022, Table 1)
        fields["P_mean"] = Float(-1.2)
        fields["P_std"] = Float(1.2, gt=0)
    else:
        fields["likelihood_weighting"] = Bool(False)
    return Section(fields)


def sample_section(kind: str) -> Section:
    def compatible(d: dict):
        if d["sampler"] in ("annealed_langevin", "langevin") and kind not in LANGEVIN_KINDS:
            return "sampler", f"{d['sampler']!r} needs a σ-conditioned model (ncsn or ve), not {kind}; use pc, ode or heun"
        # NCSN with pc / ode / heun / dpm_solver: its σ-conditioned network read as a VE model over [σ_L, σ_1]
        # (pipeline.schedule.make_sde), queried between the levels it was trained on.
        return None

    return Section({
        "sampler": Str(choices=SAMPLERS),
        "n": Int(ge=1, le=10_000_000),
        "batch_size": Int(ge=1, le=1_000_000),
        "use_ema": Bool(True),
        "denoise": Bool(True),
        # annealed / fixed-σ Langevin
        "n_steps_each": Int(100, ge=1, le=100_000),
        "step_lr": OrAuto(Float(gt=0, le=10), default=4e-5),  # auto = NCSNv2 technique 4 (pipeline.generation)
        "sigma": Optional(Float(gt=0)),  # fixed-σ Langevin: the σ used (default σ_L)
        # predictor-corrector: N discretisation steps of the reverse SDE
        "steps": Int(1000, ge=1, le=100_000),
        "predictor": Str("reverse_diffusion", choices=("euler_maruyama", "reverse_diffusion", "ancestral", "none")),
        "corrector": Str("langevin", choices=("langevin", "ald", "none")),
        "snr": Float(0.16, gt=0, le=10),
        "n_corrector_steps": Int(1, ge=0, le=100),
        # probability-flow ODE
        "rtol": Float(1e-5, gt=0, lt=1),
        "atol": Float(1e-5, gt=0, lt=1),
        # Heun (EDM, Karras et al. 2022 Alg. 1; with S_churn > 0 the stochastic Alg. 2)
        "num_steps": Int(18, ge=2, le=10_000),
        "rho": Float(7.0, gt=0),
        "S_churn": Float(0.0, ge=0),
        "S_tmin": Float(0.0, ge=0),
        "S_tmax": Float(1e9, gt=0),  # "infinity": any σ gets churn
        "S_noise": Float(1.0, gt=0),
    }, checks=[compatible])


def sample_defaults() -> dict:
    """The defaults of a ``sample.<kind>`` section (the samplers stage starts from these)."""
    return {k: spec.default for k, spec in sample_section("ve").fields.items() if spec.default is not ...}


def _toy_checks(d: dict):
    if len(d["means"]) != len(d["weights"]):
        return "means", f"expected one mean per weight ({len(d['weights'])}), got {len(d['means'])}"
    if len({len(m) for m in d["means"]}) != 1:
        return "means", "expected all means to have the same dimension"
    return None


MIXTURE = {  # a Gaussian mixture Σ_k w_k N(μ_k, std² I): prepare.toy and the toy stage's density
    "weights": List(Float(gt=0, le=1), min_len=1),
    "means": List(List(Float(), min_len=1), min_len=1),
    "std": Float(gt=0),
    "n": Int(ge=10, le=10_000_000),
}

PREPARE = Section({
    "dataset": Str(choices=DATASETS),
    "root": Str("data/raw"),
    "download": Bool(False),
    "toy": Section(MIXTURE, checks=[sums_to_one("weights"), _toy_checks]),
})

EVALUATE = Section({
    "device": DEVICE,
    "batch_size": Int(256, ge=1, le=100_000),
    "n": OrAuto(Int(ge=2), default="auto"),
    "reference_split": Str("train", choices=("train", "test", "all")),
    "n_reference": Int(10_000, ge=2, le=10_000_000),
    "kid_subsets": Int(100, ge=1, le=100_000),
    "kid_subset_size": Int(1000, ge=2, le=1_000_000),
    "inception_weights": Optional(Str()),
    "inception_download": Bool(True),
    "sw_projections": Int(128, ge=1, le=100_000),
})

CLASSIFIER = Section({  # the small CNN whose features are the FID / KID extractor "<dataset>_cnn"
    "device": DEVICE,
    "epochs": Int(30, ge=1, le=10_000),
    "batch_size": Int(128, ge=1, le=1_000_000),
    "lr": Float(2e-3, gt=0, le=1),
    "weight_decay": Float(5e-4, ge=0, le=1),
    "label_smoothing": Float(0.1, ge=0, lt=1),
    "shift": Int(1, ge=0, le=8),
    "width": Int(32, ge=1, le=1024),
    "feature_dim": Int(128, ge=2, le=8192),
    "min_accuracy": OrAuto(Float(ge=0, le=1), default="auto"),
    "threads": OrAuto(Int(ge=1, le=1024), default=1),
})
# Test accuracy a usable extractor must reach, per dataset (classifier.min_accuracy: auto).
MIN_ACCURACY = {"digits": 0.95, "mnist": 0.97, "cifar10": 0.6}
