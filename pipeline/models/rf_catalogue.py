"""The receptive-field catalogue of whole models, as a table and as text (`jobs.receptive_fields`).

Above both `geometry` (the arithmetic) and `layers` (the names): RF per named layer lives here.

    rfs = receptive_fields(build_model("resnet34"), input_size=224)
    rfs["pool1"].size, rfs["conv3"].size, rfs["conv7"].size      # 11, 27, 59
    table = rf_table(model, "resnet34")                            # receptive_fields.parquet rows
    rfs["layer1.2"] == rfs["conv7"]                                # a block output: its last conv's

    table = rf_catalogue(["resnet34", "vgg16"], input_size=224)    # RF_SCHEMA rows
    print(format_rf_table(table)); [print(n) for n in rf_notes(table)]

Models are built on the meta device (no weights, no memory): the geometry needs only the graph.
"""
from __future__ import annotations

from typing import Any, Sequence

import pyarrow as pa
import torch
from torch import nn

from pipeline.models.geometry import RF, module_fields
from pipeline.models.layers import analysable_layers, rf_layers
from pipeline.results import catalog

__all__ = ["COLUMNS", "LIST_COLUMNS", "RF_SCHEMA", "skeleton", "rf_catalogue", "format_rf_table",
           "rf_notes", "receptive_fields", "rf_rows", "rf_table"]

COLUMNS = ["model", "layer", "module", "channels", "rf_size", "jump", "offset", "feature_size"]
LIST_COLUMNS = ["model", "layer", "channels", "rf_size_y", "rf_size_x", "jump", "offset_y",
                "offset_x", "feature_height", "feature_width", "global_context"]


def skeleton(name: str) -> nn.Module:
    """The model for graph arithmetic: on the meta device (no weights) where it can be built
    there; RegNet computes its widths with tensors and is built on the CPU instead."""
    from pipeline.models.zoo import build_model

    try:
        with torch.device("meta"):
            return build_model(name)
    except NotImplementedError:
        return build_model(name)


def rf_catalogue(models: Sequence[str], input_size: int, all_layers: bool = False) -> pa.Table:
    """The concatenated RF table of `models` (in that order): the catalogue and the ResNets'
    block outputs (`rf_layers`); with `all_layers`, every analysable layer (what `--layers`
    accepts)."""

    tables = []
    for name in models:
        model = skeleton(name)
        layers = analysable_layers(model) if all_layers else rf_layers(model)
        tables.append(rf_table(model, name, input_size, list(layers.values())))
    return pa.concat_tables(tables)


def format_rf_table(table: pa.Table, cols: list[str] = COLUMNS) -> str:
    """Aligned text columns (names left, numbers right), one line per row."""
    rows = [cols] + [[f"{v:g}" if isinstance(v, float) else str(v) for v in r.values()]
                     for r in table.select(cols).to_pylist()]
    widths = [max(len(r[i]) for r in rows) for i in range(len(cols))]
    first_number = 3 if "module" in cols else 2     # model, layer[, module]: left-aligned
    return "\n".join("  ".join(v.rjust(w) if i >= first_number else v.ljust(w)
                               for i, (v, w) in enumerate(zip(r, widths))).rstrip()
                     for r in rows)


def rf_notes(table: pa.Table) -> list[str]:
    """One line per model that has global-context or non-square layers (the report states it)."""
    out = []
    for name in dict.fromkeys(table.column("model").to_pylist()):
        rows = [r for r in table.to_pylist() if r["model"] == name]
        glob = [r["layer"] for r in rows if r["global_context"]]
        rect = [r["layer"] for r in rows if r["rf_size_y"] != r["rf_size_x"]]
        if glob:
            out.append(f"{name}: {len(glob)} of {len(rows)} layers also depend on the whole "
                       f"image through a global operator (adaptive pooling, SE gate; column "
                       f"global_context), from {glob[0]} on; their rf_size is the local RF")
        if rect:
            out.append(f"{name}: {len(rect)} layers have non-square RFs (rf_size_y != "
                       f"rf_size_x; rf_size is the square holding them), e.g. {rect[0]}")
    return out


RF_SCHEMA = catalog.RECEPTIVE_FIELDS.schema


def receptive_fields(model: nn.Module, input_size: int = 224) -> dict[str, RF]:
    """RF of every catalogue layer and block output keyed by layer name
    (`pipeline.models.layers.rf_layers`).

    For the ResNet family these are the paper names (conv1, pool1, conv2..convN, fc): a layer's
    RF is that of its measurement point (the ReLU after it; for the last conv of a residual
    block, the ReLU after the addition, so the RF is the union of both paths); `fc` sees the
    whole input; and the block outputs (`layer1.2`: the same point as conv7). For other models,
    every analysable module path.
    """
    fields = module_fields(model, input_size)
    out = {}
    for name, layer in rf_layers(model).items():
        if layer.point not in fields:
            raise ValueError(f"layer {name}: module {layer.point} is never called by the model")
        out[name] = fields[layer.point]
    return out


def rf_rows(model: nn.Module, model_name: str, layers: Sequence[Any],
            input_size: int = 224) -> list[dict[str, Any]]:
    """`receptive_fields.parquet` rows for `layers` (pipeline.models.layers.Layer), in their order."""
    fields = module_fields(model, input_size)
    rows = []
    for layer in layers:
        rf = fields[layer.point]
        rows.append({"model": model_name, "layer": layer.name, "module": layer.module,
                     "channels": layer.channels, "rf_size": rf.size, "jump": rf.jump,
                     "offset": float(rf.offset), "feature_size": rf.feature_size,
                     "input_size": input_size, "rf_size_y": rf.size_y, "rf_size_x": rf.size_x,
                     "jump_y": rf.jump, "jump_x": rf.jump_x, "offset_y": float(rf.offset),
                     "offset_x": float(rf.offset_x), "feature_height": rf.feature_size,
                     "feature_width": rf.feature_size_x, "global_context": rf.global_context})
    return rows


def rf_table(model: nn.Module, model_name: str, input_size: int = 224,
             layers: Sequence[Any] | None = None) -> pa.Table:
    """The `receptive_fields.parquet` rows of one model, in forward order (schema RF_SCHEMA).

    Default rows: `rf_layers` (paper names and block outputs for the ResNet family, module
    paths otherwise).
    """
    layers = list(rf_layers(model).values()) if layers is None else list(layers)
    return pa.Table.from_pylist(rf_rows(model, model_name, layers, input_size), schema=RF_SCHEMA)
