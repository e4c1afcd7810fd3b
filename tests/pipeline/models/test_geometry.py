"""Receptive fields checked against autograd, and RF patches against explicit loops.

The measurement: a copy of the model made linear with positive weights (conv weights 3/fan_in,
BN as identity, ReLU -> identity, max-pool -> avg-pool of the same geometry), so that every input
pixel inside a neuron's RF gets a strictly positive gradient and every pixel outside gets exactly
0. The support of d neuron / d input must equal the predicted box clipped to the image.

float32 rather than float64: CPU conv backward in float64 takes a slow im2col path (5x slower).
The sums are of non-negative terms, so a value is 0 only if every term is; 3/fan_in makes each
layer scale the RF's centre by ~3 and its edge by ~1/3, so over 36 layers values stay within
about 3^±40 ≈ 1e±19, far from float32 underflow (1e-38) and overflow (3e38).
"""
from __future__ import annotations

import copy

import pyarrow as pa
import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch import nn
from torch.nn import functional as F

from pipeline.models.geometry import RF, cut_patch, cut_patches, module_fields
from pipeline.models.rf_catalogue import RF_SCHEMA, receptive_fields, rf_table
from pipeline.models.hooks import Trace
from pipeline.models.layers import catalogue
from pipeline.models.zoo import build_model


@pytest.fixture(autouse=True)
def one_thread():
    """Many small convolutions: with 2 intra-op threads on a busy machine the OpenMP barriers
    made the autograd test 20x slower (78 s vs 4 s) than one thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def linearised(model: nn.Module) -> nn.Module:
    """Copy of `model` whose gradient support is exactly the RF (see the module docstring)."""
    m = copy.deepcopy(model).float().eval()
    for name, mod in list(m.named_modules()):
        if isinstance(mod, (nn.Conv2d, nn.Linear)):
            with torch.no_grad():
                mod.weight.fill_(3.0 / mod.weight[0].numel())
                if mod.bias is not None:
                    mod.bias.zero_()
        elif isinstance(mod, nn.BatchNorm2d):
            mod.reset_running_stats()  # mean 0, var 1
            nn.init.ones_(mod.weight)
            nn.init.zeros_(mod.bias)
            mod.eps = 0.0
        replacement = None
        if isinstance(mod, nn.ReLU):
            replacement = nn.Identity()
        elif isinstance(mod, nn.MaxPool2d):
            assert mod.dilation in (1, (1, 1))
            replacement = nn.AvgPool2d(mod.kernel_size, mod.stride, mod.padding,
                                       ceil_mode=mod.ceil_mode)
        if replacement is not None:
            parent, _, leaf = name.rpartition(".")
            setattr(m.get_submodule(parent) if parent else m, leaf, replacement)
    return m


def support_box(grad: torch.Tensor) -> torch.Tensor:
    """(H, W) bool: input pixels with a non-zero gradient in any channel."""
    return (grad[0] != 0).any(0)


def clipped(rf: RF, y: int, x: int, size: int) -> torch.Tensor:
    top, left, side = rf.box(y, x)
    want = torch.zeros(size, size, dtype=torch.bool)
    want[max(top, 0):max(top + side, 0), max(left, 0):max(left + side, 0)] = True
    return want


def check_layers(lin: nn.Module, rfs: dict[str, RF], layers, size: int,
                 corners: set[str]) -> int:
    """Autograd support == predicted clipped box for the centre neuron of every layer and for
    the two corner neurons of `corners`; returns the number of neurons checked."""
    x = torch.ones(1, 3, size, size, requires_grad=True)
    with Trace(lin, layers, detach=False) as tr:
        tr.run(x)
    checked = 0
    for layer in layers:
        out, rf = tr.outputs[layer.name], rfs[layer.name]
        if out.dim() == 2:  # fc: one neuron per class, the RF is global
            assert rf.feature_size == 1
            out = out[:, :, None, None]
        assert tuple(out.shape[-2:]) == (rf.feature_size, rf.feature_size), layer.name
        neurons = [rf.center()]
        if layer.name in corners:
            neurons += [(0, 0), (rf.feature_size - 1, rf.feature_size - 1), (0, rf.feature_size - 1)]
        for y, xx in neurons:
            (grad,) = torch.autograd.grad(out[0, 0, y, xx], x, retain_graph=True)
            got, want = support_box(grad), clipped(rf, y, xx, size)
            assert torch.equal(got, want), (layer.name, (y, xx), rf, got.nonzero().min(0),
                                             got.nonzero().max(0))
            checked += 1
    return checked


# Input size per stage, chosen so that the centre neuron's RF lies wholly inside the image
# (both edges visible to the measurement), odd sizes to exercise the floor in the conv arithmetic.
STAGE_SIZES = {"stem": 97, "layer1": 97, "layer2": 225, "layer3": 577, "layer4": 961}
# Corner neurons (clipped at the image border, and whose offset shows) for these layers.
CORNERS = {"conv1", "pool1", "conv2", "conv3", "conv7", "conv8", "conv15", "conv16", "conv27",
           "conv28", "conv33"}


def _stage(module_path: str) -> str:
    head = module_path.split(".")[0]
    return head if head.startswith("layer") else ("layer4" if head == "fc" else "stem")


@pytest.mark.parametrize("name", ["resnet34", "plainnet34"])
def test_every_layer_matches_autograd(name: str):
    model = build_model(name, width=1, num_classes=2)
    lin = linearised(model)
    cat = catalogue(model)
    checked = 0
    for stage, size in STAGE_SIZES.items():
        layers = [layer for layer in cat.values() if _stage(layer.module) == stage]
        rfs = receptive_fields(model, size)
        for layer in layers:
            if layer.name == "fc":
                continue
            top, left, side = rfs[layer.name].box(*rfs[layer.name].center())
            assert 0 <= top and top + side <= size, (layer.name, "centre RF must fit the image")
        checked += check_layers(lin, rfs, layers, size, CORNERS)
    assert checked == 35 + 3 * len(CORNERS)  # conv1, pool1, conv2..conv33, fc


def test_paper_values():
    for name in ("resnet34", "plainnet34"):
        rfs = receptive_fields(build_model(name, width=4), 224)
        assert (rfs["pool1"].size, rfs["conv3"].size, rfs["conv7"].size) == (11, 27, 59)
        assert (rfs["pool1"].jump, rfs["conv3"].jump, rfs["conv7"].jump) == (4, 4, 4)
        assert rfs["conv1"].feature_size == 112 and rfs["conv33"].feature_size == 7


def test_tables_of_residual_and_plain_nets_are_equal():
    for depth, size in ((34, 224), (18, 97)):
        res = rf_table(build_model(f"resnet{depth}", width=4), f"resnet{depth}", size)
        plain = rf_table(build_model(f"plainnet{depth}", width=4), f"plainnet{depth}", size)
        assert res.schema == RF_SCHEMA
        # conv1, pool1, conv2..convN, fc, and a block output after each block's last conv
        assert res.num_rows == (35 + 16 if depth == 34 else 19 + 8)
        assert res.column("layer").to_pylist()[:6] == ["conv1", "pool1", "conv2", "conv3",
                                                      "layer1.0", "conv4"]
        assert res.column("module").to_pylist()[3:5] == ["layer1.0.conv2", "layer1.0"]
        rows = {r["layer"]: r for r in res.to_pylist()}
        last = "layer4.2" if depth == 34 else "layer4.1"
        for block, conv in (("layer1.0", "conv3"), (last, f"conv{depth - 1}")):
            assert {k: v for k, v in rows[block].items() if k not in ("layer", "module")} == \
                {k: v for k, v in rows[conv].items() if k not in ("layer", "module")}
        assert res.column("channels").to_pylist()[:3] == [4, 4, 4]
        assert set(res.column("input_size").to_pylist()) == {size}
        assert set(res.column("model").to_pylist()) == {f"resnet{depth}"}
        assert res.drop_columns(["model"]).equals(plain.drop_columns(["model"]))


def test_feature_size_follows_input_size():
    model = build_model("resnet18", width=4).eval()
    for size in (1, 2, 31, 64, 225):
        rfs = receptive_fields(model, size)
        with Trace(model, [layer for layer in catalogue(model).values()
                           if layer.name != "fc"]) as tr:
            tr.run(torch.zeros(1, 3, size, size))
        for name, out in tr.outputs.items():
            assert out.shape[-1] == rfs[name].feature_size, (size, name)
        # RF size and jump do not depend on the input size
        assert rfs["conv17"] == RF(size=435, jump=32, offset=0.0,
                                   feature_size=rfs["conv17"].feature_size)


@pytest.mark.parametrize("size", [0, -3, 2.5, True])
def test_bad_input_size(size):
    with pytest.raises(ValueError, match="input size"):
        receptive_fields(build_model("resnet18", width=4), size)


# --------------------------------------------------------------------------------------------
# Union of branches, traced by the same code on hand-made modules


class TwoBranch(nn.Module):
    """a(x) + b(x): the sum's RF must be the union of the branches' RFs."""

    def __init__(self, a: nn.Module, b: nn.Module, inplace: bool = False):
        super().__init__()
        self.a, self.b = a, b
        self.relu = nn.ReLU()
        self.inplace = inplace

    def forward(self, x):
        out = self.a(x)
        if self.inplace:
            out += self.b(x)
        else:
            out = out + self.b(x)
        return self.relu(out)


def _conv(k: int, p: int, s: int = 1, d: int = 1) -> nn.Conv2d:
    return nn.Conv2d(3, 3, kernel_size=k, padding=p, stride=s, dilation=d, bias=False)


def bbox(mask: torch.Tensor) -> tuple[int, ...]:
    idx = mask.nonzero()
    return (*idx.min(0).values.tolist(), *idx.max(0).values.tolist()) if len(idx) else ()


def check_module(module: nn.Module, size: int, paths: list[str],
                 sparse: tuple[str, ...] = ()) -> dict[str, RF]:
    """For every neuron of each module in `paths`: the bounding box of the autograd support
    equals the predicted box clipped to the image. The RF is a bounding square, so its support
    may have holes (two shifted branches; a dilated conv). A dilated conv's outermost taps may
    fall into the padding, so for `sparse` modules only neurons whose box lies inside the image
    are held to equality; the others must lie within their box."""
    rfs = module_fields(module, size)
    lin = linearised(module)
    outs = {}
    handles = [lin.get_submodule(p).register_forward_hook(
        lambda _m, _i, o, p=p: outs.__setitem__(p, o)) for p in paths]
    x = torch.ones(1, 3, size, size, requires_grad=True)
    lin(x)
    for h in handles:
        h.remove()
    for p in paths:
        rf = rfs[p]
        assert tuple(outs[p].shape[-2:]) == (rf.feature_size, rf.feature_size), p
        for y in range(rf.feature_size):
            for xx in range(rf.feature_size):
                (g,) = torch.autograd.grad(outs[p][0, 1, y, xx], x, retain_graph=True)
                got, want = support_box(g), clipped(rf, y, xx, size)
                top, left, side = rf.box(y, xx)
                inside = min(top, left) >= 0 and max(top, left) + side <= size
                if p in sparse and not inside:
                    assert not (got & ~want).any(), (p, y, xx, rf)
                else:
                    assert bbox(got) == bbox(want), (p, y, xx, rf)
    return rfs


def test_union_of_a_small_and_a_large_branch():
    small, large = nn.Sequential(_conv(3, 1)), nn.Sequential(_conv(5, 2))
    for a, b in ((small, large), (large, small)):  # neither "first" nor "last" branch wins
        rfs = check_module(TwoBranch(a, b), 9, ["relu"])
        assert rfs["relu"] == RF(size=5, jump=1, offset=0.0, feature_size=9)
    # `out += b(x)` (operator.iadd); a.0's output tensor is overwritten in place, so it is not
    # measured itself
    rfs = check_module(TwoBranch(small, large, inplace=True), 9, ["relu", "b.0"])
    assert (rfs["a.0"].size, rfs["b.0"].size, rfs["relu"].size) == (3, 5, 5)


def test_union_of_shifted_branches():
    # each branch sees 2 pixels, one shifted up-left and one down-right: the sum sees 3
    up = nn.Sequential(nn.ZeroPad2d((1, 0, 1, 0)), _conv(2, 0))
    down = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), _conv(2, 0))
    rfs = check_module(TwoBranch(up, down), 8, ["a.1", "b.1", "relu"])
    assert rfs["a.1"] == RF(size=2, jump=1, offset=-0.5, feature_size=8)
    assert rfs["b.1"] == RF(size=2, jump=1, offset=0.5, feature_size=8)
    assert rfs["relu"] == RF(size=3, jump=1, offset=0.0, feature_size=8)


def test_strides_ceil_mode_and_residual_projection():
    # a strided residual block with a 1x1 projection (whose own RF has holes between neurons)
    net = nn.Sequential(
        _conv(3, 0),
        nn.MaxPool2d(3, stride=2, padding=1, ceil_mode=True),
        TwoBranch(nn.Sequential(_conv(3, 1, s=2), nn.BatchNorm2d(3), nn.ReLU(), _conv(3, 1)),
                  nn.Sequential(_conv(1, 0, s=2), nn.BatchNorm2d(3))),
    )
    rfs = check_module(net, 14, ["0", "1", "2.b.0", "2.relu"])
    assert rfs["0"] == RF(size=3, jump=1, offset=1.0, feature_size=12)
    assert rfs["1"] == RF(size=5, jump=2, offset=1.0, feature_size=7)  # ceil mode: last window
    assert rfs["2.b.0"] == RF(size=5, jump=4, offset=1.0, feature_size=4)
    assert rfs["2.relu"] == RF(size=5 + 6 * 2, jump=4, offset=1.0, feature_size=4)


def test_ceil_mode_drops_a_window_that_starts_in_the_padding():
    for size in (4, 5, 6, 7):
        pool = nn.Sequential(nn.MaxPool2d(2, stride=2, padding=1, ceil_mode=True))
        rfs = check_module(pool, size, ["0"])  # compares with the real output shape too
        assert rfs["0"].feature_size == size // 2 + 1


def test_dilation():
    net = nn.Sequential(_conv(3, 2, d=2), _conv(3, 1), _conv(3, 0, d=3))
    rfs = check_module(net, 15, ["0", "1", "2"], sparse=("0", "1", "2"))
    assert rfs["0"] == RF(size=5, jump=1, offset=0.0, feature_size=15)
    assert rfs["1"] == RF(size=7, jump=1, offset=0.0, feature_size=15)
    assert rfs["2"] == RF(size=13, jump=1, offset=3.0, feature_size=9)


def test_disagreeing_grids_and_unknown_operations_raise():
    # 8 -> 4 neurons both ways, but 2 pixels apart in one branch and 1 in the other
    with pytest.raises(ValueError, match="disagree"):
        module_fields(TwoBranch(_conv(1, 0, s=2), _conv(5, 0)), 8)
    with pytest.raises(NotImplementedError, match="Upsample"):
        module_fields(nn.Sequential(_conv(3, 1), nn.Upsample(scale_factor=2)), 8)


class Functional(nn.Module):
    """Layers written as functions and tensor methods (fx call_function / call_method nodes):
    a channel split and concatenation, a functional pool in ceil mode, a channel shuffle and a
    round trip through channels-last."""

    def __init__(self):
        super().__init__()
        self.conv, self.out = _conv(3, 1, s=2), nn.Identity()

    def forward(self, x):
        a, b, c = torch.chunk(self.conv(x), 3, dim=1)
        x = F.avg_pool2d(torch.cat([b, a.relu(), c], 1), 3, 2, 1, ceil_mode=True)
        n, ch, h, w = x.size()
        x = x.view(n, 3, 1, h, w).transpose(1, 2).reshape(n, ch, h, w)
        return self.out(x.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2))


def test_functions_and_methods_match_autograd():
    rfs = check_module(Functional(), 16, ["conv", "out"])
    assert rfs["conv"] == RF(size=3, jump=2, offset=0.0, feature_size=8)
    # ceil mode: 5 windows of 3 with stride 2 over 8 neurons padded by 1
    assert rfs["out"] == RF(size=7, jump=4, offset=0.0, feature_size=5)


class Applies(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.conv, self.fn = _conv(3, 1), fn

    def forward(self, x):
        return self.fn(self.conv(x))


class TwoInputs(nn.Module):
    def forward(self, x, y):
        return x + y


class ConvOfAConstant(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.k = _conv(3, 1), nn.Parameter(torch.ones(1, 3, 8, 8))

    def forward(self, x):
        return self.conv(self.k) + x.mean()


@pytest.mark.parametrize("module, error, match", [
    (Applies(lambda x: x.sum(2)), NotImplementedError, "reduction over one spatial axis"),
    (Applies(lambda x: x[:, :, 1]), NotImplementedError, "indexing a feature map"),
    (Applies(lambda x: torch.chunk(x, 2, 3)[0]), NotImplementedError, "splitting along a spatial"),
    (Applies(lambda x: torch.cat([x, x], 2)), NotImplementedError, "concatenation along a spatial"),
    (Applies(lambda x: x.reshape(1, 3, -1)), NotImplementedError, "moves the spatial axes"),
    (TwoInputs(), ValueError, "more than one input"),
    (ConvOfAConstant(), ValueError, "carries no image geometry"),
])
def test_untracked_operations_raise(module, error, match):
    with pytest.raises(error, match=match):
        module_fields(module, 8)


def test_box_boxes_and_center_agree():
    rf = RF(size=26, jump=4, offset=1.5, feature_size=9)  # even size: centre between pixels
    ys, xs = torch.meshgrid(torch.arange(9), torch.arange(9), indexing="ij")
    tops, lefts = rf.boxes(ys.flatten(), xs.flatten())
    for t, l, y, x in zip(tops.tolist(), lefts.tolist(), ys.flatten().tolist(),
                          xs.flatten().tolist()):
        assert rf.box(y, x) == (t, l, 26)
        # rows o + j*y - (r-1)/2 ... o + j*y + (r-1)/2 (DESIGN.md)
        assert (t, t + 25) == (1.5 + 4 * y - 12.5, 1.5 + 4 * y + 12.5)
        assert l == 1.5 + 4 * x - 12.5
    assert rf.center() == (4, 4)


# --------------------------------------------------------------------------------------------
# Patches


def brute_patch(image: torch.Tensor, top: int, left: int, size: int):
    c, h, w = image.shape
    patch = torch.zeros(c, size, size, dtype=image.dtype)
    mask = torch.zeros(size, size, dtype=torch.bool)
    for i in range(size):
        for j in range(size):
            r, col = top + i, left + j
            if 0 <= r < h and 0 <= col < w:
                patch[:, i, j] = image[:, r, col]
                mask[i, j] = True
    return patch, mask


# every side: above/left, below/right, wholly outside, wholly inside, larger than the image
BOXES = [(-2, -3, 4), (5, 7, 4), (-1, 6, 3), (3, -2, 5), (-10, -10, 3), (20, 0, 2), (1, 2, 3),
         (-2, -2, 12), (0, 0, 1), (6, 8, 1)]


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
def test_cut_patch_matches_brute_force(dtype):
    g = torch.Generator().manual_seed(0)
    images = torch.randint(1, 255, (len(BOXES), 3, 7, 9), generator=g).to(dtype)
    for size in sorted({b[2] for b in BOXES}):
        tops = [t for t, _, _ in BOXES]
        lefts = [l for _, l, _ in BOXES]
        patches, masks = cut_patches(images, torch.tensor(tops), torch.tensor(lefts), size)
        assert patches.shape == (len(BOXES), 3, size, size) and patches.dtype == dtype
        assert masks.shape == (len(BOXES), size, size) and masks.dtype == torch.bool
        for i, (t, l) in enumerate(zip(tops, lefts)):
            want_p, want_m = brute_patch(images[i], t, l, size)
            assert torch.equal(patches[i], want_p) and torch.equal(masks[i], want_m), (t, l, size)
            one_p, one_m = cut_patch(images[i], t, l, size)
            assert torch.equal(one_p, want_p) and torch.equal(one_m, want_m)


@settings(max_examples=60, deadline=None)
@given(h=st.integers(1, 6), w=st.integers(1, 6), size=st.integers(1, 9),
       tops=st.lists(st.integers(-10, 10), min_size=1, max_size=4), data=st.data())
def test_cut_patches_hypothesis(h, w, size, tops, data):
    lefts = data.draw(st.lists(st.integers(-10, 10), min_size=len(tops), max_size=len(tops)))
    images = torch.arange(len(tops) * 2 * h * w, dtype=torch.float64).reshape(-1, 2, h, w) + 1
    patches, masks = cut_patches(images, tops, lefts, size)
    for i, (t, l) in enumerate(zip(tops, lefts)):
        want_p, want_m = brute_patch(images[i], t, l, size)
        assert torch.equal(patches[i], want_p) and torch.equal(masks[i], want_m)


def test_cut_patches_keeps_nan_free_zeros_and_rejects_bad_input():
    images = torch.full((1, 3, 4, 4), float("nan"))
    images[0, :, 0, 0] = 1.0
    patch, mask = cut_patch(images[0], -1, -1, 2)  # only the corner pixel lies inside
    assert mask.tolist() == [[False, False], [False, True]]
    assert torch.equal(patch[:, 0, :], torch.zeros(3, 2)) and torch.all(patch[:, 1, 1] == 1)
    with pytest.raises(ValueError, match="patch size"):
        cut_patches(images, [0], [0], 0)
    with pytest.raises(ValueError, match="one top and one left"):
        cut_patches(images, [0, 1], [0, 1], 2)
    with pytest.raises(ValueError, match=r"\(C, H, W\)"):
        cut_patch(images, 0, 0, 2)


def test_rf_table_is_a_pyarrow_table_in_forward_order():
    table = rf_table(build_model("plainnet18", width=4, num_classes=3), "plainnet18", 64)
    assert isinstance(table, pa.Table)
    rows = table.to_pylist()
    names = [r["layer"] for r in rows]
    assert [n for n in names if not n.startswith("layer")] == \
        list(catalogue(build_model("plainnet18")))
    assert [n for n in names if n.startswith("layer")] == [f"layer{s}.{b}" for s in (1, 2, 3, 4)
                                                           for b in (0, 1)]
    assert rows[-1]["layer"] == "fc" and rows[-1]["feature_size"] == 1
    assert rows[-1]["channels"] == 3
