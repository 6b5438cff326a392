"""ResNet-18 in its CIFAR form, ending in an embedding rather than class logits.

CIFAR images are 32x32, so the ImageNet stem (7x7 stride-2 convolution + max-pool) would throw
away three quarters of the pixels at once; the CIFAR form uses a 3x3 stride-1 stem and no
max-pool. The network stops at a linear projection to `embed_dim`; the head (HALO centroids or a
linear classifier) lives outside, so both losses train the very same backbone.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with a residual connection (a 1x1 projection when the shape changes)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                                          nn.BatchNorm2d(out_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet18(nn.Module):
    """CIFAR ResNet-18: widths (64, 128, 256, 512) x `width / 64`, two blocks per stage.

    `width` below 64 gives the narrow networks CPU tests use; forward returns (batch, embed_dim).
    """

    def __init__(self, embed_dim: int, width: int = 64, in_channels: int = 3):
        super().__init__()
        if embed_dim < 1 or width < 1:
            raise ValueError(f"embed_dim and width must be positive, got {embed_dim} and {width}")
        self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, 1, 1, bias=False),
                                  nn.BatchNorm2d(width), nn.ReLU(inplace=True))
        stages, channels = [], width
        for stage, stride in enumerate((1, 2, 2, 2)):
            out_channels = width * 2 ** stage
            stages += [BasicBlock(channels, out_channels, stride), BasicBlock(out_channels, out_channels, 1)]
            channels = out_channels
        self.stages = nn.Sequential(*stages)
        self.embed = nn.Linear(channels, embed_dim)
        self.embed_dim = embed_dim

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4:
            raise ValueError(f"images must have shape (batch, channels, height, width), got {tuple(images.shape)}")
        features = self.stages(self.stem(images))
        return self.embed(F.adaptive_avg_pool2d(features, 1).flatten(1))
