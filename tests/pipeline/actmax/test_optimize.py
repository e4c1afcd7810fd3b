"""pipeline.actmax.optimize against the truth: one-at-a-time runs, full-image runs, hand-written autograd."""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.actmax import optimize as am
from pipeline.models.hooks import Trace, capture
from pipeline.models.layers import catalogue
from pipeline.models.zoo import build_model
from pipeline.results.png import png_bytes
from pipeline.data.preprocess import IMAGENET

SIZE = 32


def _model(name: str = "resnet18", size: int = SIZE) -> torch.nn.Module:
    torch.manual_seed(0)
    return am.calibrate_bn(build_model(name, num_classes=8, width=8), size, images=8)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # tiny tensors: intra-op threads only add contention on a shared CPU
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def resnet():
    return _model("resnet18")


@pytest.fixture(scope="module")
def plainnet():
    return _model("plainnet18")


def test_settings_defaults_are_the_papers():
    s = am.Settings()
    assert (s.steps, s.lr, s.weight_decay, s.param) == (31, 0.1, 1e-6, "pixel")
    assert (s.jitter, s.scale, s.tv, s.l2) == (0, (), 0.0, 0.0)
    assert s.transform() is None
    params, image_fn = am.pixel((2, 3, 8, 8))
    assert torch.equal(image_fn(), torch.zeros(2, 3, 8, 8))  # zero start = the mean colour


@pytest.mark.parametrize("net, layer", [("resnet", "conv3"), ("plainnet", "conv5"),
                                        ("resnet", "pool1")])
def test_batched_equals_one_channel_at_a_time(request, net, layer):
    model = request.getfixturevalue(net)
    lay = catalogue(model)[layer]
    chans = [0, 3, 5, 6]
    batch = am.maximize_channels(model, lay, chans, SIZE, IMAGENET)
    for i, c in enumerate(chans):
        one = am.maximize_channels(model, lay, [c], SIZE, IMAGENET)
        # batched convolutions sum in another order; Adam's g/|g| step magnifies the last bits
        # of near-zero gradients, hence 1e-3 on inputs of size ~1
        assert torch.allclose(batch.input[i], one.input[0], atol=1e-3, rtol=1e-3)
        assert torch.allclose(batch.end[i], one.end[0], atol=1e-4, rtol=1e-4)
        assert torch.allclose(batch.start[i], one.start[0], atol=1e-5)


def test_batched_equals_one_at_a_time_with_lucent_options(resnet):
    # per-step transform draws and per-channel seeded starts do not depend on the batch
    lay = catalogue(resnet)["conv3"]
    s = am.Settings(steps=6, param="fft", jitter=2, scale=(0.9, 1.1), tv=1e-3)
    batch = am.maximize_channels(resnet, lay, [1, 4], SIZE, IMAGENET, s)
    one = am.maximize_channels(resnet, lay, [4], SIZE, IMAGENET, s)
    assert torch.allclose(batch.input[1], one.input[0], atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("layer, size", [("conv1", 32), ("pool1", 32), ("conv3", 48),
                                         ("conv6", 48), ("conv8", 64), ("conv11", 64)])
def test_receptive_field_crop_equals_full_image(resnet, layer, size):
    lay = catalogue(resnet)[layer]
    crop = am.maximize_channels(resnet, lay, [0, 2], size, IMAGENET, am.Settings(steps=10))
    full = am.maximize_channels(resnet, lay, [0, 2], size, IMAGENET,
                                am.Settings(steps=10, crop=False))
    assert crop.input.shape == full.input.shape == (2, 3, size, size)
    assert torch.allclose(crop.input, full.input, atol=1e-5)
    assert torch.allclose(crop.end, full.end, atol=1e-4, rtol=1e-4)
    assert (crop.y, crop.x) == (full.y, full.x)


@pytest.mark.parametrize("layer", ["conv1", "pool1", "conv3", "conv5", "conv8"])
def test_window_covers_exactly_the_gradient_support(resnet, layer):
    """Bounding box of d(centre neuron)/d(input) over random inputs = the RF inside the window."""
    size = 64
    lay = catalogue(resnet)[layer]
    win = am.input_window(resnet, lay, size)
    torch.manual_seed(1)
    x = torch.randn(4, 3, size, size, requires_grad=True)
    with Trace(resnet, [lay], point="pre", stop=True, detach=False) as tr:
        tr.run(x)
    a = tr.outputs[layer]
    assert a.shape[-1] == win.feature_size
    a[:, :, win.centre, win.centre].sum().backward()
    support = np.nonzero(x.grad.abs().sum((0, 1)).numpy())
    lo, hi = support[0].min(), support[0].max()
    assert win.start <= lo and hi < win.stop
    assert hi == win.stop - 1  # the window is tight at its far edge ...
    jump = size // win.feature_size
    assert lo - win.start < jump or win.start == 0  # ... and rounded down to the jump only


def test_paper_geometry_resnet34():
    model = build_model("resnet34", width=4)
    cat = catalogue(model)
    # conv3: RF 27 around pixel 4 * 28 = 112 of 224 (jump 4); conv7: RF 59
    w3 = am.input_window(model, cat["conv3"], 224)
    assert (w3.feature_size, w3.centre, w3.stop) == (56, 28, 112 + 13 + 1)
    assert w3.start == (112 - 13) // 4 * 4
    w7 = am.input_window(model, cat["conv7"], 224)
    assert w7.stop == 112 + 29 + 1


def test_first_adam_step_matches_hand_written_autograd(resnet):
    """One step from zero: Adam moves each pixel by lr·g/(|g|+eps), g = ∂ pre-ReLU centre / ∂x."""
    lay = catalogue(resnet)["conv3"]  # layer1.0.conv2: pre-ReLU = bn2(conv2(...)) + identity
    res = am.maximize_channels(resnet, lay, [2], SIZE, IMAGENET, am.Settings(steps=1, crop=False))
    m = resnet
    x = torch.zeros(1, 3, SIZE, SIZE, requires_grad=True)
    h = m.maxpool(m.relu(m.bn1(m.conv1(x))))
    blk = m.layer1[0]
    pre = blk.bn2(blk.conv2(blk.relu1(blk.bn1(blk.conv1(h))))) + h
    c = pre.shape[-1] // 2
    pre[0, 2, c, c].backward()
    g = x.grad
    expected = 0.1 * g / (g.abs() + 1e-8)
    assert torch.allclose(res.input, expected, atol=1e-6)
    assert torch.allclose(res.start, pre[0, 2, c, c].detach().reshape(1), atol=1e-5)


def test_objective_rises_from_its_start(resnet, plainnet):
    for model, layer in ((resnet, "conv3"), (plainnet, "conv7"), (resnet, "fc")):
        lay = catalogue(model)[layer]
        res = am.maximize_channels(model, lay, range(4), SIZE, IMAGENET)
        assert (res.end > res.start + 1e-3).all(), (layer, res.start, res.end)
        assert res.history.shape == (31, 4)
        # history[0] is the objective at the zero start, as `start` measures it
        assert torch.allclose(res.history[0], res.start, atol=1e-5)


def test_zero_start_is_stuck_in_an_uncalibrated_fresh_model():
    """Why calibrate_bn exists: fresh BN maps the zero image to exact zeros (dead ReLU kinks)."""
    torch.manual_seed(0)
    fresh = build_model("resnet18", num_classes=8, width=8).eval()
    res = am.maximize_channels(fresh, catalogue(fresh)["conv3"], [0, 1], SIZE, IMAGENET,
                               am.Settings(steps=3))
    assert torch.equal(res.start, torch.zeros(2)) and torch.equal(res.end, torch.zeros(2))
    assert torch.equal(res.input, torch.zeros_like(res.input))


@pytest.mark.parametrize("settings", [
    am.Settings(steps=8, jitter=2), am.Settings(steps=8, scale=(0.8, 1.2)),
    am.Settings(steps=8, tv=0.05), am.Settings(steps=8, l2=0.05),
    am.Settings(steps=8, param="decorrelated"), am.Settings(steps=8, param="fft")],
    ids=["jitter", "scale", "tv", "l2", "decorrelated", "fft"])
def test_lucent_options_run_and_change_the_result(resnet, settings):
    lay = catalogue(resnet)["conv3"]
    base = am.maximize_channels(resnet, lay, [0, 1], SIZE, IMAGENET, am.Settings(steps=8))
    res = am.maximize_channels(resnet, lay, [0, 1], SIZE, IMAGENET, settings)
    assert torch.isfinite(res.input).all()
    assert (res.input - base.input).abs().max() > 1e-3
    assert (res.end > res.start).all()
    if settings.param != "pixel":
        # sigmoid parameterisations stay inside the valid RGB cube
        rgb = IMAGENET.inverse(res.input)
        assert rgb.min() >= 0 and rgb.max() <= 1


def test_penalties_pull_towards_smaller_inputs(resnet):
    lay = catalogue(resnet)["conv3"]
    base = am.maximize_channels(resnet, lay, [0], SIZE, IMAGENET, am.Settings(steps=20))
    l2 = am.maximize_channels(resnet, lay, [0], SIZE, IMAGENET, am.Settings(steps=20, l2=1.0))
    tv = am.maximize_channels(resnet, lay, [0], SIZE, IMAGENET, am.Settings(steps=20, tv=1.0))
    assert l2.input.pow(2).sum() < base.input.pow(2).sum()
    tv_of = lambda x: -am.total_variation()({}, x)  # noqa: E731
    assert tv_of(tv.input) < tv_of(base.input)


def test_objectives_compose():
    torch.manual_seed(0)
    acts = {"conv3": torch.randn(3, 5, 7, 7), "conv5": torch.randn(3, 6, 4, 4)}
    img = torch.randn(3, 3, 8, 8)
    a = am.neuron("conv3", [0, 4, 2])
    b = am.channel("conv5", 1)
    want_a = torch.stack([acts["conv3"][0, 0, 3, 3], acts["conv3"][1, 4, 3, 3],
                          acts["conv3"][2, 2, 3, 3]])
    want_b = acts["conv5"][:, 1].mean((1, 2))
    assert torch.allclose(a(acts, img), want_a)
    assert torch.allclose(b(acts, img), want_b)
    assert torch.allclose((a + 2 * b)(acts, img), want_a + 2 * want_b)
    assert torch.allclose((a - b)(acts, img), want_a - want_b)
    assert torch.allclose((a * b)(acts, img), want_a * want_b)
    assert torch.allclose((1 - a)(acts, img), 1 - want_a)
    assert (a + b).layers == ("conv3", "conv5")
    assert torch.allclose(am.l2(0.5)(acts, img), -0.5 * img.pow(2).sum((1, 2, 3)))
    tv = img[:, :, 1:] - img[:, :, :-1]
    tw = img[..., 1:] - img[..., :-1]
    assert torch.allclose(am.total_variation(2.0)(acts, img),
                          -2.0 * (tv.abs().sum((1, 2, 3)) + tw.abs().sum((1, 2, 3))))
    assert torch.allclose(am.neuron("conv3", 1, y=0, x=6)(acts, img), acts["conv3"][:, 1, 0, 6])


def test_optimize_restores_model_state(resnet):
    resnet.train()
    flags = [p.requires_grad for p in resnet.parameters()]
    params, image_fn = am.pixel((1, 3, SIZE, SIZE))
    am.optimize(resnet, am.neuron("conv3", 0), params, image_fn, steps=2)
    assert resnet.training and [p.requires_grad for p in resnet.parameters()] == flags
    resnet.eval()


def test_display_png_decodes_at_input_size(resnet):
    lay = catalogue(resnet)["conv3"]
    res = am.maximize_channels(resnet, lay, [0, 1], SIZE, IMAGENET, am.Settings(steps=5))
    pics = am.display_images(res.input, IMAGENET)
    assert pics.shape == (2, SIZE, SIZE, 3) and pics.dtype == np.uint8
    for p, x in zip(pics, res.input):
        img = Image.open(io.BytesIO(png_bytes(p)))
        assert img.size == (SIZE, SIZE) and img.mode == "RGB"
        arr = np.asarray(img)
        assert np.array_equal(arr, p)
        assert arr.min() == 0 and arr.max() == 255  # per-image min-max stretch
        # the stretch is monotone per image: brightest pixel of the RGB is the brightest PNG
        rgb = IMAGENET.inverse(x[None])[0]
        flat = int(torch.argmax(rgb.permute(1, 2, 0).reshape(-1)))
        assert arr.reshape(-1)[flat] == 255


def test_bad_channels_and_params_raise(resnet):
    lay = catalogue(resnet)["conv3"]
    with pytest.raises(ValueError, match="0-7"):
        am.maximize_channels(resnet, lay, [8], SIZE, IMAGENET)
    with pytest.raises(ValueError, match="pixel, decorrelated, fft"):
        am.Settings(param="lbfgs")


# ------------------------------------------------------------ any CNN: module-path layers
@pytest.fixture(scope="module")
def squeezenet():
    """squeezenet1_1 (Fire modules: a channel concatenation of a 1x1 and a 3x3 branch; ceil-mode
    pools) with non-zero conv biases: torchvision initialises them at zero and the model has no
    BN, so a fresh one maps the zero image to exact zeros (dead ReLU kinks); trained ones do not."""
    torch.manual_seed(0)
    model = build_model("squeezenet1_1", num_classes=8).eval()
    for m in model.modules():
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.uniform_(m.bias, -0.1, 0.1)
    return model


@pytest.fixture(scope="module")
def mobilenet():
    torch.manual_seed(0)
    return am.calibrate_bn(build_model("mobilenet_v3_small", num_classes=8), SIZE, images=8)


@pytest.fixture(scope="module")
def rectangular():
    """1x5 and 3x1 kernels with per-axis strides: a 7x9 RF whose rows and columns have their own
    jump and feature size."""
    torch.manual_seed(0)
    nn = torch.nn
    model = nn.Sequential(
        nn.Conv2d(3, 6, (1, 5), stride=(1, 2), padding=(0, 2)), nn.BatchNorm2d(6), nn.ReLU(),
        nn.Conv2d(6, 6, (3, 1), stride=(2, 1), padding=(1, 0)), nn.BatchNorm2d(6), nn.ReLU(),
        nn.Conv2d(6, 6, 3, stride=(2, 1), padding=1), nn.BatchNorm2d(6), nn.ReLU())
    return am.calibrate_bn(model, SIZE, images=8)


def test_module_paths_pre_is_the_relu_input(resnet, squeezenet, rectangular):
    cat = catalogue(squeezenet)
    assert (cat["features.1"].point, cat["features.1"].pre) == ("features.1", "features.0")
    fire = cat["features.3.expand3x3_activation"]
    assert fire.pre == "features.3.expand3x3"
    # a module that is not a ReLU (a conv, a Fire's concatenation) is measured at its output
    assert cat["features.0"].pre == "features.0" and cat["features.4"].pre == "features.4"
    assert [(k, v.pre) for k, v in catalogue(rectangular).items() if v.pre != v.point] == \
        [("2", "1"), ("5", "4"), ("8", "7")]
    # paper names keep their points; a ResNet's module paths get the same pre-ReLU values
    from pipeline.models.layers import analysable_layers
    lays = analysable_layers(resnet)
    assert (lays["conv3"].point, lays["conv3"].pre) == ("layer1.0.relu2", "layer1.0.preact")
    assert (lays["conv2"].point, lays["conv2"].pre) == ("layer1.0.relu1", "layer1.0.bn1")
    assert lays["layer1.0.relu2"].pre == "layer1.0.preact" and lays["relu"].pre == "bn1"
    assert lays["layer1.0.conv2"].pre == "layer1.0.conv2"
    x = torch.randn(2, 3, SIZE, SIZE)
    pre = capture(squeezenet, x, [fire], point="pre")[fire.name]
    post = capture(squeezenet, x, [fire])[fire.name]
    assert (pre < 0).any() and torch.equal(post, pre.clamp_min(0))


@pytest.mark.parametrize("net, layer", [
    ("squeezenet", "features.1"), ("squeezenet", "features.3.expand3x3_activation"),
    ("squeezenet", "features.6.squeeze_activation"), ("mobilenet", "features.1.block.0.2"),
    ("rectangular", "5"), ("rectangular", "8")])
def test_objective_rises_and_crop_equals_full_image_on_any_cnn(request, net, layer):
    """The pre-ReLU centre neuron of a ReLU module rises from the zero start, and optimising only
    the geometry's RF window (per axis) gives the full-image result."""
    model = request.getfixturevalue(net)
    lay = catalogue(model)[layer]
    size = 48 if net == "squeezenet" else SIZE
    win = am.input_window(model, lay, size)
    assert win is not None and (win.stop - win.start) * (win.stop_x - win.start_x) < size * size
    crop = am.maximize_channels(model, lay, [0, 1, 2], size, IMAGENET, am.Settings(steps=8))
    full = am.maximize_channels(model, lay, [0, 1, 2], size, IMAGENET,
                                am.Settings(steps=8, crop=False))
    assert (crop.end > crop.start + 1e-3).all(), (crop.start, crop.end)
    assert crop.window == (win.start, win.stop, win.start_x, win.stop_x)
    assert torch.allclose(crop.input, full.input, atol=1e-5)
    assert torch.allclose(crop.end, full.end, atol=1e-4, rtol=1e-4)
    assert (crop.y, crop.x) == (full.y, full.x) == (win.centre, win.centre_x)


@pytest.mark.parametrize("net, layer", [
    ("squeezenet", "features.6.squeeze_activation"), ("rectangular", "8"),
    ("mobilenet", "features.1.block.0.2")])
def test_window_is_the_gradient_support_per_axis(request, net, layer):
    model = request.getfixturevalue(net)
    lay = catalogue(model)[layer]
    size = 48 if net == "squeezenet" else SIZE
    win = am.input_window(model, lay, size)
    torch.manual_seed(1)
    x = torch.randn(4, 3, size, size, requires_grad=True)
    with Trace(model, [lay], point="pre", stop=True, detach=False) as tr:
        tr.run(x)
    a = tr.outputs[layer]
    assert a.shape[-2:] == (win.feature_size, win.feature_size_x)
    a[:, :, win.centre, win.centre_x].sum().backward()
    rows, cols = np.nonzero(x.grad.abs().sum((0, 1)).numpy())
    rf = am._field(model, lay, size).rf
    for (lo, hi), start, stop, jump in (((rows.min(), rows.max()), win.start, win.stop, rf.jump),
                                        ((cols.min(), cols.max()), win.start_x, win.stop_x,
                                         rf.jump_x)):
        assert start <= lo and hi == stop - 1           # tight at the far edge ...
        assert lo - start < jump or start == 0           # ... rounded down to the jump only


def test_global_context_layers_optimise_the_whole_image(mobilenet):
    """After mobilenet_v3_small's first squeeze-and-excitation gate every neuron sees the whole
    image: no window, the centre neuron of the full map, and the objective still rises."""
    lay = catalogue(mobilenet)["features.1"]
    assert am.input_window(mobilenet, lay, SIZE) is None
    res = am.maximize_channels(mobilenet, lay, [1, 2], SIZE, IMAGENET, am.Settings(steps=8))
    assert res.window == (0, SIZE, 0, SIZE) and (res.y, res.x) == (4, 4)
    assert (res.end > res.start).all()
    assert (res.input[:, :, 0].abs().sum() > 0) and (res.input[:, :, -1].abs().sum() > 0)
