"""keep_freed_memory: after it, a large tensor allocated again lands on pages the process
already has (no page faults); without it (or with the opt-out variable) glibc maps fresh
pages each time. Checked in a child process: the setting is process-wide."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from pipeline.data.hostmem import ENV

_CHILD = """
import json, resource, torch
from pipeline.data.hostmem import keep_freed_memory
kept = keep_freed_memory()
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
def step():                                # a tiny forward: three 48 MiB tensors, then freed
    x = torch.ones(48 << 18)
    y = x * 2
    return float((y + x)[0])
for _ in range(3):                         # warm-up: the heap grows to what a step needs
    step()
before = faults()
for _ in range(9):
    step()
print(json.dumps({"kept": kept, "faults": faults() - before}))
"""


def _run(env: dict[str, str]) -> dict:
    out = subprocess.run([sys.executable, "-c", _CHILD], capture_output=True, text=True,
                         env={**os.environ, **env}, check=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(__file__)))))
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc only")
def test_kept_memory_is_reused_without_page_faults_and_the_variable_turns_it_off():
    kept = _run({ENV: "1"})
    plain = _run({ENV: "0"})
    assert kept["kept"] is True and plain["kept"] is False
    pages = 9 * 3 * (48 << 20) // 4096             # nine steps of three fresh 48 MiB blocks
    assert plain["faults"] >= pages * 0.9
    # kept: now and then an aligned request fits no free hole and the heap grows by a block
    # (measured: 0-11 % of the pages over nine steps, 0 in most steps)
    assert kept["faults"] < pages * 0.25
