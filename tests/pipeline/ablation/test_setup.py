"""pipeline.ablation.setup: the labels check, the --from census read from real files, and the
fingerprint key, counts and details of an AblationSetup."""
from __future__ import annotations

import dataclasses

import numpy as np
import pyarrow as pa
import pytest
import torch

from pipeline.ablation.setup import AblationSetup, check_labels, read_census
from pipeline.stats.accumulators import ChannelStats
from pipeline.data.decode import EvalTransform
from pipeline.models.layers import catalogue
from pipeline.models.zoo import build_model
from pipeline.data.preprocess import IMAGENET
from pipeline.ablation.table1 import census_table
from pipeline.results.tables import write_table


def _model(classes: int = 10):
    torch.manual_seed(0)
    return build_model("resnet18", num_classes=classes, width=8).eval()


def test_labels_past_the_models_classes_are_refused():
    model = _model(10)
    check_labels(np.array([0, 9, 3]), model, "data/val", "resnet18")
    with pytest.raises(ValueError, match=r"labels of data/val run 0\.\.10 but resnet18 has 10 "
                                         "classes"):
        check_labels(np.array([0, 10]), model, "data/val", "resnet18")
    with pytest.raises(ValueError, match="does not cover"):
        check_labels(np.array([-1, 2]), model, "data/val", "resnet18")


def test_read_census_is_the_census_of_the_analysis_table(tmp_path):
    pool1 = catalogue(_model())["pool1"]
    g = torch.Generator().manual_seed(0)
    acts = torch.relu(torch.randn(5, pool1.channels, 6, 6, generator=g))
    acts[:, 3] = 0
    channels = pa.concat_tables([ChannelStats(pool1.channels).update(acts).to_table(m, "pool1")
                                 for m in ("resnet18", "other")])
    out = str(tmp_path / "analysis")
    with pytest.raises(ValueError, match=r"channels\.parquet does not exist \(run jobs\.analyze "
                                         r"with --layers pool1 first\)"):
        read_census(out, "resnet18", pool1, 0)
    write_table(channels, f"{out}/stimuli/channels.parquet")
    census = read_census(out, "resnet18", pool1, 2)
    assert census.equals(census_table(channels, "resnet18", "pool1", pool1.channels, 2))
    assert [r["channel"] for r in census.to_pylist() if r["inactive"]] == [3]
    with pytest.raises(ValueError, match="no rows for model 'vgg11'"):
        read_census(out, "vgg11", pool1, 0)


def test_counts_and_details():
    model = _model()
    pool1 = catalogue(model)["pool1"]
    manifest = type("M", (), {"__len__": lambda self: 1000})()
    s = AblationSetup(model, "resnet18", IMAGENET, True, pool1, "s3://b/val", manifest,
                      EvalTransform(72, 64), 1, b"w")
    assert s.counts(7, 256, 4, 9) == {"images": 1000, "images_read": 993, "images_skipped": 7,
                                      "shards": 4, "minibatches": 4, "evaluations": 9}
    details = s.details([3], {"mode": "x"})
    assert details["census_source"] == "census pass" and details["untrained"]
    assert {k: details[k] for k in ("layer", "train_seed", "inactive_channels", "precision")} == {
        "layer": "pool1", "train_seed": 1, "inactive_channels": [3], "precision": {"mode": "x"}}
    census = pa.table({"channel": [0]})
    assert dataclasses.replace(s, census=census).details([], {})["census_source"] == "--from"
