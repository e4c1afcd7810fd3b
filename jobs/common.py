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
from typing import Iterator, NoReturn

__all__ = ["BadInput", "fail", "job_parser", "bad_input_exits", "init_ray", "resolve_device",
           "check_writable", "package_versions", "Stopwatch", "log"]


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
