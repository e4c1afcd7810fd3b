"""What a job studies, resolved in one call: the images (a data source), the model (a checkpoint or
a seeded stand-in), the transform both see, and the layers with their geometry. No Ray; reads
only the source listing and the checkpoint. Every refusal is a ValueError whose first line is
the user's message: a job turns it into BadInput (exit 2) around this one call, before anything
is written.

    s = resolve(data=None, checkpoint=None, model="plainnet34", layers="pool1,conv3")
    s.source.manifest, s.model.model, s.transform, s.layers, s.specs   # specs: per-layer RF geometry
    s = resolve(data, ckpt, None, None, require_labels=True)           # jobs.ablate: no layers yet
    m = load_model(None, "resnet34", num_classes=8, width=16)          # jobs.actmax: no images

Without --data the embedded demo data's val/ is read and the stand-in model is demo-sized
(its classes, width 16); with data, ImageNet-sized (1000 classes, width 64). The transform is
the flags', else the checkpoint's own (its training recipe), else the demo's (72 / 64) on demo
data, else ImageNet's (256 / 224).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["StudyModel", "Source", "Study", "load_model", "read_source", "eval_transform",
           "resolve"]


@dataclass
class StudyModel:
    model: Any                 # a supported torchvision CNN (pipeline.models.zoo) in eval mode
    name: str                  # resnet34, plainnet34, vgg11_bn, ...
    preprocess: Any            # pipeline.data.preprocess.Preprocess that maps [0, 1] crops in
    untrained: bool            # True: the seeded stand-in built without a checkpoint
    meta: dict = field(default_factory=dict)   # the checkpoint's extra entries (recipe, ...)

    @property
    def warning(self) -> str | None:
        if not self.untrained:
            return None
        return (f"no --checkpoint: {self.name} is randomly initialised (UNTRAINED, width "
                f"{getattr(self.model, 'width', 64)}); its numbers say nothing about a trained "
                f"network")


@dataclass
class Source:
    url: str                   # the source actually read (the demo's val/ without --data)
    demo: bool                 # True: the embedded demo data
    manifest: Any              # pipeline.data.listing.Manifest (cut to --limit)
    demo_root: str | None = None   # the demo data's root (train/ and val/) when demo

    def stand_in(self) -> tuple[int, int]:
        """(classes, width) of the untrained stand-in model: demo-sized on the demo data."""
        from pipeline.data.demo import DEMO_WIDTH

        return (max(1, len(self.manifest.classes)), DEMO_WIDTH) if self.demo else (1000, 64)

    def digest(self) -> bytes:
        """Digest of the image paths in manifest order and of the root (the demo's: 'demo', so
        where its cache lives does not matter): a fingerprint part."""
        import hashlib

        h = hashlib.sha256(b"demo" if self.demo else self.manifest.root.encode())
        h.update("\n".join(self.manifest.table.column("path").to_pylist()).encode())
        return h.digest()


@dataclass
class Study:
    source: Source
    model: StudyModel
    transform: Any             # pipeline.data.decode.EvalTransform
    layers: list               # pipeline.models.layers.Layer, forward order ([] when not asked)


def load_model(checkpoint: str | None, model: str | None, *, num_classes: int, width: int,
               seed: int = 0) -> StudyModel:
    """The checkpoint's model (a plain state_dict without `model` is read as resnet34), or,
    without a checkpoint, `model` (default resnet34) freshly built after torch.manual_seed(seed):
    every job builds the same untrained stand-in, so their outputs describe the same weights."""
    import torch

    from pipeline.data.preprocess import IMAGENET
    from pipeline.models.checkpoint import CheckpointError, load_checkpoint
    from pipeline.models.zoo import build_model, supported_models, width_for

    if model is not None and model not in supported_models():
        raise ValueError(f"unknown model {model!r}; allowed: {', '.join(supported_models())}")
    if checkpoint:
        try:
            loaded = load_checkpoint(checkpoint, model)
        except CheckpointError as e:
            if model is not None or "plain state_dict" not in str(e):
                raise
            loaded = load_checkpoint(checkpoint, "resnet34")   # the documented default
        return StudyModel(loaded.model.eval(), loaded.model_name, loaded.preprocess, False,
                          loaded.meta)
    name = model or "resnet34"
    torch.manual_seed(seed)
    return StudyModel(build_model(name, num_classes=num_classes,
                                  width=width_for(name, width)).eval(), name, IMAGENET, True)


def read_source(data: str | None, *, limit: int | None = None,
                require_labels: bool = False) -> Source:
    """`data`, or the embedded demo data's val/ split; cut to the first `limit` images."""
    from pipeline.data.demo import ensure_demo_data
    from pipeline.data.listing import Manifest, build_manifest

    demo = data is None
    root = ensure_demo_data().rstrip("/") if demo else None
    url = f"{root}/val" if demo else data
    manifest = build_manifest(url, require_labels=require_labels)
    if len(manifest) == 0:
        raise ValueError(f"data source {url} holds no images")
    if limit is not None:
        if limit < 1:
            raise ValueError(f"--limit must be >= 1, got {limit}")
        if limit < len(manifest):
            manifest = Manifest(root=manifest.root, table=manifest.table.slice(0, limit),
                                classes=manifest.classes)
    return Source(url, demo, manifest, root)


def eval_transform(resize: int | None, crop: int | None, *, demo: bool,
                   meta: dict | None = None) -> Any:
    """Flags first, then the checkpoint's own evaluation transform (its training recipe), then
    the demo's (72 / 64) on demo data, else ImageNet's (256 / 224)."""
    from pipeline.data.decode import EvalTransform
    from pipeline.data.demo import demo_transform

    recipe = (meta or {}).get("recipe") or {}
    if "eval_resize" in recipe and "eval_crop" in recipe:
        base = EvalTransform(int(recipe["eval_resize"]), int(recipe["eval_crop"]))
    else:
        base = demo_transform() if demo else EvalTransform()
    for name, v in (("--resize", resize), ("--crop", crop)):
        if v is not None and v < 1:
            raise ValueError(f"{name} must be a positive number of pixels, got {v}")
    return EvalTransform(resize=resize or base.resize, crop=crop or base.crop)


def resolve(data: str | None, checkpoint: str | None, model: str | None, layers: str | None, *,
            resize: int | None = None, crop: int | None = None, limit: int | None = None,
            seed: int = 0, require_labels: bool = False) -> Study:
    """The source, the model (stand-in shaped by the source), the transform and `layers`
    (None: none asked) in one pass; ValueError (or FileNotFoundError) for any bad input."""
    from pipeline.models.layers import resolve_layers

    source = read_source(data, limit=limit, require_labels=require_labels)
    classes, width = source.stand_in()
    m = load_model(checkpoint, model, num_classes=classes, width=width, seed=seed)
    transform = eval_transform(resize, crop, demo=source.demo, meta=m.meta)
    return Study(source, m, transform, resolve_layers(m.model, layers) if layers else [])
