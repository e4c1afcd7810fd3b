"""What every job shares: one-line errors with exit code 2, Ray start-up, devices, run.json.

    parser = job_parser("analyze", __doc__)
    ...
    def main(argv=None):
        args = parser.parse_args(argv)       # a bad flag: one line on stderr, exit 2
        with bad_input_exits():               # BadInput/ValueError -> one line, exit 2
            cfg = Config.from_args(args)
        init_ray()                            # joins RAY_ADDRESS, else starts a local cluster
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.metadata as md
import os
import platform
import sys
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Iterator, NoReturn

__all__ = ["BadInput", "fail", "job_parser", "bad_input_exits", "init_ray", "resolve_device",
           "check_writable", "package_versions", "Stopwatch", "log", "JobModel", "load_job_model",
           "JobData", "resolve_data", "default_model_shape", "eval_transform"]


class BadInput(ValueError):
    """Invalid user input: reported as one line on stderr with exit code 2."""


def fail(prog: str, message: str) -> NoReturn:
    print(f"{prog}: error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(2)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # argparse prints usage too: one line is enough
        fail(self.prog, f"{message} (see --help)")


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the docstring's line breaks and shows defaults that say something."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if ("%(default)" not in text and action.default not in (None, False, argparse.SUPPRESS)
                and action.option_strings):
            text += " (default: %(default)s)"
        return text


def job_parser(name: str, doc: str | None) -> argparse.ArgumentParser:
    return _Parser(prog=f"python -m jobs.{name}", description=doc, formatter_class=_Formatter)


@contextlib.contextmanager
def bad_input_exits(prog: str = "preferred-stimuli") -> Iterator[None]:
    """Turn BadInput / ValueError / FileNotFoundError raised inside into one line + exit 2."""
    try:
        yield
    except (BadInput, ValueError, FileNotFoundError, PermissionError) as e:
        fail(prog, str(e).splitlines()[0] if str(e) else e.__class__.__name__)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def init_ray(num_cpus: int | None = None, **kwargs) -> None:
    """Join the cluster named by RAY_ADDRESS (as under `ray job submit`), else start a local one.

    `address="local"` avoids joining a stale cluster recorded in /tmp/ray by an earlier
    `ray start`; an already initialised Ray (tests, jobs.reproduce) is reused as it is.
    """
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True, **kwargs)
    else:
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False,
                 log_to_driver=True, **kwargs)


def resolve_device(spec: str) -> str:
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
    from pipeline.tables import fs_path

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


def package_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in ("torch", "torchvision", "ray", "pyarrow", "numpy", "s3fs", "fsspec", "pillow",
                 "preferred-stimuli"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    return out


class Stopwatch:
    """Wall time per stage: `with sw("decode"): ...`; `sw.seconds` maps stage -> seconds."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - t0


# ---------------------------------------------------------------------------------------------
# What analyze, ablate and actmax share: the model to study and the images to show it.
# ---------------------------------------------------------------------------------------------

@dataclass
class JobModel:
    model: Any                 # a pipeline.models.ResNet in eval mode
    name: str                  # resnet34, plainnet34, ...
    preprocess: Any            # pipeline.preprocess.Preprocess that maps [0, 1] crops in
    untrained: bool            # True: the seeded stand-in built without --checkpoint
    meta: dict = field(default_factory=dict)   # the checkpoint's extra entries (recipe, ...)

    @property
    def warning(self) -> str | None:
        if not self.untrained:
            return None
        return (f"no --checkpoint: {self.name} is randomly initialised (UNTRAINED, width "
                f"{self.model.width}); its numbers say nothing about a trained network")


def load_job_model(checkpoint: str | None, model: str | None, *, num_classes: int, width: int,
                   seed: int = 0) -> JobModel:
    """The checkpoint's model (a plain state_dict without --model is read as resnet34), or,
    without a checkpoint, `model` (default resnet34) freshly built after torch.manual_seed(seed):
    every job builds the same untrained stand-in, so their outputs describe the same weights."""
    import torch

    from pipeline.checkpoint import CheckpointError, load_checkpoint
    from pipeline.models import build_model, model_names
    from pipeline.preprocess import IMAGENET

    if model is not None and model not in model_names():
        raise BadInput(f"unknown model {model!r}; allowed: {', '.join(model_names())}")
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
    return JobModel(build_model(name, num_classes=num_classes, width=width).eval(), name,
                    IMAGENET, True)


@dataclass
class JobData:
    url: str                   # the source actually read (the demo's val/ without --data)
    demo: bool                 # True: the embedded demo data
    manifest: Any              # pipeline.sources.Manifest (cut to --limit)
    demo_root: str | None = None   # the demo data's root (train/ and val/) when demo


def resolve_data(data: str | None, *, limit: int | None = None,
                 require_labels: bool = False) -> JobData:
    """`--data`, or the embedded demo data's val/ split; cut to the first `limit` images."""
    from pipeline.demo import ensure_demo_data
    from pipeline.sources import Manifest, build_manifest

    demo = data is None
    root = ensure_demo_data().rstrip("/") if demo else None
    url = f"{root}/val" if demo else data
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
    from pipeline.demo import DEMO_WIDTH

    return (max(1, len(data.manifest.classes)), DEMO_WIDTH) if data.demo else (1000, 64)


def eval_transform(resize: int | None, crop: int | None, *, demo: bool, meta: dict | None = None):
    """Flags first, then the checkpoint's own evaluation transform (its training recipe), then
    the demo's (72 / 64) on demo data, else ImageNet's (256 / 224)."""
    from pipeline.demo import demo_transform
    from pipeline.sources import EvalTransform

    recipe = (meta or {}).get("recipe") or {}
    if "eval_resize" in recipe and "eval_crop" in recipe:
        base = EvalTransform(int(recipe["eval_resize"]), int(recipe["eval_crop"]))
    else:
        base = demo_transform() if demo else EvalTransform()
    for name, v in (("--resize", resize), ("--crop", crop)):
        if v is not None and v < 1:
            raise BadInput(f"{name} must be a positive number of pixels, got {v}")
    return EvalTransform(resize=resize or base.resize, crop=crop or base.crop)
