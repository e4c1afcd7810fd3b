"""One hook mechanism: capture layers, optionally edit their outputs, stop the forward early.

    with Trace(model, layers) as tr:          # layers: list[Layer] from pipeline.models.layers
        tr.run(x)                              # forward stops after the deepest layer
    acts = tr.outputs                          # {layer name: tensor}

`edit={"pool1": fn}` replaces a layer's output by `fn(output)` before anything downstream sees
it (ablation noise); `point="pre"` captures the pre-ReLU values (activation maximization);
`stop=False` lets the forward run to the logits, which `run` then returns. Each measurement
point is a distinct module that gets one hook, however many layers read it (a paper name and a
module path can name the same output: `pool1` and `maxpool`), so no module is hooked twice.
"""
from __future__ import annotations

from typing import Callable, Iterable, Literal

from torch import Tensor, nn

from pipeline.models.layers import Layer

__all__ = ["Trace", "capture"]


class _StopForward(Exception):
    pass


class Trace:
    def __init__(self, model: nn.Module, layers: Iterable[Layer], *,
                 edit: dict[str, Callable[[Tensor], Tensor]] | None = None,
                 point: Literal["post", "pre"] = "post", stop: bool = True,
                 detach: bool = True):
        self.model = model
        self.layers = list(layers)
        self.edit = dict(edit or {})
        self.point = point
        self.stop = stop
        self.detach = detach
        self.outputs: dict[str, Tensor] = {}
        self._handles: list = []
        names = {layer.name for layer in self.layers}
        missing = set(self.edit) - names
        if missing:
            raise ValueError(f"edit names layers that are not traced: {sorted(missing)}")
        modules = dict(model.named_modules())
        paths = [layer.point if point == "post" else layer.pre for layer in self.layers]
        unknown = [p for p in paths if p not in modules]
        if unknown:
            raise ValueError(f"no module {unknown[0]!r} in the model")
        self._groups: dict[str, list[Layer]] = {}
        for layer, path in zip(self.layers, paths):
            self._groups.setdefault(path, []).append(layer)
        self._targets = [(group, modules[path]) for path, group in self._groups.items()]

    def __enter__(self) -> "Trace":
        for group, module in self._targets:
            self._handles.append(module.register_forward_hook(self._hook(group)))
        return self

    def __exit__(self, *exc) -> bool:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        return exc[0] is _StopForward

    def _hook(self, group: list[Layer]):
        def hook(_module: nn.Module, _inputs, output: Tensor):
            for layer in group:
                if layer.name in self.edit:
                    output = self.edit[layer.name](output)
                self.outputs[layer.name] = output.detach() if self.detach else output
            if self.stop and len(self.outputs) == len({layer.name for layer in self.layers}):
                raise _StopForward
            return output
        return hook

    def run(self, x: Tensor) -> Tensor | None:
        """Forward `x`; returns the logits, or None when the forward was stopped early."""
        self.outputs = {}
        try:
            return self.model(x)
        except _StopForward:
            return None


def capture(model: nn.Module, x: Tensor, layers: Iterable[Layer], **kwargs) -> dict[str, Tensor]:
    """Activations of `layers` for input `x` (one forward, stopped after the deepest layer)."""
    with Trace(model, layers, **kwargs) as tr:
        tr.run(x)
    return tr.outputs
