"""infra/gpu-bench.sh on CPU (the same script a GPU machine runs, with a handful of images):
one JSON line on stdout with every figure; bad options give one line on stderr and exit 2."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "infra" / "gpu-bench.sh"


def _run(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": sys.executable, "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0"}
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)


def test_gpu_bench_script_runs_on_cpu(tmp_path):
    p = _run("--device", "cpu", "--images", "8", "--no-install", "--no-tests",
             "--data", str(tmp_path / "jpegs"), "--", "--width", "8", "--resize", "40", "--crop",
             "32", "--repeats", "1", "--scaling-images", "4", "--batch-size", "4", "--cpus", "2")
    assert p.returncode == 0, p.stderr[-2000:]
    lines = p.stdout.strip().splitlines()
    assert len(lines) == 1, p.stdout
    res = json.loads(lines[0])
    assert res["device"] == "cpu" and res["images"] == 8 and res["data"] == "synthetic"
    assert res["check"] == "infra/gpu-bench.sh" and res["cuda_tests"] == "not run"
    for key in ("decode_images_per_s", "decode_images_per_s_cpus1", "decode_images_per_s_cpus2",
                "truncated_forward_images_per_s", "analysis_images_per_s",
                "end_to_end_images_per_s", "accumulator_ms_per_batch", "amax_floor_ms_per_batch",
                "projected_seconds_50k"):
        assert res[key] > 0, key
    assert "gpu" in res and res["versions"]["torchvision"]
    assert len(list((tmp_path / "jpegs").iterdir())) == 8
    assert "decode" in p.stderr            # the readable lines go to stderr


def test_gpu_bench_script_rejects_bad_options():
    for args in (["--device", "tpu"], ["--images", "0"], ["--frobnicate"]):
        p = _run(*args)
        assert p.returncode == 2 and p.stdout == ""
        assert p.stderr.strip().count("\n") == 0 and "gpu-bench.sh: error:" in p.stderr
