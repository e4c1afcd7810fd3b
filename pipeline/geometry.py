"""Receptive-field geometry derived from the module graph, and RF patches cut out of images.

The model is traced with `torch.fx`; every tensor in the graph carries, per spatial axis, the
interval of input pixels its neuron 0 sees (`lo`..`hi`), the jump between adjacent neurons and
the feature-map length. Convolutions and pools compose the interval (kernel, stride, padding,
dilation, ceil mode), element-wise modules (BN, ReLU, Identity) pass it through, additions take
the union of their branches (a residual block's RF is the larger of its two paths), and global
pools / flatten / linear layers see the union over every position. Nothing is looked up in a
table, so any ResNet/PlainNet built by `pipeline.models`, at any input size, gets its own values.

    rfs = receptive_fields(build_model("resnet34"), input_size=224)
    rfs["pool1"].size, rfs["conv3"].size, rfs["conv7"].size      # 11, 27, 59
    top, left, size = rfs["conv3"].box(*rfs["conv3"].center())   # input square of the centre neuron
    patch, mask = cut_patch(image, top, left, size)                # black outside the image
    patches, masks = cut_patches(images, tops, lefts, size)        # batched, no Python loop
    table = rf_table(model, "resnet34")                            # receptive_fields.parquet rows

`module_fields(module, input_size)` gives the same for every module call of any traceable
network (keyed by module path), which is how the tests check the union rule on hand-made
two-branch modules.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any, Sequence

import pyarrow as pa
import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from .layers import catalogue

__all__ = ["RF", "RF_SCHEMA", "receptive_fields", "module_fields", "rf_table", "cut_patch",
           "cut_patches"]

RF_SCHEMA = pa.schema([
    ("model", pa.string()),
    ("layer", pa.string()),
    ("module", pa.string()),
    ("channels", pa.int64()),
    ("rf_size", pa.int64()),
    ("jump", pa.int64()),
    ("offset", pa.float64()),
    ("feature_size", pa.int64()),
    ("input_size", pa.int64()),
])


@dataclass(frozen=True)
class RF:
    """Square receptive field of one layer: neuron (y, x) sees input rows
    offset + jump*y - (size-1)/2 ... offset + jump*y + (size-1)/2 (columns alike)."""

    size: int          # RF side in input pixels
    jump: int          # input pixels between adjacent neurons
    offset: float      # centre of neuron (0, 0) in input coordinates
    feature_size: int  # H (= W) of the layer's feature map at this input size

    def box(self, y: int, x: int) -> tuple[int, int, int]:
        """(top, left, size) of neuron (y, x); top/left may be negative or run past the image."""
        half = (self.size - 1) / 2
        return (round(self.offset + self.jump * y - half),
                round(self.offset + self.jump * x - half), self.size)

    def boxes(self, ys: Tensor, xs: Tensor) -> tuple[Tensor, Tensor]:
        """Vectorised `box`: int64 tops and lefts for neuron coordinates `ys`, `xs`."""
        first = round(self.offset - (self.size - 1) / 2)  # top of neuron 0: always an integer
        return (first + self.jump * ys.to(torch.int64), first + self.jump * xs.to(torch.int64))

    def center(self) -> tuple[int, int]:
        """The centre neuron (H//2, W//2) of the feature map."""
        return self.feature_size // 2, self.feature_size // 2


# ---------------------------------------------------------------------------------------------
# Interval propagation over the fx graph


@dataclass(frozen=True)
class _Axis:
    lo: int    # first input pixel seen by neuron 0 (negative: padding)
    hi: int    # last input pixel seen by neuron 0
    jump: int  # input pixels between neighbouring neurons
    n: int     # number of neurons along this axis

    def window(self, kernel: int, stride: int, pad: int, dilation: int, n: int) -> "_Axis":
        # output neuron y reads positions stride*y - pad ... stride*y - pad + dilation*(kernel-1)
        return _Axis(self.lo - self.jump * pad,
                     self.hi + self.jump * (dilation * (kernel - 1) - pad),
                     self.jump * stride, n)

    def everything(self) -> "_Axis":
        """One neuron that sees what every neuron of this axis sees (global pool, flatten)."""
        return _Axis(self.lo, self.hi + self.jump * (self.n - 1), self.jump * self.n, 1)


@dataclass(frozen=True)
class _Geom:
    rows: _Axis
    cols: _Axis
    flat: bool = False  # spatial axes already folded away (after flatten / global pooling)


def _pair(v: Any) -> tuple[int, int]:
    return (int(v[0]), int(v[1])) if isinstance(v, (tuple, list)) else (int(v), int(v))


def _out_len(n: int, k: int, s: int, p: int, d: int, ceil_mode: bool = False) -> int:
    span = n + 2 * p - d * (k - 1) - 1
    if not ceil_mode:
        return span // s + 1
    out = -(-span // s) + 1
    if (out - 1) * s >= n + p:  # PyTorch drops a last window that would start in the right padding
        out -= 1
    return out


_ELEMENTWISE_MODULES = (
    nn.BatchNorm1d, nn.BatchNorm2d, nn.SyncBatchNorm, nn.GroupNorm, nn.InstanceNorm2d,
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh,
    nn.Hardswish, nn.Hardsigmoid, nn.Softplus, nn.Identity, nn.Dropout, nn.Dropout2d,
)
_ELEMENTWISE_FUNCTIONS = {
    F.relu, F.relu_, torch.relu, torch.relu_, F.relu6, F.leaky_relu, F.gelu, F.silu, F.elu,
    torch.sigmoid, torch.tanh, F.dropout, F.dropout2d, operator.neg, operator.pos,
}
_ELEMENTWISE_METHODS = {"relu", "relu_", "sigmoid", "tanh", "contiguous", "clone", "detach",
                        "float", "double", "half", "to", "neg"}
_BINARY_FUNCTIONS = {operator.add, operator.iadd, operator.sub, operator.isub, operator.mul,
                     operator.imul, operator.truediv, torch.add, torch.sub, torch.mul,
                     torch.maximum, torch.minimum}
_BINARY_METHODS = {"add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_"}


def _union(geoms: list[_Geom], where: str) -> _Geom:
    """The RF of an element-wise combination of branches: the union of the branches' RFs."""
    out = geoms[0]
    for g in geoms[1:]:
        axes = []
        for a, b in ((out.rows, g.rows), (out.cols, g.cols)):
            if a.jump != b.jump or a.n != b.n:
                raise ValueError(f"{where}: branches disagree on the neuron grid "
                                 f"(jump {a.jump} vs {b.jump}, length {a.n} vs {b.n})")
            axes.append(_Axis(min(a.lo, b.lo), max(a.hi, b.hi), a.jump, a.n))
        out = _Geom(axes[0], axes[1], out.flat or g.flat)
    return out


def _window(g: _Geom, kernel: Any, stride: Any, pad: Any, dilation: Any, ceil_mode: bool,
            where: str) -> _Geom:
    if g.flat:
        raise ValueError(f"{where}: a spatial window after the spatial axes were flattened")
    k, s, p, d = _pair(kernel), _pair(stride), _pair(pad), _pair(dilation)
    axes = []
    for i, a in enumerate((g.rows, g.cols)):
        n = _out_len(a.n, k[i], s[i], p[i], d[i], ceil_mode)
        if n < 1:
            raise ValueError(f"input too small: {where} would have an empty feature map")
        axes.append(a.window(k[i], s[i], p[i], d[i], n))
    return _Geom(axes[0], axes[1])


def _conv_padding(m: nn.Conv2d) -> tuple[int, int]:
    if m.padding == "valid":
        return 0, 0
    if m.padding == "same":  # PyTorch puts the odd pixel of 'same' padding on the right/bottom
        k, d = _pair(m.kernel_size), _pair(m.dilation)
        if any((d[i] * (k[i] - 1)) % 2 for i in range(2)):
            raise ValueError("padding='same' with an even total padding width is not supported")
        return tuple(d[i] * (k[i] - 1) // 2 for i in range(2))  # type: ignore[return-value]
    return _pair(m.padding)


def _adaptive(g: _Geom, output_size: Any, where: str) -> _Geom:
    size = output_size if isinstance(output_size, (tuple, list)) else (output_size, output_size)
    axes = []
    for a, o in zip((g.rows, g.cols), size):
        o = a.n if o is None else int(o)
        if o == 1:
            axes.append(a.everything())
        elif a.n % o == 0:  # equal bins: a plain pool with kernel = stride = n / o
            axes.append(a.window(a.n // o, a.n // o, 0, 1, o))
        else:
            raise ValueError(f"{where}: adaptive pooling from {a.n} to {o} has unequal bins, "
                             f"so its neurons have no common RF size")
    return _Geom(axes[0], axes[1], flat=g.flat)


def _flatten(g: _Geom, start_dim: int) -> _Geom:
    if start_dim > 1:  # only folds the spatial axes into each other: still one neuron per row
        raise ValueError(f"flatten(start_dim={start_dim}) keeps spatial structure we cannot track")
    return _Geom(g.rows.everything(), g.cols.everything(), flat=True)


def _module_geom(m: nn.Module, g: _Geom, where: str) -> _Geom:
    if isinstance(m, nn.Conv2d):
        return _window(g, m.kernel_size, m.stride, _conv_padding(m), m.dilation, False, where)
    if isinstance(m, nn.MaxPool2d):
        return _window(g, m.kernel_size, m.stride or m.kernel_size, m.padding, m.dilation,
                       m.ceil_mode, where)
    if isinstance(m, nn.AvgPool2d):
        return _window(g, m.kernel_size, m.stride or m.kernel_size, m.padding, 1, m.ceil_mode,
                       where)
    if isinstance(m, (nn.ZeroPad2d, nn.ConstantPad2d)):
        left, right, top, bottom = m.padding
        # padding shifts neuron indices (neuron 0 is now `top` pixels above the old row 0)
        r, c = g.rows, g.cols
        return _Geom(_Axis(r.lo - r.jump * top, r.hi - r.jump * top, r.jump, r.n + top + bottom),
                     _Axis(c.lo - c.jump * left, c.hi - c.jump * left, c.jump,
                           c.n + left + right))
    if isinstance(m, (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)):
        return _adaptive(g, m.output_size, where)
    if isinstance(m, nn.Flatten):
        return _flatten(g, m.start_dim)
    if isinstance(m, nn.Linear):
        if not g.flat and (g.rows.n > 1 or g.cols.n > 1):
            raise ValueError(f"{where}: Linear applied to a spatial map (not flattened)")
        return g
    if isinstance(m, _ELEMENTWISE_MODULES):
        return g
    raise NotImplementedError(f"{where}: receptive field of {type(m).__name__} is not known; "
                              f"known: convolutions, max/avg pools, padding, adaptive pools, "
                              f"flatten, linear and element-wise layers")


def _trace(module: nn.Module, input_size: int) -> list[tuple[fx.Node, _Geom | None]]:
    if isinstance(input_size, bool) or not isinstance(input_size, int) or input_size < 1:
        raise ValueError(f"input size must be a positive integer, got {input_size!r}")
    graph = fx.symbolic_trace(module).graph
    modules = dict(module.named_modules())
    env: dict[fx.Node, _Geom | None] = {}
    placeholders = 0
    out: list[tuple[fx.Node, _Geom | None]] = []

    def geoms_of(args: Any) -> list[_Geom]:
        found: list[_Geom] = []
        fx.node.map_arg(args, lambda n: found.append(env[n]) if env.get(n) is not None else None)
        return found

    for node in graph.nodes:
        where = f"{node.op} {node.target}"
        g: _Geom | None
        if node.op == "placeholder":
            placeholders += 1
            if placeholders > 1:
                raise ValueError("the module takes more than one input; RFs need a single image")
            axis = _Axis(0, 0, 1, input_size)
            g = _Geom(axis, axis)
        elif node.op == "get_attr":
            g = None  # a constant: sees no input pixel
        elif node.op == "output":
            continue
        else:
            ins = geoms_of((node.args, node.kwargs))
            first = node.args[0] if node.args else None
            first_g = env.get(first) if isinstance(first, fx.Node) else None
            if node.op == "call_module":
                if first_g is None:
                    raise ValueError(f"{where}: input carries no image geometry")
                g = _module_geom(modules[node.target], first_g, where)
            elif node.op == "call_function" and node.target in _BINARY_FUNCTIONS or \
                    node.op == "call_method" and node.target in _BINARY_METHODS:
                g = _union(ins, where) if ins else None
            elif node.op == "call_function" and node.target in _ELEMENTWISE_FUNCTIONS or \
                    node.op == "call_method" and node.target in _ELEMENTWISE_METHODS:
                g = first_g
            elif node.target in (torch.flatten, "flatten"):
                start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
                g = _flatten(first_g, int(start)) if first_g is not None else None
            elif node.target is F.adaptive_avg_pool2d and first_g is not None:
                size = node.args[1] if len(node.args) > 1 else node.kwargs["output_size"]
                g = _adaptive(first_g, size, where)
            elif not ins:
                g = None  # shape arithmetic and the like: touches no tensor of the image
            else:
                raise NotImplementedError(f"{where}: receptive field of this operation is not "
                                          f"known")
        env[node] = g
        out.append((node, g))
    return out


def _rf(g: _Geom, where: str) -> RF:
    if (g.rows.lo, g.rows.hi, g.rows.jump, g.rows.n) != (g.cols.lo, g.cols.hi, g.cols.jump,
                                                           g.cols.n):
        raise ValueError(f"{where}: the RF is not square (rows {g.rows}, columns {g.cols})")
    a = g.rows
    return RF(size=a.hi - a.lo + 1, jump=a.jump, offset=(a.lo + a.hi) / 2, feature_size=a.n)


def module_fields(module: nn.Module, input_size: int = 224) -> dict[str, RF]:
    """RF of the output of every submodule call of `module` for a square input of `input_size`.

    Keyed by module path (the fx `call_module` target). A module called twice with different
    geometry raises ValueError: its output has no single RF (and would be hooked ambiguously).
    Unknown operations raise NotImplementedError rather than guess.
    """
    rfs: dict[str, RF] = {}
    for node, g in _trace(module, input_size):
        if node.op != "call_module" or g is None:
            continue
        rf = _rf(g, f"module {node.target}")
        if rfs.setdefault(node.target, rf) != rf:
            raise ValueError(f"module {node.target} is called twice with different geometry")
    return rfs


def receptive_fields(model: nn.Module, input_size: int = 224) -> dict[str, RF]:
    """RF of every catalogue layer (conv1, pool1, conv2..convN, fc) keyed by paper name.

    A layer's RF is that of its measurement point (the ReLU after it; for the second conv of a
    residual block, the ReLU after the addition, so the RF is the union of both paths). `fc`
    sees the whole input: its RF is the union over the last feature map.
    """
    fields = module_fields(model, input_size)
    out = {}
    for name, layer in catalogue(model).items():
        if layer.point not in fields:
            raise ValueError(f"layer {name}: module {layer.point} is never called by the model")
        out[name] = fields[layer.point]
    return out


def rf_table(model: nn.Module, model_name: str, input_size: int = 224) -> pa.Table:
    """The `receptive_fields.parquet` rows of one model, in forward order (schema RF_SCHEMA)."""
    rfs = receptive_fields(model, input_size)
    layers = catalogue(model)
    rows = [{"model": model_name, "layer": name, "module": layers[name].module,
             "channels": layers[name].channels, "rf_size": rf.size, "jump": rf.jump,
             "offset": float(rf.offset), "feature_size": rf.feature_size,
             "input_size": input_size}
            for name, rf in rfs.items()]
    return pa.Table.from_pylist(rows, schema=RF_SCHEMA)


# ---------------------------------------------------------------------------------------------
# Patches


def cut_patches(images: Tensor, tops: Tensor | Sequence[int], lefts: Tensor | Sequence[int],
                size: int) -> tuple[Tensor, Tensor]:
    """Cut one `size` x `size` square per image; pixels outside the image are 0 (black).

    images (N, C, H, W) of any dtype/device, tops/lefts (N,) integers (may be negative or run
    past the image) -> patches (N, C, size, size) and masks (N, size, size), True where the pixel
    lies inside the image. One gather with clamped indices, then zeroing: no padded copy of the
    images (an RF can be several times the image) and no loop over images.
    """
    if images.dim() != 4:
        raise ValueError(f"images must be (N, C, H, W), got shape {tuple(images.shape)}")
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"patch size must be a positive integer, got {size!r}")
    n, _, h, w = images.shape
    dev = images.device
    tops = torch.as_tensor(tops, dtype=torch.int64, device=dev).reshape(-1)
    lefts = torch.as_tensor(lefts, dtype=torch.int64, device=dev).reshape(-1)
    if tops.numel() != n or lefts.numel() != n:
        raise ValueError(f"need one top and one left per image: {n} images, "
                         f"{tops.numel()} tops, {lefts.numel()} lefts")
    step = torch.arange(size, device=dev)
    rows, cols = tops[:, None] + step, lefts[:, None] + step               # (N, size)
    row_in, col_in = (rows >= 0) & (rows < h), (cols >= 0) & (cols < w)
    mask = row_in[:, :, None] & col_in[:, None, :]                          # (N, size, size)
    idx = torch.arange(n, device=dev)[:, None, None]
    # advanced indices around a slice: the result is (N, size, size, C)
    got = images[idx, :, rows.clamp(0, h - 1)[:, :, None], cols.clamp(0, w - 1)[:, None, :]]
    patches = got.permute(0, 3, 1, 2).masked_fill(~mask[:, None], 0)  # where(), not *: NaN*0
    return patches.contiguous(), mask


def cut_patch(image: Tensor, top: int, left: int, size: int) -> tuple[Tensor, Tensor]:
    """One image (C, H, W) -> patch (C, size, size) black outside the image, mask (size, size)."""
    if image.dim() != 3:
        raise ValueError(f"image must be (C, H, W), got shape {tuple(image.shape)}")
    patches, masks = cut_patches(image[None], [int(top)], [int(left)], size)
    return patches[0], masks[0]
