"""Neuron-type census, the pattern side: table rows -> RGB patterns -> measured rows -> counts.

`jobs.neuron_types` reads Parquet rows and fans chunks out to Ray; everything it does to the
values it read lives here, free of files and of Ray:

    pats = mean_patterns(channels, sizes, means, where="url: resnet34 conv3")  # mean.parquet rows
    se = mean_noise(weights, images, baseline)                  # their sampling noise
    pats, neutrals = actmax_input_patterns(inputs, preprocess_state, neutral)  # exact RGB
    pats, neutrals = actmax_image_patterns(images, neutral)   # display images, decoded PNGs
    layer, pats, noise = stimulus_filters(model, preprocess_state)   # first conv: expected stimulus
    rows = measure_rows(model, layer, source, channels, pats, neutrals, thresholds, noises,
                        references, covariance)
    summary, props = summarise(rows), properties(rows)
    print(format_summary(summary, props))

The patterns are compared in one space, the stimulus space (DESIGN.md): filters are mapped to
their expected mean preferred stimulus (`pipeline.census.types.filter_to_stimulus`). Rows and
counts are sorted by source, then models and layers in display order (`pipeline.models.order`:
the paper's names in the paper's order, any other name in the order the tables list it).
Each pattern is read against its null (a neutral colour, a mean stimulus's baseline patch, or 0)
and its noise (`pipeline.census.types.structure`); below the floor it is 'no structure'.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import pyarrow as pa

from pipeline.results import catalog
from pipeline.census.types import (IMAGENET_COVARIANCE, PROPERTIES, TYPES, Thresholds,
                                   filter_threshold, measure_batch, preferred_stimulus,
                                   selection_noise, standard_error, stimulus_covariance)
from pipeline.models.order import order_layers, order_models, rank_of

__all__ = ["SOURCES", "IMAGENET_MEAN", "OUT_SCHEMA", "SUMMARY_SCHEMA", "PROPERTY_SCHEMA",
           "PatternError", "mean_patterns", "mean_noise", "colour_covariance",
           "actmax_input_patterns", "actmax_image_patterns", "first_conv", "first_conv_bn",
           "stimulus_filters", "border_colour", "mean_colours", "data_neutral", "measure_rows",
           "summarise", "properties", "format_summary", "sort_rows"]

SOURCES = ("filter", "mean", "actmax")
IMAGENET_MEAN = (0.485, 0.456, 0.406)

OUT_SCHEMA = catalog.NEURON_TYPES.schema
SUMMARY_SCHEMA = catalog.SUMMARY.schema
# Per (model, layer, source): channels, each property on its own, and the overlaps.
PROPERTY_SCHEMA = catalog.PROPERTIES.schema
_MEASURED = ("osi", "orientation_deg", "chromatic_fraction", "opponent_axis", "chromatic_balance",
             "chromatic_coherence", "double_opponent_score", "double_opponent",
             "orientation_selective", "single_opponent", "no_structure", "energy", "contrast",
             "noise", "contrast_z", "floor", "type")
_FLOATS = ("osi", "orientation_deg", "chromatic_fraction", "chromatic_balance",
           "chromatic_coherence", "double_opponent_score", "energy", "contrast", "noise",
           "contrast_z", "floor")


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


def colour_covariance(preprocess_state: dict | None) -> tuple[np.ndarray, str]:
    """(S, where S comes from): the RGB colour covariance of the data a model was trained on
    (`stimulus_covariance`: exact for ZCA), ImageNet's without a checkpoint."""
    if preprocess_state is None:
        return IMAGENET_COVARIANCE.copy(), "imagenet"
    return stimulus_covariance(preprocess_state)


def mean_noise(weights: Sequence[Sequence[float]], images: Sequence[int],
               baseline: tuple | None = None) -> list[np.ndarray]:
    """The sampling variance factor per pixel (s, s) of each mean stimulus (`standard_error`):
    rows' `weight` (per-value patch counts, 3·s·s) and `images`; `baseline` = (weight, images)
    of the baseline row the stimuli are read against, or None."""
    def plane(w: Sequence[float]) -> np.ndarray:
        w = np.asarray(w, dtype=np.float64)
        side = int(round(np.sqrt(w.size / 3)))
        return w.reshape(3, side, side)[0]

    base = None if baseline is None else plane(baseline[0])
    return [standard_error(plane(w), n, base) for w, n in zip(weights, images)]


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


def first_conv_bn(model: Any, conv_name: str) -> Any | None:
    """The BatchNorm2d that follows the first conv: the next module in registration order
    (`bn1` after a ResNet's `conv1`, `features.1` after a VGG-BN's `features.0`), when it
    normalises as many channels; else None."""
    from torch import nn

    names = [(n, m) for n, m in model.named_modules()]
    i = next(i for i, (n, _) in enumerate(names) if n == conv_name)
    conv = names[i][1]
    nxt = names[i + 1][1] if i + 1 < len(names) else None
    if isinstance(nxt, nn.BatchNorm2d) and nxt.num_features == conv.out_channels:
        return nxt
    return None


def stimulus_filters(model: Any, preprocess_state: dict
                     ) -> tuple[str, np.ndarray, np.ndarray] | None:
    """(layer name, (C, 3, h, w), (C,)) of the model's first conv: each channel's expected mean
    preferred stimulus in RGB units (`preferred_stimulus`: the effective filter with the sign of
    its BatchNorm's γ, scaled by how selective the channel is), what the census measures and the
    report draws, and its noise as a mean stimulus over ImageNet's validation set
    (`selection_noise`)."""
    found = first_conv(model)
    if found is None:
        return None
    name, conv = found
    bn = first_conv_bn(model, name)

    def arr(t: Any) -> np.ndarray:
        return t.detach().cpu().double().numpy()

    stats = None if bn is None else (arr(bn.weight) if bn.affine else np.ones(bn.num_features),
                                     arr(bn.bias) if bn.affine else np.zeros(bn.num_features),
                                     arr(bn.running_mean), arr(bn.running_var), bn.eps)
    bias = None if conv.bias is None else arr(conv.bias)
    w = arr(conv.weight)
    return (name, preferred_stimulus(w, preprocess_state, stats, bias),
            selection_noise(filter_threshold(w, preprocess_state, stats, bias)))


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
                 thresholds: Thresholds, noises: Sequence[Any] | None = None,
                 references: Sequence[np.ndarray | None] | None = None,
                 covariance: np.ndarray | None = None) -> pa.Table:
    """Measure patterns into OUT_SCHEMA rows (same-size runs batched: one FFT each).

    Each pattern is read against its reference: `references[i]` (a (3, s, s) baseline patch)
    when given, else its neutral colour `neutrals[i]` (None: 0, a filter's stimulus); with its
    sampling noise `noises[i]` when the reading has one (a mean stimulus: per pixel (s, s); a
    filter: a number), in units of the data's colour covariance `covariance` (default
    ImageNet's). Filters are judged by that noise alone (`measure_batch`'s resolution=False):
    their expected stimulus is in the data's units, where colour is faint by nature."""
    n = len(patterns)
    noises = list(noises) if noises is not None else [None] * n
    references = list(references) if references is not None else [None] * n
    cols: dict[str, list] = {k: [None] * n for k in OUT_SCHEMA.names}
    groups: dict[tuple, list[int]] = {}
    for i, p in enumerate(patterns):
        groups.setdefault((p.shape, noises[i] is None, references[i] is None), []).append(i)
    for (shape, no_noise, no_null), idx in groups.items():
        refs = np.stack([_reference_patch(references[i], neutrals[i], shape) for i in idx])
        se = None if no_noise else np.stack([np.broadcast_to(np.asarray(noises[i], np.float64),
                                                              shape[1:]) for i in idx])
        res = measure_batch(np.stack([patterns[i] for i in idx]), refs, thresholds, noise=se,
                            covariance=covariance, resolution=source != "filter",
                            against_null=not no_null)
        for j, i in enumerate(idx):
            for k in _MEASURED:
                v = res[k][j]
                cols[k][i] = v.item() if hasattr(v, "item") else v
            nt = neutrals[i]
            cols["size"][i] = int(shape[-1])
            cols["neutral"][i] = [0.0, 0.0, 0.0] if nt is None else [float(v) for v in nt]
            cols["reference"][i] = ("baseline" if references[i] is not None else
                                    "zero" if nt is None else "neutral")
    cols["model"] = [model] * n
    cols["layer"] = [layer] * n
    cols["source"] = [source] * n
    cols["channel"] = [int(c) for c in channels]
    for k in _FLOATS:
        cols[k] = [None if v is None or not np.isfinite(v) else v for v in cols[k]]
    return pa.table(cols, schema=OUT_SCHEMA)


def _reference_patch(reference: np.ndarray | None, neutral: tuple | None, shape: tuple
                     ) -> np.ndarray:
    if reference is not None:
        return np.asarray(reference, dtype=np.float64).reshape(shape)
    colour = np.zeros(3) if neutral is None else np.asarray(neutral, dtype=np.float64)
    return np.broadcast_to(colour[:, None, None], shape)


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


def properties(rows: pa.Table) -> pa.Table:
    """Per (model, layer, source): channels, those above the noise floor (`structured`, not
    empty), each property on its own and the overlaps of orientation with either opponency."""
    df = rows.select(["model", "layer", "source", "type", *PROPERTIES]).to_pandas()
    out = []
    for (model, layer, source), g in df.groupby(["model", "layer", "source"], sort=False):
        flags = {p: g[p].fillna(False).astype(bool) for p in PROPERTIES}
        out.append({"model": model, "layer": layer, "source": source, "channels": len(g),
                    "structured": int((~g["type"].isin(["no structure", "empty"])).sum()),
                    **{p: int(f.sum()) for p, f in flags.items()},
                    "oriented_single_opponent": int((flags["orientation_selective"]
                                                     & flags["single_opponent"]).sum()),
                    "oriented_double_opponent": int((flags["orientation_selective"]
                                                     & flags["double_opponent"]).sum())})
    mr, lr = _ranks(df["model"], df["layer"])
    out.sort(key=lambda r: (SOURCES.index(r["source"]), lr[r["layer"]], mr[r["model"]]))
    return pa.Table.from_pylist(out, schema=PROPERTY_SCHEMA)


def format_summary(summary: pa.Table, props: pa.Table | None = None) -> str:
    """A printable table: one line per (source, layer, model), one column per type, plus the
    total; with `props`, a second table of the properties counted each on its own."""
    df = summary.to_pandas()
    if df.empty:
        return "(no patterns)"
    piv = df.pivot_table(index=["source", "layer", "model"], columns="type", values="count",
                         aggfunc="sum", fill_value=0)
    piv = piv.reindex(columns=[t for t in TYPES if t in piv.columns])
    piv["total"] = piv.sum(axis=1)
    mr, lr = _ranks(df["model"], df["layer"])
    order = sorted(piv.index, key=lambda k: (SOURCES.index(k[0]), lr[k[1]], mr[k[2]]))
    text = "types (each channel once):\n" + piv.loc[order].to_string()
    if props is not None and props.num_rows:
        p = props.to_pandas().set_index(["source", "layer", "model"]).rename(columns={
            "orientation_selective": "oriented", "single_opponent": "single-opp",
            "double_opponent": "double-opp", "no_structure": "no structure",
            "oriented_single_opponent": "oriented&single", "oriented_double_opponent":
            "oriented&double"})
        text += ("\nproperties (each on its own; a channel may have several):\n"
                 + p.to_string())
    return text
