"""infra/gpu-bench.sh as shipped, on the CPU: the rehearsal of the device check (the same script a
GPU host runs, on a few hundred images), and one line plus exit 2 for bad settings."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "infra" / "gpu-bench.sh"


def _run(env: dict, timeout: int = 900) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    # the script sets PYTHONPATH itself: nothing is installed on a GPU host
    env = {**base, "PYTHON": sys.executable, "BENCH_DEVICE": "cpu", **env}
    return subprocess.run(["bash", str(SCRIPT)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def _without(tmp_path: Path, *packages: str) -> str:
    """A folder whose stand-ins for `packages` refuse to import: the GPU hosts have neither
    Ray nor s3fs, so the device check must never import them (this machine has both)."""
    for name in packages:
        (tmp_path / name).mkdir(parents=True)
        (tmp_path / name / "__init__.py").write_text(
            f"raise ImportError('{name} is not on the GPU hosts: the device check must not "
            f"import it')\n")
    return str(tmp_path)


def test_device_check_rehearsal_on_cpu(tmp_path):
    out = tmp_path / "out"
    p = _run({"OUT": str(out), "BENCH_IMAGES": "260", "BENCH_DATA": str(tmp_path / "jpegs"),
              "BENCH_WIDTH": "16", "PYTHONPATH": _without(tmp_path / "blocked", "ray", "s3fs")})
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    res = json.loads((out / "device-check.json").read_text())
    log = (out / "device-check.log").read_text()
    assert "CUDA tests: 4 skipped" in log and "device check: 260 images" in log
    assert res["device"] == "cpu" and res["images"] == 260 and res["gpu"] is None
    assert res["layers"] == ["pool1", "conv3", "conv7"] and res["crop"] == 224
    assert res["precision"] == {k: "ieee" for k in res["precision"]} or \
        res["precision"].get("cuda.matmul.allow_tf32") is False       # strict fp32
    assert set(res["batch"]) == {"64", "256"}
    for bs, r in res["batch"].items():
        assert r["batch_size"] == int(bs)
        for stage in ("decode_cpu", "preprocess", "forward", "accumulators", "state_to_host"):
            assert r["images_per_s"][stage] > 0, (bs, stage)
        assert "decode_nvjpeg" not in r["images_per_s"]
        assert r["end_to_end"]["images"] == 260 and r["end_to_end"]["shards"] == 1
        assert r["projected_seconds_50k"] > 50_000 / r["end_to_end"]["images_per_s"]
        assert r["bottleneck"] in r["images_per_s"]
    assert res["read"]["images_per_s"] > 0 and 60 < res["read"]["mean_file_kb"] < 200
    assert res["cuda_tests"].startswith("4 skipped")
    assert len(list((tmp_path / "jpegs").iterdir())) == 260


def test_bad_settings_give_one_line_and_exit_2(tmp_path):
    for env in ({"BENCH_IMAGES": "0"}, {"BENCH_IMAGES": "many"}, {"BENCH_DEVICE": "tpu"},
                {"BENCH_BATCHES": "64,x"}, {"PYTHON": str(tmp_path / "no-python")}):
        p = _run({"OUT": str(tmp_path / "out"), **env})
        assert p.returncode == 2 and p.stdout == "", env
        assert p.stderr.count("\n") == 1 and "gpu-bench.sh: error:" in p.stderr, env
    assert not (tmp_path / "out").exists()


def test_nodes_runs_the_cuda_tests_without_pytest(tmp_path):
    """The GPU hosts have no pytest: tests/nodes.py runs the same node ids (here they skip: no
    CUDA) with `import pytest` failing, and real test functions (with tmp_path) where it works."""
    script = ROOT / "infra" / "gpu-bench.sh"
    nodes = [ln.strip() for ln in script.read_text().splitlines()
             if ln.strip().startswith("tests/") and "::test_cuda" in ln]
    assert len(nodes) == 4
    no_pytest = "import sys, runpy; sys.modules['pytest'] = None; sys.argv[1:] = sys.argv[2:]; " \
                "runpy.run_module('tests.nodes', run_name='__main__')"
    p = subprocess.run([sys.executable, "-c", no_pytest, "x", *nodes], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    assert p.stdout.strip().splitlines()[-1].startswith("4 skipped")
    plain = ["tests/pipeline/data/test_decode.py::test_jpeg_info_routes_only_complete_jpegs",
             "tests/pipeline/data/test_decode.py::test_decoder_threads_do_not_change_pixels_or_skips"]
    p = subprocess.run([sys.executable, "-m", "tests.nodes", *plain], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0 and p.stdout.strip().splitlines()[-1].startswith("2 passed"), p.stdout
