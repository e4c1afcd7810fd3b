"""Small helpers shared by tests: free ports for Ray nodes, fault-injection hooks, run.json shape."""
from __future__ import annotations

import contextlib
import os
import socket
from typing import Iterator


def free_ports(n: int) -> list[int]:
    """`n` distinct free TCP ports on 127.0.0.1 (all held open until all are chosen)."""
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


@contextlib.contextmanager
def local_ray(num_cpus: int = 2, store_mib: int = 200) -> Iterator[str]:
    """A real local Ray cluster for one test module; yields its GCS address. `address="local"`
    never joins a stale cluster; workers inherit the environment as it is now (start it after
    the S3 server so that they see its AWS_* variables)."""
    import ray

    os.environ["RAY_ENABLE_UV_RUN_RUNTIME_ENV"] = "0"
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False,
             object_store_memory=store_mib * 1024 ** 2)
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()


# --- fault injection for jobs.runtime.engine (engine.set_test_hook); importable by Ray workers ----------

class Sleep:
    """Hook: sleep before every unit, so that a test can kill something mid-run."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def __call__(self, unit) -> None:
        import time

        time.sleep(self.seconds)


class Die:
    """Hook: the worker process exits hard (as if killed) before the named units: once per unit
    (a flag file under `flags` remembers it), or on every attempt with `always`."""

    def __init__(self, flags: str, names: tuple[str, ...], always: bool = False) -> None:
        self.flags, self.names, self.always = flags, names, always

    def __call__(self, unit) -> None:
        import os

        if unit.name not in self.names:
            return
        flag = os.path.join(self.flags, unit.name)
        if self.always or not os.path.exists(flag):
            open(flag, "w").close()
            os._exit(1)


def assert_run_shape(run: dict) -> None:
    """What every job's run.json shares (the tests of every ported job call this)."""
    from jobs.runtime import runinfo

    assert set(run) == set(runinfo.TOP_LEVEL)
    assert set(runinfo.COUNTS) <= set(run["counts"])
    assert set(run["device"]) == {"kind", "name", "workers"}
    assert "total" in run["seconds"]
    assert set(run["seconds"]) == set(run["throughput"]) - {"unit", "units"}
    assert {"torch", "ray", "python"} <= set(run["versions"])
