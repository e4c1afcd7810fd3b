"""Neuron-type census, the input side: find the tables and checkpoints, cut them into chunks,
read one chunk's rows and measure them. No Ray: `jobs.neuron_types` runs `measure_chunk` as the
engine's unit of work.

    found = discover(froms, actmax, checkpoints, want_mean=True)   # URLs; a reproduce root
                                                                    # through pipeline.results.layout
    prep, filters = load_filters(found.checkpoints)                # first conv, stimulus space
    chunks = plan_chunks(found, wants, neuron, neutral, prep, thresholds, chunk=0)
    rows = measure_chunk(chunks[0])      # reads only its own rows (pyarrow filters) -> OUT_SCHEMA

Bad input (a missing table or checkpoint, lacking columns, the same layer in two inputs, a
malformed row) raises `InputError` or `PatternError` (ValueErrors whose message names the file
and what is allowed); the job turns them into exit 2. Turning rows into patterns and measures is
`pipeline.census.patterns`.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import pyarrow as pa

from pipeline.results import catalog, layout
from pipeline.census.patterns import (IMAGENET_MEAN, SOURCES, PatternError,
                                      actmax_input_patterns, actmax_image_patterns,
                                      colour_covariance, data_neutral, mean_colours, mean_noise,
                                      mean_patterns, measure_rows, stimulus_filters)
from pipeline.results.png import decode_png
from pipeline.results.tables import exists, fs_path, join

__all__ = ["NEUTRALS", "InputError", "Inputs", "Chunk", "parse_neutral", "check_options",
           "parse_checkpoint", "discover", "load_filters", "first_conv_filters", "filter_rows",
           "plan_chunks",
           "read_neutral", "measure_chunk", "stamp"]

NEUTRALS = {"gray": (0.5, 0.5, 0.5), "imagenet": IMAGENET_MEAN}
_FFT_BUDGET = 2 ** 23   # chunk=0: as many patterns as keep one chunk's padded FFT near this size
_RGB = tuple[float, float, float]


class InputError(ValueError):
    """The census's inputs are missing or malformed: the message names the file."""


@dataclass
class Inputs:
    mean: list[str] = field(default_factory=list)        # mean.parquet URLs
    baseline: dict[str, str] = field(default_factory=dict)   # mean URL -> its baseline.parquet
    actmax: list[str] = field(default_factory=list)      # actmax.parquet URLs
    checkpoints: list[tuple[str | None, str]] = field(default_factory=list)   # (model, url)


@dataclass(frozen=True)
class Chunk:
    """Channels [lo, hi) of one (source, model, layer); the worker reads its own rows."""

    source: str                          # 'mean' | 'actmax'
    url: str                             # the Parquet table
    model: str
    layer: str
    channels: tuple[int, int]
    neuron: str | None                   # mean: 'center' | 'all'
    neutral: _RGB | None                 # None (actmax PNG): the image's border colour
    preprocess: dict | None              # actmax: invert `input` with it when present
    thresholds: tuple[float, float, float]   # osi, chromatic, double_opponent
    baseline: str | None = None          # mean: stimuli/baseline.parquet, the null; None: none
    covariance: tuple[float, ...] | None = None   # mean: the data's colour covariance (9 values)

    @property
    def name(self) -> str:
        """A file-name-safe unit name; sorted names keep (source, model, layer) together."""
        return (f"{self.source}-{self.model}-{self.layer}-"
                f"{self.channels[0]:05d}-{self.channels[1]:05d}")


def parse_neutral(spec: str) -> _RGB | None:
    """'auto' | 'checkpoint' -> None (decided per source and model); 'gray' | 'imagenet' |
    'R,G,B' -> that RGB colour."""
    if spec in ("auto", "checkpoint"):
        return None
    if spec in NEUTRALS:
        return NEUTRALS[spec]
    try:
        rgb = tuple(float(v) for v in spec.split(","))
    except ValueError:
        rgb = ()
    if len(rgb) != 3 or not all(0.0 <= v <= 1.0 for v in rgb):
        raise InputError(f"invalid --neutral {spec!r}; allowed: auto, checkpoint, gray, imagenet "
                         "or R,G,B with each value in [0, 1]")
    return rgb  # type: ignore[return-value]


def check_options(sources: Sequence[str] | None, neutral: str,
                  thresholds: tuple[float, float, float]) -> None:
    """The census options that need no input: InputError (a ValueError) names what is allowed."""
    from pipeline.census.types import Thresholds

    bad = [s for s in sources or () if s not in SOURCES]
    if bad or sources == ():
        raise InputError((f"unknown source {bad[0]!r} in --sources" if bad else
                          "--sources is empty") + f"; allowed: {', '.join(SOURCES)}")
    parse_neutral(neutral)
    try:
        Thresholds(*thresholds)
    except ValueError as e:
        raise InputError(f"{e} (flags --osi-threshold, --chromatic-threshold, "
                         "--double-opponent-threshold)") from None


def filter_rows(filters: Sequence[tuple], thresholds: tuple[float, float, float],
                prep: dict[str, dict] | None = None) -> list[pa.Table]:
    """Measured rows of `load_filters`' (model, layer, patterns, noises) (tiny: no chunks); a
    filter's neutral is 0, its stimulus being relative to the data's mean colour, and its noise
    is in units of its model's colour covariance."""
    from pipeline.census.types import Thresholds

    prep = prep or {}
    return [measure_rows(model, layer, "filter", range(len(pats)), pats, [None] * len(pats),
                         Thresholds(*thresholds), list(noise), None,
                         colour_covariance(prep.get(model))[0])
            for model, layer, pats, noise in filters]


def parse_checkpoint(spec: str) -> tuple[str | None, str]:
    """'MODEL=URL' (MODEL a supported architecture) -> (MODEL, URL); else (None, spec)."""
    from pipeline.models.zoo import supported_models

    m = re.match(r"^([A-Za-z][A-Za-z0-9_]*)=(.+)$", spec)
    if m and m.group(1) in supported_models():
        return m.group(1), m.group(2)
    return None, spec


def _subdirs(url: str) -> list[str]:
    fs, path = fs_path(url)
    if not fs.exists(path):
        return []
    return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path, detail=False)
                  if fs.isdir(p))


def _root_models(root: str, stage: str, exists_for) -> list[str]:
    """The models of a reproduce root's <stage>/ (seed 0) whose file `exists_for(m)` exists."""
    return [m for m in _subdirs(layout.stage_dir(root, stage)) if exists(exists_for(m))]


def discover(froms: Sequence[str], actmax: Sequence[str], checkpoints: Sequence[str],
             want_mean: bool, require: Sequence[str] = ()) -> Inputs:
    """--from / --actmax / --checkpoint -> table and checkpoint URLs. A --from is an analysis
    output (stimuli/mean.parquet at its top) or a jobs.reproduce root (pipeline.results.layout, training
    seed 0), whose actmax tables and checkpoints are found too unless given explicitly.
    `require`: the sources asked for by name ('actmax', 'filter'), whose inputs must exist."""
    found, roots = Inputs(), []
    for url in froms:
        if exists(layout.stimuli_table(url, "mean")):
            found.mean.append(layout.stimuli_table(url, "mean"))
            _baseline(found, found.mean[-1])
            continue
        models = _root_models(url, "analysis", lambda m: layout.stimuli(url, m, "mean"))
        if not models and want_mean:
            raise InputError(f"no mean table under --from {url}: expected "
                             f"{layout.stimuli_table(url, 'mean')} or "
                             f"{layout.stage_dir(url, 'analysis')}/<model>/stimuli/mean.parquet")
        found.mean += [layout.stimuli(url, m, "mean") for m in models]
        for m in models:
            _baseline(found, layout.stimuli(url, m, "mean"))
        roots.append(url)
    for url in actmax:
        if exists(catalog.ACTMAX.at(url)):
            found.actmax.append(catalog.ACTMAX.at(url))
        elif url.endswith(".parquet") and exists(url):
            found.actmax.append(url)
        else:
            raise InputError(f"no actmax table at --actmax {url}: expected "
                             f"{catalog.ACTMAX.at(url)}")
    for spec in checkpoints:
        model, url = parse_checkpoint(spec)
        if not exists(url):
            raise InputError(f"checkpoint not found: --checkpoint {url}")
        found.checkpoints.append((model, url))
    for root in roots:      # explicit flags win over what a reproduce root holds
        if not actmax:
            combined = layout.combined(root, "actmax", "actmax")
            found.actmax += [combined] if exists(combined) else [   # per-model, before concat
                layout.actmax_table(root, m) for m in _root_models(
                    root, "actmax", lambda m: layout.actmax_table(root, m))]
        if not checkpoints:
            found.checkpoints += [(m, layout.checkpoint(root, m)) for m in _root_models(
                root, "train", lambda m: layout.checkpoint(root, m))]
    for source, have, what, flag in (("actmax", found.actmax, "actmax table", "--actmax"),
                                     ("filter", found.checkpoints, "checkpoint", "--checkpoint")):
        if source in require and not have:
            raise InputError(f"--sources has '{source}' but no {what} was found; give {flag}")
    return found


def _baseline(found: Inputs, mean_url: str) -> None:
    """Record the baseline table beside a mean table (stimuli/baseline.parquet), if any."""
    url = join(mean_url.rsplit("/", 1)[0], catalog.BASELINE.file)     # beside mean.parquet
    if exists(url):
        found.baseline[mean_url] = url


def load_filters(checkpoints: Sequence[tuple[str | None, str]]
                 ) -> tuple[dict[str, dict], list[tuple[str, str, list[np.ndarray]]]]:
    """Preprocessing state per model, and (model, layer, stimulus-space filters, their noise)
    per checkpoint whose model has a first conv on RGB input (`stimulus_filters`)."""
    from pipeline.models.checkpoint import CheckpointError, load_checkpoint

    prep: dict[str, dict] = {}
    filters = []
    for model, url in checkpoints:
        try:
            loaded = load_checkpoint(url, model)
        except CheckpointError as e:
            raise InputError(str(e)) from None
        if loaded.model_name in prep:
            raise InputError(f"two checkpoints for {loaded.model_name}; give one --checkpoint "
                             "per model")
        prep[loaded.model_name] = state = loaded.preprocess.state()
        found = stimulus_filters(loaded.model, state)
        if found is not None:
            filters.append((loaded.model_name, found[0], list(found[1]), found[2]))
    return prep, filters


def first_conv_filters(url: str, model: str) -> tuple[np.ndarray | None, str]:
    """A checkpoint's first convolution on RGB input (`conv1` of a ResNet, `features.0` of a
    VGG) in stimulus space, as the neuron-type census measures it (`stimulus_filters`); else
    (None, why). The report's filter figures (jobs.report passes it to its loader)."""
    from pipeline.models.checkpoint import CheckpointError, load_checkpoint

    try:
        loaded = load_checkpoint(url, model_name=model)
    except CheckpointError:
        try:  # a checkpoint saved under another model name still has a first conv
            loaded = load_checkpoint(url)
        except CheckpointError as e:
            return None, f"skipping the first-conv filters of {model}: {e}"
    found = stimulus_filters(loaded.model, loaded.preprocess.state())   # effective: sign of γ
    if found is None:
        return None, f"skipping the first-conv filters of {model}: no convolution on RGB input"
    return found[1], ""


def read_rows(url: str, columns: list[str], filters: list[tuple] | None = None) -> pa.Table:
    import pyarrow.parquet as pq

    fs, path = fs_path(url)
    return pq.read_table(path, filesystem=fs, columns=columns, filters=filters or None)


def _columns(url: str) -> list[str]:
    import pyarrow.parquet as pq

    fs, path = fs_path(url)
    with fs.open(path, "rb") as f:
        return pq.ParquetFile(f).schema_arrow.names


def stamp(url: str) -> list:
    """Size and modification stamp of a file: a fingerprint part, so changed inputs start afresh."""
    fs, path = fs_path(url)
    info = fs.info(path)
    return [url, info.get("size"), str(info.get("mtime") or info.get("LastModified")
                                       or info.get("ETag") or "")]


def _need(url: str, cols: set[str], what: str) -> None:
    missing = cols - set(_columns(url))
    if missing:
        raise InputError(f"{url} is not {what} table: lacks column(s) {', '.join(sorted(missing))}")


def _groups(found: Inputs, wants: set[str], neuron: str) -> list[tuple]:
    """(source, url, model, layer, size, sorted channels) per layer of every table, in table
    order; the driver reads only the key columns."""
    import pyarrow.compute as pc

    tables = []
    for url in found.mean if "mean" in wants else []:
        _need(url, {"model", "layer", "channel", "neuron", "size", "mean", "count", "images"},
              "a mean")
        keys = read_rows(url, ["model", "layer", "channel", "neuron", "size"])
        present = sorted(set(keys.column("neuron").to_pylist()))
        keys = keys.filter(pc.equal(keys.column("neuron"), neuron))
        if keys.num_rows == 0:
            raise InputError(f"{url} has no rows for --neuron {neuron}; it holds: "
                             f"{', '.join(present) or 'no rows'}")
        tables.append(("mean", url, keys))
    for url in found.actmax if "actmax" in wants else []:
        _need(url, {"model", "layer", "channel", "image"}, "an actmax")
        tables.append(("actmax", url, read_rows(url, ["model", "layer", "channel"])))
    seen: dict[tuple[str, str, str], str] = {}
    groups = []
    for source, url, keys in tables:
        for (model, layer), g in keys.to_pandas().groupby(["model", "layer"], sort=False):
            if seen.setdefault((source, model, layer), url) != url:
                raise InputError(f"{model} {layer} ({source}) appears in both "
                                 f"{seen[(source, model, layer)]} and {url}; give each model's "
                                 "output once")
            size = int(g["size"].max()) if "size" in g else 224
            groups.append((source, url, model, layer, size, np.sort(g["channel"].to_numpy())))
    return groups


def read_neutral(parts: list[tuple[str, str]], model: str, neuron: str) -> _RGB:
    """The analysed data's mean colour estimated from the mean stimuli (`data_neutral`), read
    one layer at a time so that memory stays bounded by the largest layer."""
    colours = []
    for url, layer in parts:
        t = read_rows(url, ["size", "mean"], [("model", "=", model), ("layer", "=", layer),
                                               ("neuron", "=", neuron)])
        colours += mean_colours(t.column("size").to_pylist(), t.column("mean").to_pylist())
    return data_neutral(colours)


def plan_chunks(found: Inputs, wants: set[str], neuron: str, neutral: str,
                prep: dict[str, dict], thresholds: tuple[float, float, float],
                chunk: int = 0) -> list[Chunk]:
    """Cut the mean and actmax tables into chunks of `chunk` channels (0: by FFT size), each
    with its neutral colour (module docstring of pipeline.census.patterns; docs/neuron_types.md)."""
    fixed = parse_neutral(neutral)
    groups = _groups(found, wants, neuron)
    mean_neutral: dict[str, _RGB] = {}
    for model in sorted({g[2] for g in groups if g[0] == "mean"}):
        if fixed is not None:
            mean_neutral[model] = fixed
        elif neutral == "checkpoint":
            mean_neutral[model] = tuple(prep.get(model, {}).get("mean", IMAGENET_MEAN))
        else:
            mean_neutral[model] = read_neutral(
                [(g[1], g[3]) for g in groups if g[0] == "mean" and g[2] == model], model, neuron)
    out = []
    for source, url, model, layer, size, chans in groups:
        # actmax: with `input` and the model's preprocessing the neutral is the preprocessing's
        # zero (exact); the display-stretched PNG takes its border colour, unless one is given.
        nt, pre = (mean_neutral[model], None) if source == "mean" else (fixed, prep.get(model))
        extra = ({"baseline": found.baseline.get(url), "covariance": tuple(
            colour_covariance(prep.get(model))[0].ravel().tolist())} if source == "mean" else {})
        step = chunk if chunk > 0 else int(min(512, max(1, _FFT_BUDGET // max(64, 2 * size) ** 2)))
        for i in range(0, len(chans), step):
            part = chans[i:i + step]
            out.append(Chunk(source, url, model, layer, (int(part[0]), int(part[-1]) + 1),
                             neuron if source == "mean" else None, nt, pre, thresholds, **extra))
    return out


def _baseline_row(c: Chunk, size: int) -> tuple[np.ndarray, np.ndarray, int] | None:
    """(mean, weight, images) of the chunk's baseline row (model, layer, neuron), or None when
    there is no baseline table or it has no such row (the rows' `reference` then says
    `neutral`); two rows or another size are a malformed table."""
    if c.baseline is None:
        return None
    t = read_rows(c.baseline, ["size", "mean", "weight", "images"],
                  [("model", "=", c.model), ("layer", "=", c.layer), ("neuron", "=", c.neuron)])
    if t.num_rows == 0:
        return None
    if t.num_rows != 1 or int(t.column("size")[0].as_py()) != size:
        raise PatternError(f"{c.baseline}: expected one baseline row of size {size} for "
                           f"{c.model} {c.layer} neuron {c.neuron}, found {t.num_rows}")
    mean = mean_patterns([-1], [size], [t.column("mean")[0].as_py()], c.baseline)[0]
    weight = np.asarray(t.column("weight")[0].as_py(), dtype=np.float64)
    return mean, weight, int(t.column("images")[0].as_py())


def _mean_chunk(c: Chunk, where: list, label: str) -> tuple:
    """A chunk of mean stimuli with their sampling noise and (when there is one) baseline."""
    cols = ["channel", "size", "mean", "count", "images"]
    cols += ["weight"] if "weight" in _columns(c.url) else []
    t = read_rows(c.url, cols, where + [("neuron", "=", c.neuron)])
    channels, sizes = t.column("channel").to_numpy(), t.column("size").to_numpy()
    pats = mean_patterns(channels, sizes, t.column("mean").to_pylist(), label)
    weights = (t.column("weight").to_pylist() if "weight" in cols else  # older tables: count
               [np.full(3 * int(s) ** 2, float(n)) for s, n in zip(sizes, t.column("count").to_pylist())])
    base = _baseline_row(c, int(sizes[0])) if len(sizes) else None
    noises = mean_noise(weights, t.column("images").to_pylist(),
                        None if base is None else (base[1], base[2]))
    refs = [None if base is None else base[0]] * len(pats)
    return channels, pats, [c.neutral] * len(pats), noises, refs


def _patterns(c: Chunk) -> tuple:
    """(channels, (3, s, s) patterns, neutral per pattern, sampling noise per pattern or None,
    reference patch per pattern or None) of one chunk, read here."""
    lo, hi = c.channels
    where = [("model", "=", c.model), ("layer", "=", c.layer),
             ("channel", ">=", lo), ("channel", "<", hi)]
    label = f"{c.url}: {c.model} {c.layer}"
    if c.source == "mean":
        return _mean_chunk(c, where, label)
    if c.preprocess is not None and "input" in _columns(c.url):
        t = read_rows(c.url, ["channel", "input"], where)
        channels = t.column("channel").to_numpy()
        return (channels, *actmax_input_patterns(channels, t.column("input").to_pylist(),
                                                 c.preprocess, c.neutral, label), None, None)
    t = read_rows(c.url, ["channel", "image"], where)
    return (t.column("channel").to_numpy(),
            *actmax_image_patterns([decode_png(b) for b in t.column("image").to_pylist()],
                                   c.neutral), None, None)


def measure_chunk(c: Chunk) -> pa.Table:
    """The unit of work: read one chunk's rows, measure them, return OUT_SCHEMA rows."""
    from pipeline.census.types import Thresholds

    channels, pats, neutrals, noises, refs = _patterns(c)
    cov = None if c.covariance is None else np.asarray(c.covariance).reshape(3, 3)
    return measure_rows(c.model, c.layer, c.source, channels, pats, neutrals,
                        Thresholds(*c.thresholds), noises, refs, cov)
