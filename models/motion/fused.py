"""The fused motion-state model: an SRAN image branch and a track-features branch, concatenated.

Shapes: image ``(N, 1, S, S)`` and features ``(N, F)`` -> :meth:`Fused.forward_features`
``(N, C + H)`` -> logits ``(N, 5)``.
"""

from __future__ import annotations

import torch
from torch import nn

from scopestream.models._registry import register_model
from scopestream.models.motion.sran import SRAN
from scopestream.models.motion.track_mlp import FeatureEncoder

__all__ = ["Fused", "fused"]


class Fused(nn.Module):
    """SRAN features and track-feature embedding -> a small classifier."""

    def __init__(self, n_features: int, channels: int = 16, hidden: int = 64, n_classes: int = 5, subpixels: int = 4) -> None:
        super().__init__()
        self.image = SRAN(channels=channels, n_classes=n_classes, subpixels=subpixels)
        self.encoder = FeatureEncoder(n_features, hidden)
        width = self.image.num_features + hidden
        self.head = nn.Sequential(nn.Linear(width, hidden), nn.ReLU(), nn.Dropout(0.1), nn.Linear(hidden, n_classes))

    def forward_features(self, image: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.image.forward_features(image), self.encoder(features)], dim=1)

    def forward(self, image: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(image, features))


@register_model
def fused(n_features: int = 22, channels: int = 16, hidden: int = 64, n_classes: int = 5, subpixels: int = 4,
          **_: object) -> Fused:
    """SRAN image branch + track-features branch."""
    return Fused(n_features=n_features, channels=channels, hidden=hidden, n_classes=n_classes, subpixels=subpixels)
