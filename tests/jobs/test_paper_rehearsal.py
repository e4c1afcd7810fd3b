"""A rehearsal of the paper preset's training at toy size, so that a cluster user's 90-epoch run
is not the first time these code paths execute.

`python -m jobs.train --preset paper` on a few demo JPEGs with only the sizes shrunk (width 4,
crops of 32, one epoch): fp32 with TF32 off where it applies, SyncBatchNorm across 2 Ray Train
workers, one DataLoader process per worker, the Inception photometric distortions, a global batch
that is split over the workers, the paper's evaluation transform (256 / 224), two seeds. Checks
what each run records and that the console shows one line per epoch without Ray Train's noise.
"""
from __future__ import annotations

import os

import pytest
import torch

from jobs import train as job
from pipeline import tables
from pipeline.checkpoint import load_checkpoint
from pipeline.demo import DemoSpec, generate_demo_data

TOY = ["--preset", "paper", "--model", "resnet34", "--width", "4", "--input-size", "32",
       "--epochs", "1", "--zca-images", "32", "--workers", "2", "--loader-workers", "1"]


@pytest.fixture(scope="module")
def ray_local():
    import ray

    os.environ["RAY_ENABLE_UV_RUN_RUNTIME_ENV"] = "0"
    ray.init(address="local", num_cpus=4, include_dashboard=False,
             object_store_memory=100 * 1024 ** 2)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> str:
    root = str(tmp_path_factory.mktemp("toy") / "data")
    generate_demo_data(root, DemoSpec(train_per_class=5, val_per_class=1))
    return root


def test_paper_preset_two_seeds_fp32_sync_bn_loaders_inception_recorded_and_a_quiet_console(
        ray_local, toy, tmp_path, capfd):
    weights = {}
    for seed in (0, 1):
        url = str(tmp_path / f"seed{seed}")
        argv = ["--data", f"{toy}/train", "--val", f"{toy}/val", *TOY, "--seed", str(seed),
                "--out", url]
        assert job.main(argv) == 0
        [row] = tables.read_table(f"{url}/metrics.parquet").to_pylist()
        assert (row["seed"], row["precision"], row["augment"], row["sync_bn"], row["workers"]) == \
            (seed, "fp32", "inception", True, 2)
        assert row["train_images"] == 40 and row["val_images"] == 8   # one global batch of 40
        loaded = load_checkpoint(f"{url}/model.pt")
        meta = loaded.meta
        assert meta["recipe"]["seed"] == seed and meta["recipe"]["precision"] == "fp32"
        assert meta["recipe"]["eval_resize"] == 256 and meta["recipe"]["eval_crop"] == 224
        assert meta["sync_bn"] is True
        cfg = tables.read_json(f"{url}/run.json")["config"]
        assert (cfg["seed"], cfg["precision"], cfg["sync_bn"], cfg["augment"]) == \
            (seed, "fp32", True, "inception")
        assert cfg["loader_workers"] == 1 and cfg["recipe"]["batch_size"] == 256
        weights[seed] = loaded.model.state_dict()["conv1.weight"]
        # The console: one line for the epoch, none of Ray Train's bookkeeping (in the log file).
        err = capfd.readouterr().err
        assert "TrainingReport(" not in err and "Failed to query Ray Train Controller" not in err
        assert sum("[train] epoch 1/1" in line for line in err.splitlines()) == 1
        log = open(f"{url}/{job.RAY_LOG}", encoding="utf-8").read()
        assert "[train] epoch 1/1" in log
    assert not torch.equal(weights[0], weights[1])     # the seed changes the training
