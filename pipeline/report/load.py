"""What the report reads: every table under a results root, as `ReportInputs`.

The one module of the report package that opens files (through pipeline.results.tables); the rest draws
from the tables it returns. Paths come from `pipeline.results.layout` (the tree `jobs.reproduce` writes,
training seed 0); a single job's output folder works too (receptive_fields.parquet and stimuli/
at its top, or actmax.parquet, ablation.parquet ... at its top).

    inputs = load_inputs("s3://bucket/run1", warn=print)   # ReportInputError: nothing usable

Absent parts stay None and are named in `inputs.missing` (their section says "not available").
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import pyarrow as pa

from pipeline.results import layout
from pipeline.report.data import ReportInputs
from pipeline.report.order import order_models
from pipeline.results.tables import exists, fs_path, join, read_json, read_table

__all__ = ["ReportInputError", "load_inputs", "first_conv_filters"]

_STIMULI = ("topk", "mean", "channels", "baseline")


class ReportInputError(ValueError):
    """The results root is absent or a table in it is unreadable: the message names the file."""


def _subdirs(url: str) -> list[str]:
    fs, path = fs_path(url)
    if not fs.exists(path):
        return []
    return sorted(e["name"].rstrip("/").rsplit("/", 1)[-1] for e in fs.ls(path, detail=True)
                  if e.get("type") == "directory")


def _read(url: str, drop: tuple[str, ...] = ()) -> pa.Table | None:
    """The table at `url` without the columns in `drop`, None when there is no file."""
    import pyarrow.parquet as pq

    if not exists(url):
        return None
    try:
        columns = None
        if drop:
            fs, path = fs_path(url)
            columns = [n for n in pq.read_schema(path, filesystem=fs).names if n not in drop]
        return read_table(url, columns=columns)
    except Exception as e:  # noqa: BLE001 - name the file, whatever pyarrow/fsspec raised
        first = str(e).splitlines()[0] if str(e) else ""
        raise ReportInputError(f"{url} is not a readable Parquet table "
                               f"({e.__class__.__name__}: {first})") from None


def _first(*urls: str, drop: tuple[str, ...] = ()) -> pa.Table | None:
    return next((t for t in (_read(u, drop) for u in urls) if t is not None), None)


def _concat(tables: list[pa.Table | None]) -> pa.Table | None:
    tables = [t for t in tables if t is not None]
    return pa.concat_tables(tables, promote_options="permissive") if tables else None


def _load_analysis(out: str, inputs: ReportInputs) -> None:
    """One analysis folder per model (reproduce layout), or a single jobs.analyze output."""
    dirs = {m: layout.analysis_dir(out, m) for m in _subdirs(layout.stage_dir(out, "analysis"))}
    if exists(join(out, "receptive_fields.parquet")) or exists(join(out, "stimuli")):
        dirs["analysis"] = out
    parts: dict[str, list] = {k: [] for k in ("rf", *_STIMULI)}
    for name, d in dirs.items():
        parts["rf"].append(_read(join(d, "receptive_fields.parquet")))
        for t in _STIMULI:
            parts[t].append(_read(layout.stimuli_table(d, t)))
        if exists(join(d, "run.json")):
            inputs.runs[name] = read_json(join(d, "run.json"))
    inputs.rf, inputs.topk = _concat(parts["rf"]), _concat(parts["topk"])
    inputs.mean, inputs.channels = _concat(parts["mean"]), _concat(parts["channels"])
    inputs.baseline = _concat(parts["baseline"])
    if not dirs:
        inputs.missing["analysis"] = f"no {layout.stage_dir(out, 'analysis')}/<model>/"


def _load_results(out: str, inputs: ReportInputs) -> None:
    """actmax, ablation and neuron-type tables: the combined ones, else at the top."""
    # `input` holds each optimised model input as floats (MBs per row at 224 px): not needed.
    inputs.actmax = _first(layout.combined(out, "actmax", "actmax"), join(out, "actmax.parquet"),
                           drop=("input",))
    if inputs.actmax is None:
        inputs.missing["actmax"] = f"no {layout.combined(out, 'actmax', 'actmax')}"
    for name in ("table1", "ablation", "census"):
        setattr(inputs, name, _first(layout.combined(out, "ablation", name),
                                     join(out, f"{name}.parquet")))
    if inputs.table1 is None and inputs.ablation is None:
        inputs.missing["ablation"] = f"no {layout.combined(out, 'ablation', 'table1')}"
    summary = join(layout.neuron_types_dir(out), "summary.parquet")
    inputs.neuron_types = _read(summary)
    if inputs.neuron_types is None:
        inputs.missing["neuron_types"] = f"no {summary}"
    inputs.properties = _read(join(layout.neuron_types_dir(out), "properties.parquet"))
    rows = join(layout.neuron_types_dir(out), "neuron_types.parquet")
    if exists(rows):      # only what the figures need: which channels have no structure
        inputs.type_rows = read_table(rows, columns=["model", "layer", "source", "channel",
                                                     "type"])


def _load_compare(out: str, inputs: ReportInputs) -> None:
    """jobs.compare's tables: under compare/ (reproduce layout), else at the top (its --out)."""
    for name in ("cka", "matches", "selectivity"):
        setattr(inputs, name, _first(layout.compare_table(out, name), join(out, f"{name}.parquet")))
    if inputs.cka is None:
        inputs.missing["compare"] = (f"no {layout.compare_table(out, 'cka')}: the chain compares "
                                     "two ResNet-family models; else run python -m jobs.compare")


def first_conv_filters(url: str, model: str) -> tuple[np.ndarray | None, str]:
    """A checkpoint's first convolution on RGB input (`conv1` of a ResNet, `features.0` of a
    VGG) in stimulus space, as the neuron-type census measures it
    (`pipeline.census.patterns.stimulus_filters`); else (None, why)."""
    from pipeline.models.checkpoint import CheckpointError, load_checkpoint
    from pipeline.census.patterns import stimulus_filters

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


def _load_train(out: str, inputs: ReportInputs, warn: Callable[[str], None]) -> None:
    """Per trained model: its metrics and its checkpoint's first-conv filters."""
    for model in order_models(_subdirs(layout.stage_dir(out, "train"))):
        metrics = _read(layout.metrics(out, model))
        if metrics is not None:
            inputs.metrics[model] = metrics
        if exists(layout.checkpoint(out, model)):
            weight, why = first_conv_filters(layout.checkpoint(out, model), model)
            if weight is None:
                warn(why)
            else:
                inputs.filters[model] = weight
    if not inputs.metrics:
        inputs.missing["train"] = f"no {layout.stage_dir(out, 'train')}/<model>/metrics.parquet"


def load_inputs(out: str, warn: Callable[[str], None] = lambda msg: None) -> ReportInputs:
    """Every table the report shows from a results root; absent parts stay None."""
    fs, path = fs_path(out)
    if not fs.exists(path):
        raise ReportInputError(f"results folder {out} does not exist; give the --out of "
                               "jobs.reproduce")
    inputs = ReportInputs(source=out)
    _load_analysis(out, inputs)
    _load_results(out, inputs)
    _load_compare(out, inputs)
    _load_train(out, inputs, warn)
    tables = [inputs.rf, inputs.topk, inputs.mean, inputs.channels, inputs.actmax, inputs.table1,
              inputs.ablation, inputs.neuron_types, inputs.cka]
    if all(t is None for t in tables) and not inputs.metrics and not inputs.filters:
        raise ReportInputError(f"no results under {out}: expected analysis/<model>/stimuli/"
                               "*.parquet, ablation/table1.parquet, actmax/actmax.parquet, "
                               "train/<model>/, neuron_types/summary.parquet or "
                               "compare/cka.parquet")
    return inputs
