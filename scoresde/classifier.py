"""A small CNN classifier of the real data, used as the feature extractor of FID / KID.

FID (Heusel et al., 2017, "GANs Trained by a Two Time-Scale Update Rule Converge to a Local Nash
Equilibrium") compares the Gaussian statistics of features of real and generated images; KID
(Binkowski et al., 2018, "Demystifying MMD GANs") compares them with a polynomial-kernel MMD. The
features are canonically Inception-v3 pool3 activations. For 8x8 digits (and offline, without the
Inception weights) we use a classifier trained on the same real data instead, in the spirit of the
LeNet-feature FID that NCSN / score-SDE papers report for MNIST: a feature extractor is only
meaningful if it can classify, so its held-out accuracy is measured and reported beside every FID.

Architecture (any ``(C, H, W)`` image, ``H, W >= 4``): two conv blocks (conv3x3-BN-ReLU twice, then
2x2 max-pool), adaptive average pooling to 2x2, a hidden linear layer of ``feature_dim`` units
(the *penultimate layer*: its pre-activation is the feature vector) and a linear classifier head.
Inputs are images in [0, 1], normalised inside the model to [-1, 1].

Pure torch. Randomness (initialisation, batch order) only through an explicit ``torch.Generator``.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["ClassifierConfig", "SmallCNN", "train_classifier", "accuracy", "build_classifier"]


@dataclass
class ClassifierConfig:
    """Everything needed to rebuild a :class:`SmallCNN` (stored beside its state_dict)."""

    in_channels: int = 1
    image_size: tuple[int, int] = (8, 8)
    num_classes: int = 10
    width: int = 32
    feature_dim: int = 128

    def to_dict(self) -> dict:
        d = asdict(self)
        d["image_size"] = list(self.image_size)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ClassifierConfig":
        known = {k: d[k] for k in cls.__dataclass_fields__ if k in d}  # ignores keys of other versions
        if "image_size" in known:
            known["image_size"] = tuple(int(v) for v in known["image_size"])
        return cls(**known)


class SmallCNN(nn.Module):
    """conv block x2 -> avg-pool 2x2 -> Linear(feature_dim) [features] -> ReLU -> Linear(num_classes)."""

    def __init__(self, config: ClassifierConfig):
        super().__init__()
        self.config = config
        c, w = config.in_channels, config.width

        def block(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
                                 nn.Conv2d(cout, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
                                 nn.MaxPool2d(2))

        self.body = nn.Sequential(block(c, w), block(w, 2 * w), nn.AdaptiveAvgPool2d(2), nn.Flatten())
        self.hidden = nn.Linear(2 * w * 4, config.feature_dim)
        self.head = nn.Linear(config.feature_dim, config.num_classes)

    def prepare_input(self, x: torch.Tensor) -> torch.Tensor:
        """Float images in [0, 1] of any channel count / size -> this model's (C, H, W), in [-1, 1]."""
        x = x.float()
        c = self.config.in_channels
        if x.shape[1] != c:
            if c == 1:
                x = x.mean(dim=1, keepdim=True)          # RGB -> grey (channels are replicated for torch-fidelity)
            elif x.shape[1] == 1:
                x = x.expand(-1, c, -1, -1)
            else:
                raise ValueError(f"cannot map {x.shape[1]} channels to the classifier's {c}")
        size = tuple(self.config.image_size)
        if tuple(x.shape[-2:]) != size:
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
        return x * 2.0 - 1.0

    def features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Penultimate-layer features (pre-activation of the hidden layer) and logits of images in [0, 1]."""
        h = self.hidden(self.body(self.prepare_input(x)))
        logits = self.head(F.relu(h))
        return h, logits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)[1]


def build_classifier(config: ClassifierConfig | dict, state_dict: dict | None = None) -> SmallCNN:
    cfg = config if isinstance(config, ClassifierConfig) else ClassifierConfig.from_dict(config)
    model = SmallCNN(cfg)
    if state_dict is not None:
        model.load_state_dict(state_dict)
    model.eval()
    return model


@torch.no_grad()
def accuracy(model: SmallCNN, x: torch.Tensor, labels: torch.Tensor, batch_size: int = 1024) -> float:
    """Fraction of ``x`` (images in [0, 1]) classified as ``labels``."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    correct = 0
    for i in range(0, len(x), batch_size):
        pred = model(x[i:i + batch_size].to(device)).argmax(dim=1).cpu()
        correct += int((pred == labels[i:i + batch_size].cpu()).sum())
    model.train(was_training)
    return correct / max(len(x), 1)


def _init_weights(model: nn.Module, generator: torch.Generator | None) -> None:
    """Kaiming-uniform init drawn from ``generator`` (torch's default init would use the global RNG)."""
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            fan_in = m.weight[0].numel()
            bound = math.sqrt(6.0 / fan_in)  # Kaiming uniform, ReLU gain sqrt(2): sqrt(2) * sqrt(3 / fan_in)
            with torch.no_grad():
                m.weight.copy_((torch.rand(m.weight.shape, generator=generator) * 2 - 1) * bound)
                m.bias.zero_()


def train_classifier(x: torch.Tensor, labels: torch.Tensor, config: ClassifierConfig, *, epochs: int = 30,
                     batch_size: int = 128, lr: float = 2e-3, weight_decay: float = 5e-4, shift: int = 1,
                     label_smoothing: float = 0.1,
                     generator: torch.Generator | None = None, device: torch.device | str = "cpu",
                     log: Callable[[int, float], None] | None = None) -> SmallCNN:
    """Train :class:`SmallCNN` with Adam + cosine learning-rate decay on images ``x`` in [0, 1].

    Cross-entropy with ``label_smoothing`` (Szegedy et al., 2016). On the 1,500 / 297 digits split the
    defaults (30 epochs) reach 0.97-0.98 test accuracy over seeds (without BN / smoothing: 0.93-0.97).

    ``shift``: random translations by up to ``shift`` pixels (zero padding) as the only augmentation.
    ``log(epoch, mean_loss)`` is called after each epoch. Returns the model in eval mode (on ``device``).
    """
    device = torch.device(device)
    model = SmallCNN(config)
    _init_weights(model, generator)
    model.to(device).train()
    x, labels = x.float(), labels.long()
    n = len(x)
    steps_per_epoch = max(1, math.ceil(n / batch_size))
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * steps_per_epoch)
    for epoch in range(epochs):
        perm = torch.randperm(n, generator=generator)
        total = 0.0
        for i in range(0, n, batch_size):
            idx = perm[i:i + batch_size]
            xb = x[idx]
            if shift > 0:
                xb = _random_shift(xb, shift, generator)
            xb, yb = xb.to(device), labels[idx].to(device)
            loss = F.cross_entropy(model(xb), yb, label_smoothing=label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(idx)
        if log is not None:
            log(epoch, total / n)
    return model.eval()


def _random_shift(x: torch.Tensor, shift: int, generator: torch.Generator | None) -> torch.Tensor:
    """Translate each image by integers in [-shift, shift] (zero fill)."""
    b, _, h, w = x.shape
    padded = F.pad(x, (shift, shift, shift, shift))
    dx = torch.randint(0, 2 * shift + 1, (b,), generator=generator)
    dy = torch.randint(0, 2 * shift + 1, (b,), generator=generator)
    rows = (dy[:, None] + torch.arange(h)[None, :])                 # (b, h)
    cols = (dx[:, None] + torch.arange(w)[None, :])                 # (b, w)
    bi = torch.arange(b)[:, None, None]
    out = padded.permute(0, 2, 3, 1)[bi, rows[:, :, None], cols[:, None, :]]  # (b, h, w, c)
    return out.permute(0, 3, 1, 2).contiguous()
