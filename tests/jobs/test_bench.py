"""jobs.bench prints both throughputs, their ratio and a last JSON line that agrees with them."""
from __future__ import annotations

import json

import pytest

from jobs import bench


def test_bench_prints_figures_and_json(capsys):
    assert bench.main(["--images", "6", "--batch-size", "4", "--repeats", "1", "--device", "cpu",
                       "--json"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    res = json.loads(lines[-1])
    assert res["images"] == 6 and res["device"] == "cpu"
    assert res["forward_images_per_s"] > 0 and res["analysis_images_per_s"] > 0
    assert res["ratio"] == pytest.approx(res["analysis_images_per_s"] / res["forward_images_per_s"],
                                         rel=0.01)
    assert lines[0].startswith("forward") and lines[1].startswith("analysis")
    # paper layers of a full-size resnet34: C x (2 x k x 28 B + 4 x RF^2 x 8 B) + O(C) per layer
    want = sum(64 * (2 * 16 * 28 + 4 * rf * rf * 8) for rf in (11, 27, 59))
    assert want <= res["paper_worker_state_bytes"] < want + 3 * 64 * 64


def test_bench_bad_input_exits_2(capsys):
    with pytest.raises(SystemExit) as e:
        bench.main(["--images", "0"])
    assert e.value.code == 2
    assert capsys.readouterr().err.strip().count("\n") == 0
