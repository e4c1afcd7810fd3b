"""Training pieces without Ray: augmentation geometry, decoding, one SGD step vs autograd by hand,
evaluation sums vs brute force, the step schedule, presets."""
import copy
import io

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from pipeline.models import build_model
from pipeline.preprocess import ZCA, WhiteningStats
from pipeline.train import (PRESETS, EvalResizeCrop, ImageDataset, Recipe, TrainTransform,
                            build_optimizer, build_scheduler, collate, decode_rgb, evaluate,
                            preset, topk_correct, train_epoch)


def _coord_image(side: int = 64) -> Image.Image:
    """R = column, G = row, B = 7: every pixel names its own position."""
    y, x = np.mgrid[0:side, 0:side]
    arr = np.stack([x, y, np.full_like(x, 7)], axis=-1).astype(np.uint8)
    return Image.fromarray(arr)


def _jpeg(arr: np.ndarray, mode: str = "RGB") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).convert(mode).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def test_random_resized_crop_is_a_window_of_the_right_area_and_sometimes_mirrored():
    side, size = 64, 32
    img = _coord_image(side)
    # scale 1/4 and ratio 1 -> an exact 32x32 window: no resampling, so the window is checkable.
    t = TrainTransform(size, scale=(0.25, 0.25), ratio=(1.0, 1.0))
    flips, tops = set(), set()
    for seed in range(24):
        torch.manual_seed(seed)
        out = t(img)
        assert out.dtype == torch.uint8 and out.shape == (3, size, size)
        cols, rows = out[0].numpy().astype(int), out[1].numpy().astype(int)
        assert (out[2] == 7).all()
        assert (rows == rows[:, :1]).all() and np.array_equal(np.diff(rows[:, 0]), np.ones(size - 1))
        step = np.diff(cols[0])
        mirrored = bool((step == -1).all())
        assert mirrored or (step == 1).all()
        left, top = int(cols[0].min()), int(rows[0, 0])
        assert 0 <= left <= side - size and 0 <= top <= side - size
        flips.add(mirrored)
        tops.add((top, left))
    assert flips == {True, False}      # horizontal flip happens, not always
    assert len(tops) > 5               # the window moves


def test_crop_area_fraction_stays_in_the_scale_range():
    img = _coord_image(64)
    t = TrainTransform(16, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), flip=False)
    areas = []
    for seed in range(40):
        torch.manual_seed(seed)
        out = t(img)
        w = int(out[0].max()) - int(out[0].min()) + 1
        h = int(out[1].max()) - int(out[1].min()) + 1
        areas.append(w * h / 64 ** 2)
        assert 3 / 4 - 0.2 <= w / h <= 4 / 3 + 0.2
    # Bilinear resampling blurs edges by a pixel: allow a little slack at both ends.
    assert min(areas) >= 0.08 * 0.6 and max(areas) <= 1.0
    assert max(areas) / min(areas) > 3


def test_decode_gives_rgb_for_grayscale_cmyk_and_png():
    rgb = np.random.default_rng(0).integers(0, 255, (10, 12, 3), dtype=np.uint8)
    gray = decode_rgb(_jpeg(rgb, "L"))
    cmyk = decode_rgb(_jpeg(rgb, "CMYK"))
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    png = decode_rgb(buf.getvalue())  # a PNG whatever its name says
    for im in (gray, cmyk, png):
        assert im.mode == "RGB" and im.size == (12, 10)
    assert np.array_equal(np.asarray(png), rgb)


def test_eval_resize_crop_shape_and_centre():
    img = _coord_image(64).resize((96, 64))      # landscape: shorter side is the height
    out = EvalResizeCrop(32, 32)(img)
    assert out.shape == (3, 32, 32) and out.dtype == torch.uint8
    # Centre crop of a 48x32 resize: the middle column of the crop maps to the middle of the image.
    mid = out[0, :, 16].float().mean().item() * 96 / 64
    assert abs(mid - 48) < 3


def test_dataset_skips_and_counts_unreadable_files():
    good = _jpeg(np.full((8, 8, 3), 200, np.uint8))
    store = {"a": good, "b": b"not an image", "c": good}
    ds = ImageDataset(["a", "b", "c", "missing"], [3, 1, 2, 0], EvalResizeCrop(8, 8),
                      read=lambda u: store[u])
    images, labels, skipped = collate([ds[i] for i in range(len(ds))])
    assert skipped == 2
    assert labels.tolist() == [3, 2]
    assert images.shape == (2, 3, 8, 8)
    assert abs(images.float().mean().item() - 200) < 3


def test_topk_correct_matches_brute_force():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(50, 7, generator=g)
    labels = torch.randint(0, 7, (50,), generator=g)
    c1, c5, c9 = topk_correct(logits, labels, (1, 5, 9))
    order = torch.argsort(logits, dim=1, descending=True)
    rank = [(order[i] == labels[i]).nonzero().item() for i in range(50)]
    assert c1 == sum(r < 1 for r in rank)
    assert c5 == sum(r < 5 for r in rank)
    assert c9 == 50  # k beyond the classes counts every row


def test_step_schedule_divides_lr_by_ten_every_step_epochs():
    recipe = Recipe(lr=0.4, step_epochs=3, epochs=10)
    model = torch.nn.Linear(2, 2)
    opt = build_optimizer(model, recipe)
    sched = build_scheduler(opt, recipe)
    seen = []
    for _ in range(10):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    expect = [0.4 * 0.1 ** (e // 3) for e in range(10)]
    np.testing.assert_allclose(seen, expect, rtol=1e-12)
    g = opt.param_groups[0]
    assert g["momentum"] == 0.9 and g["weight_decay"] == 1e-4


def _batches(x_uint8, y, batch):
    return [(x_uint8[i:i + batch], y[i:i + batch], 0) for i in range(0, len(y), batch)]


def test_one_sgd_step_equals_autograd_by_hand():
    torch.manual_seed(0)
    model = build_model("plainnet18", num_classes=4, width=4)
    ref = copy.deepcopy(model)
    recipe = Recipe(lr=0.1, momentum=0.9, weight_decay=1e-3)
    x = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8)
    y = torch.tensor([0, 1, 2, 3, 0, 1])
    zca = WhiteningStats().update(x.float() / 255).fit()
    opt = build_optimizer(model, recipe)
    stats = train_epoch(model, _batches(x, y, 6), opt, zca, torch.device("cpu"))

    ref.train()
    loss = F.cross_entropy(ref(zca(x.float() / 255)), y)
    grads = torch.autograd.grad(loss, list(ref.parameters()))
    with torch.no_grad():
        for p, g, q in zip(ref.parameters(), grads, model.parameters()):
            # First SGD step: momentum buffer = g + wd·p, p <- p - lr·buffer.
            expect = p - 0.1 * (g + 1e-3 * p)
            torch.testing.assert_close(q, expect, rtol=1e-5, atol=1e-6)
    assert stats.images == 6 and stats.steps == 1
    assert stats.loss == pytest.approx(loss.item(), rel=1e-5)
    # BatchNorm running statistics moved as in the hand-run forward pass.
    torch.testing.assert_close(model.bn1.running_mean, ref.bn1.running_mean)


def test_training_lowers_the_loss_on_a_separable_toy_task():
    torch.manual_seed(0)
    n = 32
    y = torch.arange(n) % 2
    # Class 0 dark-red, class 1 bright-blue, with noise.
    x = torch.randint(0, 60, (n, 3, 16, 16))
    x[y == 0, 0] += 150
    x[y == 1, 2] += 150
    x = x.to(torch.uint8)
    model = build_model("resnet18", num_classes=2, width=4)
    opt = build_optimizer(model, Recipe(lr=0.05))
    zca = ZCA([0.3, 0.1, 0.3], np.eye(3).tolist())
    losses = [train_epoch(model, _batches(x, y, 8), opt, zca, torch.device("cpu")).loss
              for _ in range(4)]
    assert losses[-1] < losses[0] * 0.7


def test_evaluate_sums_match_brute_force_and_any_split_merges_to_the_whole():
    torch.manual_seed(3)
    model = build_model("resnet18", num_classes=6, width=4).eval()
    x = torch.randint(0, 256, (11, 3, 24, 24), dtype=torch.uint8)
    y = torch.randint(0, 6, (11,))
    zca = WhiteningStats().update(x.float() / 255).fit()
    whole = evaluate(model, _batches(x, y, 4), zca, torch.device("cpu"))
    with torch.no_grad():
        logits = model(zca(x.float() / 255))
    assert whole.images == 11
    assert whole.loss_sum == pytest.approx(F.cross_entropy(logits, y, reduction="sum").item(), rel=1e-5)
    assert whole.correct1 == int((logits.argmax(1) == y).sum())
    assert whole.correct5 == topk_correct(logits, y, (5,))[0]
    # Split over two "workers" (every other image), as jobs.train shards validation.
    a = evaluate(model, _batches(x[0::2], y[0::2], 3), zca, torch.device("cpu"))
    b = evaluate(model, _batches(x[1::2], y[1::2], 3), zca, torch.device("cpu"))
    m = a.merge(b)
    assert (m.images, m.correct1, m.correct5) == (whole.images, whole.correct1, whole.correct5)
    assert m.loss_sum == pytest.approx(whole.loss_sum, rel=1e-5)


def test_empty_batch_still_steps_every_parameter():
    model = build_model("resnet18", num_classes=3, width=4)
    opt = build_optimizer(model, Recipe(lr=0.1))
    images, labels, skipped = collate([None, None])
    stats = train_epoch(model, [(images, labels, skipped)], opt, ZCA([0, 0, 0], np.eye(3).tolist()),
                        torch.device("cpu"))
    assert (stats.images, stats.skipped, stats.steps) == (0, 2, 1)
    # Every parameter received a (zero) gradient: the all-reduce of DDP would have seen them all.
    assert all(p.grad is not None and not p.grad.any() for p in model.parameters())


def test_presets_and_overrides():
    paper = PRESETS["paper"]
    assert (paper.lr, paper.momentum, paper.weight_decay, paper.step_epochs, paper.epochs,
            paper.batch_size, paper.input_size) == (0.01, 0.9, 1e-4, 30, 90, 256, 224)
    assert paper.crop_scale == (0.08, 1.0) and paper.crop_ratio == (3 / 4, 4 / 3)
    demo = preset("demo", epochs=3, lr=None)
    assert demo.epochs == 3 and demo.lr == PRESETS["demo"].lr
    assert (demo.width, demo.input_size, demo.eval_resize, demo.eval_crop) == (16, 64, 72, 64)
    with pytest.raises(ValueError, match="unknown preset 'fast'; allowed: demo, paper"):
        preset("fast")
    with pytest.raises(ValueError, match="lr must be a positive number"):
        preset("demo", lr=-1.0)
    with pytest.raises(ValueError, match="epochs must be a positive integer"):
        preset("paper", epochs=0)
