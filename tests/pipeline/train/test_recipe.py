"""Training pieces without Ray: augmentation geometry, decoding, one SGD step vs autograd by hand,
evaluation sums vs brute force, the step schedule, presets; the paper preset's pieces: the
per-sample weighted loss vs one 256-image batch for worker counts that do not divide it, the
photometric distortions pixel by pixel, synchronised BatchNorm's keys, seeds and precision."""
import copy
import io

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from pipeline.models.zoo import build_model
from pipeline.data.preprocess import ZCA, WhiteningStats
from pipeline.data.augment import EvalResizeCrop, TrainTransform, decode_rgb
from pipeline.train.data import ImageDataset, collate
from pipeline.train.recipe import (PRESETS, Recipe, build_optimizer, build_scheduler, evaluate, preset,
                            topk_correct, train_epoch)


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


# ---------------------------------------------------------------------------------------------
# The paper preset's pieces: global batch for any worker count, photometric distortions,
# synchronised BatchNorm, precision and seed
# ---------------------------------------------------------------------------------------------

def _tiny_net() -> torch.nn.Module:
    # No BatchNorm: each rank's gradient is then a function of its own images only, as in the
    # single-process computation it is compared with.
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(),
                               torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                               torch.nn.Linear(4, 5))


@pytest.mark.parametrize("world", [3, 7])
def test_weighted_loss_gives_the_gradient_of_one_256_image_batch_for_any_worker_count(world):
    from pipeline.train.recipe import weighted_loss
    from pipeline.train.data import GlobalBatchSampler

    torch.manual_seed(0)
    net = _tiny_net().double()
    x = torch.randn(256, 3, 6, 6, dtype=torch.float64)
    y = torch.randint(0, 5, (256,))
    # The truth: one process, the mean cross-entropy over the whole batch.
    F.cross_entropy(net(x), y).backward()
    truth = [p.grad.clone() for p in net.parameters()]

    samplers = [GlobalBatchSampler(256, 256, world, r, shuffle=False) for r in range(world)]
    parts = [next(iter(s)) for s in samplers]
    assert sorted(i for part in parts for i in part) == list(range(256))   # a partition
    assert {len(p) for p in parts} == {256 // world, 256 // world + 1}     # uneven: 256 % world != 0
    # Each rank backpropagates its weighted loss; DDP averages the ranks' gradients (÷ world).
    summed = [torch.zeros_like(p) for p in net.parameters()]
    for part, s in zip(parts, samplers):
        net.zero_grad()
        loss, _ = weighted_loss(net(x[part]), y[part], world, s.step_sizes[0])
        loss.backward()
        summed = [a + p.grad for a, p in zip(summed, net.parameters())]
    for a, t in zip(summed, truth):
        torch.testing.assert_close(a / world, t, rtol=1e-12, atol=1e-12)


def test_global_batch_sampler_steps_agree_across_ranks_and_follow_the_seed():
    from pipeline.train.data import GlobalBatchSampler, split_sizes

    assert split_sizes(10, 3) == [4, 3, 3] and split_sizes(2, 3) == [1, 1, 0]
    ranks = [GlobalBatchSampler(70, 16, 3, r, seed=5) for r in range(3)]
    for s in ranks:
        s.set_epoch(2)
    assert len({len(s) for s in ranks}) == 1 and len(ranks[0]) == 4   # 70 // 16, tail dropped
    steps = [list(s) for s in ranks]
    for i in range(4):
        merged = [j for r in range(3) for j in steps[r][i]]
        assert merged == ranks[0].global_batches()[i] and len(merged) == 16
    seen = sorted(j for r in range(3) for b in steps[r] for j in b)
    assert len(set(seen)) == 64
    again = GlobalBatchSampler(70, 16, 3, 0, seed=5)
    again.set_epoch(2)
    assert list(again) == steps[0]
    again.set_epoch(3)
    assert list(again) != steps[0]


def test_photometric_distortions_change_pixels_as_specified():
    from pipeline.data.augment import Photometric, apply_photometric

    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 8, 8, generator=g) * 0.8 + 0.1
    # Brightness: a shift of every channel, clamped to [0, 1].
    out = apply_photometric(x, Photometric(brightness=0.05))
    torch.testing.assert_close(out, (x + 0.05).clamp(0, 1))
    # Contrast: per-channel deviations from the channel mean scaled.
    m = x.mean(dim=(1, 2), keepdim=True)
    torch.testing.assert_close(apply_photometric(x, Photometric(contrast=1.3)),
                               ((x - m) * 1.3 + m).clamp(0, 1))
    # Saturation 0: gray (all channels equal, ITU-R 601 luma).
    gray = apply_photometric(x, Photometric(saturation=0.0))
    luma = 0.2989 * x[0] + 0.587 * x[1] + 0.114 * x[2]   # torchvision's weights
    for c in range(3):
        torch.testing.assert_close(gray[c], luma, atol=1e-6, rtol=0)
    # Hue: a full turn is the identity, half a turn changes pixels.
    torch.testing.assert_close(apply_photometric(apply_photometric(x, Photometric(hue=0.5)),
                                                 Photometric(hue=-0.5)), x, atol=1e-5, rtol=0)
    assert (apply_photometric(x, Photometric(hue=0.5)) - x).abs().max() > 0.1
    # The draws stay in the recipe's ranges and follow the generator's seed.
    draws = [Photometric.sample(torch.Generator().manual_seed(s)) for s in range(200)]
    assert all(abs(d.brightness) <= 32 / 255 and 0.5 <= d.saturation <= 1.5
               and abs(d.hue) <= 0.2 and 0.5 <= d.contrast <= 1.5 for d in draws)
    assert {d.order for d in draws} == {0, 1, 2, 3}
    assert Photometric.sample(torch.Generator().manual_seed(7)) == draws[7]


@pytest.mark.parametrize("augment", ["inception", "crop-flip-hue-gray"])
def test_colour_augmentations_are_seeded_and_change_only_colours(augment):
    img = Image.fromarray((np.random.default_rng(0).random((40, 40, 3)) * 255).astype(np.uint8))
    plain, coloured = TrainTransform(24, augment="crop-flip"), TrainTransform(24, augment=augment)
    changed = 0
    for seed in range(6):
        torch.manual_seed(seed)
        a = coloured(img)
        torch.manual_seed(seed)
        b = coloured(img)
        assert torch.equal(a, b) and a.dtype == torch.uint8 and a.shape == (3, 24, 24)
        torch.manual_seed(seed)
        base = plain(img)   # same crop and flip: they are drawn first, from the same RNG
        changed += int((a.int() - base.int()).abs().max() > 2)
    assert changed >= 4


def test_sync_batchnorm_without_a_process_group_is_batchnorm_and_keeps_the_keys():
    from pipeline.train.syncbn import SyncBatchNorm, convert_sync_batchnorm

    torch.manual_seed(0)
    model = build_model("resnet18", num_classes=3, width=4)
    keys = list(model.state_dict())
    ref = copy.deepcopy(model)
    convert_sync_batchnorm(model)
    assert list(model.state_dict()) == keys
    assert isinstance(model.bn1, SyncBatchNorm) and not isinstance(ref.bn1, SyncBatchNorm)
    x = torch.randn(4, 3, 32, 32)
    torch.testing.assert_close(model.train()(x), ref.train()(x))
    torch.testing.assert_close(model.bn1.running_var, ref.bn1.running_var)


def test_seed_changes_the_initial_weights_and_bf16_runs_a_step():
    from pipeline.train.recipe import seed_everything

    nets = []
    for seed in (0, 0, 1):
        seed_everything(seed)
        nets.append(build_model("resnet18", num_classes=3, width=4).conv1.weight)
    assert torch.equal(nets[0], nets[1]) and not torch.equal(nets[0], nets[2])
    torch.manual_seed(0)
    model = build_model("resnet18", num_classes=3, width=4)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    batches = [(torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8), torch.tensor([0, 1, 2, 0]), 0)]
    zca = ZCA([0, 0, 0], np.eye(3).tolist())
    stats = train_epoch(model, batches, opt, zca, torch.device("cpu"), precision="bf16")
    assert stats.images == 4 and np.isfinite(stats.loss)


def test_recipe_records_precision_augment_and_sync_bn_and_rejects_unknown_values():
    from pipeline.train.recipe import epoch_row

    paper, demo = PRESETS["paper"], PRESETS["demo"]
    assert (paper.precision, paper.augment, paper.sync_bn) == ("fp32", "inception", True)
    assert (demo.precision, demo.augment, demo.sync_bn) == ("fp32", "crop-flip-hue-gray", False)
    with pytest.raises(ValueError, match="invalid precision 'fp16'; allowed: fp32, bf16"):
        preset("paper", precision="fp16")
    with pytest.raises(ValueError, match="invalid augment 'x'; allowed: inception, crop-flip"):
        preset("demo", augment="x")
    row = epoch_row(3, [10.0, 5, 1, 4.0, 2, 3, 4, 0], 0.01, 2.0, 1.0, 3,
                    preset("paper", seed=7, precision="bf16"), True)
    assert row["seed"] == 7 and row["precision"] == "bf16" and row["sync_bn"] is True
    assert row["train_loss"] == 2.0 and row["top1"] == 0.5 and row["skipped"] == 1


def test_an_optimizer_built_before_the_sync_batchnorm_conversion_still_trains_its_weights():
    """convert_sync_batchnorm keeps BatchNorm's Parameter objects (as torch's does): before, the
    CPU conversion made new ones and the optimizer kept stepping the orphaned originals."""
    from pipeline.train.syncbn import convert_sync_batchnorm

    torch.manual_seed(0)
    model = build_model("resnet18", num_classes=3, width=4)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    convert_sync_batchnorm(model)
    assert {id(p) for p in model.parameters()} == {id(p) for g in opt.param_groups
                                                   for p in g["params"]}
    before = model.bn1.weight.detach().clone()
    model.train()(torch.randn(4, 3, 32, 32)).logsumexp(1).sum().backward()
    opt.step()
    assert not torch.equal(model.bn1.weight.detach(), before)


def test_training_runs_an_epoch_saves_and_resumes_to_the_same_state(tmp_path):
    """Training.start / run_epoch / save, the pieces the Ray Train loop wires: a resumed state
    equals the saved one, and the next epoch continues the schedule."""
    from pipeline.train.recipe import Loaders, Training, preset

    recipe = preset("demo", model="resnet18", width=4, batch_size=4, step_epochs=1, lr=0.1)
    zca = ZCA([0, 0, 0], np.eye(3).tolist())
    g = torch.Generator().manual_seed(0)
    data = [(torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8, generator=g),
             torch.tensor([0, 1, 2, 0]), 0)]

    class Sampler:
        step_sizes = [4]

        def set_epoch(self, epoch: int) -> None:
            pass

    loaders = Loaders(data, Sampler(), data)
    t = Training.start(recipe, ["a", "b", "c"], zca, torch.device("cpu"))
    row = t.run_epoch(1, loaders)
    assert (row["epoch"], row["train_images"], row["val_images"], row["lr"]) == (1, 4, 4, 0.1)
    t.save(str(tmp_path / "ckpt.pt"))
    state = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    again = Training.start(recipe, ["a", "b", "c"], zca, torch.device("cpu"), restored=state)
    assert again.epoch == 1 and again.history == t.history
    for k, v in t.model.state_dict().items():
        assert torch.equal(again.model.state_dict()[k], v)
    assert again.run_epoch(2, loaders)["lr"] == pytest.approx(0.01)   # lr / 10 after epoch 1
