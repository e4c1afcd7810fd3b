"""The report's tables: data selection and display formatting, no markup.

Each function takes the tables as read and returns a pandas frame of display strings (or a
`TableView` the `table` macro renders). Unknown columns pass through as they come, so a column a
job adds later (a `train_seed`, a per-`fraction` row, a `global_context` flag) shows up in the
report without a change here.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from pipeline.models.order import order_layers, order_models, rank_of

__all__ = ["fmt", "pm", "TableView", "table_view", "sort_rows", "table1_frame", "census_frame",
           "rf_frames", "types_frame", "properties_frame", "PAPER_TABLE1"]

# Table 1 of the paper (ImageNet, one training run per model), shown beside the measured one.
PAPER_TABLE1 = pd.DataFrame({
    "model": ["resnet34", "plainnet34"], "layer": ["pool1", "pool1"], "inactive": ["13", "2"],
    "ΔL (all inactive)": ["1.27", "≈ 0"], "ΔL_rnd (random subset)": ["0.024", "—"]})

_LABELS = {"inactive_channels": "inactive channels", "near_dead": "near-dead",
           "train_seed": "training seed", "train_seeds": "training seeds"}
# What one census row is the census of: the other columns describe its channels.
_CENSUS_KEYS = ("model", "train_seed", "layer")


def fmt(v: Any, digits: int = 4) -> str:
    """One cell as text: 4 significant digits, "—" for missing, lists as comma lists."""
    if v is None or v is pd.NA:
        return "—"
    if isinstance(v, (bool, np.bool_)):
        return "yes" if v else "no"
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    if isinstance(v, (float, np.floating)):
        return f"{float(v):.{digits}g}" if math.isfinite(float(v)) else "—"
    if isinstance(v, (bytes, bytearray)):
        return f"<{len(v)} bytes>"
    if isinstance(v, (list, tuple, np.ndarray)):
        return ", ".join(fmt(x) for x in v) if len(v) else "none"
    return str(v)


def pm(mean: Any, std: Any) -> str:
    """ "mean ± std", or the mean alone when there is no std (a single seed)."""
    m = fmt(mean)
    if m == "—":
        return m
    s = fmt(std)
    return m if s == "—" else f"{m} ± {s}"


@dataclass(frozen=True)
class TableView:
    """A frame as the `table` macro draws it: header, rows of strings, rows left out."""
    columns: list[str]
    rows: list[list[str]]
    hidden: int = 0


def table_view(df: pd.DataFrame, max_rows: int = 500) -> TableView:
    rows = [[fmt(v) for v in rec] for rec in df.head(max_rows).itertuples(index=False)]
    return TableView([str(c) for c in df.columns], rows, max(0, len(df) - max_rows))


def sort_rows(df: pd.DataFrame, models: list[str] | None = None,
              layers: list[str] | None = None) -> pd.DataFrame:
    """Rows in display order of model, then layer (`pipeline.models.order`); ties keep the
    table's order (a stable sort), so rows per seed or per fraction stay as written."""
    keys = [k for k in ("model", "layer") if k in df.columns]
    if not keys or df.empty:
        return df.reset_index(drop=True)
    given = {"model": (models, order_models), "layer": (layers, order_layers)}
    ranks = {k: rank_of(given[k][0] or given[k][1](df[k].astype(str))) for k in keys}
    by = [df[k].astype(str).map(ranks[k]).fillna(len(ranks[k])) for k in keys]
    order = np.lexsort([b.to_numpy() for b in reversed(by)])   # lexsort is stable
    return df.iloc[order].reset_index(drop=True)


def table1_frame(table1: pa.Table | None, ablation: pa.Table | None = None,
                 census: pa.Table | None = None) -> pd.DataFrame | None:
    """Table 1 as display strings, one row per row of table1.parquet, the paper's models first.

    The cells are `pipeline.ablation.table1.table1_cells`, the formatting the console prints:
    one computation (`table1`), one formatter. Without table1.parquet (an interrupted chain) it
    is computed from ablation.parquet and the census by that same `table1`; without those, None.
    """
    from pipeline.ablation.table1 import table1 as compute, table1_cells

    if table1 is None and ablation is not None and census is not None:
        table1 = compute(ablation, census)
    if table1 is None or table1.num_rows == 0:
        return None
    return sort_rows(pd.DataFrame([table1_cells(r) for r in table1.to_pylist()]))


def census_frame(census: pa.Table) -> pd.DataFrame:
    """One row per (model, training seed, layer) — whichever of these the census has: how many
    channels are inactive / near-dead, and which are inactive. A census without per-channel
    `channel`/`inactive` columns is shown as it is."""
    df = census.to_pandas()
    keys = [k for k in _CENSUS_KEYS if k in df.columns]
    if not keys or not {"channel", "inactive"} <= set(df.columns):
        return sort_rows(df)
    rows = []
    for key, g in df.groupby(keys, sort=False, dropna=False):
        row: dict[str, Any] = dict(zip(keys, key if isinstance(key, tuple) else (key,)))
        dead = sorted(int(c) for c in g.loc[g["inactive"].astype(bool), "channel"])
        row.update({"channels": len(g), "inactive": len(dead)})
        if "near_dead" in g.columns:
            row["near-dead"] = int(g["near_dead"].astype(bool).sum())
        row["inactive channels"] = ", ".join(map(str, dead)) or "none"
        rows.append(row)
    return sort_rows(pd.DataFrame(rows).rename(columns=_LABELS))


def rf_frames(rf: pd.DataFrame, models: list[str], layers: list[str]
              ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(analysed layers, all layers) of receptive_fields.parquet, the contract's columns first,
    every further column (per-axis geometry, `global_context`) after them."""
    first = [c for c in ("model", "layer", "module", "channels", "rf_size", "jump", "offset",
                         "feature_size", "global_context") if c in rf.columns]
    df = rf[first + [c for c in rf.columns if c not in first]]
    df = sort_rows(df, models, order_layers([*layers, *df["layer"].astype(str)]))
    shown = df[df["layer"].isin(layers)] if layers else df
    return shown, df


def types_frame(nt: pd.DataFrame, models: list[str], layers: list[str]) -> pd.DataFrame:
    """neuron_types/summary.parquet pivoted to (model, layer, source) × type counts, the types
    in the writer's order."""
    if not {"model", "layer", "type", "count"} <= set(nt.columns):
        return nt
    index = [c for c in ("model", "layer", "source") if c in nt.columns]
    piv = nt.pivot_table(index=index, columns="type", values="count", aggfunc="sum",
                         fill_value=0).reset_index()
    piv.columns = [str(c) for c in piv.columns]
    types = [str(t) for t in dict.fromkeys(nt["type"])]
    piv = piv[[*index, *[t for t in types if t in piv.columns]]]
    return sort_rows(piv, order_models([*models, *piv["model"].astype(str)]),
                     order_layers([*layers, *piv["layer"].astype(str)]))


_PROPERTY_LABELS = {"orientation_selective": "oriented", "single_opponent": "single-opponent",
                    "double_opponent": "double-opponent", "no_structure": "no structure",
                    "structured": "above the floor",
                    "oriented_single_opponent": "oriented & single-opponent",
                    "oriented_double_opponent": "oriented & double-opponent"}


def properties_frame(props: pd.DataFrame, models: list[str], layers: list[str]) -> pd.DataFrame:
    """neuron_types/properties.parquet as shown: each property counted on its own, and the
    overlaps, per (model, layer, source)."""
    df = props.rename(columns=_PROPERTY_LABELS)
    return sort_rows(df, order_models([*models, *df["model"].astype(str)]),
                     order_layers([*layers, *df["layer"].astype(str)]))
