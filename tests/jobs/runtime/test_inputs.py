"""jobs.runtime.inputs: --device cuda on a machine without CUDA and without a cluster is bad
input found before anything is written (each job in a fresh interpreter: no Ray in it)."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")


@pytest.mark.parametrize("job", ["analyze", "compare", "ablate", "actmax"])
def test_cuda_without_a_gpu_or_cluster_exits_2_and_writes_nothing(tmp_path, job):
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    done = subprocess.run([sys.executable, "-m", f"jobs.{job}", "--device", "cuda", "--out",
                           str(out)], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert lines[-1] == (f"python -m jobs.{job}: error: --device cuda asked for, but this "
                         "machine has no CUDA device and no cluster is given (RAY_ADDRESS); "
                         "use auto or cpu")
    assert len(lines) == 1 or all("WARNING" in ln for ln in lines[:-1]), done.stderr
    assert not out.exists()
