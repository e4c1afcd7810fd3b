"""Training and validation image transforms: Inception-style augmentation and the eval crop.

    t = TrainTransform(224, augment="inception")      # random-resized crop, flip, photometric
    x = t(decode_rgb(jpeg_bytes))                      # uint8 (3, 224, 224)
    p = Photometric.sample(); y = apply_photometric(f, p)   # one draw, checkable pixel by pixel
    v = EvalResizeCrop(256, 224)(image)                # the analysis' own resize + centre crop

Augmentations (`Recipe.augment`, `jobs.train --augment`):
  inception          random-resized crop + horizontal flip + the Inception recipe's photometric
                     distortions (brightness, saturation, hue, contrast in a random order)
  crop-flip          random-resized crop + horizontal flip only
  crop-flip-hue-gray crop + flip + a hue rotation drawn over the whole colour circle and
                     grayscale with probability 0.2: colour is a weak cue (the demo's default)
"""
from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any

import torch
import torchvision.transforms.v2 as T
import torchvision.transforms.v2.functional as TF
from PIL import Image
from torch import Tensor

__all__ = ["AUGMENTS", "Photometric", "apply_photometric", "TrainTransform", "EvalResizeCrop",
           "decode_rgb"]

AUGMENTS = ("inception", "crop-flip", "crop-flip-hue-gray")


def decode_rgb(data: bytes) -> Image.Image:
    """Decode by content (JPEG, PNG named .JPEG, CMYK, grayscale ...) and convert to RGB."""
    with Image.open(io.BytesIO(data)) as im:
        return im.convert("RGB")


# The Inception recipe's photometric distortions (Szegedy et al. 2015 cite Howard 2013; the
# reference implementation is TF-slim's `inception_preprocessing.distort_color`): brightness
# shifted by up to 32/255, saturation and contrast scaled by [0.5, 1.5], hue rotated by up to 0.2
# of the colour circle, applied in one of four orders drawn per image, clamped to [0, 1].
_ORDERS = (("brightness", "saturation", "hue", "contrast"),
           ("saturation", "brightness", "contrast", "hue"),
           ("contrast", "hue", "brightness", "saturation"),
           ("hue", "saturation", "contrast", "brightness"))


@dataclass(frozen=True)
class Photometric:
    """One draw of the photometric distortion: the parameters, so tests can check the pixels."""

    brightness: float = 0.0   # added to every channel (pixels in [0, 1])
    saturation: float = 1.0   # blend factor with the grayscale image (torchvision's)
    hue: float = 0.0          # rotation as a fraction of the hue circle, in [-0.5, 0.5]
    contrast: float = 1.0     # per-channel: (x - channel mean) * factor + channel mean
    order: int = 0            # index into the four orders of the recipe

    @classmethod
    def sample(cls, generator: torch.Generator | None = None, brightness: float = 32 / 255,
               saturation: tuple[float, float] = (0.5, 1.5), hue: float = 0.2,
               contrast: tuple[float, float] = (0.5, 1.5)) -> "Photometric":
        """A draw from torch's RNG (the job seeds it per epoch and rank, and loader processes)."""
        u = torch.rand(4, generator=generator, dtype=torch.float64).tolist()
        order = int(torch.randint(len(_ORDERS), (1,), generator=generator))
        return cls(brightness=(2 * u[0] - 1) * brightness,
                   saturation=saturation[0] + u[1] * (saturation[1] - saturation[0]),
                   hue=(2 * u[2] - 1) * hue,
                   contrast=contrast[0] + u[3] * (contrast[1] - contrast[0]), order=order)


def apply_photometric(x: Tensor, p: Photometric) -> Tensor:
    """Distort a float RGB image (3, H, W) in [0, 1] by `p`, in `p`'s order; clamped to [0, 1]."""
    for op in _ORDERS[p.order]:
        if op == "brightness":
            x = (x + p.brightness).clamp(0.0, 1.0)
        elif op == "saturation":
            x = TF.adjust_saturation(x, p.saturation)
        elif op == "hue":
            x = TF.adjust_hue(x, p.hue)
        else:
            m = x.mean(dim=(-2, -1), keepdim=True)
            x = ((x - m) * p.contrast + m).clamp(0.0, 1.0)
    return x


class TrainTransform:
    """Training augmentation: random-resized crop to `size`, random horizontal flip, and per
    `augment` (see AUGMENTS) the photometric distortions or hue rotation + grayscale.

    Returns a uint8 (3, size, size) RGB tensor; `collate` turns batches into [0, 1] floats
    and the model's preprocessing (ZCA) is applied on the device, once per batch. Random draws
    come from torch's global RNG, which the job seeds per (epoch, rank) and DataLoader seeds per
    loader process.
    """

    def __init__(self, size: int, scale: tuple[float, float] = (0.08, 1.0),
                 ratio: tuple[float, float] = (3 / 4, 4 / 3), flip: bool = True,
                 augment: str = "crop-flip", grayscale_p: float = 0.2):
        if augment not in AUGMENTS:
            raise ValueError(f"invalid augment {augment!r}; allowed: {', '.join(AUGMENTS)}")
        self.size, self.augment, self.grayscale_p = size, augment, grayscale_p
        steps: list[Any] = [T.RandomResizedCrop(size, scale=scale, ratio=ratio, antialias=True)]
        if flip:
            steps.append(T.RandomHorizontalFlip())
        steps.append(T.PILToTensor())
        self._t = T.Compose(steps)

    def __call__(self, image: Image.Image) -> Tensor:
        x = self._t(image)
        if self.augment == "crop-flip":
            return x
        f = x.float().div_(255.0)
        if self.augment == "inception":
            f = apply_photometric(f, Photometric.sample())
        else:  # crop-flip-hue-gray
            f = TF.adjust_hue(f, float(torch.rand(())) - 0.5)
            if float(torch.rand(())) < self.grayscale_p:
                f = TF.rgb_to_grayscale(f, num_output_channels=3)
        return f.mul(255.0).round_().clamp_(0, 255).to(torch.uint8)


class EvalResizeCrop:
    """Shorter side resized to `resize` (bilinear, antialiased), centre crop `crop`: uint8.

    The analysis' own path (`pipeline.data.decode.resize_crop`), so validation metrics and the
    stimulus tables see the same pixels for the same image (tests/pipeline/test_decode.py).
    """

    def __init__(self, resize: int, crop: int):
        from pipeline.data.decode import EvalTransform

        self.resize, self.crop = resize, crop
        self.transform = EvalTransform(resize, crop)

    def __call__(self, image: Image.Image | Tensor) -> Tensor:
        from pipeline.data.decode import resize_crop

        x = image if isinstance(image, Tensor) else TF.pil_to_tensor(image)
        return resize_crop(x, self.transform)

