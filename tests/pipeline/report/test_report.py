"""pipeline.report's image and table helpers against values computed by hand or by pandas."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from pipeline.report import (ReportInputs, ReportOptions, census_frame, cell_size, 
                             crop_center_rf, decode_png, filter_images, fit_tile, layer_key,
                             mean_image, model_key, mosaic, order_layers, order_models, png_bytes,
                             render_report, table1_frame, topk_grid)


def test_png_roundtrip_and_float_scaling():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)
    assert (decode_png(png_bytes(img)) == img).all()
    f = np.array([[[0.0, 0.5, 1.0]]])
    assert decode_png(png_bytes(f)).tolist() == [[[0, 128, 255]]]


def test_mean_image_layout_stretch_and_nan():
    size = 3
    chw = np.arange(27, dtype=np.float64).reshape(3, size, size) / 100 + 0.3   # 0.30 … 0.56
    chw[:, 0, 1] = np.nan
    got = mean_image(chw.ravel().astype(np.float32), size)
    lo, hi = np.nanmin(chw), np.nanmax(chw)
    want = np.round((chw - lo) / (hi - lo) * 255).transpose(1, 2, 0)
    assert got[0, 1].tolist() == [0, 0, 0]                      # never inside: black
    mask = np.ones((size, size), bool)
    mask[0, 1] = False
    assert np.abs(got[mask].astype(int) - want[mask]).max() <= 1
    # C-order (3, size, size): pixel (y, x) of colour k is value k*9 + y*3 + x
    assert got[0, 0, 0] == 0 and got[2, 2, 2] == 255             # global min (R), max (B)
    unstretched = mean_image(chw.ravel(), size, stretch=False)
    assert unstretched[1, 1, 0] == round(chw[0, 1, 1] * 255)
    with pytest.raises(ValueError, match="expected 3"):
        mean_image(np.zeros(26), size)


def test_filter_images_zero_is_grey_and_extreme_is_saturated():
    w = np.zeros((2, 3, 2, 2))
    w[0, 0, 0, 0], w[0, 2, 1, 1] = 2.0, -1.0
    imgs = filter_images(w)
    assert imgs[0][0, 0, 0] == 255 and imgs[0][1, 1, 2] == 64    # 0.5 - 1/4 -> 0.25 -> 64
    assert imgs[0][0, 1, 1] == 128 and (imgs[1] == 128).all()    # zero / all-zero filter
    with pytest.raises(ValueError):
        filter_images(np.zeros((2, 1, 3, 3)))


def test_mosaic_places_tiles_and_rejects_mixed_shapes():
    tiles = [np.full((3, 4, 3), i * 20, np.uint8) for i in range(5)]
    m = mosaic(tiles, cols=2, pad=1)
    assert m.shape == (1 + 3 * 4, 1 + 2 * 5, 3)
    for i in range(5):
        r, c = divmod(i, 2)
        y, x = 1 + r * 4, 1 + c * 5
        assert (m[y:y + 3, x:x + 4] == i * 20).all()
    assert (m[12:, 6:] == 255).all()                              # the empty sixth slot
    with pytest.raises(ValueError):
        mosaic([np.zeros((3, 3, 3), np.uint8), np.zeros((2, 3, 3), np.uint8)], cols=2)


def test_topk_grid_rank_order_and_missing_ranks():
    patches = [png_bytes(np.full((5, 5, 3), 10 * r, np.uint8)) for r in range(10)]
    g = topk_grid(patches, cell=10)
    for r in range(16):
        y, x = 1 + (r // 4) * 11, 1 + (r % 4) * 11
        want = 10 * r if r < 10 else 235
        assert (g[y:y + 10, x:x + 10] == want).all(), r


def test_fit_tile_nearest_upscale_and_box_downscale():
    img = np.array([[[0, 0, 0], [255, 255, 255]]], np.uint8).repeat(2, axis=0)   # 2x2
    up = fit_tile(img, 4)
    assert (up[:, :2] == 0).all() and (up[:, 2:] == 255).all()
    down = fit_tile(np.kron(np.eye(2), np.ones((4, 4)))[..., None].repeat(3, 2).astype(np.uint8) * 200, 2)
    assert down[..., 0].tolist() == [[200, 0], [0, 200]]
    assert [cell_size(s) for s in (11, 27, 59, 99, 300)] == [55, 54, 59, 99, 112]


def testcrop_center_rf_matches_the_geometry_contract():
    img = np.arange(64 * 64 * 3).reshape(64, 64, 3).astype(np.uint8)
    rf = dict(rf_size=11, jump=4, offset=0, feature_size=16)
    # centre neuron (8, 8) sees rows 0 + 4*8 - 5 … +5 = 27 … 37
    assert (crop_center_rf(img, rf) == img[27:38, 27:38]).all()
    assert crop_center_rf(img, None) is img
    assert crop_center_rf(img, dict(rf, rf_size=99)) is img      # RF larger than the image
    assert crop_center_rf(img, dict(rf, global_context=True)) is img   # not local: whole image
    assert (crop_center_rf(img, dict(rf, global_context=None)) == img[27:38, 27:38]).all()


def test_orders():
    assert sorted(["conv10", "fc", "pool1", "conv2", "conv1"], key=layer_key) == [
        "conv1", "pool1", "conv2", "conv10", "fc"]
    assert sorted(["plainnet34", "resnet34", "resnet18", "plainnet18"], key=model_key) == [
        "resnet18", "resnet34", "plainnet18", "plainnet34"]
    # The paper's names in the paper's order first, every other name in the order first seen.
    assert order_models(["vgg16", "plainnet34", "alexnet", "resnet50", "resnet34", "vgg16"]) == [
        "resnet34", "resnet50", "plainnet34", "vgg16", "alexnet"]
    assert order_layers(["features.28", "conv7", "layer2.1.conv2", "pool1", "features.3"]) == [
        "pool1", "conv7", "features.28", "layer2.1.conv2", "features.3"]


def _ablation_rows(model, layer, train_seed, inactive, deltas, fraction=0.5):
    """ablation.parquet and census.parquet rows of one training seed, as jobs.ablate writes
    them: a clean row, then per noise seed inactive-all, control-active and one random subset
    (`deltas[seed]` = their ΔL), or null rows with a note when nothing is inactive."""
    from pipeline.ablation.table1 import ABLATION_SCHEMA, CENSUS_SCHEMA, no_inactive_note

    base = dict(model=model, layer=layer, train_seed=train_seed, inactive_channels=inactive)
    rows = [dict(base, condition="clean", seed=-1, images=8, loss=2.0, top1=0.5, delta_loss=0.0)]
    for seed, d in enumerate(deltas):
        for cond, frac, dl in (("inactive-all", None, d), ("control-active", None, d / 100),
                               ("inactive-random", fraction, d / 10)):
            rows.append(dict(base, condition=cond, seed=seed, fraction=frac, note="",
                             **({} if not inactive else dict(images=8, loss=2.0 + dl,
                                                              delta_loss=dl))))
            if not inactive:
                rows[-1]["note"] = no_inactive_note(layer)
    census = [dict(model=model, layer=layer, channel=c, images=8, max=0.0 if c in inactive else 1.0,
                   positive_fraction=0.0 if c in inactive else 0.5, inactive=c in inactive,
                   near_dead=c in inactive, train_seed=train_seed) for c in range(4)]
    return (pa.Table.from_pylist(rows, schema=ABLATION_SCHEMA),
            pa.Table.from_pylist(census, schema=CENSUS_SCHEMA))


def test_table1_is_read_from_table1_parquet_and_formatted_as_the_console_does():
    """The report's Table 1 is table1.parquet through pipeline.ablation.table1's one formatter:
    the same cells the console prints, "n = k of N" included; without table1.parquet the same
    computation runs on ablation.parquet and the census."""
    from pipeline.ablation.table1 import format_table1, table1, table1_cells

    parts = [_ablation_rows("resnet34", "pool1", 0, [1, 3], [1.2, 1.4]),
             _ablation_rows("resnet34", "pool1", 1, [], [0.0, 0.0]),
             _ablation_rows("plainnet34", "pool1", 0, [2], [0.01, 0.03]),
             _ablation_rows("plainnet34", "pool1", 1, [0], [0.02, 0.04])]
    ablation = pa.concat_tables([a for a, _ in parts])
    census = pa.concat_tables([c for _, c in parts])
    t1 = table1(ablation, census)
    df = table1_frame(t1)
    assert list(df.columns) == list(table1_cells(t1.to_pylist()[0]))
    assert df["model"].tolist() == ["resnet34", "resnet34", "plainnet34", "plainnet34"]
    res, plain = df.iloc[0], df.iloc[2]
    assert res["ΔL"] == "+1.3000 (n = 1 of 2)"                  # seed 1 has none inactive
    assert res["control ΔL"] == "+0.0130 (n = 1 of 2)"
    assert df.iloc[1]["ΔL"] == "+0.1300 (n = 1 of 2)" and df.iloc[1]["noised"] == "random p=0.5"
    assert res["inactive"] == "1.0±1.4/4" and res["training seeds"] == "2"
    assert plain["ΔL"] == "+0.0250 ± 0.0071 (n = 2 of 2)"
    text = format_table1(t1, census)
    for cell in (res["ΔL"], res["control ΔL"], plain["ΔL"]):
        assert cell in text
    # No table1.parquet: the one computation on ablation.parquet and the census.
    assert table1_frame(None, ablation, census).equals(df)
    assert table1_frame(None, ablation, None) is None and table1_frame(None) is None


def test_census_has_a_row_per_model_training_seed_and_layer():
    rng = np.random.default_rng(3)
    rows = [dict(model=m, train_seed=t, layer="pool1", channel=c, inactive=bool(rng.random() < .3),
                 near_dead=bool(rng.random() < .5))
            for m in ("plainnet34", "resnet34") for t in (0, 1) for c in range(6)]
    df = census_frame(pa.Table.from_pylist(rows))
    assert list(df.columns) == ["model", "training seed", "layer", "channels", "inactive",
                                "near-dead", "inactive channels"]
    assert [tuple(r) for r in df[["model", "training seed"]].values] == [
        ("resnet34", 0), ("resnet34", 1), ("plainnet34", 0), ("plainnet34", 1)]
    for r in df.to_dict("records"):
        mine = [x for x in rows if (x["model"], x["train_seed"]) == (r["model"], r["training seed"])]
        dead = [x["channel"] for x in mine if x["inactive"]]
        assert (r["channels"], r["inactive"], r["near-dead"]) == (
            6, len(dead), sum(x["near_dead"] for x in mine))
        assert r["inactive channels"] == (", ".join(map(str, dead)) or "none")


def _pages(inputs: ReportInputs, **options) -> dict[str, bytes]:
    return dict(render_report(inputs, ReportOptions(**options)))


def test_markup_escapes_every_value():
    name = "<script>alert(1)</script>"
    rf = pa.table({"model": [name], "layer": ["a&b"], "rf_size": [3]})
    topk = pa.table({"model": [name], "layer": ["a&b"], "channel": [0], "neuron": ["any"],
                     "rank": [0], "size": [3], "patch": [png_bytes(np.zeros((3, 3, 3), np.uint8))]})
    index = _pages(ReportInputs(rf=rf, topk=topk, source="s3://b/<x>"))["index.html"].decode()
    assert name not in index and "&lt;script&gt;alert(1)&lt;/script&gt;" in index
    assert "a&amp;b" in index and "s3://b/&lt;x&gt;" in index
    assert index.count("<script>") == 1                  # only the page's own image check


def test_templates_are_package_data():
    """A non-editable install (the container's `pip install .`) must carry every template."""
    import fnmatch
    import tomllib
    from pathlib import Path

    root = Path(__file__).resolve().parents[3]
    patterns = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"][
        "package-data"]["pipeline.report"]
    package = root / "pipeline" / "report"
    files = [p.relative_to(package).as_posix() for p in (package / "templates").rglob("*")
             if p.is_file() and "__pycache__" not in p.parts]
    assert files and all(any(fnmatch.fnmatch(f, pat) and f.count("/") == pat.count("/")
                             for pat in patterns) for f in files), files
