"""One function per section of index.html: select the data, draw the figures, fill a template.

Each returns a `Section` (anchor, title, rendered markup); the figures it draws go into the
`ImageSink` for `render_report` to write. A section whose tables are missing renders the
"Not available: … (why)" line of its template.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from markupsafe import Markup

from pipeline.report.data import ReportData, ReportInputs, ReportOptions
from pipeline.report.frames import (PAPER_TABLE1, census_frame, properties_frame, rf_frames,
                                    table1_frame, table_view, types_frame)
from pipeline.report.images import (Figure, ImageSink, cell_size, fade, fit_tile, mosaic,
                                    topk_grid)
from pipeline.models.order import order_models
from pipeline.report.templating import render

__all__ = ["Section", "slug", "rf_section", "table1_section", "topk_section", "mean_section",
           "actmax_section", "types_section", "train_section", "runs_section"]

_PAPER_NOTE = ("Paper (ImageNet): ResNet34 13 inactive pool1 channels, ΔL = 1.27, ΔL_rnd = "
               "0.024; PlainNet34 2 inactive channels, ΔL ≈ 0.")


@dataclass(frozen=True)
class Section:
    anchor: str
    title: str
    html: Markup


@dataclass(frozen=True)
class LayerRow:
    """One layer of a side-by-side figure: its heading and a cell per model."""
    name: str
    rf_size: int | None
    global_context: bool
    models: list[str]
    cells: dict[str, Any]


def slug(*parts: str) -> str:
    """A file-name-safe join: module paths keep their dots (`layer2.1.conv2`)."""
    return "_".join(re.sub(r"[^A-Za-z0-9.-]+", "-", p) for p in parts)


def _layer_row(d: ReportData, layer: str, cells: dict[str, Any]) -> LayerRow:
    size, global_context = d.layer_rf(layer)
    return LayerRow(layer, size, global_context, d.models_with(layer) or list(cells), cells)


def rf_section(inputs: ReportInputs, d: ReportData) -> Section:
    shown = all_layers = None
    global_layers: list[str] = []
    if d.rf is not None and not d.rf.empty:
        shown_df, all_df = rf_frames(d.rf, d.models, d.layers)
        shown = table_view(shown_df)
        all_layers = table_view(all_df) if len(shown_df) < len(all_df) else None
        global_layers = [f"{m} {l}" for (m, l) in d.rf_of if d.is_global(m, l)
                         and l in d.layers]
    return Section("rf", "Receptive fields", render(
        "sections/rf.html.j2", shown=shown, all_layers=all_layers, global_layers=global_layers,
        why=inputs.missing.get("analysis", "")))


def table1_section(inputs: ReportInputs) -> Section:
    t1 = table1_frame(inputs.table1, inputs.ablation, inputs.census)
    census = census_frame(inputs.census) if inputs.census is not None else None
    return Section("table1", "Table 1: inactive neurons and noise ablation", render(
        "sections/table1.html.j2",
        missing=inputs.table1 is None and inputs.ablation is None,
        why=inputs.missing.get("ablation", ""),
        measured=None if t1 is None else table_view(t1), paper=table_view(PAPER_TABLE1),
        paper_note=_PAPER_NOTE, census=None if census is None else table_view(census)))


def _topk_figure(g: pd.DataFrame, channels: int) -> tuple[np.ndarray, list[int]]:
    """4×4 top-16 grids of the first `channels` channels, 4 grids per row, labelled."""
    chans = sorted(int(c) for c in g["channel"].unique())[:channels]
    cell = cell_size(int(g["size"].max()))
    blocks = [topk_grid(list(g[g["channel"] == ch].sort_values("rank")["patch"]), cell)
              for ch in chans]
    return mosaic(blocks, cols=4, pad=6, labels=[f"channel {c}" for c in chans],
                  label_height=14), chans


def topk_section(inputs: ReportInputs, d: ReportData, opt: ReportOptions,
                 imgs: ImageSink) -> Section:
    rows = []
    topk = d.topk
    for layer in d.layers if topk is not None else []:
        cells = {}
        for model in d.models_with(layer):
            g = topk[(topk["model"] == model) & (topk["layer"] == layer)]
            if g.empty:
                continue
            fig, _ = _topk_figure(g, opt.figure_channels)
            cells[model] = {
                "figure": imgs.add(slug("topk", model, layer, d.topk_neuron), fig,
                                   f"{model} {layer} top-16 patches"),
                "link": f"atlas_{slug(model, layer)}.html" if opt.atlas else None}
        if cells:
            rows.append(_layer_row(d, layer, cells))
    return Section("topk", "Top-16 preferred stimuli", render(
        "sections/topk.html.j2", layers=rows, channels=opt.figure_channels,
        neuron=d.topk_neuron, why=inputs.missing.get("analysis", "")))


def _grid(imgs: ImageSink, name: str, tiles: list[np.ndarray], cell: int, alt: str,
          faded: list[bool] | None = None) -> Figure:
    tiles = [fit_tile(t, cell) for t in tiles]
    tiles = [fade(t) if f else t for t, f in zip(tiles, faded or [False] * len(tiles))]
    return imgs.add(name, mosaic(tiles, cols=8), alt)


def _flat(d: ReportData, source: str, model: str, layer: str | None = None) -> set[int]:
    """Channels the census calls 'no structure' (for filters: the model's first-conv layer)."""
    if layer is None:
        return next((v for (s, m, _), v in d.flat.items() if s == source and m == model), set())
    return d.flat.get((source, model, layer), set())


def _mean_column(d: ReportData, model: str, imgs: ImageSink) -> list[dict[str, Any]]:
    """A model's column: its conv1 filters, then every layer's mean stimuli, 8 per row; tiles
    the census calls 'no structure' washed out."""
    grids = []
    if model in d.filter_tiles:
        tiles = d.filter_tiles[model]
        # The same cell as the pool1 grid below, so that channel c sits above channel c.
        pool1 = d.mean_tiles.get((model, "pool1"))
        side = next(iter(pool1.values())).shape[0] if pool1 else tiles[0].shape[0]
        flat = _flat(d, "filter", model)
        grids.append({"heading": f"conv1 filters, effective ({len(tiles) - len(flat)} of "
                                 f"{len(tiles)} above the noise floor)" if d.flat else
                                 "conv1 filters, effective",
                      "figure": _grid(imgs, slug("filters", model), tiles,
                                      cell_size(side, 42, 84), f"{model} conv1 filters",
                                      [c in flat for c in range(len(tiles))]), "baseline": None})
    for layer in d.layers:
        by_ch = d.mean_tiles.get((model, layer))
        if not by_ch:
            continue
        chans = sorted(by_ch)
        flat = _flat(d, "mean", model, layer) if d.mean_neuron == "center" else set()
        against = (model, layer) in d.against_baseline
        what = "mean stimuli − baseline" if against else "mean stimuli"
        floor = (f", {len(chans) - len(flat & set(chans))} above the noise floor"
                 if d.flat and d.mean_neuron == "center" else "")
        cell = cell_size(by_ch[chans[0]].shape[0], 42, 84)
        grids.append({"heading": f"{layer} {what} ({len(chans)} channels{floor})",
                      "figure": _grid(imgs, slug("mean", model, layer, d.mean_neuron),
                                      [by_ch[c] for c in chans], cell,
                                      f"{model} {layer} mean preferred stimuli",
                                      [c in flat for c in chans]),
                      "baseline": _grid(imgs, slug("baseline", model, layer, d.mean_neuron),
                                        [d.baseline_tiles[(model, layer)]], cell,
                                        f"{model} {layer} baseline: mean patch of all images")
                      if against else None})
    return grids


def mean_section(inputs: ReportInputs, d: ReportData, imgs: ImageSink) -> Section:
    cells = {}
    if d.mean_tiles or d.filter_tiles:
        cells = {m: g for m in d.models if (g := _mean_column(d, m, imgs))}
    return Section("mean", "First-conv filters and mean preferred stimuli", render(
        "sections/mean.html.j2", models=d.models, cells=cells, has_filters=bool(d.filter_tiles),
        neuron=d.mean_neuron, against=bool(d.against_baseline),
        census=bool(d.flat), why=inputs.missing.get("analysis", "")))


def actmax_section(inputs: ReportInputs, d: ReportData, opt: ReportOptions,
                   imgs: ImageSink) -> Section:
    rows = []
    for layer in [l for l in d.layers if any(k[1] == l for k in d.actmax_tiles)]:
        cells = {}
        for model in d.models_with(layer):
            by_ch = d.actmax_tiles.get((model, layer))
            if not by_ch:
                continue
            chans = sorted(by_ch)[:max(opt.figure_channels, 16)]
            cell = cell_size(max(t.shape[0] for t in by_ch.values()), target=56, cap=112)
            fig = mosaic([fit_tile(by_ch[c], cell) for c in chans], cols=8,
                         labels=[str(c) for c in chans], label_height=12)
            cells[model] = imgs.add(slug("actmax", model, layer), fig,
                                    f"{model} {layer} activation maximization")
        rows.append(_layer_row(d, layer, cells))
    return Section("actmax", "Activation maximization", render(
        "sections/actmax.html.j2", layers=rows, why=inputs.missing.get("actmax", "")))


def types_section(inputs: ReportInputs, d: ReportData) -> Section:
    nt = None if inputs.neuron_types is None else inputs.neuron_types.to_pandas()
    table = None if nt is None else table_view(types_frame(nt, d.models, d.layers))
    pivoted = nt is not None and {"model", "layer", "type", "count"} <= set(nt.columns)
    props = (None if inputs.properties is None else
             table_view(properties_frame(inputs.properties.to_pandas(), d.models, d.layers)))
    return Section("types", "Neuron types", render(
        "sections/types.html.j2", table=table, pivoted=pivoted, properties=props,
        why=inputs.missing.get("neuron_types", "")))


def train_section(inputs: ReportInputs) -> Section:
    models = []
    for model in order_models(inputs.metrics):
        df = inputs.metrics[model].to_pandas()
        models.append({"model": model, "total": len(df), "table": table_view(df.tail(5))})
    return Section("train", "Training", render(
        "sections/train.html.j2", models=models, why=inputs.missing.get("train", "")))


def runs_section(inputs: ReportInputs) -> Section | None:
    if not inputs.runs:
        return None
    runs = [(m, json.dumps(r, indent=2, sort_keys=True, default=str))
            for m, r in sorted(inputs.runs.items())]
    return Section("runs", "Runs", render("sections/runs.html.j2", runs=runs))
