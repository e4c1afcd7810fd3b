"""What jobs share about their inputs besides the study itself (`pipeline.models.study.resolve`,
one call that turns data, checkpoint, model and layers into a Study or a ValueError): the model
names a parser may offer, and the check that --out can be written, made only after every other
input has passed (a job with a bad --model leaves no --out folder behind).
"""
from __future__ import annotations

import uuid

from jobs.runtime.options import BadInput

__all__ = ["check_writable", "model_choices"]


def check_writable(url: str) -> None:
    """Fail early (BadInput) when `url` cannot be created or written. It creates the folder:
    call it after the inputs are resolved."""
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


def model_choices() -> list[str]:
    """The supported model names: `choices=model_choices` reads them (and imports torchvision)
    only when a config is checked, never into a usage line."""
    from pipeline.models.zoo import supported_models

    return supported_models()
