"""ResNet and PlainNet (ResNet without skip connections), built the torchvision way.

The residual block is injected: `BasicBlock` adds the identity (or a 1x1 projection) before
its last ReLU, `PlainBlock` is the same block without the addition and without the projection.
State-dict keys equal torchvision's (`plainnet*` lacks only `downsample.*`), so a torchvision
checkpoint loads as is and gives identical logits.

Unlike torchvision, every ReLU is its own module (`relu1`, `relu2`) and every block has an
`nn.Identity` named `preact` that sees the pre-ReLU sum: each measurement point of the layer
catalogue (`pipeline.layers`) is then a distinct module that a forward hook can capture or edit.

    model = build_model("resnet34")            # 1000 classes, width 64
    small = build_model("plainnet18", width=16, num_classes=8)
"""
from __future__ import annotations


import torch
from torch import Tensor, nn

__all__ = ["BasicBlock", "PlainBlock", "ResNet", "MODELS", "build_model", "model_names"]


def _conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel_size=3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    """torchvision's BasicBlock with separate ReLU modules and a pre-ReLU `preact` point."""

    expansion = 1
    residual = True

    def __init__(self, cin: int, cout: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = _conv3x3(cin, cout, stride)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu1 = nn.ReLU(inplace=False)
        self.conv2 = _conv3x3(cout, cout)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = downsample
        self.preact = nn.Identity()  # output = the value the block's last ReLU sees
        self.relu2 = nn.ReLU(inplace=False)

    def shortcut(self, x: Tensor) -> Tensor:
        return x if self.downsample is None else self.downsample(x)

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out = self.preact(out + self.shortcut(x))
        return self.relu2(out)


class PlainBlock(BasicBlock):
    """BasicBlock without the skip connection: no identity add, no projection shortcut."""

    residual = False

    def __init__(self, cin: int, cout: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__(cin, cout, stride, downsample=None)

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.preact(self.bn2(self.conv2(out)))
        return self.relu2(out)


class ResNet(nn.Module):
    """torchvision's ResNet layout (`conv1 bn1 relu maxpool layer1..4 avgpool fc`)."""

    def __init__(self, block: type[BasicBlock], layers: list[int], num_classes: int = 1000,
                 width: int = 64):
        super().__init__()
        self.block = block
        self.width = width
        self.inplanes = width
        self.conv1 = nn.Conv2d(3, width, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=False)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, width, layers[0])
        self.layer2 = self._make_layer(block, width * 2, layers[1], stride=2)
        self.layer3 = self._make_layer(block, width * 4, layers[2], stride=2)
        self.layer4 = self._make_layer(block, width * 8, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(width * 8, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

    def _make_layer(self, block: type[BasicBlock], planes: int, blocks: int,
                    stride: int = 1) -> nn.Sequential:
        downsample = None
        if block.residual and (stride != 1 or self.inplanes != planes):
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(planes),
            )
        mods = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes
        mods += [block(planes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*mods)

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


_DEPTHS = {18: [2, 2, 2, 2], 34: [3, 4, 6, 3]}

MODELS: dict[str, tuple[type[BasicBlock], list[int]]] = {
    **{f"resnet{d}": (BasicBlock, n) for d, n in _DEPTHS.items()},
    **{f"plainnet{d}": (PlainBlock, n) for d, n in _DEPTHS.items()},
}


def model_names() -> list[str]:
    return sorted(MODELS)


def build_model(name: str, num_classes: int = 1000, width: int = 64) -> ResNet:
    """A freshly initialised model by name; raises ValueError listing the allowed names."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; allowed: {', '.join(model_names())}")
    if width < 1:
        raise ValueError(f"width must be a positive integer, got {width}")
    block, layers = MODELS[name]
    model = ResNet(block, layers, num_classes=num_classes, width=width)
    model.name = name
    return model
