"""The comparison page (`compare.html`): jobs.compare's tables beside jobs.analyze's stimuli.

    for item in compare_section(inputs, d, imgs):   # strips and the page, then the Section
        ...

Three parts, each a small function feeding a template: CKA heatmaps (A×B, A×A, B×B) drawn as
inline SVG with the layer names on the axes and each cell's value in its tooltip; per layer both
networks analysed, the best- and worst-matched channel pairs side by side, each with its mean
stimulus and top-k patches from the analysis tables (the networks' names in the compare tables
are the analysis' model names, or those with `_a` / `_b` added); and each layer's selectivity
distribution per network as SVG box plots. Pure: tables in, markup and PNGs out.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import pandas as pd

from pipeline.report.data import ReportData, ReportInputs
from pipeline.report.images import ImageSink, blank, cell_size, decode_png, fit_tile, mosaic
from pipeline.report.sections import Section
from pipeline.report.templating import render

__all__ = ["PAGE", "PAIRS", "STRIP_PATCHES", "colour", "colour_stops", "heatmap", "matched_pairs", "boxplots",
           "compare_section"]

PAGE = "compare.html"
PAIRS = 4                 # best and worst matched pairs shown per layer
STRIP_PATCHES = 8         # top-k patches shown per channel of a pair
# viridis at 0, 1/4, 1/2, 3/4, 1 (matplotlib's colour map, sampled): CKA 0 dark, 1 yellow
_VIRIDIS = np.array([[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]],
                    dtype=np.float64)
_NAN = "#dddddd"
_NET_COLOURS = ("#1f77b4", "#d62728")       # A, B in the box plots


def colour(value: float) -> str:
    """A CKA (or r) in [0, 1] as a viridis hex colour (clipped); NaN light grey."""
    if value is None or not math.isfinite(value):
        return _NAN
    t = min(max(float(value), 0.0), 1.0) * (len(_VIRIDIS) - 1)
    i = min(int(t), len(_VIRIDIS) - 2)
    rgb = _VIRIDIS[i] + (t - i) * (_VIRIDIS[i + 1] - _VIRIDIS[i])
    return "#" + "".join(f"{int(round(c)):02x}" for c in rgb)


def colour_stops() -> list[dict]:
    """The colour map's anchors (offset %, colour) for the legend's SVG gradient."""
    n = len(_VIRIDIS) - 1
    return [{"offset": round(100 * i / n), "colour": colour(i / n)} for i in range(n + 1)]


@dataclass(frozen=True)
class Heatmap:
    """One CKA grid as the SVG template draws it."""
    title: str
    net_a: str
    net_b: str
    rows: list[str]                    # layers of net_a (top to bottom)
    cols: list[str]                    # layers of net_b (left to right)
    cells: list[dict]                  # x, y, fill, tip (and value for tests)
    cell: int
    left: int                          # room for the row labels
    top: int
    width: int
    height: int


def heatmap(cka: pd.DataFrame, net_a: str, net_b: str, title: str) -> Heatmap | None:
    """The grid of `net_a`'s layers (rows) against `net_b`'s (columns), in table order."""
    g = cka[(cka["net_a"] == net_a) & (cka["net_b"] == net_b)]
    if g.empty:
        return None
    rows = list(dict.fromkeys(g["layer_a"]))
    cols = list(dict.fromkeys(g["layer_b"]))
    cell = max(6, min(28, 520 // max(len(rows), len(cols))))
    label = 7 * max(len(x) for x in rows + cols) + 10
    left, top = label, 22
    value = {(r, c): v for r, c, v in zip(g["layer_a"], g["layer_b"], g["cka"])}
    cells = []
    for i, r in enumerate(rows):
        for j, c in enumerate(cols):
            v = value.get((r, c), float("nan"))
            cells.append({"x": left + j * cell, "y": top + i * cell, "fill": colour(v),
                          "value": v, "tip": f"{net_a} {r} × {net_b} {c}: CKA "
                          f"{v:.3f}" if math.isfinite(v) else f"{net_a} {r} × {net_b} {c}: —"})
    return Heatmap(title, net_a, net_b, rows, cols, cells, cell, left, top,
                   left + len(cols) * cell + 8, top + len(rows) * cell + label + 4)


def _model_of(net: str, models: list[str]) -> str | None:
    """The analysis model a compare network stands for: its name, or its name without the
    `_a` / `_b` a self-comparison adds."""
    if net in models:
        return net
    if net[-2:] in ("_a", "_b") and net[:-2] in models:
        return net[:-2]
    return None


def _strip(d: ReportData, model: str | None, layer: str, channel: int | None,
           cell: int) -> list[np.ndarray]:
    """[mean stimulus, top-k patches...] of one channel as tiles (light grey where missing)."""
    tiles = [blank(cell)] * (1 + STRIP_PATCHES)
    if model is None or channel is None:
        return tiles
    mean = d.mean_tiles.get((model, layer), {}).get(channel)
    if mean is not None:
        tiles[0] = fit_tile(mean, cell)
    if d.topk is not None:
        g = d.topk[(d.topk["model"] == model) & (d.topk["layer"] == layer)
                   & (d.topk["channel"] == channel)].sort_values("rank")
        for k, p in enumerate(list(g["patch"])[:STRIP_PATCHES]):
            tiles[1 + k] = fit_tile(decode_png(p), cell) if p else blank(cell)
    return tiles


def matched_pairs(d: ReportData, matches: pd.DataFrame, imgs: ImageSink) -> list[dict]:
    """Per layer that both networks analysed: the PAIRS best and worst matched pairs (by
    matched_r; NaN left out), each a row with its figure: A's mean stimulus and top-k patches,
    a gap, B's."""
    out = []
    for layer in [x for x in d.layers if x in set(matches["layer"])]:
        g = matches[(matches["layer"] == layer) & matches["matched_b"].notna()
                    & np.isfinite(matches["matched_r"])]
        if g.empty:
            continue
        net_a, net_b = str(g["net_a"].iloc[0]), str(g["net_b"].iloc[0])
        ma, mb = _model_of(net_a, d.models), _model_of(net_b, d.models)
        if (ma, layer) not in d.analysed and (mb, layer) not in d.analysed:
            continue
        size = int(d.topk[d.topk["layer"] == layer]["size"].max()) if d.topk is not None and \
            (d.topk["layer"] == layer).any() else 16
        cell = cell_size(size, target=32, cap=48)
        ranked = g.sort_values(["matched_r", "channel_a"], ascending=[False, True])
        groups = {"best": ranked.head(PAIRS), "worst": ranked.tail(PAIRS).iloc[::-1]}
        rows = {}
        for kind, sel in groups.items():
            rows[kind] = []
            for r in sel.itertuples(index=False):
                ca, cb = int(r.channel_a), int(r.matched_b)
                tiles = (_strip(d, ma, layer, ca, cell) + [np.full((cell, cell, 3), 255,
                                                                   np.uint8)]
                         + _strip(d, mb, layer, cb, cell))
                fig = imgs.add(f"match_{layer}_{kind}_{ca}_{cb}".replace("/", "-"),
                               mosaic(tiles, cols=len(tiles)),
                               f"{net_a} {layer} channel {ca} and {net_b} channel {cb}")
                rows[kind].append({"a": ca, "b": cb, "r": f"{r.matched_r:.3f}", "figure": fig})
        out.append({"layer": layer, "net_a": net_a, "net_b": net_b, "rows": rows,
                    "median": f"{np.median(g['matched_r']):.3f}", "pairs": len(g),
                    "stimuli": ma is not None or mb is not None})
    return out


@dataclass(frozen=True)
class Boxplots:
    """Selectivity distributions per layer and network as the SVG template draws them."""
    nets: list[dict]                   # name, colour
    layers: list[dict]                 # name, x, boxes: [{x, box_top, median_y, ...}]
    ticks: list[dict]                  # y, label
    width: int
    height: int
    top: int
    bottom: int


def _y(v: float, top: int, bottom: int) -> float:
    return round(bottom - (bottom - top) * min(max(v, 0.0), 1.0), 1)


def boxplots(sel: pd.DataFrame) -> Boxplots | None:
    """Quartile boxes with whiskers at the 5th and 95th percentile of each (layer, network)'s
    finite selectivities, on a 0-1 axis; a network without finite values gets no box."""
    if sel.empty:
        return None
    nets = list(dict.fromkeys(sel["net"]))
    layers = list(dict.fromkeys(sel["layer"]))
    top, bottom, left, slot = 12, 212, 40, 18 * len(nets) + 14
    out = []
    for i, layer in enumerate(layers):
        x0 = left + i * slot
        boxes = []
        for k, net in enumerate(nets):
            v = sel[(sel["layer"] == layer) & (sel["net"] == net)]["selectivity"].to_numpy(float)
            fin = v[np.isfinite(v)]
            if not fin.size:
                continue
            lo, q1, med, q3, hi = np.percentile(fin, [5, 25, 50, 75, 95])
            boxes.append({"x": x0 + 6 + 18 * k, "colour": _NET_COLOURS[k % 2], "net": net,
                          "box_top": _y(q3, top, bottom), "box_bottom": _y(q1, top, bottom),
                          "median_y": _y(med, top, bottom), "whisker_top": _y(hi, top, bottom),
                          "whisker_bottom": _y(lo, top, bottom), "median": f"{med:.3f}",
                          "n": int(fin.size), "nan": int(v.size - fin.size)})
        out.append({"name": layer, "x": x0 + slot // 2, "boxes": boxes})
    ticks = [{"y": _y(t, top, bottom), "label": f"{t:.2g}"} for t in (0, 0.25, 0.5, 0.75, 1)]
    label = 7 * max(len(x) for x in layers) + 10
    return Boxplots([{"name": n, "colour": _NET_COLOURS[k % 2]} for k, n in enumerate(nets)],
                    out, ticks, left + len(layers) * slot + 10, bottom + label, top, bottom)


def _summary(cka: pd.DataFrame, matches: pd.DataFrame, sel: pd.DataFrame,
             net_a: str, net_b: str) -> list[dict]:
    """Per layer: CKA of the same layer in A and B, median matched r, median selectivity."""
    same = cka[(cka["net_a"] == net_a) & (cka["net_b"] == net_b)
               & (cka["layer_a"] == cka["layer_b"])]
    rows = []
    for layer in dict.fromkeys(same["layer_a"]):
        r = matches[matches["layer"] == layer]["matched_r"].to_numpy(float)
        med = []
        for net in (net_a, net_b):
            v = sel[(sel["net"] == net) & (sel["layer"] == layer)]["selectivity"].to_numpy(float)
            med.append(np.nanmedian(v) if np.isfinite(v).any() else float("nan"))
        c = float(same[same["layer_a"] == layer]["cka"].iloc[0])
        rows.append({"layer": layer, "cka": c, "fill": colour(c),
                     "r": np.nanmedian(r) if np.isfinite(r).any() else float("nan"),
                     "sel_a": med[0], "sel_b": med[1]})
    return rows


def compare_section(inputs: ReportInputs, d: ReportData, imgs: ImageSink
                    ) -> Iterator[tuple[str, bytes] | Section]:
    """The page's strips, the page, then the index section that links it (the last item)."""
    why = inputs.missing.get("compare", "")
    if inputs.cka is None or inputs.cka.num_rows == 0:
        yield Section("compare", "Comparison", render("sections/compare.html.j2", page=None,
                                                      why=why, summary=[]))
        return
    cka = inputs.cka.to_pandas()
    matches = inputs.matches.to_pandas() if inputs.matches is not None else pd.DataFrame(
        columns=["net_a", "net_b", "layer", "channel_a", "matched_b", "matched_r"])
    sel = inputs.selectivity.to_pandas() if inputs.selectivity is not None else pd.DataFrame(
        columns=["net", "layer", "selectivity"])
    net_a, net_b = str(cka["net_a"].iloc[0]), str(cka["net_b"].iloc[0])
    maps = [h for h in (heatmap(cka, net_a, net_b, f"{net_a} × {net_b}"),
                        heatmap(cka, net_a, net_a, f"{net_a} × {net_a}"),
                        heatmap(cka, net_b, net_b, f"{net_b} × {net_b}")) if h is not None]
    pairs = matched_pairs(d, matches, imgs) if not matches.empty else []
    yield from imgs.drain()
    summary = _summary(cka, matches, sel, net_a, net_b)
    first = cka.iloc[0]
    yield PAGE, render("compare.html.j2", title=f"{d.title}: {net_a} against {net_b}",
                       stops=colour_stops(),
                       net_a=net_a, net_b=net_b, maps=maps, pairs=pairs, k=STRIP_PATCHES,
                       boxes=boxplots(sel), summary=summary, neuron=d.topk_neuron,
                       images=int(first["n_images"]), batches=int(first["n_batches"]),
                       has_matches=not matches.empty).encode("utf-8")
    yield Section("compare", "Comparison", render("sections/compare.html.j2", page=PAGE,
                                                  why=why, summary=summary, net_a=net_a,
                                                  net_b=net_b))
