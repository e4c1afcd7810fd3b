"""jobs.train end to end on a real two-node local Ray cluster, real JPEGs and a real S3 server.

One cluster per module (a head and a second node, one CPU each: the two DDP ranks run on
different nodes). One 2-epoch run with --out on S3 (moto on loopback: Ray Train's checkpoints
go through pyarrow's S3 filesystem, the rest through s3fs) is shared by several checks: the
training loss falls, metrics rows are right, the parallel ZCA equals a single pass, `model.pt`
reproduces the last epoch's validation metrics and is analysable by `jobs.analyze --checkpoint`
alone. A rerun into the same --out asking for 3 epochs, with the rank-1 worker killed
(os._exit) in the middle of epoch 3, trains only epoch 3 (again after the restart). Bad inputs
exit 2 with one line before any output exists.
"""
from __future__ import annotations

import os
import uuid

import numpy as np
import pytest
import torch
import torchvision

from jobs import train as job
from pipeline import tables
from pipeline.checkpoint import load_checkpoint
from pipeline.demo import DemoSpec, generate_demo_data
from pipeline.models import build_model
from pipeline.preprocess import WhiteningStats
from pipeline.sources import build_manifest

SMALL = ["--model", "resnet18", "--width", "8", "--batch-size", "16", "--workers", "2"]


@pytest.fixture(scope="module")
def cluster(s3_server):
    # s3_server first: Ray's nodes and workers inherit the AWS_* variables that point at it.
    import ray
    from ray.cluster_utils import Cluster

    os.environ["RAY_ENABLE_UV_RUN_RUNTIME_ENV"] = "0"
    c = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "include_dashboard": False, "object_store_memory": 100 * 1024 ** 2})
    c.add_node(num_cpus=1, object_store_memory=100 * 1024 ** 2)
    ray.init(address=c.address)
    yield c
    ray.shutdown()
    c.shutdown()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> str:
    """The demo generator at 12 train / 4 val images per class (8 classes, 72x72 JPEGs)."""
    root = str(tmp_path_factory.mktemp("tiny") / "data")
    generate_demo_data(root, DemoSpec(train_per_class=12, val_per_class=4))
    return root


@pytest.fixture(scope="module")
def first_run(cluster, s3_server, tiny) -> dict:
    import boto3

    bucket = f"train-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=bucket)
    out = f"s3://{bucket}/run"
    argv = ["--data", f"{tiny}/train", "--val", f"{tiny}/val", *SMALL, "--epochs", "2", "--out", out]
    assert job.main(argv) == 0
    return {"out": out, "argv": argv,
            "metrics": tables.read_table(f"{out}/metrics.parquet").to_pylist()}


def test_two_epochs_on_two_workers_lower_the_training_loss(first_run):
    rows = first_run["metrics"]
    assert [r["epoch"] for r in rows] == [1, 2]
    assert rows[1]["train_loss"] < rows[0]["train_loss"]
    for r in rows:
        assert r["workers"] == 2
        assert r["train_images"] == 96          # 8 classes x 12, 6 full steps of 8 per rank
        assert r["val_images"] == 32 and r["skipped"] == 0
        assert r["lr"] == pytest.approx(0.05)
        assert 0 <= r["top1"] <= r["top5"] <= 1 and r["images_per_s"] > 0
    out = first_run["out"]
    run = tables.read_json(f"{out}/run.json")
    assert run["counts"]["epochs"] == 2 and run["counts"]["zca_images"] == 96
    fs, path = tables.fs_path(f"{out}/checkpoints")
    ckpts = [p for p in fs.ls(path, detail=True, refresh=True)
             if p["name"].rsplit("/", 1)[-1].startswith("checkpoint_") and p["type"] == "directory"]
    assert len(ckpts) == 2                       # --keep-checkpoints 2


def test_zca_of_the_parallel_pass_equals_a_single_pass(first_run, tiny):
    """The Ray tasks' merged sums give the matrix one process computes over the same crops."""
    from pipeline.train import EvalResizeCrop, ImageDataset, collate

    state = tables.read_json(f"{first_run['out']}/_partials/train.json")
    m = build_manifest(f"{tiny}/train")
    ds = ImageDataset(m.urls(range(len(m))), m.labels.tolist(), EvalResizeCrop(72, 64),
                      read=tables.read_bytes)
    images, _, _ = collate([ds[i] for i in range(len(ds))])
    whole = WhiteningStats().update(images.float() / 255)
    assert state["zca"]["pixels"] == whole.n
    expect = whole.fit(eps=1e-5)
    np.testing.assert_allclose(state["preprocess"]["matrix"], expect.matrix, rtol=1e-7, atol=1e-9)
    np.testing.assert_allclose(state["preprocess"]["mean"], expect.mean, rtol=1e-7)


def test_model_pt_restores_model_and_whitening_and_reproduces_last_validation(first_run, tiny):
    from pipeline.train import EvalResizeCrop, ImageDataset, collate, evaluate

    loaded = load_checkpoint(f"{first_run['out']}/model.pt")
    assert loaded.model_name == "resnet18" and loaded.preprocess.kind == "zca"
    assert loaded.meta["epoch"] == 2 and loaded.meta["recipe"]["eval_crop"] == 64
    assert loaded.meta["classes"] == sorted(os.listdir(f"{tiny}/val"))
    # Same keys as torchvision's resnet18 (width 8 only changes shapes).
    assert set(loaded.model.state_dict()) == set(torchvision.models.resnet18(num_classes=8).state_dict())
    val = build_manifest(f"{tiny}/val")
    ds = ImageDataset(val.urls(range(len(val))), val.labels.tolist(), EvalResizeCrop(72, 64),
                      read=tables.read_bytes)
    ev = evaluate(loaded.model, [collate([ds[i] for i in range(len(ds))])], loaded.preprocess,
                  torch.device("cpu"))
    last = first_run["metrics"][-1]
    assert ev.top1 == pytest.approx(last["top1"]) and ev.top5 == pytest.approx(last["top5"])
    assert ev.loss == pytest.approx(last["val_loss"], rel=1e-4)


def test_model_pt_is_analysable_with_the_checkpoint_flag_alone(first_run, tmp_path):
    from jobs import analyze

    out = str(tmp_path / "analysis")
    assert analyze.main(["--checkpoint", f"{first_run['out']}/model.pt", "--out", out]) == 0
    topk = tables.read_table(f"{out}/stimuli/topk.parquet").to_pylist()
    assert {r["model"] for r in topk} == {"resnet18"}
    assert {r["layer"] for r in topk} == {"pool1", "conv3", "conv7"}


def test_a_different_setting_into_the_same_out_is_refused(first_run, capsys):
    argv = [*first_run["argv"], "--lr", "0.1"]
    with pytest.raises(SystemExit) as e:
        job.main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "holds a run with lr=0.05, not 0.1" in err[0]


def test_rerun_for_three_epochs_trains_only_the_third_and_survives_a_killed_worker(
        first_run, tmp_path, monkeypatch):
    out = first_run["out"]
    marker = str(tmp_path / "killed")
    # Rank 1 (on the second node) exits hard at batch 2 of epoch 3, once.
    monkeypatch.setenv(job.FAULT_ENV, f"1:3:2:{marker}")
    argv = [*first_run["argv"][:-4], "--epochs", "3", "--out", out]
    assert job.main(argv) == 0
    assert os.path.exists(marker)                # the worker really died mid-epoch
    rows = tables.read_table(f"{out}/metrics.parquet").to_pylist()
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    assert rows[:2] == first_run["metrics"]      # finished epochs untouched, not recomputed
    assert rows[2]["train_images"] == 96 and rows[2]["lr"] == pytest.approx(0.05)
    assert load_checkpoint(f"{out}/model.pt").meta["epoch"] == 3
    # Once more with the same epochs: nothing left to train, nothing rewritten (run.json holds
    # the wall time of the run that wrote it).
    before = tables.read_bytes(f"{out}/run.json")
    assert job.main(argv) == 0
    assert tables.read_bytes(f"{out}/run.json") == before


def test_resnet34_model_pt_loads_into_torchvision(tmp_path):
    torch.manual_seed(0)
    model = build_model("resnet34", num_classes=5)
    zca = WhiteningStats().update(torch.rand(2, 3, 8, 8)).fit()
    last = {"state_dict": model.state_dict(), "model": "resnet34", "epoch": 1, "classes": list("abcde"),
            "recipe": job.PRESETS["paper"].as_dict(), "history": [{"top1": 0.5}]}
    url = str(tmp_path / "model.pt")
    job.write_model(url, last, zca)
    sd = torch.load(url, weights_only=True)["state_dict"]
    tv = torchvision.models.resnet34(num_classes=5)
    tv.load_state_dict(sd, strict=True)
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(tv.eval()(x), model.eval()(x))
    loaded = load_checkpoint(url)
    assert loaded.model_name == "resnet34" and loaded.preprocess.state() == zca.state()


def test_init_from_a_torchvision_state_dict(tmp_path):
    sd = torchvision.models.resnet18(num_classes=8).state_dict()
    path = str(tmp_path / "tv.pth")
    torch.save(sd, path)
    cfg = job.TrainConfig(out=str(tmp_path / "o"), recipe=job.preset("demo", model="resnet18"),
                          init=f"torchvision:{path}")
    state, cfg2 = job._load_init(cfg, num_classes=8)
    assert cfg2.recipe.width == 64               # the weights fix the width
    model = build_model("resnet18", num_classes=8, width=64)
    model.load_state_dict(state)                 # what each worker does before DDP
    assert all(torch.equal(model.state_dict()[k], v) for k, v in sd.items())
    with pytest.raises(job.BadInput, match="has 8 classes but the data has 10"):
        job._load_init(cfg, num_classes=10)


@pytest.fixture
def unlabelled(tmp_path, tiny) -> str:
    flat = tmp_path / "flat"
    flat.mkdir()
    for name in sorted(os.listdir(f"{tiny}/val/coffee"))[:3]:
        (flat / name).write_bytes(open(f"{tiny}/val/coffee/{name}", "rb").read())
    return str(flat)


@pytest.mark.parametrize("case, message", [
    ("model", "unknown model 'resnet35'; allowed: plainnet18, plainnet34, resnet18, resnet34"),
    ("batch", "global batch 10 is not divisible by 3 workers"),
    ("labels", "labels required but"),
    ("out", "is not writable"),
    ("init", "--init 'x.pth' not understood; allowed: torchvision:PATH"),
    ("val", "--data needs --val"),
])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(case, message, tiny, unlabelled, tmp_path,
                                                         capsys):
    out = str(tmp_path / "out")
    data = ["--data", f"{tiny}/train", "--val", f"{tiny}/val"]
    argv = {
        "model": [*data, "--model", "resnet35", "--out", out],
        "batch": [*data, "--batch-size", "10", "--workers", "3", "--out", out],
        "labels": ["--data", unlabelled, "--val", f"{tiny}/val", "--out", out],
        "out": [*data, "--out", str(tmp_path / "a_file" / "out")],
        "init": [*data, "--init", "x.pth", "--out", out],
        "val": ["--data", f"{tiny}/train", "--out", out],
    }[case]
    (tmp_path / "a_file").write_text("not a folder")
    with pytest.raises(SystemExit) as e:
        job.main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("python -m jobs.train: error:")
    assert message in err[0]
    assert not os.path.exists(out)
