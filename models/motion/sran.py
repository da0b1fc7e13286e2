"""SRAN, the shallow residual attention network of Sekh et al., on MUSICAL images.

As the paper describes it (its supplementary's layer sizes are not public here; widths are ours):

- pre-processing: a ``sub × sub`` convolution of stride ``sub`` (one output per camera pixel: the
  network works at 25 × 25 whatever the sub-pixel factor, which keeps training affordable on 2 CPU
  cores and makes sub-pixel factors comparable) and a residual block (two 3×3 convolutions and an
  identity skip);
- an attention module of 2 stages; in each, the trunk branch down-samples (max pooling), applies a
  residual block and up-samples back (bilinear), the soft-mask branch is a residual block ending in a
  sigmoid, and an LSTM-like gate ``g = σ(W [x, t])`` mixes the masked trunk with the input:
  ``y = g ⊙ (t ⊙ m) + (1 − g) ⊙ x``;
- a gated residual post-processing block ``y = x + σ(W x) ⊙ R(x)``;
- the classifier: global average pooling and a linear layer to the five states.

Shapes: image ``(N, 1, S, S)`` (S = 100 at the default 25 px × 4 sub-pixels) ->
:meth:`SRAN.forward_features` ``(N, C)`` -> logits ``(N, 5)``.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from scopestream.models._registry import register_model

__all__ = ["SRAN", "sran"]


class ResidualBlock(nn.Module):
    """Two 3×3 convolutions with batch norm and an identity skip."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        return F.relu(x + self.bn2(self.conv2(y)))


class AttentionStage(nn.Module):
    """Trunk (down-sample, residual block, up-sample) gated by a soft mask and an LSTM-like gate."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.trunk = ResidualBlock(channels)
        self.mask = nn.Sequential(ResidualBlock(channels), nn.Conv2d(channels, channels, 1), nn.Sigmoid())
        self.gate = nn.Conv2d(2 * channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = F.max_pool2d(x, 2, ceil_mode=True)
        t = self.trunk(t)
        t = F.interpolate(t, size=x.shape[-2:], mode="bilinear", align_corners=False)
        m = self.mask(x)
        g = torch.sigmoid(self.gate(torch.cat([x, t], dim=1)))
        return g * (t * m) + (1 - g) * x


class GatedResidual(nn.Module):
    """``y = x + σ(W x) ⊙ R(x)`` with R a residual branch of two convolutions."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.branch = nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels), nn.ReLU(),
            nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels),
        )
        self.gate = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x + torch.sigmoid(self.gate(x)) * self.branch(x))


class SRAN(nn.Module):
    """Shallow residual attention network (image only; ``features`` is accepted and ignored so
    that every motion model has the same two inputs)."""

    def __init__(self, channels: int = 16, n_classes: int = 5, stages: int = 2, subpixels: int = 4) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(1, channels, subpixels, stride=subpixels, bias=False), nn.BatchNorm2d(channels), nn.ReLU(),
        )
        self.pre = ResidualBlock(channels)
        self.attention = nn.Sequential(*[AttentionStage(channels) for _ in range(stages)])
        self.post = GatedResidual(channels)
        self.num_features = channels
        self.head = nn.Linear(channels, n_classes)

    def forward_features(self, image: torch.Tensor) -> torch.Tensor:
        """``(N, 1, S, S)`` -> ``(N, C)`` pooled features."""
        x = self.post(self.attention(self.pre(self.stem(image))))
        return x.mean(dim=(2, 3))

    def forward(self, image: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """Logits ``(N, n_classes)``."""
        return self.head(self.forward_features(image))


@register_model
def sran(channels: int = 16, n_classes: int = 5, stages: int = 2, subpixels: int = 4, **_: object) -> SRAN:
    """SRAN with ``channels`` feature maps and ``stages`` attention stages (the paper's final: 2);
    the stem reads one ``subpixels`` square per camera pixel."""
    return SRAN(channels=channels, n_classes=n_classes, stages=stages, subpixels=subpixels)
