"""Receptive-field geometry derived from the module graph, and RF patches cut out of images.

The model is traced with `torch.fx`; every tensor in the graph carries, per spatial axis, the
interval of input pixels its neuron 0 sees (`lo`..`hi`), the jump between adjacent neurons and
the feature-map length. Convolutions and pools compose the interval (kernel, stride, padding,
dilation, ceil mode; rows and columns separately, so 1x7 / 7x1 kernels give rectangles),
element-wise modules (BN, ReLU, Identity) pass it through, additions and channel
concatenations take the union of their branches (a residual block's RF is the larger of its two
paths), permutes/reshapes follow the spatial axes, and global operators (adaptive pooling to
1x1, flatten, a squeeze-and-excitation gate) set `global_context`. Nothing is looked up in a
table, so any model of `pipeline.models.zoo.supported_models()`, at any input size, gets its own
values; unknown operations raise instead of guessing. Per named layer (paper names):
`pipeline.models.rf_catalogue.receptive_fields`.

    rf = module_fields(build_model("resnet34"), input_size=224)["layer1.0.relu"]
    top, left, size = rf.box(*rf.center())                         # input square of the centre neuron
    patch, mask = cut_patch(image, top, left, size)                # black outside the image
    patches, masks = cut_patches(images, tops, lefts, size)        # batched, no Python loop

`module_fields(module, input_size)` gives the same for every module call (leaf or container)
of any traceable network, keyed by module path; `module_outputs` adds each output's shape,
layout and call count (what `pipeline.models.layers` needs to offer module paths as layers).
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from torchvision.ops import stochastic_depth

__all__ = ["RF", "ModuleField", "module_fields", "module_outputs", "inference_graph", "cut_patch",
           "cut_patches"]



@dataclass(frozen=True)
class RF:
    """Receptive field of one layer. Per axis, neuron (y, x) sees input rows
    offset_y + jump_y*y - (size_y-1)/2 ... offset_y + jump_y*y + (size_y-1)/2 (columns alike).

    `size`, `jump`, `offset` and `feature_size` are the square view every consumer cuts patches
    with: `size` is the side of the smallest square that holds the RF (= both sides when the RF
    is square), `jump`/`offset`/`feature_size` are the rows' values. The `_x` fields (and
    `size_y`) are per axis and default to the square values, so `RF(size=27, jump=4, offset=0.0,
    feature_size=56)` is a square RF. `global_context`: the neuron also depends on the whole
    image through a global operator (adaptive pooling, a squeeze-and-excitation gate); the
    box is then its local, spatial-path RF.
    """

    size: int          # side of the square that holds the RF
    jump: int          # input pixels between adjacent neurons (rows)
    offset: float      # centre of neuron (0, 0) in input coordinates (rows)
    feature_size: int  # H of the layer's feature map at this input size
    size_y: int | None = None          # RF height (default: size)
    size_x: int | None = None          # RF width (default: size)
    jump_x: int | None = None          # columns' jump (default: jump)
    offset_x: float | None = None      # columns' offset (default: offset)
    feature_size_x: int | None = None  # W of the feature map (default: feature_size)
    global_context: bool = False

    def __post_init__(self) -> None:
        for name, default in (("size_y", self.size), ("size_x", self.size),
                              ("jump_x", self.jump), ("offset_x", self.offset),
                              ("feature_size_x", self.feature_size)):
            if getattr(self, name) is None:
                object.__setattr__(self, name, default)

    @property
    def square(self) -> bool:
        return (self.size_y, self.jump, self.offset, self.feature_size) == \
            (self.size_x, self.jump_x, self.offset_x, self.feature_size_x)

    def _firsts(self) -> tuple[int, int]:
        """Top and left of neuron (0, 0)'s square box (the rectangle centred in it)."""
        top = round(self.offset - (self.size_y - 1) / 2) - (self.size - self.size_y) // 2
        left = round(self.offset_x - (self.size_x - 1) / 2) - (self.size - self.size_x) // 2
        return top, left

    @classmethod
    def square_grid(cls, size: int, jump: int, first: int, feature_size: int = 0) -> "RF":
        """The square RF whose neuron (0, 0) box starts at row = column `first`: the view the
        analysis cuts patches with (pipeline.stats.analysis.LayerSpec, accumulators.PositiveMean)."""
        return cls(size=size, jump=jump, offset=first + (size - 1) / 2, feature_size=feature_size)

    def padding(self, in_size: int, feature_size: int) -> tuple[int, int]:
        """(before, after) padding of an input side (square RF) so that neuron y's box starts
        at row jump*y; negative values crop. The padded side is size + jump*(feature_size-1)
        long: what a stride-`jump` correlation with a `size` kernel needs for `feature_size`
        outputs."""
        before = -self._firsts()[0]
        return before, self.size + self.jump * (feature_size - 1) - in_size - before

    def box(self, y: int, x: int) -> tuple[int, int, int]:
        """(top, left, size) of neuron (y, x)'s square; may be negative or run past the image."""
        top, left = self._firsts()
        return top + self.jump * y, left + self.jump_x * x, self.size

    def rect(self, y: int, x: int) -> tuple[int, int, int, int]:
        """(top, left, height, width) of neuron (y, x)'s exact RF rectangle."""
        top = round(self.offset - (self.size_y - 1) / 2) + self.jump * y
        left = round(self.offset_x - (self.size_x - 1) / 2) + self.jump_x * x
        return top, left, self.size_y, self.size_x

    def boxes(self, ys: Tensor, xs: Tensor) -> tuple[Tensor, Tensor]:
        """Vectorised `box`: int64 tops and lefts for neuron coordinates `ys`, `xs`."""
        top, left = self._firsts()
        return (top + self.jump * ys.to(torch.int64), left + self.jump_x * xs.to(torch.int64))

    def center(self) -> tuple[int, int]:
        """The centre neuron (H//2, W//2) of the feature map."""
        return self.feature_size // 2, self.feature_size_x // 2


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

    def everything(self, n: int = 1) -> "_Axis":
        """`n` neurons that each see what every neuron of this axis sees (global pool)."""
        return _Axis(self.lo, self.hi + self.jump * (self.n - 1), 0 if n > 1 else
                     self.jump * self.n, n)


@dataclass(frozen=True)
class _Geom:
    rows: _Axis
    cols: _Axis
    dims: tuple[int, int] | None = (2, 3)  # tensor dims of rows/cols; None: folded (flatten)
    glob: bool = False                     # depends on the whole image (a global operator)

    @property
    def flat(self) -> bool:
        return self.dims is None

    def with_(self, **kw: Any) -> "_Geom":
        return _Geom(**{**self.__dict__, **kw})


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
    nn.BatchNorm1d, nn.BatchNorm2d, nn.SyncBatchNorm,
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh,
    nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Softplus, nn.Mish, nn.Identity, nn.Dropout,
    nn.Dropout2d,
)
# normalisations whose statistics run over the spatial axes: every output sees the whole map
_SPATIAL_STAT_MODULES = (nn.GroupNorm, nn.InstanceNorm2d, nn.LocalResponseNorm)
_ELEMENTWISE_FUNCTIONS = {
    F.relu, F.relu_, torch.relu, torch.relu_, F.relu6, F.leaky_relu, F.gelu, F.silu, F.elu,
    F.hardswish, F.hardsigmoid, F.hardtanh, F.mish, torch.sigmoid, torch.tanh, F.dropout,
    F.dropout2d, operator.neg, operator.pos, stochastic_depth,
}
_ELEMENTWISE_METHODS = {"relu", "relu_", "sigmoid", "tanh", "contiguous", "clone", "detach",
                        "float", "double", "half", "to", "neg", "sigmoid_"}
_BINARY_FUNCTIONS = {operator.add, operator.iadd, operator.sub, operator.isub, operator.mul,
                     operator.imul, operator.truediv, torch.add, torch.sub, torch.mul,
                     torch.maximum, torch.minimum}
_BINARY_METHODS = {"add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_"}
_SHAPE_METHODS = {"size", "dim"}


def _is_gate(g: _Geom, others: list[_Geom]) -> bool:
    """A 1x1 map from a global operator broadcast onto a spatial map (an SE gate)."""
    return (g.glob and not g.flat and g.rows.n == g.cols.n == 1
            and any(not o.flat and (o.rows.n, o.cols.n) != (1, 1) for o in others))


def _union(geoms: list[_Geom], where: str) -> _Geom:
    """The RF of an element-wise combination of branches: the union of the branches' RFs.

    A global 1x1 gate broadcast onto a spatial map adds no spatial extent: the result keeps the
    map's RF and is marked as having global context.
    """
    gates = [g for g in geoms if _is_gate(g, geoms)]
    maps = [g for g in geoms if not _is_gate(g, geoms)]
    out = maps[0]
    for g in maps[1:]:
        if g.dims != out.dims:
            raise ValueError(f"{where}: branches disagree on the layout ({out.dims} vs {g.dims})")
        axes = []
        for a, b in ((out.rows, g.rows), (out.cols, g.cols)):
            if a.jump != b.jump or a.n != b.n:
                raise ValueError(f"{where}: branches disagree on the neuron grid "
                                 f"(jump {a.jump} vs {b.jump}, length {a.n} vs {b.n})")
            axes.append(_Axis(min(a.lo, b.lo), max(a.hi, b.hi), a.jump, a.n))
        out = _Geom(axes[0], axes[1], out.dims, out.glob or g.glob)
    return out.with_(glob=True) if gates else out


def _nchw(g: _Geom, ndim: int, where: str) -> None:
    if g.dims != (ndim - 2, ndim - 1):
        raise ValueError(f"{where}: a spatial window on a tensor whose last two dims are not "
                         f"its spatial axes (layout {g.dims})")


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
    return g.with_(rows=axes[0], cols=axes[1])


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
    """Adaptive pooling: equal bins are a plain pool; a 1x1 output (or unequal bins, whose
    neurons have no common RF) sees the whole map and is a global operator."""
    size = output_size if isinstance(output_size, (tuple, list)) else (output_size, output_size)
    axes, glob = [], g.glob
    for a, o in zip((g.rows, g.cols), size):
        o = a.n if o is None else int(o)
        if o == a.n:
            axes.append(a)
        elif o > 1 and a.n % o == 0:  # equal bins: a plain pool with kernel = stride = n / o
            axes.append(a.window(a.n // o, a.n // o, 0, 1, o))
        elif a.n == 1:  # replication: every output neuron reads the one input neuron
            axes.append(_Axis(a.lo, a.hi, 0, o))
        else:
            axes.append(a.everything(o))
            glob = True
    return g.with_(rows=axes[0], cols=axes[1], glob=glob)


def _flatten(g: _Geom, start_dim: int, ndim: int) -> _Geom:
    if g.flat:
        return g
    start = start_dim % ndim
    if start > min(g.dims):  # only folds the spatial axes into each other
        raise ValueError(f"flatten(start_dim={start_dim}) keeps spatial structure we cannot track")
    return _Geom(g.rows.everything(), g.cols.everything(), None, True)


def _last_dim_op(g: _Geom, ndim: int, count: int, where: str) -> _Geom:
    """Linear / layer norm over the last `count` dims: per position unless those are spatial."""
    if g.flat or not set(g.dims) & set(range(ndim - count, ndim)):
        return g
    if g.rows.n == g.cols.n == 1:
        return g
    return _Geom(g.rows.everything(), g.cols.everything(), None, True)


def _module_geom(m: nn.Module, g: _Geom, ndim: int, where: str) -> _Geom:
    if isinstance(m, nn.Conv2d):
        _nchw(g, ndim, where)
        return _window(g, m.kernel_size, m.stride, _conv_padding(m), m.dilation, False, where)
    if isinstance(m, nn.MaxPool2d):
        _nchw(g, ndim, where)
        return _window(g, m.kernel_size, m.stride or m.kernel_size, m.padding, m.dilation,
                       m.ceil_mode, where)
    if isinstance(m, nn.AvgPool2d):
        _nchw(g, ndim, where)
        return _window(g, m.kernel_size, m.stride or m.kernel_size, m.padding, 1, m.ceil_mode,
                       where)
    if isinstance(m, (nn.ZeroPad2d, nn.ConstantPad2d)):
        _nchw(g, ndim, where)
        left, right, top, bottom = m.padding
        # padding shifts neuron indices (neuron 0 is now `top` pixels above the old row 0)
        r, c = g.rows, g.cols
        return g.with_(rows=_Axis(r.lo - r.jump * top, r.hi - r.jump * top, r.jump,
                                  r.n + top + bottom),
                       cols=_Axis(c.lo - c.jump * left, c.hi - c.jump * left, c.jump,
                                  c.n + left + right))
    if isinstance(m, (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)):
        _nchw(g, ndim, where)
        return _adaptive(g, m.output_size, where)
    if isinstance(m, nn.Flatten):
        return _flatten(g, m.start_dim, ndim)
    if isinstance(m, nn.Linear):
        return _last_dim_op(g, ndim, 1, where)
    if isinstance(m, nn.LayerNorm):
        return _last_dim_op(g, ndim, len(m.normalized_shape), where)
    if isinstance(m, _SPATIAL_STAT_MODULES):
        return g.with_(glob=True)
    if isinstance(m, _ELEMENTWISE_MODULES):
        return g
    raise NotImplementedError(f"{where}: receptive field of {type(m).__name__} is not known; "
                              f"known: convolutions, max/avg pools, padding, adaptive pools, "
                              f"flatten, linear, normalisations and element-wise layers")


def _arg(node: fx.Node, i: int, name: str, default: Any = None) -> Any:
    return node.args[i] if len(node.args) > i else node.kwargs.get(name, default)


def _dims_arg(node: fx.Node, start: int) -> tuple[int, ...]:
    rest = node.args[start:] or (node.kwargs.get("dims"),)
    if len(rest) == 1 and isinstance(rest[0], (tuple, list)):
        rest = tuple(rest[0])
    return tuple(int(d) for d in rest)


def _reshaped(g: _Geom, before: tuple[int, ...], after: tuple[int, ...], where: str) -> _Geom:
    """view/reshape that only regroups the dims before the spatial ones (channel shuffle)."""
    if g.flat:
        return g
    if g.dims == (len(before) - 2, len(before) - 1) and after[-2:] == before[-2:] and \
            math.prod(after[:-2]) == math.prod(before[:-2]):
        return g.with_(dims=(len(after) - 2, len(after) - 1))
    if g.rows.n == g.cols.n == 1 and math.prod(after) == math.prod(before):
        return _Geom(g.rows.everything(), g.cols.everything(), None, True)
    raise NotImplementedError(f"{where}: a reshape from {before} to {after} moves the spatial axes")


def _calls(node: fx.Node, functions: Any, methods: Any = ()) -> bool:
    """The node calls one of `functions` (call_function) or one of `methods` (call_method)."""
    if node.op == "call_function":
        return node.target in functions
    return node.op == "call_method" and node.target in methods


def _function_geom(node: fx.Node, ins: list[_Geom], first: _Geom | None, val_in: Any,
                   val_out: Any, where: str) -> _Geom | None:
    """Geometry of a call_function / call_method node; None when it touches no image tensor.

    `ins`: the geometries of all its image-tensor arguments; `first`, `val_in`: geometry and
    meta value of its first argument; `val_out`: its meta result.
    """
    ndim = val_in.dim() if isinstance(val_in, Tensor) else 0
    if _calls(node, _BINARY_FUNCTIONS, _BINARY_METHODS):
        return _union(ins, where) if ins else None
    if not ins:
        return None  # shape arithmetic, constants: touches no tensor of the image
    if _calls(node, _ELEMENTWISE_FUNCTIONS, _ELEMENTWISE_METHODS):
        return first
    if _calls(node, {getattr}, _SHAPE_METHODS):
        return None
    if _calls(node, {torch.cat}):
        dim, nd = _arg(node, 1, "dim", 0), val_out.dim() if isinstance(val_out, Tensor) else 0
        if not ins[0].flat and dim % max(nd, 1) in ins[0].dims:   # (the first argument is a list)
            raise NotImplementedError(f"{where}: concatenation along a spatial axis")
        return _union(ins, where)  # concatenated channels: the union over the branches
    if first is None:
        raise NotImplementedError(f"{where}: receptive field of this operation is not known")
    return _one_map_geom(node, first, ndim, val_in, val_out, where)


def _one_map_geom(node: fx.Node, g: _Geom, ndim: int, val_in: Any, val_out: Any,
                  where: str) -> _Geom:
    """Geometry of a function or method applied to one image tensor of geometry `g`."""
    if _calls(node, {torch.flatten}, {"flatten"}):
        return _flatten(g, int(_arg(node, 1, "start_dim", 0)), ndim)
    if _calls(node, {F.adaptive_avg_pool2d, F.adaptive_max_pool2d}):
        _nchw(g, ndim, where)
        return _adaptive(g, _arg(node, 1, "output_size"), where)
    if _calls(node, {F.max_pool2d, F.avg_pool2d}):
        _nchw(g, ndim, where)
        return _pool_call(node, g, where)
    if _calls(node, {torch.permute}, {"permute"}):
        return _permuted(g, _dims_arg(node, 1), ndim)
    if _calls(node, {torch.transpose}, {"transpose"}):
        return _transposed(g, int(_arg(node, 1, "dim0")) % ndim, int(_arg(node, 2, "dim1")) % ndim)
    if _calls(node, {F.layer_norm}):
        shape = _arg(node, 1, "normalized_shape")
        return _last_dim_op(g, ndim, 1 if isinstance(shape, int) else len(shape), where)
    if _calls(node, {torch.reshape}, {"view", "reshape"}):
        return _reshaped(g, tuple(val_in.shape), tuple(val_out.shape), where)
    if _calls(node, {torch.chunk, torch.split}, {"chunk", "split"}):
        if not g.flat and _arg(node, 2, "dim", 0) % ndim in g.dims:
            raise NotImplementedError(f"{where}: splitting along a spatial axis")
        return g  # a tuple of tensors, each with the input's geometry
    if _calls(node, {operator.getitem}):
        if isinstance(val_in, (tuple, list)):
            return g  # an element of a chunk/split
        raise NotImplementedError(f"{where}: indexing a feature map")
    if _calls(node, {torch.mean, torch.amax, torch.sum}, {"mean", "amax", "sum"}):
        return _reduced(g, _arg(node, 1, "dim"), ndim, node, where)
    raise NotImplementedError(f"{where}: receptive field of this operation is not known")


def _pool_call(node: fx.Node, g: _Geom, where: str) -> _Geom:
    """F.max_pool2d / F.avg_pool2d with their positional or keyword arguments."""
    k = _arg(node, 1, "kernel_size")
    s = _arg(node, 2, "stride") or k
    p = _arg(node, 3, "padding", 0)
    if node.target is F.max_pool2d:
        d, ceil = _arg(node, 4, "dilation", 1), _arg(node, 5, "ceil_mode", False)
    else:
        d, ceil = 1, _arg(node, 4, "ceil_mode", False)
    return _window(g, k, s, p, d, bool(ceil), where)


def _permuted(g: _Geom, order: tuple[int, ...], ndim: int) -> _Geom:
    """The spatial axes follow a permutation of the dims."""
    if g.flat:
        return g
    order = tuple(d % ndim for d in order)
    return g.with_(dims=(order.index(g.dims[0]), order.index(g.dims[1])))


def _transposed(g: _Geom, a: int, b: int) -> _Geom:
    """The spatial axes follow a swap of dims `a` and `b`."""
    if g.flat:
        return g
    swap = {a: b, b: a}
    return g.with_(dims=tuple(swap.get(d, d) for d in g.dims))


def _reduced(g: _Geom, dims: Any, ndim: int, node: fx.Node, where: str) -> _Geom:
    """mean / amax / sum over `dims` (None: all): over both spatial axes a global operator."""
    dims = {d % ndim for d in ((dims,) if isinstance(dims, int) else dims or range(ndim))}
    if g.flat or not dims & set(g.dims):
        return g
    if not set(g.dims) <= dims:
        raise NotImplementedError(f"{where}: reduction over one spatial axis")
    keep = bool(_arg(node, 2, "keepdim", False))
    return _Geom(g.rows.everything(), g.cols.everything(), g.dims if keep else None, True)


class _Tracer(fx.Tracer):
    """torch.fx tracer that also records which node each (non-leaf) module call returned."""

    def __init__(self) -> None:
        super().__init__()
        self.module_outputs: list[tuple[str, fx.Node]] = []

    def call_module(self, m: nn.Module, forward: Any, args: Any, kwargs: Any) -> Any:
        out = super().call_module(m, forward, args, kwargs)
        if isinstance(out, fx.Proxy):
            self.module_outputs.append((self.path_of_module(m), out.node))
        return out


def _meta(v: Any) -> Any:
    return torch.empty_like(v, device="meta") if isinstance(v, Tensor) else v


@dataclass
class _Trace:
    nodes: list[tuple[fx.Node, _Geom | None, Any]]     # node, geometry, meta value
    modules: list[tuple[str, fx.Node]]                  # (module path, its output node), in order


_Env = dict[fx.Node, tuple[_Geom | None, Any]]  # geometry (None: no image) and meta value


def _trace(module: nn.Module, input_size: int) -> _Trace:
    """Trace `module` in eval mode and propagate geometry and meta tensors through the graph."""
    if isinstance(input_size, bool) or not isinstance(input_size, int) or input_size < 1:
        raise ValueError(f"input size must be a positive integer, got {input_size!r}")
    graph, module_calls = inference_graph(module)
    if sum(node.op == "placeholder" for node in graph.nodes) > 1:
        raise ValueError("the module takes more than one input; RFs need one image")
    modules = dict(module.named_modules())
    env: _Env = {}
    with torch.no_grad():
        for node in graph.nodes:
            if node.op == "placeholder":
                env[node] = _image_input(input_size)
            elif node.op == "get_attr":  # a constant: sees no input pixel
                env[node] = None, _meta(operator.attrgetter(str(node.target))(module))
            elif node.op != "output":
                env[node] = _propagate(node, modules, env)
    return _Trace([(node, g, v) for node, (g, v) in env.items()], module_calls)


def inference_graph(module: nn.Module) -> tuple[fx.Graph, list[tuple[str, fx.Node]]]:
    """The fx graph of `module` in eval mode (no auxiliary heads, no dropout / stochastic
    depth) and the (module path, output node) of every module call; restores the mode."""
    was_training = module.training
    module.eval()
    try:
        tracer = _Tracer()
        graph = tracer.trace(module)
    finally:
        module.train(was_training)
    return graph, tracer.module_outputs


def _image_input(input_size: int) -> tuple[_Geom, Tensor]:
    """The input image: each pixel sees itself."""
    axis = _Axis(0, 0, 1, input_size)
    return _Geom(axis, axis), torch.empty(1, 3, input_size, input_size, device="meta")


def _propagate(node: fx.Node, modules: dict[str, nn.Module],
               env: _Env) -> tuple[_Geom | None, Any]:
    """Geometry and meta value of a call_module / call_function / call_method node."""
    where = f"{node.op} {node.target}"
    first = node.args[0] if node.args else None
    first_g, val_in = env[first] if isinstance(first, fx.Node) else (None, None)
    args = fx.node.map_arg(node.args, lambda n: env[n][1])
    kwargs = fx.node.map_arg(node.kwargs, lambda n: env[n][1])
    g: _Geom | None
    if node.op == "call_module":
        m = modules[node.target]
        v = _call_on_meta(m, args, kwargs)
        if first_g is None:
            raise ValueError(f"{where}: input carries no image geometry")
        g = _module_geom(m, first_g, val_in.dim(), where)
    else:
        if node.op == "call_function":
            v = node.target(*args, **kwargs)
        else:  # call_method
            v = getattr(args[0], node.target)(*args[1:], **kwargs)
        g = _function_geom(node, _image_args(node, env), first_g, val_in, v, where)
    _check_grid(g, v, where)
    return g, v


def _image_args(node: fx.Node, env: _Env) -> list[_Geom]:
    """Geometries of the node's arguments that carry the image, in order (repeats kept)."""
    found: list[fx.Node] = []
    fx.node.map_arg((node.args, node.kwargs), found.append)
    return [env[n][0] for n in found if env[n][0] is not None]


def _check_grid(g: _Geom | None, v: Any, where: str) -> None:
    """The predicted feature-map size must be PyTorch's (or the arithmetic is wrong)."""
    if g is not None and not g.flat and isinstance(v, Tensor):
        shape = (v.shape[g.dims[0]], v.shape[g.dims[1]])
        if shape != (g.rows.n, g.cols.n):
            raise AssertionError(f"{where}: predicted {g.rows.n}x{g.cols.n} "
                                 f"neurons, PyTorch gives {shape[0]}x{shape[1]}")


def _call_on_meta(m: nn.Module, args: Any, kwargs: Any) -> Any:
    """`m(*args, **kwargs)` in eval mode with its parameters and buffers on the meta device."""
    state = {k: _meta(t) for k, t in [*m.named_parameters(), *m.named_buffers()]}
    was = m.training
    m.eval()
    try:
        return torch.func.functional_call(m, state, tuple(args), dict(kwargs))
    finally:
        m.train(was)


def _rf(g: _Geom) -> RF:
    r, c = g.rows, g.cols
    size = max(r.hi - r.lo + 1, c.hi - c.lo + 1)
    return RF(size=size, jump=r.jump, offset=(r.lo + r.hi) / 2, feature_size=r.n,
              size_y=r.hi - r.lo + 1, size_x=c.hi - c.lo + 1, jump_x=c.jump,
              offset_x=(c.lo + c.hi) / 2, feature_size_x=c.n, global_context=g.glob)


@dataclass(frozen=True)
class ModuleField:
    """What the trace knows about one module's output (see `module_outputs`)."""

    path: str
    rf: RF | None            # None: the output carries no image geometry
    shape: tuple[int, ...]   # output shape for a 1-image batch (() when not a tensor)
    nchw: bool               # a (N, C, H, W) feature map (hookable as a layer)
    calls: int               # how often the forward calls the module
    overwritten: bool = False  # an in-place function (F.relu(x, inplace=True)) rewrites it


def module_outputs(module: nn.Module, input_size: int = 224) -> dict[str, ModuleField]:
    """Every module the forward calls (leaf or container), in call order of its first output."""
    tr = _trace(module, input_size)
    info = {node: (g, v) for node, g, v in tr.nodes}
    calls: dict[str, int] = {}
    first: dict[str, tuple[fx.Node, list]] = {}
    for path, node in tr.modules:
        calls[path] = calls.get(path, 0) + 1
        first.setdefault(path, (node, []))[1].append(node)
    order = {node: i for i, (node, _, _) in enumerate(tr.nodes)}
    overwritten = {n.args[0] for n, _, _ in tr.nodes
                   if n.op in ("call_function", "call_method") and n.args
                   and isinstance(n.args[0], fx.Node)
                   and (n.kwargs.get("inplace") is True or
                        n.op == "call_method" and str(n.target).endswith("_")
                        and not str(n.target).startswith("_"))}
    out = {}
    for path in sorted(first, key=lambda p: order.get(first[p][0], -1)):
        if not path:
            continue
        node = first[path][0]
        g, v = info.get(node, (None, None))
        rfs = {_rf(info[n][0]) for n in first[path][1] if info.get(n, (None,))[0] is not None}
        rf = rfs.pop() if len(rfs) == 1 else None  # two calls, two geometries: no single RF
        shape = tuple(v.shape) if isinstance(v, Tensor) else ()
        nchw = (g is not None and not g.flat and isinstance(v, Tensor) and v.dim() == 4
                and g.dims == (2, 3))
        out[path] = ModuleField(path, rf, shape, nchw, calls[path], node in overwritten)
    return out


def module_fields(module: nn.Module, input_size: int = 224) -> dict[str, RF]:
    """RF of the output of every submodule call of `module` for a square input of `input_size`.

    Keyed by module path, leaf modules and containers alike. A module called twice with
    different geometry raises ValueError: its output has no single RF (and would be hooked
    ambiguously). Unknown operations raise NotImplementedError rather than guess.
    """
    tr = _trace(module, input_size)
    info = {node: g for node, g, _ in tr.nodes}
    rfs: dict[str, RF] = {}
    for path, node in tr.modules:
        g = info.get(node)
        if not path or g is None:
            continue
        rf = _rf(g)
        if rfs.setdefault(path, rf) != rf:
            raise ValueError(f"module {path} is called twice with different geometry")
    return rfs


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
