"""The whole chain in one command: data -> train -> analyze -> ablate -> actmax -> types -> report.

    python -m jobs.reproduce                                   # embedded demo, ./results, ~5 min on 2 CPUs
    python -m jobs.reproduce --preset paper --train-data s3://b/imagenet/train \
        --data s3://b/imagenet/val --out s3://b/results        # the real thing on a GPU cluster
    python -m jobs.reproduce --preset paper --data s3://b/imagenet/val --out s3://b/results \
        --checkpoint-resnet s3://b/r34.pt --checkpoint-plainnet s3://b/p34.pt   # skip training

Every stage writes under --out (local or s3://) and is resumable twice over: a stage whose final
output exists is skipped, and a stage that was interrupted resumes from its own partials (the
analysis and ablation shards, the training checkpoints). Layout of --out:

    train/<model>/{model.pt, metrics.parquet, run.json}     (skipped with --checkpoint-*)
    analysis/<model>/{manifest, receptive_fields}.parquet, stimuli/{topk,mean,channels}.parquet
    ablation/<model>/...  and ablation/{ablation,table1,census}.parquet (both models)
    actmax/<model>/...    and actmax/actmax.parquet (both models)
    neuron_types/{neuron_types,summary}.parquet
    report/index.html
    run.json                                                  (stages, wall time per stage)
"""
from __future__ import annotations

import argparse
import time
from dataclasses import asdict, dataclass
from typing import Callable

import pyarrow as pa

from jobs.common import (BadInput, bad_input_exits, check_writable, init_ray, job_parser, log,
                         package_versions)
from pipeline import tables

PROG = "python -m jobs.reproduce"
MODELS = ("resnet34", "plainnet34")
STAGES = ("train", "analyze", "ablate", "actmax", "neuron_types", "report")


@dataclass(frozen=True)
class ReproduceConfig:
    out: str = "./results"               # everything lands under here (local or s3://)
    preset: str = "demo"                 # demo (embedded data) | paper (ImageNet on a cluster)
    train_data: str | None = None        # training images (class folders); demo: embedded
    data: str | None = None              # validation images (any source layout); demo: embedded
    checkpoint_resnet: str | None = None    # skip training resnet34 and use this checkpoint
    checkpoint_plainnet: str | None = None  # same for plainnet34
    epochs: int | None = None            # override the preset's epochs
    workers: int | None = None           # training workers (default: 2 on CPU, one per GPU)
    limit: int | None = None             # analyse / ablate only the first N validation images
    seeds: int = 3                       # ablation noise seeds
    actmax_layers: str = "conv3,conv7"
    stages: tuple[str, ...] = STAGES

    def __post_init__(self) -> None:
        if self.preset not in ("demo", "paper"):
            raise BadInput(f"invalid preset {self.preset!r}; allowed: demo, paper")
        if self.preset == "paper" and self.data is None:
            raise BadInput("--preset paper needs --data (the ImageNet validation set URL)")
        needs_training = "train" in self.stages and not (
            self.checkpoint_resnet and self.checkpoint_plainnet)
        if self.preset == "paper" and needs_training and self.train_data is None:
            raise BadInput("--preset paper needs --train-data, or --checkpoint-resnet and "
                           "--checkpoint-plainnet to skip training")
        if (self.train_data is None) != (self.data is None) and self.preset == "demo":
            raise BadInput("give both --train-data and --data, or neither for the demo data")
        bad = [s for s in self.stages if s not in STAGES]
        if bad:
            raise BadInput(f"unknown stage {bad[0]!r}; allowed: {', '.join(STAGES)}")
        for name in ("epochs", "workers", "limit", "seeds"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise BadInput(f"--{name} must be >= 1, got {v}")

    @classmethod
    def from_args(cls, a: argparse.Namespace) -> "ReproduceConfig":
        stages = tuple(s.strip() for s in a.stages.split(",") if s.strip()) if a.stages else STAGES
        return cls(out=a.out.rstrip("/"), preset=a.preset, train_data=a.train_data, data=a.data,
                   checkpoint_resnet=a.checkpoint_resnet, checkpoint_plainnet=a.checkpoint_plainnet,
                   epochs=a.epochs, workers=a.workers, limit=a.limit, seeds=a.seeds,
                   actmax_layers=a.actmax_layers, stages=stages)


def build_parser() -> argparse.ArgumentParser:
    p = job_parser("reproduce", __doc__)
    p.add_argument("--out", default="./results", help="output root (local path or s3://...)")
    p.add_argument("--preset", default="demo", help="demo (embedded data, small models) or paper")
    p.add_argument("--train-data", default=None, help="training images (class folders, s3:// ok)")
    p.add_argument("--data", default=None, help="validation images (ImageNet val layouts, class "
                   "folders or a .parquet manifest)")
    p.add_argument("--checkpoint-resnet", default=None, help="use this resnet34 checkpoint "
                   "(ours or a torchvision state_dict) instead of training")
    p.add_argument("--checkpoint-plainnet", default=None, help="use this plainnet34 checkpoint "
                   "instead of training")
    p.add_argument("--epochs", type=int, default=None, help="training epochs (default: preset's)")
    p.add_argument("--workers", type=int, default=None, help="training workers (default: 2 on "
                   "CPU, one per GPU of the cluster)")
    p.add_argument("--limit", type=int, default=None, help="analyse and ablate only the first N "
                   "validation images")
    p.add_argument("--seeds", type=int, default=3, help="ablation noise seeds")
    p.add_argument("--actmax-layers", default="conv3,conv7", help="layers for activation maximization")
    p.add_argument("--stages", default=None, help=f"comma list of stages to run (default: all: "
                   f"{','.join(STAGES)})")
    return p


def _run_job(name: str, argv: list[str]) -> None:
    """Run `jobs.<name>.main(argv)` in this process (sharing its Ray); a failure stops the chain."""
    import importlib

    module = importlib.import_module(f"jobs.{name}")
    log(f"  $ python -m jobs.{name} {' '.join(argv)}")
    rc = module.main(argv)
    if rc not in (None, 0):
        raise SystemExit(rc)


def _concat(parts: list[str], url: str) -> None:
    """One table for both models from the per-model tables (for readers and the report)."""
    found = [tables.read_table(p) for p in parts if tables.exists(p)]
    if found:
        tables.write_table(pa.concat_tables(found, promote_options="permissive"), url)


class Chain:
    def __init__(self, cfg: ReproduceConfig):
        self.cfg = cfg
        self.seconds: dict[str, float] = {}
        self.checkpoints: dict[str, str] = {}
        self.recipes: dict[str, dict] = {}
        self.gpus = 0

    def url(self, *parts: str) -> str:
        return tables.join(self.cfg.out, *parts)

    def stage(self, name: str, done: Callable[[], bool], body: Callable[[], None]) -> None:
        i = STAGES.index(name.split(":")[0]) + 1
        if name.split(":")[0] not in self.cfg.stages:
            log(f"[{i}/{len(STAGES)}] {name}: not asked for, skipped")
            return
        if done():
            log(f"[{i}/{len(STAGES)}] {name}: already complete under {self.cfg.out}, skipped")
            return
        log(f"[{i}/{len(STAGES)}] {name} ...")
        t0 = time.perf_counter()
        body()
        self.seconds[name] = round(time.perf_counter() - t0, 2)
        log(f"[{i}/{len(STAGES)}] {name} done in {self.seconds[name]:.1f} s")

    # -- data ----------------------------------------------------------------------------------
    def sources(self) -> tuple[list[str], list[str]]:
        """(training flags, validation flags) for the jobs; the demo data needs none."""
        if self.cfg.data is None:
            return [], []
        train = ["--data", self.cfg.train_data, "--val", self.cfg.data] if self.cfg.train_data else []
        return train, ["--data", self.cfg.data]

    def eval_flags(self, model: str) -> list[str]:
        """The checkpoint's own evaluation transform, so analysis sees what training saw."""
        r = self.recipes.get(model)
        if not r:
            return []
        return ["--resize", str(r["eval_resize"]), "--crop", str(r["eval_crop"])]

    # -- stages --------------------------------------------------------------------------------
    def train(self, model: str) -> None:
        given = {"resnet34": self.cfg.checkpoint_resnet, "plainnet34": self.cfg.checkpoint_plainnet}
        if given[model]:
            self.checkpoints[model] = given[model]
            log(f"[1/{len(STAGES)}] train:{model}: using {given[model]}")
            return
        out = self.url("train", model)
        self.checkpoints[model] = tables.join(out, "model.pt")
        train_flags, _ = self.sources()
        workers = self.cfg.workers or (self.gpus or 2)
        argv = ["--preset", self.cfg.preset, "--model", model, "--out", out,
                "--workers", str(workers), *train_flags]
        if self.gpus:
            argv.append("--use-gpu")
        if self.cfg.epochs:
            argv += ["--epochs", str(self.cfg.epochs)]
        self.stage(f"train:{model}", lambda: tables.exists(self.checkpoints[model]),
                   lambda: _run_job("train", argv))

    def load_recipe(self, model: str) -> None:
        from pipeline.checkpoint import load_checkpoint

        ckpt = self.checkpoints.get(model)
        if ckpt and tables.exists(ckpt):
            meta = load_checkpoint(ckpt, model).meta
            if "recipe" in meta:
                self.recipes[model] = meta["recipe"]

    def model_flags(self, model: str) -> list[str]:
        ckpt = self.checkpoints.get(model)
        return ["--checkpoint", ckpt, "--model", model] if ckpt else ["--model", model]

    def analyze(self, model: str) -> None:
        out = self.url("analysis", model)
        _, val = self.sources()
        argv = [*self.model_flags(model), "--out", out, "--layers", "pool1,conv3,conv7",
                "--top-k", "16", *val, *self.eval_flags(model)]
        if self.cfg.limit:
            argv += ["--limit", str(self.cfg.limit)]
        self.stage(f"analyze:{model}",
                   lambda: tables.exists(tables.join(out, "stimuli", "channels.parquet")),
                   lambda: _run_job("analyze", argv))

    def ablate(self, model: str) -> None:
        out = self.url("ablation", model)
        _, val = self.sources()
        argv = [*self.model_flags(model), "--out", out, "--seeds", str(self.cfg.seeds),
                "--from", self.url("analysis", model), *val, *self.eval_flags(model),
                "--task-per", "shard"]  # decode each batch once for all conditions and seeds
        if self.cfg.limit:
            argv += ["--limit", str(self.cfg.limit)]
        if self.cfg.preset == "demo":
            argv += ["--shards", "2", "--eval-batch", "64"]
        self.stage(f"ablate:{model}", lambda: tables.exists(tables.join(out, "table1.parquet")),
                   lambda: _run_job("ablate", argv))

    def actmax(self, model: str) -> None:
        out = self.url("actmax", model)
        argv = [*self.model_flags(model), "--out", out, "--layers", self.cfg.actmax_layers]
        r = self.recipes.get(model)
        if r:
            argv += ["--input-size", str(r["eval_crop"])]
        self.stage(f"actmax:{model}", lambda: tables.exists(tables.join(out, "actmax.parquet")),
                   lambda: _run_job("actmax", argv))

    def neuron_types(self) -> None:
        out = self.url("neuron_types")
        argv = ["--from", self.cfg.out, "--out", out]
        for model in MODELS:  # given checkpoints live outside --out: name them for the filters
            if self.checkpoints.get(model) and not self.checkpoints[model].startswith(self.cfg.out):
                argv += ["--checkpoint", f"{model}={self.checkpoints[model]}"]
        self.stage("neuron_types", lambda: tables.exists(tables.join(out, "summary.parquet")),
                   lambda: _run_job("neuron_types", argv))

    def report(self) -> None:
        self.stage("report", lambda: False, lambda: _run_job("report", ["--out", self.cfg.out]))

    def run(self) -> None:
        import ray

        self.gpus = int(ray.cluster_resources().get("GPU", 0))
        for model in MODELS:
            self.train(model)
            self.load_recipe(model)
        for model in MODELS:
            self.analyze(model)
        for model in MODELS:
            self.ablate(model)
        for name in ("ablation", "table1", "census"):
            _concat([self.url("ablation", m, f"{name}.parquet") for m in MODELS],
                    self.url("ablation", f"{name}.parquet"))
        for model in MODELS:
            self.actmax(model)
        _concat([self.url("actmax", m, "actmax.parquet") for m in MODELS],
                self.url("actmax", "actmax.parquet"))
        self.neuron_types()
        self.report()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    t0 = time.perf_counter()
    with bad_input_exits(PROG):
        cfg = ReproduceConfig.from_args(args)
        check_writable(cfg.out)
    init_ray()
    chain = Chain(cfg)
    chain.run()
    tables.write_json(chain.url("run.json"), {
        "job": "reproduce", "config": asdict(cfg), "versions": package_versions(),
        "checkpoints": chain.checkpoints, "seconds": chain.seconds,
        "wall_seconds": round(time.perf_counter() - t0, 2),
    })
    log(f"done in {time.perf_counter() - t0:.0f} s: open {chain.url('report', 'index.html')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
