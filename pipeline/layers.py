"""The layer catalogue: the paper's layer names mapped to modules and measurement points.

Names follow the paper: `conv1` (7x7 stem), `pool1` (the max-pool after it), `conv2` ... `convN`
(the 3x3 convolutions in forward order), `fc`. For a block's first conv the measurement point is
its own ReLU (`relu1`); for its second conv it is the ReLU after the addition (`relu2`), whose
input — the pre-ReLU point activation maximization needs — is the block's `preact` identity.

    cat = catalogue(model)                 # {name: Layer}, in forward order
    cat["conv3"].module == "layer1.0.conv2"
    resolve_layers(model, "pool1,conv3")   # validated list, ValueError on unknown names
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

__all__ = ["Layer", "catalogue", "resolve_layers", "PAPER_LAYERS"]

PAPER_LAYERS = ("pool1", "conv3", "conv7")


@dataclass(frozen=True)
class Layer:
    name: str      # paper name: conv1, pool1, conv2..convN, fc
    module: str    # torchvision module path of the weight layer (conv3 -> layer1.0.conv2)
    channels: int
    point: str     # module whose output is the measurement point (post-ReLU)
    pre: str       # module whose output is the pre-ReLU value (same as point for pool1 / fc)
    index: int     # position in forward order


def catalogue(model: nn.Module) -> dict[str, Layer]:
    """All named layers of a ResNet/PlainNet built by `pipeline.models`, in forward order."""
    rows: list[tuple[str, str, int, str, str]] = [
        ("conv1", "conv1", model.conv1.out_channels, "relu", "bn1"),
        ("pool1", "maxpool", model.conv1.out_channels, "maxpool", "maxpool"),
    ]
    n = 2
    for stage in ("layer1", "layer2", "layer3", "layer4"):
        for i, block in enumerate(getattr(model, stage)):
            path = f"{stage}.{i}"
            rows.append((f"conv{n}", f"{path}.conv1", block.conv1.out_channels,
                         f"{path}.relu1", f"{path}.bn1"))
            rows.append((f"conv{n + 1}", f"{path}.conv2", block.conv2.out_channels,
                         f"{path}.relu2", f"{path}.preact"))
            n += 2
    rows.append(("fc", "fc", model.fc.out_features, "fc", "fc"))
    return {name: Layer(name, mod, ch, point, pre, idx)
            for idx, (name, mod, ch, point, pre) in enumerate(rows)}


def resolve_layers(model: nn.Module, spec: str | list[str] | tuple[str, ...]) -> list[Layer]:
    """Parse `"pool1,conv3"`, `"all"` (every layer but fc) or a list into catalogue entries.

    Returned in forward order without duplicates; unknown names raise ValueError that lists
    what is allowed.
    """
    cat = catalogue(model)
    names = spec.split(",") if isinstance(spec, str) else list(spec)
    names = [n.strip() for n in names if n.strip()]
    if names == ["all"]:
        return [layer for layer in cat.values() if layer.name != "fc"]
    if not names:
        raise ValueError("no layer given; allowed: all, " + ", ".join(cat))
    unknown = [n for n in names if n not in cat]
    if unknown:
        raise ValueError(f"unknown layer {unknown[0]!r}; allowed: all, conv1, pool1, "
                         f"conv2 ... conv{len(cat) - 2}, fc")
    return sorted({cat[n] for n in names}, key=lambda layer: layer.index)
