"""The static HTML report: the paper's figures and tables rendered from the Parquet results alone.

Pure functions: they take pyarrow tables (or pandas frames) and numpy arrays and return PNG bytes
and HTML; only `load` opens files (it reads the results through `pipeline.results.layout` and
`pipeline.results.catalog`). The report runs no model: what comes from checkpoints (the first-conv
filters) is read by the function `jobs.report` passes to `load_inputs`.
`jobs.report` calls `load_inputs` and `render_report` and writes what the latter yields
(relative path, bytes) under `<out>/report/` through `pipeline.results.tables`.

    inputs = load.load_inputs(out)      # or ReportInputs(topk=..., mean=..., rf=...), any None
    for rel_path, data in render_report(inputs, ReportOptions()):
        write_bytes(join(report_url, rel_path), data)                           # index.html last

Built from parts, one module per concern:
- `load`: reading a results root into `ReportInputs` (the report's only file access);
- `data`: what is read (`ReportInputs`), the options, and the selection all sections share
  (models and layers from the tables, each layer's geometry, decoded tiles);
- `pipeline.models.order`: the display order (the paper's names in the paper's order, others in
  table order), shared with the census;
- `frames`: the tables as display strings (Table 1, census, receptive fields, neuron types);
- `images`: the mosaics every figure is (PNG encode/decode: `pipeline.results.png`);
- `sections`: one function per section of index.html; `atlas`: the per-layer pages;
- `templates/`: the Jinja2 markup (autoescaped), `templating` its environment;
- `render`: `render_report`, which runs the sections in order.

Every page carries a small inline script that, once the page has loaded, writes into
`<body data-images-total data-images-broken data-broken-src>` how many images failed to load (and
shows a red banner then): the browser test reads these attributes, a user sees the banner.
"""
from __future__ import annotations

from pipeline.report.atlas import SHEET_CHANNELS
from pipeline.report.data import ReportInputs, ReportOptions, filter_tiles
from pipeline.report.frames import census_frame, table1_frame
from pipeline.report.images import (cell_size, crop_center_rf, decode_png, filter_images,
                                    fit_tile, mean_image, mosaic, png_bytes, topk_grid)
from pipeline.models.order import layer_key, model_key, order_layers, order_models
from pipeline.report.render import render_report

__all__ = ["ReportInputs", "ReportOptions", "render_report", "png_bytes", "decode_png",
           "mean_image", "filter_images", "filter_tiles", "cell_size", "fit_tile", "mosaic",
           "topk_grid", "crop_center_rf", "layer_key", "model_key", "order_models",
           "order_layers", "table1_frame", "census_frame", "SHEET_CHANNELS"]
