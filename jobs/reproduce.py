"""The whole chain in one command: data -> train -> analyze -> ablate -> actmax -> types -> report.

    python -m jobs.reproduce                    # embedded demo, ./results, ~5 min on 2 CPUs
    python -m jobs.reproduce --preset paper --train-data s3://b/imagenet/train \\
        --data s3://b/imagenet/val --out s3://b/results   # the real thing on a GPU cluster
    python -m jobs.reproduce --seeds 3 --fractions 1ch,0.25,0.5,0.75   # Table 1 over 3 trainings
    python -m jobs.reproduce --models resnet50,vgg16 --checkpoints resnet50=r50.pt,vgg16=v16.pt \\
        --layers pool1,conv7,vgg16=features.4,features.28 --ablate-layer vgg16=features.4

Each stage runs its job in this process (one Ray, one console) unless its final output exists
under --out (local or s3://); an interrupted stage resumes from its own partials. --out has
pipeline/layout.py's layout; training seeds s >= 1 (--seeds) go under seeds/<s>/, the combined
census, ablation and Table 1 cover every seed, actmax, neuron types and the report use seed 0.
Per-model options take a comma list in which `MODEL=` starts that model's items (items before
any `MODEL=` apply to every model). Ray's log: <out>/_logs/ray.log; commands run: run.json.
"""
from __future__ import annotations

import importlib
import re
import shlex
import sys
import time
from dataclasses import dataclass
from typing import Callable, Sequence

from runtime.inputs import check_writable
from runtime.console import Console, init_ray
from runtime.options import BadInput, JobFailed, Options, at_least, opt, run_cli
from runtime.runinfo import write_run
from pipeline import layout, tables

PROG = "python -m jobs.reproduce"
PAPER_MODELS = ("resnet34", "plainnet34")
PAPER_LAYERS = "pool1,conv3,conv7"       # analysis and actmax layers of the ResNet family
STAGES = ("train", "analyze", "ablate", "actmax", "neuron_types", "report")


def _items(spec: str | None) -> tuple[str, ...]:
    return tuple(s.strip() for s in (spec or "").split(",") if s.strip())


def per_model(spec: str | None, models: Sequence[str], flag: str) -> dict[str, list[str]]:
    """'a,b' -> every model gets [a, b]; 'm1=a,b,m2=c' -> m1: [a, b], m2: [c] (others: [])."""
    common: list[str] = []
    own: dict[str, list[str]] = {}
    current: list[str] = common
    for item in _items(spec):
        m = re.fullmatch(r"([A-Za-z_][\w.]*)=(.*)", item)
        if m:
            if m.group(1) not in models:
                raise BadInput(f"{flag} names {m.group(1)!r}; allowed: the --models "
                               f"({', '.join(models)})")
            current = own.setdefault(m.group(1), [])
            item = m.group(2)
        current.append(item)
    return {m: own.get(m, common) for m in models}


@dataclass(frozen=True)
class ReproduceConfig(Options):
    out: str = opt("./results", "output root, local path or s3://... (default: ./results)",
                   parse=lambda v: v.rstrip("/") or v)
    preset: str = opt("demo", "demo (embedded data, small models) or paper")
    models: tuple[str, ...] = opt(PAPER_MODELS, "the models compared, comma list (default: "
                                  f"{','.join(PAPER_MODELS)}); any of "
                                  "pipeline.models.supported_models()", parse=_items)
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
    stages: tuple[str, ...] = opt(STAGES, "stages to run, comma list (default: all: "
                                  f"{','.join(STAGES)})", parse=_items)

    def check(self) -> None:
        if self.preset not in ("demo", "paper"):
            raise BadInput(f"invalid preset {self.preset!r}; allowed: demo, paper")
        bad = [s for s in self.stages if s not in STAGES]
        if bad:
            raise BadInput(f"unknown stage {bad[0]!r}; allowed: {', '.join(STAGES)}")
        if self.preset == "paper" and self.data is None:
            raise BadInput("--preset paper needs --data (the ImageNet validation set URL)")
        if (self.train_data is None) != (self.data is None) and self.preset == "demo":
            raise BadInput("give both --train-data and --data, or neither for the demo data")
        if self.fractions is not None:
            from pipeline.ablation import parse_subsets

            try:
                parse_subsets(self.fractions)
            except ValueError as e:
                raise BadInput(str(e).replace("--fraction", "--fractions")) from None
        from pipeline.models import supported_models

        allowed = supported_models()
        bad = [m for m in self.models if m not in allowed]
        if bad or not self.models or len(set(self.models)) != len(self.models):
            what = f"unknown model {bad[0]!r}" if bad else f"--models {','.join(self.models)!r}"
            raise BadInput(f"{what}; allowed: distinct names among {', '.join(allowed)}")
        given = self.given_checkpoints()
        if self.seeds > 1 and given:
            raise BadInput(f"--seeds {self.seeds} trains {self.seeds} runs per model; given "
                           "checkpoints are one run: use --seeds 1")
        if (self.preset == "paper" and "train" in self.stages and self.train_data is None
                and set(given) != set(self.models)):
            raise BadInput("--preset paper needs --train-data, or a checkpoint per model "
                           "(--checkpoint-resnet and --checkpoint-plainnet, or --checkpoints) "
                           "to skip training")
        self.layer_plan()

    def given_checkpoints(self) -> dict[str, str]:
        """model -> checkpoint URL given instead of training."""
        out = {}
        for flag, model, url in (("--checkpoint-resnet", "resnet34", self.checkpoint_resnet),
                                 ("--checkpoint-plainnet", "plainnet34", self.checkpoint_plainnet)):
            if url and model not in self.models:
                raise BadInput(f"{flag} is {model}'s checkpoint, which is not in --models; "
                               "use --checkpoints MODEL=URL")
            if url:
                out[model] = url
        for item in _items(self.checkpoints):
            m = re.fullmatch(r"([\w.]+)=(.+)", item)
            if not m or m.group(1) not in self.models:
                raise BadInput(f"invalid --checkpoints item {item!r}; allowed: MODEL=URL with "
                               f"MODEL one of --models ({', '.join(self.models)})")
            out[m.group(1)] = m.group(2)
        return out

    def layer_plan(self) -> dict[str, tuple[str, str, str | None]]:
        """model -> (analysis layers, actmax layers, ablation layer or None for jobs.ablate's
        pool1); BadInput when a model outside the ResNet family lacks a layer option."""
        from pipeline.models import is_resnet

        layers = per_model(self.layers, self.models, "--layers")
        actmax = per_model(self.actmax_layers, self.models, "--actmax-layers")
        ablate = per_model(self.ablate_layer, self.models, "--ablate-layer")
        plan = {}
        for m in self.models:
            hint = (f"{m} has no paper layer names: give module paths (`python -m "
                    f"jobs.receptive_fields --model {m} --list` prints them)")
            if not layers[m] and not is_resnet(m):
                raise BadInput(f"--layers is required for {m}: {hint}")
            if len(ablate[m]) > 1 or ("ablate" in self.stages and not ablate[m]
                                      and not is_resnet(m)):
                raise BadInput(f"--ablate-layer needs exactly one layer for {m}: {hint}")
            analysed = ",".join(layers[m]) or PAPER_LAYERS
            noised = ablate[m][0] if ablate[m] else None
            if "ablate" in self.stages and (noised or "pool1") not in analysed.split(","):
                raise BadInput(f"the ablation layer {noised or 'pool1'} of {m} is not among its "
                               f"--layers ({analysed}): ablation reads its census from them")
            plan[m] = (analysed, ",".join(actmax[m]) or analysed, noised)
        return plan




def _run_job(name: str, argv: list[str]) -> None:
    """`jobs.<name>.main(argv)` in this process (its Ray and console are ours: no second
    start-up, no duplicated lines); a failure stops the chain."""
    rc = importlib.import_module(f"jobs.{name}").main(argv)
    if rc not in (None, 0):
        raise JobFailed(f"jobs.{name} exited with {rc}; rerun the same command to resume")


def _concat(parts: list[str], url: str) -> None:
    """One table for every model (and every seed) from the per-model tables."""
    import pyarrow as pa

    found = [tables.read_table(p) for p in parts if tables.exists(p)]
    if found:
        tables.write_table(pa.concat_tables(found, promote_options="permissive"), url)


def _flag(name: str, value: object) -> list[str]:
    """[name, value] when the value is given (not None), else nothing."""
    return [] if value is None else [name, str(value)]


class Chain:
    """The stages in order; a stage runs its job unless its final output exists."""

    def __init__(self, cfg: ReproduceConfig, con: Console) -> None:
        self.cfg, self.con, self.out = cfg, con, cfg.out
        self.plan, self.given = cfg.layer_plan(), cfg.given_checkpoints()
        self.seconds: dict[str, float] = {}
        self.commands: dict[str, str] = {}            # stage -> the command it ran
        self.skipped: list[str] = []
        self.checkpoints: dict[tuple[str, int], str] = {}   # (model, training seed) -> URL
        self.recipes: dict[tuple[str, int], dict] = {}
        self.gpus = 0

    def stage(self, name: str, done: Callable[[], bool], job: str, argv: list[str]) -> None:
        kind = name.split(":")[0]
        tag = f"[{STAGES.index(kind) + 1}/{len(STAGES)}] {name}"
        if kind not in self.cfg.stages or done():
            self.skipped.append(name)
            why = ("not asked for" if kind not in self.cfg.stages
                   else f"already complete under {self.out}")
            return self.con.info(f"{tag}: {why}, skipped")
        self.commands[name] = shlex.join(["python", "-m", f"jobs.{job}", *argv])
        self.con.info(f"{tag} ...")
        t0 = time.perf_counter()
        _run_job(job, argv)
        self.seconds[name] = round(time.perf_counter() - t0, 2)
        self.con.info(f"{tag} done in {self.seconds[name]:.1f} s")

    def data(self, training: bool = False) -> list[str]:
        """The data flags of a job (none for the embedded demo data)."""
        c = self.cfg
        if c.data is None or (training and c.train_data is None):
            return []
        return ["--data", c.train_data, "--val", c.data] if training else ["--data", c.data]

    def model(self, model: str, seed: int = 0) -> list[str]:
        return [*_flag("--checkpoint", self.checkpoints.get((model, seed))), "--model", model]

    def transform(self, model: str, seed: int = 0) -> list[str]:
        """The checkpoint's own evaluation transform, so analysis sees what training saw."""
        r = self.recipes.get((model, seed))
        return ["--resize", str(r["eval_resize"]), "--crop", str(r["eval_crop"])] if r else []

    def train(self, model: str, seed: int) -> None:
        from pipeline.checkpoint import load_checkpoint

        if model in self.given:
            self.checkpoints[(model, seed)] = self.given[model]
            self.con.info(f"[1/{len(STAGES)}] train:{model}: using {self.given[model]}")
        else:
            c, ckpt = self.cfg, layout.checkpoint(self.out, model, seed)
            self.checkpoints[(model, seed)] = ckpt
            argv = ["--preset", c.preset, "--model", model, "--out",
                    layout.train_dir(self.out, model, seed),
                    "--workers", str(c.workers or (self.gpus or 2)), *self.data(training=True),
                    *_flag("--seed", seed or None), *_flag("--loader-workers", c.loader_workers),
                    *(["--use-gpu"] if self.gpus else []), *_flag("--epochs", c.epochs)]
            self.stage(_name("train", model, seed), lambda: tables.exists(ckpt), "train", argv)
        ckpt = self.checkpoints[(model, seed)]
        if tables.exists(ckpt):
            recipe = load_checkpoint(ckpt, model).meta.get("recipe")
            self.recipes.update({(model, seed): recipe} if recipe else {})
        elif "train" not in self.cfg.stages:   # nothing trained nor given: seeded stand-ins
            self.checkpoints[(model, seed)] = None
            self.con.warn(f"train:{model}: no checkpoint (stage not run, none given); the later "
                          "stages study an untrained stand-in")

    def analyze(self, model: str, seed: int) -> None:
        argv = [*self.model(model, seed), "--out", layout.analysis_dir(self.out, model, seed),
                "--layers", self.plan[model][0], "--top-k", "16", *self.data(),
                *self.transform(model, seed), *_flag("--limit", self.cfg.limit)]
        self.stage(_name("analyze", model, seed),
                   lambda: tables.exists(layout.stimuli(self.out, model, "channels", seed)),
                   "analyze", argv)

    def ablate(self, model: str, seed: int) -> None:
        c, out = self.cfg, layout.ablation_dir(self.out, model, seed)
        argv = [*self.model(model, seed), "--out", out, "--seeds", str(c.noise_seeds),
                "--train-seed", str(seed), "--from", layout.analysis_dir(self.out, model, seed),
                *self.data(), *self.transform(model, seed),
                "--task-per", "shard",  # decode each batch once for all conditions and seeds
                *_flag("--layer", self.plan[model][2]), *_flag("--fraction", c.fractions),
                *_flag("--limit", c.limit),
                *(["--shards", "2", "--eval-batch", "64"] if c.preset == "demo" else [])]
        self.stage(_name("ablate", model, seed),
                   lambda: tables.exists(layout.ablation_table(self.out, model, "table1", seed)),
                   "ablate", argv)

    def combine_ablation(self) -> None:
        """ablation/{ablation,census}.parquet over every model and seed, and Table 1 from them."""
        from pipeline.table1 import table1

        url = {n: layout.combined(self.out, "ablation", n)
               for n in ("ablation", "census", "table1")}
        for name in ("ablation", "census"):
            _concat([layout.ablation_table(self.out, m, name, s)
                     for s in range(self.cfg.seeds) for m in self.cfg.models], url[name])
        if tables.exists(url["ablation"]) and tables.exists(url["census"]):
            tables.write_table(table1(tables.read_table(url["ablation"]),
                                      tables.read_table(url["census"])), url["table1"])

    def actmax(self, model: str) -> None:
        out, r = layout.actmax_dir(self.out, model), self.recipes.get((model, 0))
        argv = [*self.model(model), "--out", out, "--layers", self.plan[model][1],
                *_flag("--input-size", r["eval_crop"] if r else None)]
        self.stage(f"actmax:{model}", lambda: tables.exists(layout.actmax_table(self.out, model)),
                   "actmax", argv)

    def neuron_types(self) -> None:
        out = layout.neuron_types_dir(self.out)
        argv = ["--from", self.out, "--out", out]
        for model in self.cfg.models:  # given checkpoints outside --out: name them for the filters
            ckpt = self.checkpoints.get((model, 0))
            if ckpt and not ckpt.startswith(self.out):
                argv += ["--checkpoint", f"{model}={ckpt}"]
        self.stage("neuron_types",
                   lambda: tables.exists(layout.neuron_types_table(self.out, "summary")),
                   "neuron_types", argv)

    def run(self) -> None:
        import ray

        self.gpus = int(ray.cluster_resources().get("GPU", 0))
        seeds, models = range(self.cfg.seeds), self.cfg.models
        for step in (self.train, self.analyze, self.ablate):
            for seed in seeds:
                for model in models:
                    step(model, seed)
        self.combine_ablation()
        for model in models:
            self.actmax(model)
        _concat([layout.actmax_table(self.out, m) for m in models],
                layout.combined(self.out, "actmax", "actmax"))
        self.neuron_types()
        self.stage("report", lambda: False, "report", ["--out", self.out])


def _name(stage: str, model: str, seed: int) -> str:
    """Stage names as logged: seed 0 keeps the single-seed names (train:resnet34)."""
    return f"{stage}:{model}" + (f":seed{seed}" if seed else "")


def run(cfg: ReproduceConfig) -> dict:
    """The chain after argument parsing; returns run.json."""
    check_writable(cfg.out)
    con = Console("reproduce")
    init_ray(cfg.out)
    chain = Chain(cfg, con)
    chain.run()
    ckpts = chain.checkpoints
    info = write_run(
        cfg.out, "reproduce", cfg.to_dict(),
        counts={"stages_run": len(chain.seconds), "stages_skipped": len(chain.skipped)},
        seconds=chain.seconds, total_seconds=con.wall, work=1, unit="stages",
        stage_work={"total": len(chain.seconds)},
        details={"checkpoints": {m: u for (m, s), u in ckpts.items() if s == 0},
                 "seed_checkpoints": {str(s): {m: u for (m, t), u in ckpts.items() if t == s}
                                      for s in range(cfg.seeds)},
                 "commands": chain.commands, "skipped_stages": chain.skipped})
    con.info(f"done in {con.wall:.0f} s: open {layout.report_index(cfg.out)}")
    return info


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(PROG, __doc__, ReproduceConfig, run, argv)


if __name__ == "__main__":
    sys.exit(main())
