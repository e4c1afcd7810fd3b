"""The layer catalogue: layer names mapped to modules and measurement points.

ResNet family (resnet*, resnext*, wide_resnet* and their PlainNets): the paper's names. `conv1`
(7x7 stem), `pool1` (the max-pool after it), `conv2` ... `convN` (every convolution of the
blocks in forward order: two per BasicBlock, three per Bottleneck; projection shortcuts are not
numbered), `fc`. The measurement point of a block's conv is its own ReLU (`relu1`, `relu2`);
for its last conv it is the ReLU after the addition, whose input — the pre-ReLU point
activation maximization needs — is the block's `preact` identity.

Every model, the ResNets included: module paths (`layer2.1.conv2`, `features.28`), measured at
that module's output. Their pre-ReLU point (`Layer.pre`, what activation maximization needs):
for a ReLU/ReLU6 module, the module whose output is that ReLU's input (`features.2` -> the BN
`features.1`), when the forward calls that module once; otherwise the module output itself.
A module path is analysable when the forward calls it exactly once, it returns an (N, C, H, W)
feature map and no in-place function overwrites that output later (GoogLeNet's
`F.relu(bn(x), inplace=True)`: its `…bn` paths are left out; in-place modules are switched off
by `build_model`) — see `pipeline.models.geometry.module_outputs`. For the ResNets the paper names win
where a path has the same name (`conv1` is the stem after its ReLU).

    cat = catalogue(model)                 # {name: Layer}, in forward order
    cat["conv3"].module == "layer1.0.conv2"
    resolve_layers(model, "pool1,conv3")   # validated list, ValueError on unknown names
    resolve_layers(vgg, "features.28")     # any model: module paths
    rf_layers(model)                       # the catalogue plus the ResNets' block outputs
    analysable_layers(model)               # the catalogue plus every module path

Block outputs (ResNet family, `layer1.0` … `layer4.2` for ResNet34): the output of each residual
block, which layer-similarity comparisons commonly use. It is the measurement point of the
block's last numbered conv (`layer1.2` = `conv7`: the ReLU after the addition), so it shares that
layer's module, hook and geometry; `receptive_fields.parquet` lists it beside the paper names.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass

from torch import fx, nn

__all__ = ["Layer", "catalogue", "module_layers", "block_outputs", "rf_layers",
           "analysable_layers", "resolve_layers", "PAPER_LAYERS", "has_paper_names"]

PAPER_LAYERS = ("pool1", "conv3", "conv7")
CATALOGUE_INPUT_SIZE = 224  # input size at which module paths are traced (channels, call count)


@dataclass(frozen=True)
class Layer:
    name: str      # paper name (conv1, pool1, conv2..convN, fc) or module path
    module: str    # module path of the weight layer (conv3 -> layer1.0.conv2); the path itself
    channels: int
    point: str     # module whose output is the measurement point (post-ReLU)
    pre: str       # module whose output is the pre-ReLU value (same as point where none)
    #                module paths: a ReLU's input module where there is one (see module_layers)
    index: int     # position in forward order


def has_paper_names(model: nn.Module) -> bool:
    """True for models built from this project's ResNet blocks (paper layer names)."""
    from pipeline.models.zoo import BasicBlock, Bottleneck

    return all(hasattr(model, a) for a in ("conv1", "maxpool", "layer1", "fc")) and \
        isinstance(model.layer1[0], (BasicBlock, Bottleneck))


def _paper_catalogue(model: nn.Module) -> dict[str, Layer]:
    rows: list[tuple[str, str, int, str, str]] = [
        ("conv1", "conv1", model.conv1.out_channels, "relu", "bn1"),
        ("pool1", "maxpool", model.conv1.out_channels, "maxpool", "maxpool"),
    ]
    n = 2
    for stage in ("layer1", "layer2", "layer3", "layer4"):
        for i, block in enumerate(getattr(model, stage)):
            path = f"{stage}.{i}"
            convs = [c for c in ("conv1", "conv2", "conv3") if hasattr(block, c)]
            for k, conv in enumerate(convs, start=1):
                last = k == len(convs)
                rows.append((f"conv{n}", f"{path}.{conv}", getattr(block, conv).out_channels,
                             f"{path}.relu{k}", f"{path}.preact" if last else f"{path}.bn{k}"))
                n += 1
    rows.append(("fc", "fc", model.fc.out_features, "fc", "fc"))
    return {name: Layer(name, mod, ch, point, pre, idx)
            for idx, (name, mod, ch, point, pre) in enumerate(rows)}


_MODULE_LAYERS: "weakref.WeakKeyDictionary[nn.Module, dict[str, Layer]]" = \
    weakref.WeakKeyDictionary()
_CALL_ORDER: "weakref.WeakKeyDictionary[nn.Module, dict[str, int]]" = weakref.WeakKeyDictionary()


def module_layers(model: nn.Module) -> dict[str, Layer]:
    """Every analysable module path of `model`, in forward order (traced once per model)."""
    cached = _MODULE_LAYERS.get(model)
    if cached is not None:
        return cached
    from pipeline.models.geometry import module_outputs

    fields = module_outputs(model, CATALOGUE_INPUT_SIZE)
    usable = [f for f in fields.values()
              if f.nchw and f.calls == 1 and f.rf is not None and not f.overwritten]
    relu_in = _relu_inputs(model)

    def pre(path: str) -> str:
        # the ReLU's input, where a module called once returns it and nothing rewrites it
        return next((p for p in relu_in.get(path, ()) if p in fields and fields[p].calls == 1
                     and not fields[p].overwritten), path)

    out = {f.path: Layer(f.path, f.path, int(f.shape[1]), f.path, pre(f.path), i)
           for i, f in enumerate(usable)}
    _MODULE_LAYERS[model] = out
    _CALL_ORDER[model] = {path: i for i, path in enumerate(fields)}
    return out


_RELUS = (nn.ReLU, nn.ReLU6)   # zero gradient below zero: actmax must see their input


def _relu_inputs(model: nn.Module) -> dict[str, list[str]]:
    """For each ReLU/ReLU6 module the forward calls: the module paths (innermost first) whose
    output is that ReLU's input, e.g. {"features.2": ["features.1"]}; [] when a function
    computes it (`relu(x + f(x))`). A symbolic trace of the eval graph (no tensors)."""
    from pipeline.models.geometry import inference_graph   # the node each (leaf or container) call returns

    graph, module_outputs = inference_graph(model)
    producers: dict[fx.Node, list[str]] = {}
    for path, node in module_outputs:
        producers.setdefault(node, []).append(path)
    modules = dict(model.named_modules())
    return {str(n.target): producers.get(n.args[0], []) for n in graph.nodes
            if n.op == "call_module" and isinstance(modules.get(str(n.target)), _RELUS)
            and n.args and isinstance(n.args[0], fx.Node)}


def catalogue(model: nn.Module) -> dict[str, Layer]:
    """The named layers of `model` in forward order: the paper names for the ResNet family,
    every analysable module path for any other model."""
    return _paper_catalogue(model) if has_paper_names(model) else module_layers(model)


def block_outputs(model: nn.Module) -> dict[str, Layer]:
    """The ResNet family's residual block outputs by module path (`layer1.0` ...), in forward
    order, each measured where its block's last conv is (same point, pre-ReLU point and index);
    empty for other models (their catalogue already holds every module path)."""
    if not has_paper_names(model):
        return {}
    by_module = {layer.module: layer for layer in _paper_catalogue(model).values()}
    out = {}
    for stage in ("layer1", "layer2", "layer3", "layer4"):
        for i, block in enumerate(getattr(model, stage)):
            path = f"{stage}.{i}"
            conv = [c for c in ("conv1", "conv2", "conv3") if hasattr(block, c)][-1]
            last = by_module[f"{path}.{conv}"]
            out[path] = Layer(path, path, last.channels, last.point, last.pre, last.index)
    return out


def rf_layers(model: nn.Module) -> dict[str, Layer]:
    """What `receptive_fields.parquet` lists: the catalogue in forward order, each block output
    right after its block's last conv (ResNet family)."""
    blocks = {layer.index: layer for layer in block_outputs(model).values()}
    out: dict[str, Layer] = {}
    for name, layer in catalogue(model).items():
        out[name] = layer
        if layer.index in blocks and layer.name.startswith("conv"):
            out[blocks[layer.index].name] = blocks[layer.index]
    return out


def analysable_layers(model: nn.Module) -> dict[str, Layer]:
    """The catalogue and the block outputs, then every module path not already named by them
    (what `--list` prints)."""
    if not has_paper_names(model):
        return catalogue(model)
    out = rf_layers(model)
    for path, layer in module_layers(model).items():
        out.setdefault(path, layer)
    return out


def resolve_layers(model: nn.Module, spec: str | list[str] | tuple[str, ...]) -> list[Layer]:
    """Parse `"pool1,conv3"`, `"layer2.1.conv2"`, `"all"` (every catalogue layer but fc) or a
    list into Layer entries.

    Returned in forward order without duplicates; unknown names raise ValueError that lists
    what is allowed. Module paths are traced only when a name is not in the catalogue.
    """
    cat = catalogue(model)
    names = spec.split(",") if isinstance(spec, str) else list(spec)
    names = [n.strip() for n in names if n.strip()]
    if names == ["all"]:
        return [layer for layer in cat.values() if layer.name != "fc"]
    paper = has_paper_names(model)
    allowed = (f"all, conv1, pool1, conv2 ... conv{len(cat) - 2}, fc, or a module path"
               if paper else "all, or a module path")
    hint = " (python -m jobs.receptive_fields --model M --list prints them)"
    if not names:
        raise ValueError(f"no layer given; allowed: {allowed}{hint}")
    if any(n not in cat for n in names):
        cat = analysable_layers(model) if paper else cat
    unknown = [n for n in names if n not in cat]
    if unknown:
        raise ValueError(f"unknown layer {unknown[0]!r}; allowed: {allowed}{hint}")
    chosen = {cat[n] for n in names}
    if not paper or all(layer.name in _paper_catalogue(model) for layer in chosen):
        return sorted(chosen, key=lambda layer: layer.index)
    # paper names and module paths mixed: order by where the measurement point is computed
    module_layers(model)
    order = _CALL_ORDER[model]
    paper_names = _paper_catalogue(model)
    return sorted(chosen, key=lambda layer: (order[layer.point], layer.name not in paper_names))
