"""The static HTML report: the paper's figures and tables rendered from the Parquet results alone.

Pure functions: they take pyarrow tables (or pandas frames) and numpy arrays and return PNG bytes
and HTML strings; they never open files. `jobs.report` reads the tables, calls `render_report`
and writes what it yields (relative path, bytes) under `<out>/report/` through `pipeline.tables`.

    inputs = ReportInputs(topk=topk_table, mean=mean_table, rf=rf_table, ...)   # any may be None
    for rel_path, data in render_report(inputs, ReportOptions()):
        write_bytes(join(report_url, rel_path), data)                           # index.html last

What the report holds (each section says "not available" when its tables are missing):
- receptive-field table; Table 1 (inactive count, ΔL, ΔL_rnd, control, mean ± std over seeds);
- top-16 receptive-field patch grids of the first N channels per layer (ResNet | PlainNet);
- the first-conv filters beside the mean preferred stimuli of every analysed layer;
- activation-maximization images; the neuron-type summary; training metrics;
- one atlas page per (model, layer): every channel's statistics, mean stimulus, actmax image and
  top-k strip. Atlas images are "sheets" of 16 channels (one PNG per 16 channels) that each
  channel row shows a slice of, which keeps the number of files small for 512-channel layers.

Every page carries a small inline script that, once the page has loaded, writes into
`<body data-images-total data-images-broken data-broken-src>` how many images failed to load (and
shows a red banner then): the browser test reads these attributes, a user sees the banner.
"""
from __future__ import annotations

import html
import io
import json
import math
import re
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator

import numpy as np
import pandas as pd
import pyarrow as pa
from PIL import Image, ImageDraw, ImageFont

__all__ = ["ReportInputs", "ReportOptions", "render_report", "png_bytes", "decode_png",
           "mean_image", "filter_images", "fit_tile", "mosaic", "topk_grid", "layer_key",
           "model_key", "table1_frame", "SHEET_CHANNELS", "CHECK_SCRIPT"]

SHEET_CHANNELS = 16   # channels per atlas sheet PNG
_PAD = 2              # pixels between tiles
_BG = 255             # white background between tiles

# Paper values (ImageNet), shown beside Table 1 for comparison.
_PAPER_TABLE1 = ("Paper (ImageNet): ResNet34 13 inactive pool1 channels, ΔL = 1.27, ΔL_rnd = 0.024; "
                 "PlainNet34 2 inactive channels, ΔL ≈ 0.")


@dataclass
class ReportInputs:
    """Everything the report reads; each table may be None (its section then says so)."""
    rf: pa.Table | None = None            # receptive_fields.parquet (all models concatenated)
    topk: pa.Table | None = None          # stimuli/topk.parquet
    mean: pa.Table | None = None          # stimuli/mean.parquet
    channels: pa.Table | None = None      # stimuli/channels.parquet
    actmax: pa.Table | None = None        # actmax/actmax.parquet
    table1: pa.Table | None = None        # ablation/table1.parquet
    ablation: pa.Table | None = None      # ablation/ablation.parquet (Table 1 fallback)
    census: pa.Table | None = None        # ablation/census.parquet
    neuron_types: pa.Table | None = None  # neuron_types/summary.parquet
    filters: dict[str, np.ndarray] = field(default_factory=dict)   # model -> conv1 weight (C,3,k,k)
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
    title: str = "Preferred stimuli: ResNet vs PlainNet"


# ---------------------------------------------------------------------------------------------
# ordering

def layer_key(name: str) -> tuple[int, str]:
    """Forward order of the paper's layer names: conv1, pool1, conv2 … convN, fc, then others."""
    if name == "conv1":
        return (0, name)
    if name == "pool1":
        return (1, name)
    m = re.fullmatch(r"conv(\d+)", name)
    if m:
        return (int(m.group(1)), name)
    return (10_000 if name == "fc" else 10_001, name)


def model_key(name: str) -> tuple[int, int, str]:
    """ResNet before PlainNet (left/right in side-by-side figures), shallower first."""
    family = 0 if name.startswith("resnet") else 1 if name.startswith("plainnet") else 2
    m = re.search(r"(\d+)$", name)
    return (family, int(m.group(1)) if m else 0, name)


def _models(*tables: pa.Table | None, extra: Iterable[str] = ()) -> list[str]:
    names: set[str] = set(extra)
    for t in tables:
        if t is not None and "model" in t.column_names:
            names.update(str(v) for v in t.column("model").unique().to_pylist())
    return sorted(names, key=model_key)


# ---------------------------------------------------------------------------------------------
# images

def png_bytes(image: np.ndarray) -> bytes:
    """(H, W, 3) uint8 (or float in [0, 1]) -> PNG bytes."""
    if image.dtype != np.uint8:
        image = (np.clip(np.nan_to_num(image, nan=0.0), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(image, "RGB").save(buf, format="PNG", optimize=False, compress_level=6)
    return buf.getvalue()


def decode_png(data: bytes) -> np.ndarray:
    """PNG (or any PIL-readable) bytes -> (H, W, 3) uint8 RGB."""
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB"))


def mean_image(values: Any, size: int, stretch: bool = True) -> np.ndarray:
    """A mean-stimulus row (3·size·size floats, C-order (3, size, size)) -> (size, size, 3) uint8.

    The mean of many patches is close to uniform grey, so by default the finite pixels are
    stretched to the full [0, 1] range (one min/max for all three colours, which keeps hue).
    NaN pixels (never inside the image) are drawn black, as outside pixels are in RF patches.
    """
    arr = np.asarray(values, dtype=np.float64)
    if arr.size != 3 * size * size:
        raise ValueError(f"mean stimulus has {arr.size} values, expected 3*{size}*{size}")
    img = arr.reshape(3, size, size).transpose(1, 2, 0)
    finite = np.isfinite(img)
    if stretch and finite.any():
        lo, hi = float(img[finite].min()), float(img[finite].max())
        if hi - lo > 1e-8:
            img = (img - lo) / (hi - lo)
    img = np.where(finite, img, 0.0)
    return (np.clip(img, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def filter_images(weight: np.ndarray) -> list[np.ndarray]:
    """First-conv weights (C, 3, k, k) -> C images (k, k, 3) uint8, zero mapped to grey.

    Each filter is scaled by its own largest |w| so that its sign structure is visible:
    pixel = 0.5 + w / (2·max|w|).
    """
    w = np.asarray(weight, dtype=np.float64)
    if w.ndim != 4 or w.shape[1] != 3:
        raise ValueError(f"first-conv weight must have shape (C, 3, k, k), got {w.shape}")
    out = []
    for f in w:
        scale = np.abs(f).max()
        img = 0.5 + (f / (2.0 * scale) if scale > 0 else f * 0.0)
        out.append((np.clip(img.transpose(1, 2, 0), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8))
    return out


def cell_size(size: int, target: int = 56, cap: int = 112) -> int:
    """Display size of a size×size patch: an integer upscale near `target`, at most `cap`."""
    if size <= 0:
        return target
    if size >= target:
        return min(size, cap)
    return size * max(1, round(target / size))


def fit_tile(image: np.ndarray, cell: int) -> np.ndarray:
    """Resize (H, W, 3) uint8 to (cell, cell, 3): nearest when enlarging, area when shrinking."""
    h, w = image.shape[:2]
    if (h, w) == (cell, cell):
        return image
    resample = Image.NEAREST if max(h, w) <= cell else Image.BOX
    return np.asarray(Image.fromarray(image, "RGB").resize((cell, cell), resample))


def _blank(cell: int, value: int = 235) -> np.ndarray:
    return np.full((cell, cell, 3), value, dtype=np.uint8)


def mosaic(tiles: list[np.ndarray], cols: int, pad: int = _PAD,
           labels: list[str] | None = None, label_height: int = 0) -> np.ndarray:
    """Tiles of equal shape (h, w, 3) laid out row-major in `cols` columns on white.

    Tile i's top-left corner lies at (label_height + pad + r·(h + pad + label_height),
    pad + c·(w + pad)) with r, c = divmod(i, cols); a label, when given, is drawn above it.
    """
    if not tiles:
        raise ValueError("mosaic of no tiles")
    h, w = tiles[0].shape[:2]
    cols = max(1, min(cols, len(tiles)))
    rows = math.ceil(len(tiles) / cols)
    step_y, step_x = h + pad + label_height, w + pad
    canvas = np.full((pad + rows * step_y, pad + cols * step_x, 3), _BG, dtype=np.uint8)
    for i, tile in enumerate(tiles):
        if tile.shape[:2] != (h, w):
            raise ValueError(f"tile {i} has shape {tile.shape[:2]}, expected {(h, w)}")
        r, c = divmod(i, cols)
        y, x = pad + r * step_y + label_height, pad + c * step_x
        canvas[y:y + h, x:x + w] = tile
    if labels and label_height:
        im = Image.fromarray(canvas)
        draw = ImageDraw.Draw(im)
        font = _font(label_height - 2)
        for i, text in enumerate(labels[:len(tiles)]):
            r, c = divmod(i, cols)
            draw.text((pad + c * step_x, pad + r * step_y), text, fill=(40, 40, 40), font=font)
        canvas = np.asarray(im)
    return canvas


def _font(px: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=max(8, px))
    except TypeError:  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def topk_grid(patches: list[bytes | None], cell: int, cols: int = 4, pad: int = 1) -> np.ndarray:
    """Up to cols·cols top-k patches (rank order) -> one grid, missing ranks light grey."""
    n = cols * cols
    tiles = [fit_tile(decode_png(p), cell) if p else _blank(cell) for p in patches[:n]]
    tiles += [_blank(cell)] * (n - len(tiles))
    return mosaic(tiles, cols, pad=pad)


def _crop_center_rf(image: np.ndarray, rf: dict | None) -> np.ndarray:
    """Crop an actmax image to its centre neuron's receptive field (clipped to the image)."""
    if not rf:
        return image
    size, jump, offset, feat = (int(rf.get(k) or 0) for k in ("rf_size", "jump", "offset",
                                                               "feature_size"))
    if size <= 0 or feat <= 0 or size >= min(image.shape[:2]):
        return image
    c = offset + jump * (feat // 2)
    lo = c - (size - 1) // 2
    y0, x0 = max(0, lo), max(0, lo)
    y1, x1 = min(image.shape[0], lo + size), min(image.shape[1], lo + size)
    if y1 - y0 < 2 or x1 - x0 < 2:
        return image
    return image[y0:y1, x0:x1]


# ---------------------------------------------------------------------------------------------
# tables

def _frame(t: pa.Table | None) -> pd.DataFrame | None:
    return None if t is None else t.to_pandas()


def _fmt(v: Any, digits: int = 4) -> str:
    if v is None or v is pd.NA:
        return "—"
    if isinstance(v, (bool, np.bool_)):
        return "yes" if v else "no"
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    if isinstance(v, (float, np.floating)):
        if not math.isfinite(float(v)):
            return "—"
        return f"{float(v):.{digits}g}"
    if isinstance(v, (bytes, bytearray)):
        return f"<{len(v)} bytes>"
    if isinstance(v, (list, tuple, np.ndarray)):
        return ", ".join(_fmt(x) for x in v) if len(v) else "none"
    return str(v)


def _pm(mean: Any, std: Any) -> str:
    m = _fmt(mean)
    if m == "—":
        return m
    s = _fmt(std)
    return m if s == "—" else f"{m} ± {s}"


def _html_table(df: pd.DataFrame, max_rows: int = 500) -> str:
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in df.columns)
    rows = []
    for rec in df.head(max_rows).itertuples(index=False):
        rows.append("<tr>" + "".join(f"<td>{html.escape(_fmt(v))}</td>" for v in rec) + "</tr>")
    more = (f"<p class='note'>{len(df) - max_rows} more rows not shown.</p>"
            if len(df) > max_rows else "")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>{more}"


def _inactive_counts(channels: pd.DataFrame | None) -> dict[str, int]:
    if channels is None or not {"model", "layer", "inactive"} <= set(channels.columns):
        return {}
    pool = channels[channels["layer"] == "pool1"]
    return {str(m): int(g["inactive"].astype(bool).sum()) for m, g in pool.groupby("model")}


def table1_frame(table1: pa.Table | None, ablation: pa.Table | None,
                 channels: pa.Table | None = None) -> pd.DataFrame | None:
    """Table 1 as display strings: one row per model, "mean ± std" cells.

    Reads `table1.parquet` defensively: pairs of `<name>_mean` / `<name>_std` columns become
    one "mean ± std" column, other columns pass through. Without it, falls back to
    `ablation.parquet` (delta_loss mean ± std over seeds per condition). The inactive count
    comes from the table itself, else from pool1 of `channels.parquet`.
    """
    inactive = _inactive_counts(_frame(channels))
    if table1 is not None and "model" in table1.column_names:
        df = table1.to_pandas()
        out = pd.DataFrame({"model": df["model"].astype(str)})
        cols = ([c for c in _TABLE1_FIRST if c in df.columns]
                + [c for c in df.columns if c not in _TABLE1_FIRST])
        done = {"model"}
        for c in cols:
            if c in done:
                continue
            if c.endswith("_mean") and c[:-5] + "_std" in cols:
                base = c[:-5]
                out[_label(base)] = [_pm(m, s) for m, s in zip(df[c], df[base + "_std"])]
                done.update({c, base + "_std"})
            elif c.endswith("_std") and c[:-4] + "_mean" in cols:
                continue
            else:
                out[_label(c)] = [_fmt(v) for v in df[c]]
                done.add(c)
        if "inactive" not in df.columns and inactive:
            out.insert(1, "inactive", [str(inactive.get(m, "—")) for m in out["model"]])
        return out.sort_values("model", key=lambda s: s.map(model_key)).reset_index(drop=True)
    if ablation is not None and {"model", "condition", "delta_loss"} <= set(ablation.column_names):
        df = ablation.to_pandas()
        rows = []
        for model, g in df.groupby("model"):
            row = {"model": str(model)}
            if inactive:
                row["inactive"] = str(inactive.get(str(model), "—"))
            for cond, gc in g.groupby("condition"):
                vals = gc["delta_loss"].astype(float)
                std = vals.std(ddof=1) if len(vals) > 1 else float("nan")
                row[f"ΔL {cond} (n={len(vals)})"] = _pm(vals.mean(), std)
            rows.append(row)
        out = pd.DataFrame(rows).fillna("—")
        return out.sort_values("model", key=lambda s: s.map(model_key)).reset_index(drop=True)
    if inactive:
        return pd.DataFrame({"model": list(inactive), "inactive": [str(v) for v in inactive.values()]})
    return None


def _census_html(census: pd.DataFrame) -> str:
    """Per (model, layer): how many channels are inactive / near-dead, and which are inactive."""
    if not {"model", "layer", "channel", "inactive"} <= set(census.columns):
        return "<details><summary>Census</summary>" + _html_table(census) + "</details>"
    rows = []
    for (model, layer), g in census.groupby(["model", "layer"]):
        inactive = sorted(int(c) for c in g.loc[g["inactive"].astype(bool), "channel"])
        row = {"model": str(model), "layer": str(layer), "channels": len(g),
               "inactive": len(inactive)}
        if "near_dead" in g.columns:
            row["near-dead"] = int(g["near_dead"].astype(bool).sum())
        row["inactive channels"] = ", ".join(map(str, inactive)) or "none"
        rows.append(row)
    df = pd.DataFrame(rows)
    df = df.iloc[sorted(range(len(df)), key=lambda i: model_key(df["model"].iloc[i]))]
    return "<h4>Inactive-neuron census</h4>" + _html_table(df)


_LABELS = {"inactive": "inactive", "delta_loss": "ΔL (all inactive)",
           "delta_loss_rnd": "ΔL_rnd (random subset)", "control": "control ΔL",
           "control_delta_loss": "control ΔL", "inactive_channels": "inactive channels",
           "near_dead": "near-dead"}
# Table 1's leading columns, in the paper's order; the others follow as they come.
_TABLE1_FIRST = ("model", "layer", "inactive", "delta_loss_mean", "delta_loss_rnd_mean",
                 "control_delta_loss_mean", "control_mean")


def _label(name: str) -> str:
    return _LABELS.get(name, name)


# ---------------------------------------------------------------------------------------------
# HTML scaffolding

CHECK_SCRIPT = """<script>
// Marks on the body element how many images failed to load (a test and the reader both use it).
window.addEventListener('load', function () {
  var imgs = Array.prototype.slice.call(document.images);
  var broken = imgs.filter(function (i) { return !(i.complete && i.naturalWidth > 0); });
  var b = document.body;
  b.setAttribute('data-images-total', String(imgs.length));
  b.setAttribute('data-images-broken', String(broken.length));
  b.setAttribute('data-broken-src', broken.map(function (i) { return i.getAttribute('src'); }).join(' '));
  if (broken.length) {
    var d = document.createElement('p');
    d.className = 'broken';
    d.textContent = broken.length + ' image(s) failed to load';
    b.insertBefore(d, b.firstChild);
  }
});
</script>"""

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:1.5em auto;max-width:1400px;
padding:0 1em;color:#222}
h1{font-size:1.6em} h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:2em}
h3{margin:1.2em 0 .4em} table{border-collapse:collapse;margin:.5em 0;font-size:.9em}
td,th{border:1px solid #ccc;padding:.25em .6em;text-align:right;white-space:nowrap} th{background:#f3f3f3}
td:first-child,th:first-child{text-align:left}
.pair{display:flex;flex-wrap:wrap;gap:2em;align-items:flex-start}
.pair>div{flex:1 1 0;min-width:300px} .pair img{max-width:100%;height:auto;image-rendering:pixelated}
.na{color:#a33;font-style:italic} .note{color:#666;font-size:.9em}
.broken{background:#c00;color:#fff;padding:.5em;font-weight:bold}
nav a{margin-right:1em} .atlas td{vertical-align:middle} .atlas img{display:block}
details pre{background:#f7f7f7;padding:.5em;overflow:auto;max-height:30em;font-size:.8em}
"""


def _page(title: str, body: str) -> bytes:
    return (f"<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
            f"<meta name='viewport' content='width=device-width, initial-scale=1'>"
            f"<title>{html.escape(title)}</title><style>{_CSS}</style></head>\n<body>\n{body}\n"
            f"{CHECK_SCRIPT}\n</body></html>\n").encode("utf-8")


def _na(what: str, why: str = "") -> str:
    return (f"<p class='na'>Not available: {html.escape(what)}"
            f"{' (' + html.escape(why) + ')' if why else ''}.</p>")


def _img(src: str, image: np.ndarray, alt: str) -> str:
    h, w = image.shape[:2]
    return (f"<img src='{html.escape(src)}' width='{w}' height='{h}' "
            f"alt='{html.escape(alt)}' title='{html.escape(alt)}'>")


def _slug(*parts: str) -> str:
    return "_".join(re.sub(r"[^A-Za-z0-9.-]+", "-", p) for p in parts)


def _pair(models: list[str], cells: dict[str, str]) -> str:
    return "<div class='pair'>" + "".join(
        f"<div><h4>{html.escape(m)}</h4>{cells.get(m) or _na(m + ' has no data here')}</div>"
        for m in models) + "</div>"


# ---------------------------------------------------------------------------------------------
# the report

class _Images:
    """Collects (relative path, PNG bytes) for `render_report` to yield."""

    def __init__(self) -> None:
        self.pending: list[tuple[str, bytes]] = []
        self.count = 0

    def add(self, name: str, image: np.ndarray) -> str:
        rel = f"img/{name}.png"
        self.pending.append((rel, png_bytes(image)))
        self.count += 1
        return rel

    def drain(self) -> Iterator[tuple[str, bytes]]:
        while self.pending:
            yield self.pending.pop(0)


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


def _rf_lookup(rf: pd.DataFrame | None) -> dict[tuple[str, str], dict]:
    if rf is None or not {"model", "layer"} <= set(rf.columns):
        return {}
    return {(str(r["model"]), str(r["layer"])): r for r in rf.to_dict("records")}


def render_report(inputs: ReportInputs, options: ReportOptions = ReportOptions()
                  ) -> Iterator[tuple[str, bytes]]:
    """Yield (relative path, bytes) of every report file; images first, `index.html` last."""
    if options.figure_channels < 1:
        raise ValueError(f"figure_channels must be >= 1, got {options.figure_channels}")
    if options.topk_neuron not in ("any", "center"):
        raise ValueError(f"invalid top-k neuron {options.topk_neuron!r}; allowed: any, center")
    if options.mean_neuron not in ("center", "all"):
        raise ValueError(f"invalid mean neuron {options.mean_neuron!r}; allowed: center, all")

    imgs = _Images()
    rf = _frame(inputs.rf)
    topk, topk_neuron = _pick(_frame(inputs.topk), "neuron", options.topk_neuron)
    mean, mean_neuron = _pick(_frame(inputs.mean), "neuron", options.mean_neuron)
    channels = _frame(inputs.channels)
    actmax = _frame(inputs.actmax)
    rf_of = _rf_lookup(rf)
    models = _models(inputs.rf, inputs.topk, inputs.mean, inputs.channels, inputs.actmax,
                     extra=list(inputs.filters))
    layers = sorted({str(v) for t in (topk, mean, actmax, channels) if t is not None
                     and "layer" in t.columns for v in t["layer"].unique()}, key=layer_key)

    sections: list[tuple[str, str, str]] = []   # (anchor, title, html)

    # -- receptive fields -----------------------------------------------------------------
    if rf is not None and not rf.empty:
        cols = [c for c in ("model", "layer", "module", "channels", "rf_size", "jump", "offset",
                            "feature_size") if c in rf.columns]
        cols += [c for c in rf.columns if c not in cols]
        df = rf[cols].copy()
        df = df.iloc[sorted(range(len(df)), key=lambda i: (model_key(str(df["model"].iloc[i])),
                                                          layer_key(str(df["layer"].iloc[i]))))]
        shown = df[df["layer"].isin(layers)] if layers else df
        body = ("<p class='note'>RF size, jump and centre offset in pixels of the analysed input "
                "crop (neuron (y, x) sees rows offset + jump·y ± (size−1)/2); the paper's pool1, "
                "conv3 and conv7 have RF 11, 27 and 59 on 224×224 ImageNet crops.</p>"
                + _html_table(shown))
        if len(shown) < len(df):
            body += ("<details><summary>All layers</summary>" + _html_table(df) + "</details>")
    else:
        body = _na("receptive_fields.parquet", inputs.missing.get("analysis", ""))
    sections.append(("rf", "Receptive fields", body))

    # -- Table 1 --------------------------------------------------------------------------
    t1 = table1_frame(inputs.table1, inputs.ablation, inputs.channels)
    body = ""
    if inputs.table1 is None and inputs.ablation is None:
        body = _na("ablation/table1.parquet and ablation/ablation.parquet (ΔL)",
                   inputs.missing.get("ablation", ""))
    if t1 is not None:
        body += (_html_table(t1) + "<p class='note'>ΔL = validation loss with ReLU(N(0,1)) noise "
                 "added to the inactive pool1 channels minus the clean loss, mean ± std over "
                 "seeds; ΔL_rnd: noise on a random subset redrawn each minibatch; the control "
                 "noises as many active channels. Inactive = pool1 channels whose output is 0 on "
                 f"every validation image. {html.escape(_PAPER_TABLE1)}</p>")
    if inputs.census is not None:
        body += _census_html(inputs.census.to_pandas())
    sections.append(("table1", "Table 1: inactive neurons and noise ablation", body))

    # -- top-16 grids (Fig. 2 style) ------------------------------------------------------
    if topk is not None and not topk.empty:
        parts = [f"<p class='note'>The top-16 receptive-field patches (rank order, row-major) of "
                 f"channels 0–{options.figure_channels - 1} of each layer; neuron = "
                 f"<b>{html.escape(topk_neuron)}</b> ({'each image’s strongest position' if topk_neuron == 'any' else 'the centre neuron'}). "
                 "Black pixels lie outside the image.</p>"]
        for layer in layers:
            cells = {}
            for model in models:
                g = topk[(topk["model"] == model) & (topk["layer"] == layer)]
                if g.empty:
                    continue
                chans = sorted(int(c) for c in g["channel"].unique())[:options.figure_channels]
                size = int(g["size"].max())
                cell = cell_size(size)
                blocks = []
                for ch in chans:
                    gc = g[g["channel"] == ch].sort_values("rank")
                    blocks.append(topk_grid(list(gc["patch"]), cell))
                fig = mosaic(blocks, cols=4, pad=6, labels=[f"channel {c}" for c in chans],
                             label_height=14)
                src = imgs.add(_slug("topk", model, layer, topk_neuron), fig)
                link = f"atlas_{_slug(model, layer)}.html" if options.atlas else None
                tag = _img(src, fig, f"{model} {layer} top-16 patches")
                cells[model] = f"<a href='{link}'>{tag}</a>" if link else tag
            if cells:
                r = rf_of.get((models[0], layer)) if models else None
                rf_note = f" (RF {int(r['rf_size'])})" if r is not None and "rf_size" in r else ""
                parts.append(f"<h3>{html.escape(layer)}{rf_note}</h3>" + _pair(models, cells))
        body = "".join(parts)
    else:
        body = _na("stimuli/topk.parquet", inputs.missing.get("analysis", ""))
    sections.append(("topk", "Top-16 preferred stimuli", body))
    yield from imgs.drain()   # hand images out as they are made, not all at the end

    # -- filters + mean stimuli (Fig. 3/4 style) ------------------------------------------
    mean_tiles: dict[tuple[str, str], dict[int, np.ndarray]] = {}
    if mean is not None and not mean.empty:
        for (model, layer), g in mean.groupby(["model", "layer"]):
            mean_tiles[(str(model), str(layer))] = {
                int(r["channel"]): mean_image(r["mean"], int(r["size"])) for _, r in g.iterrows()}
    filt_tiles = {m: filter_images(w) for m, w in inputs.filters.items()}
    if mean_tiles or filt_tiles:
        filters_note = ("First the first-conv filters, each scaled to its own largest |w| with "
                        "zero as grey (read from the training checkpoint); channel c of pool1 is "
                        "the max-pool of filter c, so the first two grids align channel by "
                        "channel. Then" if filt_tiles else
                        "(First-conv filters: not available, no train/&lt;model&gt;/model.pt.) "
                        "Below:")
        parts = [f"<p class='note'>{filters_note} the mean preferred stimulus of every channel "
                 f"of each layer (neuron = <b>{html.escape(mean_neuron)}</b>): the mean RF patch "
                 "over the images that activate it, contrast-stretched. Black: never inside the "
                 "image, or the channel never fired.</p>"]
        cells = {}
        for model in models:
            rows = []
            if model in filt_tiles:
                tiles = filt_tiles[model]
                # The same cell as the pool1 grid below, so that channel c sits above channel c.
                pool1 = mean_tiles.get((model, "pool1"))
                side = next(iter(pool1.values())).shape[0] if pool1 else tiles[0].shape[0]
                cell = cell_size(side, target=42, cap=84)
                fig = mosaic([fit_tile(t, cell) for t in tiles], cols=8)
                rows.append(f"<h5>conv1 filters</h5>{_img(imgs.add(_slug('filters', model), fig), fig, model + ' conv1 filters')}")
            for layer in layers:
                tiles_by_ch = mean_tiles.get((model, layer))
                if not tiles_by_ch:
                    continue
                chans = sorted(tiles_by_ch)
                size = tiles_by_ch[chans[0]].shape[0]
                cell = cell_size(size, target=42, cap=84)
                fig = mosaic([fit_tile(tiles_by_ch[c], cell) for c in chans], cols=8)
                src = imgs.add(_slug("mean", model, layer, mean_neuron), fig)
                rows.append(f"<h5>{html.escape(layer)} mean stimuli ({len(chans)} channels)</h5>"
                            + _img(src, fig, f"{model} {layer} mean preferred stimuli"))
            if rows:
                cells[model] = "".join(rows)
        body = "".join(parts) + _pair(models, cells)
    else:
        body = _na("stimuli/mean.parquet and train/<model>/model.pt",
                   inputs.missing.get("analysis", ""))
    sections.append(("mean", "First-conv filters and mean preferred stimuli", body))
    yield from imgs.drain()   # hand images out as they are made, not all at the end

    # -- activation maximization ----------------------------------------------------------
    actmax_tiles: dict[tuple[str, str], dict[int, np.ndarray]] = {}
    if actmax is not None and not actmax.empty and "image" in actmax.columns:
        for (model, layer), g in actmax.groupby(["model", "layer"]):
            r = rf_of.get((str(model), str(layer)))
            actmax_tiles[(str(model), str(layer))] = {
                int(row["channel"]): _crop_center_rf(decode_png(row["image"]), r)
                for _, row in g.iterrows() if row["image"] is not None}
        parts = ["<p class='note'>Activation maximization of the centre neuron (Adam, zero "
                 "initial image; steps/lr/weight decay as recorded in actmax.parquet), cropped to "
                 "the centre neuron's receptive field when it is known.</p>"]
        for layer in sorted({k[1] for k in actmax_tiles}, key=layer_key):
            cells = {}
            for model in models:
                tiles_by_ch = actmax_tiles.get((model, layer))
                if not tiles_by_ch:
                    continue
                chans = sorted(tiles_by_ch)[:max(options.figure_channels, 16)]
                side = max(t.shape[0] for t in tiles_by_ch.values())
                cell = cell_size(side, target=56, cap=112)
                fig = mosaic([fit_tile(tiles_by_ch[c], cell) for c in chans], cols=8,
                             labels=[str(c) for c in chans], label_height=12)
                src = imgs.add(_slug("actmax", model, layer), fig)
                cells[model] = _img(src, fig, f"{model} {layer} activation maximization")
            parts.append(f"<h3>{html.escape(layer)}</h3>" + _pair(models, cells))
        body = "".join(parts)
    else:
        body = _na("actmax/actmax.parquet", inputs.missing.get("actmax", ""))
    sections.append(("actmax", "Activation maximization", body))
    yield from imgs.drain()   # hand images out as they are made, not all at the end

    # -- neuron types ---------------------------------------------------------------------
    nt = _frame(inputs.neuron_types)
    if nt is not None and {"model", "layer", "type", "count"} <= set(nt.columns):
        index = [c for c in ("model", "layer", "source") if c in nt.columns]
        piv = nt.pivot_table(index=index, columns="type", values="count", aggfunc="sum",
                             fill_value=0).reset_index()
        piv.columns = [str(c) for c in piv.columns]
        types = [str(t) for t in dict.fromkeys(nt["type"])]     # the writer's order of types
        piv = piv[[*index, *[t for t in types if t in piv.columns]]]
        piv = piv.iloc[sorted(range(len(piv)), key=lambda i: (
            model_key(str(piv["model"].iloc[i])), layer_key(str(piv["layer"].iloc[i]))))]
        body = "<p class='note'>Channels per neuron type.</p>" + _html_table(piv)
    elif nt is not None:
        body = _html_table(nt)
    else:
        body = _na("neuron_types/summary.parquet", inputs.missing.get("neuron_types", ""))
    sections.append(("types", "Neuron types", body))

    # -- training -------------------------------------------------------------------------
    if inputs.metrics:
        parts = []
        for model in sorted(inputs.metrics, key=model_key):
            df = inputs.metrics[model].to_pandas()
            parts.append(f"<h4>{html.escape(model)} (last {min(5, len(df))} of {len(df)} rows)</h4>"
                         + _html_table(df.tail(5)))
        body = "".join(parts)
    else:
        body = _na("train/<model>/metrics.parquet", inputs.missing.get("train", ""))
    sections.append(("train", "Training", body))

    # -- atlas ----------------------------------------------------------------------------
    if options.atlas and layers and (topk is not None or mean_tiles or actmax_tiles):
        links = []
        for model in models:
            items = []
            for layer in layers:
                page = _atlas_page(model, layer, topk, topk_neuron, mean_tiles, actmax_tiles,
                                   channels, filt_tiles, imgs, options.title)
                if page is None:
                    continue
                name, n, data = page
                yield from imgs.drain()
                yield name, data
                items.append(f"<a href='{name}'>{html.escape(layer)}</a> ({n} channels)")
            if items:
                links.append(f"<p><b>{html.escape(model)}</b>: {' · '.join(items)}</p>")
        body = ("<p class='note'>Every channel of every analysed layer: statistics, mean "
                "stimulus, activation-maximization image and top-k strip.</p>" + "".join(links))
    else:
        body = _na("the atlas", "disabled" if not options.atlas else "no per-channel tables")
    sections.append(("atlas", "Atlas of every channel", body))

    # -- runs -----------------------------------------------------------------------------
    if inputs.runs:
        body = "".join(f"<details><summary>{html.escape(m)} run.json</summary><pre>"
                       f"{html.escape(json.dumps(r, indent=2, sort_keys=True, default=str))}"
                       f"</pre></details>" for m, r in sorted(inputs.runs.items()))
        sections.append(("runs", "Runs", body))

    yield from imgs.drain()
    nav = "<nav>" + "".join(f"<a href='#{a}'>{html.escape(t)}</a>" for a, t, _ in sections) + "</nav>"
    head = (f"<h1>{html.escape(options.title)}</h1><p class='note'>Built from the Parquet tables "
            f"under {html.escape(inputs.source or '(given tables)')}; models: "
            f"{html.escape(', '.join(models) or 'none')}; layers: "
            f"{html.escape(', '.join(layers) or 'none')}.</p>{nav}")
    body = head + "".join(f"<h2 id='{a}'>{html.escape(t)}</h2>\n{b}\n" for a, t, b in sections)
    yield "index.html", _page(options.title, body)


def _atlas_page(model: str, layer: str, topk: pd.DataFrame | None, topk_neuron: str,
                mean_tiles: dict, actmax_tiles: dict, channels: pd.DataFrame | None,
                filt_tiles: dict[str, list[np.ndarray]], imgs: _Images, title: str
                ) -> tuple[str, int, bytes] | None:
    """One atlas page: a row per channel showing its slice of a 16-channel sheet PNG."""
    g = None
    if topk is not None:
        g = topk[(topk["model"] == model) & (topk["layer"] == layer)]
        g = g if not g.empty else None
    means = mean_tiles.get((model, layer), {})
    acts = actmax_tiles.get((model, layer), {})
    stats = None
    if channels is not None and {"model", "layer", "channel"} <= set(channels.columns):
        stats = channels[(channels["model"] == model) & (channels["layer"] == layer)]
        stats = {int(r["channel"]): r for r in stats.to_dict("records")}
    chans = set(means) | set(acts) | (set(int(c) for c in g["channel"].unique()) if g is not None else set())
    if not chans:
        return None
    chans_sorted = sorted(chans)
    filters = filt_tiles.get(model) if layer in ("conv1", "pool1") else None

    k = int(g.groupby("channel")["rank"].count().max()) if g is not None else 0
    patch_size = int(g["size"].max()) if g is not None else 0
    side = max([patch_size] + [t.shape[0] for t in means.values()] + [t.shape[0] for t in acts.values()])
    cell = min(cell_size(side, target=40, cap=40), 48)
    columns = (["filter"] if filters else []) + ["mean", "actmax"] + [f"#{i}" for i in range(k)]
    row_h, row_w = cell + _PAD, _PAD + len(columns) * (cell + _PAD)

    by_channel = {int(c): gc.sort_values("rank") for c, gc in g.groupby("channel")} if g is not None else {}
    rows_html = []
    name = f"atlas_{_slug(model, layer)}.html"
    for start in range(0, len(chans_sorted), SHEET_CHANNELS):
        block = chans_sorted[start:start + SHEET_CHANNELS]
        tiles: list[np.ndarray] = []
        for ch in block:
            row = []
            if filters:
                row.append(fit_tile(filters[ch], cell) if ch < len(filters) else _blank(cell))
            row.append(fit_tile(means[ch], cell) if ch in means else _blank(cell))
            row.append(fit_tile(acts[ch], cell) if ch in acts else _blank(cell))
            patches = list(by_channel[ch]["patch"]) if ch in by_channel else []
            row += [fit_tile(decode_png(p), cell) if p else _blank(cell) for p in patches[:k]]
            row += [_blank(cell)] * (len(columns) - len(row))
            tiles += row
        sheet = mosaic(tiles, cols=len(columns))
        src = imgs.add(_slug("atlas", model, layer, f"{start:04d}"), sheet)
        for i, ch in enumerate(block):
            s = stats.get(ch) if stats else None
            cells = [f"<td id='c{ch}'><b>{ch}</b></td>"]
            for key in ("max", "mean", "positive_fraction", "inactive"):
                cells.append(f"<td>{html.escape(_fmt(s.get(key)) if s else '—')}</td>")
            # The sheet holds 16 channel rows; object-fit/position shows this channel's row.
            y = i * row_h
            cells.append(
                f"<td><img src='{src}' alt='{html.escape(model)} {html.escape(layer)} channel {ch}' "
                f"width='{row_w}' height='{row_h + _PAD}' "
                f"style='object-fit:none;object-position:0 -{y}px'></td>")
            rows_html.append("<tr>" + "".join(cells) + "</tr>")
    legend = " | ".join(columns[:3 if filters else 2]) + f" | top-{k} ({html.escape(topk_neuron)})"
    body = (f"<p><a href='index.html'>← report</a></p><h1>{html.escape(model)} · "
            f"{html.escape(layer)}</h1><p class='note'>{len(chans_sorted)} channels. Images: "
            f"{legend}; light grey = not available. Mean stimuli are contrast-stretched.</p>"
            "<table class='atlas'><thead><tr><th>channel</th><th>max</th><th>mean</th>"
            "<th>positive fraction</th><th>inactive</th><th>images</th></tr></thead><tbody>"
            + "".join(rows_html) + "</tbody></table>")
    return name, len(chans_sorted), _page(f"{title}: {model} {layer}", body)
