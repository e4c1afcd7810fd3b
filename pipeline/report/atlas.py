"""The atlas: one page per (model, layer) listing every channel — statistics, mean stimulus,
actmax image and top-k strip.

Images are "sheets" of `SHEET_CHANNELS` channel rows (one PNG per 16 channels), which keeps the
number of files small for 512-channel layers; each channel's table row shows its slice of the
sheet with CSS `object-fit: none; object-position: 0 -Ypx`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Generator

import numpy as np

from pipeline.report.data import ReportData
from pipeline.report.frames import fmt
from pipeline.report.images import PAD, ImageSink, blank, cell_size, decode_png, fit_tile, mosaic
from pipeline.report.sections import slug
from pipeline.report.templating import render

__all__ = ["SHEET_CHANNELS", "atlas_page", "atlas_pages", "AtlasLink"]

SHEET_CHANNELS = 16   # channels per atlas sheet PNG
_STATS = ("max", "mean", "positive_fraction", "inactive")


@dataclass(frozen=True)
class AtlasLink:
    page: str
    layer: str
    channels: int


@dataclass
class _Layer:
    """Everything one atlas page draws, selected from the shared data."""
    topk: dict[int, list[bytes | None]]     # channel -> patches in rank order
    means: dict[int, np.ndarray]
    acts: dict[int, np.ndarray]
    filters: list[np.ndarray] | None
    stats: dict[int, dict]
    k: int                                  # top-k columns
    cell: int

    @property
    def channels(self) -> list[int]:
        return sorted(set(self.topk) | set(self.means) | set(self.acts))

    @property
    def columns(self) -> list[str]:
        return (["filter"] if self.filters else []) + ["mean", "actmax"]


def _select(d: ReportData, model: str, layer: str) -> _Layer:
    topk: dict[int, list[bytes | None]] = {}
    if d.topk is not None:
        g = d.topk[(d.topk["model"] == model) & (d.topk["layer"] == layer)]
        topk = {int(c): list(gc.sort_values("rank")["patch"]) for c, gc in g.groupby("channel")}
    stats: dict[int, dict] = {}
    ch = d.channels
    if ch is not None and {"model", "layer", "channel"} <= set(ch.columns):
        rows = ch[(ch["model"] == model) & (ch["layer"] == layer)].to_dict("records")
        stats = {int(r["channel"]): r for r in rows}
    means, acts = d.mean_tiles.get((model, layer), {}), d.actmax_tiles.get((model, layer), {})
    patch = int(d.topk[(d.topk["model"] == model) & (d.topk["layer"] == layer)]["size"].max()
                ) if topk else 0
    side = max([patch] + [t.shape[0] for t in (*means.values(), *acts.values())])
    return _Layer(topk, means, acts,
                  d.filter_tiles.get(model) if layer in ("conv1", "pool1") else None, stats,
                  k=max((len(v) for v in topk.values()), default=0),
                  cell=min(cell_size(side, target=40, cap=40), 48))


def _sheet(a: _Layer, block: list[int]) -> np.ndarray:
    """One PNG row per channel of `block`: [filter] | mean | actmax | top-k patches."""
    cell, tiles = a.cell, []
    width = len(a.columns) + a.k
    for ch in block:
        row = []
        if a.filters:
            row.append(fit_tile(a.filters[ch], cell) if ch < len(a.filters) else blank(cell))
        row.append(fit_tile(a.means[ch], cell) if ch in a.means else blank(cell))
        row.append(fit_tile(a.acts[ch], cell) if ch in a.acts else blank(cell))
        row += [fit_tile(decode_png(p), cell) if p else blank(cell)
                for p in a.topk.get(ch, [])[:a.k]]
        tiles += row + [blank(cell)] * (width - len(row))
    return mosaic(tiles, cols=width)


def atlas_page(d: ReportData, model: str, layer: str, imgs: ImageSink) -> tuple[str, int, bytes] | None:
    """(file name, channels, HTML) of one atlas page; its sheets go into `imgs`."""
    a = _select(d, model, layer)
    chans = a.channels
    if not chans:
        return None
    row_h = a.cell + PAD
    rows = []
    for start in range(0, len(chans), SHEET_CHANNELS):
        block = chans[start:start + SHEET_CHANNELS]
        src = imgs.add(slug("atlas", model, layer, f"{start:04d}"), _sheet(a, block)).src
        for i, ch in enumerate(block):
            s = a.stats.get(ch)
            rows.append({"channel": ch, "src": src, "y": i * row_h,
                         "stats": [fmt(s.get(key)) if s else "—" for key in _STATS]})
    html = render("atlas.html.j2", title=f"{d.title}: {model} {layer}", model=model,
                  layer=layer, rows=rows, columns=a.columns, k=a.k, topk_neuron=d.topk_neuron,
                  global_context=d.is_global(model, layer),
                  width=PAD + (len(a.columns) + a.k) * (a.cell + PAD), height=row_h + PAD)
    return f"atlas_{slug(model, layer)}.html", len(chans), html.encode("utf-8")


def atlas_pages(d: ReportData, imgs: ImageSink
                ) -> Generator[tuple[str, bytes], None, dict[str, list[AtlasLink]]]:
    """Yield every atlas page (each after its sheets); return the links, by model."""
    links: dict[str, list[AtlasLink]] = {}
    for model in d.models:
        for layer in d.layers:
            if (model, layer) not in d.analysed:
                continue
            page = atlas_page(d, model, layer, imgs)
            if page is None:
                continue
            name, n, data = page
            yield from imgs.drain()
            yield name, data
            links.setdefault(model, []).append(AtlasLink(name, layer, n))
    return links
