"""The Ray Train side of jobs.train: what each TorchTrainer worker runs, and the trainer around it.

`fit(cfg, ...)` starts a TorchTrainer over `cfg.workers` DDP ranks; each runs `train_loop`:
restore the last Ray Train checkpoint (if any), build pipeline.train.recipe.Training, then per epoch
report a checkpoint (rank 0) and rewrite metrics.parquet, with one console line through
jobs.runtime.console.relay. The computation itself is pipeline.train.recipe's; this module is wiring only.
"""
from __future__ import annotations

import os
import tempfile
from typing import Any

import torch

from jobs.runtime.console import Console, relay
from jobs.runtime.options import JobFailed
from pipeline.results import tables
from pipeline.train import run as trainrun
from pipeline.data.preprocess import preprocess_from_state
from pipeline.results import catalog
from pipeline.train.recipe import Training, arrow_storage, configure_torch, make_loaders, metrics_table

CHECKPOINT_FILE = "checkpoint.pt"
RUN_NAME = "checkpoints"            # Ray Train's run folder under --out


def _checkpoint(ckpt: Any) -> dict | None:
    """The checkpoint.pt in a Ray Train checkpoint (None: no checkpoint)."""
    if ckpt is None:
        return None
    with ckpt.as_directory() as d:
        return torch.load(os.path.join(d, CHECKPOINT_FILE), map_location="cpu", weights_only=True)


def train_loop(lc: dict[str, Any]) -> None:
    """Per-worker function of TorchTrainer: wiring only; pipeline.train.recipe.Training does the work."""
    import ray
    import ray.train
    import ray.train.torch

    cfg = lc["cfg"]                                   # jobs.train.TrainConfig
    r, ctx = cfg.recipe, ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    configure_torch(device, r.precision, 1 + lc["loader_workers"])
    restored = _checkpoint(ray.train.get_checkpoint())
    t = Training.start(r, lc["classes"], preprocess_from_state(lc["preprocess"]), device,
                       init=ray.get(lc["init"]) if lc["init"] is not None else None,
                       restored=restored, sync_bn=cfg.sync_bn_on)
    t.model = ray.train.torch.prepare_model(t.model)        # DDP
    data = make_loaders(ray.get(lc["train"]), ray.get(lc["val"]), r, tables.read_bytes, world,
                        rank, lc["loader_workers"], pin_memory=device.type == "cuda")
    if rank == 0 and restored is not None:
        lc["echo"].put_nowait(f"resuming after epoch {t.epoch}")
        tables.write(catalog.METRICS, metrics_table(t.history), cfg.out)
    for epoch in range(t.epoch + 1, r.epochs + 1):
        row = t.run_epoch(epoch, data, world, rank)
        with tempfile.TemporaryDirectory() as tmp:
            if rank == 0:
                t.save(os.path.join(tmp, CHECKPOINT_FILE))
            ray.train.report(row, checkpoint=ray.train.Checkpoint.from_directory(tmp)
                             if rank == 0 else None)
        if rank == 0:
            tables.write(catalog.METRICS, metrics_table(t.history), cfg.out)
            lc["echo"].put_nowait(trainrun.epoch_line(row, r.epochs))


def fit(cfg: Any, train: Any, val: Any, state: dict, init: dict | None,
        con: Console) -> tuple[dict, int]:
    """The TorchTrainer run of `train_loop` (this module's: tests hand in a wrapper through
    that name); returns (the last checkpoint's contents, loader processes)."""
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    plan = trainrun.worker_plan(cfg.recipe, cfg.workers, cfg.loader_workers, cfg.use_gpu,
                                cfg.sync_bn_on, ray.cluster_resources())
    con.info(plan.summary)
    if plan.shortfall:
        con.warn(plan.shortfall)
    # Ray Train's Prometheus metrics want the dashboard's agent, which init_ray does not start.
    os.environ.setdefault("RAY_TRAIN_METRICS_ENABLED", "0")
    storage, fs = arrow_storage(cfg.out, dict(os.environ))
    with relay(con) as echo:
        trainer = TorchTrainer(train_loop, train_loop_config={
            "cfg": cfg, "train": ray.put(train), "val": ray.put(val), "classes": state["classes"],
            "preprocess": state["preprocess"], "loader_workers": plan.loaders, "echo": echo,
            "init": ray.put(init) if init is not None else None},
            scaling_config=ray.train.ScalingConfig(num_workers=cfg.workers, use_gpu=cfg.use_gpu,
                                                   resources_per_worker=plan.resources),
            run_config=ray.train.RunConfig(
                name=RUN_NAME, storage_path=storage, storage_filesystem=fs,
                checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.keep_checkpoints),
                failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures)))
        result = trainer.fit()
    if result.checkpoint is None:
        raise JobFailed("training ended without a checkpoint")
    return _checkpoint(result.checkpoint), plan.loaders
