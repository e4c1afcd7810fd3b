"""What `jobs.reproduce` runs: the links of the chain, the checks across its options, each model's
layers and checkpoint, stage names, and the context from which every job builds its own Config.

    LINKS                              # (stage, job, per): train, analyze, ablate, actmax, ...
    o = ReproduceConfig(...)           # any object with ChainOptions' fields
    check(o)                           # ValueError naming the flag and what is allowed
    layer_plan(o)["resnet34"]          # Layers("pool1,conv3,conv7", "pool1,conv3,conv7", None)
    per_model("pool1,vgg16=features.4", ("resnet34", "vgg16"), "--layers")
        # {"resnet34": ["pool1"], "vgg16": ["features.4"]}
    stage_name("train", "resnet34", 1), stage_tag("train:resnet34:seed1")
        # "train:resnet34:seed1", "[1/6] train:resnet34:seed1"
    ctx = Context(o, layer_plan(o), given_checkpoints(o))
    cfg, done = jobs.analyze.chained(ctx, "resnet34", 0)   # the job's Config, its final output
    command("analyze", cfg)            # "python -m jobs.analyze --checkpoint ...": to rerun alone

A job joins the chain with a module under jobs/ that has `Config`, `run(cfg)` and
`chained(ctx, model, seed) -> (Config, done URL or None) | None`, and one line in LINKS.
Per-model options take a comma list in which `MODEL=` starts that model's items (items before
any `MODEL=` apply to every model). Pure functions: no Ray, no I/O. Bad input raises ValueError
with the text the user sees; jobs.reproduce turns it into BadInput (one line, exit 2) in one place.
"""
from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol, Sequence

__all__ = ["PAPER_MODELS", "PAPER_LAYERS", "Link", "LINKS", "STAGES", "ChainOptions", "Layers",
           "Context", "items", "per_model", "check", "given_checkpoints", "layer_plan",
           "stage_name", "stage_tag", "command"]

PAPER_MODELS = ("resnet34", "plainnet34")
PAPER_LAYERS = "pool1,conv3,conv7"       # analysis and actmax layers of the ResNet family


class Link(NamedTuple):
    """One stage of the chain: its --stages name, the module jobs.<job>, and what it runs for:
    "seed" every model at every training seed, "model" every model at seed 0, "once"."""
    stage: str
    job: str
    per: str


LINKS = (Link("train", "train", "seed"), Link("analyze", "analyze", "seed"),
         Link("ablate", "ablate", "seed"), Link("actmax", "actmax", "model"),
         Link("neuron_types", "neuron_types", "once"), Link("compare", "compare", "once"),
         Link("report", "report", "once"))
STAGES = tuple(link.stage for link in LINKS)


class ChainOptions(Protocol):
    """The options of jobs.reproduce that decide what the chain runs (its ReproduceConfig)."""
    out: str
    preset: str
    models: tuple[str, ...]
    stages: tuple[str, ...]
    train_data: str | None
    data: str | None
    checkpoint_resnet: str | None
    checkpoint_plainnet: str | None
    checkpoints: str | None
    epochs: int | None
    workers: int | None
    limit: int | None
    seeds: int
    noise_seeds: int
    fractions: str | None
    loader_workers: int | None
    layers: str | None
    actmax_layers: str | None
    ablate_layer: str | None


class Layers(NamedTuple):
    """One model's layers: analysed, optimised by actmax, noised by the ablation (None: the
    ablation job's own default, pool1)."""
    analysis: str
    actmax: str
    ablate: str | None


def items(spec: str | None) -> tuple[str, ...]:
    """'a, b,,c' -> ('a', 'b', 'c'); None -> ()."""
    return tuple(s.strip() for s in (spec or "").split(",") if s.strip())


def per_model(spec: str | None, models: Sequence[str], flag: str) -> dict[str, list[str]]:
    """'a,b' -> every model gets [a, b]; 'm1=a,b,m2=c' -> m1: [a, b], m2: [c] (others: [])."""
    common: list[str] = []
    own: dict[str, list[str]] = {}
    current: list[str] = common
    for item in items(spec):
        m = re.fullmatch(r"([A-Za-z_][\w.]*)=(.*)", item)
        if m:
            if m.group(1) not in models:
                raise ValueError(f"{flag} names {m.group(1)!r}; allowed: the --models "
                                 f"({', '.join(models)})")
            current = own.setdefault(m.group(1), [])
            item = m.group(2)
        current.append(item)
    return {m: own.get(m, common) for m in models}


def check(o: ChainOptions) -> None:
    """Every check across options, before any work; ValueError names what is allowed."""
    from pipeline.ablation.noise import parse_subsets
    from pipeline.models.zoo import supported_models

    if o.preset not in ("demo", "paper"):
        raise ValueError(f"invalid preset {o.preset!r}; allowed: demo, paper")
    bad = [s for s in o.stages if s not in STAGES]
    if bad:
        raise ValueError(f"unknown stage {bad[0]!r}; allowed: {', '.join(STAGES)}")
    if o.preset == "paper" and o.data is None:
        raise ValueError("--preset paper needs --data (the ImageNet validation set URL)")
    if (o.train_data is None) != (o.data is None) and o.preset == "demo":
        raise ValueError("give both --train-data and --data, or neither for the demo data")
    if o.fractions is not None:
        try:
            parse_subsets(o.fractions)
        except ValueError as e:
            raise ValueError(str(e).replace("--fraction", "--fractions")) from None
    allowed = supported_models()
    bad = [m for m in o.models if m not in allowed]
    if bad or not o.models or len(set(o.models)) != len(o.models):
        what = f"unknown model {bad[0]!r}" if bad else f"--models {','.join(o.models)!r}"
        raise ValueError(f"{what}; allowed: distinct names among {', '.join(allowed)}")
    given = given_checkpoints(o)
    if o.seeds > 1 and given:
        raise ValueError(f"--seeds {o.seeds} trains {o.seeds} runs per model; given "
                         "checkpoints are one run: use --seeds 1")
    if (o.preset == "paper" and "train" in o.stages and o.train_data is None
            and set(given) != set(o.models)):
        raise ValueError("--preset paper needs --train-data, or a checkpoint per model "
                         "(--checkpoint-resnet and --checkpoint-plainnet, or --checkpoints) "
                         "to skip training")
    layer_plan(o)


def given_checkpoints(o: ChainOptions) -> dict[str, str]:
    """model -> checkpoint URL given instead of training (--checkpoints MODEL=URL,..., and the
    paper pair's --checkpoint-resnet / --checkpoint-plainnet)."""
    out = {}
    for flag_, model, url in (("--checkpoint-resnet", "resnet34", o.checkpoint_resnet),
                              ("--checkpoint-plainnet", "plainnet34", o.checkpoint_plainnet)):
        if url and model not in o.models:
            raise ValueError(f"{flag_} is {model}'s checkpoint, which is not in --models; "
                             "use --checkpoints MODEL=URL")
        if url:
            out[model] = url
    for item in items(o.checkpoints):
        m = re.fullmatch(r"([\w.]+)=(.+)", item)
        if not m or m.group(1) not in o.models:
            raise ValueError(f"invalid --checkpoints item {item!r}; allowed: MODEL=URL with "
                             f"MODEL one of --models ({', '.join(o.models)})")
        out[m.group(1)] = m.group(2)
    return out


def layer_plan(o: ChainOptions) -> dict[str, Layers]:
    """model -> Layers: the paper layers for the ResNet family, else the layer options (a
    ValueError when a model lacks one, or the ablation's layer is not analysed)."""
    from pipeline.models.zoo import is_resnet

    ablating = "ablate" in o.stages
    analysis = per_model(o.layers, o.models, "--layers")
    actmax = per_model(o.actmax_layers, o.models, "--actmax-layers")
    ablate = per_model(o.ablate_layer, o.models, "--ablate-layer")
    plan = {}
    for m in o.models:
        hint = (f"{m} has no paper layer names: give module paths (`python -m "
                f"jobs.receptive_fields --model {m} --list` prints them)")
        if not analysis[m] and not is_resnet(m):
            raise ValueError(f"--layers is required for {m}: {hint}")
        if len(ablate[m]) > 1 or (ablating and not ablate[m] and not is_resnet(m)):
            raise ValueError(f"--ablate-layer needs exactly one layer for {m}: {hint}")
        analysed = ",".join(analysis[m]) or PAPER_LAYERS
        noised = ablate[m][0] if ablate[m] else None
        if ablating and (noised or "pool1") not in analysed.split(","):
            raise ValueError(f"the ablation layer {noised or 'pool1'} of {m} is not among its "
                             f"--layers ({analysed}): ablation reads its census from them")
        plan[m] = Layers(analysed, ",".join(actmax[m]) or analysed, noised)
    return plan


def stage_name(stage: str, model: str, seed: int = 0) -> str:
    """Stage names as logged: seed 0 keeps the single-seed names (train:resnet34)."""
    return f"{stage}:{model}" + (f":seed{seed}" if seed else "")


def stage_tag(name: str) -> str:
    """'ablate:vgg16' -> '[3/6] ablate:vgg16': the stage's place in the chain."""
    return f"[{STAGES.index(name.split(':')[0]) + 1}/{len(STAGES)}] {name}"


@dataclass
class Context:
    """What a job's `chained` builds its Config from: the chain's options, each model's
    layers, the checkpoints given or trained so far and their training recipes."""

    o: ChainOptions
    layers: dict[str, Layers]
    given: dict[str, str]                                   # model -> checkpoint given
    checkpoints: dict[tuple[str, int], str | None] = field(default_factory=dict)
    recipes: dict[tuple[str, int], dict] = field(default_factory=dict)
    gpus: int = 0                                           # GPUs of the Ray cluster

    @property
    def out(self) -> str:
        return self.o.out

    def checkpoint(self, model: str, seed: int = 0) -> str | None:
        return self.checkpoints.get((model, seed))

    def transform(self, model: str, seed: int = 0) -> tuple[int | None, int | None]:
        """(resize, crop) of the checkpoint's own evaluation transform, so that analysis sees
        what training saw; (None, None) without a recipe."""
        r = self.recipes.get((model, seed))
        return (int(r["eval_resize"]), int(r["eval_crop"])) if r else (None, None)

    def data(self, training: bool = False) -> tuple[str | None, str | None]:
        """(data, val) for jobs.train with `training`, else (data, None); (None, None) means the
        embedded demo data."""
        o = self.o
        if o.data is None or (training and o.train_data is None):
            return None, None
        return (o.train_data, o.data) if training else (o.data, None)


def command(job: str, cfg: Any) -> str:
    """The shell command that runs this stage alone (the log line, run.json's commands)."""
    return shlex.join(["python", "-m", f"jobs.{job}", *cfg.argv()])
