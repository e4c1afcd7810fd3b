"""Activation maximization: composable objectives, image parameterisations, the Adam loop.

Pure compute (no I/O, no Ray); `jobs.actmax` fans it out over Ray workers. Lucent-style pieces:

    obj = neuron("conv3", channels=[0, 1, 2]) - 1e-3 * total_variation()   # objectives compose
    params, image_fn = pixel((3, 3, 224, 224))                              # (params, image_fn)
    res = optimize(model, obj, params, image_fn, steps=31, lr=0.1, weight_decay=1e-6)
    res.start, res.end                                                      # objective per row

and the paper's recipe for many channels of one layer in one call:

    res = maximize_channels(model, layer, range(64), size=224, preprocess=pre)   # Settings()

Paper defaults (`Settings()`): the optimised tensor is the model input in its preprocessed space,
initialised at zero; Adam(lr 0.1, weight_decay 1e-6) for 31 steps; the objective is the PRE-ReLU
value of the centre neuron (H//2, W//2) of the channel. Post-ReLU would not work from a zero image:
wherever the centre neuron starts at or below zero, ReLU passes no gradient and the image never
moves. Adam's `weight_decay` adds λ·x to the gradient, i.e. it is the paper's −λ‖x‖² penalty.

Batching: row b of the batch optimises channel `channels[b]`. With the model in eval mode (BN
uses its running statistics) no row sees another, and Adam is elementwise, so a batch gives the
same result as optimising each channel alone (tests check this). The forward stops at the target
layer (`Trace(stop=True)`), and — when that is exact (pixel parameterisation, no transforms, no
TV penalty, a local layer) — only the input window covering the centre neuron's receptive field
(`pipeline.models.geometry`, per axis) is optimised:
every pixel outside it has exactly zero gradient, so with a zero start it stays exactly zero
under Adam and weight decay, and the cropped run equals the full-image run (tested).

Off by default, Lucent-style extras: `decorrelated` / `fft` parameterisations (sigmoid RGB, then
the model's preprocessing), `jitter` / `random_scale` transforms drawn from a seeded generator,
`l2` and `total_variation` penalties.
"""
from __future__ import annotations

import contextlib
import time
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.models.geometry import ModuleField, module_outputs
from pipeline.models.hooks import Trace
from pipeline.results import catalog
from pipeline.models.layers import Layer, analysable_layers, catalogue, has_paper_names
from pipeline.data.preprocess import Preprocess
from pipeline.seeds import derive_seed

__all__ = ["Objective", "neuron", "channel", "l2", "total_variation",
           "pixel", "decorrelated", "fft", "PARAMS",
           "Transform", "jitter", "random_scale", "compose",
           "ActmaxResult", "optimize", "Window", "input_window",
           "Settings", "maximize_channels", "calibrate_bn", "display_images",
           "derive_seed", "channel_list", "sort_rows", "chunk_table", "timed_chunk",
           "TABLE_SCHEMA"]


# --------------------------------------------------------------------------------- objectives
ObjectiveFn = Callable[[dict[str, Tensor], Tensor], Tensor]


class Objective:
    """A value per batch row to MAXIMISE, from the traced pre-ReLU activations and the image.

    `fn(acts, image) -> (B,)`, where `acts` maps layer names to pre-ReLU tensors and `image` is
    the model input before transforms. Objectives add, subtract and scale: `a + b`, `a - 0.1 * b`.
    """

    def __init__(self, fn: ObjectiveFn, layers: Sequence[str] = (), name: str = "objective"):
        self.fn = fn
        self.layers = tuple(dict.fromkeys(layers))
        self.name = name

    def __call__(self, acts: dict[str, Tensor], image: Tensor) -> Tensor:
        return self.fn(acts, image)

    def __add__(self, other: "Objective | float") -> "Objective":
        if isinstance(other, Objective):
            return Objective(lambda a, x: self(a, x) + other(a, x), self.layers + other.layers,
                             f"{self.name} + {other.name}")
        return Objective(lambda a, x: self(a, x) + other, self.layers, f"{self.name} + {other}")

    __radd__ = __add__

    def __neg__(self) -> "Objective":
        return Objective(lambda a, x: -self(a, x), self.layers, f"-{self.name}")

    def __sub__(self, other: "Objective | float") -> "Objective":
        return self + (-other)

    def __rsub__(self, other: float) -> "Objective":
        return (-self) + other

    def __mul__(self, other: "Objective | float") -> "Objective":
        if isinstance(other, Objective):
            return Objective(lambda a, x: self(a, x) * other(a, x), self.layers + other.layers,
                             f"({self.name}) * ({other.name})")
        return Objective(lambda a, x: other * self(a, x), self.layers, f"{other} * {self.name}")

    __rmul__ = __mul__

    def __repr__(self) -> str:
        return f"Objective({self.name})"


def _rows(channels: int | Sequence[int], batch: int, device: torch.device) -> Tensor:
    if isinstance(channels, int):
        return torch.full((batch,), channels, dtype=torch.long, device=device)
    idx = torch.as_tensor(list(channels), dtype=torch.long, device=device)
    if idx.numel() != batch:
        raise ValueError(f"{idx.numel()} channels given for a batch of {batch} rows")
    return idx


def neuron(layer: str, channels: int | Sequence[int], y: int | None = None,
           x: int | None = None) -> Objective:
    """Pre-ReLU value of one neuron of `channels` (an int, or one channel per batch row) at
    (y, x); None = the centre (H//2, W//2) of the feature map (the paper's objective)."""
    def fn(acts: dict[str, Tensor], _image: Tensor) -> Tensor:
        a = acts[layer]
        rows = torch.arange(a.shape[0], device=a.device)
        cols = _rows(channels, a.shape[0], a.device)
        if a.dim() == 2:  # fc: no spatial position
            return a[rows, cols]
        yy = a.shape[2] // 2 if y is None else y
        xx = a.shape[3] // 2 if x is None else x
        return a[rows, cols, yy, xx]
    return Objective(fn, [layer], f"neuron({layer}, {channels}, {y}, {x})")


def _pooled_neuron(layer: str, pool: nn.Module, channels: int | Sequence[int],
                   y: int | None = None, x: int | None = None) -> Objective:
    """`neuron` of `pool(acts[layer])`: pool1's pre-ReLU neuron, from conv1's pre-ReLU map."""
    inner = neuron(layer, channels, y, x)
    return Objective(lambda a, img: inner({layer: pool(a[layer])}, img), [layer],
                     f"pooled {inner.name}")


def channel(layer: str, channels: int | Sequence[int]) -> Objective:
    """Spatial mean of the pre-ReLU map of `channels` (Lucent's `objectives.channel`)."""
    def fn(acts: dict[str, Tensor], _image: Tensor) -> Tensor:
        a = acts[layer]
        rows = torch.arange(a.shape[0], device=a.device)
        sel = a[rows, _rows(channels, a.shape[0], a.device)]
        return sel.flatten(1).mean(1) if sel.dim() > 1 else sel
    return Objective(fn, [layer], f"channel({layer}, {channels})")


def l2(weight: float = 1.0) -> Objective:
    """−weight·‖x‖² per row (x = model input): add it to pull pixels towards the mean colour."""
    return Objective(lambda _a, x: -weight * x.pow(2).flatten(1).sum(1), (), f"l2({weight})")


def total_variation(weight: float = 1.0) -> Objective:
    """−weight·Σ(|∂x/∂y| + |∂x/∂x|) per row (anisotropic TV): add it for smoother images."""
    def fn(_acts: dict[str, Tensor], x: Tensor) -> Tensor:
        dy = (x[:, :, 1:, :] - x[:, :, :-1, :]).abs().flatten(1).sum(1)
        dx = (x[:, :, :, 1:] - x[:, :, :, :-1]).abs().flatten(1).sum(1)
        return -weight * (dy + dx)
    return Objective(fn, (), f"tv({weight})")


# -------------------------------------------------------------------------- parameterisations
# Each returns (params, image_fn): the tensors Adam optimises and a function producing the model
# input (B, 3, H, W) in the model's preprocessed space from them.
ImageFn = Callable[[], Tensor]

# Lucent's square root of ImageNet's colour correlation (rows: R, G, B), normalised so that its
# largest column has unit norm: decorrelated parameters of unit scale give unit-scale colours.
_COLOR_SQRT = np.asarray([[0.26, 0.09, 0.02], [0.27, 0.00, -0.05], [0.27, -0.09, 0.03]],
                         dtype=np.float32)
_COLOR_SQRT /= np.max(np.linalg.norm(_COLOR_SQRT, axis=0))


def _seeded_normal(shape: Sequence[int], seeds: Sequence[int], sd: float,
                   device: torch.device | str) -> Tensor:
    """Row b drawn from its own generator seeded with seeds[b]: independent of batch layout."""
    if len(seeds) != shape[0]:
        raise ValueError(f"{len(seeds)} seeds given for a batch of {shape[0]} rows")
    rows = [torch.randn(tuple(shape[1:]), generator=torch.Generator().manual_seed(int(s)))
            for s in seeds]
    return (torch.stack(rows) * sd).to(device)


def pixel(shape: Sequence[int], init: Tensor | None = None,
          device: torch.device | str = "cpu") -> tuple[list[Tensor], ImageFn]:
    """The model input itself (paper): starts at `init`, default zero (the mean colour)."""
    x = (torch.zeros(tuple(shape)) if init is None else init.detach().clone()).to(device)
    x.requires_grad_(True)
    return [x], lambda: x


def _to_rgb(t: Tensor) -> Tensor:
    """Decorrelated colour space -> RGB in (0, 1), as Lucent's `to_valid_rgb(decorrelate=True)`."""
    m = torch.as_tensor(_COLOR_SQRT, dtype=t.dtype, device=t.device)
    return torch.sigmoid(torch.einsum("ij,bjhw->bihw", m, t))


def decorrelated(shape: Sequence[int], preprocess: Preprocess, seeds: Sequence[int],
                 sd: float = 0.01, device: torch.device | str = "cpu"
                 ) -> tuple[list[Tensor], ImageFn]:
    """Pixels in a decorrelated colour space, squashed by a sigmoid into RGB, then preprocessed."""
    t = _seeded_normal(shape, seeds, sd, device).requires_grad_(True)
    return [t], lambda: preprocess(_to_rgb(t))


def _rfft2d_freqs(h: int, w: int) -> np.ndarray:
    fy = np.fft.fftfreq(h)[:, None]
    fx = np.fft.rfftfreq(w)[None, :]
    return np.sqrt(fx * fx + fy * fy)


def fft(shape: Sequence[int], preprocess: Preprocess, seeds: Sequence[int], sd: float = 0.01,
        decay_power: float = 1.0, device: torch.device | str = "cpu"
        ) -> tuple[list[Tensor], ImageFn]:
    """Lucent's Fourier parameterisation: a 1/f-scaled spectrum, decorrelated colour, sigmoid.

    Scaling the spectrum by 1/f makes Adam's equal-size steps favour low frequencies, which
    removes most of the high-frequency noise a pixel parameterisation produces.
    """
    b, c, h, w = shape
    freqs = _rfft2d_freqs(h, w)
    spec = _seeded_normal((b, c, *freqs.shape, 2), seeds, sd, device).requires_grad_(True)
    scale = 1.0 / np.maximum(freqs, 1.0 / max(h, w)) ** decay_power
    scale_t = torch.as_tensor(scale, dtype=torch.float32, device=device)[None, None, :, :, None]

    def image_fn() -> Tensor:
        img = torch.fft.irfftn(torch.view_as_complex(scale_t * spec), s=(h, w), norm="ortho")
        return preprocess(_to_rgb(img / 4.0))  # /4: Lucent's constant keeping sigmoid unsaturated
    return [spec], image_fn


PARAMS = ("pixel", "decorrelated", "fft")


# --------------------------------------------------------------------------------- transforms
Transform = Callable[[Tensor, torch.Generator], Tensor]


def jitter(d: int) -> Transform:
    """Shift the image by up to ±d pixels (reflect padding keeps its size and the centre
    neuron's place); one shift per step for the whole batch, drawn from the generator."""
    def fn(x: Tensor, gen: torch.Generator) -> Tensor:
        if d <= 0:
            return x
        dy, dx = (int(v) for v in torch.randint(0, 2 * d + 1, (2,), generator=gen))
        h, w = x.shape[-2:]
        return F.pad(x, (d, d, d, d), mode="reflect")[..., dy:dy + h, dx:dx + w]
    return fn


def random_scale(scales: Sequence[float]) -> Transform:
    """Zoom about the centre by a factor drawn from `scales` (size kept, reflection at edges)."""
    scales = [float(s) for s in scales]

    def fn(x: Tensor, gen: torch.Generator) -> Tensor:
        if not scales:
            return x
        s = scales[int(torch.randint(0, len(scales), (1,), generator=gen))]
        if s == 1.0:
            return x
        theta = torch.tensor([[1 / s, 0, 0], [0, 1 / s, 0]], dtype=x.dtype, device=x.device)
        grid = F.affine_grid(theta.expand(x.shape[0], 2, 3), list(x.shape), align_corners=False)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection",
                             align_corners=False)
    return fn


def compose(transforms: Sequence[Transform]) -> Transform:
    def fn(x: Tensor, gen: torch.Generator) -> Tensor:
        for t in transforms:
            x = t(x, gen)
        return x
    return fn


# ------------------------------------------------------------------------------------ the loop
@dataclass
class ActmaxResult:
    input: Tensor            # (B, 3, H, W) the optimised model input, preprocessed space, CPU
    start: Tensor            # (B,) measured objective at the start image (no transforms)
    end: Tensor              # (B,) measured objective at the final image (no transforms)
    history: Tensor          # (steps, B) the optimised objective at each step (with transforms)
    channels: list[int] = field(default_factory=list)
    y: int = -1              # centre neuron (H//2, W//2) of the full map (-1: no spatial map)
    x: int = -1
    window: tuple[int, int, int, int] = (0, 0, 0, 0)  # rows [0]:[1], cols [2]:[3] optimised
    seconds: float = 0.0     # wall seconds of the Adam steps (what is not start-up)


@contextlib.contextmanager
def _frozen_eval(model: nn.Module) -> Iterator[None]:
    """Eval mode (BN keeps batch rows independent) and no weight gradients (saves a third of
    the backward); the model's previous state is restored afterwards."""
    was_training = model.training
    flags = [(p, p.requires_grad) for p in model.parameters()]
    model.eval()
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(was_training)


def optimize(model: nn.Module, objective: Objective, params: list[Tensor], image_fn: ImageFn, *,
             steps: int = 31, lr: float = 0.1, weight_decay: float = 1e-6,
             transform: Transform | None = None, seed: int = 0,
             measure: Objective | None = None, stop: bool = True) -> ActmaxResult:
    """Maximise `objective` by Adam on `params`; the forward stops at the deepest traced layer
    (`stop=False` runs it to the logits, as a naive implementation would: for benchmarks).

    `measure` (default: the objective) is evaluated without transforms at the start and final
    images, giving `start` / `end`; `history` holds the optimised objective at every step.
    """
    measure = measure or objective
    cat = catalogue(model)
    names = tuple(dict.fromkeys(objective.layers + measure.layers))
    if any(n not in cat for n in names):
        cat = analysable_layers(model)     # a ResNet's module paths besides its paper names
    unknown = [n for n in names if n not in cat]
    if unknown or not names:
        raise ValueError(f"objective needs traced layers; unknown: {unknown or names}")
    layers = [cat[n] for n in names]
    gen = torch.Generator().manual_seed(int(seed))
    opt = torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    history = []
    with _frozen_eval(model), Trace(model, layers, point="pre", stop=stop, detach=False) as tr:
        def values(obj: Objective, image: Tensor, x: Tensor) -> Tensor:
            tr.run(x)
            return obj(tr.outputs, image)

        with torch.no_grad():
            img = image_fn()
            start = values(measure, img, img).detach()
        t0 = time.perf_counter()
        for _ in range(steps):
            opt.zero_grad(set_to_none=True)
            img = image_fn()
            x = transform(img, gen) if transform is not None else img
            v = values(objective, img, x)
            # rows are independent, so the gradient of the sum is each row's own gradient
            (-v.sum()).backward()
            opt.step()
            history.append(v.detach())
        if history and history[-1].is_cuda:
            torch.cuda.synchronize(history[-1].device)
        seconds = time.perf_counter() - t0
        with torch.no_grad():
            img = image_fn()
            end = values(measure, img, img).detach()
            final = img.detach()
    hist = torch.stack(history) if history else torch.zeros((0, final.shape[0]))
    return ActmaxResult(final.float().cpu(), start.float().cpu(), end.float().cpu(),
                        hist.float().cpu(), seconds=seconds)


# ---------------------------------------------------------------------- receptive-field window
@dataclass(frozen=True)
class Window:
    """The input rows [start, stop) and columns [start_x, stop_x) the centre neuron depends on.

    `centre` / `centre_x`: the centre neuron (H//2, W//2) of the full feature map; `local` /
    `local_x`: the same neuron's index in the feature map of the window. The `_x` fields default
    to the rows' values (a square RF)."""
    start: int        # first input row of the window
    stop: int         # one past the last
    centre: int       # the centre neuron's row in the full feature map
    local: int        # its row in the feature map of the window
    feature_size: int  # the full feature map's height
    start_x: int | None = None
    stop_x: int | None = None
    centre_x: int | None = None
    local_x: int | None = None
    feature_size_x: int | None = None

    def __post_init__(self) -> None:
        for name in ("start", "stop", "centre", "local", "feature_size"):
            if getattr(self, f"{name}_x") is None:
                object.__setattr__(self, f"{name}_x", getattr(self, name))


_FIELDS: "weakref.WeakKeyDictionary[nn.Module, dict[int, dict[str, ModuleField]]]" = \
    weakref.WeakKeyDictionary()


def _field(model: nn.Module, layer: Layer, size: int) -> ModuleField:
    """What the geometry trace knows about the layer's measurement point at a size×size input
    (traced once per model and size: the geometry does not depend on the weights)."""
    per_size = _FIELDS.setdefault(model, {})
    if size not in per_size:
        per_size[size] = module_outputs(model, size)
    return per_size[size][layer.point]


def _centre(model: nn.Module, layer: Layer, size: int) -> tuple[int, int]:
    """The centre neuron (H//2, W//2) of the layer's map; (-1, -1) without one (fc)."""
    f = _field(model, layer, size)
    return f.rf.center() if f.nchw and f.rf is not None else (-1, -1)


def _span(top: int, extent: int, jump: int, n: int, size: int) -> tuple[int, int, int, int]:
    """(start, stop, centre, local) on one axis: the RF [top, top + extent) of neuron n // 2
    clipped to the image, `start` rounded down to a multiple of the jump."""
    c = n // 2
    start = max(0, top) // jump * jump
    return start, min(size, top + extent), c, c - start // jump


def input_window(model: nn.Module, layer: Layer, size: int) -> Window | None:
    """The input window on which the centre neuron of `layer` depends, for a size×size input;
    None where the neuron sees the whole image (fc, a `global_context` layer: adaptive pooling,
    a squeeze-and-excitation gate) or the geometry has no single RF.

    The RF is `pipeline.models.geometry`'s (the union over every path, per axis). `start` is rounded
    down to a multiple of the layer's jump, so that every strided layer sees the window on its
    own grid: the window's neuron `local` then computes exactly what the full input's neuron
    `centre` computes (every intermediate neuron it reads lies inside the window, so the window's
    zero padding replaces nothing it reads).
    """
    f = _field(model, layer, size)
    rf = f.rf
    if not f.nchw or rf is None or rf.global_context or 0 in (rf.jump, rf.jump_x):
        return None
    top, left, h, w = rf.rect(*rf.center())
    rows = _span(top, h, rf.jump, rf.feature_size, size)
    cols = _span(left, w, rf.jump_x, rf.feature_size_x, size)
    return Window(*rows, rf.feature_size, *cols, rf.feature_size_x)


# ------------------------------------------------------------------------ the paper's recipe
@dataclass(frozen=True)
class Settings:
    steps: int = 31              # paper
    lr: float = 0.1              # paper (Adam)
    weight_decay: float = 1e-6   # paper: the −λ‖x‖² term, as Adam's weight decay
    param: str = "pixel"         # pixel (paper: the input tensor, zero start) | decorrelated | fft
    jitter: int = 0              # Lucent: random shift of up to ±N pixels per step (0: off)
    scale: tuple[float, ...] = ()  # Lucent: random zoom factors per step (empty: off)
    tv: float = 0.0              # total-variation penalty weight (0: off)
    l2: float = 0.0              # extra L2 penalty weight on the input (0: off)
    seed: int = 0                # transforms and random starts (decorrelated / fft)
    crop: bool = True            # optimise only the RF window where that is exact

    def __post_init__(self) -> None:
        if self.param not in PARAMS:
            raise ValueError(f"invalid parameterisation {self.param!r}; allowed: "
                             + ", ".join(PARAMS))
        if self.steps < 0 or self.lr <= 0 or self.weight_decay < 0:
            raise ValueError("steps must be >= 0, lr > 0 and weight_decay >= 0")
        if self.jitter < 0 or self.tv < 0 or self.l2 < 0 or any(s <= 0 for s in self.scale):
            raise ValueError("jitter, tv and l2 must be >= 0 and scales > 0")

    @property
    def exact_crop(self) -> bool:
        """Cropping to the RF window is exact only when no pixel outside it can get a
        gradient: pixel parameterisation, no transforms, no TV (L2 is per pixel: fine)."""
        return (self.crop and self.param == "pixel" and self.jitter == 0
                and all(s == 1.0 for s in self.scale) and self.tv == 0)

    def transform(self) -> Transform | None:
        parts: list[Transform] = []
        if self.jitter:
            parts.append(jitter(self.jitter))
        if self.scale:
            parts.append(random_scale(self.scale))
        return compose(parts) if parts else None


def maximize_channels(model: nn.Module, layer: Layer, channels: Sequence[int], size: int,
                      preprocess: Preprocess, settings: Settings = Settings(),
                      device: torch.device | str = "cpu") -> ActmaxResult:
    """Maximise the pre-ReLU centre neuron of each of `channels` of `layer`, one batch row per
    channel, on a size×size input; `input` comes back full size whether or not it was cropped.

    Any model: `layer` is a paper name or a module path (`Layer.pre`: a ReLU module's input,
    else the module output); the RF window is the geometry's, per axis, and the whole image
    where the layer has global context."""
    channels = [int(c) for c in channels]
    bad = [c for c in channels if not 0 <= c < layer.channels]
    if bad:
        raise ValueError(f"channel {bad[0]} out of range for {layer.name}; "
                         f"allowed: 0-{layer.channels - 1}")
    b = len(channels)
    win = input_window(model, layer, size) if settings.exact_crop else None
    h0, h1, w0, w1 = ((win.start, win.stop, win.start_x, win.stop_x) if win is not None
                      else (0, size, 0, size))
    shape = (b, 3, h1 - h0, w1 - w0)
    seeds = [derive_seed("actmax", settings.seed, layer.name, c) for c in channels]
    if settings.param == "pixel":
        params, image_fn = pixel(shape, device=device)
    elif settings.param == "decorrelated":
        params, image_fn = decorrelated(shape, preprocess, seeds, device=device)
    else:
        params, image_fn = fft(shape, preprocess, seeds, device=device)
    yx = (win.local, win.local_x) if win is not None else (None, None)
    target = _target(model, layer, channels, yx)
    objective = target
    if settings.tv:
        objective = objective + total_variation(settings.tv)
    if settings.l2:
        objective = objective + l2(settings.l2)
    model.to(device)
    res = optimize(model, objective, params, image_fn, steps=settings.steps, lr=settings.lr,
                   weight_decay=settings.weight_decay, transform=settings.transform(),
                   seed=settings.seed, measure=target)
    if win is not None:
        # outside the window the full-image run keeps its zero start exactly (zero gradient)
        full_input = torch.zeros((b, 3, size, size), dtype=res.input.dtype)
        full_input[:, :, h0:h1, w0:w1] = res.input
        res.input = full_input
    res.channels = channels
    res.y, res.x = _centre(model, layer, size)
    res.window = (h0, h1, w0, w1)
    return res


def _target(model: nn.Module, layer: Layer, channels: list[int],
            yx: tuple[int | None, int | None]) -> Objective:
    """The layer's pre-ReLU neuron at `yx` (None: the centre) for each of `channels`."""
    if layer.name == "pool1" and has_paper_names(model):
        cat = catalogue(model)
        # pool1's catalogue point is the max-pool output, which is already past conv1's ReLU;
        # max-pool commutes with ReLU, so its pre-ReLU value is max-pool of conv1's pre-ReLU map
        pool = dict(model.named_modules())[layer.module]
        return _pooled_neuron(cat["conv1"].name, pool, channels, *yx)
    return neuron(layer.name, channels, *yx)


@torch.no_grad()
def calibrate_bn(model: nn.Module, size: int, seed: int = 0, images: int = 16,
                 batch: int = 8) -> nn.Module:
    """Set every BatchNorm's running statistics from seeded N(0, 1) noise inputs (size×size).

    Why: a freshly initialised ResNet has no biases and BN at (mean 0, var 1, γ 1, β 0), so the
    zero image maps to exactly zero everywhere, every ReLU sits at its kink with zero gradient,
    and activation maximization from the paper's zero start never moves. Real (noise) statistics
    give BN non-zero shifts, as training would. Only for untrained demo models; returns `model`
    in eval mode.
    """
    gen = torch.Generator().manual_seed(int(seed))
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over all calibration batches
    model.train()
    device = next(model.parameters()).device
    for i in range(0, images, batch):
        x = torch.randn((min(batch, images - i), 3, size, size), generator=gen)
        model(x.to(device))
    for m, mom in zip(bns, saved):
        m.momentum = mom
    return model.eval()


# ------------------------------------------------------------------------------------ display
def display_images(inputs: Tensor, preprocess: Preprocess) -> np.ndarray:
    """uint8 (B, H, W, 3) for viewing: RGB = preprocess.inverse(input), then each image stretched
    by its own min and max over all pixels and colours together (keeps the hue; a raw RGB
    image of a zero-start optimisation is a nearly uniform mean colour, too faint to see)."""
    rgb = preprocess.inverse(inputs.detach().float().cpu())
    flat = rgb.flatten(1)
    lo, hi = flat.min(1).values, flat.max(1).values
    span = torch.clamp(hi - lo, min=1e-12)[:, None, None, None]
    out = ((rgb - lo[:, None, None, None]) / span).clamp(0, 1)
    return (out * 255 + 0.5).to(torch.uint8).permute(0, 2, 3, 1).numpy()


# --------------------------------------------- rows of actmax.parquet (jobs.actmax's task)
TABLE_SCHEMA = catalog.ACTMAX.schema


def channel_list(spec: str, n: int) -> list[int]:
    """"all" | "0-63" | "0,5,7" | "0-3,8" -> sorted unique channels of a layer with `n`; a
    ValueError says "invalid channel spec '…'" or "channel 70 out of range"."""
    spec = spec.strip()
    if spec == "all":
        return list(range(n))
    out: set[int] = set()
    for part in (p.strip() for p in spec.split(",")):
        first, dash, last = part[1:].partition("-")   # a leading "-" is a sign: "-1"
        try:
            lo = int(part[:1] + first)
            hi = int(last) if dash else lo
        except ValueError:
            raise ValueError(f"invalid channel spec {spec!r}") from None
        if lo > hi:
            raise ValueError(f"invalid channel spec {spec!r}")
        vals = range(lo, hi + 1)
        bad = [v for v in vals if not 0 <= v < n]
        if bad:
            raise ValueError(f"channel {bad[0]} out of range")
        out.update(vals)
    return sorted(out)


def sort_rows(table: pa.Table, layers: Sequence[str]) -> pa.Table:
    """actmax.parquet rows in `layers` order, channels ascending (whatever order chunks came in)."""
    order = {name: i for i, name in enumerate(layers)}
    idx = sorted(range(table.num_rows), key=lambda i: (order[table["layer"][i].as_py()],
                                                       table["channel"][i].as_py()))
    return table.take(pa.array(idx, type=pa.int64()))


def chunk_table(model: Any, model_name: str, preprocess: Any, layer: Any, channels: list[int],
                size: int, settings: Any, device: str = "cpu", threads: int | None = None, *,
                encode: Callable[[np.ndarray], bytes]) -> pa.Table:
    """Optimise one (layer, channel chunk) with maximize_channels; its rows of actmax.parquet.
    `encode`: (H, W, 3) uint8 -> the `image` column's bytes (the job passes
    pipeline.results.png.png_bytes: no file format is chosen here)."""
    return timed_chunk(model, model_name, preprocess, layer, channels, size, settings, device,
                       threads, encode=encode)[0]


def timed_chunk(model: Any, model_name: str, preprocess: Any, layer: Any, channels: list[int],
                size: int, settings: Any, device: str = "cpu", threads: int | None = None, *,
                encode: Callable[[np.ndarray], bytes]) -> tuple[pa.Table, dict[str, float]]:
    """`chunk_table` (jobs.actmax runs one per Ray task) and where its seconds went: `steps`
    (the Adam loop), `total` (also the geometry, the start and end measurements, the PNGs)."""
    t0 = time.perf_counter()
    if threads:
        torch.set_num_threads(threads)
    if torch.device(device).type == "cpu":
        from pipeline.data.hostmem import keep_freed_memory

        keep_freed_memory()     # the backward's buffers reused, not page-faulted anew each step
    res = maximize_channels(model, layer, channels, size, preprocess, settings, device)
    n = len(channels)
    inputs = res.input.numpy().astype(np.float32).reshape(n, -1)
    same = {"model": model_name, "layer": layer.name, "steps": settings.steps, "lr": settings.lr,
            "weight_decay": settings.weight_decay, "input_size": size, "y": res.y, "x": res.x,
            "param": settings.param}
    table = pa.table({
        **{k: [v] * n for k, v in same.items()},
        "channel": channels,
        "objective_start": res.start.numpy(),
        "objective_end": res.end.numpy(),
        "image": [encode(p) for p in display_images(res.input, preprocess)],
        "input": pa.FixedSizeListArray.from_arrays(pa.array(inputs.ravel()), inputs.shape[1])
                                      .cast(pa.list_(pa.float32())),
    }).select(TABLE_SCHEMA.names).cast(TABLE_SCHEMA)
    return table, {"steps": round(res.seconds, 3), "total": round(time.perf_counter() - t0, 3)}
