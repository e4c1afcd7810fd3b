"""What jobs share about their inputs besides the study itself (`pipeline.models.study.resolve`,
one call that turns data, checkpoint, model and layers into a Study or a ValueError): the model
names a parser may offer, and the check that --out can be written, made only after every other
input has passed (a job with a bad --model leaves no --out folder behind).
"""
from __future__ import annotations

import uuid

from jobs.runtime.options import BadInput

__all__ = ["check_writable", "model_choices"]


def check_writable(url: str, device: str | None = None) -> None:
    """Fail early (BadInput) when `url` cannot be created or written, or when `device` is
    `cuda` while no cluster is given (no RAY_ADDRESS, no Ray in this process) and this machine
    has no CUDA device: the local Ray that the job would start could not have one either, and
    that is known before anything is written (on a cluster, `resolve_device` checks its GPUs
    once Ray is up). It creates the folder: call it after the inputs are resolved."""
    from jobs.runtime.console import no_cluster
    from pipeline.results.tables import fs_path

    if device == "cuda" and no_cluster():
        import torch

        if not torch.cuda.is_available():
            raise BadInput("--device cuda asked for, but this machine has no CUDA device and "
                           "no cluster is given (RAY_ADDRESS); use auto or cpu")
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


def model_choices() -> list[str]:
    """The supported model names: `choices=model_choices` reads them (and imports torchvision)
    only when a config is checked, never into a usage line."""
    from pipeline.models.zoo import supported_models

    return supported_models()
