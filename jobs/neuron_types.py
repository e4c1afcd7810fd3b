"""Neuron-type census: orientation-selective, double-opponent, single-opponent or other, per channel.

For every channel and every available pattern — the first-conv filter (from a checkpoint) as
the stimulus it prefers, the mean preferred stimulus of each analysed layer (stimuli/mean.parquet)
and the activation-maximization image (actmax.parquet) — measures orientation selectivity and
opponent colour (`pipeline.neuron_types`) and assigns a type; the same thresholds for every
model. This file finds the inputs, reads rows and fans chunks out to Ray; turning rows into
patterns, rows and counts is `pipeline.neuron_patterns`.

    python -m jobs.neuron_types --from ./results/analysis/resnet34 --from ./results/analysis/plainnet34 \
        --actmax ./results/actmax --checkpoint ./results/train/resnet34/model.pt --out ./results/neuron_types
    python -m jobs.neuron_types --from ./results --out ./results/neuron_types   # a jobs.reproduce root

--from is an analysis output (stimuli/mean.parquet at its top) or a jobs.reproduce root
(analysis/<model>/stimuli/mean.parquet; there actmax/actmax.parquet, else actmax/<model>/
actmax.parquet, and train/<model>/model.pt are found too unless --actmax / --checkpoint are
given). Writes <out>/neuron_types.parquet,
<out>/summary.parquet and <out>/run.json, and prints the summary. Patterns are measured in Ray
tasks of at most --chunk patterns each, every task reading only its own rows.
"""
from __future__ import annotations

import argparse
import re
import time
from dataclasses import asdict, dataclass, field
from typing import Sequence

import numpy as np
import pyarrow as pa

from jobs.common import (BadInput, Stopwatch, bad_input_exits, check_writable, init_ray, job_parser,
                         log, package_versions)

from pipeline.neuron_patterns import (IMAGENET_MEAN, OUT_SCHEMA, SOURCES, SUMMARY_SCHEMA,
                                     PatternError, actmax_input_patterns, actmax_png_patterns,
                                     data_neutral, filter_patterns, format_summary, mean_colours,
                                     mean_patterns, measure_rows, sort_rows, summarise)

PROG = "python -m jobs.neuron_types"
NEUTRALS = {"gray": (0.5, 0.5, 0.5), "imagenet": IMAGENET_MEAN}
# Patterns per task when --chunk is 0: keeps one task's padded FFT near 2**23 complex values.
_FFT_BUDGET = 2 ** 23


@dataclass(frozen=True)
class NeuronTypesConfig:
    out: str                                   # output folder (local or s3://)
    sources_from: tuple[str, ...] = ()         # analysis outputs or reproduce roots (--from)
    actmax: tuple[str, ...] = ()               # actmax outputs (folder with actmax.parquet)
    checkpoints: tuple[str, ...] = ()          # checkpoint URLs, optionally MODEL=URL
    sources: tuple[str, ...] | None = None     # None: every source that has inputs
    osi_threshold: float = 0.5                 # orientation-selective when osi >= this
    chromatic_threshold: float = 1 / 3         # colour when chromatic energy share >= this
    double_opponent_threshold: float = 0.5     # double-opponent when the score >= this
    neuron: str = "center"                     # which mean stimulus: 'center' | 'all'
    neutral: str = "auto"                      # auto | checkpoint | gray | imagenet | R,G,B
    chunk: int = 0                             # patterns per Ray task (0: by FFT size)

    def __post_init__(self) -> None:
        if not self.out.strip():
            raise BadInput("--out is empty; give a local folder or an s3:// URL")
        if self.sources is not None:
            if not self.sources:
                raise BadInput(f"--sources is empty; allowed: {', '.join(SOURCES)}")
            for s in self.sources:
                if s not in SOURCES:
                    raise BadInput(f"unknown source {s!r} in --sources; allowed: {', '.join(SOURCES)}")
        wants_mean = self.sources is None or "mean" in self.sources
        if wants_mean and not self.sources_from:
            raise BadInput("--from is required for the 'mean' source; give an analysis output folder")
        if self.sources is not None and "actmax" in self.sources and not (self.actmax or self.sources_from):
            raise BadInput("--sources has 'actmax' but no --actmax folder was given")
        if self.sources is not None and "filter" in self.sources and not (self.checkpoints or self.sources_from):
            raise BadInput("--sources has 'filter' but no --checkpoint was given")
        if self.neuron not in ("center", "all"):
            raise BadInput(f"invalid --neuron {self.neuron!r}; allowed: center, all")
        parse_neutral(self.neutral)
        if self.chunk < 0:
            raise BadInput(f"--chunk must be >= 0 (0: automatic), got {self.chunk}")
        try:
            self.thresholds()
        except ValueError as e:
            raise BadInput(f"{e} (flags --osi-threshold, --chromatic-threshold, "
                           "--double-opponent-threshold)") from None

    def thresholds(self):
        from pipeline.neuron_types import Thresholds

        return Thresholds(osi=self.osi_threshold, chromatic=self.chromatic_threshold,
                          double_opponent=self.double_opponent_threshold)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "NeuronTypesConfig":
        sources = None
        if args.sources is not None:
            sources = tuple(s.strip() for s in args.sources.split(",") if s.strip())
        return cls(out=args.out, sources_from=tuple(args.sources_from or ()),
                   actmax=tuple(args.actmax or ()), checkpoints=tuple(args.checkpoint or ()),
                   sources=sources, osi_threshold=args.osi_threshold,
                   chromatic_threshold=args.chromatic_threshold,
                   double_opponent_threshold=args.double_opponent_threshold,
                   neuron=args.neuron, neutral=args.neutral, chunk=args.chunk)


def parse_neutral(spec: str) -> tuple[float, float, float] | None:
    """'auto' | 'checkpoint' -> None (decided per source and model); 'gray' | 'imagenet' | 'R,G,B' -> RGB."""
    if spec in ("auto", "checkpoint"):
        return None
    if spec in NEUTRALS:
        return NEUTRALS[spec]
    try:
        rgb = tuple(float(v) for v in spec.split(","))
    except ValueError:
        rgb = ()
    if len(rgb) != 3 or not all(0.0 <= v <= 1.0 for v in rgb):
        raise BadInput(f"invalid --neutral {spec!r}; allowed: auto, checkpoint, gray, imagenet or R,G,B "
                       "with each value in [0, 1]")
    return rgb  # type: ignore[return-value]


def build_parser() -> argparse.ArgumentParser:
    p = job_parser("neuron_types", __doc__)
    p.add_argument("--from", dest="sources_from", action="append", metavar="URL",
                   help="analysis output (stimuli/mean.parquet) or jobs.reproduce root; repeatable")
    p.add_argument("--actmax", action="append", metavar="URL",
                   help="activation-maximization output folder (actmax.parquet); repeatable")
    p.add_argument("--checkpoint", action="append", metavar="[MODEL=]URL",
                   help="checkpoint whose first-conv filters to measure, one per model; "
                        "MODEL=URL names the architecture of a plain torchvision state_dict")
    p.add_argument("--sources", default=None,
                   help="comma list of filter, mean, actmax; unset: every source that has inputs")
    p.add_argument("--osi-threshold", type=float, default=0.5,
                   help="orientation-selective when the orientation selectivity index is >= this")
    p.add_argument("--chromatic-threshold", type=float, default=1 / 3,
                   help="a colour pattern when its chromatic share of the energy is >= this")
    p.add_argument("--double-opponent-threshold", type=float, default=0.5,
                   help="double-opponent (if a colour pattern) when the double-opponent score is >= this")
    p.add_argument("--neuron", default="center",
                   help="which mean preferred stimulus of stimuli/mean.parquet: center or all")
    p.add_argument("--neutral", default="auto",
                   help="colour with nothing preferred, the origin of the colour measures of mean "
                        "and actmax patterns: auto (mean stimuli: the data's mean colour estimated "
                        "from them; actmax: the preprocessing's zero, or a PNG's border colour), "
                        "checkpoint (mean stimuli: the checkpoint's preprocessing mean, else the "
                        "ImageNet mean), gray, imagenet or R,G,B in [0, 1]")
    p.add_argument("--chunk", type=int, default=0,
                   help="patterns per Ray task (0: as many as fit a fixed FFT memory budget)")
    p.add_argument("--out", required=True, help="output folder (local path or s3://...)")
    return p


# ----------------------------------------------------------------------------- input discovery
@dataclass
class Inputs:
    mean: list[str] = field(default_factory=list)          # mean.parquet URLs
    actmax: list[str] = field(default_factory=list)        # actmax.parquet URLs
    checkpoints: list[tuple[str | None, str]] = field(default_factory=list)   # (model, url)


def _subdirs(url: str) -> list[str]:
    from pipeline.tables import fs_path

    fs, path = fs_path(url)
    if not fs.exists(path):
        return []
    return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path, detail=False)
                  if fs.isdir(p))


def _checkpoint_arg(spec: str) -> tuple[str | None, str]:
    from pipeline.models import model_names

    m = re.match(r"^([a-z]+\d+)=(.+)$", spec)
    if m and m.group(1) in model_names():
        return m.group(1), m.group(2)
    return None, spec


def discover(cfg: NeuronTypesConfig) -> Inputs:
    """Resolve --from / --actmax / --checkpoint into table and checkpoint URLs (BadInput if absent)."""
    from pipeline.tables import exists, join

    found = Inputs()
    reproduce_roots = []
    for url in cfg.sources_from:
        if exists(join(url, "stimuli", "mean.parquet")):
            found.mean.append(join(url, "stimuli", "mean.parquet"))
            continue
        models = [m for m in _subdirs(join(url, "analysis"))
                  if exists(join(url, "analysis", m, "stimuli", "mean.parquet"))]
        if models:
            found.mean += [join(url, "analysis", m, "stimuli", "mean.parquet") for m in models]
            reproduce_roots.append(url)
        elif cfg.sources is None or "mean" in cfg.sources:
            raise BadInput(f"no mean table under --from {url}: expected {join(url, 'stimuli', 'mean.parquet')} "
                           f"or {join(url, 'analysis')}/<model>/stimuli/mean.parquet")
        else:
            reproduce_roots.append(url)
    for url in cfg.actmax:
        if exists(join(url, "actmax.parquet")):
            found.actmax.append(join(url, "actmax.parquet"))
        elif url.endswith(".parquet") and exists(url):
            found.actmax.append(url)
        else:
            raise BadInput(f"no actmax table at --actmax {url}: expected {join(url, 'actmax.parquet')}")
    for spec in cfg.checkpoints:
        model, url = _checkpoint_arg(spec)
        if not exists(url):
            raise BadInput(f"checkpoint not found: --checkpoint {url}")
        found.checkpoints.append((model, url))
    # A reproduce root also holds the other inputs; explicit flags win.
    for root in reproduce_roots:
        if not cfg.actmax:
            if exists(join(root, "actmax", "actmax.parquet")):
                found.actmax.append(join(root, "actmax", "actmax.parquet"))
            else:   # the per-model tables, before jobs.reproduce concatenates them
                found.actmax += [join(root, "actmax", m, "actmax.parquet")
                                 for m in _subdirs(join(root, "actmax"))
                                 if exists(join(root, "actmax", m, "actmax.parquet"))]
        if not cfg.checkpoints:
            for m in _subdirs(join(root, "train")):
                if exists(join(root, "train", m, "model.pt")):
                    found.checkpoints.append((m, join(root, "train", m, "model.pt")))
    return found


# ----------------------------------------------------------------------------- the work units
@dataclass(frozen=True)
class Task:
    """One chunk of patterns of one (source, model, layer); the worker reads its own rows."""

    source: str                                  # 'mean' | 'actmax'
    url: str                                     # the Parquet table
    model: str
    layer: str
    channels: tuple[int, int]                    # [lo, hi)
    neuron: str | None                           # mean: 'center' | 'all'
    neutral: tuple[float, float, float] | None   # None (actmax PNG): the image's border colour
    preprocess: dict | None                      # actmax: invert `input` with it when present
    thresholds: tuple[float, float, float]       # osi, chromatic, double_opponent


def _read_rows(url: str, columns: list[str], filters: list[tuple]) -> pa.Table:
    import pyarrow.parquet as pq

    from pipeline.tables import fs_path

    fs, path = fs_path(url)
    return pq.read_table(path, filesystem=fs, columns=columns, filters=filters or None)


def _columns(url: str) -> list[str]:
    import pyarrow.parquet as pq

    from pipeline.tables import fs_path

    fs, path = fs_path(url)
    with fs.open(path, "rb") as f:
        return pq.ParquetFile(f).schema_arrow.names


def _patterns(task: Task) -> tuple[np.ndarray, list[np.ndarray], list[tuple | None]]:
    """(channels, patterns (3, s, s) each, neutral per pattern) of one task: read its rows here,
    turn them into patterns in pipeline.neuron_patterns."""
    lo, hi = task.channels
    filters = [("model", "=", task.model), ("layer", "=", task.layer),
               ("channel", ">=", lo), ("channel", "<", hi)]
    where = f"{task.url}: {task.model} {task.layer}"
    if task.source == "mean":
        t = _read_rows(task.url, ["channel", "size", "mean"], filters + [("neuron", "=", task.neuron)])
        channels = t.column("channel").to_numpy()
        pats = mean_patterns(channels, t.column("size").to_numpy(), t.column("mean").to_pylist(), where)
        return channels, pats, [task.neutral] * len(pats)
    if "input" in _columns(task.url) and task.preprocess is not None:
        t = _read_rows(task.url, ["channel", "input"], filters)
        channels = t.column("channel").to_numpy()
        pats, neutrals = actmax_input_patterns(channels, t.column("input").to_pylist(),
                                               task.preprocess, task.neutral, where)
        return channels, pats, neutrals
    t = _read_rows(task.url, ["channel", "image"], filters)
    pats, neutrals = actmax_png_patterns(t.column("image").to_pylist(), task.neutral)
    return t.column("channel").to_numpy(), pats, neutrals


def run_task(task: Task) -> pa.Table:
    """The unit of work: read one chunk, measure it, return its rows."""
    from pipeline.neuron_types import Thresholds

    try:
        channels, pats, neutrals = _patterns(task)
    except PatternError as e:
        raise BadInput(str(e)) from None
    t = Thresholds(*task.thresholds)
    return measure_rows(task.model, task.layer, task.source, channels, pats, neutrals, t)


# ----------------------------------------------------------------------------- the driver
def _chunk_for(size: int, chunk: int) -> int:
    if chunk > 0:
        return chunk
    pad = max(64, 2 * size)
    return int(min(512, max(1, _FFT_BUDGET // (pad * pad))))


def load_filters(inputs: Inputs) -> tuple[dict[str, dict], list[tuple[str, list[np.ndarray], dict]]]:
    """Preprocessing state per model and (model, stimulus-space filters, preprocessing) per
    checkpoint: each filter as its expected mean preferred stimulus S·Aᵀw (filter_patterns)."""
    from pipeline.checkpoint import CheckpointError, load_checkpoint

    prep: dict[str, dict] = {}
    filters = []
    for model, url in inputs.checkpoints:
        try:
            loaded = load_checkpoint(url, model)
        except CheckpointError as e:
            raise BadInput(str(e)) from None
        if loaded.model_name in prep:
            raise BadInput(f"two checkpoints for {loaded.model_name}; give one --checkpoint per model")
        state = loaded.preprocess.state()
        prep[loaded.model_name] = state
        w = loaded.model.conv1.weight.detach().double().numpy()
        filters.append((loaded.model_name, filter_patterns(w, state), state))
    return prep, filters


def plan(cfg: NeuronTypesConfig, inputs: Inputs, prep: dict[str, dict]) -> list[Task]:
    """Cut the mean and actmax tables into tasks; the driver reads their key columns (and, for
    the `auto` neutral, the mean stimuli one layer at a time)."""
    import pyarrow.compute as pc

    fixed = parse_neutral(cfg.neutral)
    th = (cfg.osi_threshold, cfg.chromatic_threshold, cfg.double_opponent_threshold)
    wants = set(cfg.sources) if cfg.sources is not None else set(SOURCES)
    seen: dict[tuple[str, str, str], str] = {}
    groups: list[tuple[str, str, str, str, int, np.ndarray]] = []   # source, url, model, layer, size, channels

    def add(source: str, url: str, keys: pa.Table) -> None:
        df = keys.to_pandas()
        for (model, layer), g in df.groupby(["model", "layer"], sort=False):
            key = (source, model, layer)
            if key in seen and seen[key] != url:
                raise BadInput(f"{model} {layer} ({source}) appears in both {seen[key]} and {url}; "
                               "give each model's output once")
            seen[key] = url
            size = int(g["size"].max()) if "size" in g else 224
            groups.append((source, url, model, layer, size, np.sort(g["channel"].to_numpy())))

    if "mean" in wants:
        for url in inputs.mean:
            missing = {"model", "layer", "channel", "neuron", "size", "mean"} - set(_columns(url))
            if missing:
                raise BadInput(f"{url} is not a mean table: lacks column(s) {', '.join(sorted(missing))}")
            keys = _read_rows(url, ["model", "layer", "channel", "neuron", "size"], [])
            present = sorted(set(keys.column("neuron").to_pylist()))
            keys = keys.filter(pc.equal(keys.column("neuron"), cfg.neuron))
            if keys.num_rows == 0:
                raise BadInput(f"{url} has no rows for --neuron {cfg.neuron}; it holds: "
                               f"{', '.join(present) or 'no rows'}")
            add("mean", url, keys)
    if "actmax" in wants:
        for url in inputs.actmax:
            missing = {"model", "layer", "channel", "image"} - set(_columns(url))
            if missing:
                raise BadInput(f"{url} is not an actmax table: lacks column(s) {', '.join(sorted(missing))}")
            add("actmax", url, _read_rows(url, ["model", "layer", "channel"], []))

    mean_neutral: dict[str, tuple[float, float, float]] = {}
    for model in sorted({g[2] for g in groups if g[0] == "mean"}):
        if fixed is not None:
            mean_neutral[model] = fixed
        elif cfg.neutral == "checkpoint":
            mean_neutral[model] = tuple(prep.get(model, {}).get("mean", IMAGENET_MEAN))  # type: ignore[assignment]
        else:
            mean_neutral[model] = read_neutral(
                [(g[1], g[3]) for g in groups if g[0] == "mean" and g[2] == model], model, cfg.neuron)

    tasks = []
    for source, url, model, layer, size, chans in groups:
        if source == "mean":
            neutral, pre = mean_neutral[model], None
        else:
            # With `input` and the model's preprocessing the neutral is the preprocessing's zero
            # (exact); the display-stretched PNG takes its border colour, unless one is given.
            neutral, pre = fixed, prep.get(model)
        step = _chunk_for(size, cfg.chunk)
        for i in range(0, len(chans), step):
            part = chans[i:i + step]
            tasks.append(Task(source, url, model, layer, (int(part[0]), int(part[-1]) + 1),
                              cfg.neuron if source == "mean" else None, neutral, pre, th))
    return tasks


def read_neutral(parts: list[tuple[str, str]], model: str, neuron: str) -> tuple[float, float, float]:
    """The analysed data's mean colour estimated from the mean stimuli (`data_neutral`), read
    one layer at a time so that memory stays bounded by the largest layer."""
    colours = []
    for url, layer in parts:
        t = _read_rows(url, ["size", "mean"], [("model", "=", model), ("layer", "=", layer),
                                                ("neuron", "=", neuron)])
        colours += mean_colours(t.column("size").to_pylist(), t.column("mean").to_pylist())
    return data_neutral(colours)


def run(cfg: NeuronTypesConfig) -> dict:
    import ray

    from pipeline.tables import join, write_json, write_table

    sw = Stopwatch()
    t0 = time.time()
    with sw("discover"):
        inputs = discover(cfg)
        wants = set(cfg.sources) if cfg.sources is not None else set(SOURCES)
        if cfg.sources is not None:
            if "actmax" in wants and not inputs.actmax:
                raise BadInput("--sources has 'actmax' but no actmax table was found; give --actmax")
            if "filter" in wants and not inputs.checkpoints:
                raise BadInput("--sources has 'filter' but no checkpoint was found; give --checkpoint")
        prep, filters = load_filters(inputs)
        tasks = plan(cfg, inputs, prep)
    check_writable(cfg.out)
    for source, have in (("filter", bool(filters)), ("actmax", bool(inputs.actmax))):
        if source in wants and not have:
            log(f"neuron_types: no {source} input, skipping the '{source}' source")
    parts: list[pa.Table] = []
    with sw("filter"):
        if "filter" in wants:
            th = cfg.thresholds()
            for model, pats, _ in filters:
                # A filter's stimulus is relative to the data's mean colour: its neutral is 0.
                parts.append(measure_rows(model, "conv1", "filter", range(len(pats)), pats,
                                          [None] * len(pats), th))
    with sw("measure"):
        if tasks:
            init_ray()
            remote = ray.remote(num_cpus=1, max_retries=2)(run_task)
            refs = [remote.remote(t) for t in tasks]
            log(f"neuron_types: {len(tasks)} task(s) over {len({(t.source, t.model, t.layer) for t in tasks})} "
                f"(source, model, layer) group(s)")
            try:
                parts += ray.get(refs)
            except ray.exceptions.RayTaskError as e:
                cause = e.cause if isinstance(getattr(e, "cause", None), Exception) else None
                if isinstance(cause, BadInput):
                    raise cause from None
                raise
    rows = sort_rows(pa.concat_tables(parts) if parts else OUT_SCHEMA.empty_table())
    summary = summarise(rows)
    with sw("write"):
        write_table(rows, join(cfg.out, "neuron_types.parquet"), OUT_SCHEMA)
        write_table(summary, join(cfg.out, "summary.parquet"), SUMMARY_SCHEMA)
        info = {
            "job": "neuron_types",
            "config": asdict(cfg),
            "inputs": {"mean": inputs.mean, "actmax": inputs.actmax,
                       "checkpoints": [u for _, u in inputs.checkpoints]},
            "counts": {"patterns": rows.num_rows, "tasks": len(tasks)},
            "versions": package_versions(),
            "wall_s": time.time() - t0,
            "stages_s": sw.seconds,
        }
        write_json(join(cfg.out, "run.json"), info)
    print(format_summary(summary), flush=True)
    return info


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    with bad_input_exits(PROG):
        cfg = NeuronTypesConfig.from_args(args)
        run(cfg)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
