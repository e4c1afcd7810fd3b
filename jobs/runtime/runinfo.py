"""One run report: every job's `run.json` has the same top-level shape, written by `write_run`.

    {"job": "actmax",
     "config": {...},                        # the job's Options, as given
     "versions": {"python": ..., "torch": ..., "ray": ..., "cudnn": ...},
     "device": {"kind": "cuda", "name": "NVIDIA H200", "workers": 8},
     "fingerprint": "3f2a...",               # names the _partials/ folder this run resumed from
     "counts": {"units": 8, "units_computed": 6, "units_resumed": 2, "retries": 0,
                "images_read": 0, "images_skipped": 0, ...job counts: "channels": 128},
     "skipped": [{"image_index": 7, "path": "...", "reason": "..."}],
     "seconds": {"setup": 1.2, "optimize": 30.1, "write": 0.4, "total": 31.9},
     "throughput": {"unit": "channels", "optimize": 4.25, "total": 4.01},
     "warnings": ["no --checkpoint: ..."],
     "details": {...}}                       # what only this job reports (model, input size...)

`throughput` is work items per second of each stage's wall time (the item is the job's unit of
progress: images for analyze/ablate, channels for actmax; a stage counted in its own unit is
named under `throughput["units"]`, e.g. analyze's merge in partials and patches in PNGs).
Readers find the same quantity under the same key in every job (never `wall`, `wall_s` or
`total` elsewhere).

`Markers.of(*runs)` reads what the units' markers of jobs.runtime.engine runs say together (unit
counts, skipped images, the workers' precision flags) for jobs whose units report those.
"""
from __future__ import annotations

import importlib.metadata as md
import platform
from dataclasses import dataclass
from typing import Any

__all__ = ["package_versions", "run_report", "write_run", "Markers", "TOP_LEVEL", "COUNTS",
           "SKIPPED"]

TOP_LEVEL = ("job", "config", "versions", "device", "fingerprint", "counts", "skipped", "seconds",
             "throughput", "warnings", "details")
COUNTS = ("units", "units_computed", "units_resumed", "retries", "images_read", "images_skipped")
SKIPPED = ("image_index", "path", "reason")      # a `skipped` row; markers hold it as a list


def package_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in ("torch", "torchvision", "ray", "pyarrow", "numpy", "s3fs", "fsspec", "pillow",
                 "preferred-stimuli"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    return out


def run_report(job: str, config: dict, *, device: dict | None = None, fingerprint: str = "",
               counts: dict | None = None, skipped: list[dict] | None = None,
               seconds: dict[str, float] | None = None, total_seconds: float = 0.0,
               work: int = 0, unit: str = "items",
               stage_work: dict[str, int | tuple[int, str]] | None = None,
               warnings: list[str] | None = None, details: dict | None = None) -> dict:
    """The run.json dictionary. `work` items were handled in total (throughput over the whole
    run); `stage_work` overrides it per stage (default: every stage handled `work` items), as
    a count of `unit` or as (count, another unit) for a stage whose work is counted otherwise
    (a merge in partials, a rendering in patches): `throughput["units"]` names those."""
    seconds = {k: round(v, 3) for k, v in (seconds or {}).items()}
    seconds["total"] = round(total_seconds, 3)
    stage_work = stage_work or {}
    own = {k: w[1] for k, w in stage_work.items() if isinstance(w, tuple)}
    per_stage = {k: work for k in seconds} | {k: w[0] if isinstance(w, tuple) else w
                                              for k, w in stage_work.items()}
    throughput: dict[str, Any] = {"unit": unit} | ({"units": own} if own else {})
    throughput.update({k: round(per_stage[k] / max(v, 1e-9), 3) for k, v in seconds.items()})
    skipped = list(skipped or [])
    full_counts = {k: 0 for k in COUNTS} | {"images_skipped": len(skipped)} | (counts or {})
    return {"job": job, "config": config, "versions": package_versions(),
            "device": device or {"kind": "cpu", "name": platform.machine(), "workers": 1},
            "fingerprint": fingerprint, "counts": full_counts, "skipped": skipped,
            "seconds": seconds, "throughput": throughput, "warnings": list(warnings or []),
            "details": details or {}}


def write_run(out: str, job: str, config: dict, **kwargs: Any) -> dict:
    """Write `<out>/run.json` (atomically, through pipeline.results.tables) and return it."""
    from pipeline.results.tables import join, write_json

    info = run_report(job, config, **kwargs)
    write_json(join(out, "run.json"), info)
    return info


@dataclass(frozen=True)
class Markers:
    """The marker infos of one or more jobs.runtime.engine runs (RunStats), read together. Units
    that decode images put `skipped` ([image_index, path, reason] lists) and `precision` (the
    flags pipeline.models.precision.strict_fp32 saw) in their marker."""

    infos: list[dict]               # every unit's marker info, run after run, in unit order
    counts: dict[str, int]          # units, units_computed, units_resumed, retries: all runs

    @classmethod
    def of(cls, *runs: Any) -> "Markers":
        infos = [r.infos[name] for r in runs for name in r.names]
        counts = {k: sum(r.counts()[k] for r in runs) for k in runs[0].counts()}
        return cls(infos, counts)

    def skipped(self) -> list[dict]:
        """run.json's `skipped` rows: each image once (several units may skip the same image),
        by image index."""
        once = {s[0]: s for i in self.infos for s in i["skipped"]}
        return [dict(zip(SKIPPED, once[k])) for k in sorted(once)]

    def precision(self) -> dict[str, Any]:
        """The precision setting the units asked for and the distinct flags they ran under
        (`workers`, in unit order): one entry when every worker honoured it."""
        from pipeline.models.precision import setting

        flags = [i["precision"] for i in self.infos]
        return {**setting(), "workers": [f for k, f in enumerate(flags) if f not in flags[:k]]}
