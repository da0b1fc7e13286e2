"""A small CNN that reads log D and its variance from a short image stack around a track.

Two branches over a normalized window ``(N, T, S, S)`` (``T`` frames, ``S × S`` px):

- a per-frame encoder (weights shared over frames: three 3×3 convolutions, two of stride 2, and
  global average pooling) whose features are averaged and their SD taken over the frames: the
  spot's shape in each exposure (its motion blur, its brightness);
- a temporal branch that reads the frames as channels (three 3×3 convolutions, two of stride 2,
  global average pooling): where the spot is from frame to frame (its displacements).

Their features and the blur coefficient R (second input, ``(N, 1)``) go through a small MLP to
the mean and the log-variance of log D (natural log of D in px²/frame), trained with the Gaussian
negative log-likelihood. ``rotations=4`` (the default) averages the prediction over the four 90°
rotations of the window (the seed's test-time augmentation): mean of the four means; variance the
mean of the four variances plus the variance of the four means. The result is invariant to
rotating the input by 90°.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from scopestream.models._registry import register_model

__all__ = ["StackCNN", "stack_cnn"]

LOG_D_CENTRE = -3.45
"""Centre of the training targets' log D (px²/frame); the head works on (log D - centre) / scale."""
LOG_D_SCALE = 2.0


class StackCNN(nn.Module):
    """See the module docstring."""

    def __init__(self, frames: int = 16, channels: int = 16, hidden: int = 64, rotations: int = 4) -> None:
        super().__init__()
        c = channels
        self.frame_encoder = nn.Sequential(
            nn.Conv2d(1, c // 2, 3, padding=1), nn.ReLU(),
            nn.Conv2d(c // 2, c, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(c, c, 3, stride=2, padding=1), nn.ReLU(),
        )
        self.temporal = nn.Sequential(
            nn.Conv2d(frames, 2 * c, 3, padding=1), nn.ReLU(),
            nn.Conv2d(2 * c, 2 * c, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(2 * c, 4 * c, 3, stride=2, padding=1), nn.ReLU(),
        )
        width = 2 * c + 4 * c + 1
        self.head = nn.Sequential(nn.Linear(width, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 2))
        self.frames = frames
        self.rotations = rotations

    def forward_single(self, stack: torch.Tensor, blur: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One orientation: ``(N, T, S, S), (N, 1)`` -> mean and log-variance of log D, each ``(N, 1)``."""
        n, t, h, w = stack.shape
        per_frame = self.frame_encoder(stack.reshape(n * t, 1, h, w)).mean(dim=(2, 3)).reshape(n, t, -1)
        shape_mean = per_frame.mean(dim=1)
        shape_sd = torch.sqrt(per_frame.var(dim=1, unbiased=False) + 1e-6)
        motion = self.temporal(stack).mean(dim=(2, 3))
        out = self.head(torch.cat([shape_mean, shape_sd, motion, 6.0 * blur], dim=1))
        mu = out[:, :1] * LOG_D_SCALE + LOG_D_CENTRE
        log_var = out[:, 1:2].clamp(-12.0, 6.0) + 2.0 * math.log(LOG_D_SCALE)
        return mu, log_var

    def forward(self, stack: torch.Tensor, blur: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and log-variance of log D, averaged over ``rotations`` 90° rotations."""
        if self.rotations <= 1:
            return self.forward_single(stack, blur)
        n = stack.shape[0]
        rotated = [stack]
        for _ in range(self.rotations - 1):
            rotated.append(torch.flip(rotated[-1].transpose(2, 3), dims=(3,)))  # rot90 as transpose + flip (ONNX-friendly)
        mu, log_var = self.forward_single(torch.cat(rotated, dim=0), blur.repeat(self.rotations, 1))
        mu = mu.reshape(self.rotations, n, 1)
        var = torch.exp(log_var).reshape(self.rotations, n, 1)
        mean = mu.mean(dim=0)
        total = var.mean(dim=0) + ((mu - mean) ** 2).mean(dim=0)
        return mean, torch.log(total)


def gaussian_nll(mu: torch.Tensor, log_var: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean Gaussian negative log-likelihood (without the constant)."""
    return 0.5 * (log_var + (target - mu) ** 2 * torch.exp(-log_var)).mean()


@register_model
def stack_cnn(frames: int = 16, channels: int = 16, hidden: int = 64, rotations: int = 4, **_: object) -> StackCNN:
    """The image-stack diffusion CNN (module docstring)."""
    return StackCNN(frames=frames, channels=channels, hidden=hidden, rotations=rotations)


