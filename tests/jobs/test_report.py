"""jobs.report end to end: a schema-exact fake reproduce output -> HTML report, checked on disk,
in real headless Chromium (every image loads) and written to a real S3 server (moto).

The fake results are random, but every patch / mean / actmax image is a known colour, so the
report's figures can be checked pixel by pixel where they are placed.
"""
from __future__ import annotations

import html.parser
import io
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from jobs import report as job
from jobs.actmax import SCHEMA as ACTMAX_SCHEMA
from jobs.neuron_types import SUMMARY_SCHEMA
from pipeline.census.patterns import PROPERTY_SCHEMA
from pipeline.ablation import table1 as ablation_tables
from pipeline.models.checkpoint import save_checkpoint
from pipeline.models.zoo import build_model
from pipeline.census.types import TYPES
from pipeline.data.preprocess import IMAGENET
from pipeline.report import SHEET_CHANNELS, decode_png
from pipeline.results.tables import write_json, write_table

MODELS = ("resnet34", "plainnet34")
# layer -> (rf_size, jump, offset, feature_size, channels): a 64x64 input, width-8 nets
LAYERS = {"pool1": (11, 4, 0, 16, 8), "conv3": (27, 4, 0, 16, 8), "conv7": (59, 4, 0, 16, 20)}
K = 16


def _png(rgb: tuple[int, int, int], size: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), rgb).save(buf, format="PNG")
    return buf.getvalue()


def patch_colour(model: str, layer: str, channel: int, rank: int) -> tuple[int, int, int]:
    return (10 + 12 * rank, 7 * channel % 256, 100 + 60 * MODELS.index(model)
            + 20 * list(LAYERS).index(layer))


def make_results(root: Path, with_train: bool = True, rng_seed: int = 0) -> Path:
    """Write a fake-but-schema-exact `jobs.reproduce` output under root; returns root."""
    rng = np.random.default_rng(rng_seed)
    root = Path(root)
    census = []
    for model in MODELS:
        rf_rows, topk, mean, chan = [], [], [], []
        for li, (layer, (rf, jump, off, feat, C)) in enumerate(LAYERS.items()):
            rf_rows.append(dict(model=model, layer=layer, module=f"mod.{layer}", channels=C,
                                rf_size=rf, jump=jump, offset=off, feature_size=feat))
            for c in range(C):
                inactive = layer == "pool1" and c in ((1, 5) if model == "resnet34" else (2,))
                for neuron in ("any", "center"):
                    acts = np.sort(rng.random(K))[::-1]
                    for r in range(K):
                        topk.append(dict(model=model, layer=layer, channel=c, neuron=neuron,
                                         rank=r, activation=float(acts[r]),
                                         image_index=int(rng.integers(100)), y=1, x=2, top=-3,
                                         left=5, size=rf,
                                         patch=_png(patch_colour(model, layer, c, r), rf)))
                for neuron in ("center", "all"):
                    m = rng.random((3, rf, rf)).astype(np.float32)
                    m[:, 0, :] = np.nan                     # a row never inside the image
                    mean.append(dict(model=model, layer=layer, channel=c, neuron=neuron,
                                     count=0 if inactive else 40, images=100, size=rf,
                                     mean=m.ravel().tolist()))
                chan.append(dict(model=model, layer=layer, channel=c, images=100,
                                 max=0.0 if inactive else float(rng.random() + 0.5),
                                 mean=float(rng.random()), positive_fraction=float(rng.random()),
                                 inactive=inactive))
                if layer == "pool1":
                    census.append({k: v for k, v in chan[-1].items() if k != "mean"}
                                  | {"near_dead": inactive or c == 0})
        d = root / "analysis" / model
        write_table(pa.Table.from_pylist(rf_rows), str(d / "receptive_fields.parquet"))
        write_table(pa.Table.from_pylist(topk), str(d / "stimuli" / "topk.parquet"))
        write_table(pa.Table.from_pylist(mean, schema=pa.schema([
            ("model", pa.string()), ("layer", pa.string()), ("channel", pa.int32()),
            ("neuron", pa.string()), ("count", pa.int64()), ("images", pa.int64()),
            ("size", pa.int32()), ("mean", pa.list_(pa.float32()))])),
            str(d / "stimuli" / "mean.parquet"))
        write_table(pa.Table.from_pylist(chan), str(d / "stimuli" / "channels.parquet"))
        write_table(pa.Table.from_pylist([dict(image_index=i, path=f"x/{i}.JPEG", label=i % 3)
                                          for i in range(100)]), str(d / "manifest.parquet"))
        write_json(str(d / "run.json"), {"model": model, "images": 100})
        if with_train:
            net = build_model(model, num_classes=3, width=8)
            save_checkpoint(str(root / "train" / model / "model.pt"), net, IMAGENET)
            write_table(pa.Table.from_pylist([dict(epoch=e, train_loss=2.0 - e / 10,
                                                   val_loss=2.1 - e / 10, val_top1=0.3 + e / 20)
                                              for e in range(4)]),
                        str(root / "train" / model / "metrics.parquet"))
    # Ablation tables through the ablation module's own schemas and Table 1 builder.
    abl = []
    for model in MODELS:
        inactive = [1, 5] if model == "resnet34" else [2]
        for cond in ("clean", "inactive-all", "inactive-random", "control-active"):
            for seed in ([-1] if cond == "clean" else range(3)):
                loss = float(2 + rng.random())
                abl.append(dict(model=model, layer="pool1", condition=cond, seed=seed,
                                images=100, loss=loss, top1=0.5, top5=0.8, top1_count=50,
                                top5_count=80, loss_sum=100 * loss,
                                delta_loss=0.0 if cond == "clean" else float(rng.random()),
                                inactive_channels=inactive, noised_channels=inactive,
                                noised_per_image=float(len(inactive)),
                                fraction=0.5 if cond == "inactive-random" else None, note=""))
    abl_t = pa.Table.from_pylist(abl, schema=ablation_tables.ABLATION_SCHEMA)
    census_t = pa.Table.from_pylist(census, schema=ablation_tables.CENSUS_SCHEMA)
    write_table(abl_t, str(root / "ablation" / "ablation.parquet"))
    write_table(ablation_tables.table1(abl_t, census_t), str(root / "ablation" / "table1.parquet"))
    write_table(census_t, str(root / "ablation" / "census.parquet"))
    am = []
    for model in MODELS:
        for layer in LAYERS:
            for c in range(3):
                am.append(dict(model=model, layer=layer, channel=c, steps=31, lr=0.1,
                               weight_decay=1e-6, objective_start=0.0, objective_end=3.5,
                               image=_png((200, 30 * c, 90), 64),
                               input=np.zeros(3 * 64 * 64, np.float32).tolist(), input_size=64,
                               y=8, x=8, param="pixel"))
    write_table(pa.Table.from_pylist(am, schema=ACTMAX_SCHEMA),
                str(root / "actmax" / "actmax.parquet"))
    write_table(pa.Table.from_pylist(
        [dict(model=m, layer=l, source="mean", type=t, count=int(rng.integers(10)))
         for m in MODELS for l in LAYERS for t in TYPES], schema=SUMMARY_SCHEMA),
        str(root / "neuron_types" / "summary.parquet"))
    write_table(pa.Table.from_pylist(
        [dict(model=m, layer=l, source="mean", channels=16, structured=10, orientation_selective=3,
              single_opponent=2, double_opponent=1, no_structure=6, oriented_single_opponent=0,
              oriented_double_opponent=1) for m in MODELS for l in LAYERS],
        schema=PROPERTY_SCHEMA), str(root / "neuron_types" / "properties.parquet"))
    write_table(pa.Table.from_pylist(   # the census's verdict per channel: 1 has no structure
        [dict(model=m, layer=l, source=src, channel=c, type="no structure" if c == 1 else "other")
         for m in MODELS for l, src in [*((l, "mean") for l in LAYERS), ("conv1", "filter")]
         for c in range(8)]), str(root / "neuron_types" / "neuron_types.parquet"))
    write_compare(root / "compare")
    return root


def cka_value(net_a: str, la: str, net_b: str, lb: str) -> float:
    """The fake CKA of a pair of (network, layer): 1 on a grid's diagonal, known elsewhere."""
    i, j = list(LAYERS).index(la), list(LAYERS).index(lb)
    return 1.0 if (net_a, i) == (net_b, j) else round(0.2 + 0.1 * i + 0.05 * j
                                                     + 0.3 * (net_a == net_b), 4)


def matched(layer: str, c: int) -> tuple[int, float]:
    """Channel c of resnet34 is matched to plainnet34's (c + 1) % C with r falling with c."""
    channels = LAYERS[layer][4]
    return (c + 1) % channels, round(0.95 - 0.04 * c, 4)


def write_compare(out: Path) -> None:
    """jobs.compare's three tables for the fake pair, written through the catalog."""
    from pipeline.results import catalog
    from pipeline.results.tables import write

    cka = [dict(net_a=a, layer_a=x, net_b=b, layer_b=y, cka=cka_value(a, x, b, y), hsic_ab=1.0,
                hsic_aa=1.0, hsic_bb=1.0, n_images=96, n_batches=3)
           for a, b in (MODELS, (MODELS[0],) * 2, (MODELS[1],) * 2) for x in LAYERS for y in LAYERS]
    matches = [dict(net_a=MODELS[0], net_b=MODELS[1], layer=l, channel_a=c,
                    best_b=matched(l, c)[0], best_r=matched(l, c)[1], matched_b=matched(l, c)[0],
                    matched_r=matched(l, c)[1], samples=100, per="position")
               for l in LAYERS for c in range(LAYERS[l][4])]
    sel = [dict(net=m, layer=l, channel=c, selectivity=(c + 1) / (LAYERS[l][4] + 1) / (k + 1),
                top_class=c % 3, n_classes=3, images=100, mu_max=1.0, mu_rest=0.5)
           for k, m in enumerate(MODELS) for l in LAYERS for c in range(LAYERS[l][4])]
    for table, rows in ((catalog.CKA, cka), (catalog.MATCHES, matches),
                        (catalog.SELECTIVITY, sel)):
        write(table, pa.Table.from_pylist(rows, schema=table.schema), str(out))


# Any torchvision model: module-path layer names, a layer with global context, training seeds.
ANY_LAYERS = {"resnet50": {"layer2.1.conv2": (19, 8, 3, 8, False), "pool1": (11, 4, 0, 16, False)},
              "vgg16": {"features.3": (5, 1, 0, 64, False), "features.28": (212, 16, 8, 4, True)}}
ANY_CHANNELS, ANY_K = 4, 4


def make_any_results(root: Path) -> Path:
    """A reproduce-style output of two models that are not the paper's, with the columns other
    jobs add (global_context; rows per fraction and training seed in Table 1; train_seed)."""
    root = Path(root)
    am = []
    for model, layers in ANY_LAYERS.items():
        rf, topk, mean = [], [], []
        for li, (layer, (size, jump, off, feat, glob)) in enumerate(layers.items()):
            rf.append(dict(model=model, layer=layer, module=layer, channels=ANY_CHANNELS,
                           rf_size=size, jump=jump, offset=off, feature_size=feat,
                           global_context=glob))
            shown = min(size, 64)
            for c in range(ANY_CHANNELS):
                topk += [dict(model=model, layer=layer, channel=c, neuron="any", rank=r,
                              activation=1.0 - r / 10, image_index=r, y=0, x=0, top=0, left=0,
                              size=shown, patch=_png((40 * r, 50 * c, 60 * li), shown))
                         for r in range(ANY_K)]
                mean.append(dict(model=model, layer=layer, channel=c, neuron="center", count=5,
                                 images=10, size=shown,
                                 mean=np.linspace(0, 1, 3 * shown * shown).tolist()))
                am.append(dict(model=model, layer=layer, channel=c, image=_png((200, 9 * c, 90), 64)))
        d = root / "analysis" / model
        write_table(pa.Table.from_pylist(rf), str(d / "receptive_fields.parquet"))
        write_table(pa.Table.from_pylist(topk), str(d / "stimuli" / "topk.parquet"))
        write_table(pa.Table.from_pylist(mean), str(d / "stimuli" / "mean.parquet"))
    write_table(pa.Table.from_pylist(am), str(root / "actmax" / "actmax.parquet"))
    layer_of = {"resnet50": "pool1", "vgg16": "features.3"}
    # Two training seeds: seed t has channel t inactive in resnet50; vgg16's seed 1 has none,
    # so its ΔL cells stand on one seed of two.
    abl, census = [], []
    for m in ANY_LAYERS:
        for t in (0, 1):
            dead = [] if (m == "vgg16" and t == 1) else [t]
            census += [dict(model=m, layer=layer_of[m], channel=c, images=10,
                            max=0.0 if c in dead else 1.0,
                            positive_fraction=0.0 if c in dead else 0.5, inactive=c in dead,
                            near_dead=c in dead, train_seed=t) for c in range(ANY_CHANNELS)]
            abl.append(dict(model=m, layer=layer_of[m], condition="clean", seed=-1, images=10,
                            loss=2.0, top1=0.5, delta_loss=0.0, train_seed=t,
                            inactive_channels=dead))
            for seed in range(2):
                for f in (None, 0.25, 0.5, 1.0):
                    cond = "inactive-all" if f is None else "inactive-random"
                    dl = (f or 0.0) / 10 + (m == "resnet50") + seed / 100
                    abl.append(dict(model=m, layer=layer_of[m], condition=cond, seed=seed,
                                    fraction=f, train_seed=t, inactive_channels=dead,
                                    **(dict(images=10, loss=2.0 + dl, delta_loss=dl) if dead
                                       else dict(images=0,
                                                 note=ablation_tables.no_inactive_note("x")))))
    abl_t = pa.Table.from_pylist(abl, schema=ablation_tables.ABLATION_SCHEMA)
    census_t = pa.Table.from_pylist(census, schema=ablation_tables.CENSUS_SCHEMA)
    write_table(ablation_tables.table1(abl_t, census_t), str(root / "ablation" / "table1.parquet"))
    write_table(census_t, str(root / "ablation" / "census.parquet"))
    return root


def _pm(root: Path, model: str, condition: str) -> str:
    """Mean ± sample std of delta_loss over the noise seeds of the one training seed, as Table 1
    prints it (pandas' numbers), with the seeds it stands on."""
    df = pq.read_table(root / "ablation" / "ablation.parquet").to_pandas()
    v = df[(df.model == model) & (df.condition == condition)]["delta_loss"]
    return f"{v.mean():+.4f} ± {v.std(ddof=1):.4f} (n = {len(v)} noise seeds)"


class _Imgs(html.parser.HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.imgs: list[dict[str, str]] = []
        self.links: list[str] = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "img":
            self.imgs.append(a)
        if tag == "a" and a.get("href", "").endswith(".html"):
            self.links.append(a["href"])


def _parse(path: Path) -> _Imgs:
    p = _Imgs()
    p.feed(path.read_text(encoding="utf-8"))
    return p


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    out = make_results(tmp_path_factory.mktemp("results"))
    assert job.main(["--out", str(out), "--figure-channels", "4"]) == 0
    return out / "report"


def test_every_page_and_image_exists_and_matches_its_tag(built: Path):
    index = _parse(built / "index.html")
    pages = sorted(set(index.links))
    assert pages == sorted([f"atlas_{m}_{l}.html" for m in MODELS for l in LAYERS]
                           + ["compare.html"])
    n_imgs = 0
    for page in ["index.html", *pages]:
        for tag in _parse(built / page).imgs:
            img = decode_png((built / tag["src"]).read_bytes())
            n_imgs += 1
            if "object-position" not in tag.get("style", ""):
                assert (img.shape[1], img.shape[0]) == (int(tag["width"]), int(tag["height"]))
    for model in MODELS:   # conv1 filter c sits exactly above pool1 channel c
        filters = decode_png((built / "img" / f"filters_{model}.png").read_bytes())
        pool1 = decode_png((built / "img" / f"mean_{model}_pool1_center.png").read_bytes())
        assert filters.shape == pool1.shape
    # 2 models x (3 top-k + conv1 filters + 3 means + 3 actmax) figures on the index
    assert len(index.imgs) == 2 * (3 + 1 + 3 + 3)
    assert n_imgs > len(index.imgs)
    text = (built / "index.html").read_text()
    assert "Not available" not in text
    for needle in (_pm(built.parent, "resnet34", "inactive-all"), "random p=0.5",
                   _pm(built.parent, "plainnet34", "control-active"), "control ΔL",
                   "Properties, each on its own", "no structure",
                   "Receptive fields", "mod.conv7", *TYPES, "1, 5"):
        assert needle in text


class _Svgs(html.parser.HTMLParser):
    """Each <svg> of a page: its attributes, its texts by class, its rects (with their <title>)
    and its <g class="box"> groups."""

    def __init__(self) -> None:
        super().__init__()
        self.svgs: list[dict] = []
        self._text: str | None = None
        self._title: dict | None = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "svg":
            self.svgs.append({"attrs": a, "texts": {}, "rects": [], "boxes": []})
        elif self.svgs and tag == "text":
            self._text = a.get("class", "")
            self.svgs[-1]["texts"].setdefault(self._text, []).append("")
        elif self.svgs and tag == "rect":
            self.svgs[-1]["rects"].append({**a, "title": ""})
            self._title = self.svgs[-1]["rects"][-1]
        elif self.svgs and tag == "g" and a.get("class") == "box":
            self.svgs[-1]["boxes"].append(a)

    def handle_endtag(self, tag):
        if tag == "text":
            self._text = None
        elif tag == "rect":
            self._title = None

    def handle_data(self, data):
        if self._text is not None:
            self.svgs[-1]["texts"][self._text][-1] += data
        elif self._title is not None:
            self._title["title"] += data


def test_comparison_page_heatmaps_pairs_and_selectivity(built: Path):
    from pipeline.report.compare import PAIRS, STRIP_PATCHES, colour

    text = (built / "compare.html").read_text()
    index = (built / "index.html").read_text()
    assert '<a href="compare.html">' in index and "Not available" not in index
    p = _Svgs()
    p.feed(text)
    maps = [s for s in p.svgs if s["attrs"].get("aria-label", "").startswith("CKA ")]
    assert [(s["attrs"]["data-net-a"], s["attrs"]["data-net-b"]) for s in maps] == [
        MODELS, (MODELS[0],) * 2, (MODELS[1],) * 2]
    for s in maps:
        a, b = s["attrs"]["data-net-a"], s["attrs"]["data-net-b"]
        assert s["texts"]["row"] == list(LAYERS) and s["texts"]["col"] == list(LAYERS)
        assert len(s["rects"]) == len(LAYERS) ** 2
        for k, rect in enumerate(s["rects"]):         # row-major: A's layer, then B's
            x, y = list(LAYERS)[k // len(LAYERS)], list(LAYERS)[k % len(LAYERS)]
            v = cka_value(a, x, b, y)
            assert rect["fill"] == colour(v) and rect["title"] == f"{a} {x} × {b} {y}: CKA {v:.3f}"
    assert colour(0.0) != colour(1.0) and colour(float("nan")) == "#dddddd"
    # matched pairs: best = highest r first, worst = lowest first; each strip shows A's
    # channel (mean, then its top-k patches), a gap, then B's matched channel
    page = _parse(built / "compare.html")
    for layer, (*_geometry, channels) in LAYERS.items():
        strips = [t for t in page.imgs if f"resnet34 {layer} channel" in t["alt"]]
        assert len(strips) == 2 * PAIRS
        order = sorted(range(channels), key=lambda c: -matched(layer, c)[1])
        want = order[:PAIRS] + order[::-1][:PAIRS]
        for tag, ca in zip(strips, want):
            cb = matched(layer, ca)[0]
            assert tag["alt"] == f"resnet34 {layer} channel {ca} and plainnet34 channel {cb}"
            img = decode_png((built / tag["src"]).read_bytes())
            cell = (img.shape[0] - 4)
            assert img.shape[1] == 2 + (2 * (1 + STRIP_PATCHES) + 1) * (cell + 2)
            for side, (model, ch) in enumerate((("resnet34", ca), ("plainnet34", cb))):
                for r in range(STRIP_PATCHES):
                    x = 2 + (side * (2 + STRIP_PATCHES) + 1 + r) * (cell + 2)
                    assert (img[2:2 + cell, x:x + cell] == patch_colour(model, layer, ch, r)).all()
    pairs = _tables_with(text, "resnet34")
    assert [int(r["resnet34"]) for r in pairs[0]] == sorted(
        range(LAYERS["pool1"][4]), key=lambda c: -matched("pool1", c)[1])[:PAIRS]
    assert [r["r"] for r in pairs[0]] == [f"{matched('pool1', int(r['resnet34']))[1]:.3f}"
                                          for r in pairs[0]]
    # selectivity: a box per layer and network at the median of its channels
    box = next(s for s in p.svgs if s["attrs"].get("class") == "boxplots")
    assert [(b["data-layer"], b["data-net"]) for b in box["boxes"]] == [
        (l, m) for l in LAYERS for m in MODELS]
    for b in box["boxes"]:
        c = LAYERS[b["data-layer"]][4]
        vals = [(ch + 1) / (c + 1) / (MODELS.index(b["data-net"]) + 1) for ch in range(c)]
        assert b["data-median"] == f"{np.median(vals):.3f}"


def test_run_json_has_the_shared_shape(built: Path):
    import json

    from tests.helpers import assert_run_shape

    run = json.loads((built / "run.json").read_text())
    assert_run_shape(run)
    assert run["job"] == "report" and run["config"]["figure_channels"] == 4
    files = [p for p in built.rglob("*") if p.is_file() and p.name != "run.json"]
    assert run["counts"]["files"] == len(files) and run["throughput"]["unit"] == "files"
    assert run["counts"]["bytes"] == sum(p.stat().st_size for p in files)


def test_topk_figure_places_each_patch_of_each_channel(built: Path):
    """Channel c, rank r of the figure has exactly the colour written into that patch."""
    from pipeline.report import cell_size

    for model in MODELS:
        fig = decode_png((built / "img" / f"topk_{model}_conv3_any.png").read_bytes())
        cell = cell_size(27)
        block = 1 + 4 * (cell + 1)         # topk_grid: pad 1
        for c in range(4):                 # --figure-channels 4, 4 blocks per row
            by, bx = 6 + 14, 6 + c * (block + 6)
            for r in range(K):
                gy, gx = divmod(r, 4)
                y, x = by + 1 + gy * (cell + 1), bx + 1 + gx * (cell + 1)
                tile = fig[y:y + cell, x:x + cell]
                assert (tile == patch_colour(model, "conv3", c, r)).all(), (model, c, r)


def test_atlas_rows_show_their_channel(built: Path):
    """Each channel row's slice of its sheet holds that channel's top-k colours in rank order."""
    page = _parse(built / "atlas_resnet34_conv7.html")
    assert len(page.imgs) == LAYERS["conv7"][4]
    sheets = {t["src"] for t in page.imgs}
    assert len(sheets) == -(-LAYERS["conv7"][4] // SHEET_CHANNELS)
    for c, tag in enumerate(page.imgs):
        sheet = decode_png((built / tag["src"]).read_bytes())
        y0 = -int(re.search(r"object-position:0 -(\d+)px", tag["style"]).group(1))
        w, h = int(tag["width"]), int(tag["height"])
        assert w == sheet.shape[1] and -y0 + h <= sheet.shape[0]
        row = sheet[-y0:-y0 + h]
        cell = h - 4
        for r in range(K):                 # columns: mean, actmax, then the top-k
            x = 2 + (2 + r) * (cell + 2)
            assert (row[2:2 + cell, x:x + cell] == patch_colour("resnet34", "conv7", c, r)).all()


class _Tables(html.parser.HTMLParser):
    """Every <table> of a page as rows of cell texts (the header row first)."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: list[list[list[str]]] = []
        self._cell: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        if tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self.tables[-1].append([])
        elif tag in ("td", "th"):
            self._cell = []

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self.tables[-1][-1].append("".join(self._cell).strip())
            self._cell = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)


def _tables_with(text: str, column: str) -> list[list[dict[str, str]]]:
    """The tables of a page whose header has `column`, each as a list of row dicts."""
    p = _Tables()
    p.feed(text)
    return [[dict(zip(t[0], r)) for r in t[1:]] for t in p.tables if t and column in t[0]]


def _table_with(text: str, column: str) -> list[dict[str, str]]:
    return _tables_with(text, column)[0]


@pytest.fixture(scope="module")
def built_any(tmp_path_factory) -> Path:
    out = make_any_results(tmp_path_factory.mktemp("any"))
    assert job.main(["--out", str(out), "--figure-channels", "2"]) == 0
    return out / "report"


def test_any_model_and_layer_names_come_from_the_tables(built_any: Path):
    text = (built_any / "index.html").read_text()
    # resnet50 is of the paper's family, pool1 a paper name: first; the rest in table order.
    assert "<title>Preferred stimuli: resnet50 vs vgg16</title>" in text
    assert "models: resnet50, vgg16; layers: pool1, layer2.1.conv2, features.3, features.28." in text
    topk = text[text.index('<h2 id="topk">'):text.index('<h2 id="mean">')]
    assert re.findall(r"<h3>([^ <]+)", topk) == ["pool1", "layer2.1.conv2", "features.3",
                                                 "features.28"]
    assert "<h3>features.28 (RF 212, plus global context)</h3>" in topk
    assert "has no data here" not in text and "Not available: stimuli" not in text
    index = _parse(built_any / "index.html")
    assert sorted(set(index.links)) == sorted(
        f"atlas_{m}_{l}.html" for m, layers in ANY_LAYERS.items() for l in layers)
    for page in ["index.html", *set(index.links)]:
        for tag in _parse(built_any / page).imgs:
            decode_png((built_any / tag["src"]).read_bytes())
    assert "global operator" in (built_any / "atlas_vgg16_features.28.html").read_text()
    assert "global operator" not in (built_any / "atlas_vgg16_features.3.html").read_text()
    rf = _table_with(text, "rf_size")
    assert [(r["layer"], r["global_context"]) for r in rf] == [
        ("pool1", "no"), ("layer2.1.conv2", "no"), ("features.3", "no"), ("features.28", "yes")]
    # actmax: cropped to the 5-px RF of features.3 (cell 55), whole (64 px) for the global layer
    for layer, cell in (("features.3", 55), ("features.28", 64)):
        fig = decode_png((built_any / "img" / f"actmax_vgg16_{layer}.png").read_bytes())
        assert fig.shape[1] == 2 + ANY_CHANNELS * (cell + 2), layer


def test_table1_and_census_rows_appear_as_the_tables_hold_them(built_any: Path):
    """Table 1 over two training seeds: the rows of table1.parquet in its order, each ΔL cell
    saying how many training seeds it stands on (vgg16's seed 1 has no inactive channel)."""
    text = (built_any / "index.html").read_text()
    t1 = _table_with(text, "noised")
    assert [(r["model"], r["noised"], r["training seeds"], r["inactive"], r["ΔL"]) for r in t1] == [
        ("resnet50", "all inactive", "2", "1.0±0.0/4", "+1.0050 ± 0.0000 (n = 2 of 2)")] + [
        ("resnet50", f"random p={f}", "2", "1.0±0.0/4", f"{1 + float(f) / 10 + 0.005:+.4f} ± 0.0000 (n = 2 of 2)")
        for f in ("0.25", "0.5", "1")] + [
        ("vgg16", "all inactive", "2", "0.5±0.7/4", "+0.0050 (n = 1 of 2)")] + [
        ("vgg16", f"random p={f}", "2", "0.5±0.7/4", f"{float(f) / 10 + 0.005:+.4f} (n = 1 of 2)")
        for f in ("0.25", "0.5", "1")]
    paper = _table_with(text, "ΔL_rnd (random subset)")   # the paper's alongside
    assert "Paper (ImageNet, one training run per model)" in text
    assert [(r["model"], r["inactive"], r["ΔL (all inactive)"], r["ΔL_rnd (random subset)"])
            for r in paper] == [("resnet34", "13", "1.27", "0.024"), ("plainnet34", "2", "≈ 0", "—")]
    census = _table_with(text, "training seed")
    assert [(r["model"], r["training seed"], r["inactive channels"]) for r in census] == [
        ("resnet50", "0", "0"), ("resnet50", "1", "1"), ("vgg16", "0", "0"), ("vgg16", "1", "none")]


def test_missing_parts_say_not_available(tmp_path: Path):
    out = make_results(tmp_path / "r", with_train=False)
    shutil.rmtree(out / "ablation")
    shutil.rmtree(out / "actmax")
    assert job.main(["--out", str(out), "--report", str(tmp_path / "rep"), "--no-atlas"]) == 0
    text = (tmp_path / "rep" / "index.html").read_text()
    assert "Not available: ablation/table1.parquet" in text
    assert "Not available: actmax/actmax.parquet" in text
    assert "Not available: train/&lt;model&gt;/metrics.parquet" in text
    assert "First-conv filters: not available" in text and "Not available: the atlas (disabled)" in text
    for tag in _parse(tmp_path / "rep" / "index.html").imgs:
        assert (tmp_path / "rep" / tag["src"]).is_file()


def test_table1_falls_back_to_ablation_rows(tmp_path: Path):
    """Without table1.parquet the report runs the same Table 1 computation on ablation.parquet
    and census.parquet: the same cells as with it."""
    out = make_results(tmp_path / "r", with_train=False)
    assert job.main(["--out", str(out), "--no-atlas"]) == 0
    with_table = _table_with((out / "report" / "index.html").read_text(), "noised")
    (out / "ablation" / "table1.parquet").unlink()
    assert job.main(["--out", str(out), "--no-atlas"]) == 0
    text = (out / "report" / "index.html").read_text()
    assert _table_with(text, "noised") == with_table
    assert _pm(out, "plainnet34", "inactive-random") in text


@pytest.mark.parametrize("argv, needle", [
    (["--out", "{tmp}/nope"], "does not exist"),
    (["--out", "{tmp}/empty"], "no results under"),
    (["--out", "{tmp}/empty", "--figure-channels", "0"], "--figure-channels must be >= 1"),
    (["--out", "{tmp}/empty", "--topk-neuron", "left"], "invalid --topk-neuron 'left'; allowed: any, center"),
])
def test_bad_input_exits_2_and_writes_nothing(tmp_path: Path, capsys, argv, needle):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit) as e:
        job.main([a.format(tmp=tmp_path) for a in argv])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0]
    assert not (tmp_path / "empty" / "report").exists()


def test_unreadable_table_is_named(tmp_path: Path, capsys):
    out = make_results(tmp_path / "r", with_train=False)
    (out / "actmax" / "actmax.parquet").write_bytes(b"not parquet")
    with pytest.raises(SystemExit) as e:
        job.main(["--out", str(out)])
    assert e.value.code == 2
    assert "actmax.parquet is not a readable Parquet table" in capsys.readouterr().err
    assert not (out / "report" / "index.html").exists()


def test_reads_and_writes_s3(built: Path, s3_bucket: str):
    import s3fs

    fs = s3fs.S3FileSystem()
    for part in ("analysis", "ablation", "actmax", "neuron_types"):
        fs.put(str(built.parent / part) + "/", f"{s3_bucket}/run/{part}", recursive=True)
    url = f"s3://{s3_bucket}/run"
    assert job.main(["--out", url, "--no-atlas", "--figure-channels", "2"]) == 0
    fs.invalidate_cache()
    index = fs.cat(f"{s3_bucket}/run/report/index.html").decode()
    p = _Imgs()
    p.feed(index)
    assert len(p.imgs) == 2 * 3 * 3     # top-k, mean and actmax figures; no checkpoints here
    for tag in p.imgs:
        decode_png(fs.cat(f"{s3_bucket}/run/report/{tag['src']}"))
    assert "Not available: actmax" not in index
    assert _pm(built.parent, "plainnet34", "inactive-random") in index
    assert not [f for f in fs.find(f"{s3_bucket}/run/report") if ".tmp-" in f]


# --- real browser ------------------------------------------------------------------------------

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _chromium(args: list[str], tmp: Path) -> subprocess.CompletedProcess:
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
           "--no-first-run", "--disable-background-networking", "--disable-component-update",
           "--disable-sync", "--disable-dev-shm-usage", f"--user-data-dir={tmp}",
           "--virtual-time-budget=10000", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def _body_attrs(dom: str) -> dict[str, str]:
    m = re.search(r"<body([^>]*)>", dom)
    assert m, dom[:500]
    return dict(re.findall(r'([\w-]+)="([^"]*)"', m.group(1)))


HARNESS = """<!DOCTYPE html><html><body>%s<script>
window.addEventListener('load', function () {
  var out = [];
  document.querySelectorAll('iframe').forEach(function (f) {
    var b = f.contentDocument.body;
    out.push([f.getAttribute('src'), b.getAttribute('data-images-total'),
              b.getAttribute('data-images-broken'), b.getAttribute('data-broken-src')].join(','));
  });
  document.body.setAttribute('data-result', out.join(';'));
});
</script></body></html>"""


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (apt-get install chromium)")
def test_every_image_loads_in_headless_chromium(built: Path, built_any: Path, tmp_path: Path,
                                                request):
    pages = ["index.html", *sorted(set(_parse(built / "index.html").links))]
    # A control page with one missing image shows that the check can fail.
    control = built / "broken-control.html"
    control.write_text((built / "index.html").read_text().replace(
        "<h1>", "<img src='img/missing.png'><h1>", 1))
    request.addfinalizer(control.unlink)
    expected = {(built / p).as_uri(): len(_parse(built / p).imgs) for p in pages}
    expected[control.as_uri()] = expected[(built / "index.html").as_uri()] + 1
    for p in ["index.html", *sorted(set(_parse(built_any / "index.html").links))]:
        expected[(built_any / p).as_uri()] = len(_parse(built_any / p).imgs)

    # The page exactly as a user opens it from disk.
    res = _chromium(["--dump-dom", (built / "index.html").as_uri()], tmp_path / "profile")
    assert res.returncode == 0, res.stderr[-2000:]
    attrs = _body_attrs(res.stdout)
    assert (attrs["data-images-total"], attrs["data-images-broken"]) == (
        str(expected[(built / "index.html").as_uri()]), "0")

    # Every page at once: a harness page reads each framed page's verdict (one browser start;
    # file:// frames are readable from a file:// page with --allow-file-access-from-files).
    harness = tmp_path / "harness.html"
    harness.write_text(HARNESS % "".join(f"<iframe src='{u}'></iframe>" for u in expected))
    res = _chromium(["--allow-file-access-from-files", "--dump-dom", harness.as_uri()],
                    tmp_path / "profile")
    assert res.returncode == 0, res.stderr[-2000:]
    verdicts = {}
    for item in _body_attrs(res.stdout)["data-result"].split(";"):
        src, total, broken, broken_src = item.split(",", 3)
        verdicts[src] = (int(total), int(broken), broken_src)
    assert set(verdicts) == set(expected)
    for src, (total, broken, broken_src) in verdicts.items():
        assert total == expected[src] > 0, src
        if src == control.as_uri():
            assert (broken, broken_src) == (1, "img/missing.png")
        else:
            assert broken == 0, (src, broken_src)

    shot = tmp_path / "index.png"
    res = _chromium([f"--screenshot={shot}", "--window-size=1400,2400",
                     (built / "index.html").as_uri()], tmp_path / "profile")
    assert res.returncode == 0 and shot.is_file()
    img = decode_png(shot.read_bytes())
    assert img.shape[:2] == (2400, 1400) and img.std() > 10   # a page was drawn, not blank
    if os.environ.get("REPORT_SCREENSHOT_DIR"):                 # for a human to look at
        shutil.copy(shot, os.environ["REPORT_SCREENSHOT_DIR"])
