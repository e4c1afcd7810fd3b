"""Neuron-type census, the pattern side: table rows -> RGB patterns -> measured rows -> counts.

`jobs.neuron_types` reads Parquet rows and fans chunks out to Ray; everything it does to the
values it read lives here, free of files and of Ray:

    pats = mean_patterns(channels, sizes, means, where="url: resnet34 conv3")  # mean.parquet rows
    pats, neutrals = actmax_input_patterns(inputs, preprocess_state, neutral)  # exact RGB
    pats, neutrals = actmax_image_patterns(images, neutral)   # display images, decoded PNGs
    layer, pats = stimulus_filters(model, preprocess_state)   # first conv on RGB, stimulus space
    rows = measure_rows(model, layer, source, channels, pats, neutrals, thresholds)
    summary = summarise(rows); print(format_summary(summary))

The patterns are compared in one space, the stimulus space (DESIGN.md): filters are mapped to
their expected mean preferred stimulus (`pipeline.census.types.filter_to_stimulus`). Rows and
counts are sorted by source, then models and layers in display order (`pipeline.models.order`:
the paper's names in the paper's order, any other name in the order the tables list it).
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import pyarrow as pa

from pipeline.results import catalog
from pipeline.census.types import TYPES, Thresholds, filter_to_stimulus, measure_batch
from pipeline.models.order import order_layers, order_models, rank_of

__all__ = ["SOURCES", "IMAGENET_MEAN", "OUT_SCHEMA", "SUMMARY_SCHEMA", "PatternError",
           "mean_patterns", "actmax_input_patterns", "actmax_image_patterns",
           "first_conv", "stimulus_filters", "border_colour", "mean_colours", "data_neutral",
           "measure_rows", "summarise", "format_summary", "sort_rows"]

SOURCES = ("filter", "mean", "actmax")
IMAGENET_MEAN = (0.485, 0.456, 0.406)

OUT_SCHEMA = catalog.NEURON_TYPES.schema
SUMMARY_SCHEMA = catalog.SUMMARY.schema
_MEASURED = ("osi", "orientation_deg", "chromatic_fraction", "opponent_axis", "chromatic_balance",
             "chromatic_coherence", "double_opponent_score", "double_opponent",
             "orientation_selective", "energy", "type")
_FLOATS = ("osi", "orientation_deg", "chromatic_fraction", "chromatic_balance",
           "chromatic_coherence", "double_opponent_score", "energy")


class PatternError(ValueError):
    """A row whose values cannot be a pattern (wrong length): the input table is malformed."""


# ----------------------------------------------------------------------------- patterns
def mean_patterns(channels: Sequence[int], sizes: Sequence[int], means: Sequence[Sequence[float] | None],
                  where: str = "") -> list[np.ndarray]:
    """mean.parquet rows -> (3, s, s) float64 patterns (NaN pixels kept: never inside the image)."""
    pats = []
    for ch, s, values in zip(channels, sizes, means):
        arr = np.asarray(values if values is not None else [], dtype=np.float64)
        s = int(s)
        if arr.size != 3 * s * s:
            raise PatternError(f"{where}: mean of channel {ch} has {arr.size} values, "
                               f"expected 3*size*size = {3 * s * s}")
        pats.append(arr.reshape(3, s, s))
    return pats


def actmax_input_patterns(channels: Sequence[int], inputs: Sequence[Sequence[float]],
                          preprocess_state: dict, neutral: tuple | None = None, where: str = ""
                          ) -> tuple[list[np.ndarray], list[tuple]]:
    """actmax `input` rows (the optimised preprocessed image) -> exact RGB through the inverse
    preprocessing; the neutral is the preprocessing's zero image, inverse(0) (the optimisation's
    start), unless one is given."""
    import torch

    from pipeline.data.preprocess import preprocess_from_state

    pre = preprocess_from_state(preprocess_state)
    zero = pre.inverse(torch.zeros(1, 3, 1, 1, dtype=torch.float64))[0, :, 0, 0]
    start = tuple(float(v) for v in zero)
    pats, neutrals = [], []
    for ch, values in zip(channels, inputs):
        arr = np.asarray(values, dtype=np.float32)
        side = int(round(np.sqrt(arr.size / 3)))
        if 3 * side * side != arr.size:
            raise PatternError(f"{where}: input of channel {ch} has {arr.size} values, not 3*H*H")
        x = torch.from_numpy(arr.reshape(1, 3, side, side)).double()
        pats.append(pre.inverse(x)[0].numpy())
        neutrals.append(neutral or start)
    return pats, neutrals


def actmax_image_patterns(images: Sequence[np.ndarray], neutral: tuple | None = None
                          ) -> tuple[list[np.ndarray], list[tuple]]:
    """actmax display images ((H, W, 3) uint8, the `image` PNGs decoded by the caller) -> RGB
    in [0, 1]; the neutral is each image's border colour unless given."""
    pats = [np.asarray(img).transpose(2, 0, 1) / 255.0 for img in images]
    return pats, [neutral or border_colour(p) for p in pats]


def first_conv(model: Any) -> tuple[str, Any] | None:
    """(module path, module) of the first convolution on RGB input in forward (registration)
    order: `conv1` of a ResNet, `features.0` of a VGG, `features.0.0` of a MobileNet; None when
    the model has none (the filter source is then skipped)."""
    from torch import nn

    return next(((name, m) for name, m in model.named_modules()
                 if isinstance(m, nn.Conv2d) and m.in_channels == 3 and m.groups == 1), None)


def stimulus_filters(model: Any, preprocess_state: dict) -> tuple[str, np.ndarray] | None:
    """(layer name, (C, 3, h, w) filters in stimulus space) of the model's first conv, S·Aᵀw
    each (`filter_to_stimulus`): what the census measures and the report draws."""
    found = first_conv(model)
    if found is None:
        return None
    name, conv = found
    return name, filter_to_stimulus(conv.weight.detach().cpu().double().numpy(), preprocess_state)


def border_colour(rgb: np.ndarray) -> tuple[float, float, float]:
    """Median colour of the outermost pixel ring of a (3, H, W) image.

    The paper's zero-start optimisation leaves every pixel outside the centre neuron's RF at
    its start value, the data's mean colour: the outermost ring of the image shows it.
    """
    ring = np.concatenate([rgb[:, 0, :], rgb[:, -1, :], rgb[:, :, 0], rgb[:, :, -1]], axis=1)
    return tuple(float(v) for v in np.median(ring, axis=1))  # type: ignore[return-value]


def mean_colours(sizes: Sequence[int], means: Sequence[Sequence[float] | None]) -> list[np.ndarray]:
    """Each mean stimulus's average colour over its valid pixels (malformed or empty rows skipped:
    the task that measures them reports them)."""
    colours = []
    for s, values in zip(sizes, means):
        arr = np.asarray(values if values is not None else [], dtype=np.float64)
        if arr.size != 3 * int(s) * int(s):
            continue
        arr = arr.reshape(3, -1)
        ok = np.isfinite(arr).all(axis=0)
        if ok.any():
            colours.append(arr[:, ok].mean(axis=1))
    return colours


def data_neutral(colours: Sequence[np.ndarray]) -> tuple[float, float, float]:
    """The analysed data's mean colour from the channels' average colours: their median.

    A mean stimulus averages image patches, so a channel without colour preference shows the
    data's mean colour; the median keeps colour-preferring channels from pulling the estimate.
    """
    if not len(colours):
        return IMAGENET_MEAN
    return tuple(float(v) for v in np.median(np.stack(colours), axis=0))  # type: ignore[return-value]


# ----------------------------------------------------------------------------- rows and counts
def measure_rows(model: str, layer: str, source: str, channels: Sequence[int],
                 patterns: Sequence[np.ndarray], neutrals: Sequence[tuple | None],
                 thresholds: Thresholds) -> pa.Table:
    """Measure patterns (same-size, same-neutral runs batched: one FFT each) into OUT_SCHEMA rows."""
    n = len(patterns)
    cols: dict[str, list] = {k: [None] * n for k in OUT_SCHEMA.names}
    groups: dict[tuple, list[int]] = {}
    for i, (p, nt) in enumerate(zip(patterns, neutrals)):
        groups.setdefault((p.shape, nt), []).append(i)
    for (shape, nt), idx in groups.items():
        res = measure_batch(np.stack([patterns[i] for i in idx]), nt, thresholds)
        for j, i in enumerate(idx):
            for k in _MEASURED:
                v = res[k][j]
                cols[k][i] = v.item() if hasattr(v, "item") else v
            cols["size"][i] = int(shape[-1])
            cols["neutral"][i] = [0.0, 0.0, 0.0] if nt is None else [float(v) for v in nt]
    cols["model"] = [model] * n
    cols["layer"] = [layer] * n
    cols["source"] = [source] * n
    cols["channel"] = [int(c) for c in channels]
    for k in _FLOATS:
        cols[k] = [None if v is None or not np.isfinite(v) else v for v in cols[k]]
    return pa.table(cols, schema=OUT_SCHEMA)


def _ranks(models: Sequence[str], layers: Sequence[str]) -> tuple[dict, dict]:
    return rank_of(order_models(models)), rank_of(order_layers(layers))


def sort_rows(rows: pa.Table) -> pa.Table:
    """Rows sorted by source, model, layer (display order), channel."""
    keys = list(zip(*(rows.column(c).to_pylist() for c in ("source", "model", "layer", "channel"))))
    mr, lr = _ranks([k[1] for k in keys], [k[2] for k in keys])
    order = sorted(range(rows.num_rows), key=lambda i: (
        SOURCES.index(keys[i][0]), mr[keys[i][1]], lr[keys[i][2]], keys[i][3]))
    return rows.take(pa.array(order, type=pa.int64()))


def summarise(rows: pa.Table) -> pa.Table:
    """Count of each type per (model, layer, source), zero counts included."""
    df = rows.select(["model", "layer", "source", "type"]).to_pandas()
    out = []
    for (model, layer, source), g in df.groupby(["model", "layer", "source"], sort=False):
        counts = g["type"].value_counts()
        for kind in TYPES:
            out.append((model, layer, source, kind, int(counts.get(kind, 0))))
    mr, lr = _ranks(df["model"], df["layer"])
    out.sort(key=lambda r: (SOURCES.index(r[2]), lr[r[1]], mr[r[0]], TYPES.index(r[3])))
    cols = list(zip(*out)) if out else [[], [], [], [], []]
    return pa.table(dict(zip(SUMMARY_SCHEMA.names, map(list, cols))), schema=SUMMARY_SCHEMA)


def format_summary(summary: pa.Table) -> str:
    """A printable table: one line per (source, layer, model), one column per type."""
    df = summary.to_pandas()
    if df.empty:
        return "(no patterns)"
    piv = df.pivot_table(index=["source", "layer", "model"], columns="type", values="count",
                         aggfunc="sum", fill_value=0)
    piv = piv.reindex(columns=[t for t in TYPES if t in piv.columns])
    piv["total"] = piv.sum(axis=1)
    mr, lr = _ranks(df["model"], df["layer"])
    order = sorted(piv.index, key=lambda k: (SOURCES.index(k[0]), lr[k[1]], mr[k[2]]))
    return piv.loc[order].to_string()
