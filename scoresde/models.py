"""Score networks: a conditional MLP for 2-D data, a small NCSN++/DDPM++-style U-Net for images, EMA.

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

import contextlib
import copy
import inspect
import math
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "GaussianFourierProjection",
    "SinusoidalEmbedding",
    "ScoreMLP",
    "ScoreUNet",
    "EMA",
    "get_score_fn",
    "build_model",
    "UNET_PRESETS",
    "EMBEDDINGS",
]

EMBEDDINGS = ("fourier", "sinusoidal")

# Small configurations that divide each image size without padding (resolution halves at each level but
# the last). They are CPU-sized starting points (a training step well under a second up to 32×32); the papers' configurations (NCSN++: ch=128,
# ch_mult=(1, 2, 2, 2), 4 blocks, attention at 16) are reachable with the same keys on a GPU.
UNET_PRESETS: dict[int, dict[str, Any]] = {
    8: {"ch": 32, "ch_mult": (1, 2), "num_res_blocks": 1, "attn_resolutions": (4,)},  # digits: 8 → 4
    28: {"ch": 32, "ch_mult": (1, 2, 2), "num_res_blocks": 1, "attn_resolutions": (7,)},  # mnist: 28 → 14 → 7
    32: {"ch": 32, "ch_mult": (1, 2, 2, 2), "num_res_blocks": 1, "attn_resolutions": (8,)},  # cifar10: 32 → 4
    64: {"ch": 32, "ch_mult": (1, 1, 2, 2, 2), "num_res_blocks": 1, "attn_resolutions": (8,)},  # celeba: 64 → 4
}


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
# ScoreUNet building blocks (DDPM / NCSN++ / DDPM++)
# ----------------------------------------------------------------------------------------------------


def _num_groups(channels: int) -> int:
    """GroupNorm groups as in score_sde (``min(C // 4, 32)``), reduced until it divides C."""
    g = max(1, min(channels // 4, 32))
    while channels % g:
        g -= 1
    return g


def _zero_(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class ResBlock(nn.Module):
    """DDPM residual block (Ho et al., 2020, App. B) with NCSN++/DDPM++'s skip rescaling by 1/√2.

    ``h = Conv(SiLU(GN(x))) + Dense(SiLU(temb)); h = Conv(Dropout(SiLU(GN(h)))); out = (skip(x) + h)/√2``,
    the second convolution zero-initialised (score_sde's ``init_scale=0``) so each block starts as identity.
    """

    def __init__(self, in_ch: int, out_ch: int, temb_dim: int, dropout: float = 0.0):
        super().__init__()
        self.norm1 = nn.GroupNorm(_num_groups(in_ch), in_ch, eps=1e-6)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.temb = nn.Linear(temb_dim, out_ch)
        self.norm2 = nn.GroupNorm(_num_groups(out_ch), out_ch, eps=1e-6)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = _zero_(nn.Conv2d(out_ch, out_ch, 3, padding=1))
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.temb(F.silu(temb))[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return (self.skip(x) + h) * (1.0 / math.sqrt(2.0))


class AttnBlock(nn.Module):
    """Single-head spatial self-attention (DDPM / NCSN++ ``AttnBlock``), residual with 1/√2 rescaling."""

    def __init__(self, ch: int):
        super().__init__()
        self.norm = nn.GroupNorm(_num_groups(ch), ch, eps=1e-6)
        self.qkv = nn.Conv2d(ch, 3 * ch, 1)
        self.proj = _zero_(nn.Conv2d(ch, ch, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, hh, ww = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, c, hh * ww).unbind(1)  # each (b, c, n)
        h = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        h = self.proj(h.transpose(1, 2).reshape(b, c, hh, ww))
        return (x + h) * (1.0 / math.sqrt(2.0))


class Downsample(nn.Module):
    """Strided 3×3 convolution halving the resolution (DDPM ``Downsample(with_conv=True)``)."""

    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest-neighbour ×2 upsampling followed by a 3×3 convolution (DDPM ``Upsample(with_conv=True)``)."""

    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class ScoreUNet(nn.Module):
    """A small NCSN++/DDPM++-style U-Net score network (Song et al., 2021, App. H; Ho et al., 2020, App. B).

    Layout: 3×3 input conv to ``ch`` channels; for each level ``i`` (resolution ``image_size / 2**i``)
    ``num_res_blocks`` :class:`ResBlock` with ``ch * ch_mult[i]`` channels, self-attention after each when
    that resolution is listed in ``attn_resolutions``, and a strided-conv downsample except at the last
    level; a middle ResBlock–Attention–ResBlock; a mirrored up path with ``num_res_blocks + 1`` blocks per
    level fed by skip connections (concatenation), nearest+conv upsampling; GroupNorm, SiLU and a
    zero-initialised 3×3 output conv (so the untrained network outputs 0).

    The noise level enters every residual block through an embedding MLP (Fourier of log σ for VE/NCSN,
    sinusoidal of 1000·t for VP/sub-VP, see module docstring). Residual and attention branches are
    rescaled by 1/√2 (NCSN++/DDPM++ ``skip_rescale``). The output has ``x``'s shape and is not scaled.

    Resolutions must divide: ``image_size`` must be divisible by ``2 ** (len(ch_mult) - 1)`` (8: (1, 2);
    28: (1, 2, 2); 32: (1, 2, 2, 2); 64: (1, 1, 2, 2, 2) — see :data:`UNET_PRESETS`).
    """

    def __init__(
        self,
        in_channels: int = 1,
        image_size: int = 8,
        ch: int = 32,
        ch_mult: Sequence[int] = (1, 2),
        num_res_blocks: int = 1,
        attn_resolutions: Sequence[int] = (4,),
        dropout: float = 0.0,
        embedding: str = "fourier",
        emb_dim: int | None = None,
        fourier_scale: float = 16.0,
    ):
        super().__init__()
        ch_mult = tuple(int(m) for m in ch_mult)
        attn_resolutions = tuple(int(r) for r in attn_resolutions)
        if in_channels < 1 or image_size < 1 or ch < 1 or num_res_blocks < 1 or not ch_mult:
            raise ValueError("in_channels, image_size, ch, num_res_blocks must be >= 1 and ch_mult non-empty")
        if any(m < 1 for m in ch_mult):
            raise ValueError(f"ch_mult entries must be >= 1, got {ch_mult}")
        factor = 2 ** (len(ch_mult) - 1)
        if image_size % factor:
            raise ValueError(
                f"image_size={image_size} is not divisible by 2**(len(ch_mult)-1)={factor} "
                f"(ch_mult={ch_mult}); choose fewer levels (the U-Net does not pad)"
            )
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.in_channels = int(in_channels)
        self.image_size = int(image_size)
        self.embedding = embedding
        self.resolutions = tuple(image_size // 2**i for i in range(len(ch_mult)))
        emb_dim = int(emb_dim) if emb_dim is not None else ch
        temb_dim = 4 * ch

        self.embed = _make_embedding(embedding, emb_dim, fourier_scale)
        self.temb_mlp = nn.Sequential(nn.Linear(emb_dim, temb_dim), nn.SiLU(), nn.Linear(temb_dim, temb_dim))
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)

        # Down path; `skip_chs` records the channels of every tensor pushed for the up path.
        self.down = nn.ModuleList()
        skip_chs = [ch]
        cur = ch
        for i, mult in enumerate(ch_mult):
            res = self.resolutions[i]
            out = ch * mult
            for _ in range(num_res_blocks):
                self.down.append(ResBlock(cur, out, temb_dim, dropout))
                cur = out
                if res in attn_resolutions:
                    self.down.append(AttnBlock(cur))
                skip_chs.append(cur)
            if i != len(ch_mult) - 1:
                self.down.append(Downsample(cur))
                skip_chs.append(cur)

        self.mid = nn.ModuleList(
            [ResBlock(cur, cur, temb_dim, dropout), AttnBlock(cur), ResBlock(cur, cur, temb_dim, dropout)]
        )

        self.up = nn.ModuleList()
        for i in reversed(range(len(ch_mult))):
            res = self.resolutions[i]
            out = ch * ch_mult[i]
            for _ in range(num_res_blocks + 1):
                self.up.append(ResBlock(cur + skip_chs.pop(), out, temb_dim, dropout))
                cur = out
                if res in attn_resolutions:
                    self.up.append(AttnBlock(cur))
            if i != 0:
                self.up.append(Upsample(cur))
        assert not skip_chs

        self.norm_out = nn.GroupNorm(_num_groups(cur), cur, eps=1e-6)
        self.conv_out = _zero_(nn.Conv2d(cur, in_channels, 3, padding=1))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != self.in_channels or x.shape[-2:] != (self.image_size, self.image_size):
            raise ValueError(
                f"expected x of shape (batch, {self.in_channels}, {self.image_size}, {self.image_size}), "
                f"got {tuple(x.shape)}"
            )
        c = _as_batch(c, x)
        temb = self.temb_mlp(self.embed(c)).to(x.dtype)

        h = self.conv_in(x)
        hs = [h]
        for layer in self.down:
            if isinstance(layer, ResBlock):
                h = layer(h, temb)
                hs.append(h)
            elif isinstance(layer, AttnBlock):
                h = layer(h)
                hs[-1] = h
            else:  # Downsample
                h = layer(h)
                hs.append(h)
        for layer in self.mid:
            h = layer(h, temb) if isinstance(layer, ResBlock) else layer(h)
        for layer in self.up:
            if isinstance(layer, ResBlock):
                h = layer(torch.cat([h, hs.pop()], dim=1), temb)
            else:
                h = layer(h)
        return self.conv_out(F.silu(self.norm_out(h)))


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

    ``sigma``/``t`` have shape ``(batch,)`` (a scalar is broadcast). The model's train/eval mode is left
    as is; wrap calls in ``torch.no_grad()`` when sampling.
    """
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
# EMA
# ----------------------------------------------------------------------------------------------------


class EMA:
    """Exponential moving average of a model's weights (Polyak averaging as used by NCSNv2 technique 5,
    Song & Ermon, 2020, and by DDPM / score SDE with decay 0.999–0.9999).

    ``shadow ← decay·shadow + (1 − decay)·θ`` for every floating-point parameter at :meth:`update`; buffers
    (and non-float entries) are copied. The shadow holds *every* entry of ``model.state_dict()``, so
    ``model.load_state_dict(ema.state_dict()["shadow"])`` loads the averaged weights. With
    ``use_num_updates=True`` the decay warms up as ``min(decay, (1 + n) / (10 + n))`` (score_sde's EMA).
    Deterministic: no randomness, updates in place with fixed arithmetic.
    """

    def __init__(self, model: nn.Module, decay: float = 0.999, use_num_updates: bool = False):
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay must be in [0, 1], got {decay}")
        self.decay = float(decay)
        self.use_num_updates = bool(use_num_updates)
        self.num_updates = 0
        model = _unwrap(model)
        self._param_names = {name for name, p in model.named_parameters() if p.dtype.is_floating_point}
        self.shadow: dict[str, torch.Tensor] = {
            k: v.detach().clone() for k, v in model.state_dict().items()
        }
        self._backup: dict[str, torch.Tensor] | None = None

    def _current_decay(self) -> float:
        if self.use_num_updates:
            return min(self.decay, (1.0 + self.num_updates) / (10.0 + self.num_updates))
        return self.decay

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """One EMA step towards ``model``'s current weights."""
        self.num_updates += 1
        decay = self._current_decay()
        state = _unwrap(model).state_dict()
        for k, v in state.items():
            s = self.shadow[k]
            if k in self._param_names:
                s.mul_(decay).add_(v.detach().to(s.device, s.dtype), alpha=1.0 - decay)
            else:
                s.copy_(v.detach())

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Overwrite ``model``'s weights (and buffers) with the EMA shadow."""
        _unwrap(model).load_state_dict(self.shadow)

    @torch.no_grad()
    def store(self, model: nn.Module) -> None:
        """Keep a copy of ``model``'s current weights for :meth:`restore`."""
        self._backup = {k: v.detach().clone() for k, v in _unwrap(model).state_dict().items()}

    @torch.no_grad()
    def restore(self, model: nn.Module) -> None:
        """Put back the weights saved by :meth:`store`."""
        if self._backup is None:
            raise RuntimeError("EMA.restore called without a preceding store")
        _unwrap(model).load_state_dict(self._backup)
        self._backup = None

    @contextlib.contextmanager
    def average_parameters(self, model: nn.Module) -> Iterator[nn.Module]:
        """Context manager: evaluate ``model`` with the EMA weights, restoring its own weights on exit."""
        self.store(model)
        self.copy_to(model)
        try:
            yield model
        finally:
            self.restore(model)

    def to(self, device: torch.device | str) -> "EMA":
        self.shadow = {k: v.to(device) for k, v in self.shadow.items()}
        return self

    def state_dict(self) -> dict[str, Any]:
        """Tensors, floats and ints only: loadable with ``torch.load(..., weights_only=True)``."""
        return {
            "decay": self.decay,
            "num_updates": self.num_updates,
            "use_num_updates": self.use_num_updates,
            "shadow": {k: v.clone() for k, v in self.shadow.items()},
        }

    @torch.no_grad()
    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        shadow = state["shadow"]
        missing = set(self.shadow) - set(shadow)
        unexpected = set(shadow) - set(self.shadow)
        if missing or unexpected:
            raise KeyError(f"EMA state does not match the model: missing {sorted(missing)}, "
                           f"unexpected {sorted(unexpected)}")
        for k, v in shadow.items():
            self.shadow[k].copy_(v)
        self.decay = float(state.get("decay", self.decay))
        self.num_updates = int(state.get("num_updates", 0))
        self.use_num_updates = bool(state.get("use_num_updates", self.use_num_updates))


# ----------------------------------------------------------------------------------------------------
# Factory
# ----------------------------------------------------------------------------------------------------

MODELS: dict[str, type[nn.Module]] = {"mlp": ScoreMLP, "unet": ScoreUNet}


def _valid_keys(cls: type) -> list[str]:
    return [p for p in inspect.signature(cls.__init__).parameters if p != "self"]


def build_model(config: Mapping[str, Any], data_shape: Sequence[int], seed: int | None = None) -> nn.Module:
    """Build a score network from ``config = {"name": "mlp" | "unet", **kwargs}`` for data of ``data_shape``.

    ``data_shape`` is the shape of one example: ``(D,)`` → :class:`ScoreMLP` (``dim = D``), ``(C, H, W)`` →
    :class:`ScoreUNet` (``in_channels = C``, ``image_size = H = W``). ``name`` may be omitted (it is
    inferred from the shape). Unknown names/keys, or keys that contradict ``data_shape``, raise
    ``ValueError`` naming them. Lists (from YAML) are accepted for tuple arguments. With ``seed`` the
    weights are drawn from ``torch.manual_seed(seed)`` inside ``torch.random.fork_rng`` (the caller's
    global RNG state is left untouched).
    """
    data_shape = tuple(int(s) for s in data_shape)
    kwargs = dict(config)
    if len(data_shape) == 1:
        inferred = "mlp"
    elif len(data_shape) == 3:
        inferred = "unet"
    else:
        raise ValueError(f"data_shape must be (D,) or (C, H, W), got {data_shape}")
    name = kwargs.pop("name", inferred)
    if name not in MODELS:
        raise ValueError(f"model config key 'name': unknown model {name!r}; valid names: {sorted(MODELS)}")
    if name != inferred:
        raise ValueError(f"model config key 'name': {name!r} does not fit data of shape {data_shape} "
                         f"(use {inferred!r})")
    cls = MODELS[name]
    valid = _valid_keys(cls)
    for key in kwargs:
        if key not in valid:
            raise ValueError(f"model config key {key!r} is not valid for {name!r}; valid keys: {valid}")

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
        return cls(**kwargs)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        return cls(**kwargs)


def clone_model(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` (e.g. to hold EMA weights for sampling)."""
    return copy.deepcopy(_unwrap(model))
