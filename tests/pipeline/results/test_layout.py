"""pipeline.results.layout: the results tree of jobs.reproduce; seed 0 at the top, seed s in seeds/<s>."""
from __future__ import annotations

import pytest

from pipeline.results import layout


@pytest.mark.parametrize("out", ["./results", "s3://b/results/"])
def test_seed_zero_is_the_single_seed_layout_and_other_seeds_repeat_it(out):
    root = out.rstrip("/")
    assert layout.checkpoint(out, "resnet34") == f"{root}/train/resnet34/model.pt"
    assert layout.metrics(out, "resnet34") == f"{root}/train/resnet34/metrics.parquet"
    assert layout.stimuli(out, "plainnet34", "channels") == \
        f"{root}/analysis/plainnet34/stimuli/channels.parquet"
    assert layout.ablation_dir(out, "resnet34") == f"{root}/ablation/resnet34"
    assert layout.actmax_dir(out, "resnet34") == f"{root}/actmax/resnet34"
    assert layout.combined(out, "ablation", "table1") == f"{root}/ablation/table1.parquet"
    assert layout.combined(out, "actmax", "actmax") == f"{root}/actmax/actmax.parquet"
    assert layout.neuron_types_dir(out) == f"{root}/neuron_types"
    assert layout.report_index(out) == f"{root}/report/index.html"
    assert layout.run_json(out) == f"{root}/run.json"
    assert layout.checkpoint(out, "resnet34", 2) == f"{root}/seeds/2/train/resnet34/model.pt"
    assert layout.stimuli(out, "resnet34", "mean", 1) == \
        f"{root}/seeds/1/analysis/resnet34/stimuli/mean.parquet"
    assert layout.ablation_dir(out, "plainnet34", 3) == f"{root}/seeds/3/ablation/plainnet34"
    assert layout.stimuli_table("x/a", "topk") == "x/a/stimuli/topk.parquet"


def test_bad_names_are_refused():
    with pytest.raises(ValueError, match="allowed: train"):
        layout.stage_dir("out", "stimuli")
    with pytest.raises(ValueError, match=">= 0"):
        layout.seed_root("out", -1)
