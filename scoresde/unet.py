"""The image score network: a small NCSN++/DDPM++-style U-Net (:class:`ScoreUNet`) and its blocks.

Calling convention, noise-level embeddings and score scaling are those of every score network (see
:mod:`scoresde.models` and CONTRACTS.md): ``model(x, c)`` with ``x`` of shape ``(batch, C, H, W)`` and ``c``
of shape ``(batch,)`` — σ for ``embedding="fourier"``, ``t`` for ``embedding="sinusoidal"``; the output has
``x``'s shape and is not scaled (:func:`scoresde.models.get_score_fn` does that). Build it through
:func:`scoresde.models.build_model` (``{"name": "unet", **UNET_PRESETS[size]}``).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from scoresde.models import _as_batch, _make_embedding

__all__ = ["ScoreUNet", "ResBlock", "AttnBlock", "Downsample", "Upsample", "UNET_PRESETS"]

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
    sinusoidal of 1000·t for VP/sub-VP, see :mod:`scoresde.models`). Residual and attention branches are
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
