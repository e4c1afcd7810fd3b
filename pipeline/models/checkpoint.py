"""Checkpoints that carry their model name, width, classes and preprocessing.

`save_checkpoint(url, model, preprocess)` writes a dict with `format`, `model`, `width`,
`num_classes`, `preprocess` (a `Preprocess.state()`), `state_dict` and any extra entries, to a
local path or `s3://…` through fsspec. `load_checkpoint(url, model_name=None)` reads either this
format or a plain torchvision state_dict (then `model_name` names the architecture, width and
classes are read off the weights and ImageNet mean/std is used). Any supported model loads:
the ResNet family with its width read off `conv1`, every other torchvision CNN with its
classes read off the last weight layer. A state_dict that does not fit
the model (missing or unexpected keys, wrong shapes) raises `CheckpointError` naming them.
"""
from __future__ import annotations

import io
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from pipeline.models.zoo import build_model, is_resnet, n_classes
from pipeline.data.preprocess import IMAGENET, Preprocess, preprocess_from_state
from pipeline.results.tables import exists, read_bytes, write_bytes

__all__ = ["FORMAT", "CheckpointError", "Loaded", "save_checkpoint", "load_checkpoint",
           "model_from_state_dict"]

FORMAT = "preferred-stimuli/1"


class CheckpointError(ValueError):
    pass


@dataclass
class Loaded:
    model: nn.Module
    model_name: str
    preprocess: Preprocess
    meta: dict[str, Any] = field(default_factory=dict)


def save_checkpoint(url: str, model: nn.Module, preprocess: Preprocess, **extra: Any) -> None:
    payload = {
        "format": FORMAT,
        "model": model.name,
        "width": getattr(model, "width", 64),
        "num_classes": n_classes(model),
        "preprocess": preprocess.state(),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        **extra,
    }
    buf = io.BytesIO()
    torch.save(payload, buf)
    write_bytes(url, buf.getvalue())   # atomic: a reader never sees half a checkpoint


def _read(url: str) -> Any:
    if not exists(url):
        raise CheckpointError(f"checkpoint not found: {url}")
    data = read_bytes(url)
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure is a bad checkpoint
        raise CheckpointError(f"{url} is not a readable torch checkpoint ({e.__class__.__name__})")


def model_from_state_dict(state_dict: dict[str, torch.Tensor], model_name: str) -> nn.Module:
    """Build `model_name` with classes (and the ResNets' width) read off the weights and load
    them strictly: any supported model (`pipeline.models.zoo.supported_models`)."""
    width = 64
    if is_resnet(model_name):
        if "conv1.weight" not in state_dict or "fc.weight" not in state_dict:
            raise CheckpointError("state_dict lacks conv1.weight / fc.weight: not a ResNet "
                                  "checkpoint")
        width = state_dict["conv1.weight"].shape[0]
        num_classes = state_dict["fc.weight"].shape[0]
    else:
        weights = [k for k, v in state_dict.items() if k.endswith("weight") and v.dim() >= 2]
        if not weights:
            raise CheckpointError("state_dict holds no weight matrix: not a model checkpoint")
        num_classes = state_dict[weights[-1]].shape[0]  # the classifier: the last weight layer
    try:
        # on the meta device: no random initialisation of weights that are replaced anyway
        # (RegNet computes its widths with tensors and is built on the CPU instead)
        with torch.device("meta"):
            model = build_model(model_name, num_classes=num_classes, width=width)
    except NotImplementedError:
        model = build_model(model_name, num_classes=num_classes, width=width)
    except ValueError as e:
        raise CheckpointError(str(e))
    expected, given = set(model.state_dict()), set(state_dict)
    missing, extra = sorted(expected - given), sorted(given - expected)
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing keys {missing[:3]}{'…' if len(missing) > 3 else ''}")
        if extra:
            parts.append(f"unexpected keys {extra[:3]}{'…' if len(extra) > 3 else ''}")
        raise CheckpointError(f"checkpoint does not fit {model_name}: " + "; ".join(parts))
    own = model.state_dict()
    try:
        if any(t.is_meta for t in own.values()):
            # assign: the module takes the given tensors (in its own dtypes) instead of copying
            # into meta storage; strict all the same
            model.load_state_dict({k: v.to(own[k].dtype) for k, v in state_dict.items()},
                                  strict=True, assign=True)
        else:
            model.load_state_dict(state_dict, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"checkpoint does not fit {model_name}: "
                              f"{str(e).splitlines()[-1].strip()}")
    if any(t.is_meta for t in [*model.parameters(), *model.buffers()]):
        raise CheckpointError(f"checkpoint does not fit {model_name}: tensors left unset")
    return model


def load_checkpoint(url: str, model_name: str | None = None) -> Loaded:
    obj = _read(url)
    if isinstance(obj, dict) and obj.get("format") == FORMAT:
        name = obj["model"]
        if model_name is not None and model_name != name:
            raise CheckpointError(f"checkpoint holds {name}, not {model_name}")
        model = model_from_state_dict(obj["state_dict"], name)
        meta = {k: v for k, v in obj.items() if k != "state_dict"}
        return Loaded(model.eval(), name, preprocess_from_state(obj["preprocess"]), meta)
    if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        if model_name is None:
            raise CheckpointError(f"{url} is a plain state_dict: name its architecture with --model")
        model = model_from_state_dict(obj, model_name)
        return Loaded(model.eval(), model_name, IMAGENET, {"format": "torchvision"})
    raise CheckpointError(f"{url} is neither a preferred-stimuli checkpoint nor a state_dict")
