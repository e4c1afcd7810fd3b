"""The whole chain in one command: data -> train -> analyze -> ablate -> actmax -> types -> report.

    python -m jobs.reproduce                                   # embedded demo, ./results, ~5 min on 2 CPUs
    python -m jobs.reproduce --preset paper --train-data s3://b/imagenet/train \
        --data s3://b/imagenet/val --out s3://b/results        # the real thing on a GPU cluster
    python -m jobs.reproduce --preset paper --data s3://b/imagenet/val --out s3://b/results \
        --checkpoint-resnet s3://b/r34.pt --checkpoint-plainnet s3://b/p34.pt   # skip training
    python -m jobs.reproduce --seeds 3 --fractions 1ch,0.25,0.5,0.75   # Table 1 over 3 trainings

Every stage writes under --out (local or s3://) and is resumable twice over: a stage whose final
output exists is skipped, and a stage that was interrupted resumes from its own partials (the
analysis and ablation shards, the training checkpoints). Layout of --out (pipeline.layout):

    train/<model>/{model.pt, metrics.parquet, run.json}     (skipped with --checkpoint-*)
    analysis/<model>/{manifest, receptive_fields}.parquet, stimuli/{topk,mean,channels}.parquet
    ablation/<model>/...  and ablation/{ablation,table1,census}.parquet (both models, all seeds)
    actmax/<model>/...    and actmax/actmax.parquet (both models)
    neuron_types/{neuron_types,summary}.parquet
    report/index.html
    run.json                                                  (stages, wall time per stage)
    seeds/<s>/{train,analysis,ablation}/<model>/...           (training seeds s >= 1, --seeds)

With --seeds N every model is trained N times (seeds 0 .. N-1), each run analysed and ablated;
the top-level census and ablation tables hold every seed (train_seed column) and Table 1 is the
mean ± std across them. actmax, neuron types and the report use training seed 0.
"""
from __future__ import annotations

import argparse
import time
from dataclasses import asdict, dataclass
from typing import Callable

import pyarrow as pa

from jobs.common import (BadInput, bad_input_exits, check_writable, init_ray, job_parser, log,
                         package_versions)
from pipeline import layout, tables

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
    seeds: int = 1                       # training seeds per model (0 .. seeds-1)
    noise_seeds: int = 3                 # ablation noise seeds
    fractions: str | None = None         # jobs.ablate --fraction (default: its sweep)
    loader_workers: int | None = None    # jobs.train --loader-workers (default: the job's)
    actmax_layers: str = "pool1,conv3,conv7"   # pool1: the paper's Fig. 6a
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
        for name in ("epochs", "workers", "limit", "seeds", "noise_seeds"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise BadInput(f"--{name.replace('_', '-')} must be >= 1, got {v}")
        if self.loader_workers is not None and self.loader_workers < 0:
            raise BadInput(f"--loader-workers must be >= 0, got {self.loader_workers}")
        if self.fractions is not None:
            from pipeline.ablation import parse_subsets

            try:
                parse_subsets(self.fractions)
            except ValueError as e:
                raise BadInput(str(e).replace("--fraction", "--fractions")) from None
        if self.seeds > 1 and (self.checkpoint_resnet or self.checkpoint_plainnet):
            raise BadInput(f"--seeds {self.seeds} trains {self.seeds} runs per model; "
                           "--checkpoint-resnet/--checkpoint-plainnet give one run: use --seeds 1")

    @classmethod
    def from_args(cls, a: argparse.Namespace) -> "ReproduceConfig":
        stages = tuple(s.strip() for s in a.stages.split(",") if s.strip()) if a.stages else STAGES
        return cls(out=a.out.rstrip("/"), preset=a.preset, train_data=a.train_data, data=a.data,
                   checkpoint_resnet=a.checkpoint_resnet, checkpoint_plainnet=a.checkpoint_plainnet,
                   epochs=a.epochs, workers=a.workers, limit=a.limit, seeds=a.seeds,
                   noise_seeds=a.noise_seeds, fractions=a.fractions,
                   loader_workers=a.loader_workers, actmax_layers=a.actmax_layers, stages=stages)


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
    p.add_argument("--seeds", type=int, default=1, help="training seeds per model (0 .. N-1): "
                   "each is trained, analysed and ablated; Table 1 is mean ± std across them")
    p.add_argument("--noise-seeds", type=int, default=3, help="ablation noise seeds")
    p.add_argument("--fractions", default=None, help="inactive-random subset sizes for "
                   "jobs.ablate --fraction (default: its sweep, 1ch,0.25,0.5,0.75)")
    p.add_argument("--loader-workers", type=int, default=None, help="data-loading processes per "
                   "training worker (jobs.train --loader-workers; default: the job's)")
    p.add_argument("--actmax-layers", default="pool1,conv3,conv7",
                   help="layers for activation maximization")
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
    """One table for both models (and every seed) from the per-model tables."""
    found = [tables.read_table(p) for p in parts if tables.exists(p)]
    if found:
        tables.write_table(pa.concat_tables(found, promote_options="permissive"), url)


def _write_table1(ablation_url: str, census_url: str, url: str) -> None:
    """Table 1 over every model and training seed, from the combined tables."""
    from pipeline.ablation import table1

    if tables.exists(ablation_url) and tables.exists(census_url):
        tables.write_table(table1(tables.read_table(ablation_url),
                                  tables.read_table(census_url)), url)


class Chain:
    def __init__(self, cfg: ReproduceConfig):
        self.cfg = cfg
        self.seconds: dict[str, float] = {}
        self.checkpoints: dict[tuple[str, int], str] = {}   # (model, training seed) -> URL
        self.recipes: dict[tuple[str, int], dict] = {}
        self.gpus = 0

    @property
    def train_seeds(self) -> range:
        return range(self.cfg.seeds)

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

    @staticmethod
    def _name(stage: str, model: str, seed: int) -> str:
        """Stage names as logged: seed 0 keeps the single-seed names (train:resnet34)."""
        return f"{stage}:{model}" + (f":seed{seed}" if seed else "")

    # -- data ----------------------------------------------------------------------------------
    def sources(self) -> tuple[list[str], list[str]]:
        """(training flags, validation flags) for the jobs; the demo data needs none."""
        if self.cfg.data is None:
            return [], []
        train = ["--data", self.cfg.train_data, "--val", self.cfg.data] if self.cfg.train_data else []
        return train, ["--data", self.cfg.data]

    def eval_flags(self, model: str, seed: int = 0) -> list[str]:
        """The checkpoint's own evaluation transform, so analysis sees what training saw."""
        r = self.recipes.get((model, seed))
        if not r:
            return []
        return ["--resize", str(r["eval_resize"]), "--crop", str(r["eval_crop"])]

    # -- stages --------------------------------------------------------------------------------
    def train(self, model: str, seed: int = 0) -> None:
        given = {"resnet34": self.cfg.checkpoint_resnet, "plainnet34": self.cfg.checkpoint_plainnet}
        if given[model]:
            self.checkpoints[(model, seed)] = given[model]
            log(f"[1/{len(STAGES)}] train:{model}: using {given[model]}")
            return
        out = layout.train_dir(self.cfg.out, model, seed)
        self.checkpoints[(model, seed)] = layout.checkpoint(self.cfg.out, model, seed)
        train_flags, _ = self.sources()
        workers = self.cfg.workers or (self.gpus or 2)
        argv = ["--preset", self.cfg.preset, "--model", model, "--out", out,
                "--workers", str(workers), *train_flags]
        if seed:   # seed 0 is jobs.train's default: its command stays the single-seed one
            argv += ["--seed", str(seed)]
        if self.cfg.loader_workers is not None:
            argv += ["--loader-workers", str(self.cfg.loader_workers)]
        if self.gpus:
            argv.append("--use-gpu")
        if self.cfg.epochs:
            argv += ["--epochs", str(self.cfg.epochs)]
        self.stage(self._name("train", model, seed),
                   lambda: tables.exists(self.checkpoints[(model, seed)]),
                   lambda: _run_job("train", argv))

    def load_recipe(self, model: str, seed: int = 0) -> None:
        from pipeline.checkpoint import load_checkpoint

        ckpt = self.checkpoints.get((model, seed))
        if ckpt and tables.exists(ckpt):
            meta = load_checkpoint(ckpt, model).meta
            if "recipe" in meta:
                self.recipes[(model, seed)] = meta["recipe"]

    def model_flags(self, model: str, seed: int = 0) -> list[str]:
        ckpt = self.checkpoints.get((model, seed))
        return ["--checkpoint", ckpt, "--model", model] if ckpt else ["--model", model]

    def analyze(self, model: str, seed: int = 0) -> None:
        out = layout.analysis_dir(self.cfg.out, model, seed)
        _, val = self.sources()
        argv = [*self.model_flags(model, seed), "--out", out, "--layers", "pool1,conv3,conv7",
                "--top-k", "16", *val, *self.eval_flags(model, seed)]
        if self.cfg.limit:
            argv += ["--limit", str(self.cfg.limit)]
        self.stage(self._name("analyze", model, seed),
                   lambda: tables.exists(layout.stimuli(self.cfg.out, model, "channels", seed)),
                   lambda: _run_job("analyze", argv))

    def ablate(self, model: str, seed: int = 0) -> None:
        out = layout.ablation_dir(self.cfg.out, model, seed)
        _, val = self.sources()
        argv = [*self.model_flags(model, seed), "--out", out,
                "--seeds", str(self.cfg.noise_seeds), "--train-seed", str(seed),
                "--from", layout.analysis_dir(self.cfg.out, model, seed), *val,
                *self.eval_flags(model, seed),
                "--task-per", "shard"]  # decode each batch once for all conditions and seeds
        if self.cfg.fractions is not None:
            argv += ["--fraction", self.cfg.fractions]
        if self.cfg.limit:
            argv += ["--limit", str(self.cfg.limit)]
        if self.cfg.preset == "demo":
            argv += ["--shards", "2", "--eval-batch", "64"]
        self.stage(self._name("ablate", model, seed),
                   lambda: tables.exists(tables.join(out, "table1.parquet")),
                   lambda: _run_job("ablate", argv))

    def combine_ablation(self) -> None:
        """ablation/{ablation,census}.parquet over every model and seed, and Table 1 from them."""
        for name in ("ablation", "census"):
            _concat([tables.join(layout.ablation_dir(self.cfg.out, m, s), f"{name}.parquet")
                     for s in self.train_seeds for m in MODELS],
                    layout.combined(self.cfg.out, "ablation", name))
        _write_table1(layout.combined(self.cfg.out, "ablation", "ablation"),
                      layout.combined(self.cfg.out, "ablation", "census"),
                      layout.combined(self.cfg.out, "ablation", "table1"))

    def actmax(self, model: str) -> None:
        out = layout.actmax_dir(self.cfg.out, model)
        argv = [*self.model_flags(model), "--out", out, "--layers", self.cfg.actmax_layers]
        r = self.recipes.get((model, 0))
        if r:
            argv += ["--input-size", str(r["eval_crop"])]
        self.stage(f"actmax:{model}", lambda: tables.exists(tables.join(out, "actmax.parquet")),
                   lambda: _run_job("actmax", argv))

    def neuron_types(self) -> None:
        out = layout.neuron_types_dir(self.cfg.out)
        argv = ["--from", self.cfg.out, "--out", out]
        for model in MODELS:  # given checkpoints live outside --out: name them for the filters
            ckpt = self.checkpoints.get((model, 0))
            if ckpt and not ckpt.startswith(self.cfg.out):
                argv += ["--checkpoint", f"{model}={ckpt}"]
        self.stage("neuron_types", lambda: tables.exists(tables.join(out, "summary.parquet")),
                   lambda: _run_job("neuron_types", argv))

    def report(self) -> None:
        self.stage("report", lambda: False, lambda: _run_job("report", ["--out", self.cfg.out]))

    def run(self) -> None:
        import ray

        self.gpus = int(ray.cluster_resources().get("GPU", 0))
        for seed in self.train_seeds:
            for model in MODELS:
                self.train(model, seed)
                self.load_recipe(model, seed)
        for seed in self.train_seeds:
            for model in MODELS:
                self.analyze(model, seed)
        for seed in self.train_seeds:
            for model in MODELS:
                self.ablate(model, seed)
        self.combine_ablation()
        for model in MODELS:
            self.actmax(model)
        _concat([tables.join(layout.actmax_dir(self.cfg.out, m), "actmax.parquet") for m in MODELS],
                layout.combined(self.cfg.out, "actmax", "actmax"))
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
    tables.write_json(layout.run_json(cfg.out), {
        "job": "reproduce", "config": asdict(cfg), "versions": package_versions(),
        "checkpoints": {m: u for (m, s), u in chain.checkpoints.items() if s == 0},
        "seed_checkpoints": {str(s): {m: u for (m, t), u in chain.checkpoints.items() if t == s}
                             for s in chain.train_seeds},
        "seconds": chain.seconds, "wall_seconds": round(time.perf_counter() - t0, 2),
    })
    log(f"done in {time.perf_counter() - t0:.0f} s: open {layout.report_index(cfg.out)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
