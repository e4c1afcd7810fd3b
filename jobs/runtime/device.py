"""Where a job runs and what its numbers depend on: the cluster's device, a plan of workers, the
fingerprint that guards resume (configuration, code, device, torch/cuDNN, precision).

    device = resolve_device("auto")              # after init_ray(); BadInput for cuda without GPUs
    device = resolve_device("auto", cluster=False)   # this process (jobs.bench: no Ray)
    plan = device.plan(workers, cpus_per_worker=4)
    plan, decode_threads = device.decode_plan(workers)  # actors that decode their own images
    shards = plan.shards(50_000)                 # default shard count: a multiple of the workers
    plan = device.task_plan(gpus=0.5, cpus=2)    # Ray tasks of a fixed share
    fp = fingerprint(cfg, digest(model.state_dict()), device=device)   # cfg: its decides=True options
"""
from __future__ import annotations

import functools
import hashlib
import json
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jobs.runtime.options import BadInput

__all__ = ["Device", "Plan", "SHARD_IMAGES", "resolve_device", "code_version", "digest",
           "fingerprint"]


SHARD_IMAGES = 2000          # images per shard the default aims at (jobs.analyze)


@dataclass(frozen=True)
class Plan:
    workers: int
    resources: dict          # Ray options per task/actor: num_cpus, num_gpus
    threads: int             # torch threads per CPU worker

    def shards(self, images: int, target: int = SHARD_IMAGES) -> int:
        """Default shard count for `images`: a multiple of the workers, about `target` images
        each (never more shards than images). Equal shards in whole rounds end together: no
        worker idles at the tail while another still has a shard to go (25 shards on 8 GPUs
        left 7 of them idle for the 25th); the tail is one shard's spread between workers."""
        rounds = max(1, -(-images // (self.workers * target)))
        return max(1, min(images, self.workers * rounds))


@dataclass(frozen=True)
class Device:
    kind: str                # cpu | cuda
    name: str                # GPU model, or the CPU architecture
    gpus: int
    cpus: int
    cudnn: int | None = None
    node_cpus: int = 0       # CPUs of the largest node (0: unknown, taken as `cpus`)

    def share(self, workers: int) -> int:
        """CPUs each of `workers` may reserve: an even share of the cluster, but never more than
        one node has (a worker asking for more could never be placed, and the job would wait)."""
        return max(1, min(self.cpus // max(1, workers), self.node_cpus or self.cpus))

    def plan(self, workers: int | None = None, *, cpus_per_worker: int = 1) -> Plan:
        """`workers` (None/0: one per GPU, else one per `cpus_per_worker` CPUs) and their share."""
        if self.kind == "cuda":
            return Plan(workers or self.gpus, {"num_gpus": 1, "num_cpus": 1}, 1)
        n = workers or max(1, self.cpus // cpus_per_worker)
        threads = self.share(n)
        return Plan(n, {"num_cpus": threads}, threads)

    def decode_plan(self, workers: int | None = None) -> tuple[Plan, int]:
        """(plan, decode threads) for actors that decode their own images: a CPU actor reserves
        its decode threads plus its torch threads (a quarter of its share decodes); a GPU actor
        reserves up to 8 CPUs for decoding. `workers` None: one per GPU, else one per 4 CPUs."""
        if self.kind == "cuda":
            n = workers or self.gpus
            dec = max(1, min(8, self.share(n)))
            return Plan(n, {"num_gpus": 1, "num_cpus": dec}, 1), dec
        n = workers or max(1, self.cpus // 4)
        share = self.share(n)
        dec = max(1, share // 4)
        return Plan(n, {"num_cpus": share}, max(1, share - dec)), dec

    def task_plan(self, gpus: float, cpus: float) -> Plan:
        """Ray tasks of `gpus` GPUs (0: CPU tasks) and `cpus` CPUs each, as many at once as the
        cluster holds."""
        workers = self.gpus / gpus if gpus else self.cpus / cpus
        return Plan(max(1, int(workers)), {"num_cpus": cpus, "num_gpus": gpus}, 1)

    def report(self, workers: int) -> dict:
        return {"kind": self.kind, "name": self.name, "workers": workers}


def _probe_gpu() -> tuple[str, int | None]:
    import torch

    return torch.cuda.get_device_name(0), torch.backends.cudnn.version()


def resolve_device(spec: str, *, cluster: bool = True) -> Device:
    """The device of `spec` (auto | cpu | cuda): on the Ray cluster (after init_ray; GPUs are
    probed by a task on one), or with `cluster=False` in this process (jobs.bench, no Ray).
    BadInput for an unknown spec or cuda without a GPU; auto picks cuda when there is one."""
    if spec not in ("auto", "cpu", "cuda"):
        raise BadInput(f"invalid device {spec!r}; allowed: auto, cpu, cuda")
    gpus, cpus, node_cpus = _cluster_counts() if cluster else _local_counts()
    where = "the Ray cluster has no GPU" if cluster else "no CUDA device is available"
    if spec == "cuda" and gpus == 0:
        raise BadInput(f"--device cuda asked for, but {where}; use auto or cpu")
    if spec == "cpu" or gpus == 0:
        return Device("cpu", platform.machine() or "cpu", gpus, cpus, node_cpus=node_cpus)
    if cluster:
        import ray

        name, cudnn = ray.get(ray.remote(num_gpus=1, num_cpus=0)(_probe_gpu).remote())
    else:
        name, cudnn = _probe_gpu()
    return Device("cuda", name, gpus, cpus, cudnn, node_cpus)


def _cluster_counts() -> tuple[int, int, int]:
    """(GPUs, CPUs, CPUs of the largest node) of the Ray cluster."""
    import ray

    res = ray.cluster_resources()
    gpus, cpus = int(res.get("GPU", 0)), max(1, int(res.get("CPU", 1)))
    node_cpus = max((int(n.get("Resources", {}).get("CPU", 0)) for n in ray.nodes()
                     if n.get("Alive")), default=cpus)
    return gpus, cpus, node_cpus


def _local_counts() -> tuple[int, int, int]:
    """(GPUs, CPUs, CPUs) this process may use."""
    import torch

    from pipeline.data.decode import default_cpus

    cpus = default_cpus()
    return (torch.cuda.device_count() if torch.cuda.is_available() else 0), cpus, cpus


@functools.lru_cache(maxsize=1)
def code_version() -> str:
    """Hash of the project's Python sources (pipeline/, jobs/): any edit starts afresh."""
    return source_hash(Path(__file__).resolve().parents[2])


def source_hash(root: Path) -> str:
    """Hash of every .py file under root/pipeline and root/jobs, subpackages included."""
    h = hashlib.sha256()
    for d in ("pipeline", "jobs"):
        for p in sorted((root / d).rglob("*.py")):
            h.update(p.relative_to(root).as_posix().encode())
            h.update(p.read_bytes())
    return h.hexdigest()[:16]


def digest(state_dict: dict) -> bytes:
    """Digest of a model's weights (a fingerprint part): names and raw bytes, in name order."""
    h = hashlib.sha256()
    for k in sorted(state_dict):
        h.update(k.encode())
        h.update(state_dict[k].detach().cpu().contiguous().numpy().tobytes())
    return h.digest()


def fingerprint(*parts: Any, device: Device) -> str:
    """Hash of everything that changes a unit's numbers: the parts given (a job's config: the
    options it declares `decides=True`; dicts as JSON; bytes such as a weights digest) plus code,
    device, torch/cuDNN versions and precision."""
    import torch

    from pipeline.models import precision

    # precision.current() reads whichever TF32 API is in force (torch refuses to mix them)
    env = {"code": code_version(), "device": [device.kind, device.name], "torch": torch.__version__,
           "cudnn": device.cudnn, "precision": precision.current()}
    h = hashlib.sha256(json.dumps(env, sort_keys=True).encode())
    for p in parts:
        p = p.decisive() if hasattr(p, "decisive") else p
        h.update(p if isinstance(p, bytes) else json.dumps(p, sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]
