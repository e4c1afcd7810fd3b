"""Every torchvision classification CNN by its constructor name, plus PlainNet (ResNet without
skip connections), all built by torchvision itself.

The ResNet family (resnet18 … resnet152, resnext*, wide_resnet*) is torchvision's `ResNet` with
an injected block: `BasicBlock` / `Bottleneck` subclass torchvision's blocks (same submodules,
same state-dict keys) and differ in one thing only — every ReLU call is its own parameter-free
module (`relu1`, `relu2`, `relu3`) and the pre-ReLU sum passes an `nn.Identity` named `preact`.
torchvision's blocks call one shared `relu` two or three times, which a forward hook cannot tell
apart; here each measurement point of the layer catalogue (`pipeline.models.layers`) is a distinct
module. `PlainBlock` / `PlainBottleneck` are the same blocks without the identity addition and
without the projection shortcut (`plainnet*` has no `downsample.*` keys).

Every other supported model (VGG, AlexNet, GoogLeNet, Inception v3, DenseNet, MobileNet v2/v3,
EfficientNet, RegNet, ConvNeXt, MNASNet, ShuffleNet, SqueezeNet) is torchvision's constructor
called as is, so a torchvision state_dict loads strictly and gives identical logits.

    model = build_model("resnet34")            # 1000 classes, width 64
    small = build_model("plainnet18", width=16, num_classes=8)
    vgg = build_model("vgg11_bn")              # torchvision.models.vgg11_bn(), name attached
"""
from __future__ import annotations

from typing import Any

import torch
import torchvision.models as tvm
from torch import Tensor, nn
from torchvision.models import resnet as tvr

__all__ = ["BasicBlock", "PlainBlock", "Bottleneck", "PlainBottleneck", "MODELS",
           "build_model", "model_names", "supported_models", "is_resnet", "width_for", "n_classes"]


class BasicBlock(tvr.BasicBlock):
    """torchvision's BasicBlock with one ReLU module per call and a pre-ReLU `preact` point."""

    residual = True

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        del self.relu                          # shared by two calls in torchvision
        self.relu1 = nn.ReLU(inplace=False)
        self.preact = nn.Identity()            # output = the value the block's last ReLU sees
        self.relu2 = nn.ReLU(inplace=False)    # the measurement point: never written in place

    def shortcut(self, x: Tensor) -> Tensor:
        return x if self.downsample is None else self.downsample(x)

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(self.preact(self._join(out, x)))

    def _join(self, out: Tensor, x: Tensor) -> Tensor:
        return out + self.shortcut(x)


class Bottleneck(tvr.Bottleneck):
    """torchvision's Bottleneck with one ReLU module per call and a pre-ReLU `preact` point."""

    residual = True

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        del self.relu
        self.relu1 = nn.ReLU(inplace=False)
        self.relu2 = nn.ReLU(inplace=False)
        self.preact = nn.Identity()
        self.relu3 = nn.ReLU(inplace=False)

    shortcut = BasicBlock.shortcut
    _join = BasicBlock._join

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.relu2(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu3(self.preact(self._join(out, x)))


class _NoSkip:
    """Mixin: the block without its skip connection (no identity add, no projection)."""

    residual = False

    def __init__(self, inplanes: int, planes: int, stride: int = 1,
                 downsample: nn.Module | None = None, *args: Any, **kwargs: Any):
        super().__init__(inplanes, planes, stride, None, *args, **kwargs)  # type: ignore[call-arg]

    def _join(self, out: Tensor, x: Tensor) -> Tensor:
        return out


class PlainBlock(_NoSkip, BasicBlock):
    """BasicBlock without the skip connection: no identity add, no projection shortcut."""


class PlainBottleneck(_NoSkip, Bottleneck):
    """Bottleneck without the skip connection: no identity add, no projection shortcut."""


class _ScaledResNet(tvr.ResNet):
    """torchvision's ResNet with base width `width` instead of 64 (the demo's small nets).

    Every stage's planes scale by width/64; the modules, their order and the state-dict keys
    are torchvision's. Only width != 64 comes here: width 64 is torchvision's class unchanged.
    """

    def __init__(self, block: type, layers: list[int], width: int, **kwargs: Any):
        self._width = width  # read by _make_layer during super().__init__
        super().__init__(block, layers, **kwargs)
        norm = kwargs.get("norm_layer") or nn.BatchNorm2d
        self.conv1 = nn.Conv2d(3, width, kernel_size=7, stride=2, padding=3, bias=False)
        nn.init.kaiming_normal_(self.conv1.weight, mode="fan_out", nonlinearity="relu")
        self.bn1 = norm(width)
        self.fc = nn.Linear(width * 8 * block.expansion, kwargs.get("num_classes", 1000))

    def _make_layer(self, block: type, planes: int, blocks: int, stride: int = 1,
                    dilate: bool = False) -> nn.Sequential:
        if planes == 64:  # the first stage: its input is the (scaled) stem
            self.inplanes = self._width
        return super()._make_layer(block, planes * self._width // 64, blocks, stride, dilate)


# name -> (block depth list, torchvision kwargs) for every torchvision ResNet
_RESNETS: dict[str, tuple[str, list[int], dict[str, int]]] = {
    "resnet18": ("basic", [2, 2, 2, 2], {}),
    "resnet34": ("basic", [3, 4, 6, 3], {}),
    "resnet50": ("bottleneck", [3, 4, 6, 3], {}),
    "resnet101": ("bottleneck", [3, 4, 23, 3], {}),
    "resnet152": ("bottleneck", [3, 8, 36, 3], {}),
    "resnext50_32x4d": ("bottleneck", [3, 4, 6, 3], {"groups": 32, "width_per_group": 4}),
    "resnext101_32x8d": ("bottleneck", [3, 4, 23, 3], {"groups": 32, "width_per_group": 8}),
    "resnext101_64x4d": ("bottleneck", [3, 4, 23, 3], {"groups": 64, "width_per_group": 4}),
    "wide_resnet50_2": ("bottleneck", [3, 4, 6, 3], {"width_per_group": 128}),
    "wide_resnet101_2": ("bottleneck", [3, 4, 23, 3], {"width_per_group": 128}),
}


def _draw_like_before(model: tvr.ResNet) -> None:
    """Initialise again, drawing random numbers in the order in which this project's own ResNet
    (before it was built by torchvision) did: seeded runs — the demo's training, the tests —
    give the same weights as before, and a PlainNet's discarded projections draw nothing.

    Order of the draws: every conv's default init in construction order (stem, then per block
    its projection before its convs), the fc, then torchvision's Kaiming pass in module order.
    """
    model.conv1.reset_parameters()
    for stage in (model.layer1, model.layer2, model.layer3, model.layer4):
        for block in stage:
            if block.downsample is not None:
                block.downsample[0].reset_parameters()
            for conv in ("conv1", "conv2", "conv3"):
                if hasattr(block, conv):
                    getattr(block, conv).reset_parameters()
    model.fc.reset_parameters()
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.constant_(m.weight, 1)
            nn.init.constant_(m.bias, 0)


def _plain_name(name: str) -> str:
    return name.replace("resnet", "plainnet") if name.startswith("resnet") else f"plain_{name}"


# name -> (block class, depths, torchvision kwargs) for the ResNet family and its PlainNets
MODELS: dict[str, tuple[type, list[int], dict[str, int]]] = {}
for _name, (_kind, _depths, _kw) in _RESNETS.items():
    _res, _pl = (BasicBlock, PlainBlock) if _kind == "basic" else (Bottleneck, PlainBottleneck)
    MODELS[_name] = (_res, _depths, _kw)
    MODELS[_plain_name(_name)] = (_pl, _depths, _kw)

# torchvision constructors of other CNNs. Transformers (vit_*, swin_*, maxvit_t) have no
# spatial feature maps in the sense of this project and are not offered.
_OTHERS = tuple(n for n in tvm.list_models(module=tvm)
                if n not in _RESNETS and not n.startswith(("vit_", "swin_", "maxvit")))
_UNSUPPORTED = tuple(n for n in tvm.list_models(module=tvm)
                     if n.startswith(("vit_", "swin_", "maxvit")))

# The models every job is wired for today (the paper's pair and the demo's small pair).
_JOB_MODELS = ("plainnet18", "plainnet34", "resnet18", "resnet34")


def model_names() -> list[str]:
    """The models every job accepts today (the ResNet18/34 pair and its PlainNets)."""
    return sorted(_JOB_MODELS)


def supported_models() -> list[str]:
    """Every name `build_model` accepts: the ResNet family, its PlainNets and torchvision's
    other classification CNNs."""
    return sorted([*MODELS, *_OTHERS])


def is_resnet(model_or_name: nn.Module | str) -> bool:
    """True for the ResNet family and its PlainNets (the models with paper layer names)."""
    name = model_or_name if isinstance(model_or_name, str) else getattr(model_or_name, "name", "")
    return name in MODELS


def width_for(name: str, width: int) -> int:
    """The base width `name` is built with: `width` for the ResNet family (and its PlainNets),
    torchvision's 64 for every other model (the one place this rule lives)."""
    return width if is_resnet(name) else 64


def n_classes(model: nn.Module) -> int:
    """Number of logits (`fc`, `classifier[-1]` … whatever the last weight layer is)."""
    if getattr(model, "num_classes", None):
        return int(model.num_classes)
    last = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))][-1]
    return last.out_features if isinstance(last, nn.Linear) else last.out_channels


def _unknown(name: str) -> ValueError:
    if name in _UNSUPPORTED:
        return ValueError(f"model {name!r} is a transformer without convolutional feature maps; "
                          f"supported: {', '.join(supported_models())}")
    return ValueError(f"unknown model {name!r}; allowed: {', '.join(model_names())}; also "
                      f"supported: {', '.join(n for n in supported_models() if n not in _JOB_MODELS)}")


def build_model(name: str, num_classes: int = 1000, width: int = 64) -> nn.Module:
    """A freshly initialised model by name; raises ValueError listing the allowed names.

    `width` is the ResNet family's base width (64 in torchvision; the demo uses 16); other
    models accept only the default. The model carries `name`, `width` and `num_classes`.
    """
    if name not in MODELS and name not in _OTHERS:
        raise _unknown(name)
    if isinstance(width, bool) or not isinstance(width, int) or width < 1:
        raise ValueError(f"width must be a positive integer, got {width}")
    if name in MODELS:
        block, depths, kwargs = MODELS[name]
        rng = torch.random.get_rng_state()
        if width == 64:
            model = tvr.ResNet(block, depths, num_classes=num_classes, **kwargs)
        else:
            model = _ScaledResNet(block, depths, width, num_classes=num_classes, **kwargs)
        torch.random.set_rng_state(rng)
        _draw_like_before(model)
    else:
        if width != 64:
            raise ValueError(f"width {width} is only supported for the ResNet family "
                             f"({', '.join(sorted(MODELS))}); {name} takes torchvision's width")
        kwargs = {"num_classes": num_classes}
        if name in ("googlenet", "inception_v3"):
            # torchvision's own default without weights; its released state_dicts carry the
            # auxiliary heads, so they load strictly. In eval mode the heads never run.
            kwargs.update(aux_logits=True, init_weights=True)
        model = tvm.get_model(name, weights=None, **kwargs)
    for m in model.modules():
        if getattr(m, "inplace", False) is True:
            # a hook's captured output must not be overwritten by the next module (and
            # autograd through a captured pre-ReLU value needs it intact); logits are the same
            m.inplace = False
    model.name = name
    model.width = width
    model.num_classes = num_classes
    return model
