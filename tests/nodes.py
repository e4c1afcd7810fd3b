"""Run test functions by pytest node id where pytest is missing (the GPU hosts have none):

    python -m tests.nodes tests/pipeline/stats/test_analysis_cuda.py::test_x ...

infra/gpu-bench.sh uses it for the CUDA tests when `import pytest` fails. A function gets a
fresh `tmp_path` (pathlib.Path) when it asks for one; a module whose `SKIP` holds a reason skips
its tests (the CUDA modules set it without a GPU). One line per test, then pytest's kind of
summary ("2 passed, 1 skipped"); exit 1 when any failed. Only what those modules use is
supported: plain functions, `tmp_path`, `SKIP`.
"""
from __future__ import annotations

import importlib
import inspect
import pathlib
import sys
import tempfile
import time
import traceback


def run(node: str) -> tuple[str, str]:
    """("passed" | "failed" | "skipped", detail) of one node id `path/to/test_x.py::name`."""
    path, _, name = node.partition("::")
    module = importlib.import_module(path.removesuffix(".py").replace("/", "."))
    if getattr(module, "SKIP", None):
        return "skipped", module.SKIP
    fn = getattr(module, name)
    with tempfile.TemporaryDirectory(prefix="nodes-") as tmp:
        kwargs = {"tmp_path": pathlib.Path(tmp)} if "tmp_path" in inspect.signature(fn).parameters else {}
        try:
            fn(**kwargs)
        except Exception:  # noqa: BLE001 - a failing test is reported, the others still run
            return "failed", traceback.format_exc()
    return "passed", ""


def main(nodes: list[str]) -> int:
    t, counts = time.perf_counter(), {}
    for node in nodes:
        outcome, detail = run(node)
        counts[outcome] = counts.get(outcome, 0) + 1
        print(f"{node} {outcome.upper()}{(': ' + detail.strip()) if detail else ''}", flush=True)
    summary = ", ".join(f"{v} {k}" for k, v in sorted(counts.items()))
    print(f"{summary or 'no tests ran'} in {time.perf_counter() - t:.2f}s")
    return 1 if counts.get("failed") else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
