"""What jobs share about their inputs: the output folder, the model to study, the images and
their transform. Every bad input surfaces here as BadInput (exit 2). `resolve_device` is this
process's device (jobs.bench, one process); jobs that fan out resolve against the cluster with
jobs.runtime.device.resolve_device.
"""
from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any

from jobs.runtime.options import BadInput, bad_input

__all__ = ["resolve_device", "check_writable", "model_choices", "JobModel", "load_job_model",
           "JobData", "resolve_data", "default_model_shape", "eval_transform"]


def resolve_device(spec: str) -> str:
    """This process's device (auto | cpu | cuda); BadInput for cuda without a GPU."""
    import torch

    if spec not in ("auto", "cpu", "cuda"):
        raise BadInput(f"invalid device {spec!r}; allowed: auto, cpu, cuda")
    if spec == "cuda" and not torch.cuda.is_available():
        raise BadInput("--device cuda asked for, but no CUDA device is available; use auto or cpu")
    if spec == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return spec


def check_writable(url: str) -> None:
    """Fail early (BadInput) when `url` cannot be created or written."""
    from pipeline.results.tables import fs_path

    try:
        fs, path = fs_path(url)
        fs.makedirs(path, exist_ok=True)
        probe = f"{path.rstrip('/')}/.write-probe-{uuid.uuid4().hex[:8]}"
        with fs.open(probe, "wb") as f:
            f.write(b"ok")
        fs.rm(probe)
    except Exception as e:  # noqa: BLE001 - any failure here means "not writable"
        raise BadInput(f"output {url} is not writable ({e.__class__.__name__}: "
                       f"{str(e).splitlines()[0] if str(e) else ''})") from None


# ---------------------------------------------------------------------------------------------
# What analyze, ablate and actmax share: the model to study and the images to show it.
# ---------------------------------------------------------------------------------------------

def model_choices() -> list[str]:
    """The supported model names: `choices=model_choices` reads them (and imports torchvision)
    only when a parser is built."""
    from pipeline.models.zoo import supported_models

    return supported_models()


@dataclass
class JobModel:
    model: Any                 # a supported torchvision CNN (pipeline.models.zoo) in eval mode
    name: str                  # resnet34, plainnet34, vgg11_bn, ...
    preprocess: Any            # pipeline.data.preprocess.Preprocess that maps [0, 1] crops in
    untrained: bool            # True: the seeded stand-in built without --checkpoint
    meta: dict = field(default_factory=dict)   # the checkpoint's extra entries (recipe, ...)

    @property
    def warning(self) -> str | None:
        if not self.untrained:
            return None
        return (f"no --checkpoint: {self.name} is randomly initialised (UNTRAINED, width "
                f"{getattr(self.model, 'width', 64)}); its numbers say nothing about a trained "
                f"network")


def load_job_model(checkpoint: str | None, model: str | None, *, num_classes: int, width: int,
                   seed: int = 0) -> JobModel:
    """The checkpoint's model (a plain state_dict without --model is read as resnet34), or,
    without a checkpoint, `model` (default resnet34) freshly built after torch.manual_seed(seed):
    every job builds the same untrained stand-in, so their outputs describe the same weights."""
    import torch

    from pipeline.models.checkpoint import CheckpointError, load_checkpoint
    from pipeline.models.zoo import build_model, is_resnet, supported_models
    from pipeline.data.preprocess import IMAGENET

    if model is not None and model not in supported_models():
        raise BadInput(f"unknown model {model!r}; allowed: {', '.join(supported_models())}")
    if checkpoint:
        try:
            loaded = load_checkpoint(checkpoint, model)
        except CheckpointError as e:
            if model is None and "plain state_dict" in str(e):
                loaded = load_checkpoint(checkpoint, "resnet34")   # the documented default
            else:
                raise BadInput(str(e)) from None
        return JobModel(loaded.model.eval(), loaded.model_name, loaded.preprocess, False,
                        loaded.meta)
    name = model or "resnet34"
    torch.manual_seed(seed)
    width = width if is_resnet(name) else 64       # other models have torchvision's width only
    return JobModel(build_model(name, num_classes=num_classes, width=width).eval(), name,
                    IMAGENET, True)


@dataclass
class JobData:
    url: str                   # the source actually read (the demo's val/ without --data)
    demo: bool                 # True: the embedded demo data
    manifest: Any              # pipeline.data.listing.Manifest (cut to --limit)
    demo_root: str | None = None   # the demo data's root (train/ and val/) when demo


def resolve_data(data: str | None, *, limit: int | None = None,
                 require_labels: bool = False) -> JobData:
    """`--data`, or the embedded demo data's val/ split; cut to the first `limit` images."""
    from pipeline.data.demo import ensure_demo_data
    from pipeline.data.listing import Manifest, SourceError, build_manifest

    demo = data is None
    root = ensure_demo_data().rstrip("/") if demo else None
    url = f"{root}/val" if demo else data
    with bad_input(SourceError):    # missing, empty or unlabelled: the user's input (exit 2)
        manifest = build_manifest(url, require_labels=require_labels)
    if len(manifest) == 0:
        raise BadInput(f"data source {url} holds no images")
    if limit is not None:
        if limit < 1:
            raise BadInput(f"--limit must be >= 1, got {limit}")
        if limit < len(manifest):
            manifest = Manifest(root=manifest.root, table=manifest.table.slice(0, limit),
                                classes=manifest.classes)
    return JobData(url, demo, manifest, root)


def default_model_shape(data: JobData) -> tuple[int, int]:
    """(num_classes, width) of the untrained stand-in: demo-sized on the demo data."""
    from pipeline.data.demo import DEMO_WIDTH

    return (max(1, len(data.manifest.classes)), DEMO_WIDTH) if data.demo else (1000, 64)


def eval_transform(resize: int | None, crop: int | None, *, demo: bool, meta: dict | None = None):
    """Flags first, then the checkpoint's own evaluation transform (its training recipe), then
    the demo's (72 / 64) on demo data, else ImageNet's (256 / 224)."""
    from pipeline.data.demo import demo_transform
    from pipeline.data.decode import EvalTransform

    recipe = (meta or {}).get("recipe") or {}
    if "eval_resize" in recipe and "eval_crop" in recipe:
        base = EvalTransform(int(recipe["eval_resize"]), int(recipe["eval_crop"]))
    else:
        base = demo_transform() if demo else EvalTransform()
    for name, v in (("--resize", resize), ("--crop", crop)):
        if v is not None and v < 1:
            raise BadInput(f"{name} must be a positive number of pixels, got {v}")
    return EvalTransform(resize=resize or base.resize, crop=crop or base.crop)
