"""jobs.compare end to end on a real local Ray cluster, real JPEG files and a real S3 server.

One cluster per module. Checks: one shard / one worker and many shards / two workers (output on
S3) give the same tables (1e-9); the tables equal a direct computation from the checkpoints on the
decoded images; an unreadable image is skipped, listed and shrinks only its own minibatch; one
checkpoint against itself gives CKA 1 on the diagonal and every channel matched to itself; a rerun
resumes from the markers with the same tables; bad inputs exit 2 with one line and write nothing.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from jobs import compare as job
from pipeline.data.decode import EvalTransform, load_batch
from pipeline.data.listing import build_manifest
from pipeline.data.preprocess import IMAGENET
from pipeline.models.checkpoint import save_checkpoint
from pipeline.models.hooks import capture
from pipeline.models.layers import resolve_layers
from pipeline.models.zoo import build_model
from pipeline.results import catalog
from pipeline.results.tables import read, read_json
from tests.helpers import assert_run_shape, local_ray

N_GOOD, BROKEN = 21, 6          # 22 files; the broken one sorts to image_index 6
LAYERS = "pool1,conv3,conv5,layer2.1"
B = 4


@pytest.fixture(scope="module")
def ray_cluster(s3_server):
    with local_ray(2, 200) as address:       # after s3_server: workers see its AWS_* variables
        yield address


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    """Three class folders of real JPEGs (crops of scikit-image photos), one broken file, and
    checkpoints of a tiny resnet18 and plainnet18."""
    import skimage.data

    root = tmp_path_factory.mktemp("compare")
    rng = np.random.default_rng(0)
    photos = {"a_astronaut": skimage.data.astronaut(), "b_coffee": skimage.data.coffee(),
              "c_chelsea": skimage.data.chelsea()}
    for k, (cls, photo) in enumerate(photos.items()):
        (root / "data" / cls).mkdir(parents=True)
        for i in range(N_GOOD // 3):
            y, x = rng.integers(0, 250, 2)
            Image.fromarray(photo[y:y + 120, x:x + 120]).resize((40, 36)).save(
                root / "data" / cls / f"img{i:02d}.jpg", quality=90)
    (root / "data" / "a_astronaut" / "img05_broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    ckpts = {}
    for seed, name in enumerate(("resnet18", "plainnet18")):
        torch.manual_seed(seed)
        ckpts[name] = str(root / f"{name}.pt")
        save_checkpoint(ckpts[name], build_model(name, num_classes=3, width=8), IMAGENET)
    return {"root": root, "data": str(root / "data"), **ckpts}


def argv_for(data: dict, out: str, *extra: str) -> list[str]:
    return ["--data", data["data"], "--checkpoints", f"{data['resnet18']},{data['plainnet18']}",
            "--layers", LAYERS, "--batch-size", str(B), "--resize", "36", "--crop", "32",
            "--precision", "float64", "--out", out, *extra]


TABLES = (catalog.CKA, catalog.MATCHES, catalog.SELECTIVITY)


def tables_of(out: str) -> dict:
    return {t.name: read(t, out) for t in TABLES}


def assert_close_tables(a: dict, b: dict, atol: float = 1e-9) -> None:
    for name in (t.name for t in TABLES):
        x, y = a[name], b[name]
        floats = [f.name for f in x.schema if f.type == "double"]
        assert x.drop(floats).equals(y.drop(floats)), name
        for f in floats:
            np.testing.assert_allclose(x[f].to_numpy(), y[f].to_numpy(), rtol=0, atol=atol,
                                       equal_nan=True, err_msg=f"{name}.{f}")


@pytest.fixture(scope="module")
def single(ray_cluster, data) -> str:
    out = str(data["root"] / "single")
    assert job.main(argv_for(data, out, "--shards", "1", "--workers", "1")) == 0
    return out


def test_one_shard_equals_many_shards_and_workers_on_s3(single, data, s3_bucket):
    out = f"s3://{s3_bucket}/compare"
    assert job.main(argv_for(data, out, "--shards", "4", "--workers", "2")) == 0
    assert_close_tables(tables_of(single), tables_of(out))
    run, run_s3 = json.loads(Path(single, "run.json").read_text()), read_json(f"{out}/run.json")
    assert run["counts"]["shards"] == 1 and run_s3["counts"]["shards"] == 4
    for r in (run, run_s3):
        assert_run_shape(r)
        assert r["job"] == "compare"
        assert r["counts"]["images_read"] == N_GOOD and r["counts"]["images_skipped"] == 1
        assert r["skipped"][0]["image_index"] == BROKEN
        assert r["details"]["names"] == ["resnet18", "plainnet18"]
        assert r["counts"]["minibatches"] == 4 and r["counts"]["minibatch_images"] == 16


def test_tables_equal_a_direct_computation(single, data):
    t = tables_of(single)
    man = pq.read_table(f"{single}/manifest.parquet")
    assert man.column_names[:3] == ["image_index", "path", "label"]
    assert man.num_rows == N_GOOD + 1
    manifest = build_manifest(data["data"])
    good = [i for i in range(N_GOOD + 1) if i != BROKEN]
    images = load_batch(manifest, good, EvalTransform(36, 32)).images.float() / 255
    labels = manifest.labels[good]
    feats = {}
    for name in ("resnet18", "plainnet18"):
        from pipeline.models.checkpoint import load_checkpoint

        net = load_checkpoint(data[name]).model.eval()
        with torch.no_grad():
            feats[name] = capture(net, IMAGENET(images), resolve_layers(net, LAYERS))
    # minibatches: image_index 0-3, 4-7 (6 unreadable: 3 images, not counted), 8-11, ...,
    # 20-21 (2 images, not counted)
    rows = {i: k for k, i in enumerate(good)}
    batches = [[rows[i] for i in range(s, s + B) if i in rows] for s in range(0, 22, B)]
    counted = [b for b in batches if len(b) >= 4]
    assert len(counted) == 4

    def hsic(p, q):
        n = len(p)
        k, l = p @ p.T, q @ q.T
        np.fill_diagonal(k, 0)
        np.fill_diagonal(l, 0)
        one = np.ones(n)
        return (np.trace(k @ l) + (one @ k @ one) * (one @ l @ one) / ((n - 1) * (n - 2))
                - 2 / (n - 2) * (one @ k @ l @ one)) / (n * (n - 3))

    def flat(name, layer, b):
        return feats[name][layer][b].double().reshape(len(b), -1).numpy()

    cka = {(r["net_a"], r["layer_a"], r["net_b"], r["layer_b"]): r for r in t["cka"].to_pylist()}
    assert len(cka) == 3 * 4 * 4
    for la, lb in (("conv3", "layer2.1"), ("pool1", "pool1")):
        h = [np.mean([hsic(flat(p, x, b), flat(q, y, b)) for b in counted])
             for p, x, q, y in (("resnet18", la, "plainnet18", lb), ("resnet18", la, "resnet18", la),
                                ("plainnet18", lb, "plainnet18", lb))]
        row = cka[("resnet18", la, "plainnet18", lb)]
        assert abs(row["cka"] - h[0] / np.sqrt(h[1] * h[2])) < 1e-9
        assert (row["n_images"], row["n_batches"]) == (16, 4)
    # matches of conv5: Pearson over every readable image and position
    xa = feats["resnet18"]["conv5"].double().permute(1, 0, 2, 3).reshape(8, -1).numpy()
    xb = feats["plainnet18"]["conv5"].double().permute(1, 0, 2, 3).reshape(8, -1).numpy()
    with np.errstate(invalid="ignore", divide="ignore"):
        r = np.corrcoef(xa, xb)[:8, 8:]
    from scipy.optimize import linear_sum_assignment

    live = ~np.isnan(r).all(1)
    i, j = linear_sum_assignment(np.nan_to_num(r[live], nan=-1.0), maximize=True)
    want = dict(zip(np.flatnonzero(live)[i].tolist(), j.tolist()))
    m = [row for row in t["matches"].to_pylist() if row["layer"] == "conv5"]
    assert {row["channel_a"]: row["matched_b"] for row in m if row["matched_b"] is not None} == want
    for row in m:
        if live[row["channel_a"]]:
            assert abs(row["best_r"] - np.nanmax(r[row["channel_a"]])) < 1e-9
    # selectivity of layer2.1 in A, from the per-class means of the spatial means
    x = feats["resnet18"]["layer2.1"].double().clamp_min(0).mean((2, 3)).numpy()
    means = np.stack([x[labels == k].mean(0) for k in range(3)])
    sel = [row for row in t["selectivity"].to_pylist()
           if (row["net"], row["layer"]) == ("resnet18", "layer2.1")]
    assert len(sel) == 16
    for row in sel:
        c = row["channel"]
        top = int(np.argmax(means[:, c]))
        rest = (means[:, c].sum() - means[top, c]) / 2
        assert row["top_class"] == top and row["n_classes"] == 3
        assert abs(row["selectivity"] - (means[top, c] - rest) / (means[top, c] + rest)) < 1e-6     # float32 image sums


def test_one_checkpoint_against_itself(ray_cluster, data):
    out = str(data["root"] / "self")
    # the default Gram precision (float32) and a 3-shard run
    assert job.main(["--data", data["data"], "--checkpoints", f"{data['resnet18']},"
                     f"{data['resnet18']}", "--layers", LAYERS, "--batch-size", str(B),
                     "--resize", "36", "--crop", "32", "--shards", "3", "--out", out]) == 0
    t = tables_of(out)
    for row in t["cka"].to_pylist():
        assert row["net_a"] in ("resnet18_a", "resnet18_b")
        if row["layer_a"] == row["layer_b"]:
            assert abs(row["cka"] - 1) < 1e-9
    for row in t["matches"].to_pylist():
        if row["best_b"] is not None:
            assert row["best_b"] == row["matched_b"] == row["channel_a"]
            assert abs(row["matched_r"] - 1) < 1e-9
    assert json.loads(Path(out, "run.json").read_text())["details"]["same_network"] is True


def test_rerun_resumes_from_the_markers(single, data, ray_cluster):
    import shutil

    out = data["root"] / "resume"
    shutil.copytree(single, out)
    for table in TABLES:
        Path(table.at(str(out))).unlink()
    # the partials of a 1-shard run: drop its marker, the shard is computed again
    assert job.main(argv_for(data, str(out), "--shards", "1", "--workers", "1")) == 0
    run = json.loads((out / "run.json").read_text())
    assert run["counts"]["units_resumed"] == 1 and run["counts"]["units_computed"] == 0
    assert_close_tables(tables_of(single), tables_of(str(out)), atol=0)
    done = next(out.glob("_partials/*/*.done"))
    done.unlink()
    assert job.main(argv_for(data, str(out), "--shards", "1", "--workers", "1")) == 0
    run = json.loads((out / "run.json").read_text())
    assert run["counts"]["units_resumed"] == 0 and run["counts"]["units_computed"] == 1
    assert_close_tables(tables_of(single), tables_of(str(out)))


def _bad(capsys, argv) -> str:
    with pytest.raises(SystemExit) as e:
        job.main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("python -m jobs.compare: error: "), err
    return err[0]


def test_bad_inputs_exit_2_with_one_line_and_write_nothing(data, capsys, tmp_path):
    out = tmp_path / "out"
    argv = argv_for(data, str(out))
    r18 = data["resnet18"]
    plain = ["--data", data["data"], "--out", str(out), "--limit", "8"]     # untrained models
    # a projection shortcut exists in the ResNet only; conv20 only in the deeper network
    err = _bad(capsys, [*argv, "--layers", "pool1,layer2.0.downsample.0"])
    assert "--layers, network B (plainnet18): unknown layer 'layer2.0.downsample.0'" in err
    err = _bad(capsys, [*plain, "--models", "resnet18,resnet34", "--layers", "conv3,conv20"])
    assert "network A (resnet18): unknown layer 'conv20'" in err
    err = _bad(capsys, [*argv, "--models", "resnet18,plainnet18", "--checkpoints", f"{r18},{r18}"])
    assert f"one checkpoint ({r18}) for two models (resnet18, plainnet18)" in err
    assert "needs at least 4" in _bad(capsys, [*argv, "--limit", "3"])
    assert "--batch-size must be >= 4" in _bad(capsys, [*argv, "--batch-size", "3"])
    assert "--models takes one value per network" in _bad(capsys, [*argv, "--models", "resnet18"])
    assert "--checkpoints takes one value per network" in _bad(capsys, [*argv, "--checkpoints",
                                                                       r18])
    assert "--names must differ" in _bad(capsys, [*argv, "--names", "x,x"])
    assert "invalid --models 'resnet35'; allowed: " in _bad(capsys, [*plain, "--models",
                                                                     "resnet35,resnet18"])
    assert "--names may not contain '/'" in _bad(capsys, [*argv, "--names", "a/1,b"])
    err = _bad(capsys, [*argv, "--layers", "pool1,fc"])
    assert "--layers, network A (resnet18): layer fc has no spatial map" in err
    assert "--layers is required" in _bad(capsys, [*plain, "--models",
                                                   "squeezenet1_1,mobilenet_v3_small"])
    (tmp_path / "empty").mkdir()
    assert "no images" in _bad(capsys, [*argv, "--data", str(tmp_path / "empty")])
    assert not out.exists() or not any(p.is_file() for p in out.rglob("*"))
