"""The comparison page's pieces: the colour scale, a grid with undefined cells, box-plot
geometry, and the index section when jobs.compare's tables are absent."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa

from pipeline.report import ReportInputs, ReportOptions, render_report
from pipeline.report.compare import boxplots, colour, heatmap


def test_colour_scale_is_viridis_at_its_anchors_and_clipped():
    assert colour(0.0) == "#440154" and colour(1.0) == "#fde725" and colour(0.5) == "#21918c"
    assert colour(-0.2) == colour(0.0) and colour(1.3) == colour(1.0)
    assert colour(float("nan")) == colour(None) == "#dddddd"
    greens = [int(colour(v)[3:5], 16) for v in np.linspace(0, 1, 11)]
    assert greens == sorted(greens)                  # brighter as CKA grows


def test_heatmap_rows_columns_and_undefined_cells():
    cka = pd.DataFrame({"net_a": ["A"] * 4, "net_b": ["B"] * 4,
                        "layer_a": ["x", "x", "y", "y"], "layer_b": ["u", "v", "u", "v"],
                        "cka": [0.1, np.nan, 0.9, 0.5]})
    h = heatmap(cka, "A", "B", "A × B")
    assert (h.rows, h.cols) == (["x", "y"], ["u", "v"])
    assert [c["fill"] for c in h.cells] == [colour(0.1), "#dddddd", colour(0.9), colour(0.5)]
    assert h.cells[1]["tip"] == "A x × B v: —"
    assert (h.cells[3]["x"] - h.cells[2]["x"], h.cells[2]["y"] - h.cells[0]["y"]) == (h.cell,) * 2
    assert heatmap(cka, "B", "A", "none") is None


def test_boxplots_quartiles_on_a_0_1_axis():
    sel = pd.DataFrame({"net": ["A"] * 5 + ["B"] * 3, "layer": ["l"] * 8,
                        "selectivity": [0.0, 0.25, 0.5, 0.75, 1.0, np.nan, np.nan, np.nan]})
    b = boxplots(sel)
    (layer,) = b.layers
    (box,) = layer["boxes"]                          # B has no finite value: no box
    assert box["net"] == "A" and box["median"] == "0.500" and box["n"] == 5
    scale = b.bottom - b.top
    assert box["median_y"] == b.bottom - 0.5 * scale
    assert (box["box_top"], box["box_bottom"]) == (b.bottom - 0.75 * scale, b.bottom - 0.25 * scale)
    assert box["whisker_top"] < box["box_top"] < box["box_bottom"] < box["whisker_bottom"]


def test_without_compare_tables_the_index_says_so():
    rf = pa.table({"model": ["m"], "layer": ["l"], "rf_size": [3]})
    pages = dict(render_report(ReportInputs(rf=rf, missing={"compare": "no compare/cka.parquet"}),
                               ReportOptions(atlas=False)))
    assert "compare.html" not in pages
    assert "Not available: compare/cka.parquet (no compare/cka.parquet)" in pages["index.html"].decode()
