"""What `jobs.reproduce` runs per model: its checks, layers, checkpoints, stage names, commands.

    o = ReproduceConfig(...)           # any object with ChainOptions' fields
    check(o)                           # ValueError naming the flag and what is allowed
    layer_plan(o)["resnet34"]          # Layers("pool1,conv3,conv7", "pool1,conv3,conv7", None)
    per_model("pool1,vgg16=features.4", ("resnet34", "vgg16"), "--layers")
        # {"resnet34": ["pool1"], "vgg16": ["features.4"]}
    stage_name("train", "resnet34", 1), stage_tag("train:resnet34:seed1")
        # "train:resnet34:seed1", "[1/6] train:resnet34:seed1"
    analyze_argv(o, "resnet34", 0, layers, "out/train/resnet34/model.pt", recipe)
        # ["--checkpoint", ..., "--model", "resnet34", "--out", "out/analysis/resnet34", ...]
    compare_pair(o)                    # ("resnet34", "plainnet34"): what jobs.compare compares

Per-model options take a comma list in which `MODEL=` starts that model's items (items before
any `MODEL=` apply to every model). Pure functions: no Ray, no I/O. Bad input raises ValueError
with the text the user sees; jobs.reproduce turns it into BadInput (one line, exit 2) in one place.
"""
from __future__ import annotations

import re
from typing import NamedTuple, Protocol, Sequence

from pipeline.results import layout

__all__ = ["PAPER_MODELS", "PAPER_LAYERS", "STAGES", "ChainOptions", "Layers", "items",
           "per_model", "check", "given_checkpoints", "layer_plan", "stage_name", "stage_tag",
           "flag", "train_argv", "analyze_argv", "ablate_argv", "actmax_argv",
           "neuron_types_argv", "compare_pair", "compare_argv"]

PAPER_MODELS = ("resnet34", "plainnet34")
PAPER_LAYERS = "pool1,conv3,conv7"       # analysis and actmax layers of the ResNet family
STAGES = ("train", "analyze", "ablate", "actmax", "neuron_types", "compare", "report")
DEMO_COMPARE_BATCH = 64     # the demo's 400 validation images: 7 CKA minibatches


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


def flag(name: str, value: object) -> list[str]:
    """[name, value] when the value is given (not None), else nothing."""
    return [] if value is None else [name, str(value)]


def _data(o: ChainOptions, training: bool = False) -> list[str]:
    """The data flags of a job (none for the embedded demo data)."""
    if o.data is None or (training and o.train_data is None):
        return []
    return ["--data", o.train_data, "--val", o.data] if training else ["--data", o.data]


def _transform(recipe: dict | None) -> list[str]:
    """The checkpoint's own evaluation transform, so analysis sees what training saw."""
    return (["--resize", str(recipe["eval_resize"]), "--crop", str(recipe["eval_crop"])]
            if recipe else [])


def train_argv(o: ChainOptions, model: str, seed: int, gpus: int) -> list[str]:
    """jobs.train: one model at one training seed (2 CPU workers, or one per GPU)."""
    return ["--preset", o.preset, "--model", model, "--out", layout.train_dir(o.out, model, seed),
            "--workers", str(o.workers or (gpus or 2)), *_data(o, training=True),
            *flag("--seed", seed or None), *flag("--loader-workers", o.loader_workers),
            *(["--use-gpu"] if gpus else []), *flag("--epochs", o.epochs)]


def analyze_argv(o: ChainOptions, model: str, seed: int, layers: Layers, ckpt: str | None,
                 recipe: dict | None) -> list[str]:
    """jobs.analyze: the model's analysis layers, top-16, with its checkpoint's transform."""
    return [*flag("--checkpoint", ckpt), "--model", model,
            "--out", layout.analysis_dir(o.out, model, seed), "--layers", layers.analysis,
            "--top-k", "16", *_data(o), *_transform(recipe), *flag("--limit", o.limit)]


def ablate_argv(o: ChainOptions, model: str, seed: int, layers: Layers, ckpt: str | None,
                recipe: dict | None) -> list[str]:
    """jobs.ablate: the census from the analysis, every noise seed and fraction."""
    return [*flag("--checkpoint", ckpt), "--model", model,
            "--out", layout.ablation_dir(o.out, model, seed), "--seeds", str(o.noise_seeds),
            "--train-seed", str(seed), "--from", layout.analysis_dir(o.out, model, seed),
            *_data(o), *_transform(recipe),
            "--task-per", "shard",  # decode each batch once for all conditions and seeds
            *flag("--layer", layers.ablate), *flag("--fraction", o.fractions),
            *flag("--limit", o.limit),
            *(["--shards", "2", "--eval-batch", "64"] if o.preset == "demo" else [])]


def actmax_argv(o: ChainOptions, model: str, layers: Layers, ckpt: str | None,
                recipe: dict | None) -> list[str]:
    """jobs.actmax (training seed 0) at the input size the checkpoint was trained on."""
    return [*flag("--checkpoint", ckpt), "--model", model, "--out", layout.actmax_dir(o.out, model),
            "--layers", layers.actmax,
            *flag("--input-size", recipe["eval_crop"] if recipe else None)]


def neuron_types_argv(o: ChainOptions, checkpoints: dict[str, str | None]) -> list[str]:
    """jobs.neuron_types over --out; given checkpoints outside --out named for the filters."""
    return ["--from", o.out, "--out", layout.neuron_types_dir(o.out),
            *[a for m, ckpt in checkpoints.items() if ckpt and not ckpt.startswith(o.out)
              for a in ("--checkpoint", f"{m}={ckpt}")]]


def compare_pair(o: ChainOptions) -> tuple[str, str] | None:
    """The networks jobs.compare compares: the first two --models when both are of the ResNet
    family (their paper names are the default layers: pool1, conv2 ... convN), else None."""
    from pipeline.models.zoo import is_resnet

    if len(o.models) < 2 or not all(is_resnet(m) for m in o.models[:2]):
        return None
    return o.models[0], o.models[1]


def compare_argv(o: ChainOptions, pair: tuple[str, str], plan: dict[str, Layers],
                 ckpts: tuple[str | None, str | None], recipe: dict | None) -> list[str]:
    """jobs.compare of the pair (training seed 0) on the validation data, at the checkpoints'
    own transform. The paper preset compares pool1 and every numbered conv; the demo keeps it
    light: the layers both networks analysed plus the stage outputs, minibatches of 64 (a
    quarter of --limit when that is smaller, at least 4)."""
    a, b = pair
    common = [x for x in plan[a].analysis.split(",") if x in plan[b].analysis.split(",")]
    demo = o.preset == "demo"
    batch = DEMO_COMPARE_BATCH if o.limit is None else max(4, min(DEMO_COMPARE_BATCH,
                                                                 o.limit // 4))
    layers = ",".join(dict.fromkeys([*common, "layer2", "layer3", "layer4"]))
    return ["--models", f"{a},{b}", "--out", layout.compare_dir(o.out),
            *(["--checkpoints", f"{ckpts[0]},{ckpts[1]}"] if all(ckpts) else []),
            *_data(o), *_transform(recipe), *flag("--limit", o.limit),
            *(["--layers", layers, "--batch-size", str(batch)] if demo else [])]
