"""Score networks: noise-level embeddings, a conditional MLP for 2-D data, score functions, the factory.

The image network (:class:`scoresde.unet.ScoreUNet`) lives in :mod:`scoresde.unet`, the weight average
(:class:`scoresde.ema.EMA`) in :mod:`scoresde.ema`; :func:`build_model` builds either network.

Conventions (see CONTRACTS.md)
------------------------------
Every network is called as ``model(x, c)`` with ``x`` of shape ``(batch, *dims)`` and ``c`` of shape
``(batch,)``. What ``c`` is depends on the network's ``embedding`` attribute:

- ``embedding="fourier"``: ``c`` is the noise level σ; the network embeds ``log σ`` with a Gaussian Fourier
  projection (Tancik et al., 2020; used by NCSN++ for the VE SDE, Song et al., 2021, App. H).
- ``embedding="sinusoidal"``: ``c`` is the time ``t ∈ [0, 1]``; the network embeds ``1000·t`` with the
  transformer / DDPM sinusoidal embedding (Vaswani et al., 2017; Ho et al., 2020, App. B; DDPM++ for the
  VP and sub-VP SDEs, Song et al., 2021).

The raw output has ``x``'s shape and is *not* scaled. :func:`get_score_fn` turns it into a score:

- NCSN (no SDE): ``s(x, σ) = model(x, σ) / σ`` — NCSNv2 technique 3 (Song & Ermon, 2020, Sec. 3.3:
  ``s_θ(x, σ) = s_θ(x) / σ``), so the network's target ``-z`` has unit scale at every noise level.
- SDE: ``s(x, t) = model(x, cond(t)) / std(t)`` with ``std`` from ``sde.marginal_prob``; ``cond = std`` for a
  Fourier-embedded network (VE: the same 1/σ parametrisation) and ``cond = t`` for a sinusoidal one
  (VP / sub-VP: the network predicts ``-ε``, the DDPM ε-parametrisation of Ho et al., 2020, Eq. 11, since
  the score of ``x_t = mean + std·ε`` is ``-ε / std``).

Weights are initialised with torch's default initialisers, which use torch's global RNG; pass ``seed`` to
:func:`build_model` to build reproducibly without touching the caller's global RNG state.
"""

from __future__ import annotations

import copy
import inspect
import math
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn

__all__ = [
    "GaussianFourierProjection",
    "SinusoidalEmbedding",
    "ScoreMLP",
    "get_score_fn",
    "build_model",
    "clone_model",
    "MODEL_NAMES",
    "PRECONDS",
    "EMBEDDINGS",
]

EMBEDDINGS = ("fourier", "sinusoidal")


# ----------------------------------------------------------------------------------------------------
# Noise-level embeddings
# ----------------------------------------------------------------------------------------------------


def _as_batch(c: torch.Tensor | float, x: torch.Tensor) -> torch.Tensor:
    """Return ``c`` as a 1-D tensor of shape ``(batch,)`` on ``x``'s device (a scalar is broadcast)."""
    c = torch.as_tensor(c, device=x.device)
    if c.ndim == 0:
        c = c.expand(x.shape[0])
    if c.ndim != 1 or c.shape[0] != x.shape[0]:
        raise ValueError(f"conditioning must have shape (batch,) = ({x.shape[0]},), got {tuple(c.shape)}")
    return c


class GaussianFourierProjection(nn.Module):
    """Random Fourier features of ``log σ``: ``[sin(2π W log σ), cos(2π W log σ)]``, ``W ~ N(0, scale²)``.

    Tancik et al. (2020), "Fourier features let networks learn high frequency functions"; NCSN++ embeds
    the VE noise level this way with ``scale=16`` (Song et al., 2021, App. H). ``W`` is a fixed buffer.
    """

    def __init__(self, emb_dim: int = 64, scale: float = 16.0):
        super().__init__()
        if emb_dim % 2:
            raise ValueError(f"emb_dim must be even for the Fourier projection, got {emb_dim}")
        self.register_buffer("W", torch.randn(emb_dim // 2) * scale)

    def forward(self, sigma: torch.Tensor) -> torch.Tensor:
        proj = torch.log(sigma).to(self.W.dtype)[:, None] * self.W[None, :] * (2.0 * math.pi)
        return torch.cat([torch.sin(proj), torch.cos(proj)], dim=-1)


class SinusoidalEmbedding(nn.Module):
    """DDPM sinusoidal embedding of ``1000·t`` (Ho et al., 2020; transformer embedding of Vaswani et al.).

    ``emb = [sin(s·f_k), cos(s·f_k)]``, ``f_k = 10000^(-k/(half-1))``, ``s = 1000·t`` — the discrete DDPM
    step index for t ∈ [0, 1] as in score_sde's DDPM++ (``get_timestep_embedding``).
    """

    def __init__(self, emb_dim: int = 64, max_positions: float = 10000.0, scale: float = 1000.0):
        super().__init__()
        if emb_dim % 2 or emb_dim < 4:
            raise ValueError(f"emb_dim must be even and >= 4 for the sinusoidal embedding, got {emb_dim}")
        half = emb_dim // 2
        freqs = torch.exp(-math.log(max_positions) * torch.arange(half, dtype=torch.float32) / (half - 1))
        self.register_buffer("freqs", freqs)
        self.scale = float(scale)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        arg = (t * self.scale).to(self.freqs.dtype)[:, None] * self.freqs[None, :]
        return torch.cat([torch.sin(arg), torch.cos(arg)], dim=-1)


def _make_embedding(embedding: str, emb_dim: int, fourier_scale: float) -> nn.Module:
    if embedding == "fourier":
        return GaussianFourierProjection(emb_dim, scale=fourier_scale)
    if embedding == "sinusoidal":
        return SinusoidalEmbedding(emb_dim)
    raise ValueError(f"embedding must be one of {EMBEDDINGS}, got {embedding!r}")


# ----------------------------------------------------------------------------------------------------
# ScoreMLP
# ----------------------------------------------------------------------------------------------------


class ScoreMLP(nn.Module):
    """Noise-conditional MLP for low-dimensional data (the toy 2-D mixture).

    ``h = W_in x``; for each of ``n_layers`` hidden layers ``h = W_l SiLU(h + A_l e(c))`` where ``e(c)`` is the
    embedded noise level (Fourier of log σ or sinusoidal of 1000·t, see module docstring); output
    ``W_out SiLU(h)`` of shape ``(batch, dim)``, unscaled — :func:`get_score_fn` divides by σ (NCSNv2
    technique 3, Song & Ermon, 2020) or by std(t) (Song et al., 2021).
    """

    def __init__(
        self,
        dim: int,
        hidden: int = 128,
        n_layers: int = 3,
        embedding: str = "fourier",
        emb_dim: int = 64,
        fourier_scale: float = 1.0,
    ):
        super().__init__()
        if dim < 1 or hidden < 1 or n_layers < 1:
            raise ValueError(f"dim, hidden and n_layers must be >= 1, got {dim}, {hidden}, {n_layers}")
        self.dim = int(dim)
        self.embedding = embedding
        self.embed = _make_embedding(embedding, emb_dim, fourier_scale)
        self.emb_mlp = nn.Sequential(nn.Linear(emb_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.inp = nn.Linear(dim, hidden)
        self.emb_proj = nn.ModuleList(nn.Linear(hidden, hidden) for _ in range(n_layers))
        self.layers = nn.ModuleList(nn.Linear(hidden, hidden) for _ in range(n_layers))
        self.out = nn.Linear(hidden, dim)
        self.act = nn.SiLU()

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        c = _as_batch(c, x)
        temb = self.emb_mlp(self.embed(c)).to(x.dtype)
        h = self.inp(x)
        for proj, lin in zip(self.emb_proj, self.layers):
            h = lin(self.act(h + proj(temb)))
        return self.out(self.act(h))


# ----------------------------------------------------------------------------------------------------
# Score functions
# ----------------------------------------------------------------------------------------------------


def _unwrap(model: nn.Module) -> nn.Module:
    """The underlying module of a DDP/DataParallel wrapper or a ``torch.compile``d model."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model


def _expand_like(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Reshape a per-sample ``(batch,)`` tensor to broadcast against ``x`` (dtype and device of ``x``)."""
    v = torch.as_tensor(v, device=x.device)
    if v.ndim == 0:
        v = v.expand(x.shape[0])
    v = v.reshape(x.shape[0], *([1] * (x.ndim - 1)))
    return v.to(x.dtype)


def get_score_fn(model: nn.Module, sde: Any = None) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Turn a raw network into a score function.

    - ``sde is None`` (NCSN, Song & Ermon, 2019): ``score_fn(x, sigma) = model(x, sigma) / sigma`` —
      NCSNv2 technique 3 (Song & Ermon, 2020): the network output is divided by σ.
    - ``sde`` given (any object with ``marginal_prob(x, t) -> (mean, std)``, Song et al., 2021):
      ``score_fn(x, t) = model(x, cond) / std(t)`` with ``cond = std(t)`` when the network embeds σ
      (``embedding == "fourier"``: VE) and ``cond = t`` when it embeds time (``"sinusoidal"``: VP/sub-VP,
      where the network predicts ``-ε`` (Ho et al., 2020) and ``-ε/std`` is the score of the marginal).

    - an EDM-preconditioned model (``build_model({..., "precond": "edm"})``, :class:`scoresde.edm.EDMPrecond`,
      a denoiser D(x; σ)): ``score_fn(x, sigma) = (D(x; σ) − x) / σ²`` without ``sde`` (Karras et al., 2022,
      Eq. 3) and :func:`scoresde.edm.edm_sde_score` with one (``score_fn(x, t)`` of the SDE's marginals).

    ``sigma``/``t`` have shape ``(batch,)`` (a scalar is broadcast). The model's train/eval mode is left
    as is; wrap calls in ``torch.no_grad()`` when sampling.
    """
    if getattr(_unwrap(model), "precond", None) == "edm":
        # An EDM denoiser (scoresde.edm.EDMPrecond): score = (D − x)/σ² (Karras et al., 2022, Eq. 3), in σ or in t.
        from scoresde.edm import edm_denoiser_score, edm_sde_score

        return edm_denoiser_score(model) if sde is None else edm_sde_score(model, sde)

    embedding = getattr(_unwrap(model), "embedding", None)
    if embedding not in EMBEDDINGS:
        raise ValueError(f"model must have an `embedding` attribute in {EMBEDDINGS}, got {embedding!r}")

    if sde is None:

        def ncsn_score_fn(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
            sigma = _as_batch(sigma, x)
            return model(x, sigma) / _expand_like(sigma, x)

        return ncsn_score_fn

    if not hasattr(sde, "marginal_prob"):
        raise TypeError(f"sde must provide marginal_prob(x, t) -> (mean, std), got {type(sde).__name__}")

    def sde_score_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        t = _as_batch(t, x)
        _, std = sde.marginal_prob(x, t)
        std = torch.as_tensor(std, device=x.device)
        if std.ndim > 1:  # tolerate std already shaped for broadcasting
            std = std.reshape(x.shape[0], -1)[:, 0]
        cond = std if embedding == "fourier" else t
        return model(x, cond) / _expand_like(std, x)

    return sde_score_fn


# ----------------------------------------------------------------------------------------------------
# Factory
# ----------------------------------------------------------------------------------------------------

MODEL_NAMES = ("mlp", "unet")
# Optional wrapper around the network: None (the raw network; get_score_fn scales it) or "edm"
# (scoresde.edm.EDMPrecond: the EDM denoiser, Karras et al., 2022, Eq. 7).
PRECONDS = (None, "edm")


def _model_class(name: str) -> type[nn.Module]:
    if name == "mlp":
        return ScoreMLP
    # Imported here, not at the top: scoresde.unet imports the embeddings from this module.
    from scoresde.unet import ScoreUNet

    return ScoreUNet


def _valid_keys(cls: type) -> list[str]:
    return [p for p in inspect.signature(cls.__init__).parameters if p != "self"]


def build_model(config: Mapping[str, Any], data_shape: Sequence[int], seed: int | None = None) -> nn.Module:
    """Build a score network from ``config = {"name": "mlp" | "unet", **kwargs}`` for data of ``data_shape``.

    ``data_shape`` is the shape of one example: ``(D,)`` → :class:`ScoreMLP` (``dim = D``), ``(C, H, W)`` →
    :class:`scoresde.unet.ScoreUNet` (``in_channels = C``, ``image_size = H = W``). ``name`` may be omitted
    (it is inferred from the shape). Unknown names/keys, or keys that contradict ``data_shape``, raise
    ``ValueError`` naming them. Lists (from YAML) are accepted for tuple arguments. With ``seed`` the
    weights are drawn from ``torch.manual_seed(seed)`` inside ``torch.random.fork_rng`` (the caller's
    global RNG state is left untouched).

    ``precond: edm`` (with optional ``sigma_data``, default 0.5) wraps the network in
    :class:`scoresde.edm.EDMPrecond`, the EDM denoiser D(x; σ) (Karras et al., 2022, Eq. 7); the same config
    rebuilds it for ``load_state_dict`` (its weights are the network's, under ``net.``).
    """
    data_shape = tuple(int(s) for s in data_shape)
    kwargs = dict(config)
    precond = kwargs.pop("precond", None)
    sigma_data = kwargs.pop("sigma_data", None)
    if precond not in PRECONDS:
        raise ValueError(f"model config key 'precond': unknown preconditioning {precond!r}; valid: {list(PRECONDS)}")
    if sigma_data is not None and precond != "edm":
        raise ValueError("model config key 'sigma_data' is only valid with precond: edm")
    if len(data_shape) == 1:
        inferred = "mlp"
    elif len(data_shape) == 3:
        inferred = "unet"
    else:
        raise ValueError(f"data_shape must be (D,) or (C, H, W), got {data_shape}")
    name = kwargs.pop("name", inferred)
    if name not in MODEL_NAMES:
        raise ValueError(f"model config key 'name': unknown model {name!r}; valid names: {sorted(MODEL_NAMES)}")
    if name != inferred:
        raise ValueError(f"model config key 'name': {name!r} does not fit data of shape {data_shape} "
                         f"(use {inferred!r})")
    cls = _model_class(name)
    valid = _valid_keys(cls)
    for key in kwargs:
        if key not in valid:
            raise ValueError(f"model config key {key!r} is not valid for {name!r}; valid keys: "
                             f"{valid + ['precond', 'sigma_data']}")

    if name == "mlp":
        derived = {"dim": data_shape[0]}
    else:
        c, h, w = data_shape
        if h != w:
            raise ValueError(f"ScoreUNet needs square images, got data_shape {data_shape}")
        derived = {"in_channels": c, "image_size": h}
    for key, value in derived.items():
        if key in kwargs and int(kwargs[key]) != value:
            raise ValueError(f"model config key {key!r}={kwargs[key]!r} contradicts data_shape {data_shape} "
                             f"(expected {value})")
        kwargs[key] = value
    for key in ("ch_mult", "attn_resolutions"):
        if key in kwargs and isinstance(kwargs[key], list):
            kwargs[key] = tuple(kwargs[key])

    if seed is None:
        net = cls(**kwargs)
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(seed))
            net = cls(**kwargs)
    if precond == "edm":
        from scoresde.edm import EDMPrecond

        return EDMPrecond(net, 0.5 if sigma_data is None else float(sigma_data))
    return net


def clone_model(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` (e.g. to hold EMA weights for sampling)."""
    return copy.deepcopy(_unwrap(model))
