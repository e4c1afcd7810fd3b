"""Beyond ResNet34: torchvision CNNs built by torchvision, their geometry against autograd.

Geometry: a linearised copy of each model (positive conv/linear weights sqrt(k_h*k_w)/fan_in,
BN identity, every activation and layer norm an identity, max-pool -> avg-pool of the same
geometry, layer scales 1) has, for position (y, x) of a layer (summed over channels: a
concatenation's RF is the union over its branches, channel 0 alone sees one branch), a non-zero
input gradient exactly on the pixels that can influence it. Squeeze-and-excitation gates are detached
in that copy, so the support is the neuron's local (spatial-path) RF; a second, undetached
measurement shows that such a neuron sees the whole image (global_context). One forward and one
backward per model: every (layer, neuron) pair gets its own image of the batch (one neuron per
layer, alternately the centre and a corner). With sqrt(taps)/fan_in a k x k layer multiplies
the largest path sum by about k and the smallest (the RF's corner) by 1/k, so along
densenet121's longest chain (58 3x3 convs) both stay within float32 (3^±58 ~ 1e±28), which is
5x faster than float64 here.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from torch import nn
from torchvision.ops import SqueezeExcitation

from pipeline.models.checkpoint import model_from_state_dict
from pipeline.models.geometry import RF, module_fields, module_outputs
from pipeline.models.hooks import Trace, capture
from pipeline.models.layers import analysable_layers, catalogue, module_layers, resolve_layers
from pipeline.models.zoo import build_model, supported_models

# model -> (input size, layers sampled besides the first/last of each module type)
MODELS = {
    "resnet18": (32, 12), "resnet50": (32, 8), "vgg11_bn": (32, 12), "alexnet": (64, 20),
    "googlenet": (48, 8), "densenet121": (32, 8), "mobilenet_v3_small": (64, 12),
    "convnext_tiny": (32, 8),
}


@pytest.fixture(autouse=True)
def one_thread():
    """Small convolutions on a shared 2-core machine: one intra-op thread is much faster."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class _Detached(nn.Module):
    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x).detach()


_IDENTITY = (nn.ReLU, nn.ReLU6, nn.Hardswish, nn.Hardsigmoid, nn.SiLU, nn.GELU, nn.Sigmoid,
             nn.LayerNorm)


def linearised(model: nn.Module, detach_gates: bool = True) -> nn.Module:
    m = copy.deepcopy(model).float().eval()
    for name, mod in list(m.named_modules()):
        replacement = None
        if isinstance(mod, (nn.Conv2d, nn.Linear)):
            with torch.no_grad():
                taps = mod.weight[0, 0].numel()  # k_h * k_w (1 for Linear)
                mod.weight.fill_(taps ** 0.5 / mod.weight[0].numel())
                if mod.bias is not None:
                    mod.bias.zero_()
        elif isinstance(mod, nn.BatchNorm2d):
            mod.reset_running_stats()
            nn.init.ones_(mod.weight)
            nn.init.zeros_(mod.bias)
            mod.eps = 0.0
        elif isinstance(mod, _IDENTITY):
            replacement = nn.Identity()
        elif isinstance(mod, nn.MaxPool2d):
            replacement = nn.AvgPool2d(mod.kernel_size, mod.stride, mod.padding,
                                       ceil_mode=mod.ceil_mode)
        elif isinstance(mod, SqueezeExcitation) and detach_gates:
            mod.avgpool = _Detached(mod.avgpool)
        if hasattr(mod, "layer_scale"):  # ConvNeXt
            nn.init.ones_(mod.layer_scale)
        if replacement is not None:
            parent, _, leaf = name.rpartition(".")
            setattr(m.get_submodule(parent) if parent else m, leaf, replacement)
    return m


def fast(build, *args, **kwargs) -> nn.Module:
    """`build(*args, **kwargs)` without its random initialisation (seconds for vgg/convnext):
    built on the meta device, then given cheap random values (positive BN variances)."""
    with torch.device("meta"):
        model = build(*args, **kwargs)
    model = model.to_empty(device="cpu")
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, t in [*model.named_parameters(), *model.named_buffers()]:
            if name.endswith("num_batches_tracked"):
                t.zero_()
            elif name.endswith("running_var"):
                t.uniform_(0.5, 1.5, generator=gen)
            else:
                fan_in = t[0].numel() if t.dim() > 1 else 1
                t.uniform_(-fan_in ** -0.5, fan_in ** -0.5, generator=gen)
    return model


def sample_layers(model: nn.Module, extra: int) -> list:
    """The first and last layer of every module type (every operator kind the model uses),
    plus `extra` evenly spaced ones; the whole list for small models."""
    modules = dict(model.named_modules())
    gates = [p + "." for p, m in modules.items() if isinstance(m, SqueezeExcitation)]
    # inside a gate, behind its (detached) global pool, nothing reaches the input
    layers = [layer for layer in analysable_layers(model).values()
              if layer.name != "fc" and not layer.point.startswith(tuple(gates))]
    chosen: dict[str, object] = {}
    by_type: dict[str, list] = {}
    for layer in layers:
        by_type.setdefault(type(modules[layer.point]).__name__, []).append(layer)
    for group in by_type.values():
        chosen[group[0].name] = group[0]
        chosen[group[-1].name] = group[-1]
    step = max(1, len(layers) // max(extra, 1))
    for layer in layers[::step]:
        chosen[layer.name] = layer
    return list(chosen.values())


def measure(lin: nn.Module, layers: list, rfs: dict[str, RF], size: int, batched: bool = True):
    """Input-gradient support (bool (H, W)) of one position per layer (centre or a corner).

    `batched=False` runs one forward per layer: in mobilenet_v3_small the batched input gradient
    of a late layer leaked into other images of the batch on this CPU build (not isolated to
    one kernel; a single depthwise conv or BN does not do it), which would fake a larger RF.
    """
    if not batched:
        out = ([], [], {})
        for layer in layers:
            jobs, supports, outputs = measure(lin, [layer], rfs, size)
            out[0].extend(jobs), out[1].extend(supports), out[2].update(outputs)
        return out
    jobs = []
    for i, layer in enumerate(layers):
        rf = rfs[layer.name]
        h, w = rf.feature_size, rf.feature_size_x
        corner = [(0, 0), (h - 1, w - 1), (0, w - 1)][i % 3]
        jobs.append((layer, rf.center() if i % 2 else corner))
    x = torch.ones(len(jobs), 3, size, size, requires_grad=True)
    with Trace(lin, layers, detach=False) as tr:
        tr.run(x)
    total = sum(tr.outputs[layer.name][b, :, y, xx].sum() for b, (layer, (y, xx)) in enumerate(jobs))
    (grad,) = torch.autograd.grad(total, x)
    return jobs, [(g != 0).any(0) for g in grad], tr.outputs


def clipped(rf: RF, y: int, x: int, size: int) -> torch.Tensor:
    top, left, height, width = rf.rect(y, x)
    want = torch.zeros(size, size, dtype=torch.bool)
    want[max(top, 0):max(top + height, 0), max(left, 0):max(left + width, 0)] = True
    return want


def layer_rfs(model: nn.Module, layers: list, size: int) -> dict[str, RF]:
    fields = module_fields(model, size)
    return {layer.name: fields[layer.point] for layer in layers}


@pytest.mark.parametrize("name", list(MODELS))
def test_geometry_of_sampled_layers_matches_autograd(name: str):
    size, extra = MODELS[name]
    model = fast(build_model, name).eval()
    layers = sample_layers(model, extra)
    modules = dict(model.named_modules())
    kinds = {type(modules[layer.point]).__name__ for layer in layers}
    assert "Conv2d" in kinds
    # every spatial operator the model has is upstream of some sampled layer, and sampled itself
    # where its output is analysable (GoogLeNet's BN outputs are rewritten in place: not)
    assert kinds >= {type(modules[layer.point]).__name__ for layer in analysable_layers(model).values()
                     if isinstance(modules[layer.point], (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d,
                                                          nn.BatchNorm2d, nn.AdaptiveAvgPool2d))}
    rfs = layer_rfs(model, layers, size)
    jobs, supports, outputs = measure(linearised(model), layers, rfs, size,
                                      batched=name != "mobilenet_v3_small")
    for (layer, (y, x)), got in zip(jobs, supports):
        rf = rfs[layer.name]
        assert tuple(outputs[layer.name].shape[-2:]) == (rf.feature_size, rf.feature_size_x)
        want = clipped(rf, y, x, size)
        assert torch.equal(got, want), (name, layer.name, (y, x), rf)
    assert len(jobs) == len(layers)


def test_logits_identical_to_torchvision_through_strict_loading():
    for name, size in MODELS.items():
        kwargs = {"num_classes": 10}
        if name == "googlenet":
            kwargs.update(aux_logits=True, init_weights=True)
        tv = fast(getattr(torchvision.models, name), **kwargs).eval()
        ours = model_from_state_dict(tv.state_dict(), name).eval()   # strict
        assert list(ours.state_dict()) == list(tv.state_dict())
        x = torch.rand(2, 3, max(size[0], 64), max(size[0], 64))
        with torch.no_grad():
            assert torch.equal(ours(x), tv(x)), name


def test_plainnet_of_a_bottleneck_resnet():
    tv = fast(torchvision.models.resnet50)
    plain = fast(build_model, "plainnet50")
    keys = [k for k in tv.state_dict() if ".downsample." not in k]
    assert list(plain.state_dict()) == keys
    plain.load_state_dict({k: tv.state_dict()[k] for k in keys}, strict=True)
    # with conv3 zeroed every block outputs ReLU(bn3 bias) = 0 in PlainNet, not in ResNet
    for model_name, zero in (("resnet50", False), ("plainnet50", True)):
        model = build_model(model_name, width=8, num_classes=3).eval()
        torch.nn.init.zeros_(model.layer1[0].conv3.weight)
        out = capture(model, torch.rand(1, 3, 32, 32), resolve_layers(model, "conv4"))["conv4"]
        assert (out.abs().sum() == 0) == zero
    assert [n for n in catalogue(plain)][:6] == ["conv1", "pool1", "conv2", "conv3", "conv4",
                                                  "conv5"]
    assert catalogue(plain)["conv4"].module == "layer1.0.conv3"
    assert catalogue(plain)["conv4"].point == "layer1.0.relu3"
    assert len(catalogue(plain)) == 2 + 3 * 16 + 1
    assert {"plainnet18", "plainnet152", "plain_resnext50_32x4d",
            "plain_wide_resnet101_2"} <= set(supported_models())


def test_module_paths_are_measured_at_the_module_output():
    torch.manual_seed(0)
    vgg = fast(build_model, "vgg11_bn").eval()
    x = torch.rand(1, 3, 32, 32)
    got = capture(vgg, x, resolve_layers(vgg, "features.4,features.1"))
    with torch.no_grad():
        assert torch.equal(got["features.1"], vgg.features[:2](x))
        assert torch.equal(got["features.4"], vgg.features[:5](x))
    # on a ResNet, paper names and module paths mix; a shared module gets one hook
    net = build_model("resnet18", width=8).eval()
    layers = resolve_layers(net, "layer2.1.conv2,pool1,maxpool,layer1.0.bn1,conv3")
    assert [layer.name for layer in layers] == ["pool1", "maxpool", "layer1.0.bn1", "conv3",
                                               "layer2.1.conv2"]
    acts = capture(net, x, layers)
    assert torch.equal(acts["pool1"], acts["maxpool"])
    assert (acts["layer1.0.bn1"] < 0).any() and (acts["conv3"] >= 0).all()
    with pytest.raises(ValueError, match="unknown layer 'layer9'.*module path"):
        resolve_layers(net, "layer9")


def test_global_context_is_flagged_and_real():
    net = fast(build_model, "mobilenet_v3_small").eval()
    fields = module_outputs(net, 64)
    assert not fields["features.0"].rf.global_context
    assert not fields["features.1.block.0"].rf.global_context
    se = "features.1.block.1"          # the first squeeze-and-excitation gate
    assert fields[se].rf.global_context and fields[se].rf.size == fields["features.1.block.0"].rf.size
    # undetached, the gated neuron depends on every pixel of the image
    layers = resolve_layers(net, se)
    rfs = layer_rfs(net, layers, 64)
    _, supports, _ = measure(linearised(net, detach_gates=False), layers, rfs, 64)
    assert supports[0].all() and not clipped(rfs[se], *rfs[se].center(), 64).all()
    res = module_outputs(build_model("resnet18", width=4), 64)
    assert [p for p, f in res.items() if f.rf and f.rf.global_context] == ["avgpool", "fc"]


class Asymmetric(nn.Module):
    """An Inception-style block: a 1x7 -> 7x1 branch and a 3x3 branch, concatenated."""

    def __init__(self):
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(3, 2, (1, 7), padding=(0, 3)),
                               nn.Conv2d(2, 2, (7, 1), stride=2, padding=(3, 0)))
        self.b = nn.Conv2d(3, 2, (1, 7), stride=2, padding=(0, 3))
        self.pool = nn.MaxPool2d(3, stride=2, ceil_mode=True)

    def forward(self, x):
        return self.pool(torch.cat([self.a(x), self.b(x)], 1))


def test_asymmetric_kernels_have_per_axis_geometry():
    net = Asymmetric()
    layers = list(module_layers(net).values())
    rfs = layer_rfs(net, layers, 15)
    assert rfs["a.0"] == RF(size=7, jump=1, offset=0.0, feature_size=15, size_y=1, size_x=7)
    assert (rfs["b"].size_y, rfs["b"].size_x, rfs["b"].jump) == (1, 7, 2)
    assert (rfs["a"].size_y, rfs["a"].size_x) == (7, 7)
    top, left, height, width = rfs["b"].rect(1, 2)
    assert (top, left, height, width) == (2, 1, 1, 7)
    assert rfs["b"].box(1, 2) == (-1, 1, 7)       # the square that holds it
    assert rfs["pool"].size_y == rfs["pool"].size_x == 7 + 2 * 2
    jobs, supports, _ = measure(linearised(net), layers, rfs, 15)
    for (layer, (y, x)), got in zip(jobs, supports):
        assert torch.equal(got, clipped(rfs[layer.name], y, x, 15)), layer.name


def test_every_supported_name_builds_on_meta_except_none_missing():
    names = supported_models()
    assert {"resnet152", "resnext101_64x4d", "wide_resnet50_2", "vgg19", "vgg19_bn", "alexnet",
            "googlenet", "densenet201", "mobilenet_v2", "mobilenet_v3_large", "efficientnet_b0",
            "efficientnet_v2_s", "regnet_y_400mf", "convnext_tiny"} <= set(names)
    assert not [n for n in names if n.startswith(("vit_", "swin_", "maxvit"))]
