"""A small fully convolutional localization network (CenterNet / DeepTrack style).

Input: one normalized frame ``(N, 1, H, W)`` (:func:`scopestream.models.localize._inputs.normalize_photons`),
``H`` and ``W`` multiples of :data:`INPUT_MULTIPLE_PX` (4). Outputs on a grid of stride
:data:`STRIDE_PX` (2): ``heat`` ``(N, 1, H/2, W/2)``, the probability that a particle's position
lies in the cell; ``offset`` ``(N, 2, H/2, W/2)``, the position's (x, y) offset from the cell
centre in px (within +-``offset_scale_px``: 2, or 4 for models trained with dense offsets); ``log_sigma`` ``(N, 2, H/2, W/2)``, the natural log of the predicted standard error
of x and y, px. The cell ``(i, j)`` covers pixels ``2i, 2i+1`` (rows) and ``2j, 2j+1`` (columns);
its centre is at ``(x, y) = (2j + 0.5, 2i + 0.5)`` in pixel coordinates (centre of pixel (0, 0)
at 0.0).

Layout: two full-resolution 3x3 convolutions, two stride-2 stages (to 1/4 resolution, receptive
field ~40 px: enough for scan-blurred spots), one upsampling back to 1/2 with a skip connection,
and a 3x3 + 1x1 head. About 41 000 parameters (57 000 with ``full_skip``).
"""

from __future__ import annotations

import torch
from torch import nn

from scopestream.models._registry import register_model

__all__ = ["INPUT_MULTIPLE_PX", "LocNet", "STRIDE_PX", "locnet"]

STRIDE_PX = 2
INPUT_MULTIPLE_PX = 4


def _block(c_in: int, c_out: int, stride: int = 1, dilation: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, stride=stride, padding=dilation, dilation=dilation),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    )


class LocNet(nn.Module):
    """Heat map / offset / log-sigma network; see the module docstring for shapes."""

    def __init__(self, channels: int = 10, full_skip: bool = False, offset_scale_px: float = float(STRIDE_PX)) -> None:
        super().__init__()
        # The largest offset the head can predict, px (tanh * scale): one stride for offsets trained at
        # the particle's own cell; 2 strides where the cells around it are trained too (dense offsets:
        # a neighbour cell's centre is up to 1.5 strides from the particle).
        self.offset_scale_px = float(offset_scale_px)
        c1, c2, c3 = channels, 2 * channels, 3 * channels
        self.full_skip = full_skip
        self.full = nn.Sequential(_block(1, c1), _block(c1, c1))
        self.stage2 = nn.Sequential(_block(c1, c2, stride=2), _block(c2, c2))
        self.stage4 = nn.Sequential(_block(c2, c3, stride=2), _block(c3, c3), _block(c3, c3, dilation=2))
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        # full_skip: the full-resolution features, folded 2 x 2 into channels (pixel unshuffle), join
        # the merge, so the head sees sub-cell detail directly.
        self.merge = _block(c3 + c2 + (4 * c1 if full_skip else 0), c2)
        self.head = nn.Sequential(_block(c2, c2), nn.Conv2d(c2, 5, 1))
        with torch.no_grad():  # start with a low prior on particles (CenterNet's bias init)
            self.head[-1].bias[0].fill_(-2.2)  # type: ignore[index]

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        out = self.logits(image)
        heat = torch.sigmoid(out[:, 0:1])
        offset = torch.tanh(out[:, 1:3]) * self.offset_scale_px
        log_sigma = torch.clamp(out[:, 3:5], -6.0, 3.0)
        return heat, offset, log_sigma

    def logits(self, image: torch.Tensor) -> torch.Tensor:
        """The head's raw output (heat logit, offsets before tanh, log-sigma), for training."""
        f1 = self.full(image)
        f2 = self.stage2(f1)
        f4 = self.stage4(f2)
        parts = [self.up(f4), f2]
        if self.full_skip:
            parts.append(nn.functional.pixel_unshuffle(f1, 2))
        return self.head(self.merge(torch.cat(parts, dim=1)))


@register_model
def locnet(channels: int = 10, full_skip: bool = False, offset_scale_px: float = float(STRIDE_PX)) -> LocNet:
    """The localization network with ``channels`` feature maps at full resolution (``full_skip``:
    they also feed the head, folded to the output grid); offsets within +-``offset_scale_px``."""
    return LocNet(channels=channels, full_skip=full_skip, offset_scale_px=offset_scale_px)
