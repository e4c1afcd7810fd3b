"""A rehearsal of the paper preset at toy size, so that a cluster user's 90-epoch run and the
ablation sweep after it are not the first time these code paths execute.

`python -m jobs.train --preset paper` on a few demo JPEGs with only the sizes shrunk (resnet34 of
width 4, crops of 32, one epoch of one global batch, 32 ZCA images): fp32 with TF32 off where it
applies, SyncBatchNorm across 2 Ray Train workers, one DataLoader process per worker, the
Inception photometric distortions, a global batch split over the workers, the paper's evaluation
transform (256 / 224), seeds 0 and 1: one TorchTrainer run per seed on one Ray cluster for the
module. Then `jobs.ablate --fraction 1ch,0.25,0.5,0.75` on both checkpoints (a few images): one
Table 1 row per subset size, labelled with the checkpoint's training seed.
"""
from __future__ import annotations

import contextlib
import io

import pytest
import torch

from jobs import train as job
from pipeline.results import tables
from pipeline.models.checkpoint import load_checkpoint
from pipeline.data.demo import DemoSpec, generate_demo_data
from tests.helpers import local_ray

TOY = ["--preset", "paper", "--model", "resnet34", "--width", "4", "--input-size", "32",
       "--epochs", "1", "--zca-images", "32", "--workers", "2", "--loader-workers", "1"]
SEEDS = (0, 1)


@pytest.fixture(scope="module")
def ray_local():
    with local_ray(4, 100) as address:
        yield address


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> str:
    root = str(tmp_path_factory.mktemp("toy") / "data")
    generate_demo_data(root, DemoSpec(train_per_class=5, val_per_class=1))
    return root


@pytest.fixture(scope="module")
def runs(ray_local, toy, tmp_path_factory) -> dict[int, tuple[str, str]]:
    """seed -> (--out, what the console showed while that run trained)."""
    done = {}
    for seed in SEEDS:
        url = str(tmp_path_factory.mktemp(f"seed{seed}"))
        console = io.StringIO()
        with contextlib.redirect_stderr(console):
            assert job.main(["--data", f"{toy}/train", "--val", f"{toy}/val", *TOY, "--seed",
                             str(seed), "--out", url]) == 0
        done[seed] = (url, console.getvalue())
    return done


@pytest.mark.parametrize("seed", SEEDS)
def test_paper_preset_fp32_sync_bn_loaders_inception_are_recorded(runs, seed):
    url, _ = runs[seed]
    [row] = tables.read_table(f"{url}/metrics.parquet").to_pylist()
    assert (row["seed"], row["precision"], row["augment"], row["sync_bn"], row["workers"]) == \
        (seed, "fp32", "inception", True, 2)
    assert row["train_images"] == 40 and row["val_images"] == 8   # one global batch of 40
    meta = load_checkpoint(f"{url}/model.pt").meta
    assert meta["recipe"]["seed"] == seed and meta["recipe"]["precision"] == "fp32"
    assert meta["recipe"]["eval_resize"] == 256 and meta["recipe"]["eval_crop"] == 224
    assert meta["sync_bn"] is True
    cfg = tables.read_json(f"{url}/run.json")["config"]
    assert (cfg["seed"], cfg["precision"], cfg["sync_bn"], cfg["augment"]) == \
        (seed, "fp32", True, "inception")
    assert cfg["loader_workers"] == 1 and cfg["recipe"]["batch_size"] == 256


@pytest.mark.parametrize("seed", SEEDS)
def test_the_console_shows_one_line_per_epoch_and_ray_trains_noise_stays_in_the_log(runs, seed):
    """Ray Train's own lines (its per-report dumps) never reach the console: the workers'
    output stays in Ray's session logs (log_to_driver off, Ray's public switch)."""
    import glob

    import ray

    url, console = runs[seed]
    lines = console.splitlines()
    assert sum("train: epoch 1/1 train_loss" in line for line in lines) == 1
    assert not any(s in console for s in ("TrainingReport(", "Failed to query Ray Train",
                                          "Reporting training result"))
    logs = glob.glob(f"{ray.get_runtime_context().get_temp_dir()}/session_latest/logs/*")
    text = "".join(open(p, encoding="utf-8", errors="replace").read() for p in logs
                   if p.endswith((".out", ".err", ".log")))
    assert "TrainingReport(" in text or "Reporting training result" in text


def test_the_seed_changes_the_training(runs):
    w = [load_checkpoint(f"{runs[s][0]}/model.pt").model.state_dict()["conv1.weight"]
         for s in SEEDS]
    assert not torch.equal(w[0], w[1])


def test_the_ablation_fraction_sweep_gives_a_table1_row_per_subset_size(runs, toy, tmp_path):
    from jobs import ablate

    for seed in SEEDS:
        out = str(tmp_path / f"ablation{seed}")
        assert ablate.main(["--checkpoint", f"{runs[seed][0]}/model.pt", "--data", f"{toy}/val",
                            "--fraction", "1ch,0.25,0.5,0.75", "--limit", "4", "--seeds", "1",
                            "--shards", "1", "--out", out]) == 0
        t1 = tables.read_table(f"{out}/table1.parquet").to_pylist()
        assert [(r["condition"], r["subset_channels"], r["fraction"]) for r in t1] == [
            ("inactive-all", None, None), ("inactive-random", 1, None),
            ("inactive-random", None, 0.25), ("inactive-random", None, 0.5),
            ("inactive-random", None, 0.75)]
        assert all(r["train_seed_ids"] == [seed] and r["images"] == 4 for r in t1)
