"""jobs.neuron_types end to end: tables in the DESIGN schema, a real checkpoint, local Ray, S3."""
from __future__ import annotations

import os

import numpy as np
import pyarrow as pa
import pytest
import torch

from jobs import neuron_types as job
from pipeline.stats.accumulators import MEAN_SCHEMA
from pipeline.actmax.optimize import display_images
from pipeline.results.png import png_bytes
from pipeline.models.checkpoint import load_checkpoint, save_checkpoint
from pipeline.models.zoo import build_model
from pipeline.census.types import TYPES, filter_to_stimulus, measure_batch
from pipeline.data.preprocess import WhiteningStats
from pipeline.results.tables import exists, read_json, read_table, write_table
from tests.helpers import local_ray

IMAGENET_MEAN = (0.485, 0.456, 0.406)
EXPECTED = ["orientation-selective", "double-opponent", "single-opponent", "other", "empty"]
SIZES = {"pool1": 11, "conv3": 27}   # resnet18 receptive fields


@pytest.fixture(scope="module")
def ray_cluster(s3_server):
    # after s3_server: Ray's workers inherit its AWS_* variables
    with local_ray(2, 200) as address:
        yield address


def grid(s: int):
    r, c = np.mgrid[0:s, 0:s] - (s - 1) / 2
    return c, -r


def patterns(s: int, neutral) -> list[np.ndarray]:
    """Known answers, in EXPECTED's order, drawn on a background of the neutral colour."""
    x, y = grid(s)
    rad = np.hypot(x, y)
    n = np.asarray(neutral, dtype=np.float64)[:, None, None]
    base = np.repeat(n, s, 1).repeat(s, 2)
    t = np.radians(30)
    sigma, period = max(s / 5, 1.8), max(s / 3, 3.5)
    gab = np.exp(-rad ** 2 / (2 * sigma ** 2)) * np.cos(2 * np.pi * (-np.sin(t) * x + np.cos(t) * y) / period)
    red_green = np.array([0.3, -0.3, 0.0])[:, None, None]
    # Red centre, green surround: a balanced colour difference of Gaussians.
    sc = max(s / 8, 1.0)
    g1, g2 = np.exp(-rad ** 2 / (2 * sc ** 2)), np.exp(-rad ** 2 / (2 * (2.5 * sc) ** 2))
    dog = g1 / g1.sum() - g2 / g2.sum()
    return [
        base + 0.3 * gab[None],
        base + red_green * (dog / np.abs(dog).max())[None],
        base + red_green * (rad < s / 5),
        base + 0.3 * np.exp(-rad ** 2 / (2 * (s / 6) ** 2))[None],
        np.full((3, s, s), np.nan),          # a channel that never fired
    ]


def mean_table(model: str, neutral) -> pa.Table:
    rows = {k: [] for k in MEAN_SCHEMA.names}
    for layer, s in SIZES.items():
        for neuron in ("center", "all"):
            pats = patterns(s, neutral)
            if neuron == "all":      # different answers, so that --neuron is seen to select
                pats = pats[::-1]
            for ch, p in enumerate(pats):
                seen = np.isfinite(p)
                rows["model"].append(model)
                rows["layer"].append(layer)
                rows["channel"].append(ch)
                rows["neuron"].append(neuron)
                # 3000 of 6000 images: the known answers stand far above the standard error
                rows["count"].append(0 if not seen.any() else 3000)
                rows["images"].append(6000)
                rows["size"].append(s)
                rows["mean"].append(p.astype(np.float32).ravel().tolist())
                rows["weight"].append(np.where(seen, 3000.0, 0.0).ravel().tolist())
                rows["sum"].append(np.where(seen, 3000.0 * p, 0.0).ravel().tolist())
    return pa.table(rows, schema=MEAN_SCHEMA)


def embed(p: np.ndarray, neutral, size: int = 64) -> np.ndarray:
    """A pattern at the centre of a size x size image of the neutral colour (NaN -> neutral)."""
    out = np.repeat(np.asarray(neutral, dtype=np.float64)[:, None, None], size, 1).repeat(size, 2)
    s = p.shape[-1]
    lo = size // 2 - s // 2
    out[:, lo:lo + s, lo:lo + s] = np.where(np.isfinite(p), p, out[:, lo:lo + s, lo:lo + s])
    return out


def actmax_table(items) -> pa.Table:
    """items: (model, preprocess, neutral). PNG image stretched for display, as jobs.actmax does."""
    rows = {k: [] for k in ("model", "layer", "channel", "steps", "objective_start",
                            "objective_end", "image", "input")}
    for model, pre, neutral in items:
        rgb = torch.from_numpy(np.stack([embed(p, neutral) for p in patterns(27, neutral)]))
        inp = pre(rgb)
        images = display_images(inp, pre)
        for ch in range(len(rgb)):
            rows["model"].append(model)
            rows["layer"].append("conv3")
            rows["channel"].append(ch)
            rows["steps"].append(31)
            rows["objective_start"].append(0.0)
            rows["objective_end"].append(1.0)
            rows["image"].append(png_bytes(images[ch]))
            rows["input"].append(inp[ch].float().numpy().ravel().tolist())
    return pa.table(rows, schema=pa.schema([
        ("model", pa.string()), ("layer", pa.string()), ("channel", pa.int32()),
        ("steps", pa.int32()), ("objective_start", pa.float32()), ("objective_end", pa.float32()),
        ("image", pa.binary()), ("input", pa.list_(pa.float32()))]))


def zca_checkpoint(url: str) -> tuple:
    """resnet18 (width 8) whose first filters, mapped to stimulus space through the ZCA
    (A⁻¹w), are known patterns."""
    g = torch.Generator().manual_seed(0)
    mix = torch.tensor([[1.0, 0.5, 0.2], [0.2, 1.0, 0.4], [0.1, 0.3, 1.0]], dtype=torch.float64)
    pix = torch.einsum("ij,njhw->nihw", mix, torch.rand(4, 3, 8, 8, generator=g, dtype=torch.float64))
    pre = WhiteningStats().update(pix * 0.4 + 0.2).fit()
    model = build_model("resnet18", num_classes=4, width=8)
    w_rgb = np.stack(patterns(7, (0.0, 0.0, 0.0))[:4] + [np.zeros((3, 7, 7))]
                     + [np.random.default_rng(1).normal(size=(3, 7, 7)) for _ in range(3)])
    a = np.asarray(pre.matrix)
    w = np.einsum("ij,njhw->nihw", a, w_rgb)   # so that the stimulus A⁻¹w = w_rgb
    with torch.no_grad():
        model.conv1.weight.copy_(torch.from_numpy(w).float())
    save_checkpoint(url, model, pre)
    return pre, w_rgb


@pytest.fixture(scope="module")
def results(tmp_path_factory, ray_cluster):
    """A jobs.reproduce-style root: analysis/<model>/, actmax/, train/resnet18/model.pt."""
    root = str(tmp_path_factory.mktemp("reproduce"))
    pre, w_rgb = zca_checkpoint(f"{root}/train/resnet18/model.pt")
    from pipeline.data.preprocess import IMAGENET

    write_table(mean_table("resnet18", pre.mean), f"{root}/analysis/resnet18/stimuli/mean.parquet")
    write_table(mean_table("plainnet18", IMAGENET_MEAN), f"{root}/analysis/plainnet18/stimuli/mean.parquet")
    # plainnet18 has no checkpoint: its actmax goes the PNG path (border colour = neutral).
    write_table(actmax_table([("resnet18", pre, pre.mean), ("plainnet18", IMAGENET, IMAGENET_MEAN)]),
                f"{root}/actmax/actmax.parquet")
    out = f"{root}/neuron_types"
    assert job.main(["--from", root, "--out", out]) == 0
    return root, out, pre, w_rgb


def test_types_match_the_known_answers(results, capsys):
    root, out, pre, w_rgb = results
    rows = read_table(f"{out}/neuron_types.parquet").to_pandas()
    for model in ("resnet18", "plainnet18"):
        for layer in ("pool1", "conv3"):
            got = rows[(rows.model == model) & (rows.layer == layer) & (rows.source == "mean")]
            assert got.sort_values("channel")["type"].tolist() == EXPECTED, (model, layer)
            gabor = got[got.channel == 0].iloc[0]
            assert abs(gabor.orientation_deg - 30) < 5 and gabor.osi > 0.6
        got = rows[(rows.model == model) & (rows.source == "actmax")].sort_values("channel")
        assert got["type"].tolist() == EXPECTED, model
    do = rows[(rows.source == "mean") & (rows.channel == 1)]
    assert (do.opponent_axis == "red-green").all() and do.double_opponent.all()
    # auto neutral of the mean stimuli: the median over channels of each channel's mean colour.
    for model in ("resnet18", "plainnet18"):
        table = read_table(f"{root}/analysis/{model}/stimuli/mean.parquet").to_pandas()
        table = table[table.neuron == "center"]
        colours = [np.nanmean(np.asarray(m, dtype=np.float64).reshape(3, -1), axis=1)
                   for m in table["mean"] if np.isfinite(m).any()]
        got = np.stack(rows[(rows.model == model) & (rows.source == "mean")].neutral.tolist())
        np.testing.assert_allclose(got, np.broadcast_to(np.median(colours, axis=0), got.shape), atol=1e-6)


def test_checkpoint_neutral_is_the_preprocessing_mean(results, tmp_path):
    root, _, pre, _ = results
    out = str(tmp_path / "ckpt")
    assert job.main(["--from", root, "--sources", "mean", "--neutral", "checkpoint", "--out", out]) == 0
    rows = read_table(f"{out}/neuron_types.parquet").to_pandas()
    for model, mean in (("resnet18", pre.mean), ("plainnet18", IMAGENET_MEAN)):
        got = rows[rows.model == model]
        np.testing.assert_allclose(np.stack(got.neutral.tolist()),
                                   np.broadcast_to(mean, (len(got), 3)), atol=1e-6)
        for layer in SIZES:    # the patterns were drawn on exactly this neutral
            assert got[got.layer == layer].sort_values("channel")["type"].tolist() == EXPECTED


def test_filters_are_measured_in_stimulus_space_through_the_zca(results):
    root, out, pre, w_rgb = results
    rows = read_table(f"{out}/neuron_types.parquet").to_pandas()
    filt = rows[rows.source == "filter"].sort_values("channel")
    assert filt.model.unique().tolist() == ["resnet18"] and filt.layer.unique().tolist() == ["conv1"]
    assert filt["type"].tolist()[:5] == EXPECTED
    # Every row equals the pure measure of the checkpoint's filters read as their expected
    # mean preferred stimulus (a fresh BatchNorm: the direction A⁻¹w itself, t = 0).
    from pipeline.census.patterns import stimulus_filters
    from pipeline.census.types import stimulus_covariance

    loaded = load_checkpoint(f"{root}/train/resnet18/model.pt")
    state = loaded.preprocess.state()
    _, pats, noise = stimulus_filters(loaded.model, state)
    direction = filter_to_stimulus(loaded.model.conv1.weight.detach().numpy(), state)
    for c in (0, 1, 2, 3, 5):
        assert np.corrcoef(pats[c].ravel(), direction[c].ravel())[0, 1] == pytest.approx(1.0)
    ref = measure_batch(pats, None, noise=noise, covariance=stimulus_covariance(state)[0],
                        resolution=False)
    np.testing.assert_allclose(filt.chromatic_fraction.to_numpy(), ref["chromatic_fraction"],
                               rtol=1e-5, atol=1e-9)
    np.testing.assert_allclose(filt.osi.to_numpy()[:4], ref["osi"][:4], rtol=1e-5, atol=1e-9)
    assert filt["type"].tolist() == list(ref["type"])


def test_summary_counts_and_printed_table(results):
    root, out, _, _ = results
    rows = read_table(f"{out}/neuron_types.parquet").to_pandas()
    summary = read_table(f"{out}/summary.parquet").to_pandas()
    assert list(summary.columns) == ["model", "layer", "source", "type", "count"]
    brute = rows.groupby(["model", "layer", "source", "type"]).size()
    for r in summary.itertuples():
        assert r.count == brute.get((r.model, r.layer, r.source, r.type), 0)
    groups = summary.groupby(["model", "layer", "source"]).size()
    assert (groups == len(TYPES)).all() and len(groups) == 2 * 2 + 2 + 1
    info = read_json(f"{out}/run.json")
    assert info["counts"]["patterns"] == len(rows) == 2 * 2 * 5 + 2 * 5 + 8
    text = job.format_summary(read_table(f"{out}/summary.parquet"))
    assert "double-opponent" in text and "resnet18" in text and "plainnet18" in text
    # Each property on its own, by brute force over the rows' flags, and the overlaps.
    props = read_table(f"{out}/properties.parquet").to_pandas()
    assert len(props) == len(groups)
    for p in props.itertuples():
        g = rows[(rows.model == p.model) & (rows.layer == p.layer) & (rows.source == p.source)]
        assert p.channels == len(g)
        assert p.structured == (~g["type"].isin(["no structure", "empty"])).sum()
        for flag in ("orientation_selective", "single_opponent", "double_opponent",
                     "no_structure"):
            assert getattr(p, flag) == g[flag].sum()
            assert (g[flag] <= ~g["type"].isin(["empty"])).all()
        assert p.oriented_double_opponent == (g.orientation_selective & g.double_opponent).sum()
        assert p.no_structure == (g["type"] == "no structure").sum()
    # The mean tables of this root predate the baseline table: a warning, not a failure.
    assert any("no baseline.parquet beside" in w for w in info["warnings"])
    assert set(rows[rows.source == "mean"]["reference"]) == {"neutral"}
    assert set(rows[rows.source == "filter"]["reference"]) == {"zero"}


def test_s3_multiple_from_and_small_chunks_give_the_same_rows(results, s3_bucket):
    root, out, _, _ = results
    from pipeline.results.tables import read_bytes, write_bytes

    base = f"s3://{s3_bucket}"
    for m in ("resnet18", "plainnet18"):
        write_bytes(f"{base}/{m}/stimuli/mean.parquet",
                    read_bytes(f"{root}/analysis/{m}/stimuli/mean.parquet"))
    write_bytes(f"{base}/ckpt.pt", read_bytes(f"{root}/train/resnet18/model.pt"))
    assert job.main(["--from", f"{base}/resnet18", "--from", f"{base}/plainnet18",
                     "--checkpoint", f"{base}/ckpt.pt", "--sources", "mean,filter",
                     "--chunk", "2", "--out", f"{base}/types"]) == 0
    s3 = read_table(f"{base}/types/neuron_types.parquet").to_pandas()
    local = read_table(f"{out}/neuron_types.parquet").to_pandas()
    local = local[local.source != "actmax"].reset_index(drop=True)
    assert len(s3) == len(local)
    for col in ("model", "layer", "channel", "source", "type", "opponent_axis"):
        assert s3[col].tolist() == local[col].tolist()
    for col in ("osi", "chromatic_fraction", "double_opponent_score"):
        np.testing.assert_allclose(s3[col].to_numpy(float), local[col].to_numpy(float), equal_nan=True)


def test_thresholds_change_the_types(results, tmp_path):
    root, _, _, _ = results
    out = str(tmp_path / "strict")
    assert job.main(["--from", root, "--sources", "mean", "--osi-threshold", "1",
                     "--chromatic-threshold", "1", "--out", out]) == 0
    kinds = set(read_table(f"{out}/neuron_types.parquet").column("type").to_pylist())
    assert kinds == {"other", "empty"}


def run_bad(argv, capsys, out):
    with pytest.raises(SystemExit) as e:
        job.main(argv + ["--out", out])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    # Progress lines (timestamped log, Ray's start-up) may come first; the error is one line.
    errors = [line for line in err if "error" in line.lower()]
    assert len(errors) == 1 and err[-1] == errors[0]
    assert errors[0].startswith("python -m jobs.neuron_types: error: ")
    assert not exists(f"{out}/neuron_types.parquet") and not exists(f"{out}/summary.parquet")
    return errors[0]


def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys):
    out = str(tmp_path / "out")
    empty = tmp_path / "empty"
    empty.mkdir()
    msg = run_bad(["--from", str(empty)], capsys, out)
    assert "no mean table" in msg and str(empty) in msg
    msg = run_bad(["--from", str(empty), "--sources", "mean,colour"], capsys, out)
    assert "unknown source 'colour'" in msg and "filter, mean, actmax" in msg
    msg = run_bad(["--from", str(empty), "--osi-threshold", "2"], capsys, out)
    assert "osi threshold" in msg
    msg = run_bad(["--from", str(empty), "--neutral", "pink"], capsys, out)
    assert "--neutral" in msg
    msg = run_bad(["--sources", "filter", "--checkpoint", str(tmp_path / "nope.pt")], capsys, out)
    assert "checkpoint not found" in msg


def test_malformed_mean_found_inside_a_ray_task_is_one_line(ray_cluster, tmp_path, capsys):
    table = mean_table("resnet18", IMAGENET_MEAN)
    means = table.column("mean").to_pylist()
    means[0] = means[0][:-1]                       # one value short of 3*size*size
    table = table.set_column(table.schema.get_field_index("mean"), "mean",
                             pa.array(means, pa.list_(pa.float32())))
    write_table(table, str(tmp_path / "a" / "stimuli" / "mean.parquet"))
    msg = run_bad(["--from", str(tmp_path / "a")], capsys, str(tmp_path / "out"))
    assert "channel 0" in msg and "expected 3*size*size" in msg


def test_run_json_shape_and_resume_from_a_partial(results, tmp_path):
    """A finished unit's partial (same configuration and inputs) is reused, not recomputed; a
    partial without its marker is not trusted."""
    from jobs.runtime import engine
    from jobs.runtime.options import parse_config
    from tests.helpers import assert_run_shape

    root, _, _, _ = results
    out = str(tmp_path / "resume")
    argv = ["--from", root, "--sources", "mean", "--chunk", "3", "--out", out]
    cfg = parse_config(job.NeuronTypesConfig, argv, job.PROG)
    _, _, _, chunks, stamps = job.prepare(cfg)
    assert len(chunks) == 2 * 2 * 2          # 2 models x 2 layers x channels {0-2, 3-4}
    store = job.store(cfg, stamps, engine.resolve_device("cpu"))
    from pipeline.census.inputs import measure_chunk

    fake = measure_chunk(chunks[0])
    fake = fake.set_column(fake.schema.get_field_index("type"), "type",
                           pa.array(["resumed"] * fake.num_rows))
    store.save(chunks[0].name, fake, {})
    store.save(chunks[1].name, fake, {})     # ... and its marker removed below
    (tmp_path / "resume" / "_partials" / store.fingerprint / f"{chunks[1].name}.done").unlink()
    assert job.main(argv) == 0
    rows = read_table(f"{out}/neuron_types.parquet").to_pandas()
    assert (rows["type"] == "resumed").sum() == fake.num_rows == 3
    info = read_json(f"{out}/run.json")
    assert_run_shape(info)
    assert info["counts"]["units_resumed"] == 1 and info["counts"]["units_computed"] == 7
    assert info["throughput"]["unit"] == "patterns" and info["counts"]["patterns"] == len(rows)
    assert os.listdir(f"{out}/_partials") == []


def test_filters_of_any_model_are_its_first_conv_on_rgb(ray_cluster, tmp_path):
    """mobilenet_v3_small: the first conv on RGB input is features.0.0, named by module path."""
    from pipeline.data.preprocess import IMAGENET

    model = build_model("mobilenet_v3_small", num_classes=4)
    url = str(tmp_path / "mb.pt")
    save_checkpoint(url, model, IMAGENET)
    out = str(tmp_path / "out")
    assert job.main(["--sources", "filter", "--checkpoint", f"mobilenet_v3_small={url}",
                     "--out", out]) == 0
    rows = read_table(f"{out}/neuron_types.parquet").to_pandas()
    assert set(rows.layer) == {"features.0.0"} and set(rows.model) == {"mobilenet_v3_small"}
    w = model.features[0][0].weight.detach().numpy()
    ref = measure_batch(filter_to_stimulus(w, IMAGENET.state()), None)
    assert rows.channel.tolist() == list(range(16))
    np.testing.assert_allclose(rows.osi.to_numpy(float), ref["osi"], rtol=1e-6)
    assert rows["type"].tolist() == list(ref["type"])
