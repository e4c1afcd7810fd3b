"""Embedded demo data: JPEG crops cut from scikit-image's bundled photographs.

Every job falls back to this data when no --data is given, so the whole pipeline runs on a
laptop without ImageNet. Each class is one photograph; its images are random square crops
(random scale, position and horizontal flip) resized to DEMO_IMAGE_SIZE. Crops of different
regions and scales of one photo look unalike, so a small network needs to learn something to
tell them apart. The classes are chosen by structure: four natural colour photographs
(astronaut, cat, coffee, rocket) and four grayscale textures and scenes (brick, grass, gravel,
text). An earlier set (a colour wheel, a red retina, a stained slide, the Hubble deep field)
could be told apart by colour alone: the networks learned colour detectors and their top-16
patches were flat, saturated colour fields, which whitening (ZCA amplifies chroma) made the
strongest stimuli of nearly every channel. The demo training preset also rotates every training
image's hue by a random amount and grays one in five (`pipeline.train.recipe.PRESETS["demo"]`, augment
`crop-flip-hue-gray`), which leaves colour a weak cue.

    root = ensure_demo_data()              # generated once, then cached; returns the root folder
    train = build_manifest(root + "/train", require_labels=True)
    val = build_manifest(root + "/val", require_labels=True)
    batch = load_batch(val, range(32), demo_transform())

The output is deterministic for a seed: the same bytes on every machine with the same
scikit-image, Pillow and NumPy, so workers on several nodes can each generate their own copy.
"""
from __future__ import annotations

import functools
import io
import json
import os
import shutil
import uuid
from dataclasses import dataclass

import numpy as np

from pipeline.data.decode import EvalTransform

__all__ = ["DEMO_IMAGE_SIZE", "DEMO_RESIZE", "DEMO_CROP", "DEMO_WIDTH", "DEMO_CLASSES",
           "DEMO_VERSION", "DemoSpec", "demo_transform", "generate_demo_data", "ensure_demo_data",
           "default_demo_root"]

DEMO_IMAGE_SIZE = 72   # side of the JPEG crops written to disk
DEMO_RESIZE = 72       # evaluation transform for the demo: shorter side -> 72
DEMO_CROP = 64         # then centre crop 64
DEMO_WIDTH = 16        # base width of the demo models
DEMO_VERSION = 2       # bump when the generator changes: the cache folder name carries it

# Photographs that ship inside scikit-image (no pooch download), chosen by structure rather than
# colour (see the module docstring). Class = photograph; grayscale ones are replicated to RGB;
# labels follow the sorted names, as for any class-folder source.
DEMO_CLASSES = ("astronaut", "brick", "chelsea", "coffee", "grass", "gravel", "rocket", "text")

_MARKER = "_DEMO_COMPLETE.json"
_SPLITS = ("train", "val")
_MAX_SOURCE_SIDE = 512   # photographs are first shrunk to this shorter side (crops stay >= 72 px)


@dataclass(frozen=True)
class DemoSpec:
    seed: int = 0
    train_per_class: int = 300
    val_per_class: int = 50
    image_size: int = DEMO_IMAGE_SIZE
    min_scale: float = 0.15    # crop side as a fraction of the photo's shorter side
    max_scale: float = 0.6
    quality: int = 90          # JPEG quality

    def __post_init__(self) -> None:
        if self.train_per_class < 0 or self.val_per_class < 0:
            raise ValueError("train_per_class and val_per_class must be >= 0")
        if self.train_per_class + self.val_per_class < 1:
            raise ValueError("the demo needs at least one image per class")
        if not 8 <= self.image_size <= 1024:
            raise ValueError(f"image_size must be in 8..1024, got {self.image_size}")
        if not 0.0 < self.min_scale <= self.max_scale <= 1.0:
            raise ValueError("need 0 < min_scale <= max_scale <= 1")
        if not 1 <= self.quality <= 100:
            raise ValueError(f"quality must be in 1..100, got {self.quality}")


def demo_transform() -> EvalTransform:
    """The demo's evaluation transform: shorter side -> 72, centre crop 64."""
    return EvalTransform(resize=DEMO_RESIZE, crop=DEMO_CROP)


@functools.lru_cache(maxsize=None)
def _photo(name: str) -> np.ndarray:
    """The photograph as uint8 RGB, shorter side at most _MAX_SOURCE_SIDE (cached: ~8 MB for all)."""
    import skimage.data
    from PIL import Image

    img = np.asarray(getattr(skimage.data, name)())
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=2)
    pil = Image.fromarray(np.ascontiguousarray(img[..., :3].astype(np.uint8)))
    if min(pil.size) > _MAX_SOURCE_SIDE:
        # Antialiased resampling costs grow with the scale factor: shrink big photographs once.
        f = _MAX_SOURCE_SIDE / min(pil.size)
        pil = pil.resize((round(pil.width * f), round(pil.height * f)), Image.Resampling.LANCZOS)
    out = np.asarray(pil)
    out.setflags(write=False)
    return out


def _crops(photo: np.ndarray, n: int, rng: np.random.Generator, spec: DemoSpec) -> list[bytes]:
    from PIL import Image

    pil = Image.fromarray(photo)
    w, h = pil.size
    short = min(h, w)
    out = []
    for _ in range(n):
        side = max(8, int(round(short * rng.uniform(spec.min_scale, spec.max_scale))))
        top = int(rng.integers(0, h - side + 1))
        left = int(rng.integers(0, w - side + 1))
        flip = bool(rng.integers(0, 2))
        crop = pil.resize((spec.image_size, spec.image_size), Image.Resampling.BILINEAR,
                          box=(left, top, left + side, top + side), reducing_gap=None)
        if flip:
            crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        buf = io.BytesIO()
        crop.save(buf, format="JPEG", quality=spec.quality)
        out.append(buf.getvalue())
    return out


def generate_demo_data(out_dir: str, spec: DemoSpec = DemoSpec()) -> dict[str, int]:
    """Write out_dir/{train,val}/<class>/<class>_<i>.JPEG (out_dir must be a new local folder).

    Each (class, split) draws from its own generator seeded by (seed, class, split), so changing
    one count leaves the other split's images unchanged. Returns the image count per split.
    """
    os.makedirs(out_dir, exist_ok=False)
    counts = {"train": spec.train_per_class, "val": spec.val_per_class}
    for c, name in enumerate(DEMO_CLASSES):
        photo = _photo(name)
        for s, split in enumerate(_SPLITS):
            rng = np.random.default_rng([spec.seed, c, s])
            folder = os.path.join(out_dir, split, name)
            os.makedirs(folder, exist_ok=True)
            for i, data in enumerate(_crops(photo, counts[split], rng, spec)):
                with open(os.path.join(folder, f"{name}_{i:05d}.JPEG"), "wb") as f:
                    f.write(data)
    return {split: counts[split] * len(DEMO_CLASSES) for split in _SPLITS}


def default_demo_root(seed: int = 0) -> str:
    """$PREFERRED_STIMULI_DATA/demo-v1-seed{seed}, else ~/.cache/preferred-stimuli/demo-v1-seed{seed}."""
    base = os.environ.get("PREFERRED_STIMULI_DATA") or os.path.join(
        os.path.expanduser("~"), ".cache", "preferred-stimuli")
    return os.path.join(os.path.abspath(base), f"demo-v{DEMO_VERSION}-seed{seed}")


def ensure_demo_data(root: str | None = None, seed: int = 0) -> str:
    """Generate the demo data once (atomically) and return its root, holding train/ and val/.

    The data is written to a temporary sibling, marked complete, then renamed into place, so a
    crashed or concurrent run never leaves (or sees) a half-written folder. A folder that exists
    without the marker is not ours: it is an error, never deleted.
    """
    spec = DemoSpec(seed=seed)
    root = os.path.abspath(os.path.expanduser(root)) if root else default_demo_root(seed)
    marker = os.path.join(root, _MARKER)
    if os.path.exists(marker):
        return _checked(root, marker, spec)
    if os.path.exists(root):
        if os.path.exists(marker):      # another process renamed its copy in since the check
            return _checked(root, marker, spec)
        raise ValueError(f"{root} exists but holds no complete demo data ({_MARKER} missing); "
                         f"remove it or pass another root")
    parent = os.path.dirname(root)
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{os.path.basename(root)}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        counts = generate_demo_data(tmp, spec)
        with open(os.path.join(tmp, _MARKER), "w") as f:
            json.dump({"version": DEMO_VERSION, "spec": spec.__dict__, "images": counts,
                       "classes": list(DEMO_CLASSES)}, f, indent=2, sort_keys=True)
        try:
            os.rename(tmp, root)
        except OSError:
            # Another process finished first (rename onto a non-empty folder fails): use theirs.
            if not os.path.exists(marker):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return _checked(root, marker, spec)


def _checked(root: str, marker: str, spec: DemoSpec) -> str:
    with open(marker) as f:
        made = json.load(f)
    if made.get("version") != DEMO_VERSION or made.get("spec") != spec.__dict__:
        raise ValueError(f"{root} holds demo data made with {made.get('spec')} (version "
                         f"{made.get('version')}), not seed {spec.seed} of version {DEMO_VERSION}; "
                         f"pass another root")
    return root
