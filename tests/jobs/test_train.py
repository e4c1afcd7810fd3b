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

import functools
import os
import re
import uuid

import numpy as np
import pytest
import torch
import torchvision

from jobs import train as job
from jobs import trainer
from pipeline.results import tables
from pipeline.models.checkpoint import load_checkpoint
from pipeline.data.demo import DemoSpec, generate_demo_data
from pipeline.models.zoo import build_model
from pipeline.data.preprocess import WhiteningStats
from pipeline.data.listing import build_manifest
from pipeline.train.recipe import PRESETS, default_loader_workers, preset, write_model
from tests.helpers import LOOPBACK, assert_run_shape, dying_train_loop

# crop-flip: these tests check the job's mechanics on 96 images; the demo's colour-blind
# augmentation (hue rotation, grayscale) makes a 2-epoch loss decrease on them a coin toss.
SMALL = ["--model", "resnet18", "--width", "8", "--batch-size", "16", "--workers", "2",
         "--augment", "crop-flip"]


@pytest.fixture(scope="module")
def cluster(s3_server):
    # s3_server first: Ray's nodes and workers inherit the AWS_* variables that point at it.
    import ray
    from ray.cluster_utils import Cluster

    os.environ["RAY_ENABLE_UV_RUN_RUNTIME_ENV"] = "0"
    c = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "include_dashboard": False, "object_store_memory": 100 * 1024 ** 2,
        "node_ip_address": LOOPBACK})
    c.add_node(num_cpus=1, object_store_memory=100 * 1024 ** 2, node_ip_address=LOOPBACK)
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
    assert_run_shape(run)
    assert run["counts"]["epochs"] == 2 and run["counts"]["zca_images"] == 96
    assert run["counts"]["images_read"] == 2 * (96 + 32) and run["counts"]["units_computed"] == 2
    assert run["device"]["workers"] == 2 and run["config"]["sync_bn"] is False
    fs, path = tables.fs_path(f"{out}/checkpoints")
    ckpts = [p for p in fs.ls(path, detail=True, refresh=True)
             if p["name"].rsplit("/", 1)[-1].startswith("checkpoint_") and p["type"] == "directory"]
    assert len(ckpts) == 2                       # --keep-checkpoints 2


def test_zca_of_the_parallel_pass_equals_a_single_pass(first_run, tiny):
    """The Ray tasks' merged sums give the matrix one process computes over the same crops."""
    from pipeline.data.augment import EvalResizeCrop
    from pipeline.train.data import ImageDataset, collate

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
    from pipeline.data.augment import EvalResizeCrop
    from pipeline.train.data import ImageDataset, collate
    from pipeline.train.recipe import evaluate

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
    # Rank 1 (on the second node) exits hard at batch 2 of epoch 3, once: the training loop
    # TorchTrainer runs is jobs.trainer.train_loop, here a wrapper that kills its own process.
    monkeypatch.setattr(trainer, "train_loop", functools.partial(
        dying_train_loop, str(tmp_path), "rank1-epoch3-batch2"))
    argv = [*first_run["argv"][:-4], "--epochs", "3", "--out", out]
    assert job.main(argv) == 0
    monkeypatch.undo()
    assert os.path.exists(tmp_path / "rank1-epoch3-batch2")   # the worker really died mid-epoch
    rows = tables.read_table(f"{out}/metrics.parquet").to_pylist()
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    assert rows[:2] == first_run["metrics"]      # finished epochs untouched, not recomputed
    assert rows[2]["train_images"] == 96 and rows[2]["lr"] == pytest.approx(0.05)
    assert load_checkpoint(f"{out}/model.pt").meta["epoch"] == 3
    run = tables.read_json(f"{out}/run.json")
    assert run["counts"]["epochs_trained"] == 1 and run["counts"]["units"] == 0   # ZCA reused
    # Once more with the same epochs: nothing left to train, nothing rewritten (run.json holds
    # the wall time of the run that wrote it).
    before = tables.read_bytes(f"{out}/run.json")
    assert job.main(argv) == 0
    assert tables.read_bytes(f"{out}/run.json") == before


@pytest.fixture(scope="module")
def few(tmp_path_factory) -> str:
    """2 train / 1 val image per class: a VGG epoch of one step."""
    root = str(tmp_path_factory.mktemp("few") / "data")
    generate_demo_data(root, DemoSpec(train_per_class=2, val_per_class=1))
    return root


def test_a_tiny_vgg_run_writes_a_model_pt_that_loads_strictly_into_torchvision(cluster, few,
                                                                              tmp_path):
    """VGG trains at torchvision's width even under the demo preset (width 16 is the ResNet
    family's knob), so model.pt is a torchvision vgg11 state_dict."""
    out = str(tmp_path / "vgg")
    assert job.main(["--data", f"{few}/train", "--val", f"{few}/val", "--model", "vgg11",
                     "--epochs", "1", "--workers", "1", "--batch-size", "16", "--input-size",
                     "32", "--zca-images", "16", "--out", out]) == 0
    [row] = tables.read_table(f"{out}/metrics.parquet").to_pylist()
    assert row["train_images"] == 16 and row["val_images"] == 8
    loaded = load_checkpoint(f"{out}/model.pt")
    assert loaded.model_name == "vgg11" and loaded.meta["recipe"]["width"] == 64
    tv = torchvision.models.vgg11(num_classes=8)
    tv.load_state_dict(torch.load(f"{out}/model.pt", weights_only=True)["state_dict"], strict=True)
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(tv.eval()(x), loaded.model.eval()(x))


def test_resnet34_model_pt_loads_into_torchvision(tmp_path):
    torch.manual_seed(0)
    model = build_model("resnet34", num_classes=5)
    zca = WhiteningStats().update(torch.rand(2, 3, 8, 8)).fit()
    last = {"state_dict": model.state_dict(), "model": "resnet34", "epoch": 1, "classes": list("abcde"),
            "recipe": PRESETS["paper"].as_dict(), "history": [{"top1": 0.5}]}
    url = str(tmp_path / "model.pt")
    write_model(url, last, zca)
    sd = torch.load(url, weights_only=True)["state_dict"]
    tv = torchvision.models.resnet34(num_classes=5)
    tv.load_state_dict(sd, strict=True)
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(tv.eval()(x), model.eval()(x))
    loaded = load_checkpoint(url)
    assert loaded.model_name == "resnet34" and loaded.preprocess.state() == zca.state()


def test_the_demo_preset_trains_vgg_at_full_width_and_refuses_another_width(tmp_path):
    assert job.TrainConfig(out=str(tmp_path), model="vgg16_bn").recipe.width == 64
    assert job.TrainConfig(out=str(tmp_path), model="resnet50").recipe.width == 16
    with pytest.raises(job.BadInput, match="width 16 applies to the ResNet family only"):
        job.TrainConfig(out=str(tmp_path), model="vgg11", width=16)


def test_bf16_and_the_seed_are_recorded_in_model_pt(tmp_path):
    zca = WhiteningStats().update(torch.rand(2, 3, 8, 8)).fit()
    model = build_model("resnet18", num_classes=3, width=4)
    recipe = preset("paper", precision="bf16", seed=3).as_dict()
    last = {"state_dict": model.state_dict(), "model": "resnet18", "epoch": 1,
            "classes": list("abc"), "recipe": recipe, "history": [{"top1": 0.5}], "sync_bn": True}
    write_model(str(tmp_path / "model.pt"), last, zca)
    meta = load_checkpoint(str(tmp_path / "model.pt")).meta
    assert meta["recipe"]["precision"] == "bf16" and meta["recipe"]["seed"] == 3
    assert meta["sync_bn"] is True


def test_any_worker_count_is_accepted_and_paper_loader_processes_come_from_the_cpus(tmp_path):
    cfg = job.TrainConfig(out=str(tmp_path), preset="paper", data="d", val="v", workers=3)
    assert cfg.recipe.batch_size % cfg.workers and cfg.sync_bn_on   # 256 over 3: fine now
    assert default_loader_workers(cfg.recipe, 3, 48) == 15          # 16 CPUs per worker, one trains
    assert default_loader_workers(cfg.recipe, 3, 3) == 1            # at least one loader process
    demo = job.TrainConfig(out=str(tmp_path), workers=3)
    assert default_loader_workers(demo.recipe, 3, 48) == 0 and not demo.sync_bn_on
    assert not job.TrainConfig(out=str(tmp_path), preset="paper", data="d", val="v",
                               workers=1).sync_bn_on
    assert not job.TrainConfig(out=str(tmp_path), preset="paper", data="d", val="v",
                               sync_bn=False).sync_bn_on


def _sync_bn_loop(config: dict) -> None:
    """Each rank normalises its (unequal) share of one batch through SyncBatchNorm."""
    import ray.train

    from pipeline.train.syncbn import convert_sync_batchnorm

    rank = ray.train.get_context().get_world_rank()
    bn = convert_sync_batchnorm(torch.nn.Sequential(torch.nn.BatchNorm2d(3, momentum=0.5)))
    with torch.no_grad():
        bn[0].weight.copy_(torch.tensor([1.0, 2.0, 0.5]))
    x = config["x"][:5] if rank == 0 else config["x"][5:]
    x = x.clone().requires_grad_(True)
    y = bn.train()(x)
    (y * config["w"][:len(x)] if rank == 0 else y * config["w"][5:]).sum().backward()
    torch.save({"y": y.detach(), "mean": bn[0].running_mean, "var": bn[0].running_var,
                "grad_x": x.grad, "grad_w": bn[0].weight.grad},
               f"{config['dir']}/rank{rank}.pt")


def test_sync_batchnorm_on_two_ray_train_workers_equals_one_batchnorm_on_the_whole_batch(
        cluster, tmp_path):
    import ray.train
    from ray.train.torch import TorchTrainer

    torch.manual_seed(0)
    x, w = torch.randn(12, 3, 4, 4) * 3 + 1, torch.randn(12, 3, 4, 4)
    TorchTrainer(_sync_bn_loop, train_loop_config={"x": x, "w": w, "dir": str(tmp_path)},
                 scaling_config=ray.train.ScalingConfig(num_workers=2),
                 run_config=ray.train.RunConfig(storage_path=str(tmp_path / "ray"))).fit()
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2))
    bn = torch.nn.BatchNorm2d(3, momentum=0.5)
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([1.0, 2.0, 0.5]))
    xs = x.clone().requires_grad_(True)
    y = bn.train()(xs)
    (y * w).sum().backward()
    torch.testing.assert_close(torch.cat([r0["y"], r1["y"]]), y.detach(), atol=1e-5, rtol=1e-5)
    for r in (r0, r1):   # running statistics: the whole batch's, on every rank
        torch.testing.assert_close(r["mean"], bn.running_mean, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(r["var"], bn.running_var, atol=1e-5, rtol=1e-5)
    # Input gradients include the other rank's share through the statistics; the parameter
    # gradient summed over ranks (what DDP's all-reduce adds up) is the whole batch's.
    torch.testing.assert_close(torch.cat([r0["grad_x"], r1["grad_x"]]), xs.grad, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(r0["grad_w"] + r1["grad_w"], bn.weight.grad, atol=1e-4, rtol=1e-5)


@pytest.fixture
def unlabelled(tmp_path, tiny) -> str:
    flat = tmp_path / "flat"
    flat.mkdir()
    for name in sorted(os.listdir(f"{tiny}/val/coffee"))[:3]:
        (flat / name).write_bytes(open(f"{tiny}/val/coffee/{name}", "rb").read())
    return str(flat)


@pytest.mark.parametrize("case, message", [
    ("model", "invalid --model 'resnet35'; allowed: "),
    ("loaders", "--loader-workers must be >= 0, got -1"),
    ("labels", "labels required but"),
    ("out", "is not writable"),
    ("init", "--init not understood; allowed: torchvision:PATH, got x.pth"),
    ("val", "--data needs --val"),
    ("init-classes", "has 10 classes but the data has 8"),   # pipeline's ValueError -> exit 2
])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(case, message, tiny, unlabelled, tmp_path,
                                                         capsys):
    out = str(tmp_path / "out")
    data = ["--data", f"{tiny}/train", "--val", f"{tiny}/val"]
    argv = {
        "model": [*data, "--model", "resnet35", "--out", out],
        "loaders": [*data, "--loader-workers", "-1", "--out", out],
        "labels": ["--data", unlabelled, "--val", f"{tiny}/val", "--out", out],
        "out": [*data, "--out", str(tmp_path / "a_file" / "out")],
        "init": [*data, "--init", "x.pth", "--out", out],
        "val": ["--data", f"{tiny}/train", "--out", out],
        "init-classes": [*data, "--model", "resnet18", "--init",
                         f"torchvision:{tmp_path / 'tv.pth'}", "--out", out],
    }[case]
    if case == "init-classes":
        torch.save(torchvision.models.resnet18(num_classes=10).state_dict(), tmp_path / "tv.pth")
    (tmp_path / "a_file").write_text("not a folder")
    with pytest.raises(SystemExit) as e:
        job.main(argv)
    assert e.value.code == 2
    # (lines Ray forwards late from an earlier test's workers, "(pid=...) ...", are not ours)
    err = [ln for ln in capsys.readouterr().err.strip().splitlines()
           if not re.match(r"(\x1b\[\d+m)?\(", ln)]
    assert len(err) == 1 and err[0].startswith("python -m jobs.train: error:"), err
    assert message in err[0]
    assert not os.path.exists(out)
