"""A features-only motion-state model: an MLP on the track features of
:mod:`scopestream.models.motion._inputs`, standardized by statistics stored in the model.

Shapes: features ``(N, F)`` -> :meth:`TrackMLP.forward_features` ``(N, H)`` -> logits ``(N, 5)``.
"""

from __future__ import annotations

import torch
from torch import nn

from scopestream.models._registry import register_model

__all__ = ["FeatureEncoder", "TrackMLP", "track_mlp"]


class FeatureEncoder(nn.Module):
    """Standardize (mean/std buffers, set from the training set) and embed the track features."""

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, n_features: int, hidden: int = 64) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(n_features))
        self.register_buffer("std", torch.ones(n_features))
        self.net = nn.Sequential(
            nn.Linear(n_features, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
        )
        self.num_features = hidden

    def set_statistics(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        """Standardization from the training features (std floored at 1e-3)."""
        self.mean.copy_(mean)
        self.std.copy_(torch.clamp(std, min=1e-3))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.net((features - self.mean) / self.std)


class TrackMLP(nn.Module):
    """Features-only classifier (``image`` is accepted and ignored)."""

    def __init__(self, n_features: int, hidden: int = 64, n_classes: int = 5) -> None:
        super().__init__()
        self.encoder = FeatureEncoder(n_features, hidden)
        self.head = nn.Linear(hidden, n_classes)

    def forward_features(self, features: torch.Tensor) -> torch.Tensor:
        return self.encoder(features)

    def forward(self, image: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(features))


@register_model
def track_mlp(n_features: int = 22, hidden: int = 64, n_classes: int = 5, **_: object) -> TrackMLP:
    """Features-only MLP."""
    return TrackMLP(n_features=n_features, hidden=hidden, n_classes=n_classes)
