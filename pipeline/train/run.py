"""A training run's bookkeeping around `pipeline.train.recipe`, without Ray: the --init weights, the
check that a rerun into the same folder is the same run, the ZCA sample and its record, the
workers' plan, the console's epoch line and the run report.

    init, width = load_init("torchvision:r18.pth", "resnet18", num_classes=8)
    state = prior_state(f"{out}/_partials/train.json", {"lr": 0.05, "data": data}, out)
    urls = zca_sample(train_manifest, recipe.zca_images, recipe.seed)   # engine units: slices
    state = zca_state(merged_whitening_stats, unit_infos, n_units, fingerprint, recipe.zca_eps)
    plan = worker_plan(recipe, 8, None, gpu=True, sync_bn=True, cluster=ray_cluster_resources)
    write_run(out, "train", run_config(flags, recipe, plan.loaders, True),
              **run_report(last_checkpoint, state, before, (len(train), len(val)), None))

A refusal is a ValueError whose text is one line for the user; `jobs.train` turns it into
BadInput (exit 2) in one place.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

from pipeline.results import tables

__all__ = ["load_init", "prior_state", "model_epochs", "zca_sample", "zca_shard", "zca_state",
           "epoch_line", "history_counts", "run_report", "run_config", "WorkerPlan",
           "worker_plan"]


def load_init(spec: str, model_name: str, num_classes: int) -> tuple[dict[str, Any], int]:
    """(state_dict, base width) of `--init torchvision:PATH`, checked against the model and the
    data's classes; ValueError when it does not fit."""
    from pipeline.models.checkpoint import CheckpointError, load_checkpoint
    from pipeline.models.zoo import n_classes

    path = spec.removeprefix("torchvision:")
    try:
        model = load_checkpoint(path, model_name).model
    except CheckpointError as e:
        raise ValueError(f"--init {path}: {e}") from None
    if n_classes(model) != num_classes:
        raise ValueError(f"--init {path} has {n_classes(model)} classes but the data has "
                         f"{num_classes}")
    return model.state_dict(), model.width


def prior_state(url: str, identity: dict[str, Any], out: str) -> dict[str, Any] | None:
    """The saved state (settings, ZCA) of an earlier run into `out`, None without one;
    ValueError naming the first setting in which that run differs from `identity` (what
    defines a run: jobs.train's options that decide the numbers, as the recipe resolved them)."""
    if not tables.exists(url):
        return None
    state = tables.read_json(url)
    before = state["identity"]
    for k, v in identity.items():
        if before.get(k) != v:
            raise ValueError(f"{out} holds a run with {k}={before.get(k)!r}, not {v!r}; rerun "
                             f"with the same settings (only --epochs may change) or another --out")
    return state


def model_epochs(url: str) -> int:
    """Epochs the model.pt at `url` was trained for (0 without one)."""
    from pipeline.models.checkpoint import load_checkpoint

    return int(load_checkpoint(url).meta.get("epoch", 0)) if tables.exists(url) else 0


def zca_sample(train: Any, images: int, seed: int) -> list[str]:
    """The seeded sample of training images (at most `images`, in manifest order) for the ZCA."""
    import numpy as np

    rng = np.random.default_rng(seed)
    return train.urls(np.sort(rng.choice(len(train), min(len(train), images), False)))


def zca_shard(images: int, cpus: float) -> int:
    """Default images per ZCA unit: two units per CPU, 64..1024 images each (each unit pays a
    worker start-up, importing torch: few large units beat many small)."""
    return min(1024, max(64, math.ceil(images / (2 * cpus))))


def zca_state(total: Any, infos: Iterable[dict[str, Any]], shards: int, fingerprint: str,
              eps: float) -> dict[str, Any]:
    """What a run saves of its ZCA fit: the whitening fitted from the merged `WhiteningStats`,
    and its record (images read and skipped over the units' infos, shards, sums, fingerprint)."""
    infos = list(infos)
    info = {"images": sum(i["images"] for i in infos), "skipped": sum(i["skipped"] for i in infos),
            "shards": shards, "pixels": total.n, "stats": total.state(), "fingerprint": fingerprint}
    return {"preprocess": total.fit(eps=eps).state(), "zca": info}


def epoch_line(row: dict[str, Any], epochs: int) -> str:
    """The console's line for one metrics row."""
    return (f"epoch {row['epoch']}/{epochs} train_loss {row['train_loss']:.4f} val_loss "
            f"{row['val_loss']:.4f} top1 {row['top1']:.3f} top5 {row['top5']:.3f} lr "
            f"{row['lr']:.4g} {row['seconds']:.1f}s {row['images_per_s']:.0f} img/s")


def history_counts(history: Sequence[dict[str, Any]], after: int) -> dict[str, Any]:
    """Run-report counts of the epochs after `after` (those this run trained)."""
    new = [h for h in history if h["epoch"] > after]
    return {"images_read": sum(h["train_images"] + h["val_images"] for h in new),
            "images_skipped": sum(h["skipped"] for h in new), "epochs_trained": len(new),
            "images_trained": sum(h["train_images"] for h in new),
            "skipped_per_epoch": [h["skipped"] for h in new],
            "images_per_s_mean": (math.fsum(h["images_per_s"] for h in new) / len(new)
                                  if new else None)}


def run_report(last: dict[str, Any], state: dict[str, Any], before: int, sizes: tuple[int, int],
               zca_counts: dict[str, int] | None) -> dict[str, Any]:
    """`jobs.runtime.runinfo.write_run`'s fingerprint, counts, work, unit, stage_work and details of a
    run that trained from epoch `before` to the last checkpoint's (`last`). `state`: the run's
    saved state (ZCA record, classes); `sizes`: training and validation images; `zca_counts`:
    the engine's unit counts when this run fitted the ZCA, None when it reused an earlier fit."""
    history, zca = list(last["history"]), state["zca"]
    h = history_counts(history, before)
    counts = {**(zca_counts or {}), "train_images": sizes[0], "val_images": sizes[1],
              "classes": len(state["classes"]), "epochs": last["epoch"], "zca_images": zca["images"],
              "zca_skipped": zca["skipped"], "zca_shards": zca["shards"],
              **{k: h[k] for k in ("images_read", "images_skipped", "epochs_trained",
                                   "skipped_per_epoch")}}
    return {"fingerprint": zca.get("fingerprint", ""), "counts": counts,
            "work": h["images_trained"], "unit": "images",
            "stage_work": {"zca": zca["images"] if zca_counts is not None else 0},
            "details": {"model": last["recipe"]["model"],
                        "final": history[-1] if history else {},
                        "train_images_per_s_mean": h["images_per_s_mean"]}}

def run_config(flags: dict[str, Any], recipe: Any, loaders: int, sync_bn: bool) -> dict[str, Any]:
    """run.json's config: the flags and what they resolved to."""
    return {**flags, "recipe": recipe.as_dict(), "width": recipe.width, "loader_workers": loaders,
            "sync_bn": sync_bn, "seed": recipe.seed, "precision": recipe.precision,
            "augment": recipe.augment}


@dataclass(frozen=True)
class WorkerPlan:
    """How the training workers run, and what the console says about it."""

    loaders: int                      # DataLoader processes per worker
    resources: dict[str, float]       # Ray resources per worker
    summary: str                      # one line on the resolved settings
    shortfall: str | None             # a warning when the cluster has less than all workers need


def worker_plan(recipe: Any, workers: int, loaders: int | None, gpu: bool, sync_bn: bool,
                cluster: dict[str, float]) -> WorkerPlan:
    """`workers` DDP ranks, each on a CPU plus one per loader process (default: the preset's,
    `default_loader_workers`) and a GPU with `gpu`. Too little in the `cluster` is not an error:
    an autoscaling cluster adds nodes (a fixed one waits forever)."""
    from pipeline.train.recipe import default_loader_workers

    if loaders is None:
        loaders = default_loader_workers(recipe, workers, cluster.get("CPU", 1))
    per_worker = {"CPU": 1 + loaders, **({"GPU": 1} if gpu else {})}
    short = [f"{n * workers:g} {k}s (cluster has {cluster.get(k, 0):g})"
             for k, n in per_worker.items() if cluster.get(k, 0) < n * workers]
    r = recipe
    summary = (f"{r.model} ({r.name} preset): {workers} workers x {loaders} loader processes, "
               f"global batch {r.batch_size}, {r.precision}, augment {r.augment}, BatchNorm "
               f"{'synchronised' if sync_bn else 'per worker'}, seed {r.seed}")
    return WorkerPlan(loaders, per_worker, summary, f"training needs {', '.join(short)}; it "
                      f"waits until the cluster has them" if short else None)
