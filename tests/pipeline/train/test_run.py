"""A training run's bookkeeping without Ray: --init weights loaded and refused, the same-run
check of a rerun, the workers' plan, and the run report's numbers against sums by hand."""
import math

import pytest
import torch
import torchvision

from pipeline.results import tables
from pipeline.models.zoo import build_model
from pipeline.train.recipe import preset
from pipeline.train.run import (epoch_line, load_init, prior_state, run_report,
                               worker_plan)


def test_init_from_a_torchvision_state_dict(tmp_path):
    sd = torchvision.models.resnet18(num_classes=8).state_dict()
    path = str(tmp_path / "tv.pth")
    torch.save(sd, path)
    state, width = load_init(f"torchvision:{path}", "resnet18", num_classes=8)
    assert width == 64                           # the weights fix the width (the demo's is 16)
    model = build_model("resnet18", num_classes=8, width=64)
    model.load_state_dict(state)                 # what each worker does before DDP
    assert all(torch.equal(model.state_dict()[k], v) for k, v in sd.items())
    with pytest.raises(ValueError, match="has 8 classes but the data has 10"):
        load_init(f"torchvision:{path}", "resnet18", num_classes=10)
    with pytest.raises(ValueError, match=f"--init {path}: checkpoint does not fit vgg11: "):
        load_init(f"torchvision:{path}", "vgg11", num_classes=8)


def test_a_rerun_must_be_the_same_run_but_may_ask_for_more_epochs(tmp_path):
    url, out = str(tmp_path / "train.json"), str(tmp_path)
    identity = {"preset": "demo", "model": "resnet18", "lr": 0.05, "data": None}
    assert prior_state(url, identity, out) is None           # nothing there yet
    tables.write_json(url, {"identity": identity, "classes": ["a", "b"]})
    assert prior_state(url, dict(identity), out)["classes"] == ["a", "b"]
    other = {**identity, "lr": 0.1}
    with pytest.raises(ValueError, match=f"{out} holds a run with lr=0.05, not 0.1; rerun with "
                                         "the same settings"):
        prior_state(url, other, out)


def test_worker_plan_resources_loaders_and_the_shortfall_warning():
    paper = preset("paper")
    p = worker_plan(paper, 3, None, True, True, {"CPU": 4.0})
    # paper default: the worker's CPU share (4 // 3 = 1) minus one, but at least one process
    assert p.loaders == 1 and p.resources == {"CPU": 2, "GPU": 1}
    assert p.shortfall == ("training needs 6 CPUs (cluster has 4), 3 GPUs (cluster has 0); it "
                           "waits until the cluster has them")
    assert "3 workers x 1 loader processes" in p.summary and "synchronised" in p.summary
    demo = worker_plan(preset("demo"), 2, None, False, False, {"CPU": 2.0})
    assert demo.loaders == 0 and demo.resources == {"CPU": 1} and demo.shortfall is None
    assert worker_plan(preset("demo"), 2, 3, False, False, {"CPU": 8.0}).loaders == 3


def _row(epoch: int, skipped: int, ips: float) -> dict:
    return {"epoch": epoch, "train_images": 100, "val_images": 20, "skipped": skipped,
            "images_per_s": ips, "train_loss": 1.0, "val_loss": 2.0, "top1": 0.5, "top5": 0.75,
            "lr": 0.05, "seconds": 3.0}


def test_run_report_counts_only_the_epochs_this_run_trained():
    last = {"history": [_row(1, 1, 10.0), _row(2, 2, 20.0), _row(3, 3, 40.0)], "epoch": 3,
            "recipe": {"model": "resnet18"}}
    state = {"classes": ["a", "b", "c"], "zca": {"images": 50, "skipped": 1, "shards": 2,
                                                 "fingerprint": "f00"}}
    rep = run_report(last, state, 1, (100, 20), None)     # epochs 2 and 3, the ZCA reused
    assert rep["counts"] == {
        "train_images": 100, "val_images": 20, "classes": 3, "epochs": 3, "zca_images": 50,
        "zca_skipped": 1, "zca_shards": 2, "images_read": 240, "images_skipped": 5,
        "epochs_trained": 2, "skipped_per_epoch": [2, 3]}
    assert (rep["work"], rep["unit"], rep["stage_work"], rep["fingerprint"]) == \
        (200, "images", {"zca": 0}, "f00")
    assert rep["details"] == {"model": "resnet18", "final": last["history"][-1],
                              "train_images_per_s_mean": 30.0}
    fresh = run_report(last, state, 0, (100, 20), {"units": 2, "units_computed": 2})
    assert fresh["counts"]["units"] == 2 and fresh["stage_work"] == {"zca": 50}
    assert math.isclose(fresh["details"]["train_images_per_s_mean"], 70 / 3)
    assert epoch_line(last["history"][0], 3) == ("epoch 1/3 train_loss 1.0000 val_loss 2.0000 "
                                                 "top1 0.500 top5 0.750 lr 0.05 3.0s 10 img/s")
