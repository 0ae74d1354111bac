"""Small building blocks shared by the networks: zero init, GroupNorm checks, the pre-activation ResNet body."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def zero_(layer: nn.Module) -> nn.Module:
    """Zero a layer's weight and bias in place (a residual branch or modulation that starts as the identity)."""
    nn.init.zeros_(layer.weight)
    nn.init.zeros_(layer.bias)
    return layer


def check_groups(channels: int, groups: int, where: str) -> None:
    if groups < 1 or channels % groups:
        raise ValueError(f"{where}: GroupNorm groups={groups} must divide the channel count {channels}; "
                         f"pick groups that divide every width (channels * each channel_mult)")


class PreActBlock(nn.Module):
    """x + conv(silu(GroupNorm(conv(silu(GroupNorm(x))))))."""

    def __init__(self, ch: int, groups: int):
        super().__init__()
        self.norm1, self.conv1 = nn.GroupNorm(groups, ch), nn.Conv2d(ch, ch, 3, padding=1)
        self.norm2, self.conv2 = nn.GroupNorm(groups, ch), nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        return x + self.conv2(F.silu(self.norm2(h)))


def preact_body(in_channels: int, widths: list[int], depth: int, groups: int) -> nn.Sequential:
    """3x3 stem -> per stage `depth` PreActBlocks, a stride-2 3x3 conv between stages -> GroupNorm -> SiLU."""
    layers: list[nn.Module] = [nn.Conv2d(in_channels, widths[0], 3, padding=1)]
    for s, w in enumerate(widths):
        if s > 0:
            layers.append(nn.Conv2d(widths[s - 1], w, 3, stride=2, padding=1))
        layers += [PreActBlock(w, groups) for _ in range(depth)]
    layers += [nn.GroupNorm(groups, widths[-1]), nn.SiLU()]
    return nn.Sequential(*layers)
