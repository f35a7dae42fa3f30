"""ResNet-18 (He et al. 2016, "Deep Residual Learning"), one input channel, written here rather
than imported from torchvision.

Why not torchvision's: importing torchvision costs 1.6 s on two cores (its `ops` package imports
torch._dynamo), and a study pays it in every `train-classifier`, `evaluate` and `gradcam` process:
four per classifier run. This module builds the same network under the same parameter names
(`conv1`, `layer1.0.conv1`, `layer2.0.downsample.0`, `fc`, ...), so xraygan checkpoints and
torchvision's ImageNet weights load unchanged, and it draws its initial weights in the same order
from the same distributions, so a seed gives the weights earlier versions gave (tested against
torchvision).
"""

from __future__ import annotations

import torch
from torch import nn


def _conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel_size=3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    """Two 3×3 convolutions with batch norm, plus the input (projected when the shape changes)."""

    def __init__(self, cin: int, cout: int, stride: int, downsample: nn.Module | None) -> None:
        super().__init__()
        self.conv1 = _conv3x3(cin, cout, stride)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(cout, cout)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out = out + (x if self.downsample is None else self.downsample(x))
        return self.relu(out)


def _stage(cin: int, cout: int, stride: int) -> nn.Sequential:
    # the projection is made before the block: the order in which initial weights are drawn
    down = None
    if stride != 1 or cin != cout:
        down = nn.Sequential(nn.Conv2d(cin, cout, kernel_size=1, stride=stride, bias=False),
                             nn.BatchNorm2d(cout))
    return nn.Sequential(BasicBlock(cin, cout, stride, down), BasicBlock(cout, cout, 1, None))


class ResNet18(nn.Module):
    """Four stages of two basic blocks (64, 128, 256, 512 channels), global average pooling and
    a linear head. `small_stem`: a 3×3 stride-1 first convolution and no max-pool, which keeps
    the detail of 16–32 px images; otherwise the 7×7 stride-2 convolution and max-pool."""

    def __init__(self, num_classes: int, small_stem: bool) -> None:
        super().__init__()
        # Built as an RGB 7×7 stem first and replaced below, as xraygan did with torchvision's
        # model: drawing the same random numbers in the same order keeps a seed's weights.
        self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool: nn.Module = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = _stage(64, 64, 1)
        self.layer2 = _stage(64, 128, 2)
        self.layer3 = _stage(128, 256, 2)
        self.layer4 = _stage(256, 512, 2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if small_stem:
            self.conv1 = _conv3x3(1, 64)
            self.maxpool = nn.Identity()
        else:
            self.conv1 = nn.Conv2d(1, 64, kernel_size=7, stride=2, padding=3, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))
