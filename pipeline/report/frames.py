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
           "rf_frames", "types_frame", "PAPER_TABLE1"]

# Table 1 of the paper (ImageNet, one training run per model), shown beside the measured one.
PAPER_TABLE1 = pd.DataFrame({
    "model": ["resnet34", "plainnet34"], "layer": ["pool1", "pool1"], "inactive": ["13", "2"],
    "ΔL (all inactive)": ["1.27", "≈ 0"], "ΔL_rnd (random subset)": ["0.024", "—"]})

_LABELS = {"delta_loss": "ΔL (all inactive)", "delta_loss_rnd": "ΔL_rnd (random subset)",
           "control": "control ΔL", "control_delta_loss": "control ΔL",
           "inactive_channels": "inactive channels", "near_dead": "near-dead",
           "train_seed": "training seed", "train_seeds": "training seeds"}
# Table 1's leading columns, in the paper's order; the others follow as they come.
_TABLE1_FIRST = ("model", "layer", "train_seed", "train_seeds", "fraction", "inactive",
                 "inactive_mean", "delta_loss_mean", "delta_loss_rnd_mean",
                 "control_delta_loss_mean", "control_mean")
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


def _label(name: str) -> str:
    return _LABELS.get(name, name)


def _inactive_counts(channels: pd.DataFrame | None) -> dict[str, int]:
    if channels is None or not {"model", "layer", "inactive"} <= set(channels.columns):
        return {}
    pool = channels[channels["layer"] == "pool1"]
    return {str(m): int(g["inactive"].astype(bool).sum()) for m, g in pool.groupby("model")}


def _display_table1(df: pd.DataFrame) -> pd.DataFrame:
    """table1.parquet as strings: `<x>_mean`/`<x>_std` pairs become one "mean ± std" column."""
    cols = ([c for c in _TABLE1_FIRST if c in df.columns]
            + [c for c in df.columns if c not in _TABLE1_FIRST])
    out = pd.DataFrame(index=df.index)
    for c in cols:
        if c.endswith("_mean") and c[:-5] + "_std" in cols:
            out[_label(c[:-5])] = [pm(m, s) for m, s in zip(df[c], df[c[:-5] + "_std"])]
        elif not (c.endswith("_std") and c[:-4] + "_mean" in cols):
            out[_label(c)] = [fmt(v) for v in df[c]]
    return out


def _table1_from_ablation(df: pd.DataFrame, inactive: dict[str, int]) -> pd.DataFrame:
    """Table 1 computed from ablation.parquet: per model (and layer) and condition, mean ±
    sample std (ddof 1) of delta_loss over every seed row; split by fraction when it varies."""
    keys = [k for k in ("model", "layer") if k in df.columns]
    split = "fraction" in df.columns and df.groupby("condition")["fraction"].nunique().max() > 1
    by = ["condition", "fraction"] if split else ["condition"]
    rows = []
    for key, g in df.groupby(keys, sort=False):
        row = dict(zip(keys, map(str, key)))
        if inactive:
            row["inactive"] = str(inactive.get(row["model"], "—"))
        for (cond, *frac), gc in g.groupby(by, sort=False, dropna=False):
            vals = gc["delta_loss"].astype(float)
            std = vals.std(ddof=1) if len(vals) > 1 else float("nan")
            name = f"ΔL {cond}" + (f" f={fmt(frac[0])}" if frac and fmt(frac[0]) != "—" else "")
            row[f"{name} (n={len(vals)})"] = pm(vals.mean(), std)
        rows.append(row)
    return pd.DataFrame(rows).fillna("—")


def table1_frame(table1: pa.Table | None, ablation: pa.Table | None,
                 channels: pa.Table | None = None) -> pd.DataFrame | None:
    """Table 1 as display strings, one row per row of table1.parquet (model, layer, training
    seed, fraction … whatever it holds), the paper's models first.

    Without table1.parquet it is computed from ablation.parquet. The inactive count comes from
    the table itself, else from pool1 of channels.parquet.
    """
    inactive = _inactive_counts(None if channels is None else channels.to_pandas())
    if table1 is not None and "model" in table1.column_names:
        df = table1.to_pandas()
        out = _display_table1(df)
        if not ({"inactive", "inactive_mean"} & set(df.columns)) and inactive:
            out.insert(1, "inactive", [str(inactive.get(str(m), "—")) for m in df["model"]])
        return sort_rows(out)
    if ablation is not None and {"model", "condition", "delta_loss"} <= set(ablation.column_names):
        return sort_rows(_table1_from_ablation(ablation.to_pandas(), inactive))
    if inactive:
        return pd.DataFrame({"model": list(inactive),
                             "inactive": [str(v) for v in inactive.values()]})
    return None


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
