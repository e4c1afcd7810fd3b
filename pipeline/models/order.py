"""Display order of model and layer names.

The paper's names keep the paper's order — ResNet left of PlainNet, shallower first; `conv1`,
`pool1`, `conv2` … `convN`, `fc` in forward order — and come first. Every other name (a
torchvision model such as `vgg16`, a module path such as `features.28` or `layer2.1.conv2`)
follows in the order the tables first list it, which is the order the jobs wrote it in
(forward order for layers), so no list of known models is needed.

    order_models(["vgg16", "plainnet34", "resnet34"])  == ["resnet34", "plainnet34", "vgg16"]
    order_layers(["conv7", "pool1", "features.28"])     == ["pool1", "conv7", "features.28"]
"""
from __future__ import annotations

import re
from typing import Callable, Iterable

__all__ = ["layer_key", "model_key", "order_models", "order_layers", "ordered", "rank_of"]

_PAPER_MODEL = re.compile(r"(resnet|plainnet)(\d+)")
_PAPER_CONV = re.compile(r"conv(\d+)")
_UNKNOWN_LAYER = 10_001


def _paper_model(name: str) -> tuple[int, int] | None:
    m = _PAPER_MODEL.fullmatch(name)
    return (0 if m.group(1) == "resnet" else 1, int(m.group(2))) if m else None


def _paper_layer(name: str) -> int | None:
    if name == "conv1":
        return 0
    if name == "pool1":
        return 1
    if name == "fc":
        return 10_000
    m = _PAPER_CONV.fullmatch(name)
    return int(m.group(1)) if m else None


def layer_key(name: str) -> tuple[int, str]:
    """Sort key of the paper's layer names in forward order; other names last, by name."""
    rank = _paper_layer(name)
    return (_UNKNOWN_LAYER if rank is None else rank, name)


def model_key(name: str) -> tuple[int, int, str]:
    """Sort key: ResNets before PlainNets (left/right in side-by-side figures), shallower first;
    other names last, by name."""
    rank = _paper_model(name)
    return (*rank, name) if rank else (2, 0, name)


def ordered(names: Iterable[str], rank: Callable[[str], object | None]) -> list[str]:
    """The distinct names: those `rank` knows (not None) first, in rank order, then the rest in
    the order first seen."""
    seen = list(dict.fromkeys(str(n) for n in names))
    known = sorted((n for n in seen if rank(n) is not None), key=rank)  # type: ignore[arg-type]
    return known + [n for n in seen if rank(n) is None]


def order_models(names: Iterable[str]) -> list[str]:
    return ordered(names, _paper_model)


def order_layers(names: Iterable[str]) -> list[str]:
    return ordered(names, _paper_layer)


def rank_of(order: list[str]) -> dict[str, int]:
    """name -> position, for sorting table rows by an order computed once."""
    return {n: i for i, n in enumerate(order)}
