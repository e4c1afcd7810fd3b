"""The trace hook: captured values equal a manual forward, edits propagate, stop stops."""
import torch

from pipeline.models.hooks import Trace, capture
from pipeline.models.layers import resolve_layers
from pipeline.models.zoo import build_model


def _model():
    torch.manual_seed(0)
    model = build_model("resnet18", width=8, num_classes=4)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.bias.data.uniform_(-0.2, 0.2)
    return model.eval()


def test_captures_equal_a_manual_forward():
    model, x = _model(), torch.rand(2, 3, 48, 48)
    acts = capture(model, x, resolve_layers(model, "conv1,pool1,conv2,conv3"))
    stem = torch.relu(model.bn1(model.conv1(x)))
    pool = model.maxpool(stem)
    b = model.layer1[0]
    conv2 = torch.relu(b.bn1(b.conv1(pool)))
    conv3 = torch.relu(b.bn2(b.conv2(conv2)) + pool)
    for name, want in (("conv1", stem), ("pool1", pool), ("conv2", conv2), ("conv3", conv3)):
        torch.testing.assert_close(acts[name], want, rtol=0, atol=0)


def test_pre_relu_point_is_the_value_before_the_relu():
    model, x = _model(), torch.rand(2, 3, 48, 48)
    layers = resolve_layers(model, "conv1,conv2,conv3,conv17")
    pre = capture(model, x, layers, point="pre")
    post = capture(model, x, layers)
    for layer in layers:
        assert (pre[layer.name] < 0).any()
        torch.testing.assert_close(torch.relu(pre[layer.name]), post[layer.name])


def test_stop_skips_everything_after_the_deepest_layer():
    model, x = _model(), torch.rand(1, 3, 48, 48)
    calls = []
    model.layer2.register_forward_hook(lambda *a: calls.append("layer2"))
    with Trace(model, resolve_layers(model, "conv3")) as tr:
        assert tr.run(x) is None
    assert calls == [] and set(tr.outputs) == {"conv3"}
    with Trace(model, resolve_layers(model, "conv3"), stop=False) as tr:
        logits = tr.run(x)
    assert calls == ["layer2"] and logits.shape == (1, 4)


def test_edit_changes_what_downstream_sees_and_hooks_are_removed():
    model, x = _model(), torch.rand(2, 3, 48, 48)
    layers = resolve_layers(model, "pool1,conv3")
    with Trace(model, layers, edit={"pool1": torch.zeros_like}, stop=False) as tr:
        edited_logits = tr.run(x)
    assert tr.outputs["pool1"].abs().sum() == 0
    # downstream of a zeroed pool1 the network sees only zeros: same as feeding zeros there
    b = model.layer1[0]
    z = torch.zeros_like(tr.outputs["pool1"])
    conv3 = torch.relu(b.bn2(b.conv2(torch.relu(b.bn1(b.conv1(z))))) + z)
    torch.testing.assert_close(tr.outputs["conv3"], conv3)
    assert not torch.allclose(edited_logits, model(x))
    # the hooks are gone after the with-block
    assert all(not m._forward_hooks for m in model.modules())


def test_gradients_flow_when_not_detached():
    model = _model()
    x = torch.zeros(1, 3, 32, 32, requires_grad=True)
    layers = resolve_layers(model, "conv3")
    with Trace(model, layers, point="pre", detach=False) as tr:
        tr.run(x)
    tr.outputs["conv3"][0, 0, 4, 4].backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
