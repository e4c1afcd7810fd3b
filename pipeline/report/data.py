"""What the report reads (`ReportInputs`), how it is asked to draw (`ReportOptions`), and the
selection every section shares (`ReportData`: frames, the models and layers to show, each
layer's geometry, and the decoded tiles the figures and the atlas both use).

Model and layer names come from the tables, never from a fixed list (`pipeline.models.order`).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import pyarrow as pa

from pipeline.report.images import (crop_center_rf, decode_png, difference_images,
                                    filter_images, is_true, mean_image)
from pipeline.models.order import order_layers, order_models

__all__ = ["ReportInputs", "ReportOptions", "ReportData", "prepare", "filter_tiles",
           "default_title"]

_PAPER_FAMILY = re.compile(r"(resnet|plainnet)\d+")


@dataclass
class ReportInputs:
    """Everything the report reads; each table may be None (its section then says so)."""
    rf: pa.Table | None = None            # receptive_fields.parquet (all models concatenated)
    topk: pa.Table | None = None          # stimuli/topk.parquet
    mean: pa.Table | None = None          # stimuli/mean.parquet
    baseline: pa.Table | None = None      # stimuli/baseline.parquet (the mean patch of all images)
    channels: pa.Table | None = None      # stimuli/channels.parquet
    actmax: pa.Table | None = None        # actmax/actmax.parquet
    table1: pa.Table | None = None        # ablation/table1.parquet
    ablation: pa.Table | None = None      # ablation/ablation.parquet (Table 1 fallback)
    census: pa.Table | None = None        # ablation/census.parquet
    neuron_types: pa.Table | None = None  # neuron_types/summary.parquet
    properties: pa.Table | None = None    # neuron_types/properties.parquet
    type_rows: pa.Table | None = None     # neuron_types.parquet: model, layer, source, channel, type
    cka: pa.Table | None = None           # compare/cka.parquet (jobs.compare)
    matches: pa.Table | None = None       # compare/matches.parquet
    selectivity: pa.Table | None = None   # compare/selectivity.parquet
    filters: dict[str, np.ndarray] = field(default_factory=dict)   # model -> first conv (C,3,k,k)
    metrics: dict[str, pa.Table] = field(default_factory=dict)     # model -> train metrics
    runs: dict[str, dict] = field(default_factory=dict)            # model -> analysis run.json
    source: str = ""                      # where the results came from (shown in the header)
    missing: dict[str, str] = field(default_factory=dict)          # part -> why it is missing


@dataclass(frozen=True)
class ReportOptions:
    figure_channels: int = 8      # channels shown in the top-16 / actmax figures per layer
    topk_neuron: str = "any"      # 'any' | 'center': which top-k the grids and atlas show
    mean_neuron: str = "center"   # 'center' | 'all': which mean stimulus is shown
    atlas: bool = True            # write the per-layer atlas pages
    title: str | None = None      # None: named after the models (`default_title`)

    def __post_init__(self) -> None:
        if self.figure_channels < 1:
            raise ValueError(f"figure_channels must be >= 1, got {self.figure_channels}")
        if self.topk_neuron not in ("any", "center"):
            raise ValueError(f"invalid top-k neuron {self.topk_neuron!r}; allowed: any, center")
        if self.mean_neuron not in ("center", "all"):
            raise ValueError(f"invalid mean neuron {self.mean_neuron!r}; allowed: center, all")


Tiles = dict[tuple[str, str], dict[int, np.ndarray]]   # (model, layer) -> channel -> image


@dataclass
class ReportData:
    """The selection all sections share."""
    rf: pd.DataFrame | None
    topk: pd.DataFrame | None
    topk_neuron: str              # the neuron kind the top-k frame holds (may differ from asked)
    mean: pd.DataFrame | None
    mean_neuron: str
    channels: pd.DataFrame | None
    actmax: pd.DataFrame | None
    title: str
    models: list[str]             # display order
    layers: list[str]             # analysed layers, display order
    analysed: set[tuple[str, str]]              # (model, layer) pairs with any analysis row
    rf_of: dict[tuple[str, str], dict]          # (model, layer) -> receptive_fields row
    mean_tiles: Tiles = field(default_factory=dict)
    against_baseline: set[tuple[str, str]] = field(default_factory=set)   # drawn as mean − null
    baseline_tiles: dict[tuple[str, str], np.ndarray] = field(default_factory=dict)
    flat: dict[tuple[str, str, str], set[int]] = field(default_factory=dict)  # no structure
    actmax_tiles: Tiles = field(default_factory=dict)
    filter_tiles: dict[str, list[np.ndarray]] = field(default_factory=dict)

    def models_with(self, layer: str) -> list[str]:
        """The models that analysed `layer`: the columns of a side-by-side figure."""
        return [m for m in self.models if (m, layer) in self.analysed]

    def is_global(self, model: str, layer: str) -> bool:
        return is_true((self.rf_of.get((model, layer)) or {}).get("global_context"))

    def layer_rf(self, layer: str) -> tuple[int | None, bool]:
        """(RF size, any model's neuron has global context) of a layer, for its heading."""
        rows = [self.rf_of[(m, layer)] for m in self.models_with(layer) if (m, layer) in self.rf_of]
        size = next((int(r["rf_size"]) for r in rows if pd.notna(r.get("rf_size"))), None)
        return size, any(is_true(r.get("global_context")) for r in rows)


def _pick(df: pd.DataFrame | None, column: str, preferred: str) -> tuple[pd.DataFrame | None, str]:
    """Rows of `df` whose `column` equals `preferred`, else those of its most common value."""
    if df is None or df.empty:
        return None, preferred
    if column not in df.columns:
        return df, preferred
    if (df[column] == preferred).any():
        return df[df[column] == preferred], preferred
    other = str(df[column].mode().iloc[0])
    return df[df[column] == other], other


def _names(frames: list[pd.DataFrame | None], column: str) -> list[str]:
    """Every value of `column`, in table order (frames in the order given)."""
    out: list[str] = []
    for df in frames:
        if df is not None and column in df.columns:
            out += [str(v) for v in pd.unique(df[column])]
    return out


def _frame(t: pa.Table | None) -> pd.DataFrame | None:
    return None if t is None else t.to_pandas()


def prepare(inputs: ReportInputs, options: ReportOptions) -> ReportData:
    """Read the tables into frames and choose what the sections show."""
    topk, topk_neuron = _pick(_frame(inputs.topk), "neuron", options.topk_neuron)
    mean, mean_neuron = _pick(_frame(inputs.mean), "neuron", options.mean_neuron)
    rf, channels, actmax = _frame(inputs.rf), _frame(inputs.channels), _frame(inputs.actmax)
    analysed_frames = [topk, mean, actmax, channels]
    analysed = {(str(m), str(l)) for df in analysed_frames
                if df is not None and {"model", "layer"} <= set(df.columns)
                for m, l in df[["model", "layer"]].drop_duplicates().itertuples(index=False)}
    rf_of = ({} if rf is None or not {"model", "layer"} <= set(rf.columns) else
             {(str(r["model"]), str(r["layer"])): r for r in rf.to_dict("records")})
    models = order_models([*_names([rf, *analysed_frames], "model"), *inputs.filters])
    data = ReportData(
        title=options.title or default_title(models),
        rf=rf, topk=topk, topk_neuron=topk_neuron, mean=mean, mean_neuron=mean_neuron,
        channels=channels, actmax=actmax,
        models=models,
        layers=order_layers(_names(analysed_frames, "layer")), analysed=analysed, rf_of=rf_of)
    data.flat = _no_structure(inputs.type_rows)
    base, _ = _pick(_frame(inputs.baseline), "neuron", mean_neuron)
    data.mean_tiles, data.against_baseline, data.baseline_tiles = _mean_tiles(mean, base)
    data.actmax_tiles = _actmax_tiles(actmax, rf_of)
    data.filter_tiles = filter_tiles(inputs)
    return data


def _no_structure(rows: pa.Table | None) -> dict[tuple[str, str, str], set[int]]:
    """(source, model, layer) -> the channels the census calls 'no structure'."""
    if rows is None or "type" not in rows.column_names:
        return {}
    out: dict[tuple[str, str, str], set[int]] = {}
    for r in rows.select(["source", "model", "layer", "channel", "type"]).to_pylist():
        if r["type"] == "no structure":
            out.setdefault((r["source"], r["model"], r["layer"]), set()).add(int(r["channel"]))
    return out


def default_title(models: list[str]) -> str:
    """The paper's title for ResNets and PlainNets, else the models' names."""
    if all(_PAPER_FAMILY.fullmatch(m) for m in models):
        return "Preferred stimuli: ResNet vs PlainNet"
    return "Preferred stimuli: " + " vs ".join(models)


def _mean_tiles(mean: pd.DataFrame | None, baseline: pd.DataFrame | None
                ) -> tuple[Tiles, set[tuple[str, str]], dict[tuple[str, str], np.ndarray]]:
    """Mean-stimulus tiles per (model, layer): against the baseline patch when the analysis
    wrote one (mean − baseline, one grey-centred scale per layer: what is specific to each
    channel), else the mean itself, contrast-stretched; the layers drawn against a baseline; and
    each baseline patch (stretched)."""
    if mean is None or mean.empty:
        return {}, set(), {}
    base = ({} if baseline is None or baseline.empty else
            {(str(r["model"]), str(r["layer"])): r for _, r in baseline.iterrows()})
    tiles: Tiles = {}
    drawn: set[tuple[str, str]] = set()
    for (m, l), g in mean.groupby(["model", "layer"], sort=False):
        key, b = (str(m), str(l)), base.get((str(m), str(l)))
        if b is not None and int(b["size"]) == int(g["size"].iloc[0]):
            drawn.add(key)
            s = int(b["size"])
            null = np.asarray(b["mean"], dtype=np.float64).reshape(3, s, s)
            diffs = [np.asarray(r["mean"], dtype=np.float64).reshape(3, s, s) - null
                     for _, r in g.iterrows()]
            tiles[key] = dict(zip((int(c) for c in g["channel"]), difference_images(diffs)))
        else:
            tiles[key] = {int(r["channel"]): mean_image(r["mean"], int(r["size"]))
                          for _, r in g.iterrows()}
    return tiles, drawn, {k: mean_image(base[k]["mean"], int(base[k]["size"])) for k in drawn}


def _actmax_tiles(actmax: pd.DataFrame | None, rf_of: dict) -> Tiles:
    """Each actmax image cropped to its centre neuron's RF (whole when not local)."""
    if actmax is None or actmax.empty or "image" not in actmax.columns:
        return {}
    return {(str(m), str(l)): {int(r["channel"]): crop_center_rf(decode_png(r["image"]),
                                                                  rf_of.get((str(m), str(l))))
                               for _, r in g.iterrows() if r["image"] is not None}
            for (m, l), g in actmax.groupby(["model", "layer"], sort=False)}


def filter_tiles(inputs: ReportInputs) -> dict[str, list[np.ndarray]]:
    """The one place where first-conv filters become pictures (model -> one image per filter)."""
    return {m: filter_images(w) for m, w in inputs.filters.items()}
