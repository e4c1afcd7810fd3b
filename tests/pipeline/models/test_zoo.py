"""Models and the layer catalogue against torchvision and the actual forward pass."""
import pytest
import torch
import torchvision

from pipeline.models.hooks import capture
from pipeline.models.layers import PAPER_LAYERS, catalogue, resolve_layers
from pipeline.models.zoo import build_model, model_names


@pytest.fixture(scope="module")
def tv34():
    torch.manual_seed(1)
    tv = torchvision.models.resnet34()
    # non-trivial BN statistics so the comparison is not between near-identity layers
    for m in tv.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.1, 0.1)
    return tv.eval()


def test_resnet34_loads_torchvision_state_dict_with_identical_logits(tv34):
    model = build_model("resnet34")
    assert list(model.state_dict()) == list(tv34.state_dict())
    model.load_state_dict(tv34.state_dict(), strict=True)
    model.eval()
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        assert torch.equal(model(x), tv34(x))


def test_resnet18_matches_torchvision_too():
    tv = torchvision.models.resnet18().eval()
    model = build_model("resnet18")
    model.load_state_dict(tv.state_dict())
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model.eval()(x), tv(x))


def test_plainnet_keys_are_resnet_keys_minus_downsample(tv34):
    plain = build_model("plainnet34")
    tv_keys = set(tv34.state_dict())
    assert set(plain.state_dict()) == {k for k in tv_keys if ".downsample." not in k}
    assert any(".downsample." in k for k in tv_keys)
    sd = {k: v for k, v in tv34.state_dict().items() if ".downsample." not in k}
    plain.load_state_dict(sd, strict=True)


def test_plainnet_has_no_skip_connection():
    # With conv2 of every block zeroed, a ResNet block passes its input through (ReLU of it),
    # a PlainNet block outputs ReLU(bn2 bias) = 0: the skip is really gone.
    torch.manual_seed(0)
    for name, expect_zero in (("resnet18", False), ("plainnet18", True)):
        model = build_model(name, width=8, num_classes=3).eval()
        block = model.layer1[0]
        torch.nn.init.zeros_(block.conv2.weight)
        out = capture(model, torch.rand(2, 3, 32, 32), resolve_layers(model, "conv3"))["conv3"]
        assert (out.abs().sum() == 0) == expect_zero


def test_block_is_injected_not_copied():
    a, b = build_model("resnet34"), build_model("plainnet34")
    assert type(a) is type(b)
    assert type(a.layer1[0]).__name__ == "BasicBlock" and type(b.layer1[0]).__name__ == "PlainBlock"


def test_unknown_model_and_width_are_rejected():
    with pytest.raises(ValueError, match="allowed: plainnet18, plainnet34, resnet18, resnet34; "
                                         "also supported: .*vgg16"):
        build_model("resnet99")
    with pytest.raises(ValueError, match="transformer.*supported: .*convnext_tiny"):
        build_model("vit_b_16")
    with pytest.raises(ValueError, match="only supported for the ResNet family"):
        build_model("vgg11", width=16)
    with pytest.raises(ValueError):
        build_model("resnet18", width=0)
    assert model_names() == ["plainnet18", "plainnet34", "resnet18", "resnet34"]


def test_catalogue_names_modules_and_channels():
    model = build_model("resnet34")
    cat = catalogue(model)
    names = list(cat)
    assert names == ["conv1", "pool1"] + [f"conv{i}" for i in range(2, 34)] + ["fc"]
    assert cat["conv3"].module == "layer1.0.conv2"
    assert cat["conv2"].module == "layer1.0.conv1"
    assert cat["conv7"].module == "layer1.2.conv2"
    assert cat["conv8"].module == "layer2.0.conv1"
    assert cat["conv33"].module == "layer4.2.conv2"
    assert cat["pool1"].module == "maxpool"
    modules = dict(model.named_modules())
    for layer in cat.values():
        assert layer.module in modules and layer.point in modules and layer.pre in modules
    # every measurement point is its own module: a shared ReLU is never hooked twice
    points = [layer.point for layer in cat.values()]
    assert len(points) == len(set(points))
    pres = [layer.pre for layer in cat.values() if layer.pre != layer.point]
    assert len(pres) == len(set(pres))
    assert len(catalogue(build_model("resnet18"))) == 2 + 16 + 1


def test_catalogue_channels_match_captured_shapes():
    model = build_model("plainnet18", width=8, num_classes=5).eval()
    layers = resolve_layers(model, "all")
    acts = capture(model, torch.rand(1, 3, 64, 64), layers)
    assert set(acts) == {layer.name for layer in layers}
    for layer in layers:
        assert acts[layer.name].shape[1] == layer.channels


def test_resolve_layers_validates_and_orders():
    model = build_model("resnet18", width=8)
    assert [layer.name for layer in resolve_layers(model, "conv7,pool1,conv3,pool1")] == list(PAPER_LAYERS)
    assert len(resolve_layers(model, "all")) == 18
    with pytest.raises(ValueError, match="unknown layer 'conv99'.*conv17"):
        resolve_layers(model, "pool1,conv99")
    with pytest.raises(ValueError):
        resolve_layers(model, "")
