"""What the report reads: every table under a results root, as `ReportInputs`.

The one module of the report package that opens files (through pipeline.results.tables); the rest draws
from the tables it returns. Where each table lies: `pipeline.results.layout` (the tree
`jobs.reproduce` writes, training seed 0) and `pipeline.results.catalog` (each table's file under
a job's --out); a single job's output folder works too (receptive_fields.parquet and stimuli/ at
its top, or actmax.parquet, ablation.parquet ... at its top). The report computes nothing from
a model: the first-conv filters, read from checkpoints, come through `filters` (jobs.report
passes `pipeline.census.inputs.first_conv_filters`).

    inputs = load_inputs("s3://bucket/run1", warn=print, filters=first_conv_filters)

Absent parts stay None and are named in `inputs.missing` (their section says "not available");
a table that is there but unreadable raises ReportInputError naming the file.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import pyarrow as pa

from pipeline.models.order import order_models
from pipeline.report.data import ReportInputs
from pipeline.results import catalog, layout
from pipeline.results.tables import exists, fs_path, join, read_json, read_table

__all__ = ["ReportInputError", "load_inputs", "Filters"]

# ReportInputs field <- the analysis table it holds
_STIMULI = {"topk": catalog.TOPK, "mean": catalog.MEAN, "channels": catalog.CHANNELS,
            "baseline": catalog.BASELINE}
# (checkpoint URL, model) -> (first-conv filters in stimulus space or None, why not)
Filters = Callable[[str, str], "tuple[np.ndarray | None, str]"]


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
    if exists(catalog.RECEPTIVE_FIELDS.at(out)) or exists(join(out, "stimuli")):
        dirs["analysis"] = out
    parts: dict[str, list] = {k: [] for k in ("rf", *_STIMULI)}
    for name, d in dirs.items():
        parts["rf"].append(_read(catalog.RECEPTIVE_FIELDS.at(d)))
        for field, table in _STIMULI.items():
            parts[field].append(_read(table.at(d)))
        if exists(join(d, "run.json")):
            inputs.runs[name] = read_json(join(d, "run.json"))
    inputs.rf = _concat(parts["rf"])
    for field in _STIMULI:
        setattr(inputs, field, _concat(parts[field]))
    if not dirs:
        inputs.missing["analysis"] = f"no {layout.stage_dir(out, 'analysis')}/<model>/"


def _load_results(out: str, inputs: ReportInputs) -> None:
    """actmax, ablation and neuron-type tables: the combined ones, else at the top."""
    # `input` holds each optimised model input as floats (MBs per row at 224 px): not needed.
    inputs.actmax = _first(layout.combined(out, "actmax", "actmax"), catalog.ACTMAX.at(out),
                           drop=("input",))
    if inputs.actmax is None:
        inputs.missing["actmax"] = f"no {layout.combined(out, 'actmax', 'actmax')}"
    for name in ("table1", "ablation", "census"):
        setattr(inputs, name, _first(layout.combined(out, "ablation", name),
                                     catalog.TABLES[name].at(out)))
    if inputs.table1 is None and inputs.ablation is None:
        inputs.missing["ablation"] = f"no {layout.combined(out, 'ablation', 'table1')}"
    summary = layout.neuron_types_table(out, "summary")
    inputs.neuron_types = _read(summary)
    if inputs.neuron_types is None:
        inputs.missing["neuron_types"] = f"no {summary}"
    inputs.properties = _read(layout.neuron_types_table(out, "properties"))
    rows = layout.neuron_types_table(out, "neuron_types")
    if exists(rows):      # only what the figures need: which channels have no structure
        inputs.type_rows = read_table(rows, columns=["model", "layer", "source", "channel",
                                                     "type"])


def _load_compare(out: str, inputs: ReportInputs) -> None:
    """jobs.compare's tables: under compare/ (reproduce layout), else at the top (its --out)."""
    for table in (catalog.CKA, catalog.MATCHES, catalog.SELECTIVITY):
        setattr(inputs, table.name, _first(layout.compare_table(out, table.name), table.at(out)))
    if inputs.cka is None:
        inputs.missing["compare"] = (f"no {layout.compare_table(out, 'cka')}: the chain compares "
                                     "two ResNet-family models; else run python -m jobs.compare")


def _load_train(out: str, inputs: ReportInputs, warn: Callable[[str], None],
                filters: Filters | None) -> None:
    """Per trained model: its metrics and (with `filters`) its checkpoint's first-conv filters."""
    for model in order_models(_subdirs(layout.stage_dir(out, "train"))):
        metrics = _read(layout.metrics(out, model))
        if metrics is not None:
            inputs.metrics[model] = metrics
        if filters is not None and exists(layout.checkpoint(out, model)):
            weight, why = filters(layout.checkpoint(out, model), model)
            if weight is None:
                warn(why)
            else:
                inputs.filters[model] = weight
    if not inputs.metrics:
        inputs.missing["train"] = f"no {layout.metrics(out, '<model>')}"


def load_inputs(out: str, warn: Callable[[str], None] = lambda msg: None,
                filters: Filters | None = None) -> ReportInputs:
    """Every table the report shows from a results root; absent parts stay None. `filters`
    reads a checkpoint's first-conv filters (None: no filter figures)."""
    fs, path = fs_path(out)
    if not fs.exists(path):
        raise ReportInputError(f"results folder {out} does not exist; give the --out of "
                               "jobs.reproduce")
    inputs = ReportInputs(source=out)
    _load_analysis(out, inputs)
    _load_results(out, inputs)
    _load_compare(out, inputs)
    _load_train(out, inputs, warn, filters)
    tables = [inputs.rf, inputs.topk, inputs.mean, inputs.channels, inputs.actmax, inputs.table1,
              inputs.ablation, inputs.neuron_types, inputs.cka]
    if all(t is None for t in tables) and not inputs.metrics and not inputs.filters:
        expected = [layout.stimuli(".", "<model>", "topk"), layout.combined(".", "ablation", "table1"),
                    layout.combined(".", "actmax", "actmax"), layout.train_dir(".", "<model>"),
                    layout.neuron_types_table(".", "summary"),
                    layout.compare_table(".", "cka")]
        raise ReportInputError(f"no results under {out}: expected "
                               + ", ".join(e.removeprefix("./") for e in expected))
    return inputs
