"""Training recipe as plain functions: presets, augmentation, optimizer/schedule, train/eval steps.

Everything here runs without Ray (the Ray Train job `jobs.train` only wires these pieces into
`TorchTrainer`), so each piece is testable on tiny tensors:

    recipe = PRESETS["demo"]                              # frozen Recipe
    model = build_model(recipe.model, num_classes=8, width=recipe.width)
    opt, sched = build_optimizer(model, recipe), None
    sched = build_scheduler(opt, recipe)                  # lr / 10 every `step_epochs` epochs
    ds = ImageDataset(urls, labels, TrainTransform(recipe.input_size), read=read_bytes)
    loader = DataLoader(ds, batch_size=32, collate_fn=collate)
    stats = train_epoch(model, loader, opt, zca, torch.device("cpu"))
    ev = evaluate(model, val_loader, zca, torch.device("cpu"))

The paper's recipe (SGD momentum 0.9, weight decay 1e-4, lr 0.01 divided by 10 every 30 epochs,
90 epochs, batch 256, Inception-style random-resized crops 224 with horizontal flips, ZCA colour
whitening) is `PRESETS["paper"]`; `PRESETS["demo"]` is the same structure scaled to the embedded
demo data. The dataset reads bytes through an injected `read` function (the jobs pass
`pipeline.tables.read_bytes`), so this module never opens files itself.
"""
from __future__ import annotations

import io
import math
import time
from dataclasses import dataclass, fields, replace
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
import torchvision.transforms.v2 as T
import torchvision.transforms.v2.functional as TF
from PIL import Image
from torch import Tensor, nn

from .preprocess import Preprocess

__all__ = ["Recipe", "PRESETS", "preset", "TrainTransform", "EvalResizeCrop", "decode_rgb",
           "ImageDataset", "collate", "build_optimizer", "build_scheduler", "EpochStats",
           "EvalStats", "topk_correct", "train_epoch", "evaluate", "IGNORE"]


@dataclass(frozen=True)
class Recipe:
    """A training recipe; `jobs.train` flags override single fields (`dataclasses.replace`)."""

    name: str = "paper"
    model: str = "resnet34"
    width: int = 64                    # base width (64 = torchvision's ResNet34)
    input_size: int = 224              # side of the random-resized training crop
    eval_resize: int = 256             # validation: shorter side resized to this ...
    eval_crop: int = 224               # ... then a centre crop of this side
    epochs: int = 90
    batch_size: int = 256              # global batch, split evenly over the workers
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-4
    step_epochs: int = 30              # lr divided by `gamma`⁻¹ every this many epochs
    gamma: float = 0.1
    crop_scale: tuple[float, float] = (0.08, 1.0)   # Inception-style area fraction
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)  # and aspect ratio range
    zca_images: int = 10_000           # training images sampled to fit the ZCA matrix
    zca_eps: float = 1e-5              # added to the colour covariance eigenvalues (pixels in [0, 1])
    seed: int = 0

    def validate(self) -> None:
        """Raise ValueError naming the first bad field and what is allowed."""
        positive = ("width", "input_size", "eval_resize", "eval_crop", "epochs", "batch_size",
                    "step_epochs", "zca_images")
        for f in positive:
            if getattr(self, f) < 1:
                raise ValueError(f"{f} must be a positive integer, got {getattr(self, f)}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be a positive number, got {self.lr}")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"momentum must lie in [0, 1), got {self.momentum}")
        if self.weight_decay < 0:
            raise ValueError(f"weight decay must be >= 0, got {self.weight_decay}")
        if not 0 < self.gamma <= 1:
            raise ValueError(f"gamma must lie in (0, 1], got {self.gamma}")
        if self.eval_crop > self.eval_resize:
            raise ValueError(f"eval crop {self.eval_crop} exceeds eval resize {self.eval_resize}")
        if self.zca_eps < 0:
            raise ValueError(f"zca eps must be >= 0, got {self.zca_eps}")

    def as_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


PRESETS: dict[str, Recipe] = {
    "paper": Recipe(),
    # The paper's structure at the demo scale (72x72 JPEGs, 8 classes, 2 CPU cores): width 16,
    # random-resized crops of 64, evaluation resize 72 / centre crop 64 (= pipeline.demo's
    # analysis transform). lr 0.05 for a global batch of 64 trains within the few epochs the
    # one-minute budget allows (measured in docs/training.md); lr / 10 for the last epoch as
    # in the paper's step schedule. 512 images = 2M pixels: ample for a 3x3 colour covariance.
    "demo": Recipe(name="demo", width=16, input_size=64, eval_resize=72, eval_crop=64, epochs=4,
                   batch_size=64, lr=0.05, step_epochs=3, zca_images=512),
}


def preset(name: str, **overrides: Any) -> Recipe:
    """A validated preset with some fields overridden (None values are ignored)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; allowed: {', '.join(sorted(PRESETS))}")
    recipe = replace(PRESETS[name], **{k: v for k, v in overrides.items() if v is not None})
    recipe.validate()
    return recipe


# ---------------------------------------------------------------------------------------------
# Images
# ---------------------------------------------------------------------------------------------

def decode_rgb(data: bytes) -> Image.Image:
    """Decode by content (JPEG, PNG named .JPEG, CMYK, grayscale ...) and convert to RGB."""
    with Image.open(io.BytesIO(data)) as im:
        return im.convert("RGB")


class TrainTransform:
    """Inception-style augmentation: random-resized crop to `size`, random horizontal flip.

    Returns a uint8 (3, size, size) RGB tensor; `collate` turns batches into [0, 1] floats
    and the model's preprocessing (ZCA) is applied on the device, once per batch.
    """

    def __init__(self, size: int, scale: tuple[float, float] = (0.08, 1.0),
                 ratio: tuple[float, float] = (3 / 4, 4 / 3), flip: bool = True):
        self.size = size
        steps: list[Any] = [T.RandomResizedCrop(size, scale=scale, ratio=ratio, antialias=True)]
        if flip:
            steps.append(T.RandomHorizontalFlip())
        steps.append(T.PILToTensor())
        self._t = T.Compose(steps)

    def __call__(self, image: Image.Image) -> Tensor:
        return self._t(image)


class EvalResizeCrop:
    """Shorter side resized to `resize` (bilinear, antialiased), centre crop `crop`: uint8.

    The analysis' own path (`pipeline.decode.resize_crop`), so validation metrics and the
    stimulus tables see the same pixels for the same image (tests/pipeline/test_decode.py).
    """

    def __init__(self, resize: int, crop: int):
        from .decode import EvalTransform

        self.resize, self.crop = resize, crop
        self.transform = EvalTransform(resize, crop)

    def __call__(self, image: Image.Image | Tensor) -> Tensor:
        from .decode import resize_crop

        x = image if isinstance(image, Tensor) else TF.pil_to_tensor(image)
        return resize_crop(x, self.transform)


# Labels of unusable rows; cross-entropy ignores them (torch's default ignore_index).
IGNORE = -100


class ImageDataset(torch.utils.data.Dataset):
    """(url, label) pairs -> (uint8 image, label); an unreadable file yields None (counted).

    `read` maps a URL to its bytes (I/O is injected, so this module never opens files).
    """

    def __init__(self, urls: Sequence[str], labels: Sequence[int],
                 transform: Callable[[Image.Image], Tensor], read: Callable[[str], bytes]):
        if len(urls) != len(labels):
            raise ValueError(f"{len(urls)} urls but {len(labels)} labels")
        self.urls, self.labels = list(urls), [int(v) for v in labels]
        self.transform, self.read = transform, read

    def __len__(self) -> int:
        return len(self.urls)

    def __getitem__(self, i: int) -> tuple[Tensor, int] | None:
        try:
            image = decode_rgb(self.read(self.urls[i]))
        except Exception:  # noqa: BLE001 - any unreadable/undecodable file is skipped, counted
            return None
        return self.transform(image), self.labels[i]


def collate(items: list[tuple[Tensor, int] | None]) -> tuple[Tensor, Tensor, int]:
    """Stack readable items; returns (uint8 images (N,3,H,W), int64 labels (N,), skipped)."""
    good = [it for it in items if it is not None]
    skipped = len(items) - len(good)
    if not good:
        return torch.zeros(0, 3, 1, 1, dtype=torch.uint8), torch.zeros(0, dtype=torch.int64), skipped
    images = torch.stack([im for im, _ in good])
    labels = torch.tensor([lab for _, lab in good], dtype=torch.int64)
    return images, labels, skipped


# ---------------------------------------------------------------------------------------------
# Optimisation
# ---------------------------------------------------------------------------------------------

def build_optimizer(model: nn.Module, recipe: Recipe) -> torch.optim.SGD:
    # As in the paper (and torchvision's reference recipe): weight decay on every parameter.
    return torch.optim.SGD(model.parameters(), lr=recipe.lr, momentum=recipe.momentum,
                           weight_decay=recipe.weight_decay)


def build_scheduler(optimizer: torch.optim.Optimizer, recipe: Recipe) -> torch.optim.lr_scheduler.StepLR:
    """Step schedule stepped once per epoch: lr · gamma^⌊epoch / step_epochs⌋."""
    return torch.optim.lr_scheduler.StepLR(optimizer, step_size=recipe.step_epochs,
                                           gamma=recipe.gamma)


@dataclass
class EpochStats:
    """Training sums of one worker's epoch (summed over workers by the job)."""

    loss_sum: float = 0.0
    images: int = 0
    skipped: int = 0
    steps: int = 0
    seconds: float = 0.0

    @property
    def loss(self) -> float:
        return self.loss_sum / self.images if self.images else float("nan")


@dataclass
class EvalStats:
    """Validation sums: loss, top-1 / top-5 hits, images; mergeable by addition."""

    loss_sum: float = 0.0
    correct1: int = 0
    correct5: int = 0
    images: int = 0
    skipped: int = 0

    def merge(self, other: "EvalStats") -> "EvalStats":
        return EvalStats(self.loss_sum + other.loss_sum, self.correct1 + other.correct1,
                         self.correct5 + other.correct5, self.images + other.images,
                         self.skipped + other.skipped)

    @property
    def loss(self) -> float:
        return self.loss_sum / self.images if self.images else float("nan")

    @property
    def top1(self) -> float:
        return self.correct1 / self.images if self.images else float("nan")

    @property
    def top5(self) -> float:
        return self.correct5 / self.images if self.images else float("nan")


def topk_correct(logits: Tensor, labels: Tensor, ks: Iterable[int] = (1, 5)) -> list[int]:
    """Number of rows whose label is among the k highest logits, for each k (k capped at C)."""
    ks = list(ks)
    kmax = min(max(ks), logits.shape[1])
    top = logits.topk(kmax, dim=1).indices
    hit = top == labels[:, None]
    return [int(hit[:, :min(k, kmax)].any(1).sum()) for k in ks]


def _inputs(images: Tensor, preprocess: Preprocess, device: torch.device,
            channels_last: bool) -> Tensor:
    x = images.to(device, non_blocking=True).float().div_(255.0)
    x = preprocess(x)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def train_epoch(model: nn.Module, batches: Iterable[tuple[Tensor, Tensor, int]],
                optimizer: torch.optim.Optimizer, preprocess: Preprocess, device: torch.device,
                amp: bool = False, channels_last: bool = False,
                on_batch: Callable[[int], None] | None = None) -> EpochStats:
    """One pass of SGD over `batches` of (uint8 images, labels, skipped) -> summed stats.

    `amp` turns on bf16 autocast (CUDA). `on_batch(i)` is called before step i (the job uses it
    for fault-injection tests). A batch left empty by unreadable files still takes part in the
    step with a zero loss, so data-parallel workers stay in lockstep.
    """
    model.train()
    stats = EpochStats()
    t0 = time.perf_counter()
    for i, (images, labels, skipped) in enumerate(batches):
        if on_batch is not None:
            on_batch(i)
        stats.skipped += skipped
        optimizer.zero_grad(set_to_none=True)
        n = len(labels)
        x = _inputs(images, preprocess, device, channels_last)
        y = labels.to(device, non_blocking=True)
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=amp):
            logits = model(x)
        # An empty batch (every file unreadable) still runs forward/backward with a zero loss:
        # every parameter gets a (zero) gradient, so DDP's all-reduce stays in step.
        loss = F.cross_entropy(logits.float(), y) if n else logits.sum() * 0.0
        loss.backward()
        optimizer.step()
        stats.loss_sum += float(loss.detach()) * n
        stats.images += n
        stats.steps += 1
    stats.seconds = time.perf_counter() - t0
    return stats


@torch.no_grad()
def evaluate(model: nn.Module, batches: Iterable[tuple[Tensor, Tensor, int]],
             preprocess: Preprocess, device: torch.device, amp: bool = False,
             channels_last: bool = False) -> EvalStats:
    """Summed cross-entropy, top-1 and top-5 hits over `batches` (model in eval mode)."""
    model.eval()
    stats = EvalStats()
    for images, labels, skipped in batches:
        stats.skipped += skipped
        if len(labels) == 0:
            continue
        x = _inputs(images, preprocess, device, channels_last)
        y = labels.to(device)
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=amp):
            logits = model(x)
        logits = logits.float()
        stats.loss_sum += float(F.cross_entropy(logits, y, reduction="sum"))
        c1, c5 = topk_correct(logits, y, (1, 5))
        stats.correct1 += c1
        stats.correct5 += c5
        stats.images += len(y)
    return stats
