"""The receptive-field catalogue of whole models, as a table and as text (`jobs.receptive_fields`).

    table = rf_catalogue(["resnet34", "vgg16"], input_size=224)    # RF_SCHEMA rows
    print(format_rf_table(table)); [print(n) for n in rf_notes(table)]

Models are built on the meta device (no weights, no memory): the geometry needs only the graph.
"""
from __future__ import annotations

from typing import Sequence

import pyarrow as pa
import torch
from torch import nn

__all__ = ["COLUMNS", "LIST_COLUMNS", "skeleton", "rf_catalogue", "format_rf_table", "rf_notes"]

COLUMNS = ["model", "layer", "module", "channels", "rf_size", "jump", "offset", "feature_size"]
LIST_COLUMNS = ["model", "layer", "channels", "rf_size_y", "rf_size_x", "jump", "offset_y",
                "offset_x", "feature_height", "feature_width", "global_context"]


def skeleton(name: str) -> nn.Module:
    """The model for graph arithmetic: on the meta device (no weights) where it can be built
    there; RegNet computes its widths with tensors and is built on the CPU instead."""
    from pipeline.models import build_model

    try:
        with torch.device("meta"):
            return build_model(name)
    except NotImplementedError:
        return build_model(name)


def rf_catalogue(models: Sequence[str], input_size: int, all_layers: bool = False) -> pa.Table:
    """The concatenated RF table of `models` (in that order); with `all_layers`, every
    analysable layer (what `--layers` accepts) instead of the catalogue."""
    from pipeline.geometry import rf_table
    from pipeline.layers import analysable_layers, catalogue

    tables = []
    for name in models:
        model = skeleton(name)
        layers = analysable_layers(model) if all_layers else catalogue(model)
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
