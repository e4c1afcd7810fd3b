"""The whole chain in one command: data -> train -> analyze -> ablate -> actmax -> types -> compare
-> report.

    python -m jobs.reproduce                    # embedded demo, ./results, ~5 min on 2 CPUs
    python -m jobs.reproduce --preset paper --train-data s3://b/imagenet/train \\
        --data s3://b/imagenet/val --out s3://b/results   # the real thing on a GPU cluster
    python -m jobs.reproduce --seeds 3 --fractions 1ch,0.25,0.5,0.75   # Table 1 over 3 trainings
    python -m jobs.reproduce --models resnet50,vgg16 --checkpoints resnet50=r50.pt,vgg16=v16.pt \\
        --layers pool1,conv7,vgg16=features.4,features.28 --ablate-layer vgg16=features.4

Each stage builds its job's Config (`jobs.<job>.chained`, from jobs/chain.py's context) and calls
its `run` in this process (one Ray; the job's console nested in the chain's: its warnings,
epochs and long progress lines show) unless its final output exists under --out (local or
s3://); an interrupted stage resumes from its own partials. Every stage's Config is built once
before anything runs, so a bad option stops the chain before --out exists. The command that
runs a stage alone goes to run.json (details.commands), and to the console when it fails. --out has
pipeline/results/layout.py's layout; training seeds s >= 1 (--seeds) go under seeds/<s>/, the combined
census, ablation and Table 1 cover every seed, actmax, neuron types, the comparison of the
first two models (jobs.compare: A×B, A×A and B×B) and the report use seed 0.
Per-model options take a comma list in which `MODEL=` starts that model's items (items before
any `MODEL=` apply to every model). Ray's log: <out>/_logs/ray.log; commands run: run.json.
"""
from __future__ import annotations

import importlib
import sys
from dataclasses import dataclass
from typing import Sequence

from jobs import chain
from jobs.chain import PAPER_LAYERS, PAPER_MODELS, STAGES, Layers, items, stage_name
from jobs.runtime.console import Console, init_ray, log
from jobs.runtime.inputs import check_writable
from jobs.runtime.options import (BadInput, JobFailed, Options, at_least, bad_input,
                                  first_line_of, opt, run_cli)
from jobs.runtime.runinfo import write_run
from pipeline.results import layout, tables

PROG = "python -m jobs.reproduce"


@dataclass(frozen=True)
class ReproduceConfig(Options):
    out: str = opt("./results", "output root, local path or s3://... (default: ./results)",
                   parse=lambda v: v.rstrip("/") or v)
    preset: str = opt("demo", "demo (embedded data, small models) or paper")
    models: tuple[str, ...] = opt(PAPER_MODELS, "the models compared, comma list; any of "
                                  "pipeline.models.zoo.supported_models()", parse=items)
    train_data: str | None = opt(None, "training images (class folders, s3:// ok)")
    data: str | None = opt(None, "validation images (any layout of docs/data.md)")
    checkpoint_resnet: str | None = opt(None, "resnet34 checkpoint (ours or torchvision's) to "
                                        "use instead of training")
    checkpoint_plainnet: str | None = opt(None, "plainnet34 checkpoint to use instead of training")
    checkpoints: str | None = opt(None, "MODEL=URL,...: checkpoints instead of training, any model")
    epochs: int | None = opt(None, "training epochs (default: preset's)", check=at_least(1))
    workers: int | None = opt(None, "training workers (default: 2 on CPU, one per GPU)",
                              check=at_least(1))
    limit: int | None = opt(None, "analyse and ablate only the first N images", check=at_least(1))
    seeds: int = opt(1, "training seeds per model (0 .. N-1), each trained, analysed and ablated; "
                     "Table 1 is mean ± std across them (default: 1)", check=at_least(1))
    noise_seeds: int = opt(3, "ablation noise seeds", check=at_least(1))
    fractions: str | None = opt(None, "jobs.ablate --fraction (default: its 1ch,0.25,0.5,0.75)")
    loader_workers: int | None = opt(None, "jobs.train --loader-workers (default: the job's)",
                                     check=at_least(0))
    layers: str | None = opt(None, f"analysis layers, [MODEL=]LAYER,... (default: {PAPER_LAYERS} "
                             "for the ResNet family; required for other models)")
    actmax_layers: str | None = opt(None, "actmax layers, [MODEL=]LAYER,... (default: the "
                                    "analysis layers)")
    ablate_layer: str | None = opt(None, "[MODEL=]LAYER: the layer whose inactive channels are "
                                   "noised, one of the analysis layers (default: pool1 for the "
                                   "ResNet family; required for other models)")
    stages: tuple[str, ...] = opt(STAGES, "stages to run, comma list (default: all)",
                                  parse=items)

    def check(self) -> None:
        """jobs.chain's checks; their ValueError is the user's input: BadInput."""
        with bad_input():
            chain.check(self)

    def given_checkpoints(self) -> dict[str, str]:
        """model -> checkpoint URL given instead of training."""
        return chain.given_checkpoints(self)

    def layer_plan(self) -> dict[str, Layers]:
        """model -> Layers(analysis, actmax, ablate: None for jobs.ablate's pool1)."""
        return chain.layer_plan(self)


def _concat(parts: list[str], url: str) -> None:
    """One table for every model (and every seed) from the per-model tables."""
    import pyarrow as pa

    found = [tables.read_table(p) for p in parts if tables.exists(p)]
    if found:
        tables.write_table(pa.concat_tables(found, promote_options="permissive"), url)


class Chain:
    """The links in order; a stage runs its job's Config unless its final output exists."""

    def __init__(self, cfg: ReproduceConfig, con: Console) -> None:
        self.cfg, self.con, self.out = cfg, con, cfg.out
        self.ctx = chain.Context(cfg, cfg.layer_plan(), cfg.given_checkpoints())
        self.seconds: dict[str, float] = {}
        self.commands: dict[str, str] = {}            # stage -> the command that runs it alone
        self.skipped: list[str] = []
        # what the chain does after a stage of a model / after every stage of a link
        self.after_stage = {"train": self.record_checkpoint}
        self.after_link = {"ablate": self.combine_ablation, "actmax": self.combine_actmax}

    @property
    def checkpoints(self) -> dict[tuple[str, int], str | None]:
        return self.ctx.checkpoints

    def targets(self, link: chain.Link) -> list[tuple[str | None, int]]:
        """(model, training seed) pairs a link runs for, in the chain's order."""
        if link.per == "seed":
            return [(m, s) for s in range(self.cfg.seeds) for m in self.cfg.models]
        return [(m, 0) for m in self.cfg.models] if link.per == "model" else [(None, 0)]

    def stage(self, link: chain.Link, model: str | None, seed: int) -> None:
        """`jobs.<job>.run(config)` in this process (one Ray, its console nested in ours)
        unless the stage is not asked for or its final output exists; a failure stops the chain
        with the command that reruns the stage alone."""
        name = stage_name(link.stage, model, seed) if model else link.stage
        tag = chain.stage_tag(name)
        job = importlib.import_module(f"jobs.{link.job}")
        if link.stage not in self.cfg.stages:
            self.skipped.append(name)
            return self.con.info(f"{tag}: not asked for, skipped")
        built = job.chained(self.ctx, model, seed)
        if built is None:                  # nothing to run (a checkpoint given for training)
            self.skipped.append(name)
            return None
        cfg, done = built
        if done and tables.exists(done):
            self.skipped.append(name)
            return self.con.info(f"{tag}: already complete under {self.out}, skipped")
        self.commands[name] = chain.command(link.job, cfg)
        # the job keeps its warnings, epochs and long progress lines; a bad input or a failure
        # stops the chain with the job's one-line error and the command to rerun it
        try:
            with self.con.stage(name, label=tag), self.con.nest(name):
                job.run(cfg)
        except (BadInput, JobFailed) as e:
            log(f"{tag} stopped; to rerun this stage alone: {self.commands[name]}")
            raise type(e)(f"{name}: {first_line_of(e)}") from None
        self.seconds[name] = round(self.con.seconds[name], 2)

    def check(self) -> None:
        """Build every stage's Config once before anything runs or is written: an option that
        a job refuses stops the chain here (exit 2)."""
        for link in chain.LINKS:
            if link.stage in self.cfg.stages:
                job = importlib.import_module(f"jobs.{link.job}")
                for model, seed in self.targets(link):
                    job.chained(self.ctx, model, seed)

    def record_checkpoint(self, model: str, seed: int) -> None:
        """The checkpoint the later stages of (model, seed) study, and its training recipe."""
        from pipeline.models.checkpoint import load_checkpoint

        ckpt = self.ctx.given.get(model) or layout.checkpoint(self.out, model, seed)
        self.checkpoints[(model, seed)] = ckpt
        if model in self.ctx.given:
            self.con.info(f"{chain.stage_tag('train:' + model)}: using {ckpt}")
        if tables.exists(ckpt):
            recipe = load_checkpoint(ckpt, model).meta.get("recipe")
            self.ctx.recipes.update({(model, seed): recipe} if recipe else {})
        elif "train" not in self.cfg.stages:   # nothing trained nor given: seeded stand-ins
            self.checkpoints[(model, seed)] = None
            self.con.warn(f"train:{model}: no checkpoint (stage not run, none given); the later "
                          "stages study an untrained stand-in")

    def combine_ablation(self) -> None:
        """ablation/{ablation,census}.parquet over every model and seed, and Table 1 from them."""
        from pipeline.ablation.table1 import table1

        url = {n: layout.combined(self.out, "ablation", n)
               for n in ("ablation", "census", "table1")}
        for name in ("ablation", "census"):
            _concat([layout.ablation_table(self.out, m, name, s)
                     for s in range(self.cfg.seeds) for m in self.cfg.models], url[name])
        if tables.exists(url["ablation"]) and tables.exists(url["census"]):
            tables.write_table(table1(tables.read_table(url["ablation"]),
                                      tables.read_table(url["census"])), url["table1"])

    def combine_actmax(self) -> None:
        _concat([layout.actmax_table(self.out, m) for m in self.cfg.models],
                layout.combined(self.out, "actmax", "actmax"))

    def run(self) -> None:
        """Every link in order: train, analyse and ablate every model at every seed; actmax,
        neuron types and the report at seed 0."""
        import ray

        self.ctx.gpus = int(ray.cluster_resources().get("GPU", 0))
        for link in chain.LINKS:
            for model, seed in self.targets(link):
                self.stage(link, model, seed)
                if link.stage in self.after_stage:
                    self.after_stage[link.stage](model, seed)
            if link.stage in self.after_link:
                self.after_link[link.stage]()


def run(cfg: ReproduceConfig) -> dict:
    """The chain after argument parsing; returns run.json."""
    con = Console("reproduce")
    steps = Chain(cfg, con)
    steps.check()                                # every bad input surfaces here
    check_writable(cfg.out)
    init_ray(cfg.out)
    steps.run()
    ckpts = steps.checkpoints
    info = write_run(
        cfg.out, "reproduce", cfg.to_dict(),
        counts={"stages_run": len(steps.seconds), "stages_skipped": len(steps.skipped)},
        seconds=steps.seconds, total_seconds=con.wall, work=1, unit="stages",
        stage_work={"total": len(steps.seconds)},
        details={"checkpoints": {m: u for (m, s), u in ckpts.items() if s == 0},
                 "seed_checkpoints": {str(s): {m: u for (m, t), u in ckpts.items() if t == s}
                                      for s in range(cfg.seeds)},
                 "commands": steps.commands, "skipped_stages": steps.skipped})
    con.info(f"done in {con.wall:.0f} s: open {layout.report_index(cfg.out)}")
    return info


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(PROG, __doc__, ReproduceConfig, run, argv)


if __name__ == "__main__":
    sys.exit(main())
